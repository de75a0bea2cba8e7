//! CORS (docs/policy.md, "CORS"): preflights answered by the gateway, origin allow-list with exact
//! and wildcard-subdomain entries, and the response headers an allowed origin gets.
//!
//! Origins are parsed by hand: a URL parser accepts and normalises what an Origin must not hold.

use serde::Deserialize;

use crate::error::{index, join, ConfigError};
use crate::headers::is_token;

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    pub allowed_origins: Vec<String>,
    #[serde(default = "default_methods")]
    pub allowed_methods: Vec<String>,
    #[serde(default)]
    pub allowed_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub allow_credentials: bool,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub max_age_seconds: Option<u32>,
}

fn default_methods() -> Vec<String> {
    vec!["GET".into(), "POST".into()]
}

/// An origin as a browser serialises it: scheme, host and effective port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum OriginPattern {
    Exact(Origin),
    /// `https://*.contoso.com`: one or more labels in front of `contoso.com`, same scheme and port.
    Subdomains {
        scheme: String,
        suffix: String,
        port: u16,
    },
    /// `*`: any origin except `null` (refused with credentials at compile time).
    Any,
}

#[derive(Debug, Clone)]
pub struct CorsPolicy {
    origins: Vec<OriginPattern>,
    any_method: bool,
    methods: Vec<String>,
    allow_methods_value: String,
    allow_headers_value: String,
    expose_headers_value: String,
    allow_credentials: bool,
    max_age: Option<u32>,
}

/// What CORS decides for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsVerdict {
    /// No `Origin`: not a CORS request, nothing to add.
    NotCors,
    /// A preflight from an allowed origin for an allowed method: answer 204 with these headers.
    Preflight(Vec<(String, String)>),
    /// An actual request from an allowed origin: add these headers to whatever response it gets.
    Allowed(Vec<(String, String)>),
    Denied,
}

impl CorsPolicy {
    pub fn compile(cfg: &CorsConfig, path: &str) -> Result<Self, ConfigError> {
        let origins_path = join(path, "allowed_origins");
        if cfg.allowed_origins.is_empty() {
            return Err(ConfigError::new(
                origins_path,
                "must list at least one origin",
            ));
        }
        let mut origins = Vec::with_capacity(cfg.allowed_origins.len());
        for (i, raw) in cfg.allowed_origins.iter().enumerate() {
            let p = index(&origins_path, i);
            let pattern = parse_pattern(raw).map_err(|reason| ConfigError::new(&p, reason))?;
            if pattern == OriginPattern::Any && cfg.allow_credentials {
                return Err(ConfigError::new(
                    p,
                    "\"*\" cannot be combined with allow_credentials: list the origins",
                ));
            }
            origins.push(pattern);
        }

        let methods_path = join(path, "allowed_methods");
        if cfg.allowed_methods.is_empty() {
            return Err(ConfigError::new(
                methods_path,
                "must list at least one method",
            ));
        }
        let mut methods = Vec::new();
        let mut any_method = false;
        for (i, m) in cfg.allowed_methods.iter().enumerate() {
            if m == "*" {
                any_method = true;
                continue;
            }
            if !is_token(m) {
                return Err(ConfigError::new(
                    index(&methods_path, i),
                    format!("{m:?} is not an HTTP method"),
                ));
            }
            methods.push(m.to_ascii_uppercase());
        }
        if any_method && cfg.allow_credentials {
            return Err(ConfigError::new(
                methods_path,
                "\"*\" cannot be combined with allow_credentials: list the methods",
            ));
        }

        let allowed_headers = header_list(&cfg.allowed_headers, &join(path, "allowed_headers"))?;
        let expose_headers = header_list(&cfg.expose_headers, &join(path, "expose_headers"))?;
        if let Some(age) = cfg.max_age_seconds {
            // Browsers cap it far lower (Chromium 2 h, Firefox 24 h); a larger value is a typo.
            if age > 86_400 {
                return Err(ConfigError::new(
                    join(path, "max_age_seconds"),
                    "must be at most 86400 (browsers ignore larger values)",
                ));
            }
        }

        let allow_methods_value = if any_method {
            "*".to_string()
        } else {
            methods.join(", ")
        };
        Ok(Self {
            origins,
            any_method,
            methods,
            allow_methods_value,
            allow_headers_value: allowed_headers.join(", "),
            expose_headers_value: expose_headers.join(", "),
            allow_credentials: cfg.allow_credentials,
            max_age: cfg.max_age_seconds,
        })
    }

