//! `gateguard import-apim`: an Azure API Management policy document (`<policies>` XML, as the
//! portal's code editor or an export shows it, a `<fragment>`, or a bare snippet of inbound
//! policies) turned into a gateguard policy with one API.
//!
//! Fail closed: the importer never writes a policy less strict than its input. Converted:
//! `<cors>`, `<ip-filter>`, `<validate-jwt>`, `<check-header>` on the subscription-key header,
//! the client-certificate `<choose>` pattern and `<validate-client-certificate>`, and
//! `<set-header>` on the request. Any other `<inbound>` policy, any of those it cannot express
//! exactly, and any `{{named value}}` or `${placeholder}` without a value make the command
//! write nothing and exit 3, listing each with its line and why. A few inbound policies that
//! decide nothing about admission (logging, the backend's address) and everything outside
//! `<inbound>` are listed as left out. Policy expressions (`@(...)`) are never evaluated: the
//! certificate condition is recognised by its shape. Secrets never reach a message: subscription
//! keys are hashed, HMAC keys and named-value headers become `{"env": ...}` references, and the
//! values `--named-values` fills in are masked.

mod named_values;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use roxmltree::{Document, Node};
use serde_json::{json, Map, Value};

use named_values::{Masker, NamedValues};

const DISCOVERY_SUFFIX: &str = "/.well-known/openid-configuration";
const HMAC_VAR: &str = "GATEGUARD_JWT_HMAC_SECRET";
const SUBSCRIPTION_HEADER: &str = "Ocp-Apim-Subscription-Key";
const MAX_SKEW: u64 = 600;
const MAX_AGE: u64 = 86_400;
/// gateguard's rule for `jwt.hmac_secret` (RFC 7518 §3.2).
const MIN_HMAC_BYTES: usize = 32;
/// Exit status when something could not be converted: nothing was written.
const NOT_CONVERTED: u8 = 3;

/// The inbound policies this command converts; `--skip` cannot leave them out.
const CONVERTED: [&str; 7] = [
    "cors",
    "ip-filter",
    "validate-jwt",
    "check-header",
    "choose",
    "validate-client-certificate",
    "set-header",
];

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
    /// hold no security policy, `--skip rate-limit` when Envoy limits the rate. Repeatable; not
    /// for the elements gateguard converts.
    #[arg(long, value_name = "ELEMENT")]
    skip: Vec<String>,
    /// Accept that gateguard does not check certificate revocation (APIM's
    /// validate-revocation, the default, and Verify()): a revoked certificate stays accepted
    /// until its thumbprint is removed from the policy.
    #[arg(long)]
    no_revocation_check: bool,
}

/// A failure, with the process exit code: 2 for file I/O, 1 for invalid input or flags, 3 when
/// something could not be converted.
struct Failure(u8, String);

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure(1, message)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Converted,
    Note,
    /// Could not be converted exactly: nothing is written.
    NotConverted,
    /// Not converted, and it does not weaken the policy (or `--skip` accepted it).
    LeftOut,
    Env,
}

#[derive(Debug, Clone)]
struct Item {
    line: u32,
    kind: Kind,
    element: String,
    text: String,
}

/// What happened to each element, in document order.
#[derive(Default)]
struct Report {
    items: Vec<Item>,
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
    fn converted(&mut self, n: &El, text: impl Into<String>) {
        self.push(n.line, Kind::Converted, &n.name, text);
    }
    fn note(&mut self, n: &El, text: impl Into<String>) {
        self.push(n.line, Kind::Note, &n.name, text);
    }
    fn skip(&mut self, n: &El, text: impl Into<String>) {
        self.push(n.line, Kind::NotConverted, &n.name, text);
    }
    fn left_out(&mut self, n: &El, text: impl Into<String>) {
        self.push(n.line, Kind::LeftOut, &n.name, text);
    }
    fn env(&mut self, n: &El, text: impl Into<String>) {
        self.push(n.line, Kind::Env, &n.name, text);
    }
    fn skipped(&self) -> bool {
        self.items.iter().any(|i| i.kind == Kind::NotConverted)
    }
}

/// An element's name and line, for the report.
struct El {
    name: String,
    line: u32,
}

fn el(doc: &Document, node: Node) -> El {
    El {
        name: node.tag_name().name().to_string(),
        line: doc.text_pos_at(node.range().start).row,
    }
}

pub fn run(args: &Args) -> ExitCode {
    match import(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, message)) => {
            eprintln!("gateguard import-apim: error: {message}");
            ExitCode::from(code)
        }
    }
}

/// Converts, and writes only when everything converted; the report goes to standard error
/// either way.
fn import(args: &Args) -> Result<(), Failure> {
    let input = &args.input;
    if let Some(name) = args.skip.iter().find(|s| CONVERTED.contains(&s.as_str())) {
        return Err(
            format!("--skip {name}: gateguard converts <{name}>; it cannot be left out").into(),
        );
    }
    let named = match &args.named_values {
        Some(path) => NamedValues::read(path).map_err(|(code, e)| Failure(code, e))?,
        None => NamedValues::default(),
    };
    let text = std::fs::read_to_string(input)
        .map_err(|e| Failure(2, format!("{}: cannot read: {e}", input.display())))?;
    let converted = convert_text(&text, args, &named);
    let (api, report, masker) = converted.map_err(|e| format!("{}: {e}", input.display()))?;
    if report.skipped() {
        print_report(&report, &masker, input, None);
        return Err(Failure(
            NOT_CONVERTED,
            format!(
                "{}: not converted, so no policy was written{}",
                input.display(),
                args.out
                    .as_ref()
                    .map(|p| format!(" ({} left as it was)", p.display()))
                    .unwrap_or_default()
            ),
        ));
    }
    if !api.has_check() {
        print_report(&report, &masker, input, None);
        return Err(Failure(
            NOT_CONVERTED,
            format!(
                "{}: no check to convert: the policy would admit every request, so none was \
                 written",
                input.display()
            ),
        ));
    }
    let policy = render(&api, args)?;
    if let Err(e) = gateguard_core::parse_policy(policy.as_bytes(), &|_| Some("x".repeat(40))) {
        let e = masker.mask(&e.to_string());
        return Err(format!("the generated policy does not validate: {e}").into());
    }
    match &args.out {
        Some(path) => crate::output::write_policy(path, &policy, api.literal_headers)
            .map_err(|e| Failure(2, format!("{}: cannot write: {e}", path.display())))?,
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(policy.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(|e| Failure(2, format!("cannot write to standard output: {e}")))?;
        }
    }
    let target = args.out.as_ref().map_or_else(
        || "standard output".to_string(),
        |p| p.display().to_string(),
    );
    print_report(&report, &masker, input, Some(&target));
    Ok(())
}

/// The converted API's blocks, each already accepted by the filter's compiler on its own.
#[derive(Default)]
struct Api {
    cors: Option<Value>,
    ip_allow: Option<Vec<String>>,
    ip_deny: Vec<String>,
    client_certificate: Option<Value>,
    subscription_key: Option<Value>,
    jwt: Option<Value>,
    inject_headers: Map<String, Value>,
    /// A `{"value": ...}` header was written: the file may hold a secret.
    literal_headers: bool,
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
    }
}

/// Parses the document (repairing the raw form the portal editor shows, see
/// [`escape_expressions`], and wrapping a snippet of several policies in `<inbound>`), fills in
/// the named values, and converts it.
fn convert_text(
    text: &str,
    args: &Args,
    named: &NamedValues,
) -> Result<(Api, Report, Masker), String> {
    let parsed = parse_document(text)?;
    let doc = Document::parse(&parsed).map_err(|e| format!("not well-formed XML: {e}"))?;
    let (filled, masker) = named_values::substitute(&parsed, &doc, named, &is_env_header_value);
    let doc = Document::parse(&filled).map_err(|e| {
        masker.mask(&format!(
            "not well-formed XML once named values are filled in: {e}"
        ))
    })?;
    let (api, report) = convert(&doc, args, named)?;
    Ok((api, report, masker))
}

/// The text that parses: as it is, with raw expressions escaped, or (a snippet of several
/// policies) wrapped in `<inbound>` on its first line, so line numbers hold.
fn parse_document(text: &str) -> Result<String, String> {
    let first = match Document::parse(text) {
        Ok(_) => return Ok(text.to_string()),
        Err(e) => e,
    };
    let escaped = escape_expressions(text);
    let mut candidates = vec![escaped.clone()];
    let trimmed = text.trim_start();
    if trimmed.starts_with('<') && !trimmed.starts_with("<?") && !trimmed.starts_with("<!DOCTYPE") {
        candidates.push(format!("<inbound>{text}</inbound>"));
        candidates.push(format!("<inbound>{escaped}</inbound>"));
    }
    candidates
        .into_iter()
        .find(|c| Document::parse(c).is_ok())
        .ok_or_else(|| format!("not well-formed XML: {first}"))
}

