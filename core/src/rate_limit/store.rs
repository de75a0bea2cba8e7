//! Call counters in Envoy shared data. A counter hashes to one of a fixed number of bucket keys;
//! a bucket holds up to [`SLOTS`] counters, each `(id, window start, window end,
//! count)`. Counting a call is
//! read, decide, write back with the CAS read: a worker that lost the race reads again, so no
//! call is counted twice or lost, whatever the number of workers. A refused call writes
//! nothing. A counter whose window ended is dropped by the next write to its bucket: idle
//! callers cost nothing after their period.
//!
//! The bucket count is part of the key (`gateguard.limits.<buckets>.<index>`): a policy that
//! changes `limit_counters.max_entries` starts counting afresh in its own buckets.
// Counts, windows and the clock come from shared data and the host: no overflow on them.
#![deny(clippy::arithmetic_side_effects)]

use super::{CounterId, Standing};
use crate::error::{join, ConfigError};
use crate::shared_data::{SetError, SharedStore, CREATE_CAS};

/// Counters one bucket holds.
pub const SLOTS: usize = 32;
/// id (16), window start (8, unix seconds), window end (8), count (4).
pub const ENTRY_LEN: usize = 36;
const FORMAT_VERSION: u8 = 2;
pub const MAX_BUCKETS: u32 = 65_536;
/// Supported `max_entries`: at most 65,536 buckets of at most ~7.6 live counters on average, so
/// that a bucket of 32 is full before the store is with negligible probability (Poisson tail
/// below 1e-10).
pub const MAX_COUNTERS: u64 = 500_000;
/// A failed CAS means another worker counted in the same bucket meanwhile; bounded by
/// contention, not time.
pub const MAX_CAS_RETRIES: u32 = 64;
pub const KEY_PREFIX: &str = "gateguard.limits.";
/// Where the gateway's counter secret lives in shared data.
pub const SECRET_KEY: &str = "gateguard.limits.secret";

/// The secret every counter id is keyed with, the same in every worker of this Envoy: the one
/// already in shared data, or `fresh` if this worker is the first. Without it, anyone who knows
/// the API's name could work out offline which client IPs share a victim's bucket and fill it.
/// `None` if shared data cannot be read or written.
pub fn counter_secret(store: &dyn SharedStore, fresh: [u8; 32]) -> Option<[u8; 32]> {
    let read = || match store.get(SECRET_KEY) {
        Ok(Some((value, _))) => <[u8; 32]>::try_from(value.as_slice()).ok(),
        _ => None,
    };
    if let Some(secret) = read() {
        return Some(secret);
    }
    // Created only if still missing: a worker that lost the race reads the winner's.
    let _ = store.set(SECRET_KEY, &fresh, CREATE_CAS);
    read()
}

/// 32 random bytes from the host (WASI `random_get` in Envoy).
pub fn random_secret() -> Option<[u8; 32]> {
    use ring::rand::SecureRandom;
    let mut bytes = [0; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes).ok()?;
    Some(bytes)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterStorePolicy {
    buckets: u32,
}

impl CounterStorePolicy {
    /// Buckets: `4 × max_entries / SLOTS` rounded up to a power of two, so the average bucket
    /// holds at most 8 of its 32 slots when `max_entries` callers are live (a bucket full then:
    /// Poisson tail P(X ≥ 33 | λ = 8) ≈ 3e-11). Worst case (every slot of every bucket live):
    /// `buckets × (1 + 32 × 36)` bytes, 18.9 MB at the default 100,000.
    pub fn compile(max_entries: u64, path: &str) -> Result<Self, ConfigError> {
        if max_entries == 0 || max_entries > MAX_COUNTERS {
            return Err(ConfigError::new(
                join(path, "max_entries"),
                format!("must be 1 to {MAX_COUNTERS}"),
            ));
        }
        let wanted = max_entries
            .saturating_mul(4)
            .div_ceil(SLOTS as u64)
            .next_power_of_two();
        let buckets = u32::try_from(wanted.min(u64::from(MAX_BUCKETS))).unwrap_or(MAX_BUCKETS);
        Ok(Self { buckets })
    }

    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// Shared-data bytes the store may take at most.
    pub fn max_store_bytes(&self) -> u64 {
        u64::from(self.buckets).saturating_mul((1 + SLOTS * ENTRY_LEN) as u64)
    }

    fn bucket_key(&self, id: &CounterId) -> String {
        let [a, b, c, d, ..] = id.0;
        // `buckets` is a power of two, at least 1 (`compile`).
        let index = u32::from_be_bytes([a, b, c, d]) & self.buckets.saturating_sub(1);
        format!("{KEY_PREFIX}{}.{index}", self.buckets)
    }
}

/// What counting one call decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Counted; the caller's standing after this call.
    Counted(Standing),
    /// Every call of this window is used: refused, `retry_after` seconds until it renews.
    Exceeded { limit: u32, retry_after: u64 },
    /// The caller's bucket holds [`SLOTS`] live counters of other callers: refused (fail
    /// closed) until the first of them renews.
    Full { retry_after: u64 },
    /// The store could not be read or written, or other workers kept winning the race.
    Unavailable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    id: [u8; 16],
    window_start: u64,
    window_end: u64,
    count: u32,
}

