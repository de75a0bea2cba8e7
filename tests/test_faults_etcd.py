"""etcd failing under a real Envoy, every way a shared store fails between machines: stalled
(SIGSTOP), partitioned with requests in flight (answers lost, held, connections silently dead
or reset), and answering with errors (its `database space exceeded` alarm). etcd is real
(tests/etcd_harness.py); the partitions are a TCP proxy between Envoy and etcd
(tests/fault_proxy.py).

For each fault: every request is answered within `timeout_ms` with docs/policy.md's 503 (`deny`)
or goes upstream unchecked (`allow`), counted as the doc says; service comes back by itself
when the fault clears; Envoy's memory stays bounded; and, across the whole module, no
`without_ip` token is ever accepted twice. Envoy's log is checked for panics and critical lines
when it stops (conftest.start_envoy). What test_etcd_replay.py already covers (etcd killed, a
store that never answers, a missing cluster) is not repeated here."""

import http.client
import json
import signal
import threading
import time
import uuid

import pytest

import jwtkit
from conftest import start_envoy
from envoy_harness import compose, filter_config, free_port, gateway
from etcd_harness import Etcd
from fault_proxy import FaultProxy

ISS = "https://login.microsoftonline.com/tenant/v2.0"
AUD = "api://processfactorial"
UNAVAILABLE = {"statusCode": 503, "message": "Replay protection unavailable: the shared replay store did not answer"}
REPLAY = {"statusCode": 401, "message": "Token replay detected"}
TIMEOUT_MS = 500
# How late past timeout_ms an answer may come on 2 noisy cores running Envoy, etcd and the proxy.
MARGIN = 1.5
X, Y = "203.0.113.20", "203.0.113.21"
# Envoy's HTTP/2 keepalive on the etcd cluster (gateguard render): a ping every 10 s, answered
# within 3 s, or the connection is closed.
KEEPALIVE_SECONDS = 13
RSS_BOUND_KIB = 32 * 1024

# Every (port, path, token) that got a 200 from a `without_ip` API with replay checked: each is
# sent again at the end, and must be refused.
ACCEPTED = []


@pytest.fixture(scope="module")
def key():
    return jwtkit.Key("ed", "faults-1")


def api(name, mode, key):
    return jwtkit.replay_api(name, mode, key, ISS, AUD)


def policy(apis, **etcd):
    return {"apis": apis, "client_ip": {"trusted_proxy_hops": 1, "trusted_proxies": ["127.0.0.1/32"]},
            "replay_store": {"etcd": {"timeout_ms": TIMEOUT_MS, **etcd}}}


@pytest.fixture(scope="module")
def etcd():
    store = Etcd("faults").start()
    yield store
    store.remove()


@pytest.fixture(scope="module")
def proxy(etcd):
    p = FaultProxy(etcd.client_port)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def small_etcd():
    """An etcd with a 1 MiB quota: easily filled until it raises its NOSPACE alarm."""
    store = Etcd("faults-small", extra_args=["--quota-backend-bytes", str(1024 * 1024)]).start()
    yield store
    store.remove()


@pytest.fixture(scope="module")
def gw(request, key, proxy, small_etcd, echo_upstream):
    ports = {"deny": free_port(), "allow": free_port(), "small": free_port()}
    gateways = [
        ("deny", policy([api("once", "without_ip", key), api("withip", "with_ip", key)]), proxy.endpoint),
        ("allow", policy([api("open", "without_ip", key)], prefix="/gateguard/open/", on_unavailable="allow"),
         proxy.endpoint),
        ("small", policy([api("small", "without_ip", key)], prefix="/gateguard/small/", cluster="etcd_small"),
         small_etcd.endpoint),
    ]
    config = compose([gateway(name, ports[name], pol, echo_upstream, etcd=endpoint)
                      for name, pol, endpoint in gateways], free_port())
    # A VM (and so counters and a cache) of its own per policy, as docs/operations.md has
    # operators do for several policies in one Envoy.
    for name, *_ in gateways:
        filter_config(config, name)["vm_config"]["vm_id"] = name
    envoy = start_envoy(request, config, concurrency=2)
    envoy.ports = ports
    return envoy


_n = [0]


