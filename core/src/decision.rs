//! What the gateway does with a request, and the one place where every refusal is mapped to
//! its status, message, stat and log reason (docs/policy.md lists them check by check).

use std::borrow::Cow;

use crate::client_cert::{AcceptedCertificate, CertError};
use crate::header_rules::HeaderError;
use crate::ip_filter::ClientIpError;
use crate::jwt::JwtError;
use crate::limits::LimitError;
use crate::methods::MethodError;
use crate::path::PathError;
use crate::rate_limit::store::{count_call, Count, CounterStorePolicy};
use crate::rate_limit::{hh_mm_ss, CallCount, LimitKind, Standing};
use crate::replay::etcd::{Answer, Failure, OnUnavailable, RemoteCheck};
use crate::replay::Verdict;
use crate::shared_data::SharedStore;
use crate::subscription_key::KeyError;

/// One Envoy counter each: `gateguard.<api>.<name>` (or `gateguard.<name>` without an API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Allowed,
    Preflight,
    CorsDenied,
    IpDenied,
    CertDenied,
    KeyDenied,
    JwtDenied,
    ClaimsDenied,
    ReplayDenied,
    ReplayStoreFull,
    ReplayUnavailable,
    MethodDenied,
    LimitDenied,
    HeaderDenied,
    RateLimited,
    QuotaExceeded,
    /// The rate-limit counters could not count (store full or unusable): refused, fail closed.
    LimitUnavailable,
    NotFound,
    BadRequest,
    /// No policy loaded: no counter (counters are defined from the policy), but the filter
    /// state and the audit line name it.
    NotConfigured,
}

impl Outcome {
    /// Outcomes counted per API.
    pub const PER_API: [Outcome; 17] = [
        Outcome::Allowed,
        Outcome::Preflight,
        Outcome::CorsDenied,
        Outcome::IpDenied,
        Outcome::CertDenied,
        Outcome::KeyDenied,
        Outcome::JwtDenied,
        Outcome::ClaimsDenied,
        Outcome::ReplayDenied,
        Outcome::ReplayStoreFull,
        Outcome::ReplayUnavailable,
        Outcome::MethodDenied,
        Outcome::LimitDenied,
        Outcome::HeaderDenied,
        Outcome::RateLimited,
        Outcome::QuotaExceeded,
        Outcome::LimitUnavailable,
    ];
    /// Outcomes counted before any API is known.
    pub const GLOBAL: [Outcome; 2] = [Outcome::NotFound, Outcome::BadRequest];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Preflight => "preflight",
            Outcome::CorsDenied => "cors_denied",
            Outcome::IpDenied => "ip_denied",
            Outcome::CertDenied => "cert_denied",
            Outcome::KeyDenied => "key_denied",
            Outcome::JwtDenied => "jwt_denied",
            Outcome::ClaimsDenied => "claims_denied",
            Outcome::ReplayDenied => "replay_denied",
            Outcome::ReplayStoreFull => "replay_store_full",
            Outcome::ReplayUnavailable => "replay_unavailable",
            Outcome::MethodDenied => "method_denied",
            Outcome::LimitDenied => "limit_denied",
            Outcome::HeaderDenied => "header_denied",
            Outcome::RateLimited => "rate_limited",
            Outcome::QuotaExceeded => "quota_exceeded",
            Outcome::LimitUnavailable => "limit_unavailable",
            Outcome::NotFound => "not_found",
            Outcome::BadRequest => "bad_request",
            Outcome::NotConfigured => "not_configured",
        }
    }
}

