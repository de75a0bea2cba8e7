//! `listener` and `upstream` in the policy (docs/policy.md, "Listener TLS" and "Reaching the
//! function app"): how `gateguard render` sets up Envoy around the filter, on both sides of it.
//! The filter validates them with the rest of the policy (a policy is accepted or refused whole,
//! and `gateguard validate` says the same as the filter) and otherwise ignores them: they become
//! Envoy's TLS listener and `function_app` cluster, not checks on a request.

use std::path::Path;

use serde::Deserialize;

use crate::error::{index, join, ConfigError};

/// What the function app's certificate is verified against when the policy names no `ca_file`:
/// the system bundle of Debian and Ubuntu, Envoy's official image included.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// TLS 1.2 cipher suites a listener may offer, by their OpenSSL-style names (those of Envoy's
/// documentation, defaults and logs), with their IANA names: BoringSSL's TLS 1.2 suites for
/// certificates, from which Envoy's defaults are drawn. Left out of what BoringSSL accepts:
/// 3DES (64-bit blocks, Sweet32), pre-shared-key suites (Envoy holds no pre-shared keys) and the
/// two CBC-SHA256 suites BoringSSL keeps only as deprecated.
pub const TLS12_CIPHER_SUITES: [(&str, &str); 14] = [
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    ),
    (
        "ECDHE-RSA-AES128-GCM-SHA256",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    ),
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    ),
    (
        "ECDHE-RSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    ),
    (
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    ),
    (
        "ECDHE-RSA-CHACHA20-POLY1305",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    ),
    (
        "ECDHE-ECDSA-AES128-SHA",
        "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    ),
    ("ECDHE-RSA-AES128-SHA", "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA"),
    (
        "ECDHE-ECDSA-AES256-SHA",
        "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    ),
    ("ECDHE-RSA-AES256-SHA", "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA"),
    ("AES128-GCM-SHA256", "TLS_RSA_WITH_AES_128_GCM_SHA256"),
    ("AES256-GCM-SHA384", "TLS_RSA_WITH_AES_256_GCM_SHA384"),
    ("AES128-SHA", "TLS_RSA_WITH_AES_128_CBC_SHA"),
    ("AES256-SHA", "TLS_RSA_WITH_AES_256_CBC_SHA"),
];

/// TLS 1.3's suites: BoringSSL always enables them and lets none be chosen (Envoy accepts their
/// names in `cipher_suites` and ignores them).
const TLS13_CIPHER_SUITES: [&str; 3] = [
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
];

/// Deprecated in BoringSSL: CBC with HMAC-SHA256, slower than the GCM suites and no safer.
const DEPRECATED_CIPHER_SUITES: [&str; 2] =
    ["ECDHE-ECDSA-AES128-SHA256", "ECDHE-RSA-AES128-SHA256"];

/// `listener`: the gateway's own listeners.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// The TLS listener `gateguard render` writes with `--tls-cert` and `--tls-key`.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub tls: Option<ListenerTlsConfig>,
}

/// `listener.tls`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// The oldest TLS version a client may use.
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "crate::serialize::is_default")
    )]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub min_version: TlsVersion,
    /// TLS 1.2 cipher suites offered, in order of preference (OpenSSL-style names); Envoy's
    /// defaults when absent. TLS 1.3's suites are not configurable.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub cipher_suites: Option<Vec<String>>,
}

/// A TLS protocol version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

impl TlsVersion {
    /// Envoy's name for it (`TlsParameters.TlsProtocol`).
    pub fn envoy_name(self) -> &'static str {
        match self {
            Self::Tls12 => "TLSv1_2",
            Self::Tls13 => "TLSv1_3",
        }
    }

    /// As a policy writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls12 => "1.2",
            Self::Tls13 => "1.3",
        }
    }
}

/// `upstream`: the function app behind the gateway (its address is `gateguard render
/// --upstream`, which differs between deployments).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Reach the function app over TLS; plain HTTP when absent.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
}

