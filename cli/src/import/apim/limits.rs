//! `<rate-limit>`, `<rate-limit-by-key>`, `<quota>` and `<quota-by-key>`: `rate_limit` and
//! `quota`, counted `by` subscription key, client IP or token subject.
//!
//! What converts is what gateguard counts the same way: one call per request, calls (never
//! kilobytes), per subscription, client IP or token subject. A `counter-key` is recognised by
//! its shape (expressions are never evaluated); any other key, an `increment-condition`, an
//! `increment-count` other than 1, a `bandwidth`, a lifetime quota, a limit for one API or
//! operation of a product, and a second limit of a kind are refused. A limit counted by a
//! credential is settled once the whole document is read, since it needs that credential's
//! check in the converted policy, wherever that stands.
//!
//! How gateguard counts otherwise (where in the request, its windows, per API and replica) is
//! noted for each limit converted, never left to be found out (docs/operations.md, "Importing
//! an API Management policy").

use gateguard_core::rate_limit::{CallLimit, CallLimitConfig, LimitKey, LimitKind};
use roxmltree::Node;

use super::report::{plural, El, Report};
use super::xml::{elements, literal};
use super::Cx;

/// A limit read from the document, waiting for the checks it depends on.
pub(super) struct Limit {
    el: El,
    kind: LimitKind,
    config: CallLimitConfig,
    /// Counted per APIM subscription (`<rate-limit>`, `<quota>`, `context.Subscription.Id`),
    /// whose primary and secondary keys share one count, rather than per key.
    per_subscription: bool,
    /// How gateguard counts differently, for one note.
    differences: Vec<String>,
    /// Other notes (response headers and variables).
    notes: Vec<String>,
    /// Where its findings go in the report, to keep document order.
    at: usize,
}

/// The attributes each limit may have; any other could change what is counted.
fn known_attributes(policy: &str) -> &'static [&'static str] {
    match policy {
        "rate-limit" => &[
            "calls",
            "renewal-period",
            "retry-after-header-name",
            "retry-after-variable-name",
            "remaining-calls-header-name",
            "remaining-calls-variable-name",
            "total-calls-header-name",
        ],
        "rate-limit-by-key" => &[
            "calls",
            "renewal-period",
            "counter-key",
            "increment-condition",
            "increment-count",
            "retry-after-header-name",
            "retry-after-variable-name",
            "remaining-calls-header-name",
            "remaining-calls-variable-name",
            "total-calls-header-name",
        ],
        "quota" => &["calls", "bandwidth", "renewal-period"],
        _ => &[
            "calls",
            "bandwidth",
            "renewal-period",
            "counter-key",
            "increment-condition",
            "increment-count",
            "first-period-start",
        ],
    }
}

/// The response headers gateguard sends for a limit, by the APIM attribute that names one.
const GATEGUARD_HEADERS: [(&str, &str, &str); 3] = [
    (
        "retry-after-header-name",
        "Retry-After",
        "its refusal says when to retry in Retry-After",
    ),
    (
        "remaining-calls-header-name",
        "x-ratelimit-remaining",
        "it sends the calls left as x-ratelimit-remaining",
    ),
    (
        "total-calls-header-name",
        "x-ratelimit-limit",
        "it sends the limit as x-ratelimit-limit",
    ),
];

impl Cx<'_, '_> {
    pub(super) fn limit(&mut self, node: Node, e: &El) {
        match self.read_limit(node, e) {
            Ok(limit) => self.limits.push(limit),
            Err(reason) => self.report.skip(e, reason),
        }
    }

