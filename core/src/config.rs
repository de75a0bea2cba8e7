//! The policy document (docs/policy.md): raw serde types, then a compiled policy.
//! Two phases: serde with `deny_unknown_fields` catches shape errors with their JSON path and
//! line; `compile` catches meaning errors (bad CIDR, empty list...) with their JSON path.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::audit::{LogConfig, LogPolicy};
use crate::client_cert::{ClientCertConfig, ClientCertPolicy};
use crate::cors::{CorsConfig, CorsPolicy};
use crate::deploy::{ListenerConfig, ListenerPolicy, UpstreamConfig, UpstreamPolicy};
use crate::error::{index, join, without_secrets, ConfigError, ConfigErrors};
use crate::header_rules::{HeaderRules, HeaderRulesConfig};
use crate::headers::{check_upstream_header_name, is_header_value};
use crate::ip_filter::{ClientIpConfig, ClientIpPolicy, IpFilterConfig, IpFilterPolicy};
use crate::jwt::{JwtConfig, JwtPolicy};
use crate::limits::{LimitsConfig, LimitsPolicy};
use crate::locate::locate;
use crate::methods::MethodsPolicy;
use crate::path::validate_prefix;
use crate::rate_limit::{
    CallLimit, CallLimitConfig, CounterStoreConfig, CounterStorePolicy, LimitKey, LimitKind,
};
use crate::replay::etcd::{ReplayStore, ReplayStoreConfig};
use crate::replay::{ReplayCacheConfig, ReplayCachePolicy, ReplayConfig, ReplayMode};
use crate::subscription_key::{SubscriptionKeyConfig, SubscriptionKeyPolicy};
use crate::value::{EnvLookup, ValueSource};

/// Policies larger than this are refused before parsing.
pub const MAX_POLICY_BYTES: usize = 1024 * 1024;

/// Errors reported for one policy at most: finding where each stands reads the document again,
/// so a megabyte of broken APIs stays a bounded amount of work.
pub const MAX_REPORTED_ERRORS: usize = 100;

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Editors' JSON Schema reference; ignored by the filter.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[cfg_attr(feature = "schema", schemars(!skip_serializing_if))]
    #[cfg_attr(feature = "schema", schemars(with = "String"))]
    #[serde(rename = "$schema", default, deserialize_with = "string_only")]
    pub schema: Option<String>,
    pub apis: Vec<ApiConfig>,
    /// The gateway's TLS listener, as `gateguard render` writes it; ignored by the filter.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub listener: Option<ListenerConfig>,
    /// How Envoy reaches the function app, as `gateguard render` writes it; ignored by the
    /// filter.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub upstream: Option<UpstreamConfig>,
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "crate::serialize::is_default")
    )]
    #[serde(default)]
    pub client_ip: ClientIpConfig,
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "crate::serialize::is_default")
    )]
    #[serde(default)]
    pub replay_cache: ReplayCacheConfig,
    /// Where the replay history lives: this Envoy's shared data (default) or etcd.
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "crate::serialize::is_default")
    )]
    #[serde(default)]
    pub replay_store: ReplayStoreConfig,
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "crate::serialize::is_default")
    )]
    #[serde(default)]
    pub token_cache: TokenCacheConfig,
    /// The rate-limit and quota counters: how many live callers the store holds.
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "crate::serialize::is_default")
    )]
    #[serde(default)]
    pub limit_counters: CounterStoreConfig,
    /// How the audit trail shows client IPs (docs/policy.md, "Audit log").
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub log: Option<LogConfig>,
}

/// A string, never `null`: `"$schema"` is for editors, which want a URL or a path.
fn string_only<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d).map(Some)
}

/// The verified-token cache: a fixed number of shared-data slots.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct TokenCacheConfig {
    #[serde(default = "default_token_cache_entries")]
    pub max_entries: u32,
}

impl Default for TokenCacheConfig {
    fn default() -> Self {
        Self {
            max_entries: default_token_cache_entries(),
        }
    }
}

fn default_token_cache_entries() -> u32 {
    2048
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "serialize", derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub name: String,
    pub path_prefix: String,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub cors: Option<CorsConfig>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub ip_filter: Option<IpFilterConfig>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub client_certificate: Option<ClientCertConfig>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub subscription_key: Option<SubscriptionKeyConfig>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub replay: Option<ReplayConfig>,
    #[cfg_attr(
        feature = "serialize",
        serde(skip_serializing_if = "BTreeMap::is_empty")
    )]
    #[serde(default)]
    pub inject_headers: BTreeMap<String, ValueSource>,
    /// Methods the API serves; any other gets 405.
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub limits: Option<LimitsConfig>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub headers: Option<HeaderRulesConfig>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub rate_limit: Option<CallLimitConfig>,
    #[cfg_attr(feature = "serialize", serde(skip_serializing_if = "Option::is_none"))]
    #[serde(default)]
    pub quota: Option<CallLimitConfig>,
}

