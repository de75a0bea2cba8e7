//! The store's behaviour, natively, against [`MemoryStore`] (Envoy's shared-data semantics)
//! and real threads for the races. Reloads and migrations: `migration.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::shared_data::{MemoryStore, SetError, SharedStore, StoreError};
use sha2::{Digest, Sha256};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Barrier, Mutex};
use std::thread;

mod migration;

const NOW: u64 = 1_700_000_000;

fn sha(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

fn tok(name: &str, exp: u64) -> TokenRef {
    TokenRef::new(&sha(name), exp, 0)
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
    let prepared = ensure_buckets(&store, &prefix, policy.buckets()).unwrap();
    assert_eq!(prepared.created, policy.buckets());
    assert_eq!(prepared.layout, Layout::first(policy.buckets()));
    (store, prefix)
}

/// The current layout of the store under `prefix`.
fn layout_of(store: &dyn SharedStore, prefix: &str) -> Layout {
    current_layout(store, prefix).unwrap().unwrap()
}

/// The entries of a live bucket.
fn entries_of(bytes: &[u8]) -> Vec<Entry> {
    match decode(bytes).unwrap() {
        Record::Live(entries) => entries,
        Record::Sealed(to) => panic!("sealed toward {to}"),
    }
}

struct ReadyStore {
    store: MemoryStore,
    prefix: String,
    policy: ReplayCachePolicy,
}

impl ReadyStore {
    fn new(max_entries: u64) -> Self {
        let policy = policy(max_entries);
        let (store, prefix) = ready(&policy);
        Self {
            store,
            prefix,
            policy,
        }
    }

    fn check(&self, token: TokenRef, ip: Option<IpAddr>, mode: ReplayMode, now: u64) -> Verdict {
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

    fn layout(&self) -> Layout {
        layout_of(&self.store, &self.prefix)
    }

    /// The key of bucket `index` in the current layout.
    fn key(&self, index: u32) -> String {
        self.layout().bucket_key(&self.prefix, index)
    }

    fn occupancy(&self, now: u64) -> Occupancy {
        let layout = self.layout();
        occupancy(&self.store, &self.prefix, layout, 0..layout.buckets, now)
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
fn bucket_sizing_is_a_power_of_two_with_headroom_above_the_average() {
    let p = policy(1_000_000);
    assert_eq!((p.buckets(), p.capacity()), (4096, 328));
    assert_eq!(p.max_stored_entries(), 4096 * 328);
    // The hard bounds docs/operations.md gives.
    for (max, entries, tenths_of_mb) in [
        (100_000, 135_168, 55),
        (1_000_000, 1_343_488, 550),
        (10_000_000, 14_876_672, 6102),
    ] {
        let p = policy(max);
        assert_eq!(p.max_stored_entries(), entries);
        assert_eq!(p.max_store_bytes() / 100_000, tenths_of_mb);
    }
    // Small stores are one bucket: the bound is exact.
    assert_eq!((policy(3).buckets(), policy(3).capacity()), (1, 3));
    assert_eq!((policy(511).buckets(), policy(511).capacity()), (1, 511));
    assert_eq!((policy(1000).buckets(), policy(1000).capacity()), (4, 308));
    let p = policy(MAX_ENTRIES_LIMIT);
    assert_eq!((p.buckets(), p.capacity()), (65_536, 922));
    for max in [
        1,
        7,
        512,
        4097,
        999_999,
        1_000_000,
        8_388_865, // 128 entries a bucket on average: the most headroom
        12_345_678,
        MAX_ENTRIES_LIMIT,
    ] {
        let p = policy(max);
        assert!(p.buckets().is_power_of_two());
        // Room for max_entries, and a hard bound at most 1.55 times it (docs/policy.md).
        let total = p.max_stored_entries();
        assert!(total >= max && total * 100 <= max * 155, "{max}: {total}");
        assert_eq!(
            p.max_store_bytes(),
            u64::from(p.buckets()) * (HEADER_LEN + p.capacity() as usize * ENTRY_LEN) as u64
        );
    }
    // One store whatever the size: the store records its layout, not the policy.
    assert_eq!(policy(1_000_000).key_prefix("gg/"), "gg/replay/v2/");
    assert_eq!(policy(3).key_prefix("gg/"), "gg/replay/v2/");
    // The same rule over any layout a store can have (an older policy's, during a reload).
    assert_eq!(policy(1_000_000).capacity_in(4096), 328);
    assert_eq!(policy(1_000_000).capacity_in(1), 1_000_000);
    assert_eq!(policy(3).capacity_in(4096), 3);
    for buckets in [1, 2, 64, 4096, 65_536] {
        assert_eq!(
            policy(12_345).capacity_in(buckets),
            bucket_capacity(12_345, buckets)
        );
    }
    assert_eq!(policy(12_345).capacity_in(3), bucket_capacity(12_345, 3));
}

#[test]
fn bucket_capacity_follows_the_poisson_tail() {
    // Independent of the implementation: P(Poisson(m) >= c) summed term by term from k = 0.
    fn tail(m: f64, c: u32) -> f64 {
        let mut pmf = (-m).exp();
        let mut below = 0.0;
        for k in 0..c {
            below += pmf;
            pmf *= m / f64::from(k + 1);
        }
        1.0 - below
    }
    for (max, buckets) in [(1000, 4), (5000, 32), (100_000, 512), (600_000, 4096)] {
        let c = bucket_capacity(max, buckets);
        let m = max as f64 / f64::from(buckets);
        let b = f64::from(buckets);
        assert!(b * tail(m, c) <= EARLY_FULL_PROBABILITY, "{max}/{buckets}");
        assert!(
            b * tail(m, c - 1) > EARLY_FULL_PROBABILITY,
            "{max}/{buckets}"
        );
    }
    // Never more than max_entries (a bucket of a tiny store spread over a big layout).
    assert_eq!(bucket_capacity(1, 65_536), 1);
    assert_eq!(bucket_capacity(7, 1), 7);
    assert_eq!(bucket_capacity(0, 2), 0);
    // The refusal of an absurd size says what the largest store may take.
    let err = ReplayCachePolicy::compile(
        &ReplayCacheConfig {
            max_entries: MAX_ENTRIES_LIMIT + 1,
        },
        "replay_cache",
    )
    .unwrap_err();
    assert!(err.to_string().contains("may take 2477 MB"), "{err}");
}

// ---- with_ip ----

#[test]
fn with_ip_first_ip_owns_the_token_and_other_ips_are_refused() {
    let gw = ReadyStore::new(1000);
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
    let gw = ReadyStore::new(1000);
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
    let gw = ReadyStore::new(1000);
    let t = TokenRef::new(&sha("a"), NOW + 10, 60);
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
            unreadable: 0,
            ..Occupancy::default()
        }
    );
    let store = &gw.store;
    let key = gw.key(bucket_index(&t.digest, gw.policy.buckets()));
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
    let entries = entries_of(&store.get(&key).unwrap().unwrap().0);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].digest[..], other.digest[..16]);
}

