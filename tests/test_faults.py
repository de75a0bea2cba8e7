"""Faults through a real Envoy: an identity provider that fails every way a network service can,
and stores that fill up. For each: the documented fail-closed answer (docs/policy.md, "JWT",
"Replay", "Rate limits and quotas"), the right counters, no panic or trap in Envoy's log (every
Envoy started here is checked for those when it stops: conftest.start_envoy), memory that stays
bounded, and recovery once the fault clears, without a restart.

The etcd faults (stalled, erroring, partitioned) are in test_faults_etcd.py."""

import time
import uuid

import pytest

import jwtkit
import upstream
from conftest import start_envoy
from envoy_harness import (assert_jwt_401, compose, filter_config, free_port, gateway, request,
                           token_request)
from idp import IdentityProvider

AUD = "api://faults"
ISS = "https://idp.faults.example/"
INVALID = "Invalid or expired token"
TEN_MB = b'{"keys": [], "padding": "' + b"x" * (10 * 1024 * 1024) + b'"}'

# What an identity provider (or whatever answers in its place) may send instead of a key set.
# Each API below has its own identity provider, which starts by serving its fault three times.
NO_KEYS_YET = {
    "html": ("body", b"<html><body>502 Bad Gateway</body></html>"),
    "truncated": ("body", b'{"keys": [{"kty": "RSA", "kid": "k1", "n": "sXch'),
    "shape": ("body", b'{"keys": "all of them"}'),
    "nokeys": ("body", b'{"keys": []}'),
    "empty": ("body", b""),
    "huge": ("body", TEN_MB),
    "close": ("close", None),
    "status": ("status", 503),
}
# Answers 12 s late: past the fetch's 9 s timeout.
SLOW = ("slow", 12)


def jwt_api(name, idp, refresh_seconds):
    return {"name": name, "path_prefix": f"/{name}", "jwt": {
        "issuers": [ISS], "audiences": [AUD], "algorithms": ["RS256"],
        "jwks": {"cluster": f"idp_{name}", "uri": f"http://127.0.0.1:{idp.port}/keys",
                 "refresh_seconds": refresh_seconds}}}


@pytest.fixture(scope="module")
def key():
    return jwtkit.Key("rsa", "k1")


@pytest.fixture(scope="module")
def idps(key):
    """One identity provider per API, each serving `key`'s JWKS once its faults are spent."""
    names = [*NO_KEYS_YET, "slow", "flap"]
    servers = {name: IdentityProvider(jwtkit.jwks(key)) for name in names}
    for name, fault in NO_KEYS_YET.items():
        servers[name].fault(fault, fault, fault)
    servers["slow"].fault(SLOW)
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def gw(request, idps, echo_upstream):
    port, admin = free_port(), free_port()
    apis = [jwt_api(name, idps[name], 2) for name in [*NO_KEYS_YET, "slow"]]
    apis.append(jwt_api("flap", idps["flap"], 1))
    envoy = start_envoy(request, compose([gateway("faults", port, {"apis": apis}, echo_upstream)], admin))
    envoy.port = port
    return envoy


def token(key, **claims):
    return jwtkit.token(key, jwtkit.claims(ISS, AUD, jti=uuid.uuid4().hex, **claims))


def call(gw, api, t):
    marker = uuid.uuid4().hex
    return token_request(gw.port, f"/{api}/x?m={marker}", t), marker


