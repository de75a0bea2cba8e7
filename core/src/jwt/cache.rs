//! Verified-token cache entries, stored in Envoy shared data so every worker skips signature
//! verification for a token any worker verified. The cache is a fixed number of slots
//! (direct-mapped by digest), so it is bounded by construction; a collision only evicts.
//! A hit still runs the per-request checks (required claims for this method, replay).

use serde_json::{Map, Value};

/// Claims larger than this are not cached (they are verified every time).
pub const MAX_CACHED_CLAIMS_BYTES: usize = 8 * 1024;
const MAGIC: &[u8; 4] = b"GGT1";

/// `digest`: SHA-256 over the policy fingerprint and the token, so an entry verified under one
/// API's issuers and audiences is never a hit for another API or another policy version.
pub fn encode(digest: &[u8; 32], exp: u64, claims: &Map<String, Value>) -> Option<Vec<u8>> {
    let json = serde_json::to_vec(claims).ok()?;
    if json.len() > MAX_CACHED_CLAIMS_BYTES {
        return None;
    }
    let mut out = Vec::with_capacity(json.len().saturating_add(4 + 32 + 8));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(digest);
    out.extend_from_slice(&exp.to_be_bytes());
    out.extend_from_slice(&json);
    Some(out)
}

/// The cached claims and `exp`, if the slot holds this token and it has not expired.
pub fn decode(bytes: &[u8], digest: &[u8; 32], now: u64) -> Option<(Map<String, Value>, u64)> {
    let rest = bytes.strip_prefix(MAGIC.as_slice())?;
    let (stored, rest) = rest.split_at_checked(32)?;
    if stored != digest.as_slice() {
        return None;
    }
    let (exp, json) = rest.split_at_checked(8)?;
    let exp = u64::from_be_bytes(exp.try_into().ok()?);
    if exp <= now {
        return None;
    }
    match serde_json::from_slice(json).ok()? {
        Value::Object(map) => Some((map, exp)),
        _ => None,
    }
}

pub fn slot(digest: &[u8; 32], slots: u32) -> u32 {
    let n = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    n.checked_rem(slots).unwrap_or(0)
}
