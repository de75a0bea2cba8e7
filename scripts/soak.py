"""`make soak`: gateguard under sustained load in a real Envoy, watching memory and every answer.

One Envoy (`--concurrency 2`) runs the configuration `gateguard render` writes for a policy of
three APIs, in front of a small upstream on loopback, with a local identity provider
(tests/idp.py) serving the EdDSA key set the filter fetches (discovery document, then JWKS):
  once     replay `without_ip`: every request a never-used token, each used once, plus a fraction
           of deliberate replays of a spent token, which must get 401 `Token replay detected`
  dpop     `dpop: "required"`: tokens bound to a client key (`cnf.jkt`), a fresh proof per
           request, plus a fraction of replayed proofs, which must get 401 `Invalid DPoP proof`
  limited  `rate_limit` by client IP (loopback sources 127.0.1.1-127.0.1.64): calls over the
           limit must get 429 `Rate limit is exceeded. Try again in N seconds.`
Client threads drive load for SOAK_SECONDS (default 600), each loop bounded by the deadline.
Every few seconds the script samples Envoy's RSS (/proc/<pid>/status VmRSS) and gateguard's
stats. At the end it checks: no errors, every refusal the expected one (status and message),
the filter's counters agree with what the clients saw, each caller got at most its allowance, and
memory plateaus (see PLATEAU_PERCENT and the policy bound below). It prints a summary and writes
docs/SOAK.md. Not part of `make test`.
"""

import http.client
import json
import os
import re
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import dpopkit  # noqa: E402
import jwtkit  # noqa: E402
from envoy_harness import ENVOY, WASM, Envoy, compose, free_port, gateway  # noqa: E402
from idp import IdentityProvider  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECONDS = int(os.environ.get("SOAK_SECONDS", "600"))
SAMPLE_SECONDS = float(os.environ.get("SOAK_SAMPLE_SECONDS", "3"))
# Client threads per API (the Python clients share one interpreter: more threads add no load).
THREADS = {"once": 3, "dpop": 2, "limited": 2}
REPLAY_FRACTION = 0.05  # of `once` requests: a spent token sent again
PROOF_REPLAY_FRACTION = 0.02  # of `dpop` requests: a spent proof sent again
AUD = "api://soak"
TOKEN_TTL = 20  # seconds; a spent token is remembered until exp + 600 s (docs/policy.md#replay)
SKEW = 10  # jwt.clock_skew_seconds
BOUND_TOKEN_SECONDS = 60  # each DPoP client gets a new bound token this often
LIMIT_CALLS, LIMIT_PERIOD = 20, 2
LIMIT_SOURCES = [f"127.0.1.{i}" for i in range(1, 65)]
LIMIT_BURST = 50  # requests per source before moving on: over the limit on purpose
# Every `once` request and every DPoP proof is one replay entry, kept ~620 s (tokens) or ~900 s
# (proofs): the default size leaves room for ~1,000 such requests a second.
REPLAY_MAX_ENTRIES = 1_000_000
COUNTER_MAX_ENTRIES = 1_000
# The last third of the run may grow RSS by at most this much (see docs/SOAK.md, "Verdict").
PLATEAU_PERCENT = 5.0
# Memory the policy lets gateguard's stores take at most (docs/operations.md#replay-store-sizing,
# docs/policy.md#rate-limits-and-quotas, #verified-token-cache): the replay store's hard bound at
# 1,000,000 entries (55 MB), the counters' `buckets x (1 + 32 x 36)` bytes (128 buckets), the
# token cache's 2,048 slots of at most 8 KiB. Growth after warm-up beyond it (plus Envoy's own
# allocator slack, ALLOCATOR_SLACK_MB) is a leak.
POLICY_BOUND_MB = 55 + 128 * (1 + 32 * 36) / 1e6 + 2048 * 8192 / 1e6
ALLOCATOR_SLACK_MB = 16.0
WARMUP_SECONDS = min(30.0, SECONDS / 6)

