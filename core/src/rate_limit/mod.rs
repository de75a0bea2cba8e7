//! Rate limits and quotas per caller (docs/policy.md, "Rate limits and quotas"): `calls` per
//! `renewal_period_seconds`, counted per API for one subscription key (its SHA-256, never the
//! key), one subject (the token's `iss` and `sub`) or one client IP. Over the rate → 429 with
//! `Retry-After`; over the quota → 403; APIM's texts.
//!
//! The counters live in Envoy shared data ([`store`]): exact across the gateway's workers (every
//! count is a compare-and-swap), bounded (a fixed set of bucket keys), idle counters reclaimed.
//! Each gateway replica counts alone.

pub mod store;
#[cfg(test)]
mod tests;

use std::net::IpAddr;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{join, ConfigError};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct CallLimitConfig {
    /// Whose calls are counted together.
    pub by: LimitKey,
    /// Calls allowed per period.
    pub calls: u64,
    /// The period, from a caller's first counted call.
    pub renewal_period_seconds: u64,
}

/// Whose calls one counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(rename_all = "snake_case")]
pub enum LimitKey {
    /// The subscription key, once it is known to be valid.
    SubscriptionKey,
    /// The token's subject (`iss` and `sub`), once the token is known to be valid.
    Subject,
    /// The client IP (an IPv6 client by its /64).
    ClientIp,
}

impl LimitKey {
    pub fn name(self) -> &'static str {
        match self {
            LimitKey::SubscriptionKey => "subscription_key",
            LimitKey::Subject => "subject",
            LimitKey::ClientIp => "client_ip",
        }
    }
}

/// A rate limit (429) or a quota (403).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Rate,
    Quota,
}

impl LimitKind {
    fn tag(self) -> &'static str {
        match self {
            LimitKind::Rate => "rate",
            LimitKind::Quota => "quota",
        }
    }
}

pub const MAX_CALLS: u64 = 1_000_000_000;
/// A year: a longer quota period is a contract, not a gateway setting.
pub const MAX_PERIOD_SECONDS: u64 = 366 * 86_400;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallLimit {
    pub kind: LimitKind,
    pub by: LimitKey,
    pub calls: u32,
    pub period: u32,
}

impl CallLimit {
    pub fn compile(
        cfg: &CallLimitConfig,
        kind: LimitKind,
        path: &str,
    ) -> Result<Self, ConfigError> {
        if cfg.calls == 0 || cfg.calls > MAX_CALLS {
            return Err(ConfigError::new(
                join(path, "calls"),
                format!("must be 1 to {MAX_CALLS}"),
            ));
        }
        if cfg.renewal_period_seconds == 0 || cfg.renewal_period_seconds > MAX_PERIOD_SECONDS {
            return Err(ConfigError::new(
                join(path, "renewal_period_seconds"),
                format!("must be 1 to {MAX_PERIOD_SECONDS} (366 days)"),
            ));
        }
        Ok(Self {
            kind,
            by: cfg.by,
            calls: u32::try_from(cfg.calls).unwrap_or(u32::MAX),
            period: u32::try_from(cfg.renewal_period_seconds).unwrap_or(u32::MAX),
        })
    }

    /// The counter of `caller` for this limit on API `api`: 16 bytes of a SHA-256 that binds
    /// the API, the kind of limit and what it is keyed by, so no two limits share a counter,
    /// keyed with the gateway's `secret` ([`store::counter_secret`]), so nobody outside can tell
    /// which callers share a bucket.
    pub fn counter_id(&self, secret: &[u8; 32], api: &str, caller: &Caller<'_>) -> CounterId {
        let mut h = Sha256::new();
        h.update(b"gateguard-call-limit\0");
        h.update(secret);
        h.update(api.as_bytes());
        h.update([0]);
        h.update(self.kind.tag().as_bytes());
        h.update([0]);
        h.update(self.by.name().as_bytes());
        h.update([0]);
        match caller {
            Caller::Key(digest) => h.update(digest),
            Caller::Subject { iss, sub } => {
                h.update((iss.len() as u64).to_be_bytes());
                h.update(iss.as_bytes());
                h.update(sub.as_bytes());
            }
            Caller::Ip(ip) => h.update(ip_counted(*ip)),
        }
        let digest = h.finalize();
        let mut id = [0; 16];
        id.copy_from_slice(digest.get(..16).unwrap_or(&[0; 16]));
        CounterId(id)
    }
}

/// Who a request is counted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller<'a> {
    /// SHA-256 of the subscription key the request presented (and the API accepted).
    Key(&'a [u8; 32]),
    Subject {
        iss: &'a str,
        sub: &'a str,
    },
    Ip(IpAddr),
}

/// An IPv4 client by its address; an IPv6 one by its /64, which one host usually holds whole
/// (a client could otherwise rotate through 2^64 addresses, one counter each).
fn ip_counted(ip: IpAddr) -> Vec<u8> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().get(..8).unwrap_or_default().to_vec(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CounterId(pub [u8; 16]);

/// One call to count: a limit, and the counter of the caller it is counted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallCount {
    pub limit: CallLimit,
    pub id: CounterId,
}

/// The rate-limit headers of a response: `x-ratelimit-limit`, `-remaining`, `-reset` (seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub limit: u32,
    pub remaining: u32,
    pub reset: u64,
}

impl Standing {
    pub fn headers(&self) -> [(String, String); 3] {
        [
            ("x-ratelimit-limit".into(), self.limit.to_string()),
            ("x-ratelimit-remaining".into(), self.remaining.to_string()),
            ("x-ratelimit-reset".into(), self.reset.to_string()),
        ]
    }

    /// Of two limits a request counted against, the one a client should pace itself by: the
    /// one with fewer calls left (then the one that resets later).
    pub fn tighter(self, other: Standing) -> Standing {
        if (other.remaining, std::cmp::Reverse(other.reset))
            < (self.remaining, std::cmp::Reverse(self.reset))
        {
            other
        } else {
            self
        }
    }
}

/// APIM's quota text: `HH:MM:SS`, hours not wrapped at a day.
pub fn hh_mm_ss(seconds: u64) -> String {
    format!(
        "{:02}:{:02}:{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// The counter store's size: live counters it must hold (`limit_counters.max_entries`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct CounterStoreConfig {
    #[serde(default = "default_max_counters")]
    pub max_entries: u64,
}

impl Default for CounterStoreConfig {
    fn default() -> Self {
        Self {
            max_entries: default_max_counters(),
        }
    }
}

fn default_max_counters() -> u64 {
    100_000
}

pub use store::CounterStorePolicy;