/// `upstream.tls`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// The server name sent (SNI); the function app's certificate must name it.
    pub sni: String,
    /// The `Host` the function app gets: `true` (the SNI name), a host name, or `false` (the
    /// client's own).
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "crate::serialize::is_default")
    )]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub host_rewrite: HostRewriteConfig,
    /// CA bundle (PEM) the function app's certificate must chain to; the system bundle
    /// (/etc/ssl/certs/ca-certificates.crt) when absent.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub ca_file: Option<String>,
    /// The oldest TLS version the gateway accepts from the function app.
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "crate::serialize::is_default")
    )]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub min_version: TlsVersion,
    /// The certificate the gateway presents to the function app.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub client_certificate: Option<UpstreamClientCertConfig>,
}

/// `upstream.tls.host_rewrite`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(
    untagged,
    expecting = "true (the SNI name), false (the client's Host) or a host name"
)]
pub enum HostRewriteConfig {
    /// `true`: the SNI name; `false`: the `Host` the client sent.
    Enabled(bool),
    /// This host name.
    Name(String),
}

impl Default for HostRewriteConfig {
    fn default() -> Self {
        Self::Enabled(true)
    }
}

/// `upstream.tls.client_certificate`: files, or an SDS file that names them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct UpstreamClientCertConfig {
    /// The certificate chain (PEM); with `key_file`.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub cert_file: Option<String>,
    /// Its private key (PEM); with `cert_file`.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub key_file: Option<String>,
    /// Envoy's file-based secret discovery: the certificate and key come from a secret in this
    /// file, reloaded when the file is replaced; instead of `cert_file` and `key_file`.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub sds: Option<SdsConfig>,
}

/// `upstream.tls.client_certificate.sds`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct SdsConfig {
    /// The SDS file (.yaml, .yml or .json): `resources` holding a `Secret` with a
    /// `tls_certificate`.
    pub path: String,
    /// The `name` of that secret in the file.
    pub secret: String,
}

/// The compiled `listener`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerPolicy {
    /// None: the policy says nothing about the TLS listener (render's defaults, TLS 1.2 up).
    pub tls: Option<ListenerTls>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerTls {
    pub min_version: TlsVersion,
    /// Empty: Envoy's defaults.
    pub cipher_suites: Vec<String>,
}

/// The compiled `upstream`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamPolicy {
    /// None: plain HTTP to the function app.
    pub tls: Option<UpstreamTls>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// Lower case.
    pub sni: String,
    /// The `Host` sent upstream; None keeps the client's.
    pub host_rewrite: Option<String>,
    pub ca_file: String,
    pub min_version: TlsVersion,
    pub client_certificate: Option<UpstreamClientCert>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamClientCert {
    Files { cert_file: String, key_file: String },
    Sds { path: String, secret: String },
}

impl UpstreamTls {
    /// TLS with this SNI, verified against the system CAs, `Host` rewritten to it, no client
    /// certificate: what `upstream.tls: {"sni": ...}` alone means.
    pub fn to_host(sni: &str) -> Result<Self, String> {
        let sni = host_name(sni)?;
        Ok(Self {
            host_rewrite: Some(sni.clone()),
            sni,
            ca_file: SYSTEM_CA_BUNDLE.to_string(),
            min_version: TlsVersion::Tls12,
            client_certificate: None,
        })
    }
}

