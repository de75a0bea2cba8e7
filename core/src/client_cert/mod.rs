//! Client-certificate check (docs/policy.md, "Client certificate"): the gateway-side equivalent of
//! APIM's `context.Request.Certificate.Thumbprint` policy, plus validity dates and optional
//! subject/issuer names.
//!
//! Pure code: the adapter collects what Envoy presented into [`PresentedCertificates`] and passes
//! the clock; [`ClientCertPolicy::check`] returns the accepted certificate or a [`CertError`],
//! which the adapter maps to 403 "Invalid client certificate".

mod decode;
mod dn;
mod thumbprint;
mod xfcc;

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;

use std::fmt;

use serde::Deserialize;

use crate::error::{index, join, ConfigError};

pub use decode::{
    describe_der, pem_or_der_to_der, rfc3339, CertificateSummary, Malformed, MAX_INPUT_BYTES,
};
pub use dn::{DistinguishedName, DnError};
pub use thumbprint::{Thumbprint, ThumbprintError};

use xfcc::Extracted;

/// `client_certificate` as written in a policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct ClientCertConfig {
    pub thumbprints: Vec<String>,
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "crate::serialize::is_default_sources")
    )]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default = "default_sources")]
    pub sources: Vec<String>,
    #[serde(default = "default_true")]
    pub check_validity: bool,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub subject: Option<String>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub issuer: Option<String>,
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "crate::serialize::is_default_warn_expiry_days")
    )]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default = "default_warn_expiry_days")]
    pub warn_expiry_days: u32,
}

fn default_sources() -> Vec<String> {
    vec![CertSource::Connection.name().to_string()]
}

fn default_true() -> bool {
    true
}

fn default_warn_expiry_days() -> u32 {
    30
}

/// Where a client certificate can come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CertSource {
    /// The TLS peer certificate of the connection Envoy terminated.
    Connection,
    /// Envoy's `x-forwarded-client-cert` header, last element only.
    Xfcc,
    /// `x-arr-clientcert`: base64 DER, as Azure App Service forwards it.
    Arr,
}

impl CertSource {
    pub const ALL: [CertSource; 3] = [CertSource::Connection, CertSource::Xfcc, CertSource::Arr];

    /// The name used in policies (and, for header sources, the lower-case header name).
    pub fn name(&self) -> &'static str {
        match self {
            CertSource::Connection => "connection",
            CertSource::Xfcc => "x-forwarded-client-cert",
            CertSource::Arr => "x-arr-clientcert",
        }
    }

    pub fn parse(name: &str) -> Option<CertSource> {
        CertSource::ALL.into_iter().find(|s| s.name() == name)
    }

    pub fn header_name(&self) -> Option<&'static str> {
        match self {
            CertSource::Connection => None,
            CertSource::Xfcc | CertSource::Arr => Some(self.name()),
        }
    }
}

impl fmt::Display for CertSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the adapter collected for one request. `None`, empty and whitespace-only all mean "not
/// presented".
#[derive(Debug, Clone, Copy, Default)]
pub struct PresentedCertificates<'a> {
    /// Envoy's `connection.peer_certificate` attribute: a PEM, plain or URL-encoded.
    pub connection: Option<&'a [u8]>,
    /// The `x-forwarded-client-cert` header value.
    pub xfcc: Option<&'a str>,
    /// The `x-arr-clientcert` header value.
    pub arr: Option<&'a str>,
}

/// A certificate the policy accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedCertificate {
    pub source: CertSource,
    /// Lower-case hex SHA-256 of the DER: a stable key for "warn once per certificate per day".
    pub sha256_hex: String,
    /// Unix seconds (0 for dates before 1970). `None` only for an XFCC `Hash=`-only element
    /// accepted with `check_validity: false`: there are no dates to read.
    pub not_after: Option<u64>,
    /// The certificate expires within `warn_expiry_days` of `now` (or has already expired, when
    /// `check_validity` is off).
    pub expires_within_warning: bool,
    /// x509-parser's rendering of the subject, for the expiry warning log; `None` when hash-only.
    pub subject: Option<String>,
}

