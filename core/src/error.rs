//! Configuration errors: every refusal of a policy names the JSON path of the field and why.

use std::fmt;

/// A policy that cannot be compiled. `path` is a JSON path such as `apis[0].ip_filter.allow[2]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
    /// 1-based line and column in the policy document, when known (syntax and type errors).
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
            line: None,
            column: None,
        }
    }

    pub fn at(mut self, line: usize, column: usize) -> Self {
        self.line = Some(line);
        self.column = Some(column);
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "$"
        } else {
            &self.path
        };
        write!(f, "{path}: {}", self.reason)?;
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, " (line {line}, column {column})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Every error found in a policy: the first one the document meets, then the others that do not
/// depend on it (another API's, another section's). Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    first: ConfigError,
    more: Vec<ConfigError>,
}

/// How many errors the filter's log line lists before "and N more".
pub const LOGGED_ERRORS: usize = 10;

impl ConfigErrors {
    /// `None` for an empty list.
    pub fn from_vec(list: Vec<ConfigError>) -> Option<Self> {
        let mut list = list.into_iter();
        let first = list.next()?;
        Some(Self {
            first,
            more: list.collect(),
        })
    }

    pub fn first(&self) -> &ConfigError {
        &self.first
    }

    pub fn into_first(self) -> ConfigError {
        self.first
    }

    pub fn len(&self) -> usize {
        self.more.len().saturating_add(1)
    }

    /// Always false: there is at least one error.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn iter(&self) -> impl Iterator<Item = &ConfigError> {
        std::iter::once(&self.first).chain(&self.more)
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(first: ConfigError) -> Self {
        Self {
            first,
            more: Vec::new(),
        }
    }
}

/// One line, as the filter logs it: the first [`LOGGED_ERRORS`] errors, then how many more.
impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.more.is_empty() {
            return write!(f, "{}", self.first);
        }
        write!(f, "{} errors:", self.len())?;
        for (i, e) in self.iter().take(LOGGED_ERRORS).enumerate() {
            write!(f, " [{}] {e}", i.saturating_add(1))?;
        }
        if self.len() > LOGGED_ERRORS {
            write!(
                f,
                " ... and {} more (`gateguard validate` lists them all)",
                self.len().saturating_sub(LOGGED_ERRORS)
            )?;
        }
        Ok(())
    }
}

/// Joins a JSON path prefix and a field name: `join("apis[0]", "cors")` is `apis[0].cors`.
pub fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

/// Whether a JSON path lies where a policy keeps secrets: an HMAC secret, the audit log's hash
/// key or an injected header's value (`apis[0].jwt.hmac_secret`, `log.hash_key`,
/// `apis[1].inject_headers.x-functions-key`).
pub fn is_secret_path(path: &str) -> bool {
    path.split(['.', '['])
        .any(|segment| matches!(segment, "hmac_secret" | "hash_key" | "inject_headers"))
}

/// A parser error's path and message with the values they quote replaced by `***` when the
/// path holds secrets: serde writes what it found (`invalid type: string "s3cret", expected a
/// map`, ``unknown variant `s3cret` ``), the path names an unknown key (a secret pasted as a
/// key), and a policy error must never print a secret.
pub fn without_secrets(path: String, reason: String) -> (String, String) {
    if !is_secret_path(&path) {
        return (path, reason);
    }
    (secret_path_masked(path), reason_masked(&reason))
}

/// `…hmac_secret.<key>`, `log.hash_key.<key>` and `…inject_headers.<header>.<key>` keep
/// `<key>` only when it is `value` or `env`.
fn secret_path_masked(path: String) -> String {
    let Some(at) = path
        .rfind("hmac_secret")
        .or_else(|| path.rfind("hash_key"))
        .or_else(|| path.rfind("inject_headers"))
    else {
        return path;
    };
    let (head, tail) = path.split_at(at);
    let mut segments: Vec<&str> = tail.split('.').collect();
    // hmac_secret.<key> or hash_key.<key>, or inject_headers.<header>.<key>
    // How many segments name the secret's field before its key.
    let kept = if tail.starts_with("hmac_secret") || tail.starts_with("hash_key") {
        1
    } else {
        2
    };
    if let Some(rest) = segments.get(kept..).filter(|rest| !rest.is_empty()) {
        let key = rest.join(".");
        if key != "value" && key != "env" {
            segments.truncate(kept);
            segments.push("***");
        }
    }
    format!("{head}{}", segments.join("."))
}

