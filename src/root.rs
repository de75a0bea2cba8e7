//! The root context: one per worker. Compiles the policy on `on_configure` and refuses a bad
//! one (Envoy then rejects the configuration), so no worker serves with a half-understood
//! policy, and prepares the replay store for it (moving its entries when the policy wants
//! another layout). From `on_tick` it keeps remote JWKS fresh (the core's `SharedJwks` elects
//! the one worker that fetches and hands every worker the key set it publishes; this file sends
//! the request and passes the answer back), and it reports the replay store's occupancy,
//! reclaiming expired entries on the way.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use gateguard_core::jwt::fetch::FetchResult;
use gateguard_core::jwt::keys::MAX_JWKS_BYTES;
use gateguard_core::jwt::shared_jwks::{JwksRequest, SharedJwks};
use gateguard_core::jwt::JwksSource;
use gateguard_core::replay::etcd::{Session, PASSWORD_ENV, USERNAME_ENV};
use gateguard_core::replay::{current_layout, ensure_buckets, sweep, Layout, Prepared};
use gateguard_core::shared_data::SharedStore;
use gateguard_core::{parse_policy_report, CompiledPolicy};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use crate::configured::ConfiguredGateway;
use crate::filter::RequestFilter;
use crate::host::{self, log, BufferType, HostStore, LogLevel, MapType, KEY_PREFIX};
use crate::metrics::{Metrics, JWKS_FETCH, JWKS_FETCH_FAILED};

/// Replay buckets scanned (and swept) per tick for the occupancy gauge.
const OCCUPANCY_SLICE: u32 = 512;

/// One remote JWKS an identity provider of an API uses.
struct RemoteJwks {
    api: usize,
    /// The provider's key slot.
    slot: usize,
    cluster: String,
    /// Who fetches it and how its keys reach every worker (lease, publish, adopt).
    jwks: SharedJwks,
}

#[derive(Default)]
pub struct GatewayRoot {
    gateway: Option<Rc<ConfiguredGateway>>,
    remotes: Vec<RemoteJwks>,
    /// dispatch_http_call token → index in `remotes`.
    in_flight: HashMap<u32, usize>,
    /// The replay layout being scanned for the gauge, and how far the scan got.
    occupancy_layout: Option<Layout>,
    occupancy_cursor: u32,
    occupancy_live: u64,
    store_full_logged: u64,
}

fn now() -> u64 {
    host::now()
}

impl Context for GatewayRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let Some(index) = self.in_flight.remove(&token_id) else {
            return;
        };
        let now = now();
        let status = host::header_value(MapType::HttpCallResponseHeaders, ":status")
            .and_then(|s| String::from_utf8(s).ok())
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0);
        let (Some(gateway), Some(remote)) = (self.gateway.clone(), self.remotes.get_mut(index))
        else {
            return;
        };
        let api_name = gateway.api_name(remote.api).to_string();
        let result = if body_size > MAX_JWKS_BYTES {
            // Never copied into the VM: its memory would keep the peak for good.
            Err(remote.jwks.on_oversized_response(&HostStore, now))
        } else {
            let body = host::buffer(BufferType::HttpCallResponseBody, 0, body_size);
            remote
                .jwks
                .on_response(&HostStore, now, status, &body.unwrap_or_default())
        };
        match result {
            Ok(FetchResult::Keys(set)) => {
                log(
                    LogLevel::Info,
                    &format!(
                        "gateguard: api={api_name} JWKS loaded: {} keys (cluster {})",
                        set.len(),
                        remote.cluster
                    ),
                );
                gateway.set_keys(remote.slot, Rc::new(set));
            }
            Ok(FetchResult::Discovered) => {}
            Err(e) => {
                gateway.metrics.add(Some(remote.api), JWKS_FETCH_FAILED, 1);
                log(
                    LogLevel::Warn,
                    &format!(
                        "gateguard: api={api_name} JWKS fetch from cluster {} failed: {}; keeping {} (retry in {}s)",
                        remote.cluster,
                        e.reason(),
                        if gateway.has_keys(remote.slot) { "the last good key set" } else { "no key set: JWT requests get 401" },
                        remote.jwks.next_attempt().saturating_sub(now)
                    ),
                );
            }
        }
    }
}

/// The version Cargo.toml gives the workspace: the one `make dist` names its artifacts with.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

