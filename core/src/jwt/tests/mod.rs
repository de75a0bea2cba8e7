#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::fetch::{FetchState, FetchStep, JwksFetcher};
use super::*;

mod shared_jwks;

const NOW: u64 = 1_800_000_000;
const ISS: &str = "https://login.microsoftonline.com/tenant/v2.0";
const AUD: &str = "api://processfactorial";

struct TestKey {
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

struct Keys {
    rsa: TestKey,
    rsa2: TestKey,
    ec256: TestKey,
    ec384: TestKey,
    ed: TestKey,
    rsa_public_pem: String,
}

fn rsa_key(kid: &str) -> (TestKey, String) {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    let pem = private.to_pkcs8_pem(LineEnding::LF).unwrap();
    let public_pem = private
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let encoding = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
    (test_key(encoding, Algorithm::RS256, kid), public_pem)
}

fn rcgen_key(alg: &'static rcgen::SignatureAlgorithm, jwt_alg: Algorithm, kid: &str) -> TestKey {
    let pair = rcgen::KeyPair::generate_for(alg).unwrap();
    let pem = pair.serialize_pem();
    match jwt_alg {
        Algorithm::EdDSA => {
            // jsonwebtoken cannot derive a JWK from a PKCS#8 v2 Ed25519 key; build it by hand.
            let x = URL_SAFE_NO_PAD.encode(pair.public_key_raw());
            TestKey {
                alg: jwt_alg,
                encoding: EncodingKey::from_ed_pem(pem.as_bytes()).unwrap(),
                jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid}),
            }
        }
        _ => test_key(
            EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
            jwt_alg,
            kid,
        ),
    }
}

fn test_key(encoding: EncodingKey, alg: Algorithm, kid: &str) -> TestKey {
    let mut jwk = Jwk::from_encoding_key(&encoding, alg).unwrap();
    jwk.common.key_id = Some(kid.to_string());
    jwk.common.key_algorithm = None; // most IdPs (Entra ID) publish RSA keys without "alg"
    TestKey {
        alg,
        encoding,
        jwk: serde_json::to_value(jwk).unwrap(),
    }
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let (rsa, rsa_public_pem) = rsa_key("rsa-1");
        let (rsa2, _) = rsa_key("rsa-2");
        Keys {
            rsa,
            rsa2,
            ec256: rcgen_key(&rcgen::PKCS_ECDSA_P256_SHA256, Algorithm::ES256, "ec-256"),
            ec384: rcgen_key(&rcgen::PKCS_ECDSA_P384_SHA384, Algorithm::ES384, "ec-384"),
            ed: rcgen_key(&rcgen::PKCS_ED25519, Algorithm::EdDSA, "ed-1"),
            rsa_public_pem,
        }
    })
}

fn jwks() -> Value {
    let k = keys();
    json!({ "keys": [k.rsa.jwk, k.ec256.jwk, k.ec384.jwk, k.ed.jwk] })
}

fn policy_with(extra: Value) -> JwtPolicy {
    let mut cfg = json!({
        "issuers": ["https://sts.windows.net/tenant/", ISS],
        "audiences": [AUD, "api://other"],
        "algorithms": ["RS256", "PS256", "ES256", "ES384", "EdDSA"],
        "jwks": { "inline": jwks() },
    });
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    let cfg: JwtConfig = serde_json::from_value(cfg).unwrap();
    JwtPolicy::compile(&cfg, "apis[0].jwt", &|_| None).unwrap()
}

fn policy() -> JwtPolicy {
    policy_with(json!({}))
}

fn claims() -> Value {
    json!({ "iss": ISS, "aud": AUD, "sub": "user-1", "exp": NOW + 600, "iat": NOW - 10, "nbf": NOW - 10 })
}

