"""Several identity providers per API and the Entra ID shorthand, end to end in a real Envoy
(docs/policy.md, "JWT", "Several identity providers" and "Entra ID"): two test IdPs serve their
JWKS over HTTP with the same `kid`, gateguard fetches each through its own cluster and checks a
token only with the keys of the provider its `iss` names; with `verify_with: "envoy"` each
provider is a jwt_authn provider of its own. An Entra-shaped policy (inline keys instead of
Microsoft's) accepts its tenant's v2 tokens, names the issuer to add for a v1 one in the log
only, and a multi-tenant app takes only its listed tenants."""

import json
import time

import pytest

import envoy_harness
import jwtkit
from conftest import start_envoy
from envoy_harness import compose, connection_manager, free_port, gateway, request

AUD = "api://providers"
INVALID = "Invalid or expired token"
TID = "0b7e3c51-4f1a-4c8e-9d6e-2a0b1c2d3e4f"
OTHER_TID = "9f8e7d6c-5b4a-4a3b-8c2d-1e0f9a8b7c6d"
V1 = f"https://sts.windows.net/{TID}/"
V2 = f"https://login.microsoftonline.com/{TID}/v2.0"


@pytest.fixture(scope="module")
def keys():
    # A and B name their keys alike: only the issuer tells which set decides.
    return {"a": jwtkit.Key("rsa", "k1"), "b": jwtkit.Key("rsa", "k1"), "entra": jwtkit.Key("rsa", "entra-1")}


@pytest.fixture(scope="module")
def idps(keys):
    import idp
    servers = idp.start_all({"a": keys["a"], "b": keys["b"]})
    yield servers
    idp.stop_all(servers)


def issuer(idps, which):
    # Both test IdPs say ".../dev-tenant/v2.0" on their own port: distinct issuers.
    return idps[which].issuer


def two_providers(idps, **jwt):
    return {"providers": [
        {"issuers": [issuer(idps, "a")], "audiences": [AUD], "algorithms": ["RS256"],
         "jwks": {"cluster": "idp_a", "uri": f"http://127.0.0.1:{idps['a'].port}/keys"}},
        {"issuers": [issuer(idps, "b")], "audiences": [AUD], "algorithms": ["RS256"],
         "jwks": {"cluster": "idp_b", "uri": f"http://127.0.0.1:{idps['b'].port}/keys"}},
    ], "claims_to_headers": {"iss": "x-issuer"}, **jwt}


@pytest.fixture(scope="module")
def gw(request, idps, keys, echo_upstream):
    port, admin = free_port(), free_port()
    entra_keys = {"inline": jwtkit.jwks(keys["entra"])}
    policy = {"apis": [
        {"name": "two", "path_prefix": "/two", "jwt": two_providers(idps)},
        {"name": "by_envoy", "path_prefix": "/by_envoy", "jwt": two_providers(idps, verify_with="envoy")},
        {"name": "entra", "path_prefix": "/entra", "jwt": {
            "entra": {"tenant": TID, "versions": ["v2"]}, "audiences": [AUD], "jwks": entra_keys}},
        {"name": "multi", "path_prefix": "/multi", "jwt": {
            "entra": {"tenant": "organizations", "tenants": [TID]}, "audiences": [AUD], "jwks": entra_keys}},
    ]}
    config = compose([gateway("main", port, policy, echo_upstream)], admin)
    envoy = start_envoy(request, config)
    envoy.port, envoy.config = port, config
    # gateguard fetches remote keys from its first tick on; jwt_authn before the listener
    # starts. Bounded wait until both IdPs' tokens pass on both APIs, ten times in a row.
    tokens = [token(keys, idps, w) for w in ("a", "b")]
    deadline, streak = time.time() + 30, 0
    while streak < 10 and time.time() < deadline:
        ok = all(get(envoy, f"/{api}/x", t).status == 200 for api in ("two", "by_envoy") for t in tokens)
        streak = streak + 1 if ok else 0
        time.sleep(0.05)
    assert streak >= 10, "the IdPs' keys were not in use within 30 s"
    return envoy


