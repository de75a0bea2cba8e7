//! Configuration: create the store, or move it to the layout a new policy asks for without
//! losing an entry, while requests of every loaded policy keep using it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use super::record::{
    bucket_index, encode, encode_sealed, parse_bucket, parse_entry, push_entry, raw_expiry, Bucket,
    Entry, Layout, Pointer, ENTRY_LEN, HEADER_LEN, STORED_DIGEST_LEN,
};
use super::store::{pointer_key, read_pointer, PointerError, MAX_CAS_RETRIES};
use crate::shared_data::{SetError, SharedStore, StoreError, CREATE_CAS};

/// Pointer steps after which a configuration stops starting migrations of its own (create,
/// start a migration, finish one...). Only other configurations moving the store to other sizes
/// at the same moment use more.
const MAX_ROUNDS: u32 = 16;

/// Pointer steps one configuration takes at most. Past [`MAX_ROUNDS`] it only finishes the
/// migrations others started, so whichever configuration returns last leaves none running;
/// every configuration stops starting after its own budget, so these rounds always suffice
/// for the handful of policies one VM configures at once.
const MAX_FINISH_ROUNDS: u32 = 16 * MAX_ROUNDS;

/// What [`ensure_buckets`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The layout requests use now: the wanted one, unless other configurations in this VM kept
    /// moving the store to their own sizes at the same time (requests stay exact either way).
    pub layout: Layout,
    /// Bucket keys this call created.
    pub created: u32,
    /// Migrations this call worked on (other root contexts may have done part of each).
    pub migrations: Vec<Migration>,
}

/// One migration as one helper saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    pub from: Layout,
    pub to: Layout,
    /// Buckets of `from` this call sealed.
    pub sealed: u32,
    /// Entries this call added to `to` (or replaced by a later record of the same token).
    pub copied: u64,
    /// Buckets of `from` sealed although their record did not parse: whatever they held is
    /// lost (requests were already refused on them, fail closed).
    pub corrupt: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrepareError {
    /// The host refused a shared-data call.
    Store(StoreError),
    /// The pointer key holds something gateguard did not write.
    CorruptPointer,
    /// A bucket a migration writes to is missing or not a live record, or a bucket is sealed
    /// toward a layout other than the migration's: the store was written by something else.
    Corrupt { layout: Layout, bucket: u32 },
    /// Not a bucket count a layout can have, or the epoch counter is exhausted.
    BadLayout { buckets: u32 },
    /// Requests kept rewriting one group of buckets between the copy and the seal.
    Contended { layout: Layout, group: u32 },
}

impl fmt::Display for PrepareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Store(e) => write!(f, "shared data status {}", e.status),
            Self::CorruptPointer => f.write_str("the replay store's pointer is corrupt"),
            Self::Corrupt { layout, bucket } => {
                write!(
                    f,
                    "replay bucket {bucket} of {layout} is not what gateguard wrote"
                )
            }
            Self::BadLayout { buckets } => write!(f, "no replay layout of {buckets} buckets"),
            Self::Contended { layout, group } => write!(
                f,
                "requests kept rewriting bucket group {group} of {layout} during the migration"
            ),
        }
    }
}

impl From<StoreError> for PrepareError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

fn set_failed(e: SetError) -> Option<PrepareError> {
    match e {
        SetError::CasMismatch => None,
        SetError::Other(e) => Some(PrepareError::Store(e)),
    }
}

/// The host never hands out CAS 0 for a present key; writing with it would be unconditional.
fn usable_cas(cas: u32) -> Result<u32, PrepareError> {
    if cas == 0 {
        Err(PrepareError::Store(StoreError { status: 0 }))
    } else {
        Ok(cas)
    }
}

