//! The request path against Envoy shared data: read the pointer, find the token's live bucket
//! (following seals), decide, write back with the CAS read.

use std::net::IpAddr;

use super::admit::{admit, Admission, Verdict};
use super::policy::{ReplayCachePolicy, ReplayMode, TokenRef};
use super::record::{bucket_index, seal_of, Layout, Pointer};
use crate::shared_data::{SetError, SharedStore, StoreError};

/// A failed CAS means another worker wrote the bucket, so retries are bounded by contention,
/// not by time; 64 is far above the worker count of any Envoy we expect.
pub const MAX_CAS_RETRIES: u32 = 64;
/// Seals one request may follow. Each is a migration that completed while the request ran
/// (a request starts from the pointer's current layout), so one is already rare.
pub const MAX_HOPS: u32 = 8;

pub fn pointer_key(prefix: &str) -> String {
    format!("{prefix}current")
}

/// Why the pointer could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointerError {
    Store(StoreError),
    /// Present but not a pointer gateguard wrote.
    Corrupt,
}

/// The pointer and its CAS; `None` before any configuration prepared the store.
pub fn read_pointer(
    store: &dyn SharedStore,
    prefix: &str,
) -> Result<Option<(Pointer, u32)>, PointerError> {
    match store
        .get(&pointer_key(prefix))
        .map_err(PointerError::Store)?
    {
        None => Ok(None),
        Some((value, cas)) => Pointer::decode(&value)
            .map(|p| Some((p, cas)))
            .ok_or(PointerError::Corrupt),
    }
}

/// The layout requests use now.
pub fn current_layout(
    store: &dyn SharedStore,
    prefix: &str,
) -> Result<Option<Layout>, PointerError> {
    Ok(read_pointer(store, prefix)?.map(|(p, _)| p.current))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayOutcome {
    pub verdict: Verdict,
    /// CAS mismatches before the decision (a stats counter).
    pub cas_retries: u32,
    /// Expired entries dropped by this request's write (the evictions counter).
    pub reclaimed: u32,
    /// The bucket consulted last, for logs.
    pub bucket: u32,
    /// Sealed buckets followed (migrations that ran during this request).
    pub hops: u32,
}

impl ReplayOutcome {
    /// An outcome decided before any bucket was read.
    pub fn none(verdict: Verdict) -> Self {
        Self {
            verdict,
            cas_retries: 0,
            reclaimed: 0,
            bucket: 0,
            hops: 0,
        }
    }
}

/// The request path: read the pointer; read the token's bucket in the current layout; if it is
/// sealed, go to the layout its marker names and read the token's bucket there; decide on the
/// live bucket and write it back with the CAS read, retrying on mismatch (the retry may find it
/// sealed meanwhile, and follows). Exactly one concurrent first use wins because every write is
/// conditional on the live bucket being unchanged since the decision was made, and a seal is
/// such a change. Capacity is `max_entries` spread over the layout in use.
pub fn check_and_record(
    store: &dyn SharedStore,
    policy: &ReplayCachePolicy,
    prefix: &str,
    token: TokenRef,
    ip: Option<IpAddr>,
    mode: ReplayMode,
    now: u64,
) -> ReplayOutcome {
    on_live_bucket(store, prefix, &token, |value, buckets| {
        admit(value, &token, ip, mode, now, policy.capacity_in(buckets))
    })
}

/// Finds the token's live bucket (from the pointer's current layout, following seals), lets
/// `decide` judge it (`value`, the layout's bucket count) and writes what it returns with the
/// CAS read, deciding again on a mismatch. The one walk every use of the store shares: the
/// local store's decision, and the etcd store's cache lookups and writes.
pub(crate) fn on_live_bucket(
    store: &dyn SharedStore,
    prefix: &str,
    token: &TokenRef,
    mut decide: impl FnMut(&[u8], u32) -> Admission,
) -> ReplayOutcome {
    let mut out = ReplayOutcome::none(Verdict::StoreUnavailable);
    let done = |mut out: ReplayOutcome, verdict| {
        out.verdict = verdict;
        out
    };
    let mut layout = match read_pointer(store, prefix) {
        Ok(Some((pointer, _))) => pointer.current,
        Ok(None) => return done(out, Verdict::MissingBucket),
        Err(PointerError::Corrupt) => return done(out, Verdict::Corrupt),
        Err(PointerError::Store(_)) => return done(out, Verdict::StoreUnavailable),
    };
    loop {
        out.bucket = bucket_index(&token.digest, layout.buckets);
        let key = layout.bucket_key(prefix, out.bucket);
        let (value, cas) = match store.get(&key) {
            Ok(Some(found)) => found,
            Ok(None) => return done(out, Verdict::MissingBucket),
            Err(_) => return done(out, Verdict::StoreUnavailable),
        };
        // A CAS of 0 would make the write unconditional: never decide on it.
        if cas == 0 {
            return done(out, Verdict::StoreUnavailable);
        }
        // A live record is validated once, by `admit`; a seal is read from its header.
        match seal_of(&value) {
            Some(Ok(target)) => {
                // Seals only point to a later epoch, so a corrupt chain cannot loop; the bound
                // is for a request that keeps losing to migrations.
                if target.epoch <= layout.epoch {
                    return done(out, Verdict::Corrupt);
                }
                if out.hops >= MAX_HOPS {
                    return done(out, Verdict::Contention);
                }
                out.hops = out.hops.saturating_add(1);
                layout = target;
                continue;
            }
            Some(Err(_)) => return done(out, Verdict::Corrupt),
            None => {}
        }
        let admission = decide(&value, layout.buckets);
        let Some(new_value) = admission.new_value else {
            return done(out, admission.verdict);
        };
        match store.set(&key, &new_value, cas) {
            Ok(()) => {
                out.reclaimed = admission.reclaimed;
                return done(out, admission.verdict);
            }
            Err(SetError::CasMismatch) if out.cas_retries < MAX_CAS_RETRIES => {
                out.cas_retries = out.cas_retries.saturating_add(1);
            }
            Err(SetError::CasMismatch) => return done(out, Verdict::Contention),
            Err(SetError::Other(_)) => return done(out, Verdict::StoreUnavailable),
        }
    }
}
