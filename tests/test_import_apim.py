"""`gateguard import-apim`: Azure API Management policy documents turned into gateguard
policies, failing closed. tests/apim/*.xml convert (with the flags below) into policies that
`gateguard validate` accepts; every document in tests/apim/refused/ holds something gateguard
cannot enforce exactly and, before the importer failed closed, produced a weaker policy (no JWT,
no key check, a wider CORS origin, no revocation...): it must now write nothing, leave an existing
output file as it was, print nothing on standard output and exit 3. Secrets (subscription keys,
signing keys, named values) never appear in a message. The corpus is written for these tests in
the shapes real policies take (portal editor, exports, named values, Terraform templates,
snippets)."""

import base64
import hashlib
import json
import os
import re
import stat
import subprocess
import time

import pytest

import jwtkit
from conftest import start_envoy
from envoy_harness import ROOT, bootstrap, free_port, http_listener, request, static_cluster

CLI = ROOT / "target" / "release" / "gateguard"
APIM = ROOT / "tests" / "apim"
REFUSED = APIM / "refused"

ENTRA_TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
ENTRA_DISCOVERY = f"https://login.microsoftonline.com/{ENTRA_TENANT}/v2.0/.well-known/openid-configuration"
THUMB_A = "3A7F2C9D4E5B6A1F0C8D7E6F5A4B3C2D1E0F9A8B"
THUMB_B = "D4F1A2B3C4D5E6F708192A3B4C5D6E7F8091A2B3"
SUBSCRIPTION_KEYS = ["f6dc69a089844cf6b2019bae6d36fac8", "0b8e3f7c2d9a4e1f8c6b5a4d3e2f1a0b",
                     "a1b2c3d4e5f60718293a4b5c6d7e8f90", "7d3f9a1c5e2b4d6f8a0c1e3b5d7f9a2c",
                     "2c4e6a8b0d1f3e5a7c9b1d3f5e7a9c0b"]
NAMED_VALUES = json.loads((APIM / "named-values.json").read_text())
HMAC_TEXT = "partner-shared-signing-key-2024-001"
SIGNING_KEY = base64.b64encode(b"jwt-signing-key-for-the-partner-api-0042").decode()

# fixture -> the flags it converts with (exit 0)
CONVERTS = {
    "cors.xml": [],
    "ip-filter.xml": [],
    "validate-jwt-entra.xml": [],
    "validate-jwt-keys.xml": ["--named-values", "{signing}"],
    "validate-jwt-hmac.xml": [],
    "validate-jwt-domain-tenant.xml": ["--issuer", f"https://sts.windows.net/{ENTRA_TENANT}/"],
    "check-header.xml": [],
    "client-cert.xml": [],
    "client-cert-rotation.xml": ["--no-revocation-check"],
    "full-api.xml": ["--skip", "base"],
    "named-values.xml": ["--named-values", APIM / "named-values.json", "--skip", "base"],
    "snippet.xml": [],
    "fragment.xml": [],
    "check-header-rules.xml": [],
    "rate-limit-by-ip.xml": [],
    "rate-limit-subscription.xml": [],
    "rate-limit-by-subject.xml": [],
}

# Each refused document: the elements reported as not converted, as "line:element".
REFUSED_AT = {
    "cert-choose-otherwise.xml": ["4:choose"],
    "cert-lowercase-thumbprint.xml": ["5:choose"],
    "choose-jwt-by-method.xml": ["5:base", "15:choose"],
    "claim-presence-and-whole-string.xml": ["5:validate-jwt", "11:claim", "12:claim"],
    "client-cert-identity-subject.xml": ["5:validate-client-certificate"],
    "client-cert-revocation.xml": ["4:validate-client-certificate"],
    "inbound-extras.xml": ["5:base", "7:set-header", "8:validate-jwt", "14:include-fragment"],
    "named-value-jwt.xml": ["5:validate-jwt"],
    "rate-limit-by-client-header.xml": ["6:rate-limit-by-key"],
    "rate-limit-conditions.xml": ["8:rate-limit-by-key", "9:quota-by-key"],
    "rate-limit-without-key.xml": ["12:rate-limit", "13:rate-limit-by-key"],
    "snippet-in-choose.xml": ["2:choose"],
    "subscription-key-named-value.xml": ["5:check-header"],
    "terraform-template.xml": ["5:ip-filter", "8:validate-jwt"],
    "validate-azure-ad-token.xml": ["5:validate-azure-ad-token"],
    "wildcard-subdomain-origin.xml": ["5:cors"],
}

