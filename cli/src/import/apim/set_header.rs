//! Request `<set-header>`: the header becomes one of `inject_headers`, set upstream; a value that
//! is exactly `{{named value}}` is read from Envoy's environment, so the secret stays out of the
//! policy.

use gateguard_core::headers::{check_upstream_header_name, is_header_value};
use gateguard_core::value::ValueSource;
use gateguard_core::ConfigError;
use roxmltree::Node;

use super::report::El;
use super::xml::{elements, literal, named_value, text_of};
use super::Cx;
use crate::import::placeholder_env;

impl Cx<'_, '_> {
    pub(super) fn set_header(&mut self, node: Node, e: &El) {
        let name = node.attribute("name").unwrap_or("").trim().to_string();
        let action = node.attribute("exists-action").unwrap_or("override").trim();
        match action {
            "override" => {}
            "skip" => self.report.note(
                e,
                format!("{name}: exists-action=\"skip\" keeps a client's header; gateguard always replaces it"),
            ),
            other => {
                return self.report.skip(
                    e,
                    format!("{name}: exists-action={other:?}: gateguard only sets (replaces) upstream headers"),
                )
            }
        }
        let values: Vec<Node> = elements(node)
            .filter(|n| n.tag_name().name() == "value")
            .collect();
        let raw = match values.as_slice() {
            [v] => text_of(*v),
            _ => {
                return self.report.skip(
                    e,
                    format!(
                        "{name}: {} <value> elements; gateguard sets one value",
                        values.len()
                    ),
                )
            }
        };
        let source = match named_value(&raw) {
            Some(nv) => ValueSource::Env(env_var(nv)),
            None => match literal(&raw) {
                Ok(v) => ValueSource::Value(v),
                Err(r) => return self.report.skip(e, format!("{name}: the value {r}")),
            },
        };
        if let Err(reason) = check_upstream_header_name(&name) {
            return self.report.skip(e, format!("{name:?}: {reason}"));
        }
        let Some(source) = self.compiled(e, source, |s| check_value(&name, s)) else {
            return;
        };
        let key = name.to_ascii_lowercase();
        if self.api.inject_headers.contains_key(&key) {
            self.report.note(
                e,
                format!("{name} was set before; the later value wins, as in APIM"),
            );
        }
        match &source {
            ValueSource::Env(var) => {
                let nv = named_value(&raw).unwrap_or_default();
                self.report.converted(
                    e,
                    format!("inject_headers.{key} (from environment variable {var})"),
                );
                self.report.env(
                    e,
                    format!("{var}: the value of named value {{{{{nv}}}}} (header {name})"),
                );
            }
            ValueSource::Value(_) => {
                self.report
                    .converted(e, format!("inject_headers.{key} (a literal value)"));
                self.report.note(
                    e,
                    format!("{name}'s value is written into the policy; if it is a secret, use {{\"env\": ...}} instead"),
                );
                self.api.may_hold_secret = true;
            }
        }
        self.api.inject_headers.insert(key, source);
    }
}

/// What the filter's compiler requires of an injected header's value.
fn check_value(name: &str, source: &ValueSource) -> Result<(), ConfigError> {
    let field = format!("inject_headers.{name}");
    let value = source.resolve(&field, &placeholder_env)?;
    if is_header_value(&value) {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            "value contains control characters (CR, LF, NUL...)",
        ))
    }
}

/// The environment variable that stands for a named value: upper case, `_` for anything else.
fn env_var(named: &str) -> String {
    let mut var: String = named
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if var.starts_with(|c: char| c.is_ascii_digit()) {
        var.insert(0, '_');
    }
    var
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn named_values_and_env() {
        assert_eq!(env_var("functions-key"), "FUNCTIONS_KEY");
        assert_eq!(env_var("1st.key"), "_1ST_KEY");
    }
}
