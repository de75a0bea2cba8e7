//! `gateguard import-apim`: an Azure API Management policy document (`<policies>` XML, as the
//! portal's code editor or an export shows it, a `<fragment>`, or a bare snippet of inbound
//! policies) turned into a gateguard policy with one API.
//!
//! Fail closed: the importer never writes a policy less strict than its input (but for how a
//! limit counts, which each limit's note states: docs/operations.md). Converted: `<cors>`,
//! `<ip-filter>`, `<validate-jwt>`, `<check-header>` (on the subscription-key header, and as a
//! header rule on any other), the client-certificate `<choose>` pattern and
//! `<validate-client-certificate>`, `<set-header>` on the request, and `<rate-limit>`,
//! `<rate-limit-by-key>`, `<quota>` and `<quota-by-key>` counted by subscription, client IP or
//! token subject. Any other `<inbound>` policy, any of those it cannot express exactly, and any
//! `{{named value}}` or `${placeholder}` without a value make the command write nothing and
//! exit 3, listing each with its line and why. A few inbound policies that decide nothing about
//! admission (logging, the backend's address) and everything outside `<inbound>` are listed as
//! left out. Policy expressions (`@(...)`) are never evaluated: the certificate condition and a
//! limit's counter-key are recognised by their shape. Secrets never reach a message:
//! subscription keys are hashed, HMAC keys and named-value headers become `{"env": ...}`
//! references, and the values `--named-values` fills in are masked. Each element converts in a
//! module of its own into the filter's raw config type, kept only once the filter's compiler
//! accepts it.

mod client_cert;
mod cors;
mod header_rules;
mod inbound;
mod ip_filter;
mod jwt;
mod limits;
mod named_values;
mod report;
mod set_header;
mod subscription_key;
mod xml;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use gateguard_core::client_cert::ClientCertConfig;
use gateguard_core::config::ApiConfig;
use gateguard_core::cors::CorsConfig;
use gateguard_core::header_rules::HeaderRulesConfig;
use gateguard_core::ip_filter::IpFilterConfig;
use gateguard_core::jwt::JwtConfig;
use gateguard_core::rate_limit::CallLimitConfig;
use gateguard_core::subscription_key::SubscriptionKeyConfig;
use gateguard_core::value::ValueSource;
use gateguard_core::ConfigError;
use roxmltree::{Document, Node};
use serde_json::Value;

use crate::import::{self, Failure};
use named_values::{Masker, NamedValues};
use report::{El, Report};
use xml::elements;

/// The inbound policies this command converts; `--skip` cannot leave them out, except the
/// [`LIMITS`].
const CONVERTED: [&str; 11] = [
    "cors",
    "ip-filter",
    "validate-jwt",
    "check-header",
    "choose",
    "validate-client-certificate",
    "set-header",
    "rate-limit",
    "rate-limit-by-key",
    "quota",
    "quota-by-key",
];

/// Rate limits and quotas: converted, but `--skip` may still leave them out, for Envoy's own
/// rate limiting to enforce (a limit shared by several gateway replicas, where gateguard's
/// counters are each replica's own).
const LIMITS: [&str; 4] = ["rate-limit", "rate-limit-by-key", "quota", "quota-by-key"];

#[derive(clap::Args)]
pub struct Args {
    /// The APIM policy document: `<policies><inbound>...</inbound>...</policies>` (API,
    /// product or operation scope), a `<fragment>`, or a snippet of inbound policies.
    #[arg(value_name = "POLICY.XML")]
    input: PathBuf,
    /// Write the gateguard policy here instead of standard output (atomically; on failure an
    /// existing file is left as it was).
    #[arg(long, short, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Name of the API in the policy (stats and logs use it).
    #[arg(long, default_value = "api", value_name = "NAME")]
    name: String,
    /// Path prefix the API owns (`/` for everything).
    #[arg(long, default_value = "/", value_name = "PREFIX")]
    path_prefix: String,
    /// Envoy cluster through which the `<openid-config>` URL is fetched (`gateguard render`
    /// defines it).
    #[arg(long, default_value = "idp", value_name = "NAME")]
    jwks_cluster: String,
    /// Accepted token issuer, added to `<issuers>`; needed when the document has none and the
    /// issuer cannot be derived from `<openid-config>` (e.g. an Entra tenant given by domain
    /// name). Repeatable.
    #[arg(long, value_name = "ISS")]
    issuer: Vec<String>,
    /// Accepted token audience, added to `<audiences>`; gateguard requires at least one, APIM
    /// does not. Repeatable.
    #[arg(long, value_name = "AUD")]
    audience: Vec<String>,
    /// The values of the document's named values (`{{name}}`) and template placeholders
    /// (`${name}`): a JSON object {"name": "value", ...}. Values never appear in messages. A
    /// `<set-header>` value that is exactly `{{name}}` becomes an environment variable instead.
    #[arg(long, value_name = "FILE")]
    named_values: Option<PathBuf>,
    /// Leave out every inbound `<ELEMENT>` gateguard does not convert, accepting that the
    /// policy does not enforce it: `--skip base` when the enclosing scopes (product, global)
    /// hold no security policy. Also leaves out rate limits and quotas, which gateguard converts,
    /// when Envoy limits the rate instead (`--skip rate-limit`: across replicas, say).
    /// Repeatable; not for the other elements gateguard converts.
    #[arg(long, value_name = "ELEMENT")]
    skip: Vec<String>,
    /// Accept that gateguard does not check certificate revocation (APIM's
    /// validate-revocation, the default, and Verify()): a revoked certificate stays accepted
    /// until its thumbprint is removed from the policy.
    #[arg(long)]
    no_revocation_check: bool,
}

