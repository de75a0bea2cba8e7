//! `gateguard validate`: the filter's own parser and compiler, run before deployment.

use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;

use gateguard_core::config::without_bom;
use gateguard_core::jwt::JwksSource;
use gateguard_core::locate::secret_spans;
use gateguard_core::{parse_policy_report, CompiledPolicy, ConfigError, ConfigErrors};

mod online;

/// Stands in for environment variables that are not set where the CLI runs: long enough for any
/// length rule (HMAC secrets need 32+ bytes), so only `--check-env` reports missing variables.
pub const PLACEHOLDER: &str = "placeholder-for-an-unset-environment-variable-0000000000000000000";

#[derive(clap::Args)]
pub struct Args {
    /// Policy files (JSON). A JSON Schema document among them (policies/gateguard.schema.json)
    /// is skipped with a note.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Require every `{"env": NAME}` value to be set in this process's environment, as the
    /// filter will in Envoy. Without it, environment values are assumed present.
    #[arg(long)]
    check_env: bool,
    /// Print nothing for valid files.
    #[arg(short, long)]
    quiet: bool,
    #[command(flatten)]
    online: online::Args,
}

pub fn run(args: &Args) -> ExitCode {
    let mut invalid = false;
    let mut unreadable = false;
    let mut policies = 0;
    let mut schemas = 0;
    let client = if args.online.online {
        match online::Client::new(&args.online) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("gateguard validate: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    for file in &args.files {
        let text = match std::fs::read(file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{}: cannot read: {e}", file.display());
                unreadable = true;
                continue;
            }
        };
        let name = file.display().to_string();
        let strict = |name: &str| std::env::var(name).ok();
        let lenient = |name: &str| Some(std::env::var(name).unwrap_or_else(|_| PLACEHOLDER.into()));
        let env: &dyn Fn(&str) -> Option<String> = if args.check_env { &strict } else { &lenient };
        match parse_policy_report(&text, env) {
            Ok(policy) => {
                policies += 1;
                if !args.quiet {
                    for line in summary(&name, &policy) {
                        println!("{line}");
                    }
                }
                if let Some(client) = &client {
                    if !online::check(client, &name, &text, &policy, args.quiet) {
                        invalid = true;
                    }
                }
            }
            Err(errors) => {
                if let Some(schema) = json_schema_document(&text) {
                    schemas += 1;
                    eprintln!(
                        "{name}: note: skipped: a JSON Schema document (\"$schema\": {schema:?}), not a policy"
                    );
                    continue;
                }
                policies += 1;
                invalid = true;
                print_errors(&name, &text, &errors);
            }
        }
    }
    if unreadable {
        ExitCode::from(2)
    } else if invalid {
        ExitCode::from(1)
    } else if policies == 0 && schemas > 0 {
        // `validate deploy/policy.json` must not pass when that file is a schema.
        eprintln!(
            "gateguard validate: error: no policy among the files, only JSON Schema documents"
        );
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Every error of a policy, in document order, as compilers write them
/// (`file:line:column: error: path: reason`, so editors can jump to it), each followed by the
/// offending lines with secrets masked; then how many when there are several.
pub fn print_errors(file: &str, text: &[u8], errors: &ConfigErrors) {
    let mut sorted: Vec<&ConfigError> = errors.iter().collect();
    sorted.sort_by_key(|e| (e.line.unwrap_or(0), e.column.unwrap_or(0)));
    let text = std::str::from_utf8(text).ok().map(without_bom);
    for e in &sorted {
        eprintln!("{}", error_line(file, e));
        if let (Some(line), Some(text)) = (e.line, text) {
            print_context(text, line, e.column.unwrap_or(1));
        }
    }
    if sorted.len() > 1 {
        eprintln!("{file}: {} errors", sorted.len());
    }
}

fn error_line(file: &str, e: &ConfigError) -> String {
    let position = match (e.line, e.column) {
        (Some(l), Some(c)) => format!("{l}:{c}:"),
        _ => String::new(),
    };
    let path = if e.path.is_empty() { "$" } else { &e.path };
    format!("{file}:{position} error: {path}: {}", e.reason)
}

/// The `$schema` of a document that is a JSON Schema rather than a policy: its `$schema` names a
/// json-schema.org meta-schema, it has no `apis`, and it holds schema keywords (`properties`,
/// `$defs`, `definitions`), which a policy can never hold. The filter refuses such a document
/// anyway; a policy that merely points `$schema` at a meta-schema keeps its `apis` and is
/// validated.
fn json_schema_document(text: &[u8]) -> Option<String> {
    let text = without_bom(std::str::from_utf8(text).ok()?);
    let doc: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).ok()?;
    let schema = doc.get("$schema")?.as_str()?;
    let meta = ["https://json-schema.org/", "http://json-schema.org/"]
        .iter()
        .any(|p| schema.starts_with(p));
    let keywords = ["properties", "$defs", "definitions"]
        .iter()
        .any(|k| doc.contains_key(*k));
    (meta && keywords && !doc.contains_key("apis")).then(|| schema.to_string())
}

/// What `validate` prints for a valid policy: the APIs it serves, then what the policy needs from
/// Envoy that the policy alone cannot provide.
fn summary(file: &str, policy: &CompiledPolicy) -> Vec<String> {
    let names: Vec<&str> = policy.apis.iter().map(|a| a.name.as_str()).collect();
    let mut lines = vec![format!(
        "{file}: ok ({} APIs: {})",
        names.len(),
        names.join(", ")
    )];
    if let Some(etcd) = policy.replay_store.etcd() {
        // Envoy loads the policy without that cluster: the first request that needs etcd finds
        // it missing and gets `on_unavailable` (docs/policy.md, "Replay across gateway replicas").
        lines.push(format!(
            "{file}: note: replay_store.etcd needs an Envoy cluster named {:?} (HTTP/2 to etcd's client endpoints); `gateguard render --etcd HOST:PORT` emits it",
            etcd.cluster
        ));
    }
    lines.extend(plain_http_jwks_warnings(file, policy));
    let by_envoy: Vec<&str> = policy
        .apis
        .iter()
        .filter(|a| a.jwt.as_ref().is_some_and(|j| j.verified_by_envoy()))
        .map(|a| a.name.as_str())
        .collect();
    if !by_envoy.is_empty() {
        // Without it every token of those APIs is refused: nothing verified it (docs/policy.md,
        // "Verifying with Envoy's jwt_authn").
        lines.push(format!(
            "{file}: note: jwt.verify_with \"envoy\" ({}) needs Envoy's jwt_authn in front of gateguard, one provider per key set; `gateguard render` puts it there",
            by_envoy.join(", ")
        ));
    }
    let for_envoy: Vec<&str> = [
        ("listener.tls", policy.listener.tls.is_some()),
        ("upstream.tls", policy.upstream.tls.is_some()),
    ]
    .into_iter()
    .filter_map(|(section, set)| set.then_some(section))
    .collect();
    if !for_envoy.is_empty() {
        // The filter only validates them (docs/policy.md, "Listener TLS", "Reaching the
        // function app"): Envoy applies them, from the configuration render writes.
        lines.push(format!(
            "{file}: note: {} set up Envoy, not the filter: `gateguard render` writes them into the TLS listener and the function_app cluster; a hand-written Envoy configuration must carry them itself",
            for_envoy.join(" and ")
        ));
    }
    lines
}

/// A warning for each remote key set fetched in plain http across a network: whoever sits on
/// that path can hand the gateway their own keys and mint tokens it accepts (docs/policy.md,
/// "JWT"). Loopback and https are quiet; an Envoy cluster of your own that adds TLS makes the
/// warning moot, which is why it is not a refusal.
pub fn plain_http_jwks_warnings(file: &str, policy: &CompiledPolicy) -> Vec<String> {
    let mut lines = Vec::new();
    for api in &policy.apis {
        let providers = api.jwt.as_ref().map(|j| j.providers()).unwrap_or_default();
        for provider in providers {
            let JwksSource::Remote { cluster, uri, .. } = &provider.jwks else {
                continue;
            };
            if let Some(host) = online::plain_http_across_network(uri) {
                let line = format!(
                    "{file}: warning: api {}: jwks.uri {uri:?} is plain http to {host:?}, not a loopback address: unless cluster {cluster:?} adds TLS, anyone on the path can replace the keys and mint tokens the gateway accepts; use https",
                    api.name
                );
                if !lines.contains(&line) {
                    lines.push(line);
                }
            }
        }
    }
    lines
}

/// The offending line with its neighbours and a caret, as 3scale's filter shows config errors;
/// every value that may be a secret (see [`secret_spans`]) is shown as `***`.
fn print_context(text: &str, line: usize, column: usize) {
    for row in context(text, line, column) {
        eprintln!("{row}");
    }
}

fn context(text: &str, line: usize, column: usize) -> Vec<String> {
    let secrets = secret_spans(text);
    let mut rows = Vec::new();
    let first = line.saturating_sub(2).max(1);
    let mut start = 0;
    for (n, raw) in text.split('\n').enumerate().map(|(i, l)| (i + 1, l)) {
        if n > line + 1 {
            break;
        }
        if n >= first {
            let l = raw.strip_suffix('\r').unwrap_or(raw);
            let (shown, caret) = masked(l, start, &secrets, column);
            rows.push(format!("{n:>5} | {shown}"));
            if n == line {
                rows.push(format!("      | {}^", " ".repeat(caret.saturating_sub(1))));
            }
        }
        start += raw.len() + 1;
    }
    rows
}

/// `line` (starting at byte `start` of the document) with the parts inside `secrets` replaced
/// by `***`, and where 1-based character `column` lands in it.
fn masked(line: &str, start: usize, secrets: &[Range<usize>], column: usize) -> (String, usize) {
    let mut out = String::with_capacity(line.len());
    let mut caret = None;
    let mut shown = 0;
    let mut in_secret = false;
    for (chars, (i, c)) in line.char_indices().enumerate() {
        let at = start + i;
        let secret = secrets.iter().any(|r| r.contains(&at));
        if chars + 1 == column {
            caret = Some(shown + 1);
        }
        if secret {
            if !in_secret {
                out.push_str("***");
                shown += 3;
            }
        } else {
            out.push(c);
            shown += 1;
        }
        in_secret = secret;
    }
    (out, caret.unwrap_or(shown + 1))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    use gateguard_core::parse_policy;

    fn error_context(text: &str) -> String {
        let e = parse_policy(text.as_bytes(), &|_| Some(PLACEHOLDER.into())).unwrap_err();
        let mut shown = format!("{}: {}\n", e.path, e.reason);
        shown += &context(text, e.line.unwrap(), e.column.unwrap()).join("\n");
        shown
    }

    fn summary_of(text: &str) -> Vec<String> {
        let policy = parse_policy(text.as_bytes(), &|_| Some(PLACEHOLDER.into())).unwrap();
        summary("p.json", &policy)
    }

    #[test]
    fn summary_names_the_etcd_cluster_render_must_emit() {
        let apis =
            r#""apis": [{"name": "a", "path_prefix": "/a"}, {"name": "b", "path_prefix": "/b"}]"#;
        assert_eq!(
            summary_of(&format!(r#"{{{apis}, "replay_store": {{"etcd": {{}}}}}}"#)),
            [
                "p.json: ok (2 APIs: a, b)",
                "p.json: note: replay_store.etcd needs an Envoy cluster named \"etcd\" (HTTP/2 to etcd's client endpoints); `gateguard render --etcd HOST:PORT` emits it",
            ]
        );
        let named = summary_of(&format!(
            r#"{{{apis}, "replay_store": {{"etcd": {{"cluster": "replay-etcd", "on_unavailable": "allow"}}}}}}"#
        ));
        assert!(
            named[1].contains(r#"an Envoy cluster named "replay-etcd""#),
            "{named:?}"
        );
    }

    #[test]
    fn summary_is_one_line_without_etcd() {
        let apis = r#""apis": [{"name": "a", "path_prefix": "/a"}]"#;
        for store in ["", r#", "replay_store": "local""#] {
            assert_eq!(
                summary_of(&format!("{{{apis}{store}}}")),
                ["p.json: ok (1 APIs: a)"]
            );
        }
    }

    #[test]
    fn plain_http_key_sets_across_a_network_are_warned_about() {
        let api = |name: &str, uri: &str| {
            format!(
                r#"{{"name": "{name}", "path_prefix": "/{name}", "jwt": {{"issuers": ["i"],
                    "audiences": ["a"], "algorithms": ["RS256"],
                    "jwks": {{"cluster": "idp", "uri": "{uri}"}}}}}}"#
            )
        };
        let warning = |name: &str, uri: &str, host: &str| {
            format!("p.json: warning: api {name}: jwks.uri \"{uri}\" is plain http to \"{host}\", not a loopback address: unless cluster \"idp\" adds TLS, anyone on the path can replace the keys and mint tokens the gateway accepts; use https")
        };
        let text = format!(
            r#"{{"apis": [{}, {}, {}, {}, {}]}}"#,
            api("tls", "https://idp.example/keys"),
            api("local", "http://127.0.0.1:9000/keys"),
            api("named", "http://localhost/keys"),
            api("remote", "http://idp.example:8080/keys"),
            api("tricked", "http://127.0.0.1@evil.example/keys")
        );
        assert_eq!(
            summary_of(&text),
            [
                "p.json: ok (5 APIs: tls, local, named, remote, tricked)".to_string(),
                warning("remote", "http://idp.example:8080/keys", "idp.example"),
                warning(
                    "tricked",
                    "http://127.0.0.1@evil.example/keys",
                    "evil.example"
                ),
            ]
        );
    }

    #[test]
    fn summary_says_which_apis_need_jwt_authn_in_front() {
        let api = |name: &str, verify_with: &str| {
            format!(
                r#"{{"name": "{name}", "path_prefix": "/{name}", "jwt": {{"issuers": ["i"],
                    "audiences": ["a"], "algorithms": ["RS256"], "verify_with": "{verify_with}",
                    "jwks": {{"cluster": "idp", "uri": "https://idp/keys"}}}}}}"#
            )
        };
        let text = format!(
            r#"{{"apis": [{}, {}, {}]}}"#,
            api("a", "envoy"),
            api("b", "gateguard"),
            api("c", "envoy")
        );
        assert_eq!(
            summary_of(&text),
            [
                "p.json: ok (3 APIs: a, b, c)",
                "p.json: note: jwt.verify_with \"envoy\" (a, c) needs Envoy's jwt_authn in front of gateguard, one provider per key set; `gateguard render` puts it there",
            ]
        );
        let text = format!(r#"{{"apis": [{}]}}"#, api("b", "gateguard"));
        assert_eq!(summary_of(&text), ["p.json: ok (1 APIs: b)"]);
    }

    #[test]
    fn summary_says_listener_and_upstream_tls_are_for_render() {
        let apis = r#""apis": [{"name": "a", "path_prefix": "/a"}]"#;
        let upstream = r#""upstream": {"tls": {"sni": "fn.example.net"}}"#;
        let note = |sections: &str| {
            format!("p.json: note: {sections} set up Envoy, not the filter: `gateguard render` writes them into the TLS listener and the function_app cluster; a hand-written Envoy configuration must carry them itself")
        };
        assert_eq!(
            summary_of(&format!("{{{apis}, {upstream}}}")),
            ["p.json: ok (1 APIs: a)".to_string(), note("upstream.tls")]
        );
        assert_eq!(
            summary_of(&format!(
                r#"{{{apis}, "listener": {{"tls": {{}}}}, {upstream}}}"#
            )),
            [
                "p.json: ok (1 APIs: a)".to_string(),
                note("listener.tls and upstream.tls")
            ]
        );
        assert_eq!(
            summary_of(&format!(
                r#"{{{apis}, "listener": {{}}, "upstream": {{}}}}"#
            )),
            ["p.json: ok (1 APIs: a)"]
        );
    }

    #[test]
    fn context_masks_secrets_on_the_error_line_and_around_it() {
        let text = r#"{"apis": [{"name": "a", "path_prefix": "/a",
  "inject_headers": {"x-functions-key": {"value": "fk-s3cret"}},
  "jwt": {"issuers": ["i"], "audiences": ["a"], "algorithms": ["HS256"], "hmac_secret": {"value": "short-s3cret"}}
}]}"#;
        let shown = error_context(text);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains(r#""hmac_secret": {"value": "***"}"#),
            "{shown}"
        );
        assert!(shown.contains(r#"{"value": "***"}}"#), "{shown}");
        // The caret still points at the field in error.
        let rows: Vec<&str> = shown.lines().collect();
        let caret = rows
            .iter()
            .position(|r| r.trim_end().ends_with('^'))
            .unwrap();
        let at = rows[caret].find('^').unwrap();
        assert_eq!(&rows[caret - 1][at..at + 10], r#"{"value": "#);
    }

    #[test]
    fn context_masks_secrets_in_minified_and_escaped_policies() {
        for text in [
            // One line, the secret before the error.
            r#"{"apis":[{"name":"a","path_prefix":"/a","inject_headers":{"x-k":{"value":"s3\"c,r}e\\t"}},"bad":1}]}"#,
            // The secret after the error, on the same line.
            r#"{"apis":[{"name":"a","bad":1,"path_prefix":"/a","inject_headers":{"x-k":{"value":"s3cret"}}}]}"#,
            // A bare string, a number and a typo'd key.
            r#"{"apis":[{"name":"a","path_prefix":"/a","inject_headers":{"x-k":"s3cret"}}]}"#,
            r#"{"apis":[{"name":"a","path_prefix":"/a","inject_headers":{"x-k":{"value":731337}}}]}"#,
            r#"{"apis":[{"name":"a","path_prefix":"/a","inject_headers":{"x-k":{"vaule":"s3cret"}}}]}"#,
            // A syntax error next to the secret.
            r#"{"apis":[{"name":"a","path_prefix":"/a","inject_headers":{"x-k":{"value":"s3cret"}}}}]}"#,
            "{\"apis\":[{\"name\":\"a\",\"path_prefix\":\"/a\",\"inject_headers\":{\"x-k\":{\"value\":\"s3cret\n\"}}}]}",
            // Windows line ends.
            "{\"apis\": [{\"name\": \"a\",\r\n\"path_prefix\": \"/a\",\r\n\"inject_headers\": {\"x-k\": {\"value\": \"s3cret\"}}, \"bad\": 1}]}",
        ] {
            let shown = error_context(text);
            assert!(
                !shown.contains("s3") && !shown.contains("731337"),
                "{text}\n{shown}"
            );
            assert!(shown.contains("***"), "{shown}");
        }
    }
}
