//! `gateguard import-env`: the portal backend's settings (`VALID_INPUT_PATHS`, `API_KEY_VALUES`,
//! `TOKEN_PROTECTED_PATHS_WITH_IP`, `TOKEN_PROTECTED_PATHS_WITHOUT_IP`) turned into an equivalent
//! policy: one API per input path, its function key injected upstream, replay protection per the
//! two lists. The keys stay out of the policy by default (`{"env": VAR}`); the variables the
//! operator must set are listed on standard error.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::{json, Map, Value};

const INPUT_PATHS: &str = "VALID_INPUT_PATHS";
const KEY_VALUES: &str = "API_KEY_VALUES";
const WITH_IP: &str = "TOKEN_PROTECTED_PATHS_WITH_IP";
const WITHOUT_IP: &str = "TOKEN_PROTECTED_PATHS_WITHOUT_IP";
const SETTINGS: [&str; 4] = [INPUT_PATHS, KEY_VALUES, WITH_IP, WITHOUT_IP];
const DISCOVERY_SUFFIX: &str = "/.well-known/openid-configuration";
const MAX_NAME: usize = 64;

#[derive(clap::Args)]
pub struct Args {
    /// Read the settings from a .env file (KEY=VALUE lines, `#` comments, optional `export `,
    /// optional quotes) instead of this process's environment.
    #[arg(long, value_name = "FILE", conflicts_with = "json")]
    env_file: Option<PathBuf>,
    /// Read the settings from a JSON file: an object {"VALID_INPUT_PATHS": "...", ...} or App
    /// Service's exported app settings [{"name": ..., "value": ..., "slotSetting": ...}].
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the policy here instead of standard output.
    #[arg(long, short, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Upstream header that carries each path's key (the portal backend sent x-functions-key).
    #[arg(long, default_value = "x-functions-key", value_name = "NAME")]
    key_header: String,
    /// Not recommended: write the keys into the policy as {"value": ...} instead of
    /// {"env": "GATEGUARD_KEY_<NAME>"}. The policy file then holds secrets.
    #[arg(long)]
    inline_keys: bool,
    /// Print the key values next to the variable names on standard error (VAR=value lines).
    #[arg(long)]
    print_secrets: bool,
    /// Accepted token issuer (`iss`) for replay-protected paths; repeatable.
    #[arg(long, value_name = "ISS")]
    issuer: Vec<String>,
    /// Accepted token audience (`aud`) for replay-protected paths; repeatable.
    #[arg(long, value_name = "AUD")]
    audience: Vec<String>,
    /// Allowed signature algorithm for replay-protected paths; repeatable.
    #[arg(long, value_name = "ALG", default_value = "RS256")]
    algorithm: Vec<String>,
    /// The identity provider's JWKS URL (fetched through --jwks-cluster).
    #[arg(long, value_name = "URI", conflicts_with = "openid_config")]
    jwks_uri: Option<String>,
    /// The identity provider's OpenID discovery URL (…/.well-known/openid-configuration);
    /// the filter learns jwks_uri from it.
    #[arg(long, value_name = "URI")]
    openid_config: Option<String>,
    /// Envoy cluster that reaches the identity provider (`gateguard render` defines it).
    #[arg(long, value_name = "NAME")]
    jwks_cluster: Option<String>,
}

/// A failure, with the process exit code: 2 for an unreadable file, 1 for everything else.
struct Failure(u8, String);

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure(1, message)
    }
}

pub fn run(args: &Args) -> ExitCode {
    match import(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, message)) => {
            eprintln!("gateguard import-env: error: {message}");
            ExitCode::from(code)
        }
    }
}

fn import(args: &Args) -> Result<(), Failure> {
    let (settings, source) = read_settings(args)?;
    let apis = plan(&|k| settings.get(k).cloned())?;
    let jwt = jwt_block(args, &apis)?;
    let text = render(&apis, args, jwt.as_ref())?;
    if let Err(e) = gateguard_core::parse_policy(text.as_bytes(), &|_| Some("x".into())) {
        return Err(format!("the generated policy does not validate: {e}").into());
    }
    match &args.out {
        Some(path) => crate::output::write_policy(path, &text, args.inline_keys)
            .map_err(|e| Failure(2, format!("{}: cannot write: {e}", path.display())))?,
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(|e| format!("cannot write to standard output: {e}"))?;
        }
    }
    report(&apis, args, &source);
    Ok(())
}

