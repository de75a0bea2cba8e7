//! Property tests of the parsers a request or a policy reaches, through the public API: no input
//! panics, and what each one accepts is what an independent reading accepts. `PROPTEST_CASES`
//! raises the (quick) default case counts.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use gateguard_core::client_cert::{describe_der, pem_or_der_to_der, Thumbprint};
use gateguard_core::cors::{CorsConfig, CorsPolicy, CorsVerdict};
use gateguard_core::header_rules::{HeaderRules, HeaderRulesConfig};
use gateguard_core::ip_filter::{
    client_ip, parse_address, ClientIpConfig, ClientIpPolicy, IpFilterConfig, IpFilterPolicy,
};
use gateguard_core::jwt::keys::jwks_uri_from_discovery;
use gateguard_core::jwt::token::{extract_bearer, parse};
use gateguard_core::jwt::KeySet;
use gateguard_core::parse_policy;
use gateguard_core::path::{normalize, prefix_matches, validate_prefix};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Map, Value};

/// The default config with `cases` cases, unless `PROPTEST_CASES` says otherwise.
fn cases(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

// ---------------------------------------------------------------- policy JSON

/// Field names of the policy, so random documents reach past the top level.
const POLICY_KEYS: &[&str] = &[
    "apis",
    "name",
    "path_prefix",
    "cors",
    "allowed_origins",
    "allowed_methods",
    "allowed_headers",
    "ip_filter",
    "allow",
    "deny",
    "subscription_key",
    "keys_sha256",
    "jwt",
    "issuers",
    "audiences",
    "algorithms",
    "jwks",
    "inline",
    "keys",
    "uri",
    "replay",
    "mode",
    "client_ip",
    "trusted_proxy_hops",
    "trusted_proxies",
    "replay_cache",
    "max_entries",
    "client_certificate",
    "thumbprints",
    "sources",
    "headers",
    "required",
    "forbidden",
    "patterns",
    "methods",
    "limits",
    "rate_limit",
    "quota",
    "calls",
    "period_seconds",
    "by",
    "inject_headers",
    "env",
    "required_claims",
    "claims_to_headers",
    "replay_store",
    "etcd",
    "listener",
    "upstream",
    "token_cache",
    "log",
    "$schema",
];

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_./:*%-]{0,16}",
        Just("https://*.contoso.com".to_string()),
        Just("10.0.0.0/8".to_string()),
        Just("RS256".to_string()),
        Just("/api".to_string()),
        any::<String>(),
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        arb_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 5, |inner| {
        let key = prop_oneof![
            3 => proptest::sample::select(POLICY_KEYS).prop_map(str::to_string),
            1 => arb_string(),
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::vec((key, inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn fixtures() -> Vec<Value> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");
    let mut docs = Vec::new();
    for name in ["demo.json", "entra-example.json", "quickstart.json"] {
        let text = std::fs::read(format!("{dir}/{name}")).unwrap();
        docs.push(serde_json::from_slice(&text).unwrap());
    }
    docs
}

fn env(_: &str) -> Option<String> {
    Some("secret-from-the-environment".into())
}

/// Every node of `doc`, as JSON pointers.
fn pointers(doc: &Value, at: String, out: &mut Vec<String>) {
    match doc {
        Value::Object(m) => {
            for (k, v) in m {
                pointers(
                    v,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                pointers(v, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

#[derive(Debug, Clone)]
enum Mutation {
    Replace(Index, Value),
    Remove(Index),
    Bytes(Vec<(Index, u8)>),
    Truncate(Index),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), arb_json()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        any::<Index>().prop_map(Mutation::Remove),
        proptest::collection::vec((any::<Index>(), any::<u8>()), 1..4).prop_map(Mutation::Bytes),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(doc: &Value, mutations: &[Mutation]) -> Vec<u8> {
    let mut doc = doc.clone();
    let mut bytes = None;
    for m in mutations {
        let mut all = Vec::new();
        pointers(&doc, String::new(), &mut all);
        match m {
            Mutation::Replace(i, v) => {
                let at = i.get(&all).clone();
                if let Some(node) = doc.pointer_mut(&at) {
                    *node = v.clone();
                }
            }
            Mutation::Remove(i) => {
                let at = i.get(&all).clone();
                if let Some((parent, last)) = at.rsplit_once('/') {
                    match doc.pointer_mut(parent) {
                        Some(Value::Object(o)) => {
                            o.remove(&last.replace("~1", "/").replace("~0", "~"));
                        }
                        Some(Value::Array(a)) => {
                            if let Ok(n) = last.parse::<usize>() {
                                if n < a.len() {
                                    a.remove(n);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            Mutation::Bytes(edits) => {
                let mut b = bytes.take().unwrap_or_else(|| doc.to_string().into_bytes());
                for (i, byte) in edits {
                    let at = i.index(b.len().max(1));
                    if at < b.len() {
                        b[at] = *byte;
                    }
                }
                bytes = Some(b);
            }
            Mutation::Truncate(i) => {
                let mut b = bytes.take().unwrap_or_else(|| doc.to_string().into_bytes());
                b.truncate(i.index(b.len().max(1)));
                bytes = Some(b);
            }
        }
    }
    bytes.unwrap_or_else(|| doc.to_string().into_bytes())
}

fn check_policy(bytes: &[u8]) {
    match parse_policy(bytes, &env) {
        Ok(_) => {}
        // A refusal names where and why.
        Err(e) => assert!(!e.to_string().trim().is_empty()),
    }
}

#[test]
fn the_fixtures_are_valid_policies() {
    for doc in fixtures() {
        parse_policy(doc.to_string().as_bytes(), &env).unwrap();
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn policy_from_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_policy(&bytes);
    }

    #[test]
    fn policy_from_arbitrary_json(doc in arb_json()) {
        check_policy(doc.to_string().as_bytes());
        check_policy(json!({"apis": [doc]}).to_string().as_bytes());
    }
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn policy_mutated_from_a_valid_one(
        which in any::<Index>(),
        mutations in proptest::collection::vec(arb_mutation(), 1..4),
    ) {
        let docs = fixtures();
        check_policy(&mutate(which.get(&docs), &mutations));
    }
}

// ---------------------------------------------------------------- Authorization and JWT parts

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn arb_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        arb_json().prop_map(|v| b64url(v.to_string().as_bytes())),
        Just(b64url(br#"{"alg":"RS256","typ":"JWT"}"#)),
        Just(b64url(br#"{"exp":1800000000,"iss":"x"}"#)),
        "[A-Za-z0-9_=+/-]{0,24}",
        any::<String>(),
    ]
}

fn arb_token() -> impl Strategy<Value = String> {
    prop_oneof![
        (arb_segment(), arb_segment(), arb_segment()).prop_map(|(a, b, c)| format!("{a}.{b}.{c}")),
        proptest::collection::vec(arb_segment(), 0..5).prop_map(|v| v.join(".")),
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn bearer_extraction(
        values in proptest::collection::vec(
            prop_oneof![
                "[ \t]{0,2}(Bearer|bearer|BEARER|Basic|)[ \t]{0,3}[A-Za-z0-9._, \t-]{0,20}",
                any::<String>(),
            ],
            0..3,
        ),
    ) {
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        if let Ok(token) = extract_bearer(&refs) {
            prop_assert_eq!(refs.len(), 1);
            prop_assert!(!token.is_empty());
            prop_assert!(!token.contains([' ', '\t', ',']));
            let value = refs[0].trim_matches([' ', '\t']);
            prop_assert!(value.len() > 6 && value[..6].eq_ignore_ascii_case("bearer"));
            prop_assert!(value[6..].starts_with([' ', '\t']));
            prop_assert_eq!(value[6..].trim_matches([' ', '\t']), token);
        }
    }

    #[test]
    fn token_parse(token in arb_token()) {
        if let Ok(parsed) = parse(&token) {
            let parts: Vec<&str> = token.split('.').collect();
            prop_assert_eq!(parts.len(), 3);
            prop_assert_eq!(parsed.signing_input, format!("{}.{}", parts[0], parts[1]));
            prop_assert_eq!(parsed.signature, parts[2]);
            prop_assert!(parsed.claims.contains_key("exp"));
        }
    }
}

// ---------------------------------------------------------------- JWKS and discovery

fn arb_jwk() -> impl Strategy<Value = Value> {
    let b64 = proptest::collection::vec(any::<u8>(), 0..80).prop_map(|b| Value::String(b64url(&b)));
    let field = prop_oneof![
        Just("kty"),
        Just("crv"),
        Just("x"),
        Just("y"),
        Just("n"),
        Just("e"),
        Just("kid"),
        Just("alg"),
        Just("use"),
        Just("key_ops"),
        Just("d"),
        Just("k"),
        Just("x5c"),
    ];
    let value = prop_oneof![
        b64,
        proptest::sample::select(
            &[
                "RSA", "EC", "OKP", "oct", "P-256", "P-384", "P-521", "Ed25519", "X25519", "RS256",
                "ES256", "EdDSA", "HS256", "sig", "enc", "AQAB", "",
            ][..]
        )
        .prop_map(|s| Value::String(s.to_string())),
        arb_json(),
    ];
    proptest::collection::vec((field, value), 0..8)
        .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn jwks_from_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = KeySet::from_jwks_json(&bytes);
        if let Ok(uri) = jwks_uri_from_discovery(&bytes) {
            prop_assert!(uri.starts_with("https://") || uri.starts_with("http://"));
        }
    }

    #[test]
    fn jwks_from_arbitrary_keys(keys in proptest::collection::vec(arb_jwk(), 0..4), doc in arb_json()) {
        let set = json!({"keys": keys});
        if let Ok(set) = KeySet::from_jwks_json(set.to_string().as_bytes()) {
            prop_assert!(set.len() <= keys.len());
        }
        let _ = KeySet::from_jwks_json(doc.to_string().as_bytes());
        let discovery = json!({"issuer": "x", "jwks_uri": doc});
        if let Ok(uri) = jwks_uri_from_discovery(discovery.to_string().as_bytes()) {
            prop_assert!(uri.starts_with("https://") || uri.starts_with("http://"));
            prop_assert_eq!(Some(uri.as_str()), doc.as_str());
        }
    }
}

// ---------------------------------------------------------------- thumbprints

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn thumbprint_accepts_exactly_40_or_64_hex(
        bytes in proptest::collection::vec(any::<u8>(), 15..36),
        upper in proptest::collection::vec(any::<bool>(), 72),
        colons in any::<bool>(),
    ) {
        let lower: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mixed: String = lower
            .chars()
            .zip(upper.iter().cycle())
            .map(|(c, up)| if *up { c.to_ascii_uppercase() } else { c })
            .collect();
        let text = if colons {
            mixed.as_bytes().chunks(2).map(|p| std::str::from_utf8(p).unwrap()).collect::<Vec<_>>().join(":")
        } else {
            mixed
        };
        match Thumbprint::parse(&text) {
            Ok(t) => {
                prop_assert!(bytes.len() == 20 || bytes.len() == 32);
                prop_assert_eq!(t.to_lower_hex(), lower.clone());
                prop_assert_eq!(t.to_string(), lower.to_ascii_uppercase());
                prop_assert_eq!(t.as_bytes(), &bytes[..]);
            }
            Err(_) => prop_assert!(bytes.len() != 20 && bytes.len() != 32),
        }
        // An odd digit count is never a thumbprint.
        let odd = format!("{lower}a");
        prop_assert!(Thumbprint::parse(&odd).is_err());
    }

    #[test]
    fn thumbprint_of_arbitrary_text(text in prop_oneof!["[0-9a-fA-F: g]{36,70}", any::<String>()]) {
        let digits: String = text.chars().filter(|c| *c != ':' && !c.is_whitespace()).collect();
        let reference = digits.chars().all(|c| c.is_ascii_hexdigit())
            && (digits.len() == 40 || digits.len() == 64);
        match Thumbprint::parse(&text) {
            Ok(t) => {
                prop_assert!(reference, "accepted {:?}", text);
                prop_assert_eq!(t.to_lower_hex(), digits.to_ascii_lowercase());
            }
            Err(_) => prop_assert!(!reference, "refused {:?}", text),
        }
    }
}

// ---------------------------------------------------------------- addresses, X-Forwarded-For, CIDRs

fn arb_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        any::<[u8; 16]>().prop_map(|o| IpAddr::V6(Ipv6Addr::from(o))),
        // A few networks' worth of neighbours, so lists and addresses meet.
        (0u8..4, any::<u8>()).prop_map(|(c, d)| IpAddr::V4(Ipv4Addr::new(10, 0, c, d))),
        (0u8..4, any::<u8>())
            .prop_map(|(c, d)| IpAddr::V6(Ipv4Addr::new(10, 0, c, d).to_ipv6_mapped())),
        (0u16..4, any::<u16>())
            .prop_map(|(c, d)| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, c, 0, 0, 0, d))),
    ]
}

/// How X-Forwarded-For and Envoy's `source.address` spell an address.
fn spell(ip: IpAddr, style: u8, port: u16) -> String {
    match (ip, style % 3) {
        (IpAddr::V4(v4), 1) => format!("{v4}:{port}"),
        (IpAddr::V6(v6), 1) => format!("[{v6}]:{port}"),
        (IpAddr::V6(v6), 2) => format!("[{v6}]"),
        (ip, _) => ip.to_string(),
    }
}

/// An independent reading of an address, with or without a port.
fn reference_address(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    let port_ok = |p: &str| (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = s.strip_prefix('[') {
        let close = rest.find(']')?;
        let (addr, after) = (&rest[..close], &rest[close + 1..]);
        let ok = after.is_empty() || after.strip_prefix(':').is_some_and(port_ok);
        return ok
            .then(|| addr.parse::<Ipv6Addr>().ok().map(IpAddr::V6))
            .flatten();
    }
    let colon = s.rfind(':')?;
    port_ok(&s[colon + 1..])
        .then(|| s[..colon].parse::<Ipv4Addr>().ok().map(IpAddr::V4))
        .flatten()
}

fn arb_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<[u8; 4]>(), 0u8..=32)
            .prop_map(|(o, p)| IpNet::V4(Ipv4Net::new(o.into(), p).unwrap().trunc())),
        (0u8..4, 22u8..=32).prop_map(|(c, p)| IpNet::V4(
            Ipv4Net::new(Ipv4Addr::new(10, 0, c, 0), p).unwrap().trunc()
        )),
        (any::<[u8; 16]>(), 0u8..=128)
            .prop_map(|(o, p)| IpNet::V6(Ipv6Net::new(o.into(), p).unwrap().trunc())),
        (0u16..4, 48u8..=128).prop_map(|(c, p)| {
            IpNet::V6(
                Ipv6Net::new(Ipv6Addr::new(0x2001, 0xdb8, 0, c, 0, 0, 0, 0), p)
                    .unwrap()
                    .trunc(),
            )
        }),
        // IPv4-mapped IPv6 networks: compared as the IPv4 networks they hold.
        (0u8..4, 96u8..=128).prop_map(|(c, p)| {
            IpNet::V6(
                Ipv6Net::new(Ipv4Addr::new(10, 0, c, 0).to_ipv6_mapped(), p)
                    .unwrap()
                    .trunc(),
            )
        }),
    ]
}

/// ipnet's own `contains`, on the address as the client is known by (an IPv4-mapped address is
/// its IPv4 one) and on IPv4-mapped networks as the IPv4 networks they hold.
fn reference_contains(net: &IpNet, ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    if let (IpNet::V6(v6), IpAddr::V4(v4)) = (net, ip) {
        if v6.prefix_len() >= 96 && v6.addr().to_ipv4_mapped().is_some() {
            return v6.contains(&v4.to_ipv6_mapped());
        }
    }
    net.contains(&ip)
}

fn net_text(net: &IpNet, bare: bool) -> String {
    if bare && net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn address_spellings_parse_to_the_address(ip in arb_ip(), style in any::<u8>(), port in any::<u16>()) {
        prop_assert_eq!(parse_address(&spell(ip, style, port)), Some(ip));
    }

    #[test]
    fn address_of_arbitrary_text(
        text in prop_oneof!["[\\[\\]0-9a-fA-F:. ]{0,24}", any::<String>()],
    ) {
        prop_assert_eq!(parse_address(&text), reference_address(&text));
    }

    #[test]
    fn ip_filter_agrees_with_ipnet(
        allow in proptest::option::of(proptest::collection::vec((arb_net(), any::<bool>()), 1..5)),
        deny in proptest::option::of(proptest::collection::vec((arb_net(), any::<bool>()), 1..5)),
        clients in proptest::collection::vec(arb_ip(), 1..16),
    ) {
        // A policy needs one of the lists.
        let allow = match (allow, &deny) {
            (None, None) => Some(vec![(IpNet::V4(Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 0), 8).unwrap()), false)]),
            (allow, _) => allow,
        };
        let texts = |l: &Option<Vec<(IpNet, bool)>>| {
            l.as_ref().map(|l| l.iter().map(|(n, bare)| net_text(n, *bare)).collect::<Vec<_>>())
        };
        let cfg = IpFilterConfig { allow: texts(&allow), deny: texts(&deny) };
        let policy = IpFilterPolicy::compile(&cfg, "ip_filter").unwrap();
        for ip in clients {
            let denied = deny.iter().flatten().any(|(n, _)| reference_contains(n, ip));
            let allowed = allow.as_ref().is_none_or(|l| l.iter().any(|(n, _)| reference_contains(n, ip)));
            prop_assert_eq!(policy.admits(ip), !denied && allowed, "{} against {:?}", ip, cfg);
        }
    }

    #[test]
    fn cidr_lists_of_arbitrary_text(list in proptest::collection::vec(
        prop_oneof!["[0-9a-f:./ ]{0,24}", any::<String>()], 1..3)) {
        let _ = IpFilterPolicy::compile(&IpFilterConfig { allow: Some(list.clone()), deny: None }, "x");
        let _ = ClientIpPolicy::compile(
            &ClientIpConfig { trusted_proxy_hops: 1, trusted_proxies: Some(list) }, "x");
    }

    #[test]
    fn forwarded_for_never_yields_an_address_left_of_the_trusted_hops(
        hops in 1u8..4,
        proxies in proptest::collection::vec(arb_net(), 1..3),
        peer in arb_ip(),
        peer_style in any::<u8>(),
        entries in proptest::collection::vec(
            prop_oneof![
                4 => (arb_ip(), any::<u8>(), any::<u16>()).prop_map(|(ip, s, p)| format!(" {} ", spell(ip, s, p))),
                1 => "[a-z0-9:. \\[\\]]{0,8}",
                1 => Just(String::new()),
            ],
            0..8,
        ),
        cuts in proptest::collection::vec(any::<bool>(), 8),
    ) {
        let cfg = ClientIpConfig {
            trusted_proxy_hops: hops,
            trusted_proxies: Some(proxies.iter().map(|n| n.to_string()).collect()),
        };
        let policy = ClientIpPolicy::compile(&cfg, "client_ip").unwrap();
        // The list, split across header occurrences at random commas.
        let mut values: Vec<String> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            match values.last_mut() {
                Some(last) if !cuts[i] => {
                    last.push(',');
                    last.push_str(e);
                }
                _ => values.push(e.clone()),
            }
        }
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        let peer_text = spell(peer, peer_style, 443);
        let got = client_ip(&policy, Some(&peer_text), &refs);
        let peer_c = peer.to_canonical();
        let trusted = proxies.iter().any(|n| reference_contains(n, peer_c));
        // Reference: the entries in order, the client `hops` from the right, every entry from
        // it rightwards an address.
        let flat: Vec<&str> = refs.iter().flat_map(|v| v.split(',')).collect();
        let expected = if !trusted {
            Some(peer_c)
        } else if flat.len() < usize::from(hops) {
            None
        } else {
            let from = flat.len() - usize::from(hops);
            let read: Option<Vec<IpAddr>> = flat[from..].iter().map(|e| reference_address(e)).collect();
            read.map(|r| r[0].to_canonical())
        };
        prop_assert_eq!(got.ok(), expected);
        if let Ok(ip) = got {
            let present = flat.iter().filter_map(|e| reference_address(e)).any(|a| a.to_canonical() == ip);
            prop_assert!(ip == peer_c || present);
        }
    }
}

// ---------------------------------------------------------------- CORS origins

const LABELS: &[&str] = &[
    "a",
    "b",
    "contoso",
    "com",
    "example",
    "portal",
    "evil",
    "xn--80ak6aa92e",
    "1",
    "a-b",
    "_x",
];

fn arb_host() -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(LABELS), 1..4).prop_map(|l| l.join("."))
}

fn arb_origin() -> impl Strategy<Value = String> {
    (
        proptest::sample::select(&["http", "https", "HTTPS", "ftp", "wss"][..]),
        arb_host(),
        any::<bool>(),
        proptest::option::of(proptest::sample::select(&[80u16, 443, 8080, 3000][..])),
        any::<bool>(),
    )
        .prop_map(|(scheme, host, up, port, v6)| {
            let host = if up { host.to_ascii_uppercase() } else { host };
            let host = if v6 && host.len() < 4 {
                "[2001:DB8::1]".to_string()
            } else {
                host
            };
            match port {
                Some(p) => format!("{scheme}://{host}:{p}"),
                None => format!("{scheme}://{host}"),
            }
        })
}

#[derive(Debug, Clone, PartialEq)]
struct RefOrigin {
    scheme: String,
    host: String,
    port: u16,
}

/// An independent reading of a serialised origin (RFC 6454): http(s), a host name of letters,
/// digits, `-` and `_` labels or an IPv6 literal, an optional port.
fn reference_origin(text: &str) -> Option<RefOrigin> {
    let text = text.trim();
    let colon = text.find("://")?;
    let scheme = text[..colon].to_ascii_lowercase();
    let default = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let rest = &text[colon + 3..];
    let (host, port) = if rest.starts_with('[') {
        let close = rest.find(']')?;
        let host = &rest[..=close];
        host[1..close].parse::<Ipv6Addr>().ok()?;
        (host, &rest[close + 1..])
    } else {
        match rest.rfind(':') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        }
    };
    let port = match port {
        "" => default,
        p => {
            let digits = p.strip_prefix(':')?;
            if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            digits.parse().ok()?
        }
    };
    let host = host.to_ascii_lowercase();
    let name_ok = host.starts_with('[')
        || (host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            }));
    name_ok.then_some(RefOrigin { scheme, host, port })
}

fn reference_allows(allowed: &[String], origin: &str) -> bool {
    let Some(o) = reference_origin(origin) else {
        return false;
    };
    allowed.iter().any(|entry| {
        if entry == "*" {
            return true;
        }
        if let Some((scheme, rest)) = entry.split_once("://*.") {
            // A wildcard: the same scheme and port, and at least one more label in front.
            let Some(w) = reference_origin(&format!("{scheme}://{rest}")) else {
                return false;
            };
            return o.scheme == w.scheme
                && o.port == w.port
                && o.host.len() > w.host.len() + 1
                && o.host.ends_with(&format!(".{}", w.host));
        }
        reference_origin(entry).is_some_and(|e| e == o)
    })
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn cors_allows_only_listed_origins_and_true_subdomains(
        allowed in proptest::collection::vec(
            prop_oneof![
                3 => arb_origin(),
                2 => (proptest::sample::select(&["http", "https"][..]), arb_host(),
                      proptest::option::of(proptest::sample::select(&[443u16, 8080][..])))
                    .prop_map(|(s, h, p)| match p {
                        Some(p) => format!("{s}://*.{h}:{p}"),
                        None => format!("{s}://*.{h}"),
                    }),
                1 => Just("*".to_string()),
            ],
            1..4,
        ),
        origins in proptest::collection::vec(prop_oneof![
            4 => arb_origin(),
            1 => arb_origin().prop_map(|o| format!("{o}/")),
            1 => arb_origin().prop_map(|o| format!(" {o} ")),
            1 => "[a-z:/.*\\[\\]@ ]{0,24}",
            1 => any::<String>(),
        ], 1..8),
    ) {
        let cfg = CorsConfig {
            allowed_origins: allowed.clone(),
            allowed_methods: vec!["GET".into()],
            allowed_headers: vec![],
            expose_headers: vec![],
            allow_credentials: false,
            max_age_seconds: None,
        };
        let Ok(policy) = CorsPolicy::compile(&cfg, "cors") else {
            // Only entries that are not origins or wildcards of a domain are refused.
            prop_assert!(allowed.iter().any(|a| a != "*" && {
                let plain = a.replacen("://*.", "://", 1);
                reference_origin(&plain).is_none() || (a.contains("://*.") && !plain.split("://").nth(1).unwrap_or("").contains('.'))
            }), "refused {:?}", allowed);
            return Ok(());
        };
        for origin in origins {
            prop_assert_eq!(
                policy.origin_allowed(&origin),
                reference_allows(&allowed, &origin),
                "origin {:?} against {:?}", origin, allowed
            );
            let verdict = policy.evaluate(&[origin.as_str()], None);
            if reference_allows(&allowed, &origin) {
                let echoed = matches!(&verdict, CorsVerdict::Allowed(h)
                    if h.iter().any(|(k, v)| k == "access-control-allow-origin" && v == origin.trim()));
                prop_assert!(echoed, "{:?}", verdict);
            } else {
                prop_assert_eq!(verdict, CorsVerdict::Denied);
            }
            prop_assert_eq!(policy.evaluate(&[origin.as_str(), origin.as_str()], None), CorsVerdict::Denied);
        }
    }
}

// ---------------------------------------------------------------- paths

const SEGMENTS: &[&str] = &[
    "api",
    "API",
    "admin",
    "x",
    "..",
    ".",
    "%2e",
    "%2E%2e",
    "%2F",
    "%5c",
    "\\",
    "%25",
    "%252e",
    "%2541",
    ";v=1",
    "..;",
    "admin;x",
    "%3B",
    "%3F",
    "%23",
    "%24metadata",
    "%61pi",
    "x.",
    "x%20",
    "%00",
    "%zz",
    "ı",
    "%C4%B1",
    "%C0%AE",
    "ａ",
    "%EF%BC%8F",
    "",
    "~user",
    "a%2Fb",
    "%",
    "%4",
    "é",
    "%C3%A9",
    "%34",
    "%31",
    "%36%31",
    "%2",
    "4",
    "1",
    "e",
];

fn arb_path() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (proptest::collection::vec(
                  proptest::collection::vec(proptest::sample::select(SEGMENTS), 1..4).prop_map(|t| t.concat()),
                  0..6),
              any::<bool>(),
              proptest::option::of("[a-z=&%?#/]{0,8}"))
            .prop_map(|(segs, slash, query)| {
                let mut p = format!("/{}", segs.join("/"));
                if slash {
                    p.push('/');
                }
                if let Some(q) = query {
                    p.push('?');
                    p.push_str(&q);
                }
                p
            }),
        1 => "/[a-zA-Z0-9%./;?#\\\\ -]{0,24}",
        1 => any::<String>(),
    ]
}

