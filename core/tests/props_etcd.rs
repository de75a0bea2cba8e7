//! Property tests of the etcd replay exchange against arbitrary replies: any sequence of gRPC
//! statuses and protobuf bodies (valid, of the wrong call, or garbage) ends the exchange or asks
//! for a next call, never panics, and a decision is only ever etcd's transaction answer, read
//! the way an independent reader of the reply would.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::IpAddr;

use gateguard_core::replay::etcd::proto::{
    response_op, AuthenticateResponse, KeyValue, LeaseGrantResponse, LeaseTimeToLiveResponse,
    RangeResponse, ResponseOp, TxnResponse,
};
use gateguard_core::replay::etcd::{
    status, Call, Exchange, Holder, Lease, RemoteCheck, Session, Step,
};
use gateguard_core::replay::{ReplayMode, TokenRef, Verdict};
use proptest::prelude::*;
use prost::Message;

const NOW_MS: u64 = 1_800_000_000_000;
const PREFIX: &str = "gateguard/";

fn cases(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

#[derive(Debug, Clone)]
enum Body {
    Grant { ours: bool, error: bool },
    TimeToLive { ours: bool, ttl: i64 },
    Auth(String),
    TxnCreated,
    TxnExisting { our_key: bool, value: Vec<u8> },
    TxnNoRead,
    Garbage(Vec<u8>),
}

fn arb_reply() -> impl Strategy<Value = (u32, String, Body)> {
    let status = prop_oneof![
        6 => Just(status::OK),
        1 => Just(status::NOT_FOUND),
        1 => Just(status::FAILED_PRECONDITION),
        1 => Just(status::UNAVAILABLE),
        1 => Just(status::UNAUTHENTICATED),
        1 => Just(status::DEADLINE_EXCEEDED),
        1 => 0u32..20,
    ];
    let message = prop_oneof![
        Just(String::new()),
        Just("upstream request timeout".to_string()),
        "[a-z ]{0,12}"
    ];
    let body = prop_oneof![
        (any::<bool>(), any::<bool>()).prop_map(|(ours, error)| Body::Grant { ours, error }),
        (any::<bool>(), -5i64..200).prop_map(|(ours, ttl)| Body::TimeToLive { ours, ttl }),
        "[a-z]{0,4}".prop_map(Body::Auth),
        Just(Body::TxnCreated),
        (
            any::<bool>(),
            prop_oneof![
                Just(b"once".to_vec()),
                Just(b"ip:10.1.2.3".to_vec()),
                Just(b"ip:::ffff:10.1.2.3".to_vec()),
                Just(b"ip:10.9.9.9".to_vec()),
                Just(b"ip:".to_vec()),
                proptest::collection::vec(any::<u8>(), 0..12),
            ],
        )
            .prop_map(|(our_key, value)| Body::TxnExisting { our_key, value }),
        Just(Body::TxnNoRead),
        proptest::collection::vec(any::<u8>(), 0..24).prop_map(Body::Garbage),
    ];
    (status, message, body)
}

fn encode(body: &Body, check: &RemoteCheck, lease: &Lease) -> Vec<u8> {
    match body {
        Body::Grant { ours, error } => LeaseGrantResponse {
            header: None,
            id: if *ours { lease.id } else { lease.id ^ 1 },
            ttl: 100,
            error: if *error { "no".into() } else { String::new() },
        }
        .encode_to_vec(),
        Body::TimeToLive { ours, ttl } => LeaseTimeToLiveResponse {
            id: if *ours { lease.id } else { 7 },
            ttl: *ttl,
            ..Default::default()
        }
        .encode_to_vec(),
        Body::Auth(token) => AuthenticateResponse {
            token: token.clone(),
            ..Default::default()
        }
        .encode_to_vec(),
        Body::TxnCreated => TxnResponse {
            header: None,
            succeeded: true,
            responses: vec![],
        }
        .encode_to_vec(),
        Body::TxnExisting { our_key, value } => {
            let key = if *our_key {
                check.key(PREFIX)
            } else {
                b"gateguard/other".to_vec()
            };
            TxnResponse {
                header: None,
                succeeded: false,
                responses: vec![ResponseOp {
                    response: Some(response_op::Response::ResponseRange(RangeResponse {
                        kvs: vec![KeyValue {
                            key,
                            value: value.clone(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    })),
                }],
            }
            .encode_to_vec()
        }
        Body::TxnNoRead => TxnResponse {
            header: None,
            succeeded: false,
            responses: vec![],
        }
        .encode_to_vec(),
        Body::Garbage(bytes) => bytes.clone(),
    }
}

/// A reply of the kind `call` expects (keeping `body` where it already is one).
fn fit(call: Call, body: Body) -> Body {
    match (call, body) {
        (Call::Authenticate, b @ Body::Auth(_)) => b,
        (Call::Authenticate, _) => Body::Auth("token".into()),
        (Call::LeaseGrant, _) => Body::Grant {
            ours: true,
            error: false,
        },
        (Call::LeaseTimeToLive, b @ Body::TimeToLive { .. }) => b,
        (Call::LeaseTimeToLive, _) => Body::TimeToLive {
            ours: true,
            ttl: 200_000,
        },
        (Call::Txn, b @ (Body::TxnCreated | Body::TxnExisting { .. })) => b,
        (Call::Txn, _) => Body::TxnCreated,
    }
}

/// An independent reading of who holds the key.
fn reference_holder(value: &[u8]) -> Holder {
    if value == b"once" {
        return Holder::Once;
    }
    let Some(ip) = value
        .strip_prefix(b"ip:")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse::<IpAddr>().ok())
    else {
        return Holder::Unknown;
    };
    Holder::Ip(match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    })
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn any_replies_end_the_exchange_and_only_a_transaction_decides(
        digest in any::<[u8; 32]>(),
        exp_offset in 0u64..100_000,
        with_ip in any::<bool>(),
        credentials in any::<bool>(),
        // Mostly an etcd that answers each call fittingly, sometimes anything at all.
        replies in proptest::collection::vec((prop::bool::weighted(0.7), arb_reply()), 0..10),
        step_ms in 0u64..120,
    ) {
        let ip: Option<IpAddr> = with_ip.then(|| "10.1.2.3".parse().unwrap());
        let check = RemoteCheck {
            token: TokenRef { digest, exp: NOW_MS / 1000 + exp_offset },
            mode: if with_ip { ReplayMode::WithIp } else { ReplayMode::WithoutIp },
            ip,
        };
        let lease = Lease::for_token(PREFIX, &check.token);
        let mut session = Session::new(credentials.then(|| ("u".to_string(), "p".to_string())));
        let mut now_ms = NOW_MS;
        let (mut exchange, mut step) = Exchange::start(check, PREFIX, 500, now_ms, &mut session);
        let mut last: Option<(Call, u32, Body)> = None;
        for (fitting, (status, message, body)) in replies {
            let Step::Send(out) = &step else { break };
            let (status, body) = if fitting { (status::OK, fit(out.call, body)) } else { (status, body) };
            prop_assert!(out.timeout_ms > 0 && out.timeout_ms <= 500);
            prop_assert_eq!(exchange.waiting(), Some(out.call));
            let call = out.call;
            now_ms += step_ms;
            let bytes = encode(&body, &check, &lease);
            step = exchange.on_response(status, &message, &bytes, now_ms, &mut session);
            last = Some((call, status, body));
        }
        match &step {
            Step::Done(Ok(answer)) => {
                let (call, status, body) = last.expect("a decision needs a reply");
                prop_assert_eq!(call, Call::Txn);
                prop_assert_eq!(status, status::OK);
                match body {
                    Body::TxnCreated => {
                        prop_assert_eq!(answer.verdict, Verdict::FirstUse);
                        let owner = if with_ip { b"ip:10.1.2.3".to_vec() } else { b"once".to_vec() };
                        prop_assert_eq!(answer.holder, reference_holder(&owner));
                    }
                    Body::TxnExisting { our_key: true, value } => {
                        let holder = reference_holder(&value);
                        prop_assert_eq!(answer.holder, holder);
                        let same = with_ip && holder == reference_holder(b"ip:10.1.2.3");
                        prop_assert_eq!(answer.verdict, if same { Verdict::SameOwner } else { Verdict::Replay });
                    }
                    // Garbage may happen to decode as a transaction: then it is read as one.
                    Body::Garbage(bytes) => {
                        let txn = TxnResponse::decode(&bytes[..]).expect("a decision from bytes that decode");
                        prop_assert!(txn.succeeded || !txn.responses.is_empty());
                    }
                    other => prop_assert!(false, "decided on {:?}", other),
                }
            }
            Step::Done(Err(_)) => {}
            Step::Send(_) => {
                let _ = exchange.not_sent();
                prop_assert_eq!(exchange.waiting(), None);
            }
        }
    }
}

#[test]
fn a_fitting_etcd_decides_first_use() {
    let check = RemoteCheck {
        token: TokenRef {
            digest: [1; 32],
            exp: NOW_MS / 1000 + 600,
        },
        mode: ReplayMode::WithoutIp,
        ip: None,
    };
    let lease = Lease::for_token(PREFIX, &check.token);
    let mut session = Session::new(None);
    let (mut exchange, step) = Exchange::start(check, PREFIX, 500, NOW_MS, &mut session);
    assert!(matches!(&step, Step::Send(o) if o.call == Call::LeaseGrant));
    let grant = encode(
        &Body::Grant {
            ours: true,
            error: false,
        },
        &check,
        &lease,
    );
    let step = exchange.on_response(status::OK, "", &grant, NOW_MS + 1, &mut session);
    assert!(matches!(&step, Step::Send(o) if o.call == Call::Txn));
    let created = encode(&Body::TxnCreated, &check, &lease);
    match exchange.on_response(status::OK, "", &created, NOW_MS + 2, &mut session) {
        Step::Done(Ok(answer)) => {
            assert_eq!(answer.verdict, Verdict::FirstUse);
            assert_eq!(answer.holder, Holder::Once);
        }
        other => panic!("{other:?}"),
    }
}
