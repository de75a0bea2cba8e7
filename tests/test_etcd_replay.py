"""Replay protection across gateway replicas (docs/policy.md, "Replay across gateway replicas"), end to
end: a real etcd 3.5 (tests/etcd_harness.py) and two real Envoys rendered by `gateguard render
--etcd`, as two replicas of one gateway would run.

A `without_ip` token is accepted once across both gateways, even when 64 uses race over both; a
`with_ip` token belongs to the first client IP on either; a restarted gateway still knows every
live token; etcd's keys expire with their tokens through shared leases; a token this gateway
already decided costs no etcd call; etcd down, silent or not configured → 503 under `deny`
within `timeout_ms`, unchecked and counted under `allow`, and service resumes by itself; a
request with a body never goes upstream before etcd decided, and its body goes whole once it did
(counted once against `limits.max_body_bytes`); calls counted by subject count only tokens etcd
accepted; etcd over TLS, with client certificates, and with its own users (credentials from
Envoy's environment).

Client IPs are X-Forwarded-For values: every request comes from 127.0.0.1, the proxy the
policies trust. etcd is started once for the module, each group of Envoys once for its group."""

import http.client
import json
import math
import re
import select
import signal
import socket
import subprocess
import time
import uuid

import pytest

import jwtkit
import upstream
from certs import make_ca, make_leaf
from conftest import start_envoy
import envoy_harness
from envoy_harness import CLI, ROOT, compose, filter_config, free_port, gateway, render
from etcd_harness import Etcd, SilentStore

ISS = "https://login.microsoftonline.com/tenant/v2.0"
AUD = "api://processfactorial"
REPLAY = {"statusCode": 401, "message": "Token replay detected"}
UNAVAILABLE = "Replay protection unavailable"
PREFIX = "/gateguard/replay/"
# Entries live until exp + the largest clock skew a policy may allow + 1 s...
SKEW = 600
# ...rounded up to a window of this many seconds, one lease per window...
WINDOW = 10
# ...and this much longer, for gateway clocks running ahead.
SLACK = 60
# The machine is noisy (2 cores, several Envoys, etcd): how late past timeout_ms a 503 may come.
MARGIN = 1.5
MAIN_TIMEOUT_MS = 1000
X, Y = "203.0.113.10", "203.0.113.11"
# limits.max_body_bytes of the API that checks bodies and replay.
BODY_LIMIT = 1000


@pytest.fixture(scope="module")
def key():
    return jwtkit.Key("ed", "ed-1")  # fast to sign: the races need many fresh tokens


def jwt_api(name, mode, key):
    return jwtkit.replay_api(name, mode, key, ISS, AUD)


def policy(key, names=("once", "withip"), plain=None, **etcd):
    """Two JWT APIs, `without_ip` and `with_ip` (named `names`), behind a proxy at 127.0.0.1,
    with the replay history in etcd (`etcd`: the store's settings); `plain`: an API without
    replay protection."""
    once, withip = names
    apis = [jwt_api(once, "without_ip", key), jwt_api(withip, "with_ip", key)]
    if plain:
        apis.append({"name": plain, "path_prefix": f"/{plain}"})
    return {"apis": apis,
            "client_ip": {"trusted_proxy_hops": 1, "trusted_proxies": ["127.0.0.1/32"]},
            "replay_store": {"etcd": {"timeout_ms": MAIN_TIMEOUT_MS, **etcd}}}


def envoy_of(request, gateways, env=None):
    """One Envoy for `gateways` ([(name, port, policy, render options)]). Not quite as rendered:
    each policy gets a VM of its own (vm_id), as docs/operations.md has operators do for
    several policies in one Envoy."""
    upstream = request.getfixturevalue("echo_upstream")
    config = compose([gateway(name, port, pol, upstream, **opts) for name, port, pol, opts in gateways],
                     free_port())
    for name, *_ in gateways:
        filter_config(config, name)["vm_config"]["vm_id"] = name
    return config, (lambda config: start_envoy(request, config, env=env, concurrency=2))


_counter = [0]


def fresh(key, exp=None):
    _counter[0] += 1
    claims = jwtkit.claims(ISS, AUD, ttl=600, jti=f"e{_counter[0]}-{time.time_ns()}")
    if exp is not None:
        claims["exp"] = exp
    return jwtkit.token(key, claims)


class Answer:
    def __init__(self, status, body, seconds, headers=None):
        self.status, self.body, self.seconds = status, body, seconds
        self.headers = headers or {}

    def json(self):
        return json.loads(self.body)

    def unavailable(self):
        try:
            body = self.json()
        except ValueError:
            return False
        return self.status == 503 and body.get("statusCode") == 503 \
            and body.get("message", "").startswith(UNAVAILABLE)

    def __repr__(self):
        return f"<{self.status} after {self.seconds:.2f}s {self.body[:200]!r}>"