/// A `<set-header>` value that is exactly `{{name}}`: it becomes `{"env": NAME}` (the value,
/// usually a secret, is set in Envoy's environment), so it is neither filled in nor missing.
fn is_env_header_value(node: Node) -> bool {
    node.is_text()
        && named_value(node.text().unwrap_or_default()).is_some()
        && node.parent().is_some_and(|v| {
            v.has_tag_name("value") && v.parent().is_some_and(|h| h.has_tag_name("set-header"))
        })
}

fn convert(doc: &Document, args: &Args, named: &NamedValues) -> Result<(Api, Report), String> {
    let root = doc.root_element();
    let mut cx = Cx {
        doc,
        args,
        named,
        api: Api::default(),
        report: Report::default(),
    };
    let name = root.tag_name().name();
    match name {
        "policies" => {
            for section in elements(root) {
                let s = el(doc, section);
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
                &el(doc, root),
                format!("<{name}>: its policies are converted as the API's <inbound>"),
            );
            elements(root).for_each(|n| cx.inbound(n));
        }
        _ if CONVERTED.contains(&name) => {
            cx.report.note(
                &el(doc, root),
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
    Ok((cx.api, cx.report))
}

fn elements<'a, 'i>(node: Node<'a, 'i>) -> impl Iterator<Item = Node<'a, 'i>> {
    node.children().filter(Node::is_element)
}

fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    elements(node).find(|n| n.tag_name().name() == name)
}

fn text_of(node: Node) -> String {
    node.text().unwrap_or("").trim().to_string()
}

/// A value gateguard can use as it is: not a policy expression, no placeholder left.
fn literal(value: &str) -> Result<String, String> {
    let v = value.trim();
    if v.starts_with("@(") || v.starts_with("@{") {
        return Err("is a policy expression (gateguard does not evaluate expressions)".into());
    }
    if let Some(p) = named_values::find(v).first() {
        return Err(format!("holds {}, which has no value", p.text));
    }
    Ok(v.to_string())
}

/// `{{name}}` alone: the named value's name.
fn named_value(value: &str) -> Option<&str> {
    let inner = value.trim().strip_prefix("{{")?.strip_suffix("}}")?.trim();
    let ok = !inner.is_empty()
        && inner
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    ok.then_some(inner)
}

/// The environment variable that stands for a named value: upper case, `_` for anything else.
fn env_var(named: &str) -> String {
    let mut var: String = named
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if var.starts_with(|c: char| c.is_ascii_digit()) {
        var.insert(0, '_');
    }
    var
}

fn parse_bool(value: Option<&str>, default: bool) -> Result<bool, String> {
    match value.map(str::trim) {
        None => Ok(default),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(v) => Err(format!(
            "{v:?} is not true or false (policy expressions are not evaluated)"
        )),
    }
}

/// Compiles one block in an otherwise empty policy with the filter's own code.
fn check_block(key: &str, block: &Value) -> Result<(), String> {
    let doc = json!({ "apis": [ { "name": "api", "path_prefix": "/", key: block } ] });
    let text = serde_json::to_vec(&doc).map_err(|e| e.to_string())?;
    gateguard_core::parse_policy(&text, &|_| Some("x".repeat(40)))
        .map(|_| ())
        .map_err(|e| {
            let e = e.to_string();
            e.strip_prefix("apis[0].").unwrap_or(&e).to_string()
        })
}

/// The children each converted policy may have; anything else could be a check the
/// conversion would drop.
fn known_children(policy: &str) -> &'static [&'static str] {
    match policy {
        "cors" => &[
            "allowed-origins",
            "allowed-methods",
            "allowed-headers",
            "expose-headers",
        ],
        "ip-filter" => &["address", "address-range"],
        "validate-jwt" => &[
            "openid-config",
            "issuer-signing-keys",
            "decryption-keys",
            "audiences",
            "issuers",
            "required-claims",
        ],
        "check-header" | "set-header" => &["value"],
        "choose" => &["when", "otherwise"],
        "validate-client-certificate" => &["identities"],
        _ => &[],
    }
}

/// Why an inbound policy gateguard does not convert is left out without weakening anything,
/// or `None` when leaving it out would.
fn neutral(policy: &str) -> Option<&'static str> {
    Some(match policy {
        "set-backend-service" => "the backend is Envoy's route and cluster: point them at it",
        "rewrite-uri" => "use the Envoy route's prefix_rewrite or regex_rewrite",
        "trace" | "log-to-eventhub" | "emit-metric" => {
            "logging and metrics: Envoy's access log and gateguard's stats cover requests"
        }
        "set-variable" => {
            "a context variable, read only by policy expressions (any check that reads it is \
             refused)"
        }
        "cache-lookup" | "cache-lookup-value" | "cache-store-value" | "cache-remove-value" => {
            "response caching: not a check"
        }
        _ => return None,
    })
}

/// Why an inbound policy gateguard does not convert matters.
fn unconverted_reason(policy: &str) -> &'static str {
    match policy {
        "base" => {
            "inherits the policies of the enclosing scope (product, workspace or global), which \
             this file does not hold: convert them too, or pass --skip base if they enforce \
             nothing gateguard must"
        }
        "rate-limit" | "rate-limit-by-key" | "quota" | "quota-by-key" => {
            "rate limits and quotas are not part of this conversion: configure Envoy's \
             local_ratelimit filter (or ratelimit for a shared limit), then pass --skip with \
             this element's name"
        }
        "validate-azure-ad-token" => {
            "write it as <validate-jwt> with <openid-config \
             url=\"https://login.microsoftonline.com/<tenant>/v2.0/.well-known/openid-configuration\"/>, \
             <audiences> and <issuers>, and convert again"
        }
        "include-fragment" => {
            "the fragment's policies are not in this file: convert the fragment's XML, or paste \
             its policies here"
        }
        "return-response" | "mock-response" => {
            "answers requests itself, so the backend is never called: gateguard would forward them"
        }
        _ => {
            "not a check gateguard performs, and it may refuse or change requests: remove it \
             from the input, or pass --skip with this element's name, once nothing depends on it"
        }
    }
}

struct Cx<'d, 'i> {
    doc: &'d Document<'i>,
    args: &'d Args,
    named: &'d NamedValues,
    api: Api,
    report: Report,
}

impl<'d, 'i> Cx<'d, 'i> {
    fn el(&self, node: Node) -> El {
        el(self.doc, node)
    }

    fn inbound(&mut self, node: Node) {
        let e = self.el(node);
        if !CONVERTED.contains(&e.name.as_str()) {
            if let Some(reason) = neutral(&e.name) {
                return self.report.left_out(&e, reason);
            }
            let reason = unconverted_reason(&e.name);
            return if self.args.skip.contains(&e.name) {
                self.report
                    .left_out(&e, format!("--skip {}: {reason}", e.name))
            } else {
                self.report.skip(&e, reason)
            };
        }
        if let Some(reason) = self.unfit(node) {
            return self.report.skip(&e, reason);
        }
        let before = self.report.items.len();
        match e.name.as_str() {
            "cors" => self.cors(node, &e),
            "ip-filter" => self.ip_filter(node, &e),
            "validate-jwt" => self.validate_jwt(node, &e),
            "check-header" => self.check_header(node, &e),
            "choose" => self.choose(node, &e),
            "validate-client-certificate" => self.validate_client_certificate(node, &e),
            _ => self.set_header(node, &e),
        }
        self.refuse_if_a_part_was(&e, before);
    }

