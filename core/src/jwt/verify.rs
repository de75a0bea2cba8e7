//! The one place that checks signatures: ring's verifiers for every algorithm. Returns a plain
//! yes/no: every failure is "bad signature".
//!
//! Why ring and not jsonwebtoken's RustCrypto backend: in V8, RS256 through `rsa` 0.9 costs
//! 3.5-4.5x more. num-bigint-dig's `modpow` runs a fixed 4-bit window over every bit of a 64-bit
//! digit (~90 Montgomery products for e = 65537 instead of 17), recomputes R² mod n with a long
//! division on every call, and its 64-bit digits become 128-bit multiplications that wasm32
//! emulates. ring multiplies 32-bit limbs with native 64-bit products and exponentiates by the
//! exponent's own bits; `rsa` 0.10 (crypto-bigint) measured ~1.8x slower than ring in V8. ring has
//! no pre-parsed RSA public key for verification, so the modulus is parsed per call (R² by
//! doublings and five squarings: about a fifth of the cost).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::Algorithm;
use ring::{hmac, signature};

/// A key that verifies signatures, as ring's verifiers take it. Public keys were validated when
/// the JWKS was loaded (`keys::parse_jwk`); ring checks them again on every verification.
#[derive(Clone)]
pub enum VerifyingKey {
    /// Big-endian modulus and exponent, without leading zero bytes.
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed SEC1 point (0x04 || x || y) on P-256 (65 bytes) or P-384 (97 bytes).
    Ec(Vec<u8>),
    Ed25519([u8; 32]),
    /// The shared secret, keyed once for each HS algorithm.
    Hmac(Box<HmacKeys>),
}

#[derive(Clone)]
pub struct HmacKeys {
    sha256: hmac::Key,
    sha384: hmac::Key,
    sha512: hmac::Key,
}

impl VerifyingKey {
    pub fn hmac(secret: &[u8]) -> Self {
        VerifyingKey::Hmac(Box::new(HmacKeys {
            sha256: hmac::Key::new(hmac::HMAC_SHA256, secret),
            sha384: hmac::Key::new(hmac::HMAC_SHA384, secret),
            sha512: hmac::Key::new(hmac::HMAC_SHA512, secret),
        }))
    }
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret; public keys are long and say nothing in a log.
        f.write_str(match self {
            VerifyingKey::Rsa { .. } => "VerifyingKey::Rsa",
            VerifyingKey::Ec(_) => "VerifyingKey::Ec",
            VerifyingKey::Ed25519(_) => "VerifyingKey::Ed25519",
            VerifyingKey::Hmac(_) => "VerifyingKey::Hmac",
        })
    }
}

pub fn signature_is_valid(
    signature_b64: &str,
    signing_input: &str,
    key: &VerifyingKey,
    alg: Algorithm,
) -> bool {
    // An empty signature is never valid (a stripped signature must not reach the backend).
    if signature_b64.is_empty() {
        return false;
    }
    // Strict base64url, as for the header and claims (no padding, canonical trailing bits).
    let Ok(signature) = URL_SAFE_NO_PAD.decode(signature_b64) else {
        return false;
    };
    let message = signing_input.as_bytes();
    let public = |alg: &'static dyn signature::VerificationAlgorithm, key: &[u8]| {
        signature::UnparsedPublicKey::new(alg, key)
            .verify(message, &signature)
            .is_ok()
    };
    let rsa = |params: &'static signature::RsaParameters, n: &[u8], e: &[u8]| {
        signature::RsaPublicKeyComponents { n, e }
            .verify(params, message, &signature)
            .is_ok()
    };
    // The pairs below are the only ones that verify; the key's family was already matched to
    // the algorithm by `KeySet::choose`, this refuses a mismatch again.
    match (key, alg) {
        (VerifyingKey::Rsa { n, e }, alg) => match alg {
            Algorithm::RS256 => rsa(&signature::RSA_PKCS1_2048_8192_SHA256, n, e),
            Algorithm::RS384 => rsa(&signature::RSA_PKCS1_2048_8192_SHA384, n, e),
            Algorithm::RS512 => rsa(&signature::RSA_PKCS1_2048_8192_SHA512, n, e),
            Algorithm::PS256 => rsa(&signature::RSA_PSS_2048_8192_SHA256, n, e),
            Algorithm::PS384 => rsa(&signature::RSA_PSS_2048_8192_SHA384, n, e),
            Algorithm::PS512 => rsa(&signature::RSA_PSS_2048_8192_SHA512, n, e),
            _ => false,
        },
        // JWS (RFC 7518 §3.4) signatures are r || s, fixed length: ring's *_FIXED.
        (VerifyingKey::Ec(point), Algorithm::ES256) if point.len() == 65 => {
            public(&signature::ECDSA_P256_SHA256_FIXED, point)
        }
        (VerifyingKey::Ec(point), Algorithm::ES384) if point.len() == 97 => {
            public(&signature::ECDSA_P384_SHA384_FIXED, point)
        }
        (VerifyingKey::Ed25519(x), Algorithm::EdDSA) => public(&signature::ED25519, x),
        (VerifyingKey::Hmac(keys), alg) => {
            let key = match alg {
                Algorithm::HS256 => &keys.sha256,
                Algorithm::HS384 => &keys.sha384,
                Algorithm::HS512 => &keys.sha512,
                _ => return false,
            };
            // Constant time in the tag.
            hmac::verify(key, message, &signature).is_ok()
        }
        _ => false,
    }
}
