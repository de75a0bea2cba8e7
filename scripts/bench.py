"""`make bench`: gateguard's per-request cost measured side by side in one Envoy.

One Envoy (`--concurrency 1`, so one core serves and wrk uses the other) with listeners that
answer with a direct response (no upstream noise):
  bare      no filter at all
  floor     a proxy-wasm filter that does nothing (bench/noop): what any Wasm filter costs
  nochecks  gateguard with an API that has no checks: the adapter's fixed cost per request
  native    Envoy's own cors + rbac (IP allow-list) + rbac header check + jwt_authn (RS256, its
            cache on): the closest native setup
  gateguard CORS + IP filter + subscription key (SHA-256, constant time)
  jwt       gateguard JWT (RS256) on the verified-token cache path, and cold (cache disabled)
  jwt_authn a never-used RS256 token per request: Envoy's jwt_authn alone (cache off), and
            jwt_authn as `gateguard render` writes it in front of gateguard (`verify_with: "envoy"`)
  replay    replay detection with the local store and with etcd (a real etcd the bench starts,
            fsync on): repeat use of one token, and first use (a fresh HS256 token per request,
            fed to wrk by a Lua script), so the etcd round trip shows against the local store
Each scenario runs ROUNDS times, interleaved, and the median is reported. Results go to
docs/BENCHMARKS.md together with the command and the machine.
"""

import hashlib
import json
import multiprocessing
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
from envoy_harness import WASM, Envoy, bootstrap, connection_manager, free_port, gateguard_filter, render, wasm_filter  # noqa: E402
from etcd_harness import Etcd  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOOP = ROOT / "target" / "noop" / "wasm32-wasip1" / "release" / "noop_filter.wasm"
DURATION = os.environ.get("BENCH_DURATION", "5s")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNECTIONS = os.environ.get("BENCH_CONNECTIONS", "16")
# A comma-separated subset of scenarios (bare and floor always run): for a quick comparison.
ONLY = {n for n in os.environ.get("BENCH_ONLY", "").split(",") if n}
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


def native_jwt_authn(key, cache):
    """Envoy's jwt_authn verifying RS256 tokens from `key` by itself: issuer, audience and
    signature, the token required. `cache`: its verified-token cache (jwt_cache_config)."""
    provider = {"issuer": ISS, "audiences": [AUD],
                "local_jwks": {"inline_string": json.dumps(jwtkit.jwks(key))},
                "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}]}
    if cache:
        provider["jwt_cache_config"] = {"jwt_cache_size": 2048}
    return {"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"bench": provider},
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "bench"}}]}}


def native_filters(key):
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
    return [cors, rbac, native_jwt_authn(key, cache=True)], cors_policy


def gateguard_policy():
    return {"apis": [{
        "name": "bench", "path_prefix": "/",
        "cors": {"allowed_origins": [ORIGIN, "https://*.contoso.com"], "allowed_methods": ["GET", "POST"]},
        "ip_filter": {"allow": ["127.0.0.0/8", "2001:db8::/32"], "deny": ["127.0.0.66/32"]},
        "subscription_key": {"keys_sha256": [hashlib.sha256(KEY.encode()).hexdigest()]},
    }]}


def rate_limited_policy(by):
    """gateguard_policy with a rate limit no benchmark reaches: the cost of counting each call."""
    policy = gateguard_policy()
    policy["apis"][0]["rate_limit"] = {"by": by, "calls": 1_000_000_000, "renewal_period_seconds": 3600}
    return policy


ISS = "https://login.microsoftonline.com/tenant/v2.0"
AUD = "api://bench"


def jwt_policy(key, cache=True, replay=None, alg="RS256"):
    api = {"name": "bench", "path_prefix": "/",
           "jwt": {"issuers": [ISS], "audiences": [AUD], "algorithms": [alg],
                   "jwks": {"inline": jwtkit.jwks(key)}}}
    if replay:
        api["replay"] = {"mode": replay}
    policy = {"apis": [api]}
    if not cache:
        policy["token_cache"] = {"max_entries": 0}
    return policy


