//! The gateway as one configuration left it, on one worker: the compiled policy and what the
//! worker keeps alongside it (counters, the APIs' current key sets, pending early refreshes,
//! the replay store's prefix). The root context builds it at `on_configure` and keeps it fresh
//! from `on_tick`; the HTTP contexts read it. It is also the host side of the core's `Host`
//! trait: key sets, the verified-token cache and the replay store, in Envoy shared data.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use gateguard_core::jwt::{cache, KeySet};
use gateguard_core::memo::{ReplayMemo, TokenMemo};
use gateguard_core::pipeline::{Event, Host};
use gateguard_core::rate_limit::store::{counter_secret, random_secret};
use gateguard_core::replay::etcd::Session;
use gateguard_core::replay::Verdict;
use gateguard_core::shared_data::SharedStore;
use gateguard_core::CompiledPolicy;
use serde_json::{Map, Value};

use crate::host::{self, HostStore, LogLevel, KEY_PREFIX};
use crate::metrics::{
    Metrics, JWT_CACHE_HIT, JWT_CACHE_MISS, REPLAY_CACHE_HITS, REPLAY_CAS_RETRIES, REPLAY_RECLAIMED,
};

/// A verified token's claims and `exp`, shared by the requests that bring it.
type VerifiedClaims = (Rc<Map<String, Value>>, u64);

/// One configuration's compiled policy and this worker's state around it.
pub struct ConfiguredGateway {
    pub policy: CompiledPolicy,
    pub metrics: Metrics,
    pub replay_prefix: String,
    /// Some API reads the TLS peer certificate (worked out once, not per request).
    pub reads_peer_certificate: bool,
    /// Some API needs the peer address before deciding (worked out once, not per request).
    pub reads_peer_address: bool,
    /// Some API takes verified JWT payloads from jwt_authn's dynamic metadata.
    pub reads_dynamic_metadata: bool,
    /// New tokens refused because the replay store was full (logged from on_tick).
    pub store_full: Cell<u64>,
    /// This worker's etcd session (auth token, leases known granted), with the etcd store.
    pub etcd: RefCell<Session>,
    /// When this worker last logged an etcd failure (unix seconds): one line per 10 s.
    pub etcd_failure_logged: Cell<u64>,
    /// Verified tokens this worker saw, until their `exp`.
    token_memo: TokenMemo,
    /// Replay facts this worker saw decided.
    replay_memo: ReplayMemo,
    keys: RefCell<Vec<Option<Rc<KeySet>>>>,
    kid_requests: RefCell<Vec<bool>>,
    /// The key of rate-limit counter ids, shared by every worker through shared data.
    limit_secret: [u8; 32],
}

impl ConfiguredGateway {
    pub fn new(
        policy: CompiledPolicy,
        metrics: Metrics,
        keys: Vec<Option<Rc<KeySet>>>,
        replay_prefix: String,
        etcd: Session,
    ) -> Self {
        let n = keys.len();
        let limit_secret = if policy.apis.iter().any(|a| !a.call_limits.is_empty()) {
            limit_secret()
        } else {
            [0; 32]
        };
        Self {
            limit_secret,
            reads_peer_certificate: policy.reads_peer_certificate(),
            reads_peer_address: policy.reads_peer_address(),
            reads_dynamic_metadata: policy.reads_dynamic_metadata(),
            policy,
            metrics,
            replay_prefix,
            store_full: Cell::new(0),
            etcd: RefCell::new(etcd),
            etcd_failure_logged: Cell::new(0),
            token_memo: TokenMemo::default(),
            replay_memo: ReplayMemo::default(),
            keys: RefCell::new(keys),
            kid_requests: RefCell::new(vec![false; n]),
        }
    }

    pub fn api_name(&self, api: usize) -> &str {
        self.policy.apis.get(api).map_or("-", |a| a.name.as_str())
    }

    /// Key sets are held per identity provider: `slot` is `Provider::slot`.
    pub fn set_keys(&self, slot: usize, set: Rc<KeySet>) {
        if let Some(held) = self.keys.borrow_mut().get_mut(slot) {
            *held = Some(set);
        }
    }

