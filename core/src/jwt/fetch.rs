//! When to fetch a remote JWKS: an explicit state machine the adapter drives from `on_tick`
//! (Uninitialised → Loading → Ready, with backoff on failure), modelled on Envoy jwt_authn's
//! separate intervals for good and failed fetches and istio's OIDC root state machine.

use super::keys::{jwks_uri_from_discovery, JwksError, KeySet};

/// An in-flight fetch with no answer after this long counts as failed.
pub const FETCH_TIMEOUT_SECONDS: u64 = 10;
/// First retry delay after a failure; doubles each time.
pub const BACKOFF_START_SECONDS: u64 = 1;
/// Longest retry delay after failures.
pub const BACKOFF_MAX_SECONDS: u64 = 60;
/// At most one early refresh for unknown `kid`s in this window, however many arrive.
pub const UNKNOWN_KID_REFRESH_SECONDS: u64 = 30;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchStep {
    /// GET the OpenID discovery document to learn `jwks_uri`.
    Discovery(String),
    Jwks(String),
}

impl FetchStep {
    pub fn uri(&self) -> &str {
        match self {
            FetchStep::Discovery(u) | FetchStep::Jwks(u) => u,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchState {
    /// No key set yet, nothing in flight.
    Uninitialised,
    /// A fetch is in flight (since the given time).
    Loading { since: u64 },
    /// Keys are known; the next refresh is due at `next`.
    Ready,
}

#[derive(Debug, Clone)]
pub struct JwksFetcher {
    configured_uri: String,
    is_discovery: bool,
    /// Learned from discovery; forgotten after a failed JWKS fetch so discovery runs again.
    jwks_uri: Option<String>,
    refresh_seconds: u64,
    state: FetchState,
    in_flight: Option<FetchStep>,
    has_keys: bool,
    next_attempt: u64,
    failures: u32,
    last_kid_refresh: Option<u64>,
}

/// What an answer led to.
#[derive(Debug)]
pub enum FetchResult {
    /// New keys: publish them.
    Keys(KeySet),
    /// Discovery answered; the JWKS fetch follows on the next poll.
    Discovered,
}

pub fn is_discovery_uri(uri: &str) -> bool {
    uri.split(['?', '#'])
        .next()
        .is_some_and(|p| p.ends_with("/.well-known/openid-configuration"))
}

impl JwksFetcher {
    pub fn new(uri: &str, refresh_seconds: u64) -> Self {
        let is_discovery = is_discovery_uri(uri);
        Self {
            configured_uri: uri.to_string(),
            is_discovery,
            jwks_uri: (!is_discovery).then(|| uri.to_string()),
            refresh_seconds: refresh_seconds.max(1),
            state: FetchState::Uninitialised,
            in_flight: None,
            has_keys: false,
            next_attempt: 0,
            failures: 0,
            last_kid_refresh: None,
        }
    }

    pub fn state(&self) -> FetchState {
        self.state
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The fetch to start now, if any. Also turns a fetch that outlived its timeout into a
    /// failure.
    pub fn poll(&mut self, now: u64) -> Option<FetchStep> {
        if let FetchState::Loading { since } = self.state {
            if now.saturating_sub(since) < FETCH_TIMEOUT_SECONDS {
                return None;
            }
            self.on_failure(now);
        }
        if now < self.next_attempt {
            return None;
        }
        let step = match &self.jwks_uri {
            Some(uri) => FetchStep::Jwks(uri.clone()),
            None => FetchStep::Discovery(self.configured_uri.clone()),
        };
        self.state = FetchState::Loading { since: now };
        self.in_flight = Some(step.clone());
        Some(step)
    }

    /// The answer to the fetch `poll` started.
    pub fn on_response(
        &mut self,
        now: u64,
        status: u32,
        body: &[u8],
    ) -> Result<FetchResult, JwksError> {
        let step = self.in_flight.take();
        let result = if status != 200 {
            Err(JwksError::HttpStatus(status))
        } else {
            match step {
                Some(FetchStep::Discovery(_)) => jwks_uri_from_discovery(body).and_then(|uri| {
                    // Keys fetched over https must not be redirected to plain http.
                    if self.configured_uri.starts_with("https://") && !uri.starts_with("https://") {
                        return Err(JwksError::NoJwksUri);
                    }
                    self.jwks_uri = Some(uri);
                    Ok(FetchResult::Discovered)
                }),
                Some(FetchStep::Jwks(_)) => KeySet::from_jwks_json(body).map(FetchResult::Keys),
                None => Err(JwksError::Timeout),
            }
        };
        match &result {
            Ok(FetchResult::Discovered) => {
                self.state = self.resting_state();
                self.next_attempt = now;
            }
            Ok(FetchResult::Keys(_)) => self.on_keys(now, now),
            Err(_) => self.on_failure(now),
        }
        result
    }

    /// A fetch that could not be started or failed in transport.
    pub fn on_failure(&mut self, now: u64) {
        self.in_flight = None;
        self.failures = self.failures.saturating_add(1);
        if self.is_discovery && self.failures % 3 == 0 {
            // Maybe the IdP moved its keys: ask discovery again.
            self.jwks_uri = None;
        }
        let exp = self.failures.saturating_sub(1).min(16);
        let backoff = BACKOFF_START_SECONDS
            .saturating_mul(1u64 << exp)
            .min(BACKOFF_MAX_SECONDS)
            .min(self.refresh_seconds.max(BACKOFF_START_SECONDS));
        self.next_attempt = now.saturating_add(backoff);
        self.state = self.resting_state();
    }

    /// Keys arrived, fetched by this worker or another (`fetched_at` from shared data).
    pub fn on_keys(&mut self, now: u64, fetched_at: u64) {
        if matches!(self.state, FetchState::Loading { .. }) && fetched_at < now {
            // Another worker's older result: keep our own fetch going.
            self.has_keys = true;
            return;
        }
        self.in_flight = None;
        self.has_keys = true;
        self.failures = 0;
        self.state = FetchState::Ready;
        self.next_attempt = fetched_at.saturating_add(self.refresh_seconds);
    }

    /// When the next fetch may start.
    pub fn next_attempt(&self) -> u64 {
        self.next_attempt
    }

    /// `poll` said fetch, but another worker holds the lease (it is fetching, or the IdP is
    /// backing off): stand down and look again in a second, without counting a failure.
    pub fn defer(&mut self, now: u64) {
        self.in_flight = None;
        self.state = self.resting_state();
        self.next_attempt = now.saturating_add(1);
    }

    /// A token named a `kid` the key set does not have: maybe the IdP rotated. Refresh early,
    /// but at most once per window so a flood of junk `kid`s cannot hammer the IdP.
    pub fn on_unknown_kid(&mut self, now: u64) -> bool {
        if matches!(self.state, FetchState::Loading { .. }) || !self.has_keys {
            return false; // a fetch is already due or in flight
        }
        if self
            .last_kid_refresh
            .is_some_and(|t| now.saturating_sub(t) < UNKNOWN_KID_REFRESH_SECONDS)
        {
            return false;
        }
        self.last_kid_refresh = Some(now);
        self.next_attempt = self.next_attempt.min(now);
        true
    }

    fn resting_state(&self) -> FetchState {
        if self.has_keys {
            FetchState::Ready
        } else {
            FetchState::Uninitialised
        }
    }
}

/// `https://host:port/path?q` → (`host:port`, `/path?q`), for dispatch_http_call headers.
pub fn split_uri(uri: &str) -> Option<(&str, &str)> {
    let rest = uri
        .strip_prefix("https://")
        .or_else(|| uri.strip_prefix("http://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (rest.get(..i)?, rest.get(i..)?),
        None => (rest, "/"),
    };
    (!authority.is_empty()).then_some((authority, path))
}