/// The settings, from the file named on the command line or this process's environment.
fn read_settings(args: &Args) -> Result<(BTreeMap<String, String>, String), Failure> {
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path)
            .map_err(|e| Failure(2, format!("{}: cannot read: {e}", path.display())))
    };
    if let Some(path) = &args.env_file {
        let map = parse_dotenv(&read(path)?)
            .and_then(|m| unresolved(&m).map(|()| m))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        return Ok((map, path.display().to_string()));
    }
    if let Some(path) = &args.json {
        let map = parse_json(&read(path)?)
            .and_then(|m| unresolved(&m).map(|()| m))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        return Ok((map, path.display().to_string()));
    }
    for (name, _) in std::env::vars_os() {
        if let Some(e) = name.to_str().and_then(near_miss) {
            return Err(format!("in the environment: {e}").into());
        }
    }
    let mut map = BTreeMap::new();
    for key in SETTINGS {
        match std::env::var(key) {
            Ok(v) => {
                map.insert(key.to_string(), v);
            }
            Err(std::env::VarError::NotPresent) => {}
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(format!("{key} is not valid UTF-8").into())
            }
        }
    }
    unresolved(&map)?;
    Ok((map, "the environment".into()))
}

/// A name that looks like one of the settings without being it (another letter case, `-` for
/// `_`, a singular): the portal backend may well read it (App Service on Windows ignores case),
/// this command would not, and a protected path would lose its token check without a word.
fn near_miss(name: &str) -> Option<String> {
    if SETTINGS.contains(&name) {
        return None;
    }
    let canon = name
        .trim()
        .to_ascii_uppercase()
        .replace(['-', '.', ' '], "_");
    if let Some(same) = SETTINGS.iter().find(|s| **s == canon) {
        return Some(format!(
            "{name:?} looks like {same}, but names must match exactly: rename it, or remove it \
             if it is not read"
        ));
    }
    let like: Vec<&str> = SETTINGS
        .iter()
        .filter(|s| {
            let stem = s
                .trim_end_matches("_WITH_IP")
                .trim_end_matches("_WITHOUT_IP");
            let stem = stem.trim_end_matches('S');
            canon.starts_with(stem)
        })
        .copied()
        .collect();
    (!like.is_empty()).then(|| {
        format!(
            "{name:?} looks like {}, but names must match exactly: rename it, or remove it if \
             it is not read",
            like.join(" or ")
        )
    })
}

/// The settings' values must be the values: a `${VAR}` the .env loader would expand, or an
/// App Service Key Vault reference, is not resolved here. Names the setting, never its value.
fn unresolved(settings: &BTreeMap<String, String>) -> Result<(), String> {
    for key in SETTINGS {
        let Some(value) = settings.get(key) else {
            continue;
        };
        let reference = if value.contains("${") {
            "another variable (${...})"
        } else if value
            .trim_start()
            .to_ascii_lowercase()
            .starts_with("@microsoft.keyvault(")
        {
            "a Key Vault secret (@Microsoft.KeyVault(...))"
        } else {
            continue;
        };
        return Err(format!(
            "{key} refers to {reference}, which import-env does not resolve: give the value \
             itself (in the environment, or with --env-file/--json)"
        ));
    }
    Ok(())
}

/// A .env file: `KEY=VALUE` lines, blank lines and `#` comments, an optional `export ` prefix,
/// values optionally in single quotes (literal) or double quotes (`\"` and `\\` escapes), and
/// ` # comment` after a value. Errors name the line, never its content (it may hold a key).
fn parse_dotenv(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    let mut lines = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = match line.strip_prefix("export") {
            Some(rest) if rest.starts_with([' ', '\t']) => rest.trim_start(),
            _ => line,
        };
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("line {line_no}: expected KEY=VALUE"));
        };
        let key = key.trim();
        let identifier = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if !identifier {
            return Err(format!(
                "line {line_no}: expected KEY=VALUE (KEY of letters, digits, \"_\" and \".\")"
            ));
        }
        if let Some(e) = near_miss(key) {
            return Err(format!("line {line_no}: {e}"));
        }
        let value = dotenv_value(value.trim_start()).map_err(|e| format!("line {line_no}: {e}"))?;
        if SETTINGS.contains(&key) {
            if let Some(first) = lines.insert(key.to_string(), line_no) {
                return Err(format!(
                    "line {line_no}: {key} is set again (first on line {first}); keep one"
                ));
            }
        }
        map.insert(key.to_string(), value);
    }
    Ok(map)
}