def dpop_policy(key):
    """jwt_policy with DPoP: the bound token is verified once (cached), each proof every time."""
    policy = jwt_policy(key)
    policy["apis"][0]["jwt"]["dpop"] = "optional"
    return policy


def hybrid_filters(key):
    """What `gateguard render` puts in front of the router for an API whose tokens Envoy
    verifies: jwt_authn (its cache on, as the default token_cache makes it), then gateguard."""
    policy = jwt_policy(key)
    policy["apis"][0]["jwt"]["verify_with"] = "envoy"
    filters = connection_manager(render(policy), "gateway_http")["http_filters"]
    assert [f["name"] for f in filters] == ["envoy.filters.http.jwt_authn", "envoy.filters.http.wasm",
                                            "envoy.filters.http.router"], filters
    return filters[:-1]


def warm_policy(key, full=False):
    """The warm-path targets: CORS + IP filter + JWT (cached); `full` adds the subscription key
    and replay `with_ip`."""
    policy = jwt_policy(key, replay="with_ip" if full else None)
    api, checks = policy["apis"][0], gateguard_policy()["apis"][0]
    api["cors"], api["ip_filter"] = checks["cors"], checks["ip_filter"]
    if full:
        api["subscription_key"] = checks["subscription_key"]
    return policy


HS_SECRET = "bench-hmac-secret-of-at-least-32-bytes!"


def replay_policy(mode, etcd=False, key=None):
    """Replay detection behind HS256 (cheap to verify, so the store's cost shows)."""
    api = {"name": "bench", "path_prefix": "/", "replay": {"mode": mode},
           "jwt": {"issuers": [ISS], "audiences": [AUD], "algorithms": ["HS256"],
                   "hmac_secret": {"value": HS_SECRET}}}
    policy = {"apis": [api]}
    if etcd:
        policy["replay_store"] = {"etcd": {"cluster": "etcd", "timeout_ms": 1000}}
    return policy


def hs_token(jti, ttl=3600):
    return jwtkit.hs256(HS_SECRET.encode(), {"alg": "HS256", "typ": "JWT"},
                        jwtkit.claims(ISS, AUD, ttl=ttl, jti=jti))


def _rs256_tokens(job):
    """`count` RS256 tokens from the PEM key (in a worker process: RSA signing is the slow part)."""
    pem, kid, prefix, start, count = job
    key = jwtkit.Key.from_private_pem("rsa", kid, pem)
    return [jwtkit.token(key, jwtkit.claims(ISS, AUD, ttl=3600, jti=f"{prefix}-{i}"))
            for i in range(start, start + count)]


class FreshTokens:
    """A file of never-used tokens per wrk run, which FRESH_LUA sends one per request: HS256
    (replay scenarios), or RS256 from `rs_key` (signed on every core)."""

    def __init__(self, directory, rs_key=None):
        self.dir, self.n, self.rs_key = Path(directory), 0, rs_key
        # (client key, its bound token, htu): set once the DPoP scenario's port is known.
        self.dpop = None

    def file(self, count, kind="hs256"):
        self.n += 1
        path = self.dir / f"tokens-{self.n}.txt"
        prefix = f"{time.time_ns()}-{self.n}"
        if kind == "dpop":
            client, token, htu = self.dpop
            pem, step = client.private_pem(), 2000
            jobs = [(pem, token, htu, prefix, s, min(step, count - s)) for s in range(0, count, step)]
            with multiprocessing.Pool() as pool:
                tokens = [t for batch in pool.map(_dpop_lines, jobs) for t in batch]
        elif kind == "rs256":
            pem, step = self.rs_key.private_pem(), 2000
            jobs = [(pem, self.rs_key.kid, prefix, s, min(step, count - s)) for s in range(0, count, step)]
            with multiprocessing.Pool() as pool:
                tokens = [t for batch in pool.map(_rs256_tokens, jobs) for t in batch]
        else:
            tokens = [hs_token(f"{prefix}-{i}") for i in range(count)]
        path.write_text("\n".join(tokens) + "\n")
        return path


