//! The HTTP context: collect facts, evaluate, apply. Kept small enough to audit line by line.
//! `Gateway` is the per-worker state the HTTP contexts share with the root context, and the
//! host side of the core's `Host` trait (shared data for the token cache and replay store).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use gateguard_core::client_cert::AcceptedCertificate;
use gateguard_core::decision::{Decision, Forward};
use gateguard_core::jwt::{cache, KeySet};
use gateguard_core::pipeline::{Event, Host};
use gateguard_core::replay::Verdict;
use gateguard_core::shared_data::SharedStore;
use gateguard_core::{CompiledPolicy, Outcome, Request};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use serde_json::{Map, Value};

use crate::host::{self, HostStore, LogLevel, MapType};
use crate::metrics::{
    Metrics, CERT_EXPIRING, JWT_CACHE_HIT, JWT_CACHE_MISS, REPLAY_CAS_RETRIES, REPLAY_RECLAIMED,
};
use crate::root::{log, PREFIX};

pub struct Gateway {
    pub policy: CompiledPolicy,
    pub metrics: Metrics,
    pub replay_prefix: String,
    /// Some API reads the TLS peer certificate (worked out once, not per request).
    reads_peer_certificate: bool,
    /// New tokens refused because the replay store was full (logged from on_tick).
    pub store_full: Cell<u64>,
    keys: RefCell<Vec<Option<Rc<KeySet>>>>,
    kid_requests: RefCell<Vec<bool>>,
}

impl Gateway {
    pub fn new(
        policy: CompiledPolicy,
        metrics: Metrics,
        keys: Vec<Option<Rc<KeySet>>>,
        replay_prefix: String,
    ) -> Self {
        let n = keys.len();
        Self {
            reads_peer_certificate: policy.reads_peer_certificate(),
            policy,
            metrics,
            replay_prefix,
            store_full: Cell::new(0),
            keys: RefCell::new(keys),
            kid_requests: RefCell::new(vec![false; n]),
        }
    }

    pub fn api_name(&self, api: usize) -> &str {
        self.policy.apis.get(api).map_or("-", |a| a.name.as_str())
    }

    pub fn set_keys(&self, api: usize, set: Rc<KeySet>) {
        if let Some(slot) = self.keys.borrow_mut().get_mut(api) {
            *slot = Some(set);
        }
    }

    pub fn has_keys(&self, api: usize) -> bool {
        self.keys.borrow().get(api).is_some_and(Option::is_some)
    }

    pub fn take_kid_request(&self, api: usize) -> bool {
        self.kid_requests
            .borrow_mut()
            .get_mut(api)
            .is_some_and(|r| std::mem::replace(r, false))
    }

    fn token_cache_key(&self, key: &[u8; 32]) -> String {
        format!(
            "{PREFIX}tc.{}",
            cache::slot(key, self.policy.token_cache_slots)
        )
    }
}

impl Host for Gateway {
    fn jwt_keys(&self, api: usize) -> Option<Rc<KeySet>> {
        self.keys.borrow().get(api).cloned().flatten()
    }

    fn cached_token(&self, key: &[u8; 32], now: u64) -> Option<(Map<String, Value>, u64)> {
        let (bytes, _) = HostStore.get(&self.token_cache_key(key)).ok().flatten()?;
        cache::decode(&bytes, key, now)
    }

    fn cache_token(&self, key: &[u8; 32], exp: u64, claims: &Map<String, Value>) {
        if let Some(value) = cache::encode(key, exp, claims) {
            let _ = HostStore.set(&self.token_cache_key(key), &value, 0);
        }
    }

    fn unknown_kid(&self, api: usize) {
        if let Some(r) = self.kid_requests.borrow_mut().get_mut(api) {
            *r = true;
        }
    }

    fn replay_store(&self) -> &dyn SharedStore {
        &HostStore
    }

    fn replay_prefix(&self) -> &str {
        &self.replay_prefix
    }

    fn note(&self, api: usize, event: Event) {
        match event {
            Event::JwtCacheHit => self.metrics.add(Some(api), JWT_CACHE_HIT, 1),
            Event::JwtCacheMiss => self.metrics.add(Some(api), JWT_CACHE_MISS, 1),
            Event::Replay(outcome) => {
                self.metrics.add(
                    Some(api),
                    REPLAY_CAS_RETRIES,
                    u64::from(outcome.cas_retries),
                );
                self.metrics
                    .add(Some(api), REPLAY_RECLAIMED, u64::from(outcome.reclaimed));
                match outcome.verdict {
                    Verdict::StoreFull => self.store_full.set(self.store_full.get() + 1),
                    Verdict::Corrupt
                    | Verdict::MissingBucket
                    | Verdict::Contention
                    | Verdict::StoreUnavailable => {
                        log(
                            LogLevel::Warn,
                            &format!(
                                "gateguard: api={} replay store unusable ({}, bucket {}): refusing (fail closed)",
                                self.api_name(api),
                                outcome.verdict.reason(),
                                outcome.bucket
                            ),
                        );
                    }
                    _ => {}
                }
            }
        }
    }
}

pub struct RequestFilter {
    gateway: Option<Rc<Gateway>>,
    /// CORS headers to put on the upstream's response.
    response_headers: Vec<(String, String)>,
}

impl RequestFilter {
    pub fn new(gateway: Option<Rc<Gateway>>) -> Self {
        Self {
            gateway,
            response_headers: Vec::new(),
        }
    }
}

