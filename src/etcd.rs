//! The request side of the etcd replay store: sends each call the core's [`Exchange`] asks for
//! through `dispatch_grpc_call`, and hands each answer back to it. What to send and what an
//! answer means is decided in the core; this file only moves bytes and counts.

use std::time::Duration;

use gateguard_core::decision::Pending;
use gateguard_core::replay::etcd::{remember, Answer, EtcdPolicy, Exchange, Failure, Step};
use proxy_wasm::hostcalls;

use crate::configured::ConfiguredGateway;
use crate::host::{self, log, BufferType, HostStore, LogLevel};
use crate::metrics::{ETCD_CALLS, ETCD_ERRORS, ETCD_TIMEOUTS};

/// A request paused while etcd answers.
pub struct Waiting {
    pub pending: Box<Pending>,
    exchange: Exchange,
    /// The gRPC call awaited.
    call: u32,
}

/// How a step ended: a call in flight (keep the request paused), or etcd's result.
pub enum Progress {
    Waiting(Waiting),
    Done(Box<Pending>, Result<Answer, Failure>),
}

/// Starts asking etcd about the token of `pending`.
pub fn start(gateway: &ConfiguredGateway, etcd: &EtcdPolicy, pending: Box<Pending>) -> Progress {
    let (exchange, step) = Exchange::start(
        pending.check,
        &etcd.prefix,
        etcd.timeout_ms,
        host::now_ms(),
        &mut gateway.etcd.borrow_mut(),
    );
    drive(gateway, etcd, pending, exchange, step)
}

/// etcd answered call `token_id` with gRPC `status` (0 with a message of `size` bytes).
pub fn on_response(
    gateway: &ConfiguredGateway,
    etcd: &EtcdPolicy,
    waiting: Waiting,
    status: u32,
    size: usize,
) -> Progress {
    let Waiting {
        pending,
        mut exchange,
        ..
    } = waiting;
    let (status, message, body) = if status == 0 {
        let body = host::buffer(BufferType::GrpcReceiveBuffer, 0, size).unwrap_or_default();
        (0, String::new(), body)
    } else {
        let (code, message) = host::grpc_status();
        // The status argument is authoritative; the message is only for the log.
        (if code == 0 { status } else { code }, message, Vec::new())
    };
    let step = exchange.on_response(
        status,
        &message,
        &body,
        host::now_ms(),
        &mut gateway.etcd.borrow_mut(),
    );
    drive(gateway, etcd, pending, exchange, step)
}

impl Waiting {
    pub fn call(&self) -> u32 {
        self.call
    }
}

fn drive(
    gateway: &ConfiguredGateway,
    etcd: &EtcdPolicy,
    pending: Box<Pending>,
    mut exchange: Exchange,
    mut step: Step,
) -> Progress {
    let api = Some(pending.forward.api);
    loop {
        match step {
            Step::Send(out) => {
                gateway.metrics.add(api, ETCD_CALLS, 1);
                let token = gateway.etcd.borrow().token().map(str::to_string);
                let metadata: Vec<(&str, &[u8])> = token
                    .as_deref()
                    .map(|t| vec![("token", t.as_bytes())])
                    .unwrap_or_default();
                match hostcalls::dispatch_grpc_call(
                    &etcd.cluster,
                    out.service,
                    out.method,
                    metadata,
                    Some(&out.message),
                    Duration::from_millis(out.timeout_ms),
                ) {
                    Ok(call) => {
                        return Progress::Waiting(Waiting {
                            pending,
                            exchange,
                            call,
                        })
                    }
                    Err(_) => step = exchange.not_sent(),
                }
            }
            Step::Done(result) => {
                match &result {
                    Ok(answer) => {
                        let now = host::now();
                        // Best effort: a cache that cannot take it costs the next use a call.
                        let _ = remember(
                            &HostStore,
                            &gateway.policy.replay_cache,
                            &gateway.replay_prefix,
                            pending.check.token,
                            answer,
                            now,
                        );
                    }
                    Err(failure) => {
                        let name = if failure.is_timeout() {
                            ETCD_TIMEOUTS
                        } else {
                            ETCD_ERRORS
                        };
                        gateway.metrics.add(api, name, 1);
                        log_failure(gateway, pending.forward.api, failure);
                    }
                }
                return Progress::Done(pending, result);
            }
        }
    }
}

/// One warning per worker per 10 s while etcd fails (every refused request also gets its
/// audit line; with `allow`, every unchecked one its warning).
fn log_failure(gateway: &ConfiguredGateway, api: usize, failure: &Failure) {
    let now = host::now();
    if now < gateway.etcd_failure_logged.get().saturating_add(10) {
        return;
    }
    gateway.etcd_failure_logged.set(now);
    log(
        LogLevel::Warn,
        &format!(
            "gateguard: api={} etcd replay store unavailable: {}",
            gateway.api_name(api),
            failure.describe()
        ),
    );
}
