//! DPoP proofs (RFC 9449, docs/policy.md "DPoP"): a token bound to a key (`cnf.jkt`) is usable
//! only with a fresh proof signed by that key, for this method and URL, naming this token.
//! Pure: the caller supplies the request facts and records the proof's `jti` in the replay
//! store.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::Algorithm;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::keys::{parse_jwk_checked, KeyFamily, PointCheck};
use super::token::json_part;
use super::verify::signature_is_valid;

/// Algorithms a proof may be signed with: asymmetric only (RFC 9449 §4.2), as advertised in the
/// `algs` of the `WWW-Authenticate: DPoP` challenge.
pub const PROOF_ALGORITHMS: [Algorithm; 5] = [
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::PS256,
    Algorithm::EdDSA,
];

/// The `algs` of the challenge, in the order of [`PROOF_ALGORITHMS`].
pub const PROOF_ALGS_TEXT: &str = "ES256 ES384 RS256 PS256 EdDSA";

/// How long a proof is accepted after its `iat` (plus the API's clock skew).
pub const MAX_PROOF_AGE_SECONDS: u64 = 300;

/// Proofs longer than this are refused before any parsing.
const MAX_PROOF_BYTES: usize = 8 * 1024;

/// Why a proof (or its absence) was refused; logged, never sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpopError {
    /// No `DPoP` header, or several.
    MissingProof,
    /// Not a compact JWS of JSON objects.
    Malformed,
    /// `typ` is not `dpop+jwt`.
    Type,
    /// `alg` not one of [`PROOF_ALGORITHMS`].
    Algorithm,
    /// `jwk` missing, private, or not a supported public key for `alg`.
    Key,
    BadSignature,
    Method,
    Url,
    /// `iat` missing, in the future beyond the skew, or too old.
    IssuedAt,
    /// `ath` is not the hash of this token.
    TokenHash,
    /// The proof key is not the one the token is bound to.
    KeyBinding,
    /// `jti` missing or too long.
    Jti,
    /// The proof's `jti` was seen before.
    Replayed,
    /// Sent with `Authorization: DPoP` but the token has no `cnf.jkt`.
    TokenNotBound,
    /// A DPoP-bound token sent as a bearer token.
    BoundTokenAsBearer,
    /// `dpop: required` and a bearer token.
    Required,
}

impl DpopError {
    pub fn reason(&self) -> &'static str {
        match self {
            DpopError::MissingProof => "no DPoP proof, or several",
            DpopError::Malformed => "DPoP proof is not a JWS of JSON objects",
            DpopError::Type => "DPoP proof typ is not dpop+jwt",
            DpopError::Algorithm => "DPoP proof algorithm not allowed",
            DpopError::Key => "DPoP proof jwk missing, private or unsupported",
            DpopError::BadSignature => "DPoP proof signature invalid",
            DpopError::Method => "DPoP proof htm is not this request's method",
            DpopError::Url => "DPoP proof htu is not this request's URL",
            DpopError::IssuedAt => "DPoP proof iat missing, in the future or too old",
            DpopError::TokenHash => "DPoP proof ath is not this token's hash",
            DpopError::KeyBinding => "DPoP proof key is not the token's cnf.jkt",
            DpopError::Jti => "DPoP proof jti missing or too long",
            DpopError::Replayed => "DPoP proof jti already used",
            DpopError::TokenNotBound => "DPoP scheme with a token that has no cnf.jkt",
            DpopError::BoundTokenAsBearer => "DPoP-bound token presented as a bearer token",
            DpopError::Required => "bearer token where DPoP is required",
        }
    }
}

/// The request as the proof must name it: `htm` and `htu`.
#[derive(Debug, Clone, Copy)]
pub struct ProofTarget<'a> {
    pub method: &'a str,
    /// `http` or `https`.
    pub scheme: &'a str,
    /// Host, with a port if one was given.
    pub authority: &'a str,
    /// The path as received, without the query.
    pub path: &'a str,
}

/// A proof that passed every check but the `jti` one, which needs the replay store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptedProof {
    /// What the replay store remembers: SHA-256 over the proof key's thumbprint and the `jti`.
    pub jti_identity: [u8; 32],
    /// Until when the proof could be accepted (`iat` + maximum age), before skew.
    pub valid_until: u64,
}

