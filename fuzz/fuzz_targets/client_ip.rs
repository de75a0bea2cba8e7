//! Client IP from the peer and X-Forwarded-For: always the peer or an address present, never one
//! left of the trusted hops.
#![no_main]
use gateguard_core::ip_filter::{client_ip, parse_address, ClientIpConfig, ClientIpPolicy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&hops, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let hops = hops % 4 + 1;
    let cfg = ClientIpConfig {
        trusted_proxy_hops: hops,
        trusted_proxies: Some(vec!["0.0.0.0/1".into(), "::/0".into()]),
    };
    let Ok(policy) = ClientIpPolicy::compile(&cfg, "client_ip") else {
        return;
    };
    let mut lines = text.split('\n');
    let peer = lines.next().unwrap_or_default();
    let values: Vec<&str> = lines.collect();
    let _ = parse_address(peer);
    if let Ok(ip) = client_ip(&policy, Some(peer), &values) {
        let peer_ip = parse_address(peer).map(|p| p.to_canonical());
        let flat: Vec<&str> = values.iter().flat_map(|v| v.split(',')).collect();
        let hops = usize::from(hops);
        let from_xff = flat.len() >= hops
            && parse_address(flat[flat.len() - hops]).map(|a| a.to_canonical()) == Some(ip);
        assert!(
            Some(ip) == peer_ip || from_xff,
            "{ip} from {peer:?} {values:?}"
        );
    }
});
