//! The whole pipeline, natively: checks in docs/policy.md's order, exact statuses and messages, the
//! verified-token cache and replay detection against an in-memory store with Envoy's semantics.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;
use gateguard_core::pipeline::{NoHost, Request};
use gateguard_core::{parse_policy, Outcome};
use jsonwebtoken::{Algorithm, Header};
use serde_json::json;
#[test]
fn checks_run_in_spec_order() {
    let s = signer();
    let p = policy(&s, 1000);
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    // Bad origin and everything else wrong: CORS answers first.
    let d = call("/a/x")
        .without_key()
        .peer("192.0.2.1:1")
        .header("origin", "https://evil.example")
        .run(&p, &h);
    assert_refused(&d, 403, "CORS origin not allowed");
    // Then the IP filter.
    let d = call("/a/x").without_key().peer("192.0.2.1:1").run(&p, &h);
    assert_refused(&d, 403, "Forbidden: client IP not allowed");
    // Then the key, before any token is looked at.
    let d = call("/a/x").without_key().run(&p, &h);
    assert_refused(&d, 401, "Access denied due to missing subscription key. Make sure to include subscription key when making requests to an API.");
    // Then the token.
    let d = call("/a/x").run(&p, &h);
    assert_refused(&d, 401, "Missing or malformed Authorization header");
    assert_eq!(
        header(reply(&d), "www-authenticate"),
        Some(r#"Bearer error="invalid_token""#)
    );
}

#[test]
fn jwt_refusals_use_the_exact_messages_and_challenges() {
    let s = signer();
    let p = policy(&s, 1000);
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    assert_refused(
        &call("/c/x")
            .header("authorization", "Basic abc")
            .run(&p, &h),
        401,
        "Missing or malformed Authorization header",
    );
    assert_refused(
        &call("/c/x").bearer("a.b").run(&p, &h),
        401,
        "Malformed token or missing expiration",
    );
    let no_exp = token(&s, json!({"exp": "soon"}));
    assert_refused(
        &call("/c/x").bearer(&no_exp).run(&p, &h),
        401,
        "Malformed token or missing expiration",
    );
    let expired = token(&s, json!({"exp": NOW - 3600}));
    let d = call("/c/x").bearer(&expired).run(&p, &h);
    assert_refused(&d, 401, "Invalid or expired token");
    assert_eq!(
        header(reply(&d), "www-authenticate"),
        Some(r#"Bearer error="invalid_token""#)
    );
    assert!(!reply(&d).body.contains(&expired));
    let wrong_aud = token(&s, json!({"aud": "api://b"}));
    assert_refused(
        &call("/c/x").bearer(&wrong_aud).run(&p, &h),
        401,
        "Invalid or expired token",
    );
}

#[test]
fn claims_rules_are_per_method_and_rechecked_on_cache_hits() {
    let s = signer();
    let p = policy(&s, 1000);
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let t = token(&s, json!({}));
    forward(&call("/a/x").bearer(&t).run(&p, &h));
    assert_eq!(h.misses.get(), 1);
    // Same token, now from the cache, but POST needs Forms.Submit.
    let d = call("/a/x").method("POST").bearer(&t).run(&p, &h);
    assert_refused(&d, 403, "Insufficient claims");
    assert_eq!(
        header(reply(&d), "www-authenticate"),
        Some(r#"Bearer error="insufficient_scope""#)
    );
    assert_eq!(h.hits.get(), 1);
    let submit = token(&s, json!({"roles": ["Forms.Submit"]}));
    forward(&call("/a/x").method("POST").bearer(&submit).run(&p, &h));
}

#[test]
fn cache_entries_do_not_cross_apis() {
    let s = signer();
    let p = policy(&s, 1000);
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let t = token(&s, json!({})); // audience api://a: valid for /c, not for /b
    forward(&call("/c/x").bearer(&t).run(&p, &h));
    assert_refused(
        &call("/b/x").bearer(&t).run(&p, &h),
        401,
        "Invalid or expired token",
    );
}

#[test]
fn claims_are_forwarded_and_spoofed_copies_removed() {
    let s = signer();
    let p = policy(&s, 1000);
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let t = token(&s, json!({"roles": ["A", "B"]}));
    let d = call("/a/x")
        .bearer(&t)
        .header("x-user-id", "admin")
        .run(&p, &h);
    let f = forward(&d);
    assert!(f.remove_request_headers.contains(&"x-user-id".to_string()));
    assert!(f
        .set_request_headers
        .contains(&("x-user-id".into(), "u1".into())));
    assert!(f
        .set_request_headers
        .contains(&("x-roles".into(), "A,B".into())));
}

#[test]
fn with_ip_binds_the_token_to_the_first_client() {
    let s = signer();
    let p = policy(&s, 1000);
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let t = token(&s, json!({}));
    forward(&call("/a/x").bearer(&t).run(&p, &h));
    forward(&call("/a/x").bearer(&t).run(&p, &h));
    let d = call("/a/x").bearer(&t).peer("10.9.9.9:1").run(&p, &h);
    assert_refused(&d, 401, "Token replay detected");
    assert_eq!(d.outcome(), Outcome::ReplayDenied);
    // The owner keeps working.
    forward(
        &call("/a/x")
            .bearer(&t)
            .peer("[::ffff:10.1.2.3]:2")
            .run(&p, &h),
    );
}

#[test]
fn without_ip_accepts_each_token_once() {
    let s = signer();
    let p = policy(&s, 1000);
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let t = token(&s, json!({"aud": "api://b"}));
    forward(&call("/b/x").bearer(&t).run(&p, &h));
    assert_refused(
        &call("/b/x").bearer(&t).run(&p, &h),
        401,
        "Token replay detected",
    );
    assert_refused(
        &call("/b/x").bearer(&t).peer("10.7.7.7:1").run(&p, &h),
        401,
        "Token replay detected",
    );
    // A fresh token works.
    let t2 = token(&s, json!({"aud": "api://b", "jti": "2"}));
    forward(&call("/b/x").bearer(&t2).run(&p, &h));
}

#[test]
fn invalid_tokens_are_never_recorded() {
    let s = signer();
    let p = policy(&s, 1000);
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let t = token(&s, json!({"aud": "api://b", "exp": NOW - 1000}));
    for _ in 0..3 {
        assert_refused(
            &call("/b/x").bearer(&t).run(&p, &h),
            401,
            "Invalid or expired token",
        );
    }
}

#[test]
fn a_full_store_refuses_new_tokens_but_keeps_live_ones() {
    let s = signer();
    let p = policy(&s, 2);
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let tokens: Vec<String> = (0..3)
        .map(|i| token(&s, json!({"aud": "api://b", "jti": i})))
        .collect();
    forward(&call("/b/x").bearer(&tokens[0]).run(&p, &h));
    forward(&call("/b/x").bearer(&tokens[1]).run(&p, &h));
    let d = call("/b/x").bearer(&tokens[2]).run(&p, &h);
    assert_refused(
        &d,
        503,
        "Replay protection unavailable: token store is full",
    );
    assert_eq!(d.outcome(), Outcome::ReplayStoreFull);
    // Live entries were not forgotten to make room.
    assert_refused(
        &call("/b/x").bearer(&tokens[0]).run(&p, &h),
        401,
        "Token replay detected",
    );
    // Once they expire (exp + the largest clock skew a policy may allow), room comes back.
    let mut later =
        call("/b/x").bearer(&token(&s, json!({"aud": "api://b", "exp": NOW + 100_000})));
    later.now = NOW + 600 + gateguard_core::jwt::MAX_CLOCK_SKEW_SECONDS + 1;
    forward(&later.run(&p, &h));
}

#[test]
fn unknown_kid_asks_the_host_for_fresh_keys() {
    let s = signer();
    let p = policy(&s, 1000);
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let mut hdr = Header::new(Algorithm::EdDSA);
    hdr.kid = Some("rotated".into());
    let t = jsonwebtoken::encode(
        &hdr,
        &json!({"iss": ISS, "aud": "api://a", "exp": NOW + 60}),
        &s.key,
    )
    .unwrap();
    assert_refused(
        &call("/c/x").bearer(&t).run(&p, &h),
        401,
        "Invalid or expired token",
    );
    assert_eq!(h.unknown_kids.get(), 1);
}

#[test]
fn no_keys_yet_means_401() {
    let s = signer();
    let p = policy(&s, 1000);
    let t = token(&s, json!({}));
    assert_refused(
        &call("/c/x").bearer(&t).run(&p, &NoHost),
        401,
        "Invalid or expired token",
    );
}

#[test]
fn replay_needs_jwt() {
    let doc = r#"{"apis":[{"name":"a","path_prefix":"/a","replay":{"mode":"with_ip"}}]}"#;
    let err = parse_policy(doc.as_bytes(), &|_| None).unwrap_err();
    assert_eq!(err.path, "apis[0].replay");
    let doc = r#"{"apis":[{"name":"a","path_prefix":"/a"}],"replay_cache":{"max_entries":0}}"#;
    assert_eq!(
        parse_policy(doc.as_bytes(), &|_| None).unwrap_err().path,
        "replay_cache.max_entries"
    );
}

/// Nothing in the pipeline may panic on any input (a panic traps the Wasm VM): throw 30,000
/// random and half-valid requests at a policy that uses every check.
#[test]
fn random_requests_never_panic() {
    let s = signer();
    let p = policy(&s, 1000);
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let valid = token(&s, json!({}));
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let pieces = [
        "/a",
        "/b",
        "/c",
        "/",
        "%",
        "%2F",
        "%2e",
        "..",
        ".",
        "//",
        "?",
        "&",
        "=",
        "\\",
        "\u{0}",
        "é",
        "\u{ffff}",
        "https://portal.example.com",
        "null",
        "*",
        ",",
        " ",
        "Bearer ",
        "bearer",
        ".",
        "eyJ",
        "[",
        "]",
        ":",
        "10.1.2.3",
        "::1",
        "[::ffff:10.0.0.1]:1",
        "subscription-key=k",
        "\r\n",
        "Hash=",
        "Cert=\"",
        ";",
        "\"",
    ];
    let mut piece = |n: usize| -> String {
        let mut out = String::new();
        for _ in 0..(next() as usize % n) {
            out.push_str(pieces[next() as usize % pieces.len()]);
        }
        out
    };
    let names = [
        "origin",
        "authorization",
        "x-forwarded-for",
        "ocp-apim-subscription-key",
        "access-control-request-method",
        "x-forwarded-client-cert",
        "x-arr-clientcert",
    ];
    for i in 0..30_000 {
        let mut headers = Vec::new();
        for _ in 0..(i % 6) {
            let name = names[i * 7 % names.len()].to_string();
            let value = if i % 11 == 0 {
                format!("Bearer {valid}{}", piece(3))
            } else {
                piece(8)
            };
            headers.push((name, value));
        }
        let path = format!("/{}{}", ["a", "b", "c", "A"][i % 4], piece(10));
        let peer = piece(3);
        let method = ["GET", "POST", "OPTIONS", "", "get"][i % 5];
        let _ = p.evaluate(
            &Request {
                method,
                path: &path,
                headers: &headers,
                peer_address: Some(&peer),
                peer_certificate: if i % 13 == 0 {
                    Some(peer.as_bytes())
                } else {
                    None
                },
                dynamic_metadata: None,
                now: NOW + (i as u64 % 1000),
            },
            &h,
        );
    }
}