def test_with_no_key_set_yet_every_fault_fails_closed_and_the_first_good_answer_opens(gw, idps, key):
    """Until an identity provider has answered with a key set, a valid token gets 401 whatever
    it sent instead (garbage, 10 MB, nothing, an error, an answer too late); the first good
    answer lets tokens in, without a restart; each fault is one failed fetch."""
    names = [*NO_KEYS_YET, "slow"]
    t = token(key)
    refused = {n: 0 for n in names}
    opened = {}
    start = time.time()
    deadline = start + 45
    while len(opened) < len(names) and time.time() < deadline:
        for name in names:
            if name in opened:
                continue
            r, marker = call(gw, name, t)
            if r.status == 200:
                # Never before the identity provider sent a key set.
                assert idps[name].good_answers() > 0, (name, r)
                opened[name] = time.time() - start
            else:
                assert_jwt_401(r, INVALID)
                assert upstream.received(marker) == [], name
                refused[name] += 1
        time.sleep(0.1)
    assert sorted(opened) == sorted(names), (opened, refused)
    for name in names:
        assert refused[name] > 0, f"{name}: no request fell in the fault window ({opened[name]:.1f}s)"
        assert idps[name].pending_faults() == 0
    # The slow answer took the whole timeout: its key set came after 9 s, not before.
    assert opened["slow"] >= 8, opened
    for name, fault in NO_KEYS_YET.items():
        assert gw.counter(f"gateguard.{name}.jwks_fetch_failed") == 3, name
        assert gw.counter(f"gateguard.{name}.jwks_fetch") >= 4, name
    assert gw.counter("gateguard.slow.jwks_fetch_failed") == 1
    log = gw.log_text()
    for name, reason in [("html", "response is not a JSON object"), ("truncated", "response is not a JSON object"),
                         ("shape", 'no "keys" array'), ("nokeys", "no usable signing key"),
                         ("empty", "response is not a JSON object"),
                         ("huge", "JWKS larger than 262144 bytes"), ("status", "HTTP status 503")]:
        assert f"JWKS fetch from cluster idp_{name} failed: {reason}" in log, name
    print(f"recovered after (s): { {n: round(s, 1) for n, s in sorted(opened.items())} }")


def test_a_flapping_identity_provider_never_opens_and_never_loses_the_last_good_keys(gw, idps, key):
    """An identity provider that alternates faults and good answers: tokens signed with the key
    set last fetched keep working through every fault, a rotation it publishes when it is back is
    adopted, and Envoy's memory does not keep what the 10 MB answers weighed."""
    flap = idps["flap"]
    old = token(key)
    wait = time.time() + 20
    while token_request(gw.port, "/flap/x", old).status != 200 and time.time() < wait:
        time.sleep(0.1)
    assert token_request(gw.port, "/flap/x", old).status == 200
    time.sleep(1.2)  # every worker has adopted it
    rss_before = gw.rss_kib()
    failed_before = gw.counter("gateguard.flap.jwks_fetch_failed")
    faults = [("body", TEN_MB), ("close", None), ("body", b"garbage"), ("body", TEN_MB), ("status", 500)]
    flap.fault(*faults)
    served_before = flap.good_answers()
    checked = 0
    deadline = time.time() + 60
    while flap.pending_faults() and time.time() < deadline:
        r = token_request(gw.port, "/flap/x", token(key))
        assert r.status == 200, r
        checked += 1
        time.sleep(0.05)
    assert flap.pending_faults() == 0, "the gateway stopped fetching"
    # Back: a rotated key set (a new key, the old one gone) arrives with the next good answer.
    rotated = jwtkit.Key("rsa", "k2")
    flap.set_jwks(jwtkit.jwks(rotated))
    new = token(rotated)
    deadline, streak = time.time() + 30, 0
    while streak < 10 and time.time() < deadline:  # on every worker
        streak = streak + 1 if token_request(gw.port, "/flap/x", new).status == 200 else 0
        time.sleep(0.05)
    assert streak == 10, "the rotated key set was not adopted"
    assert flap.good_answers() > served_before
    time.sleep(1.2)
    assert_jwt_401(token_request(gw.port, "/flap/x", token(key)), INVALID)
    assert gw.counter("gateguard.flap.jwks_fetch_failed") - failed_before == len(faults)
    rss_after = gw.rss_kib()
    print(f"flapping: {checked} requests during {len(faults)} faults; "
          f"Envoy RSS {rss_before // 1024} -> {rss_after // 1024} MiB")
    # Two 10 MB answers went through Envoy: neither stays (nor is copied into a Wasm VM,
    # whose memory never shrinks).
    assert rss_after - rss_before < 16 * 1024, (rss_before, rss_after)


# ---- stores full, then free again ------------------------------------------------------------

# The replay store keeps an entry until its token's `exp` plus 600 s (docs/policy.md, "Replay"),
# the largest clock skew a policy may allow: with that skew, a token whose `exp` was 596 s ago
# is still valid, and its entry goes 4 s later, so the store frees up within the test.
TTL = 4
SKEW = 600


def short_lived(key):
    return token(key, exp=int(time.time()) - SKEW + TTL)

WINDOW = 3  # seconds of the rate-limit window: the counter store frees up as windows end


