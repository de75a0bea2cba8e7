//! Conversions of whole documents: what each element becomes, and what makes a document fail
//! closed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use clap::Parser as _;
use serde_json::json;

use super::jwt::HMAC_VAR;
use super::report::Kind;
use super::*;

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

fn args(flags: &[&str]) -> Args {
    let mut argv = vec!["import-apim", "in.xml"];
    argv.extend_from_slice(flags);
    Cli::try_parse_from(argv).unwrap().args
}

/// The policy from what converted (written only when nothing was refused), and the report.
fn convert_str(xml: &str, flags: &[&str]) -> (Value, Report) {
    convert_with(xml, flags, &NamedValues::default())
}

fn convert_named(xml: &str, flags: &[&str], named: &str) -> (Value, Report) {
    convert_with(xml, flags, &NamedValues::parse(named).unwrap())
}

fn convert_with(xml: &str, flags: &[&str], named: &NamedValues) -> (Value, Report) {
    let a = args(flags);
    let (api, report, _) = convert_text(xml, &a, named).unwrap();
    let text = render(&api, &a).unwrap();
    gateguard_core::parse_policy(text.as_bytes(), &import::placeholder_env).unwrap();
    (serde_json::from_str(&text).unwrap(), report)
}

/// The elements not converted, by line (as the report prints them).
fn refused(report: &Report) -> Vec<&str> {
    let mut items: Vec<_> = report
        .items
        .iter()
        .filter(|i| i.kind == Kind::NotConverted)
        .collect();
    items.sort_by_key(|i| i.line);
    items.iter().map(|i| i.element.as_str()).collect()
}