fn reason_masked(reason: &str) -> String {
    // What serde puts before the value it quotes.
    const MARKERS: [&str; 8] = [
        "string \"",
        "string `",
        "integer `",
        "floating point `",
        "boolean `",
        "character `",
        "variant `",
        "field `",
    ];
    let mut out = String::with_capacity(reason.len());
    let mut rest = reason;
    while let Some((at, marker)) = MARKERS
        .iter()
        .filter_map(|m| rest.find(m).map(|i| (i, *m)))
        .min_by_key(|(i, _)| *i)
    {
        let open = at.saturating_add(marker.len());
        out.push_str(rest.get(..open).unwrap_or(""));
        let quote = if marker.ends_with('"') { '"' } else { '`' };
        let body = rest.get(open..).unwrap_or("");
        let mut escaped = false;
        let close = body.char_indices().find(|&(_, c)| {
            let end = c == quote && !escaped;
            escaped = c == '\\' && !escaped && quote == '"';
            end
        });
        out.push_str("***");
        rest = close.map_or("", |(i, _)| body.get(i..).unwrap_or(""));
    }
    out.push_str(rest);
    out
}

/// `index("apis", 2)` is `apis[2]`.
pub fn index(prefix: &str, i: usize) -> String {
    format!("{prefix}[{i}]")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn errors_display_on_one_bounded_line() {
        let one = ConfigErrors::from(ConfigError::new("apis", "must define at least one API"));
        assert_eq!(one.to_string(), "apis: must define at least one API");
        let list = (0..12)
            .map(|i| ConfigError::new(format!("apis[{i}].name"), "bad").at(i + 1, 2))
            .collect();
        let many = ConfigErrors::from_vec(list).unwrap();
        assert_eq!(many.len(), 12);
        let line = many.to_string();
        assert!(
            line.starts_with("12 errors: [1] apis[0].name: bad (line 1, column 2) [2] apis[1]"),
            "{line}"
        );
        assert!(line.contains("[10] apis[9].name"), "{line}");
        assert!(!line.contains("apis[10]"), "{line}");
        assert!(
            line.ends_with("... and 2 more (`gateguard validate` lists them all)"),
            "{line}"
        );
        assert!(!line.contains('\n'));
        assert!(ConfigErrors::from_vec(Vec::new()).is_none());
    }

    #[test]
    fn secret_paths() {
        assert!(is_secret_path("apis[0].jwt.hmac_secret"));
        assert!(is_secret_path("apis[0].inject_headers"));
        assert!(is_secret_path("apis[3].inject_headers.x-functions-key"));
        assert!(is_secret_path("log.hash_key"));
        assert!(!is_secret_path("apis[0].jwt.issuers[0]"));
        assert!(!is_secret_path("apis[0].name"));
    }

    #[test]
    fn quoted_values_are_masked_under_secret_paths() {
        let cases = [
            (
                r#"invalid type: string "s3\"cr`et", expected a map"#,
                r#"invalid type: string "***", expected a map"#,
            ),
            (
                "invalid type: integer `731337`, expected a string",
                "invalid type: integer `***`, expected a string",
            ),
            (
                "unknown variant `s3cret`, expected `value` or `env`",
                "unknown variant `***`, expected `value` or `env`",
            ),
            ("expected `,` or `}`", "expected `,` or `}`"),
            (
                r#"invalid type: string "unterminated"#,
                r#"invalid type: string "***"#,
            ),
        ];
        for (reason, masked) in cases {
            let path = "apis[0].inject_headers".to_string();
            assert_eq!(
                without_secrets(path.clone(), reason.to_string()),
                (path, masked.to_string())
            );
        }
        let plain = r#"invalid type: string "x", expected a map"#.to_string();
        let path = "apis[0].cors".to_string();
        assert_eq!(without_secrets(path.clone(), plain.clone()), (path, plain));
    }

    #[test]
    fn unknown_keys_in_secret_paths_are_masked() {
        let masked = |p: &str| without_secrets(p.to_string(), String::new()).0;
        assert_eq!(masked("apis[0].jwt.hmac_secret"), "apis[0].jwt.hmac_secret");
        assert_eq!(
            masked("apis[0].jwt.hmac_secret.value"),
            "apis[0].jwt.hmac_secret.value"
        );
        assert_eq!(
            masked("apis[0].jwt.hmac_secret.s3cret"),
            "apis[0].jwt.hmac_secret.***"
        );
        assert_eq!(masked("log.hash_key.env"), "log.hash_key.env");
        assert_eq!(masked("log.hash_key.s3cret"), "log.hash_key.***");
        assert_eq!(
            masked("apis[1].inject_headers.x-k"),
            "apis[1].inject_headers.x-k"
        );
        assert_eq!(
            masked("apis[1].inject_headers.x-k.env"),
            "apis[1].inject_headers.x-k.env"
        );
        assert_eq!(
            masked("apis[1].inject_headers.x-k.s3.cret"),
            "apis[1].inject_headers.x-k.***"
        );
    }
}
