#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use serde_json::json;

const NOW: u64 = 1_800_000_000;
const TOKEN: &str = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2ln";

use super::client::TestClient as Client;

fn client() -> Client {
    Client::new()
}

trait Proofs {
    fn header(&self) -> Value;
    fn claims(&self) -> Value;
    fn proof_with(&self, change: impl FnOnce(&mut Value, &mut Value)) -> String;
}

impl Proofs for Client {
    fn header(&self) -> Value {
        json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk})
    }

    fn claims(&self) -> Value {
        json!({"htm": "POST", "htu": "https://api.example.com/orders", "iat": NOW, "jti": "j-1",
               "ath": URL_SAFE_NO_PAD.encode(Sha256::digest(TOKEN.as_bytes()))})
    }

    fn proof_with(&self, change: impl FnOnce(&mut Value, &mut Value)) -> String {
        let (mut h, mut c) = (self.header(), self.claims());
        change(&mut h, &mut c);
        self.sign(&h, &c)
    }
}

fn target() -> ProofTarget<'static> {
    ProofTarget {
        method: "POST",
        scheme: "https",
        authority: "api.example.com",
        path: "/orders",
    }
}

fn check(c: &Client, proof: &str) -> Result<AcceptedProof, DpopError> {
    check_proof(proof, TOKEN, &c.jkt(), &target(), NOW, 60)
}

#[test]
fn rfc_7638_thumbprint_example() {
    // RFC 7638 §3.1.
    let jwk = json!({"kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"});
    assert_eq!(
        jwk_thumbprint(&jwk).as_deref(),
        Some("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs")
    );
    assert_eq!(jwk_thumbprint(&json!({"kty": "oct", "k": "x"})), None);
    assert_eq!(
        jwk_thumbprint(&json!({"kty": "EC", "crv": "P-256", "x": "a"})),
        None
    );
}

#[test]
fn a_good_proof_passes_and_names_its_jti_per_key() {
    let c = client();
    let accepted = check(&c, &c.proof_with(|_, _| {})).unwrap();
    assert_eq!(accepted.valid_until, NOW + MAX_PROOF_AGE_SECONDS);
    // Same jti from another key: another identity (jti are unique per key).
    let d = client();
    let other = check(&d, &d.proof_with(|_, _| {})).unwrap();
    assert_ne!(accepted.jti_identity, other.jti_identity);
    // A default port, another case in scheme and host, a query or fragment in htu: the same URL.
    for htu in [
        "https://api.example.com:443/orders",
        "HTTPS://API.example.com/orders",
        "https://api.example.com/orders?x=1",
        "https://api.example.com/orders#f",
    ] {
        assert!(
            check(&c, &c.proof_with(|_, cl| cl["htu"] = json!(htu))).is_ok(),
            "{htu}"
        );
    }
}