def fresh(key):
    _n[0] += 1
    return jwtkit.token(key, jwtkit.claims(ISS, AUD, ttl=600, jti=f"f{_n[0]}-{uuid.uuid4().hex}"))


class Answer:
    def __init__(self, status, body, seconds):
        self.status, self.body, self.seconds = status, body, seconds

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<{self.status} after {self.seconds:.2f}s {self.body[:160]!r}>"


def call(gw, name, path, token, ip=X):
    conn = http.client.HTTPConnection("127.0.0.1", gw.ports[name], timeout=30)
    try:
        started = time.monotonic()
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": ip})
        r = conn.getresponse()
        body = r.read().decode("utf-8", "replace")
        answer = Answer(r.status, body, time.monotonic() - started)
    finally:
        conn.close()
    if answer.status == 200 and path.startswith(("/once/", "/small/")):
        ACCEPTED.append((name, path, token))
    return answer


def burst(gw, name, path, tokens, ip=X):
    """The tokens sent at once, each on its own connection; their answers, in order."""
    answers = [None] * len(tokens)

    def one(i, t):
        answers[i] = call(gw, name, path, t, ip)

    threads = [threading.Thread(target=one, args=(i, t)) for i, t in enumerate(tokens)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return answers


def assert_unavailable_in_time(answer):
    assert answer.status == 503 and answer.json() == UNAVAILABLE, answer
    assert answer.seconds <= TIMEOUT_MS / 1000 + MARGIN, answer


def counter(gw, api_name, name):
    try:
        return gw.counter(f"gateguard.{api_name}.{name}")
    except KeyError:
        return 0


def counters(gw, api_name):
    return {n: counter(gw, api_name, n) for n in
            ("etcd_errors", "etcd_timeouts", "replay_unavailable", "replay_unchecked", "allowed")}


def grew(before, after):
    return {k: after[k] - before[k] for k in before}


def recovered(gw, name, path, key, within):
    """Seconds until a fresh token is accepted again (bounded by `within`), and the 503s meanwhile."""
    start = time.monotonic()
    refused = 0
    while time.monotonic() - start < within:
        r = call(gw, name, path, fresh(key))
        if r.status == 200:
            return time.monotonic() - start, refused
        assert_unavailable_in_time(r)
        refused += 1
        time.sleep(0.2)
    raise AssertionError(f"{name}{path}: no recovery within {within}s")


def refused_during(gw, proxy, mode, key, n=4):
    """Puts the link in `mode` and sends `n` fresh tokens at once: each must get the 503 in
    time. Returns the tokens and their answers."""
    tokens = [fresh(key) for _ in range(n)]
    proxy.set(mode)
    answers = burst(gw, "deny", "/once/x", tokens)
    for a in answers:
        assert_unavailable_in_time(a)
    return tokens, answers


def settle(gw, tokens):
    """Tokens a 503 answered while etcd could not: each was recorded (if etcd carried out the
    transaction after the gateway gave up) or not; either way it is accepted at most once from
    now on. Returns (spent, still unused) counts."""
    spent = unused = 0
    for t in tokens:
        r = call(gw, "deny", "/once/x", t)
        if r.status == 200:
            unused += 1
            r = call(gw, "deny", "/once/x", t)
        else:
            spent += 1
        assert r.status == 401 and r.json() == REPLAY, r
    return spent, unused


@pytest.fixture(autouse=True)
def healed(proxy, etcd, gw, key):
    """Whatever a test did (or left half done when it failed), the network and etcd are whole
    again after it: connections a fault may have left mid-frame are reset, and the gateway
    has reconnected before the next test."""
    yield
    proxy.heal()
    if etcd.running():
        etcd.proc.send_signal(signal.SIGCONT)
    proxy.cut()
    time.sleep(0.5)  # the resets have reached Envoy (the proxy's readers notice within 0.1 s)
    for _ in range(5):  # on every worker, each with its own connections
        recovered(gw, "deny", "/once/x", key, within=KEEPALIVE_SECONDS + 15)


def test_a_stalled_etcd_is_a_timeout_and_what_it_commits_late_stays_spent(gw, etcd, key):
    """etcd frozen (SIGSTOP) with a burst in flight: each request is answered at the timeout
    (503, or unchecked with `allow`); once etcd runs again, what it carried out after the
    gateway gave up is spent, what it did not is not, and no token is accepted twice
    (docs/policy.md, "When etcd cannot answer"); a with_ip token's owner is the IP that sent
    it."""
    spent = fresh(key)
    assert call(gw, "deny", "/once/x", spent).status == 200
    rss = gw.rss_kib()
    deny, allow, withip = counters(gw, "once"), counters(gw, "open"), counters(gw, "withip")
    stalled = [fresh(key) for _ in range(6)]
    owned = fresh(key)
    etcd.proc.send_signal(signal.SIGSTOP)
    try:
        answers = burst(gw, "deny", "/once/x", stalled)
        for a in answers:
            assert_unavailable_in_time(a)
        assert_unavailable_in_time(call(gw, "deny", "/withip/x", owned, ip=X))
        unchecked = burst(gw, "allow", "/open/x", [fresh(key) for _ in range(3)])
        for a in unchecked:
            assert a.status == 200 and a.seconds <= TIMEOUT_MS / 1000 + MARGIN, a
        # What this gateway decided itself it still knows, etcd or not.
        r = call(gw, "deny", "/once/x", spent)
        assert r.status == 401 and r.json() == REPLAY, r
    finally:
        etcd.proc.send_signal(signal.SIGCONT)
    took, late = recovered(gw, "deny", "/once/x", key, within=15)
    d, a = grew(deny, counters(gw, "once")), grew(allow, counters(gw, "open"))
    assert d["replay_unavailable"] == len(stalled) + late
    assert grew(withip, counters(gw, "withip"))["replay_unavailable"] == 1
    assert d["etcd_timeouts"] >= len(stalled) and d["etcd_errors"] == 0, d
    assert a["replay_unchecked"] == 3 and a["etcd_timeouts"] >= 3, a
    spent_late, unused = settle(gw, stalled)
    assert call(gw, "deny", "/withip/x", owned, ip=X).status == 200
    r = call(gw, "deny", "/withip/x", owned, ip=Y)
    assert r.status == 401 and r.json() == REPLAY, r
    growth = gw.rss_kib() - rss
    print(f"stall: {len(stalled)} requests answered in <= {max(x.seconds for x in answers):.2f}s; "
          f"recovered {took:.1f}s after SIGCONT; {spent_late} spent late, {unused} unused; RSS +{growth} KiB")
    assert growth < RSS_BOUND_KIB


def test_answers_lost_mid_transaction_fail_closed_and_the_committed_token_is_spent(gw, proxy, key):
    """The partition falls between etcd receiving a request and its answer arriving, then the
    connections die (reset): 503 in time; afterwards, a token etcd recorded is spent, one it
    never recorded is still unused, and none is accepted twice."""
    before = counters(gw, "once")
    lost, answers = refused_during(gw, proxy, "answers_lost", key)
    proxy.cut()
    proxy.heal()
    took, late = recovered(gw, "deny", "/once/x", key, within=15)
    spent, unused = settle(gw, lost)
    d = grew(before, counters(gw, "once"))
    assert d["replay_unavailable"] == len(lost) + late and d["etcd_timeouts"] >= len(lost), d
    print(f"answers lost: {len(lost)} requests answered in <= {max(x.seconds for x in answers):.2f}s; "
          f"recovered {took:.1f}s after the reset; {spent} spent, {unused} unused")


def test_reset_connections_are_errors_and_the_next_request_reconnects(gw, proxy, key):
    before = counters(gw, "once")
    assert call(gw, "deny", "/once/x", fresh(key)).status == 200  # connections are open
    proxy.cut()
    took, refused = recovered(gw, "deny", "/once/x", key, within=10)
    d = grew(before, counters(gw, "once"))
    assert d["allowed"] == 2 and d["replay_unavailable"] == refused, d
    assert d["etcd_errors"] + d["etcd_timeouts"] >= refused, d
    print(f"reset: accepted again after {took:.2f}s ({refused} refused meanwhile)")


def test_a_silently_dead_connection_is_dropped_by_keepalive_and_service_resumes(gw, proxy, key):
    """The link goes dark without a reset (black-holed both ways): every request meanwhile is a
    503 in time; after the link is back, the dead connections are noticed by Envoy's HTTP/2
    keepalive (render's etcd cluster) and new ones work, with no restart."""
    before = counters(gw, "once")
    rss = gw.rss_kib()
    assert call(gw, "deny", "/once/x", fresh(key)).status == 200
    proxy.set("blackhole")
    dark = time.monotonic()
    answers = []
    while time.monotonic() - dark < 3:
        answers.append(call(gw, "deny", "/once/x", fresh(key)))
    for a in answers:
        assert_unavailable_in_time(a)
    proxy.heal()
    took, late = recovered(gw, "deny", "/once/x", key, within=KEEPALIVE_SECONDS + 15)
    d = grew(before, counters(gw, "once"))
    assert d["replay_unavailable"] == len(answers) + late and d["etcd_timeouts"] >= len(answers), d
    growth = gw.rss_kib() - rss
    print(f"black hole: {len(answers)} requests refused in time; service back {took:.1f}s after the "
          f"link (keepalive {KEEPALIVE_SECONDS}s); RSS +{growth} KiB")
    assert growth < RSS_BOUND_KIB


def test_held_traffic_is_a_timeout_then_flows_late_without_harm(gw, proxy, key):
    """Packets held for a while (a congested or flapping link), then delivered: the requests
    waiting meanwhile get 503 in time; what etcd then carries out late is spent; nothing is
    accepted twice."""
    held, _ = refused_during(gw, proxy, "hold", key)
    proxy.heal()
    took, _ = recovered(gw, "deny", "/once/x", key, within=KEEPALIVE_SECONDS + 15)
    spent, unused = settle(gw, held)
    print(f"held: recovered {took:.1f}s after the link; {spent} spent late, {unused} unused")


def test_etcd_out_of_space_is_an_error_until_its_alarm_is_cleared(gw, small_etcd, key):
    """etcd refusing writes (`database space exceeded`, its NOSPACE alarm): 503 counted as etcd
    errors, tokens already spent stay spent, and service resumes as soon as the operator frees
    space and disarms the alarm, without touching Envoy."""
    spent = fresh(key)
    assert call(gw, "small", "/small/x", spent).status == 200
    before = counters(gw, "small")
    filled = 0
    for i in range(100):
        r = small_etcd.etcdctl("put", f"/filler/{i}", "x" * 100_000, check=False)
        if r.returncode != 0:
            break
        filled += 1
    assert "NOSPACE" in small_etcd.etcdctl("alarm", "list").stdout
    refused = [call(gw, "small", "/small/x", fresh(key)) for _ in range(3)]
    for a in refused:
        assert_unavailable_in_time(a)
    r = call(gw, "small", "/small/x", spent)
    assert r.status == 401 and r.json() == REPLAY, r
    d = grew(before, counters(gw, "small"))
    assert d["replay_unavailable"] == 3 and d["etcd_errors"] >= 3 and d["etcd_timeouts"] == 0, d
    # The operator's remedy (etcd's own runbook): free space, compact, defragment, disarm.
    small_etcd.etcdctl("del", "--prefix", "/filler/")
    status = json.loads(small_etcd.etcdctl("endpoint", "status", "-w", "json").stdout)
    small_etcd.etcdctl("compact", str(status[0]["Status"]["header"]["revision"]))
    small_etcd.etcdctl("defrag")
    small_etcd.etcdctl("alarm", "disarm")
    took, _ = recovered(gw, "small", "/small/x", key, within=10)
    # Refused while etcd was full: never recorded, so their first use is still ahead.
    assert call(gw, "small", "/small/x", fresh(key)).status == 200
    print(f"NOSPACE after {filled} puts of 100 kB; service back {took:.2f}s after the alarm was disarmed")


def test_no_token_was_ever_accepted_twice(gw, key):
    """Runs last: every token accepted in this module, sent again, is refused."""
    assert ACCEPTED, "nothing was accepted"
    for name, path, t in list(ACCEPTED):
        r = call(gw, name, path, t)
        assert r.status == 401 and r.json() == REPLAY, (name, path, r)
    print(f"{len(ACCEPTED)} accepted tokens, each refused when sent again")
