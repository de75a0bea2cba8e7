"""`make bench`: gateguard's per-request cost measured side by side in one Envoy.

One Envoy (`--concurrency 1`, so one core serves and wrk uses the other) with listeners that
answer with a direct response (no upstream noise):
  bare      no filter at all
  native    Envoy's own cors + rbac (IP allow-list) + rbac header check: the closest native setup
  gateguard CORS + IP filter + subscription key (SHA-256, constant time)
  jwt       gateguard JWT (RS256) on the verified-token cache path, and cold (cache disabled)
Each scenario runs ROUNDS times, interleaved, and the median is reported. Results go to
docs/BENCHMARKS.md together with the command and the machine.
"""

import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import jwtkit  # noqa: E402
from envoy_harness import WASM, Envoy, bootstrap, free_port, wasm_filter  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DURATION = os.environ.get("BENCH_DURATION", "5s")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNECTIONS = os.environ.get("BENCH_CONNECTIONS", "16")
KEY = "bench-key"
ORIGIN = "https://portal.example.com"

ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def listener(name, port, filters, cors_policy=None):
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}
    vhost = {"name": name, "domains": ["*"], "routes": [route]}
    if cors_policy:
        vhost["typed_per_filter_config"] = {"envoy.filters.http.cors": cors_policy}
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name, "use_remote_address": True, "skip_xff_append": True,
                "normalize_path": True, "merge_slashes": True,
                "route_config": {"virtual_hosts": [vhost]},
                "http_filters": filters + [ROUTER],
            }}]}],
    }


def native_filters():
    cors = {"name": "envoy.filters.http.cors",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}}
    rbac = {"name": "envoy.filters.http.rbac", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "rules": {"action": "ALLOW", "policies": {"ip-and-key": {
            "permissions": [{"any": True}],
            "principals": [{"and_ids": {"ids": [
                {"remote_ip": {"address_prefix": "127.0.0.0", "prefix_len": 8}},
                {"header": {"name": "ocp-apim-subscription-key", "string_match": {"exact": KEY}}},
            ]}}]}}}}}
    cors_policy = {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
                   "allow_origin_string_match": [{"exact": ORIGIN}],
                   "allow_methods": "GET, POST", "max_age": "600"}
    return [cors, rbac], cors_policy


def gateguard_policy():
    return {"apis": [{
        "name": "bench", "path_prefix": "/",
        "cors": {"allowed_origins": [ORIGIN, "https://*.contoso.com"], "allowed_methods": ["GET", "POST"]},
        "ip_filter": {"allow": ["127.0.0.0/8", "2001:db8::/32"], "deny": ["127.0.0.66/32"]},
        "subscription_key": {"keys_sha256": [hashlib.sha256(KEY.encode()).hexdigest()]},
    }]}


ISS = "https://login.microsoftonline.com/tenant/v2.0"
AUD = "api://bench"


def jwt_policy(key, cache=True, replay=None):
    api = {"name": "bench", "path_prefix": "/",
           "jwt": {"issuers": [ISS], "audiences": [AUD], "algorithms": ["RS256"],
                   "jwks": {"inline": jwtkit.jwks(key)}}}
    if replay:
        api["replay"] = {"mode": replay}
    policy = {"apis": [api]}
    if not cache:
        policy["token_cache"] = {"max_entries": 0}
    return policy


def wrk(port, headers):
    cmd = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{DURATION}", "--latency"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(f"http://127.0.0.1:{port}/api/forms")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        value, unit = float(m.group(1)), m.group(2)
        lat[pct] = value * {"us": 1, "ms": 1000, "s": 1_000_000}[unit]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, lat, int(non2xx.group(1)) if non2xx else 0


def wrk_short(port, headers):
    global DURATION
    saved, DURATION = DURATION, "1s"
    try:
        return wrk(port, headers)
    finally:
        DURATION = saved


