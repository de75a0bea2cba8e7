//! Turning what a client or a proxy presented (PEM, URL-encoded PEM, base64 DER, DER) into one
//! parsed certificate. Every path is bounded and returns `Malformed` instead of panicking.

use std::fmt;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::nom::Parser;
use x509_parser::prelude::X509CertificateParser;

use super::thumbprint::Thumbprint;

/// Largest certificate input accepted from a request (header or connection attribute). Client
/// certificates are a few KiB; anything bigger is refused before decoding.
pub const MAX_INPUT_BYTES: usize = 64 * 1024;

const PEM_BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
const PEM_END: &[u8] = b"-----END CERTIFICATE-----";
const ANY_PEM_BEGIN: &[u8] = b"-----BEGIN ";

/// Why presented bytes are not a certificate. Never carries the bytes themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    TooLarge,
    /// PEM armour of something else (a key, a CSR) or no armour where one is required.
    NoCertificatePem,
    /// A BEGIN line without its END line.
    TruncatedPem,
    BadBase64,
    BadPercentEncoding,
    /// The bytes are not an X.509 certificate in DER.
    BadDer,
    /// A certificate followed by extra bytes: the thumbprint would be ambiguous.
    TrailingData,
    XfccSyntax,
    /// The header came more than once.
    DuplicateHeader,
    /// An XFCC element with neither `Cert=` nor `Hash=`.
    XfccNoCertificate,
    /// XFCC `Hash=` is not 64 hex digits.
    XfccBadHash,
    /// XFCC `Hash=` and `Cert=` disagree.
    XfccHashMismatch,
}

impl Malformed {
    pub fn reason(&self) -> &'static str {
        match self {
            Malformed::TooLarge => "certificate input too large",
            Malformed::NoCertificatePem => "no PEM certificate",
            Malformed::TruncatedPem => "truncated PEM certificate",
            Malformed::BadBase64 => "bad base64 in certificate",
            Malformed::BadPercentEncoding => "bad URL encoding in certificate",
            Malformed::BadDer => "not a DER X.509 certificate",
            Malformed::TrailingData => "extra bytes after the certificate",
            Malformed::XfccSyntax => "malformed x-forwarded-client-cert header",
            Malformed::DuplicateHeader => "certificate header sent more than once",
            Malformed::XfccNoCertificate => "x-forwarded-client-cert element has no Cert or Hash",
            Malformed::XfccBadHash => "x-forwarded-client-cert Hash is not a SHA-256 hex digest",
            Malformed::XfccHashMismatch => "x-forwarded-client-cert Hash does not match its Cert",
        }
    }
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for Malformed {}

/// What `gateguard thumbprint` prints, and what operators copy into a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSummary {
    pub sha1: Thumbprint,
    pub sha256: Thumbprint,
    /// x509-parser's rendering, in DER order, e.g. `C=US, O=Contoso, CN=apim-client`.
    pub subject: String,
    pub issuer: String,
    /// Unix seconds; negative for dates before 1970.
    pub not_before: i64,
    pub not_after: i64,
    /// RFC 3339 in UTC, e.g. `2026-01-31T00:00:00Z`.
    pub not_before_rfc3339: String,
    pub not_after_rfc3339: String,
}

/// Describes one DER certificate (exactly one: trailing bytes are refused).
pub fn describe_der(der: &[u8]) -> Result<CertificateSummary, Malformed> {
    let cert = parse_der(der)?;
    let validity = cert.validity();
    Ok(CertificateSummary {
        sha1: Thumbprint::sha1_of(der),
        sha256: Thumbprint::sha256_of(der),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        not_before_rfc3339: rfc3339(validity.not_before.timestamp()),
        not_after_rfc3339: rfc3339(validity.not_after.timestamp()),
    })
}

/// A certificate file's DER: the first `BEGIN CERTIFICATE` block of a PEM file (other blocks,
/// such as a key before it, are skipped), or the bytes themselves when they are DER.
pub fn pem_or_der_to_der(bytes: &[u8]) -> Result<Vec<u8>, Malformed> {
    // A file is the operator's own: if it is not DER, any text before the PEM block is fine.
    if is_der(bytes) && parse_der(bytes).is_ok() {
        return Ok(bytes.to_vec());
    }
    if !contains(bytes, ANY_PEM_BEGIN) {
        return parse_der(bytes).map(|_| bytes.to_vec());
    }
    let der = pem_to_der(bytes)?;
    parse_der(&der)?;
    Ok(der)
}