/// Makes the store under `prefix` ready for a policy that wants `buckets` buckets; called from
/// configuration (the main thread and every worker may run it at once, for one or several
/// policies), never from a request. Creates the store if there is none; adopts the current
/// layout if it has `buckets` buckets (a capacity change alone moves nothing); otherwise moves
/// every entry to a new layout (see the module header): it finishes a migration another root
/// context started, then starts its own if the size still differs.
pub fn ensure_buckets(
    store: &dyn SharedStore,
    prefix: &str,
    buckets: u32,
) -> Result<Prepared, PrepareError> {
    let wanted = Layout::first(buckets);
    if !wanted.is_valid() {
        return Err(PrepareError::BadLayout { buckets });
    }
    let key = pointer_key(prefix);
    let mut prepared = Prepared {
        layout: wanted,
        created: 0,
        migrations: Vec::new(),
    };
    for round in 0..MAX_FINISH_ROUNDS {
        let found = match read_pointer(store, prefix) {
            Ok(found) => found,
            Err(PointerError::Store(e)) => return Err(e.into()),
            Err(PointerError::Corrupt) => return Err(PrepareError::CorruptPointer),
        };
        let step = match found {
            None => {
                // Buckets first: the pointer makes the layout reachable.
                let created = create_buckets(store, prefix, wanted)?;
                prepared.created = prepared.created.saturating_add(created);
                let pointer = Pointer {
                    current: wanted,
                    next: None,
                };
                match store.set(&key, &pointer.encode(), CREATE_CAS) {
                    Ok(()) => return Ok(prepared),
                    Err(e) => e,
                }
            }
            Some((pointer, cas)) => {
                let cas = usable_cas(cas)?;
                prepared.layout = pointer.current;
                match pointer.next {
                    Some(next) => {
                        let (migration, created) = migrate(store, prefix, pointer.current, next)?;
                        prepared.created = prepared.created.saturating_add(created);
                        prepared.migrations.push(migration);
                        let done = Pointer {
                            current: next,
                            next: None,
                        };
                        match store.set(&key, &done.encode(), cas) {
                            Ok(()) => continue,
                            Err(e) => e,
                        }
                    }
                    None if pointer.current.buckets == buckets => return Ok(prepared),
                    // Out of budget: adopt the settled layout (requests stay exact in it).
                    None if round >= MAX_ROUNDS => return Ok(prepared),
                    None => {
                        let next = pointer
                            .current
                            .successor(buckets)
                            .ok_or(PrepareError::BadLayout { buckets })?;
                        let start = Pointer {
                            current: pointer.current,
                            next: Some(next),
                        };
                        match store.set(&key, &start.encode(), cas) {
                            Ok(()) => continue,
                            Err(e) => e,
                        }
                    }
                }
            }
        };
        // A CAS mismatch: another root context moved the pointer first; look again.
        if let Some(e) = set_failed(step) {
            return Err(e);
        }
    }
    Ok(prepared)
}

/// Creates the missing buckets of a layout, empty; leaves existing ones alone (every root
/// context may run it at once). Returns how many it created.
pub fn create_buckets(
    store: &dyn SharedStore,
    prefix: &str,
    layout: Layout,
) -> Result<u32, StoreError> {
    let fresh = encode(&[]);
    let mut created: u32 = 0;
    for index in 0..layout.buckets {
        let key = layout.bucket_key(prefix, index);
        if store.get(&key)?.is_some() {
            continue;
        }
        match store.set(&key, &fresh, CREATE_CAS) {
            Ok(()) => created = created.saturating_add(1),
            // Another root context created it between our get and set.
            Err(SetError::CasMismatch) => {}
            Err(SetError::Other(e)) => return Err(e),
        }
    }
    Ok(created)
}

/// Moves every bucket of `from` into `to` and seals it. Both are powers of two, so with
/// `n = min(from, to)` the entries of `from`'s buckets `g, g + n, ...` all land in `to`'s
/// buckets `g, g + n, ...`: such a group is migrated as a unit, each target written once per
/// pass however many sources feed it.
fn migrate(
    store: &dyn SharedStore,
    prefix: &str,
    from: Layout,
    to: Layout,
) -> Result<(Migration, u32), PrepareError> {
    let created = create_buckets(store, prefix, to)?;
    let mut migration = Migration {
        from,
        to,
        sealed: 0,
        copied: 0,
        corrupt: 0,
    };
    let groups = from.buckets.min(to.buckets);
    for group in 0..groups {
        migrate_group(store, prefix, &mut migration, group)?;
    }
    Ok((migration, created))
}

/// A source bucket read in this pass: the CAS to seal it with, and whether it parsed.
struct Source {
    index: u32,
    cas: u32,
    corrupt: bool,
}

