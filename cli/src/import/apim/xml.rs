//! Reading the APIM document: XML as the portal's editor shows it (raw policy expressions
//! repaired) or a snippet of inbound policies, and the values gateguard can use as they are.

use roxmltree::{Document, Node};

use super::named_values;

/// The text that parses: as it is, with raw expressions escaped, or (a snippet of several
/// policies) wrapped in `<inbound>` on its first line, so line numbers hold.
pub fn parse_document(text: &str) -> Result<String, String> {
    let first = match Document::parse(text) {
        Ok(_) => return Ok(text.to_string()),
        Err(e) => e,
    };
    let escaped = escape_expressions(text);
    let mut candidates = vec![escaped.clone()];
    let trimmed = text.trim_start();
    if trimmed.starts_with('<') && !trimmed.starts_with("<?") && !trimmed.starts_with("<!DOCTYPE") {
        candidates.push(format!("<inbound>{text}</inbound>"));
        candidates.push(format!("<inbound>{escaped}</inbound>"));
    }
    let repaired = candidates
        .into_iter()
        .find(|c| Document::parse(c).is_ok())
        .ok_or_else(|| format!("not well-formed XML: {first}"))?;
    keeps_every_policy_element(text, &repaired)?;
    Ok(repaired)
}

/// Policy elements a repair must never swallow into an expression: were one lost, the import
/// would be weaker than its input.
const POLICY_ELEMENTS: &[&str] = &[
    "validate-jwt",
    "validate-azure-ad-token",
    "check-header",
    "ip-filter",
    "cors",
    "choose",
    "when",
    "otherwise",
    "validate-client-certificate",
    "authentication-certificate",
    "base",
    "include-fragment",
    "return-response",
    "rate-limit",
    "rate-limit-by-key",
    "quota",
    "quota-by-key",
    "set-header",
    "set-query-parameter",
    "rewrite-uri",
    "set-backend-service",
    "send-request",
    "forward-request",
    "set-variable",
    "validate-content",
    "validate-headers",
    "validate-parameters",
    "mock-response",
];

/// The repaired text must hold every policy element the raw text opens (outside comments): a
/// repair that misread where an expression ends would hide the elements after it.
fn keeps_every_policy_element(raw: &str, repaired: &str) -> Result<(), String> {
    let raw = without_comments(raw);
    let doc = Document::parse(repaired).map_err(|e| format!("not well-formed XML: {e}"))?;
    for name in POLICY_ELEMENTS {
        let opened = raw
            .match_indices(&format!("<{name}"))
            .filter(|(at, tag)| {
                raw.get(at + tag.len()..)
                    .and_then(|rest| rest.chars().next())
                    .is_some_and(|c| c.is_whitespace() || c == '/' || c == '>')
            })
            .count();
        let parsed = doc
            .descendants()
            .filter(|n| n.is_element() && n.tag_name().name() == *name)
            .count();
        if parsed < opened {
            return Err(format!(
                "the policy expressions could not be read safely: a <{name}> would be lost; \
                 export the policy from API Management (expressions escaped) and import that"
            ));
        }
    }
    Ok(())
}

fn without_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("<!--") {
        out.push_str(rest.get(..start).unwrap_or_default());
        rest = match rest
            .get(start..)
            .and_then(|r| r.find("-->").map(|e| start + e + 3))
        {
            Some(end) => rest.get(end..).unwrap_or_default(),
            None => "",
        };
    }
    out.push_str(rest);
    out
}

/// A `<set-header>` value that is exactly `{{name}}`: it becomes `{"env": NAME}` (the value,
/// usually a secret, is set in Envoy's environment), so it is neither filled in nor missing.
pub fn is_env_header_value(node: Node) -> bool {
    node.is_text()
        && named_value(node.text().unwrap_or_default()).is_some()
        && node.parent().is_some_and(|v| {
            v.has_tag_name("value") && v.parent().is_some_and(|h| h.has_tag_name("set-header"))
        })
}

pub fn elements<'a, 'i>(node: Node<'a, 'i>) -> impl Iterator<Item = Node<'a, 'i>> {
    node.children().filter(Node::is_element)
}

pub fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    elements(node).find(|n| n.tag_name().name() == name)
}

pub fn text_of(node: Node) -> String {
    node.text().unwrap_or("").trim().to_string()
}

/// A value gateguard can use as it is: not a policy expression, no placeholder left.
pub fn literal(value: &str) -> Result<String, String> {
    let v = value.trim();
    if v.starts_with("@(") || v.starts_with("@{") {
        return Err("is a policy expression (gateguard does not evaluate expressions)".into());
    }
    if let Some(p) = named_values::find(v).first() {
        return Err(format!("holds {}, which has no value", p.text));
    }
    Ok(v.to_string())
}

/// `{{name}}` alone: the named value's name.
pub fn named_value(value: &str) -> Option<&str> {
    let inner = value.trim().strip_prefix("{{")?.strip_suffix("}}")?.trim();
    let ok = !inner.is_empty()
        && inner
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    ok.then_some(inner)
}

pub fn parse_bool(value: Option<&str>, default: bool) -> Result<bool, String> {
    match value.map(str::trim) {
        None => Ok(default),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(v) => Err(format!(
            "{v:?} is not true or false (policy expressions are not evaluated)"
        )),
    }
}

