//! The pipeline: request facts in, decision out. Checks run in the order docs/policy.md
//! states (CORS, IP filter, client certificate, subscription key, JWT, replay); the first refusal
//! wins; nothing here talks to the host except through the `Host` trait.

use crate::client_cert::{CertError, CertSource, Malformed, PresentedCertificates};
use std::net::IpAddr;
use std::rc::Rc;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::{ApiPolicy, CompiledPolicy};
use crate::cors::CorsVerdict;
use crate::decision::{Decision, Forward, LocalReply, Outcome, Pending, Refusal, Subject};
use crate::headers::{
    every_spelling, same_header_name, METHOD_OVERRIDE_HEADERS, METHOD_OVERRIDE_QUERY,
    PATH_OVERRIDE_HEADERS,
};
use crate::ip_filter::client_ip;
use crate::ip_filter::ClientIpError;
use crate::jwt::dpop::{check_proof, AcceptedProof, DpopError, ProofTarget};
use crate::jwt::sources::{cookie_without, find_token, Found};
use crate::jwt::{
    Binding, InvalidReason, JwtError, JwtPolicy, KeySet, Provider, MAX_CLOCK_SKEW_SECONDS,
};
use crate::memo::{KnownToken, ReplayMemo, TokenMemo, Verifier};
use crate::path::{normalize, prefix_matches, RequestPath};
use crate::query::{query_values, strip_query_param};
use crate::rate_limit::{CallCount, Caller, LimitKey};
use crate::replay::etcd::{lookup_cached, RemoteCheck};
use crate::replay::{check_and_record, ReplayMode, ReplayOutcome, TokenRef, Verdict};
use crate::shared_data::{SetError, SharedStore, StoreError};

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
    /// Envoy's `metadata`: the request's dynamic metadata, a serialised
    /// `envoy.config.core.v3.Metadata`, where `jwt_authn` leaves the payloads it verified
    /// (read only when an API has `jwt.verify_with: "envoy"`).
    pub dynamic_metadata: Option<&'a [u8]>,
    /// Unix seconds from the host clock.
    pub now: u64,
}