/// Copy before seal: read the group's unsealed sources, merge their entries into the targets,
/// then seal each source with the CAS it was read with. A seal that fails means a request wrote
/// that source after the read: read it again and repeat, so what a seal covers is exactly what
/// was copied.
fn migrate_group(
    store: &dyn SharedStore,
    prefix: &str,
    migration: &mut Migration,
    group: u32,
) -> Result<(), PrepareError> {
    let (from, to) = (migration.from, migration.to);
    let step = from.buckets.min(to.buckets).max(1) as usize;
    let mut pending: Vec<u32> = (group..from.buckets).step_by(step).collect();
    for _ in 0..=MAX_CAS_RETRIES {
        let mut sources = Vec::with_capacity(pending.len());
        let mut moving: Vec<Entry> = Vec::new();
        for &index in &pending {
            let Some((value, cas)) = store.get(&from.bucket_key(prefix, index))? else {
                // Never created (a layout is complete before it is current): seal by creating.
                sources.push(Source {
                    index,
                    cas: CREATE_CAS,
                    corrupt: false,
                });
                continue;
            };
            let cas = usable_cas(cas)?;
            match parse_bucket(&value) {
                Ok(Bucket::Sealed(target)) if target == to => {}
                Ok(Bucket::Sealed(_)) => {
                    return Err(PrepareError::Corrupt {
                        layout: from,
                        bucket: index,
                    })
                }
                Ok(Bucket::Live(raws)) => {
                    moving.extend(raws.map(parse_entry));
                    sources.push(Source {
                        index,
                        cas,
                        corrupt: false,
                    });
                }
                Err(_) => sources.push(Source {
                    index,
                    cas,
                    corrupt: true,
                }),
            }
        }
        if sources.is_empty() {
            return Ok(());
        }
        let mut by_target: BTreeMap<u32, Vec<Entry>> = BTreeMap::new();
        for entry in moving {
            by_target
                .entry(bucket_index(&entry.digest, to.buckets))
                .or_default()
                .push(entry);
        }
        let mut targets_live = true;
        for (index, entries) in &by_target {
            match merge_into(store, prefix, to, *index, entries)? {
                Some(copied) => migration.copied = migration.copied.saturating_add(copied),
                None => targets_live = false,
            }
        }
        pending.clear();
        if !targets_live {
            // `to` was sealed in turn: every source was sealed by another helper before that,
            // so reading them again finds them done.
            pending.extend(sources.iter().map(|s| s.index));
            continue;
        }
        let marker = encode_sealed(to);
        for source in sources {
            match store.set(&from.bucket_key(prefix, source.index), &marker, source.cas) {
                Ok(()) => {
                    migration.sealed = migration.sealed.saturating_add(1);
                    migration.corrupt = migration.corrupt.saturating_add(u32::from(source.corrupt));
                }
                Err(e) => match set_failed(e) {
                    None => pending.push(source.index),
                    Some(e) => return Err(e),
                },
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
    }
    Err(PrepareError::Contended {
        layout: from,
        group,
    })
}

/// Adds `incoming` to a live bucket of `to`, ignoring its capacity (a migration never drops a
/// live entry). Per token the record with the later expiry wins, otherwise the one already
/// there: a token is recorded again only after its entry expired, with a later expiry, so a
/// live entry and its owner are never replaced, and merging a copy twice changes nothing.
/// `Some(entries added or replaced)`, or `None` when the bucket is sealed.
pub(super) fn merge_into(
    store: &dyn SharedStore,
    prefix: &str,
    to: Layout,
    index: u32,
    incoming: &[Entry],
) -> Result<Option<u64>, PrepareError> {
    let key = to.bucket_key(prefix, index);
    let corrupt = PrepareError::Corrupt {
        layout: to,
        bucket: index,
    };
    for _ in 0..=MAX_CAS_RETRIES {
        let (value, cas) = store.get(&key)?.ok_or(corrupt)?;
        let cas = usable_cas(cas)?;
        let raws = match parse_bucket(&value) {
            Ok(Bucket::Live(raws)) => raws,
            Ok(Bucket::Sealed(_)) => return Ok(None),
            Err(_) => return Err(corrupt),
        };
        let mut at: HashMap<[u8; STORED_DIGEST_LEN], usize> = HashMap::new();
        for (i, raw) in raws.enumerate() {
            at.insert(
                parse_entry(raw).digest,
                i.saturating_mul(ENTRY_LEN).saturating_add(HEADER_LEN),
            );
        }
        let mut out = if value.is_empty() { encode(&[]) } else { value };
        let mut changed: u64 = 0;
        for entry in incoming {
            match at.get(&entry.digest) {
                Some(&offset) => {
                    let Some(slot) = out.get_mut(offset..offset.saturating_add(ENTRY_LEN)) else {
                        return Err(corrupt);
                    };
                    if entry.expiry > raw_expiry(slot) {
                        let mut raw = Vec::with_capacity(ENTRY_LEN);
                        push_entry(&mut raw, entry);
                        slot.copy_from_slice(&raw);
                        changed = changed.saturating_add(1);
                    }
                }
                None => {
                    at.insert(entry.digest, out.len());
                    push_entry(&mut out, entry);
                    changed = changed.saturating_add(1);
                }
            }
        }
        if changed == 0 {
            return Ok(Some(0));
        }
        match store.set(&key, &out, cas) {
            Ok(()) => return Ok(Some(changed)),
            Err(e) => {
                if let Some(e) = set_failed(e) {
                    return Err(e);
                }
            }
        }
    }
    Err(PrepareError::Contended {
        layout: to,
        group: index,
    })
}