pub fn run(args: &Args) -> ExitCode {
    import::exit_status("import-apim", import(args))
}

/// Converts, and writes only when everything converted; the report goes to standard error
/// either way.
fn import(args: &Args) -> Result<(), Failure> {
    let input = &args.input;
    let unskippable =
        |s: &&String| CONVERTED.contains(&s.as_str()) && !LIMITS.contains(&s.as_str());
    if let Some(name) = args.skip.iter().find(unskippable) {
        return Err(
            format!("--skip {name}: gateguard converts <{name}>; it cannot be left out").into(),
        );
    }
    let named = match &args.named_values {
        Some(path) => NamedValues::read(path)?,
        None => NamedValues::default(),
    };
    let text = import::read_text(input)?;
    let converted = convert_text(&text, args, &named);
    let (api, report, masker) = converted.map_err(|e| format!("{}: {e}", input.display()))?;
    if let Err(why) = writable(&api, &report, args) {
        report.print(&masker, input, None);
        return Err(Failure::NotConverted(why));
    }
    let policy = render(&api, args)?;
    let mask = |text: &str| masker.mask(text);
    import::compile_and_write(&policy, args.out.as_ref(), api.may_hold_secret, &mask)?;
    report.print(&masker, input, Some(&import::target(args.out.as_ref())));
    Ok(())
}

/// Why the conversion must not be written: something was not converted, or nothing was.
fn writable(api: &Api, report: &Report, args: &Args) -> Result<(), String> {
    let input = args.input.display();
    if report.skipped() {
        let kept = args
            .out
            .as_ref()
            .map(|p| format!(" ({} left as it was)", p.display()))
            .unwrap_or_default();
        return Err(format!(
            "{input}: not converted, so no policy was written{kept}"
        ));
    }
    if !api.has_check() {
        return Err(format!(
            "{input}: no check to convert: the policy would admit every request, so none was \
             written"
        ));
    }
    Ok(())
}

/// The converted API: the filter's own raw types, each block accepted by its compiler.
#[derive(Default)]
struct Api {
    cors: Option<CorsConfig>,
    ip_allow: Option<Vec<String>>,
    ip_deny: Vec<String>,
    client_certificate: Option<ClientCertConfig>,
    subscription_key: Option<SubscriptionKeyConfig>,
    jwt: Option<JwtConfig>,
    inject_headers: BTreeMap<String, ValueSource>,
    headers: Option<HeaderRulesConfig>,
    rate_limit: Option<CallLimitConfig>,
    quota: Option<CallLimitConfig>,
    /// A `{"value": ...}` header, or a header pattern that may be a secret (a named value's, a
    /// fixed Authorization value), was written: the file may hold a secret.
    may_hold_secret: bool,
}

impl Api {
    /// Whether the policy refuses anything at all.
    fn has_check(&self) -> bool {
        self.cors.is_some()
            || self.ip_allow.is_some()
            || !self.ip_deny.is_empty()
            || self.client_certificate.is_some()
            || self.subscription_key.is_some()
            || self.jwt.is_some()
            || self.headers.is_some()
            || self.rate_limit.is_some()
            || self.quota.is_some()
    }

    fn config(&self, args: &Args) -> ApiConfig {
        let ip_filter =
            (self.ip_allow.is_some() || !self.ip_deny.is_empty()).then(|| IpFilterConfig {
                allow: self.ip_allow.clone(),
                deny: (!self.ip_deny.is_empty()).then(|| self.ip_deny.clone()),
            });
        ApiConfig {
            name: args.name.clone(),
            path_prefix: args.path_prefix.clone(),
            cors: self.cors.clone(),
            ip_filter,
            client_certificate: self.client_certificate.clone(),
            subscription_key: self.subscription_key.clone(),
            jwt: self.jwt.clone(),
            replay: None,
            inject_headers: self.inject_headers.clone(),
            headers: self.headers.clone(),
            rate_limit: self.rate_limit.clone(),
            quota: self.quota.clone(),
            ..ApiConfig::default()
        }
    }
}

