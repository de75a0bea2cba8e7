"""Attack classes a security review confirmed against the landed filter, replayed through a
real Envoy with the built gateguard.wasm: each reported request, and the neighbours a reviewer
tries next (the same trick in another encoding, header spelling, method or key).

The replay store across reloads, trusted proxies, the importer and the CLI's secret masking
have their own suites (test_replay_reload.py, test_client_ip.py, test_import_apim.py,
test_cli.py)."""

import base64
import http.client
import json
import time

import pytest

import jwtkit
from conftest import sha256_hex, start_envoy
from envoy_harness import compose, connection_manager, free_port, gateway, request, wait_for
from idp import IdentityProvider

ISS = "https://login.microsoftonline.com/tenant/v2.0"
AUD = "api://processfactorial"
KEY = "the-subscription-key"
FUNCTION_KEY = "function-key-from-the-gateway"
REPLAY = {"statusCode": 401, "message": "Token replay detected"}
INVALID = {"statusCode": 401, "message": "Invalid or expired token"}
CLAIMS = {"statusCode": 403, "message": "Insufficient claims"}
KEY_MISSING = ("Access denied due to missing subscription key. Make sure to include subscription "
               "key when making requests to an API.")
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@pytest.fixture(scope="module")
def keys():
    return {"ec": jwtkit.Key("ec", "ec-1"), "ed": jwtkit.Key("ed", "ed-1"),
            "old": jwtkit.Key("ec", "old"), "new": jwtkit.Key("ec", "new")}


@pytest.fixture(scope="module")
def idp(keys):
    server = IdentityProvider(jwtkit.jwks(keys["old"], keys["new"])).start()
    yield server
    server.stop()


def jwt(jwks, alg, **extra):
    return {"issuers": [ISS], "audiences": [AUD], "algorithms": [alg], "jwks": jwks, **extra}


def keyed(name, prefix, **extra):
    return {"name": name, "path_prefix": prefix,
            "subscription_key": {"keys_sha256": [sha256_hex(KEY)]}, **extra}


@pytest.fixture(scope="module")
def gw(request, keys, idp, echo_upstream):
    port, admin = free_port(), free_port()
    ec = {"inline": jwtkit.jwks(keys["ec"])}
    policy = {"apis": [
        # Lenient APIs with strict ones beneath them: a path spelling must not move a request
        # from the strict one to the lenient one.
        {"name": "odata", "path_prefix": "/odata"},
        keyed("metadata", "/odata/$metadata"),
        {"name": "api", "path_prefix": "/api"},
        keyed("admin", "/api/admin"),
        {"name": "once", "path_prefix": "/once", "jwt": jwt(ec, "ES256"), "replay": {"mode": "without_ip"}},
        {"name": "bound", "path_prefix": "/bound", "jwt": jwt(ec, "ES256"), "replay": {"mode": "with_ip"}},
        {"name": "noskew", "path_prefix": "/noskew", "jwt": jwt(ec, "ES256", clock_skew_seconds=0),
         "replay": {"mode": "without_ip"}},
        {"name": "skewed", "path_prefix": "/skewed", "jwt": jwt(ec, "ES256", clock_skew_seconds=600),
         "replay": {"mode": "without_ip"}},
        keyed("forms", "/forms",
              jwt=jwt({"inline": jwtkit.jwks(keys["ed"])}, "EdDSA",
                      required_claims=[{"name": "roles", "any_of": ["Forms.Delete"], "methods": ["DELETE"]}],
                      claims_to_headers={"sub": "x-user-id"}),
              inject_headers={"x-functions-key": {"value": FUNCTION_KEY}}),
        keyed("reports", "/reports",
              jwt=jwt({"inline": jwtkit.jwks(keys["ed"])}, "EdDSA",
                      required_claims=[{"name": "roles", "any_of": ["Reports.Read"], "methods": ["GET"]}])),
        {"name": "rotating", "path_prefix": "/rotating", "jwt": jwt(
            {"cluster": "idp", "uri": f"http://127.0.0.1:{idp.port}/keys", "refresh_seconds": 1}, "ES256")},
    ]}
    config = compose([gateway("main", port, policy, echo_upstream)], admin)
    # Not as rendered: Envoy's default lets underscore header names through, and the filter must
    # be safe with it, whatever `render` chooses for the listeners it writes.
    hcm = connection_manager(config, "main")
    hcm["common_http_protocol_options"] = {"headers_with_underscores_action": "ALLOW"}
    envoy = start_envoy(request, config, concurrency=2)
    envoy.port = port
    return envoy