#[test]
fn every_broken_property_is_refused_one_at_a_time() {
    let c = client();
    let other = client();
    type Change<'a> = Box<dyn Fn(&mut Value, &mut Value) + 'a>;
    let other_jwk = other.jwk.clone();
    let cases: Vec<(DpopError, Change)> = vec![
        (DpopError::Type, Box::new(|h, _| h["typ"] = json!("JWT"))),
        (
            DpopError::Type,
            Box::new(|h, _| {
                h.as_object_mut().unwrap().remove("typ");
            }),
        ),
        (
            DpopError::Algorithm,
            Box::new(|h, _| h["alg"] = json!("HS256")),
        ),
        (
            DpopError::Algorithm,
            Box::new(|h, _| h["alg"] = json!("none")),
        ),
        (
            DpopError::Key,
            Box::new(|h, _| {
                h.as_object_mut().unwrap().remove("jwk");
            }),
        ),
        (
            DpopError::Key,
            Box::new(|h, _| h["jwk"]["d"] = json!("AAAA")),
        ),
        (
            DpopError::Key,
            Box::new(|h, _| h["jwk"] = json!({"kty": "oct", "k": "c2VjcmV0"})),
        ),
        (DpopError::Key, Box::new(|h, _| h["alg"] = json!("RS256"))),
        (
            DpopError::BadSignature,
            Box::new(move |h, _| h["jwk"] = other_jwk.clone()),
        ),
        (DpopError::Method, Box::new(|_, c| c["htm"] = json!("GET"))),
        (DpopError::Method, Box::new(|_, c| c["htm"] = json!("post"))),
        (
            DpopError::Url,
            Box::new(|_, c| c["htu"] = json!("https://evil.example.com/orders")),
        ),
        (
            DpopError::Url,
            Box::new(|_, c| c["htu"] = json!("https://api.example.com/orders/1")),
        ),
        (
            DpopError::Url,
            Box::new(|_, c| c["htu"] = json!("http://api.example.com/orders")),
        ),
        (
            DpopError::Url,
            Box::new(|_, c| c["htu"] = json!("https://api.example.com:8443/orders")),
        ),
        (
            DpopError::Url,
            Box::new(|_, c| c["htu"] = json!("https://x@api.example.com/orders")),
        ),
        (DpopError::Url, Box::new(|_, c| c["htu"] = json!("/orders"))),
        (
            DpopError::IssuedAt,
            Box::new(|_, c| c["iat"] = json!(NOW + 61)),
        ),
        (
            DpopError::IssuedAt,
            Box::new(|_, c| c["iat"] = json!(NOW - MAX_PROOF_AGE_SECONDS - 61)),
        ),
        (
            DpopError::IssuedAt,
            Box::new(|_, c| {
                c.as_object_mut().unwrap().remove("iat");
            }),
        ),
        (
            DpopError::IssuedAt,
            Box::new(|_, c| c["iat"] = json!("now")),
        ),
        (
            DpopError::TokenHash,
            Box::new(|_, c| c["ath"] = json!("AAAA")),
        ),
        (
            DpopError::TokenHash,
            Box::new(|_, c| {
                c.as_object_mut().unwrap().remove("ath");
            }),
        ),
        (
            DpopError::Jti,
            Box::new(|_, c| {
                c.as_object_mut().unwrap().remove("jti");
            }),
        ),
        (DpopError::Jti, Box::new(|_, c| c["jti"] = json!(""))),
        (
            DpopError::Jti,
            Box::new(|_, c| c["jti"] = json!("x".repeat(257))),
        ),
    ];
    for (want, change) in cases {
        let proof = c.proof_with(|h, cl| change(h, cl));
        assert_eq!(check(&c, &proof), Err(want), "{want:?}");
    }
    // The token bound to another key.
    let proof = c.proof_with(|_, _| {});
    assert_eq!(
        check_proof(&proof, TOKEN, &other.jkt(), &target(), NOW, 60),
        Err(DpopError::KeyBinding)
    );
    // A proof for another token.
    assert_eq!(
        check_proof(&proof, "a.b.c", &c.jkt(), &target(), NOW, 60),
        Err(DpopError::TokenHash)
    );
    // Tampered after signing; not a JWS.
    let mut parts: Vec<String> = proof.split('.').map(String::from).collect();
    parts[1] = URL_SAFE_NO_PAD.encode(json!({"htm": "POST"}).to_string());
    assert_eq!(check(&c, &parts.join(".")), Err(DpopError::BadSignature));
    for junk in ["", "a.b", "a.b.c.d", "!!.!!.!!", &"a".repeat(9000)] {
        assert_eq!(check(&c, junk), Err(DpopError::Malformed), "{junk:.20}");
    }
}

#[test]
fn a_key_off_its_curve_never_verifies() {
    let c = client();
    // y + 1: no longer on P-256; ring's verification refuses it.
    let mut y = URL_SAFE_NO_PAD
        .decode(c.jwk["y"].as_str().unwrap())
        .unwrap();
    y[31] ^= 1;
    let mut jwk = c.jwk.clone();
    jwk["y"] = json!(URL_SAFE_NO_PAD.encode(&y));
    let proof = c.proof_with(|h, _| h["jwk"] = jwk.clone());
    let jkt = jwk_thumbprint(&jwk).unwrap();
    assert_eq!(
        check_proof(&proof, TOKEN, &jkt, &target(), NOW, 60),
        Err(DpopError::BadSignature)
    );
}
