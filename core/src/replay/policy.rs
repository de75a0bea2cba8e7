//! The replay settings of a policy (`apis[i].replay`, `replay_cache`) and what a request hands
//! to the store: a [`TokenRef`], never the token.

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::record::{ENTRY_LEN, MAX_BUCKETS, STORED_DIGEST_LEN};
use crate::error::{join, ConfigError};

/// `replay.mode` of an API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(rename_all = "snake_case")]
pub enum ReplayMode {
    WithIp,
    WithoutIp,
}

/// `apis[i].replay`; absent means no replay protection for that API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    pub mode: ReplayMode,
}

/// `replay_cache`, shared by every API of the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct ReplayCacheConfig {
    #[serde(default = "default_max_entries")]
    pub max_entries: u64,
}

impl Default for ReplayCacheConfig {
    fn default() -> Self {
        Self {
            max_entries: default_max_entries(),
        }
    }
}

fn default_max_entries() -> u64 {
    1_000_000
}

/// Above this the store would hold gigabytes in every Envoy process: surely a typo.
pub const MAX_ENTRIES_LIMIT: u64 = 50_000_000;
/// Entries per bucket aimed at: big enough that buckets fill evenly, small enough that a request
/// copies ~10 KB in and out of shared data.
pub const TARGET_ENTRIES_PER_BUCKET: u64 = 256;

/// The compiled `replay_cache`: how many bucket keys, and how many entries each may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayCachePolicy {
    max_entries: u64,
    buckets: u32,
    capacity: u32,
}

impl ReplayCachePolicy {
    /// Buckets: `max_entries / 256` rounded up to a power of two, at most 65,536 (so fewer than
    /// 512 entries is one bucket, an exact bound). Capacity: `ceil(max_entries / buckets)`, so
    /// the hard bound is `buckets × capacity` (< `max_entries + buckets`). Tokens spread by hash,
    /// so one bucket can fill before the whole store does: with the default 1,000,000 the first
    /// "store full" (for the 1/4096 of new tokens hashing there) came at 75% of `max_entries`
    /// live in `measure_memory_and_cost`; size `max_entries` at ~1.4× the peak of live tokens.
    pub fn compile(cfg: &ReplayCacheConfig, path: &str) -> Result<Self, ConfigError> {
        let field = join(path, "max_entries");
        if cfg.max_entries == 0 {
            return Err(ConfigError::new(
                field,
                "must be at least 1 (omit `replay` on an API to disable replay protection)",
            ));
        }
        if cfg.max_entries > MAX_ENTRIES_LIMIT {
            return Err(ConfigError::new(
                field,
                format!(
                    "{} is more than the supported {MAX_ENTRIES_LIMIT} (about {} MB of shared \
                     data per million entries)",
                    cfg.max_entries, ENTRY_LEN
                ),
            ));
        }
        let wanted = (cfg.max_entries / TARGET_ENTRIES_PER_BUCKET).next_power_of_two();
        let buckets = u32::try_from(wanted.min(u64::from(MAX_BUCKETS))).unwrap_or(MAX_BUCKETS);
        let capacity = u32::try_from(cfg.max_entries.div_ceil(u64::from(buckets)))
            .map_err(|_| ConfigError::new(join(path, "max_entries"), "too large"))?;
        Ok(Self {
            max_entries: cfg.max_entries,
            buckets,
            capacity,
        })
    }

    pub fn max_entries(&self) -> u64 {
        self.max_entries
    }

    /// The bucket count this policy asks for (the store moves to it when the policy loads).
    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// Live entries one bucket may hold in the layout this policy asks for.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Live entries one bucket may hold in a layout of `buckets` buckets: the same bound
    /// (`max_entries`) spread over the layout actually in use, which differs from
    /// [`Self::buckets`] while an older policy still serves requests after a reload.
    pub fn capacity_in(&self, buckets: u32) -> u32 {
        u32::try_from(self.max_entries.div_ceil(u64::from(buckets.max(1)))).unwrap_or(u32::MAX)
    }

    /// The key prefix of the replay store under `base`. It does not depend on the policy: every
    /// policy loaded in one VM uses the same store, whose layout the store itself records.
    pub fn key_prefix(&self, base: &str) -> String {
        store_prefix(base)
    }
}

/// `{base}replay/v2/`: the pointer and every layout's buckets live under it.
pub fn store_prefix(base: &str) -> String {
    format!("{base}replay/v{}/", super::record::FORMAT_VERSION)
}

/// A validated token as the replay store sees it: never the token itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRef {
    /// SHA-256 over the token's identity (see [`TokenRef::new`]).
    pub digest: [u8; 32],
    /// First second at which the entry may be forgotten: the token's `exp` + clock skew + 1.
    pub exp: u64,
}

impl TokenRef {
    /// `identity` is the SHA-256 of what the token's signature covers (`header.payload`), so
    /// every encoding of one signature is one token. One history for the whole gateway: a token
    /// spent on one API is spent on all, whatever the APIs are named or become after a reload.
    /// The entry outlives `exp + clock_skew` by one second so that it covers the last second an
    /// `exp` check accepts, whether that check is inclusive or not.
    pub fn new(identity: &[u8; 32], exp: u64, clock_skew: u64) -> Self {
        let mut h = Sha256::new();
        h.update(b"gateguard/replay/v2\0");
        h.update(identity);
        Self {
            digest: h.finalize().into(),
            exp: exp.saturating_add(clock_skew).saturating_add(1),
        }
    }

    /// The 128 bits the store keeps. Two distinct live tokens collide with probability
    /// ~n²/2¹²⁹ (1.5e-27 for a million; the bucket index is taken from these bytes too, but two
    /// tokens only meet when they share a bucket, so that costs nothing), an attacker cannot aim
    /// a signed token at a victim's prefix (2¹²⁸ work), and a collision only makes a token look
    /// used (refused), never lets a replay through.
    pub(crate) fn stored_digest(&self) -> &[u8] {
        &self.digest[..STORED_DIGEST_LEN]
    }
}
