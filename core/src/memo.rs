//! Facts one Envoy worker may remember between requests because they cannot change before a
//! known time: a verified token's claims until its `exp`, a replay entry's owner until the
//! entry expires. Shared data stays the truth every worker shares; this saves a worker the host
//! calls (each one a round trip into and out of the Wasm VM) and the decoding that re-reading a
//! fact it already knows would cost. Bounded: when full, expired facts go, then everything.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::rc::Rc;

use serde_json::{Map, Value};

use crate::replay::{normalise_ip, ReplayMode, TokenRef, Verdict};

/// Facts per worker and configuration: enough for the tokens in use at once, small enough not
/// to matter next to shared data (each entry is a digest and a small value).
pub const MEMO_ENTRIES: usize = 4096;

/// `key → (fact, valid until)`, valid while `now < until`.
#[derive(Debug)]
pub struct Memo<K, V> {
    map: RefCell<HashMap<K, (V, u64)>>,
    capacity: usize,
}

impl<K: Eq + Hash, V: Clone> Memo<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            map: RefCell::new(HashMap::new()),
            capacity,
        }
    }

    pub fn get(&self, key: &K, now: u64) -> Option<V> {
        let map = self.map.borrow();
        let (value, until) = map.get(key)?;
        (now < *until).then(|| value.clone())
    }

    pub fn insert(&self, key: K, value: V, until: u64, now: u64) {
        if self.capacity == 0 || until <= now {
            return;
        }
        let mut map = self.map.borrow_mut();
        if map.len() >= self.capacity && !map.contains_key(&key) {
            map.retain(|_, (_, u)| now < *u);
            if map.len() >= self.capacity {
                map.clear();
            }
        }
        map.insert(key, (value, until));
    }

    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a worker knows of a token's replay entry: it has this owner, or it has none (spent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    Owner(std::net::Ipv6Addr),
    Spent,
}

/// Replay facts this worker saw decided: an entry's owner never changes while it lives, and an
/// entry without owner stays spent. Only certain facts are kept (a refusal does not say who the
/// owner is), so a verdict from here is the one the store would give.
#[derive(Debug)]
pub struct ReplayMemo(Memo<[u8; 32], Holder>);

impl Default for ReplayMemo {
    fn default() -> Self {
        Self(Memo::new(MEMO_ENTRIES))
    }
}

impl ReplayMemo {
    /// The verdict the store would give, if this worker knows it.
    pub fn verdict(
        &self,
        token: &TokenRef,
        ip: Option<IpAddr>,
        mode: ReplayMode,
        now: u64,
    ) -> Option<Verdict> {
        let holder = self.0.get(&token.digest, now)?;
        Some(match (holder, mode, ip) {
            (Holder::Owner(owner), ReplayMode::WithIp, Some(ip)) if owner == normalise_ip(ip) => {
                Verdict::SameOwner
            }
            // With_ip without an IP is the store's MissingIp, not ours to answer.
            (_, ReplayMode::WithIp, None) => return None,
            _ => Verdict::Replay,
        })
    }

    /// Records what an accepted decision proved: `with_ip` → this IP owns the token;
    /// `without_ip` first use → spent. Until the entry's expiry.
    pub fn learn(
        &self,
        token: &TokenRef,
        ip: Option<IpAddr>,
        mode: ReplayMode,
        verdict: Verdict,
        now: u64,
    ) {
        let holder = match (mode, verdict, ip) {
            (ReplayMode::WithIp, Verdict::FirstUse | Verdict::SameOwner, Some(ip)) => {
                Holder::Owner(normalise_ip(ip))
            }
            (ReplayMode::WithoutIp, Verdict::FirstUse, _) => Holder::Spent,
            _ => return,
        };
        self.0.insert(token.digest, holder, token.exp, now);
    }
}

/// A token this worker saw verified (or read from the verified-token cache), by the token's
/// own text, so a repeat request costs neither of the SHA-256s over the token (the cache key
/// and the replay identity) nor a host call.
#[derive(Debug, Clone)]
pub struct KnownToken {
    pub claims: Rc<Map<String, Value>>,
    pub exp: u64,
    /// The replay identity ([`crate::pipeline::signed_content_sha256`]).
    pub identity: [u8; 32],
}

/// Verified tokens by their text, per worker and configuration. A fact holds for the API that
/// verified it, with what verified it ([`Verifier`]), until the token's `exp`: a token seen by
/// another API, or after the policy, its identity provider's keys or its HMAC secret changed,
/// is checked again.
#[derive(Debug)]
pub struct TokenMemo(Memo<u64, TokenFact>);

#[derive(Debug, Clone)]
struct TokenFact {
    /// The whole token: the map's key is only a cheap summary of it.
    token: Rc<str>,
    api: usize,
    verifier: Verifier,
    known: KnownToken,
}

/// What verified a token: the policy's fingerprint, the identity provider (its key slot), and
/// the fingerprints of its key set and HMAC secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verifier {
    pub policy: [u8; 32],
    /// The identity provider's key slot (`Host::jwt_keys`).
    pub slot: usize,
    pub keys: [u8; 32],
    pub hmac: [u8; 32],
}

impl Default for TokenMemo {
    fn default() -> Self {
        Self(Memo::new(MEMO_ENTRIES))
    }
}

