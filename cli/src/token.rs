//! `gateguard token` mints development tokens, `gateguard jwks` publishes the matching public
//! key: what `make run`'s dev identity provider and the end-to-end tests use.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use gateguard_core::jwt::{JwtConfig, JwtPolicy, KeyFamily, KeySet};
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value};

#[derive(clap::Args)]
pub struct TokenArgs {
    /// Private key (PKCS#8 PEM; RSA for RS*/PS*, EC for ES*, Ed25519 for EdDSA), or the shared
    /// secret's file for HS*.
    #[arg(long)]
    key: PathBuf,
    /// Signing algorithm.
    #[arg(long, default_value = "RS256")]
    alg: String,
    /// `kid` header.
    #[arg(long)]
    kid: Option<String>,
    #[arg(long)]
    iss: Option<String>,
    /// Audience; repeat for an array.
    #[arg(long)]
    aud: Vec<String>,
    #[arg(long)]
    sub: Option<String>,
    /// Lifetime in seconds (sets `exp`; `iat` and `nbf` are now).
    #[arg(long, default_value_t = 3600)]
    ttl: i64,
    /// Extra claim `name=value`; the value is JSON if it parses (`roles=["A","B"]`, `n=1`),
    /// a string otherwise. Repeatable.
    #[arg(long = "claim")]
    claims: Vec<String>,
    /// Bind the token to this client key for DPoP (RFC 9449): `cnf.jkt` is the thumbprint of
    /// its public half (private key, PKCS#8 PEM; the client signs proofs with it).
    #[arg(long)]
    dpop_key: Option<PathBuf>,
    /// Algorithm of the --dpop-key (ES256, ES384, RS256, PS256 or EdDSA).
    #[arg(long, default_value = "ES256")]
    dpop_alg: String,
    /// Bind the token to this client certificate (RFC 8705): `cnf["x5t#S256"]` is its SHA-256
    /// thumbprint (PEM or DER).
    #[arg(long)]
    cnf_cert: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct DpopProofArgs {
    /// The client's private key (PKCS#8 PEM), the one the token's `cnf.jkt` names.
    #[arg(long)]
    key: PathBuf,
    /// ES256, ES384, RS256, PS256 or EdDSA.
    #[arg(long, default_value = "ES256")]
    alg: String,
    /// The request's method (`htm`).
    #[arg(long)]
    method: String,
    /// The request's URL (`htu`; a query or fragment is left out).
    #[arg(long)]
    url: String,
    /// The access token the proof goes with (`ath`).
    #[arg(long)]
    token: Option<String>,
    /// `jti`; random when left out. Every proof needs a new one.
    #[arg(long)]
    jti: Option<String>,
}

#[derive(clap::Args)]
pub struct JwksArgs {
    /// Private key (PKCS#8 PEM) whose public half to publish.
    #[arg(long)]
    key: PathBuf,
    #[arg(long, default_value = "RS256")]
    alg: String,
    #[arg(long)]
    kid: String,
}

fn algorithm(name: &str) -> Result<Algorithm, String> {
    name.parse::<Algorithm>()
        .map_err(|_| format!("unsupported algorithm {name:?}"))
}

fn encoding_key(path: &PathBuf, alg: Algorithm) -> Result<EncodingKey, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let key = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Ok(EncodingKey::from_secret(
            String::from_utf8_lossy(&bytes).trim_end().as_bytes(),
        )),
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&bytes),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&bytes),
        _ => EncodingKey::from_rsa_pem(&bytes),
    };
    key.map_err(|e| format!("{}: not a usable {alg:?} key: {e}", path.display()))
}

pub fn token(args: &TokenArgs) -> ExitCode {
    match mint(args) {
        Ok(t) => {
            println!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gateguard token: {e}");
            ExitCode::from(1)
        }
    }
}

fn mint(args: &TokenArgs) -> Result<String, String> {
    let alg = algorithm(&args.alg)?;
    let key = encoding_key(&args.key, alg)?;
    filter_would_verify(&args.key, alg, &key)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs() as i64;
    let mut claims = Map::new();
    if let Some(iss) = &args.iss {
        claims.insert("iss".into(), iss.clone().into());
    }
    match args.aud.as_slice() {
        [] => {}
        [one] => {
            claims.insert("aud".into(), one.clone().into());
        }
        many => {
            claims.insert("aud".into(), many.to_vec().into());
        }
    }
    if let Some(sub) = &args.sub {
        claims.insert("sub".into(), sub.clone().into());
    }
    claims.insert("iat".into(), now.into());
    claims.insert("nbf".into(), now.into());
    claims.insert("exp".into(), (now + args.ttl).into());
    for c in &args.claims {
        let (name, raw) = c
            .split_once('=')
            .ok_or_else(|| format!("--claim {c:?} is not name=value"))?;
        let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::from(raw));
        claims.insert(name.to_string(), value);
    }
    let mut cnf = Map::new();
    if let Some(path) = &args.dpop_key {
        let jwk = public_jwk(path, algorithm(&args.dpop_alg)?)?;
        let jkt = gateguard_core::jwt::dpop::jwk_thumbprint(&jwk)
            .ok_or_else(|| format!("{}: no RFC 7638 thumbprint for this key", path.display()))?;
        cnf.insert("jkt".into(), jkt.into());
    }
    if let Some(path) = &args.cnf_cert {
        let bytes =
            std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let der = gateguard_core::client_cert::pem_or_der_to_der(&bytes).map_err(|e| {
            format!(
                "{}: not a PEM or DER certificate: {}",
                path.display(),
                e.reason()
            )
        })?;
        let digest = <sha2::Sha256 as sha2::Digest>::digest(&der);
        cnf.insert("x5t#S256".into(), URL_SAFE_NO_PAD.encode(digest).into());
    }
    if !cnf.is_empty() {
        claims.insert("cnf".into(), Value::Object(cnf));
    }
    let mut header = Header::new(alg);
    header.kid = args.kid.clone();
    jsonwebtoken::encode(&header, &claims, &key).map_err(|e| e.to_string())
}

