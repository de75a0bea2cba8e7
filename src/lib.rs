//! gateguard's proxy-wasm adapter: collects request facts, asks the core for a decision, and
//! applies it. Everything that decides lives in `gateguard-core`.

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
    std::panic::set_hook(Box::new(|info| {
        host::log(LogLevel::Critical, &format!("gateguard panicked: {info}"));
    }));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(root::GatewayRoot::default()) });
}}
