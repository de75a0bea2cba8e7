"""DPoP-bound tokens (docs/policy.md, "Sender-constrained tokens" → "DPoP (RFC 9449)") end to end,
in one real Envoy with two workers, on rendered gateways:

- `direct`: 127.0.0.1 is not a trusted proxy (the policy trusts another address), so the proof's
  `htu` must name what Envoy saw: http://127.0.0.1:<port><path>. APIs `/opt` (dpop optional),
  `/req` (required) and `/roles` (optional, a POST-only claims rule);
- `proxied`: 127.0.0.1 is the trusted proxy (one hop), whose X-Forwarded-Proto and
  X-Forwarded-Host name the URL instead; `proxied_ip`: the same plus an API with an IP filter
  (which makes the filter read the connection's peer address: see PEER_NOT_READ below);
- `ea` and `eb`: two gateways sharing one real etcd replay store, each with its own VM (its own
  local store), as two replicas: a proof is spent once across both.

Clients hold ES256, RS256, PS256 or EdDSA keys (tests/dpopkit.py); the identity provider signs
tokens with an Ed25519 key given inline, binding them with `cnf.jkt`. Every refusal is checked
for its exact status, body and `WWW-Authenticate` challenge, and, for the invalid proofs, for
the check gateguard's log names (so that a proof is refused for the property it breaks).

"""

import json
import time

import pytest

import dpopkit
import envoy_harness
import jwtkit
from conftest import start_envoy
from dpopkit import OMIT
from envoy_harness import compose, filter_config, free_port, gateway, request
from etcd_harness import Etcd

ISS = "https://login.microsoftonline.com/tenant/v2.0"
AUD = "api://processfactorial"
SKEW = 60  # the default clock_skew_seconds
MAX_AGE = 300
INVALID_PROOF = {"statusCode": 401, "message": "Invalid DPoP proof"}
DPOP_CHALLENGE = 'DPoP error="invalid_dpop_proof", algs="ES256 ES384 RS256 PS256 EdDSA"'
PROXY, NOT_PROXY = "127.0.0.1", "127.0.0.2"
FORWARDED = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https",
             "X-Forwarded-Host": "api.example.com"}
PUBLIC_HTU = "https://api.example.com/opt/x"

# What the log says for each refusal (core/src/jwt/dpop.rs, DpopError::reason).
R_MISSING = "no DPoP proof, or several"
R_MALFORMED = "DPoP proof is not a JWS of JSON objects"
R_TYP = "DPoP proof typ is not dpop+jwt"
R_ALG = "DPoP proof algorithm not allowed"
R_KEY = "DPoP proof jwk missing, private or unsupported"
R_SIGNATURE = "DPoP proof signature invalid"
R_HTM = "DPoP proof htm is not this request's method"
R_HTU = "DPoP proof htu is not this request's URL"
R_IAT = "DPoP proof iat missing, in the future or too old"
R_ATH = "DPoP proof ath is not this token's hash"
R_JKT = "DPoP proof key is not the token's cnf.jkt"
R_JTI = "DPoP proof jti missing or too long"
R_REPLAYED = "DPoP proof jti already used"
R_NOT_BOUND = "DPoP scheme with a token that has no cnf.jkt"
R_BOUND_AS_BEARER = "DPoP-bound token presented as a bearer token"
R_REQUIRED = "bearer token where DPoP is required"


# ---- the kit itself, against the RFCs' own examples ---------------------------------------------

def test_dpopkit_thumbprint_and_ath_match_the_rfc_examples():
    # RFC 7638 §3.1.
    n = ("0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZ"
         "CiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZ"
         "gnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIq"
         "bw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw")
    rsa = {"kty": "RSA", "n": n, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}
    assert dpopkit.thumbprint(rsa) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    # RFC 9449 §6.1 and §7.1.
    ec = {"kty": "EC", "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
          "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA", "crv": "P-256"}
    assert dpopkit.thumbprint(ec) == "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
    assert dpopkit.ath("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU") == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"


# ---- one Envoy for the module ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def idp_key():
    return jwtkit.Key("ed", "as-1")


