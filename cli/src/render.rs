//! `gateguard render`: a complete, runnable Envoy configuration for a policy: listeners, the
//! function-app cluster, clusters for remote JWKS, TLS on both sides as the policy's `listener`
//! and `upstream` say, Envoy's `jwt_authn` in front when an API has it verify tokens, and the
//! filter with the policy embedded. The shipped `envoy.yaml` is this command's output for the
//! demo policy.

use std::path::PathBuf;
use std::process::ExitCode;

use gateguard_core::deploy::{
    ListenerPolicy, UpstreamClientCert, UpstreamPolicy, UpstreamTls, SYSTEM_CA_BUNDLE,
};
use gateguard_core::jwt::JwksSource;
use gateguard_core::replay::etcd::{EtcdPolicy, PASSWORD_ENV, USERNAME_ENV};
use gateguard_core::CompiledPolicy;
use serde_json::{json, Value};

use crate::validate::PLACEHOLDER;

#[derive(clap::Args)]
pub struct Args {
    /// The policy document to embed.
    #[arg(long)]
    policy: PathBuf,
    /// Write here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Path of gateguard.wasm where Envoy runs (in a container: the path inside it, e.g.
    /// /etc/gateguard/plugin.wasm from the OCI image). Written into the configuration as given,
    /// never read by render; a relative path is resolved from Envoy's working directory.
    #[arg(long, default_value = "target/wasm32-wasip1/release/gateguard.wasm")]
    wasm: String,
    /// Plain-HTTP listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// TLS listener (needs --tls-cert and --tls-key); requests a client certificate. Its TLS
    /// versions and cipher suites are the policy's `listener.tls` (TLS 1.2 up by default).
    #[arg(long, default_value = "127.0.0.1:8443")]
    tls_listen: String,
    /// The TLS listener's certificate chain (PEM); needs --tls-key. A path where Envoy runs
    /// (inside its container), written as given: render does not read it.
    #[arg(long)]
    tls_cert: Option<String>,
    /// The private key of --tls-cert (a path where Envoy runs, like --tls-cert).
    #[arg(long)]
    tls_key: Option<String>,
    /// Admin interface (/stats, /ready). Keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin: String,
    /// The function app behind the gateway, host:port. How to reach it (TLS, SNI, Host, client
    /// certificate) is the policy's `upstream.tls`.
    #[arg(long, default_value = "127.0.0.1:8081")]
    upstream: String,
    /// Kept for existing scripts: the same as the policy's `upstream.tls: {"sni": NAME}` (TLS
    /// verified against the system CAs, Host rewritten to NAME). Refused for a policy with
    /// `upstream.tls`: say it there.
    #[arg(long, value_name = "NAME")]
    upstream_sni: Option<String>,
    /// Deliver the filter through Envoy's extension config discovery from
    /// DIR/gateguard-filter.yaml, so a new policy takes effect without restarting Envoy:
    /// re-run with `--filter-only` to swap the policy (atomically; a policy Envoy refuses leaves
    /// the running one in place). DIR is where render writes the files, on this machine; where
    /// Envoy finds them is --ecds-envoy-dir.
    #[arg(long, value_name = "DIR")]
    ecds_dir: Option<PathBuf>,
    /// With --ecds-dir: the directory Envoy watches, as Envoy sees it (absolute), when that is
    /// not DIR on this machine: e.g. /etc/envoy/filter, where a ConfigMap holding DIR's files is
    /// mounted in Envoy's container. Default: DIR made absolute (Envoy runs where render does).
    #[arg(long, value_name = "PATH", requires = "ecds_dir")]
    ecds_envoy_dir: Option<String>,
    /// Answer requests for PATH (exactly, no query string) on every listener with Envoy's own
    /// health check, in front of gateguard: 200 while Envoy serves, 503 once it drains or
    /// `POST /healthcheck/fail` on the admin port says so. For Kubernetes probes and load
    /// balancers, which then need neither the admin port nor a way through the policy. The
    /// request never reaches gateguard or the function app; any other path (/healthz/x,
    /// /HEALTHZ, /healthz?x) goes through gateguard as usual.
    #[arg(long, value_name = "PATH")]
    health_path: Option<String>,
    /// With --ecds-dir: only (re)write DIR/gateguard-filter.yaml, the hot-reload step.
    #[arg(long, requires = "ecds_dir")]
    filter_only: bool,
    /// Log each request's status and gateguard's decision (outcome, API, refusal reason) to
    /// this file, `/dev/stdout` for the container log (docs/operations.md, "In the access log").
    /// A path where Envoy runs.
    #[arg(long, value_name = "PATH")]
    access_log: Option<String>,
    /// YAML, or JSON for tools that read it; Envoy reads either, telling them apart by the
    /// file's extension (.yaml, .json).
    #[arg(long, value_enum, default_value_t = Format::Yaml)]
    format: Format,
    /// An etcd client endpoint, HOST:PORT (repeat for each member), for a policy with
    /// `replay_store.etcd`: rendered as the HTTP/2 cluster the policy names. Required by such a
    /// policy, refused for any other.
    #[arg(long = "etcd", value_name = "HOST:PORT")]
    etcd: Vec<String>,
    /// Reach etcd over TLS and verify its certificate against this CA bundle (PEM). The
    /// certificate must name --etcd-sni, or else one of the --etcd hosts. Like every --etcd-*
    /// file, a path where Envoy runs, written as given.
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<String>,
    /// Client certificate (PEM) for etcd's `--client-cert-auth`; needs --etcd-key.
    #[arg(long, value_name = "FILE")]
    etcd_cert: Option<String>,
    /// The private key of --etcd-cert.
    #[arg(long, value_name = "FILE")]
    etcd_key: Option<String>,
    /// Reach etcd over TLS with this server name (SNI), which its certificate must hold.
    #[arg(long, value_name = "NAME")]
    etcd_sni: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Yaml,
    Json,
}

/// The filter file Envoy watches under --ecds-dir.
pub const FILTER_FILE: &str = "gateguard-filter.yaml";

/// Under --ecds-dir, the file of the `jwt_authn` filter in front of gateguard, for a policy with
/// `jwt.verify_with: "envoy"`: swapped with the policy, so both always trust the same keys.
pub const JWT_AUTHN_FILE: &str = "jwt-authn-filter.yaml";

/// The name of the `jwt_authn` filter (and of its ECDS resource).
const JWT_AUTHN_NAME: &str = "envoy.filters.http.jwt_authn";

const JWT_AUTHN_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication";

/// The `Authorization` spellings `jwt_authn` takes a token from: its prefix match is
/// case-sensitive, gateguard's scheme is not. Any other spelling reaches gateguard unverified
/// and is refused as an invalid token (docs/policy.md, "Verifying with Envoy's jwt_authn").
const BEARER_PREFIXES: [&str; 3] = ["Bearer ", "bearer ", "BEARER "];

/// How long `jwt_authn` waits for a JWKS response.
const JWKS_FETCH_TIMEOUT: &str = "5s";

/// What every rendered HTTP connection manager does with a client header whose name holds `_`.
const HEADERS_WITH_UNDERSCORES_ACTION: &str = "DROP_HEADER";

/// The `--access-log` line: the status, then the decision the filter records as filter state.
/// The client IP is the filter's (as the policy's `log.client_ip` shows it), never Envoy's raw
/// address; the request id matches the refusal's log line; the reason, free text, comes last.
const ACCESS_LOG_FORMAT: &str = concat!(
    "%RESPONSE_CODE% outcome=%FILTER_STATE(wasm.gateguard_outcome:PLAIN)% ",
    "api=%FILTER_STATE(wasm.gateguard_api:PLAIN)% ",
    "client_ip=%FILTER_STATE(wasm.gateguard_client_ip:PLAIN)% ",
    "request_id=%REQ(X-REQUEST-ID)% ",
    "reason=%FILTER_STATE(wasm.gateguard_reason:PLAIN)%\n"
);