    /// `origin`: the request's `Origin` values (zero, one, or several if a client sent
    /// duplicates, which is refused). `preflight_method`: `Access-Control-Request-Method` of an
    /// `OPTIONS` request, which makes it a preflight.
    pub fn evaluate(&self, origin: &[&str], preflight_method: Option<&str>) -> CorsVerdict {
        let origin = match origin {
            [] => return CorsVerdict::NotCors,
            [one] => *one,
            _ => return CorsVerdict::Denied,
        };
        if !self.origin_allowed(origin) {
            return CorsVerdict::Denied;
        }
        match preflight_method {
            Some(method) => {
                if self.method_allowed(method) {
                    CorsVerdict::Preflight(self.preflight_headers(origin))
                } else {
                    CorsVerdict::Denied
                }
            }
            None => CorsVerdict::Allowed(self.actual_headers(origin)),
        }
    }

    pub fn origin_allowed(&self, origin: &str) -> bool {
        let Some(origin) = parse_origin(origin.trim()) else {
            return false;
        };
        self.origins.iter().any(|p| match p {
            OriginPattern::Any => true,
            OriginPattern::Exact(o) => *o == origin,
            OriginPattern::Subdomains {
                scheme,
                suffix,
                port,
            } => {
                origin.scheme == *scheme
                    && origin.port == *port
                    && origin
                        .host
                        .strip_suffix(suffix.as_str())
                        .and_then(|labels| labels.strip_suffix('.'))
                        .is_some_and(|labels| !labels.is_empty())
            }
        })
    }

    fn method_allowed(&self, method: &str) -> bool {
        let method = method.trim();
        is_token(method) && (self.any_method || self.methods.iter().any(|m| m == method))
    }

    fn common_headers(&self, origin: &str) -> Vec<(String, String)> {
        let mut headers = vec![
            (
                "access-control-allow-origin".to_string(),
                origin.trim().to_string(),
            ),
            ("vary".to_string(), "Origin".to_string()),
        ];
        if self.allow_credentials {
            headers.push(("access-control-allow-credentials".into(), "true".into()));
        }
        headers
    }

    fn preflight_headers(&self, origin: &str) -> Vec<(String, String)> {
        let mut headers = self.common_headers(origin);
        headers.push((
            "access-control-allow-methods".into(),
            self.allow_methods_value.clone(),
        ));
        if !self.allow_headers_value.is_empty() {
            headers.push((
                "access-control-allow-headers".into(),
                self.allow_headers_value.clone(),
            ));
        }
        if let Some(age) = self.max_age {
            headers.push(("access-control-max-age".into(), age.to_string()));
        }
        headers
    }

    fn actual_headers(&self, origin: &str) -> Vec<(String, String)> {
        let mut headers = self.common_headers(origin);
        if !self.expose_headers_value.is_empty() {
            headers.push((
                "access-control-expose-headers".into(),
                self.expose_headers_value.clone(),
            ));
        }
        headers
    }
}

fn header_list(names: &[String], path: &str) -> Result<Vec<String>, ConfigError> {
    names
        .iter()
        .enumerate()
        .map(|(i, h)| {
            if h == "*" || is_token(h) {
                Ok(h.to_ascii_lowercase())
            } else {
                Err(ConfigError::new(
                    index(path, i),
                    format!("{h:?} is not a header name"),
                ))
            }
        })
        .collect()
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    }
}

/// Parses a serialised origin: `scheme "://" host [ ":" port ]`, nothing else (no path, no
/// userinfo, no trailing slash). `null` and non-HTTP schemes are not origins we can allow.
fn parse_origin(s: &str) -> Option<Origin> {
    let (scheme, rest) = s.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default = default_port(&scheme)?;
    let (host, port) = split_host_port(rest, default)?;
    if !is_hostname(&host) {
        return None;
    }
    Some(Origin { scheme, host, port })
}

