//! Property tests of the whole pipeline with arbitrary requests: no panic, every refusal is a
//! well-formed reply, and a forwarded request met every check of its API, judged independently
//! (the token verified by jsonwebtoken, the client IP by ipnet, the key by its hash).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::IpAddr;

use common::*;
use gateguard_core::decision::Decision;
use gateguard_core::pipeline::Request;
use gateguard_core::CompiledPolicy;
use proptest::prelude::*;
use serde_json::{json, Value};

fn cases(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

/// The common three APIs, with header rules, methods, a rate limit and a catch-all API.
fn doc(s: &Signer) -> Value {
    let mut doc = policy_doc(s, 1000);
    let a = &mut doc["apis"][0];
    a["methods"] = json!(["GET", "POST"]);
    a["headers"] =
        json!({"forbidden": ["x-debug"], "patterns": {"x-correlation-id": "[0-9a-f-]{1,36}"}});
    a["rate_limit"] = json!({"by": "client_ip", "calls": 50, "renewal_period_seconds": 60});
    a["ip_filter"] = json!({"allow": ["10.0.0.0/8", "2001:db8::/32"], "deny": ["10.6.6.0/24"]});
    doc["apis"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "open", "path_prefix": "/open"}));
    doc
}

const HEADER_NAMES: &[&str] = &[
    "authorization",
    "Authorization",
    "origin",
    "ocp-apim-subscription-key",
    "x-user-id",
    "x-roles",
    "x-debug",
    "X_Debug",
    "x-correlation-id",
    "x-forwarded-for",
    "dpop",
    ":authority",
    ":scheme",
    "access-control-request-method",
    "content-length",
    "host",
    "x-forwarded-client-cert",
];

fn arb_value(token: String) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(format!("Bearer {token}")),
        1 => Just(token.clone()),
        1 => Just("k".to_string()),
        1 => Just("https://portal.example.com".to_string()),
        1 => Just("0f8fad5b-d9cb".to_string()),
        1 => Just("10.1.2.3, 10.6.6.6".to_string()),
        1 => (any::<proptest::sample::Index>(), 0u8..7).prop_map(move |(i, bit)| {
            let mut b = format!("Bearer {token}").into_bytes();
            let at = i.index(b.len());
            b[at] ^= 1 << bit;
            String::from_utf8(b).unwrap()
        }),
        2 => "[ -~]{0,40}",
        1 => any::<String>(),
    ]
}

#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    peer: String,
    headers: Vec<(String, String)>,
}

fn arb_request(token: String) -> impl Strategy<Value = Req> {
    (
        prop_oneof![
            Just("GET"),
            Just("POST"),
            Just("OPTIONS"),
            Just("DELETE"),
            Just("get")
        ]
        .prop_map(str::to_string),
        prop_oneof![
            Just("/a/x".to_string()),
            Just("/A/x?subscription-key=k".to_string()),
            Just("/b/x".to_string()),
            Just("/c".to_string()),
            Just("/open/%2e%2e/a/x".to_string()),
            Just("/open/x".to_string()),
            Just("/a%2Fx".to_string()),
            Just("/%61/x".to_string()),
            "/[a-c/%.;?x]{0,12}",
            any::<String>(),
        ],
        prop_oneof![
            Just("10.1.2.3:5555".to_string()),
            Just("10.6.6.1:1".to_string()),
            Just("192.0.2.1:1".to_string()),
            Just("[::ffff:10.1.2.3]:1".to_string()),
            Just("[2001:db8::1]:443".to_string()),
            "[0-9.:\\[\\]a-f]{0,20}",
        ],
        proptest::collection::vec(
            (
                proptest::sample::select(HEADER_NAMES).prop_map(str::to_string),
                arb_value(token),
            ),
            0..7,
        ),
    )
        .prop_map(|(method, path, peer, headers)| Req {
            method,
            path,
            peer,
            headers,
        })
}

/// A request API `a` or `c` accepts, then changed a little: most checks are reached this way.
fn arb_near_valid(token: String) -> impl Strategy<Value = Req> {
    (
        prop_oneof![Just("/a/x"), Just("/c/y"), Just("/a")],
        prop_oneof![Just("GET"), Just("POST")],
        proptest::collection::vec(
            (
                proptest::sample::select(HEADER_NAMES).prop_map(str::to_string),
                arb_value(token.clone()),
            ),
            0..3,
        ),
        any::<bool>(),
    )
        .prop_map(move |(path, method, extra, origin)| {
            let mut headers = vec![
                ("authorization".to_string(), format!("Bearer {token}")),
                ("ocp-apim-subscription-key".to_string(), "k".to_string()),
            ];
            if origin {
                headers.push(("origin".into(), "https://portal.example.com".into()));
            }
            headers.extend(extra);
            Req {
                method: method.into(),
                path: path.into(),
                peer: "10.1.2.3:5555".into(),
                headers,
            }
        })
}

fn reference_peer(peer: &str) -> Option<IpAddr> {
    let p = peer.trim();
    p.parse().ok().or_else(|| {
        let (addr, _) = p.rsplit_once(':')?;
        addr.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()
    })
}