pub fn run(args: &Args) -> ExitCode {
    let text = match std::fs::read_to_string(&args.policy) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", args.policy.display());
            return ExitCode::from(2);
        }
    };
    // An editor's byte-order mark is no part of the policy (docs/policy.md): none is rendered.
    let text = gateguard_core::config::without_bom(&text).to_owned();
    let lenient = |name: &str| Some(std::env::var(name).unwrap_or_else(|_| PLACEHOLDER.into()));
    let compiled = match gateguard_core::parse_policy_report(text.as_bytes(), &lenient) {
        Ok(p) => p,
        Err(errors) => {
            // As `validate` shows them: file:line:column, path, reason, context.
            crate::validate::print_errors(
                &args.policy.display().to_string(),
                text.as_bytes(),
                &errors,
            );
            return ExitCode::from(1);
        }
    };
    let etcd = compiled.replay_store.etcd();
    for line in
        crate::validate::plain_http_jwks_warnings(&args.policy.display().to_string(), &compiled)
    {
        eprintln!("{line}");
    }
    if !args.filter_only
        && compiled
            .upstream
            .tls
            .as_ref()
            .is_some_and(|t| t.host_rewrite.is_none())
    {
        // The rendered route matches any Host (domains "*"): with no rewrite, whatever Host a
        // client writes is what the function app gets.
        eprintln!(
            "{}: warning: upstream.tls.host_rewrite is false: the function app gets the Host each \
             client sends, whatever it is (the gateway's route takes any); the app must not build \
             links, redirects or tenant choices from Host, and an App Service front end routes by it",
            args.policy.display()
        );
    }
    // Before anything is written: --filter-only swaps the policy under a bootstrap that already
    // holds its clusters, so only a full render needs --etcd.
    if !args.filter_only {
        if let Err(e) = check_etcd_args(args, etcd) {
            eprintln!("gateguard render: {e}");
            return ExitCode::from(2);
        }
        if let Err(e) = check_deploy_args(args, &compiled) {
            eprintln!("gateguard render: {e}");
            return ExitCode::from(2);
        }
        if let Some(sni) = &args.upstream_sni {
            eprintln!(
                "gateguard render: note: --upstream-sni {sni} stands for the policy's \
                 \"upstream\": {{\"tls\": {{\"sni\": \"{sni}\"}}}} (TLS verified against the \
                 system CAs, Host rewritten to {sni}); say it in the policy (docs/policy.md, \
                 \"Reaching the function app\")"
            );
        }
        if etcd.is_some() && args.etcd_ca.is_none() && args.etcd_sni.is_none() {
            eprintln!(
                "gateguard render: warning: etcd is reached in plain text (token keys, client \
                 IPs and any {USERNAME_ENV}/{PASSWORD_ENV} login cross the network \
                 unencrypted); give --etcd-ca for TLS unless etcd is on this host"
            );
        }
    }
    if let Ok(policy) = serde_json::from_str::<Value>(&text) {
        if let (Some(health), false) = (&args.health_path, args.filter_only) {
            for api in apis_under_health_path(&policy, health) {
                eprintln!(
                    "gateguard render: note: --health-path {health} is answered by Envoy; API \
                     {api:?} covers it, and never sees a request for exactly that path"
                );
            }
        }
        for (path, name) in underscore_client_headers(&policy) {
            eprintln!(
                "{}: warning: {path}: {name:?} holds '_'; the rendered listeners drop client \
                 headers with underscores (docs/deploy.md), so it never arrives: use '-'",
                args.policy.display()
            );
        }
    }
    if let Some(dir) = &args.ecds_dir {
        if args.filter_only {
            if let Err(e) = check_deploy_unchanged(dir, &compiled) {
                eprintln!("gateguard render: {e}");
                return ExitCode::from(2);
            }
        }
        // jwt_authn first: the keys a new policy trusts are verified before it needs them.
        let written = write_jwt_authn_file(args, dir, &text, &compiled)
            .and_then(|()| write_filter_file(args, dir, &text, etcd.is_some()));
        if let Err(e) = written {
            eprintln!("gateguard render: {e}");
            return ExitCode::from(2);
        }
        if args.filter_only {
            return ExitCode::SUCCESS;
        }
    }
    let config = match render(args, &text, &compiled) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateguard render: {e}");
            return ExitCode::from(2);
        }
    };
    let header = format!(
        "Generated by `gateguard render --policy {}`; edit the policy, then render again.",
        args.policy.display()
    );
    let text = match document(&config, args.format, &header) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("gateguard render: {e}");
            return ExitCode::from(2);
        }
    };
    match &args.out {
        Some(path) => {
            if let Err(e) = std::fs::write(path, text) {
                eprintln!("{}: cannot write: {e}", path.display());
                return ExitCode::from(2);
            }
            ExitCode::SUCCESS
        }
        None => {
            print!("{text}");
            ExitCode::SUCCESS
        }
    }
}

/// `config` as a file Envoy reads; `header` becomes a comment where the format has them.
fn document(config: &Value, format: Format, header: &str) -> Result<String, String> {
    match format {
        Format::Yaml => serde_norway::to_string(config)
            .map(|yaml| format!("# {header}\n{yaml}"))
            .map_err(|e| e.to_string()),
        Format::Json => serde_json::to_string_pretty(config)
            .map(|json| json + "\n")
            .map_err(|e| e.to_string()),
    }
}

fn socket(addr: &str) -> Result<Value, String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{addr:?} has no valid port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok(json!({ "socket_address": { "address": host, "port_value": port } }))
}

/// Every `{"env": NAME}` in the policy: Envoy passes only listed variables into the VM.
fn env_names(policy: &Value, out: &mut Vec<String>) {
    match policy {
        Value::Object(map) => {
            if map.len() == 1 {
                if let Some(Value::String(name)) = map.get("env") {
                    if !out.contains(name) {
                        out.push(name.clone());
                    }
                }
            }
            map.values().for_each(|v| env_names(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| env_names(v, out)),
        _ => {}
    }
}

/// Header names the policy expects from clients that hold `_`: (JSON path, name).
fn underscore_client_headers(policy: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, api) in policy["apis"].as_array().into_iter().flatten().enumerate() {
        if let Some(name) = api["subscription_key"]["header"].as_str() {
            if name.contains('_') {
                out.push((
                    format!("apis[{i}].subscription_key.header"),
                    name.to_string(),
                ));
            }
        }
    }
    out
}

/// Remote JWKS clusters of every identity provider of the policy (`entra` ones included):
/// (cluster, uri).
fn jwks_clusters(compiled: &CompiledPolicy) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let providers = compiled
        .apis
        .iter()
        .filter_map(|a| a.jwt.as_ref())
        .flat_map(|j| j.providers());
    for provider in providers {
        if let JwksSource::Remote { cluster, uri, .. } = &provider.jwks {
            if !out.iter().any(|(c, _)| c == cluster) {
                out.push((cluster.clone(), uri.clone()));
            }
        }
    }
    out
}

/// The policy document's object for provider `k` of API `i`: `jwt.providers[k]`, or `jwt`
/// itself for a single provider.
fn provider_doc(policy: &Value, i: usize, k: usize) -> &Value {
    let jwt = &policy["apis"][i]["jwt"];
    match jwt["providers"].as_array() {
        Some(list) => &list[k],
        None => jwt,
    }
}

/// A `jwt_authn` provider: the key set that APIs with `jwt.verify_with: "envoy"` trust, shared
/// by every API that names the same keys.
#[derive(Debug, Clone, PartialEq)]
struct EnvoyProvider {
    /// The core's name for the key set: the filter reads the payload under the same name.
    name: String,
    keys: ProviderKeys,
    /// The largest `clock_skew_seconds` of the APIs sharing it; gateguard re-checks each API's
    /// own.
    clock_skew: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum ProviderKeys {
    /// The JWKS text, as the policy holds it.
    Inline(String),
    /// Fetched by Envoy through `cluster`; refetched after the smallest `refresh_seconds` of
    /// the APIs sharing it.
    Remote {
        cluster: String,
        uri: String,
        refresh_seconds: u64,
    },
}

/// One provider per key set the policy has Envoy verify tokens with, in the order the APIs name
/// them. `policy` is the document `compiled` was compiled from (it holds inline key sets' text).
fn envoy_providers(policy: &Value, compiled: &CompiledPolicy) -> Vec<EnvoyProvider> {
    let mut out: Vec<EnvoyProvider> = Vec::new();
    for (i, api) in compiled.apis.iter().enumerate() {
        let Some(jwt) = &api.jwt else { continue };
        for (k, provider) in jwt.providers().iter().enumerate() {
            let Some(name) = provider.envoy_provider() else {
                continue;
            };
            let keys = match &provider.jwks {
                JwksSource::Inline(_) => {
                    ProviderKeys::Inline(provider_doc(policy, i, k)["jwks"]["inline"].to_string())
                }
                JwksSource::Remote {
                    cluster,
                    uri,
                    refresh_seconds,
                } => ProviderKeys::Remote {
                    cluster: cluster.clone(),
                    uri: uri.clone(),
                    refresh_seconds: *refresh_seconds,
                },
                // HS-only APIs are refused with "envoy" when the policy is compiled.
                JwksSource::None => continue,
            };
            match out.iter_mut().find(|p| p.name == name) {
                Some(shared) => {
                    shared.clock_skew = shared.clock_skew.max(jwt.clock_skew());
                    if let (
                        ProviderKeys::Remote {
                            refresh_seconds: kept,
                            ..
                        },
                        ProviderKeys::Remote {
                            refresh_seconds, ..
                        },
                    ) = (&mut shared.keys, &keys)
                    {
                        *kept = (*kept).min(*refresh_seconds);
                    }
                }
                None => out.push(EnvoyProvider {
                    name: name.to_string(),
                    keys,
                    clock_skew: jwt.clock_skew(),
                }),
            }
        }
    }
    out
}

/// The `jwt_authn` configuration in front of gateguard (docs/policy.md, "Verifying with Envoy's
/// jwt_authn"). It refuses nothing itself: every provider verifies the token independently and
/// leaves the payload in the request's dynamic metadata under its own name, and gateguard
/// decides with its own statuses and messages. `cache_size` is the policy's
/// `token_cache.max_entries` (0: no cache).
fn jwt_authn_config(providers: &[EnvoyProvider], cache_size: u32) -> Value {
    let mut by_name = serde_json::Map::new();
    for p in providers {
        let mut provider = json!({
            // gateguard needs the token: it compares it with the payload claim by claim.
            "forward": true,
            // Only the Authorization header: without from_headers, jwt_authn also takes
            // `?access_token=` from the query.
            "from_headers": BEARER_PREFIXES
                .iter()
                .map(|prefix| json!({ "name": "authorization", "value_prefix": prefix }))
                .collect::<Vec<_>>(),
            "payload_in_metadata": p.name,
            "clock_skew_seconds": p.clock_skew,
        });
        provider[match &p.keys {
            ProviderKeys::Inline(_) => "local_jwks",
            ProviderKeys::Remote { .. } => "remote_jwks",
        }] = match &p.keys {
            ProviderKeys::Inline(jwks) => json!({ "inline_string": jwks }),
            ProviderKeys::Remote {
                cluster,
                uri,
                refresh_seconds,
            } => json!({
                "http_uri": { "uri": uri, "cluster": cluster, "timeout": JWKS_FETCH_TIMEOUT },
                "cache_duration": format!("{refresh_seconds}s"),
                // Fetched when the listener starts and refreshed ahead of expiry, not on a
                // request's path.
                "async_fetch": {}
            }),
        };
        if cache_size > 0 {
            provider["jwt_cache_config"] = json!({ "jwt_cache_size": cache_size });
        }
        by_name.insert(p.name.clone(), provider);
    }
    // A token one provider refuses must not stop the next from verifying it for its APIs:
    // `requires_any` over the providers would stop at the first success.
    let any = |p: &EnvoyProvider| {
        json!({ "requires_any": { "requirements": [
            { "provider_name": p.name }, { "allow_missing_or_failed": {} }
        ] } })
    };
    let requires = match providers {
        [one] => any(one),
        several => {
            json!({ "requires_all": { "requirements": several.iter().map(any).collect::<Vec<_>>() } })
        }
    };
    json!({
        "@type": JWT_AUTHN_TYPE,
        "providers": by_name,
        "rules": [{ "match": { "prefix": "/" }, "requires": requires }],
        "bypass_cors_preflight": true
    })
}

/// `jwt_authn` for `policy`, None when no API has Envoy verify its tokens.
fn jwt_authn_for(policy_text: &str, compiled: &CompiledPolicy) -> Result<Option<Value>, String> {
    let policy: Value = serde_json::from_str(policy_text).map_err(|e| e.to_string())?;
    let providers = envoy_providers(&policy, compiled);
    Ok((!providers.is_empty()).then(|| jwt_authn_config(&providers, compiled.token_cache_slots)))
}

/// A cluster of one endpoint; `transport_socket` for TLS.
fn cluster(name: &str, host: &str, port: u16, transport_socket: Option<Value>) -> Value {
    let is_ip = host.parse::<std::net::IpAddr>().is_ok();
    let mut c = json!({
        "name": name,
        "connect_timeout": "2s",
        "type": if is_ip { "STATIC" } else { "LOGICAL_DNS" },
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": host, "port_value": port } } } }] }]
        }
    });
    if is_ip {
        if let Some(obj) = c.as_object_mut() {
            obj.remove("dns_lookup_family");
        }
    }
    if let Some(socket) = transport_socket {
        c["transport_socket"] = socket;
    }
    c
}

