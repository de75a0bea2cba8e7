//! What the store holds, byte for byte (big-endian, format version 2):
//!
//! - live bucket: `"GR" | 2 | 41` then entries of 41 bytes:
//!   `digest[0..16] | expiry u64 | flags u8 | owner IPv6 [16] (zero if none)`; flags bit 0: the
//!   entry has an owner IP; bit 1: etcd confirmed it (an entry of the etcd store's local cache,
//!   [`super::etcd`]); other bits zero.
//!   IPv4 owners are stored as IPv4-mapped IPv6, after `to_canonical()`, so both spellings match.
//!   An empty value reads as an empty live bucket.
//! - sealed bucket: `"GS" | 2 | epoch u32 | buckets u32`: its entries moved to that layout.
//! - pointer: `"GP" | 2 | epoch u32 | buckets u32 | has next u8 | epoch u32 | buckets u32`
//!   (the current layout, and the one a running migration moves to; zeros when none).
//!
//! A bucket's index is computed from the stored digest bytes, so a migration can place every
//! entry where requests will look for it in a layout of any size.

use std::net::Ipv6Addr;
use std::slice::ChunksExact;

pub const FORMAT_VERSION: u8 = 2;
/// Bucket keys in one layout at most: a pointer or seal naming more is not one gateguard wrote.
pub const MAX_BUCKETS: u32 = 65_536;
pub const ENTRY_LEN: usize = 41;
pub const HEADER_LEN: usize = 4;
pub(crate) const STORED_DIGEST_LEN: usize = 16;
/// Where an entry's fields start: digest, expiry, flags, owner.
const EXPIRY_AT: usize = STORED_DIGEST_LEN;
const FLAGS_AT: usize = EXPIRY_AT + 8;
const OWNER_AT: usize = FLAGS_AT + 1;
const _: () = assert!(OWNER_AT + 16 == ENTRY_LEN);
const LIVE: [u8; HEADER_LEN] = [b'G', b'R', FORMAT_VERSION, ENTRY_LEN as u8];
const SEALED: [u8; 3] = [b'G', b'S', FORMAT_VERSION];
pub const SEALED_LEN: usize = 11;
const POINTER: [u8; 3] = [b'G', b'P', FORMAT_VERSION];
pub const POINTER_LEN: usize = 20;

/// One arrangement of the store: `buckets` keys under `e{epoch}/{buckets}/`. Epochs only grow,
/// so a layout is never reused, even when a later policy asks for the same bucket count again,
/// and a seal always points to a later epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    pub epoch: u32,
    pub buckets: u32,
}

impl Layout {
    /// The layout a store starts with.
    pub fn first(buckets: u32) -> Self {
        Self { epoch: 1, buckets }
    }

    /// Bucket counts are powers of two (migration groups rely on it) and at most 65,536.
    pub fn is_valid(&self) -> bool {
        self.epoch >= 1 && self.buckets.is_power_of_two() && self.buckets <= MAX_BUCKETS
    }

    /// The layout a migration from `self` to `buckets` buckets creates.
    pub fn successor(&self, buckets: u32) -> Option<Self> {
        Some(Self {
            epoch: self.epoch.checked_add(1)?,
            buckets,
        })
    }

    pub fn bucket_key(&self, prefix: &str, index: u32) -> String {
        format!("{prefix}e{}/{}/{index}", self.epoch, self.buckets)
    }

    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.buckets.to_be_bytes());
    }

    fn read(bytes: &[u8]) -> Option<Self> {
        let epoch = u32::from_be_bytes(bytes.get(0..4)?.try_into().ok()?);
        let buckets = u32::from_be_bytes(bytes.get(4..8)?.try_into().ok()?);
        let layout = Self { epoch, buckets };
        layout.is_valid().then_some(layout)
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} buckets (epoch {})", self.buckets, self.epoch)
    }
}

/// The store's one pointer key: which layout requests use, and where a migration is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pointer {
    pub current: Layout,
    /// Set while a migration from `current` runs; always `current.epoch + 1`.
    pub next: Option<Layout>,
}

impl Pointer {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(POINTER_LEN);
        out.extend_from_slice(&POINTER);
        self.current.put(&mut out);
        match self.next {
            Some(next) => {
                out.push(1);
                next.put(&mut out);
            }
            None => out.extend_from_slice(&[0; 9]),
        }
        out
    }

    /// `None` for anything but a well-formed pointer whose `next` follows `current`.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != POINTER_LEN || bytes.get(..3)? != POINTER {
            return None;
        }
        let current = Layout::read(bytes.get(3..11)?)?;
        let rest = bytes.get(12..)?;
        let next = match bytes.get(11)? {
            0 if rest.iter().all(|&b| b == 0) => None,
            1 => {
                let next = Layout::read(rest)?;
                if Some(next.epoch) != current.epoch.checked_add(1) {
                    return None;
                }
                Some(next)
            }
            _ => return None,
        };
        Some(Self { current, next })
    }
}

/// One decoded entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub digest: [u8; STORED_DIGEST_LEN],
    pub expiry: u64,
    pub owner: Option<Ipv6Addr>,
    /// etcd holds this token with this owner: with the etcd store, only such an entry lets the
    /// cache accept without asking (one recorded by the local store may refuse, never accept).
    pub confirmed: bool,
}

const HAS_OWNER: u8 = 1;
const CONFIRMED: u8 = 2;

/// Why a bucket record does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorruptBucket {
    /// Wrong magic, version or entry length.
    Header,
    /// Not a whole number of entries.
    Length,
    /// An entry with an unknown owner flag, or an owner address without the flag.
    Entry { index: usize },
    /// A sealed marker whose target is not a valid layout.
    Seal,
}

