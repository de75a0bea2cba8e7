//! Facts one Envoy worker may remember between requests because they cannot change before a
//! known time: a verified token's claims until its `exp`, a replay entry's owner until the
//! entry expires. Shared data stays the truth every worker shares; this saves a worker the host
//! calls (each one a round trip into and out of the Wasm VM) and the decoding that re-reading a
//! fact it already knows would cost. Bounded: when full, expired facts go, then everything.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

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
