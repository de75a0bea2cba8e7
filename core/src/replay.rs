//! Replay detection (SPEC §6): `with_ip` binds a token to the first client IP that used it,
//! `without_ip` accepts each token exactly once, across all Envoy workers at the same instant.
//!
//! Envoy runs one Wasm VM per worker; shared data is the only common state, and its `set` on a
//! key that does not exist ignores the CAS, so "get, then set with CAS" on a per-token key lets
//! two workers both create it. Hence: a FIXED set of bucket keys, created at configuration time
//! ([`ensure_buckets`]); each holds a compact record of the tokens hashing to it, and a request
//! reads its bucket, decides ([`admit`], pure) and writes it back with the CAS it read, retrying
//! on `CasMismatch` ([`check_and_record`]). A request never creates a key.
//!
//! Bucket record, big-endian, version 1:
//! `"GR" | version u8 = 1 | entry length u8 = 41` then entries of 41 bytes:
//! `digest[0..16] | expiry u64 | owner flag u8 (0 none, 1 IP) | owner IPv6 [16] (zero if none)`.
//! IPv4 owners are stored as IPv4-mapped IPv6, after `to_canonical()`, so both spellings match.
//!
//! Scope: the digest is SHA-256 over the API name and the token's SHA-256, so each API keeps its
//! own replay history: a `without_ip` token is accepted once per API, and two APIs with different
//! modes never see each other's entries. Within one API, a token recorded under one mode stays
//! spent after a policy switches mode (an entry without owner never matches an IP): fail closed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{join, ConfigError};
use crate::hex;

/// `replay.mode` of an API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReplayMode {
    WithIp,
    WithoutIp,
}

/// `apis[i].replay`; absent means no replay protection for that API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    pub mode: ReplayMode,
}

/// `replay_cache`, shared by every API of the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
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
pub const MAX_BUCKETS: u32 = 65_536;
/// A failed CAS means another worker wrote the bucket, so retries are bounded by contention,
/// not by time; 64 is far above the worker count of any Envoy we expect.
pub const MAX_CAS_RETRIES: u32 = 64;
/// `ensure_buckets` creates with this CAS: if another worker created the key meanwhile, the set
/// is refused (Envoy's CAS counter would have to sit at exactly this value) instead of wiping it.
pub const CREATE_CAS: u32 = u32::MAX;

pub const FORMAT_VERSION: u8 = 1;
pub const ENTRY_LEN: usize = 41;
pub const HEADER_LEN: usize = 4;
const HEADER: [u8; HEADER_LEN] = [b'G', b'R', FORMAT_VERSION, ENTRY_LEN as u8];
const STORED_DIGEST_LEN: usize = 16;

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

    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// Live entries one bucket may hold.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The key prefix for this layout. It carries the format version and the bucket count, so a
    /// new layout never reads an old one as corrupt; changing the bucket count (a different
    /// `max_entries`) therefore starts an empty store and the old keys stay until Envoy restarts.
    pub fn key_prefix(&self, base: &str) -> String {
        format!("{base}replay/v{FORMAT_VERSION}/{}/", self.buckets)
    }
}

/// A validated token as the replay store sees it: never the token itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRef {
    /// SHA-256 over the API name and the token's SHA-256 (see [`TokenRef::new`]).
    pub digest: [u8; 32],
    /// First second at which the entry may be forgotten: the token's `exp` + clock skew + 1.
    pub exp: u64,
}

impl TokenRef {
    /// `token_sha256` is the SHA-256 of the compact JWT (the verified-token cache key).
    /// The entry outlives `exp + clock_skew` by one second so that it covers the last second an
    /// `exp` check accepts, whether that check is inclusive or not.
    pub fn new(api: &str, token_sha256: &[u8; 32], exp: u64, clock_skew: u64) -> Self {
        let mut h = Sha256::new();
        h.update(b"gateguard/replay/v1\0");
        h.update((api.len() as u64).to_be_bytes());
        h.update(api.as_bytes());
        h.update(token_sha256);
        Self {
            digest: h.finalize().into(),
            exp: exp.saturating_add(clock_skew).saturating_add(1),
        }
    }

    /// A short, non-secret identifier for logs.
    pub fn log_id(&self) -> String {
        hex::encode(&self.digest[..6])
    }

    /// 128 bits: two distinct live tokens collide with probability ~n²/2¹²⁹ (1.5e-27 for a
    /// million), an attacker cannot aim a signed token at a victim's prefix (2¹²⁸ work), and a
    /// collision only makes a token look used (refused), never lets a replay through.
    fn stored_digest(&self) -> &[u8] {
        &self.digest[..STORED_DIGEST_LEN]
    }
}

/// What replay detection decided. `admit` returns the first seven; the store-level ones come
/// from [`check_and_record`]. Only `FirstUse` and `SameOwner` let the request through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not seen before: recorded now.
    FirstUse,
    /// `with_ip`: the owner IP again; nothing to write.
    SameOwner,
    /// Used before (`without_ip`) or owned by another IP (`with_ip`): 401 "Token replay detected".
    Replay,
    /// The token's bucket is full of live entries: refused rather than forget one (fail closed).
    StoreFull,
    /// The token's expiry (exp + skew) is already past: it should not have passed the JWT check.
    Expired,
    /// `with_ip` without a client IP: cannot bind, fail closed.
    MissingIp,
    /// The bucket's record does not parse; nothing written. The adapter may overwrite it with
    /// `encode(&[])` (forgetting that bucket's tokens) after logging.
    Corrupt,
    /// The bucket key does not exist: `ensure_buckets` did not run or failed. Fail closed.
    MissingBucket,
    /// `MAX_CAS_RETRIES` consecutive CAS mismatches. Fail closed.
    Contention,
    /// The host refused a shared-data call. Fail closed.
    StoreUnavailable,
}

impl Verdict {
    pub fn is_accepted(self) -> bool {
        matches!(self, Verdict::FirstUse | Verdict::SameOwner)
    }

    /// For the refusal log line.
    pub fn reason(self) -> &'static str {
        match self {
            Verdict::FirstUse => "first use",
            Verdict::SameOwner => "same owner",
            Verdict::Replay => "token replay detected",
            Verdict::StoreFull => "replay store full",
            Verdict::Expired => "token expired",
            Verdict::MissingIp => "no client IP to bind the token to",
            Verdict::Corrupt => "replay bucket corrupt",
            Verdict::MissingBucket => "replay bucket missing",
            Verdict::Contention => "replay bucket contended",
            Verdict::StoreUnavailable => "shared data unavailable",
        }
    }
}

