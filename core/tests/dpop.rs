//! `jwt.dpop` (RFC 9449) through the pipeline: a DPoP-bound token needs a fresh proof of its
//! key for this request, each proof works once, and a bound token is never a bearer token.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;
use gateguard_core::jwt::dpop::client::TestClient;
use serde_json::{json, Value};

const INVALID_PROOF: &str = "Invalid DPoP proof";
const CHALLENGE: &str = "DPoP error=\"invalid_dpop_proof\", algs=\"ES256 ES384 RS256 PS256 EdDSA\"";

fn client() -> TestClient {
    TestClient::new()
}

trait Prove {
    fn proof(&self, method: &str, htu: &str, token: &str, jti: &str) -> String;
}

impl Prove for TestClient {
    fn proof(&self, method: &str, htu: &str, token: &str, jti: &str) -> String {
        self.proof_at(method, htu, token, jti, NOW)
    }
}

fn doc(s: &Signer, dpop: &str) -> Value {
    json!({"apis": [{"name": "d", "path_prefix": "/d",
        "jwt": {"issuers": [ISS], "audiences": ["api://a"], "algorithms": ["EdDSA"],
                "jwks": {"inline": {"keys": [s.jwk]}}, "dpop": dpop}}],
        "client_ip": {"trusted_proxy_hops": 1, "trusted_proxies": ["10.0.0.1"]}})
}

const HTU: &str = "https://api.example.com/d/orders";

fn dpop_call<'a>(path: &'a str, token: &str, proof: &str) -> Call<'a> {
    call(path)
        .without_key()
        .method("POST")
        .header(":scheme", "https")
        .header(":authority", "api.example.com")
        .header("authorization", &format!("DPoP {token}"))
        .header("dpop", proof)
}

fn refused_as_proof(d: &gateguard_core::decision::Decision) {
    assert_refused(d, 401, INVALID_PROOF);
    assert_eq!(header(reply(d), "www-authenticate"), Some(CHALLENGE));
}

#[test]
fn a_bound_token_with_its_proof_works_once_per_proof() {
    let s = signer();
    let p = compile(&doc(&s, "optional"));
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let c = client();
    let t = token(&s, json!({"cnf": {"jkt": c.jkt()}}));
    let proof = c.proof("POST", HTU, &t, "j1");
    forward(&dpop_call("/d/orders", &t, &proof).run(&p, &h));
    // The same proof again: refused, even for the same client.
    refused_as_proof(&dpop_call("/d/orders", &t, &proof).run(&p, &h));
    // A fresh proof: accepted (the token itself is not single-use here).
    forward(&dpop_call("/d/orders", &t, &c.proof("POST", HTU, &t, "j2")).run(&p, &h));
    // Scheme spelled in another case.
    let d = call("/d/orders")
        .without_key()
        .method("POST")
        .header(":scheme", "https")
        .header(":authority", "api.example.com")
        .header("authorization", &format!("dpop {t}"))
        .header("dpop", &c.proof("POST", HTU, &t, "j3"))
        .run(&p, &h);
    forward(&d);
}

#[test]
fn a_thief_without_the_key_gets_nothing() {
    let s = signer();
    let p = compile(&doc(&s, "optional"));
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let (c, thief) = (client(), client());
    let t = token(&s, json!({"cnf": {"jkt": c.jkt()}}));
    // As a bearer token.
    refused_as_proof(&call("/d/orders").without_key().bearer(&t).run(&p, &h));
    // With a proof of the thief's own key.
    refused_as_proof(&dpop_call("/d/orders", &t, &thief.proof("POST", HTU, &t, "t1")).run(&p, &h));
    // Without a proof, with two proofs.
    let no_proof = call("/d/orders")
        .without_key()
        .method("POST")
        .header("authorization", &format!("DPoP {t}"));
    refused_as_proof(&no_proof.run(&p, &h));
    let good = c.proof("POST", HTU, &t, "x1");
    refused_as_proof(
        &dpop_call("/d/orders", &t, &good)
            .header("dpop", &good)
            .run(&p, &h),
    );
    // A captured proof for another method, path or host.
    for (method, htu) in [
        ("GET", HTU),
        ("POST", "https://api.example.com/d/admin"),
        ("POST", "https://other.example.com/d/orders"),
    ] {
        let proof = c.proof(method, htu, &t, &format!("{method}{htu}"));
        refused_as_proof(&dpop_call("/d/orders", &t, &proof).run(&p, &h));
    }
    // A proof for another token of the same client.
    let other = token(&s, json!({"cnf": {"jkt": c.jkt()}, "jti": "other"}));
    refused_as_proof(&dpop_call("/d/orders", &t, &c.proof("POST", HTU, &other, "o1")).run(&p, &h));
}