    /// A policy one of whose parts (a `<claim>`, a `<key>`) could not be converted is not
    /// converted either, whatever its own line says.
    fn refuse_if_a_part_was(&mut self, e: &El, before: usize) {
        let items = self.report.items.get_mut(before..).unwrap_or_default();
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

    /// Why a policy this command converts cannot be converted whatever its content: a
    /// placeholder without a value, or a child element the conversion would drop.
    fn unfit(&self, node: Node) -> Option<String> {
        let left = named_values::left_in(self.doc, node, &is_env_header_value);
        if !left.is_empty() {
            return Some(self.named.missing(&left));
        }
        let known = known_children(node.tag_name().name());
        let unknown: Vec<String> = elements(node)
            .filter(|c| !known.contains(&c.tag_name().name()))
            .map(|c| format!("<{}> on line {}", c.tag_name().name(), self.el(c).line))
            .collect();
        (!unknown.is_empty()).then(|| {
            format!(
                "unknown child element {}: what it enforces would be lost",
                unknown.join(", ")
            )
        })
    }

    fn other_section(&mut self, node: Node, section: &str) {
        let e = self.el(node);
        match e.name.as_str() {
            "base" => self.report.note(
                &e,
                format!("in <{section}>: response and backend policies are not gateguard's; nothing to convert"),
            ),
            "forward-request" if section == "backend" && node.attributes().len() == 0 => {
                self.report
                    .note(&e, "Envoy's route forwards the request upstream; nothing to convert")
            }
            _ => self.report.left_out(
                &e,
                format!(
                    "in <{section}>: gateguard decides which requests are admitted; configure \
                     this in Envoy (route, cluster or a response filter)"
                ),
            ),
        }
    }

    // ---- cors ----

    fn cors(&mut self, node: Node, e: &El) {
        if self.api.cors.is_some() {
            return self.report.skip(
                e,
                "a second <cors>: gateguard has one CORS configuration per API",
            );
        }
        match self.cors_block(node, e) {
            Ok((block, summary)) => match check_block("cors", &block) {
                Ok(()) => {
                    self.report.converted(e, format!("cors ({summary})"));
                    self.api.cors = Some(block);
                }
                Err(reason) => self
                    .report
                    .skip(e, format!("gateguard refuses it: {reason}")),
            },
            Err(reason) => self.report.skip(e, reason),
        }
    }

    fn cors_block(&mut self, node: Node, e: &El) -> Result<(Value, String), String> {
        let credentials = parse_bool(node.attribute("allow-credentials"), false)
            .map_err(|r| format!("allow-credentials: {r}"))?;
        if parse_bool(node.attribute("terminate-unmatched-request"), true) != Ok(true) {
            self.report.note(
                e,
                "terminate-unmatched-request is not true: gateguard refuses requests from \
                 origins that are not allowed (403)",
            );
        }
        let list = |container: Option<Node>, item: &str| -> Result<Vec<String>, String> {
            let mut out = Vec::new();
            if let Some(c) = container {
                for n in elements(c).filter(|n| n.tag_name().name() == item) {
                    let v = literal(&text_of(n)).map_err(|r| format!("<{item}> {r}"))?;
                    if !v.is_empty() && !out.contains(&v) {
                        out.push(v);
                    }
                }
            }
            Ok(out)
        };
        let mut origins = list(child(node, "allowed-origins"), "origin")?;
        if let Some(o) = origins.iter().find(|o| o.contains("*.")) {
            return Err(format!(
                "origin {o:?}: APIM takes an origin exactly (only \"*\" alone is a wildcard), \
                 gateguard would admit every subdomain: list the origins"
            ));
        }
        if credentials && origins.iter().any(|o| o == "*") {
            origins.retain(|o| o != "*");
            self.report.skip(
                e,
                "origin \"*\" with allow-credentials=\"true\" is not allowed (browsers refuse it \
                 too); list the origins",
            );
        }
        let origins: Vec<String> = origins
            .into_iter()
            .map(|o| {
                if o == "*" {
                    o
                } else {
                    o.trim_end_matches('/').to_string()
                }
            })
            .collect();
        if origins.is_empty() {
            return Err("no usable <allowed-origins><origin>".into());
        }
        let methods_node = child(node, "allowed-methods");
        let mut methods = list(methods_node, "method")?;
        if methods_node.is_none() || methods.is_empty() {
            // APIM's default when the element is absent.
            methods = vec!["GET".into(), "POST".into()];
        }
        let methods: Vec<String> = methods.iter().map(|m| m.to_ascii_uppercase()).collect();
        let headers = list(child(node, "allowed-headers"), "header")?;
        let expose = list(child(node, "expose-headers"), "header")?;
        let mut block = Map::new();
        block.insert("allowed_origins".into(), json!(origins));
        block.insert("allowed_methods".into(), json!(methods));
        block.insert("allowed_headers".into(), json!(headers));
        block.insert("expose_headers".into(), json!(expose));
        block.insert("allow_credentials".into(), json!(credentials));
        if let Some(age) = methods_node.and_then(|m| m.attribute("preflight-result-max-age")) {
            let age: u64 = literal(age)
                .ok()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| {
                    format!("preflight-result-max-age {age:?} is not a number of seconds")
                })?;
            let age = if age > MAX_AGE {
                self.report.note(
                    e,
                    format!(
                        "preflight-result-max-age {age} lowered to gateguard's maximum {MAX_AGE}"
                    ),
                );
                MAX_AGE
            } else {
                age
            };
            block.insert("max_age_seconds".into(), json!(age));
        }
        let summary = format!(
            "{} origin{}, methods {}",
            origins.len(),
            plural(origins.len()),
            methods.join(",")
        );
        Ok((Value::Object(block), summary))
    }

    // ---- ip-filter ----

    fn ip_filter(&mut self, node: Node, e: &El) {
        let action = node.attribute("action").unwrap_or("").trim();
        let allow = match action {
            "allow" => true,
            "forbid" => false,
            _ => {
                return self.report.skip(
                    e,
                    format!("action {action:?} is not \"allow\" or \"forbid\" (policy expressions are not evaluated)"),
                )
            }
        };
        if allow && self.api.ip_allow.is_some() {
            // Two allow-lists in sequence admit only their intersection.
            return self.report.skip(
                e,
                "a second <ip-filter action=\"allow\">: APIM admits only addresses in both \
                 lists; merge them into one",
            );
        }
        let mut entries = Vec::new();
        let (mut addresses, mut ranges) = (0usize, 0usize);
        for n in elements(node) {
            let c = self.el(n);
            let result = match c.name.as_str() {
                "address" => {
                    addresses += 1;
                    literal(&text_of(n)).and_then(|a| {
                        a.parse::<IpAddr>()
                            .map(|ip| vec![ip.to_string()])
                            .map_err(|_| format!("{a:?} is not an IP address"))
                    })
                }
                "address-range" => {
                    ranges += 1;
                    let from = n.attribute("from").unwrap_or("");
                    let to = n.attribute("to").unwrap_or("");
                    range_to_cidrs(from.trim(), to.trim())
                }
                other => Err(format!("unknown child <{other}>")),
            };
            match result {
                Ok(list) => {
                    for cidr in list {
                        if !entries.contains(&cidr) {
                            entries.push(cidr);
                        }
                    }
                }
                Err(reason) => {
                    return self.report.skip(
                        e,
                        format!(
                            "<{}> on line {}: {reason}; the whole filter was left out",
                            c.name, c.line
                        ),
                    )
                }
            }
        }
        if entries.is_empty() {
            return self.report.skip(e, "no <address> or <address-range>");
        }
        let field = if allow { "allow" } else { "deny" };
        let block = json!({ field: entries });
        if let Err(reason) = check_block("ip_filter", &block) {
            return self
                .report
                .skip(e, format!("gateguard refuses it: {reason}"));
        }
        let n = entries.len();
        if allow {
            self.api.ip_allow = Some(entries);
        } else {
            for cidr in entries {
                if !self.api.ip_deny.contains(&cidr) {
                    self.api.ip_deny.push(cidr);
                }
            }
        }
        self.report.converted(
            e,
            format!(
                "ip_filter.{field} ({addresses} address{}, {ranges} range{} -> {n} entr{})",
                if addresses == 1 { "" } else { "es" },
                plural(ranges),
                if n == 1 { "y" } else { "ies" }
            ),
        );
    }

    // ---- validate-jwt ----

    fn validate_jwt(&mut self, node: Node, e: &El) {
        if self.api.jwt.is_some() {
            return self.report.skip(
                e,
                "a second <validate-jwt>: gateguard validates one token per API",
            );
        }
        match self.jwt_block(node, e) {
            Ok((block, summary)) => match check_block("jwt", &block) {
                Ok(()) => {
                    self.report.converted(e, format!("jwt ({summary})"));
                    self.api.jwt = Some(block);
                }
                Err(reason) => self
                    .report
                    .skip(e, format!("gateguard refuses it: {reason}")),
            },
            Err(reason) => self.report.skip(e, reason),
        }
    }

