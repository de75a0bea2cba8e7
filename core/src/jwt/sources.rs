//! `jwt.token_sources` (docs/policy.md, "Where the token comes from"): the places a client may
//! put its token, in order. Exactly one token per request, whatever the number of places: two
//! tokens (in one place or in two) are refused, never chosen between.

use serde::Deserialize;

use super::JwtError;
use crate::error::{index, join, ConfigError};
use crate::headers::is_token;
use crate::query::{query_values, spells};

/// One entry of `jwt.token_sources`: exactly one of `header`, `query`, `cookie`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct TokenSourceConfig {
    /// A request header; with `scheme`, its value is `<scheme> <token>`.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub header: Option<String>,
    /// The authentication scheme before the token (`Bearer`, `DPoP`), compared ignoring case.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub scheme: Option<String>,
    /// A query parameter; always removed before the request goes upstream.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub query: Option<String>,
    /// A cookie; removed from the `Cookie` header before the request goes upstream unless
    /// `forward` is true.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub cookie: Option<String>,
    /// For a cookie: keep it in the `Cookie` header the backend receives.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub forward: Option<bool>,
}

/// The default: `Authorization: Bearer <token>`.
pub fn default_sources() -> Vec<TokenSourceConfig> {
    vec![TokenSourceConfig {
        header: Some("authorization".into()),
        scheme: Some("Bearer".into()),
        ..TokenSourceConfig::default()
    }]
}

pub fn is_default_sources(list: &[TokenSourceConfig]) -> bool {
    list == default_sources().as_slice()
}

/// Whether compiled sources mean the default, `Authorization: Bearer` only, however spelled.
pub fn is_authorization_bearer_only(sources: &[TokenSource]) -> bool {
    matches!(sources, [TokenSource::Header { name, scheme: Some(s) }]
        if name == "authorization" && s.eq_ignore_ascii_case("bearer"))
}

/// A compiled token source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// Lower-case header name, and the scheme if the value carries one.
    Header {
        name: String,
        scheme: Option<String>,
    },
    Query(String),
    Cookie {
        name: String,
        forward: bool,
    },
}

impl TokenSource {
    pub fn compile(cfg: &TokenSourceConfig, path: &str) -> Result<Self, ConfigError> {
        let kinds = [&cfg.header, &cfg.query, &cfg.cookie]
            .iter()
            .filter(|k| k.is_some())
            .count();
        if kinds != 1 {
            return Err(ConfigError::new(
                path,
                "needs exactly one of \"header\", \"query\" or \"cookie\"",
            ));
        }
        if cfg.scheme.is_some() && cfg.header.is_none() {
            return Err(ConfigError::new(
                join(path, "scheme"),
                "only a \"header\" source has a scheme",
            ));
        }
        if cfg.forward.is_some() && cfg.cookie.is_none() {
            return Err(ConfigError::new(
                join(path, "forward"),
                "only a \"cookie\" source is forwarded or not (a header token stays, a query \
                 token is always removed)",
            ));
        }
        if let Some(name) = &cfg.header {
            // Pseudo-headers and `cookie` (a "cookie" source reads it) are not token headers.
            if !is_token(name) || name.eq_ignore_ascii_case("cookie") {
                return Err(ConfigError::new(
                    join(path, "header"),
                    format!("{name:?} is not a header a token can come in"),
                ));
            }
            let scheme = match &cfg.scheme {
                None => None,
                Some(s) if is_token68_scheme(s) => Some(s.clone()),
                Some(_) => {
                    return Err(ConfigError::new(
                        join(path, "scheme"),
                        "must be one word of letters, digits and -._~+ (such as \"Bearer\")",
                    ))
                }
            };
            return Ok(TokenSource::Header {
                name: name.to_ascii_lowercase(),
                scheme,
            });
        }
        if let Some(name) = &cfg.query {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'&' && b != b'=' && b != b';')
            {
                return Err(ConfigError::new(
                    join(path, "query"),
                    "must be a non-empty parameter name without spaces, '&', ';' or '='",
                ));
            }
            return Ok(TokenSource::Query(name.clone()));
        }
        let name = cfg.cookie.clone().unwrap_or_default();
        if !is_token(&name) {
            return Err(ConfigError::new(
                join(path, "cookie"),
                "must be a cookie name (letters, digits and !#$%&'*+-.^_`|~)",
            ));
        }
        Ok(TokenSource::Cookie {
            name,
            forward: cfg.forward.unwrap_or(false),
        })
    }
}

fn is_token68_scheme(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+".contains(&b))
}

