#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::store::{count_call, Count, MAX_COUNTERS, SLOTS};
use super::*;
use crate::shared_data::{MemoryStore, SetError, SharedStore, StoreError};

const NOW: u64 = 1_800_000_000;
const S: [u8; 32] = [9; 32];

fn limit(kind: LimitKind, by: LimitKey, calls: u32, period: u32) -> CallLimit {
    CallLimit {
        kind,
        by,
        calls,
        period,
    }
}

fn store_policy(max: u64) -> CounterStorePolicy {
    CounterStorePolicy::compile(max, "limit_counters").unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn calls_up_to_the_limit_pass_then_the_window_refuses_until_it_renews() {
    let store = MemoryStore::new();
    let p = store_policy(1000);
    let l = limit(LimitKind::Rate, LimitKey::ClientIp, 3, 60);
    let id = l.counter_id(&S, "a", &Caller::Ip(ip("10.0.0.1")));
    for (i, now) in [NOW, NOW + 10, NOW + 59].into_iter().enumerate() {
        let Count::Counted(s) = count_call(&store, &p, id, 3, 60, now) else {
            panic!("call {i}")
        };
        assert_eq!(s.remaining, 2 - i as u32);
        assert_eq!(s.reset, NOW + 60 - now);
    }
    assert_eq!(
        count_call(&store, &p, id, 3, 60, NOW + 59),
        Count::Exceeded {
            limit: 3,
            retry_after: 1
        }
    );
    // A refusal writes nothing: still exceeded, with the same window.
    assert_eq!(
        count_call(&store, &p, id, 3, 60, NOW + 30),
        Count::Exceeded {
            limit: 3,
            retry_after: 30
        }
    );
    // The window renews at its end, from the first call of the next one.
    let Count::Counted(s) = count_call(&store, &p, id, 3, 60, NOW + 60) else {
        panic!()
    };
    assert_eq!((s.remaining, s.reset), (2, 60));
}

#[test]
fn callers_apis_and_kinds_count_apart() {
    let rate = limit(LimitKind::Rate, LimitKey::ClientIp, 1, 60);
    let quota = limit(LimitKind::Quota, LimitKey::ClientIp, 1, 60);
    let a = Caller::Ip(ip("10.0.0.1"));
    let b = Caller::Ip(ip("10.0.0.2"));
    let ids = [
        rate.counter_id(&S, "api1", &a),
        rate.counter_id(&S, "api1", &b),
        rate.counter_id(&S, "api2", &a),
        quota.counter_id(&S, "api1", &a),
    ];
    for (i, x) in ids.iter().enumerate() {
        for y in ids.iter().skip(i + 1) {
            assert_ne!(x, y);
        }
    }
    let key = [7u8; 32];
    let by_key = limit(LimitKind::Rate, LimitKey::SubscriptionKey, 1, 60);
    let by_sub = limit(LimitKind::Rate, LimitKey::Subject, 1, 60);
    assert_ne!(
        by_key.counter_id(&S, "api1", &Caller::Key(&key)),
        by_sub.counter_id(&S, "api1", &Caller::Subject { iss: "i", sub: "s" })
    );
    // The issuer is part of the subject: the same `sub` from two IdPs is two callers, and the
    // split between them is unambiguous.
    assert_ne!(
        by_sub.counter_id(
            &S,
            "api1",
            &Caller::Subject {
                iss: "ab",
                sub: "c"
            }
        ),
        by_sub.counter_id(
            &S,
            "api1",
            &Caller::Subject {
                iss: "a",
                sub: "bc"
            }
        )
    );
}

#[test]
fn an_ipv6_client_is_one_caller_across_its_slash_64() {
    let l = limit(LimitKind::Rate, LimitKey::ClientIp, 1, 60);
    let id = |s: &str| l.counter_id(&S, "a", &Caller::Ip(ip(s)));
    assert_eq!(id("2001:db8:1:2::1"), id("2001:db8:1:2:ffff::9"));
    assert_ne!(id("2001:db8:1:2::1"), id("2001:db8:1:3::1"));
    // An IPv4 client seen as IPv4-mapped IPv6 is the same client.
    assert_eq!(id("::ffff:10.0.0.1"), id("10.0.0.1"));
    assert_ne!(id("10.0.0.1"), id("10.0.0.2"));
}

#[test]
fn idle_counters_are_reclaimed_and_a_bucket_of_live_ones_fails_closed() {
    // One bucket: every counter shares it.
    let store = MemoryStore::new();
    let p = store_policy(1);
    assert_eq!(p.buckets(), 1);
    let l = limit(LimitKind::Rate, LimitKey::ClientIp, 5, 60);
    let ids: Vec<CounterId> = (0..=SLOTS)
        .map(|i| l.counter_id(&S, "a", &Caller::Ip(IpAddr::from([10, 0, 0, i as u8]))))
        .collect();
    for id in ids.iter().take(SLOTS) {
        assert!(matches!(
            count_call(&store, &p, *id, 5, 60, NOW),
            Count::Counted(_)
        ));
    }
    // A 33rd live caller: refused, not one of the 32 forgotten (that would reset its count).
    assert_eq!(
        count_call(&store, &p, ids[SLOTS], 5, 60, NOW + 1),
        Count::Full { retry_after: 59 }
    );
    // Once their windows end, the idle ones make room and the bucket shrinks back.
    assert!(matches!(
        count_call(&store, &p, ids[SLOTS], 5, 60, NOW + 60),
        Count::Counted(_)
    ));
    assert!(store.bytes() < 200, "{} bytes", store.bytes());
}

#[test]
fn concurrent_workers_count_every_call_exactly_once() {
    // 8 threads (workers) × 50 calls on one counter with limit 100: exactly 100 pass, every
    // round, whatever the interleaving.
    for round in 0..20 {
        let store = Arc::new(MemoryStore::new());
        let p = store_policy(1000);
        let l = limit(LimitKind::Rate, LimitKey::ClientIp, 100, 60);
        let id = l.counter_id(&S, "a", &Caller::Ip(ip("10.0.0.1")));
        let passed = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (store, passed) = (store.clone(), passed.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        match count_call(store.as_ref(), &p, id, 100, 60, NOW) {
                            Count::Counted(_) => {
                                passed.fetch_add(1, Ordering::SeqCst);
                            }
                            Count::Exceeded { .. } => {}
                            // 8 threads on a loaded machine can keep one losing 64 CAS races
                            // in a row: refused (fail closed), never counted twice.
                            Count::Unavailable => {}
                            other => panic!("{other:?}"),
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(passed.load(Ordering::SeqCst), 100, "round {round}");
    }
}

/// A store whose writes always lose the race, or always fail.
struct Hostile(Result<(), SetError>, Option<StoreError>);

impl SharedStore for Hostile {
    fn get(&self, _key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        match self.1 {
            Some(e) => Err(e),
            None => Ok(Some((vec![1], 7))),
        }
    }
    fn set(&self, _key: &str, _value: &[u8], _cas: u32) -> Result<(), SetError> {
        self.0
    }
}

#[test]
fn a_store_that_cannot_count_refuses() {
    let p = store_policy(10);
    let id = CounterId([1; 16]);
    for store in [
        Hostile(Err(SetError::CasMismatch), None),
        Hostile(Err(SetError::Other(StoreError { status: 1 })), None),
        Hostile(Ok(()), Some(StoreError { status: 2 })),
    ] {
        assert_eq!(count_call(&store, &p, id, 5, 60, NOW), Count::Unavailable);
    }
}

#[test]
fn a_bucket_this_version_did_not_write_is_started_afresh() {
    let store = MemoryStore::new();
    let p = store_policy(1);
    store.set("gateguard.limits.1.0", b"garbage", 0).unwrap();
    assert!(matches!(
        count_call(&store, &p, CounterId([1; 16]), 5, 60, NOW),
        Count::Counted(_)
    ));
}

#[test]
fn limits_and_the_store_size_are_validated() {
    let cfg = |calls, period| CallLimitConfig {
        by: LimitKey::ClientIp,
        calls,
        renewal_period_seconds: period,
    };
    let err = CallLimit::compile(&cfg(0, 60), LimitKind::Rate, "apis[0].rate_limit").unwrap_err();
    assert_eq!(err.path, "apis[0].rate_limit.calls");
    let err = CallLimit::compile(&cfg(1, 0), LimitKind::Rate, "apis[0].rate_limit").unwrap_err();
    assert_eq!(err.path, "apis[0].rate_limit.renewal_period_seconds");
    let err =
        CallLimit::compile(&cfg(1, MAX_PERIOD_SECONDS + 1), LimitKind::Quota, "q").unwrap_err();
    assert_eq!(err.path, "q.renewal_period_seconds");
    let err = CounterStorePolicy::compile(0, "limit_counters").unwrap_err();
    assert_eq!(err.path, "limit_counters.max_entries");
    assert!(CounterStorePolicy::compile(MAX_COUNTERS + 1, "limit_counters").is_err());
    assert_eq!(store_policy(100_000).buckets(), 16_384);
    assert_eq!(store_policy(100_000).max_store_bytes(), 18_890_752);
    assert_eq!(store_policy(MAX_COUNTERS).buckets(), 65_536);
}

#[test]
fn the_quota_text_is_hours_minutes_seconds() {
    assert_eq!(hh_mm_ss(0), "00:00:00");
    assert_eq!(hh_mm_ss(9), "00:00:09");
    assert_eq!(hh_mm_ss(3_661), "01:01:01");
    assert_eq!(hh_mm_ss(86_400), "24:00:00");
    assert_eq!(hh_mm_ss(30 * 86_400), "720:00:00");
}

#[test]
fn the_tighter_standing_is_the_one_with_fewer_calls_left() {
    let rate = Standing {
        limit: 10,
        remaining: 9,
        reset: 60,
    };
    let quota = Standing {
        limit: 100,
        remaining: 3,
        reset: 86_000,
    };
    assert_eq!(rate.tighter(quota), quota);
    assert_eq!(quota.tighter(rate), quota);
}

#[test]
fn counter_ids_depend_on_the_gateways_secret_which_every_worker_shares() {
    let l = limit(LimitKind::Rate, LimitKey::ClientIp, 1, 60);
    let victim = Caller::Ip(ip("192.0.2.44"));
    // Another secret, another id (and bucket): nobody outside can aim at a victim's bucket.
    assert_ne!(
        l.counter_id(&S, "a", &victim),
        l.counter_id(&[1; 32], "a", &victim)
    );
    let store = MemoryStore::new();
    let first = super::store::counter_secret(&store, [1; 32]).unwrap();
    let second = super::store::counter_secret(&store, [2; 32]).unwrap();
    assert_eq!((first, second), ([1; 32], [1; 32]));
    let random = super::store::random_secret().unwrap();
    assert_ne!(random, super::store::random_secret().unwrap());
    let failing = Hostile(Ok(()), Some(StoreError { status: 2 }));
    assert_eq!(super::store::counter_secret(&failing, [3; 32]), None);
}

#[test]
fn a_shorter_period_after_a_reload_shortens_open_windows() {
    let store = MemoryStore::new();
    let p = store_policy(1000);
    let id = CounterId([5; 16]);
    assert!(matches!(
        count_call(&store, &p, id, 1, 86_400, NOW),
        Count::Counted(_)
    ));
    assert_eq!(
        count_call(&store, &p, id, 1, 60, NOW + 10),
        Count::Exceeded {
            limit: 1,
            retry_after: 50
        }
    );
    assert!(matches!(
        count_call(&store, &p, id, 1, 60, NOW + 120),
        Count::Counted(_)
    ));
}
