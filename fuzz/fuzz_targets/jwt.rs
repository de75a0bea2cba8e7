//! `Authorization` values and compact JWS tokens: extraction, parsing, verification.
#![no_main]
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signature, VerifyingKey};
use gateguard_core::jwt::token::{extract_bearer, parse};
use gateguard_core::jwt::KeySet;
use gateguard_core::CompiledPolicy;
use gateguard_fuzz::ED25519_X;
use gateguard_fuzz::{jwks, policy, NOW};
use libfuzzer_sys::fuzz_target;

/// ed25519-dalek's strict verdict on the token's signature with the policy's one key.
fn verified_independently(token: &str) -> bool {
    let Some((signing_input, signature)) = token.rsplit_once('.') else {
        return false;
    };
    let key = URL_SAFE_NO_PAD
        .decode(ED25519_X)
        .ok()
        .and_then(|k| <[u8; 32]>::try_from(k).ok());
    let Some(key) = key.and_then(|k| VerifyingKey::from_bytes(&k).ok()) else {
        return false;
    };
    let Some(sig) = URL_SAFE_NO_PAD
        .decode(signature)
        .ok()
        .and_then(|s| Signature::from_slice(&s).ok())
    else {
        return false;
    };
    key.verify_strict(signing_input.as_bytes(), &sig).is_ok()
}

thread_local! {
    static SETUP: (CompiledPolicy, KeySet) =
        (policy(), KeySet::from_jwks_value(&jwks()).unwrap_or_else(|_| panic!("keys")));
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let values: Vec<&str> = text.split('\n').collect();
    let token = match extract_bearer(&values) {
        Ok(t) => {
            assert!(!t.is_empty() && !t.contains([' ', '\t', ',']));
            t
        }
        Err(_) => text,
    };
    if let Ok(p) = parse(token) {
        assert_eq!(format!("{}.{}", p.signing_input, p.signature), token);
    }
    SETUP.with(|(policy, keys)| {
        for api in &policy.apis {
            if let Some(jwt) = &api.jwt {
                // Whatever is accepted carries a signature another implementation verifies.
                if jwt.verify(token, Some(keys), NOW).is_ok() {
                    assert!(verified_independently(token), "accepted {token}");
                }
            }
        }
    });
});
