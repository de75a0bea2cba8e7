//! Policy reloads: the store keeps every entry whatever the new layout, while requests of the
//! old and the new policy keep running against it, from several threads.

use super::super::migrate::merge_into;
use super::*;
use std::sync::atomic::AtomicBool;

/// One Envoy VM's shared data. With `yielding`, every host call first yields the thread, so
/// concurrent requests and migrations interleave as finely as the scheduler allows.
struct Vm {
    store: MemoryStore,
    prefix: String,
    yielding: bool,
}

impl SharedStore for Vm {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        if self.yielding {
            thread::yield_now();
        }
        self.store.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        if self.yielding {
            thread::yield_now();
        }
        self.store.set(key, value, cas)
    }
}

impl Vm {
    fn new() -> Self {
        Self {
            store: MemoryStore::new(),
            prefix: store_prefix("gateguard."),
            yielding: false,
        }
    }

    fn yielding() -> Self {
        Self {
            yielding: true,
            ..Self::new()
        }
    }

    /// What `on_configure` does with a policy of this size.
    fn configure(&self, max_entries: u64) -> (ReplayCachePolicy, Prepared) {
        let p = policy(max_entries);
        let prepared = ensure_buckets(self, &self.prefix, p.buckets()).unwrap();
        (p, prepared)
    }

    fn outcome(
        &self,
        p: &ReplayCachePolicy,
        token: TokenRef,
        ip: Option<IpAddr>,
        mode: ReplayMode,
        now: u64,
    ) -> ReplayOutcome {
        check_and_record(self, p, &self.prefix, token, ip, mode, now)
    }

    fn check(
        &self,
        p: &ReplayCachePolicy,
        token: TokenRef,
        ip: Option<IpAddr>,
        mode: ReplayMode,
    ) -> Verdict {
        self.outcome(p, token, ip, mode, NOW).verdict
    }

    fn pointer(&self) -> Pointer {
        read_pointer(&self.store, &self.prefix).unwrap().unwrap().0
    }

    fn record(&self, layout: Layout, index: u32) -> Record {
        let (value, _) = self
            .store
            .get(&layout.bucket_key(&self.prefix, index))
            .unwrap()
            .unwrap();
        decode(&value).unwrap()
    }

    fn live(&self, now: u64) -> u64 {
        let layout = self.pointer().current;
        occupancy(&self.store, &self.prefix, layout, 0..layout.buckets, now).live
    }

    /// Every layout from the first to the current one, following seals: each must be sealed
    /// entirely toward the next, so no live bucket is left behind anywhere.
    fn chain(&self, first: Layout) -> Vec<Layout> {
        let current = self.pointer();
        assert_eq!(current.next, None, "a migration was left running");
        let mut chain = vec![first];
        let mut layout = first;
        while layout != current.current {
            let Record::Sealed(next) = self.record(layout, 0) else {
                panic!("{layout} is neither current nor sealed");
            };
            for index in 0..layout.buckets {
                assert_eq!(self.record(layout, index), Record::Sealed(next), "{layout}");
            }
            assert!(next.epoch > layout.epoch);
            chain.push(next);
            layout = next;
        }
        chain
    }
}

fn owner(n: usize) -> Option<IpAddr> {
    ip(&format!(
        "10.{}.{}.{}",
        n / 65_536 % 256,
        n / 256 % 256,
        n % 256
    ))
}

/// Spends `n` `without_ip` tokens and binds `n` `with_ip` tokens to owners `0..n`.
fn spend(vm: &Vm, p: &ReplayCachePolicy, tag: &str, n: usize) -> (Vec<TokenRef>, Vec<TokenRef>) {
    spend_from(vm, p, tag, 0..n)
}