def call(port, path, token, ip=X, conn=None, timeout=20):
    """GET `path` with `token` for client `ip` (X-Forwarded-For from the trusted proxy), on
    `conn` (kept open: the same Envoy worker) or a new connection."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        started = time.monotonic()
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": ip})
        r = conn.getresponse()
        body = r.read().decode("utf-8", "replace")
        return Answer(r.status, body, time.monotonic() - started, {k.lower(): v for k, v in r.getheaders()})
    finally:
        if own:
            conn.close()


def post(port, path, token, body, ip=X, timeout=20):
    """POST `path` with `token` and `body` (Content-Length) for client `ip`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        started = time.monotonic()
        conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": ip,
                                                       "Content-Type": "application/octet-stream"})
        r = conn.getresponse()
        text = r.read().decode("utf-8", "replace")
        return Answer(r.status, text, time.monotonic() - started, {k.lower(): v for k, v in r.getheaders()})
    finally:
        conn.close()


class ChunkedPost:
    """A POST whose chunked body the test sends piece by piece on a raw connection, so that
    pieces can arrive while the request waits for etcd and after."""

    def __init__(self, port, path, token, ip=X):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.started = time.monotonic()
        head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Transfer-Encoding: chunked",
                f"Authorization: Bearer {token}", f"X-Forwarded-For: {ip}"]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())

    def answered(self):
        return bool(select.select([self.sock], [], [], 0)[0])

    def send(self, chunk):
        """One chunk (b"" ends the body); False once the gateway answered or closed."""
        if self.answered():
            return False
        try:
            self.sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            return False
        return True

    def answer(self):
        try:
            r = http.client.HTTPResponse(self.sock)
            r.begin()
            text = r.read().decode("utf-8", "replace")
            return Answer(r.status, text, time.monotonic() - self.started, {k.lower(): v for k, v in r.getheaders()})
        finally:
            self.sock.close()


def probe():
    """A marker for the query string, to find what of a request reached the upstream
    (tests/upstream.py `received`)."""
    return f"probe={uuid.uuid4().hex}"


class Stopped:
    """etcd frozen (SIGSTOP) for the block: its port still accepts, nothing answers."""

    def __init__(self, etcd):
        self.etcd = etcd

    def __enter__(self):
        self.etcd.proc.send_signal(signal.SIGSTOP)
        return self

    def __exit__(self, *exc):
        self.etcd.proc.send_signal(signal.SIGCONT)


def counter(envoy, api, name):
    """`gateguard.<api>.<name>`, 0 while the filter has not defined it."""
    try:
        return envoy.counter(f"gateguard.{api}.{name}")
    except KeyError:
        return 0


def race(requests):
    """Sends every (port, path, token, ip) at the same instant; returns the statuses in order."""
    return envoy_harness.race([
        (port, path, {"Authorization": f"Bearer {token}", "X-Forwarded-For": ip}, "127.0.0.1")
        for port, path, token, ip in requests])


def new_entries(etcd, before, prefix=PREFIX):
    """Keys under `prefix` that were not in `before` (an earlier `etcd.entries(prefix)`)."""
    return {k: v for k, v in etcd.entries(prefix).items() if k not in before}


def spend(etcd, use, prefix=PREFIX):
    """Runs `use()` (which must record exactly one token) and returns its (key, entry)."""
    before = etcd.entries(prefix)
    answer = use()
    assert answer.status == 200, answer
    added = new_entries(etcd, before, prefix)
    assert len(added) == 1, added
    return next(iter(added.items()))


def assert_unavailable_in_time(answer, timeout_ms):
    assert answer.unavailable(), answer
    assert answer.seconds <= timeout_ms / 1000 + MARGIN, answer


# ---- render ---------------------------------------------------------------------------------

def test_render_refuses_etcd_without_endpoints_and_endpoints_without_etcd(key):
    with pytest.raises(RuntimeError, match="--etcd HOST:PORT"):
        render(policy(key))
    with pytest.raises(RuntimeError, match="--etcd is for a policy with replay_store.etcd"):
        render({"apis": [{"name": "a", "path_prefix": "/a"}]}, etcd="127.0.0.1:2379")
    with pytest.raises(RuntimeError, match="--etcd-cert needs --etcd-key"):
        render(policy(key), etcd="127.0.0.1:2379", etcd_ca="ca.crt", etcd_cert="client.crt")


