//! Replay detection (docs/policy.md, "Replay"): `with_ip` binds a token to the first client IP
//! that used it, `without_ip` accepts each token exactly once, across all Envoy workers at the
//! same instant, and the store keeps its entries across any policy reload.
//!
//! Envoy runs one Wasm VM per worker (and one on the main thread); shared data, one store per
//! `vm_id`, is the only common state ([`crate::shared_data`]). Its `set` on a key that does
//! not exist ignores the CAS, so "get, then set with CAS" on a per-token key lets two workers
//! both create it (`the_naive_per_token_get_then_set_scheme_accepts_twice`), and keys can
//! never be deleted.
//! Hence a FIXED set of bucket keys, created at configuration time ([`ensure_buckets`]); each
//! holds a compact record of the tokens hashing to it, and a request reads its bucket, decides
//! ([`admit`], pure) and writes it back with the CAS it read, retrying on `CasMismatch`
//! ([`check_and_record`]). A request never creates a key.
//!
//! ## Sizing: a bucket holds more than its share
//!
//! Tokens land in buckets by hash, so with `n` live tokens a bucket holds `n / buckets` on
//! average, and the fullest of 4,096 some 3.5 standard deviations more: buckets capped at
//! exactly their share (`max_entries / buckets`) refused the first new token at ~80% of
//! `max_entries`. So a bucket may hold more than its
//! share, by the headroom the Poisson tail asks for ([`bucket_capacity`]): with `max_entries`
//! live tokens, some bucket is full with probability at most [`EARLY_FULL_PROBABILITY`] (0.1%).
//! `max_entries` is thus the live tokens the store is sized for, and its hard bound is
//! `buckets × capacity` entries (~1.34 × `max_entries` at the default size). Nothing counts the
//! whole store: a global count would be one more key every first use must CAS (or a count a
//! scan publishes seconds late), and memory is bounded by the buckets already. Exactness is the
//! buckets' business alone: the capacity only decides, on the one bucket read, whether a new
//! token is refused. The record format is unchanged: an older gateguard sharing the store
//! during an upgrade reads these buckets, and only refuses new tokens in those fuller than
//! its own capacity (fail closed).
//!
//! ## Reloads: layouts, one pointer, sealed buckets
//!
//! The bucket count follows `replay_cache.max_entries`, and after a reload Envoy keeps running
//! the old policy for requests on connections opened before it (drain, keep-alive), at the same
//! time as the new one on others; every policy loaded in the VM shares the store. So an
//! old-layout writer and a new-layout writer run at once, and a copy made at reload time would
//! miss what old-policy requests record after it. The store therefore records its own layout,
//! and moves between layouts so that every request, whatever policy it runs, finds the one
//! authoritative copy of its token:
//!
//! - A *layout* is `(epoch, buckets)`, its buckets `{prefix}e{epoch}/{buckets}/{index}`.
//! - The *pointer* `{prefix}current` names the current layout and, while a migration runs, the
//!   next one. It is created with [`CREATE_CAS`](crate::shared_data::CREATE_CAS) and changed
//!   only with CAS, in two steps: `{P}` → `{P, next N}` with `N = (P.epoch + 1, B')` → `{N}`.
//!   So one migration runs at a time, epochs only grow, and a layout is never reused
//!   (A → B → A makes a third layout).
//! - A bucket is *live* (entries) or *sealed*: a marker naming the layout its entries moved to.
//!   Only a migration seals, only toward the pointer's `next`, and a seal is final (requests
//!   write only a bucket they read live, with its CAS). Seals form one line, never a cycle.
//! - A request reads the pointer, then its bucket in the current layout; a sealed bucket sends
//!   it to the marker's layout (the index recomputed there), at most [`MAX_HOPS`] times: each
//!   hop is a migration that finished during this request; past the bound it fails closed.
//! - Configuration ([`ensure_buckets`]) adopts the current layout when it has the bucket count
//!   the policy wants (a capacity change alone moves nothing: entries above a smaller capacity
//!   stay, new tokens in a full bucket are refused until entries expire). Otherwise it sets
//!   `next`, creates N's buckets, and for every bucket of P: reads it (value, CAS), merges its
//!   entries into N (CAS loops; per token the later expiry wins, else the entry already there,
//!   so owners never change and merging twice is harmless; capacity is ignored: a migration
//!   never drops an entry), then seals it with the CAS it read. A failed seal means a request
//!   wrote the bucket meanwhile: read it again and repeat. Then it sets the pointer to `{N}`.
//!   The main thread and every worker configure, and all help the same migration: a bucket
//!   already sealed toward N is skipped. A configuration that finds another's migration under
//!   way finishes it first, then starts its own if the size still differs; one that fails
//!   half-way (a host error) leaves a consistent store that the next configuration finishes.
//!
//! Why it is exact: a seal succeeds only if the bucket did not change since it was copied, so
//! everything recorded in it is in N before any request is sent to N; after the seal every
//! writer of that bucket, of any policy, fails its CAS or reads the marker and goes to N. The
//! pointer says `{N}` only once all of P is sealed. So at every instant a token has exactly one
//! live bucket on its chain, and every decision is a CAS write on that bucket, as without
//! reloads (`old_policy_writers_racing_a_migration_accept_each_token_at_most_once`). The bucket
//! index is taken from the stored digest bytes, so a migration places each entry where
//! requests will look for it. Bucket counts are powers of two, so the entries of P's buckets
//! `g, g+n, ...` (`n` = the smaller count) all land in N's buckets `g, g+n, ...`: migration
//! works group by group and writes each target once per group, however many sources feed it.
//!
//! Not kept: anything across an Envoy restart (shared data is process memory), and the store
//! of gateguard versions before this format (`replay/v1/`), which is not read. Each layout
//! change leaves the old layout's keys behind as 11-byte markers (keys cannot be deleted).
//! Policies in one VM that want different bucket counts move the store at each of their
//! configurations (exact, but the last one configured decides the layout): give such gateways
//! their own `vm_id`.
//!
//! Scope: one history for the whole store. The digest is SHA-256 over the token's signed
//! content (`header.payload`), never the API, so a `without_ip` token is accepted once across
//! every API, renaming or re-prefixing an API in a reload forgets nothing, and a token recorded
//! under one mode stays spent after a policy switches mode (an entry without owner never
//! matches an IP; an owned entry is a replay for `without_ip`): fail closed.

mod admit;
pub mod etcd;
mod migrate;
mod policy;
mod record;
mod scan;
mod store;

pub use admit::{admit, normalise_ip, Admission, Verdict};
pub use migrate::{create_buckets, ensure_buckets, Migration, PrepareError, Prepared};
pub use policy::{
    bucket_capacity, store_prefix, ReplayCacheConfig, ReplayCachePolicy, ReplayConfig, ReplayMode,
    TokenRef, EARLY_FULL_PROBABILITY, MAX_ENTRIES_LIMIT, TARGET_ENTRIES_PER_BUCKET,
};
pub use record::{
    bucket_index, decode, encode, encode_sealed, parse_bucket, Bucket, CorruptBucket, Entry,
    Layout, Pointer, Record, ENTRY_LEN, FORMAT_VERSION, HEADER_LEN, MAX_BUCKETS, POINTER_LEN,
    SEALED_LEN,
};
pub use scan::{occupancy, sweep, Occupancy};
pub use store::{
    check_and_record, current_layout, pointer_key, read_pointer, PointerError, ReplayOutcome,
    MAX_CAS_RETRIES, MAX_HOPS,
};

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