/// [`spend`] with owners `range`: the tokens' positions once appended to earlier ones.
fn spend_from(
    vm: &Vm,
    p: &ReplayCachePolicy,
    tag: &str,
    range: std::ops::Range<usize>,
) -> (Vec<TokenRef>, Vec<TokenRef>) {
    let once: Vec<_> = range
        .clone()
        .map(|i| tok(&format!("{tag}-once-{i}"), NOW + 600))
        .collect();
    let bound: Vec<_> = range
        .clone()
        .map(|i| tok(&format!("{tag}-ip-{i}"), NOW + 600))
        .collect();
    for (i, (o, b)) in range.zip(once.iter().zip(&bound)) {
        assert_eq!(vm.check(p, *o, None, WithoutIp), FirstUse);
        assert_eq!(vm.check(p, *b, owner(i), WithIp), FirstUse);
    }
    (once, bound)
}

/// Every spent token is refused, every owner keeps its token and nobody else gets it.
fn assert_remembered(vm: &Vm, p: &ReplayCachePolicy, once: &[TokenRef], bound: &[TokenRef]) {
    for (i, (o, b)) in once.iter().zip(bound).enumerate() {
        assert_eq!(vm.check(p, *o, None, WithoutIp), Replay, "once {i}");
        assert_eq!(vm.check(p, *o, owner(i), WithIp), Replay, "once {i}");
        assert_eq!(vm.check(p, *b, owner(i), WithIp), SameOwner, "bound {i}");
        assert_eq!(
            vm.check(p, *b, ip("192.0.2.1"), WithIp),
            Replay,
            "bound {i}"
        );
        assert_eq!(vm.check(p, *b, None, WithoutIp), Replay, "bound {i}");
    }
}

// ---- (a) spent tokens stay spent across layout changes ----

#[test]
fn a_spent_token_stays_spent_when_the_layout_grows_shrinks_and_comes_back() {
    let vm = Vm::new();
    let (first, prepared) = vm.configure(1000);
    assert_eq!(prepared.layout, Layout::first(4));
    let (mut once, mut bound) = spend(&vm, &first, "start", 150);
    let mut policies = vec![first];
    // A → B → A, then smaller, much bigger, and back.
    for (round, (max, buckets)) in [
        (100_000, 512),
        (1000, 4),
        (500, 1),
        (1_000_000, 4096),
        (1000, 4),
    ]
    .into_iter()
    .enumerate()
    {
        let before = vm.pointer().current;
        let (p, prepared) = vm.configure(max);
        let after = vm.pointer();
        assert_eq!(after.current, prepared.layout);
        assert_eq!(
            after.current,
            Layout {
                epoch: before.epoch + 1,
                buckets
            },
            "round {round}: a new layout every time, never an old one reused"
        );
        assert_eq!(prepared.migrations.len(), 1);
        let m = prepared.migrations[0];
        assert_eq!(
            (m.from, m.to, m.sealed),
            (before, after.current, before.buckets)
        );
        assert_eq!(
            m.copied,
            2 * once.len() as u64,
            "round {round}: every entry moved"
        );
        assert_eq!(m.corrupt, 0);
        assert_eq!(vm.live(NOW), 2 * once.len() as u64);
        // The new policy, and every older one still serving requests, see every entry.
        policies.push(p);
        for q in &policies {
            assert_remembered(&vm, q, &once, &bound);
        }
        // New tokens work once, whichever policy records them and whichever checks them.
        let n = once.len();
        let (o, b) = spend_from(&vm, &p, &format!("round{round}"), n..n + 20);
        once.extend(o);
        bound.extend(b);
        assert_remembered(&vm, &policies[0], &once, &bound);
    }
    assert_eq!(vm.chain(Layout::first(4)).len(), 6);
}

#[test]
fn a_capacity_change_alone_or_any_other_reload_moves_nothing() {
    let vm = Vm::new();
    let (p, _) = vm.configure(1_000_000);
    let (once, bound) = spend(&vm, &p, "a", 50);
    let keys = vm.store.len();
    // Same bucket count (4096): adopted as it is, nothing copied or created.
    for max in [1_000_000, 1_048_575, 600_000] {
        let (q, prepared) = vm.configure(max);
        assert_eq!(prepared.layout, Layout::first(4096));
        assert_eq!((prepared.created, prepared.migrations.len()), (0, 0));
        assert_remembered(&vm, &q, &once, &bound);
    }
    assert_eq!(vm.store.len(), keys);
}

// ---- (b) old-policy writers racing a migration ----