@pytest.fixture(scope="module")
def clients():
    """Client keys: the one tokens are bound to (`ec`, or `rsa`/`ed` for their own tests) and a
    thief's."""
    return {"ec": jwtkit.Key("ec", "client-ec"), "rsa": jwtkit.Key("rsa", "client-rsa"),
            "ed": jwtkit.Key("ed", "client-ed"), "thief": jwtkit.Key("ec", "thief")}


def jwt_block(idp_key, dpop, **extra):
    return {"issuers": [ISS], "audiences": [AUD], "algorithms": ["EdDSA"],
            "jwks": {"inline": jwtkit.jwks(idp_key)}, "dpop": dpop, **extra}


@pytest.fixture(scope="module")
def etcd():
    store = Etcd("dpop").start()
    yield store
    store.remove()


@pytest.fixture(scope="module")
def gw(request, idp_key, etcd, echo_upstream):
    ports = {name: free_port() for name in ("direct", "proxied", "proxied_ip", "ea", "eb")}
    direct = {"apis": [
        {"name": "opt", "path_prefix": "/opt", "jwt": jwt_block(idp_key, "optional")},
        {"name": "req", "path_prefix": "/req", "jwt": jwt_block(idp_key, "required")},
        {"name": "roles", "path_prefix": "/roles", "jwt": jwt_block(
            idp_key, "optional",
            required_claims=[{"name": "roles", "any_of": ["Orders.Write"], "methods": ["POST"]}])},
    ],
        # Forwarded headers count from 192.0.2.1 only: never from the tests' 127.0.0.1.
        "client_ip": {"trusted_proxy_hops": 1, "trusted_proxies": ["192.0.2.1/32"]}}
    proxied = {"apis": [{"name": "popt", "path_prefix": "/opt", "jwt": jwt_block(idp_key, "optional")}],
               "client_ip": {"trusted_proxy_hops": 1, "trusted_proxies": [f"{PROXY}/32"]}}
    # The same, plus an API whose IP filter makes the filter read the connection's peer.
    proxied_ip = {"apis": [{**proxied["apis"][0], "name": "piopt"},
                           {"name": "any", "path_prefix": "/any", "ip_filter": {"allow": ["0.0.0.0/0"]}}],
                  "client_ip": proxied["client_ip"]}
    shared = {"apis": [{"name": "eopt", "path_prefix": "/opt", "jwt": jwt_block(idp_key, "optional")}],
              "replay_store": {"etcd": {"timeout_ms": 1000}}}
    config = compose([
        gateway("direct", ports["direct"], direct, echo_upstream),
        gateway("proxied", ports["proxied"], proxied, echo_upstream),
        gateway("proxied_ip", ports["proxied_ip"], proxied_ip, echo_upstream),
        gateway("ea", ports["ea"], shared, echo_upstream, etcd=etcd.endpoint),
        gateway("eb", ports["eb"], shared, echo_upstream, etcd=etcd.endpoint),
    ], free_port())
    # Not as rendered (render writes one gateway per Envoy): each gateway gets a VM, hence a
    # local replay store, of its own, as docs/operations.md has operators do for several
    # policies in one Envoy; `ea` and `eb` are then two replicas sharing only etcd.
    for name in ports:
        filter_config(config, name)["vm_config"]["vm_id"] = name
    envoy = start_envoy(request, config, concurrency=2)
    envoy.ports = ports
    return envoy


# ---- helpers ------------------------------------------------------------------------------------

def bound_token(idp_key, client, **extra):
    """A token the identity provider bound to `client`'s key (`cnf.jkt`)."""
    claims = jwtkit.claims(ISS, AUD, cnf={"jkt": dpopkit.thumbprint(client)}, jti=f"t-{time.time_ns()}")
    claims.update(extra)
    return jwtkit.token(idp_key, claims)


def plain_token(idp_key, **extra):
    return jwtkit.token(idp_key, jwtkit.claims(ISS, AUD, jti=f"t-{time.time_ns()}", **extra))


def htu(gw, listener, path):
    """The URL Envoy sees for `path` on `listener`: http, Host 127.0.0.1:<port>."""
    return f"http://127.0.0.1:{gw.ports[listener]}{path}"


