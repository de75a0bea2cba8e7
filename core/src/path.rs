//! Request paths: one normal form for routing, the path the way a backend will read it, so that
//! percent-encoding, `;` parameters, dot segments, doubled slashes or letter case cannot move a
//! request from a strict API to a lenient one (docs/policy.md, "Path matching").
//!
//! Backends disagree on what a path means: ASP.NET Core (Azure Functions) and Node decode `%24`
//! to `$`; servlet containers drop `;` parameters and resolve `..;`; some frameworks decode
//! twice or fold Unicode letters to ASCII. Routing reads the most-decoded form, and anything
//! that two common backends would still read differently is refused (400), never guessed.

use crate::hex;

/// A request target split and normalised for routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPath<'a> {
    /// Every percent-escape decoded, `;` parameters dropped from each segment, slashes merged.
    pub normalized: String,
    /// The raw query string after `?`, if any.
    pub query: Option<&'a str>,
    /// The raw path before `?`, as the client sent it (and as it goes upstream).
    pub raw: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    BadEscape,
    /// `%2F`, `%3F`, `%23`, `%5C`, a backslash or a control character: something a backend may
    /// read as a separator or terminator when we would not.
    AmbiguousCharacter,
    /// `%25` followed by two hex digits, plain or escaped (`%252e`, `%25%32%65`): a backend that
    /// decodes twice reads another path.
    DoubleEncoding,
    /// Not UTF-8 once decoded (overlong forms such as `%C0%AE` included), or a letter that some
    /// backends fold to ASCII (`ı`, `ſ`, the Kelvin sign...), or a full-width `.`, `/`, `\`.
    AmbiguousUnicode,
    DotSegment,
    /// A segment ending in `.` or a space, which Windows servers strip.
    TrailingDotOrSpace,
    TooLong,
}

impl PathError {
    pub fn reason(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "path is not absolute",
            PathError::BadEscape => "invalid percent-escape in path",
            PathError::AmbiguousCharacter => {
                "encoded slash, question mark or hash, backslash or control character in path"
            }
            PathError::DoubleEncoding => "double percent-encoding in path",
            PathError::AmbiguousUnicode => "invalid or ambiguous Unicode in path",
            PathError::DotSegment => "dot segment in path",
            PathError::TrailingDotOrSpace => "path segment ends with a dot or space",
            PathError::TooLong => "path too long",
        }
    }
}

const MAX_PATH: usize = 8192;

/// Characters some backend folds into an ASCII letter or separator (case-insensitive routing
/// with Unicode case mapping, NFKC): a prefix could not be matched the way they would be.
const FOLDS_TO_ASCII: [char; 7] = [
    '\u{0130}', // İ, lower-cases to i
    '\u{0131}', // ı, upper-cases to I
    '\u{017F}', // ſ, upper-cases to S
    '\u{212A}', // Kelvin sign, lower-cases to k
    '\u{FF0E}', // full-width .
    '\u{FF0F}', // full-width /
    '\u{FF3C}', // full-width \
];

/// Characters that NFKC (or Windows' best-fit mapping) turns into ASCII letters, dots or
/// slashes: full- and half-width forms, small form variants, dot leaders, slash look-alikes.
fn is_compatibility_form(c: char) -> bool {
    matches!(c,
        '\u{FF00}'..='\u{FFEF}'
        | '\u{FE50}'..='\u{FE6F}'
        | '\u{2024}'..='\u{2026}'
        | '\u{2044}' | '\u{2215}' | '\u{2216}' | '\u{29F5}' | '\u{29F8}' | '\u{29F9}')
}

pub fn normalize(target: &str) -> Result<RequestPath<'_>, PathError> {
    let (raw, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let raw = raw.split('#').next().unwrap_or_default();
    if raw.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let decoded =
        String::from_utf8(percent_decode(raw)?).map_err(|_| PathError::AmbiguousUnicode)?;
    if decoded.contains(FOLDS_TO_ASCII) || decoded.chars().any(is_compatibility_form) {
        return Err(PathError::AmbiguousUnicode);
    }
    let mut normalized = String::with_capacity(decoded.len());
    for segment in decoded.split('/') {
        // `;` parameters are not part of the resource a servlet container routes to.
        let name = segment.split(';').next().unwrap_or_default();
        if name.is_empty() {
            continue;
        }
        // `.`, `..`, and what Windows and old servers read as them (`...`, `.. `).
        if name.trim_end_matches([' ', '.']).is_empty() {
            return Err(PathError::DotSegment);
        }
        // Windows (IIS, http.sys) drops trailing dots and spaces: `admin.` may be `admin`.
        if name.ends_with(['.', ' ']) {
            return Err(PathError::TrailingDotOrSpace);
        }
        normalized.push('/');
        normalized.push_str(name);
    }
    if normalized.is_empty() || decoded.ends_with('/') {
        normalized.push('/');
    }
    Ok(RequestPath {
        normalized,
        query,
        raw,
    })
}

