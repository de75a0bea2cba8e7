//! Taking the token out of the request and apart: `Authorization: Bearer <token>`, three
//! base64url parts, JSON header and claims, a numeric `exp`. Nothing here trusts the token.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{Map, Value};

use super::JwtError;

/// Tokens longer than this are refused before any parsing (Entra ID tokens are 1-4 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The single bearer token of the request. The scheme is case-insensitive (RFC 7235); exactly
/// one `Authorization` header with exactly one token.
pub fn extract_bearer<'a>(authorization: &[&'a str]) -> Result<&'a str, JwtError> {
    let [value] = authorization else {
        return Err(JwtError::MissingHeader);
    };
    let value = value.trim_matches([' ', '\t']);
    let (scheme, rest) = value
        .split_once([' ', '\t'])
        .ok_or(JwtError::MissingHeader)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(JwtError::MissingHeader);
    }
    let token = rest.trim_matches([' ', '\t']);
    if token.is_empty() || token.contains([' ', '\t', ',']) {
        return Err(JwtError::MissingHeader);
    }
    Ok(token)
}

/// A structurally valid JWS compact token, not yet verified.
#[derive(Debug, Clone)]
pub struct ParsedToken<'a> {
    pub header: Map<String, Value>,
    pub claims: Map<String, Value>,
    /// `base64url(header) "." base64url(claims)`: what the signature covers.
    pub signing_input: &'a str,
    pub signature: &'a str,
    /// Seconds; fractional values are truncated, negative ones are 0.
    pub exp: u64,
}

pub fn parse(token: &str) -> Result<ParsedToken<'_>, JwtError> {
    if token.len() > MAX_TOKEN_BYTES || !token.is_ascii() {
        return Err(JwtError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    if header.is_empty() || claims.is_empty() {
        return Err(JwtError::Malformed);
    }
    let header = json_object(header)?;
    let claims = json_object(claims)?;
    let exp = claims
        .get("exp")
        .and_then(numeric_date)
        .ok_or(JwtError::Malformed)?;
    // Exactly two dots (above): all before the second.
    let signing_input = token
        .rsplit_once('.')
        .map(|(input, _)| input)
        .ok_or(JwtError::Malformed)?;
    Ok(ParsedToken {
        header,
        claims,
        signing_input,
        signature,
        exp,
    })
}

fn json_object(part: &str) -> Result<Map<String, Value>, JwtError> {
    json_part(part).ok_or(JwtError::Malformed)
}

/// One part of a compact JWS: strict base64url (no padding, no '+' or '/', no non-canonical
/// trailing bits) of a JSON object. For tokens and DPoP proofs alike.
pub(crate) fn json_part(part: &str) -> Option<Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// RFC 7519 NumericDate: a JSON number of seconds. Strings and other types are not dates.
pub fn numeric_date(v: &Value) -> Option<u64> {
    let n = v.as_f64()?;
    if !n.is_finite() {
        return None;
    }
    Some(if n <= 0.0 { 0 } else { n as u64 })
}