fn sign_with(key: &TestKey, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

fn sign(key: &TestKey, claims: &Value) -> String {
    let kid = key.jwk["kid"].as_str().map(str::to_string);
    sign_with(key, key.alg, kid.as_deref(), claims)
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

fn verify(token: &str) -> Result<VerifiedToken, JwtError> {
    let set = KeySet::from_jwks_value(&jwks()).unwrap();
    policy().verify(token, Some(&set), NOW)
}

fn invalid(reason: InvalidReason) -> Result<VerifiedToken, JwtError> {
    Err(JwtError::Invalid(reason))
}

// --- valid tokens ----------------------------------------------------------------------------

#[test]
fn valid_tokens_of_every_family_verify() {
    let k = keys();
    for key in [&k.rsa, &k.ec256, &k.ec384, &k.ed] {
        let t = verify(&sign(key, &claims())).unwrap_or_else(|e| panic!("{:?}: {e:?}", key.alg));
        assert_eq!(t.exp, NOW + 600);
        assert_eq!(t.claims["sub"], "user-1");
    }
    let ps = sign_with(&k.rsa, Algorithm::PS256, Some("rsa-1"), &claims());
    assert!(verify(&ps).is_ok());
}

#[test]
fn rs384_and_rs512_verify_when_allowed() {
    let k = keys();
    let p = policy_with(json!({ "algorithms": ["RS384", "RS512", "PS512"] }));
    let set = KeySet::from_jwks_value(&jwks()).unwrap();
    for alg in [Algorithm::RS384, Algorithm::RS512, Algorithm::PS512] {
        let t = sign_with(&k.rsa, alg, Some("rsa-1"), &claims());
        assert!(p.verify(&t, Some(&set), NOW).is_ok(), "{alg:?}");
    }
    // RS256 is not in this policy's list.
    let t = sign(&k.rsa, &claims());
    assert_eq!(
        p.verify(&t, Some(&set), NOW),
        invalid(InvalidReason::AlgorithmNotAllowed)
    );
}

// --- signatures (ring) -----------------------------------------------------------------------

/// The token with one byte of its signature changed, re-encoded canonically.
fn with_flipped_signature(token: &str) -> String {
    let (input, sig) = token.rsplit_once('.').unwrap();
    let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
    raw[10] ^= 1;
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(raw))
}

#[test]
fn every_algorithm_signed_by_rustcrypto_verifies_with_ring_and_not_once_tampered() {
    use Algorithm::*;
    let k = keys();
    let p = policy_with(json!({"algorithms":
        ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]}));
    let set = KeySet::from_jwks_value(&jwks()).unwrap();
    let cases = [
        (&k.rsa, RS256),
        (&k.rsa, RS384),
        (&k.rsa, RS512),
        (&k.rsa, PS256),
        (&k.rsa, PS384),
        (&k.rsa, PS512),
        (&k.ec256, ES256),
        (&k.ec384, ES384),
        (&k.ed, EdDSA),
    ];
    for (key, alg) in cases {
        let t = sign_with(key, alg, key.jwk["kid"].as_str(), &claims());
        assert!(p.verify(&t, Some(&set), NOW).is_ok(), "{alg:?}");
        assert_eq!(
            p.verify(&with_flipped_signature(&t), Some(&set), NOW),
            invalid(InvalidReason::BadSignature),
            "{alg:?}"
        );
    }
}

#[test]
fn every_hmac_algorithm_uses_the_one_secret() {
    let secret = "s".repeat(40);
    let p = policy_with(json!({"algorithms": ["HS256", "HS384", "HS512"],
                               "hmac_secret": {"value": secret}, "jwks": null}));
    let key = EncodingKey::from_secret(secret.as_bytes());
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let t = jsonwebtoken::encode(&Header::new(alg), &claims(), &key).unwrap();
        assert!(p.verify(&t, None, NOW).is_ok(), "{alg:?}");
        assert_eq!(
            p.verify(&with_flipped_signature(&t), None, NOW),
            invalid(InvalidReason::BadSignature),
            "{alg:?}"
        );
    }
    // An HS256 tag under a header that says HS512: the wrong length and the wrong hash.
    let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims(), &key).unwrap();
    let (_, rest) = t.split_once('.').unwrap();
    let relabelled = format!("{}.{rest}", b64(&json!({"alg": "HS512", "typ": "JWT"})));
    assert_eq!(
        p.verify(&relabelled, None, NOW),
        invalid(InvalidReason::BadSignature)
    );
}

#[test]
fn a_key_never_verifies_another_family_s_algorithm() {
    use verify::{signature_is_valid, VerifyingKey};
    use Algorithm::*;
    let k = keys();
    let set = KeySet::from_jwks_value(&jwks()).unwrap();
    let key = |kid: &str, alg| &set.choose(Some(kid), alg).unwrap().key;
    let hmac = VerifyingKey::hmac(&[b'x'; 32]);
    // `KeySet::choose` refuses these pairs; the backend refuses them again on its own.
    for (signer, alg, own, others) in [
        (
            &k.rsa,
            RS256,
            key("rsa-1", RS256),
            vec![ES256, ES384, EdDSA, HS256],
        ),
        (
            &k.ec256,
            ES256,
            key("ec-256", ES256),
            vec![ES384, RS256, EdDSA, HS256],
        ),
        (
            &k.ec384,
            ES384,
            key("ec-384", ES384),
            vec![ES256, PS384, EdDSA, HS384],
        ),
        (&k.ed, EdDSA, key("ed-1", EdDSA), vec![ES256, RS256, HS512]),
    ] {
        let t = sign_with(signer, alg, None, &claims());
        let (input, sig) = t.rsplit_once('.').unwrap();
        assert!(signature_is_valid(sig, input, own, alg), "{alg:?}");
        for other in others {
            assert!(
                !signature_is_valid(sig, input, own, other),
                "{alg:?} as {other:?}"
            );
        }
        assert!(
            !signature_is_valid(sig, input, &hmac, alg),
            "{alg:?} with a secret"
        );
    }
}