    fn jwt_block(&mut self, node: Node, e: &El) -> Result<(Value, String), String> {
        // Where the token comes from: gateguard reads `Authorization: Bearer` only.
        if node.attribute("query-parameter-name").is_some() {
            return Err("the token comes from a query parameter (query-parameter-name); gateguard reads it from Authorization: Bearer only".into());
        }
        if node.attribute("token-value").is_some() {
            return Err("the token comes from an expression (token-value); gateguard reads it from Authorization: Bearer only".into());
        }
        match node.attribute("header-name").map(str::trim) {
            Some(h) if h.eq_ignore_ascii_case("Authorization") => {}
            Some(h) => {
                return Err(format!(
                    "the token comes from header {h:?}; gateguard reads it from Authorization: Bearer only"
                ))
            }
            None => return Err("no header-name: the token's location is not set".into()),
        }
        match node.attribute("require-scheme").map(str::trim) {
            Some(s) if s.eq_ignore_ascii_case("Bearer") => {}
            Some(s) => {
                return Err(format!(
                    "require-scheme {s:?}: gateguard accepts the Bearer scheme only"
                ))
            }
            None => self.report.note(
                e,
                "no require-scheme: gateguard requires \"Authorization: Bearer <token>\"",
            ),
        }
        if let Some(code) = node.attribute("failed-validation-httpcode") {
            if code.trim() != "401" {
                self.report.note(
                    e,
                    format!("failed-validation-httpcode {code}: gateguard answers 401 (403 for missing claims)"),
                );
            }
        }
        if node.attribute("failed-validation-error-message").is_some() {
            self.report.note(
                e,
                "failed-validation-error-message: gateguard answers with its own messages",
            );
        }
        for (attr, what) in [
            ("require-expiration-time", "a token without exp"),
            ("require-signed-tokens", "an unsigned token"),
        ] {
            if parse_bool(node.attribute(attr), true) != Ok(true) {
                self.report.note(
                    e,
                    format!("{attr} is not true: gateguard always refuses {what}"),
                );
            }
        }
        if child(node, "decryption-keys").is_some() {
            return Err(
                "<decryption-keys>: gateguard does not accept encrypted tokens (JWE)".into(),
            );
        }

        let mut block = Map::new();
        let mut algorithms: Vec<&str> = Vec::new();
        let mut summary = Vec::new();

        // Keys.
        let mut jwks: Option<Value> = None;
        let configs: Vec<Node> = elements(node)
            .filter(|n| n.tag_name().name() == "openid-config")
            .collect();
        let mut discovery: Option<String> = None;
        for (i, c) in configs.iter().enumerate() {
            let ce = self.el(*c);
            let url = match literal(c.attribute("url").unwrap_or("")) {
                Ok(u) if u.starts_with("https://") || u.starts_with("http://") => u,
                Ok(u) => {
                    self.report
                        .skip(&ce, format!("url {u:?} is not an http(s) URL"));
                    continue;
                }
                Err(r) => {
                    self.report.skip(&ce, format!("url {r}"));
                    continue;
                }
            };
            if i > 0 || discovery.is_some() {
                self.report.skip(
                    &ce,
                    "another <openid-config>: gateguard fetches one key set per API",
                );
                continue;
            }
            jwks = Some(json!({ "cluster": self.args.jwks_cluster, "uri": url }));
            summary.push(format!(
                "keys from {url} via cluster {:?}",
                self.args.jwks_cluster
            ));
            algorithms.push("RS256");
            discovery = Some(url);
        }
        let mut rsa_keys = Vec::new();
        let mut hmac = false;
        if let Some(keys) = child(node, "issuer-signing-keys") {
            for k in elements(keys).filter(|n| n.tag_name().name() == "key") {
                let ke = self.el(k);
                match self.signing_key(k, &ke, hmac) {
                    Ok(SigningKey::Rsa(jwk)) => rsa_keys.push(jwk),
                    Ok(SigningKey::Hmac) => hmac = true,
                    Err(reason) => self.report.skip(&ke, reason),
                }
            }
        }
        if !rsa_keys.is_empty() {
            if jwks.is_some() {
                self.report.skip(
                    e,
                    format!(
                        "{} <key n= e=> next to <openid-config>: APIM accepts both, gateguard \
                         takes the key set from one place",
                        rsa_keys.len()
                    ),
                );
            } else {
                summary.push(format!(
                    "{} inline RSA key{}",
                    rsa_keys.len(),
                    plural(rsa_keys.len())
                ));
                jwks = Some(json!({ "inline": { "keys": rsa_keys } }));
                algorithms.push("RS256");
            }
        }
        if hmac {
            algorithms.push("HS256");
            summary.push(format!("HS256 secret from ${HMAC_VAR}"));
        }
        if jwks.is_none() && !hmac {
            return Err(
                "no key gateguard can use (<openid-config>, <key n= e=> or a symmetric <key>)"
                    .into(),
            );
        }

        // Issuers and audiences.
        let mut issuers = self.values(node, "issuers", "issuer");
        for i in &self.args.issuer {
            if !issuers.contains(i) {
                issuers.push(i.clone());
            }
        }
        if issuers.is_empty() {
            match discovery.as_deref().map(issuer_from_discovery) {
                Some(Ok(iss)) => {
                    if iss.starts_with("https://login.microsoftonline.com/") {
                        self.report.note(
                            e,
                            "Entra ID: v1 access tokens carry https://sts.windows.net/<tenant-id>/ \
                             as issuer, v2 tokens https://login.microsoftonline.com/<tenant-id>/v2.0; \
                             add the other one with --issuer if both reach this API",
                        );
                    }
                    self.report.note(
                        e,
                        format!(
                            "no <issuers>: APIM takes the issuer from the OpenID configuration; \
                             derived {iss:?} from its URL (check it, or pass --issuer)"
                        ),
                    );
                    issuers.push(iss);
                }
                Some(Err(why)) => {
                    return Err(format!(
                        "no <issuers>, and {why}: pass the issuer with --issuer"
                    ))
                }
                None => {
                    return Err(
                        "no <issuers>: APIM then accepts any issuer, gateguard needs them listed (--issuer)"
                            .into(),
                    )
                }
            }
        }
        let mut audiences = self.values(node, "audiences", "audience");
        for a in &self.args.audience {
            if !audiences.contains(a) {
                audiences.push(a.clone());
            }
        }
        if audiences.is_empty() {
            return Err(
                "no <audiences>: APIM then accepts any audience, gateguard needs at least one (--audience)"
                    .into(),
            );
        }
        summary.push(format!(
            "{} issuer{}, {} audience{}",
            issuers.len(),
            plural(issuers.len()),
            audiences.len(),
            plural(audiences.len())
        ));

        let skew = match node.attribute("clock-skew") {
            None => {
                self.report.note(
                    e,
                    "no clock-skew: APIM's default of 0 seconds is kept (clock_skew_seconds 0)",
                );
                0
            }
            Some(s) => match literal(s).ok().and_then(|s| s.parse::<u64>().ok()) {
                Some(v) if v > MAX_SKEW => {
                    self.report.note(
                        e,
                        format!("clock-skew {v} lowered to gateguard's maximum {MAX_SKEW} seconds"),
                    );
                    MAX_SKEW
                }
                Some(v) => v,
                None => return Err(format!("clock-skew {s:?} is not a number of seconds")),
            },
        };

        let claims = self.required_claims(node);
        if !claims.is_empty() {
            summary.push(format!(
                "{} required claim{}",
                claims.len(),
                plural(claims.len())
            ));
        }

        block.insert("issuers".into(), json!(issuers));
        block.insert("audiences".into(), json!(audiences));
        block.insert("algorithms".into(), json!(algorithms));
        if let Some(jwks) = jwks {
            block.insert("jwks".into(), jwks);
        }
        block.insert("clock_skew_seconds".into(), json!(skew));
        if !claims.is_empty() {
            block.insert("required_claims".into(), Value::Array(claims));
        }
        if hmac {
            block.insert("hmac_secret".into(), json!({ "env": HMAC_VAR }));
        }
        Ok((Value::Object(block), summary.join(", ")))
    }