/// The pure decision on one bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub verdict: Verdict,
    /// The bucket's new record, or `None` when nothing needs writing.
    pub new_value: Option<Vec<u8>>,
    /// Expired entries dropped from `new_value`.
    pub reclaimed: u32,
}

impl Admission {
    fn unchanged(verdict: Verdict) -> Self {
        Self {
            verdict,
            new_value: None,
            reclaimed: 0,
        }
    }
}

/// One decoded entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub digest: [u8; STORED_DIGEST_LEN],
    pub expiry: u64,
    pub owner: Option<Ipv6Addr>,
}

/// Why a bucket record does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorruptBucket {
    /// Wrong magic, version or entry length.
    Header,
    /// Not a whole number of entries.
    Length,
    /// An entry with an unknown owner flag, or an owner address without the flag.
    Entry { index: usize },
}

/// Validates a record and returns its raw entries. An empty slice is a fresh bucket.
fn raw_entries(bucket: &[u8]) -> Result<std::slice::ChunksExact<'_, u8>, CorruptBucket> {
    if bucket.is_empty() {
        return Ok(bucket.chunks_exact(ENTRY_LEN));
    }
    let (header, body) = bucket
        .split_at_checked(HEADER_LEN)
        .ok_or(CorruptBucket::Header)?;
    if header != HEADER {
        return Err(CorruptBucket::Header);
    }
    if body.len() % ENTRY_LEN != 0 {
        return Err(CorruptBucket::Length);
    }
    for (index, raw) in body.chunks_exact(ENTRY_LEN).enumerate() {
        let valid = match raw[24] {
            0 => raw[25..].iter().all(|&b| b == 0),
            1 => true,
            _ => false,
        };
        if !valid {
            return Err(CorruptBucket::Entry { index });
        }
    }
    Ok(body.chunks_exact(ENTRY_LEN))
}

fn parse_entry(raw: &[u8]) -> Entry {
    let mut digest = [0u8; STORED_DIGEST_LEN];
    digest.copy_from_slice(&raw[..16]);
    let mut expiry = [0u8; 8];
    expiry.copy_from_slice(&raw[16..24]);
    let mut owner = [0u8; 16];
    owner.copy_from_slice(&raw[25..41]);
    Entry {
        digest,
        expiry: u64::from_be_bytes(expiry),
        owner: (raw[24] == 1).then(|| Ipv6Addr::from(owner)),
    }
}

fn push_entry(out: &mut Vec<u8>, entry: &Entry) {
    out.extend_from_slice(&entry.digest);
    out.extend_from_slice(&entry.expiry.to_be_bytes());
    match entry.owner {
        Some(ip) => {
            out.push(1);
            out.extend_from_slice(&ip.octets());
        }
        None => {
            out.push(0);
            out.extend_from_slice(&[0u8; 16]);
        }
    }
}

pub fn decode(bucket: &[u8]) -> Result<Vec<Entry>, CorruptBucket> {
    Ok(raw_entries(bucket)?.map(parse_entry).collect())
}

/// `encode(&[])` is the fresh bucket `ensure_buckets` writes: the header alone, never an empty
/// value (the SDK reports an empty value like a missing one).
pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + entries.len() * ENTRY_LEN);
    out.extend_from_slice(&HEADER);
    for e in entries {
        push_entry(&mut out, e);
    }
    out
}

/// IPv4 and IPv4-mapped IPv6 are the same client.
pub fn normalise_ip(ip: IpAddr) -> Ipv6Addr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Decides one request against its bucket's record (empty slice = fresh bucket) and, when the
/// token is new, returns the record to write: live entries, plus this token, minus the expired.
pub fn admit(
    bucket: &[u8],
    token: &TokenRef,
    ip: Option<IpAddr>,
    mode: ReplayMode,
    now: u64,
    capacity: u32,
) -> Admission {
    let owner = match (mode, ip) {
        (ReplayMode::WithIp, None) => return Admission::unchanged(Verdict::MissingIp),
        (ReplayMode::WithIp, Some(ip)) => Some(normalise_ip(ip)),
        // Not needed to decide, so not kept.
        (ReplayMode::WithoutIp, _) => None,
    };
    if token.exp <= now {
        return Admission::unchanged(Verdict::Expired);
    }
    let Ok(raws) = raw_entries(bucket) else {
        return Admission::unchanged(Verdict::Corrupt);
    };
    let key = token.stored_digest();
    let mut live: u32 = 0;
    let mut expired: u32 = 0;
    for raw in raws.clone() {
        let entry = parse_entry(raw);
        if entry.expiry <= now {
            expired = expired.saturating_add(1);
        } else if entry.digest == key {
            let verdict = match (owner, entry.owner) {
                (Some(ip), Some(recorded)) if ip == recorded => Verdict::SameOwner,
                _ => Verdict::Replay,
            };
            return Admission::unchanged(verdict);
        } else {
            live = live.saturating_add(1);
        }
    }
    if live >= capacity {
        return Admission::unchanged(Verdict::StoreFull);
    }
    let mut out = Vec::with_capacity(HEADER_LEN + (live as usize + 1) * ENTRY_LEN);
    out.extend_from_slice(&HEADER);
    for raw in raws {
        if parse_entry(raw).expiry > now {
            out.extend_from_slice(raw);
        }
    }
    let mut digest = [0u8; STORED_DIGEST_LEN];
    digest.copy_from_slice(key);
    push_entry(
        &mut out,
        &Entry {
            digest,
            expiry: token.exp,
            owner,
        },
    );
    Admission {
        verdict: Verdict::FirstUse,
        new_value: Some(out),
        reclaimed: expired,
    }
}

/// A host call refused, with the host's status code for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreError {
    pub status: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    CasMismatch,
    Other(StoreError),
}

/// Envoy shared data as the replay store needs it. `get` returns the value and its CAS (never 0
/// for an existing key); `set` with a non-zero CAS on an existing key fails with `CasMismatch`
/// unless it matches, with CAS 0 overwrites, and on a missing key creates it whatever the CAS.
pub trait SharedStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError>;
}

pub fn bucket_key(prefix: &str, index: u32) -> String {
    format!("{prefix}{index}")
}

/// Bytes 16..20 pick the bucket: the stored bytes 0..16 then all discriminate within a bucket.
pub fn bucket_index(digest: &[u8; 32], buckets: u32) -> u32 {
    let n = u32::from_be_bytes([digest[16], digest[17], digest[18], digest[19]]);
    n % buckets.max(1)
}

