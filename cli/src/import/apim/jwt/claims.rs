//! `<required-claims>`: each `<claim>` whose values gateguard matches exactly as APIM does
//! becomes a `jwt.required_claims` rule.

use gateguard_core::jwt::RequiredClaimConfig;
use roxmltree::Node;
use serde_json::Value;

use super::super::report::El;
use super::super::xml::{child, elements, literal, text_of};
use super::super::Cx;

impl Cx<'_, '_> {
    /// The rules of `<required-claims>`; every `<claim>` that cannot be converted is reported.
    pub(super) fn required_claims(&mut self, node: Node) -> Vec<RequiredClaimConfig> {
        let Some(container) = child(node, "required-claims") else {
            return Vec::new();
        };
        elements(container)
            .filter(|n| n.tag_name().name() == "claim")
            .filter_map(|c| self.claim(c))
            .collect()
    }

    fn claim(&mut self, c: Node) -> Option<RequiredClaimConfig> {
        let ce = self.el(c);
        let name = match literal(c.attribute("name").unwrap_or("")) {
            Ok(name) if !name.is_empty() => name,
            Ok(_) => {
                self.report.skip(&ce, "a <claim> without a name");
                return None;
            }
            Err(r) => {
                self.report.skip(&ce, format!("the claim's name {r}"));
                return None;
            }
        };
        let all = match c.attribute("match").map(str::trim) {
            None | Some("all") => true,
            Some("any") => false,
            Some(other) => {
                self.report.skip(
                    &ce,
                    format!("claim {name:?}: match {other:?} is not \"all\" or \"any\""),
                );
                return None;
            }
        };
        let values = self.claim_values(c, &ce, &name)?;
        if let Err(reason) = matched_alike(&name, c.attribute("separator"), &values) {
            self.report.skip(&ce, reason);
            return None;
        }
        let values = Some(values.into_iter().map(Value::String).collect());
        Some(RequiredClaimConfig {
            name,
            any_of: if all { None } else { values.clone() },
            all_of: if all { values } else { None },
            methods: None,
        })
    }

    /// The claim's literal values; `None` (reported) when there are none or one is not literal.
    fn claim_values(&mut self, c: Node, ce: &El, name: &str) -> Option<Vec<String>> {
        let mut values = Vec::new();
        let mut bad = false;
        for v in elements(c).filter(|n| n.tag_name().name() == "value") {
            match literal(&text_of(v)) {
                Ok(v) => values.push(v),
                Err(r) => {
                    let ve = self.el(v);
                    self.report
                        .skip(&ve, format!("claim {name:?}: the value {r}"));
                    bad = true;
                }
            }
        }
        if values.is_empty() {
            if !bad {
                self.report.skip(
                    ce,
                    format!("claim {name:?} without values (presence only): gateguard matches values; list them"),
                );
            }
            return None;
        }
        Some(values)
    }
}

/// gateguard matches an array's elements and a string's space-separated words (and the whole
/// string); APIM splits a string only with separator=" ". Why the two would differ, if they do.
fn matched_alike(name: &str, separator: Option<&str>, values: &[String]) -> Result<(), String> {
    match separator {
        Some(" ") if values.iter().all(|v| !v.contains(' ')) => Ok(()),
        Some(" ") => Err(format!(
            "claim {name:?}: a value with a space never matches a space-separated claim in APIM"
        )),
        Some(sep) => Err(format!(
            "claim {name:?}: separator {sep:?}: gateguard splits claims on spaces only, so a \
             {sep:?}-separated claim would not match"
        )),
        None => Err(format!(
            "claim {name:?} has no separator: APIM compares a string claim whole, gateguard \
             also matches its space-separated words (\"not Admin\" holds \"Admin\"); add \
             separator=\" \" to the <claim> if that is meant (for array claims such as roles it \
             changes nothing) and convert again"
        )),
    }
}
