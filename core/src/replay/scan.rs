//! Background reading of the store, a slice of buckets at a time: the occupancy gauge, and
//! giving back the memory of expired entries in buckets no request writes.

use std::ops::Range;

use super::record::{live_header, parse_bucket, raw_expiry, Bucket, Layout};
use crate::shared_data::SharedStore;

/// Store occupancy for a stats gauge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Occupancy {
    pub live: u64,
    /// Live plus expired entries not yet reclaimed.
    pub stored: u64,
    /// Buckets missing, corrupt or unreadable.
    pub unreadable: u32,
    /// Buckets sealed: the store moved to another layout, so this scan no longer sees it all.
    pub sealed: u32,
    /// Expired entries removed by [`sweep`] (included in `stored`).
    pub reclaimed: u64,
}

/// Reads the buckets in `range` of `layout` (all of them, or a slice per tick: a full scan of
/// a 1,000,000-entry store copies ~40 MB). Read-only.
pub fn occupancy(
    store: &dyn SharedStore,
    prefix: &str,
    layout: Layout,
    range: Range<u32>,
    now: u64,
) -> Occupancy {
    scan(store, prefix, layout, range, now, false)
}

/// [`occupancy`], and each bucket holding expired entries is rewritten without them, one CAS
/// attempt each (a bucket that changed meanwhile, or was sealed, is left for its next write or
/// the next sweep). For `on_tick`, so idle buckets give their memory back.
pub fn sweep(
    store: &dyn SharedStore,
    prefix: &str,
    layout: Layout,
    range: Range<u32>,
    now: u64,
) -> Occupancy {
    scan(store, prefix, layout, range, now, true)
}

fn scan(
    store: &dyn SharedStore,
    prefix: &str,
    layout: Layout,
    range: Range<u32>,
    now: u64,
    reclaim: bool,
) -> Occupancy {
    let mut occ = Occupancy::default();
    for index in range.start..range.end.min(layout.buckets) {
        let key = layout.bucket_key(prefix, index);
        let Ok(Some((value, cas))) = store.get(&key) else {
            occ.unreadable = occ.unreadable.saturating_add(1);
            continue;
        };
        let raws = match parse_bucket(&value) {
            Ok(Bucket::Live(raws)) => raws,
            Ok(Bucket::Sealed(_)) => {
                occ.sealed = occ.sealed.saturating_add(1);
                continue;
            }
            Err(_) => {
                occ.unreadable = occ.unreadable.saturating_add(1);
                continue;
            }
        };
        let stored = raws.len() as u64;
        let live = raws.clone().filter(|raw| raw_expiry(raw) > now).count() as u64;
        occ.stored = occ.stored.saturating_add(stored);
        occ.live = occ.live.saturating_add(live);
        if reclaim && live < stored && cas != 0 {
            let mut out = Vec::with_capacity(value.len());
            out.extend_from_slice(&live_header());
            for raw in raws.filter(|raw| raw_expiry(raw) > now) {
                out.extend_from_slice(raw);
            }
            if store.set(&key, &out, cas).is_ok() {
                occ.reclaimed = occ.reclaimed.saturating_add(stored.saturating_sub(live));
            }
        }
    }
    occ
}