/// Creates the missing buckets of a layout, empty; leaves existing ones alone. Called from
/// configuration (every worker may run it at once), never from a request. Returns how many it
/// created.
pub fn ensure_buckets(
    store: &dyn SharedStore,
    prefix: &str,
    buckets: u32,
) -> Result<u32, StoreError> {
    let fresh = encode(&[]);
    let mut created = 0;
    for index in 0..buckets {
        let key = bucket_key(prefix, index);
        if store.get(&key)?.is_some() {
            continue;
        }
        match store.set(&key, &fresh, CREATE_CAS) {
            Ok(()) => created += 1,
            // Another worker created it between our get and set.
            Err(SetError::CasMismatch) => {}
            Err(SetError::Other(e)) => return Err(e),
        }
    }
    Ok(created)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayOutcome {
    pub verdict: Verdict,
    /// CAS mismatches before the decision (a stats counter).
    pub cas_retries: u32,
    /// Expired entries dropped by this request's write (the evictions counter).
    pub reclaimed: u32,
    /// The bucket consulted, for logs.
    pub bucket: u32,
}

/// The request path: read the token's bucket, decide, write back with the CAS read, retry on
/// mismatch. Exactly one concurrent first use wins because every write is conditional on the
/// bucket being unchanged since the decision was made.
pub fn check_and_record(
    store: &dyn SharedStore,
    policy: &ReplayCachePolicy,
    prefix: &str,
    token: TokenRef,
    ip: Option<IpAddr>,
    mode: ReplayMode,
    now: u64,
) -> ReplayOutcome {
    let bucket = bucket_index(&token.digest, policy.buckets);
    let key = bucket_key(prefix, bucket);
    let mut cas_retries = 0;
    let done = |verdict, cas_retries, reclaimed| ReplayOutcome {
        verdict,
        cas_retries,
        reclaimed,
        bucket,
    };
    loop {
        let (value, cas) = match store.get(&key) {
            Ok(Some(found)) => found,
            Ok(None) => return done(Verdict::MissingBucket, cas_retries, 0),
            Err(_) => return done(Verdict::StoreUnavailable, cas_retries, 0),
        };
        // A CAS of 0 would make the write unconditional: never decide on it.
        if cas == 0 {
            return done(Verdict::StoreUnavailable, cas_retries, 0);
        }
        let admission = admit(&value, &token, ip, mode, now, policy.capacity);
        let Some(new_value) = admission.new_value else {
            return done(admission.verdict, cas_retries, 0);
        };
        match store.set(&key, &new_value, cas) {
            Ok(()) => return done(admission.verdict, cas_retries, admission.reclaimed),
            Err(SetError::CasMismatch) if cas_retries < MAX_CAS_RETRIES => cas_retries += 1,
            Err(SetError::CasMismatch) => return done(Verdict::Contention, cas_retries, 0),
            Err(SetError::Other(_)) => return done(Verdict::StoreUnavailable, cas_retries, 0),
        }
    }
}

/// Store occupancy for a stats gauge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Occupancy {
    pub live: u64,
    /// Live plus expired entries not yet reclaimed.
    pub stored: u64,
    /// Buckets missing, corrupt or unreadable.
    pub unreadable: u32,
}

/// Reads the buckets in `range` (all of them, or a slice per tick: a full scan of a
/// 1,000,000-entry store copies ~40 MB). Read-only.
pub fn occupancy(store: &dyn SharedStore, prefix: &str, range: Range<u32>, now: u64) -> Occupancy {
    let mut occ = Occupancy::default();
    for index in range {
        let Ok(Some((value, _))) = store.get(&bucket_key(prefix, index)) else {
            occ.unreadable += 1;
            continue;
        };
        match raw_entries(&value) {
            Ok(raws) => {
                for raw in raws {
                    occ.stored += 1;
                    if parse_entry(raw).expiry > now {
                        occ.live += 1;
                    }
                }
            }
            Err(_) => occ.unreadable += 1,
        }
    }
    occ
}

/// Rewrites the buckets in `range` that hold expired entries, one CAS attempt each (a bucket
/// that changed meanwhile is left for its next write or the next sweep). Returns the entries
/// reclaimed; for `on_tick`, so idle buckets give their memory back.
pub fn sweep(store: &dyn SharedStore, prefix: &str, range: Range<u32>, now: u64) -> u64 {
    let mut reclaimed = 0;
    for index in range {
        let key = bucket_key(prefix, index);
        let Ok(Some((value, cas))) = store.get(&key) else {
            continue;
        };
        let Ok(raws) = raw_entries(&value) else {
            continue;
        };
        let total = raws.len() as u64;
        let mut out = Vec::with_capacity(value.len());
        out.extend_from_slice(&HEADER);
        for raw in raws {
            if parse_entry(raw).expiry > now {
                out.extend_from_slice(raw);
            }
        }
        let kept = ((out.len() - HEADER_LEN) / ENTRY_LEN) as u64;
        if kept < total && cas != 0 && store.set(&key, &out, cas).is_ok() {
            reclaimed += total - kept;
        }
    }
    reclaimed
}

