//! etcd's replies, as the replay exchange reads them: any sequence of gRPC statuses, messages and
//! protobuf bodies ends the exchange or asks for a next call, never panics.
#![no_main]
use gateguard_core::replay::etcd::{Exchange, RemoteCheck, Session, Step};
use gateguard_core::replay::{ReplayMode, TokenRef};
use gateguard_fuzz::NOW;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let mut digest = [0u8; 32];
    let n = rest.len().min(8);
    digest[..n].copy_from_slice(&rest[..n]);
    rest = &rest[n..];
    let check = RemoteCheck {
        token: TokenRef {
            digest,
            exp: NOW + u64::from(flags) * 7,
        },
        mode: if flags & 1 == 0 {
            ReplayMode::WithIp
        } else {
            ReplayMode::WithoutIp
        },
        ip: (flags & 2 == 0).then(|| {
            "10.1.2.3"
                .parse()
                .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into())
        }),
    };
    let credentials = (flags & 4 == 0).then(|| ("user".to_string(), "pw".to_string()));
    let mut session = Session::new(credentials);
    let mut now_ms = NOW * 1000;
    let (mut exchange, mut step) = Exchange::start(check, "gateguard/", 500, now_ms, &mut session);
    for _ in 0..12 {
        if !matches!(step, Step::Send(_)) {
            break;
        }
        // status u8, message length u8, body length u16, message, body.
        let [status, mlen, b0, b1, tail @ ..] = rest else {
            break;
        };
        let mlen = usize::from(*mlen).min(tail.len());
        let (message, tail) = tail.split_at(mlen);
        let blen = usize::from(u16::from_be_bytes([*b0, *b1])).min(tail.len());
        let (body, tail) = tail.split_at(blen);
        rest = tail;
        now_ms += 7;
        let message = String::from_utf8_lossy(message);
        step = exchange.on_response(
            u32::from(*status % 18),
            &message,
            body,
            now_ms,
            &mut session,
        );
    }
    if matches!(step, Step::Send(_)) {
        let _ = exchange.not_sent();
    }
});