# The converting fixtures without the flags that make them convert: refused too.
REFUSED_WITHOUT_FLAGS = {
    "validate-jwt-keys.xml": ["5:validate-jwt"],
    "validate-jwt-domain-tenant.xml": ["5:validate-jwt"],
    "client-cert-rotation.xml": ["5:choose"],
    "full-api.xml": ["5:base"],
    "named-values.xml": ["6:base", "7:ip-filter", "10:check-header", "13:validate-jwt"],
}


def run(*args, env=None):
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, env=env, timeout=60,
                          cwd=ROOT)


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


# Secrets: never in a message, never in a written policy.
SECRETS = SUBSCRIPTION_KEYS + [NAMED_VALUES["partner-subscription-key"], NAMED_VALUES["functions-key"], HMAC_TEXT,
                               SIGNING_KEY, base64.b64decode(SIGNING_KEY).decode()]


def assert_no_secret(r, named=False):
    """No secret anywhere; with `named` (named-values.json given), no value filled in from it in a
    message: any may be a secret."""
    for s in SECRETS:
        assert s not in r.stderr and s not in r.stdout, s
    for name, value in NAMED_VALUES.items():
        assert not named or value not in r.stderr, name


@pytest.fixture
def signing_values(tmp_path):
    f = tmp_path / "signing.json"
    f.write_text(json.dumps({"jwt-signing-key": SIGNING_KEY}))
    return f


def flags_for(name, signing_values):
    return [signing_values if f == "{signing}" else f for f in CONVERTS[name]]


def import_apim(name, *flags):
    r = run("import-apim", APIM / name, *flags)
    assert_no_secret(r)
    return r


def api_of(r):
    return json.loads(r.stdout)["apis"][0]


def summary(r):
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("gateguard import-apim: ")]
    assert lines, r.stderr
    return lines[0]


def not_converted(r):
    return [f"{m.group(1)}:{m.group(2)}" for m in re.finditer(r":(\d+): NOT CONVERTED: <([\w-]+)>", r.stderr)]


@pytest.mark.parametrize("name", sorted(CONVERTS))
def test_every_convertible_fixture_converts_to_a_valid_policy(tmp_path, name, signing_values):
    out = tmp_path / "policy.json"
    r = run("import-apim", APIM / name, "--out", out, "--name", "apolloapi", "--path-prefix", "/api",
            *flags_for(name, signing_values))
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert_no_secret(r, named=name == "named-values.xml")
    text = out.read_text()
    assert text.startswith('{\n  "$schema": "./gateguard.schema.json",\n  "apis": [')
    api = json.loads(text)["apis"][0]
    assert (api["name"], api["path_prefix"]) == ("apolloapi", "/api")
    assert set(api) - {"name", "path_prefix", "inject_headers"}, "a converted policy checks something"
    env = dict(os.environ, GATEGUARD_JWT_HMAC_SECRET="s" * 32, FUNCTIONS_KEY="k")
    v = run("validate", "--check-env", out, env=env)
    assert v.returncode == 0, v.stdout + v.stderr
    for key in SECRETS:
        assert key not in text
    assert "NOT CONVERTED" not in r.stderr
    assert summary(r).endswith(f"policy written to {out}")


def refused_cases():
    cases = [pytest.param(REFUSED / name, [], expected, id=f"refused/{name}") for name, expected in REFUSED_AT.items()]
    cases += [pytest.param(APIM / name, [], expected, id=f"{name} without its flags")
              for name, expected in REFUSED_WITHOUT_FLAGS.items()]
    return cases


def test_the_refused_corpus_is_listed_whole():
    assert sorted(p.name for p in REFUSED.glob("*.xml")) == sorted(REFUSED_AT)


