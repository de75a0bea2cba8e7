//! `jwt.verify_with: "envoy"`: the payload comes from what Envoy's `jwt_authn` verified on this
//! request (its dynamic metadata), never from the token alone or a header; everything after the
//! signature is gateguard's, with the same statuses and messages.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::*;
use gateguard_core::jwt::envoy::{self, Kind, ListValue, Metadata, Struct, StructValue};
use gateguard_core::jwt::JwksConfig;
use prost::Message;
use serde_json::{json, Value};

const INVALID: &str = "Invalid or expired token";

fn to_struct_value(v: &Value) -> StructValue {
    let kind = match v {
        Value::Null => Kind::Null(0),
        Value::Bool(b) => Kind::Bool(*b),
        Value::Number(n) => Kind::Number(n.as_f64().unwrap()),
        Value::String(s) => Kind::String(s.clone()),
        Value::Array(a) => Kind::List(ListValue {
            values: a.iter().map(to_struct_value).collect(),
        }),
        Value::Object(o) => Kind::Struct(to_struct(o)),
    };
    StructValue { kind: Some(kind) }
}

fn to_struct(o: &serde_json::Map<String, Value>) -> Struct {
    Struct {
        fields: o
            .iter()
            .map(|(k, v)| (k.clone(), to_struct_value(v)))
            .collect(),
    }
}

/// The dynamic metadata `jwt_authn` leaves when `provider` verified a token with `payload`.
fn verified(provider: &str, payload: &Value) -> Vec<u8> {
    let namespace = Struct {
        fields: BTreeMap::from([(
            provider.to_string(),
            StructValue {
                kind: Some(Kind::Struct(to_struct(payload.as_object().unwrap()))),
            },
        )]),
    };
    Metadata {
        filter_metadata: BTreeMap::from([(envoy::NAMESPACE.to_string(), namespace)]),
    }
    .encode_to_vec()
}

