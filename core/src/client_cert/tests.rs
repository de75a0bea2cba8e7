#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::Engine;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use rcgen::{
    date_time_ymd, string::BmpString, CertificateParams, DistinguishedName as RcDn, DnType,
    DnValue, IsCa, Issuer, KeyPair,
};
use sha1::{Digest, Sha1};
use sha2::Sha256;

use super::*;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const PATH: &str = "apis[0].client_certificate";

struct TestCert {
    der: Vec<u8>,
    pem: String,
}

impl TestCert {
    fn sha1(&self) -> String {
        crate::hex::encode(&Sha1::digest(&self.der))
    }
    fn sha256(&self) -> String {
        crate::hex::encode(&Sha256::digest(&self.der))
    }
    fn url_pem(&self) -> String {
        utf8_percent_encode(&self.pem, NON_ALPHANUMERIC).to_string()
    }
    fn b64(&self) -> String {
        B64.encode(&self.der)
    }
    fn xfcc(&self) -> String {
        format!(
            "By=spiffe://cluster.local/gw;Hash={};Cert=\"{}\";Subject=\"CN=x\";URI=",
            self.sha256(),
            self.url_pem()
        )
    }
}

type Ymd = (i32, u8, u8);

fn params(cn: &str, not_before: Ymd, not_after: Ymd) -> CertificateParams {
    let mut params = CertificateParams::new(vec![]).unwrap();
    let mut dn = RcDn::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.not_before = date_time_ymd(not_before.0, not_before.1, not_before.2);
    params.not_after = date_time_ymd(not_after.0, not_after.1, not_after.2);
    params
}

fn self_signed(params: CertificateParams) -> TestCert {
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    TestCert {
        der: cert.der().to_vec(),
        pem: cert.pem(),
    }
}

/// A client certificate valid 2024-01-01..2026-01-01.
fn client(cn: &str) -> TestCert {
    self_signed(params(cn, (2024, 1, 1), (2026, 1, 1)))
}

/// A leaf `CN=apim-client, O=Contoso` issued by `CN=Test CA, O=Contoso`.
fn ca_signed() -> TestCert {
    let mut ca = params("Test CA", (2020, 1, 1), (2030, 1, 1));
    ca.distinguished_name
        .push(DnType::OrganizationName, "Contoso");
    ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = params("apim-client", (2024, 1, 1), (2026, 1, 1));
    leaf.distinguished_name
        .push(DnType::OrganizationName, "Contoso");
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    TestCert {
        der: cert.der().to_vec(),
        pem: cert.pem(),
    }
}

fn at(y: i32, m: u8, d: u8) -> u64 {
    u64::try_from(date_time_ymd(y, m, d).unix_timestamp()).unwrap()
}

/// Mid-2025: inside every test certificate's validity unless stated otherwise.
fn now() -> u64 {
    at(2025, 6, 1)
}

fn config(json: serde_json::Value) -> Result<ClientCertPolicy, ConfigError> {
    let cfg: ClientCertConfig = serde_json::from_value(json).unwrap();
    ClientCertPolicy::compile(&cfg, PATH)
}

fn policy(json: serde_json::Value) -> ClientCertPolicy {
    config(json).unwrap()
}

fn conn(pem: &str) -> PresentedCertificates<'_> {
    PresentedCertificates {
        connection: Some(pem.as_bytes()),
        ..Default::default()
    }
}

fn xfcc(value: &str) -> PresentedCertificates<'_> {
    PresentedCertificates {
        xfcc: Some(value),
        ..Default::default()
    }
}

fn arr(value: &str) -> PresentedCertificates<'_> {
    PresentedCertificates {
        arr: Some(value),
        ..Default::default()
    }
}

fn unparseable(source: CertSource, why: Malformed) -> Result<AcceptedCertificate, CertError> {
    Err(CertError::Unparseable { source, why })
}

// ---- thumbprints -------------------------------------------------------------------------

