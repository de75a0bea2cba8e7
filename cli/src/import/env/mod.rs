//! `gateguard import-env`: the portal backend's settings (`VALID_INPUT_PATHS`, `API_KEY_VALUES`,
//! `TOKEN_PROTECTED_PATHS_WITH_IP`, `TOKEN_PROTECTED_PATHS_WITHOUT_IP`) turned into an equivalent
//! policy: one API per input path, its function key injected upstream, replay protection per the
//! two lists. The keys stay out of the policy by default (`{"env": VAR}`); the variables the
//! operator must set are listed on standard error.

mod plan;
mod settings;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use gateguard_core::config::{ApiConfig, PolicyConfig};
use gateguard_core::jwt::fetch::is_discovery_uri;
use gateguard_core::jwt::{JwksConfig, JwtConfig};
use gateguard_core::replay::{ReplayConfig, ReplayMode};
use gateguard_core::value::ValueSource;

use crate::import::{self, Failure, DISCOVERY_SUFFIX};
use plan::{plan, PlannedApi};
use settings::KEY_VALUES;

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

pub fn run(args: &Args) -> ExitCode {
    import::exit_status("import-env", import(args))
}

fn import(args: &Args) -> Result<(), Failure> {
    let (settings, source) = settings::read(args.env_file.as_deref(), args.json.as_deref())?;
    let apis = plan(&|k| settings.get(k).cloned())?;
    let text = import::to_text(&policy_of(&apis, args)?)?;
    import::compile_and_write(&text, args.out.as_ref(), args.inline_keys, &str::to_string)?;
    report(&apis, args, &source);
    Ok(())
}

/// The policy: one API per planned path, the protected ones with the JWT flags' validation.
fn policy_of(apis: &[PlannedApi], args: &Args) -> Result<PolicyConfig, String> {
    let jwt = jwt_config(args, apis)?;
    gateguard_core::headers::check_upstream_header_name(&args.key_header)
        .map_err(|reason| format!("--key-header: {reason}"))?;
    let apis = apis.iter().map(|api| api_config(api, args, jwt.as_ref()));
    Ok(import::policy(apis.collect()))
}

fn api_config(api: &PlannedApi, args: &Args, jwt: Option<&JwtConfig>) -> ApiConfig {
    let protection = api.replay.zip(jwt);
    let key = if args.inline_keys {
        ValueSource::Value(api.key.clone())
    } else {
        ValueSource::Env(api.key_var.clone())
    };
    ApiConfig {
        name: api.name.clone(),
        path_prefix: api.path.clone(),
        cors: None,
        ip_filter: None,
        client_certificate: None,
        subscription_key: None,
        jwt: protection.map(|(_, jwt)| jwt.clone()),
        replay: protection.map(|(mode, _)| ReplayConfig { mode }),
        inject_headers: BTreeMap::from([(args.key_header.clone(), key)]),
        ..ApiConfig::default()
    }
}

/// The JWT validation of replay-protected APIs, from the command line; `None` when no path is
/// protected. gateguard checks replay only for tokens it has verified, so it needs one.
fn jwt_config(args: &Args, apis: &[PlannedApi]) -> Result<Option<JwtConfig>, String> {
    let protected: Vec<String> = apis
        .iter()
        .filter_map(|a| Some(format!("{} in {}", a.path, plan::list_of(a.replay?))))
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
        (None, Some(uri)) if is_discovery_uri(uri) => uri.clone(),
        (None, Some(uri)) => {
            return Err(format!(
                "--openid-config {uri:?} must end with {DISCOVERY_SUFFIX} (for a JWKS URL use \
                 --jwks-uri)"
            ))
        }
        (None, None) => String::new(),
    };
    let (issuers, audiences) = (args.issuer.clone(), args.audience.clone());
    let mut jwt = JwtConfig::accepting(issuers, audiences, args.algorithm.clone())
        .map_err(|e| format!("cannot build the jwt block: {e}"))?;
    jwt.jwks = Some(JwksConfig {
        inline: None,
        cluster: Some(args.jwks_cluster.clone().unwrap_or_default()),
        uri: Some(uri),
        refresh_seconds: None,
    });
    Ok(Some(jwt))
}

/// What was written and what the operator must do next, on standard error. Every line but the
/// `VAR=value` ones starts with `#`, so `2> keys.env` with --print-secrets is a usable .env file.
fn report(apis: &[PlannedApi], args: &Args, source: &str) {
    let names: Vec<String> = apis
        .iter()
        .map(|a| {
            let mode = match a.replay {
                Some(ReplayMode::WithIp) => " (replay: with_ip)",
                Some(ReplayMode::WithoutIp) => " (replay: without_ip)",
                None => "",
            };
            format!("{} {}{mode}", a.name, a.path)
        })
        .collect();
    let target = import::target(args.out.as_ref());
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
    use serde_json::{json, Value};
    use settings::{INPUT_PATHS, WITHOUT_IP, WITH_IP};

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
        let text = import::to_text(&policy_of(&apis, &a)?).map_err(|e| e.to_string())?;
        gateguard_core::parse_policy(text.as_bytes(), &import::placeholder_env)
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
}
