//! Envoy shared data: the only state the Wasm VMs of Envoy's workers (and of its main thread)
//! share, one store per `vm_id`. The adapter implements [`SharedStore`] with host calls; every
//! cross-worker protocol in the core (the replay store, the JWKS fetch lease and published key
//! set) is written against it and tested natively against [`MemoryStore`].
//!
//! The semantics every protocol here relies on, as Envoy implements them:
//! - `get` returns the value and its CAS, a counter global to the store that skips 0, so an
//!   existing key never has CAS 0;
//! - `set` with a non-zero CAS on an existing key succeeds only if the CAS still matches (else
//!   `CasMismatch`); with CAS 0 it overwrites;
//! - `set` on a missing key creates it WHATEVER the CAS. So "get, then set with the CAS read"
//!   cannot make creation exclusive: two workers that both read "missing" both create. Create
//!   with [`CREATE_CAS`] instead, which no existing entry can match;
//! - keys cannot be deleted.

#[cfg(any(test, feature = "memory-store"))]
mod memory;
#[cfg(test)]
mod tests;

#[cfg(any(test, feature = "memory-store"))]
pub use memory::MemoryStore;

/// Creates a key only if it is still missing: if another worker created it meanwhile, the set
/// is refused (Envoy's CAS counter would have to sit at exactly this value) instead of wiping it.
pub const CREATE_CAS: u32 = u32::MAX;

/// A host call refused, with the host's status code for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreError {
    pub status: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    CasMismatch,
    Other(StoreError),
}

/// Envoy shared data, with the semantics above.
pub trait SharedStore {
    /// `Ok(None)`: no such key. `Ok(Some((bytes, cas)))`: present (possibly empty).
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError>;
}