#[test]
fn listed_sha256_thumbprint_is_accepted() {
    let c = client("a");
    let p = policy(serde_json::json!({ "thumbprints": [c.sha256()] }));
    let ok = p.check(&conn(&c.pem), now()).unwrap();
    assert_eq!(ok.sha256_hex, c.sha256());
    assert_eq!(ok.source, CertSource::Connection);
    assert_eq!(ok.not_after, Some(at(2026, 1, 1)));
    assert_eq!(ok.subject.as_deref(), Some("CN=a"));
}

#[test]
fn listed_sha1_thumbprint_is_accepted_upper_case_with_colons() {
    let c = client("a");
    let colons = c
        .sha1()
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|p| std::str::from_utf8(p).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    let p = policy(serde_json::json!({ "thumbprints": [colons] }));
    assert!(p.check(&conn(&c.pem), now()).is_ok());
}

#[test]
fn thumbprint_with_spaces_and_mixed_case_is_accepted() {
    let c = client("a");
    let hex = c.sha256();
    let mixed = format!("{} {}", hex[..32].to_uppercase(), &hex[32..]);
    let p = policy(serde_json::json!({ "thumbprints": [mixed] }));
    assert!(p.check(&conn(&c.pem), now()).is_ok());
}

#[test]
fn unlisted_certificate_is_refused() {
    let listed = client("listed");
    let other = client("other");
    let p = policy(serde_json::json!({ "thumbprints": [listed.sha256(), listed.sha1()] }));
    assert_eq!(
        p.check(&conn(&other.pem), now()),
        Err(CertError::UnknownThumbprint)
    );
}

#[test]
fn sha1_digest_does_not_match_a_sha256_entry_prefix() {
    // A SHA-1 entry equal to the first 20 bytes of the SHA-256 must not match.
    let c = client("a");
    let p = policy(serde_json::json!({ "thumbprints": [&c.sha256()[..40]] }));
    assert_eq!(
        p.check(&conn(&c.pem), now()),
        Err(CertError::UnknownThumbprint)
    );
}

#[test]
fn rotation_accepts_each_listed_certificate() {
    let old = client("old");
    let new = client("new");
    let p = policy(serde_json::json!({ "thumbprints": [old.sha1(), new.sha256()] }));
    assert!(p.check(&conn(&old.pem), now()).is_ok());
    assert!(p.check(&conn(&new.pem), now()).is_ok());
    assert_eq!(
        p.check(&conn(&client("third").pem), now()),
        Err(CertError::UnknownThumbprint)
    );
}

#[test]
fn no_certificate_is_missing() {
    let c = client("a");
    let p = policy(serde_json::json!({
        "thumbprints": [c.sha256()],
        "sources": ["connection", "x-forwarded-client-cert", "x-arr-clientcert"]
    }));
    assert_eq!(
        p.check(&PresentedCertificates::default(), now()),
        Err(CertError::Missing)
    );
    let blank = PresentedCertificates {
        connection: Some(b""),
        xfcc: Some("  "),
        arr: Some(""),
    };
    assert_eq!(p.check(&blank, now()), Err(CertError::Missing));
}

// ---- validity ----------------------------------------------------------------------------

#[test]
fn expired_certificate_is_refused_only_with_check_validity() {
    let c = self_signed(params("old", (2020, 1, 1), (2021, 1, 1)));
    let strict = policy(serde_json::json!({ "thumbprints": [c.sha256()] }));
    assert_eq!(strict.check(&conn(&c.pem), now()), Err(CertError::Expired));
    let lax = policy(serde_json::json!({ "thumbprints": [c.sha256()], "check_validity": false }));
    let ok = lax.check(&conn(&c.pem), now()).unwrap();
    assert!(
        ok.expires_within_warning,
        "an expired certificate is worth a warning"
    );
}

#[test]
fn not_yet_valid_certificate_is_refused_only_with_check_validity() {
    let c = self_signed(params("future", (2027, 1, 1), (2028, 1, 1)));
    let strict = policy(serde_json::json!({ "thumbprints": [c.sha256()] }));
    assert_eq!(
        strict.check(&conn(&c.pem), now()),
        Err(CertError::NotYetValid)
    );
    let lax = policy(serde_json::json!({ "thumbprints": [c.sha256()], "check_validity": false }));
    assert!(lax.check(&conn(&c.pem), now()).is_ok());
}

