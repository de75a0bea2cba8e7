//! JWT validation (docs/policy.md, "JWT"), written against RFC 7519, RFC 8725 and RFC 6750:
//! the algorithm comes from the policy and the key, never from the token alone; time claims are
//! checked against the host clock passed in; every failure maps to one of four messages.

pub mod cache;
pub mod claims;
pub mod dpop;
pub mod envoy;
pub mod fetch;
pub mod keys;
pub mod shared_jwks;
pub mod sources;
pub mod token;
pub mod verify;

use std::collections::BTreeMap;

use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::{index, join, ConfigError};
use crate::value::{EnvLookup, ValueSource};

pub use claims::{RequiredClaim, RequiredClaimConfig};
pub use keys::{JwksError, KeyChoiceError, KeyFamily, KeySet};
pub use token::extract_bearer;

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    pub algorithms: Vec<String>,
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

const DEFAULT_REFRESH_SECONDS: u64 = 3600;
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
    issuers: Vec<String>,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    pub jwks: JwksSource,
    clock_skew: u64,
    required_claims: Vec<RequiredClaim>,
    /// (claim, lower-case header)
    claims_to_headers: Vec<(String, String)>,
    hmac: Option<verify::VerifyingKey>,
    /// SHA-256 of the resolved HMAC secret (zeros without one): verified-token cache entries are
    /// bound to it, since a secret read from the environment is not in the policy text.
    hmac_fingerprint: [u8; 32],
    /// With `verify_with: "envoy"`: the `jwt_authn` provider whose payload this API reads.
    envoy_provider: Option<String>,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