#[test]
fn rsa_signatures_must_have_the_modulus_length() {
    let k = keys();
    let t = sign(&k.rsa, &claims());
    let (input, sig) = t.rsplit_once('.').unwrap();
    let raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
    assert_eq!(raw.len(), 256);
    let mut padded = vec![0u8];
    padded.extend_from_slice(&raw);
    let reencode = |bytes: &[u8]| format!("{input}.{}", URL_SAFE_NO_PAD.encode(bytes));
    for spelling in [
        reencode(&padded),
        reencode(&raw[1..]),
        reencode(&raw[..255]),
    ] {
        assert_eq!(verify(&spelling), invalid(InvalidReason::BadSignature));
    }
}

// --- time claims -----------------------------------------------------------------------------

#[test]
fn expiry_respects_clock_skew_at_the_boundary() {
    let k = keys();
    let set = KeySet::from_jwks_value(&jwks()).unwrap();
    let mut c = claims();
    c["exp"] = json!(NOW - 60); // exactly skew seconds ago: expired
    assert_eq!(verify(&sign(&k.rsa, &c)), invalid(InvalidReason::Expired));
    c["exp"] = json!(NOW - 59);
    assert!(verify(&sign(&k.rsa, &c)).is_ok());
    // Moving the clock is what makes a valid token expire.
    let t = sign(&k.rsa, &claims());
    assert!(policy().verify(&t, Some(&set), NOW + 600).is_ok());
    assert_eq!(
        policy().verify(&t, Some(&set), NOW + 660),
        invalid(InvalidReason::Expired)
    );
}

#[test]
fn not_yet_valid_and_future_iat_are_refused() {
    let k = keys();
    let mut c = claims();
    c["nbf"] = json!(NOW + 61);
    assert_eq!(
        verify(&sign(&k.rsa, &c)),
        invalid(InvalidReason::NotYetValid)
    );
    c["nbf"] = json!(NOW + 60);
    assert!(verify(&sign(&k.rsa, &c)).is_ok());
    let mut c = claims();
    c["iat"] = json!(NOW + 3600);
    assert_eq!(
        verify(&sign(&k.rsa, &c)),
        invalid(InvalidReason::IssuedInFuture)
    );
}

#[test]
fn exp_must_be_a_number() {
    let k = keys();
    let mut c = claims();
    c["exp"] = json!((NOW + 600).to_string());
    assert_eq!(verify(&sign(&k.rsa, &c)), Err(JwtError::Malformed));
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(verify(&sign(&k.rsa, &c)), Err(JwtError::Malformed));
    c["exp"] = json!(null);
    assert_eq!(verify(&sign(&k.rsa, &c)), Err(JwtError::Malformed));
    c["exp"] = json!((NOW + 600) as f64 + 0.5);
    assert!(verify(&sign(&k.rsa, &c)).is_ok());
}

// --- issuer and audience ---------------------------------------------------------------------

#[test]
fn issuer_must_be_listed_exactly() {
    let k = keys();
    let mut c = claims();
    c["iss"] = json!("https://sts.windows.net/tenant/"); // Entra ID v1 issuer, also listed
    assert!(verify(&sign(&k.rsa, &c)).is_ok());
    for bad in [
        json!("https://evil/"),
        json!(ISS.to_uppercase()),
        json!([ISS]),
        json!(null),
    ] {
        c["iss"] = bad;
        assert_eq!(
            verify(&sign(&k.rsa, &c)),
            invalid(InvalidReason::WrongIssuer)
        );
    }
}

#[test]
fn audience_string_or_array() {
    let k = keys();
    let mut c = claims();
    c["aud"] = json!(["api://nope", AUD]);
    assert!(verify(&sign(&k.rsa, &c)).is_ok());
    c["aud"] = json!(["api://nope"]);
    assert_eq!(
        verify(&sign(&k.rsa, &c)),
        invalid(InvalidReason::WrongAudience)
    );
    c["aud"] = json!("api://nope");
    assert_eq!(
        verify(&sign(&k.rsa, &c)),
        invalid(InvalidReason::WrongAudience)
    );
    c.as_object_mut().unwrap().remove("aud");
    assert_eq!(
        verify(&sign(&k.rsa, &c)),
        invalid(InvalidReason::WrongAudience)
    );
}

// --- attacks ---------------------------------------------------------------------------------