/// Compiles `jwt.token_sources`: at least one, no place twice.
pub fn compile_sources(
    list: &[TokenSourceConfig],
    path: &str,
) -> Result<Vec<TokenSource>, ConfigError> {
    let field = join(path, "token_sources");
    if list.is_empty() {
        return Err(ConfigError::new(field, "must list at least one place"));
    }
    let mut out: Vec<TokenSource> = Vec::new();
    for (i, cfg) in list.iter().enumerate() {
        let source = TokenSource::compile(cfg, &index(&field, i))?;
        let same_place = out.iter().any(|o| match (o, &source) {
            (TokenSource::Header { name: a, .. }, TokenSource::Header { name: b, .. }) => {
                crate::headers::same_header_name(a, b)
            }
            (TokenSource::Query(a), TokenSource::Query(b)) => a.eq_ignore_ascii_case(b),
            (TokenSource::Cookie { name: a, .. }, TokenSource::Cookie { name: b, .. }) => a == b,
            _ => false,
        });
        if same_place {
            return Err(ConfigError::new(
                index(&field, i),
                "the same place is listed twice",
            ));
        }
        out.push(source);
    }
    Ok(out)
}

/// The authentication scheme of DPoP-bound tokens (RFC 9449 §7.1).
pub const DPOP_SCHEME: &str = "DPoP";

/// Where the request's one token was found, so the pipeline can take it out of the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Header,
    /// `Authorization: DPoP <token>`: a proof must come with it.
    Dpop,
    /// The query parameter to remove.
    Query(String),
    /// The cookie to remove from `Cookie` (none when it is forwarded).
    Cookie(Option<String>),
}

/// The request's one token and where it was. `headers` are the request's (lower-case names),
/// `query` its raw query string. No token, a malformed one, or more than one token →
/// [`JwtError::MissingHeader`].
pub fn find_token(
    sources: &[TokenSource],
    headers: &[(String, String)],
    query: Option<&str>,
) -> Result<(String, Found), JwtError> {
    let mut found: Option<(String, Found)> = None;
    let mut keep = |token: String, at: Found| {
        if found.is_some() {
            return Err(JwtError::MissingHeader);
        }
        found = Some((token, at));
        Ok(())
    };
    for source in sources {
        match source {
            TokenSource::Header { name, scheme } => {
                let values: Vec<&str> = headers
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.as_str())
                    .collect();
                let at = match scheme {
                    Some(s) if s.eq_ignore_ascii_case(DPOP_SCHEME) => Found::Dpop,
                    _ => Found::Header,
                };
                for value in values {
                    if let Some(token) = header_token(value, scheme.as_deref())? {
                        keep(token.to_string(), at.clone())?;
                    }
                }
            }
            TokenSource::Query(name) => {
                for value in query.map(|q| query_values(q, name)).unwrap_or_default() {
                    let token = String::from_utf8(value).map_err(|_| JwtError::MissingHeader)?;
                    keep(checked(&token)?.to_string(), Found::Query(name.clone()))?;
                }
            }
            TokenSource::Cookie { name, forward } => {
                for value in cookie_values(headers, name) {
                    let removal = (!forward).then(|| name.clone());
                    keep(checked(value)?.to_string(), Found::Cookie(removal))?;
                }
            }
        }
    }
    found.ok_or(JwtError::MissingHeader)
}

/// The token in one header value: `Some` when the value is this source's (its scheme, or any
/// value without one), `None` when it belongs to another scheme.
fn header_token<'a>(value: &'a str, scheme: Option<&str>) -> Result<Option<&'a str>, JwtError> {
    let value = value.trim_matches([' ', '\t']);
    let Some(scheme) = scheme else {
        return checked(value).map(Some);
    };
    let (given, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
    if !given.eq_ignore_ascii_case(scheme) {
        return Ok(None);
    }
    checked(rest.trim_matches([' ', '\t'])).map(Some)
}

/// One token, or malformed: empty, or several words or list items.
fn checked(token: &str) -> Result<&str, JwtError> {
    if token.is_empty() || token.contains([' ', '\t', ',', ';']) {
        return Err(JwtError::MissingHeader);
    }
    Ok(token)
}

/// Every value of cookie `name` across the request's `Cookie` headers (quotes removed), in
/// every spelling a backend may read as it (ASP.NET compares cookie names ignoring case, PHP
/// reads `.` as `_` and decodes them): like a query parameter's.
fn cookie_values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k == "cookie")
        .flat_map(|(_, v)| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(k, _)| spells(k.trim(), name))
        .map(|(_, v)| {
            let v = v.trim();
            v.strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v)
        })
        .collect()
}