/// Host-backed state the pipeline needs beyond the request: the APIs' current key sets, the
/// verified-token cache and the replay store (all in Envoy shared data in the filter; in
/// memory in tests).
pub trait Host {
    /// The current key set of the identity provider in key slot `slot` ([`Provider::slot`];
    /// `None` while a remote JWKS has not been fetched yet).
    fn jwt_keys(&self, slot: usize) -> Option<Rc<KeySet>>;
    /// A cached verified token: (claims, exp), only if not expired at `now`.
    fn cached_token(&self, key: &[u8; 32], now: u64) -> Option<(Rc<Map<String, Value>>, u64)>;
    fn cache_token(&self, key: &[u8; 32], exp: u64, claims: &Map<String, Value>);
    /// A token named a `kid` the key set in `slot` lacks: the JWKS may have rotated.
    fn unknown_kid(&self, slot: usize);
    fn replay_store(&self) -> &dyn SharedStore;
    /// Key prefix of the replay buckets in the store.
    fn replay_prefix(&self) -> &str;
    /// Telemetry: cache hits and misses, replay CAS retries and reclaimed entries.
    fn note(&self, _api: usize, _event: Event) {}
    /// Replay facts this worker already saw decided ([`ReplayMemo`]), if the host keeps them.
    fn replay_memo(&self) -> Option<&ReplayMemo> {
        None
    }
    /// Tokens this worker already saw verified ([`TokenMemo`]), if the host keeps them.
    fn token_memo(&self) -> Option<&TokenMemo> {
        None
    }
    /// Where rate-limit and quota counters live: the same shared data as the replay store.
    fn counter_store(&self) -> &dyn SharedStore {
        self.replay_store()
    }
    /// The secret counter ids are keyed with, the same in every worker
    /// ([`crate::rate_limit::store::counter_secret`]).
    fn limit_secret(&self) -> [u8; 32] {
        [0; 32]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    JwtCacheHit,
    JwtCacheMiss,
    Replay(ReplayOutcome),
    /// With the etcd store: the local cache decided, no round trip.
    ReplayCacheHit,
}

/// A host with no JWT or replay configured: for policies that use neither, and for tests.
pub struct NoHost;

impl Host for NoHost {
    fn jwt_keys(&self, _slot: usize) -> Option<Rc<KeySet>> {
        None
    }
    fn cached_token(&self, _key: &[u8; 32], _now: u64) -> Option<(Rc<Map<String, Value>>, u64)> {
        None
    }
    fn cache_token(&self, _key: &[u8; 32], _exp: u64, _claims: &Map<String, Value>) {}
    fn unknown_kid(&self, _slot: usize) {}
    fn replay_store(&self) -> &dyn SharedStore {
        &UNAVAILABLE
    }
    fn replay_prefix(&self) -> &str {
        ""
    }
}

struct Unavailable;
static UNAVAILABLE: Unavailable = Unavailable;

impl SharedStore for Unavailable {
    fn get(&self, _key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        Ok(None)
    }
    fn set(&self, _key: &str, _value: &[u8], _cas: u32) -> Result<(), SetError> {
        Err(SetError::CasMismatch)
    }
}

impl<'a> Request<'a> {
    pub fn header_values(&self, name: &str) -> Vec<&'a str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The method and every method a backend may treat the request as (override headers in
    /// any spelling, `_method` in the query, GET for HEAD): method-scoped rules apply to each.
    pub fn effective_methods(&self, query: Option<&str>) -> Vec<String> {
        let mut methods = vec![self.method.to_string()];
        // Express, Flask, Spring and others serve HEAD with the GET handler.
        if self.method.eq_ignore_ascii_case("HEAD") {
            methods.push("GET".to_string());
        }
        let overrides = self
            .headers
            .iter()
            .filter(|(k, _)| {
                METHOD_OVERRIDE_HEADERS
                    .iter()
                    .any(|h| same_header_name(h, k))
            })
            .map(|(_, v)| v.as_bytes().to_vec());
        let in_query = query
            .map(|q| query_values(q, METHOD_OVERRIDE_QUERY))
            .unwrap_or_default();
        for value in overrides.chain(in_query) {
            for method in String::from_utf8_lossy(&value).split(',') {
                let method = method.trim();
                // Duplicates are kept: a rule applies if any entry names one of its methods,
                // and a check for them would be quadratic in a 60 KB header.
                if !method.is_empty() {
                    methods.push(method.to_string());
                }
            }
        }
        methods
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

    /// The client IP as the IP filter and replay detection see it (for audit lines).
    pub fn client_ip(&self, req: &Request<'_>) -> Option<IpAddr> {
        client_ip(
            &self.client_ip,
            req.peer_address,
            &req.header_values("x-forwarded-for"),
        )
        .ok()
    }

    /// Whether any API needs the connection's peer address: to filter or bind the client IP, or
    /// to trust forwarded certificate or URL headers. The audit line of a refusal reads it anyway.
    pub fn reads_peer_address(&self) -> bool {
        self.apis.iter().any(|a| {
            a.ip_filter.is_some()
                || a.client_certificate.is_some()
                || a.replay == Some(ReplayMode::WithIp)
                // A DPoP proof's URL comes from a trusted proxy's forwarded headers.
                || a.jwt.as_ref().is_some_and(|j| j.dpop().is_some())
                || a.call_limits.iter().any(|l| l.by == LimitKey::ClientIp)
        })
    }

    /// Whether any API takes its client certificate from the TLS connection.
    pub fn reads_peer_certificate(&self) -> bool {
        self.apis.iter().any(|a| {
            a.client_certificate
                .as_ref()
                .is_some_and(|c| c.sources().contains(&CertSource::Connection))
        })
    }

    /// Whether any API records in the replay store: replay detection, or DPoP proofs' `jti`.
    pub fn uses_replay_store(&self) -> bool {
        self.apis
            .iter()
            .any(|a| a.replay.is_some() || a.jwt.as_ref().is_some_and(|j| j.dpop().is_some()))
    }

    /// Whether any API takes verified JWT payloads from Envoy's `jwt_authn`.
    pub fn reads_dynamic_metadata(&self) -> bool {
        self.apis
            .iter()
            .any(|a| a.jwt.as_ref().is_some_and(JwtPolicy::verified_by_envoy))
    }

    pub fn evaluate(&self, req: &Request<'_>, host: &dyn Host) -> Decision {
        let path = match normalize(req.path) {
            Ok(p) => p,
            Err(e) => return Decision::refuse(None, Refusal::BadPath(e), &[]),
        };
        let Some((api_index, api)) = self
            .route(&path.normalized)
            .and_then(|i| Some((i, self.apis.get(i)?)))
        else {
            return Decision::refuse(None, Refusal::NotFound, &[]);
        };
        let mut checks = Checks {
            policy: self,
            api,
            req,
            path: &path,
            host,
            forward: Forward {
                api: api_index,
                ..Forward::default()
            },
            client_ip: Err(ClientIpError::NoPeer),
            ask_etcd: Vec::new(),
            certificate_sha256: None,
            key_sha256: None,
            claims: None,
            count_after: Vec::new(),
        };
        match checks.run() {
            Ok(Passed::Forward) => {
                let mut asks = checks.ask_etcd.into_iter();
                match asks.next() {
                    Some((check, about)) => Decision::Ask(Box::new(Pending {
                        forward: checks.forward,
                        check,
                        about,
                        then: asks.next(),
                        count_after: checks.count_after,
                        counters: self.limit_counters,
                    })),
                    None => Decision::Forward(checks.forward),
                }
            }
            Ok(Passed::Preflight(headers)) => Decision::Reply {
                api: Some(api_index),
                outcome: Outcome::Preflight,
                refusal: None,
                reply: LocalReply {
                    status: 204,
                    headers,
                    body: String::new(),
                },
            },
            // Refusals carry the CORS headers once the origin is known to be allowed.
            Err(refusal) => {
                Decision::refuse(Some(api_index), refusal, &checks.forward.response_headers)
            }
        }
    }
}

/// How a request left the checks without a refusal.
enum Passed {
    Forward,
    /// A CORS preflight, answered by the gateway with these headers.
    Preflight(Vec<(String, String)>),
}

/// One request going through one API's checks, in the order of docs/policy.md: each step
/// refuses or adds to `forward`, what the request becomes upstream.
struct Checks<'p, 'r> {
    policy: &'p CompiledPolicy,
    api: &'p ApiPolicy,
    req: &'p Request<'r>,
    path: &'p RequestPath<'r>,
    host: &'p dyn Host,
    forward: Forward,
    /// The client IP the IP filter judged, for replay's `with_ip`.
    client_ip: Result<IpAddr, ClientIpError>,
    /// Replay checks only etcd can decide (the etcd store, and a token or DPoP proof its cache
    /// does not know), in order: the request waits for them once every other check passed.
    ask_etcd: Vec<(RemoteCheck, Subject)>,
    /// SHA-256 of the client certificate the API accepted, for certificate-bound tokens.
    certificate_sha256: Option<[u8; 32]>,
    /// SHA-256 of the subscription key the API accepted, for limits counted by key.
    key_sha256: Option<[u8; 32]>,
    /// The valid token's claims, for limits counted by subject.
    claims: Option<Rc<Map<String, Value>>>,
    /// Calls counted by subject while etcd has yet to accept the token: counted once it has.
    count_after: Vec<CallCount>,
}

impl Checks<'_, '_> {
    fn run(&mut self) -> Result<Passed, Refusal> {
        if let Some(preflight) = self.cors()? {
            return Ok(Passed::Preflight(preflight));
        }
        self.ip_filter()?;
        self.methods()?;
        self.limits()?;
        self.header_rules()?;
        self.count_calls(LimitKey::ClientIp)?;
        self.client_certificate()?;
        self.subscription_key()?;
        self.count_calls(LimitKey::SubscriptionKey)?;
        self.jwt_and_replay()?;
        self.count_calls(LimitKey::Subject)?;
        self.gateway_headers();
        Ok(Passed::Forward)
    }