fn decode(value: &[u8]) -> Option<Vec<Entry>> {
    let (&version, rest) = value.split_first()?;
    if version != FORMAT_VERSION || rest.len() % ENTRY_LEN != 0 || rest.len() > SLOTS * ENTRY_LEN {
        return None;
    }
    rest.chunks_exact(ENTRY_LEN)
        .map(|e| {
            Some(Entry {
                id: e.get(..16)?.try_into().ok()?,
                window_start: u64::from_be_bytes(e.get(16..24)?.try_into().ok()?),
                window_end: u64::from_be_bytes(e.get(24..32)?.try_into().ok()?),
                count: u32::from_be_bytes(e.get(32..36)?.try_into().ok()?),
            })
        })
        .collect()
}

fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len().saturating_mul(ENTRY_LEN).saturating_add(1));
    out.push(FORMAT_VERSION);
    for e in entries {
        out.extend_from_slice(&e.id);
        out.extend_from_slice(&e.window_start.to_be_bytes());
        out.extend_from_slice(&e.window_end.to_be_bytes());
        out.extend_from_slice(&e.count.to_be_bytes());
    }
    out
}

/// Counts one call of counter `id` against `calls` per `period` seconds, at `now`.
pub fn count_call(
    store: &dyn SharedStore,
    policy: &CounterStorePolicy,
    id: CounterId,
    calls: u32,
    period: u32,
    now: u64,
) -> Count {
    let key = policy.bucket_key(&id);
    for _ in 0..MAX_CAS_RETRIES {
        let (mut entries, cas) = match store.get(&key) {
            Ok(Some((value, cas))) => match decode(&value) {
                Some(entries) => (entries, cas),
                // Not a bucket this version wrote: start it afresh, still with the CAS read, so
                // a concurrent writer is not overwritten.
                None => (Vec::new(), cas),
            },
            Ok(None) => (Vec::new(), CREATE_CAS),
            Err(_) => return Count::Unavailable,
        };
        // This caller's window ends no later than this policy's period allows from its start: a
        // reload that shortened the period takes effect on windows already open.
        for e in entries.iter_mut().filter(|e| e.id == id.0) {
            e.window_end = e
                .window_end
                .min(e.window_start.saturating_add(u64::from(period)));
        }
        entries.retain(|e| e.window_end > now);
        let live = entries.len();
        let standing = match entries.iter_mut().find(|e| e.id == id.0) {
            Some(e) if e.count >= calls => {
                return Count::Exceeded {
                    limit: calls,
                    retry_after: e.window_end.saturating_sub(now).max(1),
                }
            }
            // Stored windows ended after `now` (retain above) and their count is below `calls`.
            Some(e) => {
                e.count = e.count.saturating_add(1);
                Standing {
                    limit: calls,
                    remaining: calls.saturating_sub(e.count),
                    reset: e.window_end.saturating_sub(now),
                }
            }
            None if live >= SLOTS => {
                let first = entries.iter().map(|e| e.window_end).min().unwrap_or(now);
                return Count::Full {
                    retry_after: first.saturating_sub(now).max(1),
                };
            }
            None => {
                let window_end = now.saturating_add(u64::from(period));
                entries.push(Entry {
                    id: id.0,
                    window_start: now,
                    window_end,
                    count: 1,
                });
                Standing {
                    limit: calls,
                    remaining: calls.saturating_sub(1),
                    reset: u64::from(period),
                }
            }
        };
        match store.set(&key, &encode(&entries), cas) {
            Ok(()) => return Count::Counted(standing),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Other(_)) => return Count::Unavailable,
        }
    }
    Count::Unavailable
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod props;