/// A policy the filter can enforce: every field validated, every list compiled.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub apis: Vec<ApiPolicy>,
    /// For `gateguard render` (docs/policy.md, "Listener TLS", "Reaching the function app").
    pub listener: ListenerPolicy,
    pub upstream: UpstreamPolicy,
    pub client_ip: ClientIpPolicy,
    pub replay_cache: ReplayCachePolicy,
    /// Where the replay history lives; with etcd, `replay_cache` is this gateway's cache of it.
    pub replay_store: ReplayStore,
    /// Slots of the verified-token cache; 0 disables it.
    pub token_cache_slots: u32,
    /// Where rate-limit and quota counters live.
    pub limit_counters: CounterStorePolicy,
    /// SHA-256 of the policy document: verified-token cache entries are bound to it, so a
    /// changed policy never serves a token verified under the old one.
    pub fingerprint: [u8; 32],
    /// How the audit trail shows client IPs.
    pub log: LogPolicy,
}

impl CompiledPolicy {
    /// How many key slots the host holds: one per identity provider of every API.
    pub fn key_slots(&self) -> usize {
        self.apis
            .iter()
            .filter_map(|a| a.jwt.as_ref())
            .flat_map(|j| j.providers())
            .map(|p| p.slot().saturating_add(1))
            .max()
            .unwrap_or(0)
    }
}

#[derive(Debug, Clone)]
pub struct ApiPolicy {
    pub name: String,
    pub path_prefix: String,
    pub cors: Option<CorsPolicy>,
    pub ip_filter: Option<IpFilterPolicy>,
    pub client_certificate: Option<ClientCertPolicy>,
    pub subscription_key: Option<SubscriptionKeyPolicy>,
    pub jwt: Option<JwtPolicy>,
    pub replay: Option<ReplayMode>,
    /// (lower-case name, value), applied upstream after the client's copies are removed.
    pub inject_headers: Vec<(String, String)>,
    pub methods: Option<MethodsPolicy>,
    pub limits: Option<LimitsPolicy>,
    pub headers: Option<HeaderRules>,
    /// The rate limit, then the quota: each counted when its caller is known (docs/policy.md,
    /// "Rate limits and quotas").
    pub call_limits: Vec<CallLimit>,
}

/// Parses and compiles a policy document. Errors carry the JSON path and, where it can be
/// found, the line and column. The first error of [`parse_policy_report`].
pub fn parse_policy(text: &[u8], env: EnvLookup<'_>) -> Result<CompiledPolicy, ConfigError> {
    parse_policy_report(text, env).map_err(ConfigErrors::into_first)
}

/// Parses and compiles a policy document, reporting every error that does not depend on another
/// (docs/policy.md, "Validating a policy"): each API's and each section's. A syntax error stops
/// there; a shape error (an unknown field, a wrong type) leaves the other APIs and sections to be
/// read and compiled on their own. The first error is the one [`parse_policy`] returns. A UTF-8
/// byte-order mark before the document is skipped, as editors write one.
pub fn parse_policy_report(
    text: &[u8],
    env: EnvLookup<'_>,
) -> Result<CompiledPolicy, ConfigErrors> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(ConfigError::new(
            "",
            format!(
                "policy is {} bytes; the limit is {MAX_POLICY_BYTES}",
                text.len()
            ),
        )
        .into());
    }
    let whole = std::str::from_utf8(text)
        .map_err(|e| ConfigError::new("", format!("policy is not UTF-8: {e}")))?;
    let text = without_bom(whole);
    let mut errors = Vec::new();
    let policy = match parse_raw(text) {
        Ok(raw) => {
            let numbers: Vec<usize> = (0..raw.apis.len()).collect();
            compile_parts(&raw, &numbers, true, env, &mut errors)
        }
        Err(first) => {
            errors.push(first);
            compile_readable_parts(text, env, &mut errors);
            None
        }
    };
    if errors.len() > MAX_REPORTED_ERRORS {
        errors.truncate(MAX_REPORTED_ERRORS);
        errors.push(ConfigError::new(
            "",
            format!("stopped after {MAX_REPORTED_ERRORS} errors; there are more"),
        ));
    }
    for e in &mut errors {
        if e.line.is_none() {
            if let Some((line, column)) = locate(text, &e.path) {
                e.line = Some(line);
                e.column = Some(column);
            }
        }
    }
    match (policy, ConfigErrors::from_vec(errors)) {
        (_, Some(errors)) => Err(errors),
        (Some(mut policy), None) => {
            policy.fingerprint = Sha256::digest(whole.as_bytes()).into();
            Ok(policy)
        }
        (None, None) => Err(ConfigError::new("", "policy refused").into()),
    }
}

