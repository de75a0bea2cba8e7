//! `gateguard validate --online`: what the filter will fetch, fetched now. For every identity
//! provider whose keys come from a URL: the OpenID discovery document's `issuer` is one the
//! policy accepts and its `jwks_uri` is the policy's, and the key set parses with the filter's
//! own JWKS parser and holds a key for every algorithm the policy allows (docs/policy.md,
//! "Validating a policy").

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use gateguard_core::config::{parse_raw, without_bom, PolicyConfig};
use gateguard_core::jwt::fetch::is_discovery_uri;
use gateguard_core::jwt::keys::{jwks_uri_from_discovery, MAX_JWKS_BYTES};
use gateguard_core::jwt::{JwksSource, KeyFamily, KeySet, Provider};
use gateguard_core::locate::locate;
use gateguard_core::{CompiledPolicy, ConfigError};
use jsonwebtoken::Algorithm;
use ureq::tls::{parse_pem, PemItem, RootCerts, TlsConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Also fetch, over the network, each API's OpenID discovery document and key set (JWKS), and
    /// check them against the policy: the discovery `issuer` is one of the policy's, its
    /// `jwks_uri` is the policy's, the keys parse as the filter parses them and cover the
    /// policy's algorithms. https uses the system's CA certificates (or --ca-file); plain http
    /// only to a loopback address.
    #[arg(long)]
    pub online: bool,
    /// CA certificates (PEM) that --online trusts instead of the system's: a private identity
    /// provider's, or a test's.
    #[arg(long, value_name = "PEM", requires = "online")]
    pub ca_file: Option<PathBuf>,
    /// Seconds each --online fetch may take, connection to last byte.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, requires = "online",
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub timeout: u64,
}

pub struct Client {
    agent: ureq::Agent,
    timeout: u64,
}

impl Client {
    pub fn new(args: &Args) -> Result<Self, String> {
        let roots = match &args.ca_file {
            None => RootCerts::PlatformVerifier,
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("--ca-file {}: cannot read: {e}", path.display()))?;
                let mut certs = Vec::new();
                for item in parse_pem(&pem) {
                    match item {
                        Ok(PemItem::Certificate(c)) => certs.push(c),
                        Ok(_) => {}
                        Err(e) => {
                            return Err(format!("--ca-file {}: not PEM: {e}", path.display()))
                        }
                    }
                }
                if certs.is_empty() {
                    return Err(format!(
                        "--ca-file {}: no CERTIFICATE in it",
                        path.display()
                    ));
                }
                RootCerts::new_with_certs(&certs)
            }
        };
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(args.timeout)))
            .tls_config(TlsConfig::builder().root_certs(roots).build())
            // Envoy's fetch follows no redirect and wants a 200: neither does this one.
            .max_redirects(0)
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            agent,
            timeout: args.timeout,
        })
    }

    /// The body of a 200 answer to a GET of `uri`, at most `MAX_JWKS_BYTES` + 1 bytes (the
    /// filter's parsers refuse more).
    fn fetch(&self, uri: &str) -> Result<Vec<u8>, String> {
        plain_http_refused(uri)?;
        let mut response = self.agent.get(uri).call().map_err(|e| match e {
            ureq::Error::Timeout(_) => format!("no answer within {}s", self.timeout),
            other => other.to_string(),
        })?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(format!("HTTP status {status}"));
        }
        response
            .body_mut()
            .with_config()
            .limit(MAX_JWKS_BYTES as u64 + 1)
            .read_to_vec()
            .or_else(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => Ok(vec![b' '; MAX_JWKS_BYTES + 1]),
                ureq::Error::Timeout(_) => Err(format!("no answer within {}s", self.timeout)),
                other => Err(other.to_string()),
            })
    }
}

/// https anywhere; plain http only to a loopback address, where nothing crosses a network.
fn plain_http_refused(uri: &str) -> Result<(), String> {
    if uri.starts_with("https://") {
        return Ok(());
    }
    if !uri.starts_with("http://") {
        return Err("not an http or https URL".into());
    }
    match plain_http_across_network(uri) {
        None => Ok(()),
        Some(host) => Err(format!(
            "not fetched: plain http to {host:?}, which is not a loopback address (use https)"
        )),
    }
}

/// The host of a plain `http://` URL that is not a loopback address (`127.0.0.0/8`, `::1`,
/// `localhost`): keys fetched from it cross a network in clear. None for https, loopback, or
/// anything else.
pub fn plain_http_across_network(uri: &str) -> Option<&str> {
    let rest = uri.strip_prefix("http://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    (!loopback).then_some(host)
}

/// One identity provider, as the policy describes it.
struct Target<'a> {
    /// JSON path of the provider (`apis[0].jwt`, `apis[1].jwt.providers[2]`).
    path: String,
    label: String,
    provider: &'a Provider,
    issuers: Vec<String>,
    /// `entra.tenants`: the tenants a multi-tenant Entra provider accepts.
    tenants: Vec<String>,
    algorithms: Vec<Algorithm>,
}

