//! Several identity providers per API (docs/policy.md, "Several identity providers") and the
//! Entra ID shorthand ("Entra ID"): the token's `iss` picks the provider before any signature
//! work, each provider has its own keys (kids may overlap), and nothing verified under one
//! provider's keys counts for another.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;
use gateguard_core::decision::Decision;
use gateguard_core::jwt::JwksSource;
use gateguard_core::parse_policy;
use jsonwebtoken::{Algorithm, Header};
use serde_json::{json, Value};

const INVALID: &str = "Invalid or expired token";
const ISS_A: &str = "https://idp-a.example.com/";
const ISS_B: &str = "https://idp-b.example.com/";
const TID: &str = "0b7e3c51-4f1a-4c8e-9d6e-2a0b1c2d3e4f";
const OTHER_TID: &str = "9f8e7d6c-5b4a-4a3b-8c2d-1e0f9a8b7c6d";

fn sign(s: &Signer, claims: Value) -> String {
    let mut base = json!({"aud": "api://a", "sub": "u1", "exp": NOW + 600});
    for (k, v) in claims.as_object().unwrap() {
        base[k] = v.clone();
    }
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some("k1".into());
    jsonwebtoken::encode(&h, &base, &s.key).unwrap()
}

fn jwks(s: &Signer) -> Value {
    json!({"keys": [s.jwk]})
}

fn one_api(jwt: Value) -> Value {
    json!({"apis": [{"name": "a", "path_prefix": "/a", "jwt": jwt}]})
}

/// Two providers; both signers' keys are named `k1`.
fn two_providers(a: &Signer, b: &Signer) -> Value {
    one_api(json!({
        "providers": [
            {"issuers": [ISS_A], "audiences": ["api://a"], "algorithms": ["EdDSA"], "jwks": {"inline": jwks(a)}},
            {"issuers": [ISS_B], "audiences": ["api://a"], "algorithms": ["EdDSA"], "jwks": {"inline": jwks(b)}}
        ],
        "claims_to_headers": {"iss": "x-issuer"}
    }))
}

/// The host as the filter holds it: each provider's key set in its own slot.
fn host_for(doc: &Value, sets: &[&Signer]) -> (gateguard_core::CompiledPolicy, FakeHost) {
    let p = compile(doc);
    let host = FakeHost::new(&p, jwks(&signer()));
    let providers = p.apis[0].jwt.as_ref().unwrap().providers();
    for (provider, s) in providers.iter().zip(sets) {
        host.set_slot_keys(provider.slot(), jwks(s));
    }
    (p, host)
}

fn refusal_reason(d: &Decision) -> String {
    match d {
        Decision::Reply {
            refusal: Some(r), ..
        } => r.reason().to_string(),
        _ => panic!("expected a refusal, got {d:?}"),
    }
}

fn refused(d: &Decision, reason: &str) {
    assert_refused(d, 401, INVALID);
    assert_eq!(refusal_reason(d), reason);
}

fn config_error(doc: &Value) -> (String, String) {
    let e = parse_policy(doc.to_string().as_bytes(), &|_| None).unwrap_err();
    (e.path, e.reason)
}

#[test]
fn the_issuer_picks_the_provider_and_its_keys_even_when_kids_overlap() {
    let (a, b) = (signer(), signer());
    let (p, host) = host_for(&two_providers(&a, &b), &[&a, &b]);
    let slots: Vec<usize> = p.apis[0]
        .jwt
        .as_ref()
        .unwrap()
        .providers()
        .iter()
        .map(|p| p.slot())
        .collect();
    assert_eq!(slots, [0, 1]);
    for (s, iss) in [(&a, ISS_A), (&b, ISS_B)] {
        let d = call("/a")
            .bearer(&sign(s, json!({"iss": iss})))
            .run(&p, &host);
        let f = forward(&d);
        assert!(f
            .set_request_headers
            .contains(&("x-issuer".into(), iss.into())));
    }
    // Provider A's issuer with provider B's key, under the same kid: A's key set decides.
    let forged = sign(&b, json!({"iss": ISS_A}));
    refused(&call("/a").bearer(&forged).run(&p, &host), "bad signature");
    let forged = sign(&a, json!({"iss": ISS_B}));
    refused(&call("/a").bearer(&forged).run(&p, &host), "bad signature");
    // No provider for the issuer: refused before any key is looked at.
    let c = sign(&a, json!({"iss": "https://idp-c.example.com/"}));
    refused(&call("/a").bearer(&c).run(&p, &host), "issuer not accepted");
    let none = sign(&a, json!({}));
    refused(
        &call("/a").bearer(&none).run(&p, &host),
        "issuer not accepted",
    );
    // Each provider's audiences are its own.
    let wrong_aud = sign(&a, json!({"iss": ISS_A, "aud": "api://b"}));
    refused(
        &call("/a").bearer(&wrong_aud).run(&p, &host),
        "audience not accepted",
    );
}

