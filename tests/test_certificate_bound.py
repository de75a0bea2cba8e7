"""End-to-end `jwt.certificate_bound` (RFC 8705) in a real Envoy (docs/policy.md,
"Certificate-bound tokens"): over real mutual TLS, a token naming a certificate in
`cnf["x5t#S256"]` works only with that certificate, never with another the API also accepts;
`required` refuses unbound tokens; the check holds for cached tokens and refusals spend nothing;
and the same through a trusted proxy's x-arr-clientcert / x-forwarded-client-cert."""

import base64
import hashlib
import http.client
import ssl
import time
import urllib.parse

import pytest

import jwtkit
from certs import make_ca, make_leaf
from conftest import start_envoy
from envoy_harness import (CONNECTION_CERTIFICATE, Response, compose, connection_manager, free_port, gateway, render,
                           request)

ISS = "https://login.microsoftonline.com/tenant/v2.0"
AUD = "api://orders"
UNBOUND = "Certificate-bound token presented without its certificate"
BAD_CERT = {"statusCode": 403, "message": "Invalid client certificate"}
CHALLENGE = 'Bearer error="invalid_token"'
PROXY = "127.0.0.2"  # the trusted proxy's address (a loopback alias)


@pytest.fixture(scope="module")
def key():
    return jwtkit.Key("ed", "ed-1")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca().write(d, "ca")
    return {
        "ca": ca,
        "server": make_leaf(ca, "localhost", server=True).write(d, "server"),
        "mine": make_leaf(ca, "orders-client").write(d, "mine"),
        # Listed by the API too: a certificate the API accepts, but not the token's.
        "other": make_leaf(ca, "orders-client-2").write(d, "other"),
        "unlisted": make_leaf(ca, "stranger").write(d, "unlisted"),
    }


def api(name, key, pki, binding, sources=None, **extra):
    certificate = {"thumbprints": [pki["mine"].sha256, pki["other"].sha256]}
    if sources:
        certificate["sources"] = sources
    return {"name": name, "path_prefix": f"/{name}", "client_certificate": certificate,
            "jwt": {"issuers": [ISS], "audiences": [AUD], "algorithms": ["EdDSA"],
                    "jwks": {"inline": jwtkit.jwks(key)}, "certificate_bound": binding}, **extra}


@pytest.fixture(scope="module")
def gw(request, key, pki, echo_upstream):
    http_port, tls_port, proxied_port, admin = free_port(), free_port(), free_port(), free_port()
    direct = {"apis": [
        api("optional", key, pki, "optional"),
        api("required", key, pki, "required"),
        api("once", key, pki, "required", replay={"mode": "without_ip"}),
        api("claims", key, pki, "optional"),
    ]}
    direct["apis"][-1]["jwt"]["required_claims"] = [{"name": "roles", "any_of": ["Orders.Read"]}]
    proxied = {"apis": [
        api("arr", key, pki, "required", ["x-arr-clientcert"]),
        api("xfcc", key, pki, "required", ["x-forwarded-client-cert"]),
    ], "client_ip": {"trusted_proxy_hops": 1, "trusted_proxies": [f"{PROXY}/32"]}}
    config = compose([
        gateway("direct", http_port, direct, echo_upstream, tls_listen=f"127.0.0.1:{tls_port}",
                tls_cert=pki["server"].cert_path, tls_key=pki["server"].key_path),
        gateway("proxied", proxied_port, proxied, echo_upstream),
    ], admin)
    # Not as rendered: this listener plays a gateway behind a proxy that forwards the client's
    # certificate, so Envoy keeps the XFCC the proxy wrote for gateguard to read (as in
    # test_client_cert.py). x-arr-clientcert needs no change.
    connection_manager(config, "proxied")["forward_client_cert_details"] = "ALWAYS_FORWARD_ONLY"
    envoy = start_envoy(request, config)
    envoy.http_port, envoy.tls_port, envoy.proxied_port = http_port, tls_port, proxied_port
    return envoy


_count = [0]


def token(key, cert=None, **cnf):
    """A fresh token, bound to `cert` when given (or carrying the `cnf` given)."""
    _count[0] += 1
    extra = {"jti": f"cb-{_count[0]}-{time.time_ns()}"}
    if cert is not None:
        cnf["x5t#S256"] = jwtkit.x5t_s256(cert.der)
    if cnf:
        extra["cnf"] = cnf
    return jwtkit.token(key, jwtkit.claims(ISS, AUD, **extra))


def tls_get(gw, pki, path, client, t, headers=None):
    """GET over TLS to the direct gateway, presenting certificate `client` (None: none)."""
    ctx = ssl.create_default_context(cafile=str(pki["ca"].cert_path))
    if client is not None:
        ctx.load_cert_chain(str(client.cert_path), str(client.key_path))
    conn = http.client.HTTPSConnection("127.0.0.1", gw.tls_port, context=ctx, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {t}", **(headers or {})})
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode())
    finally:
        conn.close()