#[test]
fn old_policy_writers_racing_a_migration_accept_each_token_at_most_once() {
    const WRITERS: usize = 6;
    const MAX_TOKENS: usize = 5000;
    const MIN_TOKENS: usize = 200;
    let vm = Vm::yielding();
    let (old, _) = vm.configure(100_000);
    // Entries to move, so the migrations take a while.
    let (spent, owned) = spend(&vm, &old, "before", 1500);
    // 4096, 1024, 8192 and 512 buckets: every policy's bound over every layout has room.
    let sizes = [1_000_000, 200_000, 2_000_000, 100_000];
    let policies: Vec<ReplayCachePolicy> = std::iter::once(old)
        .chain(sizes.iter().map(|&m| policy(m)))
        .collect();
    let firsts: Vec<AtomicU32> = (0..MAX_TOKENS).map(|_| AtomicU32::new(0)).collect();
    let owners: Vec<Mutex<Option<usize>>> = (0..MAX_TOKENS).map(|_| Mutex::new(None)).collect();
    let migrating = AtomicBool::new(true);
    let during = AtomicU32::new(0);
    let hops = AtomicU32::new(0);
    let used = AtomicU32::new(0);
    thread::scope(|s| {
        s.spawn(|| {
            for max in sizes {
                let (_, prepared) = vm.configure(max);
                assert_eq!(prepared.migrations.len(), 1);
            }
            migrating.store(false, Ordering::SeqCst);
        });
        for w in 0..WRITERS {
            let (vm, policies, firsts, owners) = (&vm, &policies, &firsts, &owners);
            let (migrating, during, hops, used) = (&migrating, &during, &hops, &used);
            let (spent, owned) = (&spent, &owned);
            s.spawn(move || {
                let me = ip(&format!("172.16.0.{w}"));
                let mut i = 0;
                while i < MAX_TOKENS && (i < MIN_TOKENS || migrating.load(Ordering::SeqCst)) {
                    let moving = migrating.load(Ordering::SeqCst);
                    // Old and new policies alike, as during an Envoy drain.
                    let p = &policies[(i + w) % policies.len()];
                    let once = tok(&format!("race-once-{i}"), NOW + 600);
                    let bound = tok(&format!("race-ip-{i}"), NOW + 600);
                    let a = vm.outcome(p, once, me, WithoutIp, NOW);
                    let b = vm.outcome(p, bound, me, WithIp, NOW);
                    match a.verdict {
                        FirstUse => {
                            firsts[i].fetch_add(1, Ordering::SeqCst);
                        }
                        Replay => {}
                        other => panic!("once {i}: {other:?}"),
                    }
                    match b.verdict {
                        FirstUse => {
                            let mut o = owners[i].lock().unwrap();
                            assert_eq!(*o, None, "bound {i}: two owners");
                            *o = Some(w);
                        }
                        Replay => {}
                        other => panic!("bound {i}: {other:?}"),
                    }
                    // The owner keeps its token, a loser never gets it, through any layout.
                    let again = vm.check(p, bound, me, WithIp);
                    let expected = if b.verdict == FirstUse {
                        SameOwner
                    } else {
                        Replay
                    };
                    assert_eq!(again, expected, "bound {i} writer {w}");
                    // What was spent before the reloads stays spent during them.
                    let j = (i * 7 + w) % spent.len();
                    assert_eq!(vm.check(p, spent[j], None, WithoutIp), Replay);
                    assert_eq!(vm.check(p, owned[j], me, WithIp), Replay);
                    assert_eq!(vm.check(p, owned[j], owner(j), WithIp), SameOwner);
                    hops.fetch_add(a.hops + b.hops, Ordering::SeqCst);
                    if moving {
                        during.fetch_add(1, Ordering::SeqCst);
                    }
                    i += 1;
                }
                used.fetch_max(i as u32, Ordering::SeqCst);
            });
        }
    });
    let used = used.load(Ordering::SeqCst) as usize;
    for (i, first) in firsts.iter().enumerate().take(used) {
        assert!(first.load(Ordering::SeqCst) <= 1, "once {i}");
    }
    // Every writer used tokens 0..MIN_TOKENS: each was accepted exactly once.
    for i in 0..MIN_TOKENS {
        assert_eq!(firsts[i].load(Ordering::SeqCst), 1, "once {i}");
        assert!(owners[i].lock().unwrap().is_some(), "bound {i}");
    }
    // Afterwards, in the final layout: owners as decided during the race.
    let last = policies.last().unwrap();
    for (i, winner) in owners.iter().enumerate().take(used) {
        let bound = tok(&format!("race-ip-{i}"), NOW + 600);
        if let Some(w) = *winner.lock().unwrap() {
            let me = ip(&format!("172.16.0.{w}"));
            assert_eq!(vm.check(last, bound, me, WithIp), SameOwner);
            assert_eq!(vm.check(last, bound, ip("192.0.2.9"), WithIp), Replay);
        }
    }
    assert_remembered(&vm, last, &spent, &owned);
    assert_eq!(vm.chain(Layout::first(512)).len(), 5);
    let (during, hops) = (during.load(Ordering::SeqCst), hops.load(Ordering::SeqCst));
    eprintln!("racing writers: {during} token pairs during migrations, {hops} seals followed");
    assert!(during > 0, "no request ran during a migration");
}

