//! `gateguard validate`: the filter's own parser and compiler, run before deployment.

use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;

use gateguard_core::locate::secret_spans;
use gateguard_core::{parse_policy, CompiledPolicy};

/// Stands in for environment variables that are not set where the CLI runs: long enough for any
/// length rule (HMAC secrets need 32+ bytes), so only `--check-env` reports missing variables.
pub const PLACEHOLDER: &str = "placeholder-for-an-unset-environment-variable-0000000000000000000";

#[derive(clap::Args)]
pub struct Args {
    /// Policy files (JSON).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Require every `{"env": NAME}` value to be set in this process's environment, as the
    /// filter will in Envoy. Without it, environment values are assumed present.
    #[arg(long)]
    check_env: bool,
    /// Print nothing for valid files.
    #[arg(short, long)]
    quiet: bool,
}

pub fn run(args: &Args) -> ExitCode {
    let mut invalid = false;
    let mut unreadable = false;
    for file in &args.files {
        let text = match std::fs::read(file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{}: cannot read: {e}", file.display());
                unreadable = true;
                continue;
            }
        };
        let strict = |name: &str| std::env::var(name).ok();
        let lenient = |name: &str| Some(std::env::var(name).unwrap_or_else(|_| PLACEHOLDER.into()));
        let env: &dyn Fn(&str) -> Option<String> = if args.check_env { &strict } else { &lenient };
        match parse_policy(&text, env) {
            Ok(policy) => {
                if !args.quiet {
                    for line in summary(&file.display().to_string(), &policy) {
                        println!("{line}");
                    }
                }
            }
            Err(e) => {
                invalid = true;
                // file:line:column: like compilers, so editors can jump to it.
                let position = match (e.line, e.column) {
                    (Some(l), Some(c)) => format!("{l}:{c}:"),
                    _ => String::new(),
                };
                let path = if e.path.is_empty() { "$" } else { &e.path };
                eprintln!("{}:{position} error: {path}: {}", file.display(), e.reason);
                if let (Some(line), Ok(text)) = (e.line, std::str::from_utf8(&text)) {
                    print_context(text, line, e.column.unwrap_or(1));
                }
            }
        }
    }
    if unreadable {
        ExitCode::from(2)
    } else if invalid {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
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