/// Percent-encodes what a raw request target cannot carry literally: the normal form read back
/// as a request path.
fn as_target(normalized: &str) -> String {
    normalized
        .replace('%', "%25")
        .replace('?', "%3F")
        .replace('#', "%23")
}

/// An independent reading of where a raw path leads: decode every escape, drop `;` parameters,
/// merge slashes, resolve dot segments (RFC 3986 5.2.4). `None` if it does not decode.
fn reference_resolve(raw: &str) -> Option<Vec<String>> {
    let bytes = raw.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let text = String::from_utf8(out).ok()?;
    let mut stack: Vec<String> = Vec::new();
    for seg in text.split(['/', '\\']) {
        let name = seg.split(';').next().unwrap_or_default();
        match name {
            "" | "." => {}
            ".." => {
                stack.pop();
            }
            n => stack.push(n.to_string()),
        }
    }
    Some(stack)
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn normalisation_is_idempotent(path in arb_path()) {
        if let Ok(n) = normalize(&path) {
            let target = as_target(&n.normalized);
            let again = normalize(&target).expect("the normal form normalises");
            prop_assert_eq!(&again.normalized, &n.normalized);
            // What a raw target can hold literally is its own normal form.
            if !n.normalized.contains(['%', '?', '#']) {
                let literal = normalize(&n.normalized).unwrap();
                prop_assert_eq!(&literal.normalized, &n.normalized);
            }
            prop_assert!(n.normalized.starts_with('/'));
            prop_assert!(!n.normalized.contains("//"));
            prop_assert!(path.starts_with(n.raw));
        }
    }

    #[test]
    fn a_matched_prefix_really_contains_the_path(
        path in arb_path(),
        prefix in proptest::sample::select(&["/", "/api", "/API/admin", "/odata/$metadata", "/api/x", "/a-b"][..]),
    ) {
        prop_assert!(validate_prefix(prefix).is_ok());
        let Ok(n) = normalize(&path) else { return Ok(()) };
        if prefix_matches(prefix, &n.normalized) {
            let under = reference_resolve(n.raw).expect("a routed path decodes");
            let want: Vec<String> = prefix.split('/').filter(|s| !s.is_empty()).map(str::to_ascii_lowercase).collect();
            prop_assert!(under.len() >= want.len(), "{:?} under {}", path, prefix);
            for (have, want) in under.iter().zip(&want) {
                prop_assert_eq!(&have.to_ascii_lowercase(), want, "{:?} under {}", path, prefix);
            }
            prop_assert!(!under.iter().any(|s| s == "." || s == ".."));
        }
    }

    #[test]
    fn prefixes_of_arbitrary_text(prefix in prop_oneof!["/[a-zA-Z0-9%./;?#-]{0,12}", any::<String>()], path in arb_path()) {
        if validate_prefix(&prefix).is_ok() {
            let n = normalize(&prefix).unwrap();
            prop_assert_eq!(&n.normalized, &prefix);
            prop_assert!(prefix_matches(&prefix, &prefix));
        }
        let _ = prefix_matches(&prefix, &path);
    }
}

