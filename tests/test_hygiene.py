"""Request hygiene end to end (docs/policy.md, "Methods", "Limits", "Header rules", "Rate limits
and quotas"), in a real Envoy with two workers, on the configuration `gateguard render` writes.

Each refusal with its status, APIM's JSON body, its headers (`Allow`, `Retry-After`,
`x-ratelimit-*`), its stat and CORS headers for an allowed origin; method overrides; header
sizes; bodies refused by `Content-Length` and while they stream (chunked), with what the upstream
received then; rate limits exact under 64 concurrent requests over both workers, and their window
renewing; quotas that only valid credentials spend. The upstream records every request it sees
(tests/upstream.py `received`): each test marks its requests with a probe in the query string."""

import http.client
import json
import re
import select
import socket
import time
import uuid

import pytest

import envoy_harness
import jwtkit
import upstream
from conftest import sha256_hex, start_envoy
from envoy_harness import compose, filter_config, free_port, gateway, request, wait_for

ORIGIN = "https://portal.example.com"
ISS = "https://login.microsoftonline.com/tenant/v2.0"
AUD = "api://processfactorial"
KEY_HEADER = "Ocp-Apim-Subscription-Key"
KEY1, KEY2, KEY3 = "hygiene-key-1", "hygiene-key-2", "hygiene-key-3"
UUID = "0f8fad5b-d9cb-469f-a165-70867728950e"
BODY_LIMIT = 1000
CORS = {"allowed_origins": [ORIGIN], "allowed_methods": ["GET", "POST", "PUT"],
        "allowed_headers": ["content-type", "x-correlation-id"], "max_age_seconds": 600}
RATE_RACE = 10
WINDOW_CALLS, WINDOW_SECONDS = 3, 3
KEY_QUOTA = 5
SUBJECT_QUOTA = 3
# 25:01:01, so that the hours of the quota text are not wrapped at a day.
LONG_PERIOD = 25 * 3600 + 61


def api(name, **settings):
    return {"name": name, "path_prefix": f"/{name}", "cors": CORS, **settings}


def keys(*names):
    return {"keys_sha256": [sha256_hex(k) for k in names]}


@pytest.fixture(scope="module")
def key():
    return jwtkit.Key("ed", "ed-1")


@pytest.fixture(scope="module")
def gw(request, echo_upstream, key):
    port, tiny_port, admin = free_port(), free_port(), free_port()
    subject = jwtkit.replay_api("subjectquota", "without_ip", key, ISS, AUD)
    subject.update(cors=CORS, quota={"by": "subject", "calls": SUBJECT_QUOTA, "renewal_period_seconds": 3600})
    main = {"apis": [
        api("methods", methods=["GET", "POST"]),
        api("limits", limits={"max_request_header_bytes": 4096, "max_header_bytes": 1024,
                              "max_body_bytes": BODY_LIMIT}),
        api("headers", headers={"required": ["x-correlation-id"], "forbidden": ["x-debug"],
                                "patterns": {"x-correlation-id": "[0-9a-fA-F-]{36}", "x-tenant": "[a-z]{3,16}"}}),
        api("rate", rate_limit={"by": "client_ip", "calls": RATE_RACE, "renewal_period_seconds": 60}),
        api("window", methods=["GET"],
            rate_limit={"by": "client_ip", "calls": WINDOW_CALLS, "renewal_period_seconds": WINDOW_SECONDS}),
        api("keyrate", subscription_key=keys(KEY1, KEY2),
            rate_limit={"by": "subscription_key", "calls": RATE_RACE, "renewal_period_seconds": 60}),
        api("keyquota", subscription_key=keys(KEY1, KEY2),
            quota={"by": "subscription_key", "calls": KEY_QUOTA, "renewal_period_seconds": 3600}),
        api("longquota", subscription_key=keys(KEY3),
            quota={"by": "subscription_key", "calls": 1, "renewal_period_seconds": LONG_PERIOD}),
        subject,
    ]}
    # One bucket of 32 counters: the 33rd live caller finds the store full.
    tiny = {"apis": [api("tiny", rate_limit={"by": "client_ip", "calls": 5, "renewal_period_seconds": 60})],
            "limit_counters": {"max_entries": 1}}
    config = compose([gateway("main", port, main, echo_upstream), gateway("tiny", tiny_port, tiny, echo_upstream)],
                     admin)
    # Not as rendered (one gateway per Envoy): each policy gets a VM and counter store of its
    # own, as docs/operations.md has operators do for several policies in one Envoy.
    filter_config(config, "tiny")["vm_config"]["vm_id"] = "tiny"
    envoy = start_envoy(request, config, concurrency=2)
    envoy.port, envoy.tiny_port = port, tiny_port
    return envoy