def main():
    subprocess.run(["wrk", "--version"], capture_output=True)
    key = jwtkit.Key("rsa", "bench-1")
    token = jwtkit.token(key, jwtkit.claims(ISS, AUD, ttl=3600))
    bearer = {"Authorization": f"Bearer {token}"}
    checks = {"Origin": ORIGIN, "Ocp-Apim-Subscription-Key": KEY}
    native, cors_policy = native_filters()
    scenarios = {
        "bare": ([], None, checks),
        "native": (native, cors_policy, checks),
        "gateguard": ([wasm_filter(gateguard_policy())], None, checks),
        "jwt_cached": ([wasm_filter(jwt_policy(key))], None, bearer),
        "jwt_replay_with_ip": ([wasm_filter(jwt_policy(key, replay="with_ip"))], None, bearer),
        "jwt_cold": ([wasm_filter(jwt_policy(key, cache=False))], None, bearer),
    }
    ports = {n: free_port() for n in scenarios}
    config = bootstrap(
        [listener(n, ports[n], filters, cors) for n, (filters, cors, _) in scenarios.items()],
        [], free_port())
    envoy = Envoy(config, concurrency=1, name="bench").start()
    results = {n: [] for n in ports}
    try:
        for name, port in ports.items():  # warm up, and check every scenario answers 200
            hdrs = scenarios[name][2]
            rps, _, errors = wrk_short(port, hdrs)
            if errors:
                raise SystemExit(f"{name}: {errors} non-2xx responses in warm-up")
        for _ in range(ROUNDS):
            for name, port in ports.items():
                results[name].append(wrk(port, scenarios[name][2]))
    finally:
        envoy.stop()

    def med(name, f):
        return statistics.median(f(r) for r in results[name])

    rows = []
    bare_rps = med("bare", lambda r: r[0])
    for name in ports:
        rps = med(name, lambda r: r[0])
        p50 = med(name, lambda r: r[1]["50"])
        p99 = med(name, lambda r: r[1]["99"])
        errors = sum(r[2] for r in results[name])
        added = (1e6 / rps - 1e6 / bare_rps)
        rows.append((name, rps, rps / bare_rps, added, p50, p99, errors))
    wasm_size = WASM.stat().st_size

    lines = [
        "| setup | req/s (median) | vs bare | added CPU per request | p50 latency | p99 latency | non-2xx |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rps, ratio, added, p50, p99, errors in rows:
        lines.append(f"| {name} | {rps:,.0f} | {ratio:.2f} | {added:+.1f} µs | {p50:.0f} µs | {p99:.0f} µs | {errors} |")
    table = "\n".join(lines)
    print(table)
    by = {r[0]: r for r in rows}
    derived = (
        f"- RS256 verification inside Envoy (cold, cache off) costs {by['jwt_cold'][3]:.0f} µs per request; "
        f"with the verified-token cache it costs {by['jwt_cached'][3]:.0f} µs "
        f"({by['jwt_cold'][3] / max(by['jwt_cached'][3], 0.1):.0f}x less).\n"
        f"- Replay detection (`with_ip`) on top of a cached JWT: {by['jwt_replay_with_ip'][3] - by['jwt_cached'][3]:+.1f} µs per request "
        f"(throughput ratio replay on / off: {by['jwt_replay_with_ip'][1] / by['jwt_cached'][1]:.2f})."
    )
    print(derived)
    # Replay store memory, measured on the real record encoding (native, release).
    mem = subprocess.run(
        ["cargo", "test", "--release", "-q", "-p", "gateguard-core", "replay::tests::measure_memory_and_cost",
         "--", "--ignored", "--nocapture"], cwd=ROOT, capture_output=True, text=True)
    mem = mem.stdout + mem.stderr
    mem_lines = [l.strip() for l in mem.splitlines() if any(w in l for w in ("bytes", "/call", "scan"))]
    derived += "\n\n## Replay store memory\n\nMeasured on the real bucket encoding " \
        "(`cargo test --release -p gateguard-core replay::tests::measure_memory_and_cost -- --ignored --nocapture`):\n\n" \
        + "\n".join(f"- {l}" for l in mem_lines)
    write_report(table, wasm_size, derived)


def write_report(table, wasm_size, derived):
    path = ROOT / "docs" / "BENCHMARKS.md"
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"""# Benchmarks

Reproduce with `make bench` (environment: `BENCH_DURATION`, `BENCH_ROUNDS`, `BENCH_CONNECTIONS`).
Last run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} cores ({cpu}),
Envoy 1.40.0 (V8), `--concurrency 1`, wrk `-t1 -c{CONNECTIONS} -d{DURATION}`, {ROUNDS} interleaved rounds, medians.
gateguard.wasm: {wasm_size:,} bytes.

Every listener answers with an Envoy direct response, so the numbers are the filters' own cost.
The machine is shared and noisy: read the ratios, not the absolute numbers.

## Results

{table}

{derived}

Scenarios (each its own listener in the same Envoy, run interleaved):
- **bare**: Envoy with no filter.
- **native**: Envoy's `cors` filter plus `rbac` (source IP prefix and an exact header match on
  the key, i.e. the key in plain text in the config), with an allowed `Origin` and the key.
- **gateguard**: CORS + IP filter + subscription key in the Wasm filter (key stored as SHA-256,
  compared in constant time), same request.
- **jwt_cached**: an RS256 token (inline JWKS) sent repeatedly: verified once, then served from
  the verified-token cache in shared data (claims still checked per request).
- **jwt_replay_with_ip**: the same plus replay detection (`with_ip`, one bucket CAS per request).
- **jwt_cold**: the same token with the cache disabled (`token_cache.max_entries: 0`): a full
  RS256 verification (jsonwebtoken's RustCrypto backend in V8) on every request.

"added CPU per request" is `1/rps - 1/rps(bare)` on the single Envoy worker.
"""
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