fn dotenv_value(raw: &str) -> Result<String, String> {
    let mut chars = raw.char_indices();
    let quote = match raw.chars().next() {
        Some(q @ ('"' | '\'')) => q,
        _ => {
            // Unquoted: a `#` after whitespace starts a comment.
            let end = raw
                .char_indices()
                .find(|&(i, c)| c == '#' && i > 0 && raw[..i].ends_with(char::is_whitespace))
                .map_or(raw.len(), |(i, _)| i);
            return Ok(raw[..end].trim_end().to_string());
        }
    };
    chars.next();
    let mut value = String::new();
    let mut rest = None;
    while let Some((i, c)) = chars.next() {
        if c == quote {
            rest = Some(&raw[i + 1..]);
            break;
        }
        if c == '\\' && quote == '"' {
            match chars.next() {
                Some((_, e @ ('"' | '\\'))) => value.push(e),
                Some((_, e)) => {
                    value.push('\\');
                    value.push(e);
                }
                None => break,
            }
        } else {
            value.push(c);
        }
    }
    let Some(rest) = rest else {
        return Err(format!(
            "unterminated {quote} quote (values must fit on one line)"
        ));
    };
    let rest = rest.trim_start();
    if !rest.is_empty() && !rest.starts_with('#') {
        return Err("unexpected text after the closing quote".into());
    }
    Ok(value)
}

/// A JSON object of string settings, or App Service's exported app-settings array.
fn parse_json(text: &str) -> Result<BTreeMap<String, String>, String> {
    let doc: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let mut map = BTreeMap::new();
    match doc {
        Value::Object(object) => {
            for (key, value) in object {
                if let Some(e) = near_miss(&key) {
                    return Err(e);
                }
                if !SETTINGS.contains(&key.as_str()) {
                    continue;
                }
                let Value::String(s) = value else {
                    return Err(format!("{key}: must be a string"));
                };
                map.insert(key, s);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let name = item.get("name").and_then(Value::as_str);
                let value = item.get("value");
                let (Some(name), Some(value)) = (name, value) else {
                    return Err(format!(
                        "[{i}]: expected {{\"name\": \"...\", \"value\": \"...\"}} (App Service's \
                         app-settings format)"
                    ));
                };
                if let Some(e) = near_miss(name) {
                    return Err(format!("[{i}]: {e}"));
                }
                if !SETTINGS.contains(&name) {
                    continue;
                }
                let Value::String(s) = value else {
                    return Err(format!("[{i}] ({name}): \"value\" must be a string"));
                };
                if map.insert(name.to_string(), s.clone()).is_some() {
                    return Err(format!("[{i}]: {name} is set twice"));
                }
            }
        }
        _ => {
            return Err(
                "expected an object of settings or an array of {\"name\", \"value\"} entries"
                    .into(),
            )
        }
    }
    Ok(map)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replay {
    WithIp,
    WithoutIp,
}

/// One API of the generated policy.
#[derive(Debug)]
struct PlannedApi {
    name: String,
    path: String,
    /// `VALID_INPUT_PATHS[index]`, for messages.
    index: usize,
    key: String,
    key_var: String,
    replay: Option<Replay>,
}

/// Splits a semicolon-separated setting: entries trimmed, one trailing `;` ignored, an empty
/// entry is an error naming the variable and index. Unset or blank is an empty list.
fn split_list(name: &str, value: Option<&str>) -> Result<Vec<String>, String> {
    let value = value.unwrap_or("").trim();
    if value.is_empty() {
        return Ok(Vec::new());
    }
    let value = value.strip_suffix(';').unwrap_or(value);
    value
        .split(';')
        .enumerate()
        .map(|(i, entry)| {
            let entry = entry.trim();
            if entry.is_empty() {
                Err(format!(
                    "{name}[{i}] is empty (entries are separated by \";\")"
                ))
            } else {
                Ok(entry.to_string())
            }
        })
        .collect()
}

/// `api`, `/api/` and ` /api ` are all `/api`; `/` stays `/`.
fn normalize_path(entry: &str) -> String {
    let trimmed = entry.trim_matches('/');
    format!("/{trimmed}")
}

fn check_path(name: &str, i: usize, entry: &str) -> Result<String, String> {
    let path = normalize_path(entry);
    gateguard_core::path::validate_prefix(&path)
        .map_err(|reason| format!("{name}[{i}]: {reason}"))?;
    Ok(path)
}

/// `/api` → `api`, `/api/v2` → `api_v2`, `/` → `root`; other characters become `_`.
fn api_name(path: &str) -> String {
    let base: String = path
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_NAME)
        .collect();
    if base.is_empty() {
        "root".into()
    } else {
        base
    }
}

/// `base`, or `base_2`, `base_3`... (kept within `max` characters) if `taken` says it is used.
fn unique(base: &str, max: usize, taken: impl Fn(&str) -> bool) -> String {
    if !taken(base) {
        return base.to_string();
    }
    (2..)
        .map(|n| {
            let suffix = format!("_{n}");
            let keep = base.len().min(max.saturating_sub(suffix.len()));
            format!("{}{suffix}", &base[..keep])
        })
        .find(|candidate| !taken(candidate))
        .unwrap_or_default()
}

fn key_var(name: &str) -> String {
    format!(
        "GATEGUARD_KEY_{}",
        name.to_ascii_uppercase().replace('-', "_")
    )
}