    fn read_limit(&self, node: Node, e: &El) -> Result<Limit, String> {
        let (kind, field, what) = if e.name.starts_with("rate-limit") {
            (LimitKind::Rate, "rate_limit", "rate limit")
        } else {
            (LimitKind::Quota, "quota", "quota")
        };
        if let Some(first) = self.limits.iter().find(|l| l.kind == kind) {
            return Err(format!(
                "a second {what} (the first is <{}> on line {}): gateguard has one {what} per API",
                first.el.name, first.el.line
            ));
        }
        if let Some(child) = elements(node).next() {
            return Err(format!(
                "<{}> on line {}: a limit for one API or operation of a product; gateguard \
                 limits the whole API: convert that API's own policy",
                child.tag_name().name(),
                self.el(child).line
            ));
        }
        let known = known_attributes(&e.name);
        if let Some(a) = node.attributes().find(|a| !known.contains(&a.name())) {
            return Err(format!(
                "unknown attribute {}: what it changes would be lost",
                a.name()
            ));
        }
        if node.attribute("increment-condition").is_some() {
            return Err(
                "increment-condition: gateguard counts every request that reaches the limit, \
                 whatever its outcome"
                    .into(),
            );
        }
        if let Some(n) = node.attribute("increment-count") {
            if n.trim() != "1" {
                return Err(format!(
                    "increment-count {n:?}: gateguard counts one call per request"
                ));
            }
        }
        if let Some(kb) = node.attribute("bandwidth") {
            let only = if node.attribute("calls").is_none() {
                " (a bandwidth-only quota)"
            } else {
                ""
            };
            return Err(format!(
                "bandwidth {kb:?}{only}: gateguard counts calls, not kilobytes"
            ));
        }
        let calls = whole_number(node, "calls")?;
        let period = whole_number(node, "renewal-period")?;
        if kind == LimitKind::Quota && period == 0 {
            return Err(
                "renewal-period 0 is a quota for the subscription's whole life: gateguard's \
                 periods are 1 second to 366 days"
                    .into(),
            );
        }
        let by_key = e.name.ends_with("-by-key");
        let (by, per_subscription) = if by_key {
            self.counter_key(node)?
        } else {
            (LimitKey::SubscriptionKey, true)
        };
        let config = CallLimitConfig {
            by,
            calls,
            renewal_period_seconds: period,
        };
        CallLimit::compile(&config, kind, field)
            .map_err(|reason| format!("gateguard refuses it: {reason}"))?;
        Ok(Limit {
            el: El {
                name: e.name.clone(),
                line: e.line,
            },
            kind,
            config,
            per_subscription,
            differences: differences(node, &e.name, kind, by),
            notes: header_notes(node),
            at: self.report.items.len(),
        })
    }

    /// Whom a `counter-key` counts, and whether per APIM subscription.
    fn counter_key(&self, node: Node) -> Result<(LimitKey, bool), String> {
        let Some(expr) = node.attribute("counter-key") else {
            return Err("no counter-key".into());
        };
        let jwt_variables: Vec<&str> = self
            .doc
            .descendants()
            .filter(|n| n.has_tag_name("validate-jwt"))
            .filter_map(|n| n.attribute("output-token-variable-name"))
            .collect();
        caller_of(expr, &jwt_variables).ok_or_else(|| {
            format!(
                "counter-key {expr:?}: gateguard counts by subscription \
                 (@(context.Subscription.Id) or @(context.Subscription.Key)), client IP \
                 (@(context.Request.IpAddress)) or token subject \
                 (@(context.Request.Headers.GetValueOrDefault(\"Authorization\",\"\").AsJwt()?.Subject)) \
                 only; it does not evaluate other expressions"
            )
        })
    }

    /// Every limit read, once the document is: converted when the policy checks the credential
    /// it is counted by, refused otherwise.
    pub(super) fn settle_limits(&mut self) {
        let mut inserted = 0;
        for limit in std::mem::take(&mut self.limits) {
            let mut found = Report::default();
            self.settle(&limit, &mut found);
            let at = (limit.at + inserted).min(self.report.items.len());
            inserted += found.items.len();
            self.report.items.splice(at..at, found.items);
        }
    }

    /// One limit's findings, into `found`.
    fn settle(&mut self, limit: &Limit, found: &mut Report) {
        let e = &limit.el;
        let missing = match limit.config.by {
            LimitKey::SubscriptionKey if self.api.subscription_key.is_none() => Some(
                "counted per subscription, and the converted policy checks no subscription \
                 key: gateguard knows subscriptions only by a <check-header \
                 name=\"Ocp-Apim-Subscription-Key\"> listing their keys (APIM's own \
                 subscriptions are not in this document)",
            ),
            LimitKey::Subject if self.api.jwt.is_none() => Some(
                "counted per token subject, and the converted policy has no \
                 <validate-jwt>: gateguard counts a subject only once its token is valid",
            ),
            _ => None,
        };
        if let Some(reason) = missing {
            return found.skip(e, reason);
        }
        let mut differences = limit.differences.clone();
        let keys = self
            .api
            .subscription_key
            .as_ref()
            .map_or(0, |k| k.keys_sha256.len());
        if limit.per_subscription && keys > 1 {
            differences.push(format!(
                "{keys} keys are listed and gateguard counts each on its own, where APIM \
                 counts a subscription's primary and secondary keys together"
            ));
        }
        let issuers = self.api.jwt.as_ref().map_or(0, |j| j.issuers.len());
        if limit.config.by == LimitKey::Subject && issuers > 1 {
            differences.push(format!(
                "the same sub from two of the {issuers} issuers is two callers"
            ));
        }
        let c = &limit.config;
        let field = match limit.kind {
            LimitKind::Rate => "rate_limit",
            LimitKind::Quota => "quota",
        };
        found.converted(
            e,
            format!(
                "{field} ({} call{} per {} s by {})",
                c.calls,
                plural(usize::try_from(c.calls).unwrap_or(usize::MAX)),
                c.renewal_period_seconds,
                c.by.name()
            ),
        );
        found.note(
            e,
            format!("counted as gateguard counts: {}", differences.join("; ")),
        );
        for note in &limit.notes {
            found.note(e, note.clone());
        }
        let config = Some(limit.config.clone());
        match limit.kind {
            LimitKind::Rate => self.api.rate_limit = config,
            LimitKind::Quota => self.api.quota = config,
        }
    }
}

