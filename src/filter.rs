//! The HTTP context: collect facts, evaluate, apply. Kept small enough to audit line by line.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

use gateguard_core::client_cert::AcceptedCertificate;
use gateguard_core::decision::{Decision, Forward, LocalReply};
use gateguard_core::limits::{BodyCounter, LimitError};
use gateguard_core::pipeline::Host;
use gateguard_core::replay::etcd::{Call, Failure, OnUnavailable};
use gateguard_core::shared_data::SharedStore;
use gateguard_core::{Outcome, Refusal, Request};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::configured::ConfiguredGateway;
use crate::etcd;
use crate::host::{self, log, HostStore, LogLevel, MapType, KEY_PREFIX};
use crate::metrics::{CERT_EXPIRING, REPLAY_UNCHECKED};

pub struct RequestFilter {
    gateway: Option<Rc<ConfiguredGateway>>,
    /// CORS headers to put on the upstream's response.
    response_headers: Vec<(String, String)>,
    /// The request is paused while etcd decides its token (the etcd replay store).
    waiting: Option<(etcd::Waiting, AuditFacts)>,
    /// `limits.max_body_bytes` of the API that forwarded the request: its body, counted as it
    /// streams.
    body: Option<(usize, BodyCounter)>,
}

impl RequestFilter {
    pub fn new(gateway: Option<Rc<ConfiguredGateway>>) -> Self {
        Self {
            gateway,
            response_headers: Vec::new(),
            waiting: None,
            body: None,
        }
    }

    /// Acts on a decision: a reply now, or the request on its way upstream (`resumes`: it was
    /// paused for etcd and must be resumed).
    fn conclude(
        &mut self,
        gateway: &ConfiguredGateway,
        decision: Decision,
        audit: impl FnOnce() -> AuditFacts,
        now: u64,
    ) -> Action {
        let decision_outcome = decision.outcome();
        match decision {
            Decision::Reply {
                api,
                refusal,
                reply,
                ..
            } => {
                gateway.metrics.count(api, decision_outcome);
                let facts = audit();
                let audit = Audit {
                    api: api.map_or("-", |i| gateway.api_name(i)),
                    client_ip: facts.client_ip,
                    request_id: facts.request_id.as_deref(),
                    every_request: gateway.policy.log.every_request(),
                };
                answer(&audit, decision_outcome, refusal.as_ref(), &reply);
                Action::Pause
            }
            Decision::Forward(forward) => {
                gateway.metrics.count(Some(forward.api), decision_outcome);
                if let Some(cert) = &forward.expiring_certificate {
                    warn_expiring_certificate(gateway, forward.api, cert, now);
                }
                // An allowed request reads its client IP only for a warning, or when the policy
                // asks for an audit trail of every request (`log`): a filter-state write costs.
                let every_request = gateway.policy.log.every_request();
                let facts = (forward.replay_unchecked.is_some() || every_request).then(audit);
                if let (Some(failure), Some(facts)) = (&forward.replay_unchecked, &facts) {
                    gateway.metrics.add(Some(forward.api), REPLAY_UNCHECKED, 1);
                    log(
                        LogLevel::Warn,
                        &serde_json::json!({
                            "gateguard": "replay_unchecked",
                            "api": gateway.api_name(forward.api),
                            "reason": failure.describe(),
                            "client_ip": facts.client_ip,
                            "request_id": facts.request_id,
                        })
                        .to_string(),
                    );
                }
                apply(&forward);
                let client_ip = facts
                    .as_ref()
                    .and_then(|f| f.client_ip.as_deref())
                    .filter(|_| every_request);
                record_decision(
                    gateway.api_name(forward.api),
                    decision_outcome,
                    None,
                    client_ip,
                );
                self.body = forward
                    .max_body_bytes
                    .map(|max| (forward.api, BodyCounter::new(max)));
                self.response_headers = forward.response_headers;
                Action::Continue
            }
            Decision::Ask(pending) => {
                let Some(etcd_policy) = gateway.policy.replay_store.etcd() else {
                    // The core asks only with the etcd store; never forward on a doubt.
                    let decision = pending.resolve(
                        Err(Failure::NotSent { call: Call::Txn }),
                        OnUnavailable::Deny,
                        gateway.counter_store(),
                        now,
                    );
                    return self.conclude(gateway, decision, audit, now);
                };
                match etcd::start(gateway, etcd_policy, pending) {
                    etcd::Progress::Waiting(waiting) => {
                        self.waiting = Some((waiting, audit()));
                        Action::Pause
                    }
                    etcd::Progress::Done(pending, result) => {
                        let decision = pending.resolve(
                            result,
                            etcd_policy.on_unavailable,
                            gateway.counter_store(),
                            now,
                        );
                        self.conclude(gateway, decision, audit, now)
                    }
                }
            }
        }
    }
}

