//! The pure decision on one live bucket: no store, no clock of its own.

use std::net::{IpAddr, Ipv6Addr};

use super::policy::{ReplayMode, TokenRef};
use super::record::{
    live_entries, live_header, parse_entry, push_entry, raw_expiry, Entry, ENTRY_LEN, HEADER_LEN,
    STORED_DIGEST_LEN,
};

/// What replay detection decided. `admit` returns the first seven; the store-level ones come
/// from [`super::check_and_record`]. Only `FirstUse` and `SameOwner` let the request through.
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
    /// The bucket's record or the store's pointer is not what gateguard writes there (it does not
    /// parse, or a seal points back to an older layout); nothing written.
    Corrupt,
    /// The store or the bucket key does not exist: configuration did not prepare it. Fail closed.
    MissingBucket,
    /// `MAX_CAS_RETRIES` consecutive CAS mismatches, or more than `MAX_HOPS` migrations during
    /// one request. Fail closed.
    Contention,
    /// The host refused a shared-data call. Fail closed.
    StoreUnavailable,
    /// The etcd store's local cache cannot decide: ask etcd (never a refusal by itself).
    NotKnownHere,
    /// etcd did not decide in time (down, slow, refusing): `on_unavailable` applies.
    EtcdUnavailable,
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
            Verdict::NotKnownHere => "not in the local cache of the etcd store",
            Verdict::EtcdUnavailable => "etcd unavailable",
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
    pub(crate) fn unchanged(verdict: Verdict) -> Self {
        Self {
            verdict,
            new_value: None,
            reclaimed: 0,
        }
    }
}

/// IPv4 and IPv4-mapped IPv6 are the same client.
pub fn normalise_ip(ip: IpAddr) -> Ipv6Addr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Decides one request against its live bucket's record (empty slice = fresh bucket) and, when
/// the token is new, returns the record to write: live entries, plus this token, minus the
/// expired. A sealed record is not a live one: `Corrupt` (the store protocol follows seals
/// before it gets here). Entries above `capacity` (left by a migration, which never drops one)
/// stay; only new tokens are refused.
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
    let Ok(raws) = live_entries(bucket) else {
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
    let mut out = Vec::with_capacity(
        (live as usize)
            .saturating_add(1)
            .saturating_mul(ENTRY_LEN)
            .saturating_add(HEADER_LEN),
    );
    out.extend_from_slice(&live_header());
    for raw in raws {
        if raw_expiry(raw) > now {
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
            confirmed: false,
        },
    );
    Admission {
        verdict: Verdict::FirstUse,
        new_value: Some(out),
        reclaimed: expired,
    }
}
