//! The etcd store natively: messages as etcd reads them, leases, every turn of the exchange,
//! the cache's truth table, and a model etcd (a map applying the real encoded transactions the
//! way etcd does) behind several replicas, to show the cache never accepts what etcd would
//! refuse. The real etcd is in tests/test_etcd_replay.py.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use super::proto::*;
use super::*;
use crate::replay::{
    check_and_record, ensure_buckets, ReplayCacheConfig, ReplayCachePolicy, ReplayMode, TokenRef,
    Verdict,
};
use crate::shared_data::MemoryStore;

const NOW: u64 = 1_700_000_000;
const PREFIX: &str = "/gateguard/replay/";

fn tok(name: &str, exp: u64) -> TokenRef {
    TokenRef::new(&Sha256::digest(name.as_bytes()).into(), exp, 600)
}

fn ip(text: &str) -> Option<IpAddr> {
    Some(text.parse().unwrap())
}

fn check(name: &str, mode: ReplayMode, from: Option<&str>) -> RemoteCheck {
    RemoteCheck {
        token: tok(name, NOW + 3600),
        mode,
        ip: from.map(|f| f.parse().unwrap()),
    }
}

fn send(step: &Step) -> &Outgoing {
    match step {
        Step::Send(out) => out,
        Step::Done(r) => panic!("expected a call, got {r:?}"),
    }
}

fn done(step: Step) -> Result<Answer, Failure> {
    match step {
        Step::Done(r) => r,
        Step::Send(out) => panic!("expected the end, got a call to {:?}", out.call),
    }
}

// ---- what goes on the wire ----

#[test]
fn the_first_use_transaction_is_create_revision_zero_then_put_with_the_lease_else_read() {
    let c = check("t", ReplayMode::WithIp, Some("::ffff:10.1.2.3"));
    let mut session = Session::default();
    let lease = Lease::for_token(PREFIX, &c.token);
    session.leases.insert(lease.window_end, lease.id);
    let (_, step) = Exchange::start(c, PREFIX, 250, NOW * 1000, &mut session);
    let out = send(&step);
    assert_eq!((out.service, out.method), ("etcdserverpb.KV", "Txn"));
    let _ = lease;
    let txn = TxnRequest::decode(out.message.as_slice()).unwrap();
    let key = c.key(PREFIX);
    assert_eq!(key.len(), PREFIX.len() + 64);
    assert!(key.starts_with(PREFIX.as_bytes()));
    assert_eq!(
        txn.compare,
        vec![Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Create as i32,
            key: key.clone(),
            // Present on the wire, not an absent proto3 default.
            target_union: Some(compare::TargetUnion::CreateRevision(0)),
        }]
    );
    assert_eq!(
        txn.success,
        vec![RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.clone(),
                // IPv4-mapped IPv6 is the IPv4 client.
                value: b"ip:10.1.2.3".to_vec(),
                lease: lease.id,
            }))
        }]
    );
    assert_eq!(
        txn.failure,
        vec![RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest { key }))
        }]
    );
    // The raw bytes carry field 5 (create_revision) = 0 inside the compare.
    assert!(out.message.windows(2).any(|w| w == [0x28, 0x00]));
}

#[test]
fn owner_values_and_keys() {
    assert_eq!(
        check("t", ReplayMode::WithoutIp, Some("10.0.0.1")).owner_value(),
        b"once"
    );
    assert_eq!(
        check("t", ReplayMode::WithIp, Some("2001:db8::1")).owner_value(),
        b"ip:2001:db8::1"
    );
    assert_eq!(
        check("t", ReplayMode::WithIp, Some("10.0.0.1")).owner_value(),
        b"ip:10.0.0.1"
    );
    // One history: the key is the token's, whatever the mode or client.
    assert_eq!(
        check("t", ReplayMode::WithIp, Some("10.0.0.1")).key(PREFIX),
        check("t", ReplayMode::WithoutIp, None).key(PREFIX)
    );
    assert_ne!(
        check("t", ReplayMode::WithoutIp, None).key(PREFIX),
        check("u", ReplayMode::WithoutIp, None).key(PREFIX)
    );
}

