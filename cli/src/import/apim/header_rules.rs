//! `<check-header>` on any header but the subscription key's: the header becomes one of
//! `headers.required`, and its `<value>`s, if any, the pattern its value must match whole
//! (`headers.patterns`): the values, each matched literally, as alternatives; `(?i)` with
//! `ignore-case="true"`.

use gateguard_core::header_rules::{HeaderRules, HeaderRulesConfig};
use roxmltree::Node;

use super::report::{plural, El};
use super::xml::{elements, literal, parse_bool, text_of};
use super::Cx;

/// What gateguard answers when a header rule refuses a request.
const STATUS: &str = "400";

/// Headers whose fixed value is a credential (`Basic ...`), as any filled-in named value may be.
const CREDENTIAL_HEADERS: [&str; 2] = ["authorization", "proxy-authorization"];

impl Cx<'_, '_> {
    pub(super) fn header_rule(&mut self, node: Node, e: &El, name: String) {
        let mut rules = self.api.headers.clone().unwrap_or_default();
        if rules.required.iter().any(|r| r.eq_ignore_ascii_case(&name)) {
            return self.report.skip(
                e,
                format!(
                    "a second <check-header> on {name}: APIM requires the value to pass both; \
                     merge them into one"
                ),
            );
        }
        let ignore_case = match parse_bool(node.attribute("ignore-case"), false) {
            Ok(b) => b,
            Err(r) => return self.report.skip(e, format!("ignore-case {r}")),
        };
        let values = self.header_values(node);
        self.refusal_notes_400(node, e, &name);
        rules.required.push(name.clone());
        if !values.is_empty() {
            let alternatives: Vec<String> = values.iter().map(|v| regex_lite::escape(v)).collect();
            let flags = if ignore_case { "(?i)" } else { "" };
            let pattern = format!("{flags}{}", alternatives.join("|"));
            rules.patterns.insert(name.clone(), pattern);
        }
        let compile = |r: &HeaderRulesConfig| HeaderRules::compile(r, "headers", &[]);
        let Some(rules) = self.compiled(e, rules, compile) else {
            return;
        };
        if ignore_case && values.iter().any(|v| !v.is_ascii()) {
            self.report.note(
                e,
                "ignore-case=\"true\": gateguard ignores the case of ASCII letters only, so a \
                 value with other letters must come as written",
            );
        }
        let from_named: Vec<String> = values
            .iter()
            .filter_map(|v| Some(self.masker.mask(v)).filter(|masked| masked != v))
            .collect();
        let credential = CREDENTIAL_HEADERS
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&name));
        if !from_named.is_empty() || (credential && !values.is_empty()) {
            let what = if from_named.is_empty() {
                format!("the {name} value")
            } else {
                from_named.join(", ")
            };
            self.report.note(
                e,
                format!(
                    "{what} written into headers.patterns as it is (the file is made \
                     owner-only); if it is a secret, a subscription_key with \"header\": \
                     {name:?} keeps only its SHA-256"
                ),
            );
            self.api.may_hold_secret = true;
        }
        let n = values.len();
        let what = if n == 0 {
            format!("headers.required: {name}")
        } else {
            format!(
                "headers.required and headers.patterns: {name}, {n} accepted value{}{}",
                plural(n),
                if ignore_case { ", any case" } else { "" }
            )
        };
        self.report.converted(e, what);
        self.api.headers = Some(rules);
    }

    /// The literal `<value>`s, without repeats; any other is reported, which refuses the
    /// element (a value left out would refuse requests APIM accepts, or the reverse).
    fn header_values(&mut self, node: Node) -> Vec<String> {
        let mut values = Vec::new();
        for v in elements(node).filter(|n| n.tag_name().name() == "value") {
            match literal(&text_of(v)) {
                Ok(value) => {
                    if !values.contains(&value) {
                        values.push(value);
                    }
                }
                Err(r) => {
                    let ve = self.el(v);
                    self.report.skip(&ve, format!("the value {r}"));
                }
            }
        }
        values
    }

    /// How APIM's refusal differs from gateguard's, which refuses the same requests.
    fn refusal_notes_400(&mut self, node: Node, e: &El, name: &str) {
        if let Some(code) = node.attribute("failed-check-httpcode") {
            if code.trim() != STATUS {
                self.report.note(
                    e,
                    format!("failed-check-httpcode {code}: gateguard answers {STATUS}"),
                );
            }
        }
        if node.attribute("failed-check-error-message").is_some() {
            self.report.note(
                e,
                format!(
                    "failed-check-error-message: gateguard answers with its own messages, \
                     \"Bad request: header {} is missing\" or \"... is invalid\"",
                    name.to_ascii_lowercase()
                ),
            );
        }
    }
}