REPLAY_BODY = {"statusCode": 401, "message": "Token replay detected"}
DPOP_BODY = {"statusCode": 401, "message": "Invalid DPoP proof"}
RATE_LIMITED = re.compile(r"Rate limit is exceeded\. Try again in [0-9]+ seconds\.")


class Upstream(BaseHTTPRequestHandler):
    """A function app that answers 200 and remembers nothing (the tests' echo server records
    every request, which would grow this process for the whole soak)."""
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def policy(idp):
    def jwt(**extra):
        return {"issuers": [idp.issuer], "audiences": [AUD], "algorithms": ["EdDSA"],
                "clock_skew_seconds": SKEW,
                "jwks": {"cluster": "idp",
                         "uri": f"http://127.0.0.1:{idp.port}/dev-tenant/v2.0/.well-known/openid-configuration"},
                **extra}
    return {
        "replay_cache": {"max_entries": REPLAY_MAX_ENTRIES},
        "limit_counters": {"max_entries": COUNTER_MAX_ENTRIES},
        "apis": [
            {"name": "once", "path_prefix": "/once", "jwt": jwt(), "replay": {"mode": "without_ip"}},
            {"name": "dpop", "path_prefix": "/dpop", "jwt": jwt(dpop="required")},
            {"name": "limited", "path_prefix": "/limited",
             "rate_limit": {"by": "client_ip", "calls": LIMIT_CALLS, "renewal_period_seconds": LIMIT_PERIOD}},
        ]}