fn verified_independently(s: &Signer, token: &str) -> Option<Value> {
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(s.jwk.clone()).unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.validate_exp = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    jsonwebtoken::decode::<Value>(token, &key, &v)
        .ok()
        .map(|d| d.claims)
}

fn run(p: &CompiledPolicy, h: &FakeHost, r: &Req) -> Decision {
    p.evaluate(
        &Request {
            method: &r.method,
            path: &r.path,
            headers: &r.headers,
            peer_address: Some(&r.peer),
            peer_certificate: None,
            dynamic_metadata: None,
            now: NOW,
        },
        h,
    )
}

#[test]
fn arbitrary_requests_through_the_pipeline() {
    let s = signer();
    let p = compile(&doc(&s));
    let t = token(&s, json!({"roles": ["Forms.Submit"]}));
    let mut runner = proptest::test_runner::TestRunner::new(cases(256));
    let verified = std::cell::Cell::new(0u32);
    runner
        .run(
            &proptest::collection::vec(
                prop_oneof![arb_request(t.clone()), arb_near_valid(t.clone())],
                1..4,
            ),
            |reqs| {
                // A fresh host per case: replay and counters start empty.
                let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
                for r in &reqs {
                    match run(&p, &h, r) {
                        Decision::Reply { reply, .. } => {
                            prop_assert!(
                                matches!(
                                    reply.status,
                                    204 | 400 | 401 | 403 | 404 | 405 | 413 | 429 | 431 | 503
                                ),
                                "{:?}",
                                reply
                            );
                            if reply.status != 204 {
                                let body: Value = serde_json::from_str(&reply.body).unwrap();
                                prop_assert_eq!(&body["statusCode"], &json!(reply.status));
                                prop_assert!(body["message"]
                                    .as_str()
                                    .is_some_and(|m| !m.is_empty()));
                                // A refusal never echoes the credential.
                                prop_assert!(!reply.body.contains(&t));
                            }
                        }
                        Decision::Forward(f) => {
                            let api = &p.apis[f.api];
                            if api.jwt.is_some() {
                                verified.set(verified.get() + 1);
                            }
                            let values = |name: &str| -> Vec<&str> {
                                r.headers
                                    .iter()
                                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                                    .map(|(_, v)| v.as_str())
                                    .collect()
                            };
                            if api.jwt.is_some() {
                                // Exactly one Bearer credential (values of other schemes are not
                                // this API's), with a token that verifies.
                                let bearer: Vec<&str> = values("authorization")
                                    .into_iter()
                                    .filter_map(|v| {
                                        let (scheme, rest) =
                                            v.trim_matches([' ', '\t']).split_once([' ', '\t'])?;
                                        scheme
                                            .eq_ignore_ascii_case("bearer")
                                            .then(|| rest.trim_matches([' ', '\t']))
                                    })
                                    .collect();
                                prop_assert_eq!(bearer.len(), 1, "{:?}", r);
                                let token = bearer[0];
                                let claims = verified_independently(&s, token);
                                prop_assert!(claims.is_some(), "forwarded {:?}", r);
                                // Claim headers come from the token, never from the client.
                                let sub = claims.unwrap()["sub"].clone();
                                if let Some((_, v)) =
                                    f.set_request_headers.iter().find(|(k, _)| k == "x-user-id")
                                {
                                    prop_assert_eq!(&json!(v), &sub);
                                }
                                let replaced = f
                                    .remove_request_headers
                                    .iter()
                                    .any(|k| k == "x-user-id")
                                    || f.set_request_headers.iter().any(|(k, _)| k == "x-user-id");
                                // API `a` maps `sub` to x-user-id: a client's copy never reaches it.
                                prop_assert!(
                                    f.api != 0 || values("x-user-id").is_empty() || replaced,
                                    "a spoofed x-user-id went through"
                                );
                            }
                            if api.ip_filter.is_some() {
                                let ip = reference_peer(&r.peer).map(|ip| ip.to_canonical());
                                let allowed = ip.is_some_and(|ip| {
                                    let nets: [ipnet::IpNet; 2] = [
                                        "10.0.0.0/8".parse().unwrap(),
                                        "2001:db8::/32".parse().unwrap(),
                                    ];
                                    let deny: ipnet::IpNet = "10.6.6.0/24".parse().unwrap();
                                    nets.iter().any(|n| n.contains(&ip)) && !deny.contains(&ip)
                                });
                                prop_assert!(allowed, "forwarded from {:?}", r.peer);
                            }
                            if api.subscription_key.is_some() {
                                let key_given = values("ocp-apim-subscription-key").contains(&"k")
                                    || r.path.contains("subscription-key=k");
                                prop_assert!(key_given, "forwarded without the key {:?}", r);
                            }
                            if api.headers.is_some() {
                                prop_assert!(
                                    values("x-debug").is_empty() && values("x_debug").is_empty()
                                );
                            }
                        }
                        Decision::Ask(_) => prop_assert!(false, "no etcd in this policy"),
                    }
                }
                Ok(())
            },
        )
        .unwrap();
    // Not only refusals: tokens were checked and accepted along the way.
    assert!(verified.get() > 0);
}
