//! Header rules: any pattern compiles or is refused; any header list is checked without panic.
#![no_main]
use gateguard_core::header_rules::{HeaderRules, HeaderRulesConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let pattern = lines.next().unwrap_or_default();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap_or((l, ""));
            (n.to_string(), v.to_string())
        })
        .collect();
    let cfg = HeaderRulesConfig {
        required: headers.iter().take(1).map(|(n, _)| n.clone()).collect(),
        forbidden: headers
            .iter()
            .skip(1)
            .take(1)
            .map(|(n, _)| n.clone())
            .collect(),
        patterns: [("x-h".to_string(), pattern.to_string())]
            .into_iter()
            .collect(),
    };
    if let Ok(rules) = HeaderRules::compile(&cfg, "headers", &["authorization"]) {
        if rules.check(&headers).is_ok() && pattern.bytes().all(|b| b.is_ascii_alphanumeric()) {
            // A literal pattern matches its own text, whole.
            for (n, v) in &headers {
                if n.eq_ignore_ascii_case("x-h") {
                    assert_eq!(v, pattern);
                }
            }
        }
    }
});