@pytest.mark.parametrize("path, flags, expected", refused_cases())
def test_what_cannot_be_converted_exactly_writes_nothing(tmp_path, path, flags, expected):
    # To standard output: nothing that looks like a policy.
    r = run("import-apim", path, *flags)
    assert r.returncode == 3, r.stderr
    assert r.stdout == ""
    assert_no_secret(r)
    assert not_converted(r) == expected, r.stderr
    assert "nothing written, exit status 3" in summary(r)
    assert r.stderr.splitlines()[-1].startswith("gateguard import-apim: error: ")
    # To a new file: not created, and no temporary left behind.
    out = tmp_path / "new.json"
    r = run("import-apim", path, "--out", out, *flags)
    assert r.returncode == 3 and not out.exists()
    assert list(tmp_path.iterdir()) == []
    # Over an existing policy: left exactly as it was.
    old = tmp_path / "deployed.json"
    old.write_text('{"apis": [{"name": "strict", "path_prefix": "/"}]}\n')
    before = (old.read_bytes(), old.stat().st_mtime_ns)
    time.sleep(0.01)
    r = run("import-apim", path, "--out", old, *flags)
    assert r.returncode == 3
    assert (old.read_bytes(), old.stat().st_mtime_ns) == before
    assert f"({old} left as it was)" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deployed.json"]


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
    assert r.returncode == 3 and r.stdout == ""
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


def test_a_claim_apim_compares_whole_is_refused(tmp_path):
    f = tmp_path / "claims.xml"
    f.write_text((APIM / "validate-jwt-entra.xml").read_text().replace(' separator=" "', ""))
    r = run("import-apim", f)
    assert r.returncode == 3 and r.stdout == ""
    assert not_converted(r) == ["6:validate-jwt", "16:claim", "20:claim"]
    assert 'add separator=" "' in r.stderr


def test_validate_jwt_issuer_from_a_domain_tenant_needs_the_flag():
    r = import_apim("validate-jwt-domain-tenant.xml")
    assert r.returncode == 3 and r.stdout == ""
    assert re.search(r"validate-jwt-domain-tenant\.xml:5: NOT CONVERTED: <validate-jwt>: .*--issuer", r.stderr)
    r = import_apim("validate-jwt-domain-tenant.xml", "--issuer", f"https://sts.windows.net/{ENTRA_TENANT}/")
    assert r.returncode == 0, r.stderr
    jwt = api_of(r)["jwt"]
    assert jwt["issuers"] == [f"https://sts.windows.net/{ENTRA_TENANT}/"]
    assert jwt["audiences"] == ["25eef6e4-c905-4a07-8eb4-0d08d5df8b3f"]
    assert jwt["clock_skew_seconds"] == 0  # APIM's default, kept
    assert jwt["required_claims"] == [{"name": "scp", "all_of": ["user_impersonation"]}]


def test_validate_jwt_signing_keys_with_the_named_value(tmp_path, signing_values):
    r = import_apim("validate-jwt-keys.xml", "--named-values", signing_values)
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


def test_hmac_only_validate_jwt_converts(tmp_path):
    # gateguard supports HS256 with jwt.hmac_secret and no jwks: nothing says otherwise.
    r = import_apim("validate-jwt-hmac.xml")
    assert r.returncode == 0, r.stderr
    assert api_of(r)["jwt"] == {
        "issuers": ["https://partner-auth.example.com"],
        "audiences": ["https://api.example.com/partners"],
        "algorithms": ["HS256"],
        "clock_skew_seconds": 10,
        "hmac_secret": {"env": "GATEGUARD_JWT_HMAC_SECRET"},
    }
    assert "cannot be expressed" not in r.stderr
    assert "35 bytes of text" in r.stderr


@pytest.mark.parametrize("key, reason", [
    (base64.b64encode(b"too-short-secret").decode(), "16 bytes"),
    (base64.b64encode(bytes(range(200, 240))).decode(), "binary"),
])
def test_hmac_keys_gateguard_cannot_hold_are_refused(tmp_path, key, reason):
    f = tmp_path / "hmac.xml"
    f.write_text((APIM / "validate-jwt-hmac.xml").read_text().replace(
        "cGFydG5lci1zaGFyZWQtc2lnbmluZy1rZXktMjAyNC0wMDE=", key))
    r = run("import-apim", f)
    assert r.returncode == 3 and r.stdout == ""
    assert not_converted(r) == ["5:validate-jwt", "7:key"]
    assert reason in r.stderr and key not in r.stderr


