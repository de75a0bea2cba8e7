//! One remote JWKS across Envoy's workers: which worker fetches it, and how the key set it got
//! reaches all the others. [`JwksFetcher`] says when a fetch is due; this says who fetches.
//!
//! Every worker runs its own Wasm VM and its own fetcher, so left alone each worker would fetch
//! at every refresh and hold its own key set. They coordinate through shared data
//! ([`crate::shared_data`]), whose `set` on a missing key ignores the CAS. Two keys per JWKS,
//! named after its cluster and URI:
//!
//! - The *lease* `{prefix}jwks.{id}.lease` holds `until` (u64, big-endian): nobody starts a
//!   fetch before it. A worker whose fetcher says "fetch now" takes the lease by writing
//!   `until = now + FETCH_TIMEOUT_SECONDS` with the CAS it read, and only if `until <= now`: of
//!   the workers that read the same lease, exactly one write succeeds. The lease is created
//!   with [`CREATE_CAS`], never with the CAS read: "read missing, then set" lets every worker
//!   that read it missing create it and fetch (`the_naive_lease_lets_every_worker_fetch`). A
//!   worker that lost stands down and looks again a second later, without counting a failure.
//! - The holder's HTTP call times out a second before its lease does, so its answer (or the
//!   timeout) comes while it still holds the lease; it then *releases* the lease by writing,
//!   unconditionally, when anyone may fetch next: [`MIN_FETCH_GAP_SECONDS`] after new keys, its
//!   own backoff after a failure, at once after a discovery document (the JWKS fetch follows).
//!   A holder that never answers (a worker that went away; Envoy's main-thread root context,
//!   whose calls never answer) keeps the others waiting until `until`, the fetch timeout.
//! - The *key set* `{prefix}jwks.{id}` holds `fetched_at` (u64, big-endian), then the JWKS as
//!   the identity provider sent it. The holder *publishes* it (CAS 0: the lease makes it the
//!   only writer) and remembers the CAS it got. Every tick every worker reads it; a CAS it has
//!   not seen is a new publication, which it *adopts* once: the key set for its requests, and
//!   `fetched_at` for its fetcher, so the next refresh falls due a refresh period after the
//!   fetch on every worker at once, and the lease picks one of them again. A publication that
//!   does not parse is skipped until the next one. A new configuration adopts what is already
//!   published at its first tick, so a reload fetches nothing.
//!
//! The races (every worker at the same instant, real threads) are tested natively in
//! `jwt/tests/shared_jwks.rs`.

use sha2::{Digest, Sha256};

use super::fetch::{split_uri, FetchResult, JwksFetcher, FETCH_TIMEOUT_SECONDS};
use super::keys::{JwksError, KeySet};
use crate::hex;
use crate::shared_data::{SharedStore, CREATE_CAS};

/// After a successful fetch, no worker fetches the same JWKS again for this long.
pub const MIN_FETCH_GAP_SECONDS: u64 = 5;

/// One remote JWKS as one worker sees it: its fetch state machine and its two shared-data keys.
#[derive(Debug, Clone)]
pub struct SharedJwks {
    fetcher: JwksFetcher,
    keys_key: String,
    lease_key: String,
    /// CAS of the last publication this worker adopted or wrote (0: none yet).
    seen_cas: u32,
}

/// A fetch to send now, with `dispatch_http_call`'s headers and timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksRequest {
    pub authority: String,
    /// Path and query.
    pub path: String,
}

impl JwksRequest {
    /// A second under the lease, so the answer or the timeout comes while the lease is held.
    pub const TIMEOUT_SECONDS: u64 = FETCH_TIMEOUT_SECONDS - 1;

    pub fn headers(&self) -> Vec<(&str, &str)> {
        vec![
            (":method", "GET"),
            (":path", &self.path),
            (":authority", &self.authority),
            ("accept", "application/json"),
            ("user-agent", "gateguard"),
        ]
    }
}

impl SharedJwks {
    /// `prefix`: the shared-data prefix of everything gateguard stores.
    pub fn new(prefix: &str, cluster: &str, uri: &str, refresh_seconds: u64) -> Self {
        let digest: [u8; 32] = Sha256::digest(format!("{cluster}\n{uri}").as_bytes()).into();
        let id = hex::encode(&digest[..8]);
        Self {
            fetcher: JwksFetcher::new(uri, refresh_seconds),
            keys_key: format!("{prefix}jwks.{id}"),
            lease_key: format!("{prefix}jwks.{id}.lease"),
            seen_cas: 0,
        }
    }