impl RootContext for GatewayRoot {
    /// Envoy starts one VM per worker thread (and one on its main thread): the first of them to
    /// start in this Envoy says which gateguard it runs, so that a log shows the version
    /// deployed. Shared data is common to all of them (and outlives a configuration reload), so
    /// a later VM of the same version stays quiet; a new version says so again.
    fn on_vm_start(&mut self, _size: usize) -> bool {
        let key = format!("{KEY_PREFIX}started");
        let seen = match HostStore.get(&key) {
            Ok(Some((value, _))) => value == VERSION.as_bytes(),
            Ok(None) | Err(_) => false,
        };
        if !seen {
            // Two workers starting in the same instant may both log: harmless, and set without
            // CAS because Envoy ignores CAS when it creates a key.
            let _ = HostStore.set(&key, VERSION.as_bytes(), 0);
            log(LogLevel::Info, &format!("gateguard {VERSION} starting"));
        }
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = host::buffer(BufferType::PluginConfiguration, 0, usize::MAX) else {
            log(
                LogLevel::Error,
                "gateguard: no plugin configuration; refusing to start",
            );
            return false;
        };
        let env = |name: &str| std::env::var(name).ok();
        let policy = match parse_policy_report(&config, &env) {
            Ok(p) => p,
            Err(e) => {
                log(LogLevel::Error, &format!("gateguard: policy refused: {e}"));
                return false;
            }
        };
        let replay_prefix = policy.replay_cache.key_prefix(KEY_PREFIX);
        if policy.uses_replay_store() {
            // Buckets exist before any request: a request never creates one (creation ignores
            // CAS in Envoy, so it could not be made exclusive). A policy that wants another
            // bucket count moves every entry to a new layout here, while requests of the
            // previous policy keep using the store.
            let wanted = policy.replay_cache.buckets();
            match ensure_buckets(&HostStore, &replay_prefix, wanted) {
                Ok(prepared) => log_prepared(&prepared, wanted),
                Err(e) => {
                    log(
                        LogLevel::Error,
                        &format!(
                            "gateguard: cannot prepare the replay store ({e}); refusing the policy"
                        ),
                    );
                    return false;
                }
            }
        }
        let mut keys = vec![None; policy.key_slots()];
        self.remotes.clear();
        self.in_flight.clear();
        for (i, api) in policy.apis.iter().enumerate() {
            // Envoy's jwt_authn fetches and holds the keys of an API it verifies for.
            let Some(jwt) = api.jwt.as_ref().filter(|j| !j.verified_by_envoy()) else {
                continue;
            };
            for provider in jwt.providers() {
                let slot = provider.slot();
                match &provider.jwks {
                    JwksSource::Inline(set) => {
                        if let Some(k) = keys.get_mut(slot) {
                            *k = Some(Rc::new(set.clone()));
                        }
                    }
                    JwksSource::Remote {
                        cluster,
                        uri,
                        refresh_seconds,
                    } => self.remotes.push(RemoteJwks {
                        api: i,
                        slot,
                        cluster: cluster.clone(),
                        jwks: SharedJwks::new(KEY_PREFIX, cluster, uri, *refresh_seconds),
                    }),
                    JwksSource::None => {}
                }
            }
        }
        let etcd = match etcd_credentials(&policy) {
            Ok(credentials) => Session::new(credentials),
            Err(why) => {
                log(
                    LogLevel::Error,
                    &format!("gateguard: {why}; refusing the policy"),
                );
                return false;
            }
        };
        let metrics = Metrics::define(&policy);
        self.gateway = Some(Rc::new(ConfiguredGateway::new(
            policy,
            metrics,
            keys,
            replay_prefix,
            etcd,
        )));
        // Fetching starts on the first tick, on the workers. Not from here: Envoy also
        // configures a root context on the main thread, whose HTTP calls never answer, and a
        // fetch started there would hold the fetch lease until it timed out.
        self.set_tick_period(Duration::from_secs(1));
        true
    }