    /// One `<issuer-signing-keys><key>`: an RSA key as a JWK, or the symmetric key, which
    /// goes to Envoy's environment (never to the policy or a message).
    fn signing_key(&mut self, k: Node, ke: &El, have_hmac: bool) -> Result<SigningKey, String> {
        if k.attribute("certificate-id").is_some() {
            return Err(
                "certificate-id refers to a certificate uploaded to APIM: export its \
                        public key and add it as an inline JWKS (jwt.jwks.inline)"
                    .into(),
            );
        }
        if let (Some(n), Some(x)) = (k.attribute("n"), k.attribute("e")) {
            let (Some(n), Some(x)) = (base64url(n), base64url(x)) else {
                return Err("n or e is not base64 (policy expressions are not evaluated)".into());
            };
            let mut jwk = Map::new();
            jwk.insert("kty".into(), json!("RSA"));
            jwk.insert("use".into(), json!("sig"));
            if let Some(id) = k.attribute("id") {
                jwk.insert(
                    "kid".into(),
                    json!(literal(id).map_err(|r| format!("id {r}"))?),
                );
            }
            jwk.insert("n".into(), json!(n));
            jwk.insert("e".into(), json!(x));
            return Ok(SigningKey::Rsa(Value::Object(jwk)));
        }
        let secret = text_of(k);
        if secret.is_empty() {
            return Err("an empty <key>".into());
        }
        if have_hmac {
            return Err(format!(
                "another symmetric key: gateguard takes one HMAC secret ({HMAC_VAR})"
            ));
        }
        literal(&secret).map_err(|r| format!("the key {r}"))?;
        // APIM's key is base64; gateguard's secret is the text whose bytes are the key.
        let bytes = base64_decode(&secret).ok_or("the key is not base64")?;
        if bytes.len() < MIN_HMAC_BYTES {
            return Err(format!(
                "the key has {} bytes; gateguard requires at least {MIN_HMAC_BYTES} for HMAC",
                bytes.len()
            ));
        }
        if std::str::from_utf8(&bytes).is_err() || bytes.contains(&0) {
            return Err(
                "the decoded key is binary, not text: gateguard's hmac_secret (and an \
                 environment variable) holds text, so tokens signed with this key cannot be \
                 verified; sign with a text key of 32+ bytes"
                    .into(),
            );
        }
        self.report.env(
            ke,
            format!(
                "{HMAC_VAR}: the HMAC signing key of this <key>, base64-decoded ({} bytes of \
                 text); it is not written to the policy",
                bytes.len()
            ),
        );
        Ok(SigningKey::Hmac)
    }

