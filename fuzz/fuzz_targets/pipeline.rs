//! The whole pipeline with arbitrary requests (method, path, peer, headers, peer certificate),
//! twice each, so replay and counters see a second use.
#![no_main]
use gateguard_core::{CompiledPolicy, Decision};
use gateguard_fuzz::{parse_request, policy, FuzzHost, NOW};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static POLICY: CompiledPolicy = policy();
}

fuzz_target!(|data: &[u8]| {
    let parsed = parse_request(data);
    POLICY.with(|p| {
        let host = FuzzHost::new(p);
        for now in [NOW, NOW + 1] {
            match p.evaluate(&parsed.request(now), &host) {
                Decision::Reply { reply, .. } => assert!((200..600).contains(&reply.status)),
                Decision::Forward(_) | Decision::Ask(_) => {}
            }
        }
    });
});
