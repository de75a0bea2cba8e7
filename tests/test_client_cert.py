"""End-to-end client-certificate checks over real TLS: thumbprints from the connection, from
X-Forwarded-Client-Cert and from X-ARR-ClientCert, validity, rotation, header stripping."""

import base64
import http.client
import json
import ssl
import urllib.parse

import pytest

from certs import DAY, NOW, make_ca, make_leaf
from conftest import start_envoy
from envoy_harness import CONNECTION_CERTIFICATE, compose, connection_manager, envoy_version, free_port, gateway

MSG = {"statusCode": 403, "message": "Invalid client certificate"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca().write(d, "ca")
    other_ca = make_ca("another CA").write(d, "other-ca")
    return {
        "dir": d,
        "ca": ca,
        "server": make_leaf(ca, "localhost", server=True).write(d, "server"),
        "good": make_leaf(ca, "apim-client").write(d, "good"),
        "rotated": make_leaf(ca, "apim-client-2026").write(d, "rotated"),
        "unlisted": make_leaf(ca, "stranger").write(d, "unlisted"),
        "selfsigned_other": make_leaf(other_ca, "apim-client").write(d, "other"),
        "expired": make_leaf(ca, "old-client", NOW - 400 * DAY, NOW - DAY).write(d, "expired"),
        "future": make_leaf(ca, "future-client", NOW + 10 * DAY, NOW + 400 * DAY).write(d, "future"),
        "expiring": make_leaf(ca, "expiring-client", NOW - DAY, NOW + 5 * DAY).write(d, "expiring"),
    }


def colons(hexstr):
    return ":".join(hexstr[i:i + 2] for i in range(0, len(hexstr), 2)).upper()


def policy(p):
    def api(name, thumbprints, **extra):
        return {"name": name, "path_prefix": f"/{name}", "client_certificate": {"thumbprints": thumbprints, **extra}}
    return {"apis": [
        api("sha256", [p["good"].sha256]),
        api("sha1", [colons(p["good"].sha1)]),
        api("rotate", [p["good"].sha256.upper(), p["rotated"].sha1]),
        api("validity", [p["expired"].sha256, p["future"].sha256, p["expiring"].sha256]),
        api("novalidity", [p["expired"].sha256], check_validity=False),
        api("xfcc", [p["good"].sha256], sources=["x-forwarded-client-cert"]),
        api("arr", [p["good"].sha1], sources=["x-arr-clientcert"]),
        api("either", [p["good"].sha256], sources=["x-arr-clientcert", "connection"]),
        {"name": "open", "path_prefix": "/open"},
    ]}


@pytest.fixture(scope="module")
def gw(request, pki, echo_upstream):
    tls_port, http_port, admin = free_port(), free_port(), free_port()
    config = compose([gateway("gw", http_port, policy(pki), echo_upstream, tls_listen=f"127.0.0.1:{tls_port}",
                              tls_cert=pki["server"].cert_path, tls_key=pki["server"].key_path)], admin)
    # Not as rendered: the plain listener plays a gateway behind a proxy that forwards the
    # certificate, so it keeps the client's XFCC for gateguard to read.
    connection_manager(config, "gw")["forward_client_cert_details"] = "ALWAYS_FORWARD_ONLY"
    envoy = start_envoy(request, config)
    envoy.tls_port, envoy.http_port = tls_port, http_port
    return envoy


def tls_get(gw, path, client=None, headers=None):
    ctx = ssl.create_default_context(cafile=str(gw_pki["ca"].cert_path))
    if client is not None:
        ctx.load_cert_chain(str(client.cert_path), str(client.key_path))
    conn = http.client.HTTPSConnection("127.0.0.1", gw.tls_port, context=ctx, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def plain_get(gw, path, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


gw_pki = {}


@pytest.fixture(autouse=True)
def _pki(pki):
    gw_pki.update(pki)


def refused(result):
    status, body = result
    return status == 403 and json.loads(body) == MSG


@CONNECTION_CERTIFICATE
def test_listed_sha256_thumbprint_accepted(gw, pki):
    assert tls_get(gw, "/sha256/x", pki["good"])[0] == 200


@CONNECTION_CERTIFICATE
def test_listed_sha1_thumbprint_with_colons_accepted(gw, pki):
    assert tls_get(gw, "/sha1/x", pki["good"])[0] == 200


def test_unlisted_certificate_refused(gw, pki):
    assert refused(tls_get(gw, "/sha256/x", pki["unlisted"]))
    # Same subject, different key and issuer: the thumbprint is what counts.
    assert refused(tls_get(gw, "/sha256/x", pki["selfsigned_other"]))


def test_no_certificate_refused(gw):
    assert refused(tls_get(gw, "/sha256/x"))


def test_plain_http_to_certificate_api_refused(gw):
    assert refused(plain_get(gw, "/sha256/x"))


@CONNECTION_CERTIFICATE
def test_rotation_accepts_both_listed_certificates(gw, pki):
    assert tls_get(gw, "/rotate/x", pki["good"])[0] == 200
    assert tls_get(gw, "/rotate/x", pki["rotated"])[0] == 200
    assert refused(tls_get(gw, "/rotate/x", pki["unlisted"]))


@CONNECTION_CERTIFICATE
def test_validity_dates_checked(gw, pki):
    assert refused(tls_get(gw, "/validity/x", pki["expired"]))
    assert refused(tls_get(gw, "/validity/x", pki["future"]))
    assert tls_get(gw, "/validity/x", pki["expiring"])[0] == 200
    assert tls_get(gw, "/novalidity/x", pki["expired"])[0] == 200


@CONNECTION_CERTIFICATE
def test_expiring_certificate_is_counted_and_logged_once(gw, pki):
    for _ in range(3):
        assert tls_get(gw, "/validity/x", pki["expiring"])[0] == 200
    assert gw.counter("gateguard.validity.cert_expiring") >= 3
    lines = [l for l in gw.log_text().splitlines() if pki["expiring"].sha256 in l and "expires in" in l]
    assert len(lines) == 1, lines


def xfcc_for(cert):
    return f'Hash={cert.sha256};Cert="{urllib.parse.quote(cert.pem, safe="")}";Subject="CN=x"'


def test_xfcc_accepted_when_listed_and_stripped(gw, pki):
    status, body = plain_get(gw, "/xfcc/x", {"x-forwarded-client-cert": xfcc_for(pki["good"])})
    assert status == 200, body
    assert "x-forwarded-client-cert" not in json.loads(body)["headers"]


def test_xfcc_only_last_element_counts(gw, pki):
    forged = xfcc_for(pki["good"]) + "," + xfcc_for(pki["unlisted"])
    assert refused(plain_get(gw, "/xfcc/x", {"x-forwarded-client-cert": forged}))
    ok = xfcc_for(pki["unlisted"]) + "," + xfcc_for(pki["good"])
    assert plain_get(gw, "/xfcc/x", {"x-forwarded-client-cert": ok})[0] == 200


def test_header_sources_ignored_when_not_listed(gw, pki):
    # A connection-only API is not fooled by forwarded-certificate headers...
    arr = base64.b64encode(pki["good"].der).decode()
    assert refused(plain_get(gw, "/sha256/x", {"x-forwarded-client-cert": xfcc_for(pki["good"]), "x-arr-clientcert": arr}))
    # ...and an API listing only x-arr-clientcert ignores XFCC.
    assert refused(plain_get(gw, "/arr/x", {"x-forwarded-client-cert": xfcc_for(pki["good"])}))


def test_arr_clientcert_accepted_when_listed_and_stripped(gw, pki):
    arr = base64.b64encode(pki["good"].der).decode()
    status, body = plain_get(gw, "/arr/x", {"x-arr-clientcert": arr})
    assert status == 200, body
    assert "x-arr-clientcert" not in json.loads(body)["headers"]


@pytest.mark.parametrize("value", ["garbage!!", base64.b64encode(b"\x30\x82\x01").decode(), "AAAA"])
def test_arr_garbage_or_truncated_refused(gw, pki, value):
    assert refused(plain_get(gw, "/arr/x", {"x-arr-clientcert": value}))


def test_arr_truncated_real_certificate_refused(gw, pki):
    der = pki["good"].der
    assert refused(plain_get(gw, "/arr/x", {"x-arr-clientcert": base64.b64encode(der[: len(der) // 2]).decode()}))


@CONNECTION_CERTIFICATE
def test_first_source_that_yields_decides(gw, pki):
    arr_bad = base64.b64encode(pki["unlisted"].der).decode()
    assert refused(tls_get(gw, "/either/x", pki["good"], {"x-arr-clientcert": arr_bad}))
    assert tls_get(gw, "/either/x", pki["good"])[0] == 200


def test_open_api_passes_headers_through_untouched(gw, pki):
    status, body = plain_get(gw, "/open/x", {"x-arr-clientcert": "anything"})
    assert status == 200
    assert json.loads(body)["headers"]["x-arr-clientcert"] == ["anything"]


def test_cert_refusals_counted(gw):
    assert gw.counter("gateguard.sha256.cert_denied") >= 1


@pytest.mark.skipif(envoy_version() >= (1, 38), reason="Envoy 1.38+ gives the filter the certificate "
                    "(test_listed_sha256_thumbprint_accepted and the others run instead)")
def test_connection_certificate_fails_closed_on_older_envoy(gw, pki):
    """Envoy before 1.38 has no connection.peer_certificate attribute: a listed certificate is
    refused like no certificate at all, and the log says why, naming the version."""
    assert refused(tls_get(gw, "/sha256/x", pki["good"]))
    assert refused(tls_get(gw, "/rotate/x", pki["rotated"]))
    assert refused(tls_get(gw, "/validity/x", pki["expiring"]))
    lines = [l for l in gw.log_text().splitlines() if "connection.peer_certificate attribute needs Envoy 1.38" in l]
    assert lines, "no log line naming the Envoy version"
