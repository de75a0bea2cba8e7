//! Property tests of the certificate sources' decoders (`pub(crate)`): Envoy's peer certificate,
//! `x-forwarded-client-cert` and `X-ARR-ClientCert`. Nothing panics, every spelling of a real
//! certificate yields its DER, and only the last XFCC element ever counts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::OnceLock;

use base64::Engine;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use proptest::prelude::*;

use crate::proptest_config::cases;

use super::decode::{arr_to_der, connection_to_der, xfcc_cert_to_der, MAX_INPUT_BYTES};
use super::thumbprint::Thumbprint;
use super::xfcc::{last_element_certificate, Extracted};

struct Cert {
    der: Vec<u8>,
    pem: String,
}

fn certs() -> &'static [Cert] {
    static CERTS: OnceLock<Vec<Cert>> = OnceLock::new();
    CERTS.get_or_init(|| {
        ["client-a", "client-b"]
            .into_iter()
            .map(|cn| {
                let mut params =
                    rcgen::CertificateParams::new(vec![format!("{cn}.example")]).unwrap();
                params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, cn);
                let key = rcgen::KeyPair::generate().unwrap();
                let cert = params.self_signed(&key).unwrap();
                Cert {
                    der: cert.der().to_vec(),
                    pem: cert.pem(),
                }
            })
            .collect()
    })
}

fn url(text: &str) -> String {
    utf8_percent_encode(text, NON_ALPHANUMERIC).to_string()
}

/// Quotes an XFCC value the way Envoy does when it holds a separator.
fn quoted(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

#[derive(Debug, Clone)]
enum Part {
    Cert(usize),
    Hash(usize),
    WrongHash,
    Other(&'static str, String),
}

fn arb_part() -> impl Strategy<Value = Part> {
    prop_oneof![
        (0usize..2).prop_map(Part::Cert),
        (0usize..2).prop_map(Part::Hash),
        Just(Part::WrongHash),
        (
            proptest::sample::select(&["By", "Subject", "URI", "DNS", "Chain"][..]),
            "[a-zA-Z0-9=,;:/ \"\\\\]{0,16}",
        )
            .prop_map(|(k, v)| Part::Other(k, v)),
    ]
}

fn render(part: &Part) -> String {
    let c = certs();
    match part {
        Part::Cert(i) => format!("Cert={}", quoted(&url(&c[*i].pem))),
        Part::Hash(i) => format!("Hash={}", Thumbprint::sha256_of(&c[*i].der).to_lower_hex()),
        Part::WrongHash => format!("Hash={}", "0".repeat(64)),
        Part::Other(k, v) => format!("{k}={}", quoted(v)),
    }
}

/// What the element's `Cert=` and `Hash=` say, read independently.
fn expected(parts: &[Part]) -> Option<Extracted> {
    let c = certs();
    let certs_named: Vec<usize> = parts
        .iter()
        .filter_map(|p| match p {
            Part::Cert(i) => Some(*i),
            _ => None,
        })
        .collect();
    let hashes: Vec<Option<usize>> = parts
        .iter()
        .filter_map(|p| match p {
            Part::Hash(i) => Some(Some(*i)),
            Part::WrongHash => Some(None),
            _ => None,
        })
        .collect();
    if certs_named.len() > 1 || hashes.len() > 1 {
        return None;
    }
    match (certs_named.first(), hashes.first()) {
        (Some(&cert), None) => Some(Extracted::Der(c[cert].der.clone())),
        (Some(&cert), Some(&Some(h))) if h == cert => Some(Extracted::Der(c[cert].der.clone())),
        (Some(_), Some(_)) => None,
        (None, Some(&Some(h))) => Some(Extracted::HashOnly(
            Thumbprint::sha256_of(&c[h].der)
                .as_bytes()
                .try_into()
                .unwrap(),
        )),
        (None, Some(&None)) => Some(Extracted::HashOnly([0; 32])),
        (None, None) => None,
    }
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn xfcc_reads_the_last_element_only(
        earlier in proptest::collection::vec(proptest::collection::vec(arb_part(), 0..4), 0..3),
        last in proptest::collection::vec(arb_part(), 0..4),
        spaces in any::<bool>(),
    ) {
        let sep = if spaces { " ; " } else { ";" };
        let element = |parts: &Vec<Part>| parts.iter().map(render).collect::<Vec<_>>().join(sep);
        let alone = element(&last);
        let mut all: Vec<String> = earlier.iter().map(element).collect();
        all.push(alone.clone());
        let header = all.join(",");
        let got = last_element_certificate(&header);
        prop_assert_eq!(&got, &last_element_certificate(&alone));
        prop_assert_eq!(got.ok(), expected(&last), "{}", header);
    }

    #[test]
    fn xfcc_of_arbitrary_text(text in prop_oneof![
        "[a-zA-Z=;,\" \\\\%0-9-]{0,64}",
        any::<String>(),
    ]) {
        if let Ok(Extracted::Der(der)) = last_element_certificate(&text) {
            prop_assert!(!der.is_empty());
        }
        let _ = xfcc_cert_to_der(&text);
    }

    #[test]
    fn every_spelling_of_a_certificate_yields_its_der(
        which in 0usize..2,
        wrap in 1usize..100,
        crlf in any::<bool>(),
        strip_padding in any::<bool>(),
        junk in "[a-zA-Z ]{0,12}",
    ) {
        let c = &certs()[which];
        let b64 = base64::engine::general_purpose::STANDARD.encode(&c.der);
        let b64 = if strip_padding { b64.trim_end_matches('=').to_string() } else { b64 };
        let nl = if crlf { "\r\n" } else { "\n" };
        let wrapped = b64.as_bytes().chunks(wrap).map(|l| std::str::from_utf8(l).unwrap()).collect::<Vec<_>>().join(nl);
        prop_assert_eq!(arr_to_der(&b64).unwrap(), c.der.clone());
        prop_assert_eq!(arr_to_der(&wrapped).unwrap(), c.der.clone());
        let pem = format!("{junk}{nl}-----BEGIN CERTIFICATE-----{nl}{wrapped}{nl}-----END CERTIFICATE-----{nl}");
        prop_assert_eq!(arr_to_der(&pem).unwrap(), c.der.clone());
        prop_assert_eq!(connection_to_der(pem.as_bytes()).unwrap(), c.der.clone());
        prop_assert_eq!(connection_to_der(url(&pem).as_bytes()).unwrap(), c.der.clone());
        prop_assert_eq!(connection_to_der(&c.der).unwrap(), c.der.clone());
        prop_assert_eq!(xfcc_cert_to_der(&url(&pem)).unwrap(), c.der.clone());
    }

    #[test]
    fn sources_of_arbitrary_bytes(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            "(-----BEGIN [A-Z ]{0,12}-----)?[A-Za-z0-9+/=%\r\n -]{0,80}(-----END CERTIFICATE-----)?".prop_map(String::into_bytes),
        ],
    ) {
        let text = String::from_utf8_lossy(&bytes);
        for der in [connection_to_der(&bytes), arr_to_der(&text), xfcc_cert_to_der(&text)]
            .into_iter()
            .flatten()
        {
            prop_assert!(!der.is_empty());
        }
    }
}

#[test]
fn oversized_inputs_are_refused_before_decoding() {
    let big = "A".repeat(MAX_INPUT_BYTES + 1);
    assert!(arr_to_der(&big).is_err());
    assert!(connection_to_der(big.as_bytes()).is_err());
    assert!(last_element_certificate(&big).is_err());
}