# ---- helpers ----------------------------------------------------------------------------------

def probe():
    """A marker for the query string, to find what of a request reached the upstream."""
    return f"probe={uuid.uuid4().hex}"


def reached(marker):
    return upstream.received(marker)


def answered(marker):
    """What reached the upstream, once the upstream has recorded its answer: the client can read
    the response before the upstream's thread writes down that it sent it (bounded wait)."""
    deadline = time.monotonic() + 5
    seen = reached(marker)
    while any(r.answered is None for r in seen) and time.monotonic() < deadline:
        time.sleep(0.02)
        seen = reached(marker)
    return seen


def counter(envoy, api_name, name):
    try:
        return envoy.counter(f"gateguard.{api_name}.{name}")
    except KeyError:
        return 0


class Stat:
    """`gateguard.<api>.<name>` before and after: `stat.grew()` is how much it grew since."""

    def __init__(self, envoy, api_name, name):
        self.envoy, self.api, self.name = envoy, api_name, name
        self.before = counter(envoy, api_name, name)

    def grew(self):
        return counter(self.envoy, self.api, self.name) - self.before


def assert_refusal(r, status, message):
    assert r.status == status, r
    assert r.header("content-type") == "application/json", r
    assert r.json() == {"statusCode": status, "message": message}, r
    assert "demo-function-app" not in r.body, r


def assert_cors(r):
    """The CORS headers an allowed origin gets on an actual request (so a browser can read it)."""
    assert r.header("access-control-allow-origin") == ORIGIN, r
    assert "Origin" in (r.header("vary") or ""), r


def worker_connections(envoy, port):
    prefix = f"listener.127.0.0.1_{port}.worker_"
    return {k: int(v) for k, v in envoy.stats().items()
            if k.startswith(prefix) and k.endswith(".downstream_cx_total")}


class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def header(self, name):
        return self.headers.get(name.lower())

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Answer {self.status} {self.headers} {self.body[:200]!r}>"


def read_answer(sock):
    r = http.client.HTTPResponse(sock)
    r.begin()
    headers = {k.lower(): v for k, v in r.getheaders()}
    return Answer(r.status, headers, r.read().decode("utf-8", "replace"))


