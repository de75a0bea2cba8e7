//! The root context: one per worker. Compiles the policy on `on_configure` and refuses a bad
//! one (Envoy then rejects the configuration), so no worker serves with a half-understood policy.

use std::rc::Rc;

use gateguard_core::parse_policy;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};

use crate::filter::{Gateway, RequestFilter};
use crate::metrics::Metrics;

#[derive(Default)]
pub struct GatewayRoot {
    gateway: Option<Rc<Gateway>>,
}

impl Context for GatewayRoot {}

impl RootContext for GatewayRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = self.get_plugin_configuration() else {
            log(
                LogLevel::Error,
                "gateguard: no plugin configuration; refusing to start",
            );
            return false;
        };
        let env = |name: &str| std::env::var(name).ok();
        match parse_policy(&config, &env) {
            Ok(policy) => {
                let metrics = Metrics::define(&policy);
                self.gateway = Some(Rc::new(Gateway { policy, metrics }));
                true
            }
            Err(e) => {
                log(LogLevel::Error, &format!("gateguard: policy refused: {e}"));
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(RequestFilter::new(self.gateway.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

pub fn log(level: LogLevel, message: &str) {
    let _ = proxy_wasm::hostcalls::log(level, message);
}