const UPSTREAM_TLS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

/// TLS to an identity provider's JWKS endpoint.
fn jwks_tls(sni: &str) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": UPSTREAM_TLS_TYPE,
            "sni": sni,
            // The server certificate must chain to a public CA *and* name this host.
            "common_tls_context": { "validation_context": {
                "trusted_ca": { "filename": SYSTEM_CA_BUNDLE },
                "match_typed_subject_alt_names": [
                    { "san_type": "DNS", "matcher": { "exact": sni } }
                ] } }
        }
    })
}

/// TLS to the function app (docs/policy.md, "Reaching the function app"): the SNI, a server
/// certificate that chains to `ca_file` *and* names the SNI, the minimum version, and the
/// gateway's client certificate from files or from a file-based SDS secret.
fn function_app_tls(tls: &UpstreamTls) -> Value {
    let mut context = json!({
        // Envoy's client side stops at TLS 1.2 unless told otherwise: without the maximum, a
        // 1.3 minimum could never connect, and the function app would never get TLS 1.3.
        "tls_params": {
            "tls_minimum_protocol_version": tls.min_version.envoy_name(),
            "tls_maximum_protocol_version": "TLSv1_3"
        },
        "validation_context": {
            "trusted_ca": { "filename": tls.ca_file },
            // An exact DNS matcher also accepts a wildcard certificate that covers the name
            // (App Service's *.azurewebsites.net).
            "match_typed_subject_alt_names": [
                { "san_type": "DNS", "matcher": { "exact": tls.sni } }
            ]
        }
    });
    match &tls.client_certificate {
        Some(UpstreamClientCert::Files {
            cert_file,
            key_file,
        }) => {
            context["tls_certificates"] = json!([{
                "certificate_chain": { "filename": cert_file },
                "private_key": { "filename": key_file }
            }]);
        }
        Some(UpstreamClientCert::Sds { path, secret }) => {
            // Reloaded when a file is moved into the directory: how Kubernetes swaps a mounted
            // Secret, and how `mv` replaces a file atomically.
            let dir = std::path::Path::new(path)
                .parent()
                .map_or_else(|| "/".to_string(), |d| d.display().to_string());
            context["tls_certificate_sds_secret_configs"] = json!([{
                "name": secret,
                "sds_config": {
                    "path_config_source": { "path": path, "watched_directory": { "path": dir } },
                    "resource_api_version": "V3"
                }
            }]);
        }
        None => {}
    }
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": UPSTREAM_TLS_TYPE,
            "sni": tls.sni,
            "common_tls_context": context
        }
    })
}

/// How to reach the function app over TLS: the policy's `upstream.tls`, or `--upstream-sni`
/// alone, which stands for `upstream.tls: {"sni": NAME}`. None: plain HTTP.
fn upstream_tls(args: &Args, compiled: &CompiledPolicy) -> Result<Option<UpstreamTls>, String> {
    match (&args.upstream_sni, &compiled.upstream.tls) {
        (Some(_), Some(tls)) => Err(format!(
            "--upstream-sni and the policy's upstream.tls (sni {:?}) both say how to reach the \
             function app: remove --upstream-sni, the policy says it",
            tls.sni
        )),
        (Some(sni), None) => UpstreamTls::to_host(sni)
            .map(Some)
            .map_err(|e| format!("--upstream-sni: {e}")),
        (None, tls) => Ok(tls.clone()),
    }
}

/// `--upstream HOST:PORT`.
fn upstream_address(args: &Args) -> Result<(&str, u16), String> {
    let (host, port) = args
        .upstream
        .rsplit_once(':')
        .ok_or("--upstream must be host:port")?;
    let port: u16 = port.parse().map_err(|_| "--upstream has no valid port")?;
    Ok((host, port))
}

/// The options agree with the policy's `listener` and `upstream`: a TLS listener's certificate
/// comes with its key, `listener.tls` has a TLS listener to apply to, and the port of
/// `--upstream` is not HTTPS's without TLS, nor plain HTTP's with it. The policy's own
/// contradictions are refused when it is compiled, as `gateguard validate` and the filter do.
fn check_deploy_args(args: &Args, compiled: &CompiledPolicy) -> Result<(), String> {
    if let Some(dir) = &args.ecds_envoy_dir {
        check_envoy_dir(dir)?;
    }
    if let Some(path) = &args.health_path {
        check_health_path(path)?;
    }
    match (&args.tls_cert, &args.tls_key) {
        (Some(_), None) => return Err("--tls-cert needs --tls-key (its private key)".into()),
        (None, Some(_)) => return Err("--tls-key needs --tls-cert (its certificate)".into()),
        (None, None) if compiled.listener.tls.is_some() => {
            return Err(
                "the policy sets listener.tls, for the TLS listener, which render writes only \
                 with --tls-cert and --tls-key: give them, or remove listener.tls"
                    .into(),
            )
        }
        _ => {}
    }
    let tls = upstream_tls(args, compiled)?;
    match (upstream_address(args)?.1, tls) {
        (443, None) => Err(format!(
            "--upstream {}: port 443 is HTTPS's, and the policy has no upstream.tls, so Envoy \
             would send plain HTTP there: add upstream.tls with the function app's host name \
             as its sni (docs/policy.md, \"Reaching the function app\")",
            args.upstream
        )),
        (80, Some(tls)) => Err(format!(
            "--upstream {}: port 80 is plain HTTP's, and the policy reaches the function app \
             over TLS (upstream.tls, sni {:?}): give its HTTPS port",
            args.upstream, tls.sni
        )),
        _ => Ok(()),
    }
}

/// --ecds-envoy-dir is a path in another file system (Envoy's container): only an absolute one
/// means the same thing whatever Envoy's working directory.
fn check_envoy_dir(dir: &str) -> Result<(), String> {
    if !dir.starts_with('/') {
        return Err(format!(
            "--ecds-envoy-dir {dir:?}: give the absolute path Envoy sees (e.g. /etc/envoy/filter); \
             a relative one would depend on Envoy's working directory"
        ));
    }
    if dir.chars().any(char::is_control) {
        return Err(format!(
            "--ecds-envoy-dir {dir:?} holds a control character"
        ));
    }
    Ok(())
}

/// Longest --health-path accepted: a probe's path, not a place for data.
const HEALTH_PATH_MAX: usize = 128;

/// --health-path is matched exactly against the request's path after Envoy normalized it
/// (`normalize_path`, `merge_slashes`), so it must be a path that normalization leaves alone:
/// otherwise no request could ever match it. Plain characters only: no query, no
/// percent-encoding, no empty, `.` or `..` segment.
fn check_health_path(path: &str) -> Result<(), String> {
    let refuse = |why: &str| Err(format!("--health-path {path:?}: {why}"));
    if !path.starts_with('/') {
        return refuse("must start with '/'");
    }
    if path == "/" {
        return refuse(
            "'/' would answer the gateway's root itself; give a path of its own, e.g. /healthz",
        );
    }
    if path.len() > HEALTH_PATH_MAX {
        return refuse(&format!("longer than {HEALTH_PATH_MAX} characters"));
    }
    if let Some(c) = path
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-._~/".contains(*c)))
    {
        return refuse(&format!(
            "{c:?} is not allowed: letters, digits, '-', '.', '_', '~' and '/' only (no query \
             string, no percent-encoding)"
        ));
    }
    if path[1..]
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return refuse(
            "has an empty, '.' or '..' segment, which Envoy's path normalization removes before \
             the health check looks, so no request would ever match it",
        );
    }
    Ok(())
}

/// Envoy's own health check, first on every listener: answers the exact `path` itself (never
/// passed on), 503 while draining or failed through the admin port.
fn health_check_filter(path: &str) -> Value {
    json!({
        "name": "envoy.filters.http.health_check",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck",
            "pass_through_mode": false,
            "headers": [{ "name": ":path", "string_match": { "exact": path } }]
        }
    })
}

/// APIs whose `path_prefix` covers --health-path (compared without case, as gateguard routes):
/// a request for that exact path is Envoy's to answer from then on, never theirs.
fn apis_under_health_path(policy: &Value, health: &str) -> Vec<String> {
    let health = health.to_ascii_lowercase();
    let mut out = Vec::new();
    for api in policy["apis"].as_array().into_iter().flatten() {
        let prefix = api["path_prefix"]
            .as_str()
            .unwrap_or("/")
            .to_ascii_lowercase();
        let prefix = prefix.trim_end_matches('/');
        if health == prefix || health.starts_with(&format!("{prefix}/")) {
            out.push(api["name"].as_str().unwrap_or("?").to_string());
        }
    }
    out
}

