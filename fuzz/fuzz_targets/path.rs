//! Request paths: normalisation is idempotent and prefix matching stays under the prefix.
#![no_main]
use gateguard_core::path::{normalize, prefix_matches, validate_prefix};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = normalize(text) {
        // The normal form, read back as a request path, is its own normal form.
        let target = n
            .normalized
            .replace('%', "%25")
            .replace('?', "%3F")
            .replace('#', "%23");
        match normalize(&target) {
            Ok(again) => assert_eq!(again.normalized, n.normalized, "{text:?}"),
            Err(e) => panic!(
                "{text:?} normalised to {:?}, which is refused: {e:?}",
                n.normalized
            ),
        }
        assert!(n.normalized.starts_with('/') && !n.normalized.contains("//"));
        for prefix in ["/", "/api", "/odata/$metadata"] {
            if prefix_matches(prefix, &n.normalized) && prefix != "/" {
                let under = n.normalized.to_ascii_lowercase();
                assert!(under.starts_with(&prefix.to_ascii_lowercase()));
                assert!(!n.normalized.split('/').any(|s| s == "." || s == ".."));
            }
        }
    }
    if validate_prefix(text).is_ok() {
        assert!(prefix_matches(text, text));
        assert_eq!(normalize(text).map(|n| n.normalized).as_deref(), Ok(text));
    }
});