#[test]
fn validity_bounds_are_inclusive_without_skew() {
    let c = client("a");
    let p = policy(serde_json::json!({ "thumbprints": [c.sha256()] }));
    let (start, end) = (at(2024, 1, 1), at(2026, 1, 1));
    assert!(p.check(&conn(&c.pem), start).is_ok());
    assert_eq!(
        p.check(&conn(&c.pem), start - 1),
        Err(CertError::NotYetValid)
    );
    assert!(p.check(&conn(&c.pem), end).is_ok());
    assert_eq!(p.check(&conn(&c.pem), end + 1), Err(CertError::Expired));
}

#[test]
fn expiry_warning_within_warn_expiry_days() {
    let c = client("a"); // expires 2026-01-01
    let p = policy(serde_json::json!({ "thumbprints": [c.sha256()] }));
    assert!(
        !p.check(&conn(&c.pem), at(2025, 11, 1))
            .unwrap()
            .expires_within_warning
    );
    assert!(
        p.check(&conn(&c.pem), at(2025, 12, 2))
            .unwrap()
            .expires_within_warning
    );
    let p = policy(serde_json::json!({ "thumbprints": [c.sha256()], "warn_expiry_days": 90 }));
    assert!(
        p.check(&conn(&c.pem), at(2025, 11, 1))
            .unwrap()
            .expires_within_warning
    );
    let p = policy(serde_json::json!({ "thumbprints": [c.sha256()], "warn_expiry_days": 0 }));
    assert!(
        !p.check(&conn(&c.pem), at(2025, 12, 31))
            .unwrap()
            .expires_within_warning
    );
}

// ---- connection --------------------------------------------------------------------------

#[test]
fn connection_accepts_plain_and_url_encoded_pem_and_der() {
    let c = client("a");
    let p = policy(serde_json::json!({ "thumbprints": [c.sha256()] }));
    assert!(p.check(&conn(&c.pem), now()).is_ok());
    assert!(p.check(&conn(&c.url_pem()), now()).is_ok());
    let crlf = c.pem.replace('\n', "\r\n");
    assert!(p.check(&conn(&crlf), now()).is_ok());
    let der = PresentedCertificates {
        connection: Some(&c.der),
        ..Default::default()
    };
    assert!(p.check(&der, now()).is_ok());
}

#[test]
fn connection_garbage_is_unparseable() {
    let c = client("a");
    let p = policy(serde_json::json!({ "thumbprints": [c.sha256()] }));
    let cases: Vec<(String, Malformed)> = vec![
        ("hello".into(), Malformed::NoCertificatePem),
        ("%zz".into(), Malformed::BadPercentEncoding),
        (
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into(),
            Malformed::NoCertificatePem,
        ),
        (
            c.pem[..c.pem.len() / 2].to_string(),
            Malformed::TruncatedPem,
        ),
        (
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----".into(),
            Malformed::BadBase64,
        ),
        (
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----",
                B64.encode(&c.der[..c.der.len() - 10])
            ),
            Malformed::BadDer,
        ),
        ("x".repeat(MAX_INPUT_BYTES + 1), Malformed::TooLarge),
    ];
    for (input, why) in cases {
        assert_eq!(
            p.check(&conn(&input), now()),
            unparseable(CertSource::Connection, why)
        );
    }
}

// ---- x-forwarded-client-cert -------------------------------------------------------------

fn xfcc_policy(thumbprints: &[String], check_validity: bool) -> ClientCertPolicy {
    policy(serde_json::json!({
        "thumbprints": thumbprints,
        "sources": ["x-forwarded-client-cert"],
        "check_validity": check_validity
    }))
}

#[test]
fn xfcc_cert_is_accepted() {
    let c = client("a");
    let p = xfcc_policy(&[c.sha1()], true);
    let ok = p.check(&xfcc(&c.xfcc()), now()).unwrap();
    assert_eq!(ok.source, CertSource::Xfcc);
    assert_eq!(ok.not_after, Some(at(2026, 1, 1)));
}

