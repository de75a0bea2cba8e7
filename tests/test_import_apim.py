"""`gateguard import-apim`: Azure API Management policy documents (tests/apim/*.xml, written as
Microsoft documents each policy) turned into policies that `gateguard validate` accepts, with
every element reported as converted or not (exit 3 when something was not), and subscription
keys and signing keys never written out."""

import base64
import hashlib
import json
import os
import re
import subprocess

import pytest

from envoy_harness import ROOT

CLI = ROOT / "target" / "release" / "gateguard"
APIM = ROOT / "tests" / "apim"

ENTRA_TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
ENTRA_DISCOVERY = f"https://login.microsoftonline.com/{ENTRA_TENANT}/v2.0/.well-known/openid-configuration"
THUMB_A = "3A7F2C9D4E5B6A1F0C8D7E6F5A4B3C2D1E0F9A8B"
THUMB_B = "D4F1A2B3C4D5E6F708192A3B4C5D6E7F8091A2B3"
SUBSCRIPTION_KEYS = ["f6dc69a089844cf6b2019bae6d36fac8", "0b8e3f7c2d9a4e1f8c6b5a4d3e2f1a0b",
                     "a1b2c3d4e5f60718293a4b5c6d7e8f90"]

# fixture -> exit status
FIXTURES = {
    "cors.xml": 0,
    "ip-filter.xml": 0,
    "validate-jwt-entra.xml": 0,
    "validate-jwt-keys.xml": 0,
    "validate-jwt-domain-tenant.xml": 3,
    "check-header.xml": 0,
    "client-cert.xml": 0,
    "client-cert-rotation.xml": 0,
    "full-api.xml": 3,
}


def run(*args, env=None):
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, env=env, timeout=60,
                          cwd=ROOT)


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


def import_apim(name, *flags):
    r = run("import-apim", APIM / name, *flags)
    for key in SUBSCRIPTION_KEYS:
        assert key not in r.stdout and key not in r.stderr
    return r


def api_of(r):
    return json.loads(r.stdout)["apis"][0]


def summary(r):
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("gateguard import-apim: "), r.stderr
    return lines[-1]


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_fixture_converts_to_a_valid_policy(tmp_path, name):
    out = tmp_path / "policy.json"
    r = run("import-apim", APIM / name, "--out", out, "--name", "apolloapi", "--path-prefix", "/api")
    assert r.returncode == FIXTURES[name], r.stderr
    assert r.stdout == ""
    text = out.read_text()
    assert text.startswith('{\n  "$schema": "./gateguard.schema.json",\n  "apis": [')
    api = json.loads(text)["apis"][0]
    assert (api["name"], api["path_prefix"]) == ("apolloapi", "/api")
    # The HMAC secret comes from the environment; without it, `validate` substitutes a
    # placeholder shorter than the 32 bytes an HMAC secret needs.
    v = run("validate", out, env=dict(os.environ, GATEGUARD_JWT_HMAC_SECRET="s" * 32))
    assert v.returncode == 0, v.stdout + v.stderr
    for key in SUBSCRIPTION_KEYS:
        assert key not in text and key not in r.stderr
    if FIXTURES[name] == 3:
        assert "NOT CONVERTED" in r.stderr and "exit status 3" in summary(r)
    else:
        assert "NOT CONVERTED" not in r.stderr and "0 not converted" in summary(r)


def test_cors_as_documented():
    r = import_apim("cors.xml")
    assert r.returncode == 0, r.stderr
    assert api_of(r)["cors"] == {
        "allowed_origins": ["http://contoso.com"],
        "allowed_methods": ["GET", "POST", "PATCH", "DELETE"],
        "allowed_headers": ["x-zumo-installation-id", "x-zumo-application", "x-zumo-version", "x-zumo-auth",
                            "content-type", "accept"],
        "expose_headers": ["x-zumo-installation-id", "x-zumo-application"],
        "allow_credentials": True,
        "max_age_seconds": 300,
    }
    assert re.search(r"cors\.xml:4: converted: <cors>", r.stderr)


def test_wildcard_origin_only_without_credentials(tmp_path):
    def cors(credentials):
        f = tmp_path / f"cors-{credentials}.xml"
        f.write_text(f"""<policies><inbound>
<cors allow-credentials="{credentials}"><allowed-origins><origin>*</origin></allowed-origins></cors>
</inbound></policies>""")
        return run("import-apim", f)

    r = cors("false")
    assert r.returncode == 0, r.stderr
    assert api_of(r)["cors"]["allowed_origins"] == ["*"]
    r = cors("true")
    assert r.returncode == 3
    assert "cors" not in api_of(r)
    assert re.search(r':2: NOT CONVERTED: <cors>: origin "\*" with allow-credentials="true"', r.stderr)