    pub fn has_keys(&self, slot: usize) -> bool {
        self.keys.borrow().get(slot).is_some_and(Option::is_some)
    }

    pub fn take_kid_request(&self, slot: usize) -> bool {
        self.kid_requests
            .borrow_mut()
            .get_mut(slot)
            .is_some_and(|r| std::mem::replace(r, false))
    }

    fn token_cache_key(&self, key: &[u8; 32]) -> String {
        format!(
            "{KEY_PREFIX}tc.{}",
            cache::slot(key, self.policy.token_cache_slots)
        )
    }
}

/// The counter secret every worker shares: created by the first, read by the others. Should
/// shared data fail, this worker keys its counters alone (a store that fails refuses every
/// count anyway: fail closed), and says so.
fn limit_secret() -> [u8; 32] {
    let fresh = random_secret().unwrap_or_else(|| {
        host::log(
            LogLevel::Error,
            "gateguard: no random bytes from the host for the rate-limit counter secret",
        );
        [0; 32]
    });
    counter_secret(&HostStore, fresh).unwrap_or_else(|| {
        host::log(
            LogLevel::Error,
            "gateguard: the rate-limit counter secret could not be shared through shared data",
        );
        fresh
    })
}

impl Host for ConfiguredGateway {
    fn limit_secret(&self) -> [u8; 32] {
        self.limit_secret
    }

    fn jwt_keys(&self, slot: usize) -> Option<Rc<KeySet>> {
        self.keys.borrow().get(slot).cloned().flatten()
    }

    /// This worker's memo first (no host call, no JSON), then the cache every worker shares.
    fn cached_token(&self, key: &[u8; 32], now: u64) -> Option<VerifiedClaims> {
        let (bytes, _) = HostStore.get(&self.token_cache_key(key)).ok().flatten()?;
        let (claims, exp) = cache::decode(&bytes, key, now)?;
        Some((Rc::new(claims), exp))
    }

    fn cache_token(&self, key: &[u8; 32], exp: u64, claims: &Map<String, Value>) {
        if let Some(value) = cache::encode(key, exp, claims) {
            let _ = HostStore.set(&self.token_cache_key(key), &value, 0);
        }
    }

    fn replay_memo(&self) -> Option<&ReplayMemo> {
        Some(&self.replay_memo)
    }

    fn token_memo(&self) -> Option<&TokenMemo> {
        Some(&self.token_memo)
    }

    fn unknown_kid(&self, slot: usize) {
        if let Some(r) = self.kid_requests.borrow_mut().get_mut(slot) {
            *r = true;
        }
    }

    fn replay_store(&self) -> &dyn SharedStore {
        &HostStore
    }

    fn replay_prefix(&self) -> &str {
        &self.replay_prefix
    }

    fn note(&self, api: usize, event: Event) {
        match event {
            Event::JwtCacheHit => self.metrics.add(Some(api), JWT_CACHE_HIT, 1),
            Event::JwtCacheMiss => self.metrics.add(Some(api), JWT_CACHE_MISS, 1),
            Event::ReplayCacheHit => self.metrics.add(Some(api), REPLAY_CACHE_HITS, 1),
            Event::Replay(outcome) => {
                self.metrics.add(
                    Some(api),
                    REPLAY_CAS_RETRIES,
                    u64::from(outcome.cas_retries),
                );
                self.metrics
                    .add(Some(api), REPLAY_RECLAIMED, u64::from(outcome.reclaimed));
                match outcome.verdict {
                    Verdict::StoreFull => {
                        self.store_full.set(self.store_full.get().saturating_add(1))
                    }
                    Verdict::Corrupt
                    | Verdict::MissingBucket
                    | Verdict::Contention
                    | Verdict::StoreUnavailable => {
                        host::log(
                            LogLevel::Warn,
                            &format!(
                                "gateguard: api={} replay store unusable ({}, bucket {}): refusing (fail closed)",
                                self.api_name(api),
                                outcome.verdict.reason(),
                                outcome.bucket
                            ),
                        );
                    }
                    _ => {}
                }
            }
        }
    }
}
