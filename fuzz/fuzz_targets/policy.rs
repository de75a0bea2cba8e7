//! Policy JSON: any bytes compile or are refused with a message naming where.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = gateguard_core::parse_policy(data, &|_| Some("secret".into())) {
        assert!(!e.to_string().trim().is_empty());
    }
});
