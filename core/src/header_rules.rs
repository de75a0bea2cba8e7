//! Header rules (docs/policy.md, "Header rules"): headers a request must carry, headers it must
//! not, and patterns their values must match → 400 naming the header (as the policy spells it),
//! never its value.
//!
//! Patterns are compiled once, when the policy loads, by `regex-lite`: a small engine without
//! backtracking, so matching time is linear in the value whatever the pattern (no ReDoS).
//! A value must match the whole pattern, as Envoy's `safe_regex` does.

use std::collections::BTreeMap;

use regex_lite::{Regex, RegexBuilder};
use serde::Deserialize;

use crate::error::{index, join, ConfigError};
use crate::headers::{is_token, same_header_name};
use crate::literals::Literals;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct HeaderRulesConfig {
    /// Headers every request must carry.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Vec::is_empty"))]
    #[serde(default)]
    pub required: Vec<String>,
    /// Headers no request may carry, in any spelling (`X_Debug` is `x-debug`).
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Vec::is_empty"))]
    #[serde(default)]
    pub forbidden: Vec<String>,
    /// Header name → pattern its value must match whole, when the header is present.
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "BTreeMap::is_empty")
    )]
    #[serde(default)]
    pub patterns: BTreeMap<String, String>,
}

/// Headers Envoy itself sets on every request before the filter runs (in the configuration
/// `gateguard render` writes): forbidding one would refuse every request.
const SET_BY_ENVOY: [&str; 3] = [
    "x-request-id",
    "x-forwarded-proto",
    "x-envoy-external-address",
];

/// Whether a request header is the one a rule names: in every spelling a backend folds together,
/// or the rule's `host` as the `:authority` Envoy hands the filter.
fn names(rule: &str, header: &str) -> bool {
    same_header_name(rule, header) || is_authority(rule, header)
}

/// `host` is HTTP/2's `:authority`, which is how Envoy hands an HTTP/1 `Host` to filters.
fn is_authority(rule: &str, header: &str) -> bool {
    rule == "host" && header == ":authority"
}

/// Longest pattern accepted.
pub const MAX_PATTERN_LEN: usize = 1024;
/// Longest value matched against a pattern; a longer one is invalid without being matched. The
/// engine is linear in the value, but its constant is large in Envoy's V8 (a 60 KB value took
/// 13-19 ms with simple patterns): this bounds the cost an unauthenticated request can cause.
pub const MAX_PATTERN_VALUE_BYTES: usize = 4096;
/// What the compiled program of one pattern may take (regex-lite's `size_limit`).
const PATTERN_SIZE_LIMIT: usize = 64 * 1024;
const PATTERN_NEST_LIMIT: u32 = 32;

#[derive(Debug, Clone)]
pub struct HeaderRules {
    /// Lower-case names, in the policy's order.
    required: Vec<String>,
    forbidden: Vec<String>,
    patterns: Vec<(String, Matcher)>,
}

/// How one pattern is matched: literal alternatives (often a shared secret an APIM
/// `<check-header>` compared) in constant time, anything else by the regex engine.
#[derive(Debug, Clone)]
enum Matcher {
    Literals(Literals),
    Regex(Regex),
}

impl Matcher {
    fn is_match(&self, value: &str) -> bool {
        match self {
            Matcher::Literals(l) => l.matches(value),
            Matcher::Regex(r) => r.is_match(value),
        }
    }
}

/// Why a request's headers were refused; each names the header as the policy spells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    Missing(String),
    NotAllowed(String),
    /// A value does not match the header's pattern, or the header came more than once.
    Invalid(String),
}

impl HeaderError {
    pub fn message(&self) -> String {
        match self {
            HeaderError::Missing(name) => format!("Bad request: header {name} is missing"),
            HeaderError::NotAllowed(name) => format!("Bad request: header {name} is not allowed"),
            HeaderError::Invalid(name) => format!("Bad request: header {name} is invalid"),
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            HeaderError::Missing(_) => "required header missing",
            HeaderError::NotAllowed(_) => "forbidden header present",
            HeaderError::Invalid(_) => "header value does not match its pattern",
        }
    }
}