def proxied_get(gw, path, t, cert_headers, source=PROXY):
    headers = {"Authorization": f"Bearer {t}", "X-Forwarded-For": "198.51.100.7", **cert_headers}
    return request(gw.proxied_port, "GET", path, headers=headers, source=source)


def arr(cert):
    return {"X-ARR-ClientCert": base64.b64encode(cert.der).decode()}


def xfcc(cert):
    return {"X-Forwarded-Client-Cert": f'Hash={cert.sha256};Cert="{urllib.parse.quote(cert.pem, safe="")}"'}


def ok(r):
    assert r.status == 200, r
    assert r.json()["app"] == "demo-function-app", r
    return r.json()


def assert_unbound(r):
    assert r.status == 401, r
    assert r.json() == {"statusCode": 401, "message": UNBOUND}, r
    assert r.header("www-authenticate") == CHALLENGE, r
    assert r.header("content-type") == "application/json", r


def assert_bad_cert(r):
    assert r.status == 403, r
    assert r.json() == BAD_CERT, r


# --- over mutual TLS, the certificate of the connection ---------------------------------------

@CONNECTION_CERTIFICATE
@pytest.mark.parametrize("path", ["/optional/x", "/required/x"])
def test_token_bound_to_the_presented_certificate_accepted(gw, key, pki, path):
    ok(tls_get(gw, pki, path, pki["mine"], token(key, pki["mine"])))
    ok(tls_get(gw, pki, path, pki["other"], token(key, pki["other"])))


@CONNECTION_CERTIFICATE
@pytest.mark.parametrize("path", ["/optional/x", "/required/x"])
def test_token_bound_to_another_accepted_certificate_refused(gw, key, pki, path):
    # `other` passes the API's certificate check (the unbound token below proves it) but is
    # not the certificate the token names.
    ok(tls_get(gw, pki, "/optional/x", pki["other"], token(key)))
    assert_unbound(tls_get(gw, pki, path, pki["other"], token(key, pki["mine"])))


def test_no_client_certificate_is_refused_by_the_certificate_check_first(gw, key, pki):
    # Checks run in order (docs/policy.md): the client certificate before the JWT, so a bound
    # token without any certificate meets 403 `Invalid client certificate`.
    t = token(key, pki["mine"])
    assert_bad_cert(tls_get(gw, pki, "/optional/x", None, t))
    assert_bad_cert(tls_get(gw, pki, "/required/x", None, t))
    assert_bad_cert(request(gw.http_port, "GET", "/required/x", headers={"Authorization": f"Bearer {t}"}))
    # A token bound to a certificate the API does not list does not make that certificate good.
    assert_bad_cert(tls_get(gw, pki, "/optional/x", pki["unlisted"], token(key, pki["unlisted"])))


@CONNECTION_CERTIFICATE
def test_required_refuses_unbound_tokens(gw, key, pki):
    assert_unbound(tls_get(gw, pki, "/required/x", pki["mine"], token(key)))
    # A `cnf` without `x5t#S256` (a DPoP key thumbprint) is no certificate binding.
    assert_unbound(tls_get(gw, pki, "/required/x", pki["mine"], token(key, jkt="0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I")))


@CONNECTION_CERTIFICATE
def test_optional_accepts_unbound_tokens(gw, key, pki):
    ok(tls_get(gw, pki, "/optional/x", pki["mine"], token(key)))
    ok(tls_get(gw, pki, "/optional/x", pki["other"], token(key, jkt="0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I")))


def sha256(cert):
    return hashlib.sha256(cert.der).digest()


@pytest.mark.parametrize("form", [
    lambda c: sha256(c).hex(),                                         # hex thumbprint
    lambda c: sha256(c).hex().upper(),
    lambda c: base64.urlsafe_b64encode(sha256(c)).decode(),            # padded
    lambda c: base64.b64encode(sha256(c)).decode(),                    # standard base64
    lambda c: jwtkit.b64(hashlib.sha1(c.der).digest()),                # x5t (SHA-1), not x5t#S256
    lambda c: [jwtkit.x5t_s256(c.der)],                                # not a string
    lambda c: None,
], ids=["hex", "HEX", "padded", "standard", "sha1", "array", "null"])
@CONNECTION_CERTIFICATE
def test_thumbprint_in_another_form_binds_to_nothing(gw, key, pki, form):
    t = token(key, **{"x5t#S256": form(pki["mine"])})
    assert_unbound(tls_get(gw, pki, "/optional/x", pki["mine"], t))


