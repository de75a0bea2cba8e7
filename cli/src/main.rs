//! `gateguard`: validate policies before they reach Envoy, and the small tools operators need
//! around them.

mod import;
mod render;
mod thumbprint;
mod token;
mod validate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "gateguard",
    version,
    about = "API-gateway security policies for Envoy: validate, render and operate gateguard policies",
    long_about = "gateguard enforces CORS, IP filters, client certificates, subscription keys, JWT \
                  validation and replay detection inside Envoy as a proxy-wasm filter. This tool \
                  checks policy files with the filter's own code before deployment."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check policy files exactly as the filter will. Errors show the offending lines, with
    /// values that may be secrets (hmac_secret, inject_headers) as ***. Exit 0 if all are
    /// valid, 1 if any is not, 2 if a file cannot be read.
    Validate(validate::Args),
    /// Print a complete Envoy configuration that runs gateguard with a policy.
    Render(Box<render::Args>),
    /// Print SHA-1 and SHA-256 thumbprints, subject, issuer and validity of a certificate
    /// (PEM, DER or PKCS#12 .pfx/.p12).
    Thumbprint(thumbprint::Args),
    /// Mint a development JWT signed with a local private key (claims from flags).
    Token(Box<token::TokenArgs>),
    /// Print the JWKS (public key set) for a local private key, for a dev identity provider.
    Jwks(token::JwksArgs),
    /// Print a DPoP proof (RFC 9449) for one request: a JWT the client signs with the key its
    /// token is bound to (`gateguard token --dpop-key`), sent in the `DPoP` header.
    DpopProof(token::DpopProofArgs),
    /// Convert the portal backend's settings into a policy.
    ///
    /// Reads VALID_INPUT_PATHS, API_KEY_VALUES, TOKEN_PROTECTED_PATHS_WITH_IP and
    /// TOKEN_PROTECTED_PATHS_WITHOUT_IP (semicolon-separated; API_KEY_VALUES[i] belongs to
    /// VALID_INPUT_PATHS[i]) from the environment, a .env file or a JSON file (including App
    /// Service's exported app settings), and writes an equivalent policy: one API per path, its
    /// key injected upstream (from an environment variable GATEGUARD_KEY_<NAME>, listed on
    /// standard error), replay protection per the two lists. Protected paths need JWT
    /// validation: --issuer, --audience, --jwks-uri or --openid-config, and --jwks-cluster.
    /// The output is checked with the filter's own compiler. Settings it cannot read exactly
    /// (a name that differs from one only in case or spelling, a setting given twice, a ${VAR}
    /// or Key Vault reference) are errors, never skipped. Nothing is written on an error (an
    /// existing --out file is left as it was). Exit 1 on an error in the settings or flags, 2
    /// if a file cannot be read or written.
    ImportEnv(import::env::Args),
    /// Convert an Azure API Management policy document (XML) into a policy with one API.
    ///
    /// Fails closed: it never writes a policy less strict than its input. Converts <cors>,
    /// <ip-filter> (address ranges become CIDRs), <validate-jwt> (openid-config, n/e keys, an
    /// HMAC key (HS256, with or without RSA keys), audiences, issuers, required-claims),
    /// <check-header> on Ocp-Apim-Subscription-Key (keys stored as SHA-256) and on any other
    /// header (a header rule), the client-certificate <choose> pattern,
    /// <validate-client-certificate>, request <set-header> (a {{named value}} header becomes an
    /// environment variable), and <rate-limit>, <rate-limit-by-key>, <quota> and <quota-by-key>
    /// counted by subscription, client IP or token subject. Named values
    /// and ${placeholders} elsewhere are filled in from --named-values. Lists every element on
    /// standard error as converted, left out or not converted, with its line. Exit 0 when the
    /// policy was written; 3 when an element could not be converted exactly (an unknown inbound
    /// policy, a check inside <choose>, a placeholder without a value...): nothing is written
    /// and an existing --out file is left as it was; 1 for invalid XML, flags or
    /// --named-values file, or a result the filter would refuse; 2 if a file cannot be read or
    /// written.
    ImportApim(import::apim::Args),
    /// Print the JSON Schema of policy documents (policies/gateguard.schema.json), generated
    /// from the filter's own configuration types.
    Schema,
    /// Print the SHA-256 of a subscription key, for `subscription_key.keys_sha256`. Exit 1 for
    /// a key the filter could never accept: empty, only whitespace, or with whitespace around it.
    HashKey {
        /// The key; reads one line from standard input when omitted (keeps it out of shell history).
        key: Option<String>,
    },
}

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = Cli::parse();
    match cli.command {
        Command::Validate(args) => validate::run(&args),
        Command::Render(args) => render::run(&args),
        Command::Schema => {
            let mut schema = schemars::schema_for!(gateguard_core::config::PolicyConfig);
            schema.insert("title".into(), "gateguard policy".into());
            schema.insert(
                "description".into(),
                "One gateway's security policy: the configuration of the gateguard Envoy filter. \
                 See docs/policy.md."
                    .into(),
            );
            match serde_json::to_string_pretty(&schema) {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("gateguard schema: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Thumbprint(args) => thumbprint::run(&args),
        Command::Token(args) => token::token(&args),
        Command::Jwks(args) => token::jwks(&args),
        Command::DpopProof(args) => token::dpop_proof(&args),
        Command::ImportEnv(args) => import::env::run(&args),
        Command::ImportApim(args) => import::apim::run(&args),
        Command::HashKey { key } => {
            let key = match key {
                Some(k) => k,
                None => {
                    let mut line = String::new();
                    if std::io::stdin().read_line(&mut line).is_err() {
                        eprintln!("gateguard: could not read a key from standard input");
                        return ExitCode::from(2);
                    }
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            if let Err(reason) = never_accepted(&key) {
                eprintln!("gateguard hash-key: {reason}");
                return ExitCode::from(1);
            }
            println!("{}", gateguard_core::subscription_key::hash_key(&key));
            ExitCode::SUCCESS
        }
    }
}

/// Why the filter could never accept `key`: it trims what a client sends in the key header and
/// takes an empty key as no key (docs/policy.md, "Subscription keys").
fn never_accepted(key: &str) -> Result<(), &'static str> {
    if key.trim().is_empty() {
        Err("the key is empty or only whitespace: the filter takes that as no key at all")
    } else if key.trim() != key {
        Err("the key starts or ends with whitespace: the filter trims a key header, so this hash would never match")
    } else {
        Ok(())
    }
}

/// Output to a closed pipe (`gateguard validate ... | head -1`) ends the process quietly, as it
/// ends `cat` or `grep`: by SIGPIPE, status 141 in a shell. Rust ignores SIGPIPE by default, and
/// every `println!` after the reader left would panic with "failed printing to stdout".
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: before any thread or output exists; SIG_DFL is a valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
