"""`jwt.verify_with: "envoy"` end to end (docs/policy.md, "Verifying with Envoy's jwt_authn"):
the configuration `gateguard render` writes puts Envoy's jwt_authn in front of gateguard, jwt_authn
fetches each IdP's keys through its Envoy cluster and verifies signatures, and gateguard takes the
payload only from the request's dynamic metadata, under the provider of the API's own keys, and
only if it is the presented token's. What a sceptical reviewer tries: forged, expired and
foreign tokens, look-alike headers, the token in the query, two IdPs, a shared one, claims,
replay and preflights, with gateguard's statuses and messages."""

import base64
import json
import subprocess
import time

import pytest

import jwtkit
from conftest import start_envoy
from envoy_harness import (CLI, WASM, Envoy, assert_jwt_401, compose, connection_manager, free_port, gateway, request,
                           token_request)
from envoy_harness import wait_for as wait_until

AUD = "api://processfactorial"
ORIGIN = "https://portal.example.com"
MISSING = "Missing or malformed Authorization header"
INVALID = "Invalid or expired token"


@pytest.fixture(scope="module")
def keys():
    return {"a": jwtkit.Key("rsa", "a-1"), "b": jwtkit.Key("rsa", "b-1"), "inline": jwtkit.Key("ec", "inline-1")}


@pytest.fixture(scope="module")
def idps(keys):
    import idp
    servers = idp.start_all({"a": keys["a"], "b": keys["b"]})
    yield servers
    idp.stop_all(servers)


def issuers(idps):
    return [idps["a"].issuer, idps["b"].issuer]


def api(name, idps, jwks, **jwt):
    """An API whose tokens Envoy verifies with `jwks`; it takes either IdP's issuer, so only the
    key tells the IdPs' tokens apart."""
    block = {"issuers": issuers(idps), "audiences": [AUD], "algorithms": ["RS256", "ES256"],
             "jwks": jwks, "verify_with": "envoy"}
    block.update(jwt)
    return {"name": name, "path_prefix": f"/{name}", "jwt": block}


@pytest.fixture(scope="module")
def gw(request, idps, keys, echo_upstream):
    port, admin = free_port(), free_port()
    idp_a = {"cluster": "idp_a", "uri": f"http://127.0.0.1:{idps['a'].port}/keys"}
    # B refreshes every 2 s: the rotation and outage tests wait for refreshes.
    idp_b = {"cluster": "idp_b", "uri": f"http://127.0.0.1:{idps['b'].port}/keys", "refresh_seconds": 2}
    alpha = api("alpha", idps, idp_a,
                required_claims=[{"name": "roles", "any_of": ["Forms.Submit"], "methods": ["POST"]}],
                claims_to_headers={"sub": "x-user-id", "roles": "x-roles"})
    alpha["cors"] = {"allowed_origins": [ORIGIN], "allowed_methods": ["GET", "POST"],
                     "allowed_headers": ["authorization"]}
    policy = {"apis": [
        alpha,
        api("beta", idps, idp_b),
        # The same keys as alpha, another skew and refresh: one provider for both.
        api("shared", idps, {**idp_a, "refresh_seconds": 600}, clock_skew_seconds=300),
        {**api("once", idps, idp_a), "replay": {"mode": "without_ip"}},
        api("inline", idps, {"inline": jwtkit.jwks(keys["inline"])}),
        # IdP A's key again, written into the policy: another provider that verifies A's tokens.
        api("mirror", idps, {"inline": jwtkit.jwks(keys["a"])}),
    ]}
    config = compose([gateway("main", port, policy, echo_upstream)], admin)
    envoy = start_envoy(request, config)
    envoy.port, envoy.config = port, config
    # jwt_authn fetches remote keys before the listener starts (async_fetch); bounded check that
    # every worker verifies: ten 200s in a row, each on a new connection.
    t = jwtkit.token(keys["a"], jwtkit.claims(idps["a"].issuer, AUD))
    deadline, streak = time.time() + 30, 0
    while streak < 10 and time.time() < deadline:
        streak = streak + 1 if get(envoy, "/alpha/x", t).status == 200 else 0
        time.sleep(0.05)
    assert streak >= 10, "jwt_authn did not verify tokens within 30 s"
    return envoy


def get(gw, path, token=None, method="GET", headers=None, scheme="Bearer"):
    return token_request(gw.port, path, token, method, headers, scheme)


assert_401 = assert_jwt_401


def token(gw_keys, idps, which="a", **claims):
    issuer = idps["b" if which == "b" else "a"].issuer
    return jwtkit.token(gw_keys[which], jwtkit.claims(issuer, AUD, **claims))