    /// A key set another worker published since we last looked, now ours to use.
    pub fn adopt(&mut self, store: &dyn SharedStore, now: u64) -> Option<KeySet> {
        let (value, cas) = store.get(&self.keys_key).ok().flatten()?;
        if cas == self.seen_cas || value.len() <= 8 {
            return None;
        }
        self.seen_cas = cas;
        let (at, body) = value.split_first_chunk::<8>()?;
        let set = KeySet::from_jwks_json(body).ok()?;
        self.fetcher.on_keys(now, u64::from_be_bytes(*at));
        Some(set)
    }

    /// A token named a `kid` the key set lacks: refresh early (rate-limited by the fetcher).
    pub fn on_unknown_kid(&mut self, now: u64) {
        self.fetcher.on_unknown_kid(now);
    }

    /// The fetch this worker starts now, if one is due and the lease is ours.
    pub fn begin(&mut self, store: &dyn SharedStore, now: u64) -> Option<JwksRequest> {
        let step = self.fetcher.poll(now)?;
        if !acquire_lease(store, &self.lease_key, now) {
            // Another worker is fetching or the identity provider is backing off.
            self.fetcher.defer(now);
            return None;
        }
        let Some((authority, path)) = split_uri(step.uri()) else {
            // Not a URL we can send (a discovery document's odd `jwks_uri`): the lease runs out.
            self.fetcher.on_failure(now);
            return None;
        };
        Some(JwksRequest {
            authority: authority.to_string(),
            path: path.to_string(),
        })
    }

    /// The host refused to send the request `begin` gave.
    pub fn on_dispatch_failed(&mut self, store: &dyn SharedStore, now: u64) {
        self.fetcher.on_failure(now);
        release_lease(store, &self.lease_key, self.fetcher.next_attempt());
    }

    /// The answer to the request `begin` gave: new keys are published for every worker, and
    /// the lease released until the next fetch may start.
    pub fn on_response(
        &mut self,
        store: &dyn SharedStore,
        now: u64,
        status: u32,
        body: &[u8],
    ) -> Result<FetchResult, JwksError> {
        let result = self.fetcher.on_response(now, status, body);
        let next_fetch = match &result {
            Ok(FetchResult::Keys(_)) => {
                self.publish(store, now, body);
                now.saturating_add(MIN_FETCH_GAP_SECONDS)
            }
            Ok(FetchResult::Discovered) => now,
            Err(_) => self.fetcher.next_attempt(),
        };
        release_lease(store, &self.lease_key, next_fetch);
        result
    }

    /// An answer of `body_size` bytes, more than any key set or discovery document may be
    /// ([`MAX_JWKS_BYTES`](super::keys::MAX_JWKS_BYTES)): a failed fetch, decided without reading the body, so that an
    /// identity provider (or whatever answers in its place) sending megabytes never has them
    /// copied into the VM, whose memory does not shrink back.
    pub fn on_oversized_response(&mut self, store: &dyn SharedStore, now: u64) -> JwksError {
        self.fetcher.on_failure(now);
        release_lease(store, &self.lease_key, self.fetcher.next_attempt());
        JwksError::TooLarge
    }

    /// When this worker's fetcher will next want to fetch.
    pub fn next_attempt(&self) -> u64 {
        self.fetcher.next_attempt()
    }

    fn publish(&mut self, store: &dyn SharedStore, now: u64, body: &[u8]) {
        let mut value = now.to_be_bytes().to_vec();
        value.extend_from_slice(body);
        let _ = store.set(&self.keys_key, &value, 0);
        // Not adopted again by this worker.
        if let Ok(Some((_, cas))) = store.get(&self.keys_key) {
            self.seen_cas = cas;
        }
    }
}

/// Takes the lease if it is free at `now`, for one fetch timeout.
fn acquire_lease(store: &dyn SharedStore, key: &str, now: u64) -> bool {
    let until = now.saturating_add(FETCH_TIMEOUT_SECONDS).to_be_bytes();
    match store.get(key) {
        Ok(None) => store.set(key, &until, CREATE_CAS).is_ok(),
        Ok(Some((value, cas))) => {
            let held_until = value
                .first_chunk::<8>()
                .map_or(0, |b| u64::from_be_bytes(*b));
            held_until <= now && cas != 0 && store.set(key, &until, cas).is_ok()
        }
        Err(_) => false,
    }
}

/// Ends the holder's lease: nobody fetches this JWKS again before `until`.
fn release_lease(store: &dyn SharedStore, key: &str, until: u64) {
    let _ = store.set(key, &until.to_be_bytes(), 0);
}
