"""End-to-end: routing, CORS, IP filter, subscription keys, header injection, refusals and
stats, in a real Envoy with the built gateguard.wasm."""

import json

import pytest

from conftest import sha256_hex, start_envoy
from envoy_harness import compose, free_port, gateway, request

ORIGIN = "https://portal.example.com"
KEY = "demo-key-1"

POLICY = {
    "apis": [
        {
            "name": "open",
            "path_prefix": "/open",
            "inject_headers": {
                "x-functions-key": {"env": "CONFIG_APP_KEY"},
                "x-gateway": {"value": "gateguard"},
            },
        },
        {
            "name": "deeper",
            "path_prefix": "/open/deeper",
            "subscription_key": {"keys_sha256": [sha256_hex(KEY)]},
        },
        {
            "name": "cors",
            "path_prefix": "/cors",
            "cors": {
                "allowed_origins": [ORIGIN, "https://*.contoso.com"],
                "allowed_methods": ["GET", "POST"],
                "allowed_headers": ["authorization", "content-type"],
                "expose_headers": ["x-request-id"],
                "allow_credentials": True,
                "max_age_seconds": 600,
            },
            "subscription_key": {"keys_sha256": [sha256_hex(KEY)]},
        },
        {"name": "ipallow", "path_prefix": "/ipallow", "ip_filter": {"allow": ["127.0.0.0/8"], "deny": ["127.0.0.2/32"]}},
        {"name": "ipdeny", "path_prefix": "/ipdeny", "ip_filter": {"allow": ["10.0.0.0/8", "2001:db8::/32"]}},
    ]
}

XFF_POLICY = {
    "apis": [{"name": "xff", "path_prefix": "/xff", "ip_filter": {"allow": ["203.0.113.0/24"]}}],
    # The tests connect from 127.0.0.1: they are the proxy in front of the gateway.
    "client_ip": {"trusted_proxy_hops": 1, "trusted_proxies": ["127.0.0.1/32"]},
}


@pytest.fixture(scope="module")
def gw(request, echo_upstream, tmp_path_factory):
    port, xff_port, admin = free_port(), free_port(), free_port()
    access_log = tmp_path_factory.mktemp("access") / "access.log"
    config = compose([gateway("main", port, POLICY, echo_upstream, access_log=access_log),
                      gateway("xff", xff_port, XFF_POLICY, echo_upstream)], admin)
    envoy = start_envoy(request, config, env={"CONFIG_APP_KEY": "function-key-123"})
    envoy.port, envoy.xff_port, envoy.access_log = port, xff_port, access_log
    return envoy


def assert_refusal(r, status, message):
    assert r.status == status, r
    assert r.header("content-type") == "application/json", r
    assert r.json() == {"statusCode": status, "message": message}, r


# --- routing -------------------------------------------------------------------------------

def test_unmatched_path_gets_404_json(gw):
    assert_refusal(request(gw.port, "GET", "/nothing/here"), 404, "Resource not found")
    assert_refusal(request(gw.port, "GET", "/openx"), 404, "Resource not found")


def test_prefix_matches_on_segment_boundary(gw):
    assert request(gw.port, "GET", "/open").status == 200
    assert request(gw.port, "GET", "/open/x").status == 200
    assert request(gw.port, "GET", "/open/deeperx").status == 200


def test_longest_prefix_wins(gw):
    r = request(gw.port, "GET", "/open/deeper/x")
    assert_refusal(r, 401, "Access denied due to missing subscription key. Make sure to include subscription key when making requests to an API.")


@pytest.mark.parametrize("path", ["/open/%64eeper/x", "/OPEN/DEEPER/x", "//open//deeper/x", "/open/x/../deeper/x", "/open/./deeper/x"])
def test_encoding_case_and_dot_segments_cannot_dodge_the_stricter_api(gw, path):
    r = request(gw.port, "GET", path)
    assert r.status in (400, 401), r
    if r.status == 200:
        pytest.fail(f"{path} reached upstream without the key")


def test_encoded_slash_is_refused(gw):
    r = request(gw.port, "GET", "/open%2Fdeeper/x")
    assert r.status in (400, 404), r
    assert "demo-function-app" not in r.body


def test_query_string_is_not_part_of_the_route(gw):
    r = request(gw.port, "GET", "/open/x?redirect=/open/deeper")
    assert r.status == 200
    assert r.json()["path"] == "/open/x?redirect=/open/deeper"


# --- header injection ----------------------------------------------------------------------

def test_injected_headers_reach_upstream_and_replace_client_copies(gw):
    r = request(gw.port, "GET", "/open/x", headers=[("X-Functions-Key", "forged"), ("x-functions-key", "forged2")])
    assert r.status == 200
    headers = r.json()["headers"]
    assert headers["x-functions-key"] == ["function-key-123"]
    assert headers["x-gateway"] == ["gateguard"]