#[test]
fn leases_cover_the_token_and_are_shared_per_window() {
    let t = tok("t", NOW + 3600);
    // The entry's expiry: exp + 600 s skew + 1.
    assert_eq!(t.exp, NOW + 3600 + 601);
    let lease = Lease::for_token(PREFIX, &t);
    assert!(lease.window_end >= t.exp && lease.window_end < t.exp + LEASE_WINDOW_SECONDS);
    assert_eq!(lease.window_end % LEASE_WINDOW_SECONDS, 0);
    // Granted to the window's end plus a minute for a gateway whose clock runs ahead.
    assert_eq!(
        lease.ttl(NOW),
        (lease.window_end - NOW + LEASE_SLACK_SECONDS) as i64
    );
    assert_eq!(lease.needed(NOW), (lease.window_end - NOW) as i64);
    assert!(lease.id > 0);
    // Every token ending in the same window, on every replica, uses the same lease...
    let same_window: HashSet<i64> = (0..200)
        .map(|i| {
            TokenRef::new(
                &[i as u8; 32],
                lease.window_end - 601 - (i % LEASE_WINDOW_SECONDS),
                600,
            )
        })
        .map(|t| Lease::for_token(PREFIX, &t).id)
        .collect();
    assert_eq!(same_window, HashSet::from([lease.id]));
    // ...another window or another prefix another one.
    let next = TokenRef::new(&[0; 32], lease.window_end - 600, 600);
    assert_eq!(
        Lease::for_token(PREFIX, &next).window_end,
        lease.window_end + LEASE_WINDOW_SECONDS
    );
    assert_ne!(Lease::for_token(PREFIX, &next).id, lease.id);
    assert_ne!(Lease::for_token("/other/", &t).id, lease.id);
    // An expiry already on a window's end is that window.
    let exact = TokenRef::new(&[0; 32], 6000 - 601, 600);
    assert_eq!(Lease::for_token(PREFIX, &exact).window_end, 6000);
    // TTLs stay in etcd's range whatever the token says.
    let far = TokenRef::new(&[0; 32], u64::MAX, 600);
    assert_eq!(Lease::for_token(PREFIX, &far).ttl(NOW), MAX_LEASE_TTL);
    assert_eq!(lease.needed(lease.window_end + 5), 1);
}

// ---- the exchange, turn by turn ----

fn grant_ok(out: &Outgoing) -> Vec<u8> {
    let req = LeaseGrantRequest::decode(out.message.as_slice()).unwrap();
    LeaseGrantResponse {
        header: None,
        id: req.id,
        ttl: req.ttl,
        error: String::new(),
    }
    .encode_to_vec()
}

fn txn_created() -> Vec<u8> {
    TxnResponse {
        header: None,
        succeeded: true,
        responses: vec![],
    }
    .encode_to_vec()
}

fn txn_existing(c: &RemoteCheck, value: &[u8]) -> Vec<u8> {
    TxnResponse {
        header: None,
        succeeded: false,
        responses: vec![ResponseOp {
            response: Some(response_op::Response::ResponseRange(RangeResponse {
                header: None,
                kvs: vec![KeyValue {
                    key: c.key(PREFIX),
                    create_revision: 7,
                    mod_revision: 7,
                    version: 1,
                    value: value.to_vec(),
                    lease: 1,
                }],
                more: false,
                count: 1,
            })),
        }],
    }
    .encode_to_vec()
}

#[test]
fn a_worker_grants_each_window_once_then_goes_straight_to_the_transaction() {
    let c = check("t", ReplayMode::WithoutIp, None);
    let mut session = Session::default();
    let (mut x, step) = Exchange::start(c, PREFIX, 250, NOW * 1000, &mut session);
    let out = send(&step).clone();
    assert_eq!(out.call, Call::LeaseGrant);
    let grant = LeaseGrantRequest::decode(out.message.as_slice()).unwrap();
    let lease = Lease::for_token(PREFIX, &c.token);
    assert_eq!((grant.id, grant.ttl), (lease.id, lease.ttl(NOW)));
    let step = x.on_response(0, "", &grant_ok(&out), NOW * 1000 + 5, &mut session);
    assert_eq!(send(&step).call, Call::Txn);
    assert_eq!(
        send(&step).timeout_ms,
        245,
        "the budget is for the whole request"
    );
    let answer = done(x.on_response(0, "", &txn_created(), NOW * 1000 + 9, &mut session)).unwrap();
    assert_eq!(answer.verdict, Verdict::FirstUse);
    assert_eq!(answer.holder, Holder::Once);
    // The next token of the window: one call.
    let c2 = RemoteCheck {
        token: TokenRef::new(&[5; 32], c.token.exp - 601, 600),
        ..c
    };
    let (mut x, step) = Exchange::start(c2, PREFIX, 250, NOW * 1000 + 20, &mut session);
    assert_eq!(send(&step).call, Call::Txn);
    let answer = done(x.on_response(
        0,
        "",
        &txn_existing(&c2, b"once"),
        NOW * 1000 + 25,
        &mut session,
    ))
    .unwrap();
    assert_eq!(answer.verdict, Verdict::Replay);
}