class Tally:
    """What the clients saw: counts per (api, status, message), and every unexpected answer."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.unexpected = []
        self.errors = 0
        self.allowed_by_source = {}
        self.burst_violations = []  # (source, 200s, seconds) over what the windows allow

    def add(self, api, status, message, expected):
        with self.lock:
            key = (api, status, message)
            self.counts[key] = self.counts.get(key, 0) + 1
            if not expected:
                self.errors += 1
                if len(self.unexpected) < 20:
                    self.unexpected.append(key)

    def total(self, api=None, status=None):
        return sum(n for (a, s, _), n in self.counts.items()
                   if (api is None or a == api) and (status is None or s == status))


def body_is(body, expected):
    try:
        return json.loads(body) == expected
    except ValueError:
        return False


def message_of(body):
    try:
        return json.loads(body).get("message", body[:80])
    except (ValueError, AttributeError):
        return body[:80]


class Client:
    """One keep-alive connection from `source`, reopened after a failure (which is counted)."""

    def __init__(self, port, source="127.0.0.1"):
        self.port, self.source, self.conn = port, source, None

    def get(self, path, headers):
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10,
                                                   source_address=(self.source, 0))
        try:
            self.conn.request("GET", path, headers=headers)
            r = self.conn.getresponse()
            return r.status, r.read().decode(errors="replace"), r
        except (OSError, http.client.HTTPException) as e:
            self.close()
            return None, f"{type(e).__name__}: {e}", None

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def once_worker(port, idp, key, deadline, tally, n):
    client, spent, i = Client(port), None, 0
    while time.monotonic() < deadline:
        i += 1
        if spent is not None and i % int(1 / REPLAY_FRACTION) == 0:
            status, body, _ = client.get("/once/forms", {"Authorization": f"Bearer {spent}"})
            tally.add("once(replay)", status, message_of(body), status == 401 and body_is(body, REPLAY_BODY))
            continue
        token = jwtkit.token(key, jwtkit.claims(idp.issuer, AUD, ttl=TOKEN_TTL, jti=f"once-{n}-{i}-{time.time_ns()}"))
        status, body, _ = client.get("/once/forms", {"Authorization": f"Bearer {token}"})
        tally.add("once", status, message_of(body) if status != 200 else "", status == 200)
        if status == 200:
            spent = token
    client.close()


def dpop_worker(port, idp, key, deadline, tally, n):
    client, i = Client(port), 0
    proof_key = jwtkit.Key("ed", f"client-{n}")
    jkt = dpopkit.thumbprint(proof_key)
    htu = f"http://127.0.0.1:{port}/dpop/orders"
    token, issued, last_proof = None, 0.0, None
    while time.monotonic() < deadline:
        i += 1
        if time.monotonic() - issued > BOUND_TOKEN_SECONDS:
            token = jwtkit.token(key, jwtkit.claims(idp.issuer, AUD, ttl=BOUND_TOKEN_SECONDS * 3,
                                                     sub=f"dpop-client-{n}", cnf={"jkt": jkt}))
            issued, last_proof = time.monotonic(), None
        if last_proof is not None and i % int(1 / PROOF_REPLAY_FRACTION) == 0:
            status, body, _ = client.get("/dpop/orders", {"Authorization": f"DPoP {token}", "DPoP": last_proof})
            tally.add("dpop(replayed proof)", status, message_of(body), status == 401 and body_is(body, DPOP_BODY))
            continue
        proof = dpopkit.proof(proof_key, "GET", htu, token)
        status, body, _ = client.get("/dpop/orders", {"Authorization": f"DPoP {token}", "DPoP": proof})
        tally.add("dpop", status, message_of(body) if status != 200 else "", status == 200)
        if status == 200:
            last_proof = proof
    client.close()


def limited_worker(port, deadline, tally, sources):
    while time.monotonic() < deadline:
        for source in sources:
            client, allowed, began = Client(port, source), 0, time.monotonic()
            for _ in range(LIMIT_BURST):
                if time.monotonic() >= deadline:
                    break
                status, body, r = client.get("/limited/items", {})
                if status == 200:
                    tally.add("limited", 200, "", True)
                    allowed += 1
                    with tally.lock:
                        tally.allowed_by_source[source] = tally.allowed_by_source.get(source, 0) + 1
                elif status == 429:
                    message = message_of(body)
                    retry = r.getheader("retry-after") if r else None
                    ok = bool(RATE_LIMITED.fullmatch(message)) and retry is not None and retry.isdigit()
                    tally.add("limited", 429, "Rate limit is exceeded. Try again in N seconds." if ok else message, ok)
                else:
                    tally.add("limited", status, message_of(body), False)
            client.close()
            # Windows never overlap and each lasts the period: a burst of d seconds meets at most
            # floor(d / period) + 2 of them (the one open when it began, included).
            seconds = time.monotonic() - began
            if allowed > LIMIT_CALLS * (int(seconds // LIMIT_PERIOD) + 2):
                with tally.lock:
                    tally.burst_violations.append((source, allowed, round(seconds, 2)))
            if time.monotonic() >= deadline:
                break


STAT_NAMES = ("once.allowed", "once.replay_denied", "once.replay_store_full", "once.replay_unavailable",
              "once.jwt_cache_miss", "dpop.allowed", "dpop.jwt_denied", "dpop.dpop_denied",
              "limited.allowed", "limited.rate_limited", "limited.limit_unavailable",
              "replay_store_live_entries")


def gateguard_stats(envoy):
    stats = envoy.stats()
    out = {}
    for name, value in stats.items():
        if name.startswith("wasmcustom.gateguard.") and value.strip().lstrip("-").isdigit():
            out[name[len("wasmcustom.gateguard."):]] = int(value)
    return out


def wait_for_jwks(port, idp, key, timeout=30):
    """Bounded: ten 200s in a row from the `once` API, each a fresh token on a new connection."""
    deadline, streak = time.monotonic() + timeout, 0
    while streak < 10 and time.monotonic() < deadline:
        token = jwtkit.token(key, jwtkit.claims(idp.issuer, AUD, ttl=TOKEN_TTL, jti=f"warm-{time.time_ns()}"))
        status, _, _ = Client(port).get("/once/x", {"Authorization": f"Bearer {token}"})
        streak = streak + 1 if status == 200 else 0
        time.sleep(0.05)
    if streak < 10:
        raise SystemExit("soak: the identity provider's key set did not load within 30 s")
    time.sleep(1.2)


def main():
    if SECONDS < 30:
        raise SystemExit(f"SOAK_SECONDS: must be at least 30 (got {SECONDS}): the verdict compares thirds of the run")
    for path, what in ((WASM, "make build"), (ROOT / "target" / "release" / "gateguard", "make cli")):
        if not path.exists():
            raise SystemExit(f"soak: {path} is missing: run `{what}` (or `make soak`)")
    key = jwtkit.Key("ed", "soak-1")
    idp = IdentityProvider(jwtkit.jwks(key)).start()
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port, admin = free_port(), free_port()
    config = compose([gateway("soak", port, policy(idp), upstream.server_address[1])], admin)
    envoy = Envoy(config, concurrency=2, name="soak").start()
    tally, samples = Tally(), []
    try:
        wait_for_jwks(port, idp, key)
        start = time.monotonic()
        deadline = start + SECONDS
        threads = []
        for n in range(THREADS["once"]):
            threads.append(threading.Thread(target=once_worker, args=(port, idp, key, deadline, tally, n)))
        for n in range(THREADS["dpop"]):
            threads.append(threading.Thread(target=dpop_worker, args=(port, idp, key, deadline, tally, n)))
        share = len(LIMIT_SOURCES) // THREADS["limited"]
        for n in range(THREADS["limited"]):
            threads.append(threading.Thread(target=limited_worker,
                                            args=(port, deadline, tally, LIMIT_SOURCES[n * share:(n + 1) * share])))
        for t in threads:
            t.start()
        while time.monotonic() < deadline:
            now = time.monotonic() - start
            stats = gateguard_stats(envoy)
            with tally.lock:
                requests = sum(tally.counts.values())
            samples.append((now, envoy.rss_kib(), requests, stats))
            if len(samples) % 10 == 1:
                print(f"[{now:6.0f}s] RSS {samples[-1][1] / 1024:.1f} MiB, {requests:,} requests, "
                      f"live replay entries {stats.get('replay_store_live_entries', 0):,}, errors {tally.errors}",
                      flush=True)
            time.sleep(max(0.0, min(SAMPLE_SECONDS, deadline - time.monotonic())))
        for t in threads:
            t.join(30)
        elapsed = time.monotonic() - start
        final = gateguard_stats(envoy)
        samples.append((elapsed, envoy.rss_kib(), sum(tally.counts.values()), final))
        problems = envoy.problems()
    finally:
        envoy.stop()
        idp.stop()
        upstream.shutdown()
    report(tally, samples, final, elapsed, problems)


def report(tally, samples, final, elapsed, problems):
    checks = []

    def check(name, ok, detail):
        checks.append((name, ok, detail))

    total = sum(tally.counts.values())
    check("no errors or unexpected answers", tally.errors == 0,
          f"{tally.errors} (first: {tally.unexpected[:5]})" if tally.errors else "0")
    check("no critical log line, panic or Wasm trap", not problems, f"{len(problems)}: {problems[:3]}" if problems else "none")
    # The filter's own counters against what the clients saw.
    pairs = [("once.allowed", tally.total("once", 200)),
             ("once.replay_denied", tally.total("once(replay)", 401)),
             ("dpop.allowed", tally.total("dpop", 200)),
             ("limited.allowed", tally.total("limited", 200)),
             ("limited.rate_limited", tally.total("limited", 429))]
    # Warm-up requests to /once count in the filter, not in the tally.
    warm = final.get("once.allowed", 0) - tally.total("once", 200)
    mismatched = [(n, final.get(n, 0), seen) for n, seen in pairs
                  if final.get(n, 0) != seen and not (n == "once.allowed" and 0 <= warm <= 200)]
    check("gateguard's counters match the clients' counts", not mismatched,
          ", ".join(f"{n} {final.get(n, 0):,}" for n, _ in pairs) if not mismatched else f"mismatched {mismatched}")
    fails = {n: final.get(n, 0) for n in ("once.replay_store_full", "once.replay_unavailable",
                                          "limited.limit_unavailable") if final.get(n, 0)}
    check("no store full or unavailable", not fails, str(fails) if fails else "0")
    windows = int(elapsed // LIMIT_PERIOD) + 1
    over = {s: n for s, n in tally.allowed_by_source.items() if n > LIMIT_CALLS * windows}
    check("no caller got more than its allowance",
          not over and not tally.burst_violations and tally.total("limited", 429) > 0,
          f"max {max(tally.allowed_by_source.values(), default=0)} 200s per source IP, allowance "
          f"{LIMIT_CALLS} x {windows} windows, no burst over its windows' allowance; "
          f"{tally.total('limited', 429):,} refused with 429" if not over and not tally.burst_violations
          else f"{over} {tally.burst_violations[:5]}")
    check("deliberate replays all refused", tally.total("once(replay)") > 0 and tally.total("dpop(replayed proof)") > 0,
          f"{tally.total('once(replay)'):,} token replays, {tally.total('dpop(replayed proof)'):,} proof replays")

    # Memory.
    rss = [(t, kib / 1024) for t, kib, _, _ in samples]
    after_warmup = [m for t, m in rss if t >= WARMUP_SECONDS] or [rss[-1][1]]
    third = [m for t, m in rss if t >= elapsed * 2 / 3] or [rss[-1][1]]
    base_third = third[0]
    growth_last_third = (max(third) - base_third) / base_third * 100
    growth_after_warmup = max(after_warmup) - after_warmup[0]
    check(f"RSS plateaus: the last third grows < {PLATEAU_PERCENT:.0f}%", growth_last_third < PLATEAU_PERCENT,
          f"{growth_last_third:+.2f}% ({base_third:.1f} -> max {max(third):.1f} MiB)")
    limit = POLICY_BOUND_MB + ALLOCATOR_SLACK_MB
    check("RSS growth after warm-up within the policy bound", growth_after_warmup <= limit,
          f"{growth_after_warmup:+.1f} MiB (bound {POLICY_BOUND_MB:.1f} MB stores + {ALLOCATOR_SLACK_MB:.0f} MB slack)")
    verdict = "PASS" if all(ok for _, ok, _ in checks) else "FAIL"

    minutes = {}
    for t, m in rss:
        minutes.setdefault(int(t // 60), []).append(m)
    curve = ["| minute | samples | RSS min | RSS median | RSS max |", "|---|---|---|---|---|"]
    for minute, values in sorted(minutes.items()):
        curve.append(f"| {minute} | {len(values)} | {min(values):.1f} MiB | {statistics.median(values):.1f} MiB | "
                     f"{max(values):.1f} MiB |")
    answers = ["| client | status | message | count | rate |", "|---|---|---|---|---|"]
    for (api, status, message), n in sorted(tally.counts.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        answers.append(f"| {api} | {status} | {message or '-'} | {n:,} | {n / elapsed:,.1f}/s |")
    live = [s.get("replay_store_live_entries", 0) for _, _, _, s in samples]
    table = ["| check | result | detail |", "|---|---|---|"] + \
        [f"| {name} | {'ok' if ok else 'FAILED'} | {detail} |" for name, ok, detail in checks]
    summary = f"""{total:,} requests in {elapsed:.0f} s ({total / elapsed:,.0f}/s), {tally.errors} errors. Verdict: **{verdict}**.

