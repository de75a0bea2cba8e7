//! One request's conversation with etcd, as a pure state machine: the adapter sends what
//! [`Step::Send`] says through `dispatch_grpc_call` and hands back what etcd answered; nothing
//! here talks to the host or reads a clock.
//!
//! First use of a token is one transaction (`etcdserverpb.KV/Txn`):
//! `if create_revision(key) == 0 then put(key, owner, lease) else range(key)`, so exactly one
//! of any number of concurrent first uses, on any replica, creates the key, and every other
//! one reads the owner it recorded. Before that, once per worker, the worker may need to
//! authenticate (credentials from the environment) and to grant the lease of the token's
//! expiry window; both are remembered in the worker's [`Session`].
//!
//! Leases: every replica asks for the same lease ID for a window, so a busy deployment holds
//! one lease per window, not one per worker. A lease that already exists is used only after
//! `LeaseTimeToLive` shows it lives long enough: anyone who may grant leases on that etcd can
//! predict the ID and create it first with a short life, which would make keys, and so spent
//! tokens, disappear early. Such a lease is not used; the worker gets a lease with an ID etcd
//! picks instead.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};

use prost::Message;
use sha2::{Digest, Sha256};

use super::proto::{
    compare, request_op, response_op, AuthenticateRequest, AuthenticateResponse, Compare,
    CompareResult, CompareTarget, LeaseGrantRequest, LeaseGrantResponse, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse, PutRequest, RangeRequest, RequestOp, TxnRequest, TxnResponse,
};
use crate::hex;
use crate::replay::admit::normalise_ip;
use crate::replay::{ReplayMode, TokenRef, Verdict};

/// Tokens whose entries end in the same window of this many seconds share one lease. Short, so
/// that etcd deletes few keys at once when a lease ends (it applies nothing else meanwhile).
pub const LEASE_WINDOW_SECONDS: u64 = 10;
/// Added to every lease's TTL: a gateway whose clock runs ahead still grants a lease that ends
/// after the window (the clock skew allowed on `exp` already covers clocks behind).
pub const LEASE_SLACK_SECONDS: u64 = 60;
/// etcd's largest lease TTL (`lease.MaxLeaseTTL`).
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// What the key of a `without_ip` token holds.
pub const ONCE: &[u8] = b"once";

/// gRPC status codes etcd answers with that the exchange acts on.
pub mod status {
    pub const OK: u32 = 0;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    /// etcd: "requested lease not found" (a Txn whose put names a lease etcd does not have).
    pub const NOT_FOUND: u32 = 5;
    /// etcd: "lease already exists" (another worker or replica granted it first).
    pub const FAILED_PRECONDITION: u32 = 9;
    /// Envoy: no connection to etcd, or (with "upstream request timeout") the call's timeout.
    pub const UNAVAILABLE: u32 = 14;
    /// etcd: "invalid auth token" (expired, or issued by another member with simple tokens).
    pub const UNAUTHENTICATED: u32 = 16;
}

/// A failure this close to the deadline is the deadline (Envoy's timers run on its event loop's
/// cached time, which may lag the wall clock by a few milliseconds).
const TIMER_TOLERANCE_MS: u64 = 5;

/// A replay check the local cache could not decide: the token, and the owner to record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteCheck {
    pub token: TokenRef,
    pub mode: ReplayMode,
    /// The client IP (`with_ip` only; the cache lookup already refused a `with_ip` request
    /// without one).
    pub ip: Option<IpAddr>,
}

impl RemoteCheck {
    /// `{prefix}{hex of the 32-byte digest}`.
    pub fn key(&self, prefix: &str) -> Vec<u8> {
        let mut key = Vec::with_capacity(prefix.len().saturating_add(64));
        key.extend_from_slice(prefix.as_bytes());
        key.extend_from_slice(hex::encode(&self.token.digest).as_bytes());
        key
    }

    /// `once`, or `ip:<address>` (IPv4 as a dotted quad, whether it came as IPv4 or
    /// IPv4-mapped IPv6).
    pub fn owner_value(&self) -> Vec<u8> {
        match (self.mode, self.ip) {
            (ReplayMode::WithIp, Some(ip)) => format!("ip:{}", ip.to_canonical()).into_bytes(),
            _ => ONCE.to_vec(),
        }
    }
}

/// Who etcd says holds a token, as the local cache records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// `once`: spent.
    Once,
    Ip(Ipv6Addr),
    /// A value gateguard does not write: refused, not cached.
    Unknown,
}

