//! `<validate-jwt>`: the token's location, keys, issuers, audiences, clock skew and required
//! claims become `jwt`.

mod claims;
mod keys;

use gateguard_core::jwt::{JwtConfig, JwtPolicy};
use gateguard_core::value::ValueSource;
use roxmltree::Node;

use super::report::{plural, El};
use super::xml::{child, elements, literal, parse_bool, text_of};
use super::Cx;
use crate::import::{placeholder_env, DISCOVERY_SUFFIX};

/// The environment variable that holds a `<validate-jwt>`'s symmetric key.
pub(super) const HMAC_VAR: &str = "GATEGUARD_JWT_HMAC_SECRET";
/// gateguard's largest `clock_skew_seconds`.
const MAX_SKEW: u64 = 600;

impl Cx<'_, '_> {
    pub(super) fn validate_jwt(&mut self, node: Node, e: &El) {
        let (config, summary) = match self.jwt_config(node, e) {
            Ok(converted) => converted,
            Err(reason) => return self.report.skip(e, reason),
        };
        let compile = |c: &JwtConfig| JwtPolicy::compile(c, "jwt", &placeholder_env);
        if let Some(config) = self.compiled(e, config, compile) {
            self.report.converted(e, format!("jwt ({summary})"));
            self.api.jwt = Some(config);
        }
    }

    /// The `jwt` block and a summary of it, or why the element cannot be converted.
    fn jwt_config(&mut self, node: Node, e: &El) -> Result<(JwtConfig, String), String> {
        self.token_location(node, e)?;
        let mut summary = Vec::new();
        let keys = self.keys(node, e, &mut summary)?;
        let issuers = self.issuers(node, e, keys.discovery.as_deref())?;
        let mut audiences = self.values(node, "audiences", "audience");
        for a in &self.args.audience {
            if !audiences.contains(a) {
                audiences.push(a.clone());
            }
        }
        if audiences.is_empty() {
            return Err(
                "no <audiences>: APIM then accepts any audience, gateguard needs at least one (--audience)"
                    .into(),
            );
        }
        summary.push(format!(
            "{} issuer{}, {} audience{}",
            issuers.len(),
            plural(issuers.len()),
            audiences.len(),
            plural(audiences.len())
        ));
        let skew = self.clock_skew(node, e)?;
        let claims = self.required_claims(node);
        if !claims.is_empty() {
            summary.push(format!(
                "{} required claim{}",
                claims.len(),
                plural(claims.len())
            ));
        }
        let mut jwt = JwtConfig::accepting(issuers, audiences, keys.algorithms)
            .map_err(|e| format!("cannot build the jwt block: {e}"))?;
        jwt.jwks = keys.jwks;
        jwt.clock_skew_seconds = skew;
        jwt.required_claims = claims;
        jwt.hmac_secret = keys.hmac.then(|| ValueSource::Env(HMAC_VAR.into()));
        Ok((jwt, summary.join(", ")))
    }

    /// Where the token comes from: gateguard reads `Authorization: Bearer` only. What gateguard
    /// does differently but as strictly is noted.
    fn token_location(&mut self, node: Node, e: &El) -> Result<(), String> {
        if node.attribute("query-parameter-name").is_some() {
            return Err("the token comes from a query parameter (query-parameter-name); gateguard reads it from Authorization: Bearer only".into());
        }
        if node.attribute("token-value").is_some() {
            return Err("the token comes from an expression (token-value); gateguard reads it from Authorization: Bearer only".into());
        }
        match node.attribute("header-name").map(str::trim) {
            Some(h) if h.eq_ignore_ascii_case("Authorization") => {}
            Some(h) => {
                return Err(format!(
                    "the token comes from header {h:?}; gateguard reads it from Authorization: Bearer only"
                ))
            }
            None => return Err("no header-name: the token's location is not set".into()),
        }
        match node.attribute("require-scheme").map(str::trim) {
            Some(s) if s.eq_ignore_ascii_case("Bearer") => {}
            Some(s) => {
                return Err(format!(
                    "require-scheme {s:?}: gateguard accepts the Bearer scheme only"
                ))
            }
            None => self.report.note(
                e,
                "no require-scheme: gateguard requires \"Authorization: Bearer <token>\"",
            ),
        }
        self.refusal_notes(node, e);
        if child(node, "decryption-keys").is_some() {
            return Err(
                "<decryption-keys>: gateguard does not accept encrypted tokens (JWE)".into(),
            );
        }
        Ok(())
    }

    /// How APIM's refusal differs from gateguard's, which is as strict.
    fn refusal_notes(&mut self, node: Node, e: &El) {
        if let Some(code) = node.attribute("failed-validation-httpcode") {
            if code.trim() != "401" {
                self.report.note(
                    e,
                    format!("failed-validation-httpcode {code}: gateguard answers 401 (403 for missing claims)"),
                );
            }
        }
        if node.attribute("failed-validation-error-message").is_some() {
            self.report.note(
                e,
                "failed-validation-error-message: gateguard answers with its own messages",
            );
        }
        for (attr, what) in [
            ("require-expiration-time", "a token without exp"),
            ("require-signed-tokens", "an unsigned token"),
        ] {
            if parse_bool(node.attribute(attr), true) != Ok(true) {
                self.report.note(
                    e,
                    format!("{attr} is not true: gateguard always refuses {what}"),
                );
            }
        }
    }