/// The APIs the settings describe, or the first thing wrong with them.
fn plan(get: &dyn Fn(&str) -> Option<String>) -> Result<Vec<PlannedApi>, String> {
    let Some(inputs) = get(INPUT_PATHS) else {
        return Err(format!(
            "{INPUT_PATHS} is not set (semicolon-separated paths such as \"/api;/demapi\")"
        ));
    };
    let inputs = split_list(INPUT_PATHS, Some(&inputs))?;
    if inputs.is_empty() {
        return Err(format!(
            "{INPUT_PATHS} is empty: it needs at least one path"
        ));
    }
    let Some(keys) = get(KEY_VALUES) else {
        return Err(format!(
            "{KEY_VALUES} is not set: it needs one key per {INPUT_PATHS} entry ({} here), \
             {KEY_VALUES}[i] belonging to {INPUT_PATHS}[i]",
            inputs.len()
        ));
    };
    let keys = split_list(KEY_VALUES, Some(&keys))?;
    if keys.len() != inputs.len() {
        let detail = if keys.len() < inputs.len() {
            format!(
                "{KEY_VALUES}[{i}] (for {INPUT_PATHS}[{i}] {:?}) is missing",
                inputs[keys.len()],
                i = keys.len()
            )
        } else {
            format!(
                "{KEY_VALUES}[{i}] has no path ({INPUT_PATHS}[{i}] does not exist)",
                i = inputs.len()
            )
        };
        return Err(format!(
            "{INPUT_PATHS} has {} entries but {KEY_VALUES} has {}: {detail}; \
             {KEY_VALUES}[i] belongs to {INPUT_PATHS}[i]",
            inputs.len(),
            keys.len()
        ));
    }

    let mut apis: Vec<PlannedApi> = Vec::new();
    for (i, (entry, key)) in inputs.iter().zip(keys).enumerate() {
        let path = check_path(INPUT_PATHS, i, entry)?;
        if let Some(other) = apis.iter().find(|a| a.path.eq_ignore_ascii_case(&path)) {
            return Err(format!(
                "{INPUT_PATHS}[{i}]: {path:?} repeats {INPUT_PATHS}[{}] (paths match \
                 case-insensitively)",
                other.index
            ));
        }
        if key.chars().any(char::is_control) {
            return Err(format!("{KEY_VALUES}[{i}] contains a control character"));
        }
        let name = unique(&api_name(&path), MAX_NAME, |n| {
            apis.iter().any(|a| a.name == n)
        });
        let var = unique(&key_var(&name), usize::MAX, |v| {
            apis.iter().any(|a| a.key_var == v)
        });
        apis.push(PlannedApi {
            name,
            path,
            index: i,
            key,
            key_var: var,
            replay: None,
        });
    }

    let mut seen: Vec<(String, &str, usize)> = Vec::new();
    for (list, mode) in [(WITH_IP, Replay::WithIp), (WITHOUT_IP, Replay::WithoutIp)] {
        for (i, entry) in split_list(list, get(list).as_deref())?.iter().enumerate() {
            let path = check_path(list, i, entry)?;
            if let Some((_, other, j)) = seen.iter().find(|(p, _, _)| p.eq_ignore_ascii_case(&path))
            {
                return Err(if *other == list {
                    format!("{list}[{i}]: {path:?} repeats {list}[{j}]")
                } else {
                    format!(
                        "{list}[{i}]: {path:?} is also in {other}[{j}]; a path has one replay \
                         mode, choose one list"
                    )
                });
            }
            let Some(api) = apis.iter_mut().find(|a| a.path.eq_ignore_ascii_case(&path)) else {
                let known: Vec<&str> = inputs.iter().map(String::as_str).collect();
                return Err(format!(
                    "{list}[{i}]: {path:?} is not one of {INPUT_PATHS} ({})",
                    known.join(";")
                ));
            };
            api.replay = Some(mode);
            seen.push((path, list, i));
        }
    }
    Ok(apis)
}

