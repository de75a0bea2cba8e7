//! Envoy shared data, called through the raw ABI: the SDK's wrappers panic on statuses they do
//! not expect, and a panic traps the VM. Every status here is a value we handle.

use std::ptr::{null, null_mut};

use gateguard_core::replay::{SetError, SharedStore, StoreError};

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
}

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const CAS_MISMATCH: u32 = 8;

/// The proxy's shared key-value store (one per `vm_id`, common to all worker threads).
#[derive(Debug, Clone, Copy, Default)]
pub struct HostStore;

impl SharedStore for HostStore {
    /// `Ok(None)`: no such key. `Ok(Some((bytes, cas)))`: present (possibly empty).
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let mut data: *mut u8 = null_mut();
        let mut size: usize = 0;
        let mut cas: u32 = 0;
        // SAFETY: the host writes a buffer it allocated through our exported allocator
        // (proxy_on_memory_allocate), which we then own, exactly as the SDK does.
        let status = unsafe {
            proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
        };
        match status {
            OK => {
                let value = if data.is_null() {
                    Vec::new()
                } else {
                    // SAFETY: see above; size is the allocation's length.
                    unsafe { Vec::from_raw_parts(data, size, size) }
                };
                Ok(Some((value, cas)))
            }
            NOT_FOUND => Ok(None),
            status => Err(StoreError { status }),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        let ptr = if value.is_empty() {
            null()
        } else {
            value.as_ptr()
        };
        // SAFETY: pointers and lengths describe live slices for the duration of the call.
        let status =
            unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), ptr, value.len(), cas) };
        match status {
            OK => Ok(()),
            CAS_MISMATCH => Err(SetError::CasMismatch),
            status => Err(SetError::Other(StoreError { status })),
        }
    }
}
