//! Request hygiene through the whole pipeline (docs/policy.md, "Methods", "Limits", "Header
//! rules", "Rate limits and quotas"): where each step runs in the order of checks, and that
//! limits keyed by a credential count only calls whose credential was valid.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;
use gateguard_core::decision::Outcome;
use gateguard_core::Decision;
use serde_json::{json, Value};

const KEY: &str = "k";

fn api(s: &Signer, extra: Value) -> Value {
    let mut api = json!({
        "name": "h", "path_prefix": "/h",
        "cors": {"allowed_origins": ["https://portal.example.com"], "allowed_methods": ["GET", "POST", "DELETE"]},
        "ip_filter": {"allow": ["10.0.0.0/8"]},
        "subscription_key": {"keys_sha256": [gateguard_core::subscription_key::hash_key(KEY)]},
        "jwt": {
            "issuers": [ISS], "audiences": ["api://a"], "algorithms": ["EdDSA"],
            "jwks": {"inline": {"keys": [s.jwk]}},
            "required_claims": [{"name": "roles", "any_of": ["Forms.Submit"], "methods": ["POST"]}]
        },
        "replay": {"mode": "without_ip"}
    });
    for (k, v) in extra.as_object().unwrap() {
        api[k] = v.clone();
    }
    api
}

fn setup(extra: Value) -> (Signer, gateguard_core::CompiledPolicy, FakeHost) {
    let s = signer();
    let p = compile(&json!({"apis": [api(&s, extra)]}));
    let host = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    (s, p, host)
}

fn outcome(d: &Decision) -> Outcome {
    d.outcome()
}

#[test]
fn a_method_not_listed_gets_405_with_allow_after_the_ip_filter_and_before_credentials() {
    let (s, p, host) = setup(json!({"methods": ["GET", "post"]}));
    let t = token(&s, json!({}));
    assert!(matches!(
        call("/h").bearer(&t).run(&p, &host),
        Decision::Forward(_)
    ));
    // No credentials at all: the method is refused first.
    let d = call("/h").without_key().method("DELETE").run(&p, &host);
    assert_refused(&d, 405, "Method not allowed");
    assert_eq!(header(reply(&d), "allow"), Some("GET, POST"));
    assert_eq!(outcome(&d), Outcome::MethodDenied);
    // A client outside the IP filter learns nothing about the API's methods.
    let d = call("/h")
        .peer("192.0.2.1:1")
        .method("DELETE")
        .run(&p, &host);
    assert_refused(&d, 403, "Forbidden: client IP not allowed");
    // An override to an unlisted method is the unlisted method.
    for (name, value) in [
        ("x-http-method-override", "DELETE"),
        ("X-HTTP-Method", "delete"),
        ("x_method_override", "PUT"),
    ] {
        let d = call("/h")
            .bearer(&t)
            .method("POST")
            .header(name, value)
            .run(&p, &host);
        assert_refused(&d, 405, "Method not allowed");
    }
    let d = call("/h?_method=DELETE")
        .bearer(&t)
        .method("POST")
        .run(&p, &host);
    assert_refused(&d, 405, "Method not allowed");
}

#[test]
fn a_preflight_still_follows_cors_and_a_refusal_carries_cors_headers() {
    let (_, p, host) = setup(json!({"methods": ["GET"]}));
    let d = call("/h")
        .without_key()
        .method("OPTIONS")
        .header("origin", "https://portal.example.com")
        .header("access-control-request-method", "DELETE")
        .run(&p, &host);
    assert_eq!(reply(&d).status, 204);
    let d = call("/h")
        .without_key()
        .method("PUT")
        .header("origin", "https://portal.example.com")
        .run(&p, &host);
    assert_refused(&d, 405, "Method not allowed");
    assert_eq!(
        header(reply(&d), "access-control-allow-origin"),
        Some("https://portal.example.com")
    );
    // A plain OPTIONS (not a preflight) is a method like any other.
    let d = call("/h").without_key().method("OPTIONS").run(&p, &host);
    assert_refused(&d, 405, "Method not allowed");
}