def send(gw, listener, path, token, proof=None, method="GET", scheme="DPoP", headers=None, source=None):
    """`method` `path` on `listener` with `Authorization: <scheme> <token>` and `proof` (a string,
    a list of proofs for several DPoP headers, or None for none)."""
    hdrs = [("Authorization", f"{scheme} {token}")]
    proofs = [] if proof is None else [proof] if isinstance(proof, str) else list(proof)
    hdrs += [("DPoP", p) for p in proofs]
    hdrs += list((headers or {}).items())
    return request(gw.ports[listener], method, path, headers=hdrs, source=source)


def assert_invalid_proof(r):
    assert r.status == 401, r
    assert r.json() == INVALID_PROOF, r
    assert r.header("www-authenticate") == DPOP_CHALLENGE, r
    assert r.header("content-type") == "application/json", r
    assert "demo-function-app" not in r.body


def log_mark(gw):
    """Where Envoy's log ends now: `refusal_reason` reads the refusals logged after it."""
    return len(gw.log_text())


def refusal_reason(gw, mark, timeout=10):
    return envoy_harness.refusal_reason(gw, mark, timeout)


def assert_refused_because(gw, send_request, reason):
    """`send_request()` is refused as an invalid proof, and the log says `reason`
    (core/src/jwt/dpop.rs DpopError::reason: docs/policy.md says the log says which check)."""
    mark = log_mark(gw)
    assert_invalid_proof(send_request())
    assert refusal_reason(gw, mark) == reason


def assert_upstream(r, path, method="GET"):
    assert r.status == 200, r
    echoed = r.json()
    assert echoed["app"] == "demo-function-app", r
    assert (echoed["method"], echoed["path"]) == (method, path), r
    return echoed


# ---- valid proofs --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,alg", [("ec", "ES256"), ("rsa", "RS256"), ("rsa", "PS256"), ("ed", "EdDSA")])
def test_a_valid_proof_reaches_the_upstream(gw, idp_key, clients, kind, alg):
    client = clients[kind]
    t = bound_token(idp_key, client)
    p = dpopkit.proof(client, "GET", htu(gw, "direct", "/opt/x"), t, alg=alg)
    echoed = assert_upstream(send(gw, "direct", "/opt/x", t, p), "/opt/x")
    assert echoed["headers"]["authorization"] == [f"DPoP {t}"]


def test_a_valid_proof_for_a_post_and_the_scheme_in_another_case(gw, idp_key, clients):
    c = clients["ec"]
    t = bound_token(idp_key, c)
    p = dpopkit.proof(c, "POST", htu(gw, "direct", "/opt/orders"), t)
    assert_upstream(send(gw, "direct", "/opt/orders", t, p, method="POST"), "/opt/orders", "POST")
    p = dpopkit.proof(c, "GET", htu(gw, "direct", "/opt/x"), t)
    assert_upstream(send(gw, "direct", "/opt/x", t, p, scheme="dpop"), "/opt/x")


def test_htu_ignores_the_query_and_the_scheme_case(gw, idp_key, clients):
    c = clients["ec"]
    t = bound_token(idp_key, c)
    p = dpopkit.proof(c, "GET", htu(gw, "direct", "/opt/x"), t)
    assert_upstream(send(gw, "direct", "/opt/x?page=2", t, p), "/opt/x?page=2")
    p = dpopkit.proof(c, "GET", f"HTTP://127.0.0.1:{gw.ports['direct']}/opt/x?other=1", t)
    assert_upstream(send(gw, "direct", "/opt/x", t, p), "/opt/x")


def test_iat_at_the_edges_of_the_window_is_accepted(gw, idp_key, clients):
    c = clients["ec"]
    t = bound_token(idp_key, c)
    url = htu(gw, "direct", "/opt/x")
    for iat in (int(time.time()) - MAX_AGE + 10, int(time.time()) + SKEW - 10):
        assert_upstream(send(gw, "direct", "/opt/x", t, dpopkit.proof(c, "GET", url, t, iat=iat)), "/opt/x")


def test_required_mode_accepts_a_valid_proof(gw, idp_key, clients):
    c = clients["ec"]
    t = bound_token(idp_key, c)
    assert_upstream(send(gw, "direct", "/req/x", t, dpopkit.proof(c, "GET", htu(gw, "direct", "/req/x"), t)), "/req/x")


