//! A header pattern that is nothing but literal alternatives (`secret`, `a|b`, `(?i)v1\.0`), as
//! `gateguard import-apim` writes an APIM `<check-header>`'s values: matched without the regex
//! engine, in time that does not depend on how much of a value agrees with a listed one.
//!
//! Such values are often shared secrets (a check-header filled from a named value). A regex
//! matches a literal byte by byte and stops at the first difference, so the time an answer takes
//! tells a client how long a prefix it guessed right. Here the value is hashed (SHA-256, after
//! ASCII lower-casing with `(?i)`) and its digest compared with every listed value's digest in
//! constant time, all of them each time: the time depends on the value's length alone.
//!
//! The meaning stays the regex's, which is what docs/policy.md documents: the whole value equals
//! one alternative; `(?i)` folds ASCII letters only, as regex-lite does. A pattern with anything
//! else in it (a class, a repetition, an unescaped `-`...) is left to the regex.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The characters regex-lite gives a meaning to, which a literal carries escaped.
const META: &str = "\\.+*?()|[]{}^$#&-~";

#[derive(Debug, Clone)]
pub struct Literals {
    fold_case: bool,
    digests: Vec<[u8; 32]>,
}

impl Literals {
    /// The alternatives of `pattern` when it is literal alternatives only, else None.
    pub fn parse(pattern: &str) -> Option<Self> {
        let (fold_case, body) = match pattern.strip_prefix("(?i)") {
            Some(rest) => (true, rest),
            None => (false, pattern),
        };
        let mut alternatives = vec![String::new()];
        let mut chars = body.chars();
        while let Some(c) = chars.next() {
            let literal = match c {
                '|' => {
                    alternatives.push(String::new());
                    continue;
                }
                '\\' => chars.next().filter(|e| META.contains(*e))?,
                c if META.contains(c) => return None,
                c => c,
            };
            alternatives.last_mut()?.push(literal);
        }
        let digests = alternatives.iter().map(|a| digest(a, fold_case)).collect();
        Some(Self { fold_case, digests })
    }

    /// Whether `value` is one of the alternatives, whole.
    pub fn matches(&self, value: &str) -> bool {
        let seen = digest(value, self.fold_case);
        let mut found = subtle::Choice::from(0);
        for d in &self.digests {
            found |= d.ct_eq(&seen);
        }
        found.into()
    }
}

fn digest(value: &str, fold_case: bool) -> [u8; 32] {
    if fold_case {
        Sha256::digest(value.to_ascii_lowercase().as_bytes()).into()
    } else {
        Sha256::digest(value.as_bytes()).into()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use regex_lite::Regex;

    fn regex(pattern: &str) -> Regex {
        Regex::new(&format!("^(?:{pattern})$")).unwrap()
    }

    #[test]
    fn what_import_apim_writes_is_literal() {
        for pattern in [
            "s3cr3t",
            "a|b",
            "(?i)v1\\.0|v2\\.0",
            "",
            "a|",
            "\\(x\\)\\-\\~\\&\\#",
            "with space",
            "é",
        ] {
            assert!(Literals::parse(pattern).is_some(), "{pattern}");
        }
    }

    #[test]
    fn anything_with_a_meaning_is_left_to_the_regex() {
        for pattern in [
            "a+", "a.b", "[ab]", "a{2}", "^a$", "(a)", "(?i:a)", "(?x)a", "a-b", "\\d", "\\x41",
            "\\", "a\\", "(?s)a",
        ] {
            assert!(Literals::parse(pattern).is_none(), "{pattern}");
        }
    }

    #[test]
    fn matches_whole_values_only() {
        let l = Literals::parse("s3cr3t|other").unwrap();
        assert!(l.matches("s3cr3t"));
        assert!(l.matches("other"));
        for v in ["s3cr3", "s3cr3tt", "S3CR3T", "", "s3cr3t|other", " s3cr3t"] {
            assert!(!l.matches(v), "{v}");
        }
        let l = Literals::parse("(?i)Token").unwrap();
        assert!(l.matches("tOKEN"));
        assert!(!l.matches("tokens"));
    }

    /// Values drawn from the letters the literals use, in both cases and with non-ASCII ones
    /// whose case regex-lite does not fold (`É`/`é`, the Kelvin sign), so that equality is hit.
    fn text() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                Just('a'),
                Just('A'),
                Just('k'),
                Just('\u{212A}'),
                Just('é'),
                Just('É'),
                Just('.'),
                Just('-'),
                Just('|'),
                Just('('),
                Just(' '),
            ],
            0..5,
        )
        .prop_map(|v| v.into_iter().collect())
    }

    proptest! {
        #![proptest_config(crate::proptest_config::cases(512))]

        /// Whatever the listed values and the value sent, the literal matcher says what the
        /// regex import-apim writes for them says.
        #[test]
        fn agrees_with_the_regex(
            values in proptest::collection::vec(text(), 1..4),
            fold in any::<bool>(),
            sent in text(),
        ) {
            let alternatives: Vec<String> = values.iter().map(|v| regex_lite::escape(v)).collect();
            let pattern = format!("{}{}", if fold { "(?i)" } else { "" }, alternatives.join("|"));
            let literals = Literals::parse(&pattern).expect("escaped values are literal");
            prop_assert_eq!(literals.matches(&sent), regex(&pattern).is_match(&sent), "{}", pattern);
            for v in &values {
                prop_assert!(literals.matches(v));
            }
        }
    }
}