    /// The literal `<item>` values under `<container>`; the others are reported.
    fn values(&mut self, node: Node, container: &str, item: &str) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(c) = child(node, container) {
            for n in elements(c).filter(|n| n.tag_name().name() == item) {
                match literal(&text_of(n)) {
                    Ok(v) if !v.is_empty() => {
                        if !out.contains(&v) {
                            out.push(v)
                        }
                    }
                    Ok(_) => {}
                    Err(r) => {
                        let ne = self.el(n);
                        self.report.skip(&ne, format!("the value {r}; left out"));
                    }
                }
            }
        }
        out
    }

    fn required_claims(&mut self, node: Node) -> Vec<Value> {
        let mut rules = Vec::new();
        let Some(container) = child(node, "required-claims") else {
            return rules;
        };
        for c in elements(container).filter(|n| n.tag_name().name() == "claim") {
            let ce = self.el(c);
            let name = match literal(c.attribute("name").unwrap_or("")) {
                Ok(name) if !name.is_empty() => name,
                Ok(_) => {
                    self.report.skip(&ce, "a <claim> without a name");
                    continue;
                }
                Err(r) => {
                    self.report.skip(&ce, format!("the claim's name {r}"));
                    continue;
                }
            };
            let all = match c.attribute("match").map(str::trim) {
                None | Some("all") => true,
                Some("any") => false,
                Some(other) => {
                    self.report.skip(
                        &ce,
                        format!("claim {name:?}: match {other:?} is not \"all\" or \"any\""),
                    );
                    continue;
                }
            };
            let mut values = Vec::new();
            let mut bad = false;
            for v in elements(c).filter(|n| n.tag_name().name() == "value") {
                match literal(&text_of(v)) {
                    Ok(v) => values.push(v),
                    Err(r) => {
                        let ve = self.el(v);
                        self.report
                            .skip(&ve, format!("claim {name:?}: the value {r}"));
                        bad = true;
                    }
                }
            }
            if values.is_empty() {
                if !bad {
                    self.report.skip(
                        &ce,
                        format!("claim {name:?} without values (presence only): gateguard matches values; list them"),
                    );
                }
                continue;
            }
            // gateguard matches an array's elements and a string's space-separated words (and
            // the whole string); APIM splits a string only with separator=" ".
            match c.attribute("separator") {
                Some(" ") if values.iter().all(|v| !v.contains(' ')) => {}
                Some(" ") => {
                    self.report.skip(
                        &ce,
                        format!("claim {name:?}: a value with a space never matches a space-separated claim in APIM"),
                    );
                    continue;
                }
                Some(sep) => {
                    self.report.skip(
                        &ce,
                        format!(
                            "claim {name:?}: separator {sep:?}: gateguard splits claims on spaces \
                             only, so a {sep:?}-separated claim would not match"
                        ),
                    );
                    continue;
                }
                None => {
                    self.report.skip(
                        &ce,
                        format!(
                            "claim {name:?} has no separator: APIM compares a string claim whole, \
                             gateguard also matches its space-separated words (\"not Admin\" \
                             holds \"Admin\"); add separator=\" \" to the <claim> if that is \
                             meant (for array claims such as roles it changes nothing) and \
                             convert again"
                        ),
                    );
                    continue;
                }
            }
            let key = if all { "all_of" } else { "any_of" };
            rules.push(json!({ "name": name, key: values }));
        }
        rules
    }

    // ---- check-header ----

    fn check_header(&mut self, node: Node, e: &El) {
        let name = node.attribute("name").unwrap_or("").trim().to_string();
        if !name.eq_ignore_ascii_case(SUBSCRIPTION_HEADER) {
            return self.report.skip(
                e,
                format!(
                    "check-header on {name:?}: only {SUBSCRIPTION_HEADER} converts (to \
                     subscription_key); for another fixed-value header, a subscription_key with \
                     \"header\": {name:?} is close, but it removes the header upstream"
                ),
            );
        }
        if self.api.subscription_key.is_some() {
            return self.report.skip(
                e,
                "a second subscription-key check: merge the values into one",
            );
        }
        let mut hashes = Vec::new();
        for v in elements(node).filter(|n| n.tag_name().name() == "value") {
            let raw = text_of(v);
            if let Some(nv) = named_value(&raw) {
                let ve = self.el(v);
                self.report.skip(
                    &ve,
                    format!(
                        "the key is named value {{{{{nv}}}}}: add `gateguard hash-key` of its value \
                         to subscription_key.keys_sha256"
                    ),
                );
                continue;
            }
            match literal(&raw) {
                Ok(key) if !key.is_empty() => {
                    let h = gateguard_core::subscription_key::hash_key(&key);
                    if !hashes.contains(&h) {
                        hashes.push(h);
                    }
                }
                Ok(_) => {}
                Err(r) => {
                    let ve = self.el(v);
                    self.report.skip(&ve, format!("the value {r}"));
                }
            }
        }
        if hashes.is_empty() {
            return self.report.skip(
                e,
                "no key value gateguard can use (it compares against SHA-256 hashes of the keys)",
            );
        }
        if parse_bool(node.attribute("ignore-case"), false) != Ok(false) {
            self.report.note(
                e,
                "ignore-case is not false: gateguard compares keys exactly",
            );
        }
        if let Some(code) = node.attribute("failed-check-httpcode") {
            if code.trim() != "401" {
                self.report.note(
                    e,
                    format!("failed-check-httpcode {code}: gateguard answers 401"),
                );
            }
        }
        let block = json!({ "header": name, "query": null, "keys_sha256": hashes });
        if let Err(reason) = check_block("subscription_key", &block) {
            return self
                .report
                .skip(e, format!("gateguard refuses it: {reason}"));
        }
        self.report.converted(
            e,
            format!(
                "subscription_key ({} key{}, stored as SHA-256; header only, as in APIM)",
                hashes.len(),
                plural(hashes.len())
            ),
        );
        self.api.subscription_key = Some(block);
    }

    // ---- client certificate ----

    fn choose(&mut self, node: Node, e: &El) {
        let mut rule = CertRule::default();
        let mut codes = BTreeSet::new();
        for branch in elements(node) {
            let be = self.el(branch);
            if be.name != "when" {
                return self.report.skip(
                    e,
                    format!("a <choose> with <{}> (line {}): only the client-certificate check (<when> branches that refuse) converts", be.name, be.line),
                );
            }
            let condition = branch.attribute("condition").unwrap_or("");
            if !condition.contains("context.Request.Certificate") {
                let inner: Vec<String> = branch
                    .descendants()
                    .filter(|n| n.is_element() && *n != branch)
                    .filter(|n| CONVERTED.contains(&n.tag_name().name()))
                    .map(|n| format!("<{}> on line {}", n.tag_name().name(), self.el(n).line))
                    .collect();
                let holds = if inner.is_empty() {
                    String::new()
                } else {
                    format!(" (it holds {})", inner.join(", "))
                };
                return self.report.skip(
                    e,
                    format!(
                        "a <choose> whose condition on line {} gateguard cannot express{holds}: \
                         only the client-certificate check converts; gateguard applies its \
                         checks to every request of the API",
                        be.line
                    ),
                );
            }
            let actions: Vec<Node> = elements(branch).collect();
            let response = match actions.as_slice() {
                [r] if r.tag_name().name() == "return-response" => *r,
                _ => {
                    return self.report.skip(
                        e,
                        format!("the <when> on line {} must hold exactly one <return-response> to be the certificate check", be.line),
                    )
                }
            };
            let status = child(response, "set-status").and_then(|s| s.attribute("code"));
            codes.insert(status.unwrap_or("200").trim().to_string());
            if let Err(reason) = parse_condition(condition).and_then(|x| rule.add_refusal(&x)) {
                return self
                    .report
                    .skip(e, format!("condition on line {}: {reason}", be.line));
            }
        }
        if codes.iter().any(|c| c != "403") {
            self.report.note(
                e,
                format!(
                    "the refusal's status is {}: gateguard answers 403 \"Invalid client certificate\"",
                    codes.into_iter().collect::<Vec<_>>().join(", ")
                ),
            );
        }
        self.client_certificate(e, rule);
    }

    fn validate_client_certificate(&mut self, node: Node, e: &El) {
        if parse_bool(node.attribute("ignore-error"), false) != Ok(false) {
            return self.report.skip(
                e,
                "ignore-error is not false: APIM only records the result; gateguard would refuse",
            );
        }
        let flag = |a: &str| parse_bool(node.attribute(a), true);
        let (Ok(not_before), Ok(not_after), Ok(trust), Ok(revocation)) = (
            flag("validate-not-before"),
            flag("validate-not-after"),
            flag("validate-trust"),
            flag("validate-revocation"),
        ) else {
            return self
                .report
                .skip(e, "a validate-* attribute is not true or false");
        };
        let mut rule = CertRule {
            validity: not_before || not_after,
            chain: trust,
            revocation,
            ..CertRule::default()
        };
        let mut thumbprints = BTreeSet::new();
        for id in child(node, "identities")
            .into_iter()
            .flat_map(elements)
            .filter(|n| n.tag_name().name() == "identity")
        {
            let others: Vec<&str> = id
                .attributes()
                .map(|a| a.name())
                .filter(|n| *n != "thumbprint")
                .collect();
            if !others.is_empty() {
                return self.report.skip(
                    e,
                    format!(
                        "<identity> on line {} matches by {}: gateguard pins thumbprints (and subject/issuer DNs) only",
                        self.el(id).line,
                        others.join(", ")
                    ),
                );
            }
            match id.attribute("thumbprint").map(literal) {
                Some(Ok(t)) => {
                    thumbprints.insert(t);
                }
                _ => {
                    return self.report.skip(
                        e,
                        format!(
                            "<identity> on line {} has no literal thumbprint",
                            self.el(id).line
                        ),
                    )
                }
            }
        }
        rule.groups.push(thumbprints);
        self.client_certificate(e, rule);
    }

    fn client_certificate(&mut self, e: &El, rule: CertRule) {
        if self.api.client_certificate.is_some() {
            return self
                .report
                .skip(e, "a second client-certificate check: merge them into one");
        }
        if rule.revocation && !self.args.no_revocation_check {
            return self.report.skip(
                e,
                "APIM checks the certificate's revocation (validate-revocation, true by default, \
                 or Verify()); gateguard cannot: pass --no-revocation-check if removing a \
                 thumbprint from the policy is how you revoke",
            );
        }
        let thumbprints =
            match rule.groups.as_slice() {
                [one] if !one.is_empty() => one.iter().cloned().collect::<Vec<_>>(),
                [] | [_] => {
                    return self.report.skip(
                        e,
                        "no thumbprint is checked: gateguard needs the accepted thumbprints",
                    )
                }
                _ => return self.report.skip(
                    e,
                    "several thumbprint comparisons joined by || refuse every certificate: join \
                     them with && (Thumbprint != \"A\" && Thumbprint != \"B\")",
                ),
            };
        let mut block = Map::new();
        block.insert("thumbprints".into(), json!(thumbprints));
        block.insert("check_validity".into(), json!(rule.validity));
        if let Some(s) = &rule.subject {
            block.insert("subject".into(), json!(s));
        }
        if let Some(i) = &rule.issuer {
            block.insert("issuer".into(), json!(i));
        }
        let block = Value::Object(block);
        if let Err(reason) = check_block("client_certificate", &block) {
            return self
                .report
                .skip(e, format!("gateguard refuses it: {reason}"));
        }
        if !rule.validity {
            self.report.note(
                e,
                "APIM did not check the certificate's dates here: check_validity is false; \
                 true (refuse expired certificates) is recommended",
            );
        }
        if rule.chain {
            self.report.note(
                e,
                "APIM also builds the chain to a trusted CA (validate-trust, Verify()): \
                 gateguard accepts exactly the pinned certificates and checks their dates, not \
                 the chain",
            );
        }
        if rule.revocation {
            self.report.note(
                e,
                "--no-revocation-check: a revoked certificate stays accepted until its \
                 thumbprint is removed from the policy",
            );
        }
        self.report.converted(
            e,
            format!(
                "client_certificate ({} thumbprint{}, check_validity {})",
                thumbprints.len(),
                plural(thumbprints.len()),
                rule.validity
            ),
        );
        self.api.client_certificate = Some(block);
    }

    // ---- set-header ----

    fn set_header(&mut self, node: Node, e: &El) {
        let name = node.attribute("name").unwrap_or("").trim().to_string();
        let action = node.attribute("exists-action").unwrap_or("override").trim();
        match action {
            "override" => {}
            "skip" => self.report.note(
                e,
                format!("{name}: exists-action=\"skip\" keeps a client's header; gateguard always replaces it"),
            ),
            other => {
                return self.report.skip(
                    e,
                    format!("{name}: exists-action={other:?}: gateguard only sets (replaces) upstream headers"),
                )
            }
        }
        let values: Vec<Node> = elements(node)
            .filter(|n| n.tag_name().name() == "value")
            .collect();
        let raw = match values.as_slice() {
            [v] => text_of(*v),
            _ => {
                return self.report.skip(
                    e,
                    format!(
                        "{name}: {} <value> elements; gateguard sets one value",
                        values.len()
                    ),
                )
            }
        };
        let (source, literal_value) = if let Some(nv) = named_value(&raw) {
            let var = env_var(nv);
            (json!({ "env": var }), None)
        } else {
            match literal(&raw) {
                Ok(v) => (json!({ "value": v }), Some(())),
                Err(r) => return self.report.skip(e, format!("{name}: the value {r}")),
            }
        };
        if let Err(reason) = gateguard_core::headers::check_upstream_header_name(&name) {
            return self.report.skip(e, format!("{name:?}: {reason}"));
        }
        let block = json!({ name.as_str(): source.clone() });
        if let Err(reason) = check_block("inject_headers", &block) {
            return self
                .report
                .skip(e, format!("gateguard refuses it: {reason}"));
        }
        let key = name.to_ascii_lowercase();
        if self.api.inject_headers.contains_key(&key) {
            self.report.note(
                e,
                format!("{name} was set before; the later value wins, as in APIM"),
            );
        }
        match source.get("env").and_then(Value::as_str) {
            Some(var) => {
                let nv = named_value(&raw).unwrap_or_default();
                self.report.converted(
                    e,
                    format!("inject_headers.{key} (from environment variable {var})"),
                );
                self.report.env(
                    e,
                    format!("{var}: the value of named value {{{{{nv}}}}} (header {name})"),
                );
            }
            None => {
                self.report
                    .converted(e, format!("inject_headers.{key} (a literal value)"));
                self.report.note(
                    e,
                    format!("{name}'s value is written into the policy; if it is a secret, use {{\"env\": ...}} instead"),
                );
            }
        }
        if literal_value.is_some() {
            self.api.literal_headers = true;
        }
        self.api.inject_headers.insert(key, source);
    }
}

