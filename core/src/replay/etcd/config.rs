//! `replay_store` in the policy (docs/policy.md, "Replay across gateway replicas"): where the
//! replay history lives. `local` (the default) is Envoy's shared data; `etcd` is an etcd
//! cluster every replica shares, reached through an Envoy cluster over gRPC.

use serde::Deserialize;

use crate::error::{join, ConfigError};

/// `replay_store`: `"local"` or `{ "etcd": { ... } }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(rename_all = "snake_case")]
pub enum ReplayStoreConfig {
    /// Envoy's shared data: one history per Envoy process.
    #[default]
    Local,
    /// An etcd cluster: one history for every gateway that uses the same cluster and prefix.
    Etcd(EtcdConfig),
}

/// `replay_store.etcd`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// The Envoy cluster (HTTP/2) that reaches etcd's client endpoints.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// Key prefix of every entry gateguard writes.
    #[cfg_attr(feature = "schema", schemars(regex(pattern = r"^[!-~]{0,255}/$")))]
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// How long a request waits for etcd, in all, before `on_unavailable` applies.
    #[cfg_attr(feature = "schema", schemars(range(min = 1, max = 10000)))]
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u32,
    #[serde(default)]
    pub on_unavailable: OnUnavailable,
}

/// What a request gets when etcd cannot answer in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    /// 503 "Replay protection unavailable…" (fail closed).
    #[default]
    Deny,
    /// Let the request through unchecked; counted and logged.
    Allow,
}

fn default_cluster() -> String {
    "etcd".to_string()
}

fn default_prefix() -> String {
    "/gateguard/replay/".to_string()
}

fn default_timeout_ms() -> u32 {
    250
}

/// Environment variables with etcd's user and password: Envoy passes them to the filter
/// (`host_env_keys`, which `gateguard render` writes); never the policy.
pub const USERNAME_ENV: &str = "GATEGUARD_ETCD_USERNAME";
pub const PASSWORD_ENV: &str = "GATEGUARD_ETCD_PASSWORD";

/// The longest wait a policy may ask for: a request holds a connection while it waits.
pub const MAX_TIMEOUT_MS: u32 = 10_000;
/// etcd's default request size limit is 1.5 MiB; a key stays far below it.
pub const MAX_PREFIX_BYTES: usize = 256;

/// The compiled `replay_store.etcd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdPolicy {
    pub cluster: String,
    pub prefix: String,
    pub timeout_ms: u32,
    pub on_unavailable: OnUnavailable,
}

/// The compiled `replay_store`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ReplayStore {
    #[default]
    Local,
    Etcd(EtcdPolicy),
}

impl ReplayStore {
    pub fn compile(cfg: &ReplayStoreConfig, path: &str) -> Result<Self, ConfigError> {
        match cfg {
            ReplayStoreConfig::Local => Ok(Self::Local),
            ReplayStoreConfig::Etcd(etcd) => {
                EtcdPolicy::compile(etcd, &join(path, "etcd")).map(Self::Etcd)
            }
        }
    }

    pub fn etcd(&self) -> Option<&EtcdPolicy> {
        match self {
            Self::Local => None,
            Self::Etcd(e) => Some(e),
        }
    }
}

impl EtcdPolicy {
    pub fn compile(cfg: &EtcdConfig, path: &str) -> Result<Self, ConfigError> {
        // Envoy cluster names are free-form, but one that prints is one an operator can find.
        if cfg.cluster.is_empty()
            || cfg.cluster.len() > 255
            || !cfg.cluster.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ConfigError::new(
                join(path, "cluster"),
                format!(
                    "{:?} must be the name of an Envoy cluster: 1-255 printable ASCII characters, no spaces",
                    cfg.cluster
                ),
            ));
        }
        if cfg.prefix.is_empty()
            || cfg.prefix.len() > MAX_PREFIX_BYTES
            || !cfg.prefix.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ConfigError::new(
                join(path, "prefix"),
                format!(
                    "{:?} must be 1-{MAX_PREFIX_BYTES} printable ASCII characters, no spaces",
                    cfg.prefix
                ),
            ));
        }
        if !cfg.prefix.ends_with('/') {
            // Without it, "/a/replay" and "/a/replay2" would share keys' leading bytes and a
            // range read of one would include the other.
            return Err(ConfigError::new(
                join(path, "prefix"),
                format!("{:?} must end with '/'", cfg.prefix),
            ));
        }
        if cfg.timeout_ms == 0 || cfg.timeout_ms > MAX_TIMEOUT_MS {
            return Err(ConfigError::new(
                join(path, "timeout_ms"),
                format!("{} must be 1-{MAX_TIMEOUT_MS}", cfg.timeout_ms),
            ));
        }
        Ok(Self {
            cluster: cfg.cluster.clone(),
            prefix: cfg.prefix.clone(),
            timeout_ms: cfg.timeout_ms,
            on_unavailable: cfg.on_unavailable,
        })
    }
}
