//! What the pipeline tests share: signers, an in-memory host with Envoy's semantics, a request
//! builder and assertions on decisions.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use gateguard_core::decision::{Decision, Forward, LocalReply};
use gateguard_core::jwt::KeySet;
use gateguard_core::memo::{ReplayMemo, TokenMemo};
use gateguard_core::pipeline::{Event, Host, Request};
use gateguard_core::replay::ensure_buckets;
use gateguard_core::shared_data::{MemoryStore, SharedStore};
use gateguard_core::{parse_policy, CompiledPolicy};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Map, Value};

pub const NOW: u64 = 1_800_000_000;
pub const ISS: &str = "https://login.microsoftonline.com/tenant/v2.0";

pub struct Signer {
    pub key: EncodingKey,
    pub jwk: Value,
}

pub fn signer() -> Signer {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    Signer {
        key: EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": "k1", "x": URL_SAFE_NO_PAD.encode(pair.public_key_raw())}),
    }
}

pub fn token(s: &Signer, extra: Value) -> String {
    let mut claims = json!({"iss": ISS, "aud": "api://a", "sub": "u1", "exp": NOW + 600, "roles": ["Forms.Read"]});
    for (k, v) in extra.as_object().unwrap() {
        claims[k] = v.clone();
    }
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some("k1".into());
    jsonwebtoken::encode(&h, &claims, &s.key).unwrap()
}

pub type Claims = (Map<String, Value>, u64);

pub struct FakeHost {
    /// Every key slot's key set, unless `slot_keys` holds the slot's own.
    pub keys: RefCell<Option<Rc<KeySet>>>,
    /// Key sets per key slot (one per identity provider), as the filter holds them.
    pub slot_keys: RefCell<HashMap<usize, Rc<KeySet>>>,
    /// The key slots `unknown_kid` was called for, in order.
    pub kid_slots: RefCell<Vec<usize>>,
    pub cache: RefCell<HashMap<[u8; 32], Claims>>,
    pub store: MemoryStore,
    pub prefix: String,
    pub unknown_kids: Cell<u32>,
    pub hits: Cell<u32>,
    pub misses: Cell<u32>,
    /// As the filter keeps it per worker: every replay test also runs through it.
    pub memo: ReplayMemo,
    /// As the filter keeps it per worker: every JWT test also runs through it.
    pub token_memo: TokenMemo,
}

impl FakeHost {
    pub fn new(policy: &CompiledPolicy, jwks: Value) -> Self {
        let store = MemoryStore::new();
        let prefix = policy.replay_cache.key_prefix("gateguard.");
        ensure_buckets(&store, &prefix, policy.replay_cache.buckets()).unwrap();
        Self {
            keys: RefCell::new(Some(Rc::new(KeySet::from_jwks_value(&jwks).unwrap()))),
            slot_keys: RefCell::default(),
            kid_slots: RefCell::default(),
            cache: RefCell::default(),
            store,
            prefix,
            unknown_kids: Cell::new(0),
            hits: Cell::new(0),
            misses: Cell::new(0),
            memo: ReplayMemo::default(),
            token_memo: TokenMemo::default(),
        }
    }
}

impl FakeHost {
    /// The identity provider rotated its keys: the host now holds `jwks`.
    pub fn set_keys(&self, jwks: Value) {
        *self.keys.borrow_mut() = Some(Rc::new(KeySet::from_jwks_value(&jwks).unwrap()));
    }

    /// The identity provider in key slot `slot` has its own keys: `jwks`.
    pub fn set_slot_keys(&self, slot: usize, jwks: Value) {
        let set = Rc::new(KeySet::from_jwks_value(&jwks).unwrap());
        self.slot_keys.borrow_mut().insert(slot, set);
    }
}