@pytest.mark.parametrize("attrs, reason", [
    ('query-parameter-name="access_token"', "query parameter"),
    ('header-name="X-Token"', 'header "X-Token"'),
    ('token-value="@(context.Request.Headers.GetValueOrDefault(&quot;x&quot;))"', "token-value"),
])
def test_validate_jwt_token_elsewhere_is_refused(tmp_path, attrs, reason):
    f = tmp_path / "jwt.xml"
    f.write_text(f"""<policies><inbound>
<validate-jwt {attrs}>
  <openid-config url="{ENTRA_DISCOVERY}" /><audiences><audience>api://x</audience></audiences>
</validate-jwt></inbound></policies>""")
    r = run("import-apim", f)
    assert r.returncode == 3 and r.stdout == ""
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
    # Verify() checks revocation, which gateguard cannot: only with the flag that accepts it.
    r = import_apim("client-cert-rotation.xml")
    assert r.returncode == 3 and "--no-revocation-check" in r.stderr
    r = import_apim("client-cert-rotation.xml", "--no-revocation-check")
    assert r.returncode == 0, r.stderr
    assert api_of(r)["client_certificate"] == {"thumbprints": [THUMB_A, THUMB_B], "check_validity": True}
    assert "a revoked certificate stays accepted" in r.stderr


def test_other_choose_is_refused(tmp_path):
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
    assert r.returncode == 3 and r.stdout == ""
    assert ":2: NOT CONVERTED: <choose>: a <choose> whose condition on line 3 gateguard cannot express" in r.stderr
    assert ":7: NOT CONVERTED: <choose>: condition on line 8: unsupported" in r.stderr


def test_choose_names_the_checks_it_holds():
    r = run("import-apim", REFUSED / "choose-jwt-by-method.xml")
    assert "(it holds <validate-jwt> on line 17)" in r.stderr


def test_full_api_policy_with_its_losses_accepted(tmp_path):
    out = tmp_path / "full.json"
    r = import_apim("full-api.xml", "--out", out, "--name", "apolloapi", "--path-prefix", "/api",
                    "--jwks-cluster", "entra_id", "--skip", "base", "--skip", "rate-limit")
    assert r.returncode == 0, r.stderr
    api = json.loads(out.read_text())["apis"][0]
    assert list(api) == ["name", "path_prefix", "cors", "ip_filter", "client_certificate", "subscription_key", "jwt",
                         "inject_headers"]
    assert api["cors"]["allowed_origins"] == ["https://portal.example.com", "https://www.contoso.com"]
    assert api["ip_filter"] == {"allow": ["203.0.113.0/24", "198.51.100.17"]}
    assert api["client_certificate"] == {"thumbprints": [THUMB_A], "check_validity": True}
    assert api["subscription_key"]["keys_sha256"] == [sha256(SUBSCRIPTION_KEYS[2])]
    assert api["jwt"]["issuers"] == [f"https://login.microsoftonline.com/{ENTRA_TENANT}/v2.0"]
    assert api["jwt"]["jwks"] == {"cluster": "entra_id", "uri": ENTRA_DISCOVERY}
    assert api["jwt"]["required_claims"] == [{"name": "roles", "any_of": ["Forms.Submit"]}]
    assert api["inject_headers"] == {"x-functions-key": {"env": "FUNCTIONS_KEY"}}
    err = r.stderr
    assert "full-api.xml:5: left out: <base>: --skip base: " in err
    assert "full-api.xml:46: left out: <rate-limit>: --skip rate-limit: " in err and "local_ratelimit" in err
    assert "full-api.xml:50: left out: <set-backend-service>:" in err
    assert "full-api.xml:47: set in Envoy's environment: <set-header>: FUNCTIONS_KEY" in err
    for line, element in [(6, "cors"), (21, "ip-filter"), (25, "choose"), (32, "check-header"), (35, "validate-jwt")]:
        assert f"full-api.xml:{line}: converted: <{element}>:" in err
    assert ("6 converted, 0 not converted, 3 left out (<base> line 5, <rate-limit> line 46, <set-backend-service> "
            "line 50); policy written to") in summary(r)
    assert SUBSCRIPTION_KEYS[2] not in out.read_text()


