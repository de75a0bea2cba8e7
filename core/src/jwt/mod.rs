//! JWT validation (docs/policy.md, "JWT"), written against RFC 7519, RFC 8725 and RFC 6750:
//! the algorithm comes from the policy and the key, never from the token alone; time claims are
//! checked against the host clock passed in; every failure maps to one of four messages.

pub mod cache;
pub mod claims;
pub mod dpop;
pub mod envoy;
pub mod fetch;
pub mod keys;
pub mod provider;
pub mod shared_jwks;
pub mod sources;
pub mod token;
pub mod verify;

use std::collections::BTreeMap;

use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{index, join, ConfigError};
use crate::value::{EnvLookup, ValueSource};
use provider::is_hmac;

pub use claims::{RequiredClaim, RequiredClaimConfig};
pub use keys::{JwksError, KeyChoiceError, KeyFamily, KeySet};
pub use provider::{EntraConfig, EntraVersion, Provider, ProviderConfig, ENTRA_CLUSTER};
pub use token::extract_bearer;

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// A single identity provider: `issuers`, `audiences`, `algorithms`, `jwks`, `hmac_secret`
    /// and `entra` here, or several in `providers` (not both).
    #[serde(default)]
    pub issuers: Vec<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// Microsoft Entra ID: issuers and keys worked out from the tenant.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub entra: Option<EntraConfig>,
    /// Several identity providers; a token's `iss` picks the one that checks it.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub providers: Option<Vec<ProviderConfig>>,
    /// Required for RS/PS/ES/EdDSA; not used (and refused) when only HS algorithms are allowed.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub jwks: Option<JwksConfig>,
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "crate::serialize::is_default_clock_skew")
    )]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default = "default_skew")]
    pub clock_skew_seconds: u64,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Vec::is_empty"))]
    #[serde(default)]
    pub required_claims: Vec<RequiredClaimConfig>,
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "BTreeMap::is_empty")
    )]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub claims_to_headers: BTreeMap<String, String>,
    /// Shared secret for HS256/384/512; only with an HS algorithm listed.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub hmac_secret: Option<ValueSource>,
    /// Who checks signatures: gateguard itself, or Envoy's `jwt_authn` in front of it.
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "VerifyWith::is_default")
    )]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub verify_with: VerifyWith,
    /// Where the token may come from, in order (default `Authorization: Bearer`).
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "sources::is_default_sources")
    )]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default = "sources::default_sources")]
    pub token_sources: Vec<sources::TokenSourceConfig>,
    /// RFC 8705: tokens bound to the client certificate (`cnf["x5t#S256"]`).
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub certificate_bound: Option<Binding>,
    /// RFC 9449: DPoP-bound tokens (`cnf.jkt`) need a proof of their key on every request.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub dpop: Option<Binding>,
}

/// `jwt.certificate_bound` (and, later, other sender constraints): a token that says it is
/// bound must be presented with its key; `required` makes every token say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(rename_all = "lowercase")]
pub enum Binding {
    Optional,
    Required,
}

/// `jwt.verify_with`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(rename_all = "lowercase")]
pub enum VerifyWith {
    /// gateguard verifies signatures with its own key set (fetched through Envoy).
    #[default]
    Gateguard,
    /// Envoy's `jwt_authn`, placed in front by `gateguard render`, verifies signatures;
    /// gateguard reads the verified payload from the request's dynamic metadata.
    Envoy,
}

impl VerifyWith {
    pub fn is_default(&self) -> bool {
        *self == VerifyWith::Gateguard
    }
}

fn default_skew() -> u64 {
    60
}

/// Either `{"inline": <JWKS>}` or `{"cluster": ..., "uri": ..., "refresh_seconds": ...}`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct JwksConfig {
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub inline: Option<Value>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub cluster: Option<String>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub uri: Option<String>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub refresh_seconds: Option<u64>,
}

