//! The policy document (docs/policy.md): raw serde types, then a compiled policy.
//! Two phases: serde with `deny_unknown_fields` catches shape errors with their JSON path and
//! line; `compile` catches meaning errors (bad CIDR, empty list...) with their JSON path.

use std::collections::BTreeMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::audit::{LogConfig, LogPolicy};
use crate::client_cert::{ClientCertConfig, ClientCertPolicy};
use crate::cors::{CorsConfig, CorsPolicy};
use crate::deploy::{ListenerConfig, ListenerPolicy, UpstreamConfig, UpstreamPolicy};
use crate::error::{index, join, without_secrets, ConfigError};
use crate::header_rules::{HeaderRules, HeaderRulesConfig};
use crate::headers::{check_upstream_header_name, is_header_value};
use crate::ip_filter::{ClientIpConfig, ClientIpPolicy, IpFilterConfig, IpFilterPolicy};
use crate::jwt::{JwtConfig, JwtPolicy};
use crate::limits::{LimitsConfig, LimitsPolicy};
use crate::locate::locate;
use crate::methods::MethodsPolicy;
use crate::path::validate_prefix;
use crate::rate_limit::{
    CallLimit, CallLimitConfig, CounterStoreConfig, CounterStorePolicy, LimitKey, LimitKind,
};
use crate::replay::etcd::{ReplayStore, ReplayStoreConfig};
use crate::replay::{ReplayCacheConfig, ReplayCachePolicy, ReplayConfig, ReplayMode};
use crate::subscription_key::{SubscriptionKeyConfig, SubscriptionKeyPolicy};
use crate::value::{EnvLookup, ValueSource};

/// Policies larger than this are refused before parsing.
pub const MAX_POLICY_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Editors' JSON Schema reference; ignored by the filter.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(rename = "$schema", default)]
    pub schema: Option<String>,
    pub apis: Vec<ApiConfig>,
    /// The gateway's TLS listener, as `gateguard render` writes it; ignored by the filter.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub listener: Option<ListenerConfig>,
    /// How Envoy reaches the function app, as `gateguard render` writes it; ignored by the
    /// filter.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub upstream: Option<UpstreamConfig>,
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "crate::serialize::is_default")
    )]
    #[serde(default)]
    pub client_ip: ClientIpConfig,
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "crate::serialize::is_default")
    )]
    #[serde(default)]
    pub replay_cache: ReplayCacheConfig,
    /// Where the replay history lives: this Envoy's shared data (default) or etcd.
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "crate::serialize::is_default")
    )]
    #[serde(default)]
    pub replay_store: ReplayStoreConfig,
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "crate::serialize::is_default")
    )]
    #[serde(default)]
    pub token_cache: TokenCacheConfig,
    /// The rate-limit and quota counters: how many live callers the store holds.
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "crate::serialize::is_default")
    )]
    #[serde(default)]
    pub limit_counters: CounterStoreConfig,
    /// How the audit trail shows client IPs (docs/policy.md, "Audit log").
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub log: Option<LogConfig>,
}

/// The verified-token cache: a fixed number of shared-data slots.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct TokenCacheConfig {
    #[serde(default = "default_token_cache_entries")]
    pub max_entries: u32,
}

impl Default for TokenCacheConfig {
    fn default() -> Self {
        Self {
            max_entries: default_token_cache_entries(),
        }
    }
}

fn default_token_cache_entries() -> u32 {
    2048
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub name: String,
    pub path_prefix: String,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub cors: Option<CorsConfig>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub ip_filter: Option<IpFilterConfig>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub client_certificate: Option<ClientCertConfig>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub subscription_key: Option<SubscriptionKeyConfig>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub replay: Option<ReplayConfig>,
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "BTreeMap::is_empty")
    )]
    #[serde(default)]
    pub inject_headers: BTreeMap<String, ValueSource>,
    /// Methods the API serves; any other gets 405.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub limits: Option<LimitsConfig>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub headers: Option<HeaderRulesConfig>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub rate_limit: Option<CallLimitConfig>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub quota: Option<CallLimitConfig>,
}