/// Why a request was refused. Each variant maps to exactly one status and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The filter has no policy: every request fails closed.
    NotConfigured,
    NotFound,
    BadPath(PathError),
    Cors,
    Ip(Option<ClientIpError>),
    Cert(CertError),
    Key(KeyError),
    Jwt(JwtError),
    Replay(Verdict),
    /// Not one of the API's methods; `allow` is the `Allow` header.
    Method {
        why: MethodError,
        allow: String,
    },
    Limit(LimitError),
    Header(HeaderError),
    /// Over the rate limit (429) or the quota (403) until `retry_after` seconds from now.
    OverLimit {
        kind: LimitKind,
        limit: u32,
        retry_after: u64,
    },
    /// The counters could not count this call: `full` (every slot of its bucket holds another
    /// live caller) for `retry_after` seconds, or the store failed.
    LimitUnavailable {
        kind: LimitKind,
        full: Option<u64>,
    },
    /// Calls are counted by subject, and the valid token has no `sub` to count them by.
    NoSubject,
}

pub const MSG_NOT_CONFIGURED: &str = "Gateway not configured";
pub const MSG_NOT_FOUND: &str = "Resource not found";
pub const MSG_BAD_PATH: &str = "Bad request path";
pub const MSG_CORS: &str = "CORS origin not allowed";
pub const MSG_IP: &str = "Forbidden: client IP not allowed";
pub const MSG_CERT: &str = "Invalid client certificate";
pub const MSG_KEY_MISSING: &str = "Access denied due to missing subscription key. Make sure to include subscription key when making requests to an API.";
pub const MSG_KEY_INVALID: &str = "Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription.";
pub const MSG_JWT_MISSING: &str = "Missing or malformed Authorization header";
pub const MSG_JWT_MALFORMED: &str = "Malformed token or missing expiration";
pub const MSG_JWT_INVALID: &str = "Invalid or expired token";
pub const MSG_CLAIMS: &str = "Insufficient claims";
pub const MSG_REPLAY: &str = "Token replay detected";
pub const MSG_REPLAY_FULL: &str = "Replay protection unavailable: token store is full";
pub const MSG_REPLAY_UNAVAILABLE: &str = "Replay protection unavailable";
pub const MSG_DPOP: &str = "Invalid DPoP proof";
pub const MSG_CERTIFICATE_BOUND: &str = "Certificate-bound token presented without its certificate";
pub const MSG_METHOD: &str = "Method not allowed";
pub const MSG_HEADERS_TOO_LARGE: &str = "Request header fields too large";
pub const MSG_BODY_TOO_LARGE: &str = "Request entity too large";
pub const MSG_LIMIT_UNAVAILABLE: &str = "Rate limit unavailable";
pub const MSG_LIMIT_FULL: &str = "Rate limit unavailable: counter store is full";
pub const MSG_REPLAY_ETCD_UNAVAILABLE: &str =
    "Replay protection unavailable: the shared replay store did not answer";

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::NotConfigured => 503,
            Refusal::NotFound => 404,
            Refusal::BadPath(_) => 400,
            Refusal::Cors | Refusal::Ip(_) | Refusal::Cert(_) => 403,
            Refusal::Key(_) => 401,
            Refusal::Jwt(JwtError::InsufficientClaims) => 403,
            Refusal::Jwt(_) => 401,
            Refusal::Replay(Verdict::Replay | Verdict::MissingIp | Verdict::Expired) => 401,
            Refusal::Replay(_) => 503,
            Refusal::Method { .. } => 405,
            Refusal::Limit(e) if e.is_body() => 413,
            Refusal::Limit(_) => 431,
            Refusal::Header(_) => 400,
            Refusal::OverLimit {
                kind: LimitKind::Rate,
                ..
            } => 429,
            Refusal::OverLimit {
                kind: LimitKind::Quota,
                ..
            }
            | Refusal::NoSubject => 403,
            Refusal::LimitUnavailable { .. } => 503,
        }
    }

    pub fn message(&self) -> Cow<'static, str> {
        let constant = match self {
            Refusal::Header(e) => return Cow::Owned(e.message()),
            Refusal::OverLimit {
                kind: LimitKind::Rate,
                retry_after,
                ..
            } => {
                return Cow::Owned(format!(
                    "Rate limit is exceeded. Try again in {retry_after} seconds."
                ))
            }
            Refusal::OverLimit {
                kind: LimitKind::Quota,
                retry_after,
                ..
            } => {
                return Cow::Owned(format!(
                    "Out of call volume quota. Quota will be replenished in {}.",
                    hh_mm_ss(*retry_after)
                ))
            }
            Refusal::Method { .. } => MSG_METHOD,
            Refusal::Limit(e) if e.is_body() => MSG_BODY_TOO_LARGE,
            Refusal::Limit(_) => MSG_HEADERS_TOO_LARGE,
            Refusal::LimitUnavailable { full: Some(_), .. } => MSG_LIMIT_FULL,
            Refusal::LimitUnavailable { full: None, .. } => MSG_LIMIT_UNAVAILABLE,
            Refusal::NoSubject => MSG_CLAIMS,
            Refusal::NotConfigured => MSG_NOT_CONFIGURED,
            Refusal::NotFound => MSG_NOT_FOUND,
            Refusal::BadPath(_) => MSG_BAD_PATH,
            Refusal::Cors => MSG_CORS,
            Refusal::Ip(_) => MSG_IP,
            Refusal::Cert(_) => MSG_CERT,
            Refusal::Key(KeyError::Missing) => MSG_KEY_MISSING,
            Refusal::Key(KeyError::Invalid) => MSG_KEY_INVALID,
            Refusal::Jwt(JwtError::MissingHeader) => MSG_JWT_MISSING,
            Refusal::Jwt(JwtError::Malformed) => MSG_JWT_MALFORMED,
            Refusal::Jwt(JwtError::Invalid(_) | JwtError::OtherEntraVersion(_)) => MSG_JWT_INVALID,
            Refusal::Jwt(JwtError::InsufficientClaims) => MSG_CLAIMS,
            Refusal::Jwt(JwtError::CertificateBound) => MSG_CERTIFICATE_BOUND,
            Refusal::Jwt(JwtError::Dpop(_)) => MSG_DPOP,
            Refusal::Replay(Verdict::Replay | Verdict::MissingIp) => MSG_REPLAY,
            Refusal::Replay(Verdict::Expired) => MSG_JWT_INVALID,
            Refusal::Replay(Verdict::StoreFull) => MSG_REPLAY_FULL,
            Refusal::Replay(Verdict::EtcdUnavailable) => MSG_REPLAY_ETCD_UNAVAILABLE,
            Refusal::Replay(_) => MSG_REPLAY_UNAVAILABLE,
        };
        Cow::Borrowed(constant)
    }

    pub fn outcome(&self) -> Outcome {
        match self {
            Refusal::NotConfigured => Outcome::NotConfigured,
            Refusal::NotFound => Outcome::NotFound,
            Refusal::BadPath(_) => Outcome::BadRequest,
            Refusal::Cors => Outcome::CorsDenied,
            Refusal::Ip(_) => Outcome::IpDenied,
            Refusal::Cert(_) => Outcome::CertDenied,
            Refusal::Key(_) => Outcome::KeyDenied,
            Refusal::Jwt(JwtError::InsufficientClaims) => Outcome::ClaimsDenied,
            Refusal::Jwt(_) | Refusal::Replay(Verdict::Expired) => Outcome::JwtDenied,
            Refusal::Replay(Verdict::Replay | Verdict::MissingIp) => Outcome::ReplayDenied,
            Refusal::Replay(Verdict::StoreFull) => Outcome::ReplayStoreFull,
            Refusal::Replay(_) => Outcome::ReplayUnavailable,
            Refusal::Method { .. } => Outcome::MethodDenied,
            Refusal::Limit(_) => Outcome::LimitDenied,
            Refusal::Header(_) => Outcome::HeaderDenied,
            Refusal::OverLimit {
                kind: LimitKind::Rate,
                ..
            } => Outcome::RateLimited,
            Refusal::OverLimit {
                kind: LimitKind::Quota,
                ..
            } => Outcome::QuotaExceeded,
            Refusal::LimitUnavailable { .. } => Outcome::LimitUnavailable,
            Refusal::NoSubject => Outcome::ClaimsDenied,
        }
    }

    /// The check that refused, for logs.
    pub fn check(&self) -> &'static str {
        match self {
            Refusal::NotConfigured => "configuration",
            Refusal::NotFound => "routing",
            Refusal::BadPath(_) => "path",
            Refusal::Cors => "cors",
            Refusal::Ip(_) => "ip_filter",
            Refusal::Cert(_) => "client_certificate",
            Refusal::Key(_) => "subscription_key",
            Refusal::Jwt(JwtError::InsufficientClaims) => "claims",
            Refusal::Jwt(_) => "jwt",
            Refusal::Replay(_) => "replay",
            Refusal::Method { .. } => "methods",
            Refusal::Limit(_) => "limits",
            Refusal::Header(_) => "headers",
            Refusal::OverLimit {
                kind: LimitKind::Rate,
                ..
            }
            | Refusal::LimitUnavailable {
                kind: LimitKind::Rate,
                ..
            } => "rate_limit",
            Refusal::OverLimit { .. } | Refusal::LimitUnavailable { .. } => "quota",
            Refusal::NoSubject => "claims",
        }
    }

    /// A short machine reason for logs; never contains request content.
    pub fn reason(&self) -> &str {
        match self {
            Refusal::NotConfigured => "no policy loaded",
            Refusal::NotFound => "no API matches the path",
            Refusal::BadPath(e) => e.reason(),
            Refusal::Cors => "origin or method not allowed",
            Refusal::Ip(Some(e)) => e.reason(),
            Refusal::Ip(None) => "client IP not admitted",
            Refusal::Cert(e) => e.reason(),
            Refusal::Key(e) => e.reason(),
            Refusal::Jwt(e) => e.reason(),
            Refusal::Replay(v) => v.reason(),
            Refusal::Method { why, .. } => why.reason(),
            Refusal::Limit(e) => e.reason(),
            Refusal::Header(e) => e.reason(),
            Refusal::OverLimit {
                kind: LimitKind::Rate,
                ..
            } => "rate limit exceeded",
            Refusal::OverLimit { .. } => "quota exceeded",
            Refusal::LimitUnavailable { full: Some(_), .. } => "counter store full",
            Refusal::LimitUnavailable { full: None, .. } => "counter store unusable",
            Refusal::NoSubject => "token has no sub to count its calls by",
        }
    }

    /// Extra response headers the refusal carries (RFC 6750 for JWT refusals).
    pub fn headers(&self) -> Vec<(String, String)> {
        match self {
            Refusal::Method { allow, .. } => return vec![("allow".to_string(), allow.clone())],
            Refusal::OverLimit {
                limit, retry_after, ..
            } => {
                let mut headers = vec![("retry-after".to_string(), retry_after.to_string())];
                let standing = Standing {
                    limit: *limit,
                    remaining: 0,
                    reset: *retry_after,
                };
                headers.extend(standing.headers());
                return headers;
            }
            Refusal::LimitUnavailable {
                full: Some(retry_after),
                ..
            } => return vec![("retry-after".to_string(), retry_after.to_string())],
            _ => {}
        }
        if let Refusal::Jwt(JwtError::Dpop(_)) = self {
            let challenge = format!(
                r#"DPoP error="invalid_dpop_proof", algs="{}""#,
                crate::jwt::dpop::PROOF_ALGS_TEXT
            );
            return vec![("www-authenticate".to_string(), challenge)];
        }
        let challenge = match self {
            Refusal::Jwt(JwtError::InsufficientClaims) | Refusal::NoSubject => {
                r#"Bearer error="insufficient_scope""#
            }
            Refusal::Jwt(_)
            | Refusal::Replay(Verdict::Replay | Verdict::MissingIp | Verdict::Expired) => {
                r#"Bearer error="invalid_token""#
            }
            _ => return Vec::new(),
        };
        vec![("www-authenticate".to_string(), challenge.to_string())]
    }

    /// APIM's error shape: `{"statusCode": N, "message": "..."}`.
    pub fn body(&self) -> String {
        // Built by hand to keep APIM's key order; a message may name a header (from the
        // policy, never from the request), escaped anyway.
        let message = serde_json::Value::from(self.message());
        format!(r#"{{"statusCode":{},"message":{message}}}"#, self.status())
    }
}

