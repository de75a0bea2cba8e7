//! `<cors>`: the allowed origins, methods and headers become `cors`.

use gateguard_core::cors::{CorsConfig, CorsPolicy};
use roxmltree::Node;

use super::report::{plural, El};
use super::xml::{child, elements, literal, parse_bool, text_of};
use super::Cx;

/// gateguard's largest `max_age_seconds`.
const MAX_AGE: u32 = 86_400;

impl Cx<'_, '_> {
    pub(super) fn cors(&mut self, node: Node, e: &El) {
        let config = match self.cors_config(node, e) {
            Ok(config) => config,
            Err(reason) => return self.report.skip(e, reason),
        };
        let Some(config) = self.compiled(e, config, |c| CorsPolicy::compile(c, "cors")) else {
            return;
        };
        let origins = config.allowed_origins.len();
        let methods = config.allowed_methods.join(",");
        let summary = format!("{origins} origin{}, methods {methods}", plural(origins));
        self.report.converted(e, format!("cors ({summary})"));
        self.api.cors = Some(config);
    }

    fn cors_config(&mut self, node: Node, e: &El) -> Result<CorsConfig, String> {
        let credentials = parse_bool(node.attribute("allow-credentials"), false)
            .map_err(|r| format!("allow-credentials: {r}"))?;
        if parse_bool(node.attribute("terminate-unmatched-request"), true) != Ok(true) {
            self.report.note(
                e,
                "terminate-unmatched-request is not true: gateguard refuses requests from \
                 origins that are not allowed (403)",
            );
        }
        let origins = self.origins(node, e, credentials)?;
        let methods_node = child(node, "allowed-methods");
        let mut methods = list(methods_node, "method")?;
        if methods_node.is_none() || methods.is_empty() {
            // APIM's default when the element is absent.
            methods = vec!["GET".into(), "POST".into()];
        }
        let allowed_headers = list(child(node, "allowed-headers"), "header")?;
        let expose_headers = list(child(node, "expose-headers"), "header")?;
        let max_age = methods_node
            .and_then(|m| m.attribute("preflight-result-max-age"))
            .map(|age| self.max_age(age, e))
            .transpose()?;
        Ok(CorsConfig {
            allowed_origins: origins,
            allowed_methods: methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
            allowed_headers,
            expose_headers,
            allow_credentials: credentials,
            max_age_seconds: max_age,
        })
    }

    /// The allowed origins as gateguard writes them: exact, without a trailing `/`.
    fn origins(&mut self, node: Node, e: &El, credentials: bool) -> Result<Vec<String>, String> {
        let mut origins = list(child(node, "allowed-origins"), "origin")?;
        if let Some(o) = origins.iter().find(|o| o.contains("*.")) {
            return Err(format!(
                "origin {o:?}: APIM takes an origin exactly (only \"*\" alone is a wildcard), \
                 gateguard would admit every subdomain: list the origins"
            ));
        }
        if credentials && origins.iter().any(|o| o == "*") {
            origins.retain(|o| o != "*");
            self.report.skip(
                e,
                "origin \"*\" with allow-credentials=\"true\" is not allowed (browsers refuse it \
                 too); list the origins",
            );
        }
        let origins: Vec<String> = origins
            .into_iter()
            .map(|o| {
                if o == "*" {
                    o
                } else {
                    o.trim_end_matches('/').to_string()
                }
            })
            .collect();
        if origins.is_empty() {
            return Err("no usable <allowed-origins><origin>".into());
        }
        Ok(origins)
    }

    /// `preflight-result-max-age`, lowered to gateguard's maximum.
    fn max_age(&mut self, age: &str, e: &El) -> Result<u32, String> {
        let seconds: u64 = literal(age)
            .ok()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                format!("preflight-result-max-age {age:?} is not a number of seconds")
            })?;
        match u32::try_from(seconds) {
            Ok(s) if s <= MAX_AGE => Ok(s),
            _ => {
                self.report.note(
                    e,
                    format!(
                        "preflight-result-max-age {seconds} lowered to gateguard's maximum \
                         {MAX_AGE}"
                    ),
                );
                Ok(MAX_AGE)
            }
        }
    }
}

/// The literal `<item>` values under `container`, without repeats.
fn list(container: Option<Node>, item: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    if let Some(c) = container {
        for n in elements(c).filter(|n| n.tag_name().name() == item) {
            let v = literal(&text_of(n)).map_err(|r| format!("<{item}> {r}"))?;
            if !v.is_empty() && !out.contains(&v) {
                out.push(v);
            }
        }
    }
    Ok(out)
}