# ---- every proof property broken, one at a time ----------------------------------------------------

def _broken(name, gw, idp_key, clients):
    """(token, proof) for a GET /opt/x on `direct` where the proof is right but for `name`."""
    c, thief = clients["ec"], clients["thief"]
    t = bound_token(idp_key, c)
    port = gw.ports["direct"]
    url = htu(gw, "direct", "/opt/x")
    now = int(time.time())

    def valid(**kw):
        return dpopkit.proof(c, "GET", url, t, **kw)

    cases = {
        "typ JWT": lambda: valid(header={"typ": "JWT"}),
        "typ missing": lambda: valid(header={"typ": OMIT}),
        "alg none": lambda: dpopkit.unsigned_proof(c, "GET", url, t, alg="none"),
        "alg HS256 keyed with the public key": lambda: dpopkit.hs256_proof(c, "GET", url, t,
                                                                           dpopkit.ec_public_bytes(c)),
        "alg RS256 with an EC jwk": lambda: dpopkit.unsigned_proof(c, "GET", url, t, alg="RS256",
                                                                   signature=jwtkit.b64(bytes(256))),
        "jwk with the private d": lambda: valid(header={"jwk": dpopkit.private_jwk(c)}),
        "jwk missing": lambda: valid(header={"jwk": OMIT}),
        # The client's public key in the header (the token's cnf.jkt), signed by the thief's key.
        "jwk of another key than the signature": lambda: valid(signer=thief),
        "signature altered": lambda: dpopkit.flip_signature_byte(valid()),
        "ECDSA zero signature": lambda: dpopkit.unsigned_proof(c, "GET", url, t, alg="ES256",
                                                               signature=jwtkit.b64(bytes(64))),
        "htm POST for a GET": lambda: valid(claims={"htm": "POST"}),
        "htm in lower case": lambda: valid(claims={"htm": "get"}),
        "htm missing": lambda: valid(claims={"htm": OMIT}),
        "htu other host": lambda: valid(claims={"htu": f"http://localhost:{port}/opt/x"}),
        "htu other port": lambda: valid(claims={"htu": f"http://127.0.0.1:{port + 1}/opt/x"}),
        "htu other path": lambda: valid(claims={"htu": f"http://127.0.0.1:{port}/opt/y"}),
        "htu https for http": lambda: valid(claims={"htu": f"https://127.0.0.1:{port}/opt/x"}),
        "htu missing": lambda: valid(claims={"htu": OMIT}),
        "iat stale": lambda: valid(iat=now - MAX_AGE - SKEW - 30),
        "iat in the future": lambda: valid(iat=now + SKEW + 30),
        "iat missing": lambda: valid(claims={"iat": OMIT}),
        "ath of another token": lambda: valid(claims={"ath": dpopkit.ath(bound_token(idp_key, c))}),
        "ath missing": lambda: valid(claims={"ath": OMIT}),
        # A complete, valid proof, but of the thief's own key: cnf.jkt names the client's.
        "proof by another key (jkt mismatch)": lambda: dpopkit.proof(thief, "GET", url, t),
        "jti missing": lambda: valid(claims={"jti": OMIT}),
        "jti empty": lambda: valid(claims={"jti": ""}),
        "jti longer than 256": lambda: valid(jti="j" * 257),
        "not a JWS": lambda: "not-a-proof",
    }
    return t, cases[name]()


BROKEN = [
    ("typ JWT", R_TYP), ("typ missing", R_TYP),
    ("alg none", R_ALG), ("alg HS256 keyed with the public key", R_ALG),
    ("alg RS256 with an EC jwk", R_KEY), ("jwk with the private d", R_KEY), ("jwk missing", R_KEY),
    ("jwk of another key than the signature", R_SIGNATURE), ("signature altered", R_SIGNATURE),
    ("ECDSA zero signature", R_SIGNATURE),
    ("htm POST for a GET", R_HTM), ("htm in lower case", R_HTM), ("htm missing", R_HTM),
    ("htu other host", R_HTU), ("htu other port", R_HTU), ("htu other path", R_HTU),
    ("htu https for http", R_HTU), ("htu missing", R_HTU),
    ("iat stale", R_IAT), ("iat in the future", R_IAT), ("iat missing", R_IAT),
    ("ath of another token", R_ATH), ("ath missing", R_ATH),
    ("proof by another key (jkt mismatch)", R_JKT),
    ("jti missing", R_JTI), ("jti empty", R_JTI), ("jti longer than 256", R_JTI),
    ("not a JWS", R_MALFORMED),
]