    /// 1. CORS: a preflight is answered here; an allowed origin's headers go on every response.
    fn cors(&mut self) -> Result<Option<Vec<(String, String)>>, Refusal> {
        let Some(cors) = &self.api.cors else {
            return Ok(None);
        };
        let origins = self.req.header_values("origin");
        let preflight_method = if self.req.method.eq_ignore_ascii_case("OPTIONS") {
            self.req
                .header_values("access-control-request-method")
                .first()
                .copied()
        } else {
            None
        };
        match cors.evaluate(&origins, preflight_method) {
            CorsVerdict::NotCors => Ok(None),
            CorsVerdict::Denied => Err(Refusal::Cors),
            CorsVerdict::Allowed(headers) => {
                self.forward.response_headers = headers;
                Ok(None)
            }
            CorsVerdict::Preflight(headers) => Ok(Some(headers)),
        }
    }

    /// 2. IP filter, on the client IP (the peer, or X-Forwarded-For behind trusted proxies).
    fn ip_filter(&mut self) -> Result<(), Refusal> {
        let xff = self.req.header_values("x-forwarded-for");
        self.client_ip = client_ip(&self.policy.client_ip, self.req.peer_address, &xff);
        let Some(filter) = &self.api.ip_filter else {
            return Ok(());
        };
        match self.client_ip {
            Ok(ip) if filter.admits(ip) => Ok(()),
            Ok(_) => Err(Refusal::Ip(None)),
            Err(e) => Err(Refusal::Ip(Some(e))),
        }
    }