/// The document after a UTF-8 byte-order mark, if it starts with one (Windows editors write it;
/// JSON forbids it, and it is no reason to refuse a policy).
pub fn without_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Phase one: the document's shape.
pub fn parse_raw(text: &str) -> Result<PolicyConfig, ConfigError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let raw: PolicyConfig =
        serde_path_to_error::deserialize(&mut de).map_err(|e| shape_error(e, ""))?;
    de.end().map_err(|e| {
        ConfigError::new("", strip_position(&e.to_string())).at(e.line(), e.column())
    })?;
    Ok(raw)
}

/// A serde error as a policy error, its path under `prefix` and without the secrets it quotes.
fn shape_error(e: serde_path_to_error::Error<serde_json::Error>, prefix: &str) -> ConfigError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let (line, column) = (inner.line(), inner.column());
    let path = match (prefix, path.as_str()) {
        (_, ".") => prefix.to_string(),
        ("", _) => path,
        _ => join(prefix, &path),
    };
    let (path, reason) = without_secrets(path, strip_position(&inner.to_string()));
    ConfigError::new(path, reason).at(line, column)
}

/// After a shape error: every top-level section and every API read on its own, so that one typo
/// does not hide the next; the errors of those that cannot be read, then the compiler's errors
/// for those that can. Nothing more when the document is not JSON throughout.
fn compile_readable_parts(text: &str, env: EnvLookup<'_>, errors: &mut Vec<ConfigError>) {
    let Ok(sections) = serde_json::from_str::<BTreeMap<String, Box<RawValue>>>(text) else {
        return;
    };
    let add = |errors: &mut Vec<ConfigError>, e: ConfigError| {
        if !errors
            .iter()
            .any(|o| o.path == e.path && o.reason == e.reason)
        {
            errors.push(e);
        }
    };
    // The sections that read alone, together in one document with no API.
    let mut readable = String::from("{");
    for (key, value) in sections.iter().filter(|(k, _)| *k != "apis") {
        if errors.len() > MAX_REPORTED_ERRORS {
            return;
        }
        let Ok(name) = serde_json::to_string(key) else {
            continue;
        };
        let piece = format!("{{{name}:{},\"apis\":[]}}", value.get());
        match parse_raw(&piece) {
            Ok(_) => {
                readable.push_str(&format!("{name}:{},", value.get()));
            }
            Err(e) => add(
                errors,
                relocated(e, text, key, name.len().saturating_add(2)),
            ),
        }
    }
    readable.push_str("\"apis\":[]}");
    let Ok(mut raw) = parse_raw(&readable) else {
        return;
    };
    let mut numbers = Vec::new();
    let mut complete = true;
    match sections.get("apis") {
        None => {
            complete = false;
            add(errors, ConfigError::new("", "missing field `apis`"));
        }
        Some(list) => match serde_json::from_str::<Vec<Box<RawValue>>>(list.get()) {
            Ok(items) => {
                for (i, item) in items.iter().enumerate() {
                    if errors.len() > MAX_REPORTED_ERRORS {
                        return;
                    }
                    let path = index("apis", i);
                    let mut de = serde_json::Deserializer::from_str(item.get());
                    match serde_path_to_error::deserialize::<_, ApiConfig>(&mut de) {
                        Ok(api) => {
                            raw.apis.push(api);
                            numbers.push(i);
                        }
                        Err(e) => {
                            complete = false;
                            add(errors, relocated(shape_error(e, &path), text, &path, 0));
                        }
                    }
                }
            }
            Err(_) => {
                complete = false;
                if let Err(e) = parse_raw(&format!("{{\"apis\":{}}}", list.get())) {
                    add(errors, relocated(e, text, "apis", 8));
                }
            }
        },
    }
    let mut compiled = Vec::new();
    compile_parts(&raw, &numbers, complete, env, &mut compiled);
    for e in compiled {
        add(errors, e);
    }
}

/// An error found in a piece of the document (the value at `path`, after `prefix` bytes of
/// wrapping on the piece's first line), placed where that value stands in `text`.
fn relocated(mut e: ConfigError, text: &str, path: &str, prefix: usize) -> ConfigError {
    let Some((line, column)) = locate(text, path) else {
        e.line = None;
        e.column = None;
        return e;
    };
    let (l, c) = (e.line.unwrap_or(1), e.column.unwrap_or(0));
    let at = match l {
        1 if c <= prefix.saturating_add(1) => (line, column),
        1 => (
            line,
            column.saturating_add(c.saturating_sub(prefix.saturating_add(1))),
        ),
        _ => (line.saturating_add(l.saturating_sub(1)), c),
    };
    e.at(at.0, at.1)
}

/// serde_json appends " at line L column C"; we report position separately.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg.get(..i).unwrap_or(msg).to_string(),
        None => msg.to_string(),
    }
}