#[test]
fn a_lease_another_replica_granted_first_is_used_and_a_lost_lease_is_granted_again_once() {
    let c = check("t", ReplayMode::WithoutIp, None);
    let mut session = Session::default();
    let (mut x, step) = Exchange::start(c, PREFIX, 250, NOW * 1000, &mut session);
    assert_eq!(send(&step).call, Call::LeaseGrant);
    let step = x.on_response(
        status::FAILED_PRECONDITION,
        "etcdserver: lease already exists",
        &[],
        NOW * 1000 + 1,
        &mut session,
    );
    // Used once it shows it lives long enough.
    let out = send(&step).clone();
    assert_eq!(out.call, Call::LeaseTimeToLive);
    let lease = Lease::for_token(PREFIX, &c.token);
    assert_eq!(
        LeaseTimeToLiveRequest::decode(out.message.as_slice())
            .unwrap()
            .id,
        lease.id
    );
    let ttl = |ttl| {
        LeaseTimeToLiveResponse {
            header: None,
            id: lease.id,
            ttl,
            granted_ttl: 0,
        }
        .encode_to_vec()
    };
    let step = x.on_response(0, "", &ttl(lease.needed(NOW)), NOW * 1000 + 2, &mut session);
    assert_eq!(send(&step).call, Call::Txn);
    // etcd lost the lease (restored from an old snapshot): grant, then the transaction again.
    let step = x.on_response(
        status::NOT_FOUND,
        "etcdserver: requested lease not found",
        &[],
        NOW * 1000 + 2,
        &mut session,
    );
    let out = send(&step).clone();
    assert_eq!(out.call, Call::LeaseGrant);
    let step = x.on_response(0, "", &grant_ok(&out), NOW * 1000 + 3, &mut session);
    assert_eq!(send(&step).call, Call::Txn);
    let _ = ttl;
    // Only once per request.
    let failure = done(x.on_response(
        status::NOT_FOUND,
        "etcdserver: requested lease not found",
        &[],
        NOW * 1000 + 4,
        &mut session,
    ))
    .unwrap_err();
    assert!(
        matches!(
            failure,
            Failure::Status {
                call: Call::Txn,
                status: 5,
                ..
            }
        ),
        "{failure:?}"
    );
    assert!(!failure.is_timeout());
}

/// Anyone who may grant leases on that etcd can predict a window's lease ID and create it with a
/// short life first: keys put with it would vanish early, and spent tokens with them.
#[test]
fn a_lease_that_exists_but_ends_too_soon_is_not_used() {
    let c = check("t", ReplayMode::WithoutIp, None);
    let lease = Lease::for_token(PREFIX, &c.token);
    let mut etcd = ModelEtcd {
        now: NOW,
        ..ModelEtcd::default()
    };
    etcd.leases.insert(lease.id, NOW + 5); // squatted
    let (store, prefix, policy) = cache(1000);
    let mut r = Replica {
        store,
        prefix,
        policy,
        session: Session::default(),
    };
    assert_eq!(decide(&mut r, &mut etcd, c), (Verdict::FirstUse, false));
    let (_, own) = etcd
        .kv
        .values()
        .next()
        .map(|(v, l)| (v.clone(), *l))
        .unwrap();
    assert_ne!(own, lease.id, "the key must not ride on the squatted lease");
    assert!(etcd.leases[&own] >= lease.window_end);
    etcd.now = NOW + 6;
    let (store, prefix, policy) = cache(1000);
    let mut fresh = Replica {
        store,
        prefix,
        policy,
        session: Session::default(),
    };
    assert_eq!(
        decide(&mut fresh, &mut etcd, c),
        (Verdict::Replay, false),
        "still spent after the squatted lease ended"
    );
    // The worker remembers its own lease for the window: one call next time.
    assert_eq!(r.session.leases.get(&lease.window_end), Some(&own));
}