impl ListenerPolicy {
    pub fn compile(cfg: Option<&ListenerConfig>, path: &str) -> Result<Self, ConfigError> {
        let Some(tls) = cfg.and_then(|c| c.tls.as_ref()) else {
            return Ok(Self::default());
        };
        let path = join(path, "tls");
        let mut cipher_suites = Vec::new();
        if let Some(list) = &tls.cipher_suites {
            let field = join(&path, "cipher_suites");
            if list.is_empty() {
                return Err(ConfigError::new(
                    field,
                    "is empty: leave cipher_suites out for Envoy's defaults, or list at least one",
                ));
            }
            if tls.min_version == TlsVersion::Tls13 {
                return Err(ConfigError::new(
                    field,
                    "applies to TLS 1.2 only, and min_version \"1.3\" refuses TLS 1.2: remove \
                     cipher_suites (TLS 1.3's suites are not configurable in Envoy), or set \
                     min_version \"1.2\"",
                ));
            }
            for (i, name) in list.iter().enumerate() {
                let at = index(&field, i);
                check_cipher_suite(name).map_err(|reason| ConfigError::new(&at, reason))?;
                if cipher_suites.contains(name) {
                    return Err(ConfigError::new(at, format!("{name:?} is listed twice")));
                }
                cipher_suites.push(name.clone());
            }
        }
        Ok(Self {
            tls: Some(ListenerTls {
                min_version: tls.min_version,
                cipher_suites,
            }),
        })
    }
}

/// Why Envoy's `cipher_suites` would refuse `name`, or why it would be meaningless there.
fn check_cipher_suite(name: &str) -> Result<(), String> {
    if TLS12_CIPHER_SUITES.iter().any(|(n, _)| *n == name) {
        return Ok(());
    }
    if TLS13_CIPHER_SUITES.contains(&name) {
        return Err(format!(
            "{name:?} is a TLS 1.3 suite: Envoy (BoringSSL) always enables TLS 1.3's suites and \
             lets none be chosen; cipher_suites lists TLS 1.2 suites"
        ));
    }
    if let Some((openssl, _)) = TLS12_CIPHER_SUITES
        .iter()
        .find(|(_, iana)| iana.eq_ignore_ascii_case(name))
    {
        return Err(format!(
            "{name:?} is the IANA name of {openssl:?}: write the OpenSSL name, as Envoy's \
             documentation, defaults and logs do"
        ));
    }
    if let Some((openssl, _)) = TLS12_CIPHER_SUITES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
    {
        return Err(format!(
            "{name:?}: cipher suite names are case-sensitive; this one is {openssl:?}"
        ));
    }
    if DEPRECATED_CIPHER_SUITES.contains(&name) {
        return Err(format!(
            "{name:?} is deprecated in BoringSSL (CBC with HMAC-SHA256): use a GCM suite"
        ));
    }
    if name.contains("PSK") {
        return Err(format!(
            "{name:?} is a pre-shared-key suite: Envoy holds no pre-shared keys, so no client \
             could negotiate it"
        ));
    }
    if name.contains("DES") {
        return Err(format!(
            "{name:?}: 3DES is not offered (64-bit blocks: Sweet32)"
        ));
    }
    let known: Vec<&str> = TLS12_CIPHER_SUITES.iter().map(|(n, _)| *n).collect();
    Err(format!(
        "{name:?} is not a TLS 1.2 cipher suite a listener can offer; these are (BoringSSL's \
         names): {}",
        known.join(", ")
    ))
}

impl UpstreamPolicy {
    pub fn compile(cfg: Option<&UpstreamConfig>, path: &str) -> Result<Self, ConfigError> {
        let Some(tls) = cfg.and_then(|c| c.tls.as_ref()) else {
            return Ok(Self::default());
        };
        let path = join(path, "tls");
        let sni = host_name(&tls.sni).map_err(|r| ConfigError::new(join(&path, "sni"), r))?;
        let host_rewrite = match &tls.host_rewrite {
            HostRewriteConfig::Enabled(true) => Some(sni.clone()),
            HostRewriteConfig::Enabled(false) => None,
            HostRewriteConfig::Name(name) => Some(
                host_name(name).map_err(|r| ConfigError::new(join(&path, "host_rewrite"), r))?,
            ),
        };
        let ca_file = match &tls.ca_file {
            Some(file) => {
                absolute_path(file).map_err(|r| ConfigError::new(join(&path, "ca_file"), r))?;
                file.clone()
            }
            None => SYSTEM_CA_BUNDLE.to_string(),
        };
        let client_certificate = tls
            .client_certificate
            .as_ref()
            .map(|c| compile_client_cert(c, &join(&path, "client_certificate")))
            .transpose()?;
        Ok(Self {
            tls: Some(UpstreamTls {
                sni,
                host_rewrite,
                ca_file,
                min_version: tls.min_version,
                client_certificate,
            }),
        })
    }
}