impl HeaderRules {
    /// `owned`: headers the API itself consumes or sets (its credential headers...), which a
    /// `forbidden` entry would contradict.
    pub fn compile(
        cfg: &HeaderRulesConfig,
        path: &str,
        owned: &[&str],
    ) -> Result<Self, ConfigError> {
        let name = |n: &String, field: String| -> Result<String, ConfigError> {
            if !is_token(n) || n.len() > 256 {
                return Err(ConfigError::new(
                    field,
                    format!("{n:?} is not a header name"),
                ));
            }
            Ok(n.to_ascii_lowercase())
        };
        let mut required: Vec<String> = Vec::new();
        for (i, n) in cfg.required.iter().enumerate() {
            let field = index(&join(path, "required"), i);
            let n = name(n, field.clone())?;
            if required.contains(&n) {
                return Err(ConfigError::new(field, format!("{n} is listed twice")));
            }
            required.push(n);
        }
        let mut forbidden: Vec<String> = Vec::new();
        for (i, n) in cfg.forbidden.iter().enumerate() {
            let field = index(&join(path, "forbidden"), i);
            let n = name(n, field.clone())?;
            if forbidden.iter().any(|f| same_header_name(f, &n)) {
                return Err(ConfigError::new(
                    field,
                    format!("{n} is listed twice (names compare in every spelling)"),
                ));
            }
            if let Some(r) = required.iter().find(|r| same_header_name(r, &n)) {
                return Err(ConfigError::new(
                    field,
                    format!("{n} is also required ({r}): no request could pass"),
                ));
            }
            if SET_BY_ENVOY.iter().any(|e| same_header_name(e, &n)) {
                return Err(ConfigError::new(
                    field,
                    format!("Envoy sets {n} on every request before gateguard runs: no request could pass"),
                ));
            }
            if let Some(o) = owned.iter().find(|o| same_header_name(o, &n)) {
                return Err(ConfigError::new(
                    field,
                    format!("{n} is a header this API reads itself ({o}): forbid the credential, not its header"),
                ));
            }
            forbidden.push(n);
        }
        let mut patterns: Vec<(String, Matcher)> = Vec::new();
        for (n, pattern) in &cfg.patterns {
            let field = join(&join(path, "patterns"), n);
            let n = name(n, field.clone())?;
            if patterns.iter().any(|(p, _)| same_header_name(p, &n)) {
                return Err(ConfigError::new(
                    field,
                    format!("{n} has two patterns (names compare in every spelling)"),
                ));
            }
            if let Some(f) = forbidden.iter().find(|f| same_header_name(f, &n)) {
                return Err(ConfigError::new(
                    field,
                    format!("{n} is forbidden ({f}): its pattern could never apply"),
                ));
            }
            if pattern.len() > MAX_PATTERN_LEN {
                return Err(ConfigError::new(
                    field,
                    format!(
                        "pattern is {} bytes; the limit is {MAX_PATTERN_LEN}",
                        pattern.len()
                    ),
                ));
            }
            // Compiled alone first: `a)|(?:.*` would otherwise close the anchoring group early
            // and match anything.
            let alone = RegexBuilder::new(pattern)
                .size_limit(PATTERN_SIZE_LIMIT)
                .nest_limit(PATTERN_NEST_LIMIT)
                .build();
            let regex = alone.and_then(|_| {
                RegexBuilder::new(&format!("^(?:{pattern})$"))
                    .size_limit(PATTERN_SIZE_LIMIT)
                    .nest_limit(PATTERN_NEST_LIMIT)
                    .build()
            });
            let regex = regex.map_err(|e| {
                ConfigError::new(
                    &field,
                    format!("pattern does not compile: {}", one_line(&e.to_string())),
                )
            })?;
            let matcher = match Literals::parse(pattern) {
                Some(literals) => Matcher::Literals(literals),
                None => Matcher::Regex(regex),
            };
            patterns.push((n, matcher));
        }
        Ok(Self {
            required,
            forbidden,
            patterns,
        })
    }

