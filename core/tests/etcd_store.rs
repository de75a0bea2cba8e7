//! The pipeline with `replay_store.etcd`: which requests wait for etcd, what they become once
//! etcd answers (or does not), and what the local cache decides alone. The exchange itself and
//! the model etcd: `core/src/replay/etcd/tests.rs`; the real etcd: tests/test_etcd_replay.py.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;
use gateguard_core::decision::{Decision, Pending};
use gateguard_core::replay::etcd::{remember, Answer, Call, Failure, Holder, OnUnavailable};
use gateguard_core::replay::{normalise_ip, ReplayMode, Verdict};
use gateguard_core::{CompiledPolicy, Outcome};
use serde_json::json;

const ORIGIN: &str = "https://portal.example.com";

fn etcd_policy(s: &Signer, on_unavailable: &str) -> CompiledPolicy {
    let mut doc = policy_doc(s, 1000);
    doc["replay_store"] =
        json!({"etcd": {"cluster": "etcd", "timeout_ms": 200, "on_unavailable": on_unavailable}});
    compile(&doc)
}

fn pending(d: Decision) -> Pending {
    match d {
        Decision::Ask(p) => *p,
        other => panic!("expected a question for etcd, got {other:?}"),
    }
}

/// What the adapter does once etcd answered: record it in the cache.
fn etcd_said(h: &FakeHost, p: &CompiledPolicy, asked: &Pending, verdict: Verdict, holder: Holder) {
    let answer = Answer { verdict, holder };
    remember(
        &h.store,
        &p.replay_cache,
        &h.prefix,
        asked.check.token,
        &answer,
        NOW,
    );
}

fn answered(verdict: Verdict, holder: Holder) -> Result<Answer, Failure> {
    Ok(Answer { verdict, holder })
}

#[test]
fn a_token_the_cache_does_not_know_waits_for_etcd_with_the_request_fully_checked() {
    let s = signer();
    let local = policy(&s, 1000);
    let etcd = etcd_policy(&s, "deny");
    let t = token(&s, json!({"roles": ["Forms.Submit"]}));
    let req = call("/a/x")
        .bearer(&t)
        .header("origin", ORIGIN)
        .header("x-user-id", "spoofed");
    let expected =
        forward(&req.run(&local, &FakeHost::new(&local, json!({"keys": [s.jwk]})))).clone();
    let h = FakeHost::new(&etcd, json!({"keys": [s.jwk]}));
    let p = pending(req.run(&etcd, &h));
    // Everything the request becomes upstream is decided before etcd is asked.
    assert_eq!(p.forward, expected);
    assert_eq!(p.check.mode, ReplayMode::WithIp);
    assert_eq!(p.check.ip, Some("10.1.2.3".parse().unwrap()));
    let d = p.resolve(
        answered(Verdict::FirstUse, Holder::Once),
        OnUnavailable::Deny,
        &h.store,
        NOW,
    );
    assert_eq!(forward(&d), &expected);
}

#[test]
fn etcd_refusals_keep_the_contract_statuses_and_the_cors_headers() {
    let s = signer();
    let p = etcd_policy(&s, "deny");
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let t = token(&s, json!({}));
    let ask = || pending(call("/a/x").bearer(&t).header("origin", ORIGIN).run(&p, &h));
    let replay = ask().resolve(
        answered(Verdict::Replay, Holder::Once),
        OnUnavailable::Deny,
        &h.store,
        NOW,
    );
    assert_refused(&replay, 401, "Token replay detected");
    assert_eq!(replay.outcome(), Outcome::ReplayDenied);
    assert_eq!(
        header(reply(&replay), "access-control-allow-origin"),
        Some(ORIGIN)
    );
    let timeout = Failure::Timeout { call: Call::Txn };
    let down = ask().resolve(Err(timeout.clone()), OnUnavailable::Deny, &h.store, NOW);
    let r = reply(&down);
    assert_eq!(r.status, 503);
    assert!(
        r.body.contains("\"Replay protection unavailable"),
        "{}",
        r.body
    );
    assert_eq!(down.outcome(), Outcome::ReplayUnavailable);
    assert_eq!(header(r, "access-control-allow-origin"), Some(ORIGIN));
    // `allow`: through, marked unchecked for the counter and the log line.
    let allowed = ask().resolve(Err(timeout.clone()), OnUnavailable::Allow, &h.store, NOW);
    assert_eq!(forward(&allowed).replay_unchecked, Some(timeout));
    // `allow` is about etcd not answering, never about etcd saying no.
    let replay = ask().resolve(
        answered(Verdict::Replay, Holder::Once),
        OnUnavailable::Allow,
        &h.store,
        NOW,
    );
    assert_refused(&replay, 401, "Token replay detected");
}