/// The largest `clock_skew_seconds` a policy may set.
pub const MAX_CLOCK_SKEW_SECONDS: u64 = 600;

/// Where an API's keys come from, once compiled.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// Only HS algorithms: the shared secret is the key.
    None,
    Inline(KeySet),
    Remote {
        cluster: String,
        uri: String,
        refresh_seconds: u64,
    },
}

#[derive(Debug, Clone)]
pub struct JwtPolicy {
    /// At least one; no two accept the same issuer.
    providers: Vec<Provider>,
    clock_skew: u64,
    required_claims: Vec<RequiredClaim>,
    /// (claim, lower-case header)
    claims_to_headers: Vec<(String, String)>,
    /// `verify_with: "envoy"`.
    by_envoy: bool,
    /// Where the token may come from.
    token_sources: Vec<sources::TokenSource>,
    /// `certificate_bound`.
    certificate_bound: Option<Binding>,
    /// `dpop`.
    dpop: Option<Binding>,
}

/// A token that passed: signature, time, issuer and audience.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    pub claims: Map<String, Value>,
    pub exp: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidReason {
    AlgorithmNotAllowed,
    CritHeader,
    NoKeySet,
    UnknownKid,
    AmbiguousKey,
    KeyAlgorithmMismatch,
    BadSignature,
    /// `verify_with: "envoy"`: `jwt_authn` verified no token for this API's provider.
    NotVerifiedByEnvoy,
    /// `verify_with: "envoy"`: what `jwt_authn` verified is not the token presented.
    NotTheVerifiedToken,
    Expired,
    NotYetValid,
    IssuedInFuture,
    WrongIssuer,
    WrongAudience,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtError {
    /// No header, wrong scheme, empty or several tokens.
    MissingHeader,
    /// Not three base64url parts of JSON, or no numeric `exp`.
    Malformed,
    Invalid(InvalidReason),
    InsufficientClaims,
    /// A certificate-bound token without the certificate it names.
    CertificateBound,
    /// A DPoP-bound token without a valid proof, or a bearer token where DPoP is required.
    Dpop(dpop::DpopError),
    /// No provider accepts the token's `iss`, which is the other Entra ID version of a tenant
    /// one accepts: the reason says what to add (and names only the issuer). Refused as
    /// [`InvalidReason::WrongIssuer`] is.
    OtherEntraVersion(Box<str>),
}

impl JwtError {
    /// A short reason for logs; never token content.
    pub fn reason(&self) -> &str {
        match self {
            JwtError::OtherEntraVersion(hint) => hint,
            JwtError::MissingHeader => "missing or malformed Authorization header",
            JwtError::Malformed => "malformed token or missing exp",
            JwtError::InsufficientClaims => "required claim missing or not matching",
            JwtError::CertificateBound => "certificate-bound token without its certificate",
            JwtError::Dpop(e) => e.reason(),
            JwtError::Invalid(r) => match r {
                InvalidReason::AlgorithmNotAllowed => "algorithm not allowed",
                InvalidReason::CritHeader => "unsupported crit header",
                InvalidReason::NoKeySet => "no key set available yet",
                InvalidReason::UnknownKid => "unknown kid",
                InvalidReason::AmbiguousKey => "no kid and not exactly one matching key",
                InvalidReason::KeyAlgorithmMismatch => "key does not match the algorithm",
                InvalidReason::BadSignature => "bad signature",
                InvalidReason::NotVerifiedByEnvoy => "Envoy's jwt_authn verified no token",
                InvalidReason::NotTheVerifiedToken => {
                    "the payload Envoy verified is not this token's"
                }
                InvalidReason::Expired => "token expired",
                InvalidReason::NotYetValid => "token not yet valid (nbf)",
                InvalidReason::IssuedInFuture => "token issued in the future (iat)",
                InvalidReason::WrongIssuer => "issuer not accepted",
                InvalidReason::WrongAudience => "audience not accepted",
            },
        }
    }
}

impl JwtPolicy {
    pub fn compile(cfg: &JwtConfig, path: &str, env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        let single = ProviderConfig {
            issuers: cfg.issuers.clone(),
            audiences: cfg.audiences.clone(),
            algorithms: cfg.algorithms.clone(),
            jwks: cfg.jwks.clone(),
            hmac_secret: cfg.hmac_secret.clone(),
            entra: cfg.entra.clone(),
        };
        let providers = match &cfg.providers {
            None => vec![Provider::compile(&single, cfg.verify_with, path, env)?],
            Some(list) => {
                let mixed = [
                    ("issuers", !single.issuers.is_empty()),
                    ("audiences", !single.audiences.is_empty()),
                    ("algorithms", !single.algorithms.is_empty()),
                    ("jwks", single.jwks.is_some()),
                    ("hmac_secret", single.hmac_secret.is_some()),
                    ("entra", single.entra.is_some()),
                ];
                if let Some((field, _)) = mixed.iter().find(|(_, set)| *set) {
                    return Err(ConfigError::new(
                        join(path, field),
                        "not with \"providers\": each provider lists its own (move it into \
                         the providers it belongs to)",
                    ));
                }
                let providers_path = join(path, "providers");
                if list.is_empty() {
                    return Err(ConfigError::new(
                        providers_path,
                        "must list at least one provider",
                    ));
                }
                let compiled = list
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        Provider::compile(p, cfg.verify_with, &index(&providers_path, i), env)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                provider::check_distinct_issuers(&compiled)?;
                compiled
            }
        };
        let by_envoy = cfg.verify_with == VerifyWith::Envoy;

        let mut token_sources = sources::compile_sources(&cfg.token_sources, path)?;
        if cfg.dpop.is_some() {
            if by_envoy {
                return Err(ConfigError::new(
                    join(path, "dpop"),
                    "DPoP proofs are checked by \"verify_with\": \"gateguard\" only",
                ));
            }
            // `Authorization: DPoP <token>` (RFC 9449 §7.1) next to the listed places.
            token_sources.push(sources::TokenSource::Header {
                name: "authorization".into(),
                scheme: Some(sources::DPOP_SCHEME.into()),
            });
        }
        if by_envoy && !sources::is_authorization_bearer_only(&token_sources) {
            return Err(ConfigError::new(
                join(path, "token_sources"),
                "with \"verify_with\": \"envoy\", Envoy's jwt_authn reads the token from \
                 `Authorization: Bearer` only; other places need \"verify_with\": \"gateguard\"",
            ));
        }

        if cfg.clock_skew_seconds > MAX_CLOCK_SKEW_SECONDS {
            return Err(ConfigError::new(
                join(path, "clock_skew_seconds"),
                "must be at most 600",
            ));
        }

        let required_claims = cfg
            .required_claims
            .iter()
            .enumerate()
            .map(|(i, c)| RequiredClaim::compile(c, &index(&join(path, "required_claims"), i)))
            .collect::<Result<Vec<_>, _>>()?;

        let headers_path = join(path, "claims_to_headers");
        let mut claims_to_headers: Vec<(String, String)> = Vec::new();
        for (claim, header) in &cfg.claims_to_headers {
            let field = join(&headers_path, claim);
            crate::headers::check_upstream_header_name(header)
                .map_err(|r| ConfigError::new(&field, r))?;
            let lower = header.to_ascii_lowercase();
            if claims_to_headers.iter().any(|(_, h)| *h == lower) {
                return Err(ConfigError::new(
                    field,
                    format!("header {header:?} used twice"),
                ));
            }
            claims_to_headers.push((claim.clone(), lower));
        }

        Ok(Self {
            providers,
            clock_skew: cfg.clock_skew_seconds,
            required_claims,
            claims_to_headers,
            by_envoy,
            token_sources,
            certificate_bound: cfg.certificate_bound,
            dpop: cfg.dpop,
        })
    }

    /// The identity providers, in policy order.
    pub fn providers(&self) -> &[Provider] {
        &self.providers
    }

    /// Gives the providers the host's key slots `next`, `next + 1`, ...; returns the next free.
    pub fn assign_slots(&mut self, mut next: usize) -> usize {
        for p in &mut self.providers {
            p.set_slot(next);
            next = next.saturating_add(1);
        }
        next
    }

    /// The provider with key slot `slot`, if it is this API's.
    pub fn provider_in_slot(&self, slot: usize) -> Option<&Provider> {
        self.providers.iter().find(|p| p.slot() == slot)
    }

    /// The provider that checks `token`: the one accepting its `iss` (read from the payload,
    /// not yet verified), with the parsed token for [`Self::verify_as`]. Nothing is verified
    /// here; no key is looked at.
    pub fn select<'t>(
        &self,
        token: &'t str,
    ) -> Result<(&Provider, token::ParsedToken<'t>), JwtError> {
        let parsed = token::parse(token)?;
        let provider = self.select_parsed(&parsed.claims)?;
        Ok((provider, parsed))
    }

    fn select_parsed(&self, claims: &Map<String, Value>) -> Result<&Provider, JwtError> {
        let wrong = JwtError::Invalid(InvalidReason::WrongIssuer);
        let Some(iss) = claims.get("iss").and_then(Value::as_str) else {
            return Err(wrong);
        };
        let tid = claims.get("tid").and_then(Value::as_str);
        self.providers
            .iter()
            .find(|p| p.accepts_issuer(iss, tid))
            .ok_or_else(|| match provider::entra_hint(&self.providers, iss) {
                Some(hint) => JwtError::OtherEntraVersion(hint.into()),
                None => wrong,
            })
    }

    /// Whether tokens may be (`Optional`) or must be (`Required`) bound to the client
    /// certificate.
    pub fn certificate_bound(&self) -> Option<Binding> {
        self.certificate_bound
    }

    /// RFC 8705 §3: a token with `cnf["x5t#S256"]` (any token when required) is accepted only
    /// with the client certificate it names. `certificate_sha256` is the SHA-256 of the DER of
    /// the certificate the API accepted, if any.
    pub fn check_certificate_binding(
        &self,
        claims: &Map<String, Value>,
        certificate_sha256: Option<[u8; 32]>,
    ) -> Result<(), JwtError> {
        let Some(binding) = self.certificate_bound else {
            return Ok(());
        };
        let named = match claims.get("cnf").and_then(|c| c.get("x5t#S256")) {
            None if binding == Binding::Optional => return Ok(()),
            None => return Err(JwtError::CertificateBound),
            Some(Value::String(t)) => t,
            // A binding gateguard cannot read binds to nothing it could check: refused.
            Some(_) => return Err(JwtError::CertificateBound),
        };
        let presented = certificate_sha256.map(|d| {
            use base64::engine::general_purpose::URL_SAFE_NO_PAD;
            use base64::Engine;
            URL_SAFE_NO_PAD.encode(d)
        });
        if presented.as_deref() == Some(named.as_str()) {
            Ok(())
        } else {
            Err(JwtError::CertificateBound)
        }
    }

    /// Whether DPoP-bound tokens need a proof (`Optional`), or every token must be one
    /// (`Required`).
    pub fn dpop(&self) -> Option<Binding> {
        self.dpop
    }

    /// Where this API's token may come from, in order.
    pub fn token_sources(&self) -> &[sources::TokenSource] {
        &self.token_sources
    }

    /// With `verify_with: "envoy"`: the `jwt_authn` provider (and metadata field) of this API's
    /// first identity provider (each has its own: [`Provider::envoy_provider`]).
    pub fn envoy_provider(&self) -> Option<&str> {
        self.providers.first().and_then(Provider::envoy_provider)
    }

    /// `verify_with: "envoy"`: Envoy's `jwt_authn` checks the signatures.
    pub fn verified_by_envoy(&self) -> bool {
        self.by_envoy
    }

    pub fn clock_skew(&self) -> u64 {
        self.clock_skew
    }

    /// Verifies a token: provider (by `iss`), structure, algorithm, key, signature, time,
    /// issuer, audience. `keys` is the selected provider's current key set (`None` while a
    /// remote JWKS is not fetched yet): for a policy with one provider, the API's.
    pub fn verify(
        &self,
        token: &str,
        keys: Option<&KeySet>,
        now: u64,
    ) -> Result<VerifiedToken, JwtError> {
        let (provider, parsed) = self.select(token)?;
        self.verify_as(provider, parsed, keys, now)
    }

    /// [`Self::verify`] with the provider already selected (by [`Self::select`]) and `keys`
    /// its key set.
    pub fn verify_as(
        &self,
        provider: &Provider,
        parsed: token::ParsedToken<'_>,
        keys: Option<&KeySet>,
        now: u64,
    ) -> Result<VerifiedToken, JwtError> {
        let invalid = JwtError::Invalid;
        let alg = Self::allowed_algorithm(provider, &parsed)?;
        // `jku`, `x5u`, `jwk` and `x5c` are never used: keys come only from the policy.
        let key = if is_hmac(alg) {
            provider
                .hmac
                .as_ref()
                .ok_or(invalid(InvalidReason::AlgorithmNotAllowed))?
        } else {
            let set = keys.ok_or(invalid(InvalidReason::NoKeySet))?;
            let kid = match parsed.header.get("kid") {
                None => None,
                Some(Value::String(k)) => Some(k.as_str()),
                Some(_) => return Err(invalid(InvalidReason::UnknownKid)),
            };
            &set.choose(kid, alg)
                .map_err(|e| {
                    invalid(match e {
                        KeyChoiceError::UnknownKid => InvalidReason::UnknownKid,
                        KeyChoiceError::AmbiguousKey => InvalidReason::AmbiguousKey,
                        KeyChoiceError::KeyAlgorithmMismatch => InvalidReason::KeyAlgorithmMismatch,
                    })
                })?
                .key
        };
        if !verify::signature_is_valid(parsed.signature, parsed.signing_input, key, alg) {
            return Err(invalid(InvalidReason::BadSignature));
        }
        self.accept_claims(provider, parsed, now)
    }

    /// `verify_with: "envoy"`: the same checks as [`Self::verify`], but the signature was
    /// checked by Envoy's `jwt_authn`. `metadata` is the request's dynamic metadata (serialised
    /// `envoy.config.core.v3.Metadata`); the payload the selected provider's `jwt_authn`
    /// provider verified there must be this token's, claim by claim, or the token is invalid.
    pub fn verify_by_envoy(
        &self,
        token: &str,
        metadata: Option<&[u8]>,
        now: u64,
    ) -> Result<VerifiedToken, JwtError> {
        let parsed = token::parse(token)?;
        let provider = self.select_parsed(&parsed.claims)?;
        Self::allowed_algorithm(provider, &parsed)?;
        let invalid = JwtError::Invalid;
        let name = provider
            .envoy_provider()
            .ok_or(invalid(InvalidReason::NotVerifiedByEnvoy))?;
        let payload = metadata
            .and_then(|m| envoy::verified_payload(m, name))
            .ok_or(invalid(InvalidReason::NotVerifiedByEnvoy))?;
        if !envoy::same_payload(&parsed.claims, &payload) {
            return Err(invalid(InvalidReason::NotTheVerifiedToken));
        }
        self.accept_claims(provider, parsed, now)
    }

    /// The token's `alg`, if the provider allows it and the header asks for nothing gateguard
    /// does not understand.
    fn allowed_algorithm(
        provider: &Provider,
        parsed: &token::ParsedToken<'_>,
    ) -> Result<Algorithm, JwtError> {
        let alg = parsed
            .header
            .get("alg")
            .and_then(Value::as_str)
            .and_then(|a| a.parse::<Algorithm>().ok())
            .filter(|a| provider.algorithms.contains(a))
            .ok_or(JwtError::Invalid(InvalidReason::AlgorithmNotAllowed))?;
        // RFC 7515 §4.1.11: extensions we do not understand must make the token invalid.
        if parsed.header.contains_key("crit") {
            return Err(JwtError::Invalid(InvalidReason::CritHeader));
        }
        Ok(alg)
    }

    /// Time, issuer and audience of a token whose signature holds.
    fn accept_claims(
        &self,
        provider: &Provider,
        parsed: token::ParsedToken<'_>,
        now: u64,
    ) -> Result<VerifiedToken, JwtError> {
        let invalid = JwtError::Invalid;

        let claims = parsed.claims;
        let skew = self.clock_skew;
        if parsed.exp.saturating_add(skew) <= now {
            return Err(invalid(InvalidReason::Expired));
        }
        for (claim, reason) in [
            ("nbf", InvalidReason::NotYetValid),
            ("iat", InvalidReason::IssuedInFuture),
        ] {
            match claims.get(claim) {
                None => {}
                Some(v) => {
                    let t = token::numeric_date(v).ok_or(JwtError::Malformed)?;
                    if t > now.saturating_add(skew) {
                        return Err(invalid(reason));
                    }
                }
            }
        }
        let tid = claims.get("tid").and_then(Value::as_str);
        match claims.get("iss").and_then(Value::as_str) {
            Some(iss) if provider.accepts_issuer(iss, tid) => {}
            _ => return Err(invalid(InvalidReason::WrongIssuer)),
        }
        if !provider.accepts_audience(&claims) {
            return Err(invalid(InvalidReason::WrongAudience));
        }
        Ok(VerifiedToken {
            claims,
            exp: parsed.exp,
        })
    }

    /// Required claims for these methods: the request's and any it asks a backend to treat it
    /// as (re-checked on every request, cached token or not).
    pub fn check_claims(
        &self,
        claims: &Map<String, Value>,
        methods: impl FnOnce() -> Vec<String>,
    ) -> Result<(), JwtError> {
        // Worked out only when a rule is scoped to methods (it reads headers and the query).
        let methods = std::cell::LazyCell::new(methods);
        let ok = self
            .required_claims
            .iter()
            .filter(|r| r.methods.is_none() || methods.iter().any(|m| r.applies_to(m)))
            .all(|r| r.satisfied_by(claims));
        if ok {
            Ok(())
        } else {
            Err(JwtError::InsufficientClaims)
        }
    }

    /// (lower-case header, value) for each configured claim the token carries.
    pub fn claim_headers(&self, claims: &Map<String, Value>) -> Vec<(String, String)> {
        self.claims_to_headers
            .iter()
            .filter_map(|(claim, header)| {
                claims
                    .get(claim)
                    .and_then(claims::header_value)
                    .map(|v| (header.clone(), v))
            })
            .collect()
    }

    pub fn claim_header_names(&self) -> impl Iterator<Item = &str> {
        self.claims_to_headers.iter().map(|(_, h)| h.as_str())
    }

    /// Every header this API's JWT step reads or sets: its token headers (and `cookie`), `dpop`,
    /// and the claim headers.
    pub fn consumed_header_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .token_sources
            .iter()
            .map(|s| match s {
                sources::TokenSource::Header { name, .. } => name.as_str(),
                sources::TokenSource::Cookie { .. } => "cookie",
                sources::TokenSource::Query(_) => "",
            })
            .filter(|n| !n.is_empty())
            .collect();
        if self.dpop.is_some() {
            names.push("dpop");
        }
        names.extend(self.claim_header_names());
        names
    }
}

#[cfg(test)]
mod tests;
