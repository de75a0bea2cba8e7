//! A DPoP client for tests (feature `memory-store`, never in the filter): an ES256 key, its
//! public JWK and thumbprint, and proofs signed with it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::jwk_thumbprint;

pub struct TestClient {
    pair: EcdsaKeyPair,
    pub jwk: Value,
}

impl TestClient {
    /// A fresh P-256 key.
    // Test-only (never in the filter): ring's uncompressed P-256 point is 65 bytes, and ring
    // always reads back the key it generated.
    #[allow(
        clippy::new_without_default,
        clippy::indexing_slicing,
        clippy::unreachable
    )]
    pub fn new() -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap_or_else(|_| unreachable!("ring generates P-256 keys"));
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap_or_else(|_| unreachable!("ring reads its own PKCS#8"));
        let point = pair.public_key().as_ref();
        let jwk = json!({"kty": "EC", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])});
        Self { pair, jwk }
    }

    /// The RFC 7638 thumbprint a bound token names in `cnf.jkt`.
    pub fn jkt(&self) -> String {
        jwk_thumbprint(&self.jwk).unwrap_or_default()
    }

    /// A JWS of `header` and `claims`, signed ES256 with this key (whatever the header says).
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .map(|s| URL_SAFE_NO_PAD.encode(s.as_ref()))
            .unwrap_or_default();
        format!("{input}.{sig}")
    }

    /// A valid proof for `method` `htu` at `iat`, carrying `token`'s hash.
    pub fn proof_at(&self, method: &str, htu: &str, token: &str, jti: &str, iat: u64) -> String {
        let header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk});
        let claims = json!({"htm": method, "htu": htu, "iat": iat, "jti": jti,
            "ath": URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))});
        self.sign(&header, &claims)
    }
}