#[test]
fn credentials_authenticate_once_per_worker_and_again_when_etcd_forgets_the_token() {
    let c = check("t", ReplayMode::WithoutIp, None);
    let mut session = Session::new(Some(("gw".into(), "s3cret".into())));
    let lease = Lease::for_token(PREFIX, &c.token);
    session.leases.insert(lease.window_end, lease.id);
    let (mut x, step) = Exchange::start(c, PREFIX, 250, NOW * 1000, &mut session);
    let out = send(&step).clone();
    assert_eq!(
        (out.call, out.service, out.method),
        (Call::Authenticate, "etcdserverpb.Auth", "Authenticate")
    );
    let auth = AuthenticateRequest::decode(out.message.as_slice()).unwrap();
    assert_eq!(
        (auth.name.as_str(), auth.password.as_str()),
        ("gw", "s3cret")
    );
    let token = AuthenticateResponse {
        header: None,
        token: "tok.1".into(),
    }
    .encode_to_vec();
    let step = x.on_response(0, "", &token, NOW * 1000 + 1, &mut session);
    assert_eq!(send(&step).call, Call::Txn);
    assert_eq!(session.token(), Some("tok.1"));
    // Expired token: authenticate again, once.
    let step = x.on_response(
        status::UNAUTHENTICATED,
        "etcdserver: invalid auth token",
        &[],
        NOW * 1000 + 2,
        &mut session,
    );
    assert_eq!(send(&step).call, Call::Authenticate);
    assert_eq!(session.token(), None);
    let token = AuthenticateResponse {
        header: None,
        token: "tok.2".into(),
    }
    .encode_to_vec();
    let step = x.on_response(0, "", &token, NOW * 1000 + 3, &mut session);
    assert_eq!(send(&step).call, Call::Txn);
    let failure = done(x.on_response(
        status::UNAUTHENTICATED,
        "etcdserver: invalid auth token",
        &[],
        NOW * 1000 + 4,
        &mut session,
    ))
    .unwrap_err();
    assert!(matches!(failure, Failure::Status { status: 16, .. }));
    // Wrong password: no decision, and the password is in no message.
    let mut session = Session::new(Some(("gw".into(), "wrong-pass".into())));
    let (mut x, _) = Exchange::start(c, PREFIX, 250, NOW * 1000, &mut session);
    let failure = done(x.on_response(
        3,
        "etcdserver: authentication failed, invalid user ID or password",
        &[],
        NOW * 1000 + 1,
        &mut session,
    ))
    .unwrap_err();
    assert!(!failure.describe().contains("wrong-pass"));
    assert_eq!(session.token(), None);
}

#[test]
fn time_runs_out_for_the_whole_request_not_per_call() {
    let c = check("t", ReplayMode::WithoutIp, None);
    let mut session = Session::default();
    let (mut x, step) = Exchange::start(c, PREFIX, 100, NOW * 1000, &mut session);
    let out = send(&step).clone();
    assert_eq!(out.timeout_ms, 100);
    // The grant took the whole budget: no transaction is sent.
    let failure =
        done(x.on_response(0, "", &grant_ok(&out), NOW * 1000 + 100, &mut session)).unwrap_err();
    assert!(failure.is_timeout(), "{failure:?}");
    // Envoy's own timeout.
    let (mut x, _) = Exchange::start(c, PREFIX, 100, NOW * 1000, &mut session);
    let f = done(x.on_response(
        status::DEADLINE_EXCEEDED,
        "timeout",
        &[],
        NOW * 1000 + 100,
        &mut session,
    ))
    .unwrap_err();
    assert!(f.is_timeout());
    // Envoy's own way of saying so, and its timer a little ahead of our clock.
    let (mut x, _) = Exchange::start(c, PREFIX, 100, NOW * 1000, &mut Session::default());
    let f = done(x.on_response(
        14,
        "upstream request timeout{response_timeout}",
        &[],
        NOW * 1000 + 60,
        &mut session,
    ))
    .unwrap_err();
    assert!(f.is_timeout(), "{f:?}");
    let (mut x, _) = Exchange::start(c, PREFIX, 100, NOW * 1000, &mut Session::default());
    let f =
        done(x.on_response(14, "upstream reset", &[], NOW * 1000 + 98, &mut session)).unwrap_err();
    assert!(f.is_timeout(), "{f:?}");
    // A connection refused early is an error, not a timeout.
    let (mut x, _) = Exchange::start(c, PREFIX, 100, NOW * 1000, &mut session);
    let f = done(x.on_response(
        14,
        "upstream connect error",
        &[],
        NOW * 1000 + 3,
        &mut session,
    ))
    .unwrap_err();
    assert!(matches!(f, Failure::Status { status: 14, .. }));
    // Not even sent.
    let (mut x, _) = Exchange::start(c, PREFIX, 100, NOW * 1000, &mut Session::default());
    assert!(matches!(
        done(x.not_sent()),
        Err(Failure::NotSent {
            call: Call::LeaseGrant
        })
    ));
}

