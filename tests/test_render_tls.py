"""`gateguard render` takes TLS from the policy, on both sides of the gateway, run in a real Envoy
with certificates made at test time (docs/policy.md, "Listener TLS" and "Reaching the function
app").

The listener: real TLS clients capped at one version. TLS 1.1 is refused and TLS 1.2 accepted
when the policy says nothing, `min_version: "1.3"` refuses TLS 1.2, and `cipher_suites` limits
what TLS 1.2 negotiates. A listener set by hand to TLS 1.1 shows that the TLS 1.1 client really
offers TLS 1.1 (so its refusal is the minimum version's doing, not the client's).

The function app: an HTTPS upstream on 127.0.0.1 that requires a client certificate from its own
CA (CERT_REQUIRED) and echoes the SNI, the client certificate's CN and the Host it got. The
gateway's certificate from files and from an SDS file (replaced without a restart) reaches it;
without one the upstream refuses the handshake (503); a server certificate from another CA or for
another name is refused by Envoy (its ssl.fail_verify_* counters say which); upstream
`min_version` holds; Envoy's --mode validate accepts what render writes.

What render refuses it refuses before writing anything, and the filter refuses the policy's own
contradictions too, with the field's path in Envoy's log."""

import http.client
import json
import os
import re
import ssl
import subprocess
import warnings

import pytest

from certs import make_ca, make_leaf
from conftest import start_envoy
from envoy_harness import (CLI, ENVOY, ROOT, compose, connection_manager, free_port, gateway,
                           listener, render, request, run_with_policy_text, wait_for)
import upstream

APP = "contoso-fn.app.test"
ECHO = {"apis": [{"name": "echo", "path_prefix": "/echo"}]}
FN = [{"name": "fn", "path_prefix": "/fn"}]
SECRET = "gateway_client"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("render-tls-pki")
    ca, app_ca, client_ca = make_ca().write(d, "ca"), make_ca("app CA").write(d, "app-ca"), \
        make_ca("gateway clients CA").write(d, "client-ca")
    return {
        "dir": d,
        "ca": ca,
        "server": make_leaf(ca, "localhost", server=True).write(d, "server"),
        "app_ca": app_ca,
        "other_ca": make_ca("another CA").write(d, "other-ca"),
        "client_ca": client_ca,
        # App Service presents a wildcard certificate (*.azurewebsites.net).
        "app": make_leaf(app_ca, "app", server=True, dns_names=["*.app.test"]).write(d, "app"),
        "gw_files": make_leaf(client_ca, "gateway-files").write(d, "gw-files"),
        "gw_sds": make_leaf(client_ca, "gateway-sds").write(d, "gw-sds"),
        "gw_rotated": make_leaf(client_ca, "gateway-sds-rotated").write(d, "gw-rotated"),
    }


# ---- the listener ----

def tls_client(pki, version, ciphers=None):
    """A client that offers exactly TLS `version` and trusts the test CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki["ca"].cert_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1 is deprecated
        ctx.minimum_version = ctx.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        # OpenSSL 3's default security level refuses TLS 1.1 (its SHA-1 signatures) outright.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    elif ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def tls_get(port, ctx):
    """(TLS version, cipher, HTTP status) of GET /echo/x over a handshake with `ctx`;
    ssl.SSLError when the listener refuses the handshake."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.connect()
        version, cipher = conn.sock.version(), conn.sock.cipher()[0]
        conn.request("GET", "/echo/x")
        r = conn.getresponse()
        r.read()
        return version, cipher, r.status
    finally:
        conn.close()


@pytest.fixture(scope="module")
def listeners(request, pki, echo_upstream):
    ports = {name: (free_port(), free_port()) for name in ("default", "tls13", "ciphers", "legacy")}
    policies = {
        # No `listener`: render's default, TLS 1.2 up.
        "default": ECHO,
        "tls13": dict(ECHO, listener={"tls": {"min_version": "1.3"}}),
        "ciphers": dict(ECHO, listener={"tls": {"cipher_suites": ["ECDHE-ECDSA-AES256-GCM-SHA384",
                                                                   "ECDHE-ECDSA-CHACHA20-POLY1305"]}}),
        "legacy": ECHO,
    }
    configs = [gateway(name, http_port, policies[name], echo_upstream, tls_listen=f"127.0.0.1:{tls_port}",
                       tls_cert=pki["server"].cert_path, tls_key=pki["server"].key_path)
               for name, (http_port, tls_port) in ports.items()]
    config = compose(configs, free_port())
    params = listener(config, "legacy_tls")["filter_chains"][0]["transport_socket"]["typed_config"][
        "common_tls_context"]["tls_params"]
    assert params == {"tls_minimum_protocol_version": "TLSv1_2"}
    # Not as rendered: the control listener accepts TLS 1.1, which no policy can ask for, with a
    # CBC suite TLS 1.1 can use (Envoy's defaults hold none).
    params["tls_minimum_protocol_version"] = "TLSv1_1"
    params["cipher_suites"] = ["ECDHE-ECDSA-AES128-SHA"]
    envoy = start_envoy(request, config)
    envoy.tls = {name: tls_port for name, (_, tls_port) in ports.items()}
    return envoy


