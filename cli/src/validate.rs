//! `gateguard validate`: the filter's own parser and compiler, run before deployment.

use std::path::PathBuf;
use std::process::ExitCode;

use gateguard_core::parse_policy;

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
                    let names: Vec<&str> = policy.apis.iter().map(|a| a.name.as_str()).collect();
                    println!(
                        "{}: ok ({} APIs: {})",
                        file.display(),
                        names.len(),
                        names.join(", ")
                    );
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

/// The offending line with its neighbours and a caret, as 3scale's filter shows config errors.
fn print_context(text: &str, line: usize, column: usize) {
    let lines: Vec<&str> = text.lines().collect();
    let first = line.saturating_sub(2).max(1);
    let last = (line + 1).min(lines.len());
    for n in first..=last {
        if let Some(l) = lines.get(n - 1) {
            eprintln!("{n:>5} | {l}");
            if n == line {
                eprintln!("      | {}^", " ".repeat(column.saturating_sub(1)));
            }
        }
    }
}