def test_rate_limits_and_quotas_convert_by_subscription_ip_or_subject():
    r = import_apim("full-api.xml", "--skip", "base")
    assert r.returncode == 0, r.stderr
    assert api_of(r)["rate_limit"] == {"by": "subscription_key", "calls": 20, "renewal_period_seconds": 90}
    assert "full-api.xml:46: converted: <rate-limit>: rate_limit (20 calls per 90 s by subscription_key)" in r.stderr
    r = import_apim("rate-limit-subscription.xml")
    assert r.returncode == 0, r.stderr
    api = api_of(r)
    assert api["subscription_key"]["keys_sha256"] == [sha256(SUBSCRIPTION_KEYS[4])]
    assert api["rate_limit"] == {"by": "subscription_key", "calls": 100, "renewal_period_seconds": 60}
    assert api["quota"] == {"by": "subscription_key", "calls": 50000, "renewal_period_seconds": 604800}
    r = import_apim("rate-limit-by-ip.xml")
    assert r.returncode == 0, r.stderr
    assert api_of(r)["rate_limit"] == {"by": "client_ip", "calls": 3, "renewal_period_seconds": 60}
    assert api_of(r)["quota"] == {"by": "client_ip", "calls": 10000, "renewal_period_seconds": 86400}
    # The expression as the portal editor shows it (quotes unescaped); the token checked after it.
    r = import_apim("rate-limit-by-subject.xml")
    assert r.returncode == 0, r.stderr
    assert api_of(r)["rate_limit"] == {"by": "subject", "calls": 10, "renewal_period_seconds": 60}
    assert api_of(r)["quota"] == {"by": "subject", "calls": 20000, "renewal_period_seconds": 2592000}
    # How the counting differs is said, never left to be found out.
    assert "rate-limit-by-subject.xml:6: note: <rate-limit-by-key>: counted as gateguard counts: only once the token is valid" in r.stderr
    assert "each gateway replica counts alone" in r.stderr


@pytest.mark.parametrize("name, reasons", [
    ("rate-limit-conditions.xml", [
        ":8: NOT CONVERTED: <rate-limit-by-key>: increment-condition: gateguard counts every request",
        ':9: NOT CONVERTED: <quota-by-key>: bandwidth "40000": gateguard counts calls, not kilobytes',
    ]),
    ("rate-limit-by-client-header.xml", [
        ':6: NOT CONVERTED: <rate-limit-by-key>: counter-key "@(context.Request.Headers.GetValueOrDefault(\\"X-Client-Id\\",\\"\\"))": gateguard counts by subscription',
    ]),
    ("rate-limit-without-key.xml", [
        ":12: NOT CONVERTED: <rate-limit>: counted per subscription, and the converted policy checks no subscription key",
        ":13: NOT CONVERTED: <rate-limit-by-key>: a second rate limit (the first is <rate-limit> on line 12): gateguard has one rate limit per API",
    ]),
])
def test_a_limit_gateguard_would_count_otherwise_is_refused_with_its_reason(name, reasons):
    r = run("import-apim", REFUSED / name)
    assert r.returncode == 3 and r.stdout == ""
    for reason in reasons:
        assert reason in r.stderr, r.stderr


def test_a_limit_can_still_be_left_to_envoy():
    r = run("import-apim", REFUSED / "rate-limit-conditions.xml", "--skip", "rate-limit-by-key", "--skip", "quota-by-key")
    assert r.returncode == 0, r.stderr
    assert "rate_limit" not in api_of(r) and "quota" not in api_of(r)
    assert ":8: left out: <rate-limit-by-key>: --skip rate-limit-by-key: the limit is left to Envoy" in r.stderr


def test_check_header_on_other_headers_becomes_header_rules():
    r = import_apim("check-header-rules.xml")
    assert r.returncode == 0, r.stderr
    assert api_of(r)["headers"] == {
        "required": ["X-Api-Version", "Accept", "X-Correlation-Id"],
        "patterns": {"Accept": "(?i)application/json", "X-Api-Version": "2024\\-06\\-01|2025\\-01\\-01"},
    }
    # gateguard answers 400 with its own message: said, as for validate-jwt.
    assert "check-header-rules.xml:9: note: <check-header>: failed-check-httpcode 406: gateguard answers 400" in r.stderr
    assert 'gateguard answers with its own messages, "Bad request: header x-api-version is missing"' in r.stderr