/// Why a request's client certificate was refused. All of them mean 403
/// "Invalid client certificate"; [`CertError::reason`] is for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertError {
    /// No configured source yielded a certificate.
    Missing,
    /// The first source that yielded something did not hold a usable certificate.
    Unparseable {
        source: CertSource,
        why: Malformed,
    },
    UnknownThumbprint,
    Expired,
    NotYetValid,
    SubjectMismatch,
    IssuerMismatch,
    /// The XFCC element carried only `Hash=`, but the policy needs the certificate itself
    /// (`check_validity`, `subject` or `issuer`).
    HashOnlyInsufficient,
}

impl CertError {
    /// A fixed, body-free explanation for logs.
    pub fn reason(&self) -> &'static str {
        match self {
            CertError::Missing => "no client certificate",
            CertError::Unparseable { why, .. } => why.reason(),
            CertError::UnknownThumbprint => "thumbprint not listed",
            CertError::Expired => "certificate expired",
            CertError::NotYetValid => "certificate not yet valid",
            CertError::SubjectMismatch => "subject does not match",
            CertError::IssuerMismatch => "issuer does not match",
            CertError::HashOnlyInsufficient => {
                "x-forwarded-client-cert has only Hash, policy needs the certificate"
            }
        }
    }

    /// The source the refused certificate came from, when one did.
    pub fn source(&self) -> Option<CertSource> {
        match self {
            CertError::Unparseable { source, .. } => Some(*source),
            _ => None,
        }
    }
}

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.source() {
            Some(source) => write!(f, "{source}: {}", self.reason()),
            None => f.write_str(self.reason()),
        }
    }
}

impl std::error::Error for CertError {}

/// A compiled `client_certificate` policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertPolicy {
    thumbprints: Vec<Thumbprint>,
    sources: Vec<CertSource>,
    check_validity: bool,
    subject: Option<DistinguishedName>,
    issuer: Option<DistinguishedName>,
    warn_expiry_seconds: u64,
}

impl ClientCertPolicy {
    /// `path` is the JSON path of the `client_certificate` object, e.g.
    /// `apis[0].client_certificate`.
    pub fn compile(cfg: &ClientCertConfig, path: &str) -> Result<ClientCertPolicy, ConfigError> {
        let thumbprints_path = join(path, "thumbprints");
        if cfg.thumbprints.is_empty() {
            return Err(ConfigError::new(
                thumbprints_path,
                "empty: list at least one SHA-1 or SHA-256 thumbprint",
            ));
        }
        let mut thumbprints: Vec<Thumbprint> = Vec::with_capacity(cfg.thumbprints.len());
        for (i, text) in cfg.thumbprints.iter().enumerate() {
            let at = index(&thumbprints_path, i);
            let thumbprint =
                Thumbprint::parse(text).map_err(|e| ConfigError::new(&at, e.to_string()))?;
            // A duplicate is usually a paste where the rotated certificate was meant: say so.
            if let Some(first) = thumbprints.iter().position(|t| *t == thumbprint) {
                return Err(ConfigError::new(
                    at,
                    format!("duplicate of {}", index(&thumbprints_path, first)),
                ));
            }
            thumbprints.push(thumbprint);
        }

        let sources_path = join(path, "sources");
        if cfg.sources.is_empty() {
            return Err(ConfigError::new(
                sources_path,
                "empty: list at least one of connection, x-forwarded-client-cert, x-arr-clientcert",
            ));
        }
        let mut sources: Vec<CertSource> = Vec::with_capacity(cfg.sources.len());
        for (i, name) in cfg.sources.iter().enumerate() {
            let at = index(&sources_path, i);
            let source = CertSource::parse(name).ok_or_else(|| {
                ConfigError::new(
                    &at,
                    format!(
                        "unknown source {name:?} (expected connection, x-forwarded-client-cert \
                         or x-arr-clientcert)"
                    ),
                )
            })?;
            if sources.contains(&source) {
                return Err(ConfigError::new(at, format!("duplicate source {name:?}")));
            }
            sources.push(source);
        }

        let name = |field: &str, value: &Option<String>| {
            value
                .as_deref()
                .map(|text| {
                    DistinguishedName::parse(text)
                        .map_err(|e| ConfigError::new(join(path, field), e.to_string()))
                })
                .transpose()
        };

        Ok(ClientCertPolicy {
            thumbprints,
            sources,
            check_validity: cfg.check_validity,
            subject: name("subject", &cfg.subject)?,
            issuer: name("issuer", &cfg.issuer)?,
            warn_expiry_seconds: u64::from(cfg.warn_expiry_days) * 86_400,
        })
    }

