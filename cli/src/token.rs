//! `gateguard token` mints development tokens, `gateguard jwks` publishes the matching public
//! key: what `make run`'s dev identity provider and the end-to-end tests use.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

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
    let mut header = Header::new(alg);
    header.kid = args.kid.clone();
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
