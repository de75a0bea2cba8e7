//! The replay store's records: decoding any bytes never panics, and whatever decodes re-encodes
//! to exactly the bytes it came from (one encoding per record).
#![no_main]
use gateguard_core::replay::{
    decode, encode, encode_sealed, parse_bucket, Bucket, Pointer, Record, HEADER_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Ok(Record::Live(entries)) => {
            let again = encode(&entries);
            if data.is_empty() {
                assert_eq!(again.len(), HEADER_LEN);
            } else {
                assert_eq!(again, data);
            }
            assert_eq!(decode(&again), Ok(Record::Live(entries)));
        }
        Ok(Record::Sealed(layout)) => {
            assert_eq!(encode_sealed(layout), data);
            assert!(matches!(parse_bucket(data), Ok(Bucket::Sealed(l)) if l == layout));
        }
        Err(_) => {}
    }
    if let Some(p) = Pointer::decode(data) {
        assert_eq!(p.encode(), data);
    }
});