fn payload_of(token: &str) -> Value {
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// Two APIs on Envoy's verifier with different identity providers, one on gateguard's.
fn doc(s: &Signer) -> Value {
    json!({
        "apis": [
            {
                "name": "a", "path_prefix": "/a",
                "jwt": {
                    "issuers": [ISS], "audiences": ["api://a"], "algorithms": ["EdDSA"],
                    "jwks": {"cluster": "idp", "uri": "https://idp.example.com/keys"},
                    "verify_with": "envoy",
                    "required_claims": [{"name": "roles", "any_of": ["Forms.Submit"], "methods": ["POST"]}],
                    "claims_to_headers": {"sub": "x-user-id"}
                },
                "replay": {"mode": "without_ip"}
            },
            {
                "name": "other", "path_prefix": "/other",
                "jwt": {
                    "issuers": [ISS], "audiences": ["api://a"], "algorithms": ["EdDSA"],
                    "jwks": {"cluster": "other-idp", "uri": "https://other.example.com/keys"},
                    "verify_with": "envoy"
                }
            },
            {
                "name": "own", "path_prefix": "/own",
                "jwt": {"issuers": [ISS], "audiences": ["api://a"], "algorithms": ["EdDSA"], "jwks": {"inline": {"keys": [s.jwk]}}}
            }
        ]
    })
}

fn provider(cluster: &str, uri: &str) -> String {
    envoy::provider_name(&JwksConfig {
        inline: None,
        cluster: Some(cluster.into()),
        uri: Some(uri.into()),
        refresh_seconds: None,
    })
}

fn a() -> String {
    provider("idp", "https://idp.example.com/keys")
}

#[test]
fn a_token_envoy_verified_for_the_api_is_accepted_and_checked_like_any_other() {
    let s = signer();
    let p = compile(&doc(&s));
    assert!(p.reads_dynamic_metadata());
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let t = token(&s, json!({"roles": ["Forms.Submit"]}));
    let d = call("/a/x")
        .bearer(&t)
        .metadata(verified(&a(), &payload_of(&t)))
        .run(&p, &h);
    let f = forward(&d);
    assert!(f
        .set_request_headers
        .contains(&("x-user-id".into(), "u1".into())));
    // Replay works on the presented token as before: the second use is refused.
    let again = call("/a/x")
        .bearer(&t)
        .metadata(verified(&a(), &payload_of(&t)))
        .run(&p, &h);
    assert_refused(&again, 401, "Token replay detected");
    // gateguard's own key set and cache are never used for it.
    assert_eq!((h.hits.get(), h.misses.get()), (0, 0));
}

#[test]
fn nothing_verified_by_the_apis_provider_is_invalid() {
    let s = signer();
    let p = compile(&doc(&s));
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let t = token(&s, json!({}));
    let payload = payload_of(&t);
    // No jwt_authn in front, or it verified nothing (bad signature, unknown key, expired).
    assert_refused(&call("/a/x").bearer(&t).run(&p, &h), 401, INVALID);
    assert_refused(
        &call("/a/x").bearer(&t).metadata(Vec::new()).run(&p, &h),
        401,
        INVALID,
    );
    // Verified by another API's identity provider: not this API's.
    let other = provider("other-idp", "https://other.example.com/keys");
    assert_refused(
        &call("/a/x")
            .bearer(&t)
            .metadata(verified(&other, &payload))
            .run(&p, &h),
        401,
        INVALID,
    );
    // ...which is accepted by the API that trusts it.
    forward(
        &call("/other/x")
            .bearer(&t)
            .metadata(verified(&other, &payload))
            .run(&p, &h),
    );
    // Garbage where the metadata should be.
    assert_refused(
        &call("/a/x").bearer(&t).metadata(vec![0xff; 9]).run(&p, &h),
        401,
        INVALID,
    );
}

#[test]
fn the_verified_payload_must_be_the_presented_tokens() {
    let s = signer();
    let p = compile(&doc(&s));
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let genuine = token(&s, json!({"roles": ["Forms.Read"]}));
    // A forged token (any signature) claiming more than what Envoy verified on this request.
    let forged_payload = json!({"iss": ISS, "aud": "api://a", "sub": "admin", "exp": NOW + 600, "roles": ["Forms.Submit"]});
    let forged = format!(
        "{}.{}.{}",
        genuine.split('.').next().unwrap(),
        URL_SAFE_NO_PAD.encode(forged_payload.to_string()),
        "c2ln"
    );
    assert_refused(
        &call("/a/x")
            .method("POST")
            .bearer(&forged)
            .metadata(verified(&a(), &payload_of(&genuine)))
            .run(&p, &h),
        401,
        INVALID,
    );
    // One claim added, removed or changed is enough.
    let mut more = payload_of(&genuine);
    more["admin"] = json!(true);
    let mut less = payload_of(&genuine);
    less.as_object_mut().unwrap().remove("roles");
    for payload in [more, less, json!({})] {
        assert_refused(
            &call("/a/x")
                .bearer(&genuine)
                .metadata(verified(&a(), &payload))
                .run(&p, &h),
            401,
            INVALID,
        );
    }
}

#[test]
fn gateguard_still_checks_everything_after_the_signature() {
    let s = signer();
    let p = compile(&doc(&s));
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let run = |t: &str, method: &str| {
        call("/a/x")
            .method(method)
            .bearer(t)
            .metadata(verified(&a(), &payload_of(t)))
            .run(&p, &h)
    };
    // Expired beyond the skew, not yet valid, wrong issuer or audience: invalid, even verified.
    for extra in [
        json!({"exp": NOW - 61}),
        json!({"nbf": NOW + 61}),
        json!({"iss": "https://evil"}),
        json!({"aud": "api://elsewhere"}),
    ] {
        assert_refused(&run(&token(&s, extra.clone()), "GET"), 401, INVALID);
    }
    // Required claims per method.
    assert_refused(
        &run(&token(&s, json!({"roles": ["Forms.Read"]})), "POST"),
        403,
        "Insufficient claims",
    );
    // The policy's algorithms still rule: a verified RS256 token is refused by an EdDSA API.
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"k1"}"#);
    let body = URL_SAFE_NO_PAD
        .encode(json!({"iss": ISS, "aud": "api://a", "sub": "u1", "exp": NOW + 600}).to_string());
    assert_refused(&run(&format!("{header}.{body}.c2ln"), "GET"), 401, INVALID);
    // Structure and header problems keep their own messages, before any metadata is read.
    assert_refused(
        &call("/a/x").metadata(Vec::new()).run(&p, &h),
        401,
        "Missing or malformed Authorization header",
    );
    assert_refused(
        &call("/a/x").bearer("a.b").run(&p, &h),
        401,
        "Malformed token or missing expiration",
    );
}

#[test]
fn an_api_on_gateguards_verifier_ignores_envoys_metadata() {
    let s = signer();
    let p = compile(&doc(&s));
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let t = token(&s, json!({}));
    // A token whose signature is broken stays broken whatever the metadata says.
    let broken = format!("{}AAAA", &t[..t.len() - 4]);
    let own_provider = envoy::provider_name(&JwksConfig {
        inline: Some(json!({"keys": [s.jwk]})),
        cluster: None,
        uri: None,
        refresh_seconds: None,
    });
    assert_refused(
        &call("/own/x")
            .bearer(&broken)
            .metadata(verified(&own_provider, &payload_of(&t)))
            .run(&p, &h),
        401,
        INVALID,
    );
    forward(&call("/own/x").bearer(&t).run(&p, &h));
}