impl JwtError {
    /// A short reason for logs; never token content.
    pub fn reason(&self) -> &'static str {
        match self {
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

const SUPPORTED: &str =
    "RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, HS256, HS384, HS512";

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

impl JwtPolicy {
    pub fn compile(cfg: &JwtConfig, path: &str, env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        let non_empty = |list: &Vec<String>, field: &str| {
            if list.is_empty() {
                return Err(ConfigError::new(
                    join(path, field),
                    "must list at least one value",
                ));
            }
            if let Some(i) = list.iter().position(|s| s.trim().is_empty()) {
                return Err(ConfigError::new(
                    index(&join(path, field), i),
                    "must not be empty",
                ));
            }
            Ok(())
        };
        non_empty(&cfg.issuers, "issuers")?;
        non_empty(&cfg.audiences, "audiences")?;
        non_empty(&cfg.algorithms, "algorithms")?;

        let mut algorithms = Vec::new();
        for (i, name) in cfg.algorithms.iter().enumerate() {
            let alg = name.parse::<Algorithm>().map_err(|_| {
                ConfigError::new(
                    index(&join(path, "algorithms"), i),
                    format!("unsupported algorithm {name:?} (supported: {SUPPORTED})"),
                )
            })?;
            if !algorithms.contains(&alg) {
                algorithms.push(alg);
            }
        }

        let wants_hmac = algorithms.iter().any(|a| is_hmac(*a));
        let mut hmac_fingerprint = [0u8; 32];
        let hmac =
            match (&cfg.hmac_secret, wants_hmac) {
                (Some(source), true) => {
                    let field = join(path, "hmac_secret");
                    let secret = source.resolve(&field, env)?;
                    // RFC 7518 §3.2: the key must be at least as long as the hash output.
                    if secret.len() < 32 {
                        return Err(ConfigError::new(
                            field,
                            "an HMAC secret needs at least 32 bytes",
                        ));
                    }
                    hmac_fingerprint = Sha256::digest(secret.as_bytes()).into();
                    Some(verify::VerifyingKey::hmac(secret.as_bytes()))
                }
                (None, true) => return Err(ConfigError::new(
                    join(path, "algorithms"),
                    "HS256/HS384/HS512 need \"hmac_secret\" (a shared secret, never a public key)",
                )),
                (Some(_), false) => {
                    return Err(ConfigError::new(
                        join(path, "hmac_secret"),
                        "set, but no HS256/HS384/HS512 algorithm is allowed",
                    ))
                }
                (None, false) => None,
            };

        let jwks_path = join(path, "jwks");
        let asymmetric = algorithms.iter().any(|a| !is_hmac(*a));
        let jwks = match &cfg.jwks {
            None if asymmetric => {
                return Err(ConfigError::new(
                    jwks_path,
                    "required: RS/PS/ES/EdDSA tokens are verified with the identity provider's keys",
                ))
            }
            None => JwksSource::None,
            Some(_) if !asymmetric => {
                return Err(ConfigError::new(
                    jwks_path,
                    "not used when only HS256/HS384/HS512 are allowed (the hmac_secret is the key); remove it",
                ))
            }
            Some(JwksConfig {
                inline: Some(inline),
                cluster: None,
                uri: None,
                refresh_seconds: None,
            }) => {
                let set = KeySet::from_jwks_value(inline).map_err(|e| {
                    ConfigError::new(join(&jwks_path, "inline"), e.reason())
                })?;
                JwksSource::Inline(set)
            }
            Some(JwksConfig {
                inline: None,
                cluster: Some(cluster),
                uri: Some(uri),
                refresh_seconds,
            }) => {
                let refresh_seconds = &refresh_seconds.unwrap_or(DEFAULT_REFRESH_SECONDS);
                if cluster.trim().is_empty() {
                    return Err(ConfigError::new(join(&jwks_path, "cluster"), "must name an Envoy cluster"));
                }
                if fetch::split_uri(uri).is_none() {
                    return Err(ConfigError::new(
                        join(&jwks_path, "uri"),
                        format!("{uri:?} is not an https:// or http:// URL"),
                    ));
                }
                if *refresh_seconds == 0 || *refresh_seconds > 7 * 86_400 {
                    return Err(ConfigError::new(
                        join(&jwks_path, "refresh_seconds"),
                        "must be between 1 and 604800",
                    ));
                }
                JwksSource::Remote {
                    cluster: cluster.clone(),
                    uri: uri.clone(),
                    refresh_seconds: *refresh_seconds,
                }
            }
            _ => {
                return Err(ConfigError::new(
                    jwks_path,
                    "needs either \"inline\" (a JWKS) or \"cluster\" and \"uri\" (fetched through Envoy), not both",
                ))
            }
        };
        if let (JwksSource::Inline(set), true) = (&jwks, asymmetric) {
            if !algorithms
                .iter()
                .filter(|a| !is_hmac(**a))
                .any(|a| set.has_family(KeyFamily::for_algorithm(*a)))
            {
                return Err(ConfigError::new(
                    join(&jwks_path, "inline"),
                    "no key in the set fits any allowed algorithm",
                ));
            }
        }

        let envoy_provider = match (cfg.verify_with, &cfg.jwks) {
            (VerifyWith::Gateguard, _) => None,
            (VerifyWith::Envoy, _) if wants_hmac => return Err(ConfigError::new(
                join(path, "verify_with"),
                "\"envoy\" verifies with the identity provider's keys (jwks); HS256/HS384/HS512 \
                     tokens are verified by \"gateguard\"",
            )),
            (VerifyWith::Envoy, Some(jwks))
                if jwks.uri.as_deref().is_some_and(fetch::is_discovery_uri) =>
            {
                return Err(ConfigError::new(
                    join(&jwks_path, "uri"),
                    "with verify_with \"envoy\", Envoy's jwt_authn fetches this URL as the key set \
                     and cannot follow OpenID discovery: give the discovery document's jwks_uri",
                ))
            }
            (VerifyWith::Envoy, Some(jwks)) => Some(envoy::provider_name(jwks)),
            // Refused above: an asymmetric algorithm without keys.
            (VerifyWith::Envoy, None) => None,
        };

        let mut token_sources = sources::compile_sources(&cfg.token_sources, path)?;
        if cfg.dpop.is_some() {
            if envoy_provider.is_some() {
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
        if envoy_provider.is_some() && !sources::is_authorization_bearer_only(&token_sources) {
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
            issuers: cfg.issuers.clone(),
            audiences: cfg.audiences.clone(),
            algorithms,
            jwks,
            clock_skew: cfg.clock_skew_seconds,
            required_claims,
            claims_to_headers,
            hmac,
            hmac_fingerprint,
            envoy_provider,
            token_sources,
            certificate_bound: cfg.certificate_bound,
            dpop: cfg.dpop,
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

    /// With `verify_with: "envoy"`: the `jwt_authn` provider (and metadata field) of this API.
    pub fn envoy_provider(&self) -> Option<&str> {
        self.envoy_provider.as_deref()
    }

    pub fn hmac_fingerprint(&self) -> [u8; 32] {
        self.hmac_fingerprint
    }

    pub fn clock_skew(&self) -> u64 {
        self.clock_skew
    }

    /// Verifies a token: structure, algorithm, key, signature, time, issuer, audience.
    /// `keys` is the API's current key set (`None` while a remote JWKS is not fetched yet).
    pub fn verify(
        &self,
        token: &str,
        keys: Option<&KeySet>,
        now: u64,
    ) -> Result<VerifiedToken, JwtError> {
        let parsed = token::parse(token)?;
        let invalid = JwtError::Invalid;
        let alg = self.allowed_algorithm(&parsed)?;
        // `jku`, `x5u`, `jwk` and `x5c` are never used: keys come only from the policy.
        let key = if is_hmac(alg) {
            self.hmac
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
        self.accept_claims(parsed, now)
    }

    /// `verify_with: "envoy"`: the same checks as [`Self::verify`], but the signature was
    /// checked by Envoy's `jwt_authn`. `metadata` is the request's dynamic metadata (serialised
    /// `envoy.config.core.v3.Metadata`); the payload the API's provider verified there must be
    /// this token's, claim by claim, or the token is invalid.
    pub fn verify_by_envoy(
        &self,
        token: &str,
        metadata: Option<&[u8]>,
        now: u64,
    ) -> Result<VerifiedToken, JwtError> {
        let parsed = token::parse(token)?;
        self.allowed_algorithm(&parsed)?;
        let invalid = JwtError::Invalid;
        let provider = self
            .envoy_provider
            .as_deref()
            .ok_or(invalid(InvalidReason::NotVerifiedByEnvoy))?;
        let payload = metadata
            .and_then(|m| envoy::verified_payload(m, provider))
            .ok_or(invalid(InvalidReason::NotVerifiedByEnvoy))?;
        if !envoy::same_payload(&parsed.claims, &payload) {
            return Err(invalid(InvalidReason::NotTheVerifiedToken));
        }
        self.accept_claims(parsed, now)
    }

    /// The token's `alg`, if the policy allows it and the header asks for nothing gateguard
    /// does not understand.
    fn allowed_algorithm(&self, parsed: &token::ParsedToken<'_>) -> Result<Algorithm, JwtError> {
        let alg = parsed
            .header
            .get("alg")
            .and_then(Value::as_str)
            .and_then(|a| a.parse::<Algorithm>().ok())
            .filter(|a| self.algorithms.contains(a))
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
        match claims.get("iss").and_then(Value::as_str) {
            Some(iss) if self.issuers.iter().any(|i| i == iss) => {}
            _ => return Err(invalid(InvalidReason::WrongIssuer)),
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => self.audiences.contains(a),
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .any(|a| self.audiences.iter().any(|x| x == a)),
            _ => false,
        };
        if !aud_ok {
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
}

#[cfg(test)]
mod tests;