#[test]
fn a_provider_missing_the_kid_asks_for_its_own_keys_only() {
    let (a, b) = (signer(), signer());
    let (p, host) = host_for(&two_providers(&a, &b), &[&a, &b]);
    let mut elsewhere = b.jwk.clone();
    elsewhere["kid"] = json!("k2");
    host.set_slot_keys(1, json!({"keys": [elsewhere]}));
    let t = sign(&b, json!({"iss": ISS_B}));
    refused(&call("/a").bearer(&t).run(&p, &host), "unknown kid");
    assert_eq!(*host.kid_slots.borrow(), [1]);
}

#[test]
fn nothing_verified_under_one_providers_keys_counts_for_another() {
    let (a, b) = (signer(), signer());
    let doc = two_providers(&a, &b);
    let (p, host) = host_for(&doc, &[&a, &b]);
    let ta = sign(&a, json!({"iss": ISS_A}));
    let tb = sign(&b, json!({"iss": ISS_B}));
    for t in [&ta, &tb] {
        forward(&call("/a").bearer(t).run(&p, &host));
    }
    assert_eq!((host.hits.get(), host.misses.get()), (0, 2));
    for t in [&ta, &tb] {
        forward(&call("/a").bearer(t).run(&p, &host));
    }
    assert_eq!(host.hits.get(), 2);
    // Provider B's keys rotate (B's key gone, A's key, same kid, in its place): B's token is
    // checked again, against B's new keys, by the memo and by the shared cache, and refused;
    // A's is still known.
    host.set_slot_keys(1, jwks(&a));
    refused(&call("/a").bearer(&tb).run(&p, &host), "bad signature");
    let fresh = FakeHost::new(&p, jwks(&signer()));
    fresh.set_slot_keys(0, jwks(&a));
    fresh.set_slot_keys(1, jwks(&a));
    *fresh.cache.borrow_mut() = host.cache.borrow().clone();
    refused(&call("/a").bearer(&tb).run(&p, &fresh), "bad signature");
    let hits = fresh.hits.get();
    forward(&call("/a").bearer(&ta).run(&p, &fresh));
    assert_eq!(fresh.hits.get(), hits + 1, "A's entry is still A's");
    // B's slot now holds A's key: B's issuer signed with it verifies, A's issuer signed with
    // B's old key does not.
    let forged = sign(&a, json!({"iss": ISS_B, "sub": "other"}));
    forward(&call("/a").bearer(&forged).run(&p, &fresh));
    let forged_a = sign(&b, json!({"iss": ISS_A, "sub": "other"}));
    refused(
        &call("/a").bearer(&forged_a).run(&p, &fresh),
        "bad signature",
    );
}

#[test]
fn single_provider_fields_and_providers_do_not_mix() {
    let a = signer();
    let provider = json!({"issuers": [ISS_A], "audiences": ["api://a"], "algorithms": ["EdDSA"], "jwks": {"inline": jwks(&a)}});
    for (field, value) in [
        ("issuers", json!([ISS_B])),
        ("audiences", json!(["api://a"])),
        ("algorithms", json!(["EdDSA"])),
        ("jwks", json!({"inline": jwks(&a)})),
        ("entra", json!({"tenant": TID})),
    ] {
        let mut jwt = json!({"providers": [provider.clone()]});
        jwt[field] = value;
        let (path, reason) = config_error(&one_api(jwt));
        assert_eq!(path, format!("apis[0].jwt.{field}"));
        assert!(reason.contains("not with \"providers\""), "{reason}");
    }
    let (path, _) = config_error(&one_api(json!({"providers": []})));
    assert_eq!(path, "apis[0].jwt.providers");
    // The same issuer in two providers: which keys would decide?
    let mut twice = provider.clone();
    twice["issuers"] = json!(["https://other/", ISS_A]);
    let (path, reason) = config_error(&one_api(json!({"providers": [provider, twice]})));
    assert_eq!(path, "apis[0].jwt.providers[1]");
    assert!(
        reason.contains(ISS_A) && reason.contains("apis[0].jwt.providers[0]"),
        "{reason}"
    );
    // A provider's own fields are checked at its own path.
    let bad = json!({"issuers": [ISS_A], "audiences": ["api://a"], "algorithms": ["EdDSA"]});
    let (path, _) = config_error(&one_api(json!({"providers": [bad]})));
    assert_eq!(path, "apis[0].jwt.providers[0].jwks");
}

