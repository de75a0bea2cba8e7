//! gateguard's policy engine: request facts in, decision out. No proxy-wasm dependency, so
//! everything here is tested natively; the filter crate is a thin adapter around it.

// Arithmetic on anything a request or a policy carries is checked or saturating: an overflow
// would panic (and trap the Wasm VM) with overflow checks on, or wrap into a wrong decision
// without them. Tests may compute freely.
#![cfg_attr(not(test), deny(clippy::arithmetic_side_effects))]

pub mod audit;
pub mod client_cert;
pub mod config;
pub mod cors;
pub mod decision;
pub mod deploy;
pub mod error;
pub mod header_rules;
pub mod headers;
pub mod hex;
pub mod ip_filter;
pub mod jwt;
pub mod limits;
mod literals;
pub mod locate;
pub mod memo;
pub mod methods;
pub mod path;
pub mod pipeline;
#[cfg(test)]
mod proptest_config;
pub mod query;
pub mod rate_limit;
pub mod replay;
pub mod shared_data;
pub mod subscription_key;
pub mod value;

#[cfg(feature = "serialize")]
mod serialize;

pub use config::{parse_policy, parse_policy_report, CompiledPolicy};
pub use decision::{Decision, Outcome, Refusal};
pub use error::{ConfigError, ConfigErrors};
pub use pipeline::Request;