#[test]
fn oversized_headers_get_431_and_an_announced_body_413_before_credentials() {
    let (s, p, host) = setup(
        json!({"limits": {"max_request_header_bytes": 2048, "max_header_bytes": 1024, "max_body_bytes": 100}}),
    );
    let t = token(&s, json!({}));
    let ok = call("/h").bearer(&t).run(&p, &host);
    assert_eq!(forward(&ok).max_body_bytes, Some(100));
    let d = call("/h")
        .without_key()
        .header("x-big", &"a".repeat(1100))
        .run(&p, &host);
    assert_refused(&d, 431, "Request header fields too large");
    assert_eq!(outcome(&d), Outcome::LimitDenied);
    let mut c = call("/h").without_key();
    for i in 0..10 {
        c = c.header(&format!("x-{i}"), &"a".repeat(250));
    }
    assert_refused(&c.run(&p, &host), 431, "Request header fields too large");
    let d = call("/h")
        .without_key()
        .method("POST")
        .header("content-length", "101")
        .run(&p, &host);
    assert_refused(&d, 413, "Request entity too large");
    let fresh = token(&s, json!({"jti": "2"}));
    let d = call("/h").bearer(&fresh).header("content-length", "100");
    assert!(matches!(d.run(&p, &host), Decision::Forward(_)));
}

#[test]
fn header_rules_name_the_header_never_its_value() {
    let (s, p, host) = setup(json!({"headers": {
        "required": ["x-correlation-id"], "forbidden": ["x-debug"],
        "patterns": {"x-correlation-id": "^[0-9a-fA-F-]{36}$"}}}));
    let t = token(&s, json!({}));
    let id = "0f8fad5b-d9cb-469f-a165-70867728950e";
    let ok = call("/h")
        .bearer(&t)
        .header("x-correlation-id", id)
        .run(&p, &host);
    assert!(matches!(ok, Decision::Forward(_)));
    let d = call("/h").without_key().run(&p, &host);
    assert_refused(&d, 400, "Bad request: header x-correlation-id is missing");
    assert_eq!(outcome(&d), Outcome::HeaderDenied);
    let d = call("/h")
        .without_key()
        .header("x-correlation-id", id)
        .header("X_Debug", "on")
        .run(&p, &host);
    assert_refused(&d, 400, "Bad request: header x-debug is not allowed");
    let d = call("/h")
        .without_key()
        .header("x-correlation-id", "\"><script>")
        .run(&p, &host);
    assert_refused(&d, 400, "Bad request: header x-correlation-id is invalid");
    assert!(!reply(&d).body.contains("script"));
}

#[test]
fn a_rate_limit_by_key_counts_only_valid_keys_and_says_when_to_retry() {
    let (s, p, host) = setup(
        json!({"rate_limit": {"by": "subscription_key", "calls": 2, "renewal_period_seconds": 60}}),
    );
    let t = token(&s, json!({}));
    // Wrong keys and missing keys never count against anyone.
    for _ in 0..5 {
        let d = call("/h")
            .without_key()
            .header("ocp-apim-subscription-key", "wrong")
            .run(&p, &host);
        assert_eq!(reply(&d).status, 401);
    }
    let first = call("/h").bearer(&t).run(&p, &host);
    let f = forward(&first);
    assert!(f
        .response_headers
        .contains(&("x-ratelimit-limit".into(), "2".into())));
    assert!(f
        .response_headers
        .contains(&("x-ratelimit-remaining".into(), "1".into())));
    assert!(f
        .response_headers
        .contains(&("x-ratelimit-reset".into(), "60".into())));
    // A valid key whose token then fails still used a call: the key was valid.
    let d = call("/h").run(&p, &host);
    assert_eq!(reply(&d).status, 401);
    let mut later = call("/h").bearer(&token(&s, json!({"jti": "2"})));
    later.now = NOW + 20;
    let d = later.run(&p, &host);
    assert_refused(&d, 429, "Rate limit is exceeded. Try again in 40 seconds.");
    assert_eq!(header(reply(&d), "retry-after"), Some("40"));
    assert_eq!(header(reply(&d), "x-ratelimit-remaining"), Some("0"));
    assert_eq!(outcome(&d), Outcome::RateLimited);
    // Another API's key holder, or the window's end, start afresh.
    let mut renewed = call("/h").bearer(&token(&s, json!({"jti": "3"})));
    renewed.now = NOW + 60;
    assert!(matches!(renewed.run(&p, &host), Decision::Forward(_)));
}