FRESH_LUA = """
local tokens = {}
for line in io.lines(os.getenv("GATEGUARD_TOKENS")) do tokens[#tokens + 1] = line end
local i = 0
request = function()
  i = i + 1
  if i > #tokens then i = 1 end  -- out of fresh tokens: replays, counted as non-2xx
  local auth, proof = tokens[i]:match("^([^\t]*)\t(.*)$")
  if proof then  -- "DPoP <token>" TAB "<proof>": a DPoP request with a never-used proof
    return wrk.format(nil, nil, {["Authorization"] = auth, ["DPoP"] = proof})
  end
  return wrk.format(nil, nil, {["Authorization"] = "Bearer " .. tokens[i]})
end
"""


def dpop_proof(client, token, htu, jti):
    """An RFC 9449 proof of `client`'s key (ES256) for a POST-less GET of `htu`."""
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": client.jwk()}
    claims = {"htm": "GET", "htu": htu, "iat": int(time.time()), "jti": jti,
              "ath": jwtkit.b64(hashlib.sha256(token.encode()).digest())}
    signing_input = f"{jwtkit.b64json(header)}.{jwtkit.b64json(claims)}"
    return f"{signing_input}.{jwtkit.b64(client.sign(signing_input.encode(), 'ES256'))}"


def jwk_thumbprint(jwk):
    """RFC 7638 for an EC key."""
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    return jwtkit.b64(hashlib.sha256(canonical.encode()).digest())


def _dpop_lines(job):
    pem, token, htu, prefix, start, count = job
    client = jwtkit.Key.from_private_pem("ec", "client", pem)
    return [f"DPoP {token}\t{dpop_proof(client, token, htu, f'{prefix}-{i}')}"
            for i in range(start, start + count)]


def noop_filter():
    """The do-nothing filter, built here with the SDK and profile gateguard uses."""
    subprocess.run(["cargo", "build", "-q", "--release", "--target", "wasm32-wasip1",
                    "--manifest-path", str(ROOT / "bench" / "noop" / "Cargo.toml"),
                    "--target-dir", str(ROOT / "target" / "noop")], cwd=ROOT, check=True)
    return {"name": "envoy.filters.http.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {"name": "noop", "root_id": "noop", "vm_config": {
            "vm_id": "noop", "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": str(NOOP)}}}}}}


def time_to_ready(filters, rounds=3):
    """Median seconds from Envoy's start to /ready answering 200, with one listener and `filters`."""
    times = []
    for _ in range(rounds):
        config = bootstrap([listener("only", free_port(), filters)], [], free_port())
        envoy = Envoy(config, concurrency=1, name="ready")
        start = time.monotonic()
        envoy.start(timeout=60)
        times.append(time.monotonic() - start)
        envoy.stop()
    return statistics.median(times)


def wrk(port, headers, tokens=None):
    """`tokens`: a file of fresh tokens, one per request (first-use scenarios)."""
    cmd = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{DURATION}", "--latency"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    env = dict(os.environ)
    if tokens:
        script = Path(tokens).with_suffix(".lua")
        script.write_text(FRESH_LUA)
        cmd += ["-s", str(script)]
        env["GATEGUARD_TOKENS"] = str(tokens)
    cmd.append(f"http://127.0.0.1:{port}/api/forms")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        value, unit = float(m.group(1)), m.group(2)
        lat[pct] = value * {"us": 1, "ms": 1000, "s": 1_000_000}[unit]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, lat, int(non2xx.group(1)) if non2xx else 0


def wrk_short(port, headers, tokens=None):
    global DURATION
    saved, DURATION = DURATION, "1s"
    try:
        return wrk(port, headers, tokens)
    finally:
        DURATION = saved


def etcd_filter_and_cluster(policy, etcd):
    """The filter and the etcd cluster `gateguard render --etcd` writes for `policy`."""
    config = render(policy, etcd=etcd.endpoint)
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "etcd")
    return gateguard_filter(connection_manager(config, "gateway_http")), cluster


