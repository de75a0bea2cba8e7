//! Property tests of token and DPoP proof acceptance: whatever gateguard accepts (signatures
//! checked with ring) also verifies with an independent implementation (jsonwebtoken's
//! RustCrypto backend), and no single changed bit of a signed token or proof is ever accepted.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use gateguard_core::jwt::dpop::client::TestClient;
use gateguard_core::jwt::dpop::{check_proof, jwk_thumbprint, ProofTarget};
use gateguard_core::jwt::{JwtPolicy, KeySet};
use gateguard_core::parse_policy;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

const NOW: u64 = 1_800_000_000;
const ISS: &str = "https://login.example.com/tenant/v2.0";
const AUD: &str = "api://a";

fn cases(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

struct TestKey {
    alg: Algorithm,
    kid: &'static str,
    encoding: EncodingKey,
    jwk: Value,
}

fn from_encoding(encoding: EncodingKey, alg: Algorithm, kid: &'static str) -> TestKey {
    let mut jwk = Jwk::from_encoding_key(&encoding, alg).unwrap();
    jwk.common.key_id = Some(kid.to_string());
    jwk.common.key_algorithm = None;
    TestKey {
        alg,
        kid,
        encoding,
        jwk: serde_json::to_value(jwk).unwrap(),
    }
}

fn keys() -> &'static [TestKey] {
    static KEYS: OnceLock<Vec<TestKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        use rsa::pkcs8::{EncodePrivateKey, LineEnding};
        let rsa = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
        let rsa_pem = rsa.to_pkcs8_pem(LineEnding::LF).unwrap();
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        vec![
            from_encoding(EncodingKey::from_rsa_pem(rsa_pem.as_bytes()).unwrap(), Algorithm::RS256, "rsa"),
            from_encoding(EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap(), Algorithm::ES256, "ec"),
            TestKey {
                alg: Algorithm::EdDSA,
                kid: "ed",
                encoding: EncodingKey::from_ed_pem(ed.serialize_pem().as_bytes()).unwrap(),
                jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": URL_SAFE_NO_PAD.encode(ed.public_key_raw())}),
            },
        ]
    })
}

fn jwks() -> Value {
    json!({"keys": keys().iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
}

struct Setup {
    jwt: JwtPolicy,
    keys: KeySet,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let doc = json!({"apis": [{"name": "a", "path_prefix": "/a", "jwt": {
            "issuers": [ISS], "audiences": [AUD], "algorithms": ["RS256", "PS256", "ES256", "EdDSA"],
            "jwks": {"inline": jwks()}}}]});
        let mut policy = parse_policy(doc.to_string().as_bytes(), &|_| None).unwrap();
        Setup {
            jwt: policy.apis.remove(0).jwt.unwrap(),
            keys: KeySet::from_jwks_value(&jwks()).unwrap(),
        }
    })
}

fn part(text: &str) -> Option<Map<String, Value>> {
    match serde_json::from_slice(&URL_SAFE_NO_PAD.decode(text).ok()?) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

/// A compact JWS's three parts, its header and the algorithm that header names.
type SignedParts<'a> = (&'a str, &'a str, &'a str, Map<String, Value>, Algorithm);

fn signed_parts(jws: &str) -> Option<SignedParts<'_>> {
    let [h, c, s] = jws.split('.').collect::<Vec<_>>()[..] else {
        return None;
    };
    let header = part(h)?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .and_then(|a| a.parse::<Algorithm>().ok())?;
    Some((h, c, s, header, alg))
}

/// jsonwebtoken's verdict on `token`'s signature, with the key its header names.
fn independently_verified(token: &str) -> bool {
    let Some((h, c, s, header, alg)) = signed_parts(token) else {
        return false;
    };
    let kid = header.get("kid").and_then(Value::as_str);
    keys()
        .iter()
        .filter(|k| kid.is_none_or(|kid| kid == k.kid))
        .any(|k| {
            let jwk: Jwk = serde_json::from_value(k.jwk.clone()).unwrap();
            let key = DecodingKey::from_jwk(&jwk).unwrap();
            jsonwebtoken::crypto::verify(s, format!("{h}.{c}").as_bytes(), &key, alg)
                .unwrap_or(false)
        })
}

fn arb_claims() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just(json!(ISS)),
            Just(json!("https://evil.example")),
            Just(Value::Null)
        ],
        prop_oneof![
            Just(json!(AUD)),
            Just(json!([AUD, "x"])),
            Just(json!("api://b")),
            Just(json!([]))
        ],
        prop_oneof![
            (0u64..1200).prop_map(|d| json!(NOW - 600 + d)),
            Just(json!("soon")),
            Just(json!(1e300)),
            Just(json!(-1)),
        ],
        proptest::option::of((0u64..1200).prop_map(|d| NOW - 600 + d)),
        proptest::collection::btree_map("[a-z]{1,6}", "[a-zA-Z0-9 ]{0,8}", 0..3),
    )
        .prop_map(|(iss, aud, exp, nbf, extra)| {
            let mut c = json!({"iss": iss, "aud": aud, "exp": exp, "sub": "u1"});
            if let Some(nbf) = nbf {
                c["nbf"] = json!(nbf);
            }
            for (k, v) in extra {
                c[k] = json!(v);
            }
            c
        })
}