fn compile_client_cert(
    cfg: &UpstreamClientCertConfig,
    path: &str,
) -> Result<UpstreamClientCert, ConfigError> {
    let file = |name: &str, value: &str| {
        absolute_path(value).map_err(|r| ConfigError::new(join(path, name), r))?;
        Ok::<_, ConfigError>(value.to_string())
    };
    match (&cfg.cert_file, &cfg.key_file, &cfg.sds) {
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => Err(ConfigError::new(
            path,
            "give either cert_file and key_file, or sds, not both: Envoy would present only one",
        )),
        (Some(cert), Some(key), None) => Ok(UpstreamClientCert::Files {
            cert_file: file("cert_file", cert)?,
            key_file: file("key_file", key)?,
        }),
        (Some(_), None, None) => Err(ConfigError::new(
            path,
            "cert_file needs key_file (its private key)",
        )),
        (None, Some(_), None) => Err(ConfigError::new(
            path,
            "key_file needs cert_file (its certificate)",
        )),
        (None, None, Some(sds)) => {
            let sds_path = join(path, "sds");
            let file = file("sds.path", &sds.path)?;
            let extension = Path::new(&file).extension().and_then(|e| e.to_str());
            if !matches!(extension, Some("yaml" | "yml" | "json")) {
                return Err(ConfigError::new(
                    join(&sds_path, "path"),
                    format!(
                        "{file:?}: Envoy reads an SDS file by its extension: name it .yaml, \
                         .yml or .json"
                    ),
                ));
            }
            if sds.secret.is_empty()
                || sds.secret.len() > 255
                || !sds.secret.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(ConfigError::new(
                    join(&sds_path, "secret"),
                    format!(
                        "{:?} must be the name of the secret in the SDS file: 1-255 printable \
                         ASCII characters, no spaces",
                        sds.secret
                    ),
                ));
            }
            Ok(UpstreamClientCert::Sds {
                path: file,
                secret: sds.secret.clone(),
            })
        }
        (None, None, None) => Err(ConfigError::new(
            path,
            "give cert_file and key_file, or sds: the certificate the gateway presents",
        )),
    }
}

/// A DNS host name, in lower case: what SNI and `Host` carry. An IP address is refused: SNI
/// never carries one (RFC 6066), and App Service routes by name.
pub fn host_name(name: &str) -> Result<String, String> {
    let labels: Vec<&str> = name.split('.').collect();
    let valid = !name.is_empty()
        && name.len() <= 253
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !valid {
        return Err(format!(
            "{name:?} is not a host name (letters, digits, '-' and '.', such as \
             contoso-fn.azurewebsites.net; no scheme, port or path)"
        ));
    }
    // A numeric last label makes it an IPv4 address (or a name no resolver would look up).
    if labels
        .last()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "{name:?} is an IP address: give the function app's host name, which its \
             certificate names (TLS sends no IP address as SNI)"
        ));
    }
    Ok(name.to_ascii_lowercase())
}