def test_ip_filter_ranges_become_cidrs():
    r = import_apim("ip-filter.xml")
    assert r.returncode == 0, r.stderr
    assert api_of(r)["ip_filter"] == {
        "allow": ["13.66.201.169", "13.66.140.128/28", "10.1.0.5/32", "10.1.0.6/31", "10.1.0.8/29",
                  "10.1.0.16/30", "10.1.0.20/32", "2001:db8::/112"],
        "deny": ["13.66.140.130"],
    }


def test_validate_jwt_entra_with_required_claims():
    r = import_apim("validate-jwt-entra.xml", "--jwks-cluster", "entra_id")
    assert r.returncode == 0, r.stderr
    assert api_of(r)["jwt"] == {
        "issuers": [f"https://login.microsoftonline.com/{ENTRA_TENANT}/v2.0", f"https://sts.windows.net/{ENTRA_TENANT}/"],
        "audiences": ["api://processfactorial"],
        "algorithms": ["RS256"],
        "jwks": {"cluster": "entra_id", "uri": ENTRA_DISCOVERY},
        "clock_skew_seconds": 60,
        "required_claims": [
            {"name": "roles", "any_of": ["Forms.Submit", "Forms.Admin"]},
            {"name": "scp", "all_of": ["forms.read"]},
        ],
    }


def test_validate_jwt_issuer_from_a_domain_tenant_needs_the_flag(tmp_path):
    r = import_apim("validate-jwt-domain-tenant.xml")
    assert r.returncode == 3
    assert "jwt" not in api_of(r)
    assert re.search(r"validate-jwt-domain-tenant\.xml:5: NOT CONVERTED: <validate-jwt>: .*--issuer", r.stderr)
    r = import_apim("validate-jwt-domain-tenant.xml", "--issuer", f"https://sts.windows.net/{ENTRA_TENANT}/")
    assert r.returncode == 0, r.stderr
    jwt = api_of(r)["jwt"]
    assert jwt["issuers"] == [f"https://sts.windows.net/{ENTRA_TENANT}/"]
    assert jwt["audiences"] == ["25eef6e4-c905-4a07-8eb4-0d08d5df8b3f"]
    assert jwt["clock_skew_seconds"] == 0  # APIM's default, kept
    assert jwt["required_claims"] == [{"name": "id", "all_of": ["insert claim here"]}]


def test_validate_jwt_signing_keys(tmp_path):
    r = import_apim("validate-jwt-keys.xml")
    assert r.returncode == 0, r.stderr
    jwt = api_of(r)["jwt"]
    assert jwt["algorithms"] == ["RS256", "HS256"]
    assert jwt["hmac_secret"] == {"env": "GATEGUARD_JWT_HMAC_SECRET"}
    [key] = jwt["jwks"]["inline"]["keys"]
    assert (key["kty"], key["kid"], key["e"]) == ("RSA", "partner-2024", "AQAB")
    assert "+" not in key["n"] and "/" not in key["n"] and "=" not in key["n"]
    assert len(base64.urlsafe_b64decode(key["n"] + "==")) == 256
    assert "set in Envoy's environment: <key>: GATEGUARD_JWT_HMAC_SECRET" in r.stderr
    out = tmp_path / "jwt.json"
    out.write_text(r.stdout)
    env = {k: v for k, v in os.environ.items() if k != "GATEGUARD_JWT_HMAC_SECRET"}
    assert run("validate", "--check-env", out, env=env).returncode == 1
    env["GATEGUARD_JWT_HMAC_SECRET"] = "s" * 32
    v = run("validate", "--check-env", out, env=env)
    assert v.returncode == 0, v.stderr


@pytest.mark.parametrize("attrs, reason", [
    ('query-parameter-name="access_token"', "query parameter"),
    ('header-name="X-Token"', 'header "X-Token"'),
    ('token-value="@(context.Request.Headers.GetValueOrDefault(&quot;x&quot;))"', "token-value"),
])
def test_validate_jwt_token_elsewhere_is_reported(tmp_path, attrs, reason):
    f = tmp_path / "jwt.xml"
    f.write_text(f"""<policies><inbound>
<validate-jwt {attrs}>
  <openid-config url="{ENTRA_DISCOVERY}" /><audiences><audience>api://x</audience></audiences>
</validate-jwt></inbound></policies>""")
    r = run("import-apim", f)
    assert r.returncode == 3
    assert "jwt" not in api_of(r)
    assert ":2: NOT CONVERTED: <validate-jwt>:" in r.stderr and reason in r.stderr


def test_subscription_key_is_hashed_never_copied(tmp_path):
    out = tmp_path / "keys.json"
    r = import_apim("check-header.xml", "--out", out)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    for key in SUBSCRIPTION_KEYS:
        assert key not in text
    assert json.loads(text)["apis"][0]["subscription_key"] == {
        "header": "Ocp-Apim-Subscription-Key",
        "query": None,
        "keys_sha256": [sha256(SUBSCRIPTION_KEYS[0]), sha256(SUBSCRIPTION_KEYS[1])],
    }
    # `gateguard hash-key` agrees.
    assert run("hash-key", SUBSCRIPTION_KEYS[0]).stdout.strip() == sha256(SUBSCRIPTION_KEYS[0])


