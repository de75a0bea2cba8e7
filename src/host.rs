//! Envoy shared data, called through the raw ABI: the SDK's wrappers panic on statuses they do
//! not expect, and a panic traps the VM. Every status here is a value we handle.
// Lengths and counts here come from the host's buffers: checked like all arithmetic in the
// crate (src/lib.rs).

use std::ptr::{null, null_mut};

use gateguard_core::shared_data::{SetError, SharedStore, StoreError};

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

/// Shared-data key prefix of everything gateguard stores.
pub const KEY_PREFIX: &str = "gateguard.";

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

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
}

/// Property paths are segments joined by NUL, as the ABI wants them.
fn property_path(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

/// An Envoy attribute (`source.address`, `connection.peer_certificate`...), `None` when absent or
/// when the host answers with any error.
pub fn get_property(path: &[&str]) -> Option<Vec<u8>> {
    let path = property_path(path);
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as for shared data: the host allocates through our exported allocator.
    let status = unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) };
    if status != OK || data.is_null() {
        return None;
    }
    // SAFETY: see above.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// Filter state for the access log (`%FILTER_STATE(wasm.<name>:PLAIN)%`); failures are ignored.
pub fn set_property(path: &[&str], value: &[u8]) {
    let path = property_path(path);
    // SAFETY: pointers and lengths describe live slices for the duration of the call.
    let _ = unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) };
}

// --- The rest of the ABI this filter uses per request, raw for the same reason: the SDK's
// --- wrappers panic on any status they did not expect.

pub use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType};

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_log_level(return_level: *mut u32) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        details_data: *const u8,
        details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_get_status(
        return_code: *mut u32,
        return_message_data: *mut *mut u8,
        return_message_size: *mut usize,
    ) -> u32;
}

/// Takes ownership of a host-allocated buffer (allocated through our exported allocator).
fn owned(status: u32, data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if status != OK || data.is_null() {
        return None;
    }
    // SAFETY: the host returned a buffer of `size` bytes allocated by proxy_on_memory_allocate.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// Whether a message at `level` would be written (Envoy's `wasm` logger level).
pub fn logs_at(level: LogLevel) -> bool {
    let mut current: u32 = 0;
    // SAFETY: writes one u32 we own.
    let status = unsafe { proxy_get_log_level(&mut current) };
    status != OK || current <= level as u32
}

pub fn log(level: LogLevel, message: &str) {
    // SAFETY: pointer and length of a live str.
    let _ = unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}

/// Host clock, unix seconds (0 if the host will not say: every time check then fails closed).
pub fn now() -> u64 {
    now_ms() / 1000
}

/// Host clock, unix milliseconds (0 if the host will not say).
pub fn now_ms() -> u64 {
    let mut nanos: u64 = 0;
    // SAFETY: writes one u64 we own.
    let status = unsafe { proxy_get_current_time_nanoseconds(&mut nanos) };
    if status == OK {
        nanos / 1_000_000
    } else {
        0
    }
}

/// The gRPC status (code, message) of the call being answered. The SDK's wrapper panics on a
/// message that is not UTF-8; this one reads it lossily. Unknown (2) if the host will not say.
pub fn grpc_status() -> (u32, String) {
    let mut code: u32 = 2;
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: writes one u32 we own and hands us a buffer as in `owned`.
    let status = unsafe { proxy_get_status(&mut code, &mut data, &mut size) };
    let message = owned(status, data, size)
        .map(|m| String::from_utf8_lossy(&m).into_owned())
        .unwrap_or_default();
    if status == OK {
        (code, message)
    } else {
        (2, message)
    }
}

/// All pairs of a header map; names and values as (lossy) UTF-8.
pub fn header_pairs(map: MapType) -> Vec<(String, String)> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: see `owned`.
    let status = unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) };
    owned(status, data, size).map_or_else(Vec::new, |b| deserialize_map(&b))
}