/// The `jwt` block for replay-protected APIs, from the command line; `None` when no path is
/// protected. gateguard checks replay only for tokens it has verified, so it needs one.
fn jwt_block(args: &Args, apis: &[PlannedApi]) -> Result<Option<Value>, String> {
    let protected: Vec<String> = apis
        .iter()
        .filter_map(|a| match a.replay? {
            Replay::WithIp => Some(format!("{} in {WITH_IP}", a.path)),
            Replay::WithoutIp => Some(format!("{} in {WITHOUT_IP}", a.path)),
        })
        .collect();
    if protected.is_empty() {
        return Ok(None);
    }
    let mut missing = Vec::new();
    if args.issuer.is_empty() {
        missing.push("--issuer ISS");
    }
    if args.audience.is_empty() {
        missing.push("--audience AUD");
    }
    if args.jwks_uri.is_none() && args.openid_config.is_none() {
        missing.push("--jwks-uri URI or --openid-config URI");
    }
    if args.jwks_cluster.is_none() {
        missing.push("--jwks-cluster NAME");
    }
    if !missing.is_empty() {
        return Err(format!(
            "replay protection ({}) checks only tokens gateguard has verified, so these APIs \
             need JWT validation: add {}",
            protected.join(", "),
            missing.join(", ")
        ));
    }
    let uri = match (&args.jwks_uri, &args.openid_config) {
        (Some(uri), _) => uri.clone(),
        (None, Some(uri)) => {
            let path = uri.split(['?', '#']).next().unwrap_or_default();
            if !path.ends_with(DISCOVERY_SUFFIX) {
                return Err(format!(
                    "--openid-config {uri:?} must end with {DISCOVERY_SUFFIX} (for a JWKS URL \
                     use --jwks-uri)"
                ));
            }
            uri.clone()
        }
        (None, None) => String::new(),
    };
    Ok(Some(json!({
        "issuers": args.issuer,
        "audiences": args.audience,
        "algorithms": args.algorithm,
        "jwks": {
            "cluster": args.jwks_cluster.clone().unwrap_or_default(),
            "uri": uri,
        },
    })))
}

/// The policy document, pretty-printed, `$schema` first.
fn render(apis: &[PlannedApi], args: &Args, jwt: Option<&Value>) -> Result<String, String> {
    gateguard_core::headers::check_upstream_header_name(&args.key_header)
        .map_err(|reason| format!("--key-header: {reason}"))?;
    let mut list = Vec::new();
    for api in apis {
        let mut object = Map::new();
        object.insert("name".into(), json!(api.name));
        object.insert("path_prefix".into(), json!(api.path));
        if let (Some(mode), Some(jwt)) = (api.replay, jwt) {
            object.insert("jwt".into(), jwt.clone());
            let mode = match mode {
                Replay::WithIp => "with_ip",
                Replay::WithoutIp => "without_ip",
            };
            object.insert("replay".into(), json!({ "mode": mode }));
        }
        let source = if args.inline_keys {
            json!({ "value": api.key })
        } else {
            json!({ "env": api.key_var })
        };
        object.insert(
            "inject_headers".into(),
            json!({ args.key_header.as_str(): source }),
        );
        list.push(Value::Object(object));
    }
    crate::output::policy_text(list)
}

