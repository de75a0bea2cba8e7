//! The JWKS lease, publication and adoption across workers, natively against [`MemoryStore`]
//! (Envoy's shared-data semantics), with real threads for the races.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::Duration;

use serde_json::json;

use super::super::fetch::{FetchResult, FETCH_TIMEOUT_SECONDS};
use super::super::keys::MAX_JWKS_BYTES;
use super::super::shared_jwks::{JwksRequest, SharedJwks, MIN_FETCH_GAP_SECONDS};
use super::{jwks, keys, NOW};
use crate::shared_data::{MemoryStore, SetError, SharedStore, StoreError, CREATE_CAS};

const URI: &str = "https://idp/keys";
const REFRESH: u64 = 10;
/// The names an earlier gateguard wrote, so workers of two versions in one VM still agree.
const KEYS_KEY: &str = "gateguard.jwks.a2ff8bee47702f5b";
const LEASE_KEY: &str = "gateguard.jwks.a2ff8bee47702f5b.lease";

fn worker() -> SharedJwks {
    SharedJwks::new("gateguard.", "idp", URI, REFRESH)
}

fn body() -> Vec<u8> {
    serde_json::to_vec(&jwks()).unwrap()
}

/// Four different key sets the identity provider rotates through.
fn rotation(n: usize) -> Vec<u8> {
    let k = keys();
    let key = [&k.rsa, &k.ec256, &k.ec384, &k.ed][n % 4];
    serde_json::to_vec(&json!({ "keys": [key.jwk] })).unwrap()
}

/// Shared data whose readers are descheduled between reading and writing, as a worker's VM can
/// be: every racer reads before the first one writes, which is where a lost CAS shows.
#[derive(Default)]
struct Descheduling(MemoryStore);

impl SharedStore for Descheduling {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let found = self.0.get(key);
        thread::sleep(Duration::from_millis(2));
        found
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        self.0.set(key, value, cas)
    }
}

/// One fetch, answered at once with `answer`.
fn fetch(w: &mut SharedJwks, store: &MemoryStore, now: u64, answer: &[u8]) -> FetchResult {
    assert!(w.begin(store, now).is_some(), "no fetch at {now}");
    w.on_response(store, now, 200, answer).unwrap()
}

/// The first second at or after `from` at which `w` starts a fetch (that nobody answers).
fn next_fetch(w: &mut SharedJwks, store: &MemoryStore, from: u64) -> u64 {
    (from..from + 120)
        .find(|&t| w.begin(store, t).is_some())
        .unwrap()
}

#[test]
fn the_naive_lease_lets_every_worker_fetch() {
    // Two workers want to fetch at once; neither finds a lease, so both create one.
    let s = MemoryStore::new();
    let until = (NOW + FETCH_TIMEOUT_SECONDS).to_be_bytes();
    let (a, b) = (s.get("lease").unwrap(), s.get("lease").unwrap());
    let cas = |seen: Option<(Vec<u8>, u32)>| seen.map_or(0, |(_, c)| c);
    assert!(s.set("lease", &until, cas(a)).is_ok());
    assert!(s.set("lease", &until, cas(b)).is_ok(), "both fetch");
    // Created with CREATE_CAS, the second creation fails: one fetch.
    assert!(s.set("lease2", &until, CREATE_CAS).is_ok());
    assert!(s.set("lease2", &until, CREATE_CAS).is_err());
}

#[test]
fn the_fetch_request_and_the_shared_data_names() {
    let store = MemoryStore::new();
    let mut w = worker();
    let request = w.begin(&store, NOW).unwrap();
    assert_eq!(
        request.headers(),
        vec![
            (":method", "GET"),
            (":path", "/keys"),
            (":authority", "idp"),
            ("accept", "application/json"),
            ("user-agent", "gateguard"),
        ]
    );
    assert_eq!(JwksRequest::TIMEOUT_SECONDS, FETCH_TIMEOUT_SECONDS - 1);
    w.on_response(&store, NOW, 200, &body()).unwrap();
    let (published, _) = store.get(KEYS_KEY).unwrap().unwrap();
    assert_eq!(published[..8], NOW.to_be_bytes());
    assert_eq!(published[8..], body());
    assert!(store.get(LEASE_KEY).unwrap().is_some());
    assert_eq!(store.len(), 2);
}

