//! The client-certificate check: APIM's documented `<choose>` pattern (a `<when>` on
//! `context.Request.Certificate` that refuses) and `<validate-client-certificate>` become
//! `client_certificate`, pinned thumbprints.

mod condition;

use std::collections::BTreeSet;

use gateguard_core::client_cert::{ClientCertConfig, ClientCertPolicy};
use roxmltree::Node;

use super::report::{plural, El};
use super::xml::{child, elements, literal, parse_bool};
use super::{Cx, CONVERTED};
use condition::{parse_condition, CertRule};

impl Cx<'_, '_> {
    pub(super) fn choose(&mut self, node: Node, e: &El) {
        let mut rule = CertRule::default();
        let mut codes = BTreeSet::new();
        for branch in elements(node) {
            let be = self.el(branch);
            if be.name != "when" {
                return self.report.skip(
                    e,
                    format!("a <choose> with <{}> (line {}): only the client-certificate check (<when> branches that refuse) converts", be.name, be.line),
                );
            }
            let condition = branch.attribute("condition").unwrap_or("");
            if !condition.contains("context.Request.Certificate") {
                let inner: Vec<String> = branch
                    .descendants()
                    .filter(|n| n.is_element() && *n != branch)
                    .filter(|n| CONVERTED.contains(&n.tag_name().name()))
                    .map(|n| format!("<{}> on line {}", n.tag_name().name(), self.el(n).line))
                    .collect();
                let holds = if inner.is_empty() {
                    String::new()
                } else {
                    format!(" (it holds {})", inner.join(", "))
                };
                return self.report.skip(
                    e,
                    format!(
                        "a <choose> whose condition on line {} gateguard cannot express{holds}: \
                         only the client-certificate check converts; gateguard applies its \
                         checks to every request of the API",
                        be.line
                    ),
                );
            }
            let actions: Vec<Node> = elements(branch).collect();
            let response = match actions.as_slice() {
                [r] if r.tag_name().name() == "return-response" => *r,
                _ => {
                    return self.report.skip(
                        e,
                        format!("the <when> on line {} must hold exactly one <return-response> to be the certificate check", be.line),
                    )
                }
            };
            let status = child(response, "set-status").and_then(|s| s.attribute("code"));
            codes.insert(status.unwrap_or("200").trim().to_string());
            if let Err(reason) = parse_condition(condition).and_then(|x| rule.add_refusal(&x)) {
                return self
                    .report
                    .skip(e, format!("condition on line {}: {reason}", be.line));
            }
        }
        if codes.iter().any(|c| c != "403") {
            self.report.note(
                e,
                format!(
                    "the refusal's status is {}: gateguard answers 403 \"Invalid client certificate\"",
                    codes.into_iter().collect::<Vec<_>>().join(", ")
                ),
            );
        }
        self.client_certificate(e, rule);
    }

    pub(super) fn validate_client_certificate(&mut self, node: Node, e: &El) {
        if parse_bool(node.attribute("ignore-error"), false) != Ok(false) {
            return self.report.skip(
                e,
                "ignore-error is not false: APIM only records the result; gateguard would refuse",
            );
        }
        let flag = |a: &str| parse_bool(node.attribute(a), true);
        let (Ok(not_before), Ok(not_after), Ok(trust), Ok(revocation)) = (
            flag("validate-not-before"),
            flag("validate-not-after"),
            flag("validate-trust"),
            flag("validate-revocation"),
        ) else {
            return self
                .report
                .skip(e, "a validate-* attribute is not true or false");
        };
        let mut rule = CertRule {
            validity: not_before || not_after,
            chain: trust,
            revocation,
            ..CertRule::default()
        };
        match self.identities(node) {
            Ok(thumbprints) => rule.groups.push(thumbprints),
            Err(reason) => return self.report.skip(e, reason),
        }
        self.client_certificate(e, rule);
    }

    /// The thumbprints of `<identities>`; an identity matched any other way refuses them all.
    fn identities(&self, node: Node) -> Result<BTreeSet<String>, String> {
        let mut thumbprints = BTreeSet::new();
        for id in child(node, "identities")
            .into_iter()
            .flat_map(elements)
            .filter(|n| n.tag_name().name() == "identity")
        {
            let others: Vec<&str> = id
                .attributes()
                .map(|a| a.name())
                .filter(|n| *n != "thumbprint")
                .collect();
            if !others.is_empty() {
                return Err(format!(
                    "<identity> on line {} matches by {}: gateguard pins thumbprints (and subject/issuer DNs) only",
                    self.el(id).line,
                    others.join(", ")
                ));
            }
            match id.attribute("thumbprint").map(literal) {
                Some(Ok(t)) => {
                    thumbprints.insert(t);
                }
                _ => {
                    return Err(format!(
                        "<identity> on line {} has no literal thumbprint",
                        self.el(id).line
                    ))
                }
            }
        }
        Ok(thumbprints)
    }

    fn client_certificate(&mut self, e: &El, rule: CertRule) {
        if self.api.client_certificate.is_some() {
            return self
                .report
                .skip(e, "a second client-certificate check: merge them into one");
        }
        if rule.revocation && !self.args.no_revocation_check {
            return self.report.skip(
                e,
                "APIM checks the certificate's revocation (validate-revocation, true by default, \
                 or Verify()); gateguard cannot: pass --no-revocation-check if removing a \
                 thumbprint from the policy is how you revoke",
            );
        }
        let thumbprints =
            match rule.groups.as_slice() {
                [one] if !one.is_empty() => one.iter().cloned().collect::<Vec<_>>(),
                [] | [_] => {
                    return self.report.skip(
                        e,
                        "no thumbprint is checked: gateguard needs the accepted thumbprints",
                    )
                }
                _ => return self.report.skip(
                    e,
                    "several thumbprint comparisons joined by || refuse every certificate: join \
                     them with && (Thumbprint != \"A\" && Thumbprint != \"B\")",
                ),
            };
        let config = match pinned(thumbprints, &rule) {
            Ok(config) => config,
            Err(reason) => return self.report.skip(e, reason),
        };
        let compile = |c: &ClientCertConfig| ClientCertPolicy::compile(c, "client_certificate");
        let Some(config) = self.compiled(e, config, compile) else {
            return;
        };
        if !rule.validity {
            self.report.note(
                e,
                "APIM did not check the certificate's dates here: check_validity is false; \
                 true (refuse expired certificates) is recommended",
            );
        }
        if rule.chain {
            self.report.note(
                e,
                "APIM also builds the chain to a trusted CA (validate-trust, Verify()): \
                 gateguard accepts exactly the pinned certificates and checks their dates, not \
                 the chain",
            );
        }
        if rule.revocation {
            self.report.note(
                e,
                "--no-revocation-check: a revoked certificate stays accepted until its \
                 thumbprint is removed from the policy",
            );
        }
        self.report.converted(
            e,
            format!(
                "client_certificate ({} thumbprint{}, check_validity {})",
                config.thumbprints.len(),
                plural(config.thumbprints.len()),
                rule.validity
            ),
        );
        self.api.client_certificate = Some(config);
    }
}

/// The `client_certificate` block of `rule`.
fn pinned(thumbprints: Vec<String>, rule: &CertRule) -> Result<ClientCertConfig, String> {
    let mut config = ClientCertConfig::pinning(thumbprints)
        .map_err(|e| format!("cannot build the client_certificate block: {e}"))?;
    config.check_validity = rule.validity;
    config.subject = rule.subject.clone();
    config.issuer = rule.issuer.clone();
    Ok(config)
}