#[test]
fn alg_none_is_never_accepted() {
    let body = b64(&claims());
    for header in [
        json!({"alg": "none"}),
        json!({"alg": "None"}),
        json!({"alg": "NONE", "kid": "rsa-1"}),
    ] {
        let h = b64(&header);
        assert_eq!(
            verify(&format!("{h}.{body}.")),
            invalid(InvalidReason::AlgorithmNotAllowed)
        );
        assert_eq!(
            verify(&format!("{h}.{body}.c2ln")),
            invalid(InvalidReason::AlgorithmNotAllowed)
        );
    }
    let err = JwtPolicy::compile(
        &serde_json::from_value(json!({"issuers": [ISS], "audiences": [AUD], "algorithms": ["none"], "jwks": {"inline": jwks()}})).unwrap(),
        "apis[0].jwt",
        &|_| None,
    )
    .unwrap_err();
    assert_eq!(err.path, "apis[0].jwt.algorithms[0]");
}

#[test]
fn hs256_signed_with_the_rsa_public_key_is_refused() {
    let k = keys();
    let forged_key = EncodingKey::from_secret(k.rsa_public_pem.as_bytes());
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let token = jsonwebtoken::encode(&header, &claims(), &forged_key).unwrap();
    assert_eq!(verify(&token), invalid(InvalidReason::AlgorithmNotAllowed));
    // Even a policy allowing HS256 uses only its own secret, never a JWKS key.
    let p = policy_with(
        json!({"algorithms": ["RS256", "HS256"], "hmac_secret": {"value": "x".repeat(32)}}),
    );
    let set = KeySet::from_jwks_value(&jwks()).unwrap();
    assert_eq!(
        p.verify(&token, Some(&set), NOW),
        invalid(InvalidReason::BadSignature)
    );
}

#[test]
fn hmac_with_configured_secret_works() {
    let secret = "s".repeat(40);
    let cfg: JwtConfig = serde_json::from_value(json!({
        "issuers": [ISS], "audiences": [AUD], "algorithms": ["HS256"],
        "hmac_secret": {"env": "JWT_SECRET"}
    }))
    .unwrap();
    let env = |n: &str| (n == "JWT_SECRET").then(|| secret.clone());
    let p = JwtPolicy::compile(&cfg, "apis[0].jwt", &env).unwrap();
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    assert!(p.verify(&token, None, NOW).is_ok());
    let wrong = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(&[b'x'; 40]),
    )
    .unwrap();
    assert_eq!(
        p.verify(&wrong, None, NOW),
        invalid(InvalidReason::BadSignature)
    );
}

#[test]
fn stripped_or_swapped_signatures_are_refused() {
    let k = keys();
    let token = sign(&k.rsa, &claims());
    let (input, _) = token.rsplit_once('.').unwrap();
    assert_eq!(
        verify(&format!("{input}.")),
        invalid(InvalidReason::BadSignature)
    );
    // Payload swapped under a valid signature.
    let mut evil = claims();
    evil["sub"] = json!("admin");
    let (header, _) = input.split_once('.').unwrap();
    let sig = token.rsplit('.').next().unwrap();
    assert_eq!(
        verify(&format!("{header}.{}.{sig}", b64(&evil))),
        invalid(InvalidReason::BadSignature)
    );
    // A valid signature of another key with the same kid.
    let other = sign_with(&k.rsa2, Algorithm::RS256, Some("rsa-1"), &claims());
    assert_eq!(verify(&other), invalid(InvalidReason::BadSignature));
}

#[test]
fn ecdsa_zero_signature_is_refused_cve_2022_21449() {
    let header = b64(&json!({"alg": "ES256", "kid": "ec-256"}));
    let body = b64(&claims());
    let zeros = URL_SAFE_NO_PAD.encode([0u8; 64]);
    assert_eq!(
        verify(&format!("{header}.{body}.{zeros}")),
        invalid(InvalidReason::BadSignature)
    );
    let der_zero = URL_SAFE_NO_PAD.encode([0x30, 0x06, 0x02, 0x01, 0x00, 0x02, 0x01, 0x00]);
    assert_eq!(
        verify(&format!("{header}.{body}.{der_zero}")),
        invalid(InvalidReason::BadSignature)
    );
}

#[test]
fn kid_selects_the_key_and_unknown_kid_is_distinguishable() {
    let k = keys();
    assert_eq!(
        verify(&sign_with(
            &k.rsa,
            Algorithm::RS256,
            Some("rotated-away"),
            &claims()
        )),
        invalid(InvalidReason::UnknownKid)
    );
    // A kid of a key of another type.
    assert_eq!(
        verify(&sign_with(
            &k.rsa,
            Algorithm::RS256,
            Some("ec-256"),
            &claims()
        )),
        invalid(InvalidReason::KeyAlgorithmMismatch)
    );
}

#[test]
fn token_without_kid_needs_exactly_one_key_of_its_type() {
    let k = keys();
    // One RSA key in the set: accepted without kid.
    assert!(verify(&sign_with(&k.rsa, Algorithm::RS256, None, &claims())).is_ok());
    let two = KeySet::from_jwks_value(&json!({"keys": [k.rsa.jwk, k.rsa2.jwk]})).unwrap();
    let t = sign_with(&k.rsa, Algorithm::RS256, None, &claims());
    assert_eq!(
        policy().verify(&t, Some(&two), NOW),
        invalid(InvalidReason::AmbiguousKey)
    );
}