/// What the report says of `element`, as `kind`, one line each.
fn said(report: &Report, kind: Kind, element: &str) -> String {
    report
        .items
        .iter()
        .filter(|i| i.kind == kind && i.element == element)
        .map(|i| i.text.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

fn inbound(body: &str) -> String {
    format!("<policies>\n<inbound>\n{body}\n</inbound>\n<backend><base /></backend>\n<outbound><base /></outbound>\n<on-error><base /></on-error>\n</policies>")
}

#[test]
fn documented_cert_choose_converts() {
    let xml = inbound(
        r#"<choose>
<when condition="@(context.Request.Certificate == null || context.Request.Certificate.Thumbprint != "3A7F00000000000000000000000000000000009C")" >
    <return-response>
        <set-status code="403" reason="Invalid client certificate" />
    </return-response>
</when>
</choose>"#,
    );
    let (policy, report) = convert_str(&xml, &[]);
    assert_eq!(
        policy["apis"][0]["client_certificate"],
        json!({"thumbprints": ["3A7F00000000000000000000000000000000009C"], "check_validity": false})
    );
    assert!(!report.skipped(), "{:?}", report.items);
}

#[test]
fn cors_ip_key_and_headers() {
    let xml = inbound(
        r#"<cors allow-credentials="true">
  <allowed-origins><origin>https://portal.example.com/</origin><origin>*</origin></allowed-origins>
  <allowed-methods preflight-result-max-age="300"><method>get</method><method>POST</method></allowed-methods>
  <allowed-headers><header>content-type</header></allowed-headers>
</cors>
<ip-filter action="forbid"><address>203.0.113.7</address></ip-filter>
<ip-filter action="allow"><address-range from="10.0.0.0" to="10.0.1.255" /></ip-filter>
<check-header name="Ocp-Apim-Subscription-Key" failed-check-httpcode="401" failed-check-error-message="no" ignore-case="false"><value>s3cret-key</value></check-header>
<set-header name="x-functions-key" exists-action="override"><value>{{functions-key}}</value></set-header>"#,
    );
    let (policy, report) = convert_str(&xml, &[]);
    let api = &policy["apis"][0];
    assert_eq!(
        api["cors"]["allowed_origins"],
        json!(["https://portal.example.com"])
    );
    assert_eq!(api["cors"]["allowed_methods"], json!(["GET", "POST"]));
    assert_eq!(api["cors"]["max_age_seconds"], json!(300));
    assert_eq!(api["cors"]["allow_credentials"], json!(true));
    assert_eq!(
        api["ip_filter"],
        json!({"allow": ["10.0.0.0/23"], "deny": ["203.0.113.7"]})
    );
    assert_eq!(
        api["subscription_key"],
        json!({"header": "Ocp-Apim-Subscription-Key", "query": null,
               "keys_sha256": [gateguard_core::subscription_key::hash_key("s3cret-key")]})
    );
    assert_eq!(
        api["inject_headers"],
        json!({"x-functions-key": {"env": "FUNCTIONS_KEY"}})
    );
    assert!(!policy.to_string().contains("s3cret-key"));
    // The "*" origin with credentials is reported.
    assert!(report.skipped());
    assert!(report
        .items
        .iter()
        .any(|i| i.kind == Kind::Env && i.text.starts_with("FUNCTIONS_KEY")));
}

#[test]
fn validate_jwt_entra() {
    let xml = inbound(
        r#"<validate-jwt header-name="Authorization" failed-validation-httpcode="401" require-scheme="Bearer" clock-skew="30">
  <openid-config url="https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0/.well-known/openid-configuration" />
  <audiences><audience>api://processfactorial</audience></audiences>
  <required-claims>
<claim name="roles" match="any" separator=" "><value>Forms.Submit</value><value>Forms.Admin</value></claim>
<claim name="scp" separator=" "><value>read</value></claim>
  </required-claims>
</validate-jwt>"#,
    );
    let (policy, report) = convert_str(&xml, &["--jwks-cluster", "entra"]);
    assert_eq!(
        policy["apis"][0]["jwt"],
        json!({
            "issuers": ["https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0"],
            "audiences": ["api://processfactorial"],
            "algorithms": ["RS256"],
            "jwks": {"cluster": "entra", "uri": "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0/.well-known/openid-configuration"},
            "clock_skew_seconds": 30,
            "required_claims": [
                {"name": "roles", "any_of": ["Forms.Submit", "Forms.Admin"]},
                {"name": "scp", "all_of": ["read"]}
            ]
        })
    );
    assert!(!report.skipped(), "{:?}", report.items);
}

#[test]
fn validate_jwt_domain_tenant_needs_issuer() {
    let xml = inbound(
        r#"<validate-jwt header-name="Authorization" failed-validation-httpcode="401" failed-validation-error-message="Unauthorized. Access token is missing or invalid.">
<openid-config url="https://login.microsoftonline.com/contoso.onmicrosoft.com/.well-known/openid-configuration" />
<audiences><audience>25eef6e4-c905-4a07-8eb4-0d08d5df8b3f</audience></audiences>
</validate-jwt>"#,
    );
    let (policy, report) = convert_str(&xml, &[]);
    assert!(policy["apis"][0].get("jwt").is_none());
    assert!(report.skipped());
    let (policy, report) = convert_str(&xml, &["--issuer", "https://sts.windows.net/tid/"]);
    assert_eq!(
        policy["apis"][0]["jwt"]["issuers"],
        json!(["https://sts.windows.net/tid/"])
    );
    assert_eq!(policy["apis"][0]["jwt"]["jwks"]["cluster"], json!("idp"));
    assert!(!report.skipped(), "{:?}", report.items);
}

#[test]
fn validate_jwt_token_location() {
    for attrs in [
        r#"query-parameter-name="token""#,
        r#"header-name="X-Token""#,
        r#"header-name="Authorization" require-scheme="Basic""#,
    ] {
        let xml = inbound(&format!(
            r#"<validate-jwt {attrs}><openid-config url="https://idp.example.com/.well-known/openid-configuration"/><audiences><audience>a</audience></audiences></validate-jwt>"#
        ));
        let (policy, report) = convert_str(&xml, &[]);
        assert!(policy["apis"][0].get("jwt").is_none(), "{attrs}");
        assert!(report.skipped());
    }
}

#[test]
fn validate_client_certificate_and_hmac_only() {
    let xml = inbound(
        r#"<validate-client-certificate validate-revocation="false" validate-trust="false" validate-not-before="true" validate-not-after="true" ignore-error="false">
  <identities><identity thumbprint="3A7F00000000000000000000000000000000009C" /></identities>
</validate-client-certificate>
<validate-jwt header-name="Authorization" require-scheme="Bearer">
  <issuer-signing-keys><key>c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA==</key></issuer-signing-keys>
  <audiences><audience>a</audience></audiences><issuers><issuer>http://contoso.com/</issuer></issuers>
</validate-jwt>"#,
    );
    let (policy, report) = convert_str(&xml, &[]);
    assert!(!report.skipped(), "{:?}", report.items);
    assert_eq!(
        policy["apis"][0]["client_certificate"],
        json!({"thumbprints": ["3A7F00000000000000000000000000000000009C"], "check_validity": true})
    );
    // HMAC alone is a key set of its own: no jwks, the secret from the environment.
    assert_eq!(
        policy["apis"][0]["jwt"],
        json!({
            "issuers": ["http://contoso.com/"], "audiences": ["a"], "algorithms": ["HS256"],
            "clock_skew_seconds": 0, "hmac_secret": {"env": HMAC_VAR}
        })
    );
    assert!(!policy.to_string().contains("c2VjcmV0"));
    assert!(report
        .items
        .iter()
        .all(|i| !i.text.contains("c2VjcmV0") && !i.text.contains("secret-secret")));
}

#[test]
fn hmac_keys_gateguard_cannot_hold_are_refused() {
    for (key, why) in [
        ("c2hvcnQ=", "5 bytes"),
        // 32 random bytes: not text, so no hmac_secret can hold them.
        ("3q2+7wABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4=", "binary"),
        ("not base64!", "not base64"),
        ("@(context.Variables[\"k\"])", "expression"),
    ] {
        let xml = inbound(&format!(
            r#"<validate-jwt header-name="Authorization"><issuer-signing-keys><key>{key}</key></issuer-signing-keys>
  <audiences><audience>a</audience></audiences><issuers><issuer>i</issuer></issuers></validate-jwt>"#
        ));
        let (policy, report) = convert_str(&xml, &[]);
        assert!(policy["apis"][0].get("jwt").is_none(), "{key}");
        assert!(
            report
                .items
                .iter()
                .any(|i| i.kind == Kind::NotConverted && i.text.contains(why)),
            "{key}: {:?}",
            report.items
        );
    }
}

#[test]
fn unknown_and_inherited_elements_are_reported() {
    let xml = "<policies><inbound><base /><rate-limit calls=\"20\" renewal-period=\"90\" /><trace source=\"x\" /><set-query-parameter name=\"a\" exists-action=\"delete\" /></inbound><backend><forward-request /></backend><outbound><set-header name=\"x\" exists-action=\"delete\" /></outbound></policies>";
    let (_, report) = convert_str(xml, &[]);
    assert_eq!(
        refused(&report),
        ["base", "rate-limit", "set-query-parameter"]
    );
    let left_out: Vec<&str> = report
        .items
        .iter()
        .filter(|i| i.kind == Kind::LeftOut)
        .map(|i| i.element.as_str())
        .collect();
    assert_eq!(left_out, ["trace", "set-header"]);
    // --skip accepts the loss, element by element.
    let (_, report) = convert_str(xml, &["--skip", "base", "--skip", "rate-limit"]);
    assert_eq!(refused(&report), ["set-query-parameter"]);
    let none = NamedValues::default();
    assert!(convert_text("<foo/>", &args(&[]), &none).is_err());
    assert!(convert_text("<policies><inbound>", &args(&[]), &none).is_err());
}

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

fn with_placeholders() -> String {
    inbound(
        r#"<validate-jwt header-name="Authorization" require-scheme="Bearer">
  <openid-config url="https://login.microsoftonline.com/{{tenant-id}}/v2.0/.well-known/openid-configuration" />
  <audiences><audience>${api_audience}</audience></audiences>
</validate-jwt>
<check-header name="Ocp-Apim-Subscription-Key"><value>{{sub-key}}</value></check-header>
<set-header name="x-functions-key" exists-action="override"><value>{{functions-key}}</value></set-header>"#,
    )
}

#[test]
fn placeholders_without_values_are_refused_by_name() {
    let (_, report) = convert_str(&with_placeholders(), &[]);
    assert_eq!(refused(&report), ["validate-jwt", "check-header"]);
    let text: Vec<&str> = report.items.iter().map(|i| i.text.as_str()).collect();
    let all = text.join("\n");
    let want = "no value for named value {{tenant-id}} (line 4), template placeholder \
                ${api_audience} (line 5): pass the values with --named-values FILE, or \
                render the template first";
    assert!(all.contains(want), "{all}");
    assert!(
        all.contains("no value for named value {{sub-key}} (line 7)"),
        "{all}"
    );
    // A header's {{named value}} is a reference to Envoy's environment, not a gap.
    assert!(report
        .items
        .iter()
        .any(|i| i.kind == Kind::Converted && i.element == "set-header"));
    // A value file that lacks one still names it.
    let (_, report) = convert_named(&with_placeholders(), &[], r#"{"tenant-id": "t"}"#);
    let all: Vec<&str> = report.items.iter().map(|i| i.text.as_str()).collect();
    let all = all.join("\n");
    assert!(
        all.contains("{{sub-key}} (line 7): add the values to the --named-values file"),
        "{all}"
    );
    assert!(!all.contains("{{tenant-id}}"), "{all}");
}

#[test]
fn named_values_fill_in_and_never_show() {
    let named = format!(
        r#"{{"tenant-id": "{TENANT}", "api_audience": "api://aud-value", "sub-key": "sub-key-s3cret", "functions-key": "fk-s3cret"}}"#
    );
    let a = args(&[]);
    let values = NamedValues::parse(&named).unwrap();
    let (api, report, masker) = convert_text(&with_placeholders(), &a, &values).unwrap();
    assert!(!report.skipped(), "{:?}", report.items);
    let policy: Value = serde_json::from_str(&render(&api, &a).unwrap()).unwrap();
    let api = &policy["apis"][0];
    assert_eq!(
        api["jwt"]["issuers"],
        json!([format!("https://login.microsoftonline.com/{TENANT}/v2.0")])
    );
    assert_eq!(api["jwt"]["audiences"], json!(["api://aud-value"]));
    assert_eq!(
        api["subscription_key"]["keys_sha256"],
        json!([gateguard_core::subscription_key::hash_key("sub-key-s3cret")])
    );
    // The header's value stays in Envoy's environment even when the file has it.
    assert_eq!(
        api["inject_headers"],
        json!({"x-functions-key": {"env": "FUNCTIONS_KEY"}})
    );
    assert!(!policy.to_string().contains("s3cret"));
    for item in &report.items {
        let shown = masker.mask(&item.text);
        assert!(
            !shown.contains(TENANT) && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}

#[test]
fn checks_inside_choose_are_refused() {
    let xml = inbound(
        r#"<choose>
  <when condition="@(context.Request.Method == &quot;POST&quot;)">
<validate-jwt header-name="Authorization"><openid-config url="https://idp.example.com/.well-known/openid-configuration" /><audiences><audience>a</audience></audiences></validate-jwt>
  </when>
</choose>
<choose>
  <when condition="@(context.Request.Certificate == null || context.Request.Certificate.Thumbprint != &quot;3A7F00000000000000000000000000000000009C&quot;)">
<return-response><set-status code="403" /></return-response>
  </when>
  <otherwise><ip-filter action="allow"><address>10.0.0.1</address></ip-filter></otherwise>
</choose>"#,
    );
    let (policy, report) = convert_str(&xml, &[]);
    assert_eq!(refused(&report), ["choose", "choose"]);
    assert!(policy["apis"][0].get("jwt").is_none());
    assert!(policy["apis"][0].get("client_certificate").is_none());
}

#[test]
fn revocation_is_refused_unless_accepted() {
    let thumb = "3A7F00000000000000000000000000000000009C";
    for body in [
        format!(
            r#"<validate-client-certificate><identities><identity thumbprint="{thumb}" /></identities></validate-client-certificate>"#
        ),
        format!(
            r#"<choose><when condition="@(context.Request.Certificate == null || !context.Request.Certificate.Verify() || context.Request.Certificate.Thumbprint != &quot;{thumb}&quot;)"><return-response><set-status code="403" /></return-response></when></choose>"#
        ),
    ] {
        let xml = inbound(&body);
        let (policy, report) = convert_str(&xml, &[]);
        assert_eq!(refused(&report).len(), 1, "{body}");
        assert!(policy["apis"][0].get("client_certificate").is_none());
        let (policy, report) = convert_str(&xml, &["--no-revocation-check"]);
        assert!(!report.skipped(), "{:?}", report.items);
        assert_eq!(
            policy["apis"][0]["client_certificate"]["thumbprints"],
            json!([thumb])
        );
    }
    // VerifyNoRevocation() checks no revocation: nothing to accept.
    let xml = inbound(&format!(
        r#"<choose><when condition="@(context.Request.Certificate == null || !context.Request.Certificate.VerifyNoRevocation() || context.Request.Certificate.Thumbprint != &quot;{thumb}&quot;)"><return-response><set-status code="403" /></return-response></when></choose>"#
    ));
    assert!(!convert_str(&xml, &[]).1.skipped());
}

#[test]
fn what_a_conversion_would_drop_is_refused() {
    for body in [
        // A child element the conversion does not read.
        r#"<cors><allowed-origins><origin>https://a.example</origin></allowed-origins><allowed-paths /></cors>"#,
        // A claim without separator=" " (APIM compares a string claim whole), or another one.
        r#"<validate-jwt header-name="Authorization"><openid-config url="https://idp.example.com/.well-known/openid-configuration" /><audiences><audience>a</audience></audiences><required-claims><claim name="department"><value>Finance</value></claim></required-claims></validate-jwt>"#,
        r#"<validate-jwt header-name="Authorization"><openid-config url="https://idp.example.com/.well-known/openid-configuration" /><audiences><audience>a</audience></audiences><required-claims><claim name="groups" separator=","><value>a</value></claim></required-claims></validate-jwt>"#,
        // An origin APIM takes literally, gateguard as every subdomain.
        r#"<cors><allowed-origins><origin>https://*.contoso.com</origin></allowed-origins></cors>"#,
        // A claim required by presence only.
        r#"<validate-jwt header-name="Authorization"><openid-config url="https://idp.example.com/.well-known/openid-configuration" /><audiences><audience>a</audience></audiences><required-claims><claim name="roles" /></required-claims></validate-jwt>"#,
        // A second key source APIM would accept.
        r#"<validate-jwt header-name="Authorization"><openid-config url="https://idp.example.com/.well-known/openid-configuration" /><openid-config url="https://idp2.example.com/.well-known/openid-configuration" /><audiences><audience>a</audience></audiences></validate-jwt>"#,
        // An issuer that is an expression.
        r#"<validate-jwt header-name="Authorization"><openid-config url="https://idp.example.com/.well-known/openid-configuration" /><audiences><audience>a</audience></audiences><issuers><issuer>https://idp.example.com</issuer><issuer>@(context.Variables.GetValueOrDefault&lt;string&gt;("iss"))</issuer></issuers></validate-jwt>"#,
        // A header the backend would have had removed.
        r#"<set-header name="x-user" exists-action="delete" />"#,
        // A subscription key checked for presence only.
        r#"<check-header name="Ocp-Apim-Subscription-Key" failed-check-httpcode="401" failed-check-error-message="no" ignore-case="false" />"#,
        // A wildcard origin APIM refuses with credentials.
        r#"<cors allow-credentials="true"><allowed-origins><origin>*</origin><origin>https://a.example</origin></allowed-origins></cors>"#,
    ] {
        let (_, report) = convert_str(&inbound(body), &[]);
        assert!(report.skipped(), "{body}: {:?}", report.items);
    }
}

#[test]
fn snippets_without_policies() {
    let jwt = r#"<validate-jwt header-name="Authorization"><openid-config url="https://idp.example.com/.well-known/openid-configuration" /><audiences><audience>a</audience></audiences></validate-jwt>"#;
    let ip = r#"<ip-filter action="allow"><address>10.0.0.1</address></ip-filter>"#;
    for xml in [
        jwt.to_string(),
        format!("<inbound>\n{jwt}\n{ip}\n</inbound>"),
        format!("{jwt}\n{ip}"),
        format!("<!-- two policies -->\n{jwt}\n{ip}"),
    ] {
        let (policy, report) = convert_str(&xml, &[]);
        assert!(!report.skipped(), "{xml}: {:?}", report.items);
        assert_eq!(policy["apis"][0]["jwt"]["audiences"], json!(["a"]));
    }
    let (_, report) = convert_str(&format!("{jwt}\n<base />\n{ip}"), &[]);
    assert_eq!(refused(&report), ["base"]);
    assert_eq!(
        report
            .items
            .iter()
            .find(|i| i.element == "base")
            .unwrap()
            .line,
        2
    );
}

#[test]
fn the_clock_skew_is_stated_even_when_it_is_gateguards_default() {
    // APIM's default is 0, gateguard's 60: a reader should not need to know either.
    let xml = inbound(
        r#"<validate-jwt header-name="Authorization" require-scheme="Bearer" clock-skew="60"><openid-config url="https://idp.example.com/.well-known/openid-configuration" /><audiences><audience>a</audience></audiences></validate-jwt>"#,
    );
    let a = args(&[]);
    let (api, report, _) = convert_text(&xml, &a, &NamedValues::default()).unwrap();
    assert!(!report.skipped(), "{:?}", report.items);
    let policy: Value = serde_json::from_str(&render(&api, &a).unwrap()).unwrap();
    let jwt = policy["apis"][0]["jwt"].as_object().unwrap();
    let keys: Vec<&str> = jwt.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "issuers",
            "audiences",
            "algorithms",
            "jwks",
            "clock_skew_seconds"
        ]
    );
    assert_eq!(jwt["clock_skew_seconds"], json!(60));
}

// ---- rate limits, quotas and header rules ----

const KEY_CHECK: &str = r#"<check-header name="Ocp-Apim-Subscription-Key" failed-check-httpcode="401" failed-check-error-message="no" ignore-case="false"><value>k-0123456789</value></check-header>"#;
const HMAC_JWT: &str = r#"<validate-jwt header-name="Authorization" require-scheme="Bearer" output-token-variable-name="jwt">
  <issuer-signing-keys><key>c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA==</key></issuer-signing-keys>
  <audiences><audience>a</audience></audiences><issuers><issuer>http://contoso.com/</issuer></issuers>
</validate-jwt>"#;
const SUBJECT: &str =
    r#"@(context.Request.Headers.GetValueOrDefault("Authorization","").AsJwt()?.Subject)"#;

/// The document of `body`, converted without a refusal.
fn converts(body: &str) -> (Value, Report) {
    let (policy, report) = convert_str(&inbound(body), &[]);
    assert!(!report.skipped(), "{body}: {:?}", report.items);
    (policy, report)
}

/// Why `element` of the document of `body` was not converted.
fn refusal(body: &str, element: &str) -> String {
    let (_, report) = convert_str(&inbound(body), &[]);
    let why = said(&report, Kind::NotConverted, element);
    assert!(!why.is_empty(), "{body}: {:?}", report.items);
    why
}

#[test]
fn rate_limit_counts_per_subscription_key() {
    // The limit before the key check it depends on: settled once the document is read.
    let (policy, report) = converts(&format!(
        r#"<rate-limit calls="20" renewal-period="90" remaining-calls-variable-name="left" />
{KEY_CHECK}"#
    ));
    let api = &policy["apis"][0];
    assert_eq!(
        api["rate_limit"],
        json!({"by": "subscription_key", "calls": 20, "renewal_period_seconds": 90})
    );
    assert!(api.get("quota").is_none());
    assert_eq!(
        said(&report, Kind::Converted, "rate-limit"),
        "rate_limit (20 calls per 90 s by subscription_key)"
    );
    let notes = said(&report, Kind::Note, "rate-limit");
    assert!(
        notes.contains("only once the subscription key is valid"),
        "{notes}"
    );
    assert!(notes.contains("where APIM's slides"), "{notes}");
    assert!(
        notes.contains("each gateway replica counts alone"),
        "{notes}"
    );
    assert!(
        notes.contains("remaining-calls-variable-name: a context variable"),
        "{notes}"
    );
    // Per subscription, two listed keys may be one subscription's two: said.
    assert!(!notes.contains("keys are listed"), "{notes}");
    let two_keys = KEY_CHECK.replace("</value>", "</value><value>k-9876543210</value>");
    let (_, report) = converts(&format!(
        r#"{two_keys}<rate-limit calls="20" renewal-period="90" />"#
    ));
    assert!(said(&report, Kind::Note, "rate-limit").contains(
        "2 keys are listed and gateguard counts each on its own, where APIM counts a \
         subscription's primary and secondary keys together"
    ));
}

#[test]
fn quota_counts_per_subscription_key() {
    let (policy, report) = converts(&format!(
        r#"{KEY_CHECK}<quota calls="10000" renewal-period="604800" />"#
    ));
    assert_eq!(
        policy["apis"][0]["quota"],
        json!({"by": "subscription_key", "calls": 10000, "renewal_period_seconds": 604800})
    );
    assert!(said(&report, Kind::Note, "quota").contains("from the subscription's creation"));
}

#[test]
fn a_limit_per_subscription_needs_the_key_check() {
    for body in [
        r#"<rate-limit calls="20" renewal-period="90" />"#,
        r#"<quota calls="100" renewal-period="3600" />"#,
        r#"<rate-limit-by-key calls="5" renewal-period="60" counter-key="@(context.Subscription.Id)" />"#,
    ] {
        let element = body[1..].split(' ').next().unwrap();
        let why = refusal(
            &format!("{body}\n<ip-filter action=\"allow\"><address>10.0.0.1</address></ip-filter>"),
            element,
        );
        assert!(
            why.starts_with(
                "counted per subscription, and the converted policy checks no subscription key"
            ),
            "{why}"
        );
    }
    // A key check that was itself refused does not count either.
    let (_, report) = convert_str(
        &inbound(
            r#"<check-header name="Ocp-Apim-Subscription-Key">
<value>@(context.Variables["k"])</value></check-header>
<rate-limit calls="20" renewal-period="90" />"#,
        ),
        &[],
    );
    assert_eq!(refused(&report), ["check-header", "value", "rate-limit"]);
}

#[test]
fn rate_limit_by_key_counts_by_client_ip_subscription_or_subject() {
    let (policy, report) = converts(
        r#"<rate-limit-by-key calls="3" renewal-period="60" counter-key="@(context.Request.IpAddress)" increment-count="1" />
<quota-by-key calls="1000" renewal-period="86400" counter-key="@( context.Request.IpAddress )" first-period-start="2024-01-01T00:00:00Z" />"#,
    );
    let api = &policy["apis"][0];
    assert_eq!(
        api["rate_limit"],
        json!({"by": "client_ip", "calls": 3, "renewal_period_seconds": 60})
    );
    assert_eq!(
        api["quota"],
        json!({"by": "client_ip", "calls": 1000, "renewal_period_seconds": 86400})
    );
    let notes = said(&report, Kind::Note, "rate-limit-by-key");
    assert!(
        notes.contains("before any credential, wherever the element stands"),
        "{notes}"
    );
    assert!(notes.contains("an IPv6 client by its /64"), "{notes}");
    assert!(notes.contains("each API counts on its own"), "{notes}");
    assert!(said(&report, Kind::Note, "quota-by-key")
        .contains("where APIM's run from first-period-start (2024-01-01T00:00:00Z)"));

    let (policy, _) = converts(&format!(
        r#"{KEY_CHECK}<rate-limit-by-key calls="10" renewal-period="60" counter-key="@(context.Subscription.Key)" />"#
    ));
    assert_eq!(
        policy["apis"][0]["rate_limit"]["by"],
        json!("subscription_key")
    );

    // The subject of the token in Authorization, or of the one validate-jwt left in its
    // variable; the token's check may come after the limit.
    for key in [SUBJECT, r#"@(((Jwt)context.Variables["jwt"]).Subject)"#] {
        let key = key.replace('"', "&quot;");
        let (policy, report) = converts(&format!(
            r#"<quota-by-key calls="10000" renewal-period="2592000" counter-key="{key}" />
{HMAC_JWT}"#
        ));
        assert_eq!(
            policy["apis"][0]["quota"],
            json!({"by": "subject", "calls": 10000, "renewal_period_seconds": 2592000})
        );
        assert!(said(&report, Kind::Note, "quota-by-key")
            .contains("only once the token is valid, by its iss and sub"));
    }
}

#[test]
fn a_limit_per_subject_needs_the_token_check() {
    let key = SUBJECT.replace('"', "&quot;");
    let why = refusal(
        &format!(
            r#"<rate-limit-by-key calls="10" renewal-period="60" counter-key="{key}" />{KEY_CHECK}"#
        ),
        "rate-limit-by-key",
    );
    assert_eq!(
        why,
        "counted per token subject, and the converted policy has no <validate-jwt>: gateguard \
         counts a subject only once its token is valid"
    );
}

#[test]
fn what_gateguard_does_not_count_is_refused() {
    let ip = "counter-key=\"@(context.Request.IpAddress)\"";
    for (body, element, want) in [
        (
            format!(r#"<rate-limit-by-key calls="10" renewal-period="60" {ip} increment-condition="@(context.Response.StatusCode == 200)" />"#),
            "rate-limit-by-key",
            "increment-condition: gateguard counts every request that reaches the limit, whatever its outcome",
        ),
        (
            format!(r#"<rate-limit-by-key calls="10" renewal-period="60" {ip} increment-count="2" />"#),
            "rate-limit-by-key",
            "increment-count \"2\": gateguard counts one call per request",
        ),
        (
            format!(r#"<quota-by-key calls="10" bandwidth="4000" renewal-period="3600" {ip} />"#),
            "quota-by-key",
            "bandwidth \"4000\": gateguard counts calls, not kilobytes",
        ),
        (
            format!(r#"<quota-by-key bandwidth="4000" renewal-period="3600" {ip} />"#),
            "quota-by-key",
            "bandwidth \"4000\" (a bandwidth-only quota): gateguard counts calls, not kilobytes",
        ),
        (
            format!(r#"<quota-by-key calls="10" renewal-period="0" {ip} />"#),
            "quota-by-key",
            "renewal-period 0 is a quota for the subscription's whole life: gateguard's periods are 1 second to 366 days",
        ),
        (
            r#"<rate-limit-by-key calls="10" renewal-period="60" counter-key="@(context.Request.Headers.GetValueOrDefault(&quot;X-Client-Id&quot;,&quot;&quot;))" />"#.into(),
            "rate-limit-by-key",
            "counter-key \"@(context.Request.Headers.GetValueOrDefault(\\\"X-Client-Id\\\",\\\"\\\"))\": gateguard counts by subscription",
        ),
        (
            r#"<rate-limit-by-key calls="10" renewal-period="60" />"#.into(),
            "rate-limit-by-key",
            "no counter-key",
        ),
        (
            format!(r#"<rate-limit-by-key calls="@(int.Parse(&quot;10&quot;))" renewal-period="60" {ip} />"#),
            "rate-limit-by-key",
            "calls is a policy expression (gateguard does not evaluate expressions)",
        ),
        (
            format!(r#"<rate-limit-by-key calls="ten" renewal-period="60" {ip} />"#),
            "rate-limit-by-key",
            "calls \"ten\" is not a whole number",
        ),
        (
            format!(r#"<rate-limit-by-key calls="0" renewal-period="60" {ip} />"#),
            "rate-limit-by-key",
            "gateguard refuses it: rate_limit.calls: must be 1 to 1000000000",
        ),
        (
            format!(r#"<rate-limit-by-key calls="10" renewal-period="60" {ip} retry-after-mode="x" />"#),
            "rate-limit-by-key",
            "unknown attribute retry-after-mode: what it changes would be lost",
        ),
        (
            format!(r#"{KEY_CHECK}<rate-limit calls="100" renewal-period="60"><api name="orders" calls="10" renewal-period="60" /></rate-limit>"#),
            "rate-limit",
            "<api> on line 3: a limit for one API or operation of a product; gateguard limits the whole API",
        ),
        (
            format!(r#"{KEY_CHECK}<quota calls="100" renewal-period="3600"><api name="orders" calls="10" /></quota>"#),
            "quota",
            "<api> on line 3: a limit for one API or operation of a product",
        ),
        // Two rate limits (or two quotas): gateguard has one of each.
        (
            format!(r#"{KEY_CHECK}<rate-limit calls="100" renewal-period="60" />
<rate-limit-by-key calls="10" renewal-period="60" {ip} />"#),
            "rate-limit-by-key",
            "a second rate limit (the first is <rate-limit> on line 3): gateguard has one rate limit per API",
        ),
        (
            format!(r#"<quota-by-key calls="10" renewal-period="3600" {ip} />
<quota-by-key calls="10" renewal-period="3600" counter-key="@(context.Subscription.Id)" />{KEY_CHECK}"#),
            "quota-by-key",
            "a second quota (the first is <quota-by-key> on line 3): gateguard has one quota per API",
        ),
    ] {
        let why = refusal(&body, element);
        assert!(why.starts_with(want), "{body}\n{why}");
    }
    // Two rate-limit-by-key with different keys: the second is refused, the first converts.
    let (_, report) = convert_str(
        &inbound(&format!(
            r#"<rate-limit-by-key calls="10" renewal-period="60" {ip} />
<rate-limit-by-key calls="10" renewal-period="60" counter-key="{}" />{HMAC_JWT}"#,
            SUBJECT.replace('"', "&quot;")
        )),
        &[],
    );
    assert_eq!(refused(&report), ["rate-limit-by-key"]);
    assert_eq!(
        report
            .items
            .iter()
            .find(|i| i.kind == Kind::NotConverted)
            .unwrap()
            .line,
        4
    );
}

#[test]
fn response_headers_apim_names_are_noted() {
    let (_, report) = converts(
        r#"<rate-limit-by-key calls="10" renewal-period="60" counter-key="@(context.Request.IpAddress)" retry-after-header-name="Retry-After" remaining-calls-header-name="X-RateLimit-Remaining" total-calls-header-name="X-Calls-Total" retry-after-variable-name="wait" />"#,
    );
    let notes = said(&report, Kind::Note, "rate-limit-by-key");
    // The names gateguard sends anyway need no word.
    assert!(!notes.contains("retry-after-header-name"), "{notes}");
    assert!(!notes.contains("remaining-calls-header-name"), "{notes}");
    assert!(notes.contains("total-calls-header-name \"X-Calls-Total\": gateguard does not send it; it sends the limit as x-ratelimit-limit"), "{notes}");
    assert!(
        notes.contains("retry-after-variable-name: a context variable"),
        "{notes}"
    );
}

#[test]
fn limits_can_still_be_left_to_envoy() {
    let xml = inbound(
        r#"<rate-limit-by-key calls="10" renewal-period="60" counter-key="@(context.Request.Headers.GetValueOrDefault(&quot;X-Client&quot;,&quot;&quot;))" />
<ip-filter action="allow"><address>10.0.0.1</address></ip-filter>"#,
    );
    let (policy, report) = convert_str(&xml, &["--skip", "rate-limit-by-key"]);
    assert!(!report.skipped(), "{:?}", report.items);
    assert!(policy["apis"][0].get("rate_limit").is_none());
    let left = said(&report, Kind::LeftOut, "rate-limit-by-key");
    assert!(
        left.starts_with("--skip rate-limit-by-key: the limit is left to Envoy"),
        "{left}"
    );
    // A single limit is a document of its own.
    let (policy, report) = convert_str(
        r#"<rate-limit-by-key calls="3" renewal-period="60" counter-key="@(context.Request.IpAddress)" />"#,
        &[],
    );
    assert!(!report.skipped(), "{:?}", report.items);
    assert_eq!(policy["apis"][0]["rate_limit"]["calls"], json!(3));
}

/// The compiled header rules of a converted policy.
fn header_rules(policy: &Value) -> gateguard_core::header_rules::HeaderRules {
    let cfg: gateguard_core::header_rules::HeaderRulesConfig =
        serde_json::from_value(policy["apis"][0]["headers"].clone()).unwrap();
    gateguard_core::header_rules::HeaderRules::compile(&cfg, "headers", &[]).unwrap()
}

fn with_header(name: &str, value: &str) -> Vec<(String, String)> {
    vec![(name.to_string(), value.to_string())]
}

#[test]
fn check_header_on_another_header_is_a_header_rule() {
    let (policy, report) = converts(
        r#"<check-header name="X-Api-Version" failed-check-httpcode="400" failed-check-error-message="Bad version" ignore-case="false">
  <value>2024-01-01</value><value>v1.0+beta</value><value>2024-01-01</value>
</check-header>
<check-header name="Accept" failed-check-httpcode="406" failed-check-error-message="JSON only" ignore-case="true"><value>application/json</value></check-header>
<check-header name="X-Correlation-Id" failed-check-httpcode="400" failed-check-error-message="missing" ignore-case="false" />"#,
    );
    assert_eq!(
        policy["apis"][0]["headers"],
        json!({
            "required": ["X-Api-Version", "Accept", "X-Correlation-Id"],
            "patterns": {
                "Accept": "(?i)application/json",
                "X-Api-Version": "2024\\-01\\-01|v1\\.0\\+beta"
            }
        })
    );
    let rules = header_rules(&policy);
    let ok = |h: &[(&str, &str)]| {
        let mut all = vec![
            ("x-api-version".to_string(), "2024-01-01".to_string()),
            ("accept".to_string(), "application/json".to_string()),
            ("x-correlation-id".to_string(), "c".to_string()),
        ];
        for (k, v) in h {
            all.retain(|(n, _)| n != k);
            all.push((k.to_string(), v.to_string()));
        }
        rules.check(&all).map_err(|e| e.message())
    };
    assert_eq!(ok(&[]), Ok(()));
    assert_eq!(ok(&[("x-api-version", "v1.0+beta")]), Ok(()));
    assert_eq!(ok(&[("accept", "Application/JSON")]), Ok(()));
    // The values are literal: `.` and `+` are not operators; the whole value must match.
    for bad in [
        "v1x0+beta",
        "v1.00beta",
        "2024-01-01,v1.0+beta",
        "2024-01-0",
        "V1.0+BETA",
    ] {
        assert_eq!(
            ok(&[("x-api-version", bad)]),
            Err("Bad request: header x-api-version is invalid".into()),
            "{bad}"
        );
    }
    assert_eq!(
        rules.check(&with_header("accept", "application/json")),
        Err(gateguard_core::header_rules::HeaderError::Missing(
            "x-api-version".into()
        ))
    );
    let converted = said(&report, Kind::Converted, "check-header");
    assert!(
        converted
            .contains("headers.required and headers.patterns: X-Api-Version, 2 accepted values"),
        "{converted}"
    );
    assert!(
        converted.contains("headers.required: X-Correlation-Id"),
        "{converted}"
    );
    let notes = said(&report, Kind::Note, "check-header");
    assert!(
        notes.contains("failed-check-httpcode 406: gateguard answers 400"),
        "{notes}"
    );
    assert!(!notes.contains("failed-check-httpcode 400"), "{notes}");
    assert!(notes.contains("failed-check-error-message: gateguard answers with its own messages, \"Bad request: header accept is missing\" or \"... is invalid\""), "{notes}");
}

#[test]
fn check_header_that_cannot_be_a_header_rule_is_refused() {
    for (body, want) in [
        (
            r#"<check-header name="X-A" ignore-case="false"><value>a</value></check-header>
<check-header name="x-a" ignore-case="false"><value>b</value></check-header>"#,
            "a second <check-header> on x-a: APIM requires the value to pass both; merge them into one",
        ),
        (
            r#"<check-header name="X-A" ignore-case="maybe"><value>a</value></check-header>"#,
            "ignore-case \"maybe\" is not true or false",
        ),
        (
            r#"<check-header name="X A" ignore-case="false" />"#,
            "gateguard refuses it: headers.required[0]: \"X A\" is not a header name",
        ),
        (
            r#"<check-header name="X-A" ignore-case="false"><value>@(context.Variables["v"])</value></check-header>"#,
            "not converted, as a part of it was not: <value> line 3",
        ),
    ] {
        let why = refusal(body, "check-header");
        assert!(why.contains(want), "{body}\n{why}");
    }
}

#[test]
fn a_header_value_from_a_named_value_makes_the_file_owner_only() {
    let xml = inbound(
        r#"<check-header name="X-Partner-Secret" failed-check-httpcode="401" failed-check-error-message="no" ignore-case="false"><value>{{partner-secret}}</value></check-header>"#,
    );
    let a = args(&[]);
    let values = NamedValues::parse(r#"{"partner-secret": "p4rtner-s3cret"}"#).unwrap();
    let (api, report, masker) = convert_text(&xml, &a, &values).unwrap();
    assert!(!report.skipped(), "{:?}", report.items);
    assert!(api.may_hold_secret);
    assert_eq!(
        api.headers.as_ref().unwrap().patterns["X-Partner-Secret"],
        "p4rtner\\-s3cret"
    );
    let notes: Vec<String> = report.items.iter().map(|i| masker.mask(&i.text)).collect();
    let notes = notes.join("\n");
    assert!(notes.contains("{{partner-secret}} written into headers.patterns as it is (the file is made owner-only)"), "{notes}");
    assert!(!notes.contains("s3cret"), "{notes}");
    // A fixed Authorization value is a credential, wherever it comes from.
    let (api, report, _) = convert_text(
        &inbound(r#"<check-header name="Authorization" failed-check-httpcode="401" failed-check-error-message="no" ignore-case="false"><value>Basic dXNlcjpwYXNz</value></check-header>"#),
        &a,
        &values,
    )
    .unwrap();
    assert!(api.may_hold_secret);
    assert!(said(&report, Kind::Note, "check-header")
        .contains("the Authorization value written into headers.patterns as it is"));
    // A literal value in the document is no secret of the named values.
    let (api, _, _) = convert_text(
        &inbound(
            r#"<check-header name="X-A" ignore-case="false"><value>abc</value></check-header>"#,
        ),
        &a,
        &values,
    )
    .unwrap();
    assert!(!api.may_hold_secret);
}