#[derive(Debug, Clone)]
enum Tamper {
    FlipBit(Index, u8),
    Alg(&'static str),
    Kid(&'static str),
    DropSignature,
    Claim(String),
}

fn arb_tamper() -> impl Strategy<Value = Tamper> {
    prop_oneof![
        4 => (any::<Index>(), 0u8..7).prop_map(|(i, b)| Tamper::FlipBit(i, b)),
        1 => proptest::sample::select(&["none", "HS256", "RS256", "PS256", "ES256", "ES384", "EdDSA", "RS512"][..]).prop_map(Tamper::Alg),
        1 => proptest::sample::select(&["rsa", "ec", "ed", "other", ""][..]).prop_map(Tamper::Kid),
        1 => Just(Tamper::DropSignature),
        1 => "[a-z]{1,4}".prop_map(Tamper::Claim),
    ]
}

fn tamper(token: &str, how: &Tamper) -> String {
    let encode =
        |m: &Map<String, Value>| URL_SAFE_NO_PAD.encode(Value::Object(m.clone()).to_string());
    if let Tamper::FlipBit(i, bit) = how {
        let mut bytes = token.as_bytes().to_vec();
        let at = i.index(bytes.len());
        bytes[at] ^= 1 << bit;
        return String::from_utf8(bytes).unwrap();
    }
    // The others rewrite a part, where the (earlier tampered) token still has them.
    let [h, c, s] = token.split('.').collect::<Vec<_>>()[..] else {
        return token.to_string();
    };
    let (Some(mut header), Some(mut claims)) = (part(h), part(c)) else {
        return token.to_string();
    };
    match how {
        Tamper::Alg(alg) => {
            header.insert("alg".into(), json!(alg));
            format!("{}.{c}.{s}", encode(&header))
        }
        Tamper::Kid(kid) => {
            header.insert("kid".into(), json!(kid));
            format!("{}.{c}.{s}", encode(&header))
        }
        Tamper::DropSignature => format!("{h}.{c}."),
        Tamper::Claim(name) => {
            claims.insert(name.clone(), json!("admin"));
            format!("{h}.{}.{s}", encode(&claims))
        }
        Tamper::FlipBit(..) => unreachable!(),
    }
}

fn accepted(token: &str) -> bool {
    let s = setup();
    s.jwt.verify(token, Some(&s.keys), NOW).is_ok()
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn an_accepted_token_verifies_independently_and_meets_the_policy(
        key in 0usize..3,
        claims in arb_claims(),
        tampers in proptest::collection::vec(arb_tamper(), 0..3),
    ) {
        let k = &keys()[key];
        let mut header = Header::new(k.alg);
        header.kid = Some(k.kid.to_string());
        let original = jsonwebtoken::encode(&header, &claims, &k.encoding).unwrap();
        let mut token = original.clone();
        for t in &tampers {
            token = tamper(&token, t);
        }
        let s = setup();
        match s.jwt.verify(&token, Some(&s.keys), NOW) {
            Ok(verified) => {
                prop_assert!(independently_verified(&token), "accepted {}", token);
                // Changed anywhere: never accepted.
                prop_assert_eq!(&token, &original);
                let c = &verified.claims;
                prop_assert_eq!(c.get("iss"), Some(&json!(ISS)));
                let aud = c.get("aud").unwrap();
                prop_assert!(aud == &json!(AUD) || aud.as_array().is_some_and(|a| a.contains(&json!(AUD))));
                prop_assert!(verified.exp.saturating_add(s.jwt.clock_skew()) > NOW);
            }
            Err(_) => {
                // An untouched, valid token is only refused for its claims.
                if token == original && claims["iss"] == json!(ISS) && claims["aud"] == json!(AUD)
                    && claims["exp"].as_u64().is_some_and(|e| e > NOW + 120)
                    && claims.get("nbf").and_then(Value::as_u64).is_none_or(|n| n <= NOW) {
                    prop_assert!(false, "refused a valid token {}", token);
                }
            }
        }
    }

    #[test]
    fn arbitrary_tokens_are_never_accepted(
        h in prop_oneof![Just(r#"{"alg":"RS256","kid":"rsa"}"#.to_string()), Just(r#"{"alg":"none"}"#.to_string()), any::<String>()],
        c in prop_oneof![Just(format!(r#"{{"iss":"{ISS}","aud":"{AUD}","exp":{}}}"#, NOW + 600)), any::<String>()],
        sig in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let token = format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(h), URL_SAFE_NO_PAD.encode(c), URL_SAFE_NO_PAD.encode(&sig));
        prop_assert!(!accepted(&token) || independently_verified(&token));
        let four = format!("{token}.");
        prop_assert!(!accepted(&four));
    }
}

// ---------------------------------------------------------------- DPoP proofs

const HTU: &str = "https://api.example.com/d/orders";
const TOKEN: &str = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2ln";

fn client() -> &'static TestClient {
    static CLIENT: OnceLock<TestClient> = OnceLock::new();
    CLIENT.get_or_init(TestClient::new)
}

fn target() -> ProofTarget<'static> {
    ProofTarget {
        method: "POST",
        scheme: "https",
        authority: "api.example.com",
        path: "/d/orders",
    }
}

/// jsonwebtoken's verdict on a proof, with the key its own header carries.
fn proof_verified_independently(proof: &str) -> bool {
    let Some((h, c, s, header, alg)) = signed_parts(proof) else {
        return false;
    };
    let Some(jwk) = header
        .get("jwk")
        .and_then(|j| serde_json::from_value::<Jwk>(j.clone()).ok())
    else {
        return false;
    };
    let Ok(key) = DecodingKey::from_jwk(&jwk) else {
        return false;
    };
    jsonwebtoken::crypto::verify(s, format!("{h}.{c}").as_bytes(), &key, alg).unwrap_or(false)
}

fn arb_proof_claims() -> impl Strategy<Value = Value> {
    let ath = URL_SAFE_NO_PAD.encode(Sha256::digest(TOKEN.as_bytes()));
    (
        prop_oneof![Just("POST"), Just("GET"), Just("post")],
        prop_oneof![Just(HTU.to_string()), Just("https://API.example.com:443/d/orders".to_string()),
                    Just(format!("{HTU}?q=1")), Just("https://evil.example/d/orders".to_string()), "[a-z:/.]{0,20}"],
        prop_oneof![(0u64..1200).prop_map(|d| json!(NOW - 600 + d)), Just(json!("now")), Just(json!(null))],
        prop_oneof![Just(json!(ath)), Just(json!("x")), Just(Value::Null)],
        prop_oneof![Just(json!("j1")), Just(json!("")), Just(json!("j".repeat(300))), Just(json!(7))],
    )
        .prop_map(|(htm, htu, iat, ath, jti)| json!({"htm": htm, "htu": htu, "iat": iat, "ath": ath, "jti": jti}))
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn an_accepted_proof_verifies_independently_and_no_changed_bit_is_accepted(
        claims in arb_proof_claims(),
        header_typ in prop_oneof![Just("dpop+jwt"), Just("JWT")],
        flip in proptest::option::of((any::<Index>(), 0u8..7)),
    ) {
        let c = client();
        let jkt = c.jkt();
        let header = json!({"typ": header_typ, "alg": "ES256", "jwk": c.jwk});
        let original = c.sign(&header, &claims);
        let proof = match flip {
            Some((i, bit)) => {
                let mut bytes = original.clone().into_bytes();
                let at = i.index(bytes.len());
                bytes[at] ^= 1 << bit;
                String::from_utf8(bytes).unwrap()
            }
            None => original.clone(),
        };
        if let Ok(accepted) = check_proof(&proof, TOKEN, &jkt, &target(), NOW, 60) {
            prop_assert!(proof_verified_independently(&proof));
            prop_assert_eq!(&proof, &original);
            prop_assert_eq!(header_typ, "dpop+jwt");
            prop_assert!(accepted.valid_until + 60 >= NOW);
            // Bound to another key: refused.
            prop_assert!(check_proof(&proof, TOKEN, "another-jkt", &target(), NOW, 60).is_err());
            // For another token: refused.
            prop_assert!(check_proof(&proof, "a.b.c", &jkt, &target(), NOW, 60).is_err());
        }
    }

    #[test]
    fn arbitrary_proofs_never_panic_and_acceptance_is_independent(
        h in prop_oneof![
            Just(json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": client().jwk}).to_string()),
            Just(json!({"typ": "dpop+jwt", "alg": "none", "jwk": client().jwk}).to_string()),
            Just(json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}}).to_string()),
            Just(json!({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": {"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode([0u8; 32])}}).to_string()),
            Just(json!({"typ": "dpop+jwt", "alg": "RS256", "jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}}).to_string()),
            any::<String>(),
        ],
        c in prop_oneof![arb_proof_claims().prop_map(|v| v.to_string()), any::<String>()],
        sig in proptest::collection::vec(any::<u8>(), 0..300),
        raw in any::<String>(),
    ) {
        let proof = format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(h), URL_SAFE_NO_PAD.encode(c), URL_SAFE_NO_PAD.encode(&sig));
        let jkt = client().jkt();
        if check_proof(&proof, TOKEN, &jkt, &target(), NOW, 60).is_ok() {
            prop_assert!(proof_verified_independently(&proof));
        }
        let _ = check_proof(&raw, TOKEN, &jkt, &target(), NOW, 60);
        let _ = jwk_thumbprint(&serde_json::from_str::<Value>(&raw).unwrap_or_default());
    }
}