/// Under --filter-only, the policy's `listener` and `upstream` must be the ones the running
/// configuration was rendered with: they live in envoy.yaml, which --filter-only leaves alone, so
/// a change there would be announced and never applied. They are read from the policy in
/// DIR/gateguard-filter.yaml (no file yet: nothing to compare). When that policy cannot be read
/// (a hand-edited file Envoy refused), nothing is refused: --filter-only is how it gets repaired.
fn check_deploy_unchanged(dir: &std::path::Path, compiled: &CompiledPolicy) -> Result<(), String> {
    let path = dir.join(FILTER_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let (listener, upstream) = match running_deploy(&text) {
        Ok(sections) => sections,
        Err(e) => {
            eprintln!(
                "gateguard render: warning: {}: cannot read listener and upstream from the \
                 policy it holds ({e}); if this policy changes them, render the full \
                 configuration and restart Envoy",
                path.display()
            );
            return Ok(());
        }
    };
    for (section, what, changed) in [
        (
            "listener",
            "the TLS listener",
            listener != compiled.listener,
        ),
        (
            "upstream",
            "the function_app cluster",
            upstream != compiled.upstream,
        ),
    ] {
        if changed {
            return Err(format!(
                "the policy changes {section}, which is {what} in envoy.yaml, not part of the \
                 filter --filter-only swaps: render the full configuration (without \
                 --filter-only) and restart Envoy"
            ));
        }
    }
    Ok(())
}

/// `listener` and `upstream` of the policy a filter file written by `write_filter_file` embeds,
/// compiled; the rest of that policy may be wrong.
fn running_deploy(filter_file: &str) -> Result<(ListenerPolicy, UpstreamPolicy), String> {
    let doc: Value = serde_norway::from_str(filter_file).map_err(|e| e.to_string())?;
    let text = doc["resources"][0]["typed_config"]["config"]["configuration"]["value"]
        .as_str()
        .ok_or("no embedded policy")?;
    let raw = gateguard_core::config::parse_raw(text).map_err(|e| e.to_string())?;
    let listener = ListenerPolicy::compile(raw.listener.as_ref(), "listener");
    let upstream = UpstreamPolicy::compile(raw.upstream.as_ref(), "upstream");
    Ok((
        listener.map_err(|e| e.to_string())?,
        upstream.map_err(|e| e.to_string())?,
    ))
}

/// Variables the filter reads from Envoy's environment to log in to etcd (docs/policy.md, "Replay
/// across gateway replicas"); a policy never holds them.
const ETCD_CREDENTIAL_VARS: [&str; 2] = [USERNAME_ENV, PASSWORD_ENV];

/// The --etcd options agree with the policy: endpoints exactly when it keeps replay history in
/// etcd, a client certificate with its key.
fn check_etcd_args(args: &Args, etcd: Option<&EtcdPolicy>) -> Result<(), String> {
    let tls_flags = [
        ("--etcd-ca", &args.etcd_ca),
        ("--etcd-cert", &args.etcd_cert),
        ("--etcd-key", &args.etcd_key),
        ("--etcd-sni", &args.etcd_sni),
    ];
    match etcd {
        None => {
            if !args.etcd.is_empty() {
                return Err(
                    "--etcd is for a policy with replay_store.etcd; this policy keeps its replay \
                     history in the gateway (replay_store local)"
                        .into(),
                );
            }
            if let Some((flag, _)) = tls_flags.iter().find(|(_, v)| v.is_some()) {
                return Err(format!(
                    "{flag} is for a policy with replay_store.etcd; this policy has none"
                ));
            }
        }
        Some(e) => {
            if args.etcd.is_empty() {
                return Err(format!(
                    "the policy keeps its replay history in etcd (replay_store.etcd, cluster {:?}): \
                     give etcd's client endpoints with --etcd HOST:PORT (once per member)",
                    e.cluster
                ));
            }
        }
    }
    match (&args.etcd_cert, &args.etcd_key) {
        (Some(_), None) => return Err("--etcd-cert needs --etcd-key (its private key)".into()),
        (None, Some(_)) => return Err("--etcd-key needs --etcd-cert (its certificate)".into()),
        _ => {}
    }
    for endpoint in &args.etcd {
        etcd_endpoint(endpoint)?;
    }
    Ok(())
}

/// `--etcd HOST:PORT` as (host, port); a URL is refused rather than guessed at.
fn etcd_endpoint(endpoint: &str) -> Result<(String, u16), String> {
    if endpoint.contains("://") {
        return Err(format!(
            "--etcd {endpoint:?}: give HOST:PORT without a scheme (TLS is --etcd-ca)"
        ));
    }
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| format!("--etcd {endpoint:?} is not HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("--etcd {endpoint:?} has no valid port"))?;
    let bracketed = host.starts_with('[') && host.ends_with(']');
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let valid = if bracketed {
        host.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        host.parse::<std::net::Ipv4Addr>().is_ok()
            || (!host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'))
    };
    if !valid {
        return Err(format!(
            "--etcd {endpoint:?}: {host:?} is not an IP address or host name (IPv6 goes in [brackets])"
        ));
    }
    Ok((host.to_string(), port))
}

/// The cluster the policy's `replay_store.etcd.cluster` names: etcd's gRPC API over HTTP/2.
fn etcd_cluster(args: &Args, etcd: &EtcdPolicy) -> Result<Value, String> {
    let endpoints = args
        .etcd
        .iter()
        .map(|e| etcd_endpoint(e))
        .collect::<Result<Vec<_>, _>>()?;
    let all_ips = endpoints
        .iter()
        .all(|(host, _)| host.parse::<std::net::IpAddr>().is_ok());
    let lb_endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(host, port)| {
            json!({ "endpoint": { "address": {
                "socket_address": { "address": host, "port_value": port } } } })
        })
        .collect();
    let mut c = json!({
        "name": etcd.cluster,
        // A member that does not accept quickly is skipped for another before the request's
        // own timeout_ms runs out.
        "connect_timeout": "0.5s",
        "type": if all_ips { "STATIC" } else { "STRICT_DNS" },
        "load_assignment": {
            "cluster_name": etcd.cluster,
            "endpoints": [{ "lb_endpoints": lb_endpoints }]
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": { "http2_protocol_options": {
                    // A member that vanished without closing the connection is noticed.
                    "connection_keepalive": { "interval": "10s", "timeout": "3s" }
                } }
            }
        },
        // etcd serves every gateway: bound what one gateway may ask of it at once, and fail
        // fast (on_unavailable) rather than queue behind a slow store.
        "circuit_breakers": { "thresholds": [{
            "priority": "DEFAULT",
            "max_connections": 64,
            "max_pending_requests": 128,
            "max_requests": 1024,
            "max_retries": 3
        }] },
        // A member that keeps failing (refused connections, gRPC UNAVAILABLE) is set aside for
        // a while; at most half of them, so a quorum is always tried.
        "outlier_detection": {
            "consecutive_5xx": 5,
            "consecutive_gateway_failure": 3,
            "enforcing_consecutive_gateway_failure": 100,
            "interval": "5s",
            "base_ejection_time": "10s",
            "max_ejection_percent": 50
        }
    });
    if !all_ips {
        c["dns_lookup_family"] = json!("V4_PREFERRED");
    }
    let tls = args.etcd_ca.is_some() || args.etcd_cert.is_some() || args.etcd_sni.is_some();
    if tls {
        // The certificate names the server asked for: the SNI, or else one of the endpoints.
        let names: Vec<Value> = match &args.etcd_sni {
            Some(sni) => vec![json!({ "san_type": "DNS", "matcher": { "exact": sni } })],
            None => endpoints
                .iter()
                .map(|(host, _)| {
                    let san_type = if host.parse::<std::net::IpAddr>().is_ok() {
                        "IP_ADDRESS"
                    } else {
                        "DNS"
                    };
                    json!({ "san_type": san_type, "matcher": { "exact": host } })
                })
                .collect(),
        };
        let ca = args
            .etcd_ca
            .as_deref()
            .unwrap_or("/etc/ssl/certs/ca-certificates.crt");
        let mut context = json!({
            // etcd serves gRPC over TLS only to clients that negotiate HTTP/2.
            "alpn_protocols": ["h2"],
            "tls_params": { "tls_minimum_protocol_version": "TLSv1_2" },
            "validation_context": {
                "trusted_ca": { "filename": ca },
                "match_typed_subject_alt_names": names
            }
        });
        if let (Some(cert), Some(key)) = (&args.etcd_cert, &args.etcd_key) {
            context["tls_certificates"] = json!([{
                "certificate_chain": { "filename": cert },
                "private_key": { "filename": key }
            }]);
        }
        let mut tls_context = json!({
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": context
        });
        if let Some(sni) = &args.etcd_sni {
            tls_context["sni"] = json!(sni);
        }
        c["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": tls_context
        });
    }
    Ok(c)
}

/// Writes DIR/gateguard-filter.yaml through a temporary file and a rename, so Envoy's watcher
/// never reads half a file.
fn write_filter_file(
    args: &Args,
    dir: &std::path::Path,
    policy_text: &str,
    uses_etcd: bool,
) -> Result<(), String> {
    write_extension_config(
        dir,
        FILTER_FILE,
        "gateguard",
        wasm_config(args, policy_text, uses_etcd)?,
    )
}

/// Under --ecds-dir, DIR/jwt-authn-filter.yaml, for the `jwt_authn` slot a full render puts in
/// front of gateguard when the policy has Envoy verify tokens. `--filter-only` rewrites it with
/// the policy, or refuses a policy that needs it when the running configuration has no such slot
/// (no file: it was rendered for a policy without it).
fn write_jwt_authn_file(
    args: &Args,
    dir: &std::path::Path,
    policy_text: &str,
    compiled: &CompiledPolicy,
) -> Result<(), String> {
    let path = dir.join(JWT_AUTHN_FILE);
    let slot = path.exists();
    match (
        jwt_authn_for(policy_text, compiled)?,
        args.filter_only,
        slot,
    ) {
        (Some(_), true, false) => Err(format!(
            "this policy has Envoy's jwt_authn verify tokens (jwt.verify_with \"envoy\"), and \
             the configuration rendered into {} has no jwt_authn in front of gateguard: render \
             it again without --filter-only and restart Envoy",
            dir.display()
        )),
        (Some(config), _, _) => write_extension_config(dir, JWT_AUTHN_FILE, JWT_AUTHN_NAME, config),
        // The running configuration keeps the slot: leave it verifying nothing.
        (None, true, true) => write_extension_config(
            dir,
            JWT_AUTHN_FILE,
            JWT_AUTHN_NAME,
            json!({ "@type": JWT_AUTHN_TYPE }),
        ),
        // A full render without the slot: a stale file would fool a later --filter-only.
        (None, false, true) => {
            std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))
        }
        (None, _, false) => Ok(()),
    }
}