def test_render_filter_only_swaps_an_etcd_policy_under_the_running_bootstrap(key, tmp_path):
    # The cluster is in the bootstrap already: only the filter file is written, no --etcd needed.
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy(key)))
    r = subprocess.run([str(CLI), "render", "--policy", str(path), "--ecds-dir", str(tmp_path / "ecds"),
                        "--filter-only"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "ecds" / "gateguard-filter.yaml").read_text()
    assert "- GATEGUARD_ETCD_USERNAME\n" in text and "- GATEGUARD_ETCD_PASSWORD\n" in text


# ---- two gateways sharing one etcd ----------------------------------------------------------

@pytest.fixture(scope="module")
def etcd():
    store = Etcd("replay").start()
    yield store
    store.remove()


@pytest.fixture(scope="module")
def pair(request, key, etcd):
    """Gateways A and B, two Envoys sharing `etcd`. A also serves `open`: the same APIs under
    `on_unavailable: allow` (their own names and prefix)."""
    ports = {"a": free_port(), "a_open": free_port(), "b": free_port()}
    main = policy(key)
    main["apis"].append({**jwt_api("quota_once", "without_ip", key),
                         "quota": {"by": "subject", "calls": 2, "renewal_period_seconds": 3600}})
    main["apis"].append({**jwt_api("body_once", "without_ip", key), "limits": {"max_body_bytes": BODY_LIMIT}})
    opened = policy(key, names=("open_once", "open_withip"), prefix="/gateguard/open/", on_unavailable="allow")
    a, start_a = envoy_of(request, [("main", ports["a"], main, {"etcd": etcd.endpoint}),
                                    ("open", ports["a_open"], opened, {"etcd": etcd.endpoint})])
    b, start_b = envoy_of(request, [("main", ports["b"], main, {"etcd": etcd.endpoint})])
    pair = type("Pair", (), {})()
    pair.a, pair.b, pair.ports = start_a(a), start_b(b), ports
    return pair


def test_without_ip_token_spent_on_a_is_refused_on_b(pair, key):
    t = fresh(key)
    assert call(pair.ports["a"], "/once/x", t).status == 200
    r = call(pair.ports["b"], "/once/x", t)
    assert r.status == 401 and r.json() == REPLAY, r
    r = call(pair.ports["a"], "/once/x", t, ip=Y)
    assert r.status == 401 and r.json() == REPLAY, r
    # B decides its own first uses, too.
    t = fresh(key)
    assert call(pair.ports["b"], "/once/x", t).status == 200
    assert call(pair.ports["a"], "/once/x", t).status == 401


def test_with_ip_token_owned_through_a_is_refused_for_another_ip_through_b(pair, key):
    t = fresh(key)
    assert call(pair.ports["a"], "/withip/x", t, ip=X).status == 200
    r = call(pair.ports["b"], "/withip/x", t, ip=Y)
    assert r.status == 401 and r.json() == REPLAY, r
    # The owner keeps working on both.
    assert call(pair.ports["b"], "/withip/x", t, ip=X).status == 200
    assert call(pair.ports["a"], "/withip/x", t, ip=X).status == 200
    assert call(pair.ports["a"], "/withip/x", t, ip=Y).status == 401


def test_each_key_is_the_prefix_and_a_sha256_and_holds_the_owner(pair, etcd, key):
    port_a, port_b = pair.ports["a"], pair.ports["b"]
    shape = re.compile(re.escape(PREFIX) + "[0-9a-f]{64}")
    k1, once = spend(etcd, lambda: call(port_a, "/once/x", fresh(key)))
    k2, v4 = spend(etcd, lambda: call(port_b, "/withip/x", fresh(key), ip="10.1.2.3"))
    k3, v6 = spend(etcd, lambda: call(port_a, "/withip/x", fresh(key), ip="2001:db8:0:0::7"))
    for k in (k1, k2, k3):
        assert shape.fullmatch(k), k
    assert (once["value"], v4["value"], v6["value"]) == ("once", "ip:10.1.2.3", "ip:2001:db8::7")
    # The same token is the same key, whichever gateway writes it: no second key for a replay.
    before = etcd.entries(PREFIX)
    t = fresh(key)
    assert call(port_a, "/once/x", t).status == 200
    assert call(port_b, "/once/x", t).status == 401
    assert len(new_entries(etcd, before)) == 1


def test_keys_expire_with_their_token_through_shared_leases(pair, etcd, key):
    """Each key's lease ends 60 s after E = exp + skew + 1 rounded up to 10 s (docs/policy.md,
    "How entries expire"); tokens whose E falls in the same 10 s share one lease, whichever
    gateway wrote them."""
    now = int(time.time())
    # Mid-window, so a second of drift cannot move an E into the next window.
    e = (now + 900 + SKEW + 1) // WINDOW * WINDOW + WINDOW // 2
    exp = e - SKEW - 1
    uses = [("a", exp), ("b", exp), ("a", exp + 300), ("b", exp + WINDOW)]
    found = []
    for gw, token_exp in uses:
        k, entry = spend(etcd, lambda: call(pair.ports[gw], "/once/x", fresh(key, exp=token_exp)))
        assert entry["lease"] != 0, (k, entry)
        found.append((token_exp, entry["lease"]))
    for token_exp, lease in found:
        left, granted = etcd.lease(lease)
        now = time.time()
        end = token_exp + SKEW + 1
        assert end + SLACK - 2 <= now + left <= end + SLACK + WINDOW + 3, (token_exp, now, left, granted)
        assert abs(now + left - (math.ceil(end / WINDOW) * WINDOW + SLACK)) <= 3, (token_exp, now, left)
    leases = [lease for _, lease in found]
    assert leases[0] == leases[1], "A and B put tokens of one window under different leases"
    assert len(set(leases)) == 3, f"tokens of different windows share a lease: {leases}"


def test_a_decided_token_costs_no_etcd_call_on_the_same_gateway(pair, key):
    a, port = pair.a, pair.ports["a"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)  # one connection: one worker
    try:
        for api, second_status in (("once", 401), ("withip", 200)):
            t = fresh(key)
            assert call(port, f"/{api}/x", t, conn=conn).status == 200
            calls, hits = counter(a, api, "etcd_calls"), counter(a, api, "replay_cache_hits")
            assert calls > 0, f"{api}: the first use did not ask etcd"
            assert call(port, f"/{api}/x", t, conn=conn).status == second_status
            assert counter(a, api, "etcd_calls") == calls, f"{api}: the second use asked etcd"
            assert counter(a, api, "replay_cache_hits") == hits + 1, api
    finally:
        conn.close()


def test_exactly_one_of_64_concurrent_uses_across_both_gateways_wins(pair, key):
    rounds = 20
    for n in range(rounds):
        t = fresh(key)
        # Interleaved, so neither gateway's requests all start first.
        requests = [(pair.ports["a" if i % 2 else "b"], "/once/x", t, f"198.51.100.{i + 1}") for i in range(64)]
        statuses = race(requests)
        assert statuses.count(200) == 1, (n, statuses)
        assert statuses.count(401) == 63, (n, statuses)


def test_exactly_one_of_16_racing_ips_across_both_gateways_owns_the_token(pair, key):
    ips = [f"198.51.100.{i}" for i in range(1, 17)]
    for n in range(5):
        t = fresh(key)
        requests = [(pair.ports["a" if i % 2 else "b"], "/withip/x", t, ip) for i, ip in enumerate(ips)]
        statuses = race(requests)
        assert statuses.count(200) == 1 and statuses.count(401) == 15, (n, statuses)
        winner = ips[statuses.index(200)]
        for port in (pair.ports["a"], pair.ports["b"]):
            assert call(port, "/withip/x", t, ip=winner).status == 200
            assert call(port, "/withip/x", t, ip=next(ip for ip in ips if ip != winner)).status == 401


def test_a_restarted_gateway_still_knows_spent_and_owned_tokens(pair, key):
    port = pair.ports["a"]
    spent, owned = fresh(key), fresh(key)
    assert call(port, "/once/x", spent).status == 200
    assert call(port, "/withip/x", owned, ip=X).status == 200
    assert not pair.a.problems(), pair.a.problems()
    pair.a.stop()
    pair.a.start()  # same configuration, same ports; its shared data starts empty
    assert call(port, "/once/x", spent).status == 401
    r = call(port, "/withip/x", owned, ip=Y)
    assert r.status == 401 and r.json() == REPLAY, r
    assert call(port, "/withip/x", owned, ip=X).status == 200
    assert call(port, "/once/x", fresh(key)).status == 200


# ---- request bodies while etcd decides -----------------------------------------------------------

def test_a_request_with_a_body_waits_for_a_stopped_etcd_and_never_reaches_upstream(pair, etcd, key):
    """A body arriving while the request waits for etcd must not resume it (a body callback
    answering Continue would resume a request paused at its headers, sending it upstream before
    etcd decided). Envoy 1.40 does not call the body callback of a request paused at its headers
    (proxy-wasm-cpp-host turns that pause into StopAllIterationAndWatermark: the body waits in
    Envoy and reaches the filter after the resume), so this holds with or without the filter's
    Pause while waiting; it is the contract, whatever the host."""
    port = pair.ports["a"]
    unavailable = counter(pair.a, "once", "replay_unavailable")
    with Stopped(etcd):
        marker = probe()
        r = post(port, f"/once/x?{marker}", fresh(key), b"x" * 4096)
        assert_unavailable_in_time(r, MAIN_TIMEOUT_MS)
        assert upstream.received(marker) == []
        # The body in pieces, some of them arriving while the request waits.
        marker = probe()
        p = ChunkedPost(port, f"/once/x?{marker}", fresh(key))
        for piece in (b"a" * 500, b"b" * 500, b""):
            assert p.send(piece)
            time.sleep(0.1)
        assert_unavailable_in_time(p.answer(), MAIN_TIMEOUT_MS)
        assert upstream.received(marker) == []
    assert counter(pair.a, "once", "replay_unavailable") == unavailable + 2


def test_with_on_unavailable_allow_a_body_goes_upstream_whole_after_the_timeout(pair, etcd, key):
    with Stopped(etcd):
        marker = probe()
        body = b"allowed-" * 512
        r = post(pair.ports["a_open"], f"/open_once/x?{marker}", fresh(key), body)
    assert r.status == 200 and json.loads(r.body)["body"] == body.decode(), r
    [seen] = upstream.received(marker)
    assert (seen.complete, seen.body_bytes) == (True, len(body)), seen


def test_a_body_reaches_upstream_whole_once_etcd_accepts_the_token(pair, etcd, key):
    port = pair.ports["b"]
    marker = probe()
    body = b"0123456789abcdef" * 256
    r = post(port, f"/once/x?{marker}", fresh(key), body)
    assert r.status == 200 and json.loads(r.body)["body"] == body.decode(), r
    [seen] = upstream.received(marker)
    assert (seen.complete, seen.body_bytes) == (True, len(body)), seen
    # A chunked body: its first piece arrives while etcd is frozen, the rest once the request
    # went upstream.
    marker = probe()
    pieces = [b"first-" * 100, b"second-" * 100, b"third-" * 100]
    with Stopped(etcd):
        p = ChunkedPost(port, f"/once/x?{marker}", fresh(key))
        assert p.send(pieces[0])
        time.sleep(0.3)
    assert wait_for_upstream(marker), "the request did not go upstream once etcd answered"
    for piece in pieces[1:] + [b""]:
        assert p.send(piece)
        time.sleep(0.05)
    r = p.answer()
    assert r.status == 200, r
    assert json.loads(r.body)["body"] == b"".join(pieces).decode(), r
    [seen] = upstream.received(marker)
    assert (seen.complete, seen.body_bytes) == (True, sum(map(len, pieces))), seen


def wait_for_upstream(marker, timeout=5):
    return envoy_harness.wait_for(lambda: upstream.received(marker), timeout=timeout, interval=0.02)


def frozen_then_streamed(pair, etcd, key, port, path, during, after):
    """POSTs a chunked body to `path`: the pieces `during` arrive while etcd is frozen (the
    request waits), the pieces `after` once it went upstream or was answered. Returns the answer."""
    with Stopped(etcd):
        p = ChunkedPost(port, path, fresh(key))
        for piece in during:
            assert p.send(piece)
            time.sleep(0.1)
    marker = path.split("?", 1)[1]
    # Then the rest, once the request went upstream (or was answered already).
    envoy_harness.wait_for(lambda: upstream.received(marker) or p.answered(), timeout=5, interval=0.02)
    for piece in after:
        if not p.send(piece):
            break
        time.sleep(0.1)
    return p.answer()


def test_a_body_that_arrived_while_etcd_decided_is_counted_once_against_the_limit(pair, etcd, key):
    port = pair.ports["a"]
    # Exactly at the limit, part of it held while etcd decides: counted once, it passes.
    marker = probe()
    pieces = [b"a" * 400, b"b" * 400, b"c" * 200]
    r = frozen_then_streamed(pair, etcd, key, port, f"/body_once/x?{marker}", pieces[:1], pieces[1:] + [b""])
    assert r.status == 200 and json.loads(r.body)["body"] == b"".join(pieces).decode(), r
    [seen] = upstream.received(marker)
    assert (seen.complete, seen.body_bytes) == (True, BODY_LIMIT), seen
    marker = probe()
    body = b"d" * BODY_LIMIT
    r = post(port, f"/body_once/x?{marker}", fresh(key), body)
    assert r.status == 200 and json.loads(r.body)["body"] == body.decode(), r


def test_a_body_crossing_the_limit_after_etcd_decided_is_refused_then(pair, etcd, key):
    port = pair.ports["a"]
    denied = counter(pair.a, "body_once", "limit_denied")
    marker = probe()
    r = frozen_then_streamed(pair, etcd, key, port, f"/body_once/x?{marker}", [b"e" * 400],
                             [b"f" * 400, b"g" * 400, b"h" * 400, b""])
    assert r.status == 413 and r.json() == {"statusCode": 413, "message": "Request entity too large"}, r
    records = upstream.received(marker)
    assert len(records) <= 1, records
    for seen in records:
        assert seen.done.wait(10), seen
        assert not seen.complete and seen.answered is None and seen.body_bytes <= BODY_LIMIT, seen
    # Over the limit already while etcd decided: refused once it resumes, never forwarded whole.
    marker = probe()
    r = frozen_then_streamed(pair, etcd, key, port, f"/body_once/x?{marker}", [b"i" * 700, b"j" * 700], [b""])
    assert r.status == 413, r
    for seen in upstream.received(marker):
        assert seen.done.wait(10), seen
        assert not seen.complete and seen.answered is None and seen.body_bytes <= BODY_LIMIT, seen
    assert counter(pair.a, "body_once", "limit_denied") == denied + 2


def test_a_token_etcd_refuses_does_not_spend_the_subjects_quota(pair, etcd, key):
    """Calls counted by subject count valid tokens only (docs/policy.md, "Rate limits and
    quotas"): a token etcd says was spent on the other gateway, or one etcd could not decide,
    is refused and spends nothing."""
    sub = f"quota-{uuid.uuid4().hex[:8]}"

    def token():
        _counter[0] += 1
        claims = jwtkit.claims(ISS, AUD, ttl=600, sub=sub, jti=f"q{_counter[0]}-{time.time_ns()}")
        return jwtkit.token(key, claims)

    spent = token()
    assert call(pair.ports["a"], "/quota_once/x", spent).status == 200
    r = call(pair.ports["b"], "/quota_once/x", spent)
    assert r.status == 401 and r.json() == REPLAY, r
    with Stopped(etcd):
        assert_unavailable_in_time(call(pair.ports["b"], "/quota_once/x", token()), MAIN_TIMEOUT_MS)
    # Each gateway counts alone: on B the subject still has both calls.
    remaining = []
    for _ in range(2):
        r = call(pair.ports["b"], "/quota_once/x", token())
        assert r.status == 200, r
        remaining.append(r.headers.get("x-ratelimit-remaining"))
    assert remaining == ["1", "0"]
    r = call(pair.ports["b"], "/quota_once/x", token())
    assert r.status == 403 and r.json()["message"].startswith("Out of call volume quota."), r


# After the lease test on purpose: a restarted etcd grants every lease its full TTL again.
def test_etcd_down_denies_in_time_or_lets_through_when_allowed_and_recovers(pair, etcd, key):
    a, b, ports = pair.a, pair.b, pair.ports
    spent_on_a = fresh(key)
    assert call(ports["a"], "/once/x", spent_on_a).status == 200
    failures = counter(a, "once", "etcd_errors") + counter(a, "once", "etcd_timeouts")
    denied_while_down = []
    etcd.kill()
    try:
        for port in (ports["a"], ports["b"], ports["a"]):
            t = fresh(key)
            assert_unavailable_in_time(call(port, "/once/x", t), MAIN_TIMEOUT_MS)
            denied_while_down.append(t)
        assert_unavailable_in_time(call(ports["b"], "/withip/x", fresh(key)), MAIN_TIMEOUT_MS)
        assert counter(a, "once", "etcd_errors") + counter(a, "once", "etcd_timeouts") > failures
        # What this gateway decided itself it still knows.
        r = call(ports["a"], "/once/x", spent_on_a)
        assert r.status == 401 and r.json() == REPLAY, r
        # `allow`: through, unchecked, counted.
        for api in ("open_once", "open_withip"):
            unchecked = counter(a, api, "replay_unchecked")
            for _ in range(2):
                r = call(ports["a_open"], f"/{api}/x", fresh(key))
                assert r.status == 200, r
                assert r.seconds <= MAIN_TIMEOUT_MS / 1000 + MARGIN, r
            assert counter(a, api, "replay_unchecked") == unchecked + 2, api
    finally:
        etcd.start()
    # Service resumes by itself (bounded: Envoy reconnects on the next request).
    deadline = time.time() + 30
    while True:
        r = call(ports["a"], "/once/x", fresh(key))
        if r.status == 200 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert r.status == 200, f"gateway A did not recover after etcd came back: {r}"
    assert call(ports["b"], "/once/x", fresh(key)).status == 200
    # etcd kept what it knew (B never saw this token)...
    assert call(ports["b"], "/once/x", spent_on_a).status == 401
    # ...and a token refused while etcd was down was never recorded: its first use is still ahead.
    assert call(ports["b"], "/once/x", denied_while_down[0]).status == 200


# ---- an etcd that never answers, a cluster that does not exist ------------------------------

class TestUnreachableStore:
    SILENT_TIMEOUT_MS = 300

    @pytest.fixture(scope="class")
    def silent(self):
        store = SilentStore()
        yield store
        store.stop()

    @pytest.fixture(scope="class")
    def gw(self, request, key, silent):
        ports = {"silent": free_port(), "missing": free_port()}
        silent_policy = policy(key, names=("silent_once", "silent_withip"), cluster="etcd_silent",
                               timeout_ms=self.SILENT_TIMEOUT_MS)
        missing_policy = policy(key, names=("missing_once", "missing_withip"), plain="missing_plain",
                                cluster="etcd_missing")
        config, start = envoy_of(request, [
            ("silent", ports["silent"], silent_policy, {"etcd": silent.endpoint}),
            ("missing", ports["missing"], missing_policy, {"etcd": "127.0.0.1:9"})])
        # Not as rendered: the cluster the second policy names is taken out, as a hand-edited
        # bootstrap (or a typo in the policy) would leave it.
        clusters = config["static_resources"]["clusters"]
        clusters[:] = [c for c in clusters if c["name"] != "etcd_missing"]
        envoy = start(config)
        envoy.ports = ports
        return envoy

    def test_a_store_that_never_answers_is_a_timeout(self, gw, key, silent):
        timeouts = counter(gw, "silent_once", "etcd_timeouts")
        errors = counter(gw, "silent_once", "etcd_errors")
        for _ in range(6):
            r = call(gw.ports["silent"], "/silent_once/x", fresh(key))
            assert_unavailable_in_time(r, self.SILENT_TIMEOUT_MS)
            assert r.seconds >= self.SILENT_TIMEOUT_MS / 1000 * 0.8, f"answered before the timeout: {r}"
        assert_unavailable_in_time(call(gw.ports["silent"], "/silent_withip/x", fresh(key)), self.SILENT_TIMEOUT_MS)
        # Envoy ends a call past its timeout with gRPC UNAVAILABLE "upstream request timeout":
        # still a timeout, not an error.
        assert (counter(gw, "silent_once", "etcd_timeouts") - timeouts,
                counter(gw, "silent_once", "etcd_errors") - errors) == (6, 0)
        assert silent.accepted >= 1, "Envoy never reached the silent store"

    def test_a_cluster_envoy_does_not_have_is_unavailable_and_envoy_stays_up(self, gw, key):
        port = gw.ports["missing"]
        for api in ("missing_once", "missing_withip", "missing_once"):
            assert_unavailable_in_time(call(port, f"/{api}/x", fresh(key)), MAIN_TIMEOUT_MS)
        assert counter(gw, "missing_once", "etcd_errors") >= 2
        # The VM did not trap: the same listener still answers, replay or not.
        assert call(port, "/missing_plain/x", fresh(key)).status == 200
        assert call(port, "/missing_once/x", fresh(key)).unavailable()
        assert gw.proc.poll() is None
        assert gw.admin("GET", "/ready")[0] == 200


# ---- etcd over TLS, with client certificates, with users ------------------------------------

class TestSecuredEtcd:
    USER, PASSWORD = "gateguard", "gw-etcd-secret"

    @pytest.fixture(scope="class")
    def pki(self, tmp_path_factory):
        d = tmp_path_factory.mktemp("etcd-pki")
        ca = make_ca("etcd test CA").write(d, "ca")
        return {"dir": d, "ca": ca.cert_path,
                "server": make_leaf(ca, "etcd", server=True).write(d, "server"),
                "client": make_leaf(ca, "gateguard").write(d, "client")}

    @pytest.fixture(scope="class")
    def stores(self, pki):
        server, client = pki["server"], pki["client"]
        tls = {"cert": server.cert_path, "key": server.key_path, "ca": pki["ca"]}
        mtls = {**tls, "client_ca": pki["ca"], "client_cert": client.cert_path, "client_key": client.key_path}
        stores = {
            "tls": Etcd("tls", tls=tls),
            "mtls": Etcd("mtls", tls=mtls),
            "auth": Etcd("auth"),
            # The setup docs/policy.md recommends: client certificates, and the certificate's
            # common name ("gateguard") as the etcd user.
            "certuser": Etcd("certuser", tls=mtls),
        }
        try:
            for s in stores.values():
                s.start(wait=False)
            for s in stores.values():
                s.wait_ready()
            stores["auth"].enable_auth("root-secret", [(self.USER, self.PASSWORD, PREFIX)])
            stores["certuser"].enable_auth("root-secret", [("gateguard", "unused-password", PREFIX)])
            yield stores
        finally:
            for s in stores.values():
                s.remove()

    @pytest.fixture(scope="class")
    def gw(self, request, key, pki, stores):
        """`plain`: an Envoy without etcd credentials in its environment; `creds`: one with."""
        ports = {n: free_port() for n in ("tls", "tls_sni", "tls_wrongname", "mtls", "mtls_nocert", "certuser",
                                          "auth_nocreds", "auth")}
        client = pki["client"]

        def pol(name):
            return policy(key, names=(f"{name}_once", f"{name}_withip"), cluster=f"etcd_{name}")

        plain, start_plain = envoy_of(request, [
            ("tls", ports["tls"], pol("tls"), {"etcd": stores["tls"].endpoint, "etcd_ca": pki["ca"]}),
            ("tls_sni", ports["tls_sni"], pol("tls_sni"),
             {"etcd": stores["tls"].endpoint, "etcd_ca": pki["ca"], "etcd_sni": "localhost"}),
            ("tls_wrongname", ports["tls_wrongname"], pol("tls_wrongname"),
             {"etcd": stores["tls"].endpoint, "etcd_ca": pki["ca"], "etcd_sni": "etcd.example"}),
            ("mtls", ports["mtls"], pol("mtls"),
             {"etcd": stores["mtls"].endpoint, "etcd_ca": pki["ca"], "etcd_cert": client.cert_path,
              "etcd_key": client.key_path}),
            ("mtls_nocert", ports["mtls_nocert"], pol("mtls_nocert"),
             {"etcd": stores["mtls"].endpoint, "etcd_ca": pki["ca"]}),
            ("certuser", ports["certuser"], pol("certuser"),
             {"etcd": stores["certuser"].endpoint, "etcd_ca": pki["ca"], "etcd_cert": client.cert_path,
              "etcd_key": client.key_path}),
            ("auth_nocreds", ports["auth_nocreds"], pol("auth_nocreds"), {"etcd": stores["auth"].endpoint}),
        ])
        creds, start_creds = envoy_of(
            request, [("auth", ports["auth"], pol("auth"), {"etcd": stores["auth"].endpoint})],
            env={"GATEGUARD_ETCD_USERNAME": self.USER, "GATEGUARD_ETCD_PASSWORD": self.PASSWORD})
        gw = type("Secured", (), {})()
        gw.plain, gw.creds, gw.ports = start_plain(plain), start_creds(creds), ports
        return gw

    def works(self, port, name, key, store):
        before = store.entries(PREFIX)
        t = fresh(key)
        r = call(port, f"/{name}_once/x", t)
        assert r.status == 200, r
        r = call(port, f"/{name}_once/x", t)
        assert r.status == 401 and r.json() == REPLAY, r
        owned = fresh(key)
        assert call(port, f"/{name}_withip/x", owned, ip=X).status == 200
        assert call(port, f"/{name}_withip/x", owned, ip=Y).status == 401
        assert sorted(e["value"] for e in new_entries(store, before).values()) == [f"ip:{X}", "once"]

    def test_etcd_over_tls_verified_against_its_ca(self, gw, key, stores):
        self.works(gw.ports["tls"], "tls", key, stores["tls"])

    def test_etcd_over_tls_with_the_name_its_certificate_holds(self, gw, key, stores):
        self.works(gw.ports["tls_sni"], "tls_sni", key, stores["tls"])

    def test_etcd_whose_certificate_does_not_hold_the_name_is_unavailable(self, gw, key):
        assert_unavailable_in_time(call(gw.ports["tls_wrongname"], "/tls_wrongname_once/x", fresh(key)),
                                   MAIN_TIMEOUT_MS)

    def test_etcd_requiring_client_certificates(self, gw, key, stores):
        self.works(gw.ports["mtls"], "mtls", key, stores["mtls"])

    def test_etcd_taking_the_client_certificates_name_as_its_user(self, gw, key, stores):
        self.works(gw.ports["certuser"], "certuser", key, stores["certuser"])

    def test_etcd_requiring_client_certificates_refuses_a_gateway_without_one(self, gw, key):
        assert_unavailable_in_time(call(gw.ports["mtls_nocert"], "/mtls_nocert_once/x", fresh(key)),
                                   MAIN_TIMEOUT_MS)

    def test_etcd_with_users_and_credentials_in_envoys_environment(self, gw, key, stores):
        self.works(gw.ports["auth"], "auth", key, stores["auth"])
        assert self.PASSWORD not in gw.creds.log_text()

    def test_etcd_with_users_refuses_a_gateway_without_credentials(self, gw, key):
        for api in ("auth_nocreds_once", "auth_nocreds_withip"):
            assert_unavailable_in_time(call(gw.ports["auth_nocreds"], f"/{api}/x", fresh(key)), MAIN_TIMEOUT_MS)
        assert counter(gw.plain, "auth_nocreds_once", "etcd_errors") >= 1
