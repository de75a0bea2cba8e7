//! Attack classes a review confirmed against the landed filter, natively: each test is the
//! reported request and the neighbours a reviewer would try next.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use gateguard_core::{parse_policy, CompiledPolicy};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// The order of P-256, big-endian.
const P256_N: [u8; 32] = [
    0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
    0xBC, 0xE6, 0xFA, 0xAD, 0xA7, 0x17, 0x9E, 0x84, 0xF3, 0xB9, 0xCA, 0xC2, 0xFC, 0x63, 0x25, 0x51,
];

fn es256_signer(kid: &str) -> Signer {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = pair.public_key_raw();
    Signer {
        key: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
        jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid,
                    "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])}),
    }
}

fn es256_token(s: &Signer, kid: &str, aud: &str) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.into());
    let claims = json!({"iss": ISS, "aud": aud, "sub": "u1", "exp": NOW + 600});
    jsonwebtoken::encode(&h, &claims, &s.key).unwrap()
}

/// ECDSA's other valid signature of the same content: (r, n - s).
fn malleate(token: &str) -> String {
    let (content, sig) = token.rsplit_once('.').unwrap();
    let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
    let s = raw.split_off(32);
    let mut neg = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = i16::from(P256_N[i]) - i16::from(s[i]) - borrow;
        borrow = i16::from(d < 0);
        neg[i] = (d + 256 * borrow) as u8;
    }
    raw.extend_from_slice(&neg);
    format!("{content}.{}", URL_SAFE_NO_PAD.encode(raw))
}

fn es_policy(s: &Signer) -> CompiledPolicy {
    let jwt = |aud: &str| {
        json!({"issuers": [ISS], "audiences": [aud], "algorithms": ["ES256"],
               "jwks": {"inline": {"keys": [s.jwk]}}})
    };
    let doc = json!({"apis": [
        {"name": "once", "path_prefix": "/once", "jwt": jwt("api://once"), "replay": {"mode": "without_ip"}},
        {"name": "bound", "path_prefix": "/bound", "jwt": jwt("api://bound"), "replay": {"mode": "with_ip"}},
        {"name": "again", "path_prefix": "/again", "jwt": jwt("api://once"), "replay": {"mode": "without_ip"}},
    ]});
    parse_policy(doc.to_string().as_bytes(), &|_| None).unwrap()
}