/// Writes one ECDS resource, DIR/`file`, through a temporary file and a rename, so Envoy's
/// watcher never reads half a file.
fn write_extension_config(
    dir: &std::path::Path,
    file: &str,
    name: &str,
    typed_config: Value,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let doc = json!({ "resources": [{
        "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "name": name,
        "typed_config": typed_config,
    }]});
    // YAML whatever --format says: Envoy parses the file by its name (.yaml).
    let text = document(
        &doc,
        Format::Yaml,
        "Generated by `gateguard render --ecds-dir`; Envoy reloads the filter when this file is replaced.",
    )?;
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(file)).map_err(|e| format!("{}: {e}", dir.display()))
}

/// An HTTP filter delivered through extension config discovery from DIR/`file`.
fn discovered_filter(dir: &std::path::Path, file: &str, name: &str, type_url: &str) -> Value {
    json!({
        "name": name,
        "config_discovery": {
            "config_source": {
                "path_config_source": {
                    "path": dir.join(file).display().to_string(),
                    "watched_directory": { "path": dir.display().to_string() }
                },
                "resource_api_version": "V3"
            },
            "type_urls": [type_url]
        }
    })
}

/// The Wasm filter's typed config with the policy embedded.
fn wasm_config(args: &Args, policy_text: &str, uses_etcd: bool) -> Result<Value, String> {
    let policy: Value = serde_json::from_str(policy_text).map_err(|e| e.to_string())?;
    let mut env = Vec::new();
    env_names(&policy, &mut env);
    if uses_etcd {
        for name in ETCD_CREDENTIAL_VARS {
            if !env.iter().any(|n| n == name) {
                env.push(name.to_string());
            }
        }
    }
    Ok(json!({
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "gateguard",
                "root_id": "gateguard",
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": format!("{}\n", policy_text.trim_end()),
                },
                "vm_config": {
                    "vm_id": "gateguard",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": { "local": { "filename": args.wasm } },
                    "environment_variables": { "host_env_keys": env },
                },
                // A filter that cannot load refuses traffic instead of letting it through.
                "fail_open": false,
            }
    }))
}

