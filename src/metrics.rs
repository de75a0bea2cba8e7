//! Envoy counters: `gateguard.<api>.<outcome>` and `gateguard.<outcome>` before routing.

use std::collections::HashMap;

use gateguard_core::{CompiledPolicy, Outcome};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

#[derive(Debug, Default)]
pub struct Metrics {
    per_api: Vec<HashMap<Outcome, u32>>,
    global: HashMap<Outcome, u32>,
}

impl Metrics {
    /// Defines every counter up front so they show on `/stats` at zero.
    pub fn define(policy: &CompiledPolicy) -> Self {
        let per_api = policy
            .apis
            .iter()
            .map(|api| {
                Outcome::PER_API
                    .iter()
                    .filter_map(|o| {
                        let name = format!("gateguard.{}.{}", api.name, o.name());
                        hostcalls::define_metric(MetricType::Counter, &name)
                            .ok()
                            .map(|id| (*o, id))
                    })
                    .collect()
            })
            .collect();
        let global = Outcome::GLOBAL
            .iter()
            .filter_map(|o| {
                hostcalls::define_metric(MetricType::Counter, &format!("gateguard.{}", o.name()))
                    .ok()
                    .map(|id| (*o, id))
            })
            .collect();
        Self { per_api, global }
    }

    pub fn count(&self, api: Option<usize>, outcome: Outcome) {
        let id = match api {
            Some(i) => self.per_api.get(i).and_then(|m| m.get(&outcome)),
            None => self.global.get(&outcome),
        };
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(*id, 1);
        }
    }
}