enum SigningKey {
    Rsa(Value),
    Hmac,
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

// ---- the certificate condition ----

/// What a certificate `<choose>` refuses.
#[derive(Debug, Default, PartialEq)]
struct CertRule {
    /// Each set: the refusal "thumbprint is none of these". More than one set refuses all.
    groups: Vec<BTreeSet<String>>,
    validity: bool,
    /// `Verify()` / validate-trust: APIM also checks the chain.
    chain: bool,
    /// `Verify()` / validate-revocation: APIM also checks revocation.
    revocation: bool,
    subject: Option<String>,
    issuer: Option<String>,
}

/// A boolean C# expression, as far as the certificate check needs it.
#[derive(Debug, Clone, PartialEq)]
enum Expr {
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
    fn add_refusal(&mut self, x: &Expr) -> Result<(), String> {
        match x {
            Expr::Or(items) => items.iter().try_for_each(|i| self.add_refusal(i)),
            Expr::And(items) => {
                // A && B refuses only when both hold: thumbprint "none of these" is the one
                // shape that means something here.
                let mut group = BTreeSet::new();
                for i in items {
                    match i {
                        Expr::Atom(a) => match classify(a)? {
                            Atom::ThumbprintNot(t) => {
                                group.insert(t);
                            }
                            _ => return Err(format!("unsupported && operand {a:?}")),
                        },
                        Expr::Not(inner) => match inner.as_ref() {
                            Expr::Atom(a) => match classify(a)? {
                                Atom::ThumbprintIs(t) => {
                                    group.insert(t);
                                }
                                _ => return Err(format!("unsupported && operand !{a:?}")),
                            },
                            _ => return Err("unsupported && operand".into()),
                        },
                        _ => return Err("unsupported nesting inside &&".into()),
                    }
                }
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
                let mut group = BTreeSet::new();
                for i in items {
                    match i {
                        Expr::Atom(a) => match classify(a)? {
                            Atom::ThumbprintIs(t) => {
                                group.insert(t);
                            }
                            _ => return Err(format!("unsupported operand {a:?} in !( || )")),
                        },
                        _ => return Err("unsupported nesting inside !( || )".into()),
                    }
                }
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
fn parse_condition(condition: &str) -> Result<Expr, String> {
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
        let mut items = vec![self.and()?];
        while self.op('|') {
            items.push(self.and()?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Expr::Or(items)
        })
    }
    fn and(&mut self) -> Result<Expr, String> {
        let mut items = vec![self.unary()?];
        while self.op('&') {
            items.push(self.unary()?);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Expr::And(items)
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

// ---- addresses ----

/// The smallest list of CIDR blocks covering exactly `from`..=`to` (both IPv4 or both IPv6).
fn range_to_cidrs(from: &str, to: &str) -> Result<Vec<String>, String> {
    let parse = |s: &str| {
        literal(s).and_then(|v| {
            v.parse::<IpAddr>()
                .map_err(|_| format!("{v:?} is not an IP address"))
        })
    };
    let (a, b) = (parse(from)?, parse(to)?);
    let (start, end, bits) = match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(u32::from(a)), u128::from(u32::from(b)), 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return Err(format!("{from} and {to} are not the same IP version")),
    };
    if start > end {
        return Err(format!("from {from} is after to {to}"));
    }
    Ok(split_range(start, end, bits)
        .into_iter()
        .map(|(base, len)| {
            let addr = if bits == 32 {
                IpAddr::from(std::net::Ipv4Addr::from(base as u32))
            } else {
                IpAddr::from(std::net::Ipv6Addr::from(base))
            };
            format!("{addr}/{len}")
        })
        .collect())
}

/// (base, prefix length) blocks for `start..=end` in a `bits`-wide address space.
fn split_range(start: u128, end: u128, bits: u32) -> Vec<(u128, u32)> {
    let mask = |k: u32| -> u128 {
        if k >= 128 {
            u128::MAX
        } else {
            (1u128 << k) - 1
        }
    };
    let mut out = Vec::new();
    let mut cur = start;
    loop {
        // The largest block aligned at `cur` that does not pass `end`.
        let mut k = bits;
        while k > 0 && (cur & mask(k) != 0 || cur | mask(k) > end) {
            k -= 1;
        }
        out.push((cur, bits - k));
        let last = cur | mask(k);
        if last >= end {
            break;
        }
        cur = last + 1;
    }
    out
}

// ---- base64 ----

fn base64_value(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' | b'-' => Some(62),
        b'/' | b'_' => Some(63),
        _ => None,
    }
}

/// Decodes standard or URL-safe base64, padded or not.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = text.trim().trim_end_matches('=').bytes().collect();
    if digits.is_empty() || digits.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut n = 0;
    for c in digits {
        acc = (acc << 6) | u32::from(base64_value(c)?);
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((acc >> n) as u8);
            acc &= (1 << n) - 1;
        }
    }
    Some(out)
}

/// The same bytes as unpadded base64url (what a JWK's `n` and `e` need).
fn base64url(text: &str) -> Option<String> {
    let t = text.trim();
    if t.starts_with('@') || base64_decode(t).is_none() {
        return None;
    }
    Some(
        t.trim_end_matches('=')
            .chars()
            .map(|c| match c {
                '+' => '-',
                '/' => '_',
                c => c,
            })
            .collect(),
    )
}

// ---- issuers ----

fn is_guid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The issuer an OpenID configuration URL stands for, when it is certain: Entra ID tenants
/// given by ID, and other providers by OpenID Connect Discovery's rule (the URL is the issuer
/// plus `/.well-known/openid-configuration`).
fn issuer_from_discovery(url: &str) -> Result<String, String> {
    let base = url
        .strip_suffix(DISCOVERY_SUFFIX)
        .ok_or("the <openid-config> URL does not end in /.well-known/openid-configuration")?;
    if let Some(path) = base.strip_prefix("https://login.microsoftonline.com/") {
        let segments: Vec<&str> = path.split('/').collect();
        return match segments.as_slice() {
            [tenant, "v2.0"] if is_guid(tenant) => Ok(base.to_string()),
            [tenant] if is_guid(tenant) => Ok(format!("https://sts.windows.net/{tenant}/")),
            _ => Err(format!(
                "the Entra ID tenant in {url} is not a tenant ID, so the issuer (which carries the ID) cannot be derived"
            )),
        };
    }
    let host = base
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or("");
    if base.contains('?') || host.contains("microsoft") || host.ends_with("b2clogin.com") {
        return Err(format!("the issuer cannot be derived from {url}"));
    }
    Ok(base.to_string())
}

// ---- XML repair ----

/// The portal's code editor shows policy expressions raw: `condition="@(x != "a")"` and
/// `@(a < b && c)` are not well-formed XML (exports escape them). Escapes `"`, `<`, `>` and a
/// bare `&` inside every `@(...)` / `@{...}` in an attribute value or text, keeping lines.
fn escape_expressions(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len() + 64);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = c == '@' && matches!(chars.get(i + 1), Some('(' | '{'));
        if !start {
            out.push(c);
            i += 1;
            continue;
        }
        // An attribute value when the expression follows `="` or `='`.
        let quote = match (
            i.checked_sub(2).map(|j| chars[j]),
            i.checked_sub(1).map(|j| chars[j]),
        ) {
            (Some('='), Some(q @ ('"' | '\''))) => Some(q),
            _ => None,
        };
        let (open, close) = if chars[i + 1] == '(' {
            ('(', ')')
        } else {
            ('{', '}')
        };
        let mut depth = 0usize;
        let mut j = i + 1;
        let mut in_string = false;
        let mut end = None;
        while j < chars.len() {
            let d = chars[j];
            if in_string {
                if d == '\\' {
                    j += 1;
                } else if d == '"' {
                    in_string = false;
                }
            } else if d == '"' {
                in_string = true;
            } else if d == open {
                depth += 1;
            } else if d == close {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    end = Some(j);
                    break;
                }
            }
            j += 1;
        }
        let Some(end) = end else {
            out.push(c);
            i += 1;
            continue;
        };
        for k in i..=end {
            let d = chars[k];
            match d {
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                '&' if !is_entity(&chars[k..]) => out.push_str("&amp;"),
                '"' if quote == Some('"') => out.push_str("&quot;"),
                '\'' if quote == Some('\'') => out.push_str("&apos;"),
                _ => out.push(d),
            }
        }
        i = end + 1;
    }
    out
}

fn is_entity(rest: &[char]) -> bool {
    let s: String = rest.iter().take(8).collect();
    ["&quot;", "&amp;", "&lt;", "&gt;", "&apos;", "&#"]
        .iter()
        .any(|e| s.starts_with(e))
}

// ---- output ----