def test_client_certificate_thumbprint_pattern():
    r = import_apim("client-cert.xml")
    assert r.returncode == 0, r.stderr
    assert api_of(r)["client_certificate"] == {"thumbprints": [THUMB_A], "check_validity": False}
    assert "check_validity is false" in r.stderr
    r = import_apim("client-cert-rotation.xml")
    assert r.returncode == 0, r.stderr
    assert api_of(r)["client_certificate"] == {"thumbprints": [THUMB_A, THUMB_B], "check_validity": True}


def test_other_choose_is_reported(tmp_path):
    f = tmp_path / "choose.xml"
    f.write_text("""<policies><inbound>
<choose>
  <when condition="@(context.Request.Headers.GetValueOrDefault(&quot;x-debug&quot;) == &quot;1&quot;)">
    <return-response><set-status code="400" /></return-response>
  </when>
</choose>
<choose>
  <when condition="@(!context.Deployment.Certificates.Any(c => c.Value.Thumbprint == context.Request.Certificate.Thumbprint))">
    <return-response><set-status code="403" reason="Invalid client certificate" /></return-response>
  </when>
</choose>
</inbound></policies>""")
    r = run("import-apim", f)
    assert r.returncode == 3
    assert "client_certificate" not in api_of(r)
    assert ":2: NOT CONVERTED: <choose>: a <choose> that is not the client-certificate check" in r.stderr
    assert ":7: NOT CONVERTED: <choose>: condition on line 8: unsupported" in r.stderr


def test_full_api_policy_reports_what_it_skipped(tmp_path):
    out = tmp_path / "full.json"
    r = import_apim("full-api.xml", "--out", out, "--name", "apolloapi", "--path-prefix", "/api",
                    "--jwks-cluster", "entra_id")
    assert r.returncode == 3, r.stderr
    api = json.loads(out.read_text())["apis"][0]
    assert list(api) == ["name", "path_prefix", "cors", "ip_filter", "client_certificate", "subscription_key", "jwt",
                         "inject_headers"]
    assert api["ip_filter"] == {"allow": ["203.0.113.0/24", "198.51.100.17"]}
    assert api["client_certificate"] == {"thumbprints": [THUMB_A], "check_validity": True}
    assert api["subscription_key"]["keys_sha256"] == [sha256(SUBSCRIPTION_KEYS[2])]
    assert api["jwt"]["issuers"] == [f"https://login.microsoftonline.com/{ENTRA_TENANT}/v2.0"]
    assert api["jwt"]["jwks"] == {"cluster": "entra_id", "uri": ENTRA_DISCOVERY}
    assert api["inject_headers"] == {"x-functions-key": {"env": "FUNCTIONS_KEY"}}
    err = r.stderr
    assert "full-api.xml:5: NOT CONVERTED: <base>:" in err
    assert "full-api.xml:46: NOT CONVERTED: <rate-limit>: " in err and "local_ratelimit" in err
    assert "full-api.xml:50: NOT CONVERTED: <set-backend-service>:" in err
    assert "full-api.xml:47: set in Envoy's environment: <set-header>: FUNCTIONS_KEY" in err
    for line, element in [(6, "cors"), (21, "ip-filter"), (25, "choose"), (32, "check-header"), (35, "validate-jwt")]:
        assert f"full-api.xml:{line}: converted: <{element}>:" in err
    assert ("6 converted, 3 not converted (<base> line 5, <rate-limit> line 46, <set-backend-service> line 50)"
            in summary(r))
    assert SUBSCRIPTION_KEYS[2] not in out.read_text()
    env = dict(os.environ, FUNCTIONS_KEY="k")
    v = run("validate", "--check-env", out, env=env)
    assert v.returncode == 0, v.stderr


@pytest.mark.parametrize("text", [
    "this is not xml",
    "<policies><inbound><cors></inbound></policies>",
    "<?xml version='1.0'?><policy><inbound /></policy>",
    "",
])
def test_invalid_documents_exit_1(tmp_path, text):
    f = tmp_path / "bad.xml"
    f.write_text(text)
    r = run("import-apim", f)
    assert r.returncode == 1, r.stderr
    assert r.stdout == ""
    assert r.stderr.startswith("gateguard import-apim: error: ")


def test_bad_flags_fail_validation_with_exit_1():
    r = run("import-apim", APIM / "cors.xml", "--path-prefix", "api/")
    assert r.returncode == 1
    assert "does not validate" in r.stderr and "path_prefix" in r.stderr


def test_file_errors_exit_2(tmp_path):
    r = run("import-apim", tmp_path / "missing.xml")
    assert r.returncode == 2 and "cannot read" in r.stderr
    r = run("import-apim", APIM / "cors.xml", "--out", tmp_path / "no" / "such" / "dir.json")
    assert r.returncode == 2 and "cannot write" in r.stderr
