//! The replay history in etcd, shared by every gateway replica (docs/policy.md, "Replay across
//! gateway replicas").

mod config;

pub use config::{
    EtcdConfig, EtcdPolicy, OnUnavailable, ReplayStore, ReplayStoreConfig, MAX_PREFIX_BYTES,
    MAX_TIMEOUT_MS,
};