_counter = [0]


def es256(key, **extra):
    _counter[0] += 1
    return jwtkit.token(key, jwtkit.claims(ISS, AUD, jti=f"a{_counter[0]}-{time.time_ns()}", **extra))


def malleate(token):
    """ECDSA's other valid signature of the same content: (r, n - s)."""
    content, sig = token.rsplit(".", 1)
    raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    s = int.from_bytes(raw[32:], "big")
    return f"{content}.{jwtkit.b64(raw[:32] + (P256_N - s).to_bytes(32, 'big'))}"


def call(port, path, token=None, source="127.0.0.1", headers=(), method="GET"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20, source_address=(source, 0))
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        if token:
            conn.putheader("Authorization", f"Bearer {token}")
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        r = conn.getresponse()
        body = r.read().decode("utf-8", "replace")
        return r.status, body
    finally:
        conn.close()


def echoed(body):
    """What the upstream saw: headers (lower-case names as sent) and the path."""
    return json.loads(body)


# 1. Replay identity is the signed content, not the token string.

def test_malleated_ecdsa_twin_is_valid_on_its_own(gw, keys):
    t = es256(keys["ec"])
    twin = malleate(t)
    assert twin != t
    # The twin verifies (so the attack is real); the original is now its replay.
    assert call(gw.port, "/once/x", twin)[0] == 200
    status, body = call(gw.port, "/once/x", t)
    assert (status, json.loads(body)) == (401, REPLAY)


def test_without_ip_token_is_not_accepted_twice_through_its_twin(gw, keys):
    t = es256(keys["ec"])
    assert call(gw.port, "/once/x", t)[0] == 200
    for attempt in (malleate(t), t, malleate(malleate(t))):
        status, body = call(gw.port, "/once/x", attempt, source="127.0.0.7")
        assert (status, json.loads(body)) == (401, REPLAY), attempt


def test_with_ip_token_stolen_from_a_does_not_work_from_b_through_its_twin(gw, keys):
    t = es256(keys["ec"])
    assert call(gw.port, "/bound/x", t, source="127.0.0.1")[0] == 200
    status, body = call(gw.port, "/bound/x", malleate(t), source="127.0.0.2")
    assert (status, json.loads(body)) == (401, REPLAY)
    # The owner may use either spelling: it is the same token.
    assert call(gw.port, "/bound/x", malleate(t), source="127.0.0.1")[0] == 200


@pytest.mark.parametrize("spelling", ["padded", "standard_alphabet", "leading_zero", "bit_flip"])
def test_other_signature_encodings_are_refused_not_new(gw, keys, spelling):
    t = es256(keys["ec"])
    assert call(gw.port, "/bound/x", t)[0] == 200  # now cached and recorded
    content, sig = t.rsplit(".", 1)
    raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    zero_padded = jwtkit.b64(bytes(1) + raw)
    forged = {
        "padded": f"{content}.{sig}==",
        "standard_alphabet": f"{content}.{base64.b64encode(raw).decode().rstrip('=')}",
        "leading_zero": f"{content}.{zero_padded}",
        "bit_flip": f"{content}.{jwtkit.b64(raw[:5] + bytes([raw[5] ^ 1]) + raw[6:])}",
    }[spelling]
    if forged == t:
        pytest.skip("this signature has no such spelling")
    status, _ = call(gw.port, "/bound/x", forged, source="127.0.0.3")
    assert status == 401


def test_a_spent_token_stays_spent_on_an_api_with_a_larger_clock_skew(gw, keys):
    t = jwtkit.token(keys["ec"], jwtkit.claims(ISS, AUD, ttl=2, jti=f"skew-{time.time_ns()}"))
    assert call(gw.port, "/noskew/x", t)[0] == 200
    time.sleep(3)  # past exp: the skewed API still accepts the token, but it is spent
    status, body = call(gw.port, "/skewed/x", t)
    assert (status, json.loads(body)) == (401, REPLAY)


# 3. Routing sees the path the way a backend will read it.