#[test]
fn xfcc_only_last_element_counts() {
    let listed = client("listed");
    let other = client("other");
    let p = xfcc_policy(&[listed.sha256()], true);
    let forged_first = format!("{},{}", listed.xfcc(), other.xfcc());
    assert_eq!(
        p.check(&xfcc(&forged_first), now()),
        Err(CertError::UnknownThumbprint)
    );
    let listed_last = format!("{}, {}", other.xfcc(), listed.xfcc());
    assert!(p.check(&xfcc(&listed_last), now()).is_ok());
}

#[test]
fn xfcc_quoted_values_may_hold_commas_semicolons_and_quotes() {
    let c = client("a");
    let p = xfcc_policy(&[c.sha256()], true);
    let header = format!(
        "Hash=00;Subject=\"CN=b\",By=x;Subject=\"CN=a, O=x;y \\\"z\\\"\";Cert=\"{}\";DNS=a.example",
        c.url_pem()
    );
    assert!(p.check(&xfcc(&header), now()).is_ok());
}

#[test]
fn xfcc_hash_only() {
    let c = client("a");
    let header = format!("By=spiffe://gw;Hash={}", c.sha256().to_uppercase());
    // Dates cannot be checked from a hash: refused while check_validity is on.
    assert_eq!(
        xfcc_policy(&[c.sha256()], true).check(&xfcc(&header), now()),
        Err(CertError::HashOnlyInsufficient)
    );
    let ok = xfcc_policy(&[c.sha256()], false)
        .check(&xfcc(&header), now())
        .unwrap();
    assert_eq!(ok.sha256_hex, c.sha256());
    assert_eq!(ok.not_after, None);
    // Only SHA-256 entries can match a hash.
    assert_eq!(
        xfcc_policy(&[c.sha1()], false).check(&xfcc(&header), now()),
        Err(CertError::UnknownThumbprint)
    );
    // Names cannot be checked from a hash either.
    let named = policy(serde_json::json!({
        "thumbprints": [c.sha256()], "sources": ["x-forwarded-client-cert"],
        "check_validity": false, "subject": "CN=a"
    }));
    assert_eq!(
        named.check(&xfcc(&header), now()),
        Err(CertError::HashOnlyInsufficient)
    );
}

/// The first half of a URL-encoded text, cut before a `%XX` escape rather than inside it (a
/// cut escape is another error, and the key material decides where the half falls).
fn half_without_splitting_an_escape(url: &str) -> &str {
    let cut = (0..=url.len() / 2)
        .rev()
        .find(|&i| url[..i].rfind('%').is_none_or(|p| p + 3 <= i))
        .unwrap();
    &url[..cut]
}

#[test]
fn xfcc_malformed_is_unparseable() {
    let c = client("a");
    let other = client("b");
    let p = xfcc_policy(&[c.sha256()], true);
    let cases: Vec<(String, Malformed)> = vec![
        ("By=x;Subject=\"CN=a\"".into(), Malformed::XfccNoCertificate),
        ("Hash=abc".into(), Malformed::XfccBadHash),
        (
            format!("Hash={};Cert=\"{}\"", other.sha256(), c.url_pem()),
            Malformed::XfccHashMismatch,
        ),
        (format!("Cert=\"{}", c.url_pem()), Malformed::XfccSyntax),
        (format!("{},", c.xfcc()), Malformed::XfccSyntax),
        (
            format!("Cert=\"{0}\";Cert=\"{0}\"", c.url_pem()),
            Malformed::XfccSyntax,
        ),
        ("Cert".into(), Malformed::XfccSyntax),
        ("Cert=\"hello\"".into(), Malformed::NoCertificatePem),
        ("Cert=\"%GG\"".into(), Malformed::BadPercentEncoding),
        (
            format!(
                "Cert=\"{}\"",
                half_without_splitting_an_escape(&c.url_pem())
            ),
            Malformed::TruncatedPem,
        ),
        (
            format!("Cert=\"{}\"", "a".repeat(MAX_INPUT_BYTES)),
            Malformed::TooLarge,
        ),
    ];
    for (header, why) in cases {
        assert_eq!(
            p.check(&xfcc(&header), now()),
            unparseable(CertSource::Xfcc, why),
            "{header:.80}"
        );
    }
}