/// Decodes every `%XX`; refuses what decodes to a separator or control character, and escapes
/// of `%` itself that a second decoding would turn into another octet.
fn percent_decode(raw: &str) -> Result<Vec<u8>, PathError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some((&b, after)) = rest.split_first() {
        let octet = if b == b'%' {
            let (Some(hi), Some(lo)) = (
                after.first().copied().and_then(hex::nibble),
                after.get(1).copied().and_then(hex::nibble),
            ) else {
                return Err(PathError::BadEscape);
            };
            rest = after.get(2..).unwrap_or_default();
            let octet = (hi << 4) | lo;
            if octet == b'%' {
                let next = (rest.first().copied(), rest.get(1).copied());
                if let (Some(a), Some(b)) = next {
                    if hex::nibble(a).is_some() && hex::nibble(b).is_some() {
                        return Err(PathError::DoubleEncoding);
                    }
                }
            }
            // A backend that decodes and then parses the URL again ends the path at a decoded
            // `?` or `#`: `/admin%3F/x` would be `/admin` there and `/admin?/x` here.
            if matches!(octet, b'/' | b'?' | b'#') {
                return Err(PathError::AmbiguousCharacter);
            }
            octet
        } else {
            rest = after;
            b
        };
        if octet == b'\\' || octet < 0x20 || octet == 0x7f {
            return Err(PathError::AmbiguousCharacter);
        }
        out.push(octet);
    }
    // The same once decoded: `%25%34%31` is `%41` after one decoding and `A` after two.
    if out.windows(3).any(
        |w| matches!(w, [b'%', a, b] if hex::nibble(*a).is_some() && hex::nibble(*b).is_some()),
    ) {
        return Err(PathError::DoubleEncoding);
    }
    Ok(out)
}

/// Does `prefix` (validated at compile time: starts with `/`, no trailing `/` unless it is `/`)
/// match `path` on a segment boundary? Case-insensitive: Azure Functions routes are.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let Some((head, rest)) = path.as_bytes().split_at_checked(prefix.len()) else {
        return false;
    };
    head.eq_ignore_ascii_case(prefix.as_bytes()) && rest.first().is_none_or(|&c| c == b'/')
}

