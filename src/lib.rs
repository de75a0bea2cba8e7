//! gateguard's proxy-wasm adapter: collects request facts, asks the core for a decision, and
//! applies it. Everything that decides lives in `gateguard-core`.

// As in the core: no unchecked arithmetic outside tests.
#![cfg_attr(not(test), deny(clippy::arithmetic_side_effects))]

mod configured;
mod etcd;
mod filter;
mod host;
mod metrics;
mod root;

use proxy_wasm::traits::RootContext;
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    // A panic traps the VM; say so loudly before it happens (the core is built not to panic).
    // This replaces the SDK's hook, installed by `set_log_level` just above: it logs the same
    // at Critical but unwraps the log call (a panic inside the hook) and names no filter.
    std::panic::set_hook(Box::new(|info| host::log(LogLevel::Critical, &panic_report(info))));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(root::GatewayRoot::default()) });
}}

/// The Critical log line of a panic: where it happened and its message.
fn panic_report(info: &std::panic::PanicHookInfo<'_>) -> String {
    let payload = info.payload();
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    match info.location() {
        Some(at) => format!(
            "gateguard panicked at {}:{}:{}: {message}; the Wasm VM traps now",
            at.file(),
            at.line(),
            at.column()
        ),
        None => format!("gateguard panicked: {message}; the Wasm VM traps now"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::panic_report;
    use std::cell::RefCell;
    use std::panic;
    use std::sync::{Mutex, PoisonError};

    /// The hook is process-wide: one test swaps it at a time.
    static HOOK: Mutex<()> = Mutex::new(());

    thread_local! {
        static REPORT: RefCell<Option<String>> = const { RefCell::new(None) };
    }

    /// Runs `cause`, which panics, under the filter's formatting: the report it would log.
    fn report_of(cause: impl FnOnce() + panic::UnwindSafe) -> Option<String> {
        let _only_us = HOOK.lock().unwrap_or_else(PoisonError::into_inner);
        let previous = panic::take_hook();
        panic::set_hook(Box::new(|info| {
            REPORT.with(|r| *r.borrow_mut() = Some(panic_report(info)));
        }));
        let result = panic::catch_unwind(cause);
        panic::set_hook(previous);
        assert!(result.is_err(), "the closure did not panic");
        REPORT.with(|r| r.borrow_mut().take())
    }

    #[test]
    fn a_panic_is_reported_with_its_location_and_formatted_message() {
        let line = line!() + 1;
        let report = report_of(|| panic!("index {} out of range for {} slots", 40, 32)).unwrap();
        let prefix = format!("gateguard panicked at {}:{line}:", file!());
        assert!(report.starts_with(&prefix), "{report}");
        assert!(
            report.ends_with(": index 40 out of range for 32 slots; the Wasm VM traps now"),
            "{report}"
        );
    }

    #[test]
    fn a_literal_message_and_a_std_panic_are_reported_too() {
        let report = report_of(|| panic!("the impossible")).unwrap();
        assert!(
            report.ends_with(": the impossible; the Wasm VM traps now"),
            "{report}"
        );

        let line = line!() + 1;
        let report = report_of(|| _ = "x".parse::<u8>().unwrap()).unwrap();
        let prefix = format!("gateguard panicked at {}:{line}:", file!());
        assert!(report.starts_with(&prefix), "{report}");
        assert!(
            report.contains("called `Result::unwrap()` on an `Err` value"),
            "{report}"
        );
    }

    #[test]
    fn a_panic_without_a_text_message_still_says_so() {
        let report = report_of(|| panic::panic_any(7_u8)).unwrap();
        assert!(
            report.ends_with(": (no message); the Wasm VM traps now"),
            "{report}"
        );
    }
}