/// Phase two: the document's meaning. The first error of [`compile_report`].
pub fn compile(raw: &PolicyConfig, env: EnvLookup<'_>) -> Result<CompiledPolicy, ConfigError> {
    compile_report(raw, env).map_err(ConfigErrors::into_first)
}

/// Phase two, with every error that does not depend on another.
pub fn compile_report(
    raw: &PolicyConfig,
    env: EnvLookup<'_>,
) -> Result<CompiledPolicy, ConfigErrors> {
    let numbers: Vec<usize> = (0..raw.apis.len()).collect();
    let mut errors = Vec::new();
    let policy = compile_parts(raw, &numbers, true, env, &mut errors);
    match (policy, ConfigErrors::from_vec(errors)) {
        (Some(policy), None) => Ok(policy),
        (_, Some(errors)) => Err(errors),
        (None, None) => Err(ConfigError::new("", "policy refused").into()),
    }
}

/// The value of `result`, or `None` with its error added to `errors`.
fn keep<T>(errors: &mut Vec<ConfigError>, result: Result<T, ConfigError>) -> Option<T> {
    result.map_err(|e| errors.push(e)).ok()
}

/// Compiles `raw`, whose `apis[k]` is the document's `apis[numbers[k]]` (the others could not be
/// read); `complete` when every API could be. Adds each error to `errors`; `Some` without any.
fn compile_parts(
    raw: &PolicyConfig,
    numbers: &[usize],
    complete: bool,
    env: EnvLookup<'_>,
    errors: &mut Vec<ConfigError>,
) -> Option<CompiledPolicy> {
    let before = errors.len();
    if raw.apis.is_empty() && complete {
        errors.push(ConfigError::new("apis", "must define at least one API"));
    }
    let client_ip = keep(errors, ClientIpPolicy::compile(&raw.client_ip, "client_ip"));
    let listener = keep(
        errors,
        ListenerPolicy::compile(raw.listener.as_ref(), "listener"),
    );
    let upstream = keep(
        errors,
        UpstreamPolicy::compile(raw.upstream.as_ref(), "upstream"),
    );
    let mut apis: Vec<ApiPolicy> = Vec::with_capacity(raw.apis.len());
    for (api, &i) in raw.apis.iter().zip(numbers) {
        let path = index("apis", i);
        let Some(compiled) = compile_api(api, &path, env, errors) else {
            continue;
        };
        if let Some(other) = apis.iter().find(|a| a.name == compiled.name) {
            errors.push(ConfigError::new(
                join(&path, "name"),
                format!("duplicate API name {:?}", other.name),
            ));
            continue;
        }
        if let Some(other) = apis
            .iter()
            .find(|a| a.path_prefix.eq_ignore_ascii_case(&compiled.path_prefix))
        {
            errors.push(ConfigError::new(
                join(&path, "path_prefix"),
                format!(
                    "{:?} is already the prefix of API {:?} (prefixes match case-insensitively)",
                    compiled.path_prefix, other.name
                ),
            ));
            continue;
        }
        apis.push(compiled);
    }
    // Every identity provider gets its own key slot in the host (`Host::jwt_keys`).
    let mut slots = 0;
    for jwt in apis.iter_mut().filter_map(|a| a.jwt.as_mut()) {
        slots = jwt.assign_slots(slots);
    }
    let replay_cache = keep(
        errors,
        ReplayCachePolicy::compile(&raw.replay_cache, "replay_cache"),
    );
    let replay_store = keep(
        errors,
        ReplayStore::compile(&raw.replay_store, "replay_store"),
    );
    if raw.token_cache.max_entries > 1_000_000 {
        errors.push(ConfigError::new(
            "token_cache.max_entries",
            "must be at most 1000000 (each slot may hold up to 8 KiB)",
        ));
    }
    let limit_counters = keep(
        errors,
        CounterStorePolicy::compile(raw.limit_counters.max_entries, "limit_counters"),
    );
    let log = keep(errors, LogPolicy::compile(raw.log.as_ref(), "log", env));
    if errors.len() > before {
        return None;
    }
    let (
        Some(client_ip),
        Some(listener),
        Some(upstream),
        Some(replay_cache),
        Some(replay_store),
        Some(limit_counters),
        Some(log),
    ) = (
        client_ip,
        listener,
        upstream,
        replay_cache,
        replay_store,
        limit_counters,
        log,
    )
    else {
        return None;
    };
    Some(CompiledPolicy {
        apis,
        listener,
        upstream,
        client_ip,
        replay_cache,
        replay_store,
        token_cache_slots: raw.token_cache.max_entries,
        limit_counters,
        fingerprint: [0; 32],
        log,
    })
}