#[test]
fn jku_x5u_and_embedded_jwk_headers_are_ignored() {
    let k = keys();
    // Signed by an attacker key, pointing at the attacker's keys: the kid is still looked up
    // in our set only.
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("attacker".into());
    header.jku = Some("https://evil.example/keys".into());
    header.x5u = Some("https://evil.example/cert".into());
    header.jwk = Some(serde_json::from_value(k.rsa2.jwk.clone()).unwrap());
    let t = jsonwebtoken::encode(&header, &claims(), &k.rsa2.encoding).unwrap();
    assert_eq!(verify(&t), invalid(InvalidReason::UnknownKid));
    header.kid = Some("rsa-1".into());
    let t = jsonwebtoken::encode(&header, &claims(), &k.rsa2.encoding).unwrap();
    assert_eq!(verify(&t), invalid(InvalidReason::BadSignature));
}

#[test]
fn crit_headers_are_refused() {
    let header = b64(&json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}));
    let body = b64(&claims());
    assert_eq!(
        verify(&format!("{header}.{body}.c2ln")),
        invalid(InvalidReason::CritHeader)
    );
}

#[test]
fn key_declaring_another_alg_is_not_used() {
    let k = keys();
    let mut jwk = k.rsa.jwk.clone();
    jwk["alg"] = json!("PS256");
    let set = KeySet::from_jwks_value(&json!({"keys": [jwk]})).unwrap();
    let t = sign(&k.rsa, &claims());
    assert_eq!(
        policy().verify(&t, Some(&set), NOW),
        invalid(InvalidReason::KeyAlgorithmMismatch)
    );
    let ps = sign_with(&k.rsa, Algorithm::PS256, Some("rsa-1"), &claims());
    assert!(policy().verify(&ps, Some(&set), NOW).is_ok());
}

#[test]
fn no_key_set_yet_is_invalid() {
    let t = sign(&keys().rsa, &claims());
    assert_eq!(
        policy().verify(&t, None, NOW),
        invalid(InvalidReason::NoKeySet)
    );
}

// --- structure -------------------------------------------------------------------------------

#[test]
fn structure_errors_are_malformed() {
    let k = keys();
    let token = sign(&k.rsa, &claims());
    let parts: Vec<&str> = token.split('.').collect();
    let cases = [
        format!("{}.{}", parts[0], parts[1]),
        format!("{token}.extra"),
        format!("{}..{}", parts[0], parts[2]),
        format!(".{}.{}", parts[1], parts[2]),
        "not-a-token".to_string(),
        String::new(),
        format!("{}=.{}.{}", parts[0], parts[1], parts[2]), // padding
        format!("{}.{}.{}", b64(&json!("a string")), parts[1], parts[2]),
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode("{not json"),
            parts[1],
            parts[2]
        ),
        format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode([0xff, 0xfe, 0x00]),
            parts[2]
        ),
        format!("é{token}"),
        "x".repeat(60 * 1024),
    ];
    for c in &cases {
        assert_eq!(
            verify(c),
            Err(JwtError::Malformed),
            "{}",
            &c[..c.len().min(60)]
        );
    }
}

#[test]
fn bearer_extraction() {
    assert_eq!(extract_bearer(&["Bearer abc.def.ghi"]), Ok("abc.def.ghi"));
    assert_eq!(extract_bearer(&["bearer abc"]), Ok("abc"));
    assert_eq!(extract_bearer(&["BEARER   abc  "]), Ok("abc"));
    for bad in [
        &[][..],
        &["Basic dXNlcjpwYXNz"],
        &["Bearer"],
        &["Bearer "],
        &["Bearer a b"],
        &["Bearer a,b"],
        &["abc"],
        &["Bearer a", "Bearer b"],
    ] {
        assert_eq!(extract_bearer(bad), Err(JwtError::MissingHeader), "{bad:?}");
    }
}

// --- claims ----------------------------------------------------------------------------------