/// The policy document, pretty-printed, `$schema` first, keys in the documented order.
fn render(api: &Api, args: &Args) -> Result<String, String> {
    let mut object = Map::new();
    object.insert("name".into(), json!(args.name));
    object.insert("path_prefix".into(), json!(args.path_prefix));
    if let Some(c) = &api.cors {
        object.insert("cors".into(), c.clone());
    }
    if api.ip_allow.is_some() || !api.ip_deny.is_empty() {
        let mut ip = Map::new();
        if let Some(allow) = &api.ip_allow {
            ip.insert("allow".into(), json!(allow));
        }
        if !api.ip_deny.is_empty() {
            ip.insert("deny".into(), json!(api.ip_deny));
        }
        object.insert("ip_filter".into(), Value::Object(ip));
    }
    if let Some(c) = &api.client_certificate {
        object.insert("client_certificate".into(), c.clone());
    }
    if let Some(k) = &api.subscription_key {
        object.insert("subscription_key".into(), k.clone());
    }
    if let Some(j) = &api.jwt {
        object.insert("jwt".into(), j.clone());
    }
    if !api.inject_headers.is_empty() {
        object.insert(
            "inject_headers".into(),
            Value::Object(api.inject_headers.clone()),
        );
    }
    crate::output::policy_text(vec![Value::Object(object)])
}

/// One line per finding (`FILE:LINE: kind: <element>: text`), then a summary line; values
/// filled in from `--named-values` masked. `written` names where the policy went, `None` when
/// nothing was written.
fn print_report(report: &Report, masker: &Masker, input: &Path, written: Option<&str>) {
    let file = input.display();
    let mut items: Vec<&Item> = report.items.iter().collect();
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
    let list = |kind: Kind| -> Vec<String> {
        let mut of_kind: Vec<&Item> = report.items.iter().filter(|i| i.kind == kind).collect();
        of_kind.sort_by_key(|i| i.line);
        of_kind
            .iter()
            .map(|i| format!("<{}> line {}", i.element, i.line))
            .collect()
    };
    let count = |kind: Kind, what: &str| -> String {
        let items = list(kind);
        if items.is_empty() {
            format!("0 {what}")
        } else {
            format!("{} {what} ({})", items.len(), items.join(", "))
        }
    };
    let converted = list(Kind::Converted).len();
    let mut summary = format!(
        "gateguard import-apim: {file}: {converted} converted, {}, {}",
        count(Kind::NotConverted, "not converted"),
        count(Kind::LeftOut, "left out")
    );
    match written {
        Some(target) => summary.push_str(&format!("; policy written to {target}")),
        None => summary.push_str(&format!("; nothing written, exit status {NOT_CONVERTED}")),
    }
    eprintln!("{summary}");
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use clap::Parser as _;

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
        gateguard_core::parse_policy(text.as_bytes(), &|_| Some("x".repeat(40))).unwrap();
        (serde_json::from_str(&text).unwrap(), report)
    }

    fn refused(report: &Report) -> Vec<&str> {
        report
            .items
            .iter()
            .filter(|i| i.kind == Kind::NotConverted)
            .map(|i| i.element.as_str())
            .collect()
    }

    fn inbound(body: &str) -> String {
        format!("<policies>\n<inbound>\n{body}\n</inbound>\n<backend><base /></backend>\n<outbound><base /></outbound>\n<on-error><base /></on-error>\n</policies>")
    }

    fn cidrs(from: &str, to: &str) -> Vec<String> {
        range_to_cidrs(from, to).unwrap()
    }

    #[test]
    fn range_to_cidr_ipv4() {
        // Microsoft's ip-filter example.
        assert_eq!(
            cidrs("13.66.140.128", "13.66.140.143"),
            ["13.66.140.128/28"]
        );
        assert_eq!(cidrs("10.0.0.5", "10.0.0.5"), ["10.0.0.5/32"]);
        assert_eq!(
            cidrs("10.0.0.1", "10.0.0.10"),
            [
                "10.0.0.1/32",
                "10.0.0.2/31",
                "10.0.0.4/30",
                "10.0.0.8/31",
                "10.0.0.10/32"
            ]
        );
        assert_eq!(
            cidrs("192.168.0.255", "192.168.2.0"),
            ["192.168.0.255/32", "192.168.1.0/24", "192.168.2.0/32"]
        );
        assert_eq!(cidrs("0.0.0.0", "255.255.255.255"), ["0.0.0.0/0"]);
        assert_eq!(
            cidrs("255.255.255.254", "255.255.255.255"),
            ["255.255.255.254/31"]
        );
        assert_eq!(cidrs("0.0.0.0", "0.0.0.0"), ["0.0.0.0/32"]);
        assert_eq!(
            cidrs("203.0.113.0", "203.0.114.127"),
            ["203.0.113.0/24", "203.0.114.0/25"]
        );
    }

    #[test]
    fn range_to_cidr_covers_exactly() {
        // Every block lies inside the range, blocks are adjacent, and none could be merged.
        for (from, to) in [
            (1u32, 1000u32),
            (7, 8),
            (123_456, 9_876_543),
            (0, 4_294_967_294),
        ] {
            let blocks = split_range(u128::from(from), u128::from(to), 32);
            let mut next = u128::from(from);
            for (base, len) in &blocks {
                assert_eq!(*base, next);
                let size = 1u128 << (32 - len);
                assert_eq!(base % size, 0, "aligned");
                next = base + size;
            }
            assert_eq!(next, u128::from(to) + 1);
            assert!(blocks.len() <= 62);
        }
    }

    #[test]
    fn range_to_cidr_ipv6() {
        assert_eq!(cidrs("2001:db8::", "2001:db8::ffff"), ["2001:db8::/112"]);
        assert_eq!(
            cidrs("2001:db8::1", "2001:db8::4"),
            ["2001:db8::1/128", "2001:db8::2/127", "2001:db8::4/128"]
        );
        assert_eq!(
            cidrs("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
            ["::/0"]
        );
        assert_eq!(
            cidrs("2001:db8::", "2001:db9:ffff:ffff:ffff:ffff:ffff:ffff"),
            ["2001:db8::/31"]
        );
        assert!(range_to_cidrs("10.0.0.1", "2001:db8::1").is_err());
        assert!(range_to_cidrs("10.0.0.9", "10.0.0.1").is_err());
        assert!(range_to_cidrs("10.0.0", "10.0.0.1").is_err());
        assert!(range_to_cidrs("{{low}}", "10.0.0.1").is_err());
    }

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

    #[test]
    fn raw_expressions_are_repaired() {
        let raw = "<a>\n<when condition=\"@(x.NotAfter < DateTime.Now && y != \"q\")\">@(a < b)</when>\n</a>";
        assert!(Document::parse(raw).is_err());
        let fixed = escape_expressions(raw);
        let doc = Document::parse(&fixed).unwrap();
        let when = doc.root_element().first_element_child().unwrap();
        assert_eq!(
            when.attribute("condition"),
            Some("@(x.NotAfter < DateTime.Now && y != \"q\")")
        );
        assert_eq!(when.text(), Some("@(a < b)"));
        assert_eq!(fixed.lines().count(), raw.lines().count());
        // Already escaped: unchanged.
        let escaped = "<w c=\"@(a &amp;&amp; b != &quot;x&quot;)\"/>";
        assert_eq!(escape_expressions(escaped), escaped);
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
    fn issuer_derivation() {
        assert_eq!(
            issuer_from_discovery(
                "https://idp.example.com/realms/x/.well-known/openid-configuration"
            )
            .unwrap(),
            "https://idp.example.com/realms/x"
        );
        assert_eq!(
            issuer_from_discovery("https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/.well-known/openid-configuration").unwrap(),
            "https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/"
        );
        assert!(issuer_from_discovery(
            "https://login.microsoftonline.com/common/v2.0/.well-known/openid-configuration"
        )
        .is_err());
        assert!(issuer_from_discovery("https://contoso.b2clogin.com/contoso.onmicrosoft.com/B2C_1_signin/v2.0/.well-known/openid-configuration").is_err());
        assert!(issuer_from_discovery("https://idp.example.com/keys").is_err());
    }

    #[test]
    fn named_values_and_env() {
        assert_eq!(named_value("{{functions-key}}"), Some("functions-key"));
        assert_eq!(named_value(" {{ a.b }} "), Some("a.b"));
        assert_eq!(named_value("Bearer {{x}}"), None);
        assert_eq!(env_var("functions-key"), "FUNCTIONS_KEY");
        assert_eq!(env_var("1st.key"), "_1ST_KEY");
    }

    #[test]
    fn base64_helpers() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert!(base64_decode("a").is_none());
        assert!(base64_decode("a*b=").is_none());
        assert_eq!(base64url("ab+/cd==").unwrap(), "ab-_cd");
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
}
