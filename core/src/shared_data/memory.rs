//! Envoy's shared data in process, for tests and benchmarks (feature `memory-store`, never in
//! the filter): one lock, a global CAS counter that skips 0, creation that ignores the CAS, no
//! deletion, exactly as the host behaves.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use super::{SetError, SharedStore, StoreError};

#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    map: HashMap<String, (Vec<u8>, u32)>,
    last_cas: u32,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys, for tests.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of keys and values, for measurements.
    pub fn bytes(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .map
            .iter()
            .map(|(k, (v, _))| k.len().saturating_add(v.len()))
            .sum()
    }
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(inner.map.get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, current)) = inner.map.get(key) {
            if cas != 0 && cas != *current {
                return Err(SetError::CasMismatch);
            }
        }
        inner.last_cas = inner.last_cas.wrapping_add(1);
        if inner.last_cas == 0 {
            inner.last_cas = 1;
        }
        let next = inner.last_cas;
        inner.map.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
}