#[test]
fn slots_are_unique_across_apis() {
    let (a, b) = (signer(), signer());
    let mut doc = two_providers(&a, &b);
    doc["apis"].as_array_mut().unwrap().push(json!({
        "name": "c", "path_prefix": "/c",
        "jwt": {"issuers": [ISS], "audiences": ["api://a"], "algorithms": ["EdDSA"], "jwks": {"inline": jwks(&a)}}
    }));
    let p = compile(&doc);
    assert_eq!(p.key_slots(), 3);
    assert_eq!(p.apis[1].jwt.as_ref().unwrap().providers()[0].slot(), 2);
}

fn entra(entra: Value) -> Value {
    json!({"entra": entra, "audiences": ["api://a"], "algorithms": ["EdDSA"]})
}

#[test]
fn entra_expands_to_both_issuers_and_the_tenants_keys() {
    // A tenant id copied in upper case is the tenant Entra names in lower case.
    let upper = TID.to_ascii_uppercase();
    let p = compile(&one_api(
        json!({"entra": {"tenant": upper}, "audiences": ["api://a"]}),
    ));
    let provider = &p.apis[0].jwt.as_ref().unwrap().providers()[0];
    match &provider.jwks {
        JwksSource::Remote { cluster, uri, .. } => {
            assert_eq!(cluster, "entra_id");
            assert_eq!(
                uri,
                &format!("https://login.microsoftonline.com/{TID}/discovery/v2.0/keys")
            );
        }
        other => panic!("{other:?}"),
    }
    let v1 = format!("https://sts.windows.net/{TID}/");
    let v2 = format!("https://login.microsoftonline.com/{TID}/v2.0");
    assert!(provider.accepts_issuer(&v1, None) && provider.accepts_issuer(&v2, None));
    // RS256 unless the policy says otherwise: an EdDSA token is refused.
    let s = signer();
    let host = FakeHost::new(&p, jwks(&s));
    let t = sign(&s, json!({"iss": v2}));
    refused(
        &call("/a").bearer(&t).run(&p, &host),
        "algorithm not allowed",
    );

    // Inline keys instead of Microsoft's, and both versions accepted.
    let mut jwt = entra(json!({"tenant": TID}));
    jwt["jwks"] = json!({"inline": jwks(&s)});
    let p = compile(&one_api(jwt));
    let host = FakeHost::new(&p, jwks(&s));
    for iss in [&v1, &v2] {
        forward(
            &call("/a")
                .bearer(&sign(&s, json!({"iss": iss})))
                .run(&p, &host),
        );
    }
    let other = format!("https://login.microsoftonline.com/{OTHER_TID}/v2.0");
    refused(
        &call("/a")
            .bearer(&sign(&s, json!({"iss": other})))
            .run(&p, &host),
        "issuer not accepted",
    );
}

#[test]
fn entra_refuses_what_it_cannot_mean() {
    for (e, path) in [
        (json!({"tenant": ""}), "apis[0].jwt.entra.tenant"),
        (json!({"tenant": "a/b"}), "apis[0].jwt.entra.tenant"),
        (
            json!({"tenant": TID, "versions": []}),
            "apis[0].jwt.entra.versions",
        ),
        (
            json!({"tenant": "organizations"}),
            "apis[0].jwt.entra.tenants",
        ),
        (
            json!({"tenant": TID, "tenants": [TID]}),
            "apis[0].jwt.entra.tenants",
        ),
        (
            json!({"tenant": "common", "tenants": [""]}),
            "apis[0].jwt.entra.tenants[0]",
        ),
    ] {
        let (got, _) = config_error(&one_api(entra(e.clone())));
        assert_eq!(got, path, "{e}");
    }
    // Single-tenant Entra next to a multi-tenant one listing the same tenant: one issuer twice.
    let (path, _) = config_error(&one_api(json!({"providers": [
        {"entra": {"tenant": TID}, "audiences": ["api://a"]},
        {"entra": {"tenant": "organizations", "tenants": [OTHER_TID, TID], "versions": ["v2"]}, "audiences": ["api://b"]}
    ]})));
    assert_eq!(path, "apis[0].jwt.providers[1]");
}