impl Holder {
    fn parse(value: &[u8]) -> Self {
        if value == ONCE {
            return Holder::Once;
        }
        value
            .strip_prefix(b"ip:")
            .and_then(|ip| std::str::from_utf8(ip).ok())
            .and_then(|ip| ip.parse::<IpAddr>().ok())
            .map_or(Holder::Unknown, |ip| Holder::Ip(normalise_ip(ip)))
    }
}

/// etcd's decision on a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// `FirstUse`, `SameOwner` or `Replay`.
    pub verdict: Verdict,
    pub holder: Holder,
}

/// The lease of an expiry window: every token whose entry ends in `(end - 10, end]` is put
/// with it, on every replica, because the ID is derived from the prefix and the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lease {
    pub window_end: u64,
    pub id: i64,
}

impl Lease {
    /// The lease for a token: its window ends at the entry's expiry (`exp` + skew + 1)
    /// rounded up to a multiple of 10 s, so a key lives at least as long as its token can be
    /// accepted (and the lease [`LEASE_SLACK_SECONDS`] longer).
    pub fn for_token(prefix: &str, token: &TokenRef) -> Self {
        let window_end = token
            .exp
            .div_ceil(LEASE_WINDOW_SECONDS)
            .saturating_mul(LEASE_WINDOW_SECONDS);
        let mut h = Sha256::new();
        h.update(b"gateguard/etcd-lease/v1\0");
        h.update(prefix.as_bytes());
        h.update([0]);
        h.update(window_end.to_be_bytes());
        let digest: [u8; 32] = h.finalize().into();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        // Positive and non-zero: etcd picks its own ID for 0, and IDs are int64.
        let id = (i64::from_be_bytes(id) & i64::MAX).max(1);
        Self { window_end, id }
    }

    /// The TTL to grant at `now`: to the window's end, plus the slack (etcd counts a TTL from
    /// the grant).
    pub fn ttl(&self, now: u64) -> i64 {
        self.needed(now)
            .saturating_add(LEASE_SLACK_SECONDS as i64)
            .min(MAX_LEASE_TTL)
    }

    /// What an existing lease must still have at `now` to carry this window's keys.
    pub fn needed(&self, now: u64) -> i64 {
        i64::try_from(self.window_end.saturating_sub(now))
            .unwrap_or(MAX_LEASE_TTL)
            .clamp(1, MAX_LEASE_TTL)
    }
}

/// What one worker remembers between requests: its etcd auth token and, per expiry window,
/// the lease it knows exists and lives long enough.
#[derive(Debug, Default)]
pub struct Session {
    /// `(user, password)` from the environment; `None` when etcd runs without auth.
    pub credentials: Option<(String, String)>,
    token: Option<String>,
    /// Window end → lease ID.
    pub(super) leases: BTreeMap<u64, i64>,
}

impl Session {
    pub fn new(credentials: Option<(String, String)>) -> Self {
        Self {
            credentials,
            token: None,
            leases: BTreeMap::new(),
        }
    }

    /// The auth token to send as gRPC metadata `token`.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Forgets leases whose window has ended (their tokens can no longer be accepted).
    fn prune(&mut self, now: u64) {
        self.leases = self.leases.split_off(&now.saturating_add(1));
    }
}

/// One gRPC call to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub service: &'static str,
    pub method: &'static str,
    pub message: Vec<u8>,
    /// Milliseconds left of the request's budget.
    pub timeout_ms: u64,
    pub call: Call,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Authenticate,
    LeaseGrant,
    LeaseTimeToLive,
    Txn,
}

impl Call {
    pub fn name(self) -> &'static str {
        match self {
            Call::Authenticate => "Auth/Authenticate",
            Call::LeaseGrant => "Lease/LeaseGrant",
            Call::LeaseTimeToLive => "Lease/LeaseTimeToLive",
            Call::Txn => "KV/Txn",
        }
    }
}

/// Why etcd gave no decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The request's `timeout_ms` ran out.
    Timeout { call: Call },
    /// etcd (or Envoy on its way there) answered with this gRPC status.
    Status {
        call: Call,
        status: u32,
        message: String,
    },
    /// A call could not be sent (no such cluster...).
    NotSent { call: Call },
    /// An OK answer that is not what etcd sends.
    BadAnswer { call: Call, why: &'static str },
}

impl Failure {
    pub fn is_timeout(&self) -> bool {
        matches!(self, Failure::Timeout { .. })
    }

