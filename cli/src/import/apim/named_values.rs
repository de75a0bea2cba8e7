//! APIM named values (`{{name}}`) and template placeholders (`${name}`, `%{ ... }`) in a
//! policy document: filled in from `--named-values FILE` before conversion, and every one left
//! over found, so an element that holds one is refused rather than converted with the
//! placeholder's text. Values filled in never appear in a message ([`Masker`]).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use roxmltree::{Document, Node};

use crate::import::{read_text, Failure};

/// The values `--named-values` supplies, by name (`{{name}}` and `${name}` look up the same).
#[derive(Default)]
pub struct NamedValues {
    values: BTreeMap<String, String>,
    /// Whether a file was given at all, for messages.
    pub given: bool,
}

impl NamedValues {
    /// Reads a JSON object `{"name": "value", ...}`. Errors name the entry, never a value.
    pub fn read(path: &Path) -> Result<Self, Failure> {
        let text = read_text(path)?;
        Self::parse(&text).map_err(|e| Failure::Invalid(format!("{}: {e}", path.display())))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        // serde_json's messages quote no input, only positions.
        let doc: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let serde_json::Value::Object(object) = doc else {
            return Err("expected a JSON object {\"name\": \"value\", ...}".into());
        };
        let mut values = BTreeMap::new();
        for (name, value) in object {
            let serde_json::Value::String(value) = value else {
                return Err(format!("{name:?}: the value must be a string"));
            };
            values.insert(name, value);
        }
        Ok(Self {
            values,
            given: true,
        })
    }

    fn get(&self, p: &Placeholder) -> Option<&str> {
        match p.kind {
            Kind::Directive => None,
            Kind::Named | Kind::Template => self.values.get(&p.name).map(String::as_str),
        }
    }

    /// Why the placeholders `left` (with their lines) are still in the document, and what to
    /// do about it.
    pub fn missing(&self, left: &[(u32, Placeholder)]) -> String {
        let list: Vec<String> = left
            .iter()
            .map(|(line, p)| {
                let what = match p.kind {
                    Kind::Named => "named value",
                    Kind::Template => "template placeholder",
                    Kind::Directive => "template directive",
                };
                format!("{what} {} (line {line})", p.text)
            })
            .collect();
        let mut fix = if self.given {
            "add the values to the --named-values file".to_string()
        } else {
            "pass the values with --named-values FILE".to_string()
        };
        if left.iter().any(|(_, p)| p.kind != Kind::Named) {
            fix.push_str(", or render the template first");
        }
        format!("no value for {}: {fix}", list.join(", "))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `{{name}}`, APIM's named value.
    Named,
    /// `${name}`, as Terraform's templatefile and shell templates write them.
    Template,
    /// `%{ if ... }`: template logic, never filled in here.
    Directive,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placeholder {
    /// As written, `{{name}}`.
    pub text: String,
    pub name: String,
    pub kind: Kind,
    /// Where it stands in the string searched.
    pub range: Range<usize>,
}

/// Every placeholder in `s`, in order. An unclosed one runs to the end.
pub fn find(s: &str) -> Vec<Placeholder> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(rest) = s.get(i..) {
        let next = [
            ("{{", "}}", Kind::Named),
            ("${", "}", Kind::Template),
            ("%{", "}", Kind::Directive),
        ]
        .into_iter()
        .filter_map(|(open, close, kind)| rest.find(open).map(|at| (at, open, close, kind)))
        .min_by_key(|(at, ..)| *at);
        let Some((at, open, close, kind)) = next else {
            break;
        };
        let start = i + at;
        let body_start = start + open.len();
        let body_end = s
            .get(body_start..)
            .and_then(|b| b.find(close))
            .map_or(s.len(), |j| body_start + j);
        let end = (body_end + close.len()).min(s.len());
        let text = s.get(start..end).unwrap_or_default().to_string();
        let name = s
            .get(body_start..body_end)
            .unwrap_or_default()
            .trim()
            .to_string();
        out.push(Placeholder {
            text,
            name,
            kind,
            range: start..end,
        });
        i = end.max(start + 1);
    }
    out
}

/// Every value of the document that a placeholder can stand in (attribute values and text),
/// with its raw range in the source text.
fn value_ranges<'a, 'i>(doc: &'a Document<'i>) -> Vec<(Node<'a, 'i>, Range<usize>)> {
    let mut out = Vec::new();
    for node in doc.descendants() {
        if node.is_element() {
            out.extend(node.attributes().map(|a| (node, a.range_value())));
        } else if node.is_text() {
            out.push((node, node.range()));
        }
    }
    out
}

/// The placeholders left under `node` (itself included), with their lines, but those `keep`
/// accepts.
pub fn left_in(doc: &Document, node: Node, keep: &dyn Fn(Node) -> bool) -> Vec<(u32, Placeholder)> {
    let mut out = Vec::new();
    for n in node.descendants() {
        let mut check = |range: Range<usize>, value: &str| {
            if keep(n) {
                return;
            }
            for p in find(value) {
                out.push((doc.text_pos_at(range.start).row, p));
            }
        };
        if n.is_element() {
            for a in n.attributes() {
                check(a.range_value(), a.value());
            }
        } else if n.is_text() {
            check(n.range(), n.text().unwrap_or_default());
        }
    }
    out
}

/// `text` (which `doc` was parsed from) with every placeholder `values` supplies filled in,
/// XML-escaped so lines and structure stay as they were, but in nodes `keep` accepts; and the
/// masker for the values used.
pub fn substitute(
    text: &str,
    doc: &Document,
    values: &NamedValues,
    keep: &dyn Fn(Node) -> bool,
) -> (String, Masker) {
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    let mut masker = Masker::default();
    for (node, range) in value_ranges(doc) {
        if keep(node) {
            continue;
        }
        let raw = text.get(range.clone()).unwrap_or_default();
        for p in find(raw) {
            if let Some(value) = values.get(&p) {
                let at = range.start + p.range.start..range.start + p.range.end;
                edits.push((at, xml_escape(value)));
                masker.add(value, &p.text);
            }
        }
    }
    edits.sort_by_key(|(r, _)| r.start);
    let mut out = String::with_capacity(text.len());
    let mut done = 0;
    for (range, replacement) in edits {
        if range.start < done {
            continue;
        }
        out.push_str(text.get(done..range.start).unwrap_or_default());
        out.push_str(&replacement);
        done = range.end;
    }
    out.push_str(text.get(done..).unwrap_or_default());
    (out, masker)
}

/// Escaped for an attribute value or text alike; line breaks as character references so every
/// element keeps its line.
fn xml_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            c => out.push(c),
        }
    }
    out
}