    /// `<issuers>` and `--issuer`; without either, the issuer the `<openid-config>` URL stands
    /// for, when that is certain.
    fn issuers(
        &mut self,
        node: Node,
        e: &El,
        discovery: Option<&str>,
    ) -> Result<Vec<String>, String> {
        let mut issuers = self.values(node, "issuers", "issuer");
        for i in &self.args.issuer {
            if !issuers.contains(i) {
                issuers.push(i.clone());
            }
        }
        if !issuers.is_empty() {
            return Ok(issuers);
        }
        let iss = match discovery.map(issuer_from_discovery) {
            Some(Ok(iss)) => iss,
            Some(Err(why)) => {
                return Err(format!(
                    "no <issuers>, and {why}: pass the issuer with --issuer"
                ))
            }
            None => {
                return Err(
                    "no <issuers>: APIM then accepts any issuer, gateguard needs them listed (--issuer)"
                        .into(),
                )
            }
        };
        if iss.starts_with("https://login.microsoftonline.com/") {
            self.report.note(
                e,
                "Entra ID: v1 access tokens carry https://sts.windows.net/<tenant-id>/ \
                 as issuer, v2 tokens https://login.microsoftonline.com/<tenant-id>/v2.0; \
                 add the other one with --issuer if both reach this API",
            );
        }
        self.report.note(
            e,
            format!(
                "no <issuers>: APIM takes the issuer from the OpenID configuration; \
                 derived {iss:?} from its URL (check it, or pass --issuer)"
            ),
        );
        Ok(vec![iss])
    }

    /// `clock-skew`, APIM's default of 0 kept, lowered to gateguard's maximum.
    fn clock_skew(&mut self, node: Node, e: &El) -> Result<u64, String> {
        let Some(s) = node.attribute("clock-skew") else {
            self.report.note(
                e,
                "no clock-skew: APIM's default of 0 seconds is kept (clock_skew_seconds 0)",
            );
            return Ok(0);
        };
        match literal(s).ok().and_then(|s| s.parse::<u64>().ok()) {
            Some(v) if v > MAX_SKEW => {
                self.report.note(
                    e,
                    format!("clock-skew {v} lowered to gateguard's maximum {MAX_SKEW} seconds"),
                );
                Ok(MAX_SKEW)
            }
            Some(v) => Ok(v),
            None => Err(format!("clock-skew {s:?} is not a number of seconds")),
        }
    }

    /// The literal `<item>` values under `<container>`; the others are reported.
    fn values(&mut self, node: Node, container: &str, item: &str) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(c) = child(node, container) {
            for n in elements(c).filter(|n| n.tag_name().name() == item) {
                match literal(&text_of(n)) {
                    Ok(v) if !v.is_empty() => {
                        if !out.contains(&v) {
                            out.push(v)
                        }
                    }
                    Ok(_) => {}
                    Err(r) => {
                        let ne = self.el(n);
                        self.report.skip(&ne, format!("the value {r}; left out"));
                    }
                }
            }
        }
        out
    }
}

fn is_guid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The issuer an OpenID configuration URL stands for, when it is certain: Entra ID tenants
/// given by ID, and other providers by OpenID Connect Discovery's rule (the URL is the issuer
/// plus `/.well-known/openid-configuration`).
fn issuer_from_discovery(url: &str) -> Result<String, String> {
    let base = url
        .strip_suffix(DISCOVERY_SUFFIX)
        .ok_or_else(|| format!("the <openid-config> URL does not end in {DISCOVERY_SUFFIX}"))?;
    if let Some(path) = base.strip_prefix("https://login.microsoftonline.com/") {
        let segments: Vec<&str> = path.split('/').collect();
        return match segments.as_slice() {
            [tenant, "v2.0"] if is_guid(tenant) => Ok(base.to_string()),
            [tenant] if is_guid(tenant) => Ok(format!("https://sts.windows.net/{tenant}/")),
            _ => Err(format!(
                "the Entra ID tenant in {url} is not a tenant ID, so the issuer (which carries the ID) cannot be derived"
            )),
        };
    }
    let host = base
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or("");
    if base.contains('?') || host.contains("microsoft") || host.ends_with("b2clogin.com") {
        return Err(format!("the issuer cannot be derived from {url}"));
    }
    Ok(base.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn issuer_derivation() {
        assert_eq!(
            issuer_from_discovery(
                "https://idp.example.com/realms/x/.well-known/openid-configuration"
            )
            .unwrap(),
            "https://idp.example.com/realms/x"
        );
        assert_eq!(
            issuer_from_discovery("https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/.well-known/openid-configuration").unwrap(),
            "https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/"
        );
        assert!(issuer_from_discovery(
            "https://login.microsoftonline.com/common/v2.0/.well-known/openid-configuration"
        )
        .is_err());
        assert!(issuer_from_discovery("https://contoso.b2clogin.com/contoso.onmicrosoft.com/B2C_1_signin/v2.0/.well-known/openid-configuration").is_err());
        assert!(issuer_from_discovery("https://idp.example.com/keys").is_err());
    }
}