def post_chunks(port, path, chunks, headers=(), wait=0.5):
    """POSTs `chunks` as a chunked body over a raw connection, one chunk at a time: before each
    next chunk it waits up to `wait` seconds for an answer (so Envoy sees the chunks one by one,
    and the client stops sending once answered). Returns (answer, chunks sent, whether the last
    chunk, the body's end, was sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Transfer-Encoding: chunked",
                "Content-Type: application/octet-stream", *(f"{k}: {v}" for k, v in headers)]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sent, ended = 0, False
        for chunk in [*chunks, b""]:
            if sent and select.select([sock], [], [], wait)[0]:
                break  # answered before the body ended
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                break
            if chunk:
                sent += 1
            else:
                ended = True
        return read_answer(sock), sent, ended
    finally:
        sock.close()


# ---- methods ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH", "OPTIONS"])
def test_an_unlisted_method_gets_405_with_allow_and_never_reaches_upstream(gw, method):
    stat = Stat(gw, "methods", "method_denied")
    marker = probe()
    r = request(gw.port, method, f"/methods/x?{marker}")
    assert_refusal(r, 405, "Method not allowed")
    assert r.header("allow") == "GET, POST", r
    assert reached(marker) == []
    assert stat.grew() == 1


def test_head_is_not_get(gw):
    # Without a body (HEAD): the status and Allow say it.
    marker = probe()
    r = request(gw.port, "HEAD", f"/methods/x?{marker}")
    assert r.status == 405 and r.header("allow") == "GET, POST", r
    assert reached(marker) == []


def test_listed_methods_pass(gw):
    for method in ("GET", "POST"):
        r = request(gw.port, method, "/methods/x", body="{}" if method == "POST" else None)
        assert r.status == 200 and r.json()["method"] == method, r


@pytest.mark.parametrize("override", [
    ("X-HTTP-Method-Override", "DELETE"),
    ("X-HTTP-Method", "DELETE"),
    ("X-Method-Override", "delete"),
    ("X-HTTP-Method-Override", "GET, DELETE"),
])
def test_an_override_header_naming_an_unlisted_method_gets_405(gw, override):
    stat = Stat(gw, "methods", "method_denied")
    marker = probe()
    r = request(gw.port, "POST", f"/methods/x?{marker}", headers=[override], body="{}")
    assert_refusal(r, 405, "Method not allowed")
    assert r.header("allow") == "GET, POST", r
    assert reached(marker) == []
    assert stat.grew() == 1


@pytest.mark.parametrize("query", ["_method=DELETE", "_METHOD=delete", "%5Fmethod=DELETE", "_method=DEL%45TE",
                                   "a=1&_method=PUT"])
def test_an_override_in_the_query_naming_an_unlisted_method_gets_405(gw, query):
    marker = probe()
    r = request(gw.port, "POST", f"/methods/x?{query}&{marker}", body="{}")
    assert_refusal(r, 405, "Method not allowed")
    assert reached(marker) == []


def test_overrides_naming_listed_methods_pass(gw):
    r = request(gw.port, "POST", "/methods/x?_method=GET", headers={"X-HTTP-Method-Override": "GET"}, body="{}")
    assert r.status == 200, r


def test_an_override_header_spelled_with_underscores_never_reaches_the_backend(gw):
    # The rendered listeners drop client headers with underscores: the filter and the backend
    # never see `x_http_method_override`. Either it is refused, or it is gone upstream.
    r = request(gw.port, "POST", "/methods/x", headers={"X_HTTP_Method_Override": "DELETE"}, body="{}")
    if r.status == 405:
        assert_refusal(r, 405, "Method not allowed")
    else:
        assert r.status == 200, r
        names = set(r.json()["headers"])
        assert not names & {"x_http_method_override", "x-http-method-override"}, names


def test_a_405_carries_cors_headers_for_an_allowed_origin(gw):
    r = request(gw.port, "DELETE", "/methods/x", headers={"Origin": ORIGIN})
    assert_refusal(r, 405, "Method not allowed")
    assert r.header("allow") == "GET, POST", r
    assert_cors(r)


def test_a_preflight_is_answered_by_cors_on_an_api_with_methods(gw):
    stat = Stat(gw, "methods", "method_denied")
    # PUT is not one of the API's methods but is one CORS allows: the preflight follows CORS.
    for asked in ("GET", "POST", "PUT"):
        r = request(gw.port, "OPTIONS", "/methods/x",
                    headers={"Origin": ORIGIN, "Access-Control-Request-Method": asked})
        assert r.status == 204, r
        assert r.header("access-control-allow-origin") == ORIGIN, r
        assert r.header("access-control-allow-methods") == "GET, POST, PUT", r
        assert r.header("access-control-max-age") == "600", r
        assert r.header("allow") is None, r
    r = request(gw.port, "OPTIONS", "/methods/x",
                headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert_refusal(r, 403, "CORS origin not allowed")
    assert stat.grew() == 0


# ---- limits: headers ----------------------------------------------------------------------------

def test_one_header_over_max_header_bytes_gets_431(gw):
    stat = Stat(gw, "limits", "limit_denied")
    # Name and value: "x-big" (5) + 1019 = 1024, the limit, passes; one byte more does not.
    assert request(gw.port, "GET", "/limits/x", headers={"x-big": "a" * 1019}).status == 200
    marker = probe()
    r = request(gw.port, "GET", f"/limits/x?{marker}", headers={"x-big": "a" * 1020})
    assert_refusal(r, 431, "Request header fields too large")
    assert reached(marker) == []
    assert stat.grew() == 1


def test_many_headers_adding_up_over_max_request_header_bytes_get_431(gw):
    stat = Stat(gw, "limits", "limit_denied")
    few = {f"x-h{i}": "v" * 400 for i in range(5)}
    assert request(gw.port, "GET", "/limits/x", headers=few).status == 200
    marker = probe()
    many = {f"x-h{i}": "v" * 400 for i in range(12)}  # each far under 1024, 4,800+ together
    r = request(gw.port, "GET", f"/limits/x?{marker}", headers=many)
    assert_refusal(r, 431, "Request header fields too large")
    assert reached(marker) == []
    assert stat.grew() == 1


# ---- limits: bodies -----------------------------------------------------------------------------

def test_content_length_over_the_limit_gets_413_and_upstream_never_sees_the_request(gw):
    stat = Stat(gw, "limits", "limit_denied")
    marker = probe()
    r = request(gw.port, "POST", f"/limits/x?{marker}", body="x" * (BODY_LIMIT + 1))
    assert_refusal(r, 413, "Request entity too large")
    assert reached(marker) == []
    assert stat.grew() == 1


def test_a_body_exactly_at_the_limit_passes_with_content_length(gw):
    marker = probe()
    body = "y" * BODY_LIMIT
    r = request(gw.port, "POST", f"/limits/x?{marker}", body=body)
    assert r.status == 200 and r.json()["body"] == body, r
    [seen] = answered(marker)
    assert (seen.complete, seen.body_bytes, seen.answered) == (True, BODY_LIMIT, 200)


def test_a_chunked_body_exactly_at_the_limit_passes(gw):
    marker = probe()
    parts = [bytes([65 + i]) * 100 for i in range(BODY_LIMIT // 100)]

    def body():
        for part in parts:
            yield part
            time.sleep(0.01)  # one chunk at a time

    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request("POST", f"/limits/x?{marker}", body=body(), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked"})
        r = conn.getresponse()
        echoed = r.read()
        assert r.status == 200, (r.status, echoed)
    finally:
        conn.close()
    assert json.loads(echoed)["body"] == b"".join(parts).decode()
    [seen] = answered(marker)
    assert (seen.complete, seen.body_bytes, seen.answered) == (True, BODY_LIMIT, 200)


def assert_upstream_got_no_whole_body(marker):
    """What the upstream got of a refused streamed request: nothing, or the request with at most
    `BODY_LIMIT` bytes of its body, cut off, never answered."""
    records = reached(marker)
    assert len(records) <= 1, records
    for seen in records:
        assert seen.done.wait(10), f"the upstream is still reading {seen}: Envoy did not cut it off"
        assert not seen.complete and seen.answered is None, seen
        assert seen.body_bytes <= BODY_LIMIT, seen


def test_a_chunked_body_crossing_the_limit_midway_is_refused_at_that_chunk(gw):
    stat = Stat(gw, "limits", "limit_denied")
    marker = probe()
    # 400 + 400 pass; the third chunk takes the body to 1,200: refused then, before the end.
    chunks = [b"a" * 400, b"b" * 400, b"c" * 400, b"d" * 400]
    r, sent, ended = post_chunks(gw.port, f"/limits/x?{marker}", chunks, headers=[("Origin", ORIGIN)])
    assert_refusal(r, 413, "Request entity too large")
    assert_cors(r)
    assert sent == 3 and not ended, f"answered after {sent} chunks (ended: {ended})"
    assert_upstream_got_no_whole_body(marker)
    assert stat.grew() == 1


def test_a_chunked_body_over_the_limit_in_its_first_chunk_is_refused(gw):
    marker = probe()
    r, sent, ended = post_chunks(gw.port, f"/limits/x?{marker}", [b"z" * (BODY_LIMIT + 500), b"z"])
    assert_refusal(r, 413, "Request entity too large")
    assert not ended
    assert_upstream_got_no_whole_body(marker)
    assert all(seen.body_bytes == 0 for seen in reached(marker))


def test_a_gateway_still_serves_the_next_request_after_a_streamed_413(gw):
    r, _, _ = post_chunks(gw.port, "/limits/x", [b"q" * 600, b"q" * 600])
    assert r.status == 413, r
    r = request(gw.port, "POST", "/limits/x", body="small")
    assert r.status == 200 and r.json()["body"] == "small", r


# ---- header rules -------------------------------------------------------------------------------

def headers_refused(gw, headers, message):
    stat = Stat(gw, "headers", "header_denied")
    marker = probe()
    r = request(gw.port, "GET", f"/headers/x?{marker}", headers=headers)
    assert_refusal(r, 400, message)
    assert reached(marker) == []
    assert stat.grew() == 1
    return r


def test_a_required_header_missing_gets_400_naming_it(gw):
    headers_refused(gw, {}, "Bad request: header x-correlation-id is missing")
    headers_refused(gw, {"x-correlation": UUID}, "Bad request: header x-correlation-id is missing")


@pytest.mark.parametrize("name", ["x-debug", "X-Debug", "X-DEBUG"])
def test_a_forbidden_header_gets_400_naming_it(gw, name):
    headers_refused(gw, {"x-correlation-id": UUID, name: "1"}, "Bad request: header x-debug is not allowed")


def test_a_forbidden_header_spelled_with_underscores_never_reaches_the_backend(gw):
    # The rendered listeners drop client headers with underscores before the filter runs, so
    # `X_Debug` is either refused (if it reached the filter) or gone; the backend never sees it.
    marker = probe()
    r = request(gw.port, "GET", f"/headers/x?{marker}", headers={"x-correlation-id": UUID, "X_Debug": "1"})
    if r.status == 400:
        assert_refusal(r, 400, "Bad request: header x-debug is not allowed")
        assert reached(marker) == []
    else:
        assert r.status == 200, r
        [seen] = reached(marker)
        assert not set(seen.headers) & {"x_debug", "x-debug"}, seen.headers


@pytest.mark.parametrize("headers, name", [
    ({"x-correlation-id": "<script>alert(1)</script>"}, "x-correlation-id"),
    ({"x-correlation-id": UUID + "0"}, "x-correlation-id"),
    ({"x-correlation-id": UUID, "x-tenant": "CONTOSO-SECRET"}, "x-tenant"),
    ({"x-correlation-id": UUID, "x-tenant": "ab"}, "x-tenant"),
])
def test_a_value_not_matching_its_pattern_gets_400_naming_the_header_never_the_value(gw, headers, name):
    r = headers_refused(gw, headers, f"Bad request: header {name} is invalid")
    for value in headers.values():
        if value != UUID:
            assert value not in r.body and value not in str(r.headers), r


def test_a_header_sent_twice_is_invalid_even_when_each_value_matches(gw):
    headers_refused(gw, [("x-correlation-id", UUID), ("x-correlation-id", UUID)],
                    "Bad request: header x-correlation-id is invalid")


def test_headers_that_follow_the_rules_pass(gw):
    r = request(gw.port, "GET", "/headers/x", headers={"x-correlation-id": UUID, "x-tenant": "contoso"})
    assert r.status == 200, r
    assert r.json()["headers"]["x-correlation-id"] == [UUID]


def test_a_400_carries_cors_headers_for_an_allowed_origin(gw):
    r = request(gw.port, "GET", "/headers/x", headers={"Origin": ORIGIN})
    assert_refusal(r, 400, "Bad request: header x-correlation-id is missing")
    assert_cors(r)


def test_a_431_carries_cors_headers_for_an_allowed_origin(gw):
    r = request(gw.port, "GET", "/limits/x", headers={"Origin": ORIGIN, "x-big": "a" * 2000})
    assert_refusal(r, 431, "Request header fields too large")
    assert_cors(r)
    r = request(gw.port, "POST", "/limits/x", headers={"Origin": ORIGIN}, body="x" * (BODY_LIMIT + 1))
    assert_refusal(r, 413, "Request entity too large")
    assert_cors(r)


# ---- rate limits --------------------------------------------------------------------------------

def rate_message(seconds):
    return f"Rate limit is exceeded. Try again in {seconds} seconds."


def assert_rate_limited(r, limit, most):
    """A 429 whose Retry-After (1..`most` seconds) is the text's N and x-ratelimit-reset."""
    assert r.status == 429, r
    retry = int(r.header("retry-after"))
    assert 1 <= retry <= most, r
    assert_refusal(r, 429, rate_message(retry))
    assert (r.header("x-ratelimit-limit"), r.header("x-ratelimit-remaining"), r.header("x-ratelimit-reset")) \
        == (str(limit), "0", str(retry)), r
    return retry