// ---- (c) configurations with different sizes at once (more than the step budget allows) ----

#[test]
fn eight_migrators_with_different_targets_at_once_leave_one_line_of_layouts() {
    for round in 0..6 {
        let vm = Vm::yielding();
        let (start, _) = vm.configure(100_000);
        let (once, bound) = spend(&vm, &start, "before", 200);
        let sizes: [u64; 8] = [
            1_000_000, 4000, 1_000_000, 20_000, 4000, 300_000, 20_000, 1_000_000,
        ];
        let barrier = Barrier::new(sizes.len() + 1);
        let results: Vec<Mutex<Option<Prepared>>> =
            sizes.iter().map(|_| Mutex::new(None)).collect();
        let firsts: Vec<AtomicU32> = (0..300).map(|_| AtomicU32::new(0)).collect();
        thread::scope(|s| {
            for (k, &max) in sizes.iter().enumerate() {
                let (vm, barrier, results) = (&vm, &barrier, &results);
                s.spawn(move || {
                    barrier.wait();
                    *results[k].lock().unwrap() = Some(vm.configure(max).1);
                });
            }
            let (vm, barrier, firsts) = (&vm, &barrier, &firsts);
            s.spawn(move || {
                barrier.wait();
                // Policies whose bound has room in every layout asked for.
                let writers = [policy(1_000_000), policy(100_000)];
                for (i, first) in firsts.iter().enumerate() {
                    let p = &writers[i % 2];
                    let t = tok(&format!("during-{i}"), NOW + 600);
                    for _ in 0..2 {
                        match vm.check(p, t, None, WithoutIp) {
                            FirstUse => {
                                first.fetch_add(1, Ordering::SeqCst);
                            }
                            Replay => {}
                            other => panic!("{other:?}"),
                        }
                    }
                }
            });
        });
        // One line of layouts, each wholly sealed toward the next, ending in the current one;
        // its size is one of those asked for, and no entry was lost on the way.
        let chain = vm.chain(Layout::first(512));
        let current = vm.pointer().current;
        assert!(
            sizes
                .iter()
                .any(|&m| policy(m).buckets() == current.buckets),
            "round {round}: {current}"
        );
        assert!(chain.len() >= 2, "round {round}: {chain:?}");
        for r in &results {
            assert!(r.lock().unwrap().is_some());
        }
        for &max in &sizes {
            assert_remembered(&vm, &policy(max), &once, &bound);
        }
        for (i, first) in firsts.iter().enumerate() {
            assert_eq!(first.load(Ordering::SeqCst), 1, "round {round} token {i}");
        }
        assert_eq!(vm.live(NOW), 2 * 200 + 300);
    }
}

// ---- (d) many reloads ----