/// One API, each of its sections compiled on its own: a check that needs another section (a
/// limit by subject needs `jwt`) runs when that section is present, so a broken section does not
/// also make its dependents look wrong.
fn compile_api(
    api: &ApiConfig,
    path: &str,
    env: EnvLookup<'_>,
    errors: &mut Vec<ConfigError>,
) -> Option<ApiPolicy> {
    let before = errors.len();
    // The name becomes part of stat names (`gateguard.<api>.allowed`).
    if api.name.is_empty()
        || api.name.len() > 64
        || !api
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        errors.push(ConfigError::new(
            join(path, "name"),
            format!("{:?} must be 1-64 letters, digits, '_' or '-'", api.name),
        ));
    }
    keep(
        errors,
        validate_prefix(&api.path_prefix)
            .map_err(|reason| ConfigError::new(join(path, "path_prefix"), reason)),
    );

    let cors = keep(
        errors,
        api.cors
            .as_ref()
            .map(|c| CorsPolicy::compile(c, &join(path, "cors")))
            .transpose(),
    );
    let ip_filter = keep(
        errors,
        api.ip_filter
            .as_ref()
            .map(|c| IpFilterPolicy::compile(c, &join(path, "ip_filter")))
            .transpose(),
    );
    let client_certificate = keep(
        errors,
        api.client_certificate
            .as_ref()
            .map(|c| ClientCertPolicy::compile(c, &join(path, "client_certificate")))
            .transpose(),
    );
    let subscription_key = keep(
        errors,
        api.subscription_key
            .as_ref()
            .map(|c| SubscriptionKeyPolicy::compile(c, &join(path, "subscription_key")))
            .transpose(),
    );
    let jwt = keep(
        errors,
        api.jwt
            .as_ref()
            .map(|c| JwtPolicy::compile(c, &join(path, "jwt"), env))
            .transpose(),
    );
    if jwt
        .as_ref()
        .is_some_and(|j| j.as_ref().is_some_and(|j| j.certificate_bound().is_some()))
        && api.client_certificate.is_none()
    {
        errors.push(ConfigError::new(
            join(path, "jwt.certificate_bound"),
            "needs \"client_certificate\" on this API: its sources give the certificate a token \
             is bound to",
        ));
    }
    if api.replay.is_some() && api.jwt.is_none() {
        errors.push(ConfigError::new(
            join(path, "replay"),
            "replay detection needs \"jwt\": only validated tokens are recorded",
        ));
    }
    let replay = api.replay.as_ref().map(|r| r.mode);

    let inject_path = join(path, "inject_headers");
    let mut inject_headers = Vec::with_capacity(api.inject_headers.len());
    for (name, source) in &api.inject_headers {
        let field = join(&inject_path, name);
        if let Err(r) = check_upstream_header_name(name) {
            errors.push(ConfigError::new(&field, r));
            continue;
        }
        let Some(value) = keep(errors, source.resolve(&field, env)) else {
            continue;
        };
        if !is_header_value(&value) {
            errors.push(ConfigError::new(
                field,
                "value contains control characters (CR, LF, NUL...)",
            ));
            continue;
        }
        let lower = name.to_ascii_lowercase();
        if inject_headers.iter().any(|(n, _)| *n == lower) {
            errors.push(ConfigError::new(
                field,
                "header listed twice (names are case-insensitive)",
            ));
            continue;
        }
        inject_headers.push((lower, value));
    }

    let methods = keep(
        errors,
        api.methods
            .as_ref()
            .map(|m| MethodsPolicy::compile(m, &join(path, "methods")))
            .transpose(),
    );
    let limits = keep(
        errors,
        api.limits
            .as_ref()
            .map(|l| LimitsPolicy::compile(l, &join(path, "limits")))
            .transpose(),
    );
    // Headers the API reads or sets itself: forbidding one would refuse every request.
    let mut owned: Vec<&str> = inject_headers.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(Some(keys)) = &subscription_key {
        owned.push(keys.header_name());
    }
    if let Some(Some(jwt)) = &jwt {
        owned.extend(jwt.consumed_header_names());
    }
    let headers = keep(
        errors,
        api.headers
            .as_ref()
            .map(|h| HeaderRules::compile(h, &join(path, "headers"), &owned))
            .transpose(),
    );
    let mut call_limits = Vec::new();
    for (field, kind, cfg) in [
        ("rate_limit", LimitKind::Rate, &api.rate_limit),
        ("quota", LimitKind::Quota, &api.quota),
    ] {
        let Some(cfg) = cfg else { continue };
        let field = join(path, field);
        let Some(limit) = keep(errors, CallLimit::compile(cfg, kind, &field)) else {
            continue;
        };
        let missing = match limit.by {
            LimitKey::SubscriptionKey if api.subscription_key.is_none() => Some("subscription_key"),
            LimitKey::Subject if api.jwt.is_none() => Some("jwt"),
            _ => None,
        };
        if let Some(missing) = missing {
            errors.push(ConfigError::new(
                join(&field, "by"),
                format!(
                    "{:?} needs \"{missing}\" on this API: calls are counted by a credential it \
                     validates",
                    limit.by.name()
                ),
            ));
            continue;
        }
        call_limits.push(limit);
    }
    if errors.len() > before {
        return None;
    }
    let (
        Some(cors),
        Some(ip_filter),
        Some(client_certificate),
        Some(subscription_key),
        Some(jwt),
        Some(methods),
        Some(limits),
        Some(headers),
    ) = (
        cors,
        ip_filter,
        client_certificate,
        subscription_key,
        jwt,
        methods,
        limits,
        headers,
    )
    else {
        return None;
    };
    Some(ApiPolicy {
        name: api.name.clone(),
        path_prefix: api.path_prefix.clone(),
        cors,
        ip_filter,
        client_certificate,
        subscription_key,
        jwt,
        replay,
        inject_headers,
        methods,
        limits,
        headers,
        call_limits,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> Result<CompiledPolicy, ConfigError> {
        parse_policy(text.as_bytes(), &no_env)
    }

    fn report(text: &str) -> Vec<(String, Option<usize>)> {
        parse_policy_report(text.as_bytes(), &no_env)
            .unwrap_err()
            .iter()
            .map(|e| (e.path.clone(), e.line))
            .collect()
    }

    #[test]
    fn every_api_and_section_reports_its_own_errors() {
        // Meaning errors: one per section of every API, and the top-level sections.
        let text = r#"{"apis": [
  {"name": "a b", "path_prefix": "/a",
   "ip_filter": {"allow": ["10.0.0.300"]}},
  {"name": "b", "path_prefix": "/b", "cors": {"allowed_origins": ["https://*"]},
   "replay": {"mode": "with_ip"}},
  {"name": "c", "path_prefix": "/c"}
],
"token_cache": {"max_entries": 2000000}}"#;
        assert_eq!(
            report(text),
            [
                ("apis[0].name".to_string(), Some(2)),
                ("apis[0].ip_filter.allow[0]".to_string(), Some(3)),
                ("apis[1].cors.allowed_origins[0]".to_string(), Some(4)),
                ("apis[1].replay".to_string(), Some(5)),
                ("token_cache.max_entries".to_string(), Some(8)),
            ]
        );
        // The first is what parse_policy says.
        assert_eq!(parse(text).unwrap_err().path, "apis[0].name");
    }

    #[test]
    fn a_shape_error_leaves_the_other_apis_and_sections_to_be_checked() {
        let text = r#"{"apis": [
  {"name": "a", "path_prefix": "/a", "corz": {}},
  {"name": "b", "path_prefix": "/b", "ip_filter": {"allow": ["10.0.0.0/33"]}},
  {"name": "c", "path_prefix": "/c", "methods": "GET"},
  {"name": "d", "path_prefix": "/d"}
],
"client_ip": {"trusted_proxy_hopz": 1},
"bogus": true,
"token_cache": {"max_entries": 2000000}}"#;
        let errors = parse_policy_report(text.as_bytes(), &no_env).unwrap_err();
        let found: Vec<(&str, Option<usize>)> =
            errors.iter().map(|e| (e.path.as_str(), e.line)).collect();
        assert_eq!(found[0], ("apis[0].corz", Some(2)));
        for want in [
            ("apis[1].ip_filter.allow[0]", Some(3)),
            ("apis[2].methods", Some(4)),
            ("client_ip.trusted_proxy_hopz", Some(7)),
            ("bogus", Some(8)),
            ("token_cache.max_entries", Some(9)),
        ] {
            assert!(found.contains(&want), "{want:?} not in {found:?}");
        }
        assert_eq!(errors.len(), 6, "{found:?}");
        // Reported once, with the position the full parse gave it.
        let corz = errors.iter().find(|e| e.path == "apis[0].corz").unwrap();
        assert!(
            corz.reason.starts_with("unknown field `corz`"),
            "{}",
            corz.reason
        );
        // A column on the piece's first line lands on the document's.
        let methods = errors.iter().find(|e| e.path == "apis[2].methods").unwrap();
        assert!(
            methods.reason.contains("expected a sequence"),
            "{}",
            methods.reason
        );
        assert!(methods.column.unwrap() > 40, "{methods:?}");
        // "must define at least one API" is not made up when the APIs could not be read.
        let only_bad = report(r#"{"apis": [{"name": "a", "path_prefix": "/a", "x": 1}]}"#);
        assert_eq!(only_bad, [("apis[0].x".to_string(), Some(1))]);
    }

    #[test]
    fn a_megabyte_of_broken_apis_reports_a_bounded_list_quickly() {
        let api = r#"{"name": "a", "path_prefix": "/a", "x": 1}"#;
        let n = MAX_POLICY_BYTES / (api.len() + 2);
        let text = format!("{{\"apis\": [{}]}}", vec![api; n].join(",\n"));
        assert!(text.len() <= MAX_POLICY_BYTES);
        let start = std::time::Instant::now();
        let errors = parse_policy_report(text.as_bytes(), &no_env).unwrap_err();
        assert_eq!(errors.len(), MAX_REPORTED_ERRORS + 1);
        let last = errors.iter().last().unwrap();
        assert!(
            last.reason.starts_with("stopped after 100 errors"),
            "{last}"
        );
        assert!(start.elapsed().as_secs() < 5, "{:?}", start.elapsed());
        // The same for meaning errors, which all compile.
        let api =
            |i: usize| format!(r#"{{"name": "a{i}", "path_prefix": "/a{i}", "methods": []}}"#);
        let list: Vec<String> = (0..5000).map(api).collect();
        let text = format!("{{\"apis\": [{}]}}", list.join(",\n"));
        let errors = parse_policy_report(text.as_bytes(), &no_env).unwrap_err();
        assert_eq!(errors.len(), MAX_REPORTED_ERRORS + 1);
        assert_eq!(errors.first().line, Some(1));
    }

    #[test]
    fn a_syntax_error_is_the_only_error() {
        let text =
            "{\"apis\": [{\"name\": \"a b\", \"path_prefix\": \"/a\", \"x\": 1}],\n \"y\" 1}";
        let found = report(text);
        assert_eq!(found.len(), 1, "{found:?}");
        let found =
            report("{\"apis\": [{\"name\": \"a\", \"path_prefix\": \"/a\", \"x\": 1}]} trailing");
        assert_eq!(found.len(), 1, "{found:?}");
        let found = report(r#"{"apis": {"name": "a"}, "client_ip": 3}"#);
        assert_eq!(
            found.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
            ["apis", "client_ip"]
        );
        let found = report(r#"{"client_ip": 3}"#);
        assert_eq!(found.len(), 2, "{found:?}");
    }

    #[test]
    fn secrets_stay_masked_in_every_reported_error() {
        let text = r#"{"apis": [
  {"name": "a", "path_prefix": "/a", "inject_headers": {"x-k": "s3cret-one"}},
  {"name": "b", "path_prefix": "/b", "inject_headers": {"x-k": {"vaule": "s3cret-two"}}},
  {"name": "c", "path_prefix": "/c", "jwt": {"issuers": ["i"], "audiences": ["a"],
   "algorithms": ["HS256"], "hmac_secret": {"s3cret-three": 1}}}
]}"#;
        let errors = parse_policy_report(text.as_bytes(), &no_env).unwrap_err();
        assert_eq!(errors.len(), 3);
        for e in errors.iter() {
            assert!(!e.to_string().contains("s3cret"), "{e}");
        }
        assert!(!errors.to_string().contains("s3cret"));
    }

    #[test]
    fn a_byte_order_mark_is_skipped() {
        let text = "\u{feff}{\"apis\":[{\"name\":\"a\",\"path_prefix\":\"/api\"}]}";
        let p = parse(text).unwrap();
        assert_eq!(p.apis[0].name, "a");
        let bad = "\u{feff}{\"apis\":[{\"name\":\"a\",\"path_prefix\":\"/api\", \"x\":1}]}";
        let e = parse(bad).unwrap_err();
        assert_eq!((e.path.as_str(), e.line), ("apis[0].x", Some(1)));
        // Only at the start, and only one.
        assert!(
            parse("\u{feff}\u{feff}{\"apis\":[{\"name\":\"a\",\"path_prefix\":\"/a\"}]}").is_err()
        );
        // The fingerprint is the document's, mark included: another document, another binding.
        let plain = parse("{\"apis\":[{\"name\":\"a\",\"path_prefix\":\"/api\"}]}").unwrap();
        assert_ne!(plain.fingerprint, p.fingerprint);
    }

    #[test]
    fn a_json_schema_reference_is_a_string_and_is_ignored() {
        let p = parse(r#"{"$schema": "./gateguard.schema.json", "apis": [{"name": "a", "path_prefix": "/a"}]}"#)
            .unwrap();
        assert_eq!(p.apis.len(), 1);
        for bad in [r#"{"x": 1}"#, "null", "3"] {
            let e = parse(&format!(
                r#"{{"$schema": {bad}, "apis": [{{"name": "a", "path_prefix": "/a"}}]}}"#
            ))
            .unwrap_err();
            assert_eq!(e.path, "$schema");
        }
    }

    #[test]
    fn minimal_policy_compiles() {
        let p = parse(r#"{"apis":[{"name":"a","path_prefix":"/api"}]}"#).unwrap();
        assert_eq!(p.apis[0].name, "a");
        assert_eq!(p.client_ip.trusted_proxy_hops(), 0);
    }

    #[test]
    fn unknown_fields_are_refused_with_path_and_line() {
        let err = parse("{\"apis\":[\n{\"name\":\"a\",\"path_prefix\":\"/api\",\n \"corz\":{}}]}")
            .unwrap_err();
        assert_eq!(err.path, "apis[0].corz");
        assert!(
            err.reason.contains("unknown field `corz`"),
            "{}",
            err.reason
        );
        assert_eq!(err.line, Some(3));
    }

    #[test]
    fn semantic_errors_get_path_and_line() {
        let text = "{\"apis\":[{\"name\":\"a\",\"path_prefix\":\"/api\",\n\"ip_filter\":{\"allow\":[\"10.0.0.0/8\",\n\"10.0.0.300\"]}}]}";
        let err = parse(text).unwrap_err();
        assert_eq!(err.path, "apis[0].ip_filter.allow[1]");
        assert_eq!(err.line, Some(3));
        assert!(err.to_string().starts_with("apis[0].ip_filter.allow[1]: "));
    }

    #[test]
    fn names_and_prefixes_are_validated() {
        let err = parse(r#"{"apis":[{"name":"a b","path_prefix":"/api"}]}"#).unwrap_err();
        assert_eq!(err.path, "apis[0].name");
        let err = parse(
            r#"{"apis":[{"name":"a","path_prefix":"/api"},{"name":"a","path_prefix":"/b"}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.path, "apis[1].name");
        let err = parse(
            r#"{"apis":[{"name":"a","path_prefix":"/api"},{"name":"b","path_prefix":"/API"}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.path, "apis[1].path_prefix");
        let err = parse(r#"{"apis":[]}"#).unwrap_err();
        assert_eq!(err.path, "apis");
        let err = parse(r#"{"apis":[{"name":"a","path_prefix":"/api"}]} x"#).unwrap_err();
        assert!(err.reason.contains("trailing"), "{}", err.reason);
        let err = parse("[]").unwrap_err();
        assert_eq!(err.path, "");
    }

    #[test]
    fn log_block_is_optional_and_its_key_comes_from_the_environment() {
        let p = parse(r#"{"apis":[{"name":"a","path_prefix":"/api"}]}"#).unwrap();
        assert!(!p.log.every_request());
        let text = r#"{"apis":[{"name":"a","path_prefix":"/api"}],
            "log":{"client_ip":"hashed","hash_key":{"env":"LOG_KEY"}}}"#;
        let err = parse(text).unwrap_err();
        assert_eq!(err.path, "log.hash_key");
        assert!(err.reason.contains("LOG_KEY"), "{}", err.reason);
        assert_eq!(err.line, Some(2));
        let env = |k: &str| (k == "LOG_KEY").then(|| "k".repeat(32));
        let p = parse_policy(text.as_bytes(), &env).unwrap();
        assert!(p.log.every_request());
        let err =
            parse(r#"{"apis":[{"name":"a","path_prefix":"/api"}],"log":{"client_ip":"hidden"}}"#)
                .unwrap_err();
        assert_eq!(err.path, "log.client_ip");
    }

    #[test]
    fn inject_headers_resolve_env_and_refuse_missing_or_reserved() {
        let text = r#"{"apis":[{"name":"a","path_prefix":"/api","inject_headers":{
            "X-Functions-Key":{"env":"APP_KEY"},"x-lit":{"value":"v"}}}]}"#;
        let env = |k: &str| (k == "APP_KEY").then(|| "secret".to_string());
        let p = parse_policy(text.as_bytes(), &env).unwrap();
        assert_eq!(
            p.apis[0].inject_headers,
            vec![
                ("x-functions-key".to_string(), "secret".to_string()),
                ("x-lit".to_string(), "v".to_string())
            ]
        );
        let err = parse(text).unwrap_err();
        assert_eq!(err.path, "apis[0].inject_headers.X-Functions-Key");
        assert!(err.reason.contains("APP_KEY"));
        let err = parse(
            r#"{"apis":[{"name":"a","path_prefix":"/api","inject_headers":{"host":{"value":"x"}}}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.path, "apis[0].inject_headers.host");
        let err = parse(
            r#"{"apis":[{"name":"a","path_prefix":"/api","inject_headers":{"x":{"value":"a\r\nb"}}}]}"#,
        )
        .unwrap_err();
        assert!(err.reason.contains("control"));
        let err = parse(
            r#"{"apis":[{"name":"a","path_prefix":"/api","inject_headers":{"x":{"secret":"a"}}}]}"#,
        )
        .unwrap_err();
        assert!(
            err.path.starts_with("apis[0].inject_headers"),
            "{}",
            err.path
        );
    }
}
