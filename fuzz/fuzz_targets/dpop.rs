//! DPoP proofs (the `DPoP` header) and JWK thumbprints.
#![no_main]
use gateguard_core::jwt::dpop::{check_proof, jwk_thumbprint, ProofTarget};
use gateguard_fuzz::NOW;
use libfuzzer_sys::fuzz_target;

const TARGET: ProofTarget<'static> = ProofTarget {
    method: "POST",
    scheme: "https",
    authority: "api.example.com",
    path: "/a/orders",
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (proof, jkt) = text.split_once('\n').unwrap_or((text, ""));
    let _ = check_proof(proof, "a.b.c", jkt, &TARGET, NOW, 60);
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        if let Some(t) = jwk_thumbprint(&v) {
            assert_eq!(t.len(), 43);
        }
    }
});
