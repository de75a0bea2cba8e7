//! The one place that checks signatures, so the crypto backend can be swapped (jsonwebtoken's
//! RustCrypto provider today). Returns a plain yes/no: every failure is "bad signature".

use jsonwebtoken::{Algorithm, DecodingKey};

pub fn signature_is_valid(
    signature_b64: &str,
    signing_input: &str,
    key: &DecodingKey,
    alg: Algorithm,
) -> bool {
    // An empty signature is never valid (a stripped signature must not reach the backend).
    if signature_b64.is_empty() {
        return false;
    }
    jsonwebtoken::crypto::verify(signature_b64, signing_input.as_bytes(), key, alg).unwrap_or(false)
}