    /// Methods: the request's method and every method an override names must be listed.
    fn methods(&mut self) -> Result<(), Refusal> {
        let Some(methods) = &self.api.methods else {
            return Ok(());
        };
        let mut effective = self.req.effective_methods(self.path.query);
        if self.req.method.eq_ignore_ascii_case("HEAD") && effective.len() > 1 {
            // The GET a HEAD is served as is not an override: HEAD is its own listed method.
            effective.remove(1);
        }
        methods.admits(&effective).map_err(|why| Refusal::Method {
            why,
            allow: methods.allow_header().to_string(),
        })
    }

    /// Limits: header sizes and `Content-Length` now; the body as it streams (the adapter
    /// counts it against `forward.max_body_bytes`).
    fn limits(&mut self) -> Result<(), Refusal> {
        let Some(limits) = &self.api.limits else {
            return Ok(());
        };
        limits
            .check_headers(self.req.headers)
            .map_err(Refusal::Limit)?;
        self.forward.max_body_bytes = limits.max_body_bytes;
        Ok(())
    }

    /// Header rules: required, forbidden, patterns.
    fn header_rules(&mut self) -> Result<(), Refusal> {
        let Some(rules) = &self.api.headers else {
            return Ok(());
        };
        rules.check(self.req.headers).map_err(Refusal::Header)
    }

    /// Rate limit, then quota, of the limits counted `by` this caller, now that it is known
    /// (the client IP after the IP filter; a subscription key or a subject once valid). A
    /// token etcd has yet to accept is not known valid: its calls wait for etcd's answer
    /// ([`Pending::resolve`]), so a token etcd refuses spends nothing.
    fn count_calls(&mut self, by: LimitKey) -> Result<(), Refusal> {
        let calls = self.calls_by(by)?;
        if by == LimitKey::Subject && !self.ask_etcd.is_empty() {
            self.count_after = calls;
            return Ok(());
        }
        let store = self.host.counter_store();
        self.forward
            .count_calls(store, &self.policy.limit_counters, &calls, self.req.now)
    }

    /// The calls this request makes against the limits counted `by` this caller.
    fn calls_by(&self, by: LimitKey) -> Result<Vec<CallCount>, Refusal> {
        let mut calls = Vec::new();
        for limit in self.api.call_limits.iter().filter(|l| l.by == by) {
            let kind = limit.kind;
            let unavailable = || Refusal::LimitUnavailable { kind, full: None };
            let caller = match by {
                LimitKey::ClientIp => Caller::Ip(self.client_ip.map_err(|_| unavailable())?),
                LimitKey::SubscriptionKey => {
                    Caller::Key(self.key_sha256.as_ref().ok_or_else(unavailable)?)
                }
                LimitKey::Subject => {
                    let claims = self.claims.as_deref().ok_or_else(unavailable)?;
                    let text = |name: &str| claims.get(name).and_then(Value::as_str);
                    let sub = text("sub")
                        .filter(|s| !s.is_empty())
                        .ok_or(Refusal::NoSubject)?;
                    Caller::Subject {
                        iss: text("iss").unwrap_or_default(),
                        sub,
                    }
                }
            };
            calls.push(CallCount {
                limit: *limit,
                id: limit.counter_id(&self.host.limit_secret(), &self.api.name, &caller),
            });
        }
        Ok(calls)
    }