def jwt_authn(gw):
    filters = connection_manager(gw.config, "main")["http_filters"]
    assert filters[0]["name"] == "envoy.filters.http.jwt_authn"
    return filters[0]["typed_config"]


# --- the configuration render wrote ---------------------------------------------------------

def test_one_provider_per_key_set_in_front_of_gateguard(gw):
    names = [f["name"] for f in connection_manager(gw.config, "main")["http_filters"]]
    assert names == ["envoy.filters.http.jwt_authn", "envoy.filters.http.wasm", "envoy.filters.http.router"]
    providers = jwt_authn(gw)["providers"]
    # alpha, shared and once trust idp_a: one provider; beta idp_b; inline and mirror their own.
    assert len(providers) == 4
    shared = next(p for p in providers.values() if p.get("remote_jwks", {}).get("http_uri", {}).get("cluster") == "idp_a")
    assert shared["clock_skew_seconds"] == 300
    assert shared["remote_jwks"]["cache_duration"] == "600s"


def test_keys_come_from_the_idps_through_envoys_clusters(gw, idps):
    assert idps["a"].count("jwks") >= 1 and idps["b"].count("jwks") >= 1
    stats = gw.stats()
    for cluster in ("idp_a", "idp_b"):
        assert int(stats.get(f"cluster.{cluster}.upstream_rq_200", "0")) >= 1, cluster
    assert int(stats.get("http.gateway_http.jwt_authn.jwks_fetch_success", "0")) >= 2, \
        {k: v for k, v in stats.items() if "jwt_authn" in k}
    # gateguard fetches no keys for APIs Envoy verifies for.
    fetched = {k: v for k, v in stats.items() if "gateguard" in k and "jwks_fetch" in k and v != "0"}
    assert not fetched, fetched


# --- valid tokens ----------------------------------------------------------------------------

def test_valid_token_reaches_upstream_with_its_claims(gw, idps, keys):
    t = token(keys, idps, sub="user-42", roles=["A", "B"])
    r = get(gw, "/alpha/x", t, headers={"X-User-Id": "admin", "x-roles": "Forms.Admin"})
    assert r.status == 200, r
    headers = r.json()["headers"]
    assert headers["x-user-id"] == ["user-42"]
    assert headers["x-roles"] == ["A,B"]
    # The token itself goes upstream (jwt_authn's forward: true), as with gateguard's verifier.
    assert headers["authorization"] == [f"Bearer {t}"]


def test_inline_keys_and_es256(gw, idps, keys):
    assert get(gw, "/inline/x", token(keys, idps, "inline")).status == 200
    assert_401(get(gw, "/inline/x", token(keys, idps, "a")), INVALID)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_bearer_spellings_jwt_authn_is_given(gw, idps, keys, scheme):
    assert get(gw, "/alpha/x", token(keys, idps), scheme=scheme).status == 200


def test_other_spellings_of_bearer_are_not_verified(gw, idps, keys):
    # jwt_authn's prefixes are case-sensitive; gateguard parses the token but finds no payload.
    for scheme in ("BeArEr", "bEARER"):
        assert_401(get(gw, "/alpha/x", token(keys, idps), scheme=scheme), INVALID)
    # A tab after the scheme: gateguard takes the token, jwt_authn's "Bearer " prefix does not.
    r = request(gw.port, "GET", "/alpha/x", headers={"Authorization": f"Bearer\t{token(keys, idps)}"})
    assert_401(r, INVALID)


# --- refusals --------------------------------------------------------------------------------

def test_bad_signature_and_swapped_payload(gw, idps, keys):
    h, p, s = token(keys, idps).split(".")
    flipped = s[:-4] + ("AAAA" if s[-4:] != "AAAA" else "BBBB")
    assert_401(get(gw, "/alpha/x", f"{h}.{p}.{flipped}"), INVALID)
    evil = jwtkit.b64json(jwtkit.claims(idps["a"].issuer, AUD, sub="admin"))
    assert_401(get(gw, "/alpha/x", f"{h}.{evil}.{s}"), INVALID)
    assert_401(get(gw, "/alpha/x", f"{h}.{p}."), INVALID)


def test_alg_none(gw, idps):
    c = jwtkit.claims(idps["a"].issuer, AUD)
    for alg in ("none", "None"):
        assert_401(get(gw, "/alpha/x", jwtkit.unsigned({"alg": alg, "typ": "JWT", "kid": "a-1"}, c)), INVALID)