#[test]
fn many_reloads_keep_requests_working_and_hop_chains_bounded() {
    let vm = Vm::new();
    let (p, _) = vm.configure(1000);
    let (mut once, mut bound) = spend(&vm, &p, "start", 20);
    let sizes = [100_000, 3000, 1_000_000, 500, 20_000];
    let mut pointers = vec![vm.pointer().encode()];
    for reload in 0..60 {
        let (p, prepared) = vm.configure(sizes[reload % sizes.len()]);
        assert_eq!(prepared.layout.epoch, reload as u32 + 2);
        // A request after the reload reads the pointer: no seal on its way.
        let t = tok(&format!("after-{reload}"), NOW + 600);
        let out = vm.outcome(&p, t, None, WithoutIp, NOW);
        assert_eq!((out.verdict, out.hops), (FirstUse, 0));
        assert_eq!(vm.check(&policy(1000), t, None, WithoutIp), Replay);
        once.push(t);
        bound.push(tok(&format!("after-ip-{reload}"), NOW + 600));
        assert_eq!(
            vm.check(&p, *bound.last().unwrap(), owner(bound.len() - 1), WithIp),
            FirstUse
        );
        pointers.push(vm.pointer().encode());
    }
    assert_remembered(&vm, &policy(1000), &once, &bound);
    assert_eq!(vm.chain(Layout::first(4)).len(), 61);

    /// A request that read the pointer `pointers[k]` and only then reached its bucket: it
    /// follows one seal per layout since.
    struct StalePointer<'a> {
        vm: &'a Vm,
        pointer: Vec<u8>,
    }
    impl SharedStore for StalePointer<'_> {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            if key == pointer_key(&self.vm.prefix) {
                return Ok(Some((self.pointer.clone(), 1)));
            }
            self.vm.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
            self.vm.set(key, value, cas)
        }
    }
    let last = pointers.len() - 1;
    for behind in 0..=last {
        let stale = StalePointer {
            vm: &vm,
            pointer: pointers[last - behind].clone(),
        };
        let p = policy(1000);
        let spent = check_and_record(&stale, &p, &vm.prefix, once[0], None, WithoutIp, NOW);
        let fresh = tok(&format!("stale-{behind}"), NOW + 600);
        let new = check_and_record(&stale, &p, &vm.prefix, fresh, None, WithoutIp, NOW);
        if behind as u32 <= MAX_HOPS {
            assert_eq!((spent.verdict, spent.hops), (Replay, behind as u32));
            assert_eq!((new.verdict, new.hops), (FirstUse, behind as u32));
            assert_eq!(vm.check(&p, fresh, None, WithoutIp), Replay);
        } else {
            // Past the bound: refused (fail closed), never accepted.
            assert_eq!((spent.verdict, spent.hops), (Contention, MAX_HOPS));
            assert_eq!(new.verdict, Contention);
            assert_eq!(vm.check(&p, fresh, None, WithoutIp), FirstUse);
        }
    }
}

// ---- (e) full buckets stay fail closed ----