#[test]
fn unbound_tokens_depend_on_the_mode() {
    let s = signer();
    let c = client();
    let unbound = token(&s, json!({}));
    let optional = compile(&doc(&s, "optional"));
    let h = FakeHost::new(&optional, json!({"keys": [s.jwk]}));
    forward(
        &call("/d/orders")
            .without_key()
            .bearer(&unbound)
            .run(&optional, &h),
    );
    // The DPoP scheme with a token that is not bound.
    refused_as_proof(
        &dpop_call("/d/orders", &unbound, &c.proof("POST", HTU, &unbound, "u1")).run(&optional, &h),
    );
    let required = compile(&doc(&s, "required"));
    let h = FakeHost::new(&required, json!({"keys": [s.jwk]}));
    refused_as_proof(
        &call("/d/orders")
            .without_key()
            .bearer(&unbound)
            .run(&required, &h),
    );
    let bound = token(&s, json!({"cnf": {"jkt": c.jkt()}}));
    forward(
        &dpop_call("/d/orders", &bound, &c.proof("POST", HTU, &bound, "r1")).run(&required, &h),
    );
}

#[test]
fn the_forwarded_url_counts_only_from_a_trusted_proxy() {
    let s = signer();
    let p = compile(&doc(&s, "optional"));
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let c = client();
    let t = token(&s, json!({"cnf": {"jkt": c.jkt()}}));
    let public = "https://public.example.com/d/orders";
    let via = |peer: &'static str, jti: &str| {
        call("/d/orders")
            .without_key()
            .method("POST")
            .peer(peer)
            .header(":scheme", "http")
            .header(":authority", "10.0.0.2:8080")
            .header("x-forwarded-for", "198.51.100.7")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "public.example.com")
            .header("authorization", &format!("DPoP {t}"))
            .header("dpop", &c.proof("POST", public, &t, jti))
            .run(&p, &h)
    };
    forward(&via("10.0.0.1:5000", "p1"));
    refused_as_proof(&via("10.9.9.9:5000", "p2"));
}

#[test]
fn dpop_policy_errors_name_the_field() {
    let s = signer();
    let mut d = doc(&s, "sometimes");
    assert!(gateguard_core::parse_policy(d.to_string().as_bytes(), &|_| None).is_err());
    d = json!({"apis": [{"name": "d", "path_prefix": "/d",
        "jwt": {"issuers": [ISS], "audiences": ["api://a"], "algorithms": ["RS256"],
                "jwks": {"cluster": "c", "uri": "https://idp/keys"}, "verify_with": "envoy", "dpop": "required"}}]});
    let err = gateguard_core::parse_policy(d.to_string().as_bytes(), &|_| None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("apis[0].jwt.dpop"), "{err}");
}

#[test]
fn with_etcd_a_proof_is_spent_in_etcd_so_every_replica_refuses_it() {
    use gateguard_core::decision::{Decision, Subject};
    use gateguard_core::replay::etcd::{remember, Answer, Holder, OnUnavailable};
    use gateguard_core::replay::Verdict;

    let s = signer();
    let mut d = doc(&s, "optional");
    d["apis"][0]["replay"] = json!({"mode": "without_ip"});
    d["replay_store"] = json!({"etcd": {"cluster": "etcd"}});
    let p = compile(&d);
    let h = FakeHost::new(&p, json!({"keys": [s.jwk]}));
    let c = client();
    let t = token(&s, json!({"cnf": {"jkt": c.jkt()}}));
    let proof = c.proof("POST", HTU, &t, "e1");
    let Decision::Ask(first) = dpop_call("/d/orders", &t, &proof).run(&p, &h) else {
        panic!("expected a question for etcd");
    };
    // The proof first, then the token: both are etcd's to decide.
    assert_eq!(first.about, Subject::DpopProof);
    let (token_check, about) = first.then.expect("the token's check next");
    assert_eq!(about, Subject::Token);
    assert_ne!(first.check.token.digest, token_check.token.digest);

    // Another replica already spent the proof: refused as a DPoP failure, not a token replay.
    let spent = Answer {
        verdict: Verdict::Replay,
        holder: Holder::Once,
    };
    let other_replica = (*first).clone();
    refused_as_proof(&other_replica.resolve(Ok(spent), OnUnavailable::Deny, &h.store, NOW));

    // First use everywhere: the proof accepted, then the token's own check, then forward.
    let fresh = Answer {
        verdict: Verdict::FirstUse,
        holder: Holder::Once,
    };
    let Decision::Ask(second) = first.resolve(Ok(fresh), OnUnavailable::Deny, &h.store, NOW) else {
        panic!("expected the token's check");
    };
    assert_eq!(second.about, Subject::Token);
    assert!(second.then.is_none());
    remember(
        &h.store,
        &p.replay_cache,
        &h.prefix,
        second.check.token,
        &fresh,
        NOW,
    );
    forward(&second.resolve(Ok(fresh), OnUnavailable::Deny, &h.store, NOW));

    // Once this Envoy learnt a proof is spent (the adapter remembers etcd's answers), the
    // same proof is refused here without a round trip.
    let t2 = token(&s, json!({"cnf": {"jkt": c.jkt()}, "jti": "t2"}));
    let proof2 = c.proof("POST", HTU, &t2, "e2");
    let Decision::Ask(again) = dpop_call("/d/orders", &t2, &proof2).run(&p, &h) else {
        panic!("expected a question for etcd");
    };
    assert_eq!(again.about, Subject::DpopProof);
    remember(
        &h.store,
        &p.replay_cache,
        &h.prefix,
        again.check.token,
        &fresh,
        NOW,
    );
    refused_as_proof(&dpop_call("/d/orders", &t2, &proof2).run(&p, &h));
}