#[test]
fn requests_refused_before_replay_never_ask_etcd() {
    let s = signer();
    let p = etcd_policy(&s, "deny");
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let t = token(&s, json!({}));
    let expired = token(&s, json!({"exp": NOW - 3600}));
    for d in [
        call("/a/x").bearer(&t).peer("192.0.2.1:1").run(&p, &h), // IP filter
        call("/a/x").bearer(&t).without_key().run(&p, &h),       // subscription key
        call("/a/x").bearer(&expired).run(&p, &h),               // JWT
        call("/a/x").run(&p, &h),                                // no token
        call("/a/x")
            .bearer(&t)
            .header("origin", "https://evil.example")
            .run(&p, &h), // CORS
        call("/a/x").bearer(&t).method("POST").run(&p, &h),      // claims: POST needs Forms.Submit
    ] {
        assert!(matches!(d, Decision::Reply { .. }), "{d:?}");
    }
    // A preflight is answered by the gateway.
    let preflight = call("/a/x")
        .method("OPTIONS")
        .header("origin", ORIGIN)
        .header("access-control-request-method", "GET")
        .run(&p, &h);
    assert_eq!(reply(&preflight).status, 204);
    // An API without replay forwards at once.
    forward(&call("/c/x").bearer(&t).run(&p, &h));
}

#[test]
fn the_cache_answers_what_etcd_confirmed_without_a_round_trip() {
    let s = signer();
    let p = etcd_policy(&s, "deny");
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    // with_ip: etcd said 10.1.2.3 owns it.
    let t = token(&s, json!({}));
    let first = pending(call("/a/x").bearer(&t).run(&p, &h));
    let owner = Holder::Ip(normalise_ip("10.1.2.3".parse().unwrap()));
    etcd_said(&h, &p, &first, Verdict::FirstUse, owner);
    forward(&call("/a/x").bearer(&t).run(&p, &h));
    forward(
        &call("/a/x")
            .bearer(&t)
            .peer("[::ffff:10.1.2.3]:9")
            .run(&p, &h),
    );
    assert_refused(
        &call("/a/x").bearer(&t).peer("10.9.9.9:1").run(&p, &h),
        401,
        "Token replay detected",
    );
    // without_ip: spent, here and on /b alike (one history).
    let t2 = token(&s, json!({"aud": "api://b"}));
    let first = pending(call("/b/x").bearer(&t2).run(&p, &h));
    etcd_said(&h, &p, &first, Verdict::FirstUse, Holder::Once);
    assert_refused(
        &call("/b/x").bearer(&t2).run(&p, &h),
        401,
        "Token replay detected",
    );
    // A with_ip client behind no IP at all is refused without asking.
    let t3 = token(&s, json!({"jti": "3"}));
    let no_ip = p.evaluate(
        &gateguard_core::Request {
            method: "GET",
            path: "/a/x",
            headers: &call("/a/x").bearer(&t3).headers,
            peer_address: None,
            peer_certificate: None,
            dynamic_metadata: None,
            now: NOW,
        },
        &h,
    );
    assert!(matches!(no_ip, Decision::Reply { .. }), "{no_ip:?}");
}

