//! HTTP header names and values: what a valid one is, which ones the gateway may set, and how
//! backends read them. CGI and WSGI servers (and the frameworks on them) turn `x-user-id` and
//! `x_user_id` into the same `HTTP_X_USER_ID`, so a header the gateway sets or consumes must be
//! removed from the client's request in every spelling: any case, `_` for `-`.

/// Do two header names reach a backend as the same header?
pub fn same_header_name(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| fold(x) == fold(y))
}

fn fold(b: u8) -> u8 {
    match b {
        b'_' => b'-',
        _ => b.to_ascii_lowercase(),
    }
}

/// Every name in `headers` that spells one of `owned`, once each: what to remove before the
/// request goes upstream. A name the client did not send has nothing to remove (and costs the
/// filter no host call).
pub fn every_spelling(owned: Vec<String>, headers: &[(String, String)]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (name, _) in headers {
        let is_owned = owned.iter().any(|o| same_header_name(o, name));
        if is_owned && !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// Headers that ask a backend (ASP.NET, Express's method-override, Spring's HiddenHttpMethod,
/// Rails, Laravel) to treat the request as another method.
pub const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Headers that make IIS (URL Rewrite), ASP.NET and Symfony serve another path than `:path`: the
/// gateway routed on `:path`, so they never reach a backend.
pub const PATH_OVERRIDE_HEADERS: [&str; 2] = ["x-original-url", "x-rewrite-url"];

/// The query parameter form frameworks accept for the same purpose.
pub const METHOD_OVERRIDE_QUERY: &str = "_method";

/// RFC 9110 `token`: what method and header names are made of.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Headers the gateway sets upstream: valid names that do not change how the request is
/// routed or framed.
pub fn check_upstream_header_name(name: &str) -> Result<(), String> {
    if !is_token(name) {
        return Err(format!("{name:?} is not a header name"));
    }
    const RESERVED: &[&str] = &[
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-connection",
        "authorization",
        "cookie",
    ];
    let lower = name.to_ascii_lowercase();
    if RESERVED.contains(&lower.as_str()) {
        return Err(format!("{name:?} cannot be set by the gateway"));
    }
    Ok(())
}

pub fn is_header_value(v: &str) -> bool {
    v.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn pairs(names: &[&str]) -> Vec<(String, String)> {
        names
            .iter()
            .map(|n| (n.to_string(), "v".to_string()))
            .collect()
    }

    #[test]
    fn spellings_fold_case_and_underscores() {
        assert!(same_header_name("x-user-id", "X_USER_ID"));
        assert!(same_header_name("x-user-id", "x_user-id"));
        assert!(!same_header_name("x-user-id", "x-user-idx"));
        assert!(!same_header_name("x-user-id", "xuser-id"));
    }

    #[test]
    fn every_spelling_the_client_sent_is_listed_once() {
        let headers = pairs(&[
            "x_user_id",
            "x-user-id",
            "x_USER-id",
            "x-other",
            "x_user_idx",
        ]);
        let names = every_spelling(vec!["x-user-id".into()], &headers);
        assert_eq!(names, vec!["x_user_id", "x-user-id", "x_USER-id"]);
        // Nothing sent, nothing to remove.
        assert!(every_spelling(vec!["x-user-id".into()], &pairs(&["x-other"])).is_empty());
    }
}