def main():
    subprocess.run(["wrk", "--version"], capture_output=True)
    key = jwtkit.Key("rsa", "bench-1")
    token = jwtkit.token(key, jwtkit.claims(ISS, AUD, ttl=3600))
    bearer = {"Authorization": f"Bearer {token}"}
    ec_key, ed_key = jwtkit.Key("ec", "bench-ec"), jwtkit.Key("ed", "bench-ed")
    ec_bearer = {"Authorization": f"Bearer {jwtkit.token(ec_key, jwtkit.claims(ISS, AUD, ttl=3600))}"}
    ed_bearer = {"Authorization": f"Bearer {jwtkit.token(ed_key, jwtkit.claims(ISS, AUD, ttl=3600))}"}
    checks = {"Origin": ORIGIN, "Ocp-Apim-Subscription-Key": KEY}
    native, cors_policy = native_filters(key)
    floor = noop_filter()
    nochecks = {"apis": [{"name": "bench", "path_prefix": "/"}]}
    scenarios = {
        "bare": ([], None, checks),
        "floor": ([floor], None, checks),
        "nochecks": ([wasm_filter(nochecks)], None, checks),
        "native": (native, cors_policy, {**checks, **bearer}),
        "gateguard": ([wasm_filter(gateguard_policy())], None, checks),
        "rate_limit_key": ([wasm_filter(rate_limited_policy("subscription_key"))], None, checks),
        "rate_limit_ip": ([wasm_filter(rate_limited_policy("client_ip"))], None, checks),
        "jwt_cached": ([wasm_filter(jwt_policy(key))], None, bearer),
        "jwt_replay_with_ip": ([wasm_filter(jwt_policy(key, replay="with_ip"))], None, bearer),
        "warm": ([wasm_filter(warm_policy(key))], None, {**checks, **bearer}),
        "full": ([wasm_filter(warm_policy(key, full=True))], None, {**checks, **bearer}),
        "jwt_cold": ([wasm_filter(jwt_policy(key, cache=False))], None, bearer),
        "jwt_cold_es256": ([wasm_filter(jwt_policy(ec_key, cache=False, alg="ES256"))], None, ec_bearer),
        "jwt_cold_eddsa": ([wasm_filter(jwt_policy(ed_key, cache=False, alg="EdDSA"))], None, ed_bearer),
        # A never-used RS256 token on every request (FreshTokens): a signature check each time.
        "native_jwt_cold": ([native_jwt_authn(key, cache=False)], None, {}),
        "hybrid_jwt_cold": (hybrid_filters(key), None, {}),
        # The same cached RS256 token, DPoP-bound, with a never-used ES256 proof per request.
        "dpop": ([wasm_filter(dpop_policy(key))], None, {}),
    }
    # Replay with the local store and with etcd: repeat use of one token, first use of each.
    etcd = Etcd(name="bench", fsync=True).start()
    # Two tokens: the stores share this VM's shared data, and an entry the local store wrote is
    # one the etcd store's cache must not accept on (it asks etcd).
    hs_local = {"Authorization": f"Bearer {hs_token('repeat-local')}"}
    hs_etcd = {"Authorization": f"Bearer {hs_token('repeat-etcd')}"}
    etcd_filter, etcd_cluster = etcd_filter_and_cluster(replay_policy("with_ip", etcd=True), etcd)
    etcd_once, _ = etcd_filter_and_cluster(replay_policy("without_ip", etcd=True), etcd)
    scenarios.update({
        "repeat_local": ([wasm_filter(replay_policy("with_ip"))], None, hs_local),
        "repeat_etcd": ([etcd_filter], None, hs_etcd),
        "first_use_local": ([wasm_filter(replay_policy("without_ip"))], None, {}),
        "first_use_etcd": ([etcd_once], None, {}),
    })
    # Scenarios fed a fresh token per request, and of which kind.
    fresh = {"first_use_local": "hs256", "first_use_etcd": "hs256",
             "native_jwt_cold": "rs256", "hybrid_jwt_cold": "rs256", "dpop": "dpop"}
    if ONLY:
        scenarios = {n: v for n, v in scenarios.items() if n in ONLY | {"bare", "floor"}}
    tokens = FreshTokens(etcd.dir, rs_key=key)
    # Fresh tokens per run: more than the fastest first-use run can send.
    seconds = float(DURATION.rstrip("s"))
    ports = {n: free_port() for n in scenarios}
    if "dpop" in ports:
        client = jwtkit.Key("ec", "client")
        bound = jwtkit.token(key, jwtkit.claims(ISS, AUD, ttl=3600, cnf={"jkt": jwk_thumbprint(client.jwk())}))
        tokens.dpop = (client, bound, f"http://127.0.0.1:{ports['dpop']}/api/forms")
    config = bootstrap(
        [listener(n, ports[n], filters, cors) for n, (filters, cors, _) in scenarios.items()],
        [etcd_cluster], free_port())
    envoy = Envoy(config, concurrency=1, name="bench").start()
    results = {n: [] for n in ports}
    try:
        budget = {}
        for name, port in ports.items():  # warm up, and check every scenario answers 200
            hdrs = scenarios[name][2]
            # Enough for the warm-up second (RS256 tokens are slow to sign; a warm-up that runs
            # out only repeats tokens, which these scenarios accept).
            toks = tokens.file(60_000 if fresh.get(name) == "hs256" else 15_000, fresh[name]) if name in fresh else None
            rps, _, errors = wrk_short(port, hdrs, toks)
            if errors:
                raise SystemExit(f"{name}: {errors} non-2xx responses in warm-up")
            budget[name] = int(rps * seconds * 1.5) + 1000
        for _ in range(ROUNDS):
            for name, port in ports.items():
                toks = tokens.file(budget[name], fresh[name]) if name in fresh else None
                results[name].append(wrk(port, scenarios[name][2], toks))
        etcd_calls = envoy.counter("gateguard.bench.etcd_calls") or 0
    finally:
        envoy.stop()
        etcd.stop()

    def med(name, f):
        return statistics.median(f(r) for r in results[name])

    rows = []
    bare_rps = med("bare", lambda r: r[0])
    floor_rps = med("floor", lambda r: r[0])
    for name in ports:
        rps = med(name, lambda r: r[0])
        p50 = med(name, lambda r: r[1]["50"])
        p99 = med(name, lambda r: r[1]["99"])
        errors = sum(r[2] for r in results[name])
        added = (1e6 / rps - 1e6 / bare_rps)
        rows.append((name, rps, rps / bare_rps, added, p50, p99, errors, rps / floor_rps))
    wasm_size = WASM.stat().st_size

    lines = [
        "| setup | req/s (median) | vs bare | vs Wasm floor | added CPU per request | p50 latency | p99 latency | non-2xx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rps, ratio, added, p50, p99, errors, vs_floor in rows:
        lines.append(f"| {name} | {rps:,.0f} | {ratio:.2f} | {vs_floor:.2f} | {added:+.1f} µs | {p50:.0f} µs | {p99:.0f} µs | {errors} |")
    table = "\n".join(lines)
    print(table)
    if ONLY:
        return
    by = {r[0]: r for r in rows}
    ready_bare = time_to_ready([])
    ready_gateguard = time_to_ready([wasm_filter(jwt_policy(key, replay="with_ip"))])
    derived = (
        f"- gateguard.wasm is {wasm_size / 1e6:.2f} MB (the do-nothing filter: {NOOP.stat().st_size / 1e6:.2f} MB). "
        f"Envoy from start to `/ready`: {ready_bare:.2f} s without a filter, {ready_gateguard:.2f} s with gateguard "
        f"(JWT + replay policy; median of 3).\n"
        f"- The adapter's fixed cost (an API without checks): {1e6 / by['nochecks'][1] - 1e6 / by['floor'][1]:+.1f} µs per request over the Wasm floor.\n"
        f"- One signature verification inside Envoy (cold, cache off, ring), over a cached token's cost: "
        f"RS256 {1e6 / by['jwt_cold'][1] - 1e6 / by['jwt_cached'][1]:.0f} µs, "
        f"ES256 {1e6 / by['jwt_cold_es256'][1] - 1e6 / by['jwt_cached'][1]:.0f} µs, "
        f"EdDSA {1e6 / by['jwt_cold_eddsa'][1] - 1e6 / by['jwt_cached'][1]:.0f} µs.\n"
        f"- RS256 verification inside Envoy (cold, cache off) costs {by['jwt_cold'][3]:.0f} µs per request; "
        f"with the verified-token cache it costs {by['jwt_cached'][3]:.0f} µs "
        f"({by['jwt_cold'][3] / max(by['jwt_cached'][3], 0.1):.0f}x less).\n"
        f"- Replay detection (`with_ip`) on top of a cached JWT: {by['jwt_replay_with_ip'][3] - by['jwt_cached'][3]:+.1f} µs per request "
        f"(throughput ratio replay on / off: {by['jwt_replay_with_ip'][1] / by['jwt_cached'][1]:.2f}).\n"
        f"- etcd replay store, repeat use (served by the local cache): {by['repeat_etcd'][1] / by['repeat_local'][1]:.2f}x "
        f"the local store's throughput, p99 {by['repeat_etcd'][5]:.0f} µs vs {by['repeat_local'][5]:.0f} µs.\n"
        f"- etcd replay store, first use (one etcd transaction per request): {by['first_use_etcd'][1] / by['first_use_local'][1]:.2f}x "
        f"the local store's throughput, p99 {by['first_use_etcd'][5]:.0f} µs vs {by['first_use_local'][5]:.0f} µs "
        f"({etcd_calls:,} etcd calls in all, including warm-up and lease grants).\n"
        f"- A never-used RS256 token per request: Envoy's jwt_authn alone {by['native_jwt_cold'][1]:,.0f} req/s "
        f"({by['native_jwt_cold'][3]:.0f} µs per request); jwt_authn + gateguard (`verify_with: \"envoy\"`) "
        f"{by['hybrid_jwt_cold'][1]:,.0f} req/s ({by['hybrid_jwt_cold'][3]:.0f} µs), gateguard verifying by itself "
        f"(jwt_cold, cache off) {by['jwt_cold'][1]:,.0f} req/s.\n"
        f"- A rate limit on top of CORS + IP filter + subscription key (gateguard), counted in shared data with "
        f"compare-and-swap: by subscription key {1e6 / by['rate_limit_key'][1] - 1e6 / by['gateguard'][1]:+.1f} µs per request "
        f"(throughput ratio with / without: {by['rate_limit_key'][1] / by['gateguard'][1]:.2f}), by client IP "
        f"{1e6 / by['rate_limit_ip'][1] - 1e6 / by['gateguard'][1]:+.1f} µs ({by['rate_limit_ip'][1] / by['gateguard'][1]:.2f}).\n"
        f"- DPoP (the bound RS256 token cached, a never-used ES256 proof per request): {by['dpop'][1]:,.0f} req/s, "
        f"{by['dpop'][1] / by['jwt_cached'][1]:.2f}x the same token sent as a plain bearer token (jwt_cached, "
        f"{by['jwt_cached'][1]:,.0f} req/s); the proof costs {1e6 / by['dpop'][1] - 1e6 / by['jwt_cached'][1]:.0f} µs per request."
    )
    def target(label, value, goal, unit=""):
        met = "met" if value >= goal else "not met"
        return f"| {label} | {value:.2f}{unit} | ≥ {goal}{unit} | {met} |"
    rs256 = 1e6 / by["jwt_cold"][1] - 1e6 / by["jwt_cached"][1]
    derived += "\n\n## Targets\n\n| target | measured | goal | |\n|---|---|---|---|\n" + "\n".join([
        target("warm: CORS + IP + JWT (cached), vs Wasm floor", by["warm"][7], 0.90),
        target("full: + subscription key + replay `with_ip`, vs Wasm floor", by["full"][7], 0.85),
        f"| one RS256 verification in Envoy | {rs256:.0f} µs | ≤ 300 µs | {'met' if rs256 <= 300 else 'not met'} |",
        target("fresh-token throughput: jwt_authn + gateguard (`verify_with: \"envoy\"`) vs jwt_authn verifying every request",
               by["hybrid_jwt_cold"][1] / by["native_jwt_cold"][1], 0.90),
        f"| gateguard.wasm size | {wasm_size / 1e6:.2f} MB | ≤ 1 MB | {'met' if wasm_size <= 1_000_000 else 'not met'} |",
    ])
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
- **floor**: a proxy-wasm filter that does nothing (`bench/noop`, the same SDK and release
  profile): the cost of any Wasm filter in this Envoy. "vs Wasm floor" divides by its req/s.
- **nochecks**: gateguard with one API that has no checks: what the adapter costs by itself.
- **warm / full**: CORS + IP filter + RS256 JWT served from the verified-token cache; `full` adds
  the subscription key and replay `with_ip`: the warm-path targets.
- **native**: Envoy's `cors` filter plus `rbac` (source IP prefix and an exact header match on
  the key, i.e. the key in plain text in the config) plus `jwt_authn` (the RS256 token of
  jwt_cached, issuer and audience checked, its JWT cache on), with an allowed `Origin`, the key
  and the token.