@pytest.mark.parametrize("path", [
    "/odata/$metadata", "/odata/%24metadata", "/odata/%24METADATA", "/ODATA/%24Metadata?$format=json",
    "/odata;v=1/%24metadata", "/odata/$metadata;x",
    "/api/admin/users", "/api/admin;x/users", "/api/ADMIN;jsessionid=1/users", "/api/%61dmin/users",
    "/api//admin/users", "/api/admin%3Bx/users", "/api/admin%3bx/users",
])
def test_strict_api_is_reached_in_every_spelling(gw, path):
    status, body = call(gw.port, path)
    assert status == 401 and json.loads(body)["message"] == KEY_MISSING, (path, status, body)


@pytest.mark.parametrize("path", [
    "/api/x/%2e%2e;/admin/users", "/api/x/..;/admin/users", "/api/x/.%2e;x/admin", "/api/x%2F..%2Fadmin",
    "/api/x%5c..%5cadmin", "/api/%252e%252e/admin", "/odata/%2524metadata", "/api/%C0%AE%C0%AE/admin",
    "/ap%C4%B1/admin", "/api/x/...;/admin", "/api/x/..%00/admin", "/api/admin./users", "/api/admin%20/users",
    "/api/%EF%BD%81dmin/users", "/api/x/%E2%80%A5/admin", "/api%3F/admin/users", "/api%3f/admin",
    "/api%23/admin/users",
])
def test_ambiguous_paths_never_reach_the_lenient_api(gw, path):
    status, body = call(gw.port, path)
    # Refused as ambiguous (400), or Envoy resolved it first and the strict API answered.
    assert status in (400, 401), (path, status, body)
    if status == 400 and body:
        assert json.loads(body)["statusCode"] == 400


def test_plain_paths_still_reach_the_lenient_api_unchanged(gw):
    status, body = call(gw.port, "/odata/Products;v=1?$top=1")
    assert status == 200
    assert echoed(body)["path"] == "/odata/Products;v=1?$top=1"


# 4. Headers the gateway sets or consumes are removed in every spelling.

def test_underscore_spellings_of_owned_headers_never_reach_the_upstream(gw, keys):
    t = jwtkit.token(keys["ed"], jwtkit.claims(ISS, AUD, sub="real-user"))
    headers = [("x_user_id", "admin"), ("X_User-Id", "admin"), ("x-user_id", "admin"),
               ("x_functions_key", "stolen"), ("Ocp_Apim_Subscription_Key", KEY),
               ("Ocp-Apim-Subscription-Key", KEY), ("x_user_idx", "kept"),
               ("X-Original-URL", "/forms/admin"), ("x_rewrite_url", "/forms/admin")]
    status, body = call(gw.port, "/forms/x", t, headers=headers)
    assert status == 200, body
    seen = echoed(body)["headers"]
    assert seen["x-user-id"] == ["real-user"]
    assert seen["x-functions-key"] == [FUNCTION_KEY]
    folded = {name.replace("_", "-").lower() for name in seen}
    assert "ocp-apim-subscription-key" not in folded
    # Headers that make IIS / ASP.NET / Symfony serve another path than the one routed.
    assert "x-original-url" not in folded and "x-rewrite-url" not in folded
    for name, values in seen.items():
        if name.replace("_", "-") in ("x-user-id", "x-functions-key"):
            assert name in ("x-user-id", "x-functions-key"), f"{name} reached the upstream"
    assert seen["x_user_idx"] == ["kept"]


# 6. Method-scoped claim rules apply to the method a backend will act on.

@pytest.mark.parametrize("override", [
    [("X-HTTP-Method-Override", "DELETE")], [("X-HTTP-Method", "DELETE")], [("X-Method-Override", "delete")],
    [("x_http_method_override", "DELETE")], [("X-HTTP-Method-Override", "PATCH, DELETE")],
])
def test_method_override_headers_are_checked_as_the_method_they_name(gw, keys, override):
    reader = jwtkit.token(keys["ed"], jwtkit.claims(ISS, AUD, roles=["Forms.Read"]))
    headers = [("Ocp-Apim-Subscription-Key", KEY), *override]
    status, body = call(gw.port, "/forms/x", reader, headers=headers, method="POST")
    assert (status, json.loads(body)) == (403, CLAIMS)


def test_method_override_query_parameter_is_checked_too(gw, keys):
    reader = jwtkit.token(keys["ed"], jwtkit.claims(ISS, AUD, roles=["Forms.Read"]))
    for path in ("/forms/x?_method=DELETE", "/forms/x?a=1&_METHOD=delete", "/forms/x?.method=DELETE",
                 "/forms/x?%20_method=DELETE", "/forms/x?_method[]=DELETE"):
        status, body = call(gw.port, path, reader, headers=[("Ocp-Apim-Subscription-Key", KEY)], method="POST")
        assert (status, json.loads(body)) == (403, CLAIMS), path


