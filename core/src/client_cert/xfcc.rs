//! Envoy's `x-forwarded-client-cert` header:
//! `By=...;Hash=<sha256 hex>;Cert="<url-encoded PEM>";Subject="...",<next element>`.
//! Each proxy appends an element, so only the last one (added by the proxy nearest to us) is
//! trusted; earlier ones could have been written by the client.
//!
//! Hand-written: the header's grammar is Envoy's own, and no maintained crate parses it.

use super::decode::{check_size, xfcc_cert_to_der, Malformed};
use super::thumbprint::Thumbprint;

/// What a source yielded. Only XFCC can yield a bare hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Extracted {
    Der(Vec<u8>),
    /// Only `Hash=`: a SHA-256 thumbprint, with no dates or names to check.
    HashOnly([u8; 32]),
}

pub(crate) fn last_element_certificate(header: &str) -> Result<Extracted, Malformed> {
    check_size(header.as_bytes())?;
    let elements = split_unquoted(header, b',')?;
    let last = elements
        .last()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
        .ok_or(Malformed::XfccSyntax)?;

    let mut cert = None;
    let mut hash = None;
    for pair in split_unquoted(last, b';')? {
        let pair = pair.trim();
        if pair.is_empty() {
            continue;
        }
        let (key, value) = pair.split_once('=').ok_or(Malformed::XfccSyntax)?;
        let key = key.trim();
        let slot = if key.eq_ignore_ascii_case("Cert") {
            &mut cert
        } else if key.eq_ignore_ascii_case("Hash") {
            &mut hash
        } else {
            continue;
        };
        // Two values for the same key are ambiguous: refuse rather than pick one.
        if slot.replace(unquote(value.trim())?).is_some() {
            return Err(Malformed::XfccSyntax);
        }
    }

    let hash = match hash {
        Some(h) => Some(parse_hash(&h)?),
        None => None,
    };
    match (cert, hash) {
        (Some(cert), hash) => {
            let der = xfcc_cert_to_der(&cert)?;
            if let Some(hash) = hash {
                if Thumbprint::sha256_of(&der) != Thumbprint::Sha256(hash) {
                    return Err(Malformed::XfccHashMismatch);
                }
            }
            Ok(Extracted::Der(der))
        }
        (None, Some(hash)) => Ok(Extracted::HashOnly(hash)),
        (None, None) => Err(Malformed::XfccNoCertificate),
    }
}

fn parse_hash(text: &str) -> Result<[u8; 32], Malformed> {
    crate::hex::decode(text)
        .and_then(|bytes| <[u8; 32]>::try_from(bytes.as_slice()).ok())
        .ok_or(Malformed::XfccBadHash)
}

/// Splits on an ASCII separator outside double quotes; `\` escapes the next byte inside quotes.
fn split_unquoted(text: &str, separator: u8) -> Result<Vec<&str>, Malformed> {
    let bytes = text.as_bytes();
    let mut parts = Vec::new();
    let mut start = 0;
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, &b) in bytes.iter().enumerate() {
        if escaped {
            escaped = false;
        } else if in_quotes && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            in_quotes = !in_quotes;
        } else if b == separator && !in_quotes {
            // Separators are ASCII, so these indices are char boundaries.
            parts.push(text.get(start..i).ok_or(Malformed::XfccSyntax)?);
            start = i.saturating_add(1);
        }
    }
    if in_quotes || escaped {
        return Err(Malformed::XfccSyntax);
    }
    parts.push(text.get(start..).ok_or(Malformed::XfccSyntax)?);
    Ok(parts)
}

/// `"a\"b"` → `a"b`; an unquoted value is taken as it is.
fn unquote(value: &str) -> Result<String, Malformed> {
    let Some(inner) = value.strip_prefix('"') else {
        return Ok(value.to_string());
    };
    let inner = inner.strip_suffix('"').ok_or(Malformed::XfccSyntax)?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.push(chars.next().ok_or(Malformed::XfccSyntax)?);
        } else {
            out.push(c);
        }
    }
    Ok(out)
}