/// RFC 9449 §4.3: checks `proof` (the `DPoP` header) for `token`, bound to `jkt`.
pub fn check_proof(
    proof: &str,
    token: &str,
    jkt: &str,
    target: &ProofTarget<'_>,
    now: u64,
    skew: u64,
) -> Result<AcceptedProof, DpopError> {
    if proof.len() > MAX_PROOF_BYTES || !proof.is_ascii() {
        return Err(DpopError::Malformed);
    }
    let mut parts = proof.split('.');
    let (Some(header_b64), Some(claims_b64), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(DpopError::Malformed);
    };
    let header = json_part(header_b64).ok_or(DpopError::Malformed)?;
    let claims = json_part(claims_b64).ok_or(DpopError::Malformed)?;

    if header.get("typ").and_then(Value::as_str) != Some("dpop+jwt") {
        return Err(DpopError::Type);
    }
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .and_then(|a| a.parse::<Algorithm>().ok())
        .filter(|a| PROOF_ALGORITHMS.contains(a))
        .ok_or(DpopError::Algorithm)?;
    let jwk = header.get("jwk").ok_or(DpopError::Key)?;
    let key = public_key(jwk, alg)?;
    // `header.claims`: the proof has exactly two dots, so this is all before the second.
    let signing_input = proof
        .rsplit_once('.')
        .map(|(input, _)| input)
        .ok_or(DpopError::Malformed)?;
    if !signature_is_valid(signature, signing_input, &key, alg) {
        return Err(DpopError::BadSignature);
    }

    if claims.get("htm").and_then(Value::as_str) != Some(target.method) {
        return Err(DpopError::Method);
    }
    let htu = claims
        .get("htu")
        .and_then(Value::as_str)
        .ok_or(DpopError::Url)?;
    if !same_target_uri(htu, target) {
        return Err(DpopError::Url);
    }
    let iat = claims
        .get("iat")
        .and_then(super::token::numeric_date)
        .ok_or(DpopError::IssuedAt)?;
    let valid_until = iat.saturating_add(MAX_PROOF_AGE_SECONDS);
    if iat > now.saturating_add(skew) || valid_until.saturating_add(skew) < now {
        return Err(DpopError::IssuedAt);
    }
    let ath = URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()));
    if claims.get("ath").and_then(Value::as_str) != Some(ath.as_str()) {
        return Err(DpopError::TokenHash);
    }
    let thumbprint = jwk_thumbprint(jwk).ok_or(DpopError::Key)?;
    if thumbprint != jkt {
        return Err(DpopError::KeyBinding);
    }
    let jti = claims
        .get("jti")
        .and_then(Value::as_str)
        .filter(|j| !j.is_empty() && j.len() <= 256)
        .ok_or(DpopError::Jti)?;
    let mut h = Sha256::new();
    h.update(b"gateguard dpop jti\0");
    h.update(thumbprint.as_bytes());
    h.update(b"\0");
    h.update(jti.as_bytes());
    Ok(AcceptedProof {
        jti_identity: h.finalize().into(),
        valid_until,
    })
}

/// Members a public JWK may not have: private parts (RSA, EC, OKP) and symmetric keys.
const PRIVATE_MEMBERS: [&str; 7] = ["d", "p", "q", "dp", "dq", "qi", "k"];

/// The proof key: a public RSA, EC or Ed25519 JWK of the family `alg` needs.
fn public_key(jwk: &Value, alg: Algorithm) -> Result<super::verify::VerifyingKey, DpopError> {
    let object = jwk.as_object().ok_or(DpopError::Key)?;
    if PRIVATE_MEMBERS.iter().any(|m| object.contains_key(*m)) {
        return Err(DpopError::Key);
    }
    // The proof's signature check validates the point (ring), so it is not checked twice.
    let key = parse_jwk_checked(jwk, PointCheck::AtVerification).ok_or(DpopError::Key)?;
    if key.family != KeyFamily::for_algorithm(alg) || key.alg.is_some_and(|a| a != alg) {
        return Err(DpopError::Key);
    }
    Ok(key.key)
}

/// RFC 7638 thumbprint: SHA-256 of the required members in lexicographic order, no
/// whitespace, base64url. `None` for a key without them.
pub fn jwk_thumbprint(jwk: &Value) -> Option<String> {
    let object = jwk.as_object()?;
    let kty = object.get("kty")?.as_str()?;
    let members: &[&str] = match kty {
        "RSA" => &["e", "kty", "n"],
        "EC" => &["crv", "kty", "x", "y"],
        "OKP" => &["crv", "kty", "x"],
        _ => return None,
    };
    let mut canonical = BTreeMap::new();
    for m in members {
        canonical.insert(*m, object.get(*m)?.as_str()?);
    }
    let text = serde_json::to_string(&canonical).ok()?;
    Some(URL_SAFE_NO_PAD.encode(Sha256::digest(text.as_bytes())))
}

/// Does `htu` name this request's URI (RFC 9449 §4.3 step 9: scheme, host and path; query and
/// fragment ignored)? Scheme and host compare ignoring case, a default port equals none, an
/// empty path is `/`; the path compares exactly.
fn same_target_uri(htu: &str, target: &ProofTarget<'_>) -> bool {
    let Some((scheme, rest)) = htu.split_once("://") else {
        return false;
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return false;
    }
    let request_path = if target.path.is_empty() {
        "/"
    } else {
        target.path
    };
    scheme.eq_ignore_ascii_case(target.scheme)
        && normal_authority(authority, scheme) == normal_authority(target.authority, target.scheme)
        && path == request_path
}

fn normal_authority(authority: &str, scheme: &str) -> String {
    let lower = authority.to_ascii_lowercase();
    let default = if scheme.eq_ignore_ascii_case("https") {
        ":443"
    } else {
        ":80"
    };
    match lower.strip_suffix(default) {
        Some(host) => host.to_string(),
        None => lower,
    }
}

#[cfg(any(test, feature = "memory-store"))]
pub mod client;

#[cfg(test)]
mod tests;