fn render(args: &Args, policy_text: &str, compiled: &CompiledPolicy) -> Result<Value, String> {
    let etcd = compiled.replay_store.etcd();
    check_etcd_args(args, etcd)?;
    check_deploy_args(args, compiled)?;
    let upstream_tls = upstream_tls(args, compiled)?;
    let jwt_authn = jwt_authn_for(policy_text, compiled)?;
    let (wasm, jwt_authn) = match &args.ecds_dir {
        Some(dir) => {
            let dir = match &args.ecds_envoy_dir {
                Some(envoy_dir) => PathBuf::from(envoy_dir),
                None => std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()),
            };
            let wasm = discovered_filter(
                &dir,
                FILTER_FILE,
                "gateguard",
                "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            );
            let jwt_authn = jwt_authn
                .map(|_| discovered_filter(&dir, JWT_AUTHN_FILE, JWT_AUTHN_NAME, JWT_AUTHN_TYPE));
            (wasm, jwt_authn)
        }
        None => (
            json!({ "name": "envoy.filters.http.wasm", "typed_config": wasm_config(args, policy_text, etcd.is_some())? }),
            jwt_authn.map(|config| json!({ "name": JWT_AUTHN_NAME, "typed_config": config })),
        ),
    };
    // The health check (answered before any policy applies), jwt_authn when the policy has it
    // verify tokens, then gateguard, then the router.
    let router = json!({ "name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" } });
    let health = args.health_path.as_deref().map(health_check_filter);
    let http_filters: Vec<Value> = health
        .into_iter()
        .chain(jwt_authn)
        .chain([wasm, router])
        .collect();

    let access_log = args.access_log.as_ref().map(|path| {
        json!([{
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": path,
                "log_format": { "text_format_source": { "inline_string": ACCESS_LOG_FORMAT } }
            }
        }])
    });
    let mut route = json!({ "cluster": "function_app" });
    if let Some(host) = upstream_tls.as_ref().and_then(|t| t.host_rewrite.as_ref()) {
        // The name the function app is served under (App Service routes by Host), whatever
        // --upstream points at (an IP address, a private endpoint's name).
        route["host_rewrite_literal"] = json!(host);
    }
    let hcm = |stat_prefix: &str| {
        let mut manager = json!({
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": stat_prefix,
                // gateguard reads the client address from source.address: it must be the TCP
                // peer, never a value a client put in X-Forwarded-For.
                "use_remote_address": true,
                "skip_xff_append": true,
                "normalize_path": true,
                "merge_slashes": true,
                // `x_user_id` never reaches the filter or the function app, where CGI-style
                // frameworks would fold it into the `x-user-id` the gateway sets. Dropped, not
                // refused: see docs/deploy.md.
                "common_http_protocol_options": {
                    "headers_with_underscores_action": HEADERS_WITH_UNDERSCORES_ACTION
                },
                "route_config": { "virtual_hosts": [{
                    "name": "function_app", "domains": ["*"],
                    "routes": [{ "match": { "prefix": "/" }, "route": route.clone() }]
                }]},
                "http_filters": http_filters.clone()
            }
        });
        if let Some(log) = &access_log {
            manager["typed_config"]["access_log"] = log.clone();
        }
        manager
    };

    let mut listeners = vec![json!({
        "name": "gateway_http",
        "address": socket(&args.listen)?,
        "filter_chains": [{ "filters": [hcm("gateway_http")] }]
    })];
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let tls = compiled.listener.tls.clone().unwrap_or_default();
        let mut tls_params =
            json!({ "tls_minimum_protocol_version": tls.min_version.envoy_name() });
        if !tls.cipher_suites.is_empty() {
            tls_params["cipher_suites"] = json!(tls.cipher_suites);
        }
        listeners.push(json!({
            "name": "gateway_tls",
            "address": socket(&args.tls_listen)?,
            "filter_chains": [{
                "filters": [hcm("gateway_tls")],
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        // Ask for a client certificate; gateguard pins it by thumbprint, as APIM does.
                        "require_client_certificate": false,
                        "common_tls_context": {
                            // listener.tls: TLS 1.2 at least unless it says 1.3.
                            "tls_params": tls_params,
                            "tls_certificates": [{
                                "certificate_chain": { "filename": cert },
                                "private_key": { "filename": key }
                            }],
                            "validation_context": { "trust_chain_verification": "ACCEPT_UNTRUSTED" }
                        }
                    }
                }
            }]
        }));
    }

    let (up_host, up_port) = upstream_address(args)?;
    let mut clusters = vec![cluster(
        "function_app",
        up_host,
        up_port,
        upstream_tls.as_ref().map(function_app_tls),
    )];
    for (name, uri) in jwks_clusters(compiled) {
        let (scheme, rest) = uri.split_once("://").unwrap_or(("https", &uri));
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_string(), p.parse().unwrap_or(443)),
            _ => (
                authority.to_string(),
                if scheme == "http" { 80 } else { 443 },
            ),
        };
        let tls = (scheme == "https").then(|| jwks_tls(&host));
        clusters.push(cluster(&name, &host, port, tls));
    }
    if let Some(etcd) = etcd {
        if clusters.iter().any(|c| c["name"] == etcd.cluster.as_str()) {
            return Err(format!(
                "replay_store.etcd.cluster {:?} is also the name of another cluster this \
                 configuration needs (the function app's or a JWKS one): give etcd its own",
                etcd.cluster
            ));
        }
        clusters.push(etcd_cluster(args, etcd)?);
    }

    let mut bootstrap = json!({
        "static_resources": { "listeners": listeners, "clusters": clusters },
        "admin": { "address": socket(&args.admin)? }
    });
    let sds = upstream_tls
        .as_ref()
        .is_some_and(|t| matches!(t.client_certificate, Some(UpstreamClientCert::Sds { .. })));
    if args.ecds_dir.is_some() || sds {
        // Filesystem config subscriptions (ECDS, SDS) need a node identity.
        bootstrap["node"] = json!({ "id": "gateguard", "cluster": "gateguard" });
    }
    Ok(bootstrap)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// `listener` and `upstream`: TLS on both sides of the gateway.
    mod tls;

    /// Rendering for a container: the directory Envoy watches, the health check.
    mod container;

    const POLICY: &str = r#"{"apis":[{"name":"a","path_prefix":"/a"}]}"#;

    fn args(tls: bool, ecds_dir: Option<PathBuf>) -> Args {
        Args {
            policy: PathBuf::from("policy.json"),
            out: None,
            wasm: "gateguard.wasm".into(),
            listen: "127.0.0.1:8080".into(),
            tls_listen: "127.0.0.1:8443".into(),
            tls_cert: tls.then(|| "server.pem".into()),
            tls_key: tls.then(|| "server.key".into()),
            admin: "127.0.0.1:9901".into(),
            upstream: "127.0.0.1:8081".into(),
            upstream_sni: None,
            ecds_dir,
            ecds_envoy_dir: None,
            health_path: None,
            filter_only: false,
            access_log: None,
            format: Format::Yaml,
            etcd: Vec::new(),
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
            etcd_sni: None,
        }
    }

    fn connection_managers(v: &Value, out: &mut Vec<Value>) {
        match v {
            Value::Object(map) => {
                if map.get("@type").and_then(Value::as_str).is_some_and(|t| {
                    t.ends_with(".http_connection_manager.v3.HttpConnectionManager")
                }) {
                    out.push(v.clone());
                }
                map.values().for_each(|v| connection_managers(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| connection_managers(v, out)),
            _ => {}
        }
    }

    #[test]
    fn yaml_and_json_say_the_same_thing() {
        let mut a = args(true, None);
        a.access_log = Some("/dev/stdout".into());
        let policy = "{\n  \"apis\": [{\"name\": \"on\", \"path_prefix\": \"/a: b\"}]\n}\n";
        let config = render_policy(&a, policy).unwrap();
        let yaml = document(&config, Format::Yaml, "header").unwrap();
        let json = document(&config, Format::Json, "header").unwrap();
        assert!(yaml.starts_with("# header\n"));
        assert_eq!(serde_norway::from_str::<Value>(&yaml).unwrap(), config);
        assert_eq!(serde_json::from_str::<Value>(&json).unwrap(), config);
        // The embedded policy stays readable: a literal block holding the policy's own lines.
        assert!(yaml.contains("value: |\n"), "{yaml}");
        assert!(yaml
            .lines()
            .any(|l| l.trim_start() == r#""apis": [{"name": "on", "path_prefix": "/a: b"}]"#));
    }

    #[test]
    fn access_log_goes_on_every_listener_only_when_asked() {
        let mut a = args(true, None);
        let mut hcms = Vec::new();
        connection_managers(&render_policy(&a, POLICY).unwrap(), &mut hcms);
        assert!(hcms.iter().all(|hcm| hcm.get("access_log").is_none()));
        a.access_log = Some("/var/log/envoy/access.log".into());
        hcms.clear();
        connection_managers(&render_policy(&a, POLICY).unwrap(), &mut hcms);
        assert_eq!(hcms.len(), 2);
        for hcm in hcms {
            let log = &hcm["access_log"][0]["typed_config"];
            assert_eq!(log["path"], "/var/log/envoy/access.log");
            let line = log["log_format"]["text_format_source"]["inline_string"]
                .as_str()
                .unwrap();
            assert!(line.starts_with(
                "%RESPONSE_CODE% outcome=%FILTER_STATE(wasm.gateguard_outcome:PLAIN)% api="
            ));
            // The filter's client IP (masked or hashed as the policy says), never Envoy's own.
            assert!(line.contains(" client_ip=%FILTER_STATE(wasm.gateguard_client_ip:PLAIN)% "));
            assert!(!line.contains("DOWNSTREAM"), "{line}");
            assert!(line.ends_with(" reason=%FILTER_STATE(wasm.gateguard_reason:PLAIN)%\n"));
        }
    }

    #[test]
    fn warns_of_client_headers_the_listeners_would_drop() {
        let policy: Value = serde_json::from_str(
            r#"{"apis":[{"name":"a","path_prefix":"/a","subscription_key":{"header":"Ocp-Key"}},
                        {"name":"b","path_prefix":"/b","subscription_key":{"header":"Ocp_Key"}}]}"#,
        )
        .unwrap();
        assert_eq!(
            underscore_client_headers(&policy),
            vec![(
                "apis[1].subscription_key.header".to_string(),
                "Ocp_Key".to_string()
            )]
        );
    }

    #[test]
    fn every_listener_drops_client_headers_with_underscores() {
        for (tls, ecds, listeners) in [
            (false, None, 1),
            (true, None, 2),
            (true, Some(PathBuf::from("/nonexistent/filter")), 2),
        ] {
            let config = render_policy(&args(tls, ecds), POLICY).unwrap();
            let mut hcms = Vec::new();
            connection_managers(&config, &mut hcms);
            assert_eq!(hcms.len(), listeners);
            for hcm in hcms {
                assert_eq!(
                    hcm["common_http_protocol_options"]["headers_with_underscores_action"],
                    "DROP_HEADER"
                );
                // The client IP stays the TCP peer: X-Forwarded-For is gateguard's to judge.
                assert_eq!(hcm["use_remote_address"], true);
                assert_eq!(hcm["skip_xff_append"], true);
            }
        }
    }

    const ETCD_POLICY: &str = r#"{"apis":[{"name":"a","path_prefix":"/a"}],
        "replay_store":{"etcd":{"cluster":"replay_etcd","timeout_ms":300}}}"#;

    /// `render` as `run` calls it: with the store the compiled policy names.
    fn render_policy(a: &Args, text: &str) -> Result<Value, String> {
        let placeholder = |_: &str| Some(PLACEHOLDER.to_string());
        let policy = gateguard_core::parse_policy(text.as_bytes(), &placeholder).unwrap();
        render(a, text, &policy)
    }

    fn etcd_args(endpoints: &[&str]) -> Args {
        let mut a = args(false, None);
        a.etcd = endpoints.iter().map(|e| e.to_string()).collect();
        a
    }

    fn named_cluster(config: &Value, name: &str) -> Option<Value> {
        config["static_resources"]["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
    }

    fn env_keys(config: &Value) -> Vec<String> {
        let l = &config["static_resources"]["listeners"][0];
        let filter = &l["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0];
        filter["typed_config"]["config"]["vm_config"]["environment_variables"]["host_env_keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn etcd_policy_gets_an_http2_cluster_with_every_endpoint() {
        let config = render_policy(
            &etcd_args(&["10.0.0.1:2379", "10.0.0.2:2379", "[fd00::3]:2379"]),
            ETCD_POLICY,
        )
        .unwrap();
        let c = named_cluster(&config, "replay_etcd").unwrap();
        assert_eq!(c["type"], "STATIC");
        assert!(c.get("dns_lookup_family").is_none());
        let addresses: Vec<(String, u64)> = c["load_assignment"]["endpoints"][0]["lb_endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let s = &e["endpoint"]["address"]["socket_address"];
                (
                    s["address"].as_str().unwrap().to_string(),
                    s["port_value"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            addresses,
            [
                ("10.0.0.1".to_string(), 2379),
                ("10.0.0.2".to_string(), 2379),
                ("fd00::3".to_string(), 2379)
            ]
        );
        assert_eq!(c["load_assignment"]["cluster_name"], "replay_etcd");
        let options = &c["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
        assert_eq!(
            options["@type"],
            "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        );
        assert!(options["explicit_http_config"]["http2_protocol_options"].is_object());
        assert_eq!(c["connect_timeout"], "0.5s");
        assert!(c["circuit_breakers"]["thresholds"][0]["max_requests"].is_u64());
        assert_eq!(c["outlier_detection"]["max_ejection_percent"], 50);
        // Plain HTTP/2 unless a TLS option is given.
        assert!(c.get("transport_socket").is_none());
    }

    #[test]
    fn an_etcd_host_name_makes_the_cluster_resolve_names() {
        let config = render_policy(
            &etcd_args(&["10.0.0.1:2379", "etcd-1.internal:2379"]),
            ETCD_POLICY,
        )
        .unwrap();
        let c = named_cluster(&config, "replay_etcd").unwrap();
        assert_eq!(c["type"], "STRICT_DNS");
        assert_eq!(c["dns_lookup_family"], "V4_PREFERRED");
        assert_eq!(
            c["load_assignment"]["endpoints"][0]["lb_endpoints"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn the_default_cluster_name_is_etcd() {
        let policy = r#"{"apis":[{"name":"a","path_prefix":"/a"}],"replay_store":{"etcd":{}}}"#;
        let config = render_policy(&etcd_args(&["127.0.0.1:2379"]), policy).unwrap();
        assert!(named_cluster(&config, "etcd").is_some());
    }

    #[test]
    fn etcd_credentials_are_passed_into_the_vm_only_for_an_etcd_policy() {
        let vars = ["GATEGUARD_ETCD_USERNAME", "GATEGUARD_ETCD_PASSWORD"];
        let policy = r#"{"apis":[{"name":"a","path_prefix":"/a",
            "inject_headers":{"x-functions-key":{"env":"FUNCTION_KEY"}}}],
            "replay_store":{"etcd":{}}}"#;
        let keys = env_keys(&render_policy(&etcd_args(&["127.0.0.1:2379"]), policy).unwrap());
        assert_eq!(keys, ["FUNCTION_KEY", vars[0], vars[1]]);
        let keys = env_keys(&render_policy(&args(false, None), POLICY).unwrap());
        assert!(keys.iter().all(|k| !vars.contains(&k.as_str())), "{keys:?}");
    }

    #[test]
    fn the_ecds_filter_file_passes_the_etcd_credentials_too() {
        let dir =
            std::env::temp_dir().join(format!("gateguard-render-etcd-{}", std::process::id()));
        write_filter_file(&args(false, Some(dir.clone())), &dir, ETCD_POLICY, true).unwrap();
        let text = std::fs::read_to_string(dir.join(FILTER_FILE)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(text.contains("- GATEGUARD_ETCD_USERNAME\n"), "{text}");
        assert!(text.contains("- GATEGUARD_ETCD_PASSWORD\n"), "{text}");
    }

    #[test]
    fn etcd_adds_its_cluster_and_changes_nothing_else() {
        let local = r#"{"apis":[{"name":"a","path_prefix":"/a"}]}"#;
        let mut with_etcd = render_policy(&etcd_args(&["127.0.0.1:2379"]), ETCD_POLICY).unwrap();
        let without = render_policy(&args(false, None), local).unwrap();
        let clusters = with_etcd["static_resources"]["clusters"]
            .as_array_mut()
            .unwrap();
        assert_eq!(clusters.pop().unwrap()["name"], "replay_etcd");
        let l = &mut with_etcd["static_resources"]["listeners"][0];
        let filter = &mut l["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0];
        let config = &mut filter["typed_config"]["config"];
        config["configuration"]["value"] = json!(format!("{local}\n"));
        config["vm_config"]["environment_variables"]["host_env_keys"] = json!([]);
        assert_eq!(with_etcd, without);
    }

    #[test]
    fn etcd_tls_verifies_the_server_and_speaks_h2() {
        let mut a = etcd_args(&["127.0.0.1:2379", "etcd.internal:2379"]);
        a.etcd_ca = Some("/etc/gateguard/etcd-ca.pem".into());
        let c = named_cluster(&render_policy(&a, ETCD_POLICY).unwrap(), "replay_etcd").unwrap();
        let tls = &c["transport_socket"]["typed_config"];
        assert_eq!(
            tls["@type"],
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
        );
        assert!(tls.get("sni").is_none());
        let context = &tls["common_tls_context"];
        assert_eq!(context["alpn_protocols"], json!(["h2"]));
        assert_eq!(
            context["validation_context"]["trusted_ca"]["filename"],
            "/etc/gateguard/etcd-ca.pem"
        );
        // Without --etcd-sni the certificate must name one of the endpoints.
        assert_eq!(
            context["validation_context"]["match_typed_subject_alt_names"],
            json!([
                { "san_type": "IP_ADDRESS", "matcher": { "exact": "127.0.0.1" } },
                { "san_type": "DNS", "matcher": { "exact": "etcd.internal" } }
            ])
        );
        assert!(context.get("tls_certificates").is_none());

        a.etcd_cert = Some("client.pem".into());
        a.etcd_key = Some("client.key".into());
        a.etcd_sni = Some("etcd.example".into());
        let c = named_cluster(&render_policy(&a, ETCD_POLICY).unwrap(), "replay_etcd").unwrap();
        let tls = &c["transport_socket"]["typed_config"];
        assert_eq!(tls["sni"], "etcd.example");
        let context = &tls["common_tls_context"];
        assert_eq!(
            context["tls_certificates"],
            json!([{ "certificate_chain": { "filename": "client.pem" },
                     "private_key": { "filename": "client.key" } }])
        );
        assert_eq!(
            context["validation_context"]["match_typed_subject_alt_names"],
            json!([{ "san_type": "DNS", "matcher": { "exact": "etcd.example" } }])
        );
    }

    #[test]
    fn etcd_sni_alone_means_tls_against_the_system_cas() {
        let mut a = etcd_args(&["etcd.example:2379"]);
        a.etcd_sni = Some("etcd.example".into());
        let c = named_cluster(&render_policy(&a, ETCD_POLICY).unwrap(), "replay_etcd").unwrap();
        let context = &c["transport_socket"]["typed_config"]["common_tls_context"];
        assert_eq!(
            context["validation_context"]["trusted_ca"]["filename"],
            "/etc/ssl/certs/ca-certificates.crt"
        );
    }

    fn refusal(a: &Args, policy: &str) -> String {
        render_policy(a, policy).unwrap_err()
    }

    #[test]
    fn an_etcd_policy_without_endpoints_is_refused() {
        let e = refusal(&args(false, None), ETCD_POLICY);
        assert!(
            e.contains("--etcd HOST:PORT") && e.contains("replay_etcd"),
            "{e}"
        );
    }

    #[test]
    fn etcd_options_for_a_policy_without_etcd_are_refused() {
        let e = refusal(&etcd_args(&["127.0.0.1:2379"]), POLICY);
        assert!(
            e.starts_with("--etcd is for a policy with replay_store.etcd"),
            "{e}"
        );
        let local = r#"{"apis":[{"name":"a","path_prefix":"/a"}],"replay_store":"local"}"#;
        assert!(refusal(&etcd_args(&["127.0.0.1:2379"]), local).starts_with("--etcd is for"));
        let mut a = args(false, None);
        a.etcd_ca = Some("ca.pem".into());
        assert!(refusal(&a, POLICY).starts_with("--etcd-ca is for a policy"));
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_the_key_its_certificate() {
        let mut a = etcd_args(&["127.0.0.1:2379"]);
        a.etcd_cert = Some("client.pem".into());
        assert_eq!(
            refusal(&a, ETCD_POLICY),
            "--etcd-cert needs --etcd-key (its private key)"
        );
        a.etcd_cert = None;
        a.etcd_key = Some("client.key".into());
        assert_eq!(
            refusal(&a, ETCD_POLICY),
            "--etcd-key needs --etcd-cert (its certificate)"
        );
    }

    #[test]
    fn etcd_endpoints_are_host_and_port() {
        assert_eq!(etcd_endpoint("[::1]:2379").unwrap(), ("::1".into(), 2379));
        assert_eq!(
            etcd_endpoint("etcd-0.etcd:2379").unwrap(),
            ("etcd-0.etcd".into(), 2379)
        );
        for bad in [
            "https://etcd:2379",
            "etcd",
            "etcd:",
            "etcd:0",
            "etcd:99999",
            ":2379",
            "::1:2379",
            "[etcd]:2379",
            "et cd:2379",
        ] {
            let e = refusal(&etcd_args(&[bad]), ETCD_POLICY);
            assert!(e.starts_with(&format!("--etcd {bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn the_etcd_cluster_may_not_take_another_clusters_name() {
        let policy = r#"{"apis":[{"name":"a","path_prefix":"/a"}],
            "replay_store":{"etcd":{"cluster":"function_app"}}}"#;
        let e = refusal(&etcd_args(&["127.0.0.1:2379"]), policy);
        assert!(
            e.contains("\"function_app\" is also the name of another cluster"),
            "{e}"
        );
    }

    // ---- jwt.verify_with "envoy": jwt_authn in front of gateguard ----

    const JWKS: &str = r#"{"keys": [{"kty": "RSA", "kid": "k1", "use": "sig", "e": "AQAB",
        "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw"}]}"#;

    fn jwt_api(name: &str, jwks: &str, extra: &str) -> String {
        format!(
            r#"{{"name": "{name}", "path_prefix": "/{name}", "jwt": {{"issuers": ["https://idp/"],
                "audiences": ["api://a"], "algorithms": ["RS256"], "jwks": {jwks}{extra}}}}}"#
        )
    }

    fn remote(cluster: &str, uri: &str, refresh: Option<u64>) -> String {
        let refresh = refresh.map_or(String::new(), |s| format!(r#", "refresh_seconds": {s}"#));
        format!(r#"{{"cluster": "{cluster}", "uri": "{uri}"{refresh}}}"#)
    }

    fn policy_of(apis: &[String], rest: &str) -> String {
        format!(r#"{{"apis": [{}]{rest}}}"#, apis.join(", "))
    }

    const ENVOY: &str = r#", "verify_with": "envoy""#;

    fn http_filters(config: &Value) -> Vec<Vec<Value>> {
        let mut hcms = Vec::new();
        connection_managers(config, &mut hcms);
        hcms.iter()
            .map(|hcm| hcm["http_filters"].as_array().unwrap().clone())
            .collect()
    }

    fn jwt_authn_of(config: &Value) -> Value {
        let filters = &http_filters(config)[0];
        assert_eq!(filters[0]["name"], "envoy.filters.http.jwt_authn");
        filters[0]["typed_config"].clone()
    }

    /// The provider name the filter looks the payload up under, for API `i` of `text`.
    fn provider_of(text: &str, i: usize) -> String {
        let policy = gateguard_core::parse_policy(text.as_bytes(), &|_| None).unwrap();
        let jwt = policy.apis[i].jwt.as_ref().unwrap();
        jwt.envoy_provider().unwrap().to_string()
    }

    /// jwt.providers: every provider's remote JWKS gets its cluster (Entra's `entra_id` for
    /// login.microsoftonline.com, TLS with SNI), and with "envoy" every distinct key set its
    /// jwt_authn provider, each named as the filter looks it up.
    #[test]
    fn every_providers_keys_are_rendered() {
        let providers = format!(
            r#"{{"name": "a", "path_prefix": "/a", "jwt": {{"providers": [
                {{"entra": {{"tenant": "contoso.onmicrosoft.com"}}, "audiences": ["api://a"]}},
                {{"issuers": ["https://idp-b/"], "audiences": ["api://a"], "algorithms": ["RS256"],
                  "jwks": {}}},
                {{"issuers": ["https://idp-c/"], "audiences": ["api://a"], "algorithms": ["RS256"],
                  "jwks": {{"inline": {JWKS}}}}}
            ]{ENVOY}}}}}"#,
            remote("idp_b", "https://idp-b.example.com:8443/keys", None)
        );
        let text = policy_of(&[providers], "");
        let config = render_policy(&args(false, None), &text).unwrap();
        let clusters = config["static_resources"]["clusters"].as_array().unwrap();
        let by_name = |n: &str| clusters.iter().find(|c| c["name"] == n).unwrap().clone();
        let entra = by_name("entra_id");
        let address = &entra["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            ["address"]["socket_address"];
        assert_eq!(address["address"], "login.microsoftonline.com");
        assert_eq!(address["port_value"], 443);
        assert_eq!(
            entra["transport_socket"]["typed_config"]["sni"],
            "login.microsoftonline.com"
        );
        let b = by_name("idp_b");
        assert_eq!(
            b["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                ["socket_address"]["port_value"],
            8443
        );
        let policy = gateguard_core::parse_policy(text.as_bytes(), &|_| None).unwrap();
        let names: Vec<String> = policy.apis[0]
            .jwt
            .as_ref()
            .unwrap()
            .providers()
            .iter()
            .map(|p| p.envoy_provider().unwrap().to_string())
            .collect();
        let authn = jwt_authn_of(&config);
        let rendered = authn["providers"].as_object().unwrap();
        assert_eq!(rendered.len(), 3);
        for name in &names {
            assert_eq!(rendered[name]["payload_in_metadata"], name.as_str());
        }
        assert_eq!(
            rendered[&names[0]]["remote_jwks"]["http_uri"]["uri"],
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/discovery/v2.0/keys"
        );
        assert_eq!(
            rendered[&names[0]]["remote_jwks"]["http_uri"]["cluster"],
            "entra_id"
        );
        let inline: Value = serde_json::from_str(
            rendered[&names[2]]["local_jwks"]["inline_string"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(inline, serde_json::from_str::<Value>(JWKS).unwrap());
    }

    #[test]
    fn jwt_authn_goes_in_front_of_gateguard_on_every_listener() {
        let text = policy_of(
            &[jwt_api("a", &format!(r#"{{"inline": {JWKS}}}"#), ENVOY)],
            "",
        );
        let config = render_policy(&args(true, None), &text).unwrap();
        let chains = http_filters(&config);
        assert_eq!(chains.len(), 2);
        for filters in &chains {
            let names: Vec<&str> = filters
                .iter()
                .map(|f| f["name"].as_str().unwrap())
                .collect();
            assert_eq!(
                names,
                [
                    "envoy.filters.http.jwt_authn",
                    "envoy.filters.http.wasm",
                    "envoy.filters.http.router"
                ]
            );
            assert_eq!(filters[0], chains[0][0]);
        }
        let name = provider_of(&text, 0);
        let authn = jwt_authn_of(&config);
        assert_eq!(authn["@type"], JWT_AUTHN_TYPE);
        assert_eq!(authn["bypass_cors_preflight"], true);
        let providers = authn["providers"].as_object().unwrap();
        assert_eq!(providers.keys().collect::<Vec<_>>(), [&name]);
        let provider = &providers[&name];
        assert_eq!(provider["payload_in_metadata"], name.as_str());
        assert_eq!(provider["forward"], true);
        assert_eq!(provider["clock_skew_seconds"], 60);
        assert_eq!(
            provider["jwt_cache_config"],
            json!({ "jwt_cache_size": 2048 })
        );
        // The key set is the policy's own.
        let inline: Value =
            serde_json::from_str(provider["local_jwks"]["inline_string"].as_str().unwrap())
                .unwrap();
        assert_eq!(inline, serde_json::from_str::<Value>(JWKS).unwrap());
        // gateguard checks issuers and audiences, with its own messages; jwt_authn never
        // refuses, and never rewrites the payload it leaves.
        for field in [
            "issuer",
            "audiences",
            "normalize_payload_in_metadata",
            "forward_payload_header",
            "claim_to_headers",
            "remote_jwks",
        ] {
            assert!(provider.get(field).is_none(), "{field}");
        }
        assert_eq!(
            authn["rules"],
            json!([{ "match": { "prefix": "/" }, "requires": { "requires_any": { "requirements": [
                { "provider_name": name }, { "allow_missing_or_failed": {} }
            ] } } }])
        );
    }

    #[test]
    fn jwt_authn_takes_tokens_from_the_authorization_header_only() {
        let text = policy_of(
            &[jwt_api("a", &format!(r#"{{"inline": {JWKS}}}"#), ENVOY)],
            "",
        );
        let authn = jwt_authn_of(&render_policy(&args(false, None), &text).unwrap());
        let provider = &authn["providers"][provider_of(&text, 0)];
        // Without from_headers, jwt_authn would also read `?access_token=`.
        assert_eq!(
            provider["from_headers"],
            json!([
                { "name": "authorization", "value_prefix": "Bearer " },
                { "name": "authorization", "value_prefix": "bearer " },
                { "name": "authorization", "value_prefix": "BEARER " }
            ])
        );
        for field in ["from_params", "from_cookies"] {
            assert!(provider.get(field).is_none(), "{field}");
        }
    }

    #[test]
    fn apis_trusting_the_same_keys_share_one_provider() {
        let idp = remote("idp", "https://idp.example/keys", Some(600));
        let idp_hourly = remote("idp", "https://idp.example/keys", None);
        let other = remote("other_idp", "http://127.0.0.1:9000/keys", Some(60));
        let text = policy_of(
            &[
                jwt_api("a", &idp, ENVOY),
                jwt_api(
                    "b",
                    &idp_hourly,
                    r#", "verify_with": "envoy", "clock_skew_seconds": 300"#,
                ),
                jwt_api(
                    "c",
                    &other,
                    r#", "verify_with": "envoy", "clock_skew_seconds": 0"#,
                ),
                // Verified by gateguard: no provider of its own, even with the same keys.
                jwt_api("d", &idp, ""),
            ],
            "",
        );
        let (a, b, c) = (
            provider_of(&text, 0),
            provider_of(&text, 1),
            provider_of(&text, 2),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        let config = render_policy(&args(false, None), &text).unwrap();
        let authn = jwt_authn_of(&config);
        let providers = authn["providers"].as_object().unwrap();
        assert_eq!(providers.keys().collect::<Vec<_>>(), [&a, &c]);
        // The largest skew of the APIs sharing it, the shortest refresh.
        assert_eq!(providers[&a]["clock_skew_seconds"], 300);
        assert_eq!(
            providers[&a]["remote_jwks"],
            json!({ "http_uri": { "uri": "https://idp.example/keys", "cluster": "idp",
                                  "timeout": "5s" },
                    "cache_duration": "600s", "async_fetch": {} })
        );
        assert_eq!(providers[&c]["clock_skew_seconds"], 0);
        assert_eq!(providers[&c]["remote_jwks"]["cache_duration"], "60s");
        // Every provider verifies for itself and leaves its own payload: a requires_any over
        // the providers would stop at the first that succeeds.
        let any = |name: &str| {
            json!({ "requires_any": { "requirements": [
                { "provider_name": name }, { "allow_missing_or_failed": {} }
            ] } })
        };
        assert_eq!(
            authn["rules"][0]["requires"],
            json!({ "requires_all": { "requirements": [any(&a), any(&c)] } })
        );
        // The clusters jwt_authn fetches through are the ones render writes for the policy.
        for (name, host, port) in [
            ("idp", "idp.example", 443),
            ("other_idp", "127.0.0.1", 9000),
        ] {
            let c = named_cluster(&config, name).unwrap();
            let address = &c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
                ["address"]["socket_address"];
            assert_eq!(
                (address["address"].as_str(), address["port_value"].as_u64()),
                (Some(host), Some(port))
            );
        }
        assert!(named_cluster(&config, "idp").unwrap()["transport_socket"].is_object());
    }

    #[test]
    fn jwt_authn_caches_as_many_tokens_as_gateguard_would() {
        let api = jwt_api("a", &format!(r#"{{"inline": {JWKS}}}"#), ENVOY);
        let provider = |rest: &str| {
            let text = policy_of(std::slice::from_ref(&api), rest);
            jwt_authn_of(&render_policy(&args(false, None), &text).unwrap())["providers"]
                [provider_of(&text, 0)]
            .clone()
        };
        assert_eq!(
            provider(r#", "token_cache": {"max_entries": 500}"#)["jwt_cache_config"],
            json!({ "jwt_cache_size": 500 })
        );
        // 0 turns gateguard's cache off, and jwt_authn's.
        assert!(provider(r#", "token_cache": {"max_entries": 0}"#)
            .get("jwt_cache_config")
            .is_none());
    }

    #[test]
    fn no_jwt_authn_unless_an_api_has_envoy_verify() {
        let text = policy_of(
            &[
                jwt_api("a", &remote("idp", "https://idp/keys", None), ""),
                jwt_api(
                    "b",
                    &format!(r#"{{"inline": {JWKS}}}"#),
                    r#", "verify_with": "gateguard""#,
                ),
            ],
            "",
        );
        for config in [
            render_policy(&args(true, None), &text).unwrap(),
            render_policy(&args(true, None), POLICY).unwrap(),
        ] {
            for filters in http_filters(&config) {
                assert_eq!(filters.len(), 2);
                assert_eq!(filters[0]["name"], "envoy.filters.http.wasm");
            }
        }
    }

    #[test]
    fn with_ecds_jwt_authn_is_discovered_from_its_own_file() {
        let dir =
            std::env::temp_dir().join(format!("gateguard-render-jwt-authn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = policy_of(
            &[jwt_api("a", &format!(r#"{{"inline": {JWKS}}}"#), ENVOY)],
            "",
        );
        let config = render_policy(&args(false, Some(dir.clone())), &text).unwrap();
        let filters = &http_filters(&config)[0];
        let discovery = &filters[0]["config_discovery"];
        assert_eq!(filters[0]["name"], JWT_AUTHN_NAME);
        assert_eq!(discovery["type_urls"], json!([JWT_AUTHN_TYPE]));
        let path = discovery["config_source"]["path_config_source"]["path"]
            .as_str()
            .unwrap();
        assert!(path.ends_with("/jwt-authn-filter.yaml"), "{path}");
        assert_eq!(filters[1]["name"], "gateguard");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn filter_only_keeps_jwt_authn_in_step_with_the_policy() {
        let dir =
            std::env::temp_dir().join(format!("gateguard-render-jwt-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = dir.join(JWT_AUTHN_FILE);
        let with = policy_of(
            &[jwt_api("a", &format!(r#"{{"inline": {JWKS}}}"#), ENVOY)],
            "",
        );
        let compiled =
            |text: &str| gateguard_core::parse_policy(text.as_bytes(), &|_| None).unwrap();
        let full = args(false, Some(dir.clone()));
        let mut only = args(false, Some(dir.clone()));
        only.filter_only = true;
        let read = || -> Value {
            let doc: Value =
                serde_norway::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
            assert_eq!(doc["resources"][0]["name"], JWT_AUTHN_NAME);
            doc["resources"][0]["typed_config"].clone()
        };

        // A policy without it: no file, and --filter-only cannot add jwt_authn to a running
        // configuration that has none in front of gateguard.
        write_jwt_authn_file(&full, &dir, POLICY, &compiled(POLICY)).unwrap();
        assert!(!file.exists());
        let e = write_jwt_authn_file(&only, &dir, &with, &compiled(&with)).unwrap_err();
        assert!(e.contains("render it again without --filter-only"), "{e}");
        assert!(!file.exists());

        // Rendered with it: the file holds the same jwt_authn the embedded config would.
        write_jwt_authn_file(&full, &dir, &with, &compiled(&with)).unwrap();
        let embedded = jwt_authn_of(&render_policy(&args(false, None), &with).unwrap());
        assert_eq!(read(), embedded);
        // A new policy without it leaves the slot verifying nothing.
        write_jwt_authn_file(&only, &dir, POLICY, &compiled(POLICY)).unwrap();
        assert_eq!(read(), json!({ "@type": JWT_AUTHN_TYPE }));
        write_jwt_authn_file(&only, &dir, &with, &compiled(&with)).unwrap();
        assert_eq!(read(), embedded);
        // A full render for a policy without it removes the file its configuration never reads.
        write_jwt_authn_file(&full, &dir, POLICY, &compiled(POLICY)).unwrap();
        assert!(!file.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