#[test]
fn answers_that_are_not_etcds_decide_nothing() {
    let c = check("t", ReplayMode::WithIp, Some("10.0.0.1"));
    let lease = Lease::for_token(PREFIX, &c.token);
    let run = |body: &[u8]| {
        let mut session = Session::default();
        session.leases.insert(lease.window_end, lease.id);
        let (mut x, _) = Exchange::start(c, PREFIX, 250, NOW * 1000, &mut session);
        done(x.on_response(0, "", body, NOW * 1000 + 1, &mut session))
    };
    let no_kvs = TxnResponse {
        header: None,
        succeeded: false,
        responses: vec![ResponseOp {
            response: Some(response_op::Response::ResponseRange(
                RangeResponse::default(),
            )),
        }],
    }
    .encode_to_vec();
    let other_key = txn_existing(&check("u", ReplayMode::WithIp, None), b"ip:10.0.0.1");
    let no_read = TxnResponse {
        header: None,
        succeeded: false,
        responses: vec![],
    }
    .encode_to_vec();
    for body in [b"\xff\xff\xff".to_vec(), no_kvs, other_key, no_read] {
        assert!(
            matches!(run(&body), Err(Failure::BadAnswer { .. })),
            "{body:?}"
        );
    }
    // A grant of another lease than asked for.
    let mut session = Session::default();
    let (mut x, _) = Exchange::start(c, PREFIX, 250, NOW * 1000, &mut session);
    let wrong = LeaseGrantResponse {
        header: None,
        id: lease.id ^ 1,
        ttl: 60,
        error: String::new(),
    }
    .encode_to_vec();
    assert!(matches!(
        done(x.on_response(0, "", &wrong, NOW * 1000 + 1, &mut session)),
        Err(Failure::BadAnswer { .. })
    ));
    assert!(session.leases.is_empty());
}

#[test]
#[allow(clippy::type_complexity)]
fn existing_values_decide_by_mode_and_owner() {
    let cases: [(ReplayMode, Option<&str>, &[u8], Verdict, Holder); 8] = [
        (
            ReplayMode::WithoutIp,
            None,
            b"once",
            Verdict::Replay,
            Holder::Once,
        ),
        (
            ReplayMode::WithoutIp,
            None,
            b"ip:10.0.0.1",
            Verdict::Replay,
            Holder::Ip(normalise("10.0.0.1")),
        ),
        (
            ReplayMode::WithIp,
            Some("10.0.0.1"),
            b"ip:10.0.0.1",
            Verdict::SameOwner,
            Holder::Ip(normalise("10.0.0.1")),
        ),
        (
            ReplayMode::WithIp,
            Some("::ffff:10.0.0.1"),
            b"ip:10.0.0.1",
            Verdict::SameOwner,
            Holder::Ip(normalise("10.0.0.1")),
        ),
        (
            ReplayMode::WithIp,
            Some("10.0.0.2"),
            b"ip:10.0.0.1",
            Verdict::Replay,
            Holder::Ip(normalise("10.0.0.1")),
        ),
        (
            ReplayMode::WithIp,
            Some("10.0.0.1"),
            b"once",
            Verdict::Replay,
            Holder::Once,
        ),
        (
            ReplayMode::WithIp,
            Some("10.0.0.1"),
            b"ip:10.0.0.1 ",
            Verdict::Replay,
            Holder::Unknown,
        ),
        (
            ReplayMode::WithIp,
            Some("10.0.0.1"),
            b"",
            Verdict::Replay,
            Holder::Unknown,
        ),
    ];
    for (mode, from, value, verdict, holder) in cases {
        let c = check("t", mode, from);
        let mut session = Session::default();
        let lease = Lease::for_token(PREFIX, &c.token);
        session.leases.insert(lease.window_end, lease.id);
        let (mut x, _) = Exchange::start(c, PREFIX, 250, NOW * 1000, &mut session);
        let answer = done(x.on_response(
            0,
            "",
            &txn_existing(&c, value),
            NOW * 1000 + 1,
            &mut session,
        ))
        .unwrap();
        assert_eq!(
            (answer.verdict, answer.holder),
            (verdict, holder),
            "{mode:?} {from:?} {value:?}"
        );
    }
}

fn normalise(text: &str) -> std::net::Ipv6Addr {
    crate::replay::normalise_ip(text.parse().unwrap())
}

// ---- the cache ----

fn cache_policy(max_entries: u64) -> ReplayCachePolicy {
    ReplayCachePolicy::compile(&ReplayCacheConfig { max_entries }, "replay_cache").unwrap()
}

fn cache(max_entries: u64) -> (MemoryStore, String, ReplayCachePolicy) {
    let policy = cache_policy(max_entries);
    let store = MemoryStore::new();
    let prefix = policy.key_prefix("gateguard/");
    ensure_buckets(&store, &prefix, policy.buckets()).unwrap();
    (store, prefix, policy)
}

fn answer(verdict: Verdict, holder: Holder) -> Answer {
    Answer { verdict, holder }
}

