//! The condition of APIM's client-certificate `<choose>`: a C# expression, parsed as far as the
//! check needs (`||`, `&&`, `!`, parentheses and comparisons on `context.Request.Certificate`)
//! and read as what it refuses. Policy expressions are never evaluated: anything else is refused.

use std::collections::BTreeSet;

/// What a certificate `<choose>` refuses.
#[derive(Debug, Default, PartialEq)]
pub struct CertRule {
    /// Each set: the refusal "thumbprint is none of these". More than one set refuses all.
    pub groups: Vec<BTreeSet<String>>,
    pub validity: bool,
    /// `Verify()` / validate-trust: APIM also checks the chain.
    pub chain: bool,
    /// `Verify()` / validate-revocation: APIM also checks revocation.
    pub revocation: bool,
    pub subject: Option<String>,
    pub issuer: Option<String>,
}

/// A boolean C# expression, as far as the certificate check needs it.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Or(Vec<Expr>),
    And(Vec<Expr>),
    Not(Box<Expr>),
    Atom(String),
}

/// One comparison of the certificate check.
#[derive(Debug, PartialEq)]
enum Atom {
    NoCertificate,
    ThumbprintNot(String),
    ThumbprintIs(String),
    /// `Verify()` / `VerifyNoRevocation()`, true when valid; whether it checks revocation.
    Verify {
        revocation: bool,
    },
    /// `NotAfter < DateTime.Now`, `NotBefore > DateTime.Now`: true when invalid.
    OutOfDates,
    IssuerNot(String),
    SubjectNot(String),
}

impl CertRule {
    /// Adds the refusal condition `x` (a `<when>` that returns a response).
    pub fn add_refusal(&mut self, x: &Expr) -> Result<(), String> {
        match x {
            Expr::Or(items) => items.iter().try_for_each(|i| self.add_refusal(i)),
            // A && B refuses only when both hold: thumbprint "none of these" is the one shape
            // that means something here.
            Expr::And(items) => {
                let group = items.iter().map(and_operand).collect::<Result<_, _>>()?;
                self.groups.push(group);
                Ok(())
            }
            Expr::Not(inner) => self.add_acceptance_negated(inner),
            Expr::Atom(a) => match classify(a)? {
                Atom::NoCertificate => Ok(()),
                Atom::ThumbprintNot(t) => {
                    self.groups.push(BTreeSet::from([t]));
                    Ok(())
                }
                Atom::OutOfDates => {
                    self.validity = true;
                    Ok(())
                }
                Atom::IssuerNot(i) => set_once(&mut self.issuer, i, "Issuer"),
                Atom::SubjectNot(s) => set_once(&mut self.subject, s, "SubjectName"),
                Atom::ThumbprintIs(_) | Atom::Verify { .. } => Err(format!(
                    "{a:?} refuses the certificates it should accept (missing `!`?)"
                )),
            },
        }
    }

    /// `!inner` is a refusal: `inner` is what an accepted certificate satisfies.
    fn add_acceptance_negated(&mut self, inner: &Expr) -> Result<(), String> {
        match inner {
            Expr::Atom(a) => match classify(a)? {
                Atom::Verify { revocation } => {
                    self.validity = true;
                    self.chain = true;
                    self.revocation |= revocation;
                    Ok(())
                }
                Atom::ThumbprintIs(t) => {
                    self.groups.push(BTreeSet::from([t]));
                    Ok(())
                }
                _ => Err(format!("unsupported negation !{a:?}")),
            },
            Expr::Or(items) => {
                let group = items
                    .iter()
                    .map(negated_or_operand)
                    .collect::<Result<_, _>>()?;
                self.groups.push(group);
                Ok(())
            }
            Expr::Not(x) => self.add_refusal(x),
            Expr::And(items) => items
                .iter()
                .try_for_each(|i| self.add_acceptance_negated(i)),
        }
    }
}