    /// Required first, then forbidden, then patterns, each in the policy's order.
    pub fn check(&self, headers: &[(String, String)]) -> Result<(), HeaderError> {
        for name in &self.required {
            // The name itself: a backend that does not fold `_` into `-` would not see
            // `x_correlation_id` as the required header.
            let present = |k: &String| k.eq_ignore_ascii_case(name) || is_authority(name, k);
            if !headers.iter().any(|(k, _)| present(k)) {
                return Err(HeaderError::Missing(name.clone()));
            }
        }
        for name in &self.forbidden {
            // A backend that folds `x_debug` into `x-debug` must not see it either.
            if headers.iter().any(|(k, _)| names(name, k)) {
                return Err(HeaderError::NotAllowed(name.clone()));
            }
        }
        for (name, matcher) in &self.patterns {
            // Every spelling a backend may fold into this header, each checked; a second value
            // would reach a backend joined to the first (`a, b`), which the pattern never saw.
            let mut values = headers
                .iter()
                .filter(|(k, _)| names(name, k))
                .map(|(_, v)| v);
            let Some(value) = values.next() else {
                continue;
            };
            if values.next().is_some()
                || value.len() > MAX_PATTERN_VALUE_BYTES
                || !matcher.is_match(value)
            {
                return Err(HeaderError::Invalid(name.clone()));
            }
        }
        Ok(())
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn rules(doc: serde_json::Value) -> Result<HeaderRules, ConfigError> {
        let cfg: HeaderRulesConfig = serde_json::from_value(doc).unwrap();
        HeaderRules::compile(&cfg, "apis[0].headers", &["authorization"])
    }

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const UUID: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";

    fn example() -> HeaderRules {
        rules(serde_json::json!({
            "required": ["X-Correlation-Id"], "forbidden": ["x-debug"],
            "patterns": {"x-correlation-id": "[0-9a-fA-F-]{36}"}
        }))
        .unwrap()
    }

    #[test]
    fn required_forbidden_and_patterns_each_name_the_header() {
        let r = example();
        assert_eq!(r.check(&headers(&[("x-correlation-id", UUID)])), Ok(()));
        let missing = r.check(&headers(&[])).unwrap_err();
        assert_eq!(
            missing.message(),
            "Bad request: header x-correlation-id is missing"
        );
        let e = r
            .check(&headers(&[("x-correlation-id", UUID), ("x-debug", "1")]))
            .unwrap_err();
        assert_eq!(e.message(), "Bad request: header x-debug is not allowed");
        let e = r
            .check(&headers(&[("x-correlation-id", "<script>")]))
            .unwrap_err();
        assert_eq!(
            e.message(),
            "Bad request: header x-correlation-id is invalid"
        );
        assert!(!e.message().contains("script"));
    }

    #[test]
    fn a_forbidden_header_is_refused_in_every_spelling() {
        let r = example();
        for spelling in ["X-Debug", "x_debug", "X_DEBUG"] {
            let e = r
                .check(&headers(&[("x-correlation-id", UUID), (spelling, "1")]))
                .unwrap_err();
            assert_eq!(e, HeaderError::NotAllowed("x-debug".into()), "{spelling}");
        }
    }

    #[test]
    fn patterns_match_the_whole_value_of_every_spelling_once() {
        let r = example();
        // A valid value with anything around it is not a match.
        for bad in [
            &format!("{UUID}x")[..],
            &format!("x{UUID}")[..],
            &format!("{UUID}\n")[..],
            &format!("{UUID}, {UUID}")[..],
            "",
        ] {
            assert_eq!(
                r.check(&headers(&[("x-correlation-id", bad)])),
                Err(HeaderError::Invalid("x-correlation-id".into())),
                "{bad:?}"
            );
        }
        // A second value, or another spelling a backend folds into the same header.
        assert!(r
            .check(&headers(&[
                ("x-correlation-id", UUID),
                ("x-correlation-id", UUID)
            ]))
            .is_err());
        assert!(r
            .check(&headers(&[
                ("x-correlation-id", UUID),
                ("x_correlation_id", "evil")
            ]))
            .is_err());
    }

    #[test]
    fn host_is_the_authority_envoy_hands_the_filter() {
        let r = rules(serde_json::json!({"required": ["Host"], "patterns": {"host": "api\\.contoso\\.com(:443)?"}}))
            .unwrap();
        assert_eq!(
            r.check(&headers(&[(":authority", "api.contoso.com")])),
            Ok(())
        );
        assert_eq!(
            r.check(&headers(&[(":authority", "evil.example")])),
            Err(HeaderError::Invalid("host".into()))
        );
        assert_eq!(
            r.check(&headers(&[])),
            Err(HeaderError::Missing("host".into()))
        );
    }

    #[test]
    fn headers_envoy_sets_itself_cannot_be_forbidden() {
        for name in [
            "x-request-id",
            "X-Forwarded-Proto",
            "x_envoy_external_address",
        ] {
            let err = rules(serde_json::json!({"forbidden": [name]})).unwrap_err();
            assert!(err.reason.contains("Envoy sets"), "{name}: {}", err.reason);
        }
    }

    #[test]
    fn a_pattern_cannot_escape_its_anchors_and_long_values_are_not_matched() {
        let err =
            rules(serde_json::json!({"patterns": {"x-tenant": "contoso)|(?:.*"}})).unwrap_err();
        assert!(err.reason.contains("does not compile"), "{}", err.reason);
        let r = rules(serde_json::json!({"patterns": {"x-a": "a*"}})).unwrap();
        let at_limit = "a".repeat(MAX_PATTERN_VALUE_BYTES);
        assert_eq!(r.check(&headers(&[("x-a", &at_limit)])), Ok(()));
        let over = "a".repeat(MAX_PATTERN_VALUE_BYTES + 1);
        assert!(r.check(&headers(&[("x-a", &over)])).is_err());
    }

    #[test]
    fn a_required_header_must_come_under_its_own_name() {
        let r = example();
        let id = "0f8fad5b-d9cb-469f-a165-70867728950e";
        assert_eq!(
            r.check(&headers(&[("x_correlation_id", id)])),
            Err(HeaderError::Missing("x-correlation-id".into()))
        );
        assert_eq!(r.check(&headers(&[("X-Correlation-ID", id)])), Ok(()));
    }

    #[test]
    fn a_pattern_does_not_make_its_header_required() {
        let r = rules(serde_json::json!({"patterns": {"x-tenant": "[a-z]+"}})).unwrap();
        assert_eq!(r.check(&headers(&[])), Ok(()));
        assert_eq!(r.check(&headers(&[("x-tenant", "contoso")])), Ok(()));
        assert!(r.check(&headers(&[("x-tenant", "Contoso")])).is_err());
    }

    #[test]
    fn patterns_that_would_backtrack_run_in_linear_time() {
        // Catastrophic for a backtracking engine: (a+)+$ against "aaaa...!".
        let r = rules(serde_json::json!({"patterns": {"x-a": "(a+)+"}})).unwrap();
        let value = format!("{}!", "a".repeat(60_000));
        let start = std::time::Instant::now();
        assert!(r.check(&headers(&[("x-a", &value)])).is_err());
        // Generous: a backtracking engine would not finish in the lifetime of the machine.
        assert!(start.elapsed().as_secs() < 10);
    }

    #[test]
    fn bad_rules_are_refused_with_their_field() {
        let cases = [
            (
                serde_json::json!({"patterns": {"x-a": "("}}),
                "apis[0].headers.patterns.x-a",
                "does not compile",
            ),
            (
                serde_json::json!({"patterns": {"x-a": "a".repeat(MAX_PATTERN_LEN + 1)}}),
                "apis[0].headers.patterns.x-a",
                "limit",
            ),
            (
                serde_json::json!({"required": ["x a"]}),
                "apis[0].headers.required[0]",
                "not a header name",
            ),
            (
                serde_json::json!({"forbidden": ["x-a", "X_A"]}),
                "apis[0].headers.forbidden[1]",
                "twice",
            ),
            (
                serde_json::json!({"required": ["x-a"], "forbidden": ["x-a"]}),
                "apis[0].headers.forbidden[0]",
                "also required",
            ),
            (
                serde_json::json!({"forbidden": ["Authorization"]}),
                "apis[0].headers.forbidden[0]",
                "reads itself",
            ),
            (
                serde_json::json!({"forbidden": ["x-a"], "patterns": {"x-a": "b"}}),
                "apis[0].headers.patterns.x-a",
                "forbidden",
            ),
            (
                serde_json::json!({"patterns": {"x-a": "a", "X-A": "b"}}),
                "apis[0].headers.patterns",
                "two patterns",
            ),
        ];
        for (doc, path, reason) in cases {
            let err = rules(doc.clone()).unwrap_err();
            assert!(err.path.starts_with(path), "{doc}: {}", err.path);
            assert!(err.reason.contains(reason), "{doc}: {}", err.reason);
        }
    }
}