/// Checks every provider of `policy` whose keys come from a URL; prints one line per provider
/// (errors in `validate`'s `file:line:column: error: path: reason` form). False if any fails.
pub fn check(
    client: &Client,
    file: &str,
    text: &[u8],
    policy: &CompiledPolicy,
    quiet: bool,
) -> bool {
    let Some(text) = std::str::from_utf8(text).ok().map(without_bom) else {
        return false;
    };
    let raw = match parse_raw(text) {
        Ok(raw) => raw,
        Err(e) => {
            eprintln!("{file}: error: {e}");
            return false;
        }
    };
    let mut ok = true;
    let mut checked = 0;
    for target in targets(&raw, policy) {
        let JwksSource::Remote { uri, .. } = &target.provider.jwks else {
            continue;
        };
        checked += 1;
        let uri_path = format!("{}.jwks.uri", target.path);
        match check_provider(client, &target, uri) {
            Ok(lines) => {
                if !quiet {
                    for line in lines {
                        println!("{file}: online: {}: {line}", target.label);
                    }
                }
            }
            Err(reason) => {
                ok = false;
                let shown_path = if locate(text, &uri_path).is_some() {
                    uri_path
                } else {
                    target.path.clone()
                };
                let mut e = ConfigError::new(&shown_path, format!("online: {}", reason));
                if let Some((line, column)) = locate(text, &shown_path) {
                    e = e.at(line, column);
                }
                eprintln!("{}", super::error_line(file, &e));
            }
        }
    }
    if checked == 0 && !quiet {
        println!("{file}: online: nothing to fetch (no API takes its keys from a URL)");
    }
    ok
}

/// The providers of every API, with what the compiled policy does not expose: the issuers and
/// algorithms as written.
fn targets<'a>(raw: &PolicyConfig, policy: &'a CompiledPolicy) -> Vec<Target<'a>> {
    let mut out = Vec::new();
    for (i, (api, compiled)) in raw.apis.iter().zip(&policy.apis).enumerate() {
        let (Some(cfg), Some(jwt)) = (&api.jwt, &compiled.jwt) else {
            continue;
        };
        let jwt_path = format!("apis[{i}].jwt");
        type Written = (String, Vec<String>, Vec<String>, Option<Vec<String>>);
        let written: Vec<Written> = match &cfg.providers {
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(k, p)| {
                    (
                        format!("{jwt_path}.providers[{k}]"),
                        p.issuers.clone(),
                        p.algorithms.clone(),
                        p.entra.as_ref().map(|e| e.tenants.clone()),
                    )
                })
                .collect(),
            None => vec![(
                jwt_path.clone(),
                cfg.issuers.clone(),
                cfg.algorithms.clone(),
                cfg.entra.as_ref().map(|e| e.tenants.clone()),
            )],
        };
        let several = written.len() > 1;
        for ((path, issuers, algorithms, entra), provider) in
            written.into_iter().zip(jwt.providers())
        {
            let mut algorithms: Vec<Algorithm> =
                algorithms.iter().filter_map(|a| a.parse().ok()).collect();
            // What `entra` allows when it lists none (docs/policy.md, "Entra ID").
            if algorithms.is_empty() && entra.is_some() {
                algorithms.push(Algorithm::RS256);
            }
            let label = if several {
                format!(
                    "api {} provider {}",
                    compiled.name,
                    path.rsplit('.').next().unwrap_or("")
                )
            } else {
                format!("api {}", compiled.name)
            };
            out.push(Target {
                path,
                label,
                provider,
                issuers,
                tenants: entra.unwrap_or_default(),
                algorithms,
            });
        }
    }
    out
}