#[test]
fn a_full_store_stays_fail_closed_after_migration_and_nothing_is_dropped() {
    let vm = Vm::new();
    let (p, _) = vm.configure(1024);
    assert_eq!((p.buckets(), p.capacity()), (4, 315));
    // Fill every bucket to its capacity.
    let total = p.max_stored_entries();
    let mut spent = Vec::new();
    let mut n = 0;
    while (spent.len() as u64) < total {
        let t = tok(&format!("fill-{n}"), NOW + 100);
        n += 1;
        match vm.check(&p, t, None, WithoutIp) {
            FirstUse => spent.push(t),
            StoreFull => {}
            other => panic!("{other:?}"),
        }
    }
    let fresh = |tag: &str| {
        (0..20)
            .map(|i| tok(&format!("{tag}-{i}"), NOW + 600))
            .collect::<Vec<_>>()
    };
    for t in fresh("full") {
        assert_eq!(vm.check(&p, t, None, WithoutIp), StoreFull);
    }
    // Smaller layouts than the entries need: every entry kept above capacity, new tokens refused.
    for (max, buckets) in [(700, 2), (1, 1), (600, 2)] {
        let (q, prepared) = vm.configure(max);
        assert_eq!(prepared.layout.buckets, buckets);
        assert!(u64::from(q.capacity()) < total / u64::from(buckets));
        assert!(u64::from(p.capacity_in(buckets)) < total / u64::from(buckets));
        assert_eq!(vm.live(NOW), total, "max {max}: nothing dropped");
        for t in &spent {
            assert_eq!(vm.check(&q, *t, None, WithoutIp), Replay);
            assert_eq!(vm.check(&p, *t, None, WithoutIp), Replay);
        }
        for t in fresh(&format!("after-{max}")) {
            assert_eq!(vm.check(&q, t, None, WithoutIp), StoreFull);
            // The old policy, with its own bound over the new layout, refuses too.
            assert_eq!(vm.check(&p, t, None, WithoutIp), StoreFull);
        }
    }
    // Room again: a bigger store...
    let (big, _) = vm.configure(100_000);
    for t in &spent {
        assert_eq!(vm.check(&big, *t, None, WithoutIp), Replay);
    }
    for t in fresh("bigger") {
        assert_eq!(vm.check(&big, t, None, WithoutIp), FirstUse);
    }
    // ...or the entries expiring (each of 2 buckets holds half of them, live until NOW + 101).
    let (small, _) = vm.configure(600);
    let late = tok("late", NOW + 600);
    let out = vm.outcome(&small, late, None, WithoutIp, NOW + 100);
    assert_eq!(out.verdict, StoreFull);
    let out = vm.outcome(&small, late, None, WithoutIp, NOW + 101);
    assert_eq!(
        (out.verdict, u64::from(out.reclaimed)),
        (FirstUse, total / 2)
    );
}

// ---- failures and odd states ----

/// Fails the `n`th write with a host error (not a CAS mismatch), once.
struct FailNthWrite<'a> {
    vm: &'a Vm,
    writes: AtomicU32,
    fail_at: u32,
}

impl SharedStore for FailNthWrite<'_> {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        self.vm.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        if self.writes.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_at {
            return Err(SetError::Other(StoreError { status: 2 }));
        }
        self.vm.set(key, value, cas)
    }
}

#[test]
fn a_migration_interrupted_anywhere_stays_exact_and_the_next_configuration_finishes_it() {
    // 4 → 16 buckets: 1 pointer step + 16 creations + 16 merges + 4 seals + 1 pointer step.
    for fail_at in 1..=40 {
        let vm = Vm::new();
        let (old, _) = vm.configure(1000);
        let (once, bound) = spend(&vm, &old, "before", 60);
        let failing = FailNthWrite {
            vm: &vm,
            writes: AtomicU32::new(0),
            fail_at,
        };
        let new = policy(4000);
        let result = ensure_buckets(&failing, &vm.prefix, new.buckets());
        if failing.writes.load(Ordering::SeqCst) >= fail_at {
            assert_eq!(
                result,
                Err(PrepareError::Store(StoreError { status: 2 })),
                "write {fail_at}"
            );
        }
        // Whatever was left: both policies still know every token, new ones work once.
        for p in [&old, &new] {
            assert_remembered(&vm, p, &once, &bound);
            let t = tok(&format!("between-{fail_at}-{}", p.buckets()), NOW + 600);
            assert_eq!(vm.check(p, t, None, WithoutIp), FirstUse);
            assert_eq!(vm.check(&old, t, None, WithoutIp), Replay);
            assert_eq!(vm.check(&new, t, None, WithoutIp), Replay);
        }
        // The next configuration (of either policy) finishes the migration, then moves on.
        let (_, prepared) = vm.configure(100_000);
        assert_eq!(prepared.layout.buckets, 512);
        vm.chain(Layout::first(4));
        assert_remembered(&vm, &new, &once, &bound);
        assert_eq!(vm.live(NOW), 2 * 60 + 2);
    }
}