/// A policy the filter can enforce: every field validated, every list compiled.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub apis: Vec<ApiPolicy>,
    /// For `gateguard render` (docs/policy.md, "Listener TLS", "Reaching the function app").
    pub listener: ListenerPolicy,
    pub upstream: UpstreamPolicy,
    pub client_ip: ClientIpPolicy,
    pub replay_cache: ReplayCachePolicy,
    /// Where the replay history lives; with etcd, `replay_cache` is this gateway's cache of it.
    pub replay_store: ReplayStore,
    /// Slots of the verified-token cache; 0 disables it.
    pub token_cache_slots: u32,
    /// Where rate-limit and quota counters live.
    pub limit_counters: CounterStorePolicy,
    /// SHA-256 of the policy document: verified-token cache entries are bound to it, so a
    /// changed policy never serves a token verified under the old one.
    pub fingerprint: [u8; 32],
    /// How the audit trail shows client IPs.
    pub log: LogPolicy,
}

impl CompiledPolicy {
    /// How many key slots the host holds: one per identity provider of every API.
    pub fn key_slots(&self) -> usize {
        self.apis
            .iter()
            .filter_map(|a| a.jwt.as_ref())
            .flat_map(|j| j.providers())
            .map(|p| p.slot() + 1)
            .max()
            .unwrap_or(0)
    }
}

#[derive(Debug, Clone)]
pub struct ApiPolicy {
    pub name: String,
    pub path_prefix: String,
    pub cors: Option<CorsPolicy>,
    pub ip_filter: Option<IpFilterPolicy>,
    pub client_certificate: Option<ClientCertPolicy>,
    pub subscription_key: Option<SubscriptionKeyPolicy>,
    pub jwt: Option<JwtPolicy>,
    pub replay: Option<ReplayMode>,
    /// (lower-case name, value), applied upstream after the client's copies are removed.
    pub inject_headers: Vec<(String, String)>,
    pub methods: Option<MethodsPolicy>,
    pub limits: Option<LimitsPolicy>,
    pub headers: Option<HeaderRules>,
    /// The rate limit, then the quota: each counted when its caller is known (docs/policy.md,
    /// "Rate limits and quotas").
    pub call_limits: Vec<CallLimit>,
}

/// Parses and compiles a policy document. Errors carry the JSON path and, where it can be
/// found, the line and column.
pub fn parse_policy(text: &[u8], env: EnvLookup<'_>) -> Result<CompiledPolicy, ConfigError> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(ConfigError::new(
            "",
            format!(
                "policy is {} bytes; the limit is {MAX_POLICY_BYTES}",
                text.len()
            ),
        ));
    }
    let text = std::str::from_utf8(text)
        .map_err(|e| ConfigError::new("", format!("policy is not UTF-8: {e}")))?;
    let raw = parse_raw(text)?;
    let mut policy = compile(&raw, env).map_err(|e| match locate(text, &e.path) {
        Some((line, column)) if e.line.is_none() => e.at(line, column),
        _ => e,
    })?;
    policy.fingerprint = Sha256::digest(text.as_bytes()).into();
    Ok(policy)
}

/// Phase one: the document's shape.
pub fn parse_raw(text: &str) -> Result<PolicyConfig, ConfigError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let raw: PolicyConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let (line, column) = (inner.line(), inner.column());
        let (path, reason) = without_secrets(path, strip_position(&inner.to_string()));
        let path = if path == "." { String::new() } else { path };
        ConfigError::new(path, reason).at(line, column)
    })?;
    de.end().map_err(|e| {
        ConfigError::new("", strip_position(&e.to_string())).at(e.line(), e.column())
    })?;
    Ok(raw)
}

/// serde_json appends " at line L column C"; we report position separately.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg.get(..i).unwrap_or(msg).to_string(),
        None => msg.to_string(),
    }
}

