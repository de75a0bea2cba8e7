//! The HTTP context: collect facts, evaluate, apply. Kept small enough to audit line by line.

use std::rc::Rc;
use std::time::UNIX_EPOCH;

use gateguard_core::decision::{Decision, Forward};
use gateguard_core::{CompiledPolicy, Request};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel, MapType};

use crate::metrics::Metrics;
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
        let now = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let request = Request {
            method,
            path,
            headers: &headers,
            peer_address: peer.as_deref(),
            now,
        };
        let decision = gateway.policy.evaluate(&request);
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

fn property_string(path: &[&str]) -> Option<String> {
    hostcalls::get_property(path.to_vec())
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}
