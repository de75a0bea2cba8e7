//! The case count of the in-crate property tests (`props` modules): quick by default in
//! `cargo test`, `PROPTEST_CASES` raises it.

use proptest::test_runner::Config;

/// `cases` cases unless `PROPTEST_CASES` says otherwise.
pub(crate) fn cases(cases: u32) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}