def token(keys, idps, which, signer=None, **claims):
    return jwtkit.token(keys[signer or which], jwtkit.claims(issuer(idps, which), AUD, **claims))


def entra_token(keys, iss, **claims):
    return jwtkit.token(keys["entra"], jwtkit.claims(iss, AUD, **claims))


def get(gw, path, token=None):
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return request(gw.port, "GET", path, headers=headers)


def assert_401(r):
    assert r.status == 401, r
    assert r.json() == {"statusCode": 401, "message": INVALID}


def refusal_reason(gw, mark, timeout=10):
    return envoy_harness.refusal_reason(gw, mark, timeout)


def refused_for(gw, path, t):
    mark = len(gw.log_text())
    r = get(gw, path, t)
    assert_401(r)
    return refusal_reason(gw, mark)


@pytest.mark.parametrize("api", ["two", "by_envoy"])
def test_each_idps_tokens_pass_with_their_issuer(gw, idps, keys, api):
    for which in ("a", "b"):
        r = get(gw, f"/{api}/x", token(keys, idps, which))
        assert r.status == 200, r
        assert r.json()["headers"]["x-issuer"] == [issuer(idps, which)]


@pytest.mark.parametrize("api", ["two", "by_envoy"])
def test_same_kid_other_idp_is_not_a_signature(gw, idps, keys, api):
    # A's issuer, B's key under the same kid, and the other way round.
    assert_401(get(gw, f"/{api}/x", token(keys, idps, "a", signer="b")))
    assert_401(get(gw, f"/{api}/x", token(keys, idps, "b", signer="a")))


def test_no_provider_for_the_issuer(gw, keys):
    t = jwtkit.token(keys["a"], jwtkit.claims("https://elsewhere.example.com/", AUD))
    assert refused_for(gw, "/two/x", t) == "issuer not accepted"


def test_render_gave_one_jwt_authn_provider_per_idp(gw, idps):
    filters = connection_manager(gw.config, "main")["http_filters"]
    authn = filters[0]["typed_config"]
    uris = sorted(p["remote_jwks"]["http_uri"]["uri"] for p in authn["providers"].values())
    assert uris == sorted(f"http://127.0.0.1:{idps[w].port}/keys" for w in ("a", "b"))
    clusters = {c["name"] for c in gw.config["static_resources"]["clusters"]}
    assert {"idp_a", "idp_b"} <= clusters


def test_entra_v2_tokens_of_the_tenant_pass(gw, keys):
    r = get(gw, "/entra/x", entra_token(keys, V2, tid=TID))
    assert r.status == 200, r


def test_entra_v1_token_names_what_to_add_in_the_log_only(gw, keys):
    reason = refused_for(gw, "/entra/x", entra_token(keys, V1, tid=TID))
    assert reason == (f"issuer {V1} is Entra ID v1 of an accepted tenant: add it to issuers, "
                      'or use entra.versions ["v1","v2"]')
    # Another tenant: no hint.
    other = f"https://sts.windows.net/{OTHER_TID}/"
    assert refused_for(gw, "/entra/x", entra_token(keys, other, tid=OTHER_TID)) == "issuer not accepted"


def test_multi_tenant_takes_listed_tenants_under_their_own_issuer(gw, keys):
    for iss in (V1, V2):
        r = get(gw, "/multi/x", entra_token(keys, iss, tid=TID))
        assert r.status == 200, r
    other_v2 = f"https://login.microsoftonline.com/{OTHER_TID}/v2.0"
    # A tenant not listed; a listed tid under another tenant's issuer; no tid.
    for t in (entra_token(keys, other_v2, tid=OTHER_TID), entra_token(keys, other_v2, tid=TID),
              entra_token(keys, V2)):
        assert refused_for(gw, "/multi/x", t) == "issuer not accepted"
