//! Which inbound policies convert, what leaving out each of the others means, and the
//! dispatch of every inbound element to its converter.

use roxmltree::Node;

use super::named_values;
use super::xml::{elements, is_env_header_value};
use super::{Cx, CONVERTED, LIMITS};

/// The children each converted policy may have; anything else could be a check the
/// conversion would drop.
fn known_children(policy: &str) -> &'static [&'static str] {
    match policy {
        "cors" => &[
            "allowed-origins",
            "allowed-methods",
            "allowed-headers",
            "expose-headers",
        ],
        "ip-filter" => &["address", "address-range"],
        "validate-jwt" => &[
            "openid-config",
            "issuer-signing-keys",
            "decryption-keys",
            "audiences",
            "issuers",
            "required-claims",
        ],
        "check-header" | "set-header" => &["value"],
        "choose" => &["when", "otherwise"],
        "validate-client-certificate" => &["identities"],
        // Refused by the limit's converter, with the reason.
        "rate-limit" | "quota" => &["api", "operation"],
        _ => &[],
    }
}

/// Why an inbound policy gateguard does not convert is left out without weakening anything,
/// or `None` when leaving it out would.
fn neutral(policy: &str) -> Option<&'static str> {
    Some(match policy {
        "set-backend-service" => "the backend is Envoy's route and cluster: point them at it",
        "rewrite-uri" => "use the Envoy route's prefix_rewrite or regex_rewrite",
        "trace" | "log-to-eventhub" | "emit-metric" => {
            "logging and metrics: Envoy's access log and gateguard's stats cover requests"
        }
        "set-variable" => {
            "a context variable, read only by policy expressions (any check that reads it is \
             refused)"
        }
        "cache-lookup" | "cache-lookup-value" | "cache-store-value" | "cache-remove-value" => {
            "response caching: not a check"
        }
        _ => return None,
    })
}

/// Why an inbound policy gateguard does not convert matters; for a limit, which gateguard
/// converts, what leaving it out with `--skip` asks of Envoy.
fn unconverted_reason(policy: &str) -> &'static str {
    match policy {
        "base" => {
            "inherits the policies of the enclosing scope (product, workspace or global), which \
             this file does not hold: convert them too, or pass --skip base if they enforce \
             nothing gateguard must"
        }
        "rate-limit" | "rate-limit-by-key" | "quota" | "quota-by-key" => {
            "the limit is left to Envoy: configure its local_ratelimit filter (or ratelimit for \
             a limit shared by the gateway's replicas)"
        }
        "validate-azure-ad-token" => {
            "write it as <validate-jwt> with <openid-config \
             url=\"https://login.microsoftonline.com/<tenant>/v2.0/.well-known/openid-configuration\"/>, \
             <audiences> and <issuers>, and convert again"
        }
        "include-fragment" => {
            "the fragment's policies are not in this file: convert the fragment's XML, or paste \
             its policies here"
        }
        "return-response" | "mock-response" => {
            "answers requests itself, so the backend is never called: gateguard would forward them"
        }
        _ => {
            "not a check gateguard performs, and it may refuse or change requests: remove it \
             from the input, or pass --skip with this element's name, once nothing depends on it"
        }
    }
}

impl Cx<'_, '_> {
    /// Converts one inbound policy, or reports why it is not converted.
    pub(super) fn inbound(&mut self, node: Node) {
        let e = self.el(node);
        let skipped_limit = LIMITS.contains(&e.name.as_str()) && self.args.skip.contains(&e.name);
        if !CONVERTED.contains(&e.name.as_str()) || skipped_limit {
            if let Some(reason) = neutral(&e.name) {
                return self.report.left_out(&e, reason);
            }
            let reason = unconverted_reason(&e.name);
            return if self.args.skip.contains(&e.name) {
                self.report
                    .left_out(&e, format!("--skip {}: {reason}", e.name))
            } else {
                self.report.skip(&e, reason)
            };
        }
        if let Some(reason) = self.unfit(node) {
            return self.report.skip(&e, reason);
        }
        let before = self.report.items.len();
        match e.name.as_str() {
            "cors" => self.cors(node, &e),
            "ip-filter" => self.ip_filter(node, &e),
            "validate-jwt" => self.validate_jwt(node, &e),
            "check-header" => self.check_header(node, &e),
            "choose" => self.choose(node, &e),
            "validate-client-certificate" => self.validate_client_certificate(node, &e),
            "set-header" => self.set_header(node, &e),
            _ => self.limit(node, &e),
        }
        self.report.refuse_if_a_part_was(&e, before);
    }

    /// Why a policy this command converts cannot be converted whatever its content: a
    /// placeholder without a value, a child element the conversion would drop, or a second
    /// policy of a kind gateguard has one of per API.
    fn unfit(&self, node: Node) -> Option<String> {
        let left = named_values::left_in(self.doc, node, &is_env_header_value);
        if !left.is_empty() {
            return Some(self.named.missing(&left));
        }
        let policy = node.tag_name().name();
        let known = known_children(policy);
        let unknown: Vec<String> = elements(node)
            .filter(|c| !known.contains(&c.tag_name().name()))
            .map(|c| format!("<{}> on line {}", c.tag_name().name(), self.el(c).line))
            .collect();
        if !unknown.is_empty() {
            return Some(format!(
                "unknown child element {}: what it enforces would be lost",
                unknown.join(", ")
            ));
        }
        let second = match policy {
            "cors" if self.api.cors.is_some() => {
                "a second <cors>: gateguard has one CORS configuration per API"
            }
            "validate-jwt" if self.api.jwt.is_some() => {
                "a second <validate-jwt>: gateguard validates one token per API"
            }
            _ => return None,
        };
        Some(second.into())
    }

    pub(super) fn other_section(&mut self, node: Node, section: &str) {
        let e = self.el(node);
        match e.name.as_str() {
            "base" => self.report.note(
                &e,
                format!("in <{section}>: response and backend policies are not gateguard's; nothing to convert"),
            ),
            "forward-request" if section == "backend" && node.attributes().len() == 0 => {
                self.report
                    .note(&e, "Envoy's route forwards the request upstream; nothing to convert")
            }
            _ => self.report.left_out(
                &e,
                format!(
                    "in <{section}>: gateguard decides which requests are admitted; configure \
                     this in Envoy (route, cluster or a response filter)"
                ),
            ),
        }
    }
}