/// Phase two: the document's meaning.
pub fn compile(raw: &PolicyConfig, env: EnvLookup<'_>) -> Result<CompiledPolicy, ConfigError> {
    if raw.apis.is_empty() {
        return Err(ConfigError::new("apis", "must define at least one API"));
    }
    let client_ip = ClientIpPolicy::compile(&raw.client_ip, "client_ip")?;
    let listener = ListenerPolicy::compile(raw.listener.as_ref(), "listener")?;
    let upstream = UpstreamPolicy::compile(raw.upstream.as_ref(), "upstream")?;
    let mut apis: Vec<ApiPolicy> = Vec::with_capacity(raw.apis.len());
    for (i, api) in raw.apis.iter().enumerate() {
        let path = index("apis", i);
        let compiled = compile_api(api, &path, env)?;
        if let Some(other) = apis.iter().find(|a| a.name == compiled.name) {
            return Err(ConfigError::new(
                join(&path, "name"),
                format!("duplicate API name {:?}", other.name),
            ));
        }
        if let Some(other) = apis
            .iter()
            .find(|a| a.path_prefix.eq_ignore_ascii_case(&compiled.path_prefix))
        {
            return Err(ConfigError::new(
                join(&path, "path_prefix"),
                format!(
                    "{:?} is already the prefix of API {:?} (prefixes match case-insensitively)",
                    compiled.path_prefix, other.name
                ),
            ));
        }
        apis.push(compiled);
    }
    // Every identity provider gets its own key slot in the host (`Host::jwt_keys`).
    let mut slots = 0;
    for jwt in apis.iter_mut().filter_map(|a| a.jwt.as_mut()) {
        slots = jwt.assign_slots(slots);
    }
    let replay_cache = ReplayCachePolicy::compile(&raw.replay_cache, "replay_cache")?;
    let replay_store = ReplayStore::compile(&raw.replay_store, "replay_store")?;
    if raw.token_cache.max_entries > 1_000_000 {
        return Err(ConfigError::new(
            "token_cache.max_entries",
            "must be at most 1000000 (each slot may hold up to 8 KiB)",
        ));
    }
    let limit_counters =
        CounterStorePolicy::compile(raw.limit_counters.max_entries, "limit_counters")?;
    Ok(CompiledPolicy {
        apis,
        listener,
        upstream,
        client_ip,
        replay_cache,
        replay_store,
        token_cache_slots: raw.token_cache.max_entries,
        limit_counters,
        fingerprint: [0; 32],
        log: LogPolicy::compile(raw.log.as_ref(), "log", env)?,
    })
}