def test_named_values_fill_in_and_never_show(tmp_path):
    out = tmp_path / "named.json"
    r = import_apim("named-values.xml", "--out", out, "--named-values", APIM / "named-values.json", "--skip", "base")
    assert r.returncode == 0, r.stderr
    assert_no_secret(r, named=True)
    api = json.loads(out.read_text())["apis"][0]
    tenant = NAMED_VALUES["tenant-id"]
    assert api["ip_filter"] == {"allow": ["203.0.113.16/28"]}
    assert api["subscription_key"]["keys_sha256"] == [sha256(NAMED_VALUES["partner-subscription-key"])]
    assert api["jwt"]["issuers"] == [f"https://login.microsoftonline.com/{tenant}/v2.0"]
    assert api["jwt"]["audiences"] == ["api://orders-backend"]
    assert api["jwt"]["jwks"]["uri"] == f"https://login.microsoftonline.com/{tenant}/v2.0/.well-known/openid-configuration"
    assert api["jwt"]["required_claims"] == [{"name": "roles", "any_of": ["Orders.Write"]}]
    assert api["jwt"]["clock_skew_seconds"] == 120
    # The function key stays a reference to Envoy's environment even though the file has it.
    assert api["inject_headers"] == {"x-functions-key": {"env": "FUNCTIONS_KEY"}}
    assert NAMED_VALUES["functions-key"] not in out.read_text()
    # Any value filled in may be a secret: messages show its placeholder instead.
    assert "https://login.microsoftonline.com/{{tenant-id}}/${entra_version}/.well-known" in r.stderr


def test_a_missing_named_value_is_named(tmp_path):
    partial = tmp_path / "partial.json"
    values = dict(NAMED_VALUES)
    del values["partner-subscription-key"]
    partial.write_text(json.dumps(values))
    r = run("import-apim", APIM / "named-values.xml", "--named-values", partial, "--skip", "base")
    assert r.returncode == 3 and r.stdout == ""
    assert not_converted(r) == ["10:check-header"]
    assert ("no value for named value {{partner-subscription-key}} (line 11): add the values to the "
            "--named-values file") in r.stderr
    assert_no_secret(r, named=True)


@pytest.mark.parametrize("text, code", [
    ('["not", "an", "object"]', 1),
    ('{"functions-key": 123456789}', 1),
    ('{"functions-key": "s3cret-in-a-broken-file"', 1),
])
def test_named_values_file_errors_quote_no_value(tmp_path, text, code):
    f = tmp_path / "values.json"
    f.write_text(text)
    r = run("import-apim", APIM / "named-values.xml", "--named-values", f)
    assert r.returncode == code and r.stdout == ""
    assert "123456789" not in r.stderr and "s3cret" not in r.stderr
    assert r.stderr.startswith("gateguard import-apim: error: ")
    r = run("import-apim", APIM / "named-values.xml", "--named-values", tmp_path / "missing.json")
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_skip_cannot_leave_out_a_converted_check():
    r = run("import-apim", APIM / "full-api.xml", "--skip", "validate-jwt")
    assert r.returncode == 1 and r.stdout == ""
    assert "--skip validate-jwt: gateguard converts <validate-jwt>" in r.stderr


def test_a_document_with_no_check_writes_nothing(tmp_path):
    f = tmp_path / "empty.xml"
    f.write_text("<policies>\n<inbound>\n<base />\n<set-backend-service base-url=\"https://b.example\" />\n"
                 "</inbound>\n<backend><forward-request /></backend>\n</policies>")
    out = tmp_path / "out.json"
    r = run("import-apim", f, "--skip", "base", "--out", out)
    assert r.returncode == 3 and not out.exists()
    assert "no check to convert" in r.stderr


def test_a_literal_header_value_makes_the_file_owner_only(tmp_path):
    f = tmp_path / "literal.xml"
    f.write_text("""<policies><inbound>
<check-header name="Ocp-Apim-Subscription-Key"><value>k-0123456789</value></check-header>
<set-header name="x-functions-key" exists-action="override"><value>literal-function-key</value></set-header>
</inbound></policies>""")
    out = tmp_path / "literal.json"
    out.write_text("{}")
    os.chmod(out, 0o644)
    r = run("import-apim", f, "--out", out)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["apis"][0]["inject_headers"] == {"x-functions-key": {"value": "literal-function-key"}}
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "literal-function-key" not in r.stderr


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


def test_bad_flags_fail_validation_with_exit_1(tmp_path):
    out = tmp_path / "out.json"
    r = run("import-apim", APIM / "cors.xml", "--path-prefix", "api/", "--out", out)
    assert r.returncode == 1
    assert "does not validate" in r.stderr and "path_prefix" in r.stderr
    assert not out.exists()