#[test]
fn sixteen_workers_racing_for_the_lease_start_one_fetch_per_lease() {
    // Nobody ever answers, so every round the last holder's lease has run out: each round is
    // a race among all the workers for a stale lease, and exactly one wins it.
    const THREADS: usize = 16;
    const ROUNDS: usize = 50;
    let store = Descheduling::default();
    let winners: Vec<AtomicU32> = (0..ROUNDS).map(|_| AtomicU32::new(0)).collect();
    let barrier = Barrier::new(THREADS);
    thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                let mut w = worker();
                for (round, won) in winners.iter().enumerate() {
                    let now = NOW + round as u64 * FETCH_TIMEOUT_SECONDS;
                    barrier.wait();
                    if w.begin(&store, now).is_some() {
                        won.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    for (round, won) in winners.iter().enumerate() {
        assert_eq!(won.load(Ordering::SeqCst), 1, "round {round}");
    }
}

#[test]
fn every_worker_adopts_each_published_key_set_exactly_once() {
    // Eight workers tick once a second for a minute; the identity provider answers at once,
    // with another key set each time.
    const THREADS: usize = 8;
    const SECONDS: u64 = 65;
    let store = Descheduling::default();
    let published: Mutex<Vec<(u64, [u8; 32])>> = Mutex::new(Vec::new());
    let barrier = Barrier::new(THREADS);
    let seen: Vec<Vec<[u8; 32]>> = thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    let mut w = worker();
                    let mut seen = Vec::new();
                    for now in NOW..NOW + SECONDS {
                        barrier.wait();
                        if let Some(set) = w.adopt(&store, now) {
                            seen.push(set.fingerprint());
                        }
                        if w.begin(&store, now).is_some() {
                            let mut published = published.lock().unwrap();
                            let answer = rotation(published.len());
                            let Ok(FetchResult::Keys(set)) =
                                w.on_response(&store, now, 200, &answer)
                            else {
                                panic!("keys expected")
                            };
                            published.push((now, set.fingerprint()));
                            seen.push(set.fingerprint());
                        }
                    }
                    seen
                })
            })
            .collect();
        workers.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let published = published.into_inner().unwrap();
    // One fetch per refresh period, timed from the previous fetch on every worker.
    let times: Vec<u64> = published.iter().map(|(t, _)| *t).collect();
    let expected: Vec<u64> = (0..7).map(|i| NOW + i * REFRESH).collect();
    assert_eq!(times, expected);
    // Each worker holds every key set once, in the order published.
    let sets: Vec<[u8; 32]> = published.iter().map(|(_, f)| *f).collect();
    for (i, worker_saw) in seen.iter().enumerate() {
        assert_eq!(worker_saw, &sets, "worker {i}");
    }
}

#[test]
fn a_lease_its_holder_never_releases_runs_out_after_the_fetch_timeout() {
    let store = MemoryStore::new();
    let (mut silent, mut other) = (worker(), worker());
    assert!(silent.begin(&store, NOW).is_some());
    assert_eq!(
        next_fetch(&mut other, &store, NOW),
        NOW + FETCH_TIMEOUT_SECONDS
    );
}

#[test]
fn after_new_keys_no_worker_fetches_again_for_the_gap() {
    let store = MemoryStore::new();
    let (mut a, mut b) = (worker(), worker());
    fetch(&mut a, &store, NOW, &body());
    assert!(b.adopt(&store, NOW + 1).is_some());
    // A token with an unknown kid reaches b at once: its refresh waits for the gap.
    b.on_unknown_kid(NOW + 1);
    assert_eq!(
        next_fetch(&mut b, &store, NOW + 1),
        NOW + MIN_FETCH_GAP_SECONDS
    );
}

