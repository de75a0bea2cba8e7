//! Rate-limit counter buckets: any stored bytes are read (or started afresh) without panic, and
//! counting keeps its promises on top of them.
#![no_main]
use std::cell::RefCell;

use gateguard_core::rate_limit::store::{count_call, Count, CounterStorePolicy};
use gateguard_core::rate_limit::CounterId;
use gateguard_core::shared_data::{SetError, SharedStore, StoreError};
use gateguard_fuzz::NOW;
use libfuzzer_sys::fuzz_target;

/// One bucket, whatever key is asked for: the fuzzer's bytes are what the store holds.
struct OneBucket(RefCell<(Vec<u8>, u32)>);

impl SharedStore for OneBucket {
    fn get(&self, _key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        Ok(Some(self.0.borrow().clone()))
    }
    fn set(&self, _key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        let mut slot = self.0.borrow_mut();
        if cas != slot.1 {
            return Err(SetError::CasMismatch);
        }
        *slot = (value.to_vec(), cas + 1);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 20 {
        return;
    }
    let (head, stored) = data.split_at(20);
    let mut id = [0u8; 16];
    id.copy_from_slice(&head[..16]);
    let calls = u32::from(head[16] % 8) + 1;
    let period = u32::from(u16::from_be_bytes([head[17], head[18]])).max(1);
    let now = NOW + u64::from(head[19]);
    let store = OneBucket(RefCell::new((stored.to_vec(), 1)));
    let Ok(policy) = CounterStorePolicy::compile(1000, "counters") else {
        return;
    };
    let mut last = None;
    for _ in 0..3 {
        match count_call(&store, &policy, CounterId(id), calls, period, now) {
            Count::Counted(s) => {
                assert!(s.remaining < calls && s.limit == calls);
                // (Not `reset <= period`: a stored window may start after `now`, as after the
                // host clock stepped back; it still ends.)
                assert!(s.reset >= 1);
                if let Some(previous) = last {
                    assert_eq!(s.remaining + 1, previous);
                }
                last = Some(s.remaining);
                let value = store.0.borrow().0.clone();
                assert_eq!(value.len() % 36, 1);
            }
            Count::Exceeded { limit, retry_after } => {
                assert!(limit == calls && retry_after >= 1);
                assert!(last.is_none_or(|r| r == 0));
            }
            Count::Full { retry_after } => assert!(retry_after >= 1),
            Count::Unavailable => {}
        }
    }
});