#[test]
fn a_corrupt_bucket_is_sealed_and_counted_and_the_rest_moves() {
    let vm = Vm::new();
    let (old, _) = vm.configure(1000);
    let (once, bound) = spend(&vm, &old, "a", 100);
    let layout = vm.pointer().current;
    vm.store
        .set(&layout.bucket_key(&vm.prefix, 2), b"garbage", 0)
        .unwrap();
    let lost = |t: &TokenRef| bucket_index(&t.digest, 4) == 2;
    let (new, prepared) = vm.configure(100_000);
    assert_eq!(prepared.migrations[0].corrupt, 1);
    assert_eq!(vm.record(layout, 2), Record::Sealed(prepared.layout));
    let kept: Vec<usize> = (0..once.len()).filter(|&i| !lost(&once[i])).collect();
    for &i in &kept {
        assert_eq!(vm.check(&new, once[i], None, WithoutIp), Replay);
    }
    for (i, b) in bound.iter().enumerate() {
        if !lost(b) {
            assert_eq!(vm.check(&new, *b, owner(i), WithIp), SameOwner);
        }
    }
    // What the corrupt bucket held is gone (requests on it were refused until then).
    let forgotten = once.iter().chain(&bound).filter(|t| lost(t)).count() as u64;
    assert!(forgotten > 0);
    assert_eq!(vm.live(NOW), 200 - forgotten);
    let gone = once.iter().find(|t| lost(t)).unwrap();
    assert_eq!(vm.check(&new, *gone, None, WithoutIp), FirstUse);
}

#[test]
fn a_bucket_sealed_toward_another_layout_refuses_the_migration() {
    // Only a foreign writer can do this: the pointer names one `next` at a time.
    let vm = Vm::new();
    vm.configure(1000);
    let layout = vm.pointer().current;
    let elsewhere = layout.successor(64).unwrap();
    vm.store
        .set(
            &layout.bucket_key(&vm.prefix, 1),
            &encode_sealed(elsewhere),
            0,
        )
        .unwrap();
    assert_eq!(
        ensure_buckets(&vm, &vm.prefix, 512),
        Err(PrepareError::Corrupt { layout, bucket: 1 })
    );
    assert_eq!(
        ensure_buckets(&vm, &vm.prefix, 3),
        Err(PrepareError::BadLayout { buckets: 3 })
    );
}

#[test]
fn a_token_recorded_again_after_its_entry_expired_keeps_its_later_record() {
    // Recorded with a short expiry; after that expired, recorded again under a policy with
    // more clock skew. The migration must carry the later record.
    let vm = Vm::new();
    let (p, _) = vm.configure(1000);
    let raw = sha("skewed");
    let short = TokenRef::new(&raw, NOW, 0);
    let long = TokenRef::new(&raw, NOW, 300);
    assert_eq!(
        vm.outcome(&p, short, None, WithoutIp, NOW - 10).verdict,
        FirstUse
    );
    assert_eq!(
        vm.outcome(&p, long, None, WithoutIp, NOW + 5).verdict,
        FirstUse
    );
    let (new, _) = vm.configure(100_000);
    assert_eq!(
        vm.outcome(&new, long, None, WithoutIp, NOW + 200).verdict,
        Replay
    );
}

#[test]
fn merging_keeps_the_later_record_of_a_token_and_is_idempotent() {
    let vm = Vm::new();
    vm.configure(1000);
    let layout = vm.pointer().current;
    let digest = stored(&tok("x", NOW));
    let index = bucket_index(&digest, layout.buckets);
    let entry = |expiry, who: usize| Entry {
        digest,
        expiry,
        owner: owner(who).map(normalise_ip),
        confirmed: false,
    };
    let (first, again) = (entry(NOW + 1, 1), entry(NOW + 301, 2));
    let merge = |incoming: &[Entry]| merge_into(&vm, &vm.prefix, layout, index, incoming).unwrap();
    assert_eq!(merge(&[first]), Some(1));
    // A second copy of the same record changes nothing.
    assert_eq!(merge(&[first]), Some(0));
    // The token recorded again (only possible once `first` expired): the later record wins...
    assert_eq!(merge(&[again]), Some(1));
    // ...and a stale copy of the earlier one does not undo it, nor change the owner.
    assert_eq!(merge(&[first, first]), Some(0));
    let Record::Live(entries) = vm.record(layout, index) else {
        panic!("sealed")
    };
    let mine: Vec<_> = entries.iter().filter(|e| e.digest == digest).collect();
    assert_eq!(mine, vec![&again]);
    // A sealed target is reported, never written.
    let sealed = encode_sealed(layout.successor(8).unwrap());
    vm.store
        .set(&layout.bucket_key(&vm.prefix, index), &sealed, 0)
        .unwrap();
    assert_eq!(merge(&[entry(NOW + 900, 3)]), None);
    assert_eq!(
        vm.record(layout, index),
        Record::Sealed(layout.successor(8).unwrap())
    );
}