impl Host for FakeHost {
    fn jwt_keys(&self, slot: usize) -> Option<Rc<KeySet>> {
        match self.slot_keys.borrow().get(&slot) {
            Some(set) => Some(set.clone()),
            None => self.keys.borrow().clone(),
        }
    }
    fn cached_token(&self, key: &[u8; 32], now: u64) -> Option<(Rc<Map<String, Value>>, u64)> {
        self.cache
            .borrow()
            .get(key)
            .filter(|(_, exp)| *exp > now)
            .map(|(claims, exp)| (Rc::new(claims.clone()), *exp))
    }
    fn cache_token(&self, key: &[u8; 32], exp: u64, claims: &Map<String, Value>) {
        self.cache.borrow_mut().insert(*key, (claims.clone(), exp));
    }
    fn unknown_kid(&self, slot: usize) {
        self.unknown_kids.set(self.unknown_kids.get() + 1);
        self.kid_slots.borrow_mut().push(slot);
    }
    fn replay_store(&self) -> &dyn SharedStore {
        &self.store
    }
    fn replay_prefix(&self) -> &str {
        &self.prefix
    }
    fn replay_memo(&self) -> Option<&ReplayMemo> {
        Some(&self.memo)
    }
    fn token_memo(&self) -> Option<&TokenMemo> {
        Some(&self.token_memo)
    }
    fn note(&self, _api: usize, event: Event) {
        match event {
            Event::JwtCacheHit => self.hits.set(self.hits.get() + 1),
            Event::JwtCacheMiss => self.misses.set(self.misses.get() + 1),
            Event::Replay(_) | Event::ReplayCacheHit => {}
        }
    }
}

pub fn policy(s: &Signer, max_entries: u64) -> CompiledPolicy {
    compile(&policy_doc(s, max_entries))
}

pub fn compile(doc: &Value) -> CompiledPolicy {
    parse_policy(doc.to_string().as_bytes(), &|_| None).unwrap()
}

/// Three APIs: `a` with every check and replay `with_ip`, `b` replay `without_ip`, `c` JWT only.
pub fn policy_doc(s: &Signer, max_entries: u64) -> Value {
    json!({
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
    })
}

pub struct Call<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub peer: &'a str,
    pub headers: Vec<(String, String)>,
    pub now: u64,
    /// Dynamic metadata, as Envoy serialises it (what `jwt_authn` verified).
    pub metadata: Option<Vec<u8>>,
}

pub fn call<'a>(path: &'a str) -> Call<'a> {
    Call {
        method: "GET",
        path,
        peer: "10.1.2.3:5555",
        headers: vec![("ocp-apim-subscription-key".into(), "k".into())],
        now: NOW,
        metadata: None,
    }
}

impl<'a> Call<'a> {
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
    pub fn bearer(self, t: &str) -> Self {
        self.header("authorization", &format!("Bearer {t}"))
    }
    pub fn without_key(mut self) -> Self {
        self.headers
            .retain(|(k, _)| k != "ocp-apim-subscription-key");
        self
    }
    pub fn method(mut self, m: &'a str) -> Self {
        self.method = m;
        self
    }
    pub fn peer(mut self, p: &'a str) -> Self {
        self.peer = p;
        self
    }
    pub fn metadata(mut self, m: Vec<u8>) -> Self {
        self.metadata = Some(m);
        self
    }
    pub fn run(&self, p: &CompiledPolicy, host: &dyn Host) -> Decision {
        p.evaluate(
            &Request {
                method: self.method,
                path: self.path,
                headers: &self.headers,
                peer_address: Some(self.peer),
                peer_certificate: None,
                dynamic_metadata: self.metadata.as_deref(),
                now: self.now,
            },
            host,
        )
    }
}

pub fn reply(d: &Decision) -> &LocalReply {
    match d {
        Decision::Reply { reply, .. } => reply,
        Decision::Forward(_) | Decision::Ask(_) => panic!("expected a refusal, got {d:?}"),
    }
}

pub fn forward(d: &Decision) -> &Forward {
    match d {
        Decision::Forward(f) => f,
        Decision::Reply { reply, .. } => {
            panic!("expected forward, got {} {}", reply.status, reply.body)
        }
        Decision::Ask(_) => panic!("expected forward, got a question for etcd: {d:?}"),
    }
}

pub fn assert_refused(d: &Decision, status: u16, message: &str) {
    let r = reply(d);
    assert_eq!(r.status, status, "{}", r.body);
    let body: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body, json!({"statusCode": status, "message": message}));
}

pub fn header<'a>(r: &'a LocalReply, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}
