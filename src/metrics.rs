//! Envoy counters: `gateguard.<api>.<name>` and `gateguard.<name>` before routing. Envoy shows
//! Wasm-defined stats under the `wasmcustom.` prefix on `/stats`.

use std::collections::HashMap;

use crate::host::{self, MetricType};
use gateguard_core::{CompiledPolicy, Outcome};

/// Per-API counters that are not request outcomes.
pub const CERT_EXPIRING: &str = "cert_expiring";
pub const JWT_CACHE_HIT: &str = "jwt_cache_hit";
pub const JWT_CACHE_MISS: &str = "jwt_cache_miss";
pub const JWKS_FETCH: &str = "jwks_fetch";
pub const JWKS_FETCH_FAILED: &str = "jwks_fetch_failed";
pub const REPLAY_CAS_RETRIES: &str = "replay_cas_retries";
pub const REPLAY_RECLAIMED: &str = "replay_reclaimed";
/// The etcd replay store: gRPC calls sent, conversations that ended in an error or a timeout,
/// decisions the local cache made without a call, requests let through unchecked (`allow`).
pub const ETCD_CALLS: &str = "etcd_calls";
pub const ETCD_ERRORS: &str = "etcd_errors";
pub const ETCD_TIMEOUTS: &str = "etcd_timeouts";
pub const REPLAY_CACHE_HITS: &str = "replay_cache_hits";
pub const REPLAY_UNCHECKED: &str = "replay_unchecked";
const EXTRA_PER_API: [&str; 12] = [
    CERT_EXPIRING,
    JWT_CACHE_HIT,
    JWT_CACHE_MISS,
    JWKS_FETCH,
    JWKS_FETCH_FAILED,
    REPLAY_CAS_RETRIES,
    REPLAY_RECLAIMED,
    ETCD_CALLS,
    ETCD_ERRORS,
    ETCD_TIMEOUTS,
    REPLAY_CACHE_HITS,
    REPLAY_UNCHECKED,
];

#[derive(Debug, Default)]
pub struct Metrics {
    per_api: Vec<HashMap<&'static str, u32>>,
    global: HashMap<&'static str, u32>,
    gauges: HashMap<&'static str, u32>,
}

fn define(kind: MetricType, name: &str) -> Option<u32> {
    host::define_metric(kind, name)
}

impl Metrics {
    /// Defines every counter up front so they show on `/stats` at zero.
    pub fn define(policy: &CompiledPolicy) -> Self {
        let per_api = policy
            .apis
            .iter()
            .map(|api| {
                Outcome::PER_API
                    .iter()
                    .map(|o| o.name())
                    .chain(EXTRA_PER_API)
                    .filter_map(|n| {
                        define(MetricType::Counter, &format!("gateguard.{}.{n}", api.name))
                            .map(|id| (n, id))
                    })
                    .collect()
            })
            .collect();
        let global = Outcome::GLOBAL
            .iter()
            .filter_map(|o| {
                define(MetricType::Counter, &format!("gateguard.{}", o.name()))
                    .map(|id| (o.name(), id))
            })
            .collect();
        let gauges = ["replay_store_live_entries"]
            .into_iter()
            .filter_map(|n| define(MetricType::Gauge, &format!("gateguard.{n}")).map(|id| (n, id)))
            .collect();
        Self {
            per_api,
            global,
            gauges,
        }
    }

    pub fn count(&self, api: Option<usize>, outcome: Outcome) {
        self.add(api, outcome.name(), 1);
    }

    pub fn add(&self, api: Option<usize>, name: &str, n: u64) {
        let id = match api {
            Some(i) => self.per_api.get(i).and_then(|m| m.get(name)),
            None => self.global.get(name),
        };
        if let (Some(id), Ok(n)) = (id, i64::try_from(n)) {
            if n > 0 {
                host::increment_metric(*id, n);
            }
        }
    }

    pub fn set_gauge(&self, name: &str, value: u64) {
        if let Some(id) = self.gauges.get(name) {
            host::record_metric(*id, value);
        }
    }
}