def test_expired_and_not_yet_valid(gw, idps, keys):
    now = int(time.time())
    assert_401(get(gw, "/alpha/x", token(keys, idps, exp=now - 3600)), INVALID)
    assert_401(get(gw, "/alpha/x", token(keys, idps, nbf=now + 3600)), INVALID)
    assert_401(get(gw, "/alpha/x", token(keys, idps, iat=now + 3600)), INVALID)


def test_each_api_keeps_its_own_clock_skew(gw, idps, keys):
    # Expired two minutes ago: within the shared provider's skew (300 s, shared's), past
    # alpha's own (60 s). jwt_authn verifies it; gateguard refuses it for alpha only.
    t = token(keys, idps, exp=int(time.time()) - 120)
    assert_401(get(gw, "/alpha/x", t), INVALID)
    assert get(gw, "/shared/x", t).status == 200


def test_unknown_kid_and_a_key_of_nobodys(gw, idps, keys):
    attacker = jwtkit.Key("rsa", "attacker")
    c = jwtkit.claims(idps["a"].issuer, AUD)
    assert_401(get(gw, "/alpha/x", jwtkit.token(attacker, c)), INVALID)
    # Claiming the IdP's kid, with its own key embedded and a key URL of its own.
    t = jwtkit.token(attacker, c, header={"kid": "a-1", "jku": "http://127.0.0.1:1/keys", "jwk": attacker.jwk()})
    assert_401(get(gw, "/alpha/x", t), INVALID)


def test_wrong_issuer_and_audience(gw, idps, keys):
    assert_401(get(gw, "/alpha/x", jwtkit.token(keys["a"], jwtkit.claims("https://evil.example/", AUD))), INVALID)
    assert_401(get(gw, "/alpha/x", jwtkit.token(keys["a"], jwtkit.claims(idps["a"].issuer, "api://other"))), INVALID)


@pytest.mark.parametrize("value", [None, "Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Bearer a b", "Token abc"])
def test_missing_or_malformed_header_keeps_its_message(gw, value):
    headers = {} if value is None else {"Authorization": value}
    assert_401(request(gw.port, "GET", "/alpha/x", headers=headers), MISSING)


def test_malformed_token_keeps_its_message(gw):
    assert_401(get(gw, "/alpha/x", "not-a-jwt"), "Malformed token or missing expiration")


def test_two_authorization_headers(gw, idps, keys):
    t = token(keys, idps)
    r = request(gw.port, "GET", "/alpha/x", headers=[("Authorization", f"Bearer {t}"), ("Authorization", f"Bearer {t}")])
    assert_401(r, MISSING)


# --- what a client cannot do -----------------------------------------------------------------

def test_headers_that_look_like_jwt_authn_output_are_not_a_verification(gw, idps, keys):
    admin = jwtkit.claims(idps["a"].issuer, AUD, sub="admin", roles=["Forms.Submit"])
    payload = jwtkit.b64json(admin)
    forged = jwtkit.token(jwtkit.Key("rsa", "a-1"), admin)
    look_alikes = {
        "x-jwt-payload": payload,
        "x-jwt-claim-sub": "admin",
        "x-envoy-jwt-payload": payload,
        "x-forwarded-jwt": payload,
        "x-envoy-dynamic-metadata": json.dumps({"envoy.filters.http.jwt_authn": {"p": admin}}),
        "jwt-payload": payload,
    }
    assert_401(request(gw.port, "GET", "/alpha/x", headers=look_alikes), MISSING)
    assert_401(get(gw, "/alpha/x", forged, headers=look_alikes), INVALID)
    assert_401(get(gw, "/alpha/x", forged, method="POST", headers=look_alikes), INVALID)


def test_a_token_in_the_query_is_not_verified(gw, idps, keys):
    t = token(keys, idps)
    assert_401(request(gw.port, "GET", f"/alpha/x?access_token={t}"), MISSING)
    # A forged token with the same claims in the header, the real one in the query: if
    # jwt_authn read the query, its payload would match the forged token claim by claim.
    claims = json.loads(base64.urlsafe_b64decode(t.split(".")[1] + "=="))
    forged = jwtkit.token(jwtkit.Key("rsa", "a-1"), claims)
    assert forged.split(".")[1] == t.split(".")[1]
    for query in ("access_token", "token", "jwt"):
        assert_401(get(gw, f"/alpha/x?{query}={t}", forged), INVALID)


def test_a_forged_token_beside_a_real_one_in_another_header(gw, idps, keys):
    t = token(keys, idps)
    claims = json.loads(base64.urlsafe_b64decode(t.split(".")[1] + "=="))
    forged = jwtkit.token(jwtkit.Key("rsa", "a-1"), claims)
    for header in ("x-jwt-assertion", "x-authorization", "proxy-authorization", "cookie"):
        value = f"access_token={t}" if header == "cookie" else f"Bearer {t}"
        assert_401(get(gw, "/alpha/x", forged, headers={header: value}), INVALID)