- **gateguard**: CORS + IP filter + subscription key in the Wasm filter (key stored as SHA-256,
  compared in constant time), same request.
- **jwt_cached**: an RS256 token (inline JWKS) sent repeatedly: verified once, then served from
  the verified-token cache in shared data (claims still checked per request).
- **jwt_replay_with_ip**: the same plus replay detection (`with_ip`, one bucket CAS per request).
- **jwt_cold**: the same token with the cache disabled (`token_cache.max_entries: 0`): a full
  RS256 verification (`ring`, compiled to Wasm, in V8) on every request.
- **jwt_cold_es256 / jwt_cold_eddsa**: the same with an ES256 (P-256) or EdDSA (Ed25519) token.
- **native_jwt_cold**: Envoy's `jwt_authn` alone (inline JWKS, issuer and audience, the token
  required, no JWT cache), a never-used RS256 token on every request (wrk's Lua script reads them
  from a file made before each run): one native signature check per request.
- **hybrid_jwt_cold**: the same fresh tokens through what `gateguard render` writes for an API
  with `jwt.verify_with: "envoy"`: `jwt_authn` (payload into the dynamic metadata, its cache on
  as the default `token_cache` makes it, never a hit here) then gateguard, which reads the
  payload, compares it with the token claim by claim and checks algorithm, time, issuer and
  audience. Target: ≥ 0.90x native_jwt_cold's throughput.
- **dpop**: `jwt_cached`'s policy with `jwt.dpop: "optional"` and its RS256 token bound to a
  client's EC key (`cnf.jkt`), sent as `Authorization: DPoP` with a never-used ES256 proof per
  request (signed before the run): the token comes from the cache, the proof is verified
  (ES256), checked and its `jti` spent in the replay store every time.
- **repeat_local / repeat_etcd**: an HS256 token sent repeatedly to a `with_ip` API, with the local
  replay store and with `replay_store.etcd` (a single etcd 3.5.1 member on loopback, fsync on,
  started by the bench; rendered cluster). After the first use the etcd store answers from its
  local cache: no round trip.
- **first_use_local / first_use_etcd**: a `without_ip` API and a never-used HS256 token on every
  request (wrk's Lua script reads them from a file made before each run): every request is a
  local bucket write, or one etcd transaction (`KV/Txn`, plus a lease grant per 10 s window).

"added CPU per request" is `1/rps - 1/rps(bare)` on the single Envoy worker.
"""
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
