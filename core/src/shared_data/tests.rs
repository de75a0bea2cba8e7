#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

#[test]
fn memory_store_models_envoy_shared_data() {
    let s = MemoryStore::new();
    assert_eq!(s.get("k").unwrap(), None);
    // Creation ignores the CAS.
    s.set("k", b"1", 12345).unwrap();
    let (v, c1) = s.get("k").unwrap().unwrap();
    assert_eq!((v, c1 != 0), (b"1".to_vec(), true));
    assert_eq!(
        s.set("k", b"2", c1.wrapping_add(7)),
        Err(SetError::CasMismatch)
    );
    s.set("k", b"2", c1).unwrap();
    let (_, c2) = s.get("k").unwrap().unwrap();
    assert!(c2 > c1);
    assert_eq!(s.set("k", b"3", c1), Err(SetError::CasMismatch));
    // CAS 0 overwrites unconditionally; the counter is global across keys.
    s.set("k", b"4", 0).unwrap();
    s.set("other", b"x", 0).unwrap();
    let (v, c3) = s.get("k").unwrap().unwrap();
    let (_, c4) = s.get("other").unwrap().unwrap();
    assert_eq!(v, b"4".to_vec());
    assert!(c4 > c3 && c3 > c2);
}

#[test]
fn create_cas_creates_a_key_once_where_a_plain_set_creates_it_twice() {
    // Two workers both read "missing", then both create.
    let s = MemoryStore::new();
    assert_eq!((s.get("a").unwrap(), s.get("a").unwrap()), (None, None));
    assert!(s.set("a", b"worker 1", 0).is_ok());
    assert!(
        s.set("a", b"worker 2", 0).is_ok(),
        "the second wiped the first"
    );
    assert_eq!(s.get("b").unwrap(), None);
    assert!(s.set("b", b"worker 1", CREATE_CAS).is_ok());
    assert_eq!(
        s.set("b", b"worker 2", CREATE_CAS),
        Err(SetError::CasMismatch)
    );
    assert_eq!(s.get("b").unwrap().unwrap().0, b"worker 1".to_vec());
}