#[test]
fn required_claims_apply_per_method() {
    let p = policy_with(json!({"required_claims": [
        {"name": "roles", "any_of": ["Forms.Submit", "Forms.Admin"], "methods": ["post", "PUT"]},
        {"name": "scp", "all_of": ["read", "write"], "methods": ["DELETE"]},
        {"name": "tier", "any_of": [3, true]},
    ]}));
    let mut c = claims();
    c["tier"] = json!(3);
    let c = c.as_object().unwrap().clone();
    assert_eq!(p.check_claims(&c, || vec!["GET".to_string()]), Ok(()));
    assert_eq!(
        p.check_claims(&c, || vec!["POST".to_string()]),
        Err(JwtError::InsufficientClaims)
    );
    let mut with_roles = c.clone();
    with_roles.insert("roles".into(), json!(["Reader", "Forms.Submit"]));
    assert_eq!(
        p.check_claims(&with_roles, || vec!["POST".to_string()]),
        Ok(())
    );
    assert_eq!(
        p.check_claims(&with_roles, || vec!["DELETE".to_string()]),
        Err(JwtError::InsufficientClaims)
    );
    with_roles.insert("scp".into(), json!("read write profile"));
    assert_eq!(
        p.check_claims(&with_roles, || vec!["DELETE".to_string()]),
        Ok(())
    );
    with_roles.insert("scp".into(), json!("read"));
    assert_eq!(
        p.check_claims(&with_roles, || vec!["DELETE".to_string()]),
        Err(JwtError::InsufficientClaims)
    );
    // JSON types compare exactly: "3" is not 3.
    let mut wrong_type = c.clone();
    wrong_type.insert("tier".into(), json!("3"));
    assert_eq!(
        p.check_claims(&wrong_type, || vec!["GET".to_string()]),
        Err(JwtError::InsufficientClaims)
    );
    wrong_type.insert("tier".into(), json!(true));
    assert_eq!(
        p.check_claims(&wrong_type, || vec!["GET".to_string()]),
        Ok(())
    );
}

#[test]
fn claims_to_headers_formats_and_skips_unsafe_values() {
    let p = policy_with(json!({"claims_to_headers": {
        "sub": "X-User-Id", "roles": "x-roles", "n": "x-n", "b": "x-b", "obj": "x-obj", "evil": "x-evil", "absent": "x-absent"
    }}));
    let c = json!({"sub": "u1", "roles": ["A", "B"], "n": 7, "b": false, "obj": {"a": 1}, "evil": "a\r\nx-admin: 1"});
    let mut headers = p.claim_headers(c.as_object().unwrap());
    headers.sort();
    assert_eq!(
        headers,
        vec![
            ("x-b".to_string(), "false".to_string()),
            ("x-n".to_string(), "7".to_string()),
            ("x-roles".to_string(), "A,B".to_string()),
            ("x-user-id".to_string(), "u1".to_string()),
        ]
    );
    let mut names: Vec<&str> = p.claim_header_names().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "x-absent",
            "x-b",
            "x-evil",
            "x-n",
            "x-obj",
            "x-roles",
            "x-user-id"
        ]
    );
}

// --- configuration ---------------------------------------------------------------------------

fn compile_err(cfg: Value) -> ConfigError {
    let cfg: JwtConfig = serde_json::from_value(cfg).unwrap();
    JwtPolicy::compile(&cfg, "apis[0].jwt", &|_| None).unwrap_err()
}

#[test]
fn config_errors_name_the_field() {
    let base = || json!({"issuers": [ISS], "audiences": [AUD], "algorithms": ["RS256"], "jwks": {"inline": jwks()}});
    let mut c = base();
    c["issuers"] = json!([]);
    assert_eq!(compile_err(c).path, "apis[0].jwt.issuers");
    let mut c = base();
    c["algorithms"] = json!(["RS256", "XS999"]);
    assert_eq!(compile_err(c).path, "apis[0].jwt.algorithms[1]");
    let mut c = base();
    c["algorithms"] = json!(["HS256"]);
    assert_eq!(compile_err(c).path, "apis[0].jwt.algorithms");
    let mut c = base();
    c["hmac_secret"] = json!({"value": "x".repeat(40)});
    assert_eq!(compile_err(c).path, "apis[0].jwt.hmac_secret");
    // HS-only policies need no JWKS, and refuse one (it would never be used).
    let mut c = base();
    c["algorithms"] = json!(["HS256"]);
    c["hmac_secret"] = json!({"value": "x".repeat(40)});
    assert_eq!(compile_err(c).path, "apis[0].jwt.jwks");
    let mut c = base();
    c.as_object_mut().unwrap().remove("jwks");
    assert_eq!(compile_err(c).path, "apis[0].jwt.jwks");
    let mut c = base();
    c["jwks"] = json!({"inline": {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}});
    assert_eq!(compile_err(c).path, "apis[0].jwt.jwks.inline");
    let mut c = base();
    c["jwks"] = json!({"cluster": "idp", "uri": "ftp://idp/keys"});
    assert_eq!(compile_err(c).path, "apis[0].jwt.jwks.uri");
    let mut c = base();
    c["jwks"] = json!({"cluster": "idp", "uri": "https://idp/keys", "inline": jwks()});
    assert_eq!(compile_err(c).path, "apis[0].jwt.jwks");
    let mut c = base();
    c["required_claims"] = json!([{"name": "roles"}]);
    assert_eq!(compile_err(c).path, "apis[0].jwt.required_claims[0]");
    let mut c = base();
    c["claims_to_headers"] = json!({"sub": "host"});
    assert_eq!(compile_err(c).path, "apis[0].jwt.claims_to_headers.sub");
    let mut c = base();
    c["algorithms"] = json!(["ES256"]); // no EC key in an RSA-only set
    c["jwks"] = json!({"inline": {"keys": [keys().rsa.jwk]}});
    assert_eq!(compile_err(c).path, "apis[0].jwt.jwks.inline");
}

