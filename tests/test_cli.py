"""The gateguard CLI: validate's exit codes and messages, render's output accepted by Envoy, and
the shipped envoy.yaml kept in sync with the demo policy."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from envoy_harness import CLI, ENVOY, ROOT


def run(*args, env=None, input=None):
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, env=env, input=input, timeout=60, cwd=ROOT)


def test_validate_accepts_the_shipped_policies():
    policies = sorted((ROOT / "policies").glob("*.json"))
    policies = [p for p in policies if not p.name.endswith(".schema.json")]
    assert policies
    r = run("validate", *policies)
    assert r.returncode == 0, r.stderr


def test_validate_reports_file_line_path_and_reason(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"apis": [{"name": "a", "path_prefix": "/a",\n  "ip_filter": {"deny": ["10.0.0.0/8", "10.0.0.1/8"]}}]}')
    r = run("validate", bad)
    assert r.returncode == 1
    assert f"{bad}:2:" in r.stderr
    assert "apis[0].ip_filter.deny[1]" in r.stderr
    assert "host bits" in r.stderr


SECRET = "s3cret-Fk-0123456789"
HMAC = "hmac-s3cret-0123456789-0123456789-xyz"


def api(extra):
    return '{"apis": [{"name": "a", "path_prefix": "/a", ' + extra + "}]}"


def jwt(secret):
    return ('"jwt": {"issuers": ["i"], "audiences": ["a"], "algorithms": ["HS256"], '
            f'"hmac_secret": {secret}}}')


# Policies whose error sits on, next to, or far from a secret; in every shape a secret is written.
SECRET_POLICIES = {
    "hmac too short, pretty": api(f'\n  "inject_headers": {{"x-functions-key": {{"value": "{SECRET}"}}}},\n  '
                                  + jwt('{"value": "short-s3cret"}') + "\n"),
    "error on the secret's line": api(f'"inject_headers": {{"x-k": {{"value": "{SECRET}"}}}}, "bad": 1'),
    "minified, secret after the error": api(f'"bad": 1, "inject_headers": {{"x-k": {{"value": "{SECRET}"}}}}'),
    "escaped quotes and commas": api('"inject_headers": {"x-k": {"value": "s3\\",cret\\\\"}}, "bad": 1'),
    "bare string header": api(f'"inject_headers": {{"x-k": "{SECRET}"}}'),
    "bare string hmac": api(jwt(f'"{HMAC}"')),
    "inject_headers not an object": api(f'"inject_headers": "{SECRET}"'),
    "number": api('"inject_headers": {"x-k": {"value": 731337731337}}'),
    "typo'd key": api(f'"inject_headers": {{"x-k": {{"vaule": "{SECRET}"}}}}'),
    "secret pasted as a key": api(jwt(f'{{"{HMAC}": "x"}}')),
    "control character": api(f'"inject_headers": {{"x-k": {{"value": "{SECRET}\\r\\n"}}}}'),
    "syntax error": api(f'"inject_headers": {{"x-k": {{"value": "{SECRET}"}}}}}}'),
    "crlf": api(f'\r\n"inject_headers": {{"x-k": {{"value": "{SECRET}"}}}},\r\n"bad": 1\r\n'),
}


@pytest.mark.parametrize("name", sorted(SECRET_POLICIES))
def test_no_command_prints_a_policy_secret(tmp_path, name):
    p = tmp_path / "secret.json"
    p.write_text(SECRET_POLICIES[name])
    r = run("validate", p)
    assert r.returncode == 1, r.stderr
    shown = r.stdout + r.stderr
    for secret in (SECRET, HMAC, "short-s3cret", "s3", "731337"):
        assert secret not in shown, f"{secret} in:\n{shown}"
    assert "error:" in r.stderr
    if " | " in r.stderr:
        assert "***" in r.stderr
    r = run("render", "--policy", p)
    assert r.returncode != 0
    for secret in (SECRET, HMAC, "short-s3cret", "s3", "731337"):
        assert secret not in r.stdout + r.stderr


def test_validate_context_shows_masked_values_where_they_stand(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(SECRET_POLICIES["hmac too short, pretty"])
    r = run("validate", p)
    assert r.returncode == 1
    assert "apis[0].jwt.hmac_secret: an HMAC secret needs at least 32 bytes" in r.stderr
    assert '"x-functions-key": {"value": "***"}' in r.stderr
    assert '"hmac_secret": {"value": "***"}' in r.stderr
    lines = r.stderr.splitlines()
    caret = next(i for i, line in enumerate(lines) if line.rstrip().endswith("^"))
    assert lines[caret - 1][lines[caret].index("^"):].startswith('{"value": "***"}')


def test_validate_exit_code_2_for_unreadable_file(tmp_path):
    r = run("validate", tmp_path / "missing.json")
    assert r.returncode == 2


def test_validate_check_env(tmp_path):
    p = tmp_path / "env.json"
    p.write_text('{"apis": [{"name": "a", "path_prefix": "/a", "inject_headers": {"x-k": {"env": "GG_TEST_UNSET"}}}]}')
    assert run("validate", p).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "GG_TEST_UNSET"}
    r = run("validate", "--check-env", p, env=env)
    assert r.returncode == 1 and "GG_TEST_UNSET" in r.stderr
    assert run("validate", "--check-env", p, env=dict(env, GG_TEST_UNSET="v")).returncode == 0


def test_hash_key_from_stdin_matches_argument():
    a = run("hash-key", "abc").stdout.strip()
    b = run("hash-key", input="abc\n").stdout.strip()
    assert a == b == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_shipped_envoy_yaml_is_render_of_demo_policy(tmp_path):
    out = tmp_path / "envoy.yaml"
    r = run("render", "--policy", "policies/demo.json", "--out", out, *RENDER_DEMO_ARGS)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == (ROOT / "envoy.yaml").read_text(), \
        "envoy.yaml is stale: run `make envoy.yaml`"


RENDER_DEMO_ARGS = []


@pytest.mark.parametrize("policy", ["demo.json", "entra-example.json"])
def test_rendered_config_passes_envoy_validate(tmp_path, policy):
    out = tmp_path / "envoy.yaml"
    assert run("render", "--policy", f"policies/{policy}", "--out", out).returncode == 0
    text = out.read_text()
    if policy == "entra-example.json":
        # The IdP cluster is reached over TLS with SNI, as Entra ID requires.
        assert "sni: login.microsoftonline.com" in text and "name: entra_id" in text
    env = dict(os.environ, CONFIG_APP_KEY="x")
    r = subprocess.run([ENVOY, "--mode", "validate", "-c", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_thumbprint_of_pem_der_and_pfx(tmp_path):
    from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12

    from certs import make_ca, make_leaf

    ca = make_ca()
    leaf = make_leaf(ca, "apim-client").write(tmp_path, "client")
    der = tmp_path / "client.cer"
    der.write_bytes(leaf.der)
    pfx = tmp_path / "client.pfx"
    pfx.write_bytes(pkcs12.serialize_key_and_certificates(
        b"apim client", leaf.key, leaf.cert, [ca.cert], BestAvailableEncryption(b"s3cret")))
    for path, extra in ((leaf.cert_path, []), (der, []), (pfx, ["--password", "s3cret"])):
        r = run("thumbprint", path, *extra)
        assert r.returncode == 0, r.stderr
        assert leaf.sha1.upper() in r.stdout and leaf.sha256.upper() in r.stdout
        assert "CN=apim-client" in r.stdout
    env = dict(os.environ, GATEGUARD_PFX_PASSWORD="s3cret")
    r = run("thumbprint", pfx, "--json", env=env)
    first = __import__("json").loads(r.stdout)[0]
    assert first["sha256"] == leaf.sha256.upper()
    r = run("thumbprint", pfx, "--password", "wrong")
    assert r.returncode == 1 and "password" in r.stderr


def test_thumbprint_refuses_garbage(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    r = run("thumbprint", bad)
    assert r.returncode == 1


def test_schema_is_current_and_shipped_policies_follow_it():
    r = run("schema")
    assert r.returncode == 0, r.stderr
    shipped = (ROOT / "policies" / "gateguard.schema.json").read_text()
    assert json.loads(r.stdout) == json.loads(shipped), \
        "policies/gateguard.schema.json is stale: run `make schema`"
    import jsonschema

    schema = json.loads(shipped)
    for policy in sorted((ROOT / "policies").glob("*.json")):
        if policy.name.endswith(".schema.json"):
            continue
        jsonschema.validate(json.loads(policy.read_text()), schema)
    # The schema refuses what the filter refuses for shape: unknown fields.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"apis": [{"name": "a", "path_prefix": "/a", "corz": {}}]}, schema)


COMPOSE_RENDER = ["--wasm", "/etc/envoy/gateguard.wasm", "--listen", "0.0.0.0:8080", "--admin", "0.0.0.0:9901",
                  "--upstream", "function-app:8081"]


def test_compose_envoy_config_is_current_and_valid(tmp_path):
    out = tmp_path / "envoy.yaml"
    r = run("render", "--policy", "policies/quickstart.json", "--out", out, *COMPOSE_RENDER)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == (ROOT / "deploy" / "envoy.compose.yaml").read_text(), \
        "deploy/envoy.compose.yaml is stale: run `make deploy/envoy.compose.yaml`"
    # Envoy accepts it (with the .wasm where this machine has it; function-app is not resolved).
    from envoy_harness import WASM
    out.write_text(out.read_text().replace("/etc/envoy/gateguard.wasm", str(WASM)))
    r = subprocess.run([ENVOY, "--mode", "validate", "-c", str(out)], cwd=ROOT,
                       env=dict(os.environ, CONFIG_APP_KEY="x"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]


def test_docker_compose_file_is_valid():
    import shutil
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("no docker-compose client on this machine")
    r = subprocess.run([compose, "-f", str(ROOT / "docker-compose.yaml"), "config", "-q"], cwd=ROOT,
                       env=dict(os.environ, CONFIG_APP_KEY="x"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_rendered_tls_listener_passes_envoy_validate(tmp_path):
    from certs import make_ca, make_leaf

    server = make_leaf(make_ca(), "localhost", server=True).write(tmp_path, "server")
    out = tmp_path / "envoy.yaml"
    r = run("render", "--policy", "policies/demo.json", "--out", out,
            "--tls-cert", server.cert_path, "--tls-key", server.key_path)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "require_client_certificate: false" in text and "ACCEPT_UNTRUSTED" in text
    assert "tls_minimum_protocol_version: TLSv1_2" in text
    r = subprocess.run([ENVOY, "--mode", "validate", "-c", str(out)], cwd=ROOT,
                       env=dict(os.environ, CONFIG_APP_KEY="x"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]


def test_token_bound_to_a_dpop_key_and_a_certificate_and_its_proof(tmp_path):
    import base64
    import hashlib
    import time

    import certs
    import jwtkit

    def b64d(part):
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    issuer, client = jwtkit.Key("rsa", "idp"), jwtkit.Key("ec", "client")
    (tmp_path / "idp.pem").write_bytes(issuer.private_pem())
    (tmp_path / "client.pem").write_bytes(client.private_pem())
    ca = certs.make_ca()
    leaf = certs.make_leaf(ca, "client.example")
    (tmp_path / "client.crt").write_text(leaf.pem)
    token = run("token", "--key", str(tmp_path / "idp.pem"), "--iss", "https://idp", "--aud", "api://a",
                "--dpop-key", str(tmp_path / "client.pem"), "--cnf-cert", str(tmp_path / "client.crt")).stdout.strip()
    claims = json.loads(b64d(token.split(".")[1]))
    # RFC 7638: the required members of the client's public key, sorted, no whitespace.
    jwk = client.jwk()
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    assert claims["cnf"]["jkt"] == jwtkit.b64(hashlib.sha256(canonical.encode()).digest())
    assert claims["cnf"]["x5t#S256"] == jwtkit.x5t_s256(leaf.der)

    url = "https://api.example.com/orders?x=1"
    proofs = [run("dpop-proof", "--key", str(tmp_path / "client.pem"), "--method", "POST", "--url", url,
                  "--token", token).stdout.strip() for _ in range(2)]
    header, body = (json.loads(b64d(p)) for p in proofs[0].split(".")[:2])
    assert header["typ"] == "dpop+jwt" and header["alg"] == "ES256"
    assert {k: header["jwk"][k] for k in ("crv", "kty", "x", "y")} == {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    assert "d" not in header["jwk"]
    assert body["htm"] == "POST" and body["htu"] == "https://api.example.com/orders"
    assert body["ath"] == jwtkit.b64(hashlib.sha256(token.encode()).digest())
    assert abs(body["iat"] - time.time()) < 60
    # Every proof gets its own jti.
    assert json.loads(b64d(proofs[1].split(".")[1]))["jti"] != body["jti"]
    # A key that cannot sign proofs is refused with the reason.
    bad = run("dpop-proof", "--key", str(tmp_path / "client.pem"), "--alg", "HS256", "--method", "GET", "--url", url)
    assert bad.returncode == 1 and "cannot sign a DPoP proof" in bad.stderr
