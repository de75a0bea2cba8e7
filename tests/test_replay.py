"""End-to-end replay detection in a real Envoy with two worker threads: tokens bound to the
first client IP, tokens usable once, and races that must produce exactly one winner across
workers, repeated many times."""

import http.client
import time

import pytest

import jwtkit
from conftest import start_envoy
import envoy_harness
from envoy_harness import compose, filter_config, free_port, gateway, request

ISS = "https://login.microsoftonline.com/tenant/v2.0"
AUD = "api://processfactorial"
REPLAY = {"statusCode": 401, "message": "Token replay detected"}


@pytest.fixture(scope="module")
def key():
    return jwtkit.Key("ed", "ed-1")  # fast to sign: the races need many fresh tokens


def api(name, mode, key):
    return jwtkit.replay_api(name, mode, key, ISS, AUD)


@pytest.fixture(scope="module")
def gw(request, key, echo_upstream):
    port, small_port, xff_port, admin = free_port(), free_port(), free_port(), free_port()
    main = {"apis": [api("withip", "with_ip", key), api("once", "without_ip", key),
                     {**api("plain", "with_ip", key), "replay": None}]}
    main["apis"][2].pop("replay")
    small = {"apis": [api("small", "without_ip", key)], "replay_cache": {"max_entries": 3}}
    # Requests come from 127.0.0.1, the proxy the policy trusts to write X-Forwarded-For.
    behind_proxy = {"apis": [api("proxied", "with_ip", key)],
                    "client_ip": {"trusted_proxy_hops": 1, "trusted_proxies": ["127.0.0.1/32"]}}
    config = compose([gateway("main", port, main, echo_upstream), gateway("small", small_port, small, echo_upstream),
                      gateway("proxied", xff_port, behind_proxy, echo_upstream)], admin)
    # Not as rendered (render writes one gateway per Envoy): policies in one VM share one replay
    # store, whose layout follows the policy configured last, so the 3-entry store gets a VM of
    # its own, as docs/operations.md tells operators to do.
    filter_config(config, "small")["vm_config"]["vm_id"] = "small"
    envoy = start_envoy(request, config, concurrency=2)
    envoy.port, envoy.small_port, envoy.xff_port = port, small_port, xff_port
    return envoy


_counter = [0]


def fresh(key, ttl=600):
    _counter[0] += 1
    return jwtkit.token(key, jwtkit.claims(ISS, AUD, ttl=ttl, jti=f"t{_counter[0]}-{time.time_ns()}"))


def call(port, path, token, source="127.0.0.1", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20, source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def test_with_ip_owner_keeps_working_others_are_refused(gw, key):
    t = fresh(key)
    assert call(gw.port, "/withip/x", t, "127.0.0.1")[0] == 200
    assert call(gw.port, "/withip/x", t, "127.0.0.1")[0] == 200
    status, body = call(gw.port, "/withip/x", t, "127.0.0.2")
    assert status == 401 and __import__("json").loads(body) == REPLAY
    assert call(gw.port, "/withip/x", t, "127.0.0.1")[0] == 200


def test_without_ip_each_token_once(gw, key):
    t = fresh(key)
    assert call(gw.port, "/once/x", t)[0] == 200
    assert call(gw.port, "/once/x", t)[0] == 401
    assert call(gw.port, "/once/x", t, "127.0.0.9")[0] == 401
    assert call(gw.port, "/once/x", fresh(key))[0] == 200


def test_apis_without_replay_accept_reuse(gw, key):
    t = fresh(key)
    for _ in range(3):
        assert call(gw.port, "/plain/x", t)[0] == 200


def test_invalid_tokens_are_never_recorded(gw, key):
    expired = jwtkit.token(key, jwtkit.claims(ISS, AUD, ttl=-3600))
    for _ in range(3):
        status, body = call(gw.port, "/once/x", expired)
        assert status == 401 and "Invalid or expired token" in body


def test_with_ip_behind_a_trusted_proxy_uses_forwarded_address(gw, key):
    t = fresh(key)
    assert call(gw.xff_port, "/proxied/x", t, headers={"X-Forwarded-For": "203.0.113.5"})[0] == 200
    assert call(gw.xff_port, "/proxied/x", t, headers={"X-Forwarded-For": "203.0.113.6"})[0] == 401
    # No usable client IP: refused rather than unbound.
    assert call(gw.xff_port, "/proxied/x", fresh(key), headers={"X-Forwarded-For": "garbage"})[0] == 401


def race(port, path, token, sources):
    """Fire one request per source at the same instant; return the statuses."""
    headers = {"Authorization": f"Bearer {token}"}
    return envoy_harness.race([(port, path, headers, source) for source in sources])


def test_without_ip_exactly_one_of_64_concurrent_uses_wins(gw, key):
    rounds = 20
    for _ in range(rounds):
        statuses = race(gw.port, "/once/x", fresh(key), ["127.0.0.1"] * 64)
        assert statuses.count(200) == 1, statuses
        assert statuses.count(401) == 63, statuses
    assert gw.counter("gateguard.once.replay_denied") >= rounds * 63


def test_with_ip_exactly_one_of_32_racing_ips_owns_the_token(gw, key):
    sources = [f"127.0.1.{i}" for i in range(1, 33)]
    for _ in range(10):
        token = fresh(key)
        statuses = race(gw.port, "/withip/x", token, sources)
        assert statuses.count(200) == 1, statuses
        assert statuses.count(401) == 31, statuses
        winner = sources[statuses.index(200)]
        # ...and it stays the owner, whoever asks next.
        assert call(gw.port, "/withip/x", token, winner)[0] == 200
        loser = next(s for s in sources if s != winner)
        assert call(gw.port, "/withip/x", token, loser)[0] == 401


def test_races_really_spread_over_both_workers(gw):
    # Envoy logs which worker thread handled what; both must have served requests.
    stats = gw.stats()
    per_worker = [v for k, v in stats.items() if k.startswith("listener.") and k.endswith(".downstream_cx_total") and "worker_" in k]
    assert len([v for v in per_worker if int(v) > 0]) >= 2, per_worker


def test_full_store_refuses_new_tokens_and_says_so(gw, key):
    tokens = [fresh(key) for _ in range(4)]
    for t in tokens[:3]:
        assert call(gw.small_port, "/small/x", t)[0] == 200
    status, body = call(gw.small_port, "/small/x", tokens[3])
    assert status == 503, body
    assert "store is full" in body
    # Live tokens are not forgotten to make room.
    assert call(gw.small_port, "/small/x", tokens[0])[0] == 401
    assert gw.counter("gateguard.small.replay_store_full") >= 1
    time.sleep(1.5)  # the warning is logged from the next tick
    assert "replay store full" in gw.log_text()


def test_store_occupancy_gauge(gw):
    time.sleep(1.2)
    stats = gw.stats()
    assert int(stats.get("wasmcustom.gateguard.replay_store_live_entries", "0")) > 0