// ---- x-arr-clientcert --------------------------------------------------------------------

fn arr_policy(c: &TestCert) -> ClientCertPolicy {
    policy(serde_json::json!({ "thumbprints": [c.sha256()], "sources": ["x-arr-clientcert"] }))
}

#[test]
fn arr_base64_der_is_accepted_with_whitespace_armour_or_no_padding() {
    let c = client("a");
    let p = arr_policy(&c);
    let ok = p.check(&arr(&c.b64()), now()).unwrap();
    assert_eq!(ok.source, CertSource::Arr);
    let wrapped: String = c
        .b64()
        .as_bytes()
        .chunks(64)
        .map(|l| format!("{}\n", std::str::from_utf8(l).unwrap()))
        .collect();
    assert!(p.check(&arr(&wrapped), now()).is_ok());
    assert!(p.check(&arr(&c.pem), now()).is_ok());
    assert!(p.check(&arr(c.b64().trim_end_matches('=')), now()).is_ok());
}

#[test]
fn arr_garbage_and_truncated_der_are_unparseable() {
    let c = client("a");
    let p = arr_policy(&c);
    let mut trailing = c.der.clone();
    trailing.extend_from_slice(b"junk");
    let cases: Vec<(String, Malformed)> = vec![
        ("not base64!".into(), Malformed::BadBase64),
        (B64.encode(b"garbage bytes"), Malformed::BadDer),
        (B64.encode(&c.der[..c.der.len() / 2]), Malformed::BadDer),
        (c.b64()[..c.b64().len() / 2].to_string(), Malformed::BadDer),
        (B64.encode(&trailing), Malformed::TrailingData),
        ("A".repeat(MAX_INPUT_BYTES + 4), Malformed::TooLarge),
    ];
    for (header, why) in cases {
        let got = p.check(&arr(&header), now());
        // Cutting base64 mid-quantum may fail as base64 or as DER; both are refusals.
        if why == Malformed::BadDer && header.len() % 4 != 0 {
            assert!(matches!(
                got,
                Err(CertError::Unparseable {
                    source: CertSource::Arr,
                    ..
                })
            ));
        } else {
            assert_eq!(got, unparseable(CertSource::Arr, why), "{header:.40}");
        }
    }
}

#[test]
fn arr_empty_header_is_not_presented() {
    let c = client("a");
    let p = policy(serde_json::json!({
        "thumbprints": [c.sha256()], "sources": ["x-arr-clientcert", "connection"]
    }));
    let presented = PresentedCertificates {
        connection: Some(c.pem.as_bytes()),
        arr: Some(""),
        ..Default::default()
    };
    assert_eq!(
        p.check(&presented, now()).unwrap().source,
        CertSource::Connection
    );
    assert_eq!(
        arr_policy(&c).check(&arr(" "), now()),
        Err(CertError::Missing)
    );
}

// ---- sources -----------------------------------------------------------------------------

#[test]
fn first_source_that_yields_decides() {
    let listed = client("listed");
    let other = client("other");
    let p = policy(serde_json::json!({
        "thumbprints": [listed.sha256()],
        "sources": ["x-forwarded-client-cert", "connection"]
    }));
    // XFCC yields an unlisted certificate: refused even though the connection's is listed.
    let both = PresentedCertificates {
        connection: Some(listed.pem.as_bytes()),
        xfcc: Some(&other.xfcc()),
        arr: None,
    };
    assert_eq!(p.check(&both, now()), Err(CertError::UnknownThumbprint));
    // Garbage in the first source is a refusal, not a fall-through.
    let garbage = PresentedCertificates {
        connection: Some(listed.pem.as_bytes()),
        xfcc: Some("Cert=\"nope\""),
        arr: None,
    };
    assert_eq!(
        p.check(&garbage, now()),
        unparseable(CertSource::Xfcc, Malformed::NoCertificatePem)
    );
    // No XFCC: the connection decides.
    assert_eq!(
        p.check(&conn(&listed.pem), now()).unwrap().source,
        CertSource::Connection
    );
}