/// Replaces the values filled in from `--named-values` by their placeholder in messages: any
/// of them may be a secret (APIM's "secret" flag is not in the file).
#[derive(Default)]
pub struct Masker {
    /// (value as it may appear, placeholder), longest first.
    pairs: Vec<(String, String)>,
}

/// Shorter values are words like "true" or "GET", and masking them garbles messages.
const MIN_MASKED: usize = 4;

impl Masker {
    fn add(&mut self, value: &str, placeholder: &str) {
        if value.chars().count() < MIN_MASKED {
            return;
        }
        // As written, and as `{:?}` and JSON quote it.
        let debug = format!("{value:?}");
        let json = serde_json::to_string(value).unwrap_or_default();
        for form in [value.to_string(), unquote(&debug), unquote(&json)] {
            if !form.is_empty() && !self.pairs.iter().any(|(v, _)| *v == form) {
                self.pairs.push((form, placeholder.to_string()));
            }
        }
        self.pairs.sort_by_key(|(v, _)| std::cmp::Reverse(v.len()));
    }

    pub fn mask(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (value, placeholder) in &self.pairs {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), placeholder);
            }
        }
        out
    }
}

fn unquote(s: &str) -> String {
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
        .to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn names(s: &str) -> Vec<(Kind, String)> {
        find(s).into_iter().map(|p| (p.kind, p.name)).collect()
    }

    #[test]
    fn finds_every_kind_of_placeholder() {
        assert_eq!(
            names("a {{one}} b ${two} %{ if x } {{ three.3 }}"),
            [
                (Kind::Named, "one".to_string()),
                (Kind::Template, "two".to_string()),
                (Kind::Directive, "if x".to_string()),
                (Kind::Named, "three.3".to_string()),
            ]
        );
        assert_eq!(names("{{open"), [(Kind::Named, "open".to_string())]);
        assert!(find("plain @(a { b })").is_empty());
        assert_eq!(find("x${y}")[0].range, 1..5);
    }

    #[test]
    fn the_named_values_file_is_an_object_of_strings() {
        let v = NamedValues::parse(r#"{"a": "1", "tenant-id": "x"}"#).unwrap();
        assert!(v.given);
        let e = NamedValues::parse(r#"{"a": 123456}"#).err().unwrap();
        assert!(e.contains("\"a\"") && !e.contains("123456"), "{e}");
        assert!(NamedValues::parse("[]").is_err());
        let e = NamedValues::parse(r#"{"a": "s3cret"#).err().unwrap();
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn substitution_escapes_and_keeps_lines() {
        let text = "<a x=\"{{q}}\">\n<b>${t}</b>\n<c>{{keep}}</c>\n<d>{{none}}</d>\n</a>";
        let doc = Document::parse(text).unwrap();
        let values = NamedValues::parse(
            r#"{"q": "say \"hi\" & <bye>", "t": "two\nlines", "keep": "secret-kept"}"#,
        )
        .unwrap();
        let keep = |n: Node| n.parent().is_some_and(|p| p.has_tag_name("c"));
        let (out, masker) = substitute(text, &doc, &values, &keep);
        let doc = Document::parse(&out).unwrap();
        let a = doc.root_element();
        assert_eq!(a.attribute("x"), Some("say \"hi\" & <bye>"));
        let b = a.children().find(|n| n.has_tag_name("b")).unwrap();
        assert_eq!(b.text(), Some("two\nlines"));
        assert_eq!(out.lines().count(), text.lines().count());
        assert!(out.contains("<c>{{keep}}</c>") && out.contains("{{none}}"));
        assert_eq!(
            masker.mask("got \"say \\\"hi\\\" & <bye>\" and two\\nlines"),
            "got \"{{q}}\" and ${t}"
        );
        let left: Vec<String> = left_in(&doc, a, &keep)
            .into_iter()
            .map(|(line, p)| format!("{line}:{}", p.text))
            .collect();
        assert_eq!(left, ["4:{{none}}"]);
    }
}