#[test]
fn a_failed_fetch_holds_every_worker_back_for_the_holders_backoff() {
    let store = MemoryStore::new();
    let (mut a, mut b) = (worker(), worker());
    // Two failed answers: a backs off 1 then 2 seconds, and so does b.
    assert!(a.begin(&store, NOW).is_some());
    assert!(a.on_response(&store, NOW, 503, b"").is_err());
    assert!(a.begin(&store, NOW + 1).is_some());
    assert!(a.on_response(&store, NOW + 1, 503, b"").is_err());
    assert_eq!(a.next_attempt(), NOW + 3);
    assert_eq!(next_fetch(&mut b, &store, NOW + 1), NOW + 3);
    // A request the host would not send frees the lease the same way.
    let (mut c, mut d) = (worker(), worker());
    let store = MemoryStore::new();
    assert!(c.begin(&store, NOW).is_some());
    c.on_dispatch_failed(&store, NOW);
    assert_eq!(next_fetch(&mut d, &store, NOW), NOW + 1);
}

#[test]
fn the_jwks_fetch_follows_a_discovery_answer_at_once() {
    let store = MemoryStore::new();
    let mut w = SharedJwks::new(
        "gateguard.",
        "idp",
        "https://idp/.well-known/openid-configuration",
        REFRESH,
    );
    assert!(w.begin(&store, NOW).is_some());
    let doc = br#"{"jwks_uri": "https://idp/discovery/keys"}"#;
    assert!(matches!(
        w.on_response(&store, NOW, 200, doc),
        Ok(FetchResult::Discovered)
    ));
    assert_eq!(w.begin(&store, NOW).unwrap().path, "/discovery/keys");
}

#[test]
fn a_publication_that_does_not_parse_is_skipped_until_the_next_one() {
    let store = MemoryStore::new();
    let (mut a, mut b) = (worker(), worker());
    store.set(KEYS_KEY, b"short", 0).unwrap();
    assert!(b.adopt(&store, NOW).is_none());
    let mut garbage = NOW.to_be_bytes().to_vec();
    garbage.extend_from_slice(b"not json");
    store.set(KEYS_KEY, &garbage, 0).unwrap();
    assert!(b.adopt(&store, NOW).is_none());
    assert!(b.adopt(&store, NOW + 1).is_none(), "not read again");
    fetch(&mut a, &store, NOW + 1, &body());
    assert!(b.adopt(&store, NOW + 2).is_some());
    assert!(b.adopt(&store, NOW + 3).is_none(), "adopted once");
}

#[test]
fn a_new_configuration_adopts_the_published_keys_and_fetches_nothing() {
    let store = MemoryStore::new();
    fetch(&mut worker(), &store, NOW, &body());
    // A reload two seconds later: new workers, the same shared data.
    let mut reloaded = worker();
    assert!(reloaded.adopt(&store, NOW + 2).is_some());
    assert_eq!(next_fetch(&mut reloaded, &store, NOW + 2), NOW + REFRESH);
}

#[test]
fn an_oversized_answer_is_a_failure_that_backs_off_and_keeps_the_last_key_set() {
    let store = MemoryStore::default();
    let mut w = worker();
    assert!(matches!(
        fetch(&mut w, &store, NOW, &body()),
        FetchResult::Keys(_)
    ));
    let published = store.get(KEYS_KEY).unwrap().unwrap();

    // The refresh is answered with more bytes than any key set may have.
    let due = next_fetch(&mut w, &store, NOW + 1);
    let err = w.on_oversized_response(&store, due);
    assert_eq!(
        err.reason(),
        format!("JWKS larger than {MAX_JWKS_BYTES} bytes")
    );
    // The last good key set stays published, the lease names the backoff, and nobody fetches
    // again before it.
    assert_eq!(store.get(KEYS_KEY).unwrap().unwrap(), published);
    let lease = store.get(LEASE_KEY).unwrap().unwrap().0;
    let until = u64::from_be_bytes(lease.try_into().unwrap());
    assert_eq!(until, w.next_attempt());
    assert!(until > due, "a failure backs off");
    let mut other = worker();
    assert!(other.begin(&store, due).is_none());
    assert_eq!(next_fetch(&mut w, &store, due), until);
}
