//! Property tests of the counter bucket codec and of counting over whatever a bucket holds:
//! encoding round-trips, decoding any bytes never panics and accepts only bytes that re-encode
//! exactly (one encoding per bucket), and counting keeps its promises on any stored bucket.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::RefCell;

use proptest::prelude::*;

use crate::proptest_config::cases;

use super::*;

const NOW: u64 = 1_800_000_000;

fn arb_entry() -> impl Strategy<Value = Entry> {
    (
        prop_oneof![any::<[u8; 16]>(), Just([7u8; 16])],
        // Windows start when a worker counted, never after now.
        prop_oneof![0..=NOW, (NOW - 100..=NOW)],
        prop_oneof![any::<u64>(), (NOW - 100..NOW + 4000)],
        prop_oneof![any::<u32>(), 0u32..10],
    )
        .prop_map(|(id, window_start, window_end, count)| Entry {
            id,
            window_start,
            window_end,
            count,
        })
}

/// One bucket whatever key is asked for, with Envoy's CAS semantics.
struct OneBucket(RefCell<Option<(Vec<u8>, u32)>>);

impl SharedStore for OneBucket {
    fn get(&self, _key: &str) -> Result<Option<(Vec<u8>, u32)>, crate::shared_data::StoreError> {
        Ok(self.0.borrow().clone())
    }
    fn set(&self, _key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        let mut slot = self.0.borrow_mut();
        // A missing key is created whatever the CAS; an existing one needs its CAS (or 0).
        let current = slot.as_ref().map_or(0, |(_, c)| *c);
        if slot.is_some() && cas != 0 && cas != current {
            return Err(SetError::CasMismatch);
        }
        *slot = Some((value.to_vec(), current + 1));
        Ok(())
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn buckets_round_trip(entries in proptest::collection::vec(arb_entry(), 0..=SLOTS)) {
        let bytes = encode(&entries);
        prop_assert_eq!(bytes.len(), 1 + entries.len() * ENTRY_LEN);
        prop_assert_eq!(decode(&bytes), Some(entries));
    }

    #[test]
    fn decoding_arbitrary_bytes_accepts_only_its_own_encoding(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            (proptest::collection::vec(arb_entry(), 0..40), any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40))
                .prop_map(|(e, version, tail)| {
                    let mut b = encode(&e);
                    if version % 4 == 0 { b[0] = version; }
                    if version % 3 == 0 { b.extend_from_slice(&tail); }
                    b
                }),
        ],
    ) {
        if let Some(entries) = decode(&bytes) {
            prop_assert!(entries.len() <= SLOTS);
            prop_assert_eq!(encode(&entries), bytes);
        }
    }

    #[test]
    fn counting_over_any_stored_bucket(
        stored in prop_oneof![
            Just(None),
            proptest::collection::vec(any::<u8>(), 0..80).prop_map(Some),
            proptest::collection::vec(arb_entry(), 0..=SLOTS).prop_map(|e| Some(encode(&e))),
        ],
        id in prop_oneof![any::<[u8; 16]>(), Just([7u8; 16])],
        calls in 1u32..6,
        period in 1u32..4000,
        ticks in proptest::collection::vec(0u64..3, 1..10),
    ) {
        let store = OneBucket(RefCell::new(stored.map(|v| (v, 1))));
        let policy = CounterStorePolicy::compile(1000, "counters").unwrap();
        let mut now = NOW;
        for tick in ticks {
            now += tick;
            match count_call(&store, &policy, CounterId(id), calls, period, now) {
                Count::Counted(s) => {
                    prop_assert_eq!(s.limit, calls);
                    prop_assert!(s.remaining < calls);
                    prop_assert!(s.reset >= 1 && s.reset <= u64::from(period));
                    let (value, _) = store.0.borrow().clone().unwrap();
                    let entries = decode(&value).expect("what counting writes decodes");
                    let mine: Vec<&Entry> = entries.iter().filter(|e| e.id == id).collect();
                    prop_assert!(!mine.is_empty());
                    prop_assert_eq!(calls - mine[0].count, s.remaining);
                    prop_assert!(entries.iter().all(|e| e.window_end > now));
                    prop_assert!(mine[0].window_end - now <= u64::from(period));
                }
                Count::Exceeded { limit, retry_after } => {
                    prop_assert_eq!(limit, calls);
                    prop_assert!(retry_after >= 1 && retry_after <= u64::from(period));
                }
                Count::Full { retry_after } => prop_assert!(retry_after >= 1),
                Count::Unavailable => prop_assert!(false, "a store that always answers"),
            }
        }
    }
}