// --- JWKS ------------------------------------------------------------------------------------

#[test]
fn jwks_parsing_keeps_only_signing_keys() {
    let k = keys();
    let mut enc = k.rsa2.jwk.clone();
    enc["use"] = json!("enc");
    let doc = json!({"keys": [enc, {"kty": "oct", "k": "c2VjcmV0", "kid": "s"}, {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}, k.rsa.jwk, {"garbage": true}]});
    let set = KeySet::from_jwks_value(&doc).unwrap();
    assert_eq!(set.len(), 1);
    assert_eq!(
        KeySet::from_jwks_json(b"not json").unwrap_err(),
        JwksError::NotJson
    );
    assert_eq!(
        KeySet::from_jwks_json(b"{}").unwrap_err(),
        JwksError::NoKeysArray
    );
    assert_eq!(
        KeySet::from_jwks_json(br#"{"keys": []}"#).unwrap_err(),
        JwksError::NoUsableKey
    );
    assert_eq!(
        KeySet::from_jwks_json(&vec![b' '; 300 * 1024]).unwrap_err(),
        JwksError::TooLarge
    );
}

#[test]
fn weak_or_invalid_keys_are_skipped_without_panicking() {
    let k = keys();
    let short_ed =
        json!({"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode([7u8; 16]), "kid": "e"});
    let off_curve = json!({"kty": "EC", "crv": "P-256", "x": URL_SAFE_NO_PAD.encode([1u8; 32]), "y": URL_SAFE_NO_PAD.encode([2u8; 32])});
    let short_x = json!({"kty": "EC", "crv": "P-256", "x": URL_SAFE_NO_PAD.encode([1u8; 31]), "y": URL_SAFE_NO_PAD.encode([2u8; 32])});
    let small_rsa = json!({"kty": "RSA", "n": URL_SAFE_NO_PAD.encode([0xffu8; 128]), "e": "AQAB"});
    let even_e = json!({"kty": "RSA", "n": k.rsa.jwk["n"], "e": URL_SAFE_NO_PAD.encode([2u8])});
    // y = 2 has no x on Ed25519: the point does not decode.
    let mut y2 = [0u8; 32];
    y2[0] = 2;
    let off_curve_ed = json!({"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(y2)});
    let off_curve_384 = json!({"kty": "EC", "crv": "P-384", "x": URL_SAFE_NO_PAD.encode([1u8; 48]), "y": URL_SAFE_NO_PAD.encode([2u8; 48])});
    for bad in [
        short_ed,
        off_curve,
        short_x,
        small_rsa,
        even_e,
        off_curve_ed,
        off_curve_384,
    ] {
        assert_eq!(
            KeySet::from_jwks_value(&json!({"keys": [bad.clone()]})).unwrap_err(),
            JwksError::NoUsableKey,
            "{bad}"
        );
    }
}

#[test]
fn discovery_cannot_downgrade_to_http() {
    let mut f = JwksFetcher::new("https://idp/.well-known/openid-configuration", 3600);
    f.poll(0);
    assert!(f
        .on_response(0, 200, br#"{"jwks_uri": "http://idp/keys"}"#)
        .is_err());
}

#[test]
fn discovery_document_gives_jwks_uri() {
    let doc =
        br#"{"issuer":"x","jwks_uri":"https://login.microsoftonline.com/t/discovery/v2.0/keys"}"#;
    assert_eq!(
        keys::jwks_uri_from_discovery(doc).unwrap(),
        "https://login.microsoftonline.com/t/discovery/v2.0/keys"
    );
    assert_eq!(
        keys::jwks_uri_from_discovery(br#"{"jwks_uri": "file:///etc/passwd"}"#),
        Err(JwksError::NoJwksUri)
    );
}

#[test]
fn fetcher_initial_fetch_refresh_backoff_and_last_good_keys() {
    let mut f = JwksFetcher::new("https://idp/keys", 300);
    assert_eq!(f.state(), FetchState::Uninitialised);
    assert_eq!(
        f.poll(100),
        Some(FetchStep::Jwks("https://idp/keys".into()))
    );
    assert_eq!(f.poll(101), None, "in flight");
    let body = serde_json::to_vec(&jwks()).unwrap();
    assert!(matches!(
        f.on_response(102, 200, &body),
        Ok(fetch::FetchResult::Keys(_))
    ));
    assert_eq!(f.state(), FetchState::Ready);
    assert_eq!(f.poll(200), None);
    assert!(f.poll(402).is_some(), "refresh after refresh_seconds");
    // The IdP is down: backoff 1, 2, 4 ... and the state stays Ready (last good keys kept).
    assert!(f.on_response(402, 500, b"").is_err());
    assert_eq!(f.state(), FetchState::Ready);
    assert_eq!(f.poll(402), None);
    assert!(f.poll(403).is_some());
    assert!(f.on_response(403, 503, b"").is_err());
    assert_eq!(f.poll(404), None);
    assert!(f.poll(405).is_some());
    f.on_failure(405);
    assert_eq!(f.poll(408), None);
    assert!(f.poll(409).is_some());
    // Recovery resets the backoff.
    assert!(f.on_response(409, 200, &body).is_ok());
    assert_eq!(f.failures(), 0);
}

#[test]
fn fetcher_backoff_is_capped_and_in_flight_fetches_time_out() {
    let mut f = JwksFetcher::new("https://idp/keys", 3600);
    let mut t = 0;
    for _ in 0..20 {
        while f.poll(t).is_none() {
            t += 1;
        }
        f.on_failure(t);
    }
    let start = t;
    while f.poll(t).is_none() {
        t += 1;
    }
    assert_eq!(t - start, fetch::BACKOFF_MAX_SECONDS);
    // No answer at all: after the timeout the fetch counts as failed and is retried.
    let mut f = JwksFetcher::new("https://idp/keys", 3600);
    assert!(f.poll(0).is_some());
    assert_eq!(f.poll(9), None);
    assert_eq!(f.poll(10), None, "timed out; backoff starts");
    assert!(f.poll(11).is_some());
}

#[test]
fn fetcher_unknown_kid_refresh_is_rate_limited() {
    let mut f = JwksFetcher::new("https://idp/keys", 3600);
    let body = serde_json::to_vec(&jwks()).unwrap();
    f.poll(0);
    f.on_response(0, 200, &body).unwrap();
    let mut fetches = 0;
    // 1000 junk kids over 10 seconds: at most one extra fetch.
    for i in 0..1000u64 {
        let now = 100 + i / 100;
        f.on_unknown_kid(now);
        if f.poll(now).is_some() {
            fetches += 1;
            f.on_response(now, 200, &body).unwrap();
        }
    }
    assert_eq!(fetches, 1);
    // After the window, one more is allowed.
    assert!(f.on_unknown_kid(100 + fetch::UNKNOWN_KID_REFRESH_SECONDS + 1));
}

#[test]
fn fetcher_follows_discovery() {
    let mut f = JwksFetcher::new(
        "https://idp/tenant/v2.0/.well-known/openid-configuration",
        3600,
    );
    assert!(matches!(f.poll(0), Some(FetchStep::Discovery(_))));
    let doc = br#"{"jwks_uri": "https://idp/tenant/discovery/v2.0/keys"}"#;
    assert!(matches!(
        f.on_response(0, 200, doc),
        Ok(fetch::FetchResult::Discovered)
    ));
    assert_eq!(
        f.poll(0),
        Some(FetchStep::Jwks(
            "https://idp/tenant/discovery/v2.0/keys".into()
        ))
    );
}

#[test]
fn split_uri_for_dispatch() {
    assert_eq!(
        fetch::split_uri("https://login.microsoftonline.com/t/v2.0/keys?x=1"),
        Some(("login.microsoftonline.com", "/t/v2.0/keys?x=1"))
    );
    assert_eq!(
        fetch::split_uri("http://127.0.0.1:8082"),
        Some(("127.0.0.1:8082", "/"))
    );
    assert_eq!(fetch::split_uri("ftp://x/y"), None);
    assert_eq!(fetch::split_uri("https:///y"), None);
}

// --- cache -----------------------------------------------------------------------------------

#[test]
fn cache_entries_round_trip_expire_and_detect_collisions() {
    let claims = claims().as_object().unwrap().clone();
    let d1 = [1u8; 32];
    let d2 = [2u8; 32];
    let bytes = cache::encode(&d1, NOW + 10, &claims).unwrap();
    assert_eq!(
        cache::decode(&bytes, &d1, NOW),
        Some((claims.clone(), NOW + 10))
    );
    assert_eq!(
        cache::decode(&bytes, &d2, NOW),
        None,
        "slot holds another token"
    );
    assert_eq!(
        cache::decode(&bytes, &d1, NOW + 10),
        None,
        "never served at or after exp"
    );
    assert_eq!(cache::decode(&bytes[..20], &d1, NOW), None);
    assert_eq!(cache::decode(b"", &d1, NOW), None);
    let mut big = claims.clone();
    big.insert(
        "blob".into(),
        json!("x".repeat(cache::MAX_CACHED_CLAIMS_BYTES)),
    );
    assert_eq!(cache::encode(&d1, NOW + 10, &big), None);
    assert!(cache::slot(&d1, 7) < 7);
    assert_eq!(cache::slot(&d1, 0), 0);
}