@pytest.fixture(scope="module")
def stores(request, key, echo_upstream):
    replay_port, rate_port, admin = free_port(), free_port(), free_port()
    replay = {"apis": [{"name": "replayfull", "path_prefix": "/replayfull", "jwt": {
        "issuers": [ISS], "audiences": [AUD], "algorithms": ["RS256"],
        "jwks": {"inline": jwtkit.jwks(key)}, "clock_skew_seconds": 600}, "replay": {"mode": "without_ip"}}],
        "replay_cache": {"max_entries": 3}}
    rate = {"apis": [{"name": "ratefull", "path_prefix": "/ratefull",
                      "rate_limit": {"by": "client_ip", "calls": 5, "renewal_period_seconds": WINDOW}}],
            "limit_counters": {"max_entries": 1}}
    config = compose([gateway("replayfull", replay_port, replay, echo_upstream),
                      gateway("ratefull", rate_port, rate, echo_upstream)], admin)
    # A VM, and so a store, of its own for each (as docs/operations.md has operators do for
    # several policies in one Envoy).
    filter_config(config, "replayfull")["vm_config"]["vm_id"] = "replayfull"
    filter_config(config, "ratefull")["vm_config"]["vm_id"] = "ratefull"
    envoy = start_envoy(request, config)
    envoy.replay_port, envoy.rate_port = replay_port, rate_port
    return envoy


def fill_until_full(send, ttl_seconds, limit=200):
    """Sends new entries until one is refused as full; the statuses, in order."""
    statuses = []
    for i in range(limit):
        r = send(i)
        statuses.append(r.status)
        if r.status == 503:
            return statuses, r
    raise AssertionError(f"never full after {limit}: {statuses[-10:]}")


def test_a_full_replay_store_refuses_new_tokens_then_takes_them_once_the_old_expire(stores, key):
    port = stores.replay_port
    rss_before = stores.rss_kib()

    first = short_lived(key)

    def new_token(i):
        return token_request(port, "/replayfull/x", first if i == 0 else short_lived(key))

    statuses, r = fill_until_full(new_token, TTL)
    assert set(statuses[:-1]) == {200}, statuses
    assert r.json() == {"statusCode": 503, "message": "Replay protection unavailable: token store is full"}
    full_at = time.time()
    assert stores.counter("gateguard.replayfull.replay_store_full") >= 1
    # Live tokens are never forgotten to make room: a spent one is still refused as spent.
    assert_jwt_401(token_request(port, "/replayfull/x", first), "Token replay detected")
    # Once the tokens it holds have expired, new ones are taken again, without a restart.
    deadline = full_at + TTL + 20
    status = None
    while time.time() < deadline:
        status = token_request(port, "/replayfull/x", token(key, exp=int(time.time()) + 60)).status
        if status == 200:
            break
        assert status == 503
        time.sleep(0.25)
    assert status == 200, "the replay store never freed up"
    recovered = time.time() - full_at
    # And still each token once.
    again = token(key, exp=int(time.time()) + 60)
    assert token_request(port, "/replayfull/x", again).status == 200
    assert_jwt_401(token_request(port, "/replayfull/x", again), "Token replay detected")
    print(f"replay store: full after {len(statuses) - 1} tokens, new tokens taken again after {recovered:.1f}s "
          f"(tokens live {TTL}s); RSS {rss_before // 1024} -> {stores.rss_kib() // 1024} MiB")


def test_a_full_counter_store_refuses_new_callers_then_takes_them_once_windows_end(stores):
    port = stores.rate_port
    before = stores.counter("gateguard.ratefull.limit_unavailable")

    def new_caller(i):
        return request(port, "GET", "/ratefull/x", source=f"127.0.9.{i + 1}")

    statuses, r = fill_until_full(new_caller, WINDOW)
    assert set(statuses[:-1]) == {200} and len(statuses) == 33, statuses  # one bucket of 32
    assert r.json() == {"statusCode": 503, "message": "Rate limit unavailable: counter store is full"}
    assert 1 <= int(r.header("retry-after")) <= WINDOW, r
    full_at = time.time()
    assert stores.counter("gateguard.ratefull.limit_unavailable") == before + 1
    # Known callers are still counted while it is full.
    r = request(port, "GET", "/ratefull/x", source="127.0.9.1")
    assert r.status == 200 and r.header("x-ratelimit-remaining") == "3", r
    deadline = full_at + WINDOW + 10
    status = None
    while time.time() < deadline:
        status = request(port, "GET", "/ratefull/x", source="127.0.9.200").status
        if status == 200:
            break
        assert status == 503
        time.sleep(0.25)
    assert status == 200, "the counter store never freed up"
    print(f"counter store: new callers taken again {time.time() - full_at:.1f}s after it filled "
          f"(window {WINDOW}s)")