/// The portal's code editor shows policy expressions raw: `condition="@(x != "a")"` and
/// `@(a < b && c)` are not well-formed XML (exports escape them). Escapes `"`, `<`, `>` and a
/// bare `&` inside every `@(...)` / `@{...}` in an attribute value or text, keeping lines.
fn escape_expressions(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len() + 64);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = c == '@' && matches!(chars.get(i + 1), Some('(' | '{'));
        if !start {
            out.push(c);
            i += 1;
            continue;
        }
        // An attribute value when the expression follows `="` or `='`.
        let quote = match (
            i.checked_sub(2).map(|j| chars[j]),
            i.checked_sub(1).map(|j| chars[j]),
        ) {
            (Some('='), Some(q @ ('"' | '\''))) => Some(q),
            _ => None,
        };
        let Some(end) = expression_end(&chars, i + 1) else {
            out.push(c);
            i += 1;
            continue;
        };
        for k in i..=end {
            let d = chars[k];
            match d {
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                '&' if !is_entity(&chars[k..]) => out.push_str("&amp;"),
                '"' if quote == Some('"') => out.push_str("&quot;"),
                '\'' if quote == Some('\'') => out.push_str("&apos;"),
                _ => out.push(d),
            }
        }
        i = end + 1;
    }
    out
}

fn is_entity(rest: &[char]) -> bool {
    let s: String = rest.iter().take(8).collect();
    ["&quot;", "&amp;", "&lt;", "&gt;", "&apos;", "&#"]
        .iter()
        .any(|e| s.starts_with(e))
}

/// Where the expression whose opening bracket is at `open_at` closes: brackets counted outside
/// C# string literals.
fn expression_end(chars: &[char], open_at: usize) -> Option<usize> {
    let (open, close) = if chars.get(open_at) == Some(&'(') {
        ('(', ')')
    } else {
        ('{', '}')
    };
    let mut depth = 0usize;
    let mut j = open_at;
    let mut in_string = false;
    // A verbatim string (`@"..."`): no backslash escapes, `""` is a quote.
    let mut verbatim = false;
    while let Some(&d) = chars.get(j) {
        if in_string {
            let escaped_quote = verbatim && d == '"' && chars.get(j + 1) == Some(&'"');
            if (d == '\\' && !verbatim) || escaped_quote {
                j += 1;
            } else if d == '"' {
                in_string = false;
            }
        } else if d == '"' {
            in_string = true;
            verbatim = j > 0 && chars.get(j - 1) == Some(&'@');
        } else if d == '\'' {
            // A character literal: `'x'` or `'\x'`.
            j += if chars.get(j + 1) == Some(&'\\') {
                3
            } else {
                2
            };
        } else if d == open {
            depth += 1;
        } else if d == close {
            depth = depth.saturating_sub(1);
            if depth == 0 {
                return Some(j);
            }
        }
        j += 1;
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_repair_that_would_swallow_a_policy_element_is_refused() {
        // C# character literals are not modelled by the bracket counter: `'('` opens nothing.
        let text = r#"<policies><inbound>
<set-variable name="v" value="@(context.Request.Url.Path.Split('(')[0] != "")" />
<validate-jwt header-name="Authorization"><issuers><issuer>x</issuer></issuers></validate-jwt>
<set-variable name="w" value="@(context.Request.Url.Path.TrimEnd(')'))" />
</inbound></policies>"#;
        let repaired = parse_document(text).unwrap();
        let doc = Document::parse(&repaired).unwrap();
        assert!(doc
            .descendants()
            .any(|n| n.tag_name().name() == "validate-jwt"));
        // Whatever the bracket counter misreads, the element check refuses the repair.
        let raw = "<a><b v=\"@(x\" /><validate-jwt/>)\" /></a>";
        let swallowed = "<a><b v=\"@(x&quot; /&gt;&lt;validate-jwt/&gt;)\" /></a>";
        let err = keeps_every_policy_element(raw, swallowed).unwrap_err();
        assert!(err.contains("<validate-jwt> would be lost"), "{err}");
        // A commented-out element is not an element.
        let text = "<policies><inbound><!-- <validate-jwt/> --><set-variable name=\"v\" value=\"@(a < b)\" /></inbound></policies>";
        assert!(parse_document(text).is_ok());
    }

    #[test]
    fn raw_expressions_are_repaired() {
        let raw = "<a>\n<when condition=\"@(x.NotAfter < DateTime.Now && y != \"q\")\">@(a < b)</when>\n</a>";
        assert!(Document::parse(raw).is_err());
        let fixed = escape_expressions(raw);
        let doc = Document::parse(&fixed).unwrap();
        let when = doc.root_element().first_element_child().unwrap();
        assert_eq!(
            when.attribute("condition"),
            Some("@(x.NotAfter < DateTime.Now && y != \"q\")")
        );
        assert_eq!(when.text(), Some("@(a < b)"));
        assert_eq!(fixed.lines().count(), raw.lines().count());
        // Already escaped: unchanged.
        let escaped = "<w c=\"@(a &amp;&amp; b != &quot;x&quot;)\"/>";
        assert_eq!(escape_expressions(escaped), escaped);
    }

    #[test]
    fn named_values() {
        assert_eq!(named_value("{{functions-key}}"), Some("functions-key"));
        assert_eq!(named_value(" {{ a.b }} "), Some("a.b"));
        assert_eq!(named_value("Bearer {{x}}"), None);
    }
}