#[test]
fn with_ip_without_a_client_ip_fails_closed() {
    let gw = ReadyStore::new(1000);
    let t = tok("a", NOW + 600);
    assert_eq!(gw.check(t, None, WithIp, NOW), MissingIp);
    assert!(!MissingIp.is_accepted());
    // Nothing was recorded: the token is still fresh for a request with an IP.
    assert_eq!(gw.check(t, ip("10.0.0.1"), WithIp, NOW), FirstUse);
}

// ---- without_ip ----

#[test]
fn without_ip_first_use_accepted_second_refused_whatever_the_ip() {
    let gw = ReadyStore::new(1000);
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
    let entries = entries_of(&a.new_value.unwrap());
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
    assert_eq!(entries_of(&bucket).len(), 5);
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
    assert_eq!(entries_of(&a.new_value.unwrap()).len(), 3);
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
    let gw = ReadyStore::new(3);
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
            unreadable: 0,
            ..Occupancy::default()
        }
    );
    // a, b, c live until NOW+11.
    assert_eq!(gw.check(d, None, WithoutIp, NOW + 10), StoreFull);
    let out = gw.outcome(d, None, WithoutIp, NOW + 11);
    assert_eq!((out.verdict, out.reclaimed), (FirstUse, 3));
    assert_eq!(gw.check(d, None, WithoutIp, NOW + 11), Replay);
}