{chr(10).join(table)}

Answers:

{chr(10).join(answers)}

Envoy RSS per minute (sampled every {SAMPLE_SECONDS:g} s; warm-up is the first {WARMUP_SECONDS:.0f} s):

{chr(10).join(curve)}

Replay store live entries (gauge `replay_store_live_entries`): max {max(live):,}, last {live[-1]:,}
(`replay_cache.max_entries` {REPLAY_MAX_ENTRIES:,}).
"""
    print(summary)
    write_doc(summary, verdict)
    if verdict != "PASS":
        raise SystemExit(1)


def write_doc(summary, verdict):
    version = "unknown"
    try:
        import subprocess
        out = subprocess.run([ENVOY, "--version"], capture_output=True, text=True, timeout=30).stdout
        m = re.search(r"version: [^/]*/([0-9.]+)", out)
        version = m.group(1) if m else version
    except OSError:
        pass
    path = ROOT / "docs" / "SOAK.md"
    path.write_text(f"""# Soak test

`make soak` (`SOAK_SECONDS`, default 600; `scripts/soak.py`) runs gateguard under sustained load in
a real Envoy for that long and checks that nothing fails and that memory stays flat. It is not part
of `make test`.

Last run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `SOAK_SECONDS={SECONDS}`, Envoy {version}
(`--concurrency 2`), {os.cpu_count()} cores shared with other work, gateguard.wasm {WASM.stat().st_size:,} bytes.
Verdict: **{verdict}**.