# --- two IdPs, one shared --------------------------------------------------------------------

def test_each_idps_tokens_only_on_its_own_apis(gw, idps, keys):
    # Either issuer is accepted everywhere: only the keys tell the IdPs apart.
    from_b = token(keys, idps, "b")
    assert_401(get(gw, "/alpha/x", from_b), INVALID)
    assert_401(get(gw, "/shared/x", from_b), INVALID)
    assert get(gw, "/beta/x", from_b).status == 200
    from_a = token(keys, idps, "a")
    assert_401(get(gw, "/beta/x", from_a), INVALID)
    # B's kid on A's key, A's kid on B's key.
    assert_401(get(gw, "/beta/x", jwtkit.token(keys["a"], jwtkit.claims(idps["b"].issuer, AUD), header={"kid": "b-1"})), INVALID)
    assert_401(get(gw, "/alpha/x", jwtkit.token(keys["b"], jwtkit.claims(idps["a"].issuer, AUD), header={"kid": "a-1"})), INVALID)


def test_apis_sharing_an_idp_both_accept(gw, idps, keys):
    t = token(keys, idps, sub="shared-user")
    for path in ("/alpha/x", "/shared/x", "/alpha/y", "/shared/y"):
        r = get(gw, path, t)
        assert r.status == 200, (path, r)


def test_jwt_authns_cache_still_leaves_the_payload(gw, idps, keys):
    t = token(keys, idps, sub="cached")
    hits = int(gw.stats().get("http.gateway_http.jwt_authn.jwt_cache_hit", "0"))
    for _ in range(5):
        r = get(gw, "/alpha/x", t)
        assert r.status == 200, r
        assert r.json()["headers"]["x-user-id"] == ["cached"]
    assert int(gw.stats().get("http.gateway_http.jwt_authn.jwt_cache_hit", "0")) >= hits + 4


def test_every_provider_that_can_verify_a_token_does(gw, idps, keys):
    # A's tokens verify under two providers (idp_a's remote keys, mirror's inline copy): each
    # leaves its own payload, so neither API is starved by the other having succeeded first.
    t = token(keys, idps, sub="twice")
    for path in ("/alpha/x", "/mirror/x", "/shared/x"):
        r = get(gw, path, t)
        assert r.status == 200, (path, r)
        assert r.json()["headers"].get("x-user-id") in (None, ["twice"])
    assert_401(get(gw, "/mirror/x", token(keys, idps, "b")), INVALID)


# --- claims, replay, CORS --------------------------------------------------------------------

def test_required_claims(gw, idps, keys):
    reader = token(keys, idps, roles=["Forms.Read"])
    assert get(gw, "/alpha/x", reader).status == 200
    r = get(gw, "/alpha/x", reader, method="POST")
    assert r.status == 403, r
    assert r.json() == {"statusCode": 403, "message": "Insufficient claims"}
    assert r.header("www-authenticate") == 'Bearer error="insufficient_scope"'
    r = get(gw, "/alpha/x", reader, headers={"X-HTTP-Method-Override": "POST"})
    assert r.status == 403, r
    writer = token(keys, idps, roles=["Forms.Read", "Forms.Submit"])
    assert get(gw, "/alpha/x", writer, method="POST").status == 200


def test_replay_without_ip(gw, idps, keys):
    t = token(keys, idps, jti=f"once-{time.time_ns()}")
    assert get(gw, "/once/x", t).status == 200
    r = get(gw, "/once/x", t)
    assert r.status == 401, r
    assert r.json() == {"statusCode": 401, "message": "Token replay detected"}
    # Accepted once, whatever path of the API.
    assert get(gw, "/once/y", t).status == 401


def test_preflight_needs_no_token(gw):
    r = request(gw.port, "OPTIONS", "/alpha/forms", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})
    assert r.status == 204, r
    assert r.header("access-control-allow-origin") == ORIGIN
    # A refusal still carries CORS headers, from gateguard.
    r = request(gw.port, "GET", "/alpha/forms", headers={"Origin": ORIGIN})
    assert_401(r, MISSING)
    assert r.header("access-control-allow-origin") == ORIGIN


def test_refusals_are_gateguards_and_counted(gw, idps, keys):
    before = gw.counter("gateguard.alpha.jwt_denied")
    assert_401(get(gw, "/alpha/x", token(keys, idps, "b")), INVALID)
    assert gw.counter("gateguard.alpha.jwt_denied") == before + 1
    log = gw.log_text()
    assert "Envoy's jwt_authn verified no token" in log
    # jwt_authn itself never answered: it lets every request through to gateguard.
    assert int(gw.stats().get("http.gateway_http.jwt_authn.denied", "0")) == 0