#[test]
fn a_store_accepts_max_entries_tokens_and_never_holds_more_than_its_hard_bound() {
    // 128 buckets of 156 entries on average: without headroom the first bucket filled at ~78%.
    let gw = ReadyStore::new(20_000);
    let max = gw.policy.max_entries();
    let mut accepted = 0;
    while accepted < max {
        let t = tok(&format!("t{accepted}"), NOW + 600);
        assert_eq!(gw.check(t, None, WithoutIp, NOW), FirstUse, "{accepted}");
        accepted += 1;
    }
    // Past max_entries, new tokens keep coming in until some bucket is full...
    let mut offered = accepted;
    let first_full = loop {
        let t = tok(&format!("t{offered}"), NOW + 600);
        offered += 1;
        match gw.check(t, None, WithoutIp, NOW) {
            FirstUse => accepted += 1,
            StoreFull => break accepted,
            other => panic!("{other:?}"),
        }
    };
    assert!(first_full > max && first_full < gw.policy.max_stored_entries());
    // ...and however many are offered, no bucket goes past its capacity.
    for n in offered..offered + 20_000 {
        gw.check(tok(&format!("t{n}"), NOW + 600), None, WithoutIp, NOW);
    }
    let layout = gw.layout();
    let mut bytes = 0;
    for index in 0..layout.buckets {
        let value = gw.store.get(&gw.key(index)).unwrap().unwrap().0;
        assert!(entries_of(&value).len() <= gw.policy.capacity() as usize);
        bytes += value.len() as u64;
    }
    assert!(gw.occupancy(NOW).live <= gw.policy.max_stored_entries());
    assert!(bytes <= gw.policy.max_store_bytes());
}

#[test]
fn sweep_reclaims_idle_buckets() {
    let gw = ReadyStore::new(5000);
    for i in 0..100 {
        assert_eq!(
            gw.check(tok(&format!("t{i}"), NOW + i), None, WithoutIp, NOW),
            FirstUse
        );
    }
    let layout = gw.layout();
    let all = 0..layout.buckets;
    assert_eq!(
        gw.occupancy(NOW + 50),
        Occupancy {
            live: 50,
            stored: 100,
            unreadable: 0,
            ..Occupancy::default()
        }
    );
    let swept = sweep(&gw.store, &gw.prefix, layout, all.clone(), NOW + 50);
    assert_eq!((swept.live, swept.stored, swept.reclaimed), (50, 100, 50));
    assert_eq!(
        gw.occupancy(NOW + 50),
        Occupancy {
            live: 50,
            stored: 50,
            unreadable: 0,
            ..Occupancy::default()
        }
    );
    assert_eq!(
        sweep(&gw.store, &gw.prefix, layout, all, NOW + 50).reclaimed,
        0
    );
}

// ---- record format and corruption ----

