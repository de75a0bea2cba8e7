//! `Authorization` values and compact JWS tokens: extraction, parsing, verification.
#![no_main]
use gateguard_core::jwt::token::{extract_bearer, parse};
use gateguard_core::jwt::KeySet;
use gateguard_core::CompiledPolicy;
use gateguard_fuzz::{jwks, policy, NOW};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static SETUP: (CompiledPolicy, KeySet) =
        (policy(), KeySet::from_jwks_value(&jwks()).unwrap_or_else(|_| panic!("keys")));
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
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
                // No key here signs anything a fuzzer can produce: nothing verifies.
                if let Ok(v) = jwt.verify(token, Some(keys), NOW) {
                    panic!("accepted a token the fuzzer made up: {token} {:?}", v.claims);
                }
            }
        }
    });
});