#[test]
fn unlisted_header_sources_are_ignored() {
    let c = client("a");
    let p = policy(serde_json::json!({ "thumbprints": [c.sha256()] }));
    let headers_only = PresentedCertificates {
        connection: None,
        xfcc: Some(&c.xfcc()),
        arr: Some(&c.b64()),
    };
    assert_eq!(p.check(&headers_only, now()), Err(CertError::Missing));
}

// ---- subject / issuer --------------------------------------------------------------------

fn named(c: &TestCert, subject: Option<&str>, issuer: Option<&str>) -> ClientCertPolicy {
    policy(serde_json::json!({ "thumbprints": [c.sha256()], "subject": subject, "issuer": issuer }))
}

#[test]
fn subject_and_issuer_match_whole_names_case_insensitively_in_either_order() {
    let c = ca_signed();
    for subject in [
        "CN=apim-client, O=Contoso",
        "o=contoso,cn=APIM-CLIENT",
        "OID.2.5.4.3=apim-client,2.5.4.10=Contoso",
    ] {
        assert!(
            named(&c, Some(subject), None)
                .check(&conn(&c.pem), now())
                .is_ok(),
            "{subject}"
        );
    }
    assert!(named(
        &c,
        Some("CN=apim-client, O=Contoso"),
        Some("CN=Test CA, O=Contoso")
    )
    .check(&conn(&c.pem), now())
    .is_ok());
    assert_eq!(
        named(&c, Some("CN=apim-client"), None).check(&conn(&c.pem), now()),
        Err(CertError::SubjectMismatch),
        "a partial name does not match"
    );
    assert_eq!(
        named(&c, Some("CN=other, O=Contoso"), None).check(&conn(&c.pem), now()),
        Err(CertError::SubjectMismatch)
    );
    assert_eq!(
        named(&c, None, Some("CN=Evil CA, O=Contoso")).check(&conn(&c.pem), now()),
        Err(CertError::IssuerMismatch)
    );
    // Self-signed: the issuer is the subject.
    let s = client("solo");
    assert!(named(&s, Some("cn=SOLO"), Some("CN=solo"))
        .check(&conn(&s.pem), now())
        .is_ok());
}

#[test]
fn subject_values_with_special_characters_and_bmp_strings() {
    let mut p = params("client", (2024, 1, 1), (2026, 1, 1));
    p.distinguished_name
        .push(DnType::OrganizationName, "Contoso, Ltd");
    p.distinguished_name.push(
        DnType::OrganizationalUnitName,
        DnValue::BmpString(BmpString::try_from("Équipe").unwrap()),
    );
    let c = self_signed(p);
    for subject in [
        "CN=client, O=\"Contoso, Ltd\", OU=équipe",
        "CN=client, O=Contoso\\, Ltd, OU=\\C3\\89quipe",
    ] {
        assert!(
            named(&c, Some(subject), None)
                .check(&conn(&c.pem), now())
                .is_ok(),
            "{subject}"
        );
    }
}

// ---- configuration -----------------------------------------------------------------------

fn config_error(json: serde_json::Value) -> String {
    config(json).unwrap_err().to_string()
}

#[test]
fn config_defaults() {
    let c = client("a");
    let cfg: ClientCertConfig =
        serde_json::from_value(serde_json::json!({ "thumbprints": [c.sha1()] })).unwrap();
    assert_eq!(cfg.sources, vec!["connection"]);
    assert!(cfg.check_validity);
    assert_eq!(cfg.warn_expiry_days, 30);
    let p = ClientCertPolicy::compile(&cfg, PATH).unwrap();
    assert_eq!(p.sources(), &[CertSource::Connection]);
    assert_eq!(p.thumbprints(), &[Thumbprint::parse(&c.sha1()).unwrap()]);
}