/// The thumbprint of an operand of a refusing `A && B`: `Thumbprint != "x"` or
/// `!(Thumbprint == "x")`.
fn and_operand(operand: &Expr) -> Result<String, String> {
    match operand {
        Expr::Atom(a) => match classify(a)? {
            Atom::ThumbprintNot(t) => Ok(t),
            _ => Err(format!("unsupported && operand {a:?}")),
        },
        Expr::Not(inner) => match inner.as_ref() {
            Expr::Atom(a) => match classify(a)? {
                Atom::ThumbprintIs(t) => Ok(t),
                _ => Err(format!("unsupported && operand !{a:?}")),
            },
            _ => Err("unsupported && operand".into()),
        },
        _ => Err("unsupported nesting inside &&".into()),
    }
}

/// The thumbprint of an operand of a refusing `!(A || B)`: `Thumbprint == "x"`.
fn negated_or_operand(operand: &Expr) -> Result<String, String> {
    match operand {
        Expr::Atom(a) => match classify(a)? {
            Atom::ThumbprintIs(t) => Ok(t),
            _ => Err(format!("unsupported operand {a:?} in !( || )")),
        },
        _ => Err("unsupported nesting inside !( || )".into()),
    }
}

fn set_once(slot: &mut Option<String>, value: String, what: &str) -> Result<(), String> {
    match slot {
        Some(v) if *v != value => Err(format!("two different {what} values")),
        _ => {
            *slot = Some(value);
            Ok(())
        }
    }
}

/// Parses `@(...)` into `||` / `&&` / `!` / comparisons; string literals and calls stay inside
/// the comparisons.
pub fn parse_condition(condition: &str) -> Result<Expr, String> {
    let c = condition.trim();
    let inner = c
        .strip_prefix("@(")
        .and_then(|r| r.strip_suffix(')'))
        .ok_or("not a one-line policy expression @(...)")?;
    let chars: Vec<char> = inner.chars().collect();
    let mut p = Parser { s: &chars, i: 0 };
    let x = p.or()?;
    p.ws();
    if p.i != chars.len() {
        return Err("unbalanced parentheses".into());
    }
    Ok(x)
}

struct Parser<'a> {
    s: &'a [char],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self, k: usize) -> Option<char> {
        self.s.get(self.i + k).copied()
    }
    fn ws(&mut self) {
        while self.peek(0).is_some_and(char::is_whitespace) {
            self.i += 1;
        }
    }
    fn op(&mut self, op: char) -> bool {
        self.ws();
        if self.peek(0) == Some(op) && self.peek(1) == Some(op) {
            self.i += 2;
            true
        } else {
            false
        }
    }
    fn or(&mut self) -> Result<Expr, String> {
        self.chain('|', Self::and, Expr::Or)
    }
    fn and(&mut self) -> Result<Expr, String> {
        self.chain('&', Self::unary, Expr::And)
    }
    /// `next`, or several joined by the doubled `op` (`||`, `&&`).
    fn chain(
        &mut self,
        op: char,
        next: fn(&mut Self) -> Result<Expr, String>,
        join: fn(Vec<Expr>) -> Expr,
    ) -> Result<Expr, String> {
        let mut items = vec![next(self)?];
        while self.op(op) {
            items.push(next(self)?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            join(items)
        })
    }
    fn unary(&mut self) -> Result<Expr, String> {
        self.ws();
        match (self.peek(0), self.peek(1)) {
            (Some('!'), next) if next != Some('=') => {
                self.i += 1;
                Ok(Expr::Not(Box::new(self.unary()?)))
            }
            (Some('('), _) => {
                self.i += 1;
                let x = self.or()?;
                self.ws();
                if self.peek(0) != Some(')') {
                    return Err("unbalanced parentheses".into());
                }
                self.i += 1;
                Ok(x)
            }
            _ => self.atom(),
        }
    }
    /// Up to the next `||`, `&&` or unmatched `)`, outside string literals and parentheses;
    /// whitespace outside literals removed.
    fn atom(&mut self) -> Result<Expr, String> {
        let mut out = String::new();
        let mut depth = 0usize;
        while let Some(c) = self.peek(0) {
            match c {
                '"' => {
                    out.push(c);
                    self.i += 1;
                    loop {
                        let Some(d) = self.peek(0) else {
                            return Err("unterminated string literal".into());
                        };
                        out.push(d);
                        self.i += 1;
                        if d == '\\' {
                            if let Some(e) = self.peek(0) {
                                out.push(e);
                                self.i += 1;
                            }
                        } else if d == '"' {
                            break;
                        }
                    }
                    continue;
                }
                '(' => depth += 1,
                ')' if depth == 0 => break,
                ')' => depth -= 1,
                '|' | '&' if depth == 0 && self.peek(1) == Some(c) => break,
                _ => {}
            }
            if !c.is_whitespace() {
                out.push(c);
            }
            self.i += 1;
        }
        if out.is_empty() {
            return Err("an empty operand".into());
        }
        Ok(Expr::Atom(out))
    }
}