#[test]
fn hmac_cannot_be_verified_by_envoy() {
    let doc = json!({"apis": [{
        "name": "h", "path_prefix": "/h",
        "jwt": {"issuers": [ISS], "audiences": ["api://a"], "algorithms": ["HS256"],
                "hmac_secret": {"value": "0123456789abcdef0123456789abcdef"}, "verify_with": "envoy"}
    }]});
    let err = gateguard_core::parse_policy(doc.to_string().as_bytes(), &|_| None)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("apis[0].jwt.verify_with"), "{err}");
    let doc = json!({"apis": [{
        "name": "h", "path_prefix": "/h",
        "jwt": {"issuers": [ISS], "audiences": ["api://a"], "algorithms": ["RS256"],
                "jwks": {"cluster": "c", "uri": "https://idp/keys"}, "verify_with": "jwt_authn"}
    }]});
    let err = gateguard_core::parse_policy(doc.to_string().as_bytes(), &|_| None)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("verify_with"), "{err}");
}

#[test]
fn envoy_cannot_follow_openid_discovery() {
    let doc = |uri: &str| {
        json!({"apis": [{
            "name": "d", "path_prefix": "/d",
            "jwt": {"issuers": [ISS], "audiences": ["api://a"], "algorithms": ["RS256"],
                    "jwks": {"cluster": "idp", "uri": uri}, "verify_with": "envoy"}
        }]})
        .to_string()
    };
    let discovery = "https://login.microsoftonline.com/t/v2.0/.well-known/openid-configuration";
    let err = gateguard_core::parse_policy(doc(discovery).as_bytes(), &|_| None)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("apis[0].jwt.jwks.uri"), "{err}");
    assert!(err.contains("jwks_uri"), "{err}");
    let keys = "https://login.microsoftonline.com/t/discovery/v2.0/keys";
    assert!(gateguard_core::parse_policy(doc(keys).as_bytes(), &|_| None).is_ok());
}

#[test]
fn envoy_reads_the_authorization_header_only() {
    let doc = json!({"apis": [{
        "name": "q", "path_prefix": "/q",
        "jwt": {"issuers": [ISS], "audiences": ["api://a"], "algorithms": ["RS256"],
                "jwks": {"cluster": "c", "uri": "https://idp/keys"}, "verify_with": "envoy",
                "token_sources": [{"query": "access_token"}]}
    }]});
    let err = gateguard_core::parse_policy(doc.to_string().as_bytes(), &|_| None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("apis[0].jwt.token_sources"), "{err}");
}

/// `jwt.providers` with "envoy": the token's `iss` picks the provider, and only what that
/// provider's `jwt_authn` provider verified counts (another provider's payload for the same
/// token is not a verification by the keys its issuer uses).
#[test]
fn each_identity_provider_reads_its_own_jwt_authn_payload() {
    let s = signer();
    let other_iss = "https://idp-b.example.com/";
    let p = compile(&json!({"apis": [{
        "name": "a", "path_prefix": "/a",
        "jwt": {
            "providers": [
                {"issuers": [ISS], "audiences": ["api://a"], "algorithms": ["EdDSA"],
                 "jwks": {"cluster": "idp", "uri": "https://idp.example.com/keys"}},
                {"issuers": [other_iss], "audiences": ["api://a"], "algorithms": ["EdDSA"],
                 "jwks": {"cluster": "idp_b", "uri": "https://idp-b.example.com/keys"}}
            ],
            "verify_with": "envoy"
        }
    }]}));
    assert!(p.reads_dynamic_metadata());
    let b = provider("idp_b", "https://idp-b.example.com/keys");
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let ta = token(&s, json!({}));
    let tb = token(&s, json!({"iss": other_iss}));
    forward(
        &call("/a")
            .bearer(&ta)
            .metadata(verified(&a(), &payload_of(&ta)))
            .run(&p, &h),
    );
    forward(
        &call("/a")
            .bearer(&tb)
            .metadata(verified(&b, &payload_of(&tb)))
            .run(&p, &h),
    );
    // B's token, verified only by A's keys: not verified for B.
    let d = call("/a")
        .bearer(&tb)
        .metadata(verified(&a(), &payload_of(&tb)))
        .run(&p, &h);
    assert_refused(&d, 401, INVALID);
    let d = call("/a")
        .bearer(&ta)
        .metadata(verified(&b, &payload_of(&ta)))
        .run(&p, &h);
    assert_refused(&d, 401, INVALID);
}
