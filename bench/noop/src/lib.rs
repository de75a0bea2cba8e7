//! Every callback is the SDK's default: headers pass untouched. What Envoy and V8 cost for any
//! Wasm HTTP filter, measured beside gateguard by scripts/bench.py.

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> { Box::new(Noop) });
}}

struct Noop;

impl Context for Noop {}

impl HttpContext for Noop {}