#[test]
fn config_refuses_unknown_fields() {
    let err = serde_json::from_value::<ClientCertConfig>(
        serde_json::json!({ "thumbprints": ["00"], "thumbprint": "x" }),
    );
    assert!(err.is_err());
}

#[test]
fn config_errors_name_the_field() {
    let good = "a".repeat(40);
    let cases = [
        (
            serde_json::json!({ "thumbprints": [] }),
            "apis[0].client_certificate.thumbprints: empty",
        ),
        (
            serde_json::json!({ "thumbprints": [good, "zz".repeat(20)] }),
            "apis[0].client_certificate.thumbprints[1]: not a SHA-1 (40 hex) or SHA-256 (64 hex) thumbprint",
        ),
        (
            serde_json::json!({ "thumbprints": ["ab".repeat(21)] }),
            "apis[0].client_certificate.thumbprints[0]: not a SHA-1 (40 hex) or SHA-256 (64 hex) thumbprint",
        ),
        (
            serde_json::json!({ "thumbprints": ["abc"] }),
            "apis[0].client_certificate.thumbprints[0]: not a SHA-1",
        ),
        (
            serde_json::json!({ "thumbprints": ["", ] }),
            "apis[0].client_certificate.thumbprints[0]: not a SHA-1",
        ),
        (
            serde_json::json!({ "thumbprints": [good, good.to_uppercase()] }),
            "apis[0].client_certificate.thumbprints[1]: duplicate of apis[0].client_certificate.thumbprints[0]",
        ),
        (
            serde_json::json!({ "thumbprints": [good], "sources": [] }),
            "apis[0].client_certificate.sources: empty",
        ),
        (
            serde_json::json!({ "thumbprints": [good], "sources": ["connection", "X-ARR-ClientCert"] }),
            "apis[0].client_certificate.sources[1]: unknown source \"X-ARR-ClientCert\"",
        ),
        (
            serde_json::json!({ "thumbprints": [good], "sources": ["connection", "connection"] }),
            "apis[0].client_certificate.sources[1]: duplicate source",
        ),
        (
            serde_json::json!({ "thumbprints": [good], "subject": "apim-client" }),
            "apis[0].client_certificate.subject: expected a distinguished name",
        ),
        (
            serde_json::json!({ "thumbprints": [good], "issuer": "XX=ca" }),
            "apis[0].client_certificate.issuer: unknown attribute type",
        ),
        (
            serde_json::json!({ "thumbprints": [good], "issuer": "" }),
            "apis[0].client_certificate.issuer: empty distinguished name",
        ),
        (
            serde_json::json!({ "thumbprints": [good], "subject": "CN=\"a" }),
            "apis[0].client_certificate.subject: unterminated quote",
        ),
        (
            serde_json::json!({ "thumbprints": [good], "subject": "CN=a,O=" }),
            "apis[0].client_certificate.subject: attribute with an empty value",
        ),
    ];
    for (json, expected) in cases {
        let got = config_error(json.clone());
        assert!(got.starts_with(expected), "{json}: got {got:?}");
    }
}

// ---- thumbprint type, CLI helpers --------------------------------------------------------

#[test]
fn thumbprint_parses_and_displays_upper_case() {
    let t = Thumbprint::parse("ab:CD:ef 01 23456789abcdef0123456789abcdef01").unwrap();
    assert!(matches!(t, Thumbprint::Sha1(_)));
    assert_eq!(t.to_string(), "ABCDEF0123456789ABCDEF0123456789ABCDEF01");
    assert_eq!(t.to_lower_hex(), "abcdef0123456789abcdef0123456789abcdef01");
    assert!(matches!(
        Thumbprint::parse(&"0".repeat(64)),
        Ok(Thumbprint::Sha256(_))
    ));
    assert_eq!(
        Thumbprint::parse(&"g".repeat(40)),
        Err(ThumbprintError::NotHex)
    );
    assert_eq!(Thumbprint::parse("é"), Err(ThumbprintError::NotHex));
    assert_eq!(
        Thumbprint::parse(&"0".repeat(41)),
        Err(ThumbprintError::WrongLength)
    );
}