## What runs

One Envoy with the configuration `gateguard render` writes for a policy of three APIs, in front of
a small upstream, with a local identity provider serving an EdDSA key set (discovery document,
then JWKS, fetched by the filter). Python client threads on loopback:

- **once**: `replay.mode: "without_ip"`. Each request a never-used token ({TOKEN_TTL} s lifetime,
  `clock_skew_seconds: {SKEW}`; the replay store remembers each until its `exp` + 600 s); every
  {int(1 / REPLAY_FRACTION)}th request sends the thread's last accepted token again and must get
  401 `Token replay detected`.
- **dpop**: `jwt.dpop: "required"`. Tokens bound to each client's Ed25519 key (`cnf.jkt`), a new
  one every {BOUND_TOKEN_SECONDS} s, each request with a fresh proof (its `jti` spent in the replay
  store until the proof can no longer be accepted); every {int(1 / PROOF_REPLAY_FRACTION)}th request
  sends the last accepted proof again and must get 401 `Invalid DPoP proof`.
- **limited**: `rate_limit` by client IP, {LIMIT_CALLS} calls per {LIMIT_PERIOD} s, from
  {len(LIMIT_SOURCES)} loopback source addresses, {LIMIT_BURST} requests each in turn: calls over
  the limit must get 429 `Rate limit is exceeded. Try again in N seconds.` with a numeric
  `Retry-After`, and no source may get more than {LIMIT_CALLS} per window.

