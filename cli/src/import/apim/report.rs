//! What happened to each element of the APIM document, in document order, and how it is told
//! on standard error: one line per finding, then a summary.

use std::path::Path;

use roxmltree::{Document, Node};

use super::named_values::Masker;
use crate::import::Failure;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Converted,
    Note,
    /// Could not be converted exactly: nothing is written.
    NotConverted,
    /// Not converted, and it does not weaken the policy (or `--skip` accepted it).
    LeftOut,
    Env,
}

#[derive(Debug, Clone)]
pub struct Item {
    pub line: u32,
    pub kind: Kind,
    pub element: String,
    pub text: String,
}

/// An element's name and line, for the report.
pub struct El {
    pub name: String,
    pub line: u32,
}

impl El {
    pub fn of(doc: &Document, node: Node) -> El {
        El {
            name: node.tag_name().name().to_string(),
            line: doc.text_pos_at(node.range().start).row,
        }
    }
}

#[derive(Default)]
pub struct Report {
    pub items: Vec<Item>,
}

impl Report {
    fn push(&mut self, line: u32, kind: Kind, element: &str, text: impl Into<String>) {
        self.items.push(Item {
            line,
            kind,
            element: element.to_string(),
            text: text.into(),
        });
    }
    pub fn converted(&mut self, n: &El, text: impl Into<String>) {
        self.push(n.line, Kind::Converted, &n.name, text);
    }
    pub fn note(&mut self, n: &El, text: impl Into<String>) {
        self.push(n.line, Kind::Note, &n.name, text);
    }
    pub fn skip(&mut self, n: &El, text: impl Into<String>) {
        self.push(n.line, Kind::NotConverted, &n.name, text);
    }
    pub fn left_out(&mut self, n: &El, text: impl Into<String>) {
        self.push(n.line, Kind::LeftOut, &n.name, text);
    }
    pub fn env(&mut self, n: &El, text: impl Into<String>) {
        self.push(n.line, Kind::Env, &n.name, text);
    }
    pub fn skipped(&self) -> bool {
        self.items.iter().any(|i| i.kind == Kind::NotConverted)
    }

    /// A policy one of whose parts (a `<claim>`, a `<key>`) reported since `before` could not be
    /// converted is not converted either, whatever its own line says.
    pub fn refuse_if_a_part_was(&mut self, e: &El, before: usize) {
        let items = self.items.get_mut(before..).unwrap_or_default();
        let parts: Vec<String> = items
            .iter()
            .filter(|i| i.kind == Kind::NotConverted && (i.element != e.name || i.line != e.line))
            .map(|i| format!("<{}> line {}", i.element, i.line))
            .collect();
        if parts.is_empty() {
            return;
        }
        for item in items {
            if item.kind == Kind::Converted && item.element == e.name && item.line == e.line {
                item.kind = Kind::NotConverted;
                item.text = format!(
                    "not converted, as a part of it was not: {}",
                    parts.join(", ")
                );
            }
        }
    }

    /// One line per finding (`FILE:LINE: kind: <element>: text`), then a summary line; values
    /// filled in from `--named-values` masked. `written` names where the policy went, `None`
    /// when nothing was written.
    pub fn print(&self, masker: &Masker, input: &Path, written: Option<&str>) {
        let file = input.display();
        let mut items: Vec<&Item> = self.items.iter().collect();
        items.sort_by_key(|i| i.line);
        for item in items {
            let kind = match item.kind {
                Kind::Converted => "converted",
                Kind::Note => "note",
                Kind::NotConverted => "NOT CONVERTED",
                Kind::LeftOut => "left out",
                Kind::Env => "set in Envoy's environment",
            };
            let text = masker.mask(&item.text);
            eprintln!("{file}:{}: {kind}: <{}>: {text}", item.line, item.element);
        }
        let converted = self.lines_of(Kind::Converted).len();
        let mut summary = format!(
            "gateguard import-apim: {file}: {converted} converted, {}, {}",
            self.count(Kind::NotConverted, "not converted"),
            self.count(Kind::LeftOut, "left out")
        );
        match written {
            Some(target) => summary.push_str(&format!("; policy written to {target}")),
            None => summary.push_str(&format!(
                "; nothing written, exit status {}",
                Failure::NOT_CONVERTED_STATUS
            )),
        }
        eprintln!("{summary}");
    }

    /// `<element> line N` of each finding of `kind`, by line.
    fn lines_of(&self, kind: Kind) -> Vec<String> {
        let mut of_kind: Vec<&Item> = self.items.iter().filter(|i| i.kind == kind).collect();
        of_kind.sort_by_key(|i| i.line);
        of_kind
            .iter()
            .map(|i| format!("<{}> line {}", i.element, i.line))
            .collect()
    }

    fn count(&self, kind: Kind, what: &str) -> String {
        let items = self.lines_of(kind);
        if items.is_empty() {
            format!("0 {what}")
        } else {
            format!("{} {what} ({})", items.len(), items.join(", "))
        }
    }
}

/// The plural ending of a count.
pub fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