/// Files are read by Envoy, wherever it runs: an absolute path means the same there.
fn absolute_path(file: &str) -> Result<(), String> {
    if !file.starts_with('/') {
        return Err(format!(
            "{file:?} must be an absolute path: Envoy would read a relative one from its own \
             working directory"
        ));
    }
    if file.len() > 4096 || file.chars().any(char::is_control) {
        return Err(format!("{file:?} is not a usable file path"));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use crate::config::parse_policy;
    use crate::ConfigError;

    use super::*;

    const APIS: &str = r#""apis": [{"name": "a", "path_prefix": "/a"}]"#;

    fn parse(rest: &str) -> Result<crate::CompiledPolicy, ConfigError> {
        parse_policy(format!("{{{APIS}, {rest}}}").as_bytes(), &|_| None)
    }

    fn refused(rest: &str) -> ConfigError {
        parse(rest).unwrap_err()
    }

    fn upstream(tls: &str) -> String {
        format!(r#""upstream": {{"tls": {{"sni": "contoso-fn.azurewebsites.net"{tls}}}}}"#)
    }

    #[test]
    fn a_policy_without_them_changes_nothing() {
        let p = parse_policy(format!("{{{APIS}}}").as_bytes(), &|_| None).unwrap();
        assert_eq!(p.listener, ListenerPolicy::default());
        assert_eq!(p.upstream, UpstreamPolicy::default());
        let p = parse(r#""listener": {}, "upstream": {}"#).unwrap();
        assert_eq!((p.listener.tls, p.upstream.tls), (None, None));
    }

    #[test]
    fn listener_tls_defaults_to_tls_1_2_and_envoys_ciphers() {
        let p = parse(r#""listener": {"tls": {}}"#).unwrap();
        assert_eq!(
            p.listener.tls,
            Some(ListenerTls {
                min_version: TlsVersion::Tls12,
                cipher_suites: Vec::new()
            })
        );
        let p = parse(r#""listener": {"tls": {"min_version": "1.3"}}"#).unwrap();
        assert_eq!(p.listener.tls.unwrap().min_version.envoy_name(), "TLSv1_3");
        let p = parse(
            r#""listener": {"tls": {"min_version": "1.2",
                "cipher_suites": ["ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256"]}}"#,
        )
        .unwrap();
        let tls = p.listener.tls.unwrap();
        assert_eq!(tls.min_version.envoy_name(), "TLSv1_2");
        // In the policy's order: it is the server's preference.
        assert_eq!(
            tls.cipher_suites,
            [
                "ECDHE-RSA-AES256-GCM-SHA384",
                "ECDHE-ECDSA-AES128-GCM-SHA256"
            ]
        );
    }

    #[test]
    fn every_listed_cipher_suite_is_accepted() {
        let all: Vec<String> = TLS12_CIPHER_SUITES
            .iter()
            .map(|(n, _)| format!("{n:?}"))
            .collect();
        let p = parse(&format!(
            r#""listener": {{"tls": {{"cipher_suites": [{}]}}}}"#,
            all.join(", ")
        ))
        .unwrap();
        assert_eq!(p.listener.tls.unwrap().cipher_suites.len(), 14);
    }

    #[test]
    fn tls_versions_other_than_1_2_and_1_3_are_refused() {
        for bad in [r#""1.1""#, r#""1.0""#, r#""TLSv1_2""#, "1.2", r#""1.4""#] {
            let e = refused(&format!(
                r#""listener": {{"tls": {{"min_version": {bad}}}}}"#
            ));
            assert_eq!(e.path, "listener.tls.min_version", "{bad}");
            // serde_json reads a number where an enum's string belongs as "expected value".
            if bad.starts_with('"') {
                assert!(e.reason.contains("expected `1.2` or `1.3`"), "{bad}: {e}");
            }
            let e = refused(&upstream(&format!(r#", "min_version": {bad}"#)));
            assert_eq!(e.path, "upstream.tls.min_version", "{bad}");
        }
    }

    #[test]
    fn cipher_suites_are_refused_with_their_path_and_why() {
        let cases = [
            ("ECDHE-ECDSA-AES128-GCM-SHA257", "is not a TLS 1.2 cipher suite a listener can offer; these are (BoringSSL's names): ECDHE-ECDSA-AES128-GCM-SHA256, ECDHE-RSA-AES128-GCM-SHA256, "),
            ("DHE-RSA-AES128-GCM-SHA256", "is not a TLS 1.2 cipher suite"),
            ("ECDHE-RSA-AES128-SHA256", "is deprecated in BoringSSL"),
            ("ECDHE-ECDSA-AES128-SHA256", "is deprecated in BoringSSL"),
            ("[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]", "is not a TLS 1.2 cipher suite"),
            ("ECDHE-ECDSA-AES128-GCM-SHA256:AES128-SHA", "is not a TLS 1.2 cipher suite"),
            ("ALL", "is not a TLS 1.2 cipher suite"),
            ("", "is not a TLS 1.2 cipher suite"),
            ("TLS_AES_128_GCM_SHA256", "is a TLS 1.3 suite: Envoy (BoringSSL) always enables"),
            ("TLS_CHACHA20_POLY1305_SHA256", "is a TLS 1.3 suite"),
            ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "is the IANA name of \"ECDHE-ECDSA-AES128-GCM-SHA256\": write the OpenSSL name"),
            ("ecdhe-rsa-aes256-gcm-sha384", "names are case-sensitive; this one is \"ECDHE-RSA-AES256-GCM-SHA384\""),
            ("ECDHE-PSK-CHACHA20-POLY1305", "is a pre-shared-key suite"),
            ("PSK-AES128-CBC-SHA", "is a pre-shared-key suite"),
            ("DES-CBC3-SHA", "3DES is not offered"),
        ];
        for (name, reason) in cases {
            let e = refused(&format!(
                r#""listener": {{"tls": {{"cipher_suites": ["AES128-SHA", {name:?}]}}}}"#
            ));
            assert_eq!(e.path, "listener.tls.cipher_suites[1]", "{name}");
            assert!(e.reason.contains(reason), "{name}: {}", e.reason);
            assert!(e.line.is_some(), "{name}: {e}");
        }
    }

    #[test]
    fn cipher_suites_must_be_meaningful() {
        let e = refused(r#""listener": {"tls": {"cipher_suites": []}}"#);
        assert_eq!(e.path, "listener.tls.cipher_suites");
        assert!(e.reason.starts_with("is empty"), "{e}");
        let e = refused(
            r#""listener": {"tls": {"cipher_suites": ["AES128-SHA", "AES256-SHA", "AES128-SHA"]}}"#,
        );
        assert_eq!(e.path, "listener.tls.cipher_suites[2]");
        assert_eq!(e.reason, "\"AES128-SHA\" is listed twice");
        // TLS 1.2's suites under a TLS 1.3 minimum would never be used.
        let e = refused(
            r#""listener": {"tls": {"min_version": "1.3", "cipher_suites": ["AES128-SHA"]}}"#,
        );
        assert_eq!(e.path, "listener.tls.cipher_suites");
        assert!(
            e.reason
                .starts_with("applies to TLS 1.2 only, and min_version \"1.3\" refuses TLS 1.2"),
            "{e}"
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        for (rest, path) in [
            (
                r#""listener": {"tls": {"max_version": "1.3"}}"#,
                "listener.tls.max_version",
            ),
            (r#""listener": {"port": 8443}"#, "listener.port"),
            (r#""upstream": {"address": "x:443"}"#, "upstream.address"),
            (&upstream(r#", "verify": false"#), "upstream.tls.verify"),
            (
                &upstream(r#", "client_certificate": {"cert": "/c.pem"}"#),
                "upstream.tls.client_certificate.cert",
            ),
            (
                &upstream(
                    r#", "client_certificate": {"sds": {"path": "/s.yaml", "secret": "s", "x": 1}}"#,
                ),
                "upstream.tls.client_certificate.sds.x",
            ),
        ] {
            let e = refused(rest);
            assert_eq!(e.path, path, "{rest}");
            assert!(e.reason.contains("unknown field"), "{e}");
        }
    }

    #[test]
    fn upstream_tls_alone_is_sni_system_cas_and_host_rewritten() {
        let p = parse(&upstream("")).unwrap();
        assert_eq!(
            p.upstream.tls,
            Some(UpstreamTls {
                sni: "contoso-fn.azurewebsites.net".into(),
                host_rewrite: Some("contoso-fn.azurewebsites.net".into()),
                ca_file: "/etc/ssl/certs/ca-certificates.crt".into(),
                min_version: TlsVersion::Tls12,
                client_certificate: None,
            })
        );
        assert_eq!(
            p.upstream.tls,
            Some(UpstreamTls::to_host("contoso-fn.azurewebsites.net").unwrap())
        );
    }

    #[test]
    fn upstream_tls_fields() {
        let p = parse(&upstream(
            r#", "host_rewrite": "API.Contoso.com", "ca_file": "/etc/envoy/app-ca.pem",
               "min_version": "1.3",
               "client_certificate": {"cert_file": "/etc/envoy/tls/gw.crt", "key_file": "/etc/envoy/tls/gw.key"}"#,
        ))
        .unwrap();
        let tls = p.upstream.tls.unwrap();
        assert_eq!(tls.host_rewrite.as_deref(), Some("api.contoso.com"));
        assert_eq!(tls.ca_file, "/etc/envoy/app-ca.pem");
        assert_eq!(tls.min_version, TlsVersion::Tls13);
        assert_eq!(
            tls.client_certificate,
            Some(UpstreamClientCert::Files {
                cert_file: "/etc/envoy/tls/gw.crt".into(),
                key_file: "/etc/envoy/tls/gw.key".into()
            })
        );
        let p = parse(&upstream(
            r#", "host_rewrite": false,
               "client_certificate": {"sds": {"path": "/etc/envoy/sds/gw.yaml", "secret": "gateway_client"}}"#,
        ))
        .unwrap();
        let tls = p.upstream.tls.unwrap();
        assert_eq!(tls.host_rewrite, None);
        assert_eq!(
            tls.client_certificate,
            Some(UpstreamClientCert::Sds {
                path: "/etc/envoy/sds/gw.yaml".into(),
                secret: "gateway_client".into()
            })
        );
        // Names compare ignoring case; Envoy gets them in lower case.
        let p = parse(r#""upstream": {"tls": {"sni": "Contoso-FN.azurewebsites.net"}}"#).unwrap();
        let tls = p.upstream.tls.unwrap();
        assert_eq!(tls.sni, "contoso-fn.azurewebsites.net");
        assert_eq!(
            tls.host_rewrite.as_deref(),
            Some("contoso-fn.azurewebsites.net")
        );
    }

    #[test]
    fn upstream_tls_needs_an_sni_that_is_a_host_name() {
        let e = refused(r#""upstream": {"tls": {}}"#);
        assert_eq!(e.path, "upstream.tls");
        assert!(e.reason.contains("missing field `sni`"), "{e}");
        for bad in [
            "",
            "https://contoso-fn.azurewebsites.net",
            "contoso-fn.azurewebsites.net:443",
            "contoso-fn.azurewebsites.net/api",
            "contoso fn.net",
            "-contoso.net",
            "contoso..net",
            "contoso.net.",
            "*.azurewebsites.net",
            "contoso_fn.net",
            "10.0.0.4",
            "::1",
            "[::1]",
        ] {
            let e = refused(&format!(r#""upstream": {{"tls": {{"sni": {bad:?}}}}}"#));
            assert_eq!(e.path, "upstream.tls.sni", "{bad}");
            assert!(e.reason.starts_with(&format!("{bad:?} is ")), "{bad}: {e}");
            let e = refused(&upstream(&format!(r#", "host_rewrite": {bad:?}"#)));
            assert_eq!(e.path, "upstream.tls.host_rewrite", "{bad}");
        }
        let e = refused(r#""upstream": {"tls": {"sni": "10.0.0.4"}}"#);
        assert!(e.reason.contains("is an IP address"), "{e}");
        let e = refused(&upstream(r#", "host_rewrite": 1"#));
        assert_eq!(e.path, "upstream.tls.host_rewrite");
        assert!(
            e.reason
                .contains("true (the SNI name), false (the client's Host) or a host name"),
            "{e}"
        );
    }

    #[test]
    fn incomplete_or_contradictory_client_certificates_are_refused() {
        let cert = |body: &str| upstream(&format!(r#", "client_certificate": {body}"#));
        let path = "upstream.tls.client_certificate";
        for (body, at, reason) in [
            (
                r#"{"cert_file": "/c.pem"}"#,
                path,
                "cert_file needs key_file (its private key)",
            ),
            (
                r#"{"key_file": "/c.key"}"#,
                path,
                "key_file needs cert_file (its certificate)",
            ),
            (
                r#"{"cert_file": "/c.pem", "key_file": "/c.key", "sds": {"path": "/s.yaml", "secret": "s"}}"#,
                path,
                "give either cert_file and key_file, or sds, not both",
            ),
            (
                r#"{"cert_file": "/c.pem", "sds": {"path": "/s.yaml", "secret": "s"}}"#,
                path,
                "give either cert_file and key_file, or sds, not both",
            ),
            (r#"{}"#, path, "give cert_file and key_file, or sds"),
            (
                r#"{"cert_file": "c.pem", "key_file": "/c.key"}"#,
                "upstream.tls.client_certificate.cert_file",
                "\"c.pem\" must be an absolute path",
            ),
            (
                r#"{"cert_file": "/c.pem", "key_file": "./c.key"}"#,
                "upstream.tls.client_certificate.key_file",
                "must be an absolute path",
            ),
            (
                r#"{"sds": {"path": "sds.yaml", "secret": "s"}}"#,
                "upstream.tls.client_certificate.sds.path",
                "must be an absolute path",
            ),
            (
                r#"{"sds": {"path": "/etc/envoy/sds.pem", "secret": "s"}}"#,
                "upstream.tls.client_certificate.sds.path",
                "name it .yaml, .yml or .json",
            ),
            (
                r#"{"sds": {"path": "/etc/envoy/sds.yaml", "secret": "a b"}}"#,
                "upstream.tls.client_certificate.sds.secret",
                "must be the name of the secret in the SDS file",
            ),
            (
                r#"{"sds": {"path": "/etc/envoy/sds.yaml", "secret": ""}}"#,
                "upstream.tls.client_certificate.sds.secret",
                "must be the name of the secret",
            ),
            (
                r#"{"sds": {"path": "/etc/envoy/sds.yaml"}}"#,
                "upstream.tls.client_certificate.sds",
                "missing field `secret`",
            ),
            (
                r#"{"sds": "/etc/envoy/sds.yaml"}"#,
                "upstream.tls.client_certificate.sds",
                "invalid type: string",
            ),
        ] {
            let e = refused(&cert(body));
            assert_eq!(e.path, at, "{body}");
            assert!(e.reason.contains(reason), "{body}: {e}");
        }
        let e = refused(&upstream(r#", "ca_file": "ca.pem""#));
        assert_eq!(e.path, "upstream.tls.ca_file");
        assert!(e.reason.contains("must be an absolute path"), "{e}");
        let e = refused(&upstream(r#", "ca_file": "/ca\n.pem""#));
        assert!(e.reason.contains("is not a usable file path"), "{e}");
    }

    #[test]
    fn semantic_errors_point_at_the_line() {
        let text = format!(
            "{{{APIS},\n\"upstream\": {{\"tls\": {{\"sni\": \"a.example\",\n  \"client_certificate\": {{\"cert_file\": \"/c.pem\"}}}}}}}}"
        );
        let e = parse_policy(text.as_bytes(), &|_| None).unwrap_err();
        assert_eq!(e.path, "upstream.tls.client_certificate");
        assert_eq!(e.line, Some(3));
    }
}
