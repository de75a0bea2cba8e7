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


# --- validate reports every error; byte-order marks; closed pipes; schema files; refusals --------


def error_lines(stderr):
    return [line for line in stderr.splitlines() if ": error: " in line]


def test_validate_reports_every_independent_error_with_context(tmp_path):
    p = tmp_path / "many.json"
    p.write_text(
        '{"apis": [\n'
        '  {"name": "a", "path_prefix": "/a", "corz": {},\n'
        f'   "inject_headers": {{"x-k": {{"value": "{SECRET}"}}}}}},\n'
        '  {"name": "b", "path_prefix": "/b", "ip_filter": {"allow": ["10.0.0.0/33"]}},\n'
        '  {"name": "c", "path_prefix": "/c",\n'
        '   "jwt": {"issuers": ["i"], "audiences": ["a"], "algorithms": ["HS256"], "hmac_secret": {"value": "short-s3cret"}}}\n'
        '],\n'
        '"token_cache": {"max_entries": 2000000}}\n')
    r = run("validate", p)
    assert r.returncode == 1, r.stderr
    lines = error_lines(r.stderr)
    # In document order, each file:line:column: error: path: reason.
    assert [line.split(": error: ")[1].split(":")[0] for line in lines] == [
        "apis[0].corz", "apis[1].ip_filter.allow[0]", "apis[2].jwt.hmac_secret", "token_cache.max_entries"]
    assert lines[0].startswith(f"{p}:2:") and "unknown field `corz`" in lines[0]
    assert lines[1].startswith(f"{p}:4:") and lines[2].startswith(f"{p}:6:") and lines[3].startswith(f"{p}:8:")
    assert r.stderr.rstrip().endswith(f"{p}: 4 errors")
    # Context under each, secrets masked in all of it.
    assert r.stderr.count("^") == 4
    for secret in (SECRET, "short-s3cret", "s3"):
        assert secret not in r.stderr
    # The same from render, which refuses before writing anything.
    r = run("render", "--policy", p)
    assert r.returncode == 1 and r.stdout == ""
    assert error_lines(r.stderr) == lines
    assert "^" in r.stderr and SECRET not in r.stderr