// ---------------------------------------------------------------- header patterns

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn header_patterns_compile_or_refuse_and_never_panic(
        pattern in prop_oneof![
            "[a-z0-9|().*+?\\[\\]{},^$\\\\-]{0,24}",
            Just("a)|(?:.*".to_string()),
            Just("(((((((((((((((((((((((((((((((((a)))))))))))))))))))))))))))))))))".to_string()),
            Just("a{1000}{1000}".to_string()),
            any::<String>(),
        ],
        name in prop_oneof!["[a-z_-]{1,12}", any::<String>()],
        values in proptest::collection::vec((
            prop_oneof!["[a-zA-Z_-]{1,12}", Just("x-h".to_string()), Just("X_H".to_string())],
            prop_oneof!["[a-z0-9]{0,16}", any::<String>(), Just("a".repeat(5000))],
        ), 0..4),
    ) {
        let cfg = HeaderRulesConfig {
            required: vec![],
            forbidden: vec![],
            patterns: [("x-h".to_string(), pattern.clone()), (name, pattern.clone())].into_iter().collect(),
        };
        if let Ok(rules) = HeaderRules::compile(&cfg, "headers", &[]) {
            // Whole-value matching: a value accepted for x-h matches the pattern anchored.
            let anchored = literal_pattern(&pattern);
            if let Ok(()) = rules.check(&values) {
                for (k, v) in &values {
                    if k.eq_ignore_ascii_case("x-h") || k.eq_ignore_ascii_case("x_h") {
                        prop_assert!(v.len() <= 4096);
                        if let Some(exact) = &anchored {
                            prop_assert_eq!(v, exact);
                        }
                    }
                }
            }
        }
    }
}

