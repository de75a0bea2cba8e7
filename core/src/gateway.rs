//! The pipeline: request facts in, decision out. Checks run in SPEC order; the first refusal
//! wins; nothing here talks to the host except through the `Host` trait.

use crate::client_cert::{CertError, CertSource, Malformed, PresentedCertificates};
use crate::config::{ApiPolicy, CompiledPolicy};
use crate::cors::CorsVerdict;
use crate::decision::{Decision, Forward, LocalReply, Outcome, Refusal};
use crate::ip_filter::client_ip;
use crate::path::{normalize, prefix_matches};
use crate::subscription_key::strip_query_param;

/// Facts about one request, collected by the adapter.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// `:path`, with its query string.
    pub path: &'a str,
    /// Every request header, names lower-case (as Envoy presents them).
    pub headers: &'a [(String, String)],
    /// Envoy's `source.address`, `ip:port`.
    pub peer_address: Option<&'a str>,
    /// Envoy's `connection.peer_certificate`: the TLS client certificate, PEM.
    pub peer_certificate: Option<&'a [u8]>,
    /// Unix seconds from the host clock.
    pub now: u64,
}

impl<'a> Request<'a> {
    pub fn header_values(&self, name: &str) -> Vec<&'a str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

impl CompiledPolicy {
    /// The API with the longest matching `path_prefix`.
    pub fn route(&self, normalized_path: &str) -> Option<usize> {
        self.apis
            .iter()
            .enumerate()
            .filter(|(_, a)| prefix_matches(&a.path_prefix, normalized_path))
            .max_by_key(|(_, a)| a.path_prefix.len())
            .map(|(i, _)| i)
    }

    /// Whether any API takes its client certificate from the TLS connection.
    pub fn reads_peer_certificate(&self) -> bool {
        self.apis.iter().any(|a| {
            a.client_certificate
                .as_ref()
                .is_some_and(|c| c.sources().contains(&CertSource::Connection))
        })
    }

    pub fn evaluate(&self, req: &Request<'_>) -> Decision {
        let path = match normalize(req.path) {
            Ok(p) => p,
            Err(e) => return Decision::refuse(None, Refusal::BadPath(e), &[]),
        };
        let Some(api_index) = self.route(&path.normalized) else {
            return Decision::refuse(None, Refusal::NotFound, &[]);
        };
        let Some(api) = self.apis.get(api_index) else {
            return Decision::refuse(None, Refusal::NotFound, &[]);
        };
        let refuse =
            |refusal, cors: &[(String, String)]| Decision::refuse(Some(api_index), refusal, cors);

        // 1. CORS
        let mut cors_headers = Vec::new();
        if let Some(cors) = &api.cors {
            let origins = req.header_values("origin");
            let preflight_method = if req.method.eq_ignore_ascii_case("OPTIONS") {
                req.header_values("access-control-request-method")
                    .first()
                    .copied()
            } else {
                None
            };
            match cors.evaluate(&origins, preflight_method) {
                CorsVerdict::NotCors => {}
                CorsVerdict::Denied => return refuse(Refusal::Cors, &[]),
                CorsVerdict::Allowed(h) => cors_headers = h,
                CorsVerdict::Preflight(h) => {
                    return Decision::Reply {
                        api: Some(api_index),
                        outcome: Outcome::Preflight,
                        refusal: None,
                        reply: LocalReply {
                            status: 204,
                            headers: h,
                            body: String::new(),
                        },
                    }
                }
            }
        }

        // 2. IP filter
        if let Some(filter) = &api.ip_filter {
            let xff = req.header_values("x-forwarded-for");
            match client_ip(&self.client_ip, req.peer_address, &xff) {
                Ok(ip) if filter.admits(ip) => {}
                Ok(_) => return refuse(Refusal::Ip(None), &cors_headers),
                Err(e) => return refuse(Refusal::Ip(Some(e)), &cors_headers),
            }
        }

        let mut forward = Forward {
            api: api_index,
            response_headers: cors_headers.clone(),
            ..Forward::default()
        };

        // 3. Client certificate
        if let Some(certs) = &api.client_certificate {
            let xfcc = req.header_values("x-forwarded-client-cert");
            let arr = req.header_values("x-arr-clientcert");
            for (source, values) in [(CertSource::Xfcc, &xfcc), (CertSource::Arr, &arr)] {
                if values.len() > 1 && certs.sources().contains(&source) {
                    // One certificate per request; two headers are a forgery attempt or a bug.
                    let why = Malformed::DuplicateHeader;
                    return refuse(
                        Refusal::Cert(CertError::Unparseable { source, why }),
                        &cors_headers,
                    );
                }
            }
            let presented = PresentedCertificates {
                connection: req.peer_certificate,
                xfcc: xfcc.first().copied(),
                arr: arr.first().copied(),
            };
            match certs.check(&presented, req.now) {
                Ok(accepted) => {
                    if accepted.expires_within_warning {
                        forward.expiring_certificate = Some(accepted);
                    }
                }
                Err(e) => return refuse(Refusal::Cert(e), &cors_headers),
            }
            // The gateway is the certificate authority for this API: forwarded-certificate
            // headers from the client must not reach a backend that might trust them.
            for source in CertSource::ALL {
                if let Some(name) = source.header_name() {
                    forward.remove_request_headers.push(name.to_string());
                }
            }
        }

        // 4. Subscription key
        if let Some(keys) = &api.subscription_key {
            let values = req.header_values(keys.header_name());
            if let Err(e) = keys.check(&values, path.query) {
                return refuse(Refusal::Key(e), &cors_headers);
            }
            forward
                .remove_request_headers
                .push(keys.header_name().to_string());
            if let (Some(name), Some(query)) = (keys.query_name(), path.query) {
                let stripped = strip_query_param(query, name);
                if stripped.len() != query.len() {
                    forward.new_path = Some(if stripped.is_empty() {
                        path.raw.to_string()
                    } else {
                        format!("{}?{stripped}", path.raw)
                    });
                }
            }
        }

        apply_injections(api, &mut forward);
        Decision::Forward(forward)
    }
}

fn apply_injections(api: &ApiPolicy, forward: &mut Forward) {
    for (name, value) in &api.inject_headers {
        forward.remove_request_headers.push(name.clone());
        forward
            .set_request_headers
            .push((name.clone(), value.clone()));
    }
}
