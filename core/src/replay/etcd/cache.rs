//! The local store in front of etcd: Envoy's shared data, in the same buckets and format as
//! the local replay store, used as a cache of what etcd said.
//!
//! What it may decide without asking (docs/policy.md, "Replay across gateway replicas"):
//! - any entry of the token makes a `without_ip` request a replay: the token was used, here
//!   or, if etcd confirmed it, anywhere (an entry of the local store's own history, left from
//!   before the policy used etcd, stays a refusal: spent stays spent);
//! - an entry with another owner (or none) makes a `with_ip` request a replay;
//! - only an entry that etcd confirmed, with this request's IP as owner, accepts a `with_ip`
//!   request without a round trip. etcd never changes a key's owner while the key lives, and
//!   the cached entry expires no later than the key's lease, so that acceptance is one etcd
//!   would give too.
//!
//! Everything else asks etcd ([`Verdict::NotKnownHere`]). A full cache bucket is not a
//! refusal: the answer is simply not cached.

use std::net::{IpAddr, Ipv6Addr};

use super::exchange::{Answer, Holder};
use crate::replay::admit::{normalise_ip, Admission, Verdict};
use crate::replay::policy::{ReplayCachePolicy, ReplayMode, TokenRef};
use crate::replay::record::{
    live_entries, live_header, parse_entry, push_entry, raw_expiry, Entry, ENTRY_LEN, HEADER_LEN,
    STORED_DIGEST_LEN,
};
use crate::replay::store::{on_live_bucket, ReplayOutcome};
use crate::shared_data::SharedStore;

/// The cache's decision on one live bucket; never writes.
pub fn judge_cached(
    bucket: &[u8],
    token: &TokenRef,
    ip: Option<IpAddr>,
    mode: ReplayMode,
    now: u64,
) -> Verdict {
    let owner = match (mode, ip) {
        (ReplayMode::WithIp, None) => return Verdict::MissingIp,
        (ReplayMode::WithIp, Some(ip)) => Some(normalise_ip(ip)),
        (ReplayMode::WithoutIp, _) => None,
    };
    if token.exp <= now {
        return Verdict::Expired;
    }
    let Ok(raws) = live_entries(bucket) else {
        return Verdict::Corrupt;
    };
    let key = token.stored_digest();
    for raw in raws {
        if raw_expiry(raw) <= now || raw.get(..STORED_DIGEST_LEN) != Some(key) {
            continue;
        }
        let entry = parse_entry(raw);
        return match (owner, entry.owner) {
            (Some(ip), Some(recorded)) if ip == recorded => {
                if entry.confirmed {
                    Verdict::SameOwner
                } else {
                    // The local store's own history says this IP; etcd may say another.
                    Verdict::NotKnownHere
                }
            }
            _ => Verdict::Replay,
        };
    }
    Verdict::NotKnownHere
}

/// The cached entry etcd's answer makes: `None` when it is not worth (or not safe) caching.
fn confirmed_entry(token: &TokenRef, holder: Holder) -> Option<Entry> {
    let owner: Option<Ipv6Addr> = match holder {
        Holder::Once => None,
        Holder::Ip(ip) => Some(ip),
        Holder::Unknown => return None,
    };
    let mut digest = [0u8; STORED_DIGEST_LEN];
    digest.copy_from_slice(token.stored_digest());
    Some(Entry {
        digest,
        expiry: token.exp,
        owner,
        confirmed: true,
    })
}

/// The bucket with etcd's answer recorded (and expired entries dropped), or nothing to write:
/// the token is already there (a confirmed entry, or one of the local history, which keeps
/// refusing what it refused), or the bucket is full.
fn record_confirmed(bucket: &[u8], entry: &Entry, now: u64, capacity: u32) -> Admission {
    let Ok(raws) = live_entries(bucket) else {
        return Admission::unchanged(Verdict::Corrupt);
    };
    let mut out = Vec::with_capacity(bucket.len().max(HEADER_LEN).saturating_add(ENTRY_LEN));
    out.extend_from_slice(&live_header());
    let mut live: u32 = 0;
    let mut reclaimed: u32 = 0;
    let mut upgraded = false;
    for raw in raws {
        if raw_expiry(raw) <= now {
            reclaimed = reclaimed.saturating_add(1);
            continue;
        }
        if raw.get(..STORED_DIGEST_LEN) == Some(&entry.digest[..]) {
            let found = parse_entry(raw);
            if found.confirmed || found.owner != entry.owner {
                return Admission::unchanged(Verdict::Replay);
            }
            // The local history's entry, now confirmed by etcd with the same owner.
            push_entry(&mut out, entry);
            upgraded = true;
        } else {
            out.extend_from_slice(raw);
        }
        live = live.saturating_add(1);
    }
    if !upgraded {
        if live >= capacity {
            return Admission::unchanged(Verdict::StoreFull);
        }
        push_entry(&mut out, entry);
    }
    Admission {
        verdict: Verdict::FirstUse,
        new_value: Some(out),
        reclaimed,
    }
}

/// Looks the token up in the cache (never writes).
pub fn lookup_cached(
    store: &dyn SharedStore,
    prefix: &str,
    token: TokenRef,
    ip: Option<IpAddr>,
    mode: ReplayMode,
    now: u64,
) -> ReplayOutcome {
    on_live_bucket(store, prefix, &token, |value, _| {
        Admission::unchanged(judge_cached(value, &token, ip, mode, now))
    })
}

/// Records what etcd answered, so that the next use of the token on this gateway needs no
/// round trip. Best effort: a full bucket or a failing store only costs that round trip.
pub fn remember(
    store: &dyn SharedStore,
    policy: &ReplayCachePolicy,
    prefix: &str,
    token: TokenRef,
    answer: &Answer,
    now: u64,
) -> ReplayOutcome {
    let Some(entry) = confirmed_entry(&token, answer.holder) else {
        return ReplayOutcome::none(Verdict::Replay);
    };
    on_live_bucket(store, prefix, &token, |value, buckets| {
        record_confirmed(value, &entry, now, policy.capacity_in(buckets))
    })
}