    /// 3. Client certificate, from the sources the policy lists.
    fn client_certificate(&mut self) -> Result<(), Refusal> {
        let Some(certs) = &self.api.client_certificate else {
            return Ok(());
        };
        // A forwarded certificate is only as good as the proxy that forwarded it.
        let (xfcc, arr) = if self
            .policy
            .client_ip
            .forwarded_headers_from(self.req.peer_address)
        {
            (
                self.req.header_values("x-forwarded-client-cert"),
                self.req.header_values("x-arr-clientcert"),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        for (source, values) in [(CertSource::Xfcc, &xfcc), (CertSource::Arr, &arr)] {
            if values.len() > 1 && certs.sources().contains(&source) {
                // One certificate per request; two headers are a forgery attempt or a bug.
                let why = Malformed::DuplicateHeader;
                return Err(Refusal::Cert(CertError::Unparseable { source, why }));
            }
        }
        let presented = PresentedCertificates {
            connection: self.req.peer_certificate,
            xfcc: xfcc.first().copied(),
            arr: arr.first().copied(),
        };
        let accepted = certs
            .check(&presented, self.req.now)
            .map_err(Refusal::Cert)?;
        self.certificate_sha256 =
            crate::hex::decode(&accepted.sha256_hex).and_then(|d| <[u8; 32]>::try_from(d).ok());
        if accepted.expires_within_warning {
            self.forward.expiring_certificate = Some(accepted);
        }
        // The gateway is the certificate authority for this API: forwarded-certificate
        // headers from the client must not reach a backend that might trust them.
        for source in CertSource::ALL {
            if let Some(name) = source.header_name() {
                self.forward.remove_request_headers.push(name.to_string());
            }
        }
        Ok(())
    }

    /// 4. Subscription key, from its header or its query parameter; both leave the request.
    fn subscription_key(&mut self) -> Result<(), Refusal> {
        let Some(keys) = &self.api.subscription_key else {
            return Ok(());
        };
        let values = self.req.header_values(keys.header_name());
        let digest = keys
            .accept(&values, self.path.query)
            .map_err(Refusal::Key)?;
        self.key_sha256 = Some(digest);
        self.forward
            .remove_request_headers
            .push(keys.header_name().to_string());
        if let Some(name) = keys.query_name() {
            self.strip_query(name);
        }
        Ok(())
    }

    /// Takes a query parameter (in every spelling) out of the path that goes upstream,
    /// after whatever earlier steps took out.
    fn strip_query(&mut self, name: &str) {
        let current = match &self.forward.new_path {
            Some(path) => path.split_once('?').map(|(_, q)| q),
            None => self.path.query,
        };
        let Some(query) = current else {
            return;
        };
        let stripped = strip_query_param(query, name);
        if stripped.len() != query.len() {
            let raw = self.path.raw;
            self.forward.new_path = Some(if stripped.is_empty() {
                raw.to_string()
            } else {
                format!("{raw}?{stripped}")
            });
        }
    }

    /// 5. JWT, then 6. replay; the token's claims become upstream headers.
    fn jwt_and_replay(&mut self) -> Result<(), Refusal> {
        let Some(jwt) = &self.api.jwt else {
            return Ok(());
        };
        let (token, found) = find_token(jwt.token_sources(), self.req.headers, self.path.query)
            .map_err(Refusal::Jwt)?;
        let token = token.as_str();
        let api_index = self.forward.api;
        let (claims, exp, identity) = if jwt.verified_by_envoy() {
            // Envoy checked the signature on this request; nothing to cache.
            let v = jwt
                .verify_by_envoy(token, self.req.dynamic_metadata, self.req.now)
                .map_err(Refusal::Jwt)?;
            (Rc::new(v.claims), v.exp, None)
        } else {
            self.policy
                .verified_claims(api_index, jwt, token, self.req.now, self.host)
                .map_err(Refusal::Jwt)?
        };
        jwt.check_certificate_binding(&claims, self.certificate_sha256)
            .map_err(Refusal::Jwt)?;
        let proof = self.dpop(jwt, &claims, token, &found)?;
        jwt.check_claims(&claims, || self.req.effective_methods(self.path.query))
            .map_err(Refusal::Jwt)?;
        if let Some(proof) = proof {
            self.spend_proof(proof, jwt.clock_skew())?;
        }
        if let Some(mode) = self.api.replay {
            let identity = identity.unwrap_or_else(|| signed_content_sha256(token));
            self.replay(mode, identity, exp)?;
        }
        match found {
            Found::Header | Found::Dpop | Found::Cookie(None) => {}
            Found::Query(name) => self.strip_query(&name),
            Found::Cookie(Some(name)) => {
                self.forward.remove_request_headers.push("cookie".into());
                if let Some(rest) = cookie_without(self.req.headers, &name) {
                    self.forward
                        .set_request_headers
                        .push(("cookie".into(), rest));
                }
            }
        }
        for name in jwt.claim_header_names() {
            self.forward.remove_request_headers.push(name.to_string());
        }
        self.forward
            .set_request_headers
            .extend(jwt.claim_headers(&claims));
        if self
            .api
            .call_limits
            .iter()
            .any(|l| l.by == LimitKey::Subject)
        {
            self.claims = Some(claims);
        }
        Ok(())
    }

    /// RFC 9449: a DPoP-bound token (`cnf.jkt`) comes as `Authorization: DPoP` with a proof
    /// of its key for this request; with `dpop: required` every token does.
    fn dpop(
        &self,
        jwt: &JwtPolicy,
        claims: &Map<String, Value>,
        token: &str,
        found: &Found,
    ) -> Result<Option<AcceptedProof>, Refusal> {
        let Some(binding) = jwt.dpop() else {
            return Ok(None);
        };
        let refuse = |e| Refusal::Jwt(JwtError::Dpop(e));
        let jkt = claims.get("cnf").and_then(|c| c.get("jkt"));
        let jkt = match (found, jkt) {
            (Found::Dpop, Some(Value::String(jkt))) => jkt,
            (Found::Dpop, _) => return Err(refuse(DpopError::TokenNotBound)),
            (_, Some(_)) => return Err(refuse(DpopError::BoundTokenAsBearer)),
            (_, None) if binding == Binding::Required => return Err(refuse(DpopError::Required)),
            (_, None) => return Ok(None),
        };
        let proofs = self.req.header_values("dpop");
        let [proof] = proofs.as_slice() else {
            return Err(refuse(DpopError::MissingProof));
        };
        let forwarded = |name: &str| {
            if !self
                .policy
                .client_ip
                .is_trusted_proxy(self.req.peer_address)
            {
                return None;
            }
            let values = self.req.header_values(name);
            values
                .first()
                .and_then(|v| v.split(',').next())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let first = |name: &str| self.req.header_values(name).first().copied();
        let target = ProofTarget {
            method: self.req.method,
            scheme: forwarded("x-forwarded-proto")
                .or_else(|| first(":scheme"))
                .unwrap_or("http"),
            authority: forwarded("x-forwarded-host")
                .or_else(|| first(":authority"))
                .or_else(|| first("host"))
                .unwrap_or_default(),
            path: self.path.raw,
        };
        check_proof(proof, token, jkt, &target, self.req.now, jwt.clock_skew())
            .map(Some)
            .map_err(refuse)
    }

    /// Records a proof's `jti` as used (in the replay store, whatever the API's replay mode;
    /// with etcd, in etcd, so every replica refuses it): a second use of the same proof is
    /// refused.
    fn spend_proof(&mut self, proof: AcceptedProof, skew: u64) -> Result<(), Refusal> {
        let host = self.host;
        let identity = TokenRef::new(&proof.jti_identity, proof.valid_until, skew);
        let replayed = Refusal::Jwt(JwtError::Dpop(DpopError::Replayed));
        if self.policy.replay_store.etcd().is_some() {
            let cached = lookup_cached(
                host.replay_store(),
                host.replay_prefix(),
                identity,
                None,
                ReplayMode::WithoutIp,
                self.req.now,
            );
            return match cached.verdict {
                Verdict::NotKnownHere => {
                    let check = RemoteCheck {
                        token: identity,
                        mode: ReplayMode::WithoutIp,
                        ip: None,
                    };
                    self.ask_etcd.push((check, Subject::DpopProof));
                    Ok(())
                }
                Verdict::Replay | Verdict::SameOwner => Err(replayed),
                other => Err(Refusal::Replay(other)),
            };
        }
        let outcome = check_and_record(
            host.replay_store(),
            &self.policy.replay_cache,
            host.replay_prefix(),
            identity,
            None,
            ReplayMode::WithoutIp,
            self.req.now,
        );
        host.note(self.forward.api, Event::Replay(outcome));
        match outcome.verdict {
            Verdict::FirstUse => Ok(()),
            Verdict::Replay | Verdict::SameOwner => Err(replayed),
            other => Err(Refusal::Replay(other)),
        }
    }

    /// 6. Replay: the token's signed content, bound to the client IP or used once.
    fn replay(&mut self, mode: ReplayMode, identity: [u8; 32], exp: u64) -> Result<(), Refusal> {
        // Kept for the largest skew any policy may allow, not this API's: one history for the
        // whole gateway must not forget a token another API (or a later policy) still accepts.
        let token = TokenRef::new(&identity, exp, MAX_CLOCK_SKEW_SECONDS);
        let owner = match mode {
            ReplayMode::WithIp => self.client_ip.ok(),
            ReplayMode::WithoutIp => None,
        };
        let host = self.host;
        let etcd = self.policy.replay_store.etcd().is_some();
        let memo = host.replay_memo();
        if let Some(verdict) = memo.and_then(|m| m.verdict(&token, owner, mode, self.req.now)) {
            if etcd {
                host.note(self.forward.api, Event::ReplayCacheHit);
            }
            return if verdict.is_accepted() {
                Ok(())
            } else {
                Err(Refusal::Replay(verdict))
            };
        }
        let outcome = if etcd {
            let outcome = lookup_cached(
                host.replay_store(),
                host.replay_prefix(),
                token,
                owner,
                mode,
                self.req.now,
            );
            if outcome.verdict == Verdict::NotKnownHere {
                host.note(self.forward.api, Event::Replay(outcome));
                self.ask_etcd.push((
                    RemoteCheck {
                        token,
                        mode,
                        ip: owner,
                    },
                    Subject::Token,
                ));
                return Ok(());
            }
            if matches!(outcome.verdict, Verdict::SameOwner | Verdict::Replay) {
                host.note(self.forward.api, Event::ReplayCacheHit);
            }
            outcome
        } else {
            check_and_record(
                host.replay_store(),
                &self.policy.replay_cache,
                host.replay_prefix(),
                token,
                owner,
                mode,
                self.req.now,
            )
        };
        host.note(self.forward.api, Event::Replay(outcome));
        if outcome.verdict.is_accepted() {
            if let Some(memo) = memo {
                memo.learn(&token, owner, mode, outcome.verdict, self.req.now);
            }
            Ok(())
        } else {
            Err(Refusal::Replay(outcome.verdict))
        }
    }

    /// Then: injected headers, and every client-sent spelling of a header the gateway owns
    /// removed (docs/policy.md, "Headers the gateway owns").
    fn gateway_headers(&mut self) {
        let forward = &mut self.forward;
        for (name, value) in &self.api.inject_headers {
            forward.remove_request_headers.push(name.clone());
            forward
                .set_request_headers
                .push((name.clone(), value.clone()));
        }
        forward
            .remove_request_headers
            .extend(PATH_OVERRIDE_HEADERS.map(String::from));
        forward.remove_request_headers = every_spelling(
            std::mem::take(&mut forward.remove_request_headers),
            self.req.headers,
        );
    }
}

impl CompiledPolicy {
    /// Claims, `exp` and (when worked out) the replay identity of a valid token: from what this
    /// worker already knows, from the verified-token cache, or verified now and cached. The
    /// cache key binds the policy version, the API, the identity provider (the token's `iss`
    /// picks it) with the key set and HMAC secret that verified the token (a key removed from
    /// the JWKS takes its tokens' entries with it) and the whole token, signature included: a
    /// hit means these exact bytes verified before, with these keys. The worker's memo binds the
    /// same (it lives with this policy) and is off with the cache.
    fn verified_claims(
        &self,
        api_index: usize,
        jwt: &JwtPolicy,
        token: &str,
        now: u64,
        host: &dyn Host,
    ) -> Result<Verified, JwtError> {
        let verifier = |provider: &Provider, keys: Option<&KeySet>| Verifier {
            policy: self.fingerprint,
            slot: provider.slot(),
            keys: keys.map_or([0; 32], KeySet::fingerprint),
            hmac: provider.hmac_fingerprint(),
        };
        let memo = host.token_memo().filter(|_| self.token_cache_slots > 0);
        let known = memo.and_then(|m| {
            m.get(api_index, token, now, |slot| {
                let provider = jwt.provider_in_slot(slot)?;
                Some(verifier(provider, host.jwt_keys(slot).as_deref()))
            })
        });
        if let Some(known) = known {
            host.note(api_index, Event::JwtCacheHit);
            return Ok((known.claims, known.exp, Some(known.identity)));
        }
        // The token's issuer picks the provider before any signature work.
        // Parsed once: the same parse serves the signature check on a cache miss.
        let (provider, parsed) = jwt.select(token)?;
        let keys = host.jwt_keys(provider.slot());
        let verifier = verifier(provider, keys.as_deref());
        let mut h = Sha256::new();
        h.update(verifier.policy);
        h.update((api_index as u64).to_be_bytes());
        h.update((verifier.slot as u64).to_be_bytes());
        h.update(verifier.keys);
        h.update(verifier.hmac);
        h.update(Sha256::digest(token.as_bytes()));
        let cache_key: [u8; 32] = h.finalize().into();
        let verify_now = || {
            jwt.verify_as(provider, parsed, keys.as_deref(), now)
                .inspect_err(|e| {
                    // A key set that lacks the token's key asks for a fresh one.
                    if matches!(
                        e,
                        JwtError::Invalid(InvalidReason::UnknownKid | InvalidReason::NoKeySet)
                    ) {
                        host.unknown_kid(provider.slot());
                    }
                })
        };
        let (claims, exp) = if self.token_cache_slots > 0 {
            match host.cached_token(&cache_key, now) {
                Some(hit) => {
                    host.note(api_index, Event::JwtCacheHit);
                    hit
                }
                None => {
                    host.note(api_index, Event::JwtCacheMiss);
                    let v = verify_now()?;
                    host.cache_token(&cache_key, v.exp, &v.claims);
                    (Rc::new(v.claims), v.exp)
                }
            }
        } else {
            let v = verify_now()?;
            (Rc::new(v.claims), v.exp)
        };
        let Some(memo) = memo else {
            return Ok((claims, exp, None));
        };
        let identity = signed_content_sha256(token);
        let known = KnownToken {
            claims: claims.clone(),
            exp,
            identity,
        };
        memo.learn(api_index, verifier, token, known, now);
        Ok((claims, exp, Some(identity)))
    }
}

/// A valid token's claims, `exp` and, when already worked out, its replay identity.
type Verified = (Rc<Map<String, Value>>, u64, Option<[u8; 32]>);

/// A token's identity for replay detection: the SHA-256 of what its signature covers
/// (`header.payload`). Another encoding of the same signature (ECDSA's (r, n-s), a DER or
/// padded form) is the same token, not a new one; the header and payload themselves decode
/// strictly (no padding, canonical trailing bits), so they have one spelling each.
pub fn signed_content_sha256(token: &str) -> [u8; 32] {
    let signed = token.rsplit_once('.').map_or(token, |(content, _)| content);
    Sha256::digest(signed.as_bytes()).into()
}