    pub fn sources(&self) -> &[CertSource] {
        &self.sources
    }

    pub fn thumbprints(&self) -> &[Thumbprint] {
        &self.thumbprints
    }

    /// Checks the presented certificate at `now` (unix seconds). The first configured source
    /// that yields anything decides; a garbage certificate there is refused, never skipped.
    pub fn check(
        &self,
        presented: &PresentedCertificates<'_>,
        now: u64,
    ) -> Result<AcceptedCertificate, CertError> {
        for &source in &self.sources {
            let extracted = match source {
                CertSource::Connection => non_blank(presented.connection)
                    .map(|bytes| decode::connection_to_der(bytes).map(Extracted::Der)),
                CertSource::Xfcc => {
                    non_blank_str(presented.xfcc).map(xfcc::last_element_certificate)
                }
                CertSource::Arr => non_blank_str(presented.arr)
                    .map(|text| decode::arr_to_der(text).map(Extracted::Der)),
            };
            let Some(extracted) = extracted else { continue };
            return match extracted.map_err(|why| CertError::Unparseable { source, why })? {
                Extracted::Der(der) => self.check_der(source, &der, now),
                Extracted::HashOnly(hash) => self.check_hash_only(source, hash),
            };
        }
        Err(CertError::Missing)
    }

    fn check_der(
        &self,
        source: CertSource,
        der: &[u8],
        now: u64,
    ) -> Result<AcceptedCertificate, CertError> {
        let cert = decode::parse_der(der).map_err(|why| CertError::Unparseable { source, why })?;
        let sha256 = Thumbprint::sha256_of(der);
        let sha1 = Thumbprint::sha1_of(der);
        if !self.thumbprints.iter().any(|t| *t == sha256 || *t == sha1) {
            return Err(CertError::UnknownThumbprint);
        }

        // Compared in i64 so certificates dated before 1970 or after 2262 cannot overflow.
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        let not_before = cert.validity().not_before.timestamp();
        let not_after = cert.validity().not_after.timestamp();
        // No clock skew allowance: certificate dates are set by the issuer with margin already.
        if self.check_validity {
            if now < not_before {
                return Err(CertError::NotYetValid);
            }
            if now > not_after {
                return Err(CertError::Expired);
            }
        }
        if let Some(subject) = &self.subject {
            if !subject.matches(cert.subject()) {
                return Err(CertError::SubjectMismatch);
            }
        }
        if let Some(issuer) = &self.issuer {
            if !issuer.matches(cert.issuer()) {
                return Err(CertError::IssuerMismatch);
            }
        }

        let remaining = not_after.saturating_sub(now);
        Ok(AcceptedCertificate {
            source,
            sha256_hex: sha256.to_lower_hex(),
            not_after: Some(u64::try_from(not_after).unwrap_or(0)),
            expires_within_warning: u64::try_from(remaining)
                .map_or(true, |left| left <= self.warn_expiry_seconds),
            subject: Some(cert.subject().to_string()),
        })
    }

    /// XFCC `Hash=` only: a SHA-256 thumbprint without the certificate, so SHA-1 entries cannot
    /// match and dates and names cannot be checked.
    fn check_hash_only(
        &self,
        source: CertSource,
        hash: [u8; 32],
    ) -> Result<AcceptedCertificate, CertError> {
        if self.check_validity || self.subject.is_some() || self.issuer.is_some() {
            return Err(CertError::HashOnlyInsufficient);
        }
        let sha256 = Thumbprint::Sha256(hash);
        if !self.thumbprints.contains(&sha256) {
            return Err(CertError::UnknownThumbprint);
        }
        Ok(AcceptedCertificate {
            source,
            sha256_hex: sha256.to_lower_hex(),
            not_after: None,
            expires_within_warning: false,
            subject: None,
        })
    }
}

fn non_blank(input: Option<&[u8]>) -> Option<&[u8]> {
    input.filter(|bytes| !bytes.trim_ascii().is_empty())
}

fn non_blank_str(input: Option<&str>) -> Option<&str> {
    input.filter(|text| !text.trim().is_empty())
}
