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

/// Joins a JSON path prefix and a field name: `join("apis[0]", "cors")` is `apis[0].cors`.
pub fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

/// `index("apis", 2)` is `apis[2]`.
pub fn index(prefix: &str, i: usize) -> String {
    format!("{prefix}[{i}]")
}