fn stored(t: &TokenRef) -> [u8; 16] {
    t.digest[..16].try_into().unwrap()
}

#[test]
fn occupancy_and_sweep_see_a_moved_layout_as_sealed() {
    let vm = Vm::new();
    let (p, _) = vm.configure(1000);
    spend(&vm, &p, "a", 10);
    let old = vm.pointer().current;
    vm.configure(100_000);
    let occ = sweep(&vm.store, &vm.prefix, old, 0..old.buckets, NOW + 1000);
    assert_eq!((occ.sealed, occ.live, occ.reclaimed), (4, 0, 0));
    let new = vm.pointer().current;
    let occ = sweep(&vm.store, &vm.prefix, new, 0..new.buckets, NOW + 1000);
    assert_eq!((occ.sealed, occ.live, occ.reclaimed), (0, 0, 20));
}

#[test]
fn policies_of_different_sizes_configured_together_share_one_exact_store() {
    // Envoy configures every policy of the VM on the main thread, then on each worker.
    let vm = Vm::new();
    let sizes = [1_000_000, 3, 1_000_000];
    let (first, _) = vm.configure(sizes[0]);
    let (once, bound) = spend(&vm, &first, "a", 30);
    thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                for max in sizes {
                    vm.configure(max);
                }
            });
        }
    });
    vm.chain(Layout::first(4096));
    for max in sizes {
        assert_remembered(&vm, &policy(max), &once, &bound);
    }
}

// ---- measurements: cargo test --release -p gateguard-core replay::tests::migration::measure -- --ignored --nocapture ----

#[test]
#[ignore]
fn measure_migration_of_a_full_million_entry_store() {
    use std::time::Instant;

    let vm = Vm::new();
    let (p, _) = vm.configure(1_000_000);
    let layout = vm.pointer().current;
    // Every bucket at capacity (328 × 4096 = 1,343,488 live entries), written directly.
    let started = Instant::now();
    for index in 0..layout.buckets {
        let entries: Vec<Entry> = (0..p.capacity())
            .map(|k| {
                let mut digest: [u8; 16] = sha(&format!("{index}/{k}"))[..16].try_into().unwrap();
                let n = index + layout.buckets * k;
                digest[12..16].copy_from_slice(&n.to_be_bytes());
                Entry {
                    digest,
                    expiry: NOW + 3600,
                    owner: (k % 2 == 0).then(|| normalise_ip("192.0.2.1".parse().unwrap())),
                    confirmed: k % 3 == 0,
                }
            })
            .collect();
        vm.store
            .set(&layout.bucket_key(&vm.prefix, index), &encode(&entries), 0)
            .unwrap();
    }
    let live = vm.live(NOW);
    eprintln!(
        "full store: {live} live entries in {} buckets, {:.1} MB of keys and values (built in {:?})",
        layout.buckets,
        vm.store.bytes() as f64 / 1e6,
        started.elapsed()
    );
    for max in [50_000_000, 100_000, 1_000_000, 2_000_000, 1] {
        let started = Instant::now();
        let (_, prepared) = vm.configure(max);
        let took = started.elapsed();
        let m = prepared.migrations[0];
        assert_eq!(vm.live(NOW), live);
        eprintln!(
            "migration {} -> {}: {} entries copied, {} buckets sealed, in {took:?}",
            m.from, m.to, m.copied, m.sealed
        );
    }
    eprintln!(
        "after 5 migrations: {} keys, {:.1} MB of keys and values",
        vm.store.len(),
        vm.store.bytes() as f64 / 1e6
    );
}