impl RequestFilter {
    /// Counts `len` more bytes of the body against the API's `max_body_bytes`; over it, the
    /// request is refused with 413 at once (what went upstream so far is reset by Envoy with
    /// the stream) and `false` says so.
    fn count_body(&mut self, gateway: &ConfiguredGateway, len: usize) -> bool {
        let Some((api, counter)) = self.body.as_mut() else {
            return true;
        };
        if counter.add(len).is_ok() {
            return true;
        }
        let api = *api;
        self.body = None;
        let refusal = Refusal::Limit(LimitError::BodyTooLarge);
        let decision = Decision::refuse(Some(api), refusal, &self.response_headers);
        self.response_headers.clear();
        let audit = || {
            let headers = host::header_pairs(MapType::HttpRequestHeaders);
            let request = Request {
                method: "",
                path: "",
                headers: &headers,
                peer_address: None,
                peer_certificate: None,
                dynamic_metadata: None,
                now: 0,
            };
            audit_facts(gateway, &request)
        };
        self.conclude(gateway, decision, audit, host::now());
        false
    }
}

impl Context for RequestFilter {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let Some(gateway) = self.gateway.clone() else {
            return;
        };
        let Some(etcd_policy) = gateway.policy.replay_store.etcd() else {
            return;
        };
        match self.waiting.take() {
            Some((waiting, facts)) if waiting.call() == token_id => {
                let progress =
                    etcd::on_response(&gateway, etcd_policy, waiting, status_code, response_size);
                let action = match progress {
                    etcd::Progress::Waiting(waiting) => {
                        self.waiting = Some((waiting, facts));
                        return;
                    }
                    etcd::Progress::Done(pending, result) => {
                        let now = host::now();
                        let decision = pending.resolve(
                            result,
                            etcd_policy.on_unavailable,
                            gateway.counter_store(),
                            now,
                        );
                        self.conclude(&gateway, decision, || facts, now)
                    }
                };
                // The body that arrived meanwhile reaches `on_http_request_body` after this
                // resume, and is counted there (tests/test_etcd_replay.py pins it).
                if action == Action::Continue {
                    host::resume_request();
                }
            }
            other => self.waiting = other,
        }
    }
}