def test_injected_values_never_reach_the_client(gw):
    r = request(gw.port, "GET", "/open/x")
    assert "function-key-123" not in json.dumps(r.headers)
    r = request(gw.port, "GET", "/open/deeper/x")
    assert "function-key-123" not in r.body


# --- subscription keys ---------------------------------------------------------------------

MISSING = "Access denied due to missing subscription key. Make sure to include subscription key when making requests to an API."
INVALID = "Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription."


def test_valid_key_in_header_passes_and_is_not_forwarded(gw):
    r = request(gw.port, "GET", "/open/deeper/x", headers={"Ocp-Apim-Subscription-Key": KEY})
    assert r.status == 200, r
    assert "ocp-apim-subscription-key" not in r.json()["headers"]


def test_valid_key_in_query_passes_and_is_stripped(gw):
    r = request(gw.port, "GET", f"/open/deeper/x?a=1&subscription-key={KEY}&b=2")
    assert r.status == 200, r
    assert r.json()["path"] == "/open/deeper/x?a=1&b=2"


def test_missing_and_wrong_keys(gw):
    assert_refusal(request(gw.port, "GET", "/open/deeper/x"), 401, MISSING)
    assert_refusal(request(gw.port, "GET", "/open/deeper/x", headers={"Ocp-Apim-Subscription-Key": ""}), 401, MISSING)
    r = request(gw.port, "GET", "/open/deeper/x", headers={"Ocp-Apim-Subscription-Key": "guess-123"})
    assert_refusal(r, 401, INVALID)
    assert "guess-123" not in r.body and "guess-123" not in json.dumps(r.headers)
    assert_refusal(request(gw.port, "GET", "/open/deeper/x?subscription-key=nope"), 401, INVALID)


def test_duplicate_key_headers_are_refused(gw):
    r = request(gw.port, "GET", "/open/deeper/x", headers=[("Ocp-Apim-Subscription-Key", KEY), ("Ocp-Apim-Subscription-Key", "x")])
    assert_refusal(r, 401, INVALID)


# --- CORS ----------------------------------------------------------------------------------

def preflight(gw, origin, method="POST", req_headers=None):
    headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if req_headers:
        headers["Access-Control-Request-Headers"] = req_headers
    return request(gw.port, "OPTIONS", "/cors/forms", headers=headers)


def test_preflight_from_allowed_origin_is_answered_by_the_gateway(gw):
    r = preflight(gw, ORIGIN, "POST", "authorization, content-type")
    assert r.status == 204, r
    assert r.header("access-control-allow-origin") == ORIGIN
    assert r.header("access-control-allow-methods") == "GET, POST"
    assert r.header("access-control-allow-headers") == "authorization, content-type"
    assert r.header("access-control-max-age") == "600"
    assert r.header("access-control-allow-credentials") == "true"
    assert r.header("vary") == "Origin"
    assert "demo-function-app" not in r.body  # no authentication needed, never reaches upstream


def test_preflight_from_wildcard_subdomain(gw):
    r = preflight(gw, "https://forms.eu.contoso.com")
    assert r.status == 204
    assert r.header("access-control-allow-origin") == "https://forms.eu.contoso.com"


@pytest.mark.parametrize("origin", [
    "https://portal.example.com.evil.io", "https://evilportal.example.com", "http://portal.example.com",
    "https://portal.example.com:8443", "null", "https://contoso.com", "https://evilcontoso.com",
    "https://a.contoso.com.evil.io",
])
def test_preflight_from_other_origins_is_403(gw, origin):
    r = preflight(gw, origin)
    assert_refusal(r, 403, "CORS origin not allowed")
    assert r.header("access-control-allow-origin") is None


def test_preflight_with_disallowed_method_is_403(gw):
    assert_refusal(preflight(gw, ORIGIN, "DELETE"), 403, "CORS origin not allowed")


def test_actual_request_from_allowed_origin_gets_cors_headers(gw):
    r = request(gw.port, "GET", "/cors/forms", headers={"Origin": ORIGIN, "Ocp-Apim-Subscription-Key": KEY})
    assert r.status == 200, r
    assert r.header("access-control-allow-origin") == ORIGIN
    # Origin is added to the upstream's own Vary, not put in its place.
    assert [v.strip() for v in r.header("vary").split(",")] == ["Accept-Encoding", "Origin"]
    assert r.header("access-control-expose-headers") == "x-request-id"
    assert r.header("access-control-allow-credentials") == "true"


def test_actual_request_from_other_origin_is_403(gw):
    r = request(gw.port, "GET", "/cors/forms", headers={"Origin": "https://evil.example", "Ocp-Apim-Subscription-Key": KEY})
    assert_refusal(r, 403, "CORS origin not allowed")