/// The map key: the token's length and its last 16 bytes (signature bytes, which differ
/// between any two tokens an identity provider signed). Tokens sharing it only evict each
/// other; a fact is used only when the whole text matches.
fn summary(token: &str) -> u64 {
    let bytes = token.as_bytes();
    let mut h: u64 = bytes.len() as u64;
    for &b in bytes.iter().skip(bytes.len().saturating_sub(16)) {
        h = h.rotate_left(5) ^ u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

impl TokenMemo {
    /// What this worker knows of `token` for `api`, if what verified it is still what would:
    /// `current` gives the verifier of the key slot the fact names as it is now.
    pub fn get(
        &self,
        api: usize,
        token: &str,
        now: u64,
        current: impl FnOnce(usize) -> Option<Verifier>,
    ) -> Option<KnownToken> {
        let fact = self.0.get(&summary(token), now)?;
        (fact.api == api
            && *fact.token == *token
            && current(fact.verifier.slot) == Some(fact.verifier))
        .then_some(fact.known)
    }

    pub fn learn(&self, api: usize, verifier: Verifier, token: &str, known: KnownToken, now: u64) {
        let until = known.exp;
        let fact = TokenFact {
            token: Rc::from(token),
            api,
            verifier,
            known,
        };
        self.0.insert(summary(token), fact, until, now);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tok(n: u8, exp: u64) -> TokenRef {
        TokenRef::new(&[n; 32], exp, 0)
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn only_certain_facts_are_kept_and_they_answer_as_the_store_would() {
        use ReplayMode::{WithIp, WithoutIp};
        let m = ReplayMemo::default();
        let t = tok(1, 1000);
        // A refusal proves no owner: nothing kept.
        m.learn(&t, ip("10.0.0.1"), WithIp, Verdict::Replay, 0);
        m.learn(&t, None, WithoutIp, Verdict::Replay, 0);
        assert_eq!(m.verdict(&t, ip("10.0.0.1"), WithIp, 0), None);
        m.learn(&t, ip("10.0.0.1"), WithIp, Verdict::FirstUse, 0);
        assert_eq!(
            m.verdict(&t, ip("10.0.0.1"), WithIp, 0),
            Some(Verdict::SameOwner)
        );
        assert_eq!(
            m.verdict(&t, ip("::ffff:10.0.0.1"), WithIp, 0),
            Some(Verdict::SameOwner)
        );
        assert_eq!(
            m.verdict(&t, ip("10.0.0.2"), WithIp, 0),
            Some(Verdict::Replay)
        );
        // One history: an owned token is a replay for without_ip.
        assert_eq!(m.verdict(&t, None, WithoutIp, 0), Some(Verdict::Replay));
        assert_eq!(m.verdict(&t, None, WithIp, 0), None);
        // Until the entry's expiry only.
        assert_eq!(m.verdict(&t, ip("10.0.0.1"), WithIp, t.exp), None);
        let u = tok(2, 1000);
        m.learn(&u, None, WithoutIp, Verdict::FirstUse, 0);
        assert_eq!(
            m.verdict(&u, ip("10.0.0.1"), WithIp, 0),
            Some(Verdict::Replay)
        );
        assert_eq!(m.verdict(&u, None, WithoutIp, 0), Some(Verdict::Replay));
    }

    #[test]
    fn a_token_fact_holds_for_its_api_keys_and_text_until_exp() {
        let m = TokenMemo::default();
        let known = |n: u8| KnownToken {
            claims: Rc::new(Map::new()),
            exp: 100,
            identity: [n; 32],
        };
        let v = Verifier {
            policy: [1; 32],
            slot: 0,
            keys: [2; 32],
            hmac: [3; 32],
        };
        let t = "aaa.bbb.signature-0123456789abcdef";
        m.learn(0, v, t, known(1), 0);
        assert_eq!(
            m.get(0, t, 99, |_| Some(v)).map(|k| k.identity),
            Some([1; 32])
        );
        // Another API, policy, key set or secret, another token, after exp: not known.
        assert!(m.get(1, t, 0, |_| Some(v)).is_none());
        for other in [
            Verifier {
                policy: [9; 32],
                ..v
            },
            Verifier { keys: [9; 32], ..v },
            Verifier { hmac: [9; 32], ..v },
            Verifier { slot: 1, ..v },
        ] {
            assert!(m.get(0, t, 0, |_| Some(other)).is_none());
        }
        assert!(m.get(0, t, 0, |_| None).is_none());
        assert!(m.get(0, t, 100, |_| Some(v)).is_none());
        // Same length and same last 16 bytes, other content: the summary matches, the text not.
        let twin = "xxx.bbb.signature-0123456789abcdef";
        assert_eq!(summary(t), summary(twin));
        assert!(m.get(0, twin, 0, |_| Some(v)).is_none());
        // Learning the twin evicts the first: never answers for it.
        m.learn(0, v, twin, known(2), 0);
        assert!(m.get(0, t, 0, |_| Some(v)).is_none());
        assert_eq!(
            m.get(0, twin, 0, |_| Some(v)).map(|k| k.identity),
            Some([2; 32])
        );
        // Short tokens work too.
        m.learn(0, v, "a.b", known(3), 0);
        assert!(m.get(0, "a.b", 0, |_| Some(v)).is_some());
        assert!(m.get(0, "a.c", 0, |_| Some(v)).is_none());
    }

    #[test]
    fn it_stays_bounded() {
        let m: Memo<u32, u32> = Memo::new(4);
        for i in 0..100 {
            m.insert(i, i, 50, 0);
            assert!(m.len() <= 4);
        }
        assert_eq!(m.get(&99, 0), Some(99));
        assert_eq!(m.get(&99, 50), None);
        m.insert(7, 7, 10, 10); // already expired: not kept
        assert_eq!(m.get(&7, 0), None);
        let off: Memo<u32, u32> = Memo::new(0);
        off.insert(1, 1, 10, 0);
        assert!(off.is_empty());
    }
}