@pytest.mark.parametrize("name,reason", BROKEN, ids=[name for name, _ in BROKEN])
def test_a_proof_broken_in_one_property_is_refused(gw, idp_key, clients, name, reason):
    t, p = _broken(name, gw, idp_key, clients)
    assert_refused_because(gw, lambda: send(gw, "direct", "/opt/x", t, p), reason)


# ---- proofs are single-use ----------------------------------------------------------------------

def test_the_same_proof_twice_is_refused_the_second_time(gw, idp_key, clients):
    c = clients["ec"]
    t = bound_token(idp_key, c)
    p = dpopkit.proof(c, "GET", htu(gw, "direct", "/opt/x"), t)
    assert_upstream(send(gw, "direct", "/opt/x", t, p), "/opt/x")
    assert_refused_because(gw, lambda: send(gw, "direct", "/opt/x", t, p), R_REPLAYED)
    # From another client address too.
    assert_invalid_proof(send(gw, "direct", "/opt/x", t, p, source=NOT_PROXY))
    # The token itself is not single-use: a fresh proof works.
    assert_upstream(send(gw, "direct", "/opt/x", t, dpopkit.proof(c, "GET", htu(gw, "direct", "/opt/x"), t)), "/opt/x")


def test_a_proof_refused_by_the_claims_rules_is_not_spent(gw, idp_key, clients):
    c = clients["ec"]
    t = bound_token(idp_key, c)  # no roles: POST needs Orders.Write
    p = dpopkit.proof(c, "POST", htu(gw, "direct", "/roles/x"), t)
    for _ in range(2):  # the second time still the claims refusal, not a replay
        r = send(gw, "direct", "/roles/x", t, p, method="POST")
        assert r.status == 403, r
        assert r.json() == {"statusCode": 403, "message": "Insufficient claims"}, r
        assert r.header("www-authenticate") == 'Bearer error="insufficient_scope"', r
    writer = bound_token(idp_key, c, roles=["Orders.Write"])
    p = dpopkit.proof(c, "POST", htu(gw, "direct", "/roles/x"), writer)
    assert_upstream(send(gw, "direct", "/roles/x", writer, p, method="POST"), "/roles/x", "POST")
    assert_invalid_proof(send(gw, "direct", "/roles/x", writer, p, method="POST"))


def _worker_connections(gw, port):
    stats = gw.stats()
    prefix = f"listener.127.0.0.1_{port}.worker_"
    return {k: int(v) for k, v in stats.items() if k.startswith(prefix) and k.endswith(".downstream_cx_total")}


def test_the_same_proof_raced_from_16_connections_wins_once(gw, idp_key, clients):
    c = clients["ec"]
    port = gw.ports["direct"]
    t = bound_token(idp_key, c)
    before = _worker_connections(gw, port)
    for n in range(10):
        p = dpopkit.proof(c, "GET", htu(gw, "direct", "/opt/x"), t)
        headers = {"Authorization": f"DPoP {t}", "DPoP": p}
        statuses = envoy_harness.race([(port, "/opt/x", headers, PROXY)] * 16)
        assert statuses.count(200) == 1, (n, statuses)
        assert statuses.count(401) == 15, (n, statuses)
    # The race really spread over both workers (each keeps its own VM of the filter).
    after = _worker_connections(gw, port)
    grew = [k for k, v in after.items() if v > before.get(k, 0)]
    assert len(grew) >= 2, (before, after)


# ---- schemes, modes and headers ------------------------------------------------------------------