#[test]
fn a_multi_tenant_app_accepts_listed_tenants_only_under_their_own_issuer() {
    let s = signer();
    let mut jwt = entra(json!({"tenant": "organizations", "tenants": [TID]}));
    jwt["jwks"] = json!({"inline": jwks(&s)});
    let p = compile(&one_api(jwt));
    let host = FakeHost::new(&p, jwks(&s));
    let v2 = |t: &str| format!("https://login.microsoftonline.com/{t}/v2.0");
    let v1 = |t: &str| format!("https://sts.windows.net/{t}/");
    for iss in [v1(TID), v2(TID)] {
        let t = sign(&s, json!({"iss": iss, "tid": TID}));
        forward(&call("/a").bearer(&t).run(&p, &host));
    }
    for (claims, why) in [
        // A tenant not listed.
        (
            json!({"iss": v2(OTHER_TID), "tid": OTHER_TID}),
            "tid not listed",
        ),
        // A listed tid, but another tenant's issuer.
        (
            json!({"iss": v2(OTHER_TID), "tid": TID}),
            "iss of another tenant",
        ),
        (
            json!({"iss": v2(TID), "tid": OTHER_TID}),
            "tid of another tenant",
        ),
        // No tid at all.
        (json!({"iss": v2(TID)}), "no tid"),
        // The template itself.
        (
            json!({"iss": v2("{tenantid}"), "tid": "{tenantid}"}),
            "template",
        ),
    ] {
        let t = sign(&s, claims);
        let d = call("/a").bearer(&t).run(&p, &host);
        assert_refused(&d, 401, INVALID);
        assert_eq!(refusal_reason(&d), "issuer not accepted", "{why}");
    }
}

#[test]
fn the_other_entra_version_of_an_accepted_tenant_is_named_in_the_log_reason() {
    let s = signer();
    let v1 = format!("https://sts.windows.net/{TID}/");
    let v2 = format!("https://login.microsoftonline.com/{TID}/v2.0");
    for (e, iss, version) in [
        (json!({"tenant": TID, "versions": ["v2"]}), &v1, "v1"),
        (json!({"tenant": TID, "versions": ["v1"]}), &v2, "v2"),
        (
            json!({"tenant": "common", "tenants": [TID], "versions": ["v2"]}),
            &v1,
            "v1",
        ),
    ] {
        let mut jwt = entra(e);
        jwt["jwks"] = json!({"inline": jwks(&s)});
        let p = compile(&one_api(jwt));
        let host = FakeHost::new(&p, jwks(&s));
        let t = sign(&s, json!({"iss": iss, "tid": TID}));
        let d = call("/a").bearer(&t).run(&p, &host);
        assert_refused(&d, 401, INVALID);
        assert_eq!(
            refusal_reason(&d),
            format!(
                "issuer {iss} is Entra ID {version} of an accepted tenant: add it to issuers, \
                 or use entra.versions [\"v1\",\"v2\"]"
            )
        );
    }
    // Another tenant's other version: no hint, nothing of the token but a plain reason.
    let mut jwt = entra(json!({"tenant": TID, "versions": ["v2"]}));
    jwt["jwks"] = json!({"inline": jwks(&s)});
    let p = compile(&one_api(jwt));
    let host = FakeHost::new(&p, jwks(&s));
    let t = sign(
        &s,
        json!({"iss": format!("https://sts.windows.net/{OTHER_TID}/")}),
    );
    refused(&call("/a").bearer(&t).run(&p, &host), "issuer not accepted");
    // Adding the issuer as the hint says makes it accepted.
    let mut jwt = entra(json!({"tenant": TID, "versions": ["v2"]}));
    jwt["jwks"] = json!({"inline": jwks(&s)});
    jwt["issuers"] = json!([v1]);
    let p = compile(&one_api(jwt));
    let t = sign(&s, json!({"iss": v1}));
    forward(&call("/a").bearer(&t).run(&p, &host));
}

#[test]
fn providers_with_entra_and_another_idp_side_by_side() {
    let (a, b) = (signer(), signer());
    let doc = one_api(json!({"providers": [
        {"entra": {"tenant": TID}, "audiences": ["api://a"], "algorithms": ["EdDSA"], "jwks": {"inline": jwks(&a)}},
        {"issuers": [ISS_B], "audiences": ["api://a"], "algorithms": ["EdDSA"], "jwks": {"inline": jwks(&b)}}
    ]}));
    let (p, host) = host_for(&doc, &[&a, &b]);
    let v2 = format!("https://login.microsoftonline.com/{TID}/v2.0");
    forward(
        &call("/a")
            .bearer(&sign(&a, json!({"iss": v2})))
            .run(&p, &host),
    );
    forward(
        &call("/a")
            .bearer(&sign(&b, json!({"iss": ISS_B})))
            .run(&p, &host),
    );
    refused(
        &call("/a")
            .bearer(&sign(&b, json!({"iss": v2})))
            .run(&p, &host),
        "bad signature",
    );
}