/// For a pattern of plain letters and digits, the only value it accepts.
fn literal_pattern(pattern: &str) -> Option<String> {
    (pattern.bytes().all(|b| b.is_ascii_alphanumeric())).then(|| pattern.to_string())
}

// ---------------------------------------------------------------- PEM and DER files

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn certificate_files_of_arbitrary_bytes(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            (proptest::collection::vec(any::<u8>(), 0..64), "[A-Za-z0-9+/= \n]{0,64}", any::<bool>())
                .prop_map(|(der, b64, end)| {
                    let mut v = b"junk\n-----BEGIN CERTIFICATE-----\n".to_vec();
                    v.extend_from_slice(b64.as_bytes());
                    use base64::Engine;
                    v.extend_from_slice(base64::engine::general_purpose::STANDARD.encode(&der).as_bytes());
                    if end {
                        v.extend_from_slice(b"\n-----END CERTIFICATE-----\n");
                    }
                    v
                }),
            proptest::collection::vec(any::<u8>(), 0..128).prop_map(|mut v| { v.insert(0, 0x30); v }),
        ],
    ) {
        if let Ok(der) = pem_or_der_to_der(&bytes) {
            // Whatever is accepted is one whole certificate.
            let summary = describe_der(&der).expect("an accepted file describes");
            prop_assert_eq!(summary.sha256, Thumbprint::sha256_of(&der));
        }
        let _ = describe_der(&bytes);
    }
}

/// Found by `normalisation_is_idempotent`: `%25` followed by escaped hex digits routed as
/// `/%61pi/admin` while a backend that decodes twice serves `/api/admin`.
#[test]
fn double_encoding_through_escaped_hex_digits_is_refused() {
    use gateguard_core::path::PathError;
    for path in [
        "/%25%36%31pi/admin",
        "/%25%34%31",
        "/api/%25%32%65%25%32%65/admin",
        "/%254%31",
    ] {
        assert_eq!(normalize(path), Err(PathError::DoubleEncoding), "{path}");
    }
    // A lone percent sign is still a literal one.
    assert_eq!(normalize("/api/100%25").unwrap().normalized, "/api/100%");
    assert_eq!(
        normalize("/api/100%25%7A").unwrap().normalized,
        "/api/100%z"
    );
}
