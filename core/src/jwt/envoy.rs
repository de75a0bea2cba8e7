//! `jwt.verify_with: "envoy"` (docs/policy.md, "Verifying with Envoy's jwt_authn"): Envoy's
//! own `jwt_authn` filter, in front of gateguard, checks the signature and writes the verified
//! payload into the request's dynamic metadata; gateguard reads it from there, never from a
//! header a client could send.
//!
//! What the filter reads is the `metadata` attribute: the request's dynamic metadata as a
//! serialised `envoy.config.core.v3.Metadata`. `jwt_authn` puts each provider's payload under
//! the namespace [`NAMESPACE`], in the field its `payload_in_metadata` names, as a
//! `google.protobuf.Struct`. Only the messages and fields used here are declared (protobuf
//! skips the others).

#![allow(clippy::derive_partial_eq_without_eq)]

use std::collections::BTreeMap;

use prost::{Message, Oneof};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::JwksConfig;
use crate::hex;

/// The dynamic-metadata namespace `jwt_authn` writes payloads under.
pub const NAMESPACE: &str = "envoy.filters.http.jwt_authn";

/// `envoy.config.core.v3.Metadata`.
#[derive(Clone, PartialEq, Message)]
pub struct Metadata {
    #[prost(btree_map = "string, message", tag = "1")]
    pub filter_metadata: BTreeMap<String, Struct>,
}

/// `google.protobuf.Struct`.
#[derive(Clone, PartialEq, Message)]
pub struct Struct {
    #[prost(btree_map = "string, message", tag = "1")]
    pub fields: BTreeMap<String, StructValue>,
}

/// `google.protobuf.Value`.
#[derive(Clone, PartialEq, Message)]
pub struct StructValue {
    #[prost(oneof = "Kind", tags = "1, 2, 3, 4, 5, 6")]
    pub kind: Option<Kind>,
}

#[derive(Clone, PartialEq, Oneof)]
pub enum Kind {
    #[prost(int32, tag = "1")]
    Null(i32),
    #[prost(double, tag = "2")]
    Number(f64),
    #[prost(string, tag = "3")]
    String(String),
    #[prost(bool, tag = "4")]
    Bool(bool),
    #[prost(message, tag = "5")]
    Struct(Struct),
    #[prost(message, tag = "6")]
    List(ListValue),
}

/// `google.protobuf.ListValue`.
#[derive(Clone, PartialEq, Message)]
pub struct ListValue {
    #[prost(message, repeated, tag = "1")]
    pub values: Vec<StructValue>,
}

/// The `jwt_authn` provider (and `payload_in_metadata` field) for a key set: named after where
/// the keys come from, so APIs that trust the same keys share one provider and one signature
/// check per request. `gateguard render` and the filter both name it with this function.
pub fn provider_name(jwks: &JwksConfig) -> String {
    let mut h = Sha256::new();
    match (&jwks.inline, &jwks.cluster, &jwks.uri) {
        (Some(inline), _, _) => {
            h.update(b"inline\0");
            h.update(canonical_json(inline).as_bytes());
        }
        (None, cluster, uri) => {
            h.update(b"remote\0");
            h.update(cluster.as_deref().unwrap_or_default().as_bytes());
            h.update(b"\0");
            h.update(uri.as_deref().unwrap_or_default().as_bytes());
        }
    }
    let digest: [u8; 32] = h.finalize().into();
    format!("gateguard_{}", &hex::encode(&digest)[..16])
}

