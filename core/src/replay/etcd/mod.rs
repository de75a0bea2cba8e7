//! The replay history in etcd, shared by every gateway replica (docs/policy.md, "Replay across
//! gateway replicas").

mod cache;
mod config;
mod exchange;
pub mod proto;

pub use cache::{judge_cached, lookup_cached, remember};
pub use config::{
    EtcdConfig, EtcdPolicy, OnUnavailable, ReplayStore, ReplayStoreConfig, MAX_PREFIX_BYTES,
    MAX_TIMEOUT_MS, PASSWORD_ENV, USERNAME_ENV,
};
pub use exchange::{
    status, Answer, Call, Exchange, Failure, Holder, Lease, Outgoing, RemoteCheck, Session, Step,
    LEASE_SLACK_SECONDS, LEASE_WINDOW_SECONDS, MAX_LEASE_TTL, ONCE,
};

#[cfg(test)]
mod tests;