/// Refuses a key the filter would not verify tokens with, by the filter's own rules: an HMAC
/// secret goes through the policy compiler (as a `jwt.hmac_secret`), a public key through the
/// JWKS parser (RSA 2048-4096 bits, the curves it knows...).
fn filter_would_verify(path: &Path, alg: Algorithm, key: &EncodingKey) -> Result<(), String> {
    let refused = |reason: String| {
        format!(
            "{}: the filter would refuse this {alg:?} key: {reason}",
            path.display()
        )
    };
    if KeyFamily::for_algorithm(alg) == KeyFamily::Hmac {
        let bytes =
            std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let secret = String::from_utf8_lossy(&bytes).trim_end().to_string();
        let config: JwtConfig = serde_json::from_value(serde_json::json!({
            "issuers": ["token"], "audiences": ["token"], "algorithms": [format!("{alg:?}")],
            "hmac_secret": {"value": secret},
        }))
        .map_err(|e| e.to_string())?;
        return JwtPolicy::compile(&config, "jwt", &|_| None)
            .map(|_| ())
            .map_err(|e| refused(e.reason));
    }
    let jwk = Jwk::from_encoding_key(key, alg).map_err(|e| refused(e.to_string()))?;
    let jwks = serde_json::json!({ "keys": [jwk] });
    let keys = KeySet::from_jwks_value(&jwks).map_err(|e| refused(e.reason()))?;
    if !keys.has_family(KeyFamily::for_algorithm(alg)) {
        return Err(refused("not a key for this algorithm".into()));
    }
    Ok(())
}

/// The public JWK of a private key file, as a JSON object.
fn public_jwk(path: &PathBuf, alg: Algorithm) -> Result<Value, String> {
    let key = encoding_key(path, alg)?;
    let jwk = Jwk::from_encoding_key(&key, alg).map_err(|e| e.to_string())?;
    serde_json::to_value(&jwk).map_err(|e| e.to_string())
}

pub fn dpop_proof(args: &DpopProofArgs) -> ExitCode {
    match proof(args) {
        Ok(p) => {
            println!("{p}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gateguard dpop-proof: {e}");
            ExitCode::from(1)
        }
    }
}

fn proof(args: &DpopProofArgs) -> Result<String, String> {
    let alg = algorithm(&args.alg)?;
    if !gateguard_core::jwt::dpop::PROOF_ALGORITHMS.contains(&alg) {
        return Err(format!(
            "{:?} cannot sign a DPoP proof (use {})",
            args.alg,
            gateguard_core::jwt::dpop::PROOF_ALGS_TEXT
        ));
    }
    let key = encoding_key(&args.key, alg)?;
    let jwk = Jwk::from_encoding_key(&key, alg).map_err(|e| e.to_string())?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?;
    let jti = match &args.jti {
        Some(j) => j.clone(),
        None => {
            let mut bytes = [0u8; 16];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                .map_err(|_| "no randomness for the jti".to_string())?;
            URL_SAFE_NO_PAD.encode(bytes)
        }
    };
    let htu = args.url.split(['?', '#']).next().unwrap_or_default();
    let mut claims = Map::new();
    claims.insert("htm".into(), args.method.clone().into());
    claims.insert("htu".into(), htu.into());
    claims.insert("iat".into(), now.as_secs().into());
    claims.insert("jti".into(), jti.into());
    if let Some(token) = &args.token {
        let digest = <sha2::Sha256 as sha2::Digest>::digest(token.as_bytes());
        claims.insert("ath".into(), URL_SAFE_NO_PAD.encode(digest).into());
    }
    let mut header = Header::new(alg);
    header.typ = Some("dpop+jwt".into());
    header.jwk = Some(jwk);
    jsonwebtoken::encode(&header, &claims, &key).map_err(|e| e.to_string())
}

pub fn jwks(args: &JwksArgs) -> ExitCode {
    let result = algorithm(&args.alg).and_then(|alg| {
        let key = encoding_key(&args.key, alg)?;
        let mut jwk = Jwk::from_encoding_key(&key, alg).map_err(|e| e.to_string())?;
        jwk.common.key_id = Some(args.kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        jwk.common.key_algorithm = KeyAlgorithm::from_str_opt(&args.alg);
        serde_json::to_string_pretty(&JwkSet { keys: vec![jwk] }).map_err(|e| e.to_string())
    });
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gateguard jwks: {e}");
            ExitCode::from(1)
        }
    }
}

trait FromStrOpt: Sized {
    fn from_str_opt(s: &str) -> Option<Self>;
}

impl FromStrOpt for KeyAlgorithm {
    fn from_str_opt(s: &str) -> Option<Self> {
        serde_json::from_value(Value::from(s)).ok()
    }
}
