//! JWKS documents and OpenID discovery documents, directly and through the fetcher.
#![no_main]
use gateguard_core::jwt::fetch::{FetchStep, JwksFetcher};
use gateguard_core::jwt::keys::jwks_uri_from_discovery;
use gateguard_core::jwt::KeySet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(set) = KeySet::from_jwks_json(data) {
        assert!(!set.is_empty());
        let _ = set.fingerprint();
    }
    if let Ok(uri) = jwks_uri_from_discovery(data) {
        assert!(uri.starts_with("https://") || uri.starts_with("http://"));
    }
    let mut fetcher = JwksFetcher::new("https://idp.example/.well-known/openid-configuration", 300);
    let mut now = 1_800_000_000;
    for _ in 0..3 {
        match fetcher.poll(now) {
            Some(FetchStep::Jwks(_)) | Some(FetchStep::Discovery(_)) => {
                let _ = fetcher.on_response(now, 200, data);
            }
            None => {}
        }
        now += 400;
    }
});