fn split_host_port(rest: &str, default: u16) -> Option<(String, u16)> {
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', '\\']) {
        return None;
    }
    if let Some(v6) = rest.strip_prefix('[') {
        let (addr, after) = v6.split_once(']')?;
        addr.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => default,
            p => parse_port(p.strip_prefix(':')?)?,
        };
        return Some((format!("[{}]", addr.to_ascii_lowercase()), port));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, parse_port(p)?),
        None => (rest, default),
    };
    Some((host.to_ascii_lowercase(), port))
}

fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse().ok()
}

fn is_hostname(host: &str) -> bool {
    if host.starts_with('[') {
        return true; // validated as an IPv6 literal above
    }
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn parse_pattern(raw: &str) -> Result<OriginPattern, String> {
    if raw == "*" {
        return Ok(OriginPattern::Any);
    }
    if raw.eq_ignore_ascii_case("null") {
        return Err("\"null\" origins (sandboxed frames, file: pages) cannot be allowed".into());
    }
    let bad = || {
        format!("{raw:?} is not an origin like https://portal.example.com or https://*.contoso.com")
    };
    let (scheme, rest) = raw.split_once("://").ok_or_else(bad)?;
    let scheme = scheme.to_ascii_lowercase();
    let default = default_port(&scheme).ok_or_else(bad)?;
    if let Some(after) = rest.strip_prefix("*.") {
        let (suffix, port) = split_host_port(after, default).ok_or_else(bad)?;
        if !is_hostname(&suffix) || suffix.starts_with('[') || !suffix.contains('.') {
            return Err(format!(
                "{raw:?}: a wildcard needs a registrable domain after \"*.\" (like *.contoso.com)"
            ));
        }
        return Ok(OriginPattern::Subdomains {
            scheme,
            suffix,
            port,
        });
    }
    if rest.contains('*') {
        return Err(format!(
            "{raw:?}: \"*\" is only allowed as a leading \"*.\" label"
        ));
    }
    parse_origin(raw).map(OriginPattern::Exact).ok_or_else(bad)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn policy(origins: &[&str], credentials: bool) -> CorsPolicy {
        CorsPolicy::compile(
            &CorsConfig {
                allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
                allowed_methods: vec!["GET".into(), "post".into()],
                allowed_headers: vec!["Authorization".into(), "content-type".into()],
                expose_headers: vec!["x-request-id".into()],
                allow_credentials: credentials,
                max_age_seconds: Some(600),
            },
            "apis[0].cors",
        )
        .unwrap()
    }

    fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
        h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn exact_origin_compares_scheme_host_and_port() {
        let p = policy(&["https://portal.example.com"], false);
        assert!(p.origin_allowed("https://portal.example.com"));
        assert!(p.origin_allowed("https://portal.example.com:443"));
        assert!(p.origin_allowed("HTTPS://Portal.Example.com"));
        assert!(!p.origin_allowed("http://portal.example.com"));
        assert!(!p.origin_allowed("https://portal.example.com:8443"));
        assert!(!p.origin_allowed("https://portal.example.com.evil.io"));
        assert!(!p.origin_allowed("https://evilportal.example.com"));
        assert!(!p.origin_allowed("https://portal.example.co"));
        assert!(!p.origin_allowed("https://portal.example.com/"));
        assert!(!p.origin_allowed("https://user@portal.example.com"));
        assert!(!p.origin_allowed("null"));
        assert!(!p.origin_allowed(""));
    }

    #[test]
    fn wildcard_matches_subdomains_of_that_host_only() {
        let p = policy(&["https://*.contoso.com"], false);
        assert!(p.origin_allowed("https://a.contoso.com"));
        assert!(p.origin_allowed("https://a.b.contoso.com"));
        assert!(!p.origin_allowed("https://contoso.com"));
        assert!(!p.origin_allowed("https://evilcontoso.com"));
        assert!(!p.origin_allowed("https://a.contoso.com.evil.io"));
        assert!(!p.origin_allowed("https://.contoso.com"));
        assert!(!p.origin_allowed("http://a.contoso.com"));
        assert!(!p.origin_allowed("https://a.contoso.com:444"));
        assert!(!p.origin_allowed("https://a..contoso.com"));
    }

    #[test]
    fn preflight_for_allowed_origin_and_method_gets_204_headers() {
        let p = policy(&["https://portal.example.com"], true);
        let CorsVerdict::Preflight(h) = p.evaluate(&["https://portal.example.com"], Some("POST"))
        else {
            panic!("expected preflight");
        };
        assert_eq!(
            header(&h, "access-control-allow-origin"),
            Some("https://portal.example.com")
        );
        assert_eq!(
            header(&h, "access-control-allow-methods"),
            Some("GET, POST")
        );
        assert_eq!(
            header(&h, "access-control-allow-headers"),
            Some("authorization, content-type")
        );
        assert_eq!(header(&h, "access-control-max-age"), Some("600"));
        assert_eq!(header(&h, "access-control-allow-credentials"), Some("true"));
        assert_eq!(header(&h, "vary"), Some("Origin"));
    }

    #[test]
    fn preflight_with_disallowed_method_or_origin_is_denied() {
        let p = policy(&["https://portal.example.com"], false);
        assert_eq!(
            p.evaluate(&["https://portal.example.com"], Some("DELETE")),
            CorsVerdict::Denied
        );
        assert_eq!(
            p.evaluate(&["https://evil.example.com"], Some("GET")),
            CorsVerdict::Denied
        );
    }

    #[test]
    fn actual_request_gets_origin_vary_and_expose() {
        let p = policy(&["https://portal.example.com"], false);
        let CorsVerdict::Allowed(h) = p.evaluate(&["https://portal.example.com"], None) else {
            panic!("expected allowed");
        };
        assert_eq!(
            header(&h, "access-control-allow-origin"),
            Some("https://portal.example.com")
        );
        assert_eq!(
            header(&h, "access-control-expose-headers"),
            Some("x-request-id")
        );
        assert_eq!(header(&h, "access-control-allow-credentials"), None);
        assert_eq!(p.evaluate(&[], None), CorsVerdict::NotCors);
        assert_eq!(
            p.evaluate(
                &["https://portal.example.com", "https://portal.example.com"],
                None
            ),
            CorsVerdict::Denied
        );
    }

    #[test]
    fn star_never_echoes_star_and_never_allows_null() {
        let p = policy(&["*"], false);
        let CorsVerdict::Allowed(h) = p.evaluate(&["https://any.example"], None) else {
            panic!("expected allowed");
        };
        assert_eq!(
            header(&h, "access-control-allow-origin"),
            Some("https://any.example")
        );
        assert_eq!(p.evaluate(&["null"], None), CorsVerdict::Denied);
    }

    #[test]
    fn bad_patterns_are_config_errors_naming_the_field() {
        for bad in [
            "portal.example.com",
            "https://portal.example.com/",
            "ftp://x.example",
            "https://a.*.example.com",
            "https://*.com",
            "null",
            "https://host:99999",
        ] {
            let err = CorsPolicy::compile(
                &CorsConfig {
                    allowed_origins: vec!["https://ok.example".into(), bad.into()],
                    allowed_methods: default_methods(),
                    allowed_headers: vec![],
                    expose_headers: vec![],
                    allow_credentials: false,
                    max_age_seconds: None,
                },
                "apis[0].cors",
            )
            .unwrap_err();
            assert_eq!(err.path, "apis[0].cors.allowed_origins[1]", "{bad}");
        }
        let err = CorsPolicy::compile(
            &CorsConfig {
                allowed_origins: vec!["*".into()],
                allowed_methods: default_methods(),
                allowed_headers: vec![],
                expose_headers: vec![],
                allow_credentials: true,
                max_age_seconds: None,
            },
            "apis[0].cors",
        )
        .unwrap_err();
        assert!(err.reason.contains("allow_credentials"));
    }
}