fn jwks(signers: &[&Signer]) -> Value {
    json!({"keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>()})
}

#[test]
fn ecdsa_signature_malleability_is_a_replay_not_a_new_token() {
    let s = es256_signer("k1");
    let p = es_policy(&s);
    let h = FakeHost::new(&p, jwks(&[&s]));
    let t = es256_token(&s, "k1", "api://once");
    let twin = malleate(&t);
    assert_ne!(t, twin);
    // The twin is a valid signature on its own (so the attack is real)...
    let fresh = FakeHost::new(&p, jwks(&[&s]));
    forward(&call("/once/x").without_key().bearer(&twin).run(&p, &fresh));
    // ...and the same token for replay detection.
    forward(&call("/once/x").without_key().bearer(&t).run(&p, &h));
    assert_refused(
        &call("/once/x").without_key().bearer(&twin).run(&p, &h),
        401,
        "Token replay detected",
    );

    let t = es256_token(&s, "k1", "api://bound");
    forward(&call("/bound/x").without_key().bearer(&t).run(&p, &h));
    let stolen = call("/bound/x").without_key().peer("10.66.6.6:1");
    assert_refused(
        &stolen.bearer(&malleate(&t)).run(&p, &h),
        401,
        "Token replay detected",
    );
}

#[test]
fn a_spent_token_is_spent_on_every_api() {
    let s = es256_signer("k1");
    let p = es_policy(&s);
    let h = FakeHost::new(&p, jwks(&[&s]));
    let t = es256_token(&s, "k1", "api://once");
    forward(&call("/once/x").without_key().bearer(&t).run(&p, &h));
    for path in ["/again/x", "/once/x"] {
        assert_refused(
            &call(path).without_key().bearer(&malleate(&t)).run(&p, &h),
            401,
            "Token replay detected",
        );
    }
}

#[test]
fn other_spellings_of_a_token_never_pass_as_new_or_as_cached() {
    let s = es256_signer("k1");
    let p = es_policy(&s);
    let h = FakeHost::new(&p, jwks(&[&s]));
    let t = es256_token(&s, "k1", "api://bound");
    forward(&call("/bound/x").without_key().bearer(&t).run(&p, &h));
    let (content, sig) = t.rsplit_once('.').unwrap();
    let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
    let (header, payload) = content.split_once('.').unwrap();
    let mut flipped = raw.clone();
    flipped[10] ^= 1;
    raw.insert(0, 0);
    for spelling in [
        // Same signed content, a broken signature: must not ride on the cached verification.
        format!("{content}.{}", URL_SAFE_NO_PAD.encode(&flipped)),
        // A leading zero, padding, standard base64: not the canonical encoding, refused.
        format!("{content}.{}", URL_SAFE_NO_PAD.encode(&raw)),
        format!("{content}.{sig}="),
        format!("{header}=.{payload}.{sig}"),
        format!("{header}.{payload}=.{sig}"),
        format!(
            "{content}.{}",
            base64::engine::general_purpose::STANDARD.encode(URL_SAFE_NO_PAD.decode(sig).unwrap())
        ),
    ] {
        if spelling == t {
            continue;
        }
        let d = call("/bound/x").without_key().bearer(&spelling).run(&p, &h);
        let status = reply(&d).status;
        assert_eq!(status, 401, "{spelling}");
    }
}

#[test]
fn cached_tokens_die_with_the_key_that_verified_them() {
    let old = es256_signer("old");
    let new = es256_signer("new");
    let doc = json!({"apis": [{"name": "c", "path_prefix": "/c",
        "jwt": {"issuers": [ISS], "audiences": ["api://c"], "algorithms": ["ES256"],
                "jwks": {"cluster": "idp", "uri": "https://idp.example.com/keys"}}}]});
    let p = parse_policy(doc.to_string().as_bytes(), &|_| None).unwrap();
    let h = FakeHost::new(&p, jwks(&[&old, &new]));
    let t = es256_token(&old, "old", "api://c");
    forward(&call("/c/x").without_key().bearer(&t).run(&p, &h));
    forward(&call("/c/x").without_key().bearer(&t).run(&p, &h));
    assert_eq!(h.hits.get(), 1);
    // The IdP removes the old key (revoked, compromised): its tokens stop working now.
    h.set_keys(jwks(&[&new]));
    assert_refused(
        &call("/c/x").without_key().bearer(&t).run(&p, &h),
        401,
        "Invalid or expired token",
    );
    // The same set again (a scheduled refresh, keys in another order) keeps the cache.
    let t2 = es256_token(&new, "new", "api://c");
    h.set_keys(jwks(&[&new, &old]));
    forward(&call("/c/x").without_key().bearer(&t2).run(&p, &h));
    let hits = h.hits.get();
    h.set_keys(jwks(&[&old, &new]));
    forward(&call("/c/x").without_key().bearer(&t2).run(&p, &h));
    assert_eq!(h.hits.get(), hits + 1);
}

fn hygiene_policy(s: &Signer) -> CompiledPolicy {
    hygiene_policy_with_rule(s, "DELETE")
}

fn hygiene_policy_with_rule(s: &Signer, method: &str) -> CompiledPolicy {
    let doc = json!({"apis": [{
        "name": "a", "path_prefix": "/a",
        "subscription_key": {"keys_sha256": [gateguard_core::subscription_key::hash_key("k")]},
        "jwt": {"issuers": [ISS], "audiences": ["api://a"], "algorithms": ["EdDSA"],
                "jwks": {"inline": {"keys": [s.jwk]}},
                "required_claims": [{"name": "roles", "any_of": ["Forms.Delete"], "methods": [method]}],
                "claims_to_headers": {"sub": "x-user-id"}},
        "inject_headers": {"x-functions-key": {"value": "fk"}}
    }]});
    parse_policy(doc.to_string().as_bytes(), &|_| None).unwrap()
}

#[test]
fn gateway_owned_headers_are_removed_in_every_spelling() {
    let s = signer();
    let p = hygiene_policy(&s);
    let h = FakeHost::new(&p, jwks(&[&s]));
    let t = token(&s, json!({}));
    let d = call("/a/x")
        .bearer(&t)
        .header("x_user_id", "admin")
        .header("X_User-Id", "admin")
        .header("x-functions_key", "stolen")
        .header("ocp_apim_subscription_key", "k")
        .header("x_user_idx", "kept")
        .header("X_Original_URL", "/a/admin")
        .header("x-rewrite-url", "/a/admin")
        .run(&p, &h);
    let f = forward(&d);
    // Every spelling the client sent goes; the gateway's own values are set afresh.
    for spelling in [
        "x_user_id",
        "X_User-Id",
        "x-functions_key",
        "ocp_apim_subscription_key",
        "X_Original_URL",
        "x-rewrite-url",
    ] {
        assert!(
            f.remove_request_headers.iter().any(|n| n == spelling),
            "{spelling} not removed: {:?}",
            f.remove_request_headers
        );
    }
    assert!(!f.remove_request_headers.iter().any(|n| n == "x_user_idx"));
    for set in ["x-user-id", "x-functions-key"] {
        assert!(
            f.set_request_headers.iter().any(|(n, _)| n == set),
            "{set} not set: {:?}",
            f.set_request_headers
        );
    }
}

#[test]
fn method_overrides_are_checked_as_the_method_they_name() {
    let s = signer();
    let p = hygiene_policy(&s);
    let h = FakeHost::new(&p, jwks(&[&s]));
    let reader = token(&s, json!({"roles": ["Forms.Read"]}));
    forward(&call("/a/x").bearer(&reader).method("POST").run(&p, &h));
    for (name, value) in [
        ("x-http-method-override", "DELETE"),
        ("x-http-method", "delete"),
        ("x-method-override", "DELETE"),
        ("x_http_method_override", "DELETE"),
        ("X-HTTP-Method-Override", " DELETE "),
        ("x-http-method-override", "PATCH, DELETE"),
    ] {
        let d = call("/a/x")
            .bearer(&reader)
            .method("POST")
            .header(name, value)
            .run(&p, &h);
        assert_refused(&d, 403, "Insufficient claims");
    }
    for path in [
        "/a/x?_method=DELETE",
        "/a/x?a=1&_METHOD=delete",
        "/a/x?%5Fmethod=DELETE",
        "/a/x?.method=DELETE",
        "/a/x?%20_method=DELETE",
        "/a/x?_method[]=DELETE",
    ] {
        let d = call(path).bearer(&reader).method("POST").run(&p, &h);
        assert_refused(&d, 403, "Insufficient claims");
    }
    let deleter = token(&s, json!({"roles": ["Forms.Delete"], "jti": "d"}));
    forward(
        &call("/a/x")
            .bearer(&deleter)
            .method("POST")
            .header("x-http-method-override", "DELETE")
            .run(&p, &h),
    );
}

#[test]
fn the_key_parameter_leaves_in_every_spelling() {
    let s = signer();
    let p = hygiene_policy(&s);
    let h = FakeHost::new(&p, jwks(&[&s]));
    let t = token(&s, json!({}));
    for (target, upstream) in [
        ("/a/x?subscription%2Dkey=k&a=1", "/a/x?a=1"),
        ("/a/x?a=1&Subscription-Key=k", "/a/x?a=1"),
        ("/a/x?SUBSCRIPTION-KEY=k;b=2", "/a/x?b=2"),
        ("/a/x?subscription-key=k&subscription%2dkey=k", "/a/x"),
        ("/a/x?subscription-key[]=k&a=1", "/a/x?a=1"),
        ("/a/x?%20subscription-key=k&a=1", "/a/x?a=1"),
    ] {
        let d = call(target).bearer(&t).run(&p, &h);
        assert_eq!(forward(&d).new_path.as_deref(), Some(upstream), "{target}");
        // Without the header, the same spellings carry the key itself.
        let d = call(target).without_key().bearer(&t).run(&p, &h);
        assert_eq!(forward(&d).new_path.as_deref(), Some(upstream), "{target}");
    }
}

#[test]
fn a_stricter_api_is_not_reachable_through_another_spelling_of_its_path() {
    let doc = json!({"apis": [
        {"name": "odata", "path_prefix": "/odata"},
        {"name": "metadata", "path_prefix": "/odata/$metadata", "ip_filter": {"allow": ["192.0.2.1"]}},
        {"name": "api", "path_prefix": "/api"},
        {"name": "admin", "path_prefix": "/api/admin", "ip_filter": {"allow": ["192.0.2.1"]}},
    ]});
    let p = parse_policy(doc.to_string().as_bytes(), &|_| None).unwrap();
    let h = gateguard_core::pipeline::NoHost;
    for path in [
        "/odata/$metadata",
        "/odata/%24metadata",
        "/odata/%24METADATA",
        "/ODATA/%24Metadata?x=1",
        "/odata;x=1/%24metadata",
        "/odata/$metadata;x",
        "/api/admin;x/users",
        "/api/Admin;jsessionid=1",
        "/api/%61dmin/users",
        "/api//admin/users",
        "/api/admin%3Bx/users",
    ] {
        let d = call(path).run(&p, &h);
        assert_refused(&d, 403, "Forbidden: client IP not allowed");
    }
    for path in [
        "/api/x/%2e%2e;/admin/users",
        "/api/x/..;/admin/users",
        "/api/x/../admin",
        "/api/x%2F..%2Fadmin",
        "/api/x%5c..%5cadmin",
        "/api/%252e%252e/admin",
        "/api/x/%C0%AE%C0%AE/admin",
        "/ap%C4%B1/admin",
        "/api/admin./users",
        "/api/admin%20/users",
    ] {
        let d = call(path).run(&p, &h);
        assert_refused(&d, 400, "Bad request path");
    }
    forward(&call("/odata/Products").run(&p, &h));
    forward(&call("/api/users;v=1").run(&p, &h));
}

#[test]
fn forwarded_certificates_count_only_from_the_trusted_proxies() {
    let cert = rcgen::generate_simple_self_signed(vec!["client.example.com".into()]).unwrap();
    let der = cert.cert.der().to_vec();
    let thumbprint = gateguard_core::hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(&der));
    let doc = json!({
        "apis": [{"name": "partner", "path_prefix": "/partner",
                  "client_certificate": {"thumbprints": [thumbprint], "sources": ["x-arr-clientcert"]}}],
        "client_ip": {"trusted_proxy_hops": 1, "trusted_proxies": ["10.0.0.1"]}
    });
    let p = parse_policy(doc.to_string().as_bytes(), &|_| None).unwrap();
    let h = gateguard_core::pipeline::NoHost;
    let header = base64::engine::general_purpose::STANDARD.encode(&der);
    // Certificates are public: a client that reaches the gateway directly must not present one
    // in a header only the platform's front end may write.
    let direct = call("/partner/x")
        .without_key()
        .peer("10.9.9.9:1234")
        .header("x-arr-clientcert", &header);
    assert_refused(&direct.run(&p, &h), 403, "Invalid client certificate");
    let proxied = call("/partner/x")
        .without_key()
        .peer("10.0.0.1:1234")
        .header("x-forwarded-for", "198.51.100.7")
        .header("x-arr-clientcert", &header);
    forward(&proxied.run(&p, &h));
    // Without trusted proxies in the policy, the listed header source is honoured as before.
    let doc = json!({"apis": [{"name": "partner", "path_prefix": "/partner",
        "client_certificate": {"thumbprints": [thumbprint], "sources": ["x-arr-clientcert"]}}]});
    let p = parse_policy(doc.to_string().as_bytes(), &|_| None).unwrap();
    forward(&direct.run(&p, &h));
}

#[test]
fn a_spent_token_stays_spent_for_every_api_whatever_its_clock_skew() {
    let s = es256_signer("k1");
    let api = |name: &str, skew: u64| {
        json!({"name": name, "path_prefix": format!("/{name}"), "replay": {"mode": "without_ip"},
               "jwt": {"issuers": [ISS], "audiences": ["api://once"], "algorithms": ["ES256"],
                       "clock_skew_seconds": skew, "jwks": {"inline": {"keys": [s.jwk]}}}})
    };
    let doc = json!({"apis": [api("strict", 0), api("lenient", 600)]});
    let p = parse_policy(doc.to_string().as_bytes(), &|_| None).unwrap();
    let h = FakeHost::new(&p, jwks(&[&s]));
    let t = es256_token(&s, "k1", "api://once"); // exp = NOW + 600
    forward(&call("/strict/x").without_key().bearer(&t).run(&p, &h));
    // Past exp, still inside the lenient API's skew: the token is still spent there.
    let mut later = call("/lenient/x").without_key().bearer(&t);
    later.now = NOW + 605;
    assert_refused(&later.run(&p, &h), 401, "Token replay detected");
    // The same after a reload that raises the strict API's skew.
    let doc = json!({"apis": [api("strict", 600)]});
    let raised = parse_policy(doc.to_string().as_bytes(), &|_| None).unwrap();
    let mut later = call("/strict/x").without_key().bearer(&t);
    later.now = NOW + 605;
    assert_refused(&later.run(&raised, &h), 401, "Token replay detected");
}

#[test]
fn cached_tokens_die_with_the_hmac_secret_that_verified_them() {
    let doc = json!({"apis": [{"name": "hs", "path_prefix": "/hs",
        "jwt": {"issuers": [ISS], "audiences": ["api://hs"], "algorithms": ["HS256"],
                "hmac_secret": {"env": "HS"}}}]});
    let text = doc.to_string();
    let old_secret = "an-old-secret-of-at-least-32-bytes!!";
    let old = parse_policy(text.as_bytes(), &|_| Some(old_secret.to_string())).unwrap();
    let rotated = parse_policy(text.as_bytes(), &|_| {
        Some("a-new-secret-of-at-least-32-bytes!!!".to_string())
    })
    .unwrap();
    let s = signer();
    let h = FakeHost::new(&old, jwks(&[&s]));
    let claims = json!({"iss": ISS, "aud": "api://hs", "exp": NOW + 600});
    let t = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(old_secret.as_bytes()),
    )
    .unwrap();
    forward(&call("/hs/x").without_key().bearer(&t).run(&old, &h));
    // Same policy text, the secret rotated in the environment, the same shared cache.
    assert_refused(
        &call("/hs/x").without_key().bearer(&t).run(&rotated, &h),
        401,
        "Invalid or expired token",
    );
}