#[test]
fn record_round_trips_and_a_fresh_bucket_is_the_header_alone() {
    assert_eq!(encode(&[]), b"GR\x02\x29".to_vec());
    assert_eq!(decode(&[]).unwrap(), Record::Live(vec![]));
    let entries = vec![
        Entry {
            digest: [7; 16],
            expiry: 42,
            owner: None,
            confirmed: false,
        },
        Entry {
            digest: [9; 16],
            expiry: u64::MAX,
            owner: Some(normalise_ip("192.0.2.1".parse().unwrap())),
            confirmed: false,
        },
        Entry {
            digest: [3; 16],
            expiry: 43,
            owner: None,
            confirmed: true,
        },
        Entry {
            digest: [4; 16],
            expiry: 44,
            owner: Some(normalise_ip("2001:db8::1".parse().unwrap())),
            confirmed: true,
        },
    ];
    let bytes = encode(&entries);
    assert_eq!(bytes.len(), HEADER_LEN + 4 * ENTRY_LEN);
    assert_eq!(decode(&bytes).unwrap(), Record::Live(entries));
    // The marker a migration leaves, and the pointer.
    let to = Layout {
        epoch: 7,
        buckets: 512,
    };
    let sealed = encode_sealed(to);
    assert_eq!(sealed, b"GS\x02\0\0\0\x07\0\0\x02\0".to_vec());
    assert_eq!(decode(&sealed).unwrap(), Record::Sealed(to));
    for pointer in [
        Pointer {
            current: to,
            next: None,
        },
        Pointer {
            current: to,
            next: to.successor(1),
        },
    ] {
        let bytes = pointer.encode();
        assert_eq!(bytes.len(), POINTER_LEN);
        assert_eq!(Pointer::decode(&bytes), Some(pointer));
    }
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
    // A record of the previous format (version 1) is not read as this one.
    let mut bad_version = good.clone();
    bad_version[2] = 1;
    let mut bad_flag = good.clone();
    bad_flag[HEADER_LEN + 24] = 7;
    let mut owner_without_flag = encode(&[Entry {
        digest: [1; 16],
        expiry: NOW + 9,
        owner: None,
        confirmed: true,
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
        // Seals must name a valid layout, in exactly 11 bytes.
        (b"GS\x02\0\0\0\x01\0\0\0\x03".to_vec(), CorruptBucket::Seal),
        (b"GS\x02\0\0\0\0\0\0\0\x01".to_vec(), CorruptBucket::Seal),
        (b"GS\x02\0\0\0\x01\0\x02\0\0".to_vec(), CorruptBucket::Seal),
        (
            [encode_sealed(Layout::first(4)), vec![0]].concat(),
            CorruptBucket::Seal,
        ),
    ];
    for (bytes, why) in cases {
        assert_eq!(decode(&bytes), Err(why));
        for mode in [WithIp, WithoutIp] {
            let a = admit(&bytes, &tok("b", NOW + 600), ip("10.0.0.1"), mode, NOW, 10);
            assert_eq!(a, Admission::unchanged(Corrupt));
        }
    }
    // A well-formed seal is not a live record either: admit never treats it as one.
    let a = admit(
        &encode_sealed(Layout::first(4)),
        &tok("b", NOW + 600),
        None,
        WithoutIp,
        NOW,
        10,
    );
    assert_eq!(a, Admission::unchanged(Corrupt));
    // Pointers: wrong length, magic, flag, invalid layouts, a `next` that does not follow.
    let good = Pointer {
        current: Layout::first(4),
        next: None,
    }
    .encode();
    let mut bad_flag = good.clone();
    bad_flag[11] = 2;
    let mut stray_next = good.clone();
    stray_next[15] = 4;
    let mut skip = Pointer {
        current: Layout::first(4),
        next: Layout::first(4).successor(8),
    }
    .encode();
    skip[15] = 3;
    let mut zero_buckets = good.clone();
    zero_buckets[10] = 0;
    for bad in [
        &good[..19],
        &[good.as_slice(), &[0]].concat(),
        b"GQ\x02\0\0\0\x01\0\0\0\x04\0\0\0\0\0\0\0\0\0",
        &bad_flag,
        &stray_next,
        &skip,
        &zero_buckets,
    ] {
        assert_eq!(Pointer::decode(bad), None, "{bad:?}");
    }
    // Through the store: refused, and the bucket is left as found (for the log).
    let gw = ReadyStore::new(10);
    let key = gw.key(0);
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
    // A pointer whose layout has no buckets (never the case after configuration).
    store
        .set(
            &pointer_key(&prefix),
            &Pointer {
                current: Layout::first(4),
                next: None,
            }
            .encode(),
            0,
        )
        .unwrap();
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
    assert_eq!(store.len(), 1);
}

#[test]
fn a_corrupt_pointer_or_a_backward_seal_fails_closed() {
    let gw = ReadyStore::new(1000);
    let t = tok("a", NOW + 600);
    let bucket = bucket_index(&t.digest, 4);
    // A seal that points back (or to itself) would loop: refused, nothing written.
    for target in [gw.layout(), Layout::first(8)] {
        gw.store
            .set(&gw.key(bucket), &encode_sealed(target), 0)
            .unwrap();
        assert_eq!(gw.check(t, None, WithoutIp, NOW), Corrupt);
    }
    gw.store
        .set(&pointer_key(&gw.prefix), b"nonsense", 0)
        .unwrap();
    assert_eq!(gw.check(tok("b", NOW + 600), None, WithoutIp, NOW), Corrupt);
    assert_eq!(
        ensure_buckets(&gw.store, &gw.prefix, 4),
        Err(PrepareError::CorruptPointer)
    );
}

// ---- keys, scope, collisions ----

#[test]
fn different_tokens_in_one_bucket_are_told_apart() {
    let gw = ReadyStore::new(500); // one bucket
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
    // Bytes 12..16 pick the bucket (stored, so a migration can place the entry again); two
    // tokens that differ elsewhere share a bucket and are told apart by the other stored bytes.
    let mut c = a;
    c.digest[0] ^= 1;
    assert_eq!(bucket_index(&a.digest, 4096), bucket_index(&c.digest, 4096));
    assert_eq!(
        admit(&bucket, &c, None, WithoutIp, NOW, 10).verdict,
        FirstUse
    );
}

#[test]
fn one_history_for_every_api() {
    let gw = ReadyStore::new(1000);
    let raw = sha("the same jwt");
    let t = TokenRef::new(&raw, NOW + 600, 0);
    // Spent on one `without_ip` API: spent on every other, whatever its name.
    assert_eq!(gw.check(t, None, WithoutIp, NOW), FirstUse);
    assert_eq!(gw.check(t, None, WithoutIp, NOW), Replay);
    // Owned on a `with_ip` API: the owner keeps it on every `with_ip` API.
    let u = TokenRef::new(&sha("another jwt"), NOW + 600, 0);
    assert_eq!(gw.check(u, ip("10.0.0.2"), WithIp, NOW), FirstUse);
    assert_eq!(gw.check(u, ip("10.0.0.2"), WithIp, NOW), SameOwner);
    assert_eq!(gw.check(u, ip("10.0.0.3"), WithIp, NOW), Replay);
}

#[test]
fn a_token_spent_under_one_mode_stays_spent_after_a_mode_switch() {
    let gw = ReadyStore::new(1000);
    let t = tok("a", NOW + 600);
    assert_eq!(gw.check(t, ip("10.0.0.1"), WithoutIp, NOW), FirstUse);
    assert_eq!(gw.check(t, ip("10.0.0.1"), WithIp, NOW), Replay);
    let u = tok("b", NOW + 600);
    assert_eq!(gw.check(u, ip("10.0.0.1"), WithIp, NOW), FirstUse);
    assert_eq!(gw.check(u, ip("10.0.0.1"), WithoutIp, NOW), Replay);
}

// ---- store semantics, CAS and creation ----

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
    let again = ensure_buckets(&store, &prefix, p.buckets()).unwrap();
    assert_eq!((again.created, again.migrations.len()), (0, 0));
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
        ensure_buckets(&StaleReads(&store), &prefix, p.buckets())
            .unwrap()
            .created,
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
                assert_eq!(n.layout, Layout::first(p.buckets()));
                created.fetch_add(n.created, Ordering::SeqCst);
            });
        }
    });
    assert_eq!(created.load(Ordering::SeqCst), p.buckets());
    // And one pointer.
    assert_eq!(store.len(), p.buckets() as usize + 1);
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
    let gw = ReadyStore::new(4096);
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
    let gw = ReadyStore::new(1_000_000);
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