def test_the_tls_1_1_client_really_offers_tls_1_1(listeners, pki):
    if not ssl.HAS_TLSv1_1:
        pytest.skip("this OpenSSL was built without TLS 1.1: the refusal test still runs, with a "
                    "client that cannot complete any handshake")
    version, _, status = tls_get(listeners.tls["legacy"], tls_client(pki, ssl.TLSVersion.TLSv1_1))
    assert (version, status) == ("TLSv1.1", 200)


def test_a_tls_1_1_client_is_refused_when_the_policy_says_nothing(listeners, pki):
    with pytest.raises(ssl.SSLError) as refused:
        tls_get(listeners.tls["default"], tls_client(pki, ssl.TLSVersion.TLSv1_1))
    if ssl.HAS_TLSv1_1:
        # Envoy's answer to a client below its minimum: a protocol_version alert.
        assert "PROTOCOL_VERSION" in str(refused.value).upper(), refused.value


def test_a_tls_1_2_client_is_accepted_when_the_policy_says_nothing(listeners, pki):
    version, _, status = tls_get(listeners.tls["default"], tls_client(pki, ssl.TLSVersion.TLSv1_2))
    assert (version, status) == ("TLSv1.2", 200)


def test_min_version_1_3_refuses_a_tls_1_2_client(listeners, pki):
    with pytest.raises(ssl.SSLError) as refused:
        tls_get(listeners.tls["tls13"], tls_client(pki, ssl.TLSVersion.TLSv1_2))
    assert "PROTOCOL_VERSION" in str(refused.value).upper(), refused.value
    version, _, status = tls_get(listeners.tls["tls13"], tls_client(pki, ssl.TLSVersion.TLSv1_3))
    assert (version, status) == ("TLSv1.3", 200)


