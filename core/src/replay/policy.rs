//! The replay settings of a policy (`apis[i].replay`, `replay_cache`) and what a request hands
//! to the store: a [`TokenRef`], never the token.

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::record::{ENTRY_LEN, HEADER_LEN, MAX_BUCKETS, STORED_DIGEST_LEN};
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
/// With `max_entries` live tokens spread by hash, the probability that some bucket is already
/// full (a new token refused below `max_entries`) is at most this; see [`bucket_capacity`].
pub const EARLY_FULL_PROBABILITY: f64 = 0.001;
/// Layout sizes a store can have: every power of two up to [`MAX_BUCKETS`].
const LAYOUT_SIZES: usize = MAX_BUCKETS.trailing_zeros() as usize + 1;

/// The compiled `replay_cache`: how many bucket keys, and how many entries each may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayCachePolicy {
    max_entries: u64,
    buckets: u32,
    /// `capacities[n]`: entries one bucket may hold in a layout of `2^n` buckets, worked out
    /// once here because a request asks for the layout in use, which a reload can change.
    capacities: [u32; LAYOUT_SIZES],
}

impl ReplayCachePolicy {
    /// Buckets: `max_entries / 256` rounded up to a power of two, at most 65,536 (so fewer than
    /// 512 entries is one bucket, an exact bound). Capacity: a bucket may hold more than its
    /// share `max_entries / buckets`, by the headroom [`bucket_capacity`] works out, so that the
    /// store accepts `max_entries` live tokens (a bucket full before that with probability at
    /// most [`EARLY_FULL_PROBABILITY`]) and its hard bound is `buckets × capacity` entries
    /// (1,343,488 for the default 1,000,000: ~1.34×, ~55 MB).
    pub fn compile(cfg: &ReplayCacheConfig, path: &str) -> Result<Self, ConfigError> {
        let field = join(path, "max_entries");
        if cfg.max_entries == 0 {
            return Err(ConfigError::new(
                field,
                "must be at least 1 (omit `replay` on an API to disable replay protection)",
            ));
        }
        if cfg.max_entries > MAX_ENTRIES_LIMIT {
            let largest = Self::compile(
                &ReplayCacheConfig {
                    max_entries: MAX_ENTRIES_LIMIT,
                },
                path,
            )?;
            return Err(ConfigError::new(
                field,
                format!(
                    "{} is more than the supported {MAX_ENTRIES_LIMIT} (whose store may take {} \
                     MB of shared data in every Envoy)",
                    cfg.max_entries,
                    largest.max_store_bytes() / 1_000_000
                ),
            ));
        }
        let wanted = (cfg.max_entries / TARGET_ENTRIES_PER_BUCKET).next_power_of_two();
        let buckets = u32::try_from(wanted.min(u64::from(MAX_BUCKETS))).unwrap_or(MAX_BUCKETS);
        let mut capacities = [0; LAYOUT_SIZES];
        for (n, capacity) in capacities.iter_mut().enumerate() {
            *capacity = bucket_capacity(cfg.max_entries, 1 << n);
        }
        Ok(Self {
            max_entries: cfg.max_entries,
            buckets,
            capacities,
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
        self.capacity_in(self.buckets)
    }

    /// Live entries one bucket may hold in a layout of `buckets` buckets: `max_entries` spread
    /// over the layout actually in use, which differs from [`Self::buckets`] while an older
    /// policy still serves requests after a reload.
    pub fn capacity_in(&self, buckets: u32) -> u32 {
        let table = buckets
            .is_power_of_two()
            .then(|| self.capacities.get(buckets.trailing_zeros() as usize))
            .flatten();
        match table {
            Some(&capacity) => capacity,
            // Not a layout a store can have (they are checked before use): the same rule.
            None => bucket_capacity(self.max_entries, buckets),
        }
    }

    /// The store's hard bound in the layout this policy asks for: every write leaves a bucket
    /// at most at capacity, so it never holds more than this many entries (live or expired),
    /// but for entries a reload to a smaller size carried over (a migration drops none).
    pub fn max_stored_entries(&self) -> u64 {
        u64::from(self.buckets).saturating_mul(u64::from(self.capacity()))
    }

    /// [`Self::max_stored_entries`] in bytes of shared-data values (Envoy adds the keys,
    /// ~30 bytes each, and its own per-key overhead).
    pub fn max_store_bytes(&self) -> u64 {
        let bucket = u64::from(self.capacity())
            .saturating_mul(ENTRY_LEN as u64)
            .saturating_add(HEADER_LEN as u64);
        u64::from(self.buckets).saturating_mul(bucket)
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

/// Entries one bucket may hold when `max_entries` are spread over `buckets`: the smallest `c`
/// with `buckets × P(X ≥ c) ≤ EARLY_FULL_PROBABILITY`, `X` ~ Poisson(`max_entries / buckets`).
/// A bucket's share of `n` live tokens is Binomial(`n`, 1/`buckets`) (SHA-256 spreads them),
/// whose upper tail the Poisson one bounds above its mean + 1 (Anderson and Samuels, 1967;
/// every `c` found here is), and the union bound over the buckets then says: with
/// `max_entries` live tokens (or fewer), some bucket is full with probability at most
/// `EARLY_FULL_PROBABILITY`. At most `max_entries` (one bucket: exact).
pub fn bucket_capacity(max_entries: u64, buckets: u32) -> u32 {
    let exact = u32::try_from(max_entries).unwrap_or(u32::MAX);
    if buckets <= 1 {
        return exact;
    }
    let mean = max_entries as f64 / f64::from(buckets);
    let first = mean.ceil().max(1.0);
    // Far enough that the tail beyond is below 1e-20, even for a mean below 1.
    let span = (10.0 * mean.sqrt()).ceil() + 64.0;
    let ln_mean = mean.ln();
    // From the far end down, adding P(X = k) to the tail until it is too likely.
    let mut tail = 0.0;
    let mut capacity = first + span;
    for i in (0..span as u32).rev() {
        let k = first + f64::from(i);
        tail += (k * ln_mean - mean - ln_factorial(k)).exp();
        if f64::from(buckets) * tail > EARLY_FULL_PROBABILITY {
            break;
        }
        capacity = k;
    }
    (capacity as u32).min(exact)
}

/// ln(k!) for a whole `k`: exact sums below 32, Stirling's series (error < 1e-13) above.
fn ln_factorial(k: f64) -> f64 {
    if k < 32.0 {
        return (2..=k as u32).map(|i| f64::from(i).ln()).sum();
    }
    let inv = 1.0 / k;
    k * k.ln() - k + 0.5 * (std::f64::consts::TAU * k).ln() + inv / 12.0 - inv.powi(3) / 360.0
        + inv.powi(5) / 1260.0
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