#[test]
fn a_quota_by_subject_counts_only_tokens_that_passed_every_token_check() {
    let (s, p, host) =
        setup(json!({"quota": {"by": "subject", "calls": 2, "renewal_period_seconds": 86400}}));
    let victim = token(&s, json!({"sub": "victim"}));
    assert!(matches!(
        call("/h").bearer(&victim).run(&p, &host),
        Decision::Forward(_)
    ));
    // A thief replaying the victim's token, a token with insufficient claims, a forged one:
    // refused, and none of them burns the victim's quota.
    for _ in 0..5 {
        assert_eq!(
            reply(&call("/h").bearer(&victim).run(&p, &host)).status,
            401
        );
        let weak = token(&s, json!({"sub": "victim", "jti": "w"}));
        let d = call("/h").bearer(&weak).method("POST").run(&p, &host);
        assert_refused(&d, 403, "Insufficient claims");
        let forged = format!("{}x", token(&s, json!({"sub": "victim", "jti": "f"})));
        assert_eq!(
            reply(&call("/h").bearer(&forged).run(&p, &host)).status,
            401
        );
    }
    let second = token(&s, json!({"sub": "victim", "jti": "2"}));
    assert!(matches!(
        call("/h").bearer(&second).run(&p, &host),
        Decision::Forward(_)
    ));
    let third = token(&s, json!({"sub": "victim", "jti": "3"}));
    let d = call("/h").bearer(&third).run(&p, &host);
    assert_refused(
        &d,
        403,
        "Out of call volume quota. Quota will be replenished in 24:00:00.",
    );
    assert_eq!(header(reply(&d), "retry-after"), Some("86400"));
    assert_eq!(outcome(&d), Outcome::QuotaExceeded);
    // Another subject has its own quota.
    let other = token(&s, json!({"sub": "other", "jti": "4"}));
    assert!(matches!(
        call("/h").bearer(&other).run(&p, &host),
        Decision::Forward(_)
    ));
    // A valid token without a subject cannot be counted: refused, not waved through.
    let anonymous = token(&s, json!({"sub": null, "jti": "5"}));
    let d = call("/h").bearer(&anonymous).run(&p, &host);
    assert_refused(&d, 403, "Insufficient claims");
}

#[test]
fn a_rate_limit_by_client_ip_runs_before_credentials_and_reports_the_tighter_limit() {
    let (s, p, host) = setup(json!({
        "rate_limit": {"by": "client_ip", "calls": 3, "renewal_period_seconds": 10},
        "quota": {"by": "subscription_key", "calls": 100, "renewal_period_seconds": 3600}
    }));
    let t = token(&s, json!({}));
    let d = call("/h").bearer(&t).run(&p, &host);
    let f = forward(&d);
    // The rate limit (2 left) is tighter than the quota (99 left).
    assert!(f
        .response_headers
        .contains(&("x-ratelimit-limit".into(), "3".into())));
    assert_eq!(
        f.response_headers
            .iter()
            .filter(|(n, _)| n == "x-ratelimit-limit")
            .count(),
        1
    );
    // Counted before the key is checked: a client without credentials still spends its calls.
    for _ in 0..2 {
        assert_eq!(reply(&call("/h").without_key().run(&p, &host)).status, 401);
    }
    let d = call("/h").bearer(&t).run(&p, &host);
    assert_refused(&d, 429, "Rate limit is exceeded. Try again in 10 seconds.");
    // Another client IP is another caller.
    let t2 = token(&s, json!({"jti": "x"}));
    assert!(matches!(
        call("/h").bearer(&t2).peer("10.9.9.9:1").run(&p, &host),
        Decision::Forward(_)
    ));
}

#[test]
fn limits_need_the_credential_they_are_counted_by() {
    let bad = [
        (
            json!({"name": "a", "path_prefix": "/a", "rate_limit": {"by": "subscription_key", "calls": 1, "renewal_period_seconds": 1}}),
            "apis[0].rate_limit.by",
        ),
        (
            json!({"name": "a", "path_prefix": "/a", "quota": {"by": "subject", "calls": 1, "renewal_period_seconds": 1}}),
            "apis[0].quota.by",
        ),
        (
            json!({"name": "a", "path_prefix": "/a", "quota": {"by": "user", "calls": 1, "renewal_period_seconds": 1}}),
            "apis[0].quota.by",
        ),
        (
            json!({"name": "a", "path_prefix": "/a", "methods": []}),
            "apis[0].methods",
        ),
        (
            json!({"name": "a", "path_prefix": "/a", "headers": {"forbidden": ["x-functions-key"]}, "inject_headers": {"x-functions-key": {"value": "v"}}}),
            "apis[0].headers.forbidden[0]",
        ),
    ];
    for (api, path) in bad {
        let err =
            gateguard_core::parse_policy(json!({"apis": [api]}).to_string().as_bytes(), &|_| None)
                .unwrap_err();
        assert_eq!(err.path, path, "{api}: {err}");
    }
}