Any other answer (status or message), a connection error or a timeout is an error; the run passes
only with none. The filter's counters must equal what the clients saw.

## Verdict: why these bounds

The policy bounds everything gateguard keeps: the replay store (`replay_cache.max_entries:
{REPLAY_MAX_ENTRIES:,}`, hard bound 55 MB, docs/operations.md#replay-store-sizing), the rate-limit
counters (`limit_counters.max_entries: {COUNTER_MAX_ENTRIES:,}`: 128 buckets of at most 1,153 bytes,
0.15 MB, docs/policy.md#rate-limits-and-quotas) and the verified-token cache (2,048 slots of at most
8 KiB, 16.8 MB, docs/policy.md#verified-token-cache): {POLICY_BOUND_MB:.1f} MB in all. So:

- RSS after warm-up may grow by at most that bound plus {ALLOCATOR_SLACK_MB:.0f} MB for Envoy's own
  allocator and V8 heap slack (what a healthy run shows in its first minutes: new connections,
  stats, the Wasm heap growing to its working size). More is a leak.
- The last third of the run may grow by less than {PLATEAU_PERCENT:.0f}% of RSS (about 8 MB here). By then the
  token cache is full and the connections, stats and Wasm heaps are at their working size. The
  replay store still grows, legitimately: one 41-byte entry per `once` request and per DPoP proof,
  kept about 10 minutes, so it levels off only after ~600 s (the gauge
  `replay_store_live_entries` in the table below). At the ~110 store writes a second these Python
  clients reach on a shared 2-core machine that is about 1 MB per third of a 600 s run, well
  inside {PLATEAU_PERCENT:.0f}%; a leak of about 200 bytes per request or more (a token, a proof,
  a header map) would break it in a 600 s run. Shorter runs prove less: in 120 s the last third
  is only 40 s.

## Results

{summary}""")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
