//! Required claims per method, and claims forwarded to the upstream as headers.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{index, join, ConfigError};

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct RequiredClaimConfig {
    pub name: String,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub any_of: Option<Vec<Value>>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub all_of: Option<Vec<Value>>,
    /// Methods the rule applies to; all methods when absent.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[serde(default)]
    pub methods: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Match {
    AnyOf(Vec<Value>),
    AllOf(Vec<Value>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RequiredClaim {
    pub name: String,
    pub rule: Match,
    pub methods: Option<Vec<String>>,
}

impl RequiredClaim {
    pub fn compile(cfg: &RequiredClaimConfig, path: &str) -> Result<Self, ConfigError> {
        if cfg.name.is_empty() {
            return Err(ConfigError::new(join(path, "name"), "must not be empty"));
        }
        let check_values = |values: &Vec<Value>, field: &str| {
            if values.is_empty() {
                return Err(ConfigError::new(
                    join(path, field),
                    "must list at least one value",
                ));
            }
            for (i, v) in values.iter().enumerate() {
                if !matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_)) {
                    return Err(ConfigError::new(
                        index(&join(path, field), i),
                        "values are strings, numbers or booleans",
                    ));
                }
            }
            Ok(())
        };
        let rule = match (&cfg.any_of, &cfg.all_of) {
            (Some(v), None) => {
                check_values(v, "any_of")?;
                Match::AnyOf(v.clone())
            }
            (None, Some(v)) => {
                check_values(v, "all_of")?;
                Match::AllOf(v.clone())
            }
            _ => {
                return Err(ConfigError::new(
                    path,
                    "needs exactly one of \"any_of\" or \"all_of\"",
                ))
            }
        };
        let methods = match &cfg.methods {
            None => None,
            Some(m) if m.is_empty() => {
                return Err(ConfigError::new(
                    join(path, "methods"),
                    "an empty list would never apply; remove it to apply to all methods",
                ))
            }
            Some(m) => {
                let mut out = Vec::with_capacity(m.len());
                for (i, method) in m.iter().enumerate() {
                    if !crate::headers::is_token(method) {
                        return Err(ConfigError::new(
                            index(&join(path, "methods"), i),
                            format!("{method:?} is not an HTTP method"),
                        ));
                    }
                    out.push(method.to_ascii_uppercase());
                }
                Some(out)
            }
        };
        Ok(Self {
            name: cfg.name.clone(),
            rule,
            methods,
        })
    }

    pub fn applies_to(&self, method: &str) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x.eq_ignore_ascii_case(method)))
    }

    pub fn satisfied_by(&self, claims: &Map<String, Value>) -> bool {
        let Some(claim) = claims.get(&self.name) else {
            return false;
        };
        let present = claim_values(claim);
        let has = |want: &Value| present.iter().any(|v| v == want);
        match &self.rule {
            Match::AnyOf(values) => values.iter().any(has),
            Match::AllOf(values) => values.iter().all(has),
        }
    }
}

/// The values a claim holds: an array's elements, a space-separated string's words (OAuth
/// `scp`/`scope`), or the value itself.
fn claim_values(claim: &Value) -> Vec<Value> {
    match claim {
        Value::Array(items) => items.clone(),
        Value::String(s) if s.contains(' ') => s
            .split(' ')
            .filter(|w| !w.is_empty())
            .map(|w| Value::String(w.to_string()))
            .chain(std::iter::once(claim.clone()))
            .collect(),
        other => vec![other.clone()],
    }
}

/// A claim as a header value: strings as they are, numbers and booleans as JSON, arrays
/// comma-joined. Objects, nulls and values with control characters are not forwarded.
pub fn header_value(claim: &Value) -> Option<String> {
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let text = match claim {
        Value::Array(items) => items
            .iter()
            .map(scalar)
            .collect::<Option<Vec<_>>>()?
            .join(","),
        other => scalar(other)?,
    };
    crate::headers::is_header_value(&text).then_some(text)
}