/// A bucket as stored: its entries, or where they went.
#[derive(Debug, Clone)]
pub enum Bucket<'a> {
    Live(ChunksExact<'a, u8>),
    Sealed(Layout),
}

/// A decoded bucket, owned (for tests and tools).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Live(Vec<Entry>),
    Sealed(Layout),
}

/// Validates a record. An empty slice is a fresh live bucket.
pub fn parse_bucket(bucket: &[u8]) -> Result<Bucket<'_>, CorruptBucket> {
    match seal_of(bucket) {
        Some(target) => target.map(Bucket::Sealed),
        None => live_entries(bucket).map(Bucket::Live),
    }
}

/// The layout a sealed record points to (`None`: not a seal), read from its header alone, so
/// the request path can follow a seal without validating a live record twice.
pub fn seal_of(bucket: &[u8]) -> Option<Result<Layout, CorruptBucket>> {
    if !bucket.starts_with(&SEALED) {
        return None;
    }
    let target = (bucket.len() == SEALED_LEN)
        .then(|| bucket.get(3..).and_then(Layout::read))
        .flatten();
    Some(target.ok_or(CorruptBucket::Seal))
}

/// The raw entries of a live record; a sealed one is `Header` here.
pub(crate) fn live_entries(bucket: &[u8]) -> Result<ChunksExact<'_, u8>, CorruptBucket> {
    if bucket.is_empty() {
        return Ok(bucket.chunks_exact(ENTRY_LEN));
    }
    let (header, body) = bucket
        .split_at_checked(HEADER_LEN)
        .ok_or(CorruptBucket::Header)?;
    if header != LIVE {
        return Err(CorruptBucket::Header);
    }
    if body.len() % ENTRY_LEN != 0 {
        return Err(CorruptBucket::Length);
    }
    for (index, raw) in body.chunks_exact(ENTRY_LEN).enumerate() {
        let flags = flags_of(raw);
        let owner = raw.get(OWNER_AT..).unwrap_or_default();
        let valid = flags & !(HAS_OWNER | CONFIRMED) == 0
            && (flags & HAS_OWNER != 0 || owner.iter().all(|&b| b == 0));
        if !valid {
            return Err(CorruptBucket::Entry { index });
        }
    }
    Ok(body.chunks_exact(ENTRY_LEN))
}

/// `raw` is one chunk of [`live_entries`]: exactly `ENTRY_LEN` bytes.
pub(crate) fn parse_entry(raw: &[u8]) -> Entry {
    let flags = flags_of(raw);
    Entry {
        digest: array_at(raw, 0),
        expiry: raw_expiry(raw),
        owner: (flags & HAS_OWNER != 0).then(|| Ipv6Addr::from(array_at::<16>(raw, OWNER_AT))),
        confirmed: flags & CONFIRMED != 0,
    }
}

/// The expiry of a raw entry, without decoding the rest.
pub(crate) fn raw_expiry(raw: &[u8]) -> u64 {
    u64::from_be_bytes(array_at(raw, EXPIRY_AT))
}

fn flags_of(raw: &[u8]) -> u8 {
    raw.get(FLAGS_AT).copied().unwrap_or(0)
}

/// `N` bytes of an entry from `at`. Every chunk of [`live_entries`] has them; a shorter slice
/// (none exists) would read as zeros rather than trap the VM.
fn array_at<const N: usize>(raw: &[u8], at: usize) -> [u8; N] {
    raw.get(at..)
        .and_then(|rest| rest.first_chunk::<N>())
        .copied()
        .unwrap_or([0; N])
}

pub(crate) fn push_entry(out: &mut Vec<u8>, entry: &Entry) {
    out.extend_from_slice(&entry.digest);
    out.extend_from_slice(&entry.expiry.to_be_bytes());
    let confirmed = if entry.confirmed { CONFIRMED } else { 0 };
    match entry.owner {
        Some(ip) => {
            out.push(HAS_OWNER | confirmed);
            out.extend_from_slice(&ip.octets());
        }
        None => {
            out.push(confirmed);
            out.extend_from_slice(&[0u8; 16]);
        }
    }
}

pub fn decode(bucket: &[u8]) -> Result<Record, CorruptBucket> {
    Ok(match parse_bucket(bucket)? {
        Bucket::Live(raws) => Record::Live(raws.map(parse_entry).collect()),
        Bucket::Sealed(target) => Record::Sealed(target),
    })
}

/// `encode(&[])` is the fresh bucket configuration writes: the header alone, never an empty
/// value (the SDK reports an empty value like a missing one).
pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        entries
            .len()
            .saturating_mul(ENTRY_LEN)
            .saturating_add(HEADER_LEN),
    );
    out.extend_from_slice(&LIVE);
    for e in entries {
        push_entry(&mut out, e);
    }
    out
}

pub(crate) fn live_header() -> [u8; HEADER_LEN] {
    LIVE
}

/// The marker a migration leaves in a bucket whose entries moved to `target`.
pub fn encode_sealed(target: Layout) -> Vec<u8> {
    let mut out = Vec::with_capacity(SEALED_LEN);
    out.extend_from_slice(&SEALED);
    target.put(&mut out);
    out
}

/// The bucket of a digest (the 32-byte one or the stored 16 bytes) in a layout of `buckets`:
/// bytes 12..16, which the store keeps, so an entry can be placed again in another layout.
pub fn bucket_index(digest: &[u8], buckets: u32) -> u32 {
    let n = digest
        .get(12..16)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_be_bytes);
    n.checked_rem(buckets).unwrap_or(0)
}
