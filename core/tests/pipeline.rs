//! The whole pipeline, natively: checks in SPEC order, exact statuses and messages, the
//! verified-token cache and replay detection against an in-memory store with Envoy's semantics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use gateguard_core::decision::{Decision, Forward, LocalReply};
use gateguard_core::gateway::{Event, Host, NoHost, Request};
use gateguard_core::jwt::KeySet;
use gateguard_core::replay::{ensure_buckets, MemoryStore, SharedStore};
use gateguard_core::{parse_policy, CompiledPolicy, Outcome};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Map, Value};

const NOW: u64 = 1_800_000_000;
const ISS: &str = "https://login.microsoftonline.com/tenant/v2.0";

struct Signer {
    key: EncodingKey,
    jwk: Value,
}

fn signer() -> Signer {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    Signer {
        key: EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": "k1", "x": URL_SAFE_NO_PAD.encode(pair.public_key_raw())}),
    }
}

fn token(s: &Signer, extra: Value) -> String {
    let mut claims = json!({"iss": ISS, "aud": "api://a", "sub": "u1", "exp": NOW + 600, "roles": ["Forms.Read"]});
    for (k, v) in extra.as_object().unwrap() {
        claims[k] = v.clone();
    }
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some("k1".into());
    jsonwebtoken::encode(&h, &claims, &s.key).unwrap()
}

type Claims = (Map<String, Value>, u64);

struct FakeHost {
    keys: Option<Rc<KeySet>>,
    cache: RefCell<HashMap<[u8; 32], Claims>>,
    store: MemoryStore,
    prefix: String,
    unknown_kids: Cell<u32>,
    hits: Cell<u32>,
    misses: Cell<u32>,
}

impl FakeHost {
    fn new(policy: &CompiledPolicy, jwks: Value) -> Self {
        let store = MemoryStore::new();
        let prefix = policy.replay_cache.key_prefix("gateguard.");
        ensure_buckets(&store, &prefix, policy.replay_cache.buckets()).unwrap();
        Self {
            keys: Some(Rc::new(KeySet::from_jwks_value(&jwks).unwrap())),
            cache: RefCell::default(),
            store,
            prefix,
            unknown_kids: Cell::new(0),
            hits: Cell::new(0),
            misses: Cell::new(0),
        }
    }
}

impl Host for FakeHost {
    fn jwt_keys(&self, _api: usize) -> Option<Rc<KeySet>> {
        self.keys.clone()
    }
    fn cached_token(&self, key: &[u8; 32], now: u64) -> Option<(Map<String, Value>, u64)> {
        self.cache
            .borrow()
            .get(key)
            .filter(|(_, exp)| *exp > now)
            .cloned()
    }
    fn cache_token(&self, key: &[u8; 32], exp: u64, claims: &Map<String, Value>) {
        self.cache.borrow_mut().insert(*key, (claims.clone(), exp));
    }
    fn unknown_kid(&self, _api: usize) {
        self.unknown_kids.set(self.unknown_kids.get() + 1);
    }
    fn replay_store(&self) -> &dyn SharedStore {
        &self.store
    }
    fn replay_prefix(&self) -> &str {
        &self.prefix
    }
    fn note(&self, _api: usize, event: Event) {
        match event {
            Event::JwtCacheHit => self.hits.set(self.hits.get() + 1),
            Event::JwtCacheMiss => self.misses.set(self.misses.get() + 1),
            Event::Replay(_) => {}
        }
    }
}

fn policy(s: &Signer, max_entries: u64) -> CompiledPolicy {
    let doc = json!({
        "apis": [
            {
                "name": "a", "path_prefix": "/a",
                "cors": {"allowed_origins": ["https://portal.example.com"]},
                "ip_filter": {"allow": ["10.0.0.0/8"]},
                "subscription_key": {"keys_sha256": [gateguard_core::subscription_key::hash_key("k")]},
                "jwt": {
                    "issuers": [ISS], "audiences": ["api://a"], "algorithms": ["EdDSA"],
                    "jwks": {"inline": {"keys": [s.jwk]}},
                    "required_claims": [{"name": "roles", "any_of": ["Forms.Submit"], "methods": ["POST"]}],
                    "claims_to_headers": {"sub": "x-user-id", "roles": "x-roles"}
                },
                "replay": {"mode": "with_ip"}
            },
            {
                "name": "b", "path_prefix": "/b",
                "jwt": {"issuers": [ISS], "audiences": ["api://b"], "algorithms": ["EdDSA"], "jwks": {"inline": {"keys": [s.jwk]}}},
                "replay": {"mode": "without_ip"}
            },
            {
                "name": "c", "path_prefix": "/c",
                "jwt": {"issuers": [ISS], "audiences": ["api://a"], "algorithms": ["EdDSA"], "jwks": {"inline": {"keys": [s.jwk]}}}
            }
        ],
        "replay_cache": {"max_entries": max_entries}
    });
    parse_policy(doc.to_string().as_bytes(), &|_| None).unwrap()
}

struct Call<'a> {
    method: &'a str,
    path: &'a str,
    peer: &'a str,
    headers: Vec<(String, String)>,
    now: u64,
}

fn call<'a>(path: &'a str) -> Call<'a> {
    Call {
        method: "GET",
        path,
        peer: "10.1.2.3:5555",
        headers: vec![("ocp-apim-subscription-key".into(), "k".into())],
        now: NOW,
    }
}

impl<'a> Call<'a> {
    fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
    fn bearer(self, t: &str) -> Self {
        self.header("authorization", &format!("Bearer {t}"))
    }
    fn without_key(mut self) -> Self {
        self.headers
            .retain(|(k, _)| k != "ocp-apim-subscription-key");
        self
    }
    fn method(mut self, m: &'a str) -> Self {
        self.method = m;
        self
    }
    fn peer(mut self, p: &'a str) -> Self {
        self.peer = p;
        self
    }
    fn run(&self, p: &CompiledPolicy, host: &dyn Host) -> Decision {
        p.evaluate(
            &Request {
                method: self.method,
                path: self.path,
                headers: &self.headers,
                peer_address: Some(self.peer),
                peer_certificate: None,
                now: self.now,
            },
            host,
        )
    }
}

fn reply(d: &Decision) -> &LocalReply {
    match d {
        Decision::Reply { reply, .. } => reply,
        Decision::Forward(_) => panic!("expected a refusal, got {d:?}"),
    }
}

fn forward(d: &Decision) -> &Forward {
    match d {
        Decision::Forward(f) => f,
        Decision::Reply { reply, .. } => {
            panic!("expected forward, got {} {}", reply.status, reply.body)
        }
    }
}

fn assert_refused(d: &Decision, status: u16, message: &str) {
    let r = reply(d);
    assert_eq!(r.status, status, "{}", r.body);
    let body: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body, json!({"statusCode": status, "message": message}));
}

fn header<'a>(r: &'a LocalReply, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

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
    // Once they expire, room comes back.
    let mut later =
        call("/b/x").bearer(&token(&s, json!({"aud": "api://b", "exp": NOW + 100_000})));
    later.now = NOW + 700;
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
                now: NOW + (i as u64 % 1000),
            },
            &h,
        );
    }
}