    /// For the log line: never a credential or a token.
    pub fn describe(&self) -> String {
        match self {
            Failure::Timeout { call } => format!("{} timed out", call.name()),
            Failure::Status {
                call,
                status,
                message,
            } => {
                // etcd's messages are short and fixed ("etcdserver: ..."); keep them printable.
                let message: String = message
                    .chars()
                    .take(120)
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect();
                format!("{} answered gRPC status {status} {message:?}", call.name())
            }
            Failure::NotSent { call } => {
                format!(
                    "{} could not be sent (is the cluster defined?)",
                    call.name()
                )
            }
            Failure::BadAnswer { call, why } => format!("{} answered {why}", call.name()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Send(Outgoing),
    Done(Result<Answer, Failure>),
}

/// One request's exchange with etcd.
#[derive(Debug, Clone)]
pub struct Exchange {
    check: RemoteCheck,
    prefix: String,
    lease: Lease,
    /// The lease ID the pending grant asked for (0: etcd picks).
    asking: i64,
    deadline_ms: u64,
    waiting: Option<Call>,
    reauthenticated: bool,
    regranted: bool,
}

impl Exchange {
    /// Starts an exchange at `now_ms` (unix milliseconds) with `timeout_ms` for all its calls.
    pub fn start(
        check: RemoteCheck,
        prefix: &str,
        timeout_ms: u32,
        now_ms: u64,
        session: &mut Session,
    ) -> (Self, Step) {
        let mut exchange = Self {
            check,
            prefix: prefix.to_string(),
            lease: Lease::for_token(prefix, &check.token),
            asking: 0,
            deadline_ms: now_ms.saturating_add(u64::from(timeout_ms)),
            waiting: None,
            reauthenticated: false,
            regranted: false,
        };
        session.prune(now_ms / 1000);
        let step = exchange.next(now_ms, session);
        (exchange, step)
    }

    pub fn check(&self) -> &RemoteCheck {
        &self.check
    }

    /// The call now awaited, if any.
    pub fn waiting(&self) -> Option<Call> {
        self.waiting
    }

    /// The call could not be sent.
    pub fn not_sent(&mut self) -> Step {
        let call = self.waiting.take().unwrap_or(Call::Txn);
        Step::Done(Err(Failure::NotSent { call }))
    }

    /// etcd answered the awaited call with gRPC `status` (and its message) and `body`.
    pub fn on_response(
        &mut self,
        status: u32,
        message: &str,
        body: &[u8],
        now_ms: u64,
        session: &mut Session,
    ) -> Step {
        let Some(call) = self.waiting.take() else {
            return Step::Done(Err(Failure::BadAnswer {
                call: Call::Txn,
                why: "an answer nobody asked for",
            }));
        };
        let failed = || {
            // Envoy ends a call that ran out of time with UNAVAILABLE "upstream request
            // timeout", and its timer may fire a little before our clock reaches the deadline.
            let envoy_timeout =
                status == status::UNAVAILABLE && message.contains("upstream request timeout");
            if status == status::DEADLINE_EXCEEDED
                || envoy_timeout
                || now_ms.saturating_add(TIMER_TOLERANCE_MS) >= self.deadline_ms
            {
                Failure::Timeout { call }
            } else {
                Failure::Status {
                    call,
                    status,
                    message: message.to_string(),
                }
            }
        };
        if status == status::UNAUTHENTICATED
            && session.credentials.is_some()
            && call != Call::Authenticate
            && !self.reauthenticated
        {
            // The token expired (or another member issued it): once more with a new one.
            self.reauthenticated = true;
            session.token = None;
            return self.next(now_ms, session);
        }
        match (call, status) {
            (Call::Authenticate, status::OK) => {
                match AuthenticateResponse::decode(body) {
                    Ok(r) if !r.token.is_empty() => session.token = Some(r.token),
                    _ => {
                        return Step::Done(Err(Failure::BadAnswer {
                            call,
                            why: "no auth token",
                        }))
                    }
                }
                self.next(now_ms, session)
            }
            (Call::LeaseGrant, status::OK) => match LeaseGrantResponse::decode(body) {
                Ok(r)
                    if r.error.is_empty()
                        && r.id > 0
                        && (self.asking == 0 || r.id == self.asking) =>
                {
                    session.leases.insert(self.lease.window_end, r.id);
                    self.next(now_ms, session)
                }
                _ => Step::Done(Err(Failure::BadAnswer {
                    call,
                    why: "a lease other than the one asked for",
                })),
            },
            (Call::LeaseGrant, status::FAILED_PRECONDITION) if self.asking == self.lease.id => {
                // "lease already exists": another worker or replica granted this window's lease
                // first, or someone else did. Use it only if it lives long enough.
                self.send(
                    Call::LeaseTimeToLive,
                    LeaseTimeToLiveRequest {
                        id: self.lease.id,
                        keys: false,
                    }
                    .encode_to_vec(),
                    now_ms,
                )
            }
            (Call::LeaseTimeToLive, status::OK) => match LeaseTimeToLiveResponse::decode(body) {
                Ok(r) if r.id == self.lease.id => {
                    if r.ttl >= self.lease.needed(now_ms / 1000) {
                        session.leases.insert(self.lease.window_end, self.lease.id);
                        self.next(now_ms, session)
                    } else {
                        // Too short (or gone): a lease of our own, with an ID etcd picks.
                        self.grant(0, now_ms)
                    }
                }
                _ => Step::Done(Err(Failure::BadAnswer {
                    call,
                    why: "the time to live of another lease",
                })),
            },
            (Call::Txn, status::OK) => Step::Done(self.read_txn(body)),
            (Call::Txn, status::NOT_FOUND) if !self.regranted => {
                // The lease is gone (etcd restored from an older snapshot, or revoked by an
                // operator): grant it again, once.
                self.regranted = true;
                session.leases.remove(&self.lease.window_end);
                self.next(now_ms, session)
            }
            _ => Step::Done(Err(failed())),
        }
    }

    /// The next call: authenticate if etcd needs it and this worker has no token, grant the
    /// window's lease if this worker has none for it, then the transaction.
    fn next(&mut self, now_ms: u64, session: &Session) -> Step {
        if session.token.is_none() {
            if let Some((name, password)) = &session.credentials {
                let request = AuthenticateRequest {
                    name: name.clone(),
                    password: password.clone(),
                };
                return self.send(Call::Authenticate, request.encode_to_vec(), now_ms);
            }
        }
        match session.leases.get(&self.lease.window_end) {
            Some(&id) => self.send(Call::Txn, self.txn_request(id), now_ms),
            None => self.grant(self.lease.id, now_ms),
        }
    }

    /// Asks for lease `id` (0: etcd picks) for this window.
    fn grant(&mut self, id: i64, now_ms: u64) -> Step {
        self.asking = id;
        let grant = LeaseGrantRequest {
            ttl: self.lease.ttl(now_ms / 1000),
            id,
        };
        self.send(Call::LeaseGrant, grant.encode_to_vec(), now_ms)
    }

    fn send(&mut self, call: Call, message: Vec<u8>, now_ms: u64) -> Step {
        let timeout_ms = self.deadline_ms.saturating_sub(now_ms);
        if timeout_ms == 0 {
            return Step::Done(Err(Failure::Timeout { call }));
        }
        let (service, method) = match call {
            Call::Authenticate => ("etcdserverpb.Auth", "Authenticate"),
            Call::LeaseGrant => ("etcdserverpb.Lease", "LeaseGrant"),
            Call::LeaseTimeToLive => ("etcdserverpb.Lease", "LeaseTimeToLive"),
            Call::Txn => ("etcdserverpb.KV", "Txn"),
        };
        self.waiting = Some(call);
        Step::Send(Outgoing {
            service,
            method,
            message,
            timeout_ms,
            call,
        })
    }

    /// `if create_revision(key) == 0 then put(key, owner, lease) else range(key)`.
    pub fn txn_request(&self, lease: i64) -> Vec<u8> {
        let key = self.check.key(&self.prefix);
        TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Create as i32,
                key: key.clone(),
                target_union: Some(compare::TargetUnion::CreateRevision(0)),
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: key.clone(),
                    value: self.check.owner_value(),
                    lease,
                })),
            }],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest { key })),
            }],
        }
        .encode_to_vec()
    }

    fn read_txn(&self, body: &[u8]) -> Result<Answer, Failure> {
        let bad = |why| Failure::BadAnswer {
            call: Call::Txn,
            why,
        };
        let response =
            TxnResponse::decode(body).map_err(|_| bad("a message that does not decode"))?;
        if response.succeeded {
            // Our put created the key: this request is the token's first use anywhere.
            let holder = Holder::parse(&self.check.owner_value());
            return Ok(Answer {
                verdict: Verdict::FirstUse,
                holder,
            });
        }
        let range = match response.responses.first().and_then(|r| r.response.as_ref()) {
            Some(response_op::Response::ResponseRange(range)) => range,
            _ => return Err(bad("no read of the existing key")),
        };
        let key = self.check.key(&self.prefix);
        let Some(kv) = range.kvs.iter().find(|kv| kv.key == key) else {
            // The compare saw the key and the read in the same revision did not: not etcd.
            return Err(bad("an existing key without its value"));
        };
        let holder = Holder::parse(&kv.value);
        let verdict = match (self.check.mode, holder, self.check.ip) {
            (ReplayMode::WithIp, Holder::Ip(owner), Some(ip)) if owner == normalise_ip(ip) => {
                Verdict::SameOwner
            }
            _ => Verdict::Replay,
        };
        Ok(Answer { verdict, holder })
    }
}
