"""What `gateguard render` sets on every listener it emits, run in a real Envoy: a client header
whose name holds `_` (`x_user_id` next to the gateway's `x-user-id`) never reaches the filter or
the function app, on the HTTP and the TLS listener, with the filter embedded or delivered by ECDS;
and X-Forwarded-For reaches the filter as the client's proxies sent it."""

import http.client
import json
import ssl
import subprocess

import pytest

from certs import make_ca, make_leaf
from envoy_harness import CLI, ROOT, WASM, Envoy, free_port, request
POLICY = {"apis": [{"name": "echo", "path_prefix": "/echo",
                    "inject_headers": {"x-user-id": {"value": "from-gateway"}}}]}
SMUGGLED = [("x_user_id", "admin"), ("X_User-Id", "admin"), ("x-user_id", "admin"), ("Ocp_Apim_Subscription_Key", "k")]


@pytest.fixture(scope="module", params=["embedded", "ecds"])
def rendered(request, tmp_path_factory, echo_upstream):
    tmp = tmp_path_factory.mktemp(f"rendered-{request.param}")
    server = make_leaf(make_ca(), "localhost", server=True).write(tmp, "server")
    ports = {"http": free_port(), "tls": free_port(), "admin": free_port()}
    policy = tmp / "policy.json"
    policy.write_text(json.dumps(POLICY))
    args = [str(CLI), "render", "--policy", str(policy), "--out", str(tmp / "envoy.yaml"), "--wasm", str(WASM),
            "--listen", f"127.0.0.1:{ports['http']}", "--tls-listen", f"127.0.0.1:{ports['tls']}",
            "--tls-cert", str(server.cert_path), "--tls-key", str(server.key_path),
            "--admin", f"127.0.0.1:{ports['admin']}", "--upstream", f"127.0.0.1:{echo_upstream}"]
    if request.param == "ecds":
        args += ["--ecds-dir", str(tmp / "ecds")]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert (tmp / "envoy.yaml").read_text().count("headers_with_underscores_action: DROP_HEADER") == 2
    envoy = Envoy(tmp / "envoy.yaml", admin_port=ports["admin"], name=f"rendered-{request.param}")
    envoy.start()
    envoy.ports = ports
    yield envoy
    envoy.stop()
    assert not envoy.problems(), envoy.problems()


def tls_get(port, path, headers):
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def test_underscore_spellings_are_dropped_on_the_http_listener(rendered):
    r = request(rendered.ports["http"], "GET", "/echo/x", headers=SMUGGLED + [("x-keep", "1")])
    assert r.status == 200, r
    seen = r.json()["headers"]
    assert seen["x-user-id"] == ["from-gateway"]
    assert seen["x-keep"] == ["1"]
    assert not [name for name in seen if "_" in name], seen
    assert rendered.counter("http1.dropped_headers_with_underscores") >= len(SMUGGLED)


def test_underscore_spellings_are_dropped_on_the_tls_listener(rendered):
    status, body = tls_get(rendered.ports["tls"], "/echo/x", SMUGGLED)
    assert status == 200, body
    seen = json.loads(body)["headers"]
    assert seen["x-user-id"] == ["from-gateway"]
    assert not [name for name in seen if "_" in name], seen


def test_forwarded_for_reaches_the_upstream_as_sent(rendered):
    r = request(rendered.ports["http"], "GET", "/echo/x", headers={"X-Forwarded-For": "203.0.113.9"})
    assert r.json()["headers"]["x-forwarded-for"] == ["203.0.113.9"]