/// Validates a policy's `path_prefix`.
pub fn validate_prefix(prefix: &str) -> Result<(), String> {
    if prefix == "/" {
        return Ok(());
    }
    if !prefix.starts_with('/') {
        return Err(format!("{prefix:?} must start with \"/\""));
    }
    if prefix.ends_with('/') {
        return Err(format!(
            "{prefix:?} must not end with \"/\" (\"/api\" already matches \"/api/...\")"
        ));
    }
    match normalize(prefix) {
        Ok(p)
            if p.normalized == prefix
                && p.query.is_none()
                && prefix.is_ascii()
                && !prefix.contains(['%', '#', ';']) =>
        {
            Ok(())
        }
        Err(e) => Err(format!(
            "{prefix:?} is not a path a request can match ({})",
            e.reason()
        )),
        Ok(_) => Err(format!(
            "{prefix:?} must be a plain ASCII path: no \"//\", dot segments, \"%\", \";\", \"?\" or \"#\""
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn norm(s: &str) -> Result<String, PathError> {
        normalize(s).map(|p| p.normalized)
    }

    #[test]
    fn query_is_split_off() {
        let p = normalize("/api/x?subscription-key=k&a=b").unwrap();
        assert_eq!(p.normalized, "/api/x");
        assert_eq!(p.query, Some("subscription-key=k&a=b"));
        assert_eq!(p.raw, "/api/x");
    }

    #[test]
    fn every_escape_decodes_and_slashes_merge() {
        assert_eq!(norm("/%61pi/x").unwrap(), "/api/x");
        assert_eq!(norm("//api///x").unwrap(), "/api/x");
        assert_eq!(norm("/api/a%20b").unwrap(), "/api/a b");
        assert_eq!(norm("/odata/%24metadata").unwrap(), "/odata/$metadata");
        assert_eq!(norm("/odata/%24METADATA").unwrap(), "/odata/$METADATA");
        assert_eq!(norm("/api/a%c3%a9").unwrap(), "/api/a\u{e9}");
        assert_eq!(norm("/api/caf\u{e9}").unwrap(), "/api/caf\u{e9}");
        assert_eq!(norm("/").unwrap(), "/");
        assert_eq!(norm("/api/").unwrap(), "/api/");
        // A lone `%25` is a literal percent sign.
        assert_eq!(norm("/api/100%25").unwrap(), "/api/100%");
        assert_eq!(norm("/api/100%25x").unwrap(), "/api/100%x");
    }

    #[test]
    fn semicolon_parameters_are_ignored_in_every_segment() {
        assert_eq!(norm("/api/admin;x/users").unwrap(), "/api/admin/users");
        assert_eq!(norm("/api;v=1/admin;jsessionid=1").unwrap(), "/api/admin");
        assert_eq!(norm("/api/admin%3Bx/users").unwrap(), "/api/admin/users");
        assert_eq!(norm("/api/;x/admin").unwrap(), "/api/admin");
        assert_eq!(norm("/;/api").unwrap(), "/api");
    }

    #[test]
    fn dot_segments_are_refused_in_every_spelling() {
        for p in [
            "/api/../admin",
            "/api/./admin",
            "/api/.",
            "/api/..",
            "/api/%2e%2e/admin",
            "/api/%2E./admin",
            "/api/x/%2e%2e;/admin/users",
            "/api/x/..;/admin/users",
            "/api/x/..;jsessionid=1/admin",
            "/api/x/.;/admin",
            "/api/x/...",
            "/api/x/.. /admin",
            "/api/x/..%20/admin",
            "/api/x/.%2e/admin",
        ] {
            assert_eq!(norm(p), Err(PathError::DotSegment), "{p}");
        }
        for p in [
            "/api/admin./users",
            "/api/admin%2e/users",
            "/api/admin%20/x",
            "/api/admin.;x/y",
        ] {
            assert_eq!(norm(p), Err(PathError::TrailingDotOrSpace), "{p}");
        }
        // Dots inside names are fine.
        assert_eq!(norm("/api/v1.2/..x").unwrap(), "/api/v1.2/..x");
        assert_eq!(norm("/api/.well-known").unwrap(), "/api/.well-known");
    }

    #[test]
    fn separators_controls_and_double_encoding_are_refused() {
        for p in [
            "/api%2Fx",
            "/admin%3F/x",
            "/admin%3f",
            "/admin%23/x",
            "/api%2fx",
            "/api%5cx",
            "/api%5Cx",
            "/api\\x",
            "/api%00",
            "/api%0a",
            "/api%7f",
            "/api/a\tb",
        ] {
            assert_eq!(norm(p), Err(PathError::AmbiguousCharacter), "{p}");
        }
        for p in [
            "/api/%252e%252e/admin",
            "/api%252Fx",
            "/odata/%2524metadata",
        ] {
            assert_eq!(norm(p), Err(PathError::DoubleEncoding), "{p}");
        }
        assert_eq!(norm("/api%zz"), Err(PathError::BadEscape));
        assert_eq!(norm("/api%4"), Err(PathError::BadEscape));
        assert_eq!(norm("/api/%u002e%u002e/admin"), Err(PathError::BadEscape));
        assert_eq!(norm("api"), Err(PathError::NotAbsolute));
        assert_eq!(norm("*"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn unicode_that_backends_read_differently_is_refused() {
        for p in [
            "/%C0%AE%C0%AE/admin",
            "/api/%C0%AF",
            "/api/%ff",
            "/ap\u{131}/admin",
            "/ap%C4%B1/admin",
            "/api/\u{17F}ecret",
            "/api/\u{212A}ey",
            "/api/\u{FF0E}\u{FF0E}/admin",
            "/api\u{FF0F}admin",
            "/api/\u{FF41}dmin",
            "/api/%EF%BD%81dmin",
            "/api/x/\u{2025}/admin",
            "/api/x/\u{FE52}\u{FE52}/admin",
            "/api/x\u{FE68}admin",
            "/api/x\u{2216}admin",
        ] {
            assert_eq!(norm(p), Err(PathError::AmbiguousUnicode), "{p}");
        }
    }

    #[test]
    fn prefixes_match_on_segment_boundaries_case_insensitively() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(prefix_matches("/api", "/API/x"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(!prefix_matches("/api", "/ap"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn prefixes_are_validated() {
        assert!(validate_prefix("/api").is_ok());
        assert!(validate_prefix("/api/v1").is_ok());
        assert!(validate_prefix("/").is_ok());
        assert!(validate_prefix("api").is_err());
        assert!(validate_prefix("/api/").is_err());
        assert!(validate_prefix("/a//b").is_err());
        assert!(validate_prefix("/a/../b").is_err());
        assert!(validate_prefix("/a%20b").is_err());
        assert!(validate_prefix("/a?b").is_err());
        assert!(validate_prefix("/a;b").is_err());
        assert!(validate_prefix("/caf\u{e9}").is_err());
        assert!(validate_prefix("/odata/$metadata").is_ok());
        let err = validate_prefix("/api/admin.").unwrap_err();
        assert!(err.contains("ends with a dot or space"), "{err}");
    }
}