def test_a_bound_token_sent_as_bearer_is_refused(gw, idp_key, clients):
    c = clients["ec"]
    t = bound_token(idp_key, c)
    assert_refused_because(gw, lambda: send(gw, "direct", "/opt/x", t, scheme="Bearer"), R_BOUND_AS_BEARER)
    # Even with a valid proof next to it.
    p = dpopkit.proof(c, "GET", htu(gw, "direct", "/opt/x"), t)
    assert_refused_because(gw, lambda: send(gw, "direct", "/opt/x", t, p, scheme="Bearer"), R_BOUND_AS_BEARER)
    # ...which was not spent by that refusal.
    assert_upstream(send(gw, "direct", "/opt/x", t, p), "/opt/x")


def test_the_dpop_scheme_with_an_unbound_token_is_refused(gw, idp_key, clients):
    c = clients["ec"]
    t = plain_token(idp_key)
    p = dpopkit.proof(c, "GET", htu(gw, "direct", "/opt/x"), t)
    assert_refused_because(gw, lambda: send(gw, "direct", "/opt/x", t, p), R_NOT_BOUND)
    assert_refused_because(gw, lambda: send(gw, "direct", "/req/x", t, p), R_NOT_BOUND)


def test_required_mode_refuses_a_plain_bearer_token(gw, idp_key):
    t = plain_token(idp_key)
    assert_refused_because(gw, lambda: send(gw, "direct", "/req/x", t, scheme="Bearer"), R_REQUIRED)


def test_optional_mode_accepts_a_plain_bearer_token(gw, idp_key):
    t = plain_token(idp_key)
    for _ in range(2):  # and again: no proof, nothing to spend
        assert_upstream(send(gw, "direct", "/opt/x", t, scheme="Bearer"), "/opt/x")


def test_two_dpop_headers_are_refused(gw, idp_key, clients):
    c = clients["ec"]
    t = bound_token(idp_key, c)
    url = htu(gw, "direct", "/opt/x")
    first, second = dpopkit.proof(c, "GET", url, t), dpopkit.proof(c, "GET", url, t)
    assert_refused_because(gw, lambda: send(gw, "direct", "/opt/x", t, [first, second]), R_MISSING)
    assert_refused_because(gw, lambda: send(gw, "direct", "/opt/x", t, [first, first]), R_MISSING)
    # Neither was spent.
    assert_upstream(send(gw, "direct", "/opt/x", t, second), "/opt/x")


def test_no_dpop_header_is_refused(gw, idp_key, clients):
    t = bound_token(idp_key, clients["ec"])
    assert_refused_because(gw, lambda: send(gw, "direct", "/opt/x", t), R_MISSING)
    assert_refused_because(gw, lambda: send(gw, "direct", "/req/x", t), R_MISSING)


# ---- htu behind a proxy --------------------------------------------------------------------------

# Bugs found by these tests (reported, not fixed here; the tests say what docs/policy.md promises):
def test_behind_the_trusted_proxy_the_forwarded_host_names_the_url_when_the_peer_is_read(gw, idp_key, clients):
    """`proxied_ip` has an API with an IP filter besides its DPoP API, so the filter reads the
    connection's peer: X-Forwarded-Host from the listed proxy names the host."""
    c = clients["ec"]
    t = bound_token(idp_key, c)
    only_host = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Host": "api.example.com"}
    r = send(gw, "proxied_ip", "/opt/x", t, dpopkit.proof(c, "GET", "http://api.example.com/opt/x", t),
             headers=only_host, source=PROXY)
    assert_upstream(r, "/opt/x")
    # The hop between the proxy and Envoy is not the request's URL.
    r = send(gw, "proxied_ip", "/opt/x", t, dpopkit.proof(c, "GET", htu(gw, "proxied_ip", "/opt/x"), t),
             headers=only_host, source=PROXY)
    assert_invalid_proof(r)


def test_behind_the_trusted_proxy_the_forwarded_host_names_the_url(gw, idp_key, clients):
    """The same on `proxied`, whose only API is the DPoP one: what docs/policy.md promises for
    any policy."""
    c = clients["ec"]
    t = bound_token(idp_key, c)
    only_host = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Host": "api.example.com"}
    r = send(gw, "proxied", "/opt/x", t, dpopkit.proof(c, "GET", "http://api.example.com/opt/x", t),
             headers=only_host, source=PROXY)
    assert_upstream(r, "/opt/x")
    r = send(gw, "proxied", "/opt/x", t, dpopkit.proof(c, "GET", htu(gw, "proxied", "/opt/x"), t),
             headers=only_host, source=PROXY)
    assert_invalid_proof(r)