/// What was written and what the operator must do next, on standard error. Every line but the
/// `VAR=value` ones starts with `#`, so `2> keys.env` with --print-secrets is a usable .env file.
fn report(apis: &[PlannedApi], args: &Args, source: &str) {
    let names: Vec<String> = apis
        .iter()
        .map(|a| {
            let mode = match a.replay {
                Some(Replay::WithIp) => " (replay: with_ip)",
                Some(Replay::WithoutIp) => " (replay: without_ip)",
                None => "",
            };
            format!("{} {}{mode}", a.name, a.path)
        })
        .collect();
    let target = args.out.as_ref().map_or_else(
        || "standard output".to_string(),
        |p| p.display().to_string(),
    );
    eprintln!(
        "# gateguard import-env: {} APIs from {source} to {target}: {}",
        apis.len(),
        names.join(", ")
    );
    if apis.iter().all(|a| a.replay.is_none())
        && (!args.issuer.is_empty() || args.jwks_uri.is_some() || args.openid_config.is_some())
    {
        eprintln!("# note: no path is token-protected, so the JWT flags were not used");
    }
    if args.inline_keys {
        eprintln!(
            "# warning: --inline-keys wrote the function keys into the policy; treat it as a \
             secret (an {{\"env\": ...}} reference per key is recommended)"
        );
        return;
    }
    eprintln!(
        "# Set these in Envoy's environment (`gateguard render` lists them in \
         vm_config.environment_variables.host_env_keys):"
    );
    for api in apis {
        if args.print_secrets {
            eprintln!("{}={}", api.key_var, api.key);
        } else {
            eprintln!(
                "#   {}=...   ({KEY_VALUES}[{}], for {})",
                api.key_var, api.index, api.path
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(flags: &[&str]) -> Args {
        let mut argv = vec!["import-env"];
        argv.extend_from_slice(flags);
        Cli::try_parse_from(argv).unwrap().args
    }

    const JWT_FLAGS: &[&str] = &[
        "--issuer",
        "https://login.example.com/t/v2.0",
        "--audience",
        "api://pf",
        "--jwks-uri",
        "https://login.example.com/t/discovery/v2.0/keys",
        "--jwks-cluster",
        "idp",
    ];

    fn settings(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn plan_of(pairs: &[(&str, &str)]) -> Result<Vec<PlannedApi>, String> {
        plan(&settings(pairs))
    }

    fn policy(pairs: &[(&str, &str)], flags: &[&str]) -> Result<Value, String> {
        let a = args(flags);
        let apis = plan_of(pairs)?;
        let jwt = jwt_block(&a, &apis)?;
        let text = render(&apis, &a, jwt.as_ref())?;
        gateguard_core::parse_policy(text.as_bytes(), &|_| Some("x".into()))
            .map_err(|e| e.to_string())?;
        Ok(serde_json::from_str(&text).unwrap())
    }

    const SEED: &[(&str, &str)] = &[
        (INPUT_PATHS, "/api;/testharnessapi;/demapi"),
        (KEY_VALUES, "k-api;k-test;k-dem"),
        (WITH_IP, "/api;/testharnessapi"),
        (WITHOUT_IP, "/demapi"),
    ];

    #[test]
    fn seed_example_becomes_three_apis() {
        let p = policy(SEED, JWT_FLAGS).unwrap();
        let text = serde_json::to_string(&p).unwrap();
        assert!(text.starts_with("{\"$schema\":\"./gateguard.schema.json\""));
        let apis = p["apis"].as_array().unwrap();
        let names: Vec<&str> = apis.iter().map(|a| a["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["api", "testharnessapi", "demapi"]);
        assert_eq!(apis[0]["replay"]["mode"], "with_ip");
        assert_eq!(apis[1]["replay"]["mode"], "with_ip");
        assert_eq!(apis[2]["replay"]["mode"], "without_ip");
        assert_eq!(
            apis[2]["inject_headers"]["x-functions-key"]["env"],
            "GATEGUARD_KEY_DEMAPI"
        );
        assert_eq!(apis[0]["jwt"]["algorithms"], json!(["RS256"]));
        assert_eq!(apis[0]["jwt"]["jwks"]["cluster"], "idp");
        assert!(!text.contains("k-api"), "keys stay out of the policy");
    }

    #[test]
    fn unprotected_paths_need_no_jwt_flags() {
        let p = policy(&[(INPUT_PATHS, " api/ ; / ;"), (KEY_VALUES, "a;b;")], &[]).unwrap();
        assert_eq!(p["apis"][0]["path_prefix"], "/api");
        assert_eq!(p["apis"][1]["name"], "root");
        assert_eq!(p["apis"][1]["path_prefix"], "/");
        assert!(p["apis"][0].get("jwt").is_none());
    }

    #[test]
    fn names_and_variables_are_valid_and_unique() {
        assert_eq!(api_name("/api/v2"), "api_v2");
        assert_eq!(api_name("/a.b"), "a_b");
        assert_eq!(api_name(&format!("/{}", "x".repeat(100))).len(), 64);
        let apis = plan_of(&[
            (INPUT_PATHS, "/a.b;/a_b;/a-b;/root;/"),
            (KEY_VALUES, "1;2;3;4;5"),
        ])
        .unwrap();
        let names: Vec<&str> = apis.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["a_b", "a_b_2", "a-b", "root", "root_2"]);
        let vars: Vec<&str> = apis.iter().map(|a| a.key_var.as_str()).collect();
        assert_eq!(
            vars,
            [
                "GATEGUARD_KEY_A_B",
                "GATEGUARD_KEY_A_B_2",
                "GATEGUARD_KEY_A_B_3",
                "GATEGUARD_KEY_ROOT",
                "GATEGUARD_KEY_ROOT_2"
            ]
        );
        let long = format!("/{};/{}-", "y".repeat(70), "y".repeat(64));
        let apis = plan_of(&[(INPUT_PATHS, long.as_str()), (KEY_VALUES, "1;2")]).unwrap();
        assert_eq!(apis[1].name.len(), 64);
        assert!(apis[1].name.ends_with("_2"));
    }

    #[test]
    fn list_errors_name_variable_and_index() {
        let e = plan_of(&[(INPUT_PATHS, "/a;/b;/c"), (KEY_VALUES, "1;2")]).unwrap_err();
        assert!(
            e.contains("API_KEY_VALUES[2]") && e.contains("\"/c\""),
            "{e}"
        );
        let e = plan_of(&[(INPUT_PATHS, "/a"), (KEY_VALUES, "1;2")]).unwrap_err();
        assert!(e.contains("API_KEY_VALUES[1]"), "{e}");
        let e = plan_of(&[(INPUT_PATHS, "/a;;/b"), (KEY_VALUES, "1;2;3")]).unwrap_err();
        assert!(e.contains("VALID_INPUT_PATHS[1] is empty"), "{e}");
        let e = plan_of(&[(INPUT_PATHS, "/a;/A"), (KEY_VALUES, "1;2")]).unwrap_err();
        assert!(
            e.contains("VALID_INPUT_PATHS[1]") && e.contains("[0]"),
            "{e}"
        );
        let e = plan_of(&[(KEY_VALUES, "1")]).unwrap_err();
        assert!(e.contains("VALID_INPUT_PATHS is not set"), "{e}");
        let e = plan_of(&[(INPUT_PATHS, "/a")]).unwrap_err();
        assert!(e.contains("API_KEY_VALUES is not set"), "{e}");
        let e = plan_of(&[(INPUT_PATHS, "/a/../b"), (KEY_VALUES, "1")]).unwrap_err();
        assert!(e.starts_with("VALID_INPUT_PATHS[0]:"), "{e}");
        let e = plan_of(&[(INPUT_PATHS, "/a;/b"), (KEY_VALUES, "1; ")]).unwrap_err();
        assert!(e.contains("has 1"), "{e}");
    }

    #[test]
    fn protected_list_errors() {
        let base = [(INPUT_PATHS, "/a;/b"), (KEY_VALUES, "1;2")];
        let with = |extra: (&'static str, &'static str)| {
            let mut v = base.to_vec();
            v.push(extra);
            plan_of(&v)
        };
        let e = with((WITH_IP, "/a;/c")).unwrap_err();
        assert!(
            e.contains("TOKEN_PROTECTED_PATHS_WITH_IP[1]") && e.contains("/c"),
            "{e}"
        );
        let e = with((WITHOUT_IP, "/a;;")).unwrap_err();
        assert!(
            e.contains("TOKEN_PROTECTED_PATHS_WITHOUT_IP[1] is empty"),
            "{e}"
        );
        let e = with((WITH_IP, "/b;/B")).unwrap_err();
        assert!(e.contains("repeats"), "{e}");
        let e = plan_of(&[base[0], base[1], (WITH_IP, "/a"), (WITHOUT_IP, "/b;a/")]).unwrap_err();
        assert!(
            e.contains("TOKEN_PROTECTED_PATHS_WITHOUT_IP[1]")
                && e.contains("TOKEN_PROTECTED_PATHS_WITH_IP[0]"),
            "{e}"
        );
        let apis = with((WITHOUT_IP, "b/")).unwrap();
        assert_eq!(apis[1].replay, Some(Replay::WithoutIp));
        assert_eq!(apis[0].replay, None);
    }

    #[test]
    fn protected_paths_require_jwt_flags() {
        let e = policy(SEED, &[]).unwrap_err();
        for flag in [
            "--issuer",
            "--audience",
            "--jwks-uri",
            "--openid-config",
            "--jwks-cluster",
        ] {
            assert!(e.contains(flag), "{e}");
        }
        let e = policy(SEED, &["--issuer", "i", "--audience", "a"]).unwrap_err();
        assert!(
            !e.contains("--issuer") && e.contains("--jwks-cluster"),
            "{e}"
        );
        let e = policy(
            SEED,
            &[
                "--issuer",
                "i",
                "--audience",
                "a",
                "--openid-config",
                "https://x/keys",
                "--jwks-cluster",
                "c",
            ],
        )
        .unwrap_err();
        assert!(e.contains(DISCOVERY_SUFFIX), "{e}");
        let p = policy(
            SEED,
            &[
                "--issuer",
                "i1",
                "--issuer",
                "i2",
                "--audience",
                "a",
                "--openid-config",
                "https://x/t/v2.0/.well-known/openid-configuration",
                "--jwks-cluster",
                "c",
            ],
        )
        .unwrap();
        assert_eq!(p["apis"][0]["jwt"]["issuers"], json!(["i1", "i2"]));
        assert!(p["apis"][0]["jwt"]["jwks"]["uri"]
            .as_str()
            .unwrap()
            .ends_with(DISCOVERY_SUFFIX));
    }

    #[test]
    fn inline_keys_and_header_name() {
        let mut flags = JWT_FLAGS.to_vec();
        flags.extend(["--inline-keys", "--key-header", "x-api-key"]);
        let p = policy(SEED, &flags).unwrap();
        assert_eq!(
            p["apis"][1]["inject_headers"]["x-api-key"]["value"],
            "k-test"
        );
        let e = policy(SEED, &[JWT_FLAGS, &["--key-header", "host"]].concat()).unwrap_err();
        assert!(e.contains("--key-header"), "{e}");
        let e = plan_of(&[(INPUT_PATHS, "/a"), (KEY_VALUES, "sekrit\u{7}y")]).unwrap_err();
        assert!(
            e.contains("API_KEY_VALUES[0]") && !e.contains("sekrit"),
            "{e}"
        );
    }

    #[test]
    fn dotenv_format() {
        let text = "# portal backend\n\
                    export VALID_INPUT_PATHS=\"/api;/demapi\"\n\
                    \n\
                    API_KEY_VALUES='a#1;b\"2' # keys\n\
                    TOKEN_PROTECTED_PATHS_WITH_IP=/api # comment\n\
                    TOKEN_PROTECTED_PATHS_WITHOUT_IP = \"/demapi\\\"\"\r\n\
                    OTHER=x#y\n";
        let m = parse_dotenv(text).unwrap();
        assert_eq!(m[INPUT_PATHS], "/api;/demapi");
        assert_eq!(m[KEY_VALUES], "a#1;b\"2");
        assert_eq!(m[WITH_IP], "/api");
        assert_eq!(m[WITHOUT_IP], "/demapi\"");
        assert_eq!(m["OTHER"], "x#y");
        let e = parse_dotenv("A=1\nsecret-without-equals\n").unwrap_err();
        assert!(e.starts_with("line 2:") && !e.contains("secret"), "{e}");
        assert!(parse_dotenv("A=\"open\n")
            .unwrap_err()
            .contains("unterminated"));
        assert!(parse_dotenv("A='x' y\n").is_err());
        assert!(parse_dotenv("k3y-with-dash==\n")
            .unwrap_err()
            .starts_with("line 1:"));
        assert_eq!(parse_dotenv("exportA=1\n").unwrap()["exportA"], "1");
    }

    #[test]
    fn json_formats() {
        let m =
            parse_json(r#"{"VALID_INPUT_PATHS": "/api", "API_KEY_VALUES": "k", "X": 5}"#).unwrap();
        assert_eq!(m[INPUT_PATHS], "/api");
        assert!(!m.contains_key("X"));
        let m = parse_json(
            r#"[{"name": "WEBSITE_RUN_FROM_PACKAGE", "value": "1", "slotSetting": false},
                {"name": "VALID_INPUT_PATHS", "value": "/api", "slotSetting": false},
                {"name": "API_KEY_VALUES", "value": "k", "slotSetting": true}]"#,
        )
        .unwrap();
        assert_eq!(m[KEY_VALUES], "k");
        assert!(parse_json(r#"{"VALID_INPUT_PATHS": ["/api"]}"#)
            .unwrap_err()
            .contains("VALID_INPUT_PATHS"));
        assert!(parse_json(r#"[{"value": "x"}]"#)
            .unwrap_err()
            .starts_with("[0]"));
        assert!(parse_json(
            r#"[{"name": "API_KEY_VALUES", "value": "a"}, {"name": "API_KEY_VALUES", "value": "b"}]"#
        )
        .unwrap_err()
        .contains("twice"));
        assert!(parse_json("\"x\"").is_err());
    }

    #[test]
    fn names_like_a_setting_are_refused_not_ignored() {
        for name in [
            "token_protected_paths_with_ip",
            "TOKEN_PROTECTED_PATH_WITH_IP",
            "Token-Protected-Paths-Without-Ip",
            "VALID_INPUT_PATH",
            "API_KEY_VALUE",
        ] {
            let e = near_miss(name).unwrap();
            assert!(e.contains(&format!("{name:?}")), "{e}");
            let e = parse_dotenv(&format!("VALID_INPUT_PATHS=/a\n{name}=/a\n")).unwrap_err();
            assert!(e.starts_with("line 2:"), "{e}");
            let e = parse_json(&format!(r#"{{"{name}": "/a"}}"#)).unwrap_err();
            assert!(e.contains("names must match exactly"), "{e}");
            let e = parse_json(&format!(r#"[{{"name": "{name}", "value": "/a"}}]"#)).unwrap_err();
            assert!(e.starts_with("[0]:"), "{e}");
        }
        for name in SETTINGS
            .iter()
            .chain(&["TOKEN_CACHE", "APIKEY", "WEBSITE_RUN_FROM_PACKAGE"])
        {
            assert_eq!(near_miss(name), None, "{name}");
        }
    }

    #[test]
    fn a_setting_set_twice_in_a_dotenv_is_refused() {
        let e = parse_dotenv(
            "TOKEN_PROTECTED_PATHS_WITH_IP=/api\nX=1\nTOKEN_PROTECTED_PATHS_WITH_IP=\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with("line 3:") && e.contains("first on line 1"),
            "{e}"
        );
    }

    #[test]
    fn references_are_refused_by_setting_name() {
        for value in [
            "${PROTECTED}",
            "/api;${MORE}",
            " @Microsoft.KeyVault(SecretUri=https://v/s/k)",
        ] {
            let map = BTreeMap::from([(KEY_VALUES.to_string(), value.to_string())]);
            let e = unresolved(&map).unwrap_err();
            assert!(e.starts_with("API_KEY_VALUES refers to"), "{e}");
            assert!(!e.contains("PROTECTED") && !e.contains("SecretUri"), "{e}");
        }
        let map = BTreeMap::from([("OTHER".to_string(), "${X}".to_string())]);
        assert!(unresolved(&map).is_ok());
    }
}
