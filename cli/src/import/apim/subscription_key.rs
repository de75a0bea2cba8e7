//! `<check-header>` on `Ocp-Apim-Subscription-Key`: the accepted keys become
//! `subscription_key`, stored as SHA-256. On any other header it is a header rule
//! (`header_rules`).

use gateguard_core::subscription_key::{hash_key, SubscriptionKeyConfig, SubscriptionKeyPolicy};
use roxmltree::Node;

use super::report::{plural, El};
use super::xml::{elements, literal, named_value, parse_bool, text_of};
use super::Cx;

const SUBSCRIPTION_HEADER: &str = "Ocp-Apim-Subscription-Key";

impl Cx<'_, '_> {
    pub(super) fn check_header(&mut self, node: Node, e: &El) {
        let name = node.attribute("name").unwrap_or("").trim().to_string();
        if !name.eq_ignore_ascii_case(SUBSCRIPTION_HEADER) {
            return self.header_rule(node, e, name);
        }
        if self.api.subscription_key.is_some() {
            return self.report.skip(
                e,
                "a second subscription-key check: merge the values into one",
            );
        }
        let hashes = self.key_hashes(node);
        if hashes.is_empty() {
            return self.report.skip(
                e,
                "no key value gateguard can use (it compares against SHA-256 hashes of the keys)",
            );
        }
        if parse_bool(node.attribute("ignore-case"), false) != Ok(false) {
            self.report.note(
                e,
                "ignore-case is not false: gateguard compares keys exactly",
            );
        }
        if let Some(code) = node.attribute("failed-check-httpcode") {
            if code.trim() != "401" {
                self.report.note(
                    e,
                    format!("failed-check-httpcode {code}: gateguard answers 401"),
                );
            }
        }
        let config = SubscriptionKeyConfig {
            header: name,
            // APIM's check-header reads the header only.
            query: None,
            keys_sha256: hashes,
        };
        let compile =
            |c: &SubscriptionKeyConfig| SubscriptionKeyPolicy::compile(c, "subscription_key");
        let Some(config) = self.compiled(e, config, compile) else {
            return;
        };
        let n = config.keys_sha256.len();
        self.report.converted(
            e,
            format!(
                "subscription_key ({n} key{}, stored as SHA-256; header only, as in APIM)",
                plural(n)
            ),
        );
        self.api.subscription_key = Some(config);
    }

    /// The SHA-256 of each literal `<value>`; a named value or an expression is reported.
    fn key_hashes(&mut self, node: Node) -> Vec<String> {
        let mut hashes = Vec::new();
        for v in elements(node).filter(|n| n.tag_name().name() == "value") {
            let raw = text_of(v);
            if let Some(nv) = named_value(&raw) {
                let ve = self.el(v);
                self.report.skip(
                    &ve,
                    format!(
                        "the key is named value {{{{{nv}}}}}: add `gateguard hash-key` of its value \
                         to subscription_key.keys_sha256"
                    ),
                );
                continue;
            }
            match literal(&raw) {
                Ok(key) if !key.is_empty() => {
                    let h = hash_key(&key);
                    if !hashes.contains(&h) {
                        hashes.push(h);
                    }
                }
                Ok(_) => {}
                Err(r) => {
                    let ve = self.el(v);
                    self.report.skip(&ve, format!("the value {r}"));
                }
            }
        }
        hashes
    }
}