impl Context for RequestFilter {}

impl HttpContext for RequestFilter {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(gateway) = self.gateway.clone() else {
            // Not configured: fail closed.
            reply(
                503,
                &[("content-type".into(), "application/json".into())],
                r#"{"statusCode":503,"message":"Gateway not configured"}"#,
            );
            return Action::Pause;
        };
        let headers = host::header_pairs(MapType::HttpRequestHeaders);
        let method = header(&headers, ":method").unwrap_or_default();
        let path = header(&headers, ":path").unwrap_or_default();
        let peer = property_string(&["source", "address"]);
        // A host call per request only when some API reads the TLS peer certificate.
        let peer_certificate = if gateway.reads_peer_certificate {
            property_bytes(&["connection", "peer_certificate"])
        } else {
            None
        };
        let now = host::now();
        let request = Request {
            method,
            path,
            headers: &headers,
            peer_address: peer.as_deref(),
            peer_certificate: peer_certificate.as_deref(),
            now,
        };
        let decision = gateway.policy.evaluate(&request, gateway.as_ref());
        let decision_outcome = decision.outcome();
        gateway.metrics.count(
            match &decision {
                Decision::Reply { api, .. } => *api,
                Decision::Forward(f) => Some(f.api),
            },
            decision.outcome(),
        );
        match decision {
            Decision::Reply {
                api,
                refusal,
                reply: r,
                ..
            } => {
                let api_name = api.map_or("-", |i| gateway.api_name(i));
                if let Some(refusal) = &refusal {
                    // One JSON audit line per refusal: never a token, key or certificate.
                    let audit = serde_json::json!({
                        "gateguard": "refused",
                        "api": api_name,
                        "check": refusal.check(),
                        "reason": refusal.reason(),
                        "status": r.status,
                        "client_ip": gateway.policy.client_ip(&request).map(|ip| ip.to_string()),
                        "request_id": header(&headers, "x-request-id"),
                    });
                    log(LogLevel::Info, &audit.to_string());
                }
                record_decision(
                    api_name,
                    decision_outcome,
                    refusal.as_ref().map(|r| r.reason()),
                );
                reply(r.status, &r.headers, &r.body);
                Action::Pause
            }
            Decision::Forward(forward) => {
                if let Some(cert) = &forward.expiring_certificate {
                    warn_expiring_certificate(&gateway, forward.api, cert, now);
                }
                apply(&forward);
                record_decision(gateway.api_name(forward.api), decision_outcome, None);
                self.response_headers = forward.response_headers;
                Action::Continue
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for (name, value) in &self.response_headers {
            if name == "vary" {
                // The upstream's own Vary (Accept-Encoding...) must survive.
                host::add_header(MapType::HttpResponseHeaders, name, value);
            } else {
                host::set_header(MapType::HttpResponseHeaders, name, value);
            }
        }
        Action::Continue
    }
}

/// Counts every request with a soon-expiring certificate; logs once per certificate per day
/// across all workers (the day is remembered in shared data).
fn warn_expiring_certificate(gateway: &Gateway, api: usize, cert: &AcceptedCertificate, now: u64) {
    gateway.metrics.add(Some(api), CERT_EXPIRING, 1);
    let key = format!("{PREFIX}certwarn.{}", cert.sha256_hex);
    let today = (now / 86_400).to_string();
    let seen = matches!(HostStore.get(&key), Ok(Some((day, _))) if day == today.as_bytes());
    // Only remember the day when the warning is actually written (not at errors-only levels).
    if !seen && host::logs_at(LogLevel::Warn) && HostStore.set(&key, today.as_bytes(), 0).is_ok() {
        let days_left = cert.not_after.map(|t| t.saturating_sub(now) / 86_400);
        log(
            LogLevel::Warn,
            &format!(
                "gateguard: client certificate sha256={} for api={} expires in {} days; rotate it before it expires",
                cert.sha256_hex,
                gateway.api_name(api),
                days_left.map_or("unknown".to_string(), |d| d.to_string())
            ),
        );
    }
}

/// The decision as filter state, for Envoy's access log:
/// `%FILTER_STATE(wasm.gateguard_outcome:PLAIN)%`, `wasm.gateguard_api`, `wasm.gateguard_reason`.
fn record_decision(api: &str, outcome: Outcome, reason: Option<&str>) {
    host::set_property(&["gateguard_api"], api.as_bytes());
    host::set_property(&["gateguard_outcome"], outcome.name().as_bytes());
    if let Some(reason) = reason {
        host::set_property(&["gateguard_reason"], reason.as_bytes());
    }
}

fn apply(forward: &Forward) {
    for name in &forward.remove_request_headers {
        host::remove_header(MapType::HttpRequestHeaders, name);
    }
    for (name, value) in &forward.set_request_headers {
        host::set_header(MapType::HttpRequestHeaders, name, value);
    }
    if let Some(path) = &forward.new_path {
        host::set_header(MapType::HttpRequestHeaders, ":path", path);
    }
}

fn reply(status: u16, headers: &[(String, String)], body: &str) {
    host::send_response(status, headers, body);
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn property_bytes(path: &[&str]) -> Option<Vec<u8>> {
    host::get_property(path)
}

fn property_string(path: &[&str]) -> Option<String> {
    property_bytes(path).map(|b| String::from_utf8_lossy(&b).into_owned())
}