/// Parses exactly one certificate. Extensions are not deep-parsed: the checks never read them,
/// and an odd extension must not make a listed certificate unusable.
pub(crate) fn parse_der(der: &[u8]) -> Result<X509Certificate<'_>, Malformed> {
    let mut parser = X509CertificateParser::new().with_deep_parse_extensions(false);
    match parser.parse(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(Malformed::TrailingData),
        Err(_) => Err(Malformed::BadDer),
    }
}

/// The `connection.peer_certificate` attribute: a PEM that Envoy documents as URL-encoded but
/// sends as plain text in 1.40; accept both, and raw DER in case a host passes bytes.
pub(crate) fn connection_to_der(input: &[u8]) -> Result<Vec<u8>, Malformed> {
    check_size(input)?;
    if is_der(input) {
        Ok(input.to_vec())
    } else if contains(input, ANY_PEM_BEGIN) {
        pem_to_der(input)
    } else if input.contains(&b'%') {
        let decoded = percent_decode(input)?;
        if contains(&decoded, ANY_PEM_BEGIN) {
            pem_to_der(&decoded)
        } else {
            Err(Malformed::NoCertificatePem)
        }
    } else {
        Err(Malformed::NoCertificatePem)
    }
}

/// `X-ARR-ClientCert`: base64 DER as Azure App Service sends it; PEM armour, line breaks and
/// missing padding are tolerated.
pub(crate) fn arr_to_der(input: &str) -> Result<Vec<u8>, Malformed> {
    check_size(input.as_bytes())?;
    if contains(input.as_bytes(), ANY_PEM_BEGIN) {
        pem_to_der(input.as_bytes())
    } else {
        base64_decode(input.as_bytes())
    }
}

/// XFCC `Cert=`: URL-encoded PEM.
pub(crate) fn xfcc_cert_to_der(value: &str) -> Result<Vec<u8>, Malformed> {
    let decoded = percent_decode(value.as_bytes())?;
    if contains(&decoded, ANY_PEM_BEGIN) {
        pem_to_der(&decoded)
    } else {
        Err(Malformed::NoCertificatePem)
    }
}

pub(crate) fn check_size(input: &[u8]) -> Result<(), Malformed> {
    if input.len() > MAX_INPUT_BYTES {
        Err(Malformed::TooLarge)
    } else {
        Ok(())
    }
}

fn pem_to_der(text: &[u8]) -> Result<Vec<u8>, Malformed> {
    let start = find(text, PEM_BEGIN).ok_or(Malformed::NoCertificatePem)?;
    let body = text
        .get(start..)
        .and_then(|rest| rest.get(PEM_BEGIN.len()..))
        .ok_or(Malformed::TruncatedPem)?;
    let end = find(body, PEM_END).ok_or(Malformed::TruncatedPem)?;
    base64_decode(body.get(..end).ok_or(Malformed::TruncatedPem)?)
}

fn base64_decode(text: &[u8]) -> Result<Vec<u8>, Malformed> {
    // Padding is optional because some proxies strip it; the alphabet is the standard one.
    const LIBERAL: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let compact: Vec<u8> = text
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if compact.is_empty() {
        return Err(Malformed::BadBase64);
    }
    LIBERAL.decode(compact).map_err(|_| Malformed::BadBase64)
}

fn percent_decode(input: &[u8]) -> Result<Vec<u8>, Malformed> {
    // percent_encoding passes malformed escapes through; refuse them so garbage is not hashed.
    let mut rest = input;
    while let Some(pos) = rest.iter().position(|b| *b == b'%') {
        let after = rest.get(pos..).and_then(|r| r.get(1..)).unwrap_or_default();
        let ok = after
            .get(..2)
            .is_some_and(|pair| pair.iter().all(u8::is_ascii_hexdigit));
        if !ok {
            return Err(Malformed::BadPercentEncoding);
        }
        rest = after.get(2..).unwrap_or_default();
    }
    Ok(percent_encoding::percent_decode(input).collect())
}

/// DER is tried first: a DER certificate may carry PEM-looking text in a name, and must not be
/// read as the certificate that text contains. Envoy's PEM starts with `-----` or `%2D`, never
/// with byte 0x30 (a DER SEQUENCE).
fn is_der(bytes: &[u8]) -> bool {
    bytes.first() == Some(&0x30)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// RFC 3339 in UTC from unix seconds. A certificate's dates lie in years 0000-9999, all RFC 3339
/// can write; any other instant is written as its unix seconds.
pub fn rfc3339(unix_seconds: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix_seconds)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| unix_seconds.to_string())
}