/// The policy document, pretty-printed. APIM's default clock skew (0 seconds) is not
/// gateguard's (60), so the policy states the skew it converted even when it is gateguard's
/// default, which serialisation leaves out.
fn render(api: &Api, args: &Args) -> Result<String, Failure> {
    let policy = import::policy(vec![api.config(args)]);
    let mut document =
        serde_json::to_value(&policy).map_err(|e| format!("cannot serialise the policy: {e}"))?;
    let jwt = document
        .pointer_mut("/apis/0/jwt")
        .and_then(Value::as_object_mut);
    if let (Some(jwt), Some(converted)) = (jwt, &api.jwt) {
        if !jwt.contains_key("clock_skew_seconds") {
            let after = ["jwks", "algorithms"]
                .iter()
                .find_map(|key| jwt.keys().position(|k| k == key))
                .map_or(0, |at| at + 1);
            let skew = converted.clock_skew_seconds.into();
            jwt.shift_insert(after, "clock_skew_seconds".into(), skew);
        }
    }
    import::to_text(&document)
}

/// Parses the document (repairing the raw form the portal editor shows, see
/// `xml::parse_document`, and wrapping a snippet of several policies in `<inbound>`), fills in
/// the named values, and converts it.
fn convert_text(
    text: &str,
    args: &Args,
    named: &NamedValues,
) -> Result<(Api, Report, Masker), String> {
    let parsed = xml::parse_document(text)?;
    let doc = Document::parse(&parsed).map_err(|e| format!("not well-formed XML: {e}"))?;
    let (filled, masker) =
        named_values::substitute(&parsed, &doc, named, &xml::is_env_header_value);
    let doc = Document::parse(&filled).map_err(|e| {
        masker.mask(&format!(
            "not well-formed XML once named values are filled in: {e}"
        ))
    })?;
    let (api, report) = convert(&doc, args, named, &masker)?;
    Ok((api, report, masker))
}

fn convert(
    doc: &Document,
    args: &Args,
    named: &NamedValues,
    masker: &Masker,
) -> Result<(Api, Report), String> {
    let root = doc.root_element();
    let mut cx = Cx {
        doc,
        args,
        named,
        masker,
        api: Api::default(),
        report: Report::default(),
        limits: Vec::new(),
    };
    let name = root.tag_name().name();
    match name {
        "policies" => {
            for section in elements(root) {
                let s = El::of(doc, section);
                match s.name.as_str() {
                    "inbound" => elements(section).for_each(|n| cx.inbound(n)),
                    "backend" | "outbound" | "on-error" => {
                        elements(section).for_each(|n| cx.other_section(n, &s.name))
                    }
                    _ => cx.report.skip(&s, "unknown policy section"),
                }
            }
        }
        "fragment" | "inbound" => {
            cx.report.note(
                &El::of(doc, root),
                format!("<{name}>: its policies are converted as the API's <inbound>"),
            );
            elements(root).for_each(|n| cx.inbound(n));
        }
        _ if CONVERTED.contains(&name) => {
            cx.report.note(
                &El::of(doc, root),
                "a single policy: converted as the API's <inbound>",
            );
            cx.inbound(root);
        }
        other => {
            return Err(format!(
                "expected an API Management policy document (<policies>, <fragment> or inbound \
                 policies), found <{other}>"
            ))
        }
    }
    // A limit counted by a credential needs that credential's check, wherever it stands.
    cx.settle_limits();
    Ok((cx.api, cx.report))
}

/// The conversion under way: the document, what has been converted, and what was found.
struct Cx<'d, 'i> {
    doc: &'d Document<'i>,
    args: &'d Args,
    named: &'d NamedValues,
    /// The values filled in from `--named-values`, to tell what came from one.
    masker: &'d Masker,
    api: Api,
    report: Report,
    /// Rate limits and quotas read so far, settled once the whole document is read.
    limits: Vec<limits::Limit>,
}

impl Cx<'_, '_> {
    fn el(&self, node: Node) -> El {
        El::of(self.doc, node)
    }

    /// `block`, once the filter's compiler accepts it; otherwise why not, reported against `e`.
    fn compiled<T, P>(
        &mut self,
        e: &El,
        block: T,
        compile: impl FnOnce(&T) -> Result<P, ConfigError>,
    ) -> Option<T> {
        match compile(&block) {
            Ok(_) => Some(block),
            Err(reason) => {
                self.report
                    .skip(e, format!("gateguard refuses it: {reason}"));
                None
            }
        }
    }
}