    fn on_tick(&mut self) {
        let Some(gateway) = self.gateway.clone() else {
            return;
        };
        let now = now();
        for index in 0..self.remotes.len() {
            self.refresh_jwks(&gateway, index, now);
        }
        self.report_replay_store(&gateway, now);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(RequestFilter::new(self.gateway.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl GatewayRoot {
    fn refresh_jwks(&mut self, gateway: &ConfiguredGateway, index: usize, now: u64) {
        let Some(remote) = self.remotes.get_mut(index) else {
            return;
        };
        if let Some(set) = remote.jwks.adopt(&HostStore, now) {
            gateway.set_keys(remote.slot, Rc::new(set));
        }
        if gateway.take_kid_request(remote.slot) {
            remote.jwks.on_unknown_kid(now);
        }
        let Some(request) = remote.jwks.begin(&HostStore, now) else {
            return;
        };
        match hostcalls::dispatch_http_call(
            &remote.cluster,
            request.headers(),
            None,
            vec![],
            Duration::from_secs(JwksRequest::TIMEOUT_SECONDS),
        ) {
            Ok(token) => {
                gateway.metrics.add(Some(remote.api), JWKS_FETCH, 1);
                self.in_flight.insert(token, index);
            }
            Err(status) => {
                remote.jwks.on_dispatch_failed(&HostStore, now);
                gateway.metrics.add(Some(remote.api), JWKS_FETCH_FAILED, 1);
                log(
                    LogLevel::Warn,
                    &format!(
                        "gateguard: api={} cannot fetch the JWKS through cluster {:?} ({status:?}): is the cluster defined?",
                        gateway.api_name(remote.api),
                        remote.cluster
                    ),
                );
            }
        }
    }

    /// The replay store's live entries, as a gauge, scanned a slice per tick in the layout
    /// requests use (a scan that meets sealed buckets starts again in the new layout), expired
    /// entries of idle buckets reclaimed on the way; and one warning per tick at most when new
    /// tokens were refused because the store is full.
    fn report_replay_store(&mut self, gateway: &ConfiguredGateway, now: u64) {
        let policy = &gateway.policy;
        if !policy.uses_replay_store() {
            return;
        }
        if self.occupancy_cursor == 0 {
            self.occupancy_layout = current_layout(&HostStore, &gateway.replay_prefix)
                .ok()
                .flatten();
            self.occupancy_live = 0;
        }
        if let Some(layout) = self.occupancy_layout {
            let end = self
                .occupancy_cursor
                .saturating_add(OCCUPANCY_SLICE)
                .min(layout.buckets);
            let seen = sweep(
                &HostStore,
                &gateway.replay_prefix,
                layout,
                self.occupancy_cursor..end,
                now,
            );
            self.occupancy_live = self.occupancy_live.saturating_add(seen.live);
            self.occupancy_cursor = end;
            if seen.sealed > 0 {
                self.occupancy_cursor = 0;
            } else if end >= layout.buckets {
                gateway
                    .metrics
                    .set_gauge("replay_store_live_entries", self.occupancy_live);
                self.occupancy_cursor = 0;
            }
        }
        let full = gateway.store_full.get();
        if full > self.store_full_logged {
            log(
                LogLevel::Warn,
                &format!(
                    "gateguard: replay store full: {} new tokens refused (fail closed); raise replay_cache.max_entries (now {})",
                    full.saturating_sub(self.store_full_logged),
                    policy.replay_cache.max_entries()
                ),
            );
            self.store_full_logged = full;
        }
    }
}

/// One line per migration this root context worked on, and a warning when the store could not
/// be moved to the policy's size or lost a corrupt bucket on the way.
/// etcd credentials come from Envoy's environment (the Wasm VM's `host_env_keys`), never the
/// policy: both names set, or neither (etcd without auth, or client-certificate auth on the
/// cluster's TLS).
fn etcd_credentials(policy: &CompiledPolicy) -> Result<Option<(String, String)>, String> {
    if policy.replay_store.etcd().is_none() {
        return Ok(None);
    }
    let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    match (var(USERNAME_ENV), var(PASSWORD_ENV)) {
        (Some(user), Some(password)) => Ok(Some((user, password))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(format!("{USERNAME_ENV} is set but {PASSWORD_ENV} is not")),
        (None, Some(_)) => Err(format!("{PASSWORD_ENV} is set but {USERNAME_ENV} is not")),
    }
}

fn log_prepared(prepared: &Prepared, wanted: u32) {
    for m in prepared.migrations.iter().filter(|m| m.sealed > 0) {
        log(
            LogLevel::Info,
            &format!(
                "gateguard: replay store moved from {} to {}: this thread carried {} buckets, {} entries",
                m.from, m.to, m.sealed, m.copied
            ),
        );
        if m.corrupt > 0 {
            log(
                LogLevel::Warn,
                &format!(
                    "gateguard: replay store: {} corrupt buckets of {} could not be moved; the tokens they held are forgotten",
                    m.corrupt, m.from
                ),
            );
        }
    }
    if prepared.layout.buckets != wanted {
        log(
            LogLevel::Warn,
            &format!(
                "gateguard: replay store left at {} instead of {wanted} buckets: other policies in this VM keep moving it (give gateways with different replay_cache sizes their own vm_id)",
                prepared.layout
            ),
        );
    }
}
