//! Verification keys: a JWKS parsed into the keys gateguard will use, and the choice of key for
//! a token. The key's type decides which algorithms it can verify, never the token alone.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::Algorithm;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::verify::VerifyingKey;

/// Largest JWKS document accepted (Entra ID's is a few KiB).
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Most keys kept from one JWKS.
pub const MAX_KEYS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFamily {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
    Hmac,
    /// An algorithm a future jsonwebtoken adds: no key of ours will ever verify it.
    Unsupported,
}

impl KeyFamily {
    /// The only key family that can verify `alg`.
    pub fn for_algorithm(alg: Algorithm) -> KeyFamily {
        match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => KeyFamily::Rsa,
            Algorithm::ES256 => KeyFamily::EcP256,
            Algorithm::ES384 => KeyFamily::EcP384,
            Algorithm::EdDSA => KeyFamily::Ed25519,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => KeyFamily::Hmac,
            _ => KeyFamily::Unsupported,
        }
    }
}

#[derive(Clone)]
pub struct VerificationKey {
    pub kid: Option<String>,
    pub family: KeyFamily,
    /// The `alg` the JWK declares, if any: then only that algorithm may use it.
    pub alg: Option<Algorithm>,
    pub key: VerifyingKey,
}

impl std::fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("family", &self.family)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<VerificationKey>,
    /// SHA-256 over the usable JWKs, order-independent: verified-token cache entries are bound
    /// to it, so a token verified with a key that leaves the set is verified again (and fails).
    fingerprint: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksError {
    TooLarge,
    NotJson,
    NoKeysArray,
    NoUsableKey,
    NoJwksUri,
    HttpStatus(u32),
    Timeout,
}

impl JwksError {
    pub fn reason(&self) -> String {
        match self {
            JwksError::TooLarge => format!("JWKS larger than {MAX_JWKS_BYTES} bytes"),
            JwksError::NotJson => "response is not a JSON object".into(),
            JwksError::NoKeysArray => "no \"keys\" array".into(),
            JwksError::NoUsableKey => {
                "no usable signing key (RSA, EC P-256/P-384 or Ed25519, use \"sig\")".into()
            }
            JwksError::NoJwksUri => "discovery document has no https/http \"jwks_uri\"".into(),
            JwksError::HttpStatus(s) => format!("HTTP status {s}"),
            JwksError::Timeout => "no response in time".into(),
        }
    }
}

/// Why no key could be chosen for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyChoiceError {
    UnknownKid,
    /// No `kid` and not exactly one key of the algorithm's family.
    AmbiguousKey,
    /// The key with that `kid` is of another type, or declares another `alg`.
    KeyAlgorithmMismatch,
}

impl KeySet {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn has_family(&self, family: KeyFamily) -> bool {
        self.keys.iter().any(|k| k.family == family)
    }

    pub fn from_jwks_json(bytes: &[u8]) -> Result<KeySet, JwksError> {
        if bytes.len() > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge);
        }
        let doc: Value = serde_json::from_slice(bytes).map_err(|_| JwksError::NotJson)?;
        Self::from_jwks_value(&doc)
    }

    pub fn from_jwks_value(doc: &Value) -> Result<KeySet, JwksError> {
        let list = doc
            .as_object()
            .ok_or(JwksError::NotJson)?
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(JwksError::NoKeysArray)?;
        let mut keys = Vec::new();
        let mut digests = Vec::new();
        for jwk in list {
            if keys.len() == MAX_KEYS {
                break;
            }
            if let Some(key) = parse_jwk(jwk) {
                keys.push(key);
                // serde_json's map keeps keys sorted, so equal JWKs serialise equally.
                digests.push(<[u8; 32]>::from(Sha256::digest(jwk.to_string())));
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey);
        }
        digests.sort_unstable();
        let mut h = Sha256::new();
        for d in &digests {
            h.update(d);
        }
        Ok(KeySet {
            keys,
            fingerprint: h.finalize().into(),
        })
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    pub fn choose(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<&VerificationKey, KeyChoiceError> {
        let family = KeyFamily::for_algorithm(alg);
        let fits = |k: &&VerificationKey| k.family == family && k.alg.is_none_or(|a| a == alg);
        match kid {
            Some(kid) => {
                let mut with_kid = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid))
                    .peekable();
                if with_kid.peek().is_none() {
                    return Err(KeyChoiceError::UnknownKid);
                }
                with_kid
                    .find(fits)
                    .ok_or(KeyChoiceError::KeyAlgorithmMismatch)
            }
            None => {
                let mut candidates = self.keys.iter().filter(fits);
                match (candidates.next(), candidates.next()) {
                    (Some(only), None) => Ok(only),
                    _ => Err(KeyChoiceError::AmbiguousKey),
                }
            }
        }
    }
}

fn text<'a>(jwk: &'a serde_json::Map<String, Value>, field: &str) -> Option<&'a str> {
    jwk.get(field).and_then(Value::as_str)
}