#[test]
fn the_cache_accepts_only_what_etcd_confirmed_for_this_ip() {
    use ReplayMode::{WithIp, WithoutIp};
    let (store, prefix, policy) = cache(1000);
    let t = tok("t", NOW + 600);
    let look = |from: Option<&str>, mode| {
        lookup_cached(
            &store,
            &prefix,
            t,
            from.map(|f| f.parse().unwrap()),
            mode,
            NOW,
        )
        .verdict
    };
    assert_eq!(look(Some("10.0.0.1"), WithIp), Verdict::NotKnownHere);
    assert_eq!(look(None, WithoutIp), Verdict::NotKnownHere);
    assert_eq!(look(None, WithIp), Verdict::MissingIp);
    remember(
        &store,
        &policy,
        &prefix,
        t,
        &answer(Verdict::FirstUse, Holder::Ip(normalise("10.0.0.1"))),
        NOW,
    );
    assert_eq!(look(Some("10.0.0.1"), WithIp), Verdict::SameOwner);
    assert_eq!(look(Some("::ffff:10.0.0.1"), WithIp), Verdict::SameOwner);
    assert_eq!(look(Some("10.0.0.2"), WithIp), Verdict::Replay);
    assert_eq!(look(None, WithoutIp), Verdict::Replay);
    // Past its expiry the cache forgets (etcd's lease ends no earlier).
    let later = lookup_cached(&store, &prefix, t, ip("10.0.0.1"), WithIp, t.exp).verdict;
    assert_eq!(later, Verdict::Expired);
}

#[test]
fn the_local_history_refuses_but_never_accepts_and_is_upgraded_only_by_a_matching_answer() {
    use ReplayMode::{WithIp, WithoutIp};
    let (store, prefix, policy) = cache(1000);
    let t = tok("t", NOW + 600);
    // Recorded while the gateway ran the local store.
    let local = check_and_record(&store, &policy, &prefix, t, ip("10.0.0.1"), WithIp, NOW);
    assert_eq!(local.verdict, Verdict::FirstUse);
    let look = |from: &str, mode| lookup_cached(&store, &prefix, t, ip(from), mode, NOW).verdict;
    assert_eq!(
        look("10.0.0.1", WithIp),
        Verdict::NotKnownHere,
        "etcd may know another owner"
    );
    assert_eq!(look("10.0.0.9", WithIp), Verdict::Replay);
    assert_eq!(look("10.0.0.1", WithoutIp), Verdict::Replay);
    // etcd says another IP owns it: the local entry stays (both are refused from here on).
    remember(
        &store,
        &policy,
        &prefix,
        t,
        &answer(Verdict::Replay, Holder::Ip(normalise("10.0.0.9"))),
        NOW,
    );
    assert_eq!(look("10.0.0.1", WithIp), Verdict::NotKnownHere);
    assert_eq!(look("10.0.0.9", WithIp), Verdict::Replay);
    // etcd agrees: confirmed.
    remember(
        &store,
        &policy,
        &prefix,
        t,
        &answer(Verdict::SameOwner, Holder::Ip(normalise("10.0.0.1"))),
        NOW,
    );
    assert_eq!(look("10.0.0.1", WithIp), Verdict::SameOwner);
    // A value gateguard does not write is never cached.
    let u = tok("u", NOW + 600);
    remember(
        &store,
        &policy,
        &prefix,
        u,
        &answer(Verdict::Replay, Holder::Unknown),
        NOW,
    );
    assert_eq!(
        lookup_cached(&store, &prefix, u, None, WithoutIp, NOW).verdict,
        Verdict::NotKnownHere
    );
}

#[test]
fn a_full_cache_costs_a_round_trip_never_a_refusal() {
    use ReplayMode::WithoutIp;
    let (store, prefix, policy) = cache(2);
    for name in ["a", "b", "c"] {
        let t = tok(name, NOW + 600);
        remember(
            &store,
            &policy,
            &prefix,
            t,
            &answer(Verdict::FirstUse, Holder::Once),
            NOW,
        );
    }
    let verdicts: Vec<Verdict> = ["a", "b", "c"]
        .iter()
        .map(|n| lookup_cached(&store, &prefix, tok(n, NOW + 600), None, WithoutIp, NOW).verdict)
        .collect();
    assert_eq!(
        verdicts,
        [Verdict::Replay, Verdict::Replay, Verdict::NotKnownHere]
    );
}

// ---- a model etcd behind several replicas ----

/// etcd as the replay store uses it: keys with leases, leases that expire, Txn with a
/// create-revision compare, LeaseGrant with a chosen ID, Authenticate. It decodes the bytes
/// the exchange really sends and answers with etcd's messages and status codes.
#[derive(Default)]
struct ModelEtcd {
    kv: HashMap<Vec<u8>, (Vec<u8>, i64)>,
    leases: HashMap<i64, u64>,
    now: u64,
}

impl ModelEtcd {
    fn expire(&mut self) {
        let now = self.now;
        let dead: HashSet<i64> = self
            .leases
            .iter()
            .filter(|(_, &end)| end <= now)
            .map(|(&id, _)| id)
            .collect();
        self.leases.retain(|id, _| !dead.contains(id));
        self.kv.retain(|_, (_, lease)| !dead.contains(lease));
    }