/// A literal whole number of an attribute.
fn whole_number(node: Node, attr: &str) -> Result<u64, String> {
    let raw = node.attribute(attr).ok_or_else(|| format!("no {attr}"))?;
    let value = literal(raw).map_err(|r| format!("{attr} {r}"))?;
    value
        .parse::<u64>()
        .map_err(|_| format!("{attr} {value:?} is not a whole number"))
}

/// How gateguard's count differs from APIM's for this limit: when it counts, its window, and
/// where the count is kept. They change when a caller is refused, never that one is.
fn differences(node: Node, policy: &str, kind: LimitKind, by: LimitKey) -> Vec<String> {
    let mut out = vec![match by {
        LimitKey::ClientIp => {
            "after the IP filter and header checks and before any credential, wherever the \
             element stands; an IPv6 client by its /64"
        }
        LimitKey::SubscriptionKey => "only once the subscription key is valid",
        LimitKey::Subject => {
            "only once the token is valid, by its iss and sub (a valid token without sub is \
             refused, 403)"
        }
    }
    .to_string()];
    out.push(match kind {
        LimitKind::Rate => "its window opens at the caller's first counted call, where APIM's \
                            slides over the last renewal-period seconds"
            .to_string(),
        LimitKind::Quota if policy == "quota" => "its period opens at the caller's first \
                                                  counted call, where APIM's periods run from \
                                                  the subscription's creation"
            .to_string(),
        LimitKind::Quota => format!(
            "its period opens at the caller's first counted call, where APIM's run from \
             first-period-start ({})",
            node.attribute("first-period-start")
                .unwrap_or("0001-01-01T00:00:00Z")
        ),
    });
    if policy.ends_with("-by-key") {
        out.push(
            "each API counts on its own, where APIM shares a counter-key's count with every \
             API that uses the same key"
                .into(),
        );
    }
    out.push("each gateway replica counts alone".into());
    out
}

/// The response headers and variables APIM would name: gateguard sends its own headers (the
/// same facts), and has no policy expressions to read a variable.
fn header_notes(node: Node) -> Vec<String> {
    let mut notes = Vec::new();
    for (attr, ours, what) in GATEGUARD_HEADERS {
        if let Some(name) = node.attribute(attr) {
            if !name.trim().eq_ignore_ascii_case(ours) {
                notes.push(format!(
                    "{attr} {name:?}: gateguard does not send it; {what}"
                ));
            }
        }
    }
    for attr in ["retry-after-variable-name", "remaining-calls-variable-name"] {
        if node.attribute(attr).is_some() {
            notes.push(format!(
                "{attr}: a context variable only policy expressions read (any check that reads \
                 it is refused); nothing to set"
            ));
        }
    }
    notes
}

/// Whom a counter-key counts, recognised by its shape (whitespace aside), and whether per APIM
/// subscription: `context.Subscription.Id` (per subscription) or `.Key` (per key),
/// `context.Request.IpAddress`, or the `Subject` of the token in `Authorization` (however the
/// scheme is cut off) or of the token a `<validate-jwt>` left in one of `jwt_variables`.
fn caller_of(expr: &str, jwt_variables: &[&str]) -> Option<(LimitKey, bool)> {
    let compact = compact(expr);
    let body = compact.strip_prefix("@(")?.strip_suffix(')')?;
    match body {
        "context.Subscription.Id" | "context.Subscription?.Id" => {
            Some((LimitKey::SubscriptionKey, true))
        }
        "context.Subscription.Key" | "context.Subscription?.Key" => {
            Some((LimitKey::SubscriptionKey, false))
        }
        "context.Request.IpAddress" => Some((LimitKey::ClientIp, false)),
        _ => is_token_subject(body, jwt_variables).then_some((LimitKey::Subject, false)),
    }
}