/// One JWK, or `None` when it is not a signature-verification key we support.
pub(crate) fn parse_jwk(value: &Value) -> Option<VerificationKey> {
    parse_jwk_checked(value, PointCheck::Now)
}

/// When an EC point is checked to be on its curve: when the key is loaded (a JWKS: refused
/// once, not at every request), or only by the verification itself (ring checks the point on
/// every verification; a DPoP proof's key is used once, and the check costs as much as the
/// verification).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PointCheck {
    Now,
    AtVerification,
}

pub(crate) fn parse_jwk_checked(value: &Value, check: PointCheck) -> Option<VerificationKey> {
    let jwk = value.as_object()?;
    if text(jwk, "use").is_some_and(|u| u != "sig") {
        return None;
    }
    if let Some(ops) = jwk.get("key_ops").and_then(Value::as_array) {
        if !ops.iter().any(|o| o.as_str() == Some("verify")) {
            return None;
        }
    }
    let alg = match text(jwk, "alg") {
        Some(a) => Some(a.parse::<Algorithm>().ok()?),
        None => None,
    };
    let b64 = |field: &str| URL_SAFE_NO_PAD.decode(text(jwk, field)?).ok();
    let (family, key) = match text(jwk, "kty")? {
        "RSA" => (KeyFamily::Rsa, rsa_key(&b64("n")?, &b64("e")?)?),
        "EC" => {
            let (family, len) = match text(jwk, "crv")? {
                "P-256" => (KeyFamily::EcP256, 32),
                "P-384" => (KeyFamily::EcP384, 48),
                _ => return None,
            };
            let (x, y) = (b64("x")?, b64("y")?);
            if x.len() != len || y.len() != len {
                return None;
            }
            let sec1: Vec<u8> = [&[0x04][..], &x, &y].concat();
            if check == PointCheck::Now && !point_is_on_curve(family, &sec1) {
                return None;
            }
            (family, VerifyingKey::Ec(sec1))
        }
        "OKP" if text(jwk, "crv")? == "Ed25519" => {
            let x: [u8; 32] = b64("x")?.try_into().ok()?;
            // A point that does not decode is refused here, not at every request.
            ed25519_dalek::VerifyingKey::from_bytes(&x).ok()?;
            (KeyFamily::Ed25519, VerifyingKey::Ed25519(x))
        }
        // Symmetric keys never come from a JWKS: a published "oct" key would let anyone sign.
        _ => return None,
    };
    if alg.is_some_and(|a| KeyFamily::for_algorithm(a) != family) {
        return None;
    }
    Some(VerificationKey {
        kid: text(jwk, "kid").map(str::to_string),
        family,
        alg,
        key,
    })
}

/// RSA keys of 2048 to 4096 bits (RFC 8725, NIST) with an odd exponent from 3 to 2^33-1.
fn rsa_key(n: &[u8], e: &[u8]) -> Option<VerifyingKey> {
    let strip = |b: &[u8]| -> Vec<u8> { b.iter().copied().skip_while(|x| *x == 0).collect() };
    let (n, e) = (strip(n), strip(e));
    let bits = n
        .len()
        .saturating_mul(8)
        .saturating_sub(n.first().map_or(8, |b| b.leading_zeros() as usize));
    if !(2048..=4096).contains(&bits) || e.len() > 5 {
        return None;
    }
    let e_value = e.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    if e_value < 3 || e_value % 2 == 0 || e_value > (1 << 33) - 1 {
        return None;
    }
    Some(VerifyingKey::Rsa { n, e })
}

/// ring parses the point on every verification and refuses one off the curve, but cannot say
/// whether the key or the signature was wrong. Checked once here instead, so a JWKS of only bad
/// points is "no usable key" rather than a key that never verifies: an ECDH agreement with a
/// throwaway key runs the same point check (`parse_uncompressed_point`) as ring's ECDSA
/// verifier, without a second curve implementation in the filter.
fn point_is_on_curve(family: KeyFamily, sec1: &[u8]) -> bool {
    use ring::agreement;
    let alg = match family {
        KeyFamily::EcP256 => &agreement::ECDH_P256,
        KeyFamily::EcP384 => &agreement::ECDH_P384,
        _ => return false,
    };
    let Ok(throwaway) =
        agreement::EphemeralPrivateKey::generate(alg, &ring::rand::SystemRandom::new())
    else {
        return false;
    };
    let point = agreement::UnparsedPublicKey::new(alg, sec1);
    agreement::agree_ephemeral(throwaway, &point, |_| ()).is_ok()
}

/// `jwks_uri` from an OpenID discovery document.
pub fn jwks_uri_from_discovery(bytes: &[u8]) -> Result<String, JwksError> {
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(JwksError::TooLarge);
    }
    let doc: Value = serde_json::from_slice(bytes).map_err(|_| JwksError::NotJson)?;
    match doc.get("jwks_uri").and_then(Value::as_str) {
        Some(uri) if uri.starts_with("https://") || uri.starts_with("http://") => {
            Ok(uri.to_string())
        }
        _ => Err(JwksError::NoJwksUri),
    }
}