def test_head_is_checked_as_get(gw, keys):
    # Express, Flask and Spring serve HEAD with the GET handler.
    nobody = jwtkit.token(keys["ed"], jwtkit.claims(ISS, AUD, roles=["Forms.Read"]))
    assert call(gw.port, "/reports/x", nobody, headers=[("Ocp-Apim-Subscription-Key", KEY)], method="HEAD")[0] == 403
    reader = jwtkit.token(keys["ed"], jwtkit.claims(ISS, AUD, roles=["Reports.Read"]))
    assert call(gw.port, "/reports/x", reader, headers=[("Ocp-Apim-Subscription-Key", KEY)], method="HEAD")[0] == 200


def test_a_token_with_the_right_role_may_still_override(gw, keys):
    deleter = jwtkit.token(keys["ed"], jwtkit.claims(ISS, AUD, roles=["Forms.Delete"]))
    headers = [("Ocp-Apim-Subscription-Key", KEY), ("X-HTTP-Method-Override", "DELETE")]
    status, _ = call(gw.port, "/forms/x", deleter, headers=headers, method="POST")
    assert status == 200
    reader = jwtkit.token(keys["ed"], jwtkit.claims(ISS, AUD, roles=["Forms.Read"]))
    assert call(gw.port, "/forms/x", reader, headers=[("Ocp-Apim-Subscription-Key", KEY)], method="POST")[0] == 200


# 7. The key's query parameter never goes upstream, in any spelling.

@pytest.mark.parametrize("query,kept", [
    (f"subscription%2Dkey={KEY}&a=1", "a=1"),
    (f"a=1&Subscription-Key={KEY}", "a=1"),
    (f"SUBSCRIPTION-KEY={KEY};b=2", "b=2"),
    (f"subscription-key={KEY}&subscription%2dKEY={KEY}", None),
    (f"%73ubscription-key={KEY}&c=3", "c=3"),
    (f"subscription-key[]={KEY}&d=4", "d=4"),
    (f"%20subscription-key={KEY}&e=5", "e=5"),
])
def test_key_query_parameter_is_removed_in_every_spelling(gw, query, kept):
    status, body = call(gw.port, f"/api/admin/x?{query}")
    assert status == 200, body
    path = echoed(body)["path"]
    assert KEY not in path
    assert path == "/api/admin/x" + (f"?{kept}" if kept else "")
    # With the key in its header, the other spellings still leave.
    status, body = call(gw.port, f"/api/admin/x?{query}", headers=[("Ocp-Apim-Subscription-Key", KEY)])
    assert status == 200 and KEY not in echoed(body)["path"]


# 10. A verified token does not outlive its key.



def test_cached_token_stops_working_when_its_key_leaves_the_jwks(gw, keys, idp):
    t = jwtkit.token(keys["old"], jwtkit.claims(ISS, AUD))
    # Every worker holds the first key set (a worker without one answers 401).
    assert wait_for(lambda: all(call(gw.port, "/rotating/x", t)[0] == 200 for _ in range(8))), \
        "first JWKS fetch never reached every worker"
    assert call(gw.port, "/rotating/x", t)[0] == 200  # a cache hit now
    with idp.lock:
        idp.jwks = jwtkit.jwks(keys["new"])  # the IdP revokes the old key
    # Every worker adopts the new set within a tick: wait until none accepts the token.
    assert wait_for(lambda: all(call(gw.port, "/rotating/x", t)[0] == 401 for _ in range(8))), \
        "revoked key's token still accepted"
    status, body = call(gw.port, "/rotating/x", t)
    assert (status, json.loads(body)) == (401, INVALID)
    fresh = jwtkit.token(keys["new"], jwtkit.claims(ISS, AUD))
    assert all(call(gw.port, "/rotating/x", fresh)[0] == 200 for _ in range(8))


def test_no_refusal_or_log_line_carries_the_token(gw, keys):
    t = es256(keys["ec"])
    call(gw.port, "/once/x", t)
    call(gw.port, "/once/x", malleate(t))
    assert t.rsplit(".", 1)[0] not in gw.log_text()