impl HttpContext for RequestFilter {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(gateway) = self.gateway.clone() else {
            refuse_unconfigured();
            return Action::Pause;
        };
        let headers = host::header_pairs(MapType::HttpRequestHeaders);
        let method = header(&headers, ":method").unwrap_or_default();
        let path = header(&headers, ":path").unwrap_or_default();
        // Host calls per request only for what some API needs; a refusal's audit line reads
        // the peer itself.
        let peer = if gateway.reads_peer_address {
            property_string(&["source", "address"])
        } else {
            None
        };
        // A host call per request only when some API reads the TLS peer certificate.
        let peer_certificate = if gateway.reads_peer_certificate {
            let pem = property_bytes(&["connection", "peer_certificate"]);
            if pem.is_none() {
                warn_if_certificate_unreadable();
            }
            pem
        } else {
            None
        };
        // The dynamic metadata where jwt_authn leaves what it verified, only when an API asks.
        let dynamic_metadata = if gateway.reads_dynamic_metadata {
            property_bytes(&["metadata"])
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
            dynamic_metadata: dynamic_metadata.as_deref(),
            now,
        };
        let decision = gateway.policy.evaluate(&request, gateway.as_ref());
        let audit = || audit_facts(&gateway, &request);
        self.conclude(&gateway, decision, audit, now)
    }

    fn on_http_request_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        // A request waiting for etcd stays paused. Envoy's Wasm host holds the body of a
        // request whose headers paused (it delivers it after the resume), so this is a guard:
        // a body or trailers callback that said Continue would resume the request in Envoy
        // before etcd decided.
        if self.waiting.is_some() {
            return Action::Pause;
        }
        match self.gateway.clone() {
            Some(gateway) if self.count_body(&gateway, body_size) => Action::Continue,
            Some(_) => Action::Pause,
            None => Action::Continue,
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // As for the body: trailers that said Continue would resume a request etcd has not
        // decided yet.
        if self.waiting.is_some() {
            Action::Pause
        } else {
            Action::Continue
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

/// What the audit line of a request says about its client, collected while its headers are at
/// hand (a request that waits for etcd is answered after they are gone).
struct AuditFacts {
    /// As the policy's `log.client_ip` shows it (full, masked or hashed).
    client_ip: Option<String>,
    request_id: Option<String>,
}

/// The audit facts of a request: its client IP as the policy's `log.client_ip` shows it (the
/// peer address read now if the request did not need it), and its request id.
fn audit_facts(gateway: &ConfiguredGateway, request: &Request<'_>) -> AuditFacts {
    let peer = match request.peer_address {
        Some(peer) => Some(peer.to_string()),
        None => property_string(&["source", "address"]),
    };
    let request = Request {
        peer_address: peer.as_deref(),
        ..*request
    };
    AuditFacts {
        client_ip: gateway
            .policy
            .client_ip(&request)
            .map(|ip| gateway.policy.log.client_ip(ip)),
        request_id: header(request.headers, "x-request-id").map(str::to_string),
    }
}

/// Envoy before 1.38 has no `connection.peer_certificate` attribute: a client that presented a
/// certificate (Envoy has its digest) then looks like one that presented none, and every API
/// that needs it refuses (fail closed). Says why once per worker, naming the version.
fn warn_if_certificate_unreadable() {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if WARNED.load(Ordering::Relaxed)
        || property_bytes(&["connection", "sha256_peer_certificate_digest"]).is_none()
    {
        return;
    }
    WARNED.store(true, Ordering::Relaxed);
    log(
        LogLevel::Error,
        "gateguard: the client presented a certificate but this Envoy does not give it to Wasm \
         filters (the connection.peer_certificate attribute needs Envoy 1.38 or newer): APIs \
         that check client certificates from the connection refuse every request; upgrade \
         Envoy (docs/compatibility.md)",
    );
}

/// Counts every request with a soon-expiring certificate; logs once per certificate per day
/// across all workers (the day is remembered in shared data).
fn warn_expiring_certificate(
    gateway: &ConfiguredGateway,
    api: usize,
    cert: &AcceptedCertificate,
    now: u64,
) {
    gateway.metrics.add(Some(api), CERT_EXPIRING, 1);
    let key = format!("{KEY_PREFIX}certwarn.{}", cert.sha256_hex);
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

/// No policy: fail closed, with the audit line and filter state of any refusal (no counter:
/// counters are defined from the policy).
fn refuse_unconfigured() {
    if let Decision::Reply {
        outcome,
        refusal,
        reply,
        ..
    } = Decision::refuse(None, Refusal::NotConfigured, &[])
    {
        let request_id = host::header_value(MapType::HttpRequestHeaders, "x-request-id")
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        let audit = Audit {
            api: "-",
            client_ip: None,
            request_id: request_id.as_deref(),
            every_request: false,
        };
        answer(&audit, outcome, refusal.as_ref(), &reply);
    }
}

/// What the audit line of a refusal says besides the refusal itself.
struct Audit<'a> {
    api: &'a str,
    /// As the policy's `log.client_ip` shows it.
    client_ip: Option<String>,
    request_id: Option<&'a str>,
    /// The policy has a `log` block: replies that are not refusals (preflights) record the
    /// client IP too.
    every_request: bool,
}

/// Sends a reply the gateway makes itself: a refusal first gets its audit line (one JSON line,
/// never a token, key or certificate), and every reply its filter state.
fn answer(audit: &Audit<'_>, outcome: Outcome, refusal: Option<&Refusal>, reply: &LocalReply) {
    if let Some(refusal) = refusal {
        let line = serde_json::json!({
            "gateguard": "refused",
            "api": audit.api,
            "check": refusal.check(),
            "reason": refusal.reason(),
            "status": reply.status,
            "client_ip": audit.client_ip,
            "request_id": audit.request_id,
        });
        log(LogLevel::Info, &line.to_string());
    }
    let client_ip = audit
        .client_ip
        .as_deref()
        .filter(|_| refusal.is_some() || audit.every_request);
    record_decision(audit.api, outcome, refusal.map(Refusal::reason), client_ip);
    host::send_response(reply.status, &reply.headers, &reply.body);
}

/// The decision as filter state, for Envoy's access log:
/// `%FILTER_STATE(wasm.gateguard_outcome:PLAIN)%`, `wasm.gateguard_api`, `wasm.gateguard_reason`,
/// and `wasm.gateguard_client_ip` (as `log.client_ip` shows it, so the access log needs no raw
/// `%DOWNSTREAM_REMOTE_ADDRESS%`): on refusals always, on other requests only with a `log`
/// block (docs/operations.md, "Audit trail").
fn record_decision(api: &str, outcome: Outcome, reason: Option<&str>, client_ip: Option<&str>) {
    host::set_property(&["gateguard_api"], api.as_bytes());
    host::set_property(&["gateguard_outcome"], outcome.name().as_bytes());
    if let Some(reason) = reason {
        host::set_property(&["gateguard_reason"], reason.as_bytes());
    }
    if let Some(client_ip) = client_ip {
        host::set_property(&["gateguard_client_ip"], client_ip.as_bytes());
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