def test_validate_stops_at_a_syntax_error(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{"apis": [{"name": "a b", "path_prefix": "/a"}],\n "x" 1}')
    r = run("validate", p)
    assert r.returncode == 1
    assert len(error_lines(r.stderr)) == 1 and f"{p}:2:" in r.stderr


def test_render_errors_have_validates_form(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"apis": [{"name": "a", "path_prefix": "/a",\n  "ip_filter": {"deny": ["10.0.0.0/8", "10.0.0.1/8"]}}]}')
    r = run("render", "--policy", bad)
    assert r.returncode == 1 and r.stdout == ""
    assert error_lines(r.stderr) == error_lines(run("validate", bad).stderr)
    assert error_lines(r.stderr)[0].startswith(f"{bad}:2:")
    assert "apis[0].ip_filter.deny[1]: " in r.stderr and "    2 | " in r.stderr


BOM = "\ufeff"


def test_validate_accepts_a_byte_order_mark(tmp_path):
    p = tmp_path / "bom.json"
    p.write_text(BOM + (ROOT / "policies" / "quickstart.json").read_text(), encoding="utf-8")
    assert p.read_bytes().startswith(b"\xef\xbb\xbf")
    r = run("validate", p)
    assert r.returncode == 0, r.stderr
    # Columns on the first line count from after the mark, as editors show them; the context
    # shows the line without it.
    p.write_text(BOM + '{"apis": [{"name": "a", "path_prefix": "/a", "x": 1}]}', encoding="utf-8")
    r = run("validate", p)
    assert r.returncode == 1
    col = int(error_lines(r.stderr)[0].split(":")[2])
    assert col == len('{"apis": [{"name": "a", "path_prefix": "/a", "x"') + 1 or col == len('{"apis": [{"name": "a", "path_prefix": "/a", "x"')
    assert '    1 | {"apis"' in r.stderr
    # Rendered, the filter in Envoy reads the same document.
    out = tmp_path / "envoy.yaml"
    p.write_text(BOM + (ROOT / "policies" / "quickstart.json").read_text(), encoding="utf-8")
    assert run("render", "--policy", p, "--out", out).returncode == 0


def closed_pipe_run(*args):
    """Runs the CLI with its standard output a pipe whose reader has already gone."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([str(CLI), *map(str, args)], stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=60, cwd=ROOT)
    finally:
        os.close(write)


def test_output_into_a_closed_pipe_ends_quietly_by_sigpipe(tmp_path):
    import jwtkit
    import signal

    key = tmp_path / "k.pem"
    key.write_bytes(jwtkit.Key("rsa", "k").private_pem())
    for args in (("validate", "policies/demo.json", "policies/quickstart.json"), ("schema",),
                 ("jwks", "--key", key, "--kid", "k"), ("token", "--key", key, "--iss", "i"),
                 ("render", "--policy", "policies/demo.json"), ("hash-key", "abc")):
        r = closed_pipe_run(*args)
        # Killed by SIGPIPE as cat or grep would be (141 in a shell), never a panic.
        assert r.returncode == -signal.SIGPIPE, (args, r.returncode, r.stderr)
        assert "panicked" not in r.stderr and "failed printing" not in r.stderr, r.stderr
    # The way users meet it: a shell pipeline into head.
    r = subprocess.run(["bash", "-c", f'"{CLI}" schema | head -1; echo "status ${{PIPESTATUS[0]}}"'],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.stdout.splitlines()[0] == "{", r.stdout
    assert r.stdout.splitlines()[-1] in ("status 141", "status 0"), r.stdout
    assert "panicked" not in r.stderr, r.stderr


def test_validate_skips_the_schema_file_but_never_a_policy(tmp_path):
    policies = sorted((ROOT / "policies").glob("*.json"))
    assert any(p.name == "gateguard.schema.json" for p in policies)
    r = run("validate", *policies)
    assert r.returncode == 0, r.stderr
    assert "gateguard.schema.json: note: skipped: a JSON Schema document" in r.stderr
    assert "error" not in r.stderr
    # The schema alone: nothing validated is a failure (a schema deployed as a policy).
    r = run("validate", "policies/gateguard.schema.json")
    assert r.returncode == 1 and "no policy among the files" in r.stderr
    meta = "https://json-schema.org/draft/2020-12/schema"
    # A policy pointing "$schema" at a meta-schema is still a policy.
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"$schema": meta, "apis": [{"name": "a", "path_prefix": "/a"}]}))
    assert run("validate", p).returncode == 0
    p.write_text(json.dumps({"$schema": meta, "apis": [{"name": "a b", "path_prefix": "/a"}]}))
    r = run("validate", p)
    assert r.returncode == 1 and "apis[0].name" in r.stderr and "skipped" not in r.stderr
    # Schema keywords and an "apis": validated (and refused), not skipped.
    p.write_text(json.dumps({"$schema": meta, "properties": {}, "apis": []}))
    r = run("validate", p)
    assert r.returncode == 1 and "skipped" not in r.stderr
    # No schema keywords, or another "$schema": refused as the policy it claims to be.
    for doc in ({"$schema": meta}, {"$schema": "./gateguard.schema.json", "properties": {}},
                {"$schema": 3, "properties": {}}):
        p.write_text(json.dumps(doc))
        r = run("validate", p)
        assert r.returncode == 1 and "skipped" not in r.stderr, (doc, r.stderr)
        assert error_lines(r.stderr), r.stderr


def test_schema_lists_the_schema_key_and_the_shipped_policies_use_it():
    schema = json.loads(run("schema").stdout)
    assert schema["properties"]["$schema"]["type"] == "string"
    for name in ("demo.json", "quickstart.json", "entra-example.json"):
        assert json.loads((ROOT / "policies" / name).read_text())["$schema"] == "./gateguard.schema.json"


@pytest.mark.parametrize("key", ["", "   ", "\t", " abc", "abc "])
def test_hash_key_refuses_a_key_the_filter_never_accepts(key):
    r = run("hash-key", key)
    assert r.returncode == 1 and r.stdout == ""
    assert "gateguard hash-key: the key" in r.stderr
    r = run("hash-key", input=key + "\n")
    assert r.returncode == 1 and r.stdout == ""


def test_hash_key_from_empty_stdin_is_refused():
    r = run("hash-key", input="")
    assert r.returncode == 1 and "empty" in r.stderr


def test_token_refuses_keys_the_filter_refuses(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    short = tmp_path / "short.secret"
    short.write_text("x" * 31 + "\n")
    r = run("token", "--key", short, "--alg", "HS256", "--iss", "i")
    assert r.returncode == 1 and r.stdout == ""
    assert "the filter would refuse this HS256 key: an HMAC secret needs at least 32 bytes" in r.stderr
    ok = tmp_path / "ok.secret"
    ok.write_text("x" * 32 + "\n")
    assert run("token", "--key", ok, "--alg", "HS512", "--iss", "i").returncode == 0
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak = tmp_path / "rsa1024.pem"
    weak.write_bytes(small.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    r = run("token", "--key", weak, "--iss", "i")
    assert r.returncode == 1 and "the filter would refuse this RS256 key" in r.stderr, r.stderr


def test_version_is_the_cargo_version():
    import tomllib

    version = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"gateguard {version}"


# --- validate --online against a real local identity provider -------------------------------------


def online_policy(tmp_path, uri, issuers, algorithms=("RS256",), name="p.json"):
    p = tmp_path / name
    p.write_text(json.dumps({"apis": [
        {"name": "open", "path_prefix": "/open"},
        {"name": "orders", "path_prefix": "/orders",
         "jwt": {"issuers": list(issuers), "audiences": ["api://orders"], "algorithms": list(algorithms),
                 "jwks": {"cluster": "idp", "uri": uri}}}]}, indent=2))
    return p


@pytest.fixture
def idp():
    import jwtkit
    from idp import IdentityProvider

    server = IdentityProvider(jwtkit.jwks(jwtkit.Key("rsa", "k1"), jwtkit.Key("ec", "k2"))).start()
    yield server
    server.stop()


def discovery(idp):
    return f"http://127.0.0.1:{idp.port}/dev-tenant/v2.0/.well-known/openid-configuration"


def test_online_accepts_a_working_identity_provider(tmp_path, idp):
    p = online_policy(tmp_path, discovery(idp), [idp.issuer], ["RS256", "ES256"])
    r = run("validate", "--online", p)
    assert r.returncode == 0, r.stderr
    assert f"{p}: online: api orders: discovery document {discovery(idp)}: issuer \"{idp.issuer}\"" in r.stdout
    assert "2 usable keys" in r.stdout
    assert idp.count("discovery") == 1 and idp.count("jwks") == 1
    # The key set named directly: the issuer's discovery document must name the same one.
    keys = f"http://127.0.0.1:{idp.port}/discovery/v2.0/keys"
    r = run("validate", "--online", online_policy(tmp_path, keys, [idp.issuer]))
    assert r.returncode == 0, r.stderr
    assert "jwks_uri matches" in r.stdout
    # Without --online nothing is fetched.
    before = idp.count("jwks")
    assert run("validate", p).returncode == 0 and idp.count("jwks") == before


def online_error(r):
    lines = error_lines(r.stderr)
    assert r.returncode == 1 and len(lines) == 1, r.stdout + r.stderr
    return lines[0]


def test_online_refuses_a_wrong_issuer_missing_keys_and_garbage(tmp_path, idp):
    real = idp.issuer
    p = online_policy(tmp_path, discovery(idp), ["https://someone-else.example/"])
    line = online_error(run("validate", "--online", p))
    uri_line = next(i for i, text in enumerate(p.read_text().splitlines(), 1) if '"uri"' in text)
    assert line.startswith(f"{p}:{uri_line}:") and "apis[1].jwt.jwks.uri: online: discovery document" in line
    assert f'issuer "{real}" is not one of the policy\'s issuers' in line
    # The policy's algorithm has no key in the set.
    line = online_error(run("validate", "--online", online_policy(tmp_path, discovery(idp), [real], ["EdDSA"])))
    assert "no key for EdDSA" in line
    # The issuer's discovery document names another key set than the policy.
    other = f"http://127.0.0.1:{idp.port}/keys"
    line = online_error(run("validate", "--online", online_policy(tmp_path, other, [real])))
    assert "names the key set" in line and "not the policy's" in line
    # Garbage where the keys should be, parsed by the filter's own parser.
    idp.set_jwks("not a key set")
    line = online_error(run("validate", "--online", online_policy(tmp_path, discovery(idp), [real])))
    assert "key set" in line and "not a JSON object" in line
    idp.set_jwks({"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]})
    line = online_error(run("validate", "--online", online_policy(tmp_path, discovery(idp), [real])))
    assert "no usable signing key" in line
    # The identity provider answers 500.
    idp.fail(500)
    line = online_error(run("validate", "--online", online_policy(tmp_path, discovery(idp), [real])))
    assert "HTTP status 500" in line


def test_online_accepts_a_multi_tenant_discovery_issuer_for_a_listed_tenant(tmp_path, idp):
    # Entra's organizations/common documents name a template issuer; a policy that lists one
    # tenant's issuer under that template works, one that lists another host's does not.
    base = f"http://127.0.0.1:{idp.port}"
    idp.issuer = base + "/{tenantid}/v2.0"
    ok = online_policy(tmp_path, discovery(idp), [f"{base}/8eaef023-2b34-4da1-9baa-8bc8c9d6a490/v2.0"])
    r = run("validate", "--online", ok)
    assert r.returncode == 0, r.stderr
    line = online_error(run("validate", "--online", online_policy(
        tmp_path, discovery(idp), ["https://login.example/8eaef023-2b34-4da1-9baa-8bc8c9d6a490/v2.0"])))
    assert "is not one of the policy's issuers" in line
    # The template never stands for a path: a listed issuer with a slash in its place is no match.
    line = online_error(run("validate", "--online", online_policy(
        tmp_path, discovery(idp), [f"{base}/a/b/v2.0"])))
    assert "is not one of the policy's issuers" in line


def test_online_reports_an_identity_provider_down_or_silent(tmp_path):
    from envoy_harness import free_port
    import socket
    import time

    down = free_port()
    p = online_policy(tmp_path, f"http://127.0.0.1:{down}/keys", ["dev"])
    line = online_error(run("validate", "--online", p))
    assert f"key set http://127.0.0.1:{down}/keys: " in line
    # Accepts the connection and never answers: bounded by --timeout.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        p = online_policy(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}/keys", ["dev"])
        start = time.monotonic()
        line = online_error(run("validate", "--online", "--timeout", "1", p))
        assert time.monotonic() - start < 10
        assert "no answer within 1s" in line, line
    finally:
        silent.close()
    # Plain http is for loopback only: nothing is fetched from elsewhere.
    p = online_policy(tmp_path, "http://idp.example.invalid/keys", ["dev"])
    line = online_error(run("validate", "--online", p))
    assert "not a loopback address (use https)" in line
    # Flags that need --online say so; a bad --ca-file is exit 2.
    assert run("validate", "--ca-file", p, p).returncode == 2
    r = run("validate", "--online", "--ca-file", tmp_path / "none.pem", p)
    assert r.returncode == 2 and "--ca-file" in r.stderr


def test_online_over_https_trusts_the_system_roots_or_the_ca_file(tmp_path, idp):
    import ssl

    from certs import make_ca, make_leaf

    ca = make_ca()
    server = make_leaf(ca, "localhost", server=True).write(tmp_path, "idp")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(ca.pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server.cert_path, server.key_path)
    idp.server.socket = context.wrap_socket(idp.server.socket, server_side=True)
    p = online_policy(tmp_path, f"https://localhost:{idp.port}/keys", ["dev-issuer"])
    # An unknown CA is refused, as Envoy refuses it.
    line = online_error(run("validate", "--online", p))
    assert "key set https://localhost" in line
    r = run("validate", "--online", "--ca-file", ca_file, p)
    assert r.returncode == 0, r.stderr
    assert "2 usable keys" in r.stdout