def test_64_concurrent_requests_from_one_client_ip_exactly_10_pass_over_both_workers(gw):
    before = worker_connections(gw, gw.port)
    for n in range(5):
        ip = f"127.0.6.{n + 1}"  # a caller of its own each round: a fresh counter
        stat = Stat(gw, "rate", "rate_limited")
        statuses = envoy_harness.race([(gw.port, "/rate/x", {}, ip)] * 64)
        assert statuses.count(200) == RATE_RACE, (n, statuses)
        assert statuses.count(429) == 64 - RATE_RACE, (n, statuses)
        assert stat.grew() == 64 - RATE_RACE
        # Still exhausted afterwards, and stated so.
        assert_rate_limited(request(gw.port, "GET", "/rate/x", source=ip), RATE_RACE, 60)
    after = worker_connections(gw, gw.port)
    grew = [k for k, v in after.items() if v > before.get(k, 0)]
    assert len(grew) >= 2, (before, after)


def test_64_concurrent_calls_by_subscription_key_exactly_10_pass_and_wrong_keys_spend_nothing(gw):
    for n, key in enumerate((KEY1, KEY2)):
        # 48 with the key, 16 with a wrong one, interleaved, from two client IPs.
        requests, valid = [], []
        for i in range(64):
            good = i % 4 != 0
            valid.append(good)
            requests.append((gw.port, "/keyrate/x", {KEY_HEADER: key if good else "wrong-key"},
                             f"127.0.7.{1 + i % 2}"))
        statuses = envoy_harness.race(requests)
        good = [s for s, v in zip(statuses, valid) if v]
        bad = [s for s, v in zip(statuses, valid) if not v]
        assert good.count(200) == RATE_RACE and good.count(429) == 48 - RATE_RACE, (n, statuses)
        assert bad == [401] * 16, (n, statuses)