pub fn header_value(map: MapType, name: &str) -> Option<Vec<u8>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: see `owned`.
    let status = unsafe {
        proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut data, &mut size)
    };
    owned(status, data, size)
}

pub fn set_header(map: MapType, name: &str, value: &str) {
    // SAFETY: pointers and lengths of live strs.
    let _ = unsafe {
        proxy_replace_header_map_value(
            map as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    };
}

/// Adds a value, keeping the ones already there (for list headers such as `Vary`).
pub fn add_header(map: MapType, name: &str, value: &str) {
    // SAFETY: pointers and lengths of live strs.
    let _ = unsafe {
        proxy_add_header_map_value(
            map as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    };
}

pub fn remove_header(map: MapType, name: &str) {
    // SAFETY: pointer and length of a live str.
    let _ = unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) };
}

pub fn send_response(status: u16, headers: &[(String, String)], body: &str) {
    let map = serialize_map(headers);
    let details = "gateguard";
    // SAFETY: all pointers and lengths describe live buffers for the duration of the call.
    let _ = unsafe {
        proxy_send_local_response(
            u32::from(status),
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            map.as_ptr(),
            map.len(),
            -1,
        )
    };
}

/// Lets a paused request go on (after the etcd replay store accepted its token). A stream the
/// host no longer has is not an error worth a trap.
pub fn resume_request() {
    // SAFETY: a plain value (0: the request stream).
    let _ = unsafe { proxy_continue_stream(0) };
}

pub fn buffer(kind: BufferType, start: usize, max: usize) -> Option<Vec<u8>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: see `owned`.
    let status = unsafe { proxy_get_buffer_bytes(kind as u32, start, max, &mut data, &mut size) };
    owned(status, data, size)
}

pub fn define_metric(kind: MetricType, name: &str) -> Option<u32> {
    let mut id: u32 = 0;
    // SAFETY: pointer and length of a live str; writes one u32 we own.
    let status = unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) };
    (status == OK).then_some(id)
}

pub fn increment_metric(id: u32, n: i64) {
    // SAFETY: plain values.
    let _ = unsafe { proxy_increment_metric(id, n) };
}

pub fn record_metric(id: u32, value: u64) {
    // SAFETY: plain values.
    let _ = unsafe { proxy_record_metric(id, value) };
}

/// The ABI's map encoding: count, then (name length, value length) pairs, then NUL-terminated
/// names and values. Bounds-checked: a malformed map yields what could be read.
fn deserialize_map(bytes: &[u8]) -> Vec<(String, String)> {
    let read_u32 = |at: usize| -> Option<usize> {
        let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(b)).ok()
    };
    let Some(count) = read_u32(0) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(count.min(1024));
    let Some(mut p) = count.checked_mul(8).and_then(|n| n.checked_add(4)) else {
        return out;
    };
    for i in 0..count {
        // Inside the header `p` was checked to fit in: `4 + 8 × count` does not overflow.
        let lengths_at = i.saturating_mul(8).saturating_add(4);
        let (Some(klen), Some(vlen)) =
            (read_u32(lengths_at), read_u32(lengths_at.saturating_add(4)))
        else {
            break;
        };
        let Some(key) = bytes.get(p..p.saturating_add(klen)) else {
            break;
        };
        p = p.saturating_add(klen).saturating_add(1);
        let Some(value) = bytes.get(p..p.saturating_add(vlen)) else {
            break;
        };
        p = p.saturating_add(vlen).saturating_add(1);
        out.push((
            String::from_utf8_lossy(key).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    out
}

fn serialize_map(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    #[test]
    fn maps_round_trip_and_truncated_maps_do_not_panic() {
        let pairs = vec![
            (":path".to_string(), "/a".to_string()),
            ("x".to_string(), String::new()),
        ];
        let bytes = serialize_map(&pairs);
        assert_eq!(deserialize_map(&bytes), pairs);
        for cut in 0..bytes.len() {
            let _ = deserialize_map(&bytes[..cut]);
        }
        let mut huge = bytes.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let _ = deserialize_map(&huge);
    }
}