fn is_token_subject(body: &str, jwt_variables: &[&str]) -> bool {
    let Some(token) = body.strip_suffix(".Subject") else {
        return false;
    };
    let token = token.strip_suffix('?').unwrap_or(token);
    if let Some(header) = token.strip_suffix(".AsJwt()") {
        return is_authorization_token(header.strip_suffix('?').unwrap_or(header));
    }
    jwt_variables.iter().any(|v| {
        token == format!("((Jwt)context.Variables[\"{v}\"])")
            || token == format!("context.Variables.GetValueOrDefault<Jwt>(\"{v}\")")
    })
}

/// The `Authorization` header's value, or the token in it with the scheme cut off.
fn is_authorization_token(s: &str) -> bool {
    const CUTS: [&str; 4] = [
        ".Split(' ').Last()",
        ".Split(' ')[1]",
        ".Replace(\"Bearer \",\"\")",
        ".Substring(7)",
    ];
    let s = CUTS
        .iter()
        .find_map(|cut| s.strip_suffix(cut))
        .map_or(s, |h| h.strip_suffix('?').unwrap_or(h));
    let Some(args) = s
        .strip_prefix("context.Request.Headers.GetValueOrDefault(")
        .and_then(|a| a.strip_suffix(')'))
    else {
        return false;
    };
    let (name, default) = match args.split_once(',') {
        Some((name, default)) => (name, Some(default)),
        None => (args, None),
    };
    name.eq_ignore_ascii_case("\"Authorization\"")
        && matches!(
            default,
            None | Some("\"\"" | "null" | "string.Empty" | "String.Empty")
        )
}

/// `expr` without whitespace outside C# string and character literals.
fn compact(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.trim().chars() {
        match quote {
            Some(q) => {
                out.push(c);
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None if c.is_whitespace() => {}
            None => {
                if c == '"' || c == '\'' {
                    quote = Some(c);
                }
                out.push(c);
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn counter_keys_are_recognised_by_shape() {
        let subject = Some((LimitKey::Subject, false));
        for expr in [
            r#"@(context.Request.Headers.GetValueOrDefault("Authorization","").AsJwt()?.Subject)"#,
            r#"@( context.Request.Headers.GetValueOrDefault( "authorization" , "" ).AsJwt()?.Subject )"#,
            r#"@(context.Request.Headers.GetValueOrDefault("Authorization", "").AsJwt().Subject)"#,
            r#"@(context.Request.Headers.GetValueOrDefault("Authorization")?.AsJwt()?.Subject)"#,
            r#"@(context.Request.Headers.GetValueOrDefault("Authorization", string.Empty).Split(' ').Last().AsJwt()?.Subject)"#,
            r#"@(context.Request.Headers.GetValueOrDefault("Authorization","").Replace("Bearer ", "").AsJwt()?.Subject)"#,
            "@(context.Request.Headers.GetValueOrDefault(\"Authorization\",\"\")\n    .AsJwt()?.Subject)",
            r#"@(((Jwt)context.Variables["jwt"]).Subject)"#,
            r#"@(context.Variables.GetValueOrDefault<Jwt>("jwt")?.Subject)"#,
        ] {
            assert_eq!(caller_of(expr, &["jwt"]), subject, "{expr}");
        }
        assert_eq!(
            caller_of("@(context.Request.IpAddress)", &[]),
            Some((LimitKey::ClientIp, false))
        );
        assert_eq!(
            caller_of("@( context.Subscription.Id )", &[]),
            Some((LimitKey::SubscriptionKey, true))
        );
        assert_eq!(
            caller_of("@(context.Subscription?.Key)", &[]),
            Some((LimitKey::SubscriptionKey, false))
        );
        for expr in [
            // Another header's token, another claim, a variable no validate-jwt fills.
            r#"@(context.Request.Headers.GetValueOrDefault("X-Token","").AsJwt()?.Subject)"#,
            r#"@(context.Request.Headers.GetValueOrDefault("Authorization","").AsJwt()?.Id)"#,
            r#"@(((Jwt)context.Variables["other"]).Subject)"#,
            // A default that is itself a token, a space inside a literal that matters.
            r#"@(context.Request.Headers.GetValueOrDefault("Authorization","x").AsJwt()?.Subject)"#,
            r#"@(context.Request.Headers.GetValueOrDefault("Author ization","").AsJwt()?.Subject)"#,
            // Keys gateguard does not have: a header, the IP and the operation, a constant.
            r#"@(context.Request.Headers.GetValueOrDefault("X-Client-Id",""))"#,
            r#"@(context.Request.IpAddress + context.Operation.Id)"#,
            "@(context.Request.IpAddress",
            "everyone",
            "@(context.Subscription.Name)",
            "@(context.request.ipaddress)",
        ] {
            assert_eq!(caller_of(expr, &["jwt"]), None, "{expr}");
        }
    }
}