def test_refusals_for_allowed_origins_carry_cors_headers(gw):
    r = request(gw.port, "GET", "/cors/forms", headers={"Origin": ORIGIN})
    assert_refusal(r, 401, MISSING)
    assert r.header("access-control-allow-origin") == ORIGIN
    assert r.header("vary") == "Origin"


def test_request_without_origin_passes_cors(gw):
    r = request(gw.port, "GET", "/cors/forms", headers={"Ocp-Apim-Subscription-Key": KEY})
    assert r.status == 200
    assert r.header("access-control-allow-origin") is None


# --- IP filter -----------------------------------------------------------------------------

def request_from(port, source_ip, path):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source_ip, 0))
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def test_allowed_peer_passes(gw):
    assert request_from(gw.port, "127.0.0.1", "/ipallow/x")[0] == 200
    assert request_from(gw.port, "127.0.0.3", "/ipallow/x")[0] == 200


def test_deny_wins_over_allow(gw):
    status, body = request_from(gw.port, "127.0.0.2", "/ipallow/x")
    assert status == 403
    assert json.loads(body) == {"statusCode": 403, "message": "Forbidden: client IP not allowed"}


def test_peer_outside_allow_list_is_refused(gw):
    assert_refusal(request(gw.port, "GET", "/ipdeny/x"), 403, "Forbidden: client IP not allowed")


def test_forwarded_for_ignored_without_trusted_hops(gw):
    r = request(gw.port, "GET", "/ipdeny/x", headers={"X-Forwarded-For": "10.1.1.1"})
    assert r.status == 403


def test_forwarded_for_with_trusted_hop(gw):
    assert request(gw.xff_port, "GET", "/xff/x", headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.9"}).status == 200
    assert request(gw.xff_port, "GET", "/xff/x", headers={"X-Forwarded-For": "203.0.113.9, 198.51.100.1"}).status == 403
    assert request(gw.xff_port, "GET", "/xff/x", headers={"X-Forwarded-For": "203.0.113.9:4711"}).status == 200


@pytest.mark.parametrize("xff", [None, "", "garbage", "203.0.113.9, not-an-ip", "999.1.1.1"])
def test_missing_or_garbage_forwarded_for_is_refused(gw, xff):
    headers = {} if xff is None else {"X-Forwarded-For": xff}
    assert_refusal(request(gw.xff_port, "GET", "/xff/x", headers=headers), 403, "Forbidden: client IP not allowed")


# --- stats and logs ------------------------------------------------------------------------

def test_outcomes_are_counted_per_api(gw):
    before = gw.counter("gateguard.ipdeny.ip_denied")
    request(gw.port, "GET", "/ipdeny/x")
    request(gw.port, "GET", "/ipdeny/x")
    assert gw.counter("gateguard.ipdeny.ip_denied") == before + 2
    assert gw.counter("gateguard.open.allowed") >= 1
    assert gw.counter("gateguard.cors.preflight") >= 1
    assert gw.counter("gateguard.cors.cors_denied") >= 1
    assert gw.counter("gateguard.deeper.key_denied") >= 1
    assert gw.counter("gateguard.not_found") >= 1


def test_counters_on_prometheus(gw):
    _, _, text = gw.admin("GET", "/stats/prometheus")
    assert "gateguard_ipdeny_ip_denied" in text


def test_refusals_are_logged_without_secrets(gw):
    request(gw.port, "GET", "/open/deeper/x", headers={"Ocp-Apim-Subscription-Key": "leaky-secret-value"})
    log = gw.log_text()
    audits = [json.loads(l[l.index("{"):]) for l in log.splitlines() if '"gateguard":"refused"' in l]
    keyed = [a for a in audits if a["check"] == "subscription_key"]
    assert keyed and keyed[-1]["api"] == "deeper" and keyed[-1]["status"] == 401
    assert keyed[-1]["client_ip"] == "127.0.0.1" and keyed[-1]["request_id"]
    assert "leaky-secret-value" not in log
    assert "function-key-123" not in log


def test_decision_is_available_to_the_access_log(gw):
    import time
    request(gw.port, "GET", "/ipdeny/x")
    request(gw.port, "GET", "/open/x")
    deadline = time.time() + 10
    lines = []
    while time.time() < deadline:  # Envoy flushes access logs asynchronously
        lines = gw.access_log.read_text().splitlines() if gw.access_log.exists() else []
        if any("outcome=ip_denied" in l for l in lines) and any("outcome=allowed api=open" in l for l in lines):
            break
        time.sleep(0.2)
    # A refusal records the client IP; an allowed request only when the policy has a `log` block
    # (this one has none: tests/test_audit_log.py covers it).
    assert any(l.startswith("403 outcome=ip_denied api=ipdeny client_ip=127.0.0.1 request_id=")
               and l.endswith(" reason=client IP not admitted") for l in lines), lines[-5:]
    assert any(l.startswith("200 outcome=allowed api=open client_ip=- request_id=") for l in lines), lines[-5:]