# --- the IdP's keys over time ----------------------------------------------------------------

def test_rotated_keys_arrive_with_the_next_refresh_and_an_outage_keeps_the_last(gw, idps, keys):
    rotated = jwtkit.Key("rsa", "b-2")
    t = jwtkit.token(rotated, jwtkit.claims(idps["b"].issuer, AUD))
    assert_401(get(gw, "/beta/x", t), INVALID)
    idps["b"].set_jwks(jwtkit.jwks(keys["b"], rotated))
    # jwt_authn refetches on its schedule (refresh_seconds: 2), not on an unknown kid.
    deadline, status = time.time() + 15, None
    while time.time() < deadline:
        status = get(gw, "/beta/x", t).status
        if status == 200:
            break
        time.sleep(0.25)
    assert status == 200
    # The IdP down for longer than the refresh period: the last keys stay in use.
    failed = int(gw.stats().get("http.gateway_http.jwt_authn.jwks_fetch_failed", "0"))
    idps["b"].fail(500)
    try:
        assert wait_until(lambda: int(gw.stats().get("http.gateway_http.jwt_authn.jwks_fetch_failed", "0")) > failed)
        time.sleep(2.5)
        for _ in range(4):
            assert get(gw, "/beta/x", t).status == 200
            assert get(gw, "/beta/x", token(keys, idps, "b")).status == 200
    finally:
        idps["b"].recover()


# --- hot reload: jwt_authn swapped with the policy -------------------------------------------

def render_ecds(tmp, policy, ports, *extra):
    path = tmp / f"policy-{time.time_ns()}.json"
    path.write_text(json.dumps(policy))
    return subprocess.run(
        [str(CLI), "render", "--policy", str(path), "--ecds-dir", str(tmp / "ecds"), "--wasm", str(WASM),
         "--listen", f"127.0.0.1:{ports['listen']}", "--admin", f"127.0.0.1:{ports['admin']}",
         "--upstream", f"127.0.0.1:{ports['upstream']}", *extra],
        capture_output=True, text=True, timeout=60)


def test_filter_only_swaps_jwt_authn_with_the_policy(tmp_path, echo_upstream):
    """Rendered with --ecds-dir, jwt_authn comes from its own file; `--filter-only` rewrites it
    before the policy, so a new key set is verified by the time gateguard looks for it."""
    one, two = jwtkit.Key("ed", "one"), jwtkit.Key("ed", "two")
    iss = "https://idp.example/"

    def policy(key, verify_with="envoy"):
        return {"apis": [{"name": "rel", "path_prefix": "/rel", "jwt": {
            "issuers": [iss], "audiences": [AUD], "algorithms": ["EdDSA"],
            "jwks": {"inline": jwtkit.jwks(key)}, "verify_with": verify_with}}]}

    ports = {"listen": free_port(), "admin": free_port(), "upstream": echo_upstream}
    r = render_ecds(tmp_path, policy(one), ports, "--out", str(tmp_path / "envoy.yaml"))
    assert r.returncode == 0, r.stderr
    envoy = Envoy(tmp_path / "envoy.yaml", admin_port=ports["admin"], name="verify-envoy-reload", concurrency=1)
    envoy.start()
    try:
        def status(key):
            t = jwtkit.token(key, jwtkit.claims(iss, AUD))
            return request(ports["listen"], "GET", "/rel/x", headers={"Authorization": f"Bearer {t}"}).status

        assert (status(one), status(two)) == (200, 401)
        r = render_ecds(tmp_path, policy(two), ports, "--filter-only")
        assert r.returncode == 0, r.stderr
        assert wait_until(lambda: (status(two), status(one)) == (200, 401), timeout=20), (status(two), status(one))
        # Back to gateguard's own verifier: the slot stays, verifying nothing.
        r = render_ecds(tmp_path, policy(two, "gateguard"), ports, "--filter-only")
        assert r.returncode == 0, r.stderr
        assert "providers" not in (tmp_path / "ecds" / "jwt-authn-filter.yaml").read_text()
        assert wait_until(lambda: (status(two), status(one)) == (200, 401), timeout=20)
        stats = envoy.stats()
        reloads = "extension_config_discovery.http_filter.envoy.filters.http.jwt_authn.config_reload"
        assert int(stats.get(reloads, "0")) >= 3, {k: v for k, v in stats.items() if "jwt_authn" in k}
        assert not envoy.problems(), envoy.problems()
    finally:
        envoy.stop()