@pytest.mark.parametrize("listener", ["proxied", "proxied_ip"])
def test_the_proxy_hops_scheme_is_the_one_envoy_saw(gw, idp_key, clients, listener):
    """Envoy (as rendered: use_remote_address, no trusted hops, so that it never believes a forged
    X-Forwarded-For itself) writes X-Forwarded-Proto from its own connection: behind a proxy that
    terminates TLS and forwards plain HTTP, the scheme is http, even from a trusted proxy
    (docs/policy.md: re-encrypt between the proxy and Envoy)."""
    c = clients["ec"]
    t = bound_token(idp_key, c)
    assert_invalid_proof(send(gw, listener, "/opt/x", t, dpopkit.proof(c, "GET", PUBLIC_HTU, t),
                              headers=FORWARDED, source=PROXY))
    r = send(gw, listener, "/opt/x", t, dpopkit.proof(c, "GET", "http://api.example.com/opt/x", t),
             headers=FORWARDED, source=PROXY)
    assert_upstream(r, "/opt/x")


@pytest.mark.parametrize("listener,source", [("direct", PROXY), ("proxied_ip", NOT_PROXY), ("proxied", NOT_PROXY)])
def test_forwarded_headers_from_an_untrusted_peer_are_ignored(gw, idp_key, clients, listener, source):
    """`direct` trusts another proxy only, so 127.0.0.1 cannot name the URL; `proxied` and
    `proxied_ip` trust 127.0.0.1, not 127.0.0.2. The URL is then the one Envoy saw."""
    c = clients["ec"]
    t = bound_token(idp_key, c)
    for public in (PUBLIC_HTU, "http://api.example.com/opt/x"):
        assert_invalid_proof(send(gw, listener, "/opt/x", t, dpopkit.proof(c, "GET", public, t),
                                  headers=FORWARDED, source=source))
    assert_upstream(send(gw, listener, "/opt/x", t, dpopkit.proof(c, "GET", htu(gw, listener, "/opt/x"), t),
                         headers=FORWARDED, source=source), "/opt/x")


# ---- two replicas sharing etcd --------------------------------------------------------------------

@pytest.mark.parametrize("replica", ["ea", "eb"])
def test_each_replica_sharing_etcd_refuses_a_replay_on_itself(gw, idp_key, clients, replica):
    """Each replica refuses a replay on itself (the answer it got from etcd is cached)."""
    c = clients["ec"]
    t = bound_token(idp_key, c)
    p = dpopkit.proof(c, "GET", htu(gw, replica, "/opt/x"), t)
    assert_upstream(send(gw, replica, "/opt/x", t, p), "/opt/x")
    assert_refused_because(gw, lambda: send(gw, replica, "/opt/x", t, p), R_REPLAYED)
    assert_invalid_proof(send(gw, replica, "/opt/x", t, p, source=NOT_PROXY))
    assert_upstream(send(gw, replica, "/opt/x", t, dpopkit.proof(c, "GET", htu(gw, replica, "/opt/x"), t)), "/opt/x")


@pytest.mark.parametrize("first,second", [("ea", "eb"), ("eb", "ea")])
def test_a_proof_spent_on_one_replica_is_refused_on_the_other(gw, idp_key, clients, first, second):
    """The proof's `jti` is spent in etcd: the other replica, which never saw it, refuses it. Both
    replicas serve the same public host, so one proof names either."""
    c = clients["ec"]
    t = bound_token(idp_key, c)
    host = {"Host": "api.example.com"}
    p = dpopkit.proof(c, "GET", "http://api.example.com/opt/x", t)
    assert_upstream(send(gw, first, "/opt/x", t, p, headers=host), "/opt/x")
    assert_refused_because(gw, lambda: send(gw, second, "/opt/x", t, p, headers=host), R_REPLAYED)
    # A fresh proof is fine on the other replica.
    fresh = dpopkit.proof(c, "GET", "http://api.example.com/opt/x", t)
    assert_upstream(send(gw, second, "/opt/x", t, fresh, headers=host), "/opt/x")