fn compile_api(api: &ApiConfig, path: &str, env: EnvLookup<'_>) -> Result<ApiPolicy, ConfigError> {
    // The name becomes part of stat names (`gateguard.<api>.allowed`).
    if api.name.is_empty()
        || api.name.len() > 64
        || !api
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(ConfigError::new(
            join(path, "name"),
            format!("{:?} must be 1-64 letters, digits, '_' or '-'", api.name),
        ));
    }
    validate_prefix(&api.path_prefix)
        .map_err(|reason| ConfigError::new(join(path, "path_prefix"), reason))?;

    let cors = api
        .cors
        .as_ref()
        .map(|c| CorsPolicy::compile(c, &join(path, "cors")))
        .transpose()?;
    let ip_filter = api
        .ip_filter
        .as_ref()
        .map(|c| IpFilterPolicy::compile(c, &join(path, "ip_filter")))
        .transpose()?;
    let client_certificate = api
        .client_certificate
        .as_ref()
        .map(|c| ClientCertPolicy::compile(c, &join(path, "client_certificate")))
        .transpose()?;
    let subscription_key = api
        .subscription_key
        .as_ref()
        .map(|c| SubscriptionKeyPolicy::compile(c, &join(path, "subscription_key")))
        .transpose()?;

    let jwt = api
        .jwt
        .as_ref()
        .map(|c| JwtPolicy::compile(c, &join(path, "jwt"), env))
        .transpose()?;
    if jwt
        .as_ref()
        .is_some_and(|j| j.certificate_bound().is_some())
        && api.client_certificate.is_none()
    {
        return Err(ConfigError::new(
            join(path, "jwt.certificate_bound"),
            "needs \"client_certificate\" on this API: its sources give the certificate a token \
             is bound to",
        ));
    }
    if api.replay.is_some() && jwt.is_none() {
        return Err(ConfigError::new(
            join(path, "replay"),
            "replay detection needs \"jwt\": only validated tokens are recorded",
        ));
    }
    let replay = api.replay.as_ref().map(|r| r.mode);

    let inject_path = join(path, "inject_headers");
    let mut inject_headers = Vec::with_capacity(api.inject_headers.len());
    for (name, source) in &api.inject_headers {
        let field = join(&inject_path, name);
        check_upstream_header_name(name).map_err(|r| ConfigError::new(&field, r))?;
        let value = source.resolve(&field, env)?;
        if !is_header_value(&value) {
            return Err(ConfigError::new(
                field,
                "value contains control characters (CR, LF, NUL...)",
            ));
        }
        let lower = name.to_ascii_lowercase();
        if inject_headers.iter().any(|(n, _)| *n == lower) {
            return Err(ConfigError::new(
                field,
                "header listed twice (names are case-insensitive)",
            ));
        }
        inject_headers.push((lower, value));
    }

    let methods = api
        .methods
        .as_ref()
        .map(|m| MethodsPolicy::compile(m, &join(path, "methods")))
        .transpose()?;
    let limits = api
        .limits
        .as_ref()
        .map(|l| LimitsPolicy::compile(l, &join(path, "limits")))
        .transpose()?;
    // Headers the API reads or sets itself: forbidding one would refuse every request.
    let mut owned: Vec<&str> = inject_headers.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(keys) = &subscription_key {
        owned.push(keys.header_name());
    }
    if let Some(jwt) = &jwt {
        owned.extend(jwt.consumed_header_names());
    }
    let headers = api
        .headers
        .as_ref()
        .map(|h| HeaderRules::compile(h, &join(path, "headers"), &owned))
        .transpose()?;
    let mut call_limits = Vec::new();
    for (field, kind, cfg) in [
        ("rate_limit", LimitKind::Rate, &api.rate_limit),
        ("quota", LimitKind::Quota, &api.quota),
    ] {
        let Some(cfg) = cfg else { continue };
        let field = join(path, field);
        let limit = CallLimit::compile(cfg, kind, &field)?;
        let missing = match limit.by {
            LimitKey::SubscriptionKey if subscription_key.is_none() => Some("subscription_key"),
            LimitKey::Subject if jwt.is_none() => Some("jwt"),
            _ => None,
        };
        if let Some(missing) = missing {
            return Err(ConfigError::new(
                join(&field, "by"),
                format!(
                    "{:?} needs \"{missing}\" on this API: calls are counted by a credential it \
                     validates",
                    limit.by.name()
                ),
            ));
        }
        call_limits.push(limit);
    }

    Ok(ApiPolicy {
        name: api.name.clone(),
        path_prefix: api.path_prefix.clone(),
        cors,
        ip_filter,
        client_certificate,
        subscription_key,
        jwt,
        replay,
        inject_headers,
        methods,
        limits,
        headers,
        call_limits,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> Result<CompiledPolicy, ConfigError> {
        parse_policy(text.as_bytes(), &no_env)
    }

    #[test]
    fn minimal_policy_compiles() {
        let p = parse(r#"{"apis":[{"name":"a","path_prefix":"/api"}]}"#).unwrap();
        assert_eq!(p.apis[0].name, "a");
        assert_eq!(p.client_ip.trusted_proxy_hops(), 0);
    }

    #[test]
    fn unknown_fields_are_refused_with_path_and_line() {
        let err = parse("{\"apis\":[\n{\"name\":\"a\",\"path_prefix\":\"/api\",\n \"corz\":{}}]}")
            .unwrap_err();
        assert_eq!(err.path, "apis[0].corz");
        assert!(
            err.reason.contains("unknown field `corz`"),
            "{}",
            err.reason
        );
        assert_eq!(err.line, Some(3));
    }

    #[test]
    fn semantic_errors_get_path_and_line() {
        let text = "{\"apis\":[{\"name\":\"a\",\"path_prefix\":\"/api\",\n\"ip_filter\":{\"allow\":[\"10.0.0.0/8\",\n\"10.0.0.300\"]}}]}";
        let err = parse(text).unwrap_err();
        assert_eq!(err.path, "apis[0].ip_filter.allow[1]");
        assert_eq!(err.line, Some(3));
        assert!(err.to_string().starts_with("apis[0].ip_filter.allow[1]: "));
    }

    #[test]
    fn names_and_prefixes_are_validated() {
        let err = parse(r#"{"apis":[{"name":"a b","path_prefix":"/api"}]}"#).unwrap_err();
        assert_eq!(err.path, "apis[0].name");
        let err = parse(
            r#"{"apis":[{"name":"a","path_prefix":"/api"},{"name":"a","path_prefix":"/b"}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.path, "apis[1].name");
        let err = parse(
            r#"{"apis":[{"name":"a","path_prefix":"/api"},{"name":"b","path_prefix":"/API"}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.path, "apis[1].path_prefix");
        let err = parse(r#"{"apis":[]}"#).unwrap_err();
        assert_eq!(err.path, "apis");
        let err = parse(r#"{"apis":[{"name":"a","path_prefix":"/api"}]} x"#).unwrap_err();
        assert!(err.reason.contains("trailing"), "{}", err.reason);
        let err = parse("[]").unwrap_err();
        assert_eq!(err.path, "");
    }

    #[test]
    fn log_block_is_optional_and_its_key_comes_from_the_environment() {
        let p = parse(r#"{"apis":[{"name":"a","path_prefix":"/api"}]}"#).unwrap();
        assert!(!p.log.every_request());
        let text = r#"{"apis":[{"name":"a","path_prefix":"/api"}],
            "log":{"client_ip":"hashed","hash_key":{"env":"LOG_KEY"}}}"#;
        let err = parse(text).unwrap_err();
        assert_eq!(err.path, "log.hash_key");
        assert!(err.reason.contains("LOG_KEY"), "{}", err.reason);
        assert_eq!(err.line, Some(2));
        let env = |k: &str| (k == "LOG_KEY").then(|| "k".repeat(32));
        let p = parse_policy(text.as_bytes(), &env).unwrap();
        assert!(p.log.every_request());
        let err =
            parse(r#"{"apis":[{"name":"a","path_prefix":"/api"}],"log":{"client_ip":"hidden"}}"#)
                .unwrap_err();
        assert_eq!(err.path, "log.client_ip");
    }

    #[test]
    fn inject_headers_resolve_env_and_refuse_missing_or_reserved() {
        let text = r#"{"apis":[{"name":"a","path_prefix":"/api","inject_headers":{
            "X-Functions-Key":{"env":"APP_KEY"},"x-lit":{"value":"v"}}}]}"#;
        let env = |k: &str| (k == "APP_KEY").then(|| "secret".to_string());
        let p = parse_policy(text.as_bytes(), &env).unwrap();
        assert_eq!(
            p.apis[0].inject_headers,
            vec![
                ("x-functions-key".to_string(), "secret".to_string()),
                ("x-lit".to_string(), "v".to_string())
            ]
        );
        let err = parse(text).unwrap_err();
        assert_eq!(err.path, "apis[0].inject_headers.X-Functions-Key");
        assert!(err.reason.contains("APP_KEY"));
        let err = parse(
            r#"{"apis":[{"name":"a","path_prefix":"/api","inject_headers":{"host":{"value":"x"}}}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.path, "apis[0].inject_headers.host");
        let err = parse(
            r#"{"apis":[{"name":"a","path_prefix":"/api","inject_headers":{"x":{"value":"a\r\nb"}}}]}"#,
        )
        .unwrap_err();
        assert!(err.reason.contains("control"));
        let err = parse(
            r#"{"apis":[{"name":"a","path_prefix":"/api","inject_headers":{"x":{"secret":"a"}}}]}"#,
        )
        .unwrap_err();
        assert!(
            err.path.starts_with("apis[0].inject_headers"),
            "{}",
            err.path
        );
    }
}