def test_file_errors_exit_2(tmp_path):
    r = run("import-apim", tmp_path / "missing.xml")
    assert r.returncode == 2 and "cannot read" in r.stderr
    r = run("import-apim", APIM / "cors.xml", "--out", tmp_path / "no" / "such" / "dir.json")
    assert r.returncode == 2 and "cannot write" in r.stderr


def test_help_states_the_exit_codes():
    r = run("import-apim", "--help")
    assert "3 when an element could not be converted exactly" in " ".join(r.stdout.split())


# ---- the converted policy enforces in a real Envoy ----

ISSUER, AUDIENCE = "https://partner-auth.example.com", "https://api.example.com/partners"


@pytest.fixture(scope="module")
def gw(request, tmp_path_factory, echo_upstream):
    """The HMAC-only fixture, the subscription-key fixture and the rate limit by client IP,
    converted and loaded as is."""
    apis = []
    for name, prefix in [("validate-jwt-hmac.xml", "/hmac"), ("check-header.xml", "/keyed"),
                         ("rate-limit-by-ip.xml", "/limited")]:
        r = run("import-apim", APIM / name, "--name", prefix.strip("/"), "--path-prefix", prefix)
        assert r.returncode == 0, r.stderr
        apis += json.loads(r.stdout)["apis"]
    policy = {"apis": apis}
    port, admin = free_port(), free_port()
    config = bootstrap([http_listener("main", port, policy, env_keys=["GATEGUARD_JWT_HMAC_SECRET"])],
                       [static_cluster("upstream", echo_upstream)], admin)
    envoy = start_envoy(request, config, env={"GATEGUARD_JWT_HMAC_SECRET": HMAC_TEXT})
    envoy.port = port
    return envoy


def get(gw, path, headers=None):
    return request(gw.port, "GET", path, headers=headers or {})


def test_imported_hmac_policy_accepts_only_tokens_signed_with_the_apim_key(gw):
    claims = jwtkit.claims(ISSUER, AUDIENCE)
    good = jwtkit.hs256(HMAC_TEXT.encode(), {"alg": "HS256", "typ": "JWT"}, claims)
    assert get(gw, "/hmac/x", {"authorization": f"Bearer {good}"}).status == 200
    # The base64 text APIM shows is not the key; nor is any other secret.
    b64_text = "cGFydG5lci1zaGFyZWQtc2lnbmluZy1rZXktMjAyNC0wMDE="
    for secret in (b64_text.encode(), b"x" * 40):
        bad = jwtkit.hs256(secret, {"alg": "HS256"}, claims)
        assert get(gw, "/hmac/x", {"authorization": f"Bearer {bad}"}).status == 401
    assert get(gw, "/hmac/x").status == 401
    other_aud = jwtkit.hs256(HMAC_TEXT.encode(), {"alg": "HS256"}, jwtkit.claims(ISSUER, "api://other"))
    assert get(gw, "/hmac/x", {"authorization": f"Bearer {other_aud}"}).status == 401


def test_imported_subscription_key_policy_admits_only_the_apim_keys(gw):
    assert get(gw, "/keyed/x").status == 401
    assert get(gw, "/keyed/x", {"ocp-apim-subscription-key": "wrong"}).status == 401
    for key in SUBSCRIPTION_KEYS[:2]:
        assert get(gw, "/keyed/x", {"ocp-apim-subscription-key": key}).status == 200


def test_imported_rate_limit_by_ip_refuses_the_fourth_call_as_apim_does(gw):
    # <rate-limit-by-key calls="3" renewal-period="60" counter-key="@(context.Request.IpAddress)" />
    for left in (2, 1, 0):
        r = get(gw, "/limited/x")
        assert r.status == 200, r.body
        assert r.headers["x-ratelimit-remaining"] == str(left)
    r = get(gw, "/limited/x")
    assert r.status == 429
    body = json.loads(r.body)
    wait = int(r.headers["retry-after"])
    assert 0 < wait <= 60
    assert body == {"statusCode": 429, "message": f"Rate limit is exceeded. Try again in {wait} seconds."}
    # Another client IP has calls of its own.
    assert request(gw.port, "GET", "/limited/x", source="127.0.0.2").status == 200