/// A response the gateway sends itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// What to change on a request that goes upstream, and on its response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forward {
    pub api: usize,
    /// Client-sent headers the gateway owns (injected, claims, key, certificate headers).
    pub remove_request_headers: Vec<String>,
    pub set_request_headers: Vec<(String, String)>,
    /// A new `:path` when the gateway removed its own query parameter.
    pub new_path: Option<String>,
    /// CORS headers for the upstream's response.
    pub response_headers: Vec<(String, String)>,
    /// An accepted client certificate close to expiry: worth a gauge and a daily log line.
    pub expiring_certificate: Option<AcceptedCertificate>,
    /// etcd could not decide and `on_unavailable` is `allow`: forwarded unchecked (counted
    /// and logged by the adapter).
    pub replay_unchecked: Option<Failure>,
    /// `limits.max_body_bytes`: the adapter counts the body as it streams and refuses it the
    /// moment it goes over ([`crate::limits::BodyCounter`]).
    pub max_body_bytes: Option<u64>,
    /// Of the rate limits and quotas the request counted against, the tightest: its
    /// `x-ratelimit-*` response headers.
    pub standing: Option<Standing>,
}

impl Forward {
    /// Counts this request against each of `calls` (a rate limit, then a quota) at `now`: the
    /// tightest standing goes on the response's headers; the first limit with no call left, or
    /// a store that cannot count, refuses.
    pub fn count_calls(
        &mut self,
        store: &dyn SharedStore,
        counters: &CounterStorePolicy,
        calls: &[CallCount],
        now: u64,
    ) -> Result<(), Refusal> {
        for call in calls {
            let kind = call.limit.kind;
            match count_call(
                store,
                counters,
                call.id,
                call.limit.calls,
                call.limit.period,
                now,
            ) {
                Count::Counted(standing) => {
                    let tightest = self.standing.map_or(standing, |s| s.tighter(standing));
                    self.standing = Some(tightest);
                    self.response_headers
                        .retain(|(n, _)| !n.starts_with("x-ratelimit-"));
                    self.response_headers.extend(tightest.headers());
                }
                Count::Exceeded { limit, retry_after } => {
                    return Err(Refusal::OverLimit {
                        kind,
                        limit,
                        retry_after,
                    })
                }
                Count::Full { retry_after } => {
                    return Err(Refusal::LimitUnavailable {
                        kind,
                        full: Some(retry_after),
                    })
                }
                Count::Unavailable => return Err(Refusal::LimitUnavailable { kind, full: None }),
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Answer locally: a preflight (204) or a refusal.
    Reply {
        api: Option<usize>,
        outcome: Outcome,
        refusal: Option<Refusal>,
        reply: LocalReply,
    },
    Forward(Forward),
    /// Every check passed but replay, which only etcd can decide: ask it, then
    /// [`Pending::resolve`].
    Ask(Box<Pending>),
}

/// A request waiting for etcd: what it becomes upstream if etcd accepts the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub forward: Forward,
    pub check: RemoteCheck,
    /// What `check` is about.
    pub about: Subject,
    /// Another check once this one accepted (a DPoP proof's `jti` after its token's replay
    /// check).
    pub then: Option<(RemoteCheck, Subject)>,
    /// Calls counted by subject: the token is valid only once etcd accepted it, so they are
    /// counted then, and a token etcd refuses spends nothing (docs/policy.md, "Rate limits and
    /// quotas").
    pub count_after: Vec<CallCount>,
    /// The counter store `count_after` counts in.
    pub counters: CounterStorePolicy,
}

/// What an etcd check records: a token's use, or a DPoP proof's `jti`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Token,
    DpopProof,
}

impl Pending {
    /// The decision once etcd answered (or could not): its verdict, or `on_unavailable`. A
    /// request that goes upstream then counts its `count_after` calls in `store` at `now`.
    pub fn resolve(
        self,
        answer: Result<Answer, Failure>,
        on_unavailable: OnUnavailable,
        store: &dyn SharedStore,
        now: u64,
    ) -> Decision {
        let mut forward = self.forward;
        let api = Some(forward.api);
        let (calls, counters) = (self.count_after, self.counters);
        let counted =
            |mut forward: Forward| match forward.count_calls(store, &counters, &calls, now) {
                Ok(()) => Decision::Forward(forward),
                Err(refusal) => Decision::refuse(api, refusal, &forward.response_headers),
            };
        match answer {
            Ok(answer) if answer.verdict.is_accepted() => match self.then {
                Some((check, about)) => Decision::Ask(Box::new(Pending {
                    forward,
                    check,
                    about,
                    then: None,
                    count_after: calls,
                    counters,
                })),
                None => counted(forward),
            },
            Ok(answer) => {
                let refusal = match (self.about, answer.verdict) {
                    (Subject::DpopProof, Verdict::Replay) => {
                        Refusal::Jwt(JwtError::Dpop(crate::jwt::dpop::DpopError::Replayed))
                    }
                    (_, verdict) => Refusal::Replay(verdict),
                };
                Decision::refuse(api, refusal, &forward.response_headers)
            }
            Err(failure) => match on_unavailable {
                OnUnavailable::Allow => {
                    forward.replay_unchecked = Some(failure);
                    counted(forward)
                }
                OnUnavailable::Deny => Decision::refuse(
                    api,
                    Refusal::Replay(Verdict::EtcdUnavailable),
                    &forward.response_headers,
                ),
            },
        }
    }
}

impl Decision {
    /// The outcome counted for this decision (`Allowed` for a request still waiting for etcd,
    /// which the adapter counts once resolved).
    pub fn outcome(&self) -> Outcome {
        match self {
            Decision::Reply { outcome, .. } => *outcome,
            Decision::Forward(_) | Decision::Ask(_) => Outcome::Allowed,
        }
    }