#[test]
fn describe_der_summarises_a_certificate() {
    let c = ca_signed();
    let s = describe_der(&c.der).unwrap();
    assert_eq!(s.sha1.to_lower_hex(), c.sha1());
    assert_eq!(s.sha256.to_lower_hex(), c.sha256());
    assert_eq!(s.subject, "CN=apim-client, O=Contoso");
    assert_eq!(s.issuer, "CN=Test CA, O=Contoso");
    assert_eq!(s.not_before, 1_704_067_200);
    assert_eq!(s.not_before_rfc3339, "2024-01-01T00:00:00Z");
    assert_eq!(s.not_after_rfc3339, "2026-01-01T00:00:00Z");
    assert_eq!(describe_der(b"junk"), Err(Malformed::BadDer));
}

#[test]
fn pem_or_der_to_der_reads_pem_files_and_der() {
    let c = client("a");
    assert_eq!(pem_or_der_to_der(c.pem.as_bytes()).unwrap(), c.der);
    assert_eq!(pem_or_der_to_der(&c.der).unwrap(), c.der);
    let key_then_cert = format!(
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n{}",
        c.pem
    );
    assert_eq!(pem_or_der_to_der(key_then_cert.as_bytes()).unwrap(), c.der);
    assert_eq!(pem_or_der_to_der(b"junk"), Err(Malformed::BadDer));
    assert_eq!(
        pem_or_der_to_der(b"-----BEGIN PRIVATE KEY-----\n"),
        Err(Malformed::NoCertificatePem)
    );
}

#[test]
fn rfc3339_renders_utc() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
}

#[test]
fn error_reasons_never_carry_certificate_bodies() {
    let e = CertError::Unparseable {
        source: CertSource::Arr,
        why: Malformed::BadDer,
    };
    assert_eq!(
        e.to_string(),
        "x-arr-clientcert: not a DER X.509 certificate"
    );
    assert_eq!(CertError::Missing.reason(), "no client certificate");
}

// ---- robustness --------------------------------------------------------------------------

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
    }
}

#[test]
fn mutated_der_never_panics_and_is_never_accepted() {
    let c = ca_signed();
    let p = policy(serde_json::json!({
        "thumbprints": [c.sha256(), c.sha1()],
        "sources": ["x-arr-clientcert", "x-forwarded-client-cert", "connection"],
        "check_validity": false
    }));
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..3_000 {
        let mut der = c.der.clone();
        if round % 2 == 0 {
            der.truncate(rng.below(der.len()));
        } else {
            for _ in 0..=rng.below(4) {
                let i = rng.below(der.len());
                der[i] ^= 1 << rng.below(8);
            }
        }
        if der == c.der {
            continue;
        }
        let _ = describe_der(&der);
        let _ = pem_or_der_to_der(&der);
        let b64 = B64.encode(&der);
        let pem = format!("-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n");
        let url = utf8_percent_encode(&pem, NON_ALPHANUMERIC).to_string();
        let header = format!("Cert=\"{url}\"");
        let inputs = [
            arr(&b64),
            xfcc(&header),
            conn(&pem),
            PresentedCertificates {
                connection: Some(&der),
                ..Default::default()
            },
        ];
        for presented in inputs {
            assert!(p.check(&presented, now()).is_err(), "round {round}");
        }
    }
}

#[test]
fn random_header_text_never_panics() {
    let c = client("a");
    let p = policy(serde_json::json!({
        "thumbprints": [c.sha256()],
        "sources": ["x-forwarded-client-cert", "x-arr-clientcert", "connection"],
        "check_validity": false, "subject": "CN=a"
    }));
    let alphabet: Vec<char> = "ab=;,\"\\%0F-BEGIN CERTIFICATE-----\n+/é".chars().collect();
    let mut rng = Rng(42);
    for _ in 0..5_000 {
        let len = rng.below(80);
        let text: String = (0..len)
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect();
        for presented in [xfcc(&text), arr(&text), conn(&text)] {
            let _ = p.check(&presented, now());
        }
        let _ = DistinguishedName::parse(&text);
        let _ = Thumbprint::parse(&text);
    }
}
