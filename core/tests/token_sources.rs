//! `jwt.token_sources`: the token from a header, the query or a cookie; exactly one per request;
//! a query token never reaches the backend, a cookie token only when the policy says so.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;
use serde_json::{json, Value};

const MISSING: &str = "Missing or malformed Authorization header";

fn doc(s: &Signer, sources: Value) -> Value {
    json!({"apis": [{
        "name": "t", "path_prefix": "/t",
        "subscription_key": {"query": "subscription-key",
                             "keys_sha256": [gateguard_core::subscription_key::hash_key("k")]},
        "jwt": {"issuers": [ISS], "audiences": ["api://a"], "algorithms": ["EdDSA"],
                "jwks": {"inline": {"keys": [s.jwk]}}, "token_sources": sources},
        "replay": {"mode": "without_ip"}
    }]})
}

fn all_places() -> Value {
    json!([
        {"header": "authorization", "scheme": "Bearer"},
        {"query": "access_token"},
        {"cookie": "access_token"}
    ])
}

#[test]
fn a_query_token_is_accepted_and_never_reaches_the_backend() {
    let s = signer();
    let p = compile(&doc(&s, all_places()));
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let t = token(&s, json!({}));
    let path = format!("/t/x?a=1&access_token={t}&subscription-key=k&b=2");
    let d = call(&path).without_key().run(&p, &h);
    let f = forward(&d);
    // Both the token and the key leave the query; the rest keeps its order.
    assert_eq!(f.new_path.as_deref(), Some("/t/x?a=1&b=2"));
    // The same token again is a replay, wherever it comes from.
    let again = call("/t/x?subscription-key=k")
        .bearer(&t)
        .without_key()
        .run(&p, &h);
    assert_refused(&again, 401, "Token replay detected");
}

#[test]
fn a_cookie_token_leaves_the_cookie_header_unless_forwarded() {
    let s = signer();
    let p = compile(&doc(&s, all_places()));
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let t = token(&s, json!({}));
    let d = call("/t/x?subscription-key=k")
        .without_key()
        .header("cookie", &format!("theme=dark; access_token={t}; lang=en"))
        .run(&p, &h);
    let f = forward(&d);
    assert!(f.remove_request_headers.iter().any(|n| n == "cookie"));
    assert!(f
        .set_request_headers
        .contains(&("cookie".into(), "theme=dark; lang=en".into())));

    let kept = compile(&doc(
        &s,
        json!([{"cookie": "access_token", "forward": true}]),
    ));
    let h = FakeHost::new(&kept, json!({"keys": [s.jwk]}));
    let t = token(&s, json!({"jti": "2"}));
    let d = call("/t/x?subscription-key=k")
        .without_key()
        .header("cookie", &format!("access_token={t}"))
        .run(&kept, &h);
    let f = forward(&d);
    assert!(!f.remove_request_headers.iter().any(|n| n == "cookie"));
}

#[test]
fn two_tokens_at_once_are_refused_whichever_places() {
    let s = signer();
    let p = compile(&doc(&s, all_places()));
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let a = token(&s, json!({"jti": "a"}));
    let b = token(&s, json!({"jti": "b"}));
    let with_b = format!("/t/x?subscription-key=k&access_token={b}");
    let with_a = format!("/t/x?subscription-key=k&access_token={a}");
    let both = format!("/t/x?subscription-key=k&access_token={a}&Access_Token={b}");
    let cases = [
        call(&with_b).bearer(&a),
        call("/t/x?subscription-key=k")
            .bearer(&a)
            .header("cookie", &format!("access_token={b}")),
        call(&with_a).header("cookie", &format!("access_token={a}")),
        call(&both),
    ];
    for c in cases {
        let d = c.without_key().run(&p, &h);
        assert_refused(&d, 401, MISSING);
        assert_eq!(
            header(reply(&d), "www-authenticate"),
            Some("Bearer error=\"invalid_token\"")
        );
    }
}

#[test]
fn by_default_only_the_authorization_header_counts() {
    let s = signer();
    let p = compile(&json!({"apis": [{
        "name": "t", "path_prefix": "/t",
        "jwt": {"issuers": [ISS], "audiences": ["api://a"], "algorithms": ["EdDSA"],
                "jwks": {"inline": {"keys": [s.jwk]}}}
    }]}));
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let t = token(&s, json!({}));
    assert_refused(
        &call(&format!("/t/x?access_token={t}")).run(&p, &h),
        401,
        MISSING,
    );
    assert_refused(
        &call("/t/x")
            .header("cookie", &format!("access_token={t}"))
            .run(&p, &h),
        401,
        MISSING,
    );
    let d = call(&format!("/t/x?access_token={t}"))
        .bearer(&t)
        .run(&p, &h);
    // The query parameter is not a token here, so it is the backend's business.
    assert_eq!(forward(&d).new_path, None);
}