    pub fn refuse(api: Option<usize>, refusal: Refusal, cors: &[(String, String)]) -> Self {
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        headers.extend(refusal.headers());
        // The response headers gathered so far (CORS, the standing of a limit that passed),
        // unless the refusal says otherwise (a limit that refused states its own standing).
        let own = headers.len();
        for (name, value) in cors {
            if !headers.iter().take(own).any(|(n, _)| n == name) {
                headers.push((name.clone(), value.clone()));
            }
        }
        Decision::Reply {
            api,
            outcome: refusal.outcome(),
            reply: LocalReply {
                status: refusal.status(),
                headers,
                body: refusal.body(),
            },
            refusal: Some(refusal),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_apim_shaped_json() {
        let body: serde_json::Value =
            serde_json::from_str(&Refusal::Key(KeyError::Missing).body()).unwrap();
        assert_eq!(body["statusCode"], 401);
        assert_eq!(body["message"], MSG_KEY_MISSING);
        let d = Decision::refuse(Some(0), Refusal::Cors, &[]);
        let Decision::Reply { reply, outcome, .. } = d else {
            panic!()
        };
        assert_eq!(reply.status, 403);
        assert_eq!(outcome, Outcome::CorsDenied);
        assert!(reply
            .headers
            .contains(&("content-type".into(), "application/json".into())));
    }

    #[test]
    fn an_unconfigured_filter_fails_closed_with_503() {
        let Decision::Reply { reply, outcome, .. } =
            Decision::refuse(None, Refusal::NotConfigured, &[])
        else {
            panic!()
        };
        assert_eq!(
            reply.body,
            r#"{"statusCode":503,"message":"Gateway not configured"}"#
        );
        assert_eq!(
            reply.headers,
            vec![("content-type".into(), "application/json".into())]
        );
        assert_eq!((reply.status, outcome.name()), (503, "not_configured"));
    }
}