#[test]
fn calls_counted_by_subject_wait_for_etcd_so_a_token_it_refuses_spends_nothing() {
    // docs/policy.md, "Rate limits and quotas": a subject's calls are counted once its token is
    // known valid, and with the etcd store that is once etcd accepted it.
    let s = signer();
    let quota = |on_unavailable: &str| {
        let mut doc = policy_doc(&s, 1000);
        doc["replay_store"] =
            json!({"etcd": {"cluster": "etcd", "on_unavailable": on_unavailable}});
        doc["apis"][1]["quota"] =
            json!({"by": "subject", "calls": 1, "renewal_period_seconds": 60});
        compile(&doc)
    };
    let p = quota("deny");
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let ask = |jti: &str| {
        let t = token(&s, json!({"aud": "api://b", "jti": jti}));
        pending(call("/b/x").bearer(&t).run(&p, &h))
    };
    // Spent on another replica, or not decided at all: refused, and the subject's call is left.
    let d = ask("spent").resolve(
        answered(Verdict::Replay, Holder::Once),
        OnUnavailable::Deny,
        &h.store,
        NOW,
    );
    assert_refused(&d, 401, "Token replay detected");
    let timeout = Failure::Timeout { call: Call::Txn };
    let d = ask("down").resolve(Err(timeout.clone()), OnUnavailable::Deny, &h.store, NOW);
    assert_eq!(reply(&d).status, 503);
    let d = ask("first").resolve(
        answered(Verdict::FirstUse, Holder::Once),
        OnUnavailable::Deny,
        &h.store,
        NOW,
    );
    let headers = &forward(&d).response_headers;
    assert!(
        headers.contains(&("x-ratelimit-remaining".into(), "0".into())),
        "{headers:?}"
    );
    // The call is spent now: the next token etcd accepts is over the quota.
    let d = ask("second").resolve(
        answered(Verdict::FirstUse, Holder::Once),
        OnUnavailable::Deny,
        &h.store,
        NOW + 1,
    );
    assert_refused(
        &d,
        403,
        "Out of call volume quota. Quota will be replenished in 00:00:59.",
    );
    assert_eq!(d.outcome(), Outcome::QuotaExceeded);

    // `allow`: a request forwarded unchecked is served, so it counts.
    let p = quota("allow");
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let t = token(&s, json!({"aud": "api://b", "jti": "unchecked"}));
    let d = pending(call("/b/x").bearer(&t).run(&p, &h)).resolve(
        Err(timeout.clone()),
        OnUnavailable::Allow,
        &h.store,
        NOW,
    );
    assert_eq!(forward(&d).replay_unchecked, Some(timeout.clone()));
    let t = token(&s, json!({"aud": "api://b", "jti": "unchecked-2"}));
    let d = pending(call("/b/x").bearer(&t).run(&p, &h)).resolve(
        Err(timeout),
        OnUnavailable::Allow,
        &h.store,
        NOW,
    );
    assert_eq!(reply(&d).status, 403);
}

#[test]
fn the_etcd_block_is_validated_with_its_field() {
    let s = signer();
    let cases = [
        (
            json!({"etcd": {"prefix": "/no-slash"}}),
            "replay_store.etcd.prefix",
        ),
        (json!({"etcd": {"prefix": ""}}), "replay_store.etcd.prefix"),
        (
            json!({"etcd": {"prefix": "/a b/"}}),
            "replay_store.etcd.prefix",
        ),
        (
            json!({"etcd": {"cluster": ""}}),
            "replay_store.etcd.cluster",
        ),
        (
            json!({"etcd": {"timeout_ms": 0}}),
            "replay_store.etcd.timeout_ms",
        ),
        (
            json!({"etcd": {"timeout_ms": 60000}}),
            "replay_store.etcd.timeout_ms",
        ),
        (
            json!({"etcd": {"on_unavailable": "maybe"}}),
            "replay_store.etcd.on_unavailable",
        ),
        (json!({"etcd": {"password": "x"}}), "replay_store.etcd"),
        (json!({"redis": {}}), "replay_store"),
        (json!("etcd"), "replay_store"),
    ];
    for (store, path) in cases {
        let mut doc = policy_doc(&s, 1000);
        doc["replay_store"] = store.clone();
        let err = gateguard_core::parse_policy(doc.to_string().as_bytes(), &|_| None).unwrap_err();
        assert!(
            err.path.starts_with(path),
            "{store}: {} ({})",
            err.path,
            err.reason
        );
    }
    for ok in [
        json!("local"),
        json!({"etcd": {}}),
        json!({"etcd": {"cluster": "etcd-tls", "prefix": "/p/", "timeout_ms": 10000, "on_unavailable": "allow"}}),
    ] {
        let mut doc = policy_doc(&s, 1000);
        doc["replay_store"] = ok.clone();
        gateguard_core::parse_policy(doc.to_string().as_bytes(), &|_| None).unwrap();
    }
}