/// `value` as JSON text with every object's keys in sorted order. `Value::to_string` keeps the
/// document's order when serde_json's `preserve_order` feature is on (the CLI turns it on, the
/// filter does not), so the name `render` gives a provider would differ from the one the filter
/// looks for.
fn canonical_json(value: &Value) -> String {
    fn write(value: &Value, out: &mut String) {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push('{');
                for (i, (name, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(name.clone()).to_string());
                    out.push(':');
                    write(v, out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(v, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out
}

/// The payload `provider` verified for this request, from the serialised dynamic metadata.
/// `None` when it verified nothing (no token, a bad one, or no `jwt_authn` in front) or the
/// bytes are not a `Metadata` message.
pub fn verified_payload(metadata: &[u8], provider: &str) -> Option<Struct> {
    let mut metadata = Metadata::decode(metadata).ok()?;
    let mut namespace = metadata.filter_metadata.remove(NAMESPACE)?;
    match namespace.fields.remove(provider)?.kind? {
        Kind::Struct(payload) => Some(payload),
        _ => None,
    }
}

/// Whether the payload Envoy verified is the token's own claims, claim by claim. Numbers are
/// compared the way `jwt_authn` stores them (64-bit floats), so an integer beyond 2^53 that a
/// float cannot hold exactly never matches: such a token is refused, never half-checked.
pub fn same_payload(claims: &Map<String, Value>, payload: &Struct) -> bool {
    claims.len() == payload.fields.len()
        && claims
            .iter()
            .all(|(name, value)| payload.fields.get(name).is_some_and(|v| same(value, v)))
}

fn same(value: &Value, verified: &StructValue) -> bool {
    match (value, verified.kind.as_ref()) {
        (Value::Null, Some(Kind::Null(_))) => true,
        (Value::Bool(a), Some(Kind::Bool(b))) => a == b,
        (Value::String(a), Some(Kind::String(b))) => a == b,
        (Value::Number(a), Some(Kind::Number(b))) => number_is(a, *b),
        (Value::Array(a), Some(Kind::List(b))) => {
            a.len() == b.values.len() && a.iter().zip(&b.values).all(|(x, y)| same(x, y))
        }
        (Value::Object(a), Some(Kind::Struct(b))) => same_payload(a, b),
        _ => false,
    }
}

/// A JSON number equals a float only when the float holds it exactly.
fn number_is(n: &serde_json::Number, f: f64) -> bool {
    // 2^63 and 2^64, exactly: the integer ranges a float converts into without saturating.
    const I64_END: f64 = 9_223_372_036_854_775_808.0;
    const U64_END: f64 = 18_446_744_073_709_551_616.0;
    if let Some(i) = n.as_i64() {
        f.fract() == 0.0 && (-I64_END..I64_END).contains(&f) && f as i64 == i && i as f64 == f
    } else if let Some(u) = n.as_u64() {
        f.fract() == 0.0 && (0.0..U64_END).contains(&f) && f as u64 == u && u as f64 == f
    } else {
        n.as_f64() == Some(f)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s(fields: Vec<(&str, Kind)>) -> Struct {
        Struct {
            fields: fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), StructValue { kind: Some(v) }))
                .collect(),
        }
    }

    fn metadata(provider: &str, payload: Struct) -> Vec<u8> {
        let namespace = s(vec![(provider, Kind::Struct(payload))]);
        Metadata {
            filter_metadata: [(NAMESPACE.to_string(), namespace)].into_iter().collect(),
        }
        .encode_to_vec()
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    /// The `metadata` attribute as Envoy 1.40 returned it to a probe filter placed behind
    /// `jwt_authn` (provider and `payload_in_metadata` `p0`) for a valid RS256 token.
    const FROM_ENVOY: &str =
        "0ae8010a1c656e766f792e66696c746572732e687474702e6a77745f617574686e12c7010ac4010a\
         02703012bd012aba010a0e0a0166120911000000000000f83f0a100a0361756412091a076170693a\
         2f2f780a0e0a0373756212071a05616c6963650a150a05726f6c6573120c320a0a031a01610a031a\
         01620a190a0369737312121a1068747470733a2f2f6964702e746573740a1c0a066e657374656412\
         122a100a0e0a0178120911000000000000f03f0a100a036578701209110000c0a819c1da410a0e0a\
         016e12091100000000000014400a080a026f6b120220010a0a0a046e6f6e6512020800";

    #[test]
    fn reads_what_jwt_authn_wrote_in_a_real_envoy() {
        let bytes = hex::decode(FROM_ENVOY).unwrap();
        let payload = verified_payload(&bytes, "p0").expect("the payload");
        let claims = obj(json!({
            "iss": "https://idp.test", "aud": "api://x", "sub": "alice", "exp": 1_795_450_531u64,
            "roles": ["a", "b"], "n": 5, "f": 1.5, "ok": true, "none": null, "nested": {"x": 1}
        }));
        assert!(same_payload(&claims, &payload));
        assert_eq!(verified_payload(&bytes, "p1"), None);
        // What the helper below encodes reads back as the same payload.
        assert_eq!(
            verified_payload(&metadata("p0", payload.clone()), "p0"),
            Some(payload)
        );
    }

    #[test]
    fn nothing_verified_is_none() {
        assert_eq!(verified_payload(&[], "p0"), None);
        assert_eq!(verified_payload(b"\xff\xff\xff", "p0"), None);
        // The provider's field present but not a struct.
        let namespace = s(vec![("p0", Kind::String("x".into()))]);
        let bytes = Metadata {
            filter_metadata: [(NAMESPACE.to_string(), namespace)].into_iter().collect(),
        }
        .encode_to_vec();
        assert_eq!(verified_payload(&bytes, "p0"), None);
        // Another filter's namespace is never read.
        let other = Metadata {
            filter_metadata: [(
                "envoy.filters.http.lua".to_string(),
                s(vec![("p0", Kind::Struct(s(vec![])))]),
            )]
            .into_iter()
            .collect(),
        }
        .encode_to_vec();
        assert_eq!(verified_payload(&other, "p0"), None);
    }

    #[test]
    fn the_payload_must_be_the_tokens_claim_by_claim() {
        let claims = obj(json!({
            "iss": "https://idp", "exp": 1_795_450_531u64, "n": -5, "f": 1.5, "ok": true,
            "none": null, "roles": ["a", "b"], "nested": {"x": 1}
        }));
        let payload = s(vec![
            ("iss", Kind::String("https://idp".into())),
            ("exp", Kind::Number(1_795_450_531.0)),
            ("n", Kind::Number(-5.0)),
            ("f", Kind::Number(1.5)),
            ("ok", Kind::Bool(true)),
            ("none", Kind::Null(0)),
            (
                "roles",
                Kind::List(ListValue {
                    values: vec![
                        StructValue {
                            kind: Some(Kind::String("a".into())),
                        },
                        StructValue {
                            kind: Some(Kind::String("b".into())),
                        },
                    ],
                }),
            ),
            ("nested", Kind::Struct(s(vec![("x", Kind::Number(1.0))]))),
        ]);
        assert!(same_payload(&claims, &payload));

        // Any difference: a claim more or less, another value, another type, another order
        // in a list.
        let mut extra = claims.clone();
        extra.insert("admin".into(), json!(true));
        assert!(!same_payload(&extra, &payload));
        let mut fewer = claims.clone();
        fewer.remove("roles");
        assert!(!same_payload(&fewer, &payload));
        for (name, value) in [
            ("iss", json!("https://evil")),
            ("exp", json!(1_795_450_532u64)),
            ("n", json!("-5")),
            ("f", json!(1.25)),
            ("ok", json!(false)),
            ("none", json!(0)),
            ("roles", json!(["b", "a"])),
            ("roles", json!(["a"])),
            ("nested", json!({"x": 2})),
            ("nested", json!({"x": 1, "y": 1})),
        ] {
            let mut changed = claims.clone();
            changed.insert(name.into(), value.clone());
            assert!(!same_payload(&changed, &payload), "{name}: {value}");
        }
    }

    #[test]
    fn integers_a_float_cannot_hold_never_match() {
        let big = (1u64 << 53) + 1;
        let payload = s(vec![("n", Kind::Number(big as f64))]);
        assert!(!same_payload(&obj(json!({ "n": big })), &payload));
        let payload = s(vec![("n", Kind::Number(u64::MAX as f64))]);
        assert!(!same_payload(&obj(json!({ "n": u64::MAX })), &payload));
        let payload = s(vec![("n", Kind::Number(f64::NAN))]);
        assert!(!same_payload(&obj(json!({ "n": 0 })), &payload));
        let payload = s(vec![("n", Kind::Number(1.0 / 0.0))]);
        assert!(!same_payload(&obj(json!({ "n": i64::MAX })), &payload));
        let payload = s(vec![("n", Kind::Number(-((1u64 << 53) as f64)))]);
        assert!(same_payload(&obj(json!({ "n": -(1i64 << 53) })), &payload));
    }

    #[test]
    fn providers_are_named_after_their_keys() {
        let remote = |cluster: &str, uri: &str| JwksConfig {
            inline: None,
            cluster: Some(cluster.into()),
            uri: Some(uri.into()),
            refresh_seconds: None,
        };
        let a = provider_name(&remote("idp", "https://idp/keys"));
        assert!(a.starts_with("gateguard_") && a.len() == "gateguard_".len() + 16);
        assert_eq!(
            a,
            provider_name(&JwksConfig {
                refresh_seconds: Some(60),
                ..remote("idp", "https://idp/keys")
            })
        );
        assert_ne!(a, provider_name(&remote("idp2", "https://idp/keys")));
        assert_ne!(a, provider_name(&remote("idp", "https://idp/keys2")));
        assert_ne!(a, provider_name(&remote("idpx", "//idp/keys")));
        let inline = |v: Value| JwksConfig {
            inline: Some(v),
            cluster: None,
            uri: None,
            refresh_seconds: None,
        };
        assert_ne!(
            provider_name(&inline(json!({"keys": [{"kid": "a"}]}))),
            provider_name(&inline(json!({"keys": [{"kid": "b"}]})))
        );
    }

    /// The CLI (serde_json with `preserve_order`) and the filter (without) parse the same policy
    /// into maps that iterate in different orders; the name must not depend on it.
    #[test]
    fn an_inline_key_set_is_named_whatever_the_order_of_its_members() {
        let inline = |text: &str| JwksConfig {
            inline: Some(serde_json::from_str(text).unwrap()),
            cluster: None,
            uri: None,
            refresh_seconds: None,
        };
        let a = provider_name(&inline(
            r#"{"keys": [{"kty": "RSA", "n": "x", "e": "AQAB", "kid": "k"}], "z": {"b": 1, "a": [2]}}"#,
        ));
        let b = provider_name(&inline(
            r#"{"z": {"a": [2], "b": 1}, "keys": [{"e": "AQAB", "kid": "k", "kty": "RSA", "n": "x"}]}"#,
        ));
        assert_eq!(a, b);
        // Sorted by key, escaped like JSON: what a filter built without `preserve_order` hashes.
        assert_eq!(
            canonical_json(&json!({"b": [1, "\"x\"", null], "a": {"d": true, "c": 1.5}})),
            r#"{"a":{"c":1.5,"d":true},"b":[1,"\"x\"",null]}"#
        );
    }
}