    fn call(&mut self, out: &Outgoing) -> (u32, Vec<u8>) {
        self.expire();
        match out.call {
            Call::Authenticate => (
                0,
                AuthenticateResponse {
                    header: None,
                    token: "t".into(),
                }
                .encode_to_vec(),
            ),
            Call::LeaseGrant => {
                let req = LeaseGrantRequest::decode(out.message.as_slice()).unwrap();
                if self.leases.contains_key(&req.id) {
                    return (status::FAILED_PRECONDITION, vec![]);
                }
                let id = if req.id == 0 {
                    1_000_000 + self.leases.len() as i64
                } else {
                    req.id
                };
                self.leases.insert(id, self.now + req.ttl as u64);
                (
                    0,
                    LeaseGrantResponse {
                        header: None,
                        id,
                        ttl: req.ttl,
                        error: String::new(),
                    }
                    .encode_to_vec(),
                )
            }
            Call::LeaseTimeToLive => {
                let req = LeaseTimeToLiveRequest::decode(out.message.as_slice()).unwrap();
                let ttl = self
                    .leases
                    .get(&req.id)
                    .map_or(-1, |end| end.saturating_sub(self.now) as i64);
                let response = LeaseTimeToLiveResponse {
                    header: None,
                    id: req.id,
                    ttl,
                    granted_ttl: ttl,
                };
                (0, response.encode_to_vec())
            }
            Call::Txn => {
                let req = TxnRequest::decode(out.message.as_slice()).unwrap();
                let ok = req.compare.iter().all(|c| {
                    assert_eq!(
                        (c.target, c.result),
                        (CompareTarget::Create as i32, CompareResult::Equal as i32)
                    );
                    let Some(compare::TargetUnion::CreateRevision(rev)) = c.target_union else {
                        panic!()
                    };
                    assert_eq!(rev, 0);
                    !self.kv.contains_key(&c.key)
                });
                let ops = if ok { &req.success } else { &req.failure };
                let mut responses = vec![];
                for op in ops {
                    match op.request.as_ref().unwrap() {
                        request_op::Request::RequestPut(put) => {
                            if !self.leases.contains_key(&put.lease) {
                                return (status::NOT_FOUND, vec![]);
                            }
                            self.kv
                                .insert(put.key.clone(), (put.value.clone(), put.lease));
                            responses.push(ResponseOp {
                                response: Some(response_op::Response::ResponsePut(PutResponse {
                                    header: None,
                                })),
                            });
                        }
                        request_op::Request::RequestRange(range) => {
                            let kvs = self.kv.get(&range.key).map(|(value, lease)| KeyValue {
                                key: range.key.clone(),
                                create_revision: 1,
                                mod_revision: 1,
                                version: 1,
                                value: value.clone(),
                                lease: *lease,
                            });
                            responses.push(ResponseOp {
                                response: Some(response_op::Response::ResponseRange(
                                    RangeResponse {
                                        header: None,
                                        count: kvs.iter().len() as i64,
                                        kvs: kvs.into_iter().collect(),
                                        more: false,
                                    },
                                )),
                            });
                        }
                    }
                }
                (
                    0,
                    TxnResponse {
                        header: None,
                        succeeded: ok,
                        responses,
                    }
                    .encode_to_vec(),
                )
            }
        }
    }

    /// What etcd would answer a fresh first-use transaction for this check now, without
    /// changing anything: accepted or not.
    fn would_accept(&mut self, c: &RemoteCheck) -> bool {
        self.expire();
        match self.kv.get(&c.key(PREFIX)) {
            None => true,
            Some((value, _)) => c.mode == ReplayMode::WithIp && *value == c.owner_value(),
        }
    }
}

struct Replica {
    store: MemoryStore,
    prefix: String,
    policy: ReplayCachePolicy,
    session: Session,
}

/// One request through a replica: its cache, then etcd. `(verdict, decided by the cache)`.
fn decide(r: &mut Replica, etcd: &mut ModelEtcd, c: RemoteCheck) -> (Verdict, bool) {
    let now = etcd.now;
    let cached = lookup_cached(&r.store, &r.prefix, c.token, c.ip, c.mode, now).verdict;
    if cached != Verdict::NotKnownHere {
        return (cached, true);
    }
    let (mut x, mut step) = Exchange::start(c, PREFIX, 250, now * 1000, &mut r.session);
    for _ in 0..10 {
        match step {
            Step::Send(out) => {
                let (status, body) = etcd.call(&out);
                step = x.on_response(status, "", &body, now * 1000, &mut r.session);
            }
            Step::Done(result) => {
                let answer = result.unwrap();
                remember(&r.store, &r.policy, &r.prefix, c.token, &answer, now);
                return (answer.verdict, false);
            }
        }
    }
    panic!("the exchange did not end");
}