// ---- measurements: cargo test --release -p gateguard-core replay::tests::measure -- --ignored --nocapture ----

#[test]
#[ignore]
fn measure_memory_and_cost() {
    use std::hint::black_box;
    use std::time::Instant;

    // Configuration works out the capacity of every layout size once.
    for max in [1_000_000, MAX_ENTRIES_LIMIT] {
        let started = Instant::now();
        black_box(policy(black_box(max)));
        eprintln!("compile replay_cache {max}: {:?}", started.elapsed());
    }
    // Where the first StoreFull comes, over a few sets of tokens and sizes.
    for (max, runs) in [(100_000, 5), (1_000_000, 3)] {
        let p = policy(max);
        let mut firsts = Vec::new();
        for run in 0..runs {
            let (store, prefix) = ready(&p);
            let mut accepted: u64 = 0;
            let full_at = loop {
                let t = tok(&format!("fill-{run}-{accepted}"), NOW + 3600);
                match check_and_record(&store, &p, &prefix, t, None, WithoutIp, NOW).verdict {
                    FirstUse => accepted += 1,
                    StoreFull => break accepted,
                    other => panic!("{other:?}"),
                }
            };
            firsts.push(format!("{:.1}%", full_at as f64 * 100.0 / max as f64));
        }
        eprintln!(
            "max_entries {max}: {} buckets x capacity {} (hard bound {} entries, {:.2}x); \
             first StoreFull at {} of max_entries",
            p.buckets(),
            p.capacity(),
            p.max_stored_entries(),
            p.max_stored_entries() as f64 / max as f64,
            firsts.join(", ")
        );
    }

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
    let layout = layout_of(&store, &prefix);
    let bytes_of = |store: &MemoryStore| -> usize {
        (0..p.buckets())
            .map(|i| {
                let key = layout.bucket_key(&prefix, i);
                store.get(&key).unwrap().unwrap().0.len()
            })
            .sum()
    };
    let bytes_at_first_full = bytes_of(&store);
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
    // Keep offering new tokens until every bucket is full: the hard bound, reached.
    let mut offered = accepted;
    let mut refused_in_a_row = 0;
    while refused_in_a_row < 200_000 {
        let t = tok(&format!("fill-{offered}"), NOW + 3600);
        offered += 1;
        match check_and_record(&store, &p, &prefix, t, None, WithoutIp, NOW).verdict {
            FirstUse => {
                accepted += 1;
                refused_in_a_row = 0;
            }
            StoreFull => refused_in_a_row += 1,
            other => panic!("{other:?}"),
        }
    }
    let bytes_full = bytes_of(&store);
    assert!(bytes_full as u64 <= p.max_store_bytes());
    eprintln!(
        "full store: {accepted} entries ({:.1}% of max_entries) in {bytes_full} bytes ({:.1} MB); \
         hard bound {} entries, {} bytes ({:.1} MB, {:.1} bytes per max_entries)",
        accepted as f64 / 1e4,
        bytes_full as f64 / 1e6,
        p.max_stored_entries(),
        p.max_store_bytes(),
        p.max_store_bytes() as f64 / 1e6,
        p.max_store_bytes() as f64 / p.max_entries() as f64
    );
    let started = Instant::now();
    let occ = occupancy(&store, &prefix, layout, 0..p.buckets(), NOW);
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
        ("new token (scan + 13 KB write)", fresh),
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
    let gw = ReadyStore::new(1_000_000);
    let started = Instant::now();
    for i in 0..N {
        black_box(gw.check(tok(&format!("c{i}"), NOW + 3600), None, WithoutIp, NOW));
    }
    eprintln!(
        "check_and_record on MemoryStore, sparse store: {:?}/call",
        started.elapsed() / N
    );
}
