//! Distinguished-name matching for `subject` / `issuer`, like APIM's
//! validate-client-certificate: the whole name must match, attribute by attribute, values
//! compared case-insensitively.
//!
//! A policy writes `CN=client, O=Contoso, C=US` (RFC 4514 / Windows order) or
//! `C=US, O=Contoso, CN=client` (certificate order, as `gateguard thumbprint` prints it); both
//! match. Spaces around `,`, `+` and `=` are ignored; `\,` and `"..."` quote special characters.
//! `CN=client` alone does not match a subject that also has `O=...`: partial matches would let
//! any CA-issued certificate with the same CN through.
//!
//! Hand-written: no maintained crate compares an RFC 4514 string with a name in either order.

use std::fmt;

use x509_parser::asn1_rs::Tag;
use x509_parser::x509::{AttributeTypeAndValue, X509Name};

/// Attribute types by OID, with the names a policy may use for them (the first is canonical).
const ATTRIBUTES: &[(&str, &[&str])] = &[
    ("2.5.4.3", &["CN"]),
    ("2.5.4.6", &["C"]),
    ("2.5.4.7", &["L"]),
    ("2.5.4.8", &["ST", "S"]),
    ("2.5.4.10", &["O"]),
    ("2.5.4.11", &["OU"]),
    ("2.5.4.9", &["STREET"]),
    ("2.5.4.5", &["SERIALNUMBER"]),
    ("2.5.4.12", &["T", "TITLE"]),
    ("2.5.4.4", &["SN", "SURNAME"]),
    ("2.5.4.42", &["G", "GN", "GIVENNAME"]),
    ("0.9.2342.19200300.100.1.25", &["DC"]),
    ("0.9.2342.19200300.100.1.1", &["UID"]),
    ("1.2.840.113549.1.9.1", &["E", "EMAIL", "EMAILADDRESS"]),
];

/// Why a `subject` / `issuer` in a policy is not a distinguished name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnError {
    Empty,
    /// A component without `=`, e.g. `client` instead of `CN=client`.
    MissingEquals,
    UnknownAttribute(String),
    EmptyValue,
    UnterminatedQuote,
    BadEscape,
}

impl fmt::Display for DnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnError::Empty => f.write_str("empty distinguished name"),
            DnError::MissingEquals => {
                f.write_str("expected a distinguished name such as \"CN=client, O=Contoso\"")
            }
            DnError::UnknownAttribute(a) => write!(
                f,
                "unknown attribute type {a:?} (use CN, O, OU, L, ST, C, DC, E, ... or a dotted OID)"
            ),
            DnError::EmptyValue => f.write_str("attribute with an empty value"),
            DnError::UnterminatedQuote => f.write_str("unterminated quote"),
            DnError::BadEscape => f.write_str("bad backslash escape"),
        }
    }
}

impl std::error::Error for DnError {}

/// A compiled name: (canonical attribute type, lower-cased value), in the order written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistinguishedName {
    attributes: Vec<(String, String)>,
}