/// Recognises one comparison (whitespace already removed).
fn classify(atom: &str) -> Result<Atom, String> {
    const CERT: &str = "context.Request.Certificate";
    let a = atom.replace("?.", ".");
    let unsupported = || Err(format!("unsupported comparison {atom:?}"));
    if a == format!("{CERT}==null") || a == format!("null=={CERT}") {
        return Ok(Atom::NoCertificate);
    }
    if a == format!("{CERT}.Verify()") {
        return Ok(Atom::Verify { revocation: true });
    }
    if a == format!("{CERT}.VerifyNoRevocation()") {
        return Ok(Atom::Verify { revocation: false });
    }
    for now in ["DateTime.Now", "DateTime.UtcNow"] {
        if [
            format!("{CERT}.NotAfter<{now}"),
            format!("{now}>{CERT}.NotAfter"),
            format!("{CERT}.NotBefore>{now}"),
            format!("{now}<{CERT}.NotBefore"),
        ]
        .contains(&a)
        {
            return Ok(Atom::OutOfDates);
        }
    }
    let (lhs, rhs, equal) = if let Some((l, r)) = a.split_once("!=") {
        (l, r, false)
    } else if let Some((l, r)) = a.split_once("==") {
        (l, r, true)
    } else {
        return unsupported();
    };
    // The string literal may be on either side.
    let (property, value) = match (string_literal(lhs), string_literal(rhs)) {
        (None, Some(v)) => (lhs, v),
        (Some(v), None) => (rhs, v),
        _ => return unsupported(),
    };
    let Some(property) = property.strip_prefix(CERT) else {
        return unsupported();
    };
    let cased = [
        ("ToUpper()", true),
        ("ToUpperInvariant()", true),
        ("ToLower()", false),
        ("ToLowerInvariant()", false),
    ]
    .iter()
    .find_map(|(f, upper)| Some((property.strip_suffix(&format!(".{f}"))?, *upper)));
    // gateguard has no case rule for the issuer and subject names.
    if cased.is_some_and(|(p, _)| p != ".Thumbprint") {
        return unsupported();
    }
    let (property, upper) = cased.unwrap_or((property, true));
    // APIM compares strings exactly, and Thumbprint is upper-case hex: a literal in the other
    // case never matches (APIM refuses every certificate), while gateguard ignores case.
    if property == ".Thumbprint" {
        let wrong_case = if upper {
            value.chars().any(|c| c.is_ascii_lowercase())
        } else {
            value.chars().any(|c| c.is_ascii_uppercase())
        };
        if wrong_case {
            return Err(format!(
                "{atom:?} compares with the wrong letter case, so in APIM it never matches"
            ));
        }
    }
    match (property, equal) {
        (".Thumbprint", false) => Ok(Atom::ThumbprintNot(value)),
        (".Thumbprint", true) => Ok(Atom::ThumbprintIs(value)),
        (".Issuer" | ".IssuerName.Name", false) => Ok(Atom::IssuerNot(value)),
        (".Subject" | ".SubjectName.Name", false) => Ok(Atom::SubjectNot(value)),
        _ => unsupported(),
    }
}