def test_the_window_renews_and_retry_after_counts_down(gw):
    ip = "127.0.5.1"
    # Preflights (answered by CORS) and refused methods come before the rate limit: they
    # spend nothing.
    for _ in range(4):
        r = request(gw.port, "OPTIONS", "/window/x", source=ip,
                    headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
        assert r.status == 204, r
        assert request(gw.port, "DELETE", "/window/x", source=ip).status == 405
    remaining = []
    for _ in range(WINDOW_CALLS):
        r = request(gw.port, "GET", "/window/x", source=ip)
        assert r.status == 200, r
        assert r.header("x-ratelimit-limit") == str(WINDOW_CALLS), r
        assert 1 <= int(r.header("x-ratelimit-reset")) <= WINDOW_SECONDS, r
        remaining.append(int(r.header("x-ratelimit-remaining")))
    assert remaining == [2, 1, 0]
    stat = Stat(gw, "window", "rate_limited")
    first = time.monotonic()
    r = request(gw.port, "GET", "/window/x", source=ip, headers={"Origin": ORIGIN})
    retry = assert_rate_limited(r, WINDOW_CALLS, WINDOW_SECONDS)
    assert_cors(r)
    # Polled until it passes again: Retry-After never goes up, and it was right.
    seen = [retry]
    deadline = first + WINDOW_SECONDS + 3
    while time.monotonic() < deadline:
        time.sleep(0.25)
        r = request(gw.port, "GET", "/window/x", source=ip)
        if r.status == 200:
            break
        seen.append(assert_rate_limited(r, WINDOW_CALLS, WINDOW_SECONDS))
    renewed = time.monotonic() - first
    assert r.status == 200, f"the window did not renew within {WINDOW_SECONDS + 3}s: {r}"
    assert seen == sorted(seen, reverse=True) and len(set(seen)) >= min(retry, 2), seen
    # Retry-After is whole seconds of a window counted in whole seconds: within one second.
    assert retry - 1.2 <= renewed <= retry + 1.2, (retry, renewed)
    assert stat.grew() == len(seen)
    # A new window: every call again, counted down again.
    remaining = [int(r.header("x-ratelimit-remaining"))]
    for _ in range(WINDOW_CALLS - 1):
        r = request(gw.port, "GET", "/window/x", source=ip)
        assert r.status == 200, r
        remaining.append(int(r.header("x-ratelimit-remaining")))
    assert remaining == [2, 1, 0]
    assert request(gw.port, "GET", "/window/x", source=ip).status == 429


def test_a_full_counter_store_refuses_new_callers_and_keeps_counting_known_ones(gw):
    stat = Stat(gw, "tiny", "limit_unavailable")
    for i in range(32):
        r = request(gw.tiny_port, "GET", "/tiny/x", source=f"127.0.8.{i + 1}")
        assert r.status == 200 and r.header("x-ratelimit-remaining") == "4", (i, r)
    marker = probe()
    r = request(gw.tiny_port, "GET", f"/tiny/x?{marker}", source="127.0.8.33")
    assert_refusal(r, 503, "Rate limit unavailable: counter store is full")
    assert 1 <= int(r.header("retry-after")) <= 60, r
    assert reached(marker) == []
    assert stat.grew() == 1
    r = request(gw.tiny_port, "GET", "/tiny/x", source="127.0.8.1")
    assert r.status == 200 and r.header("x-ratelimit-remaining") == "3", r


# ---- quotas -------------------------------------------------------------------------------------

QUOTA_TEXT = re.compile(r"Out of call volume quota\. Quota will be replenished in (\d\d):(\d\d):(\d\d)\.")


def assert_quota_exceeded(r, period):
    """A 403 whose HH:MM:SS is its Retry-After, within the period's last few seconds."""
    assert r.status == 403, r
    assert r.header("content-type") == "application/json", r
    body = r.json()
    assert body["statusCode"] == 403 and set(body) == {"statusCode", "message"}, r
    m = QUOTA_TEXT.fullmatch(body["message"])
    assert m, body["message"]
    hh, mm, ss = map(int, m.groups())
    assert mm < 60 and ss < 60, body["message"]
    retry = int(r.header("retry-after"))
    assert hh * 3600 + mm * 60 + ss == retry, (body["message"], retry)
    assert period - 10 <= retry <= period, r
    assert r.header("x-ratelimit-remaining") == "0", r
    return hh, mm, ss


def test_wrong_and_missing_keys_do_not_spend_the_quota_of_a_valid_key(gw):
    stat = Stat(gw, "keyquota", "quota_exceeded")
    for _ in range(20):
        r = request(gw.port, "GET", "/keyquota/x", headers={KEY_HEADER: "not-a-key"})
        assert_refusal(r, 401, "Access denied due to invalid subscription key. Make sure to provide a valid key "
                               "for an active subscription.")
    for _ in range(5):
        assert request(gw.port, "GET", "/keyquota/x").status == 401
    remaining = []
    for _ in range(KEY_QUOTA):
        r = request(gw.port, "GET", "/keyquota/x", headers={KEY_HEADER: KEY1})
        assert r.status == 200, r
        remaining.append(int(r.header("x-ratelimit-remaining")))
    assert remaining == list(range(KEY_QUOTA - 1, -1, -1))
    marker = probe()
    r = request(gw.port, "GET", f"/keyquota/x?{marker}", headers={KEY_HEADER: KEY1, "Origin": ORIGIN})
    assert_quota_exceeded(r, 3600)
    assert_cors(r)
    assert KEY1 not in r.body and KEY1 not in str(r.headers)
    assert reached(marker) == []
    assert stat.grew() == 1
    # Another key has a quota of its own.
    assert request(gw.port, "GET", "/keyquota/x", headers={KEY_HEADER: KEY2}).status == 200


def test_the_quota_text_counts_hours_past_a_day(gw):
    assert request(gw.port, "GET", "/longquota/x", headers={KEY_HEADER: KEY3}).status == 200
    r = request(gw.port, "GET", "/longquota/x", headers={KEY_HEADER: KEY3})
    hh, _, _ = assert_quota_exceeded(r, LONG_PERIOD)
    assert hh == 25, r


_jti = [0]


def subject_token(key, sub, ttl=600, **extra):
    _jti[0] += 1
    return jwtkit.token(key, jwtkit.claims(ISS, AUD, ttl=ttl, sub=sub, jti=f"q{_jti[0]}-{time.time_ns()}", **extra))


def bearer(gw, token, origin=None):
    headers = {"Authorization": f"Bearer {token}"}
    if origin:
        headers["Origin"] = origin
    return request(gw.port, "GET", "/subjectquota/x", headers=headers)


def test_forged_expired_and_replayed_tokens_do_not_spend_the_subjects_quota(gw, key):
    sub = f"quota-user-{uuid.uuid4().hex[:8]}"
    impostor = jwtkit.Key("ed", "ed-1")  # the same kid, another key: a forged signature
    refused = [subject_token(impostor, sub) for _ in range(5)]
    refused += [subject_token(key, sub, ttl=-3600) for _ in range(5)]
    refused += [subject_token(key, sub, aud="api://someone-else") for _ in range(3)]
    for t in refused:
        r = bearer(gw, t)
        assert_refusal(r, 401, "Invalid or expired token")
    first = subject_token(key, sub)
    r = bearer(gw, first)
    assert r.status == 200 and r.header("x-ratelimit-remaining") == str(SUBJECT_QUOTA - 1), r
    for _ in range(5):
        assert_refusal(bearer(gw, first), 401, "Token replay detected")
    remaining = []
    for _ in range(SUBJECT_QUOTA - 1):
        r = bearer(gw, subject_token(key, sub))
        assert r.status == 200, r
        remaining.append(int(r.header("x-ratelimit-remaining")))
    assert remaining == list(range(SUBJECT_QUOTA - 2, -1, -1))
    stat = Stat(gw, "subjectquota", "quota_exceeded")
    last = subject_token(key, sub)
    r = bearer(gw, last, origin=ORIGIN)
    assert_quota_exceeded(r, 3600)
    assert_cors(r)
    assert last not in r.body
    assert stat.grew() == 1
    # Another subject of the same issuer has a quota of its own.
    assert bearer(gw, subject_token(key, f"{sub}-other")).status == 200


def test_envoy_logged_no_problems(gw):
    assert not gw.problems(), gw.problems()