@CONNECTION_CERTIFICATE
def test_forwarded_certificate_headers_do_not_bind_on_a_connection_api(gw, key, pki):
    # The API reads the connection only: a header naming the token's certificate changes nothing.
    t = token(key, pki["mine"])
    assert_unbound(tls_get(gw, pki, "/required/x", pki["other"], t, {**arr(pki["mine"]), **xfcc(pki["mine"])}))
    seen = ok(tls_get(gw, pki, "/required/x", pki["mine"], t, arr(pki["other"])))
    assert "x-arr-clientcert" not in seen["headers"]


@CONNECTION_CERTIFICATE
def test_a_cached_token_is_checked_against_each_requests_certificate(gw, key, pki):
    t = token(key, pki["mine"])
    ok(tls_get(gw, pki, "/optional/x", pki["mine"], t))
    hits = gw.counter("gateguard.optional.jwt_cache_hit")
    assert_unbound(tls_get(gw, pki, "/optional/x", pki["other"], t))
    ok(tls_get(gw, pki, "/optional/x", pki["mine"], t))
    assert gw.counter("gateguard.optional.jwt_cache_hit") >= hits + 2  # both answered from the cache


@CONNECTION_CERTIFICATE
def test_a_stolen_bound_token_cannot_be_spent_by_the_thief(gw, key, pki):
    # `without_ip` replay runs after the binding: the thief's refused attempts record nothing,
    # and the owner still gets the token's one use.
    t = token(key, pki["mine"])
    assert_unbound(tls_get(gw, pki, "/once/x", pki["other"], t))
    assert_bad_cert(tls_get(gw, pki, "/once/x", None, t))
    assert_bad_cert(tls_get(gw, pki, "/once/x", pki["unlisted"], t))
    ok(tls_get(gw, pki, "/once/x", pki["mine"], t))
    r = tls_get(gw, pki, "/once/x", pki["mine"], t)
    assert r.status == 401 and r.json()["message"] == "Token replay detected", r


@CONNECTION_CERTIFICATE
def test_binding_is_checked_after_the_signature_and_before_the_claims_rules(gw, key, pki):
    t = token(key, pki["mine"])  # bound, without the role the API requires
    assert_unbound(tls_get(gw, pki, "/claims/x", pki["other"], t))
    r = tls_get(gw, pki, "/claims/x", pki["mine"], t)
    assert r.status == 403 and r.json()["message"] == "Insufficient claims", r
    # A forged signature is refused as invalid whatever certificate it names.
    forged = t[: t.rindex(".") + 1] + jwtkit.b64(b"\0" * 64)
    r = tls_get(gw, pki, "/claims/x", pki["other"], forged)
    assert r.status == 401 and r.json()["message"] == "Invalid or expired token", r
    roles = jwtkit.token(key, jwtkit.claims(ISS, AUD, roles=["Orders.Read"], cnf={"x5t#S256": jwtkit.x5t_s256(pki["mine"].der)}))
    ok(tls_get(gw, pki, "/claims/x", pki["mine"], roles))


# --- behind a trusted proxy: the certificate the proxy forwards -------------------------------

@pytest.mark.parametrize("api,header", [("arr", arr), ("xfcc", xfcc)])
def test_bound_token_through_a_trusted_proxy(gw, key, pki, api, header):
    t = token(key, pki["mine"])
    seen = ok(proxied_get(gw, f"/{api}/x", t, header(pki["mine"])))
    assert "x-arr-clientcert" not in seen["headers"] and "x-forwarded-client-cert" not in seen["headers"]
    assert_unbound(proxied_get(gw, f"/{api}/x", t, header(pki["other"])))
    assert_unbound(proxied_get(gw, f"/{api}/x", token(key), header(pki["mine"])))  # required


@pytest.mark.parametrize("api,header", [("arr", arr), ("xfcc", xfcc)])
def test_certificate_header_from_an_untrusted_peer_is_no_certificate(gw, key, pki, api, header):
    # A certificate is public: a client reaching the gateway directly cannot present the
    # token's certificate in a header. No certificate: 403, before the token is looked at.
    assert_bad_cert(proxied_get(gw, f"/{api}/x", token(key, pki["mine"]), header(pki["mine"]), source="127.0.0.1"))


def test_render_refuses_binding_without_the_apis_client_certificate(key):
    policy = {"apis": [{"name": "b", "path_prefix": "/b", "jwt": {
        "issuers": [ISS], "audiences": [AUD], "algorithms": ["EdDSA"],
        "jwks": {"inline": jwtkit.jwks(key)}, "certificate_bound": "required"}}]}
    with pytest.raises(RuntimeError, match=r"apis\[0\]\.jwt\.certificate_bound"):
        render(policy, listen="127.0.0.1:8080", upstream="127.0.0.1:8081")
