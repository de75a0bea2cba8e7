//! Request paths: one normal form for routing, so that percent-encoding, dot segments, doubled
//! slashes or letter case cannot move a request from a strict API to a lenient one.

/// A request target split and normalised for routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPath<'a> {
    /// Unreserved percent-escapes decoded, slashes merged; other escapes kept (upper-case hex).
    pub normalized: String,
    /// The raw query string after `?`, if any.
    pub query: Option<&'a str>,
    /// The raw path before `?`, as the client sent it.
    pub raw: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    BadEscape,
    /// `%2F`, `%5C`, a backslash or a control character: something a backend may read as a
    /// separator or terminator when we would not.
    AmbiguousCharacter,
    DotSegment,
    TooLong,
}

impl PathError {
    pub fn reason(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "path is not absolute",
            PathError::BadEscape => "invalid percent-escape in path",
            PathError::AmbiguousCharacter => {
                "encoded slash, backslash or control character in path"
            }
            PathError::DotSegment => "dot segment in path",
            PathError::TooLong => "path too long",
        }
    }
}

const MAX_PATH: usize = 8192;

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
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex_value);
            let lo = bytes.get(i + 2).copied().and_then(hex_value);
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(PathError::BadEscape);
            };
            let decoded = (hi << 4) | lo;
            if decoded.is_ascii_alphanumeric() || b"-._~".contains(&decoded) {
                out.push(char::from(decoded));
            } else if decoded == b'/' || decoded == b'\\' || decoded < 0x20 || decoded == 0x7f {
                return Err(PathError::AmbiguousCharacter);
            } else {
                out.push('%');
                out.push(char::from(b"0123456789ABCDEF"[usize::from(hi)]));
                out.push(char::from(b"0123456789ABCDEF"[usize::from(lo)]));
            }
            i += 3;
            continue;
        }
        if b == b'\\' || b < 0x20 || b == 0x7f {
            return Err(PathError::AmbiguousCharacter);
        }
        if b == b'/' && out.ends_with('/') {
            i += 1;
            continue;
        }
        if b.is_ascii() {
            out.push(char::from(b));
            i += 1;
        } else {
            // Raw non-ASCII bytes: keep them escaped so the normal form stays ASCII.
            out.push_str(&format!("%{b:02X}"));
            i += 1;
        }
    }
    if out.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(PathError::DotSegment);
    }
    Ok(RequestPath {
        normalized: out,
        query,
        raw,
    })
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Does `prefix` (validated at compile time: starts with `/`, no trailing `/` unless it is `/`)
/// match `path` on a segment boundary? Case-insensitive: Azure Functions routes are.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let (p, n) = (prefix.as_bytes(), path.as_bytes());
    n.len() >= p.len()
        && n[..p.len()].eq_ignore_ascii_case(p)
        && (n.len() == p.len() || n[p.len()] == b'/')
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
        Ok(p) if p.normalized == prefix && p.query.is_none() && !prefix.contains(['%', '#']) => {
            Ok(())
        }
        _ => Err(format!(
            "{prefix:?} must be a plain path: no \"//\", dot segments, \"%\", \"?\" or \"#\""
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
    fn unreserved_escapes_decode_and_slashes_merge() {
        assert_eq!(norm("/%61pi/x").unwrap(), "/api/x");
        assert_eq!(norm("//api///x").unwrap(), "/api/x");
        assert_eq!(norm("/api/a%20b").unwrap(), "/api/a%20b");
        assert_eq!(norm("/api/a%c3%a9").unwrap(), "/api/a%C3%A9");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        assert_eq!(norm("/api/../admin"), Err(PathError::DotSegment));
        assert_eq!(norm("/api/%2e%2e/admin"), Err(PathError::DotSegment));
        assert_eq!(norm("/api/."), Err(PathError::DotSegment));
        assert_eq!(norm("/api%2Fx"), Err(PathError::AmbiguousCharacter));
        assert_eq!(norm("/api%5cx"), Err(PathError::AmbiguousCharacter));
        assert_eq!(norm("/api\\x"), Err(PathError::AmbiguousCharacter));
        assert_eq!(norm("/api%00"), Err(PathError::AmbiguousCharacter));
        assert_eq!(norm("/api%zz"), Err(PathError::BadEscape));
        assert_eq!(norm("/api%4"), Err(PathError::BadEscape));
        assert_eq!(norm("api"), Err(PathError::NotAbsolute));
        assert_eq!(norm("*"), Err(PathError::NotAbsolute));
        // Dots inside names are fine.
        assert_eq!(norm("/api/v1.2/..x").unwrap(), "/api/v1.2/..x");
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
    }
}
