//! What the fuzz targets share: a policy that turns every check on, an in-memory host with
//! Envoy's shared-data semantics, and a readable request format for seeds.
//!
//! Request format (one request per input): `METHOD PATH` on the first line, the peer address
//! on the second, then `name: value` header lines. A line `--` ends the headers; what follows
//! is the TLS peer certificate as Envoy passes it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use gateguard_core::jwt::KeySet;
use gateguard_core::memo::{ReplayMemo, TokenMemo};
use gateguard_core::pipeline::{Host, Request};
use gateguard_core::replay::ensure_buckets;
use gateguard_core::shared_data::{MemoryStore, SharedStore};
use gateguard_core::{parse_policy, CompiledPolicy};
use serde_json::{json, Map, Value};

/// The host clock every target uses.
pub const NOW: u64 = 1_800_000_000;
pub const ISS: &str = "https://login.example.com/tenant/v2.0";
/// RFC 8037's Ed25519 example key (A.2): seeds carry tokens signed with its private half.
pub const ED25519_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
/// SHA-256 of the subscription key `k`.
pub const KEY_SHA256: &str = "8254c329a92850f6d539dd376f4816ee2764517da5e0235514af433164480d7a";

pub fn jwks() -> Value {
    json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k1", "x": ED25519_X}]})
}

/// Every check gateguard has, over three APIs.
pub fn policy_doc() -> Value {
    json!({
        "apis": [
            {
                "name": "a", "path_prefix": "/a",
                "cors": {"allowed_origins": ["https://portal.example.com", "https://*.contoso.com"],
                         "allowed_methods": ["GET", "POST"], "allowed_headers": ["authorization"]},
                "ip_filter": {"allow": ["10.0.0.0/8", "2001:db8::/32"], "deny": ["10.6.6.0/24"]},
                "subscription_key": {"keys_sha256": [KEY_SHA256]},
                "jwt": {
                    "issuers": [ISS], "audiences": ["api://a"], "algorithms": ["EdDSA"],
                    "jwks": {"inline": jwks()},
                    "required_claims": [{"name": "roles", "any_of": ["Forms.Submit"], "methods": ["POST"]}],
                    "claims_to_headers": {"sub": "x-user-id", "roles": "x-roles"},
                    "dpop": "optional"
                },
                "replay": {"mode": "with_ip"},
                "methods": ["GET", "POST"],
                "headers": {"forbidden": ["x-debug"], "patterns": {"x-correlation-id": "[0-9a-f-]{1,36}"}},
                "rate_limit": {"by": "client_ip", "calls": 5, "renewal_period_seconds": 60},
                "quota": {"by": "subject", "calls": 100, "renewal_period_seconds": 3600}
            },
            {
                "name": "b", "path_prefix": "/b",
                "client_certificate": {"thumbprints": ["ab".repeat(32)],
                                       "sources": ["x-forwarded-client-cert", "x-arr-clientcert", "connection"]},
                "subscription_key": {"keys_sha256": [KEY_SHA256]},
                "limits": {"max_request_header_bytes": 4096},
                "rate_limit": {"by": "subscription_key", "calls": 2, "renewal_period_seconds": 10}
            },
            {
                "name": "c", "path_prefix": "/",
                "jwt": {"issuers": [ISS], "audiences": ["api://c"], "algorithms": ["EdDSA"],
                        "jwks": {"inline": jwks()}},
                "replay": {"mode": "without_ip"}
            }
        ],
        "client_ip": {"trusted_proxy_hops": 1, "trusted_proxies": ["10.0.0.1", "::1"]},
        "replay_cache": {"max_entries": 64}
    })
}

pub fn policy() -> CompiledPolicy {
    match parse_policy(policy_doc().to_string().as_bytes(), &|_| None) {
        Ok(p) => p,
        Err(e) => panic!("the fuzz policy does not compile: {e}"),
    }
}

/// Verified tokens by cache key: (claims, exp).
type TokenCache = HashMap<[u8; 32], (Map<String, Value>, u64)>;

/// The filter's host, in memory.
pub struct FuzzHost {
    keys: Rc<KeySet>,
    cache: RefCell<TokenCache>,
    pub store: MemoryStore,
    prefix: String,
    memo: ReplayMemo,
    token_memo: TokenMemo,
}

impl FuzzHost {
    pub fn new(policy: &CompiledPolicy) -> Self {
        let store = MemoryStore::new();
        let prefix = policy.replay_cache.key_prefix("gateguard.");
        if ensure_buckets(&store, &prefix, policy.replay_cache.buckets()).is_err() {
            panic!("replay buckets");
        }
        let keys = match KeySet::from_jwks_value(&jwks()) {
            Ok(k) => Rc::new(k),
            Err(_) => panic!("the fuzz key set does not load"),
        };
        Self {
            keys,
            cache: RefCell::default(),
            store,
            prefix,
            memo: ReplayMemo::default(),
            token_memo: TokenMemo::default(),
        }
    }
}

impl Host for FuzzHost {
    fn jwt_keys(&self, _slot: usize) -> Option<Rc<KeySet>> {
        Some(self.keys.clone())
    }
    fn cached_token(&self, key: &[u8; 32], now: u64) -> Option<(Rc<Map<String, Value>>, u64)> {
        self.cache
            .borrow()
            .get(key)
            .filter(|(_, exp)| *exp > now)
            .map(|(c, exp)| (Rc::new(c.clone()), *exp))
    }
    fn cache_token(&self, key: &[u8; 32], exp: u64, claims: &Map<String, Value>) {
        self.cache.borrow_mut().insert(*key, (claims.clone(), exp));
    }
    fn unknown_kid(&self, _slot: usize) {}
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
}

/// A request read from the seed format.
pub struct Parsed {
    pub method: String,
    pub path: String,
    pub peer: String,
    pub headers: Vec<(String, String)>,
    pub certificate: Option<Vec<u8>>,
}

pub fn parse_request(data: &[u8]) -> Parsed {
    let (head, certificate) = match find(data, b"\n--\n") {
        Some(at) => (&data[..at], Some(data[at + 4..].to_vec())),
        None => (data, None),
    };
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or_default();
    let (method, path) = first.split_once(' ').unwrap_or((first, "/"));
    let peer = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .map(|l| match l.split_once(':') {
            // `:authority: x`: a pseudo-header keeps its leading colon.
            Some(("", rest)) => match rest.split_once(':') {
                Some((n, v)) => (format!(":{n}"), v.trim_start().to_string()),
                None => (format!(":{rest}"), String::new()),
            },
            Some((n, v)) => (n.to_ascii_lowercase(), v.trim_start().to_string()),
            None => (l.to_ascii_lowercase(), String::new()),
        })
        .collect();
    Parsed {
        method: method.to_string(),
        path: path.to_string(),
        peer,
        headers,
        certificate,
    }
}

impl Parsed {
    pub fn request(&self, now: u64) -> Request<'_> {
        Request {
            method: &self.method,
            path: &self.path,
            headers: &self.headers,
            peer_address: Some(&self.peer),
            peer_certificate: self.certificate.as_deref(),
            dynamic_metadata: None,
            now,
        }
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
