//! The HTTP context: collect facts, evaluate, apply. Kept small enough to audit line by line.

use std::rc::Rc;
use std::time::UNIX_EPOCH;

use gateguard_core::client_cert::AcceptedCertificate;
use gateguard_core::decision::{Decision, Forward};
use gateguard_core::replay::SharedStore;
use gateguard_core::{CompiledPolicy, Request};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel, MapType};

use crate::host::HostStore;
use crate::metrics::{Metrics, CERT_EXPIRING};
use crate::root::log;

pub struct Gateway {
    pub policy: CompiledPolicy,
    pub metrics: Metrics,
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
        let headers = request_headers();
        let method = header(&headers, ":method").unwrap_or_default();
        let path = header(&headers, ":path").unwrap_or_default();
        let peer = property_string(&["source", "address"]);
        // A host call per request only when some API reads the TLS peer certificate.
        let peer_certificate = if gateway.policy.reads_peer_certificate() {
            property_bytes(&["connection", "peer_certificate"])
        } else {
            None
        };
        let now = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let request = Request {
            method,
            path,
            headers: &headers,
            peer_address: peer.as_deref(),
            peer_certificate: peer_certificate.as_deref(),
            now,
        };
        let decision = gateway
            .policy
            .evaluate(&request, &gateguard_core::gateway::NoHost);
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
                if let Some(refusal) = refusal {
                    let api_name = api
                        .and_then(|i| gateway.policy.apis.get(i))
                        .map_or("-", |a| a.name.as_str());
                    log(
                        LogLevel::Info,
                        &format!(
                            "gateguard: refused api={api_name} check={} status={} reason=\"{}\"",
                            refusal.check(),
                            r.status,
                            refusal.reason()
                        ),
                    );
                }
                reply(r.status, &r.headers, &r.body);
                Action::Pause
            }
            Decision::Forward(forward) => {
                if let Some(cert) = &forward.expiring_certificate {
                    warn_expiring_certificate(&gateway, forward.api, cert, now);
                }
                apply(&forward);
                self.response_headers = forward.response_headers;
                Action::Continue
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for (name, value) in &self.response_headers {
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
        }
        Action::Continue
    }
}

/// Counts every request with a soon-expiring certificate; logs once per certificate per day
/// across all workers (the day is remembered in shared data).
fn warn_expiring_certificate(gateway: &Gateway, api: usize, cert: &AcceptedCertificate, now: u64) {
    gateway.metrics.add(Some(api), CERT_EXPIRING, 1);
    let key = format!("gateguard.certwarn.{}", cert.sha256_hex);
    let today = (now / 86_400).to_string();
    let seen =
        matches!(hostcalls::get_shared_data(&key), Ok((Some(day), _)) if day == today.as_bytes());
    if !seen && hostcalls::set_shared_data(&key, Some(today.as_bytes()), None).is_ok() {
        let api_name = gateway
            .policy
            .apis
            .get(api)
            .map_or("-", |a| a.name.as_str());
        let days_left = cert.not_after.map(|t| (t.saturating_sub(now)) / 86_400);
        log(
            LogLevel::Warn,
            &format!(
                "gateguard: client certificate sha256={} for api={api_name} expires in {} days; rotate it before it expires",
                cert.sha256_hex,
                days_left.map_or("unknown".to_string(), |d| d.to_string())
            ),
        );
    }
}

fn apply(forward: &Forward) {
    for name in &forward.remove_request_headers {
        let _ = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name);
    }
    for (name, value) in &forward.set_request_headers {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
    }
    if let Some(path) = &forward.new_path {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, ":path", Some(path));
    }
}

fn reply(status: u16, headers: &[(String, String)], body: &str) {
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let _ = hostcalls::send_http_response(u32::from(status), headers, Some(body.as_bytes()));
}

/// All request headers. Bytes, not strings: the SDK's string variant panics on non-UTF-8 values.
fn request_headers() -> Vec<(String, String)> {
    hostcalls::get_map_bytes(MapType::HttpRequestHeaders)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
        .collect()
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn property_bytes(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

fn property_string(path: &[&str]) -> Option<String> {
    property_bytes(path).map(|b| String::from_utf8_lossy(&b).into_owned())
}
