//! The importers, `gateguard import-env` and `gateguard import-apim`: each builds the filter's own
//! raw policy types (`gateguard_core::config::PolicyConfig`), and both end alike: the document is
//! compiled by the filter's compiler, then written whole or not at all. A failure is one of three
//! exit statuses.

pub mod apim;
pub mod env;
mod output;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use gateguard_core::config::{ApiConfig, PolicyConfig};
use serde::Serialize;

/// How an OpenID Connect Discovery URL ends: its issuer followed by this path.
pub const DISCOVERY_SUFFIX: &str = "/.well-known/openid-configuration";

/// Why an import wrote nothing; each kind is one exit status.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// Invalid input, flags or result: exit 1.
    Invalid(String),
    /// A file or standard output cannot be read or written: exit 2.
    Io(String),
    /// Something could not be converted exactly (import-apim): exit 3.
    NotConverted(String),
}

impl Failure {
    /// The exit status when something could not be converted.
    pub const NOT_CONVERTED_STATUS: u8 = 3;

    fn status(&self) -> u8 {
        match self {
            Failure::Invalid(_) => 1,
            Failure::Io(_) => 2,
            Failure::NotConverted(_) => Self::NOT_CONVERTED_STATUS,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Invalid(m) | Failure::Io(m) | Failure::NotConverted(m) => f.write_str(m),
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Invalid(message)
    }
}

/// The exit status of `gateguard <command>`, its error (if any) on standard error.
pub fn exit_status(command: &str, result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("gateguard {command}: error: {failure}");
            ExitCode::from(failure.status())
        }
    }
}

/// A file's text; a file that cannot be read is exit 2.
pub fn read_text(path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map_err(|e| Failure::Io(format!("{}: cannot read: {e}", path.display())))
}

/// Stands in for every environment variable a generated policy reads while it is compiled here:
/// the real values are in Envoy's environment, and the filter checks them when it loads the
/// policy. Long enough for an HMAC secret (32 bytes at least).
pub fn placeholder_env(_name: &str) -> Option<String> {
    Some("x".repeat(40))
}

/// A policy of `apis`, with the schema reference editors use; everything else at its default.
pub fn policy(apis: Vec<ApiConfig>) -> PolicyConfig {
    PolicyConfig {
        schema: Some("./gateguard.schema.json".into()),
        apis,
        listener: None,
        upstream: None,
        client_ip: Default::default(),
        replay_cache: Default::default(),
        replay_store: Default::default(),
        token_cache: Default::default(),
    }
}

/// Pretty-printed JSON, newline-terminated.
pub fn to_text(document: &impl Serialize) -> Result<String, Failure> {
    let mut text = serde_json::to_string_pretty(document)
        .map_err(|e| format!("cannot serialise the policy: {e}"))?;
    text.push('\n');
    Ok(text)
}

/// Where the policy goes, for messages.
pub fn target(out: Option<&PathBuf>) -> String {
    out.map_or_else(
        || "standard output".to_string(),
        |p| p.display().to_string(),
    )
}

/// Compiles `text` as the filter will (its errors shown through `mask`), then writes it to `out`
/// (atomically; owner-only when it holds a `secret`) or to standard output.
pub fn compile_and_write(
    text: &str,
    out: Option<&PathBuf>,
    secret: bool,
    mask: &dyn Fn(&str) -> String,
) -> Result<(), Failure> {
    if let Err(e) = gateguard_core::parse_policy(text.as_bytes(), &placeholder_env) {
        let e = mask(&e.to_string());
        return Err(format!("the generated policy does not validate: {e}").into());
    }
    match out {
        Some(path) => output::write_policy(path, text, secret)
            .map_err(|e| Failure::Io(format!("{}: cannot write: {e}", path.display()))),
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(|e| Failure::Io(format!("cannot write to standard output: {e}")))
        }
    }
}
