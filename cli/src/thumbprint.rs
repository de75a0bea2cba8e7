//! `gateguard thumbprint`: the SHA-1 and SHA-256 thumbprints of a certificate file (PEM, DER or
//! PKCS#12), with subject, issuer and validity, to fill in `client_certificate.thumbprints`.

use std::path::PathBuf;
use std::process::ExitCode;

use gateguard_core::client_cert::{describe_der, pem_or_der_to_der, CertificateSummary};

#[derive(clap::Args)]
pub struct Args {
    /// Certificate file: .pem/.crt/.cer (PEM or DER) or .pfx/.p12 (PKCS#12).
    file: PathBuf,
    /// PKCS#12 password; read from GATEGUARD_PFX_PASSWORD when omitted (keeps it out of
    /// shell history), empty if neither is set.
    #[arg(long)]
    password: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &Args) -> ExitCode {
    let bytes = match std::fs::read(&args.file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", args.file.display());
            return ExitCode::from(2);
        }
    };
    let ders = match certificates(&bytes, args) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{}: {e}", args.file.display());
            return ExitCode::from(1);
        }
    };
    let mut summaries = Vec::new();
    for der in &ders {
        match describe_der(der) {
            Ok(s) => summaries.push(s),
            Err(e) => {
                eprintln!("{}: not a certificate: {}", args.file.display(), e.reason());
                return ExitCode::from(1);
            }
        }
    }
    if args.json {
        let list: Vec<_> = summaries.iter().map(to_json).collect();
        println!("{}", serde_json::Value::Array(list));
    } else {
        for (i, s) in summaries.iter().enumerate() {
            if i > 0 {
                println!();
            }
            println!("subject:     {}", s.subject);
            println!("issuer:      {}", s.issuer);
            println!("not before:  {}", s.not_before_rfc3339);
            println!("not after:   {}", s.not_after_rfc3339);
            println!("sha1:        {}", s.sha1);
            println!("sha256:      {}", s.sha256);
        }
    }
    ExitCode::SUCCESS
}

fn to_json(s: &CertificateSummary) -> serde_json::Value {
    serde_json::json!({
        "subject": s.subject, "issuer": s.issuer,
        "not_before": s.not_before_rfc3339, "not_after": s.not_after_rfc3339,
        "sha1": s.sha1.to_string(), "sha256": s.sha256.to_string(),
    })
}

fn is_pkcs12(path: &std::path::Path) -> bool {
    matches!(
        path.extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("pfx" | "p12")
    )
}

/// DER certificates in the file: one for PEM/DER, the end-entity first for PKCS#12.
fn certificates(bytes: &[u8], args: &Args) -> Result<Vec<Vec<u8>>, String> {
    if !is_pkcs12(&args.file) {
        return pem_or_der_to_der(bytes)
            .map(|d| vec![d])
            .map_err(|e| format!("not a PEM or DER certificate: {}", e.reason()));
    }
    let password = args
        .password
        .clone()
        .or_else(|| std::env::var("GATEGUARD_PFX_PASSWORD").ok())
        .unwrap_or_default();
    let archive = p12_keystore::Pkcs12Archive::from_pkcs12(bytes, &password)
        .map_err(|e| format!("cannot open PKCS#12 (wrong password?): {e}"))?;
    // Certificates that belong to a private key (the client certificate) come first.
    let mut certs: Vec<_> = archive.certs.iter().collect();
    certs.sort_by_key(|c| c.local_key_id.is_none());
    if certs.is_empty() {
        return Err("the PKCS#12 file holds no certificate".into());
    }
    Ok(certs.iter().map(|c| c.cert.as_der().to_vec()).collect())
}