def test_cipher_suites_limit_what_tls_1_2_negotiates(listeners, pki):
    aes128 = tls_client(pki, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256")
    # The default listener takes that suite; the one limited to AES-256 and ChaCha20 refuses it.
    assert tls_get(listeners.tls["default"], aes128) == ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256", 200)
    with pytest.raises(ssl.SSLError) as refused:
        tls_get(listeners.tls["ciphers"], aes128)
    assert "HANDSHAKE_FAILURE" in str(refused.value).upper(), refused.value
    # The policy's order is the preference, whatever the client's.
    client_prefers_chacha = tls_client(pki, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256:"
                                       "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384")
    assert tls_get(listeners.tls["ciphers"], client_prefers_chacha) == \
        ("TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384", 200)
    chacha = tls_client(pki, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-CHACHA20-POLY1305")
    assert tls_get(listeners.tls["ciphers"], chacha) == ("TLSv1.2", "ECDHE-ECDSA-CHACHA20-POLY1305", 200)
    # TLS 1.3 is not limited by it.
    version, _, status = tls_get(listeners.tls["ciphers"], tls_client(pki, ssl.TLSVersion.TLSv1_3))
    assert (version, status) == ("TLSv1.3", 200)


def test_render_refuses_what_would_run_otherwise_than_the_policy_says(tmp_path):
    # What render refuses, it refuses before writing anything; each refusal is unit-tested in
    # cli/src/render/tests/tls.rs.
    out = tmp_path / "envoy.yaml"

    def rendered(policy, *options):
        path = tmp_path / "policy.json"
        path.write_text(json.dumps(policy))
        return subprocess.run([str(CLI), "render", "--policy", str(path), "--out", str(out), *options],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)

    r = rendered(ECHO, "--upstream", f"{APP}:443")
    assert r.returncode == 2 and "port 443 is HTTPS's, and the policy has no upstream.tls" in r.stderr, r.stderr
    r = rendered(dict(ECHO, listener={"tls": {"min_version": "1.3"}}))
    assert r.returncode == 2 and "the policy sets listener.tls, for the TLS listener" in r.stderr, r.stderr
    r = rendered(dict(ECHO, upstream={"tls": {"sni": APP}}), "--upstream-sni", APP, "--upstream", f"{APP}:443")
    assert r.returncode == 2 and "--upstream-sni and the policy's upstream.tls" in r.stderr, r.stderr
    # The policy's own contradictions are refused as validate and the filter refuse them.
    r = rendered(dict(ECHO, upstream={"tls": {"sni": APP, "client_certificate": {"cert_file": "/c.pem"}}}),
                 "--upstream", f"{APP}:443")
    assert r.returncode == 1, r.stderr
    assert "upstream.tls.client_certificate: cert_file needs key_file (its private key)" in r.stderr
    assert not out.exists()
    # The shorthand renders, and says what it stands for.
    r = rendered(ECHO, "--upstream-sni", APP, "--upstream", f"{APP}:443")
    assert r.returncode == 0, r.stderr
    assert f'stands for the policy\'s "upstream": {{"tls": {{"sni": "{APP}"}}}}' in r.stderr
    assert f"host_rewrite_literal: {APP}" in out.read_text()
    assert "host_rewrite is false" not in r.stderr
    # Passing the client's Host on is allowed, and said to be what it is.
    r = rendered(dict(ECHO, upstream={"tls": {"sni": APP, "host_rewrite": False}}), "--upstream", f"{APP}:443")
    assert r.returncode == 0, r.stderr
    assert "warning: upstream.tls.host_rewrite is false: the function app gets the Host each client sends" in r.stderr
    assert "host_rewrite_literal" not in out.read_text()


@pytest.mark.parametrize("policy,expected", [
    (dict(ECHO, listener={"tls": {"cipher_suites": ["TLS_AES_128_GCM_SHA256"]}}),
     "listener.tls.cipher_suites[0]: \"TLS_AES_128_GCM_SHA256\" is a TLS 1.3 suite"),
    (dict(ECHO, upstream={"tls": {"sni": APP, "client_certificate": {"key_file": "/k.pem"}}}),
     "upstream.tls.client_certificate: key_file needs cert_file"),
])
def test_the_filter_refuses_the_same_policies(echo_upstream, policy, expected):
    # Not as rendered: render refuses these itself, so each goes into a rendered configuration by
    # hand. The filter ignores listener and upstream, but a policy is accepted or refused whole.
    code, log = run_with_policy_text(policy, echo_upstream, "bad-tls")
    assert code not in (None, 0), "Envoy kept running with a bad policy"
    assert "gateguard: policy refused" in log and expected in log, log[-3000:]


def envoy_validate(config, tmp_path):
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    return subprocess.run([ENVOY, "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_every_cipher_suite_a_policy_may_list_is_one_envoy_accepts(pki, tmp_path):
    # The list is the one gateguard checks against, as its refusal prints it.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(ECHO, listener={"tls": {"cipher_suites": ["NOT-A-SUITE"]}})))
    r = subprocess.run([str(CLI), "validate", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "listener.tls.cipher_suites[0]" in r.stderr, r.stderr
    names = re.search(r"these are \(BoringSSL's names\): ([A-Z0-9, -]+)", r.stderr).group(1).split(", ")
    assert len(names) == 14 and "ECDHE-ECDSA-AES128-GCM-SHA256" in names, names

    config = render(dict(ECHO, listener={"tls": {"cipher_suites": names}}), tls_cert=pki["server"].cert_path,
                    tls_key=pki["server"].key_path)
    params = listener(config, "gateway_tls")["filter_chains"][0]["transport_socket"]["typed_config"][
        "common_tls_context"]["tls_params"]
    assert params["cipher_suites"] == names
    r = envoy_validate(config, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # The same check refuses a name BoringSSL does not know: the acceptance above means something.
    params["cipher_suites"][-1] = "AES256-SHA999"
    r = envoy_validate(config, tmp_path)
    assert r.returncode != 0
    assert "Failed to initialize cipher suites" in r.stdout + r.stderr


# ---- the function app ----

def sds_file(path, cert):
    """Writes the SDS file holding the secret `SECRET` with `cert` the way the kubelet updates a
    mounted Secret: into a new directory, which the `..data` link is then renamed to point at;
    `path` itself is a link through `..data` and never moves (so only a watch on its directory,
    which render sets, sees the change)."""
    versions = sorted(path.parent.glob("..v*"))
    version = path.parent / f"..v{len(versions) + 1}"
    version.mkdir()
    (version / path.name).write_text(json.dumps({"resources": [{
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        "name": SECRET,
        "tls_certificate": {"certificate_chain": {"filename": str(cert.cert_path)},
                            "private_key": {"filename": str(cert.key_path)}},
    }]}))
    tmp = path.parent / "..data_tmp"
    os.symlink(version.name, tmp)
    os.replace(tmp, path.parent / "..data")
    if not path.is_symlink():
        os.symlink(f"..data/{path.name}", path)


def upstream_policy(pki, **tls):
    tls = {"sni": APP, "ca_file": str(pki["app_ca"].cert_path), **tls}
    return {"apis": FN, "upstream": {"tls": tls}}


def files(cert):
    return {"cert_file": str(cert.cert_path), "key_file": str(cert.key_path)}


def own_cluster(config, name):
    """Not as rendered: the gateway's `function_app` cluster is renamed `<name>_app`, so that
    gateways with different upstream TLS share one Envoy (and each has its own cluster stats)."""
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "function_app")
    cluster["name"] = cluster["load_assignment"]["cluster_name"] = f"{name}_app"
    connection_manager(config, name)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"] = \
        f"{name}_app"
    return config


@pytest.fixture(scope="module")
def apps(pki):
    servers = {
        # Requires a certificate from the gateway clients' CA.
        "mtls": upstream.start_tls(pki["app"], client_ca=pki["client_ca"]),
        # Goes no higher than TLS 1.2.
        "tls12": upstream.start_tls(pki["app"], max_version=ssl.TLSVersion.TLSv1_2),
    }
    yield servers
    for server in servers.values():
        server.shutdown()


@pytest.fixture(scope="module")
def sds_path(pki):
    path = pki["dir"] / "sds" / "gateway-client.json"
    path.parent.mkdir()
    sds_file(path, pki["gw_sds"])
    return path


@pytest.fixture(scope="module")
def gateways(pki, apps, sds_path):
    """name: (policy, upstream server)."""
    by_files = files(pki["gw_files"])
    return {
        "files": (upstream_policy(pki, client_certificate=by_files), apps["mtls"]),
        "sds": (upstream_policy(pki, client_certificate={"sds": {"path": str(sds_path), "secret": SECRET}}),
                apps["mtls"]),
        "nocert": (upstream_policy(pki), apps["mtls"]),
        "named": (upstream_policy(pki, host_rewrite="api.contoso.test", client_certificate=by_files), apps["mtls"]),
        "keephost": (upstream_policy(pki, host_rewrite=False, client_certificate=by_files), apps["mtls"]),
        "wrongca": (upstream_policy(pki, ca_file=str(pki["other_ca"].cert_path), client_certificate=by_files),
                    apps["mtls"]),
        "wrongname": (upstream_policy(pki, sni="contoso-fn.other.test", client_certificate=by_files), apps["mtls"]),
        "min12": (upstream_policy(pki), apps["tls12"]),
        "min13": (upstream_policy(pki, min_version="1.3"), apps["tls12"]),
        # An upstream that speaks TLS 1.3: a 1.3 minimum must connect, over 1.3.
        "min13ok": (upstream_policy(pki, min_version="1.3", client_certificate=by_files), apps["mtls"]),
    }


@pytest.fixture(scope="module")
def gw(request, gateways):
    ports = {name: free_port() for name in gateways}
    configs = [own_cluster(gateway(name, ports[name], policy, server.server_address[1]), name)
               for name, (policy, server) in gateways.items()]
    envoy = start_envoy(request, compose(configs, free_port()))
    envoy.ports = ports
    return envoy


def call(gw, name):
    return request(gw.ports[name], "GET", "/fn/x", headers={"Host": "gateway.example"})


@pytest.mark.parametrize("name", ["files", "sds"])
def test_rendered_upstream_mtls_passes_envoy_validate(gateways, name, tmp_path):
    policy, server = gateways[name]
    config = render(policy, upstream=f"127.0.0.1:{server.server_address[1]}")
    context = config["static_resources"]["clusters"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    assert ("tls_certificates" in context) == (name == "files")
    assert ("tls_certificate_sds_secret_configs" in context) == (name == "sds")
    r = envoy_validate(config, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_envoy_validate_finds_a_missing_client_certificate_file(pki, apps, tmp_path):
    # render does not look for files (they live where Envoy runs); Envoy does, before it serves.
    policy = upstream_policy(pki, client_certificate={"cert_file": str(tmp_path / "missing.crt"),
                                                      "key_file": str(pki["gw_files"].key_path)})
    config = render(policy, upstream=f"127.0.0.1:{apps['mtls'].server_address[1]}")
    r = envoy_validate(config, tmp_path)
    assert r.returncode != 0
    assert "missing.crt" in r.stdout + r.stderr


def test_a_client_certificate_from_files_reaches_an_upstream_that_requires_one(gw):
    r = call(gw, "files")
    assert r.status == 200, r
    seen = r.json()
    assert seen["client_cn"] == "gateway-files"
    # SNI and Host are the app's name, though Envoy connects to 127.0.0.1.
    assert (seen["sni"], seen["host"]) == (APP, APP)
    assert seen["path"] == "/fn/x"


def test_a_client_certificate_from_sds_reaches_it_too(gw):
    r = call(gw, "sds")
    assert r.status == 200, r
    assert (r.json()["client_cn"], r.json()["sni"], r.json()["host"]) == ("gateway-sds", APP, APP)


def test_a_replaced_sds_file_takes_effect_without_a_restart(gw, pki, sds_path):
    assert call(gw, "sds").json()["client_cn"] == "gateway-sds"
    try:
        sds_file(sds_path, pki["gw_rotated"])
        assert wait_for(lambda: call(gw, "sds").json().get("client_cn") == "gateway-sds-rotated", timeout=20), \
            call(gw, "sds")
    finally:
        sds_file(sds_path, pki["gw_sds"])
        assert wait_for(lambda: call(gw, "sds").json().get("client_cn") == "gateway-sds", timeout=20)


def test_without_a_client_certificate_the_upstream_refuses(gw, apps):
    before = len(apps["mtls"].refused)
    r = call(gw, "nocert")
    assert r.status == 503, r
    assert "demo-function-app" not in r.body and "tls-function-app" not in r.body

    def refused_for_want_of_a_certificate():
        return any("PEER_DID_NOT_RETURN_A_CERTIFICATE" in e for e in apps["mtls"].refused[before:])
    assert wait_for(refused_for_want_of_a_certificate, timeout=5), apps["mtls"].refused[before:]


def test_host_is_the_apps_name_or_the_policys_or_the_clients(gw):
    named = call(gw, "named").json()
    # The SNI (and the name the certificate is checked against) stays the app's.
    assert (named["host"], named["sni"]) == ("api.contoso.test", APP)
    kept = call(gw, "keephost").json()
    assert (kept["host"], kept["sni"]) == ("gateway.example", APP)


def test_a_server_certificate_from_another_ca_is_refused(gw):
    before = gw.counter("cluster.wrongca_app.ssl.fail_verify_error")
    r = call(gw, "wrongca")
    assert r.status == 503, r
    assert gw.counter("cluster.wrongca_app.ssl.fail_verify_error") > before


def test_a_server_certificate_for_another_name_is_refused(gw):
    before = gw.counter("cluster.wrongname_app.ssl.fail_verify_san")
    r = call(gw, "wrongname")
    assert r.status == 503, r
    assert gw.counter("cluster.wrongname_app.ssl.fail_verify_san") > before


def test_upstream_min_version_holds(gw):
    # The same upstream (TLS 1.2 at most), the same policy but for min_version.
    r = call(gw, "min12")
    assert r.status == 200, r
    assert r.json()["tls_version"] == "TLSv1.2"
    before = gw.counter("cluster.min13_app.ssl.connection_error")
    assert call(gw, "min13").status == 503
    assert gw.counter("cluster.min13_app.ssl.connection_error") > before
    assert gw.counter("cluster.min13_app.ssl.handshake") == 0


def test_upstream_min_version_1_3_connects_over_tls_1_3(gw):
    # Envoy's client side stops at TLS 1.2 unless render sets the maximum too.
    r = call(gw, "min13ok")
    assert r.status == 200, r
    assert r.json()["tls_version"] == "TLSv1.3"


def test_upstream_tls_1_2_is_still_negotiated_up_to_1_3_when_the_app_offers_it(gw):
    r = call(gw, "files")
    assert r.status == 200, r
    assert r.json()["tls_version"] == "TLSv1.3"
