//! Property tests of the replay store's record codec: entries, live and sealed buckets and the
//! pointer round-trip; decoding any bytes never panics and accepts only bytes that re-encode
//! exactly, so no two encodings mean the same record.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::Ipv6Addr;

use proptest::prelude::*;

use crate::proptest_config::cases;

use super::record::{live_entries, parse_entry, push_entry, raw_expiry};
use super::*;

fn arb_entry() -> impl Strategy<Value = Entry> {
    (
        any::<[u8; 16]>(),
        any::<u64>(),
        proptest::option::of(prop_oneof![
            any::<[u8; 16]>().prop_map(Ipv6Addr::from),
            any::<[u8; 4]>().prop_map(|o| std::net::Ipv4Addr::from(o).to_ipv6_mapped()),
            Just(Ipv6Addr::UNSPECIFIED),
        ]),
        any::<bool>(),
    )
        .prop_map(|(digest, expiry, owner, confirmed)| Entry {
            digest,
            expiry,
            owner,
            confirmed,
        })
}

fn arb_layout() -> impl Strategy<Value = Layout> {
    (1u32..u32::MAX, 0u32..=16).prop_map(|(epoch, shift)| Layout {
        epoch,
        buckets: 1 << shift,
    })
}

/// Records as stored, then changed a little: flipped bytes, cut or lengthened.
fn arb_bytes() -> impl Strategy<Value = Vec<u8>> {
    let valid = prop_oneof![
        proptest::collection::vec(arb_entry(), 0..6).prop_map(|e| encode(&e)),
        arb_layout().prop_map(encode_sealed),
        (arb_layout(), any::<bool>()).prop_map(|(current, next)| {
            Pointer {
                current,
                next: next.then(|| current.successor(current.buckets)).flatten(),
            }
            .encode()
        }),
    ];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..128),
        (
            valid,
            proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..3),
            proptest::option::of(any::<proptest::sample::Index>()),
            proptest::collection::vec(any::<u8>(), 0..3),
        )
            .prop_map(|(mut b, flips, cut, tail)| {
                for (i, x) in flips {
                    let at = i.index(b.len());
                    b[at] ^= x;
                }
                if let Some(cut) = cut {
                    b.truncate(cut.index(b.len() + 1));
                }
                b.extend_from_slice(&tail);
                b
            }),
    ]
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn records_round_trip(
        entries in proptest::collection::vec(arb_entry(), 0..8),
        layout in arb_layout(),
        next in any::<bool>(),
    ) {
        let bytes = encode(&entries);
        prop_assert_eq!(bytes.len(), HEADER_LEN + entries.len() * ENTRY_LEN);
        prop_assert_eq!(decode(&bytes), Ok(Record::Live(entries.clone())));
        let raws: Vec<&[u8]> = live_entries(&bytes).unwrap().collect();
        for (raw, e) in raws.iter().zip(&entries) {
            prop_assert_eq!(parse_entry(raw), *e);
            prop_assert_eq!(raw_expiry(raw), e.expiry);
            let mut again = Vec::new();
            push_entry(&mut again, e);
            prop_assert_eq!(&again[..], *raw);
        }
        prop_assert_eq!(decode(&encode_sealed(layout)), Ok(Record::Sealed(layout)));
        let pointer = Pointer { current: layout, next: next.then(|| layout.successor(1)).flatten() };
        prop_assert_eq!(Pointer::decode(&pointer.encode()), Some(pointer));
        prop_assert_eq!(decode(&[]), Ok(Record::Live(vec![])));
    }

    #[test]
    fn decoding_arbitrary_bytes_accepts_only_its_own_encoding(bytes in arb_bytes()) {
        match decode(&bytes) {
            Ok(Record::Live(entries)) if bytes.is_empty() => prop_assert!(entries.is_empty()),
            Ok(Record::Live(entries)) => prop_assert_eq!(encode(&entries), bytes.clone()),
            Ok(Record::Sealed(layout)) => {
                prop_assert!(layout.is_valid());
                prop_assert_eq!(encode_sealed(layout), bytes.clone());
            }
            Err(_) => {}
        }
        if let Some(p) = Pointer::decode(&bytes) {
            prop_assert!(p.current.is_valid());
            prop_assert_eq!(p.encode(), bytes.clone());
        }
        if let Ok(raws) = live_entries(&bytes) {
            for raw in raws {
                let mut again = Vec::new();
                push_entry(&mut again, &parse_entry(raw));
                prop_assert_eq!(&again[..], raw);
            }
        }
    }

    #[test]
    fn bucket_indexes_stay_in_the_layout(digest in proptest::collection::vec(any::<u8>(), 0..40), shift in 0u32..=16) {
        let buckets = 1u32 << shift;
        prop_assert!(bucket_index(&digest, buckets) < buckets);
        prop_assert_eq!(bucket_index(&digest, 0), 0);
    }
}
