//! `jwt.certificate_bound` (RFC 8705): a token naming a certificate thumbprint in
//! `cnf["x5t#S256"]` works only with that certificate; with `required`, every token must name one.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const UNBOUND: &str = "Certificate-bound token presented without its certificate";

struct Cert {
    header: String,
    thumbprint_hex: String,
    x5t_s256: String,
}

fn cert(name: &str) -> Cert {
    let c = rcgen::generate_simple_self_signed(vec![name.into()]).unwrap();
    let der = c.cert.der().to_vec();
    let digest = Sha256::digest(&der);
    Cert {
        header: STANDARD.encode(&der),
        thumbprint_hex: gateguard_core::hex::encode(&digest),
        x5t_s256: URL_SAFE_NO_PAD.encode(digest),
    }
}

fn doc(s: &Signer, listed: &[&Cert], binding: &str) -> Value {
    json!({
        "apis": [{"name": "b", "path_prefix": "/b",
            "client_certificate": {"thumbprints": listed.iter().map(|c| c.thumbprint_hex.clone()).collect::<Vec<_>>(),
                                   "sources": ["x-arr-clientcert"]},
            "jwt": {"issuers": [ISS], "audiences": ["api://a"], "algorithms": ["EdDSA"],
                    "jwks": {"inline": {"keys": [s.jwk]}}, "certificate_bound": binding}}],
        "client_ip": {"trusted_proxy_hops": 1, "trusted_proxies": ["10.0.0.1"]}
    })
}

fn with_cert<'a>(c: Call<'a>, cert: &Cert) -> Call<'a> {
    c.without_key()
        .peer("10.0.0.1:1234")
        .header("x-forwarded-for", "198.51.100.7")
        .header("x-arr-clientcert", &cert.header)
}

#[test]
fn a_bound_token_works_only_with_its_certificate() {
    let s = signer();
    let (mine, other) = (cert("mine.example"), cert("other.example"));
    let p = compile(&doc(&s, &[&mine, &other], "optional"));
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let bound = token(&s, json!({"cnf": {"x5t#S256": mine.x5t_s256}}));
    forward(&with_cert(call("/b/x"), &mine).bearer(&bound).run(&p, &h));
    // Another certificate the API accepts is still not the one the token names.
    let d = with_cert(call("/b/x"), &other).bearer(&bound).run(&p, &h);
    assert_refused(&d, 401, UNBOUND);
    assert_eq!(
        header(reply(&d), "www-authenticate"),
        Some("Bearer error=\"invalid_token\"")
    );
    // A thumbprint in another form (hex, padded base64url, standard base64) binds to nothing.
    for named in [
        json!(mine.thumbprint_hex),
        json!(format!("{}=", mine.x5t_s256)),
        json!(STANDARD.encode(URL_SAFE_NO_PAD.decode(&mine.x5t_s256).unwrap())),
        json!(123),
        json!(null),
    ] {
        let t = token(&s, json!({"cnf": {"x5t#S256": named}}));
        assert_refused(
            &with_cert(call("/b/x"), &mine).bearer(&t).run(&p, &h),
            401,
            UNBOUND,
        );
    }
    // An unbound token is fine when binding is optional.
    forward(
        &with_cert(call("/b/x"), &other)
            .bearer(&token(&s, json!({})))
            .run(&p, &h),
    );
}

#[test]
fn required_binding_refuses_every_unbound_token() {
    let s = signer();
    let mine = cert("mine.example");
    let p = compile(&doc(&s, &[&mine], "required"));
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    for t in [
        token(&s, json!({})),
        token(&s, json!({"cnf": {"jkt": "abc"}})),
    ] {
        assert_refused(
            &with_cert(call("/b/x"), &mine).bearer(&t).run(&p, &h),
            401,
            UNBOUND,
        );
    }
    let bound = token(&s, json!({"cnf": {"x5t#S256": mine.x5t_s256}}));
    forward(&with_cert(call("/b/x"), &mine).bearer(&bound).run(&p, &h));
    // The same token again, now from the cache: still checked against the certificate.
    let other = cert("other.example");
    let p2 = compile(&doc(&s, &[&mine, &other], "required"));
    let h2 = FakeHost::new(&p2, json!({"keys": [s.jwk]}));
    forward(&with_cert(call("/b/x"), &mine).bearer(&bound).run(&p2, &h2));
    assert_refused(
        &with_cert(call("/b/x"), &other).bearer(&bound).run(&p2, &h2),
        401,
        UNBOUND,
    );
}

#[test]
fn binding_needs_the_apis_client_certificate() {
    let doc = json!({"apis": [{"name": "b", "path_prefix": "/b",
        "jwt": {"issuers": [ISS], "audiences": ["api://a"], "algorithms": ["RS256"],
                "jwks": {"cluster": "c", "uri": "https://idp/keys"}, "certificate_bound": "required"}}]});
    let err = gateguard_core::parse_policy(doc.to_string().as_bytes(), &|_| None)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("apis[0].jwt.certificate_bound"), "{err}");
    let doc = json!({"apis": [{"name": "b", "path_prefix": "/b",
        "client_certificate": {"thumbprints": ["ab".repeat(32)]},
        "jwt": {"issuers": [ISS], "audiences": ["api://a"], "algorithms": ["RS256"],
                "jwks": {"cluster": "c", "uri": "https://idp/keys"}, "certificate_bound": "sometimes"}}]});
    assert!(gateguard_core::parse_policy(doc.to_string().as_bytes(), &|_| None).is_err());
}