/// `"..."` with C# escapes `\"` and `\\`.
fn string_literal(s: &str) -> Option<String> {
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            _ => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn rule(condition: &str) -> Result<CertRule, String> {
        let mut r = CertRule::default();
        r.add_refusal(&parse_condition(condition)?)?;
        Ok(r)
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn thumbprint_condition_documented_form() {
        let r = rule(r#"@(context.Request.Certificate == null || context.Request.Certificate.Thumbprint != "DESIRED-THUMBPRINT")"#).unwrap();
        assert_eq!(r.groups, vec![set(&["DESIRED-THUMBPRINT"])]);
        assert!(!r.validity && !r.chain);
    }

    #[test]
    fn thumbprint_condition_several_and_validity() {
        let r = rule(
            r#"@(context.Request.Certificate == null || !context.Request.Certificate.Verify() || (context.Request.Certificate.Thumbprint != "AA11" && context.Request.Certificate.Thumbprint != "BB22") || context.Request.Certificate.NotAfter < DateTime.Now)"#,
        )
        .unwrap();
        assert_eq!(r.groups, vec![set(&["AA11", "BB22"])]);
        assert!(r.validity && r.chain);
        // && without parentheses binds tighter than ||, as in C#.
        let r = rule(r#"@(context.Request.Certificate == null || context.Request.Certificate.Thumbprint != "A" && context.Request.Certificate.Thumbprint != "B")"#).unwrap();
        assert_eq!(r.groups, vec![set(&["A", "B"])]);
        // Negated equality, upper-casing, literal on the left, null-conditional.
        let r = rule(
            r#"@(context.Request.Certificate?.Thumbprint == null || !(context.Request.Certificate.Thumbprint.ToUpper() == "A" || "B" == context.Request.Certificate.Thumbprint))"#,
        );
        assert!(r.is_err(), "Thumbprint == null is not understood: {r:?}");
        let r = rule(r#"@(context.Request.Certificate == null || !(context.Request.Certificate.Thumbprint.ToUpper() == "A" || "B" == context.Request.Certificate.Thumbprint))"#).unwrap();
        assert_eq!(r.groups, vec![set(&["A", "B"])]);
        let r = rule(r#"@(context.Request.Certificate == null || context.Request.Certificate.NotBefore > DateTime.UtcNow || context.Request.Certificate.Thumbprint != "C" || context.Request.Certificate.Issuer != "CN=Contoso CA" || context.Request.Certificate.SubjectName.Name != "CN=client")"#).unwrap();
        assert_eq!(r.groups, vec![set(&["C"])]);
        assert!(r.validity);
        assert_eq!(r.issuer.as_deref(), Some("CN=Contoso CA"));
        assert_eq!(r.subject.as_deref(), Some("CN=client"));
    }

    #[test]
    fn thumbprint_condition_refusals() {
        for bad in [
            r#"context.Request.Certificate == null"#, // not @(...)
            r#"@(context.Request.Certificate.Thumbprint == "A")"#, // refuses the good one
            r#"@(context.Request.Certificate == null || context.Request.Headers.GetValueOrDefault("x") != "y")"#,
            r#"@(!context.Deployment.Certificates.Any(c => c.Value.Thumbprint == context.Request.Certificate.Thumbprint))"#,
            r#"@((context.Request.Certificate == null)"#,
            r#"@(context.Request.Certificate.Thumbprint != "A" && context.Request.Certificate.NotAfter < DateTime.Now)"#,
            // Letter case APIM never matches (Thumbprint is upper case), case functions
            // gateguard has no equivalent for.
            r#"@(context.Request.Certificate == null || context.Request.Certificate.Thumbprint != "3a7f")"#,
            r#"@(context.Request.Certificate == null || context.Request.Certificate.Thumbprint.ToLower() != "3A7F")"#,
            r#"@(context.Request.Certificate == null || context.Request.Certificate.Issuer.ToUpper() != "CN=CA")"#,
        ] {
            assert!(rule(bad).is_err(), "{bad}");
        }
        // Two separate != joined by || refuse everything: parsed, but two groups.
        let r = rule(r#"@(context.Request.Certificate.Thumbprint != "A" || context.Request.Certificate.Thumbprint != "B")"#).unwrap();
        assert_eq!(r.groups.len(), 2);
    }

    #[test]
    fn string_literals_keep_operators() {
        let x =
            parse_condition(r#"@(context.Request.Certificate.Thumbprint != "a||b)(")"#).unwrap();
        assert_eq!(
            x,
            Expr::Atom(r#"context.Request.Certificate.Thumbprint!="a||b)(""#.into())
        );
    }
}