#[test]
fn the_cache_never_accepts_what_etcd_would_refuse_across_replicas_restarts_and_expiry() {
    let ips = ["10.0.0.1", "10.0.0.2", "::ffff:10.0.0.2", "2001:db8::7"];
    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut etcd = ModelEtcd {
            now: NOW,
            ..ModelEtcd::default()
        };
        let mut replicas: Vec<Replica> = (0..3)
            .map(|_| {
                let (store, prefix, policy) = cache(if rng.gen_bool(0.3) { 4 } else { 1000 });
                Replica {
                    store,
                    prefix,
                    policy,
                    session: Session::default(),
                }
            })
            .collect();
        let tokens: Vec<(String, u64)> = (0..8)
            .map(|i| (format!("s{seed}t{i}"), NOW + rng.gen_range(1..900)))
            .collect();
        // Some replicas ran the local store before: their history has entries etcd never saw.
        for r in &replicas {
            for (name, exp) in &tokens {
                if rng.gen_bool(0.2) {
                    let mode = if rng.gen_bool(0.5) {
                        ReplayMode::WithIp
                    } else {
                        ReplayMode::WithoutIp
                    };
                    let from = ip(ips[rng.gen_range(0..ips.len())]);
                    check_and_record(
                        &r.store,
                        &r.policy,
                        &r.prefix,
                        tok(name, *exp),
                        from,
                        mode,
                        NOW,
                    );
                }
            }
        }
        let mut once_accepted: HashMap<String, u32> = HashMap::new();
        let mut owners: HashMap<String, HashSet<std::net::Ipv6Addr>> = HashMap::new();
        for _ in 0..400 {
            etcd.now += rng.gen_range(0..4);
            if rng.gen_bool(0.01) {
                // A restart: the replica's shared data is gone, its session too.
                let i = rng.gen_range(0..replicas.len());
                let (store, prefix, policy) = cache(1000);
                replicas[i] = Replica {
                    store,
                    prefix,
                    policy,
                    session: Session::default(),
                };
            }
            let (name, exp) = &tokens[rng.gen_range(0..tokens.len())];
            let mode = if rng.gen_bool(0.5) {
                ReplayMode::WithIp
            } else {
                ReplayMode::WithoutIp
            };
            let c = RemoteCheck {
                token: tok(name, *exp),
                mode,
                ip: ip(ips[rng.gen_range(0..ips.len())]),
            };
            if c.token.exp <= etcd.now {
                continue;
            }
            let r = rng.gen_range(0..replicas.len());
            let etcd_would = etcd.would_accept(&c);
            let (verdict, by_cache) = decide(&mut replicas[r], &mut etcd, c);
            if by_cache && verdict.is_accepted() {
                assert!(
                    etcd_would,
                    "seed {seed}: the cache accepted {c:?} that etcd refuses"
                );
            }
            if verdict.is_accepted() {
                match mode {
                    ReplayMode::WithoutIp => *once_accepted.entry(name.clone()).or_default() += 1,
                    ReplayMode::WithIp => {
                        owners
                            .entry(name.clone())
                            .or_default()
                            .insert(crate::replay::normalise_ip(c.ip.unwrap()));
                    }
                }
            }
            for (name, n) in &once_accepted {
                assert!(*n <= 1, "seed {seed}: {name} accepted {n} times without_ip");
                assert!(
                    !owners.contains_key(name),
                    "seed {seed}: {name} accepted once and with an owner"
                );
            }
            for (name, set) in &owners {
                assert!(set.len() <= 1, "seed {seed}: {name} owned by {set:?}");
            }
        }
    }
}

/// Outside the guarantee, and what still holds: etcd restored from a snapshot older than its
/// live tokens has forgotten them (docs/deploy.md says not to, or to rotate signing keys). A
/// gateway that cached a token as spent keeps refusing it; one that did not asks etcd, which
/// now accepts it again.
#[test]
fn after_etcd_loses_its_data_a_cache_still_refuses_what_it_saw_spent() {
    let mut etcd = ModelEtcd {
        now: NOW,
        ..ModelEtcd::default()
    };
    let replica = |_: u8| {
        let (store, prefix, policy) = cache(1000);
        Replica {
            store,
            prefix,
            policy,
            session: Session::default(),
        }
    };
    let (mut a, mut b) = (replica(0), replica(1));
    let c = check("t", ReplayMode::WithoutIp, None);
    assert_eq!(decide(&mut a, &mut etcd, c), (Verdict::FirstUse, false));
    etcd.kv.clear();
    etcd.leases.clear();
    assert_eq!(decide(&mut a, &mut etcd, c), (Verdict::Replay, true));
    // The lease is gone too: granted again on the way.
    assert_eq!(decide(&mut b, &mut etcd, c), (Verdict::FirstUse, false));
}