/// Envoy's shared data in process, for tests and benchmarks: one lock, a global CAS counter
/// that skips 0, creation that ignores the CAS, exactly as the host behaves.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    map: HashMap<String, (Vec<u8>, u32)>,
    last_cas: u32,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys, for tests.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(inner.map.get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, current)) = inner.map.get(key) {
            if cas != 0 && cas != *current {
                return Err(SetError::CasMismatch);
            }
        }
        inner.last_cas = inner.last_cas.wrapping_add(1);
        if inner.last_cas == 0 {
            inner.last_cas = 1;
        }
        let next = inner.last_cas;
        inner.map.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Barrier;
    use std::thread;

    const NOW: u64 = 1_700_000_000;
    const API: &str = "apolloapi";

    fn sha(text: &str) -> [u8; 32] {
        Sha256::digest(text.as_bytes()).into()
    }

    fn tok(name: &str, exp: u64) -> TokenRef {
        TokenRef::new(API, &sha(name), exp, 0)
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    fn policy(max_entries: u64) -> ReplayCachePolicy {
        ReplayCachePolicy::compile(&ReplayCacheConfig { max_entries }, "replay_cache").unwrap()
    }

    /// A store with every bucket of `policy` created, as configuration leaves it.
    fn ready(policy: &ReplayCachePolicy) -> (MemoryStore, String) {
        let store = MemoryStore::new();
        let prefix = policy.key_prefix("gateguard/");
        assert_eq!(
            ensure_buckets(&store, &prefix, policy.buckets()).unwrap(),
            policy.buckets()
        );
        (store, prefix)
    }

    struct Gateway {
        store: MemoryStore,
        prefix: String,
        policy: ReplayCachePolicy,
    }

    impl Gateway {
        fn new(max_entries: u64) -> Self {
            let policy = policy(max_entries);
            let (store, prefix) = ready(&policy);
            Self {
                store,
                prefix,
                policy,
            }
        }

        fn check(
            &self,
            token: TokenRef,
            ip: Option<IpAddr>,
            mode: ReplayMode,
            now: u64,
        ) -> Verdict {
            self.outcome(token, ip, mode, now).verdict
        }

        fn outcome(
            &self,
            token: TokenRef,
            ip: Option<IpAddr>,
            mode: ReplayMode,
            now: u64,
        ) -> ReplayOutcome {
            check_and_record(
                &self.store,
                &self.policy,
                &self.prefix,
                token,
                ip,
                mode,
                now,
            )
        }

        fn occupancy(&self, now: u64) -> Occupancy {
            occupancy(&self.store, &self.prefix, 0..self.policy.buckets(), now)
        }
    }

    use ReplayMode::{WithIp, WithoutIp};
    use Verdict::*;

    // ---- configuration ----

    #[test]
    fn config_parses_modes_and_defaults() {
        let c: ReplayConfig = serde_json::from_str(r#"{"mode":"with_ip"}"#).unwrap();
        assert_eq!(c.mode, WithIp);
        let c: ReplayConfig = serde_json::from_str(r#"{"mode":"without_ip"}"#).unwrap();
        assert_eq!(c.mode, WithoutIp);
        assert!(serde_json::from_str::<ReplayConfig>(r#"{"mode":"WithIp"}"#).is_err());
        assert!(serde_json::from_str::<ReplayConfig>(r#"{"mode":"with_ip","x":1}"#).is_err());
        let c: ReplayCacheConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, ReplayCacheConfig::default());
        assert_eq!(c.max_entries, 1_000_000);
        assert!(serde_json::from_str::<ReplayCacheConfig>(r#"{"max_entrys":5}"#).is_err());
    }

    #[test]
    fn config_refuses_zero_and_absurd_sizes_naming_the_field() {
        for bad in [0, MAX_ENTRIES_LIMIT + 1, u64::MAX] {
            let err =
                ReplayCachePolicy::compile(&ReplayCacheConfig { max_entries: bad }, "replay_cache")
                    .unwrap_err();
            assert_eq!(err.path, "replay_cache.max_entries");
        }
        assert_eq!(policy(MAX_ENTRIES_LIMIT).buckets(), MAX_BUCKETS);
    }

    #[test]
    fn bucket_sizing_is_a_power_of_two_and_covers_max_entries() {
        let p = policy(1_000_000);
        assert_eq!((p.buckets(), p.capacity()), (4096, 245));
        // Small stores are one bucket: the bound is exact.
        assert_eq!((policy(3).buckets(), policy(3).capacity()), (1, 3));
        assert_eq!((policy(511).buckets(), policy(511).capacity()), (1, 511));
        assert_eq!((policy(1000).buckets(), policy(1000).capacity()), (4, 250));
        let p = policy(MAX_ENTRIES_LIMIT);
        assert_eq!((p.buckets(), p.capacity()), (65_536, 763));
        for max in [
            1,
            7,
            512,
            4097,
            999_999,
            1_000_000,
            12_345_678,
            MAX_ENTRIES_LIMIT,
        ] {
            let p = policy(max);
            assert!(p.buckets().is_power_of_two());
            let total = u64::from(p.buckets()) * u64::from(p.capacity());
            assert!(
                total >= max && total < max + u64::from(p.buckets()),
                "{max}"
            );
        }
        assert_eq!(policy(1_000_000).key_prefix("gg/"), "gg/replay/v1/4096/");
    }

    // ---- with_ip ----

    #[test]
    fn with_ip_first_ip_owns_the_token_and_other_ips_are_refused() {
        let gw = Gateway::new(1000);
        let t = tok("a", NOW + 600);
        assert_eq!(gw.check(t, ip("203.0.113.5"), WithIp, NOW), FirstUse);
        for _ in 0..5 {
            assert_eq!(gw.check(t, ip("203.0.113.5"), WithIp, NOW + 1), SameOwner);
        }
        assert_eq!(gw.check(t, ip("203.0.113.6"), WithIp, NOW + 2), Replay);
        assert_eq!(gw.check(t, ip("2001:db8::1"), WithIp, NOW + 2), Replay);
        // The owner keeps working after a refusal of someone else.
        assert_eq!(gw.check(t, ip("203.0.113.5"), WithIp, NOW + 3), SameOwner);
    }

    #[test]
    fn with_ip_ipv4_mapped_ipv6_is_the_same_owner_as_ipv4() {
        let gw = Gateway::new(1000);
        let t = tok("a", NOW + 600);
        assert_eq!(
            gw.check(t, ip("::ffff:198.51.100.7"), WithIp, NOW),
            FirstUse
        );
        assert_eq!(gw.check(t, ip("198.51.100.7"), WithIp, NOW), SameOwner);
        let u = tok("b", NOW + 600);
        assert_eq!(gw.check(u, ip("198.51.100.8"), WithIp, NOW), FirstUse);
        assert_eq!(
            gw.check(u, ip("::ffff:198.51.100.8"), WithIp, NOW),
            SameOwner
        );
        assert_eq!(gw.check(u, ip("::ffff:198.51.100.9"), WithIp, NOW), Replay);
        // The IPv4-compatible form (::a.b.c.d) is a different, IPv6, address.
        assert_eq!(gw.check(u, ip("::198.51.100.8"), WithIp, NOW), Replay);
    }

    #[test]
    fn with_ip_ownership_lasts_until_exp_plus_skew_then_the_entry_is_reclaimed() {
        let gw = Gateway::new(1000);
        let t = TokenRef::new(API, &sha("a"), NOW + 10, 60);
        assert_eq!(t.exp, NOW + 71);
        assert_eq!(gw.check(t, ip("10.0.0.1"), WithIp, NOW), FirstUse);
        // Last second an inclusive `exp + skew` check accepts: still owned.
        assert_eq!(gw.check(t, ip("10.0.0.2"), WithIp, NOW + 70), Replay);
        assert_eq!(gw.check(t, ip("10.0.0.1"), WithIp, NOW + 70), SameOwner);
        assert_eq!(gw.occupancy(NOW + 70).live, 1);
        // Then the token is dead: the entry is no longer live and the next write drops it.
        assert_eq!(gw.check(t, ip("10.0.0.2"), WithIp, NOW + 71), Expired);
        assert_eq!(
            gw.occupancy(NOW + 71),
            Occupancy {
                live: 0,
                stored: 1,
                unreadable: 0
            }
        );
        let store = &gw.store;
        let key = bucket_key(&gw.prefix, bucket_index(&t.digest, gw.policy.buckets()));
        // Another token in the same bucket reclaims it.
        let mut n = 0;
        let other = loop {
            let o = tok(&format!("other{n}"), NOW + 600);
            if bucket_index(&o.digest, gw.policy.buckets())
                == bucket_index(&t.digest, gw.policy.buckets())
            {
                break o;
            }
            n += 1;
        };
        let out = gw.outcome(other, ip("10.0.0.3"), WithIp, NOW + 71);
        assert_eq!((out.verdict, out.reclaimed), (FirstUse, 1));
        let entries = decode(&store.get(&key).unwrap().unwrap().0).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].digest[..], other.digest[..16]);
    }

    #[test]
    fn with_ip_without_a_client_ip_fails_closed() {
        let gw = Gateway::new(1000);
        let t = tok("a", NOW + 600);
        assert_eq!(gw.check(t, None, WithIp, NOW), MissingIp);
        assert!(!MissingIp.is_accepted());
        // Nothing was recorded: the token is still fresh for a request with an IP.
        assert_eq!(gw.check(t, ip("10.0.0.1"), WithIp, NOW), FirstUse);
    }

    // ---- without_ip ----

    #[test]
    fn without_ip_first_use_accepted_second_refused_whatever_the_ip() {
        let gw = Gateway::new(1000);
        let t = tok("a", NOW + 600);
        assert_eq!(gw.check(t, ip("10.0.0.1"), WithoutIp, NOW), FirstUse);
        assert_eq!(gw.check(t, ip("10.0.0.1"), WithoutIp, NOW), Replay);
        assert_eq!(gw.check(t, ip("10.0.0.2"), WithoutIp, NOW + 1), Replay);
        assert_eq!(gw.check(t, None, WithoutIp, NOW + 1), Replay);
        let u = tok("b", NOW + 600);
        assert_eq!(gw.check(u, None, WithoutIp, NOW), FirstUse);
        assert_eq!(gw.check(u, ip("10.0.0.1"), WithoutIp, NOW), Replay);
    }

    #[test]
    fn without_ip_does_not_keep_the_ip() {
        let a = admit(
            &[],
            &tok("a", NOW + 600),
            ip("10.0.0.1"),
            WithoutIp,
            NOW,
            10,
        );
        let entries = decode(&a.new_value.unwrap()).unwrap();
        assert_eq!(entries[0].owner, None);
    }

    #[test]
    fn an_expired_token_is_never_recorded() {
        let t = tok("a", NOW);
        let a = admit(&[], &t, None, WithoutIp, NOW + 1, 10);
        assert_eq!(a, Admission::unchanged(Expired));
    }

    #[test]
    fn expired_entries_are_reclaimed_on_write() {
        let mut bucket = encode(&[]);
        for i in 0..5 {
            let a = admit(
                &bucket,
                &tok(&format!("t{i}"), NOW + i),
                None,
                WithoutIp,
                NOW,
                100,
            );
            bucket = a.new_value.unwrap();
        }
        assert_eq!(decode(&bucket).unwrap().len(), 5);
        // Expiries are NOW+1..NOW+5; at NOW+3 the first three are dead.
        let a = admit(
            &bucket,
            &tok("new", NOW + 600),
            None,
            WithoutIp,
            NOW + 3,
            100,
        );
        assert_eq!((a.verdict, a.reclaimed), (FirstUse, 3));
        assert_eq!(decode(&a.new_value.unwrap()).unwrap().len(), 3);
        // An entry past its expiry no longer blocks its own token (it is then expired too).
        let a = admit(
            &bucket,
            &tok("t0", NOW + 600),
            None,
            WithoutIp,
            NOW + 3,
            100,
        );
        assert_eq!(a.verdict, FirstUse);
    }

    // ---- bounds ----

    #[test]
    fn store_full_of_live_tokens_refuses_new_ones_then_accepts_after_expiry() {
        let gw = Gateway::new(3);
        for name in ["a", "b", "c"] {
            assert_eq!(
                gw.check(tok(name, NOW + 10), None, WithoutIp, NOW),
                FirstUse
            );
        }
        let d = tok("d", NOW + 100);
        assert_eq!(gw.check(d, None, WithoutIp, NOW + 5), StoreFull);
        assert!(!StoreFull.is_accepted());
        // Still detects replays of what it holds, and forgot nothing.
        assert_eq!(
            gw.check(tok("a", NOW + 10), None, WithoutIp, NOW + 5),
            Replay
        );
        assert_eq!(
            gw.check(tok("b", NOW + 10), ip("10.0.0.9"), WithIp, NOW + 5),
            Replay
        );
        assert_eq!(
            gw.occupancy(NOW + 5),
            Occupancy {
                live: 3,
                stored: 3,
                unreadable: 0
            }
        );
        // a, b, c live until NOW+11.
        assert_eq!(gw.check(d, None, WithoutIp, NOW + 10), StoreFull);
        let out = gw.outcome(d, None, WithoutIp, NOW + 11);
        assert_eq!((out.verdict, out.reclaimed), (FirstUse, 3));
        assert_eq!(gw.check(d, None, WithoutIp, NOW + 11), Replay);
    }

    #[test]
    fn sweep_reclaims_idle_buckets() {
        let gw = Gateway::new(5000);
        for i in 0..100 {
            assert_eq!(
                gw.check(tok(&format!("t{i}"), NOW + i), None, WithoutIp, NOW),
                FirstUse
            );
        }
        let all = 0..gw.policy.buckets();
        assert_eq!(
            gw.occupancy(NOW + 50),
            Occupancy {
                live: 50,
                stored: 100,
                unreadable: 0
            }
        );
        assert_eq!(sweep(&gw.store, &gw.prefix, all.clone(), NOW + 50), 50);
        assert_eq!(
            gw.occupancy(NOW + 50),
            Occupancy {
                live: 50,
                stored: 50,
                unreadable: 0
            }
        );
        assert_eq!(sweep(&gw.store, &gw.prefix, all, NOW + 50), 0);
    }

    // ---- record format and corruption ----

    #[test]
    fn record_round_trips_and_a_fresh_bucket_is_the_header_alone() {
        assert_eq!(encode(&[]), b"GR\x01\x29".to_vec());
        assert_eq!(decode(&[]).unwrap(), vec![]);
        let entries = vec![
            Entry {
                digest: [7; 16],
                expiry: 42,
                owner: None,
            },
            Entry {
                digest: [9; 16],
                expiry: u64::MAX,
                owner: Some(normalise_ip("192.0.2.1".parse().unwrap())),
            },
        ];
        let bytes = encode(&entries);
        assert_eq!(bytes.len(), HEADER_LEN + 2 * ENTRY_LEN);
        assert_eq!(decode(&bytes).unwrap(), entries);
        // An empty value and the encoded empty bucket decide alike.
        let t = tok("a", NOW + 600);
        assert_eq!(
            admit(&[], &t, None, WithoutIp, NOW, 10),
            admit(&encode(&[]), &t, None, WithoutIp, NOW, 10)
        );
    }

    #[test]
    fn corrupt_buckets_fail_closed_without_writing() {
        let good = admit(&[], &tok("a", NOW + 600), ip("10.0.0.1"), WithIp, NOW, 10)
            .new_value
            .unwrap();
        let mut bad_version = good.clone();
        bad_version[2] = 2;
        let mut bad_flag = good.clone();
        bad_flag[HEADER_LEN + 24] = 7;
        let mut owner_without_flag = encode(&[Entry {
            digest: [1; 16],
            expiry: NOW + 9,
            owner: None,
        }]);
        owner_without_flag[HEADER_LEN + 30] = 1;
        let cases: Vec<(Vec<u8>, CorruptBucket)> = vec![
            (b"GR".to_vec(), CorruptBucket::Header),
            (b"XX\x01\x29".to_vec(), CorruptBucket::Header),
            (bad_version, CorruptBucket::Header),
            (good[..good.len() - 1].to_vec(), CorruptBucket::Length),
            ([good.clone(), vec![0]].concat(), CorruptBucket::Length),
            (bad_flag, CorruptBucket::Entry { index: 0 }),
            (owner_without_flag, CorruptBucket::Entry { index: 0 }),
        ];
        for (bytes, why) in cases {
            assert_eq!(decode(&bytes), Err(why));
            for mode in [WithIp, WithoutIp] {
                let a = admit(&bytes, &tok("b", NOW + 600), ip("10.0.0.1"), mode, NOW, 10);
                assert_eq!(a, Admission::unchanged(Corrupt));
            }
        }
        // Through the store: refused, and the bucket is left as found (for the log).
        let gw = Gateway::new(10);
        let key = bucket_key(&gw.prefix, 0);
        gw.store.set(&key, b"garbage", 0).unwrap();
        assert_eq!(gw.check(tok("b", NOW + 600), None, WithoutIp, NOW), Corrupt);
        assert_eq!(gw.store.get(&key).unwrap().unwrap().0, b"garbage".to_vec());
        assert_eq!(gw.occupancy(NOW).unreadable, 1);
        // The adapter's reset: back to an empty bucket.
        gw.store.set(&key, &encode(&[]), 0).unwrap();
        assert_eq!(
            gw.check(tok("b", NOW + 600), None, WithoutIp, NOW),
            FirstUse
        );
    }

    #[test]
    fn a_missing_bucket_fails_closed_and_is_not_created_by_a_request() {
        let store = MemoryStore::new();
        let p = policy(1000);
        let prefix = p.key_prefix("gg/");
        let out = check_and_record(
            &store,
            &p,
            &prefix,
            tok("a", NOW + 600),
            None,
            WithoutIp,
            NOW,
        );
        assert_eq!(out.verdict, MissingBucket);
        assert!(store.is_empty());
        let out = check_and_record(
            &store,
            &p,
            &prefix,
            tok("a", NOW + 600),
            ip("10.0.0.1"),
            WithIp,
            NOW,
        );
        assert_eq!(out.verdict, MissingBucket);
        assert!(store.is_empty());
    }

    // ---- keys, scope, collisions ----

    #[test]
    fn different_tokens_in_one_bucket_are_told_apart() {
        let gw = Gateway::new(500); // one bucket
        assert_eq!(gw.policy.buckets(), 1);
        let tokens: Vec<TokenRef> = (0..200).map(|i| tok(&format!("t{i}"), NOW + 600)).collect();
        for (i, t) in tokens.iter().enumerate() {
            let who = ip(&format!("10.0.{}.{}", i / 200, i % 200));
            assert_eq!(gw.check(*t, who, WithIp, NOW), FirstUse);
        }
        for (i, t) in tokens.iter().enumerate() {
            let who = ip(&format!("10.0.{}.{}", i / 200, i % 200));
            assert_eq!(gw.check(*t, who, WithIp, NOW), SameOwner);
            assert_eq!(gw.check(*t, ip("192.0.2.1"), WithIp, NOW), Replay);
        }
    }

    #[test]
    fn digests_equal_in_their_stored_16_bytes_count_as_one_token() {
        // The stored prefix decides: a (practically impossible) collision refuses, never admits.
        let a = tok("a", NOW + 600);
        let mut b = a;
        b.digest[31] ^= 0xff;
        let bucket = admit(&[], &a, None, WithoutIp, NOW, 10).new_value.unwrap();
        assert_eq!(admit(&bucket, &b, None, WithoutIp, NOW, 10).verdict, Replay);
        // Bytes 16..20 pick the bucket, so they are not the stored ones.
        let mut c = a;
        c.digest[0] ^= 1;
        assert_eq!(bucket_index(&a.digest, 4096), bucket_index(&c.digest, 4096));
        assert_eq!(
            admit(&bucket, &c, None, WithoutIp, NOW, 10).verdict,
            FirstUse
        );
    }

    #[test]
    fn each_api_keeps_its_own_history() {
        let gw = Gateway::new(1000);
        let raw = sha("the same jwt");
        let on_a = TokenRef::new("a", &raw, NOW + 600, 0);
        let on_b = TokenRef::new("b", &raw, NOW + 600, 0);
        assert_ne!(on_a.digest, on_b.digest);
        // Length-prefixed: ("ab", x) and ("a", "b" || x) cannot meet.
        assert_ne!(
            TokenRef::new("ab", &raw, 0, 0).digest,
            TokenRef::new("a", &raw, 0, 0).digest
        );
        assert_eq!(gw.check(on_a, None, WithoutIp, NOW), FirstUse);
        assert_eq!(gw.check(on_b, ip("10.0.0.2"), WithIp, NOW), FirstUse);
        assert_eq!(gw.check(on_a, None, WithoutIp, NOW), Replay);
        assert_eq!(gw.check(on_b, ip("10.0.0.2"), WithIp, NOW), SameOwner);
    }

    #[test]
    fn a_token_spent_under_one_mode_stays_spent_after_a_mode_switch() {
        let gw = Gateway::new(1000);
        let t = tok("a", NOW + 600);
        assert_eq!(gw.check(t, ip("10.0.0.1"), WithoutIp, NOW), FirstUse);
        assert_eq!(gw.check(t, ip("10.0.0.1"), WithIp, NOW), Replay);
        let u = tok("b", NOW + 600);
        assert_eq!(gw.check(u, ip("10.0.0.1"), WithIp, NOW), FirstUse);
        assert_eq!(gw.check(u, ip("10.0.0.1"), WithoutIp, NOW), Replay);
    }

    // ---- store semantics, CAS and creation ----

    #[test]
    fn memory_store_models_envoy_shared_data() {
        let s = MemoryStore::new();
        assert_eq!(s.get("k").unwrap(), None);
        // Creation ignores the CAS.
        s.set("k", b"1", 12345).unwrap();
        let (v, c1) = s.get("k").unwrap().unwrap();
        assert_eq!((v, c1 != 0), (b"1".to_vec(), true));
        assert_eq!(
            s.set("k", b"2", c1.wrapping_add(7)),
            Err(SetError::CasMismatch)
        );
        s.set("k", b"2", c1).unwrap();
        let (_, c2) = s.get("k").unwrap().unwrap();
        assert!(c2 > c1);
        assert_eq!(s.set("k", b"3", c1), Err(SetError::CasMismatch));
        // CAS 0 overwrites unconditionally; the counter is global across keys.
        s.set("k", b"4", 0).unwrap();
        s.set("other", b"x", 0).unwrap();
        let (v, c3) = s.get("k").unwrap().unwrap();
        let (_, c4) = s.get("other").unwrap().unwrap();
        assert_eq!(v, b"4".to_vec());
        assert!(c4 > c3 && c3 > c2);
    }

    #[test]
    fn the_naive_per_token_get_then_set_scheme_accepts_twice() {
        // Two workers check one token with a per-token key, interleaved as Envoy allows.
        let s = MemoryStore::new();
        let key = "naive/token";
        let worker_a = s.get(key).unwrap();
        let worker_b = s.get(key).unwrap();
        // Both see no entry, so both decide "first use" and write with the CAS they have.
        let cas_a = worker_a.map_or(0, |(_, c)| c);
        let cas_b = worker_b.map_or(0, |(_, c)| c);
        assert!(s.set(key, b"used", cas_a).is_ok());
        assert!(s.set(key, b"used", cas_b).is_ok());
        // Both succeeded: the token went upstream twice. (And keys can never be deleted.)
    }

    #[test]
    fn ensure_buckets_is_idempotent_and_never_wipes_a_bucket() {
        let p = policy(5000);
        let (store, prefix) = ready(&p);
        assert_eq!(ensure_buckets(&store, &prefix, p.buckets()).unwrap(), 0);
        let t = tok("a", NOW + 600);
        assert_eq!(
            check_and_record(&store, &p, &prefix, t, None, WithoutIp, NOW).verdict,
            FirstUse
        );
        // A worker whose `get` ran before another worker created and filled the bucket.
        struct StaleReads<'a>(&'a MemoryStore);
        impl SharedStore for StaleReads<'_> {
            fn get(&self, _: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
                Ok(None)
            }
            fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
                self.0.set(key, value, cas)
            }
        }
        assert_eq!(
            ensure_buckets(&StaleReads(&store), &prefix, p.buckets()).unwrap(),
            0
        );
        assert_eq!(
            check_and_record(&store, &p, &prefix, t, None, WithoutIp, NOW).verdict,
            Replay
        );
    }

    #[test]
    fn concurrent_ensure_creates_each_bucket_exactly_once() {
        let p = policy(200_000);
        let store = MemoryStore::new();
        let prefix = p.key_prefix("gg/");
        let created = AtomicU32::new(0);
        let barrier = Barrier::new(8);
        thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    barrier.wait();
                    let n = ensure_buckets(&store, &prefix, p.buckets()).unwrap();
                    created.fetch_add(n, Ordering::SeqCst);
                });
            }
        });
        assert_eq!(created.load(Ordering::SeqCst), p.buckets());
        assert_eq!(store.len(), p.buckets() as usize);
    }

    /// Fails the next `mismatches` writes with `CasMismatch`, or hands out CAS 0.
    struct Flaky {
        inner: MemoryStore,
        mismatches: AtomicU32,
        zero_cas: bool,
    }

    impl SharedStore for Flaky {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            let found = self.inner.get(key)?;
            Ok(found.map(|(v, c)| (v, if self.zero_cas { 0 } else { c })))
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
            let left = self.mismatches.load(Ordering::SeqCst);
            if left > 0 {
                self.mismatches.store(left - 1, Ordering::SeqCst);
                return Err(SetError::CasMismatch);
            }
            self.inner.set(key, value, cas)
        }
    }

    fn flaky(p: &ReplayCachePolicy, mismatches: u32, zero_cas: bool) -> (Flaky, String) {
        let (inner, prefix) = ready(p);
        let store = Flaky {
            inner,
            mismatches: AtomicU32::new(mismatches),
            zero_cas,
        };
        (store, prefix)
    }

    #[test]
    fn cas_mismatches_are_retried_and_counted() {
        let p = policy(1000);
        let (store, prefix) = flaky(&p, 3, false);
        let out = check_and_record(
            &store,
            &p,
            &prefix,
            tok("a", NOW + 600),
            None,
            WithoutIp,
            NOW,
        );
        assert_eq!((out.verdict, out.cas_retries), (FirstUse, 3));
    }

    #[test]
    fn exhausting_cas_retries_fails_closed_and_records_nothing() {
        let p = policy(1000);
        let (store, prefix) = flaky(&p, MAX_CAS_RETRIES + 1, false);
        let t = tok("a", NOW + 600);
        let out = check_and_record(&store, &p, &prefix, t, None, WithoutIp, NOW);
        assert_eq!(
            (out.verdict, out.cas_retries),
            (Contention, MAX_CAS_RETRIES)
        );
        assert!(!Contention.is_accepted());
        assert_eq!(
            check_and_record(&store, &p, &prefix, t, None, WithoutIp, NOW).verdict,
            FirstUse
        );
    }

    #[test]
    fn a_zero_cas_from_the_host_is_never_used_for_a_write() {
        let p = policy(1000);
        let (store, prefix) = flaky(&p, 0, true);
        let out = check_and_record(
            &store,
            &p,
            &prefix,
            tok("a", NOW + 600),
            None,
            WithoutIp,
            NOW,
        );
        assert_eq!(out.verdict, StoreUnavailable);
    }

    // ---- races across workers ----

    #[test]
    fn without_ip_exactly_one_first_use_per_token_under_a_16_thread_race() {
        const THREADS: usize = 16;
        const ROUNDS: u64 = 200;
        // 16 buckets: the racing token also contends with every thread's own token.
        let gw = Gateway::new(4096);
        let firsts: Vec<AtomicU32> = (0..ROUNDS).map(|_| AtomicU32::new(0)).collect();
        let retries = AtomicU32::new(0);
        let barrier = Barrier::new(THREADS);
        thread::scope(|s| {
            for t in 0..THREADS {
                let (gw, firsts, retries, barrier) = (&gw, &firsts, &retries, &barrier);
                s.spawn(move || {
                    let me = ip(&format!("10.1.0.{t}"));
                    for round in 0..ROUNDS {
                        let now = NOW + round;
                        let shared = tok(&format!("shared-{round}"), now + 2);
                        let own = tok(&format!("own-{t}-{round}"), now + 2);
                        barrier.wait();
                        let out = gw.outcome(shared, me, WithoutIp, now);
                        match out.verdict {
                            FirstUse => {
                                firsts[round as usize].fetch_add(1, Ordering::SeqCst);
                            }
                            Replay => {}
                            other => panic!("round {round}: {other:?}"),
                        }
                        let mine = gw.outcome(own, me, WithoutIp, now);
                        assert_eq!(mine.verdict, FirstUse);
                        retries.fetch_add(out.cas_retries + mine.cas_retries, Ordering::SeqCst);
                    }
                });
            }
        });
        for (round, n) in firsts.iter().enumerate() {
            assert_eq!(n.load(Ordering::SeqCst), 1, "round {round}");
        }
        eprintln!(
            "without_ip race: {} CAS retries",
            retries.load(Ordering::SeqCst)
        );
        // Old rounds were reclaimed as they expired: the store stays small.
        assert!(gw.occupancy(NOW + ROUNDS).stored < 3 * 17 + 17 * 16);
    }

    #[test]
    fn with_ip_exactly_one_owner_among_32_racing_ips() {
        const THREADS: usize = 32;
        const ROUNDS: u64 = 200;
        let gw = Gateway::new(1_000_000);
        let results: Vec<Mutex<Vec<(usize, Verdict, Verdict)>>> =
            (0..ROUNDS).map(|_| Mutex::new(Vec::new())).collect();
        let barrier = Barrier::new(THREADS);
        thread::scope(|s| {
            for t in 0..THREADS {
                let (gw, results, barrier) = (&gw, &results, &barrier);
                s.spawn(move || {
                    // Half the threads spell their IPv4 address as IPv4-mapped IPv6.
                    let me = if t % 2 == 0 {
                        ip(&format!("192.0.2.{t}"))
                    } else {
                        ip(&format!("::ffff:192.0.2.{t}"))
                    };
                    for round in 0..ROUNDS {
                        let token = tok(&format!("shared-{round}"), NOW + 600);
                        barrier.wait();
                        let first = gw.check(token, me, WithIp, NOW);
                        let again = gw.check(token, me, WithIp, NOW);
                        results[round as usize]
                            .lock()
                            .unwrap()
                            .push((t, first, again));
                    }
                });
            }
        });
        for (round, r) in results.iter().enumerate() {
            let r = r.lock().unwrap();
            assert_eq!(r.len(), THREADS);
            let winners: Vec<_> = r
                .iter()
                .filter(|(_, first, _)| *first == FirstUse)
                .collect();
            assert_eq!(winners.len(), 1, "round {round}: {r:?}");
            for (t, first, again) in r.iter() {
                if *t == winners[0].0 {
                    assert_eq!(*again, SameOwner, "round {round}");
                } else {
                    assert_eq!(
                        (*first, *again),
                        (Replay, Replay),
                        "round {round} thread {t}"
                    );
                }
            }
        }
    }

    // ---- measurements: cargo test --release -p scratch-replay -- --ignored --nocapture ----

    #[test]
    #[ignore]
    fn measure_memory_and_cost() {
        use std::hint::black_box;
        use std::time::Instant;

        let p = policy(1_000_000);
        let (store, prefix) = ready(&p);
        let started = Instant::now();
        let mut accepted: u64 = 0;
        let full_at = loop {
            let t = tok(&format!("fill-{accepted}"), NOW + 3600);
            match check_and_record(&store, &p, &prefix, t, None, WithoutIp, NOW).verdict {
                FirstUse => accepted += 1,
                StoreFull => break accepted,
                other => panic!("{other:?}"),
            }
        };
        let fill_secs = started.elapsed().as_secs_f64();
        let bytes_at_first_full: usize = (0..p.buckets())
            .map(|i| store.get(&bucket_key(&prefix, i)).unwrap().unwrap().0.len())
            .sum();
        let full_bucket = HEADER_LEN + p.capacity() as usize * ENTRY_LEN;
        let full_store = full_bucket * p.buckets() as usize;
        eprintln!(
            "entry: {ENTRY_LEN} bytes; buckets {} x capacity {}",
            p.buckets(),
            p.capacity()
        );
        eprintln!(
            "first StoreFull after {full_at} live tokens ({:.1}% of max_entries), encoded {} bytes \
             ({:.1} bytes/entry); filled in {fill_secs:.2}s",
            full_at as f64 / 1e4,
            bytes_at_first_full,
            bytes_at_first_full as f64 / full_at as f64
        );
        eprintln!(
            "full store: {} buckets x {full_bucket} bytes = {full_store} bytes ({:.1} MB) for {} entries",
            p.buckets(),
            full_store as f64 / 1e6,
            u64::from(p.buckets()) * u64::from(p.capacity())
        );
        let started = Instant::now();
        let occ = occupancy(&store, &prefix, 0..p.buckets(), NOW);
        eprintln!("occupancy full scan: {:?} in {:?}", occ, started.elapsed());

        // admit() on a bucket one short of full: the worst cases.
        let mut bucket = encode(&[]);
        for i in 0..p.capacity() - 1 {
            bucket = admit(
                &bucket,
                &tok(&format!("b{i}"), NOW + 3600),
                None,
                WithoutIp,
                NOW,
                p.capacity(),
            )
            .new_value
            .unwrap();
        }
        let present = tok("b0", NOW + 3600);
        let fresh = tok("fresh", NOW + 3600);
        const N: u32 = 20_000;
        for (label, t) in [
            ("new token (scan + 10 KB write)", fresh),
            ("replay (scan)", present),
        ] {
            let started = Instant::now();
            for _ in 0..N {
                black_box(admit(
                    black_box(&bucket),
                    &t,
                    None,
                    WithoutIp,
                    NOW,
                    p.capacity(),
                ));
            }
            eprintln!(
                "admit, {} entries, {label}: {:?}/call",
                p.capacity() - 1,
                started.elapsed() / N
            );
        }
        let gw = Gateway::new(1_000_000);
        let started = Instant::now();
        for i in 0..N {
            black_box(gw.check(tok(&format!("c{i}"), NOW + 3600), None, WithoutIp, NOW));
        }
        eprintln!(
            "check_and_record on MemoryStore, sparse store: {:?}/call",
            started.elapsed() / N
        );
    }
}