/// What was checked, or why the provider would not work.
fn check_provider(client: &Client, target: &Target, uri: &str) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    let jwks_uri = if is_discovery_uri(uri) {
        let doc = client
            .fetch(uri)
            .map_err(|e| format!("discovery document {uri}: {e}"))?;
        let issuer =
            discovery_issuer(&doc).map_err(|e| format!("discovery document {uri}: {e}"))?;
        if !accepts_discovery_issuer(target, &issuer) {
            return Err(format!(
                "discovery document {uri}: issuer {issuer:?} is not one of the policy's issuers"
            ));
        }
        let jwks_uri = jwks_uri_from_discovery(&doc)
            .map_err(|e| format!("discovery document {uri}: {}", e.reason()))?;
        // As the filter: an https discovery document cannot send it to plain http.
        if uri.starts_with("https://") && !jwks_uri.starts_with("https://") {
            return Err(format!(
                "discovery document {uri}: jwks_uri {jwks_uri:?} is not https"
            ));
        }
        lines.push(format!(
            "discovery document {uri}: issuer {issuer:?}, jwks_uri {jwks_uri}"
        ));
        jwks_uri
    } else {
        // The keys are named directly: the issuers' own discovery documents, where they have
        // one, must name the same key set.
        for issuer in target
            .issuers
            .iter()
            .filter(|i| i.starts_with("https://") || i.starts_with("http://"))
        {
            let discovery = format!(
                "{}/.well-known/openid-configuration",
                issuer.trim_end_matches('/')
            );
            let doc = match client.fetch(&discovery) {
                Ok(doc) => doc,
                Err(e) => {
                    lines.push(format!("note: no discovery document at {discovery} ({e}); issuer {issuer:?} not cross-checked"));
                    continue;
                }
            };
            let found = discovery_issuer(&doc)
                .map_err(|e| format!("discovery document {discovery}: {e}"))?;
            if found != *issuer {
                return Err(format!(
                    "discovery document {discovery}: issuer {found:?}, not {issuer:?}"
                ));
            }
            let listed = jwks_uri_from_discovery(&doc)
                .map_err(|e| format!("discovery document {discovery}: {}", e.reason()))?;
            if listed != uri {
                return Err(format!(
                    "discovery document {discovery} names the key set {listed:?}, not the policy's {uri:?}"
                ));
            }
            lines.push(format!(
                "discovery document {discovery}: issuer {found:?}, jwks_uri matches"
            ));
        }
        uri.to_string()
    };
    let body = client
        .fetch(&jwks_uri)
        .map_err(|e| format!("key set {jwks_uri}: {e}"))?;
    let keys =
        KeySet::from_jwks_json(&body).map_err(|e| format!("key set {jwks_uri}: {}", e.reason()))?;
    let mut missing = Vec::new();
    for alg in &target.algorithms {
        let family = KeyFamily::for_algorithm(*alg);
        if family != KeyFamily::Hmac && !keys.has_family(family) {
            missing.push(format!("{alg:?}"));
        }
    }
    if !missing.is_empty() {
        return Err(format!(
            "key set {jwks_uri}: no key for {} ({} usable keys, none of that type)",
            missing.join(", "),
            keys.len()
        ));
    }
    lines.push(format!(
        "key set {jwks_uri}: {} usable keys, one for every algorithm allowed",
        keys.len()
    ));
    Ok(lines)
}

/// Whether the policy accepts tokens from a discovery document's `issuer`. Entra's multi-tenant
/// documents (`organizations`, `common`) name a template, `https://login.microsoftonline.com/
/// {tenantid}/v2.0`: it is accepted when the policy accepts it for one of its tenants or
/// issuers, the way the filter accepts a token's `iss` with its `tid`.
fn accepts_discovery_issuer(target: &Target, issuer: &str) -> bool {
    const TEMPLATE: &str = "{tenantid}";
    if target.provider.accepts_issuer(issuer, None) {
        return true;
    }
    let Some((prefix, suffix)) = issuer.split_once(TEMPLATE) else {
        return false;
    };
    let tenant_of = |iss: &str| -> Option<String> {
        let middle = iss.strip_prefix(prefix)?.strip_suffix(suffix)?;
        (!middle.is_empty() && !middle.contains('/')).then(|| middle.to_string())
    };
    target.tenants.iter().any(|t| {
        target
            .provider
            .accepts_issuer(&issuer.replace(TEMPLATE, t), Some(t))
    }) || target
        .issuers
        .iter()
        .any(|iss| tenant_of(iss).is_some_and(|t| target.provider.accepts_issuer(iss, Some(&t))))
}

/// The `issuer` of a discovery document.
fn discovery_issuer(doc: &[u8]) -> Result<String, String> {
    if doc.len() > MAX_JWKS_BYTES {
        return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
    }
    let value: serde_json::Value =
        serde_json::from_slice(doc).map_err(|_| "not JSON".to_string())?;
    value
        .get("issuer")
        .and_then(serde_json::Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| "no \"issuer\" string".to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_to_loopback() {
        for ok in [
            "https://idp.example.com/keys",
            "http://127.0.0.1:8080/keys",
            "http://127.8.9.10/keys",
            "http://localhost/keys",
            "http://[::1]:9000/keys",
            "http://user@127.0.0.1/keys",
        ] {
            assert!(plain_http_refused(ok).is_ok(), "{ok}");
        }
        for refused in [
            "http://idp.example.com/keys",
            "http://10.0.0.1/keys",
            "http://127.0.0.1.example.com/keys",
            "http://[::2]/keys",
            "http://127.0.0.1@evil.example/keys",
            "ftp://127.0.0.1/keys",
        ] {
            assert!(plain_http_refused(refused).is_err(), "{refused}");
        }
    }
}