/// The `Cookie` header without cookie `name` in any spelling: `None` when nothing else is
/// left.
pub fn cookie_without(headers: &[(String, String)], name: &str) -> Option<String> {
    let rest: Vec<&str> = headers
        .iter()
        .filter(|(k, _)| k == "cookie")
        .flat_map(|(_, v)| v.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .filter(|pair| !spells(pair.split_once('=').map_or(*pair, |(k, _)| k).trim(), name))
        .collect();
    (!rest.is_empty()).then(|| rest.join("; "))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sources(v: serde_json::Value) -> Result<Vec<TokenSource>, ConfigError> {
        let list: Vec<TokenSourceConfig> = serde_json::from_value(v).unwrap();
        compile_sources(&list, "jwt")
    }

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn bad_sources_name_the_field() {
        for (v, field) in [
            (json!([]), "jwt.token_sources"),
            (json!([{}]), "jwt.token_sources[0]"),
            (
                json!([{"header": "a", "query": "b"}]),
                "jwt.token_sources[0]",
            ),
            (
                json!([{"query": "a", "scheme": "Bearer"}]),
                "jwt.token_sources[0].scheme",
            ),
            (
                json!([{"header": "a", "forward": true}]),
                "jwt.token_sources[0].forward",
            ),
            (json!([{"header": "a b"}]), "jwt.token_sources[0].header"),
            (
                json!([{"header": "x", "scheme": "Bea rer"}]),
                "jwt.token_sources[0].scheme",
            ),
            (json!([{"query": "a&b"}]), "jwt.token_sources[0].query"),
            (json!([{"cookie": "a;b"}]), "jwt.token_sources[0].cookie"),
            (
                json!([{"cookie": "t"}, {"cookie": "t"}]),
                "jwt.token_sources[1]",
            ),
            (
                json!([{"header": "X-Tok"}, {"header": "x_tok"}]),
                "jwt.token_sources[1]",
            ),
        ] {
            let err = sources(v.clone()).unwrap_err();
            assert_eq!(err.path, field, "{v}: {err}");
        }
    }

    #[test]
    fn exactly_one_token_from_all_the_places() {
        let s = sources(json!([
            {"header": "authorization", "scheme": "Bearer"},
            {"query": "access_token"},
            {"cookie": "access_token"}
        ]))
        .unwrap();
        let ok = |headers: &[(&str, &str)], query: Option<&str>| find_token(&s, &h(headers), query);
        assert_eq!(
            ok(&[("authorization", "bearer a.b.c")], None).unwrap(),
            ("a.b.c".into(), Found::Header)
        );
        assert_eq!(
            ok(&[], Some("x=1&access_token=a.b.c")).unwrap(),
            ("a.b.c".into(), Found::Query("access_token".into()))
        );
        assert_eq!(
            ok(&[("cookie", "theme=dark; access_token=\"a.b.c\"")], None).unwrap(),
            ("a.b.c".into(), Found::Cookie(Some("access_token".into())))
        );
        // Another scheme in the header is not a token for this source.
        assert_eq!(
            ok(
                &[
                    ("authorization", "Basic dXNlcg=="),
                    ("cookie", "access_token=a.b.c")
                ],
                None
            )
            .unwrap()
            .0,
            "a.b.c"
        );
        // No token, a malformed one, two in one place or in two places: refused.
        for (headers, query) in [
            (vec![], None),
            (vec![("authorization", "Bearer")], None),
            (vec![("authorization", "Bearer a b")], None),
            (vec![("authorization", "Bearer a,b")], None),
            (
                vec![("authorization", "Bearer a"), ("authorization", "Bearer b")],
                None,
            ),
            (vec![("authorization", "Bearer a")], Some("access_token=b")),
            (vec![], Some("access_token=a&access_token=b")),
            (vec![], Some("access_token=a&ACCESS_TOKEN=b")),
            (vec![], Some("access_token=")),
            (vec![("cookie", "access_token=a; access_token=b")], None),
            (vec![("cookie", "access_token=a; ACCESS_TOKEN=b")], None),
            (vec![("cookie", "access.token=a; access_token=b")], None),
            (
                vec![("cookie", "access_token=a"), ("cookie", "Access_Token=b")],
                None,
            ),
            (vec![("cookie", "access_token=a")], Some("access_token=a")),
            (vec![("cookie", "access_token=")], None),
        ] {
            assert_eq!(
                ok(&headers, query),
                Err(JwtError::MissingHeader),
                "{headers:?} {query:?}"
            );
        }
    }

    #[test]
    fn a_header_without_scheme_is_the_token_itself() {
        let s = sources(json!([{"header": "X-JWT-Assertion"}])).unwrap();
        assert_eq!(
            find_token(&s, &h(&[("x-jwt-assertion", " a.b.c ")]), None).unwrap(),
            ("a.b.c".into(), Found::Header)
        );
        assert!(find_token(&s, &h(&[("authorization", "Bearer a.b.c")]), None).is_err());
    }

    #[test]
    fn the_token_cookie_leaves_the_cookie_header() {
        let headers = h(&[("cookie", "a=1; access_token=x.y.z;b=2")]);
        assert_eq!(
            cookie_without(&headers, "access_token").as_deref(),
            Some("a=1; b=2")
        );
        let spelled = h(&[("cookie", "a=1; ACCESS_TOKEN=x.y.z")]);
        assert_eq!(
            cookie_without(&spelled, "access_token").as_deref(),
            Some("a=1")
        );
        let only = h(&[("cookie", "access_token=x.y.z")]);
        assert_eq!(cookie_without(&only, "access_token"), None);
        let kept = sources(json!([{"cookie": "access_token", "forward": true}])).unwrap();
        assert_eq!(
            find_token(&kept, &headers, None).unwrap().1,
            Found::Cookie(None)
        );
    }
}