impl DistinguishedName {
    pub fn parse(text: &str) -> Result<DistinguishedName, DnError> {
        if text.trim().is_empty() {
            return Err(DnError::Empty);
        }
        let attributes = split_components(text)?
            .into_iter()
            .map(|(key, value)| {
                let value = value.trim();
                if value.is_empty() {
                    return Err(DnError::EmptyValue);
                }
                Ok((canonical_type(key.trim())?, value.to_lowercase()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DistinguishedName { attributes })
    }

    /// True when the certificate name has exactly these attributes, in this order or reversed.
    pub fn matches(&self, name: &X509Name<'_>) -> bool {
        let Some(presented) = name
            .iter_attributes()
            .map(|attr| Some((type_of(attr), value_of(attr)?.to_lowercase())))
            .collect::<Option<Vec<_>>>()
        else {
            // A value we cannot read as text cannot be compared: no match.
            return false;
        };
        presented == self.attributes || presented.iter().eq(self.attributes.iter().rev())
    }
}

fn canonical_type(key: &str) -> Result<String, DnError> {
    let upper = key.to_ascii_uppercase();
    let bare = upper.strip_prefix("OID.").unwrap_or(&upper);
    let known = ATTRIBUTES
        .iter()
        .find(|(oid, names)| *oid == bare || names.contains(&bare));
    match known {
        Some((_, names)) => Ok(names.first().copied().unwrap_or_default().to_string()),
        None if is_dotted_oid(bare) => Ok(bare.to_string()),
        None => Err(DnError::UnknownAttribute(key.to_string())),
    }
}

fn is_dotted_oid(text: &str) -> bool {
    !text.is_empty()
        && text
            .split('.')
            .all(|arc| !arc.is_empty() && arc.bytes().all(|b| b.is_ascii_digit()))
}

fn type_of(attr: &AttributeTypeAndValue<'_>) -> String {
    let oid = attr.attr_type().to_id_string();
    ATTRIBUTES
        .iter()
        .find(|(known, _)| *known == oid)
        .and_then(|(_, names)| names.first())
        .map_or(oid, |name| name.to_string())
}

fn value_of(attr: &AttributeTypeAndValue<'_>) -> Option<String> {
    if let Ok(text) = attr.as_str() {
        return Some(text.to_string());
    }
    let bytes = attr.as_slice();
    match attr.attr_value().tag() {
        // Older Windows CAs write names as UTF-16BE BMPString.
        Tag::BmpString => {
            let units = bytes.chunks_exact(2);
            if !units.remainder().is_empty() {
                return None;
            }
            // `chunks_exact(2)` yields pairs only: the conversion never drops one.
            let units = units.filter_map(|pair| <[u8; 2]>::try_from(pair).ok());
            char::decode_utf16(units.map(u16::from_be_bytes))
                .collect::<Result<String, _>>()
                .ok()
        }
        Tag::T61String | Tag::VisibleString | Tag::GeneralString | Tag::GraphicString => {
            std::str::from_utf8(bytes).ok().map(str::to_string)
        }
        _ => None,
    }
}

/// Splits `A=v, B="x, y"+C=w\,z` into (type, unescaped value) pairs; `,` and `+` separate.
fn split_components(text: &str) -> Result<Vec<(String, String)>, DnError> {
    let mut components = Vec::new();
    let mut key = String::new();
    let mut value: Vec<u8> = Vec::new();
    let mut in_value = false;
    let mut in_quotes = false;
    let mut bytes = text.bytes().peekable();
    while let Some(b) = bytes.next() {
        if !in_value {
            match b {
                b'=' => in_value = true,
                b',' | b'+' => return Err(DnError::MissingEquals),
                _ => key.push(char::from(b)),
            }
            continue;
        }
        match b {
            b'\\' => {
                let next = bytes.next().ok_or(DnError::BadEscape)?;
                if next.is_ascii_hexdigit() {
                    // RFC 4514 `\XX`: one byte of the UTF-8 value.
                    let low = bytes.next().ok_or(DnError::BadEscape)?;
                    let pair = [next, low];
                    let byte = std::str::from_utf8(&pair)
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .ok_or(DnError::BadEscape)?;
                    value.push(byte);
                } else {
                    value.push(next);
                }
            }
            b'"' => in_quotes = !in_quotes,
            b',' | b'+' if !in_quotes => {
                components.push(finish(&mut key, &mut value)?);
                in_value = false;
            }
            _ => value.push(b),
        }
    }
    if in_quotes {
        return Err(DnError::UnterminatedQuote);
    }
    if !in_value {
        return Err(DnError::MissingEquals);
    }
    components.push(finish(&mut key, &mut value)?);
    Ok(components)
}

fn finish(key: &mut String, value: &mut Vec<u8>) -> Result<(String, String), DnError> {
    let value = String::from_utf8(std::mem::take(value)).map_err(|_| DnError::BadEscape)?;
    Ok((std::mem::take(key), value))
}
