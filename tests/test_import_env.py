"""`gateguard import-env`: the portal backend's settings (environment, .env, JSON, App Service
export) turned into a policy that `gateguard validate` accepts, with the function keys kept out of
the policy and out of the output unless asked for."""

import json
import os
import subprocess

import pytest

from envoy_harness import ROOT

CLI = ROOT / "target" / "release" / "gateguard"

SETTINGS = ["VALID_INPUT_PATHS", "API_KEY_VALUES", "TOKEN_PROTECTED_PATHS_WITH_IP", "TOKEN_PROTECTED_PATHS_WITHOUT_IP"]

# The seed's example: /api and /testharnessapi with IP, the deployed forms (/demapi) without.
KEYS = ["SeCrEt-Api-Key-0001==", "SeCrEt-Test-Key-0002==", "SeCrEt-Dem-Key-0003=="]
SEED = {
    "VALID_INPUT_PATHS": "/api;/testharnessapi;/demapi",
    "API_KEY_VALUES": ";".join(KEYS),
    "TOKEN_PROTECTED_PATHS_WITH_IP": "/api;/testharnessapi",
    "TOKEN_PROTECTED_PATHS_WITHOUT_IP": "/demapi",
}
JWT = ["--issuer", "https://login.microsoftonline.com/tenant/v2.0", "--audience", "api://processfactorial",
       "--openid-config", "https://login.microsoftonline.com/tenant/v2.0/.well-known/openid-configuration",
       "--jwks-cluster", "aad"]


def run(*args, env=None, input=None):
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, env=env, input=input, timeout=60, cwd=ROOT)


def clean_env(**settings):
    """This process's environment without any portal setting, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(settings)
    return env


def import_env(*args, settings=None):
    return run("import-env", *args, env=clean_env(**(settings or {})))


def assert_no_secret(r):
    for key in KEYS:
        assert key not in r.stdout and key not in r.stderr


def assert_validates(tmp_path, text):
    p = tmp_path / "imported.json"
    p.write_text(text)
    r = run("validate", p)
    assert r.returncode == 0, r.stderr
    return p


def test_seed_example_from_environment(tmp_path):
    r = import_env(*JWT, settings=SEED)
    assert r.returncode == 0, r.stderr
    assert_no_secret(r)
    assert r.stdout.startswith('{\n  "$schema": "./gateguard.schema.json",\n  "apis": [')
    policy = json.loads(r.stdout)
    apis = policy["apis"]
    assert [(a["name"], a["path_prefix"], a["replay"]["mode"]) for a in apis] == [
        ("api", "/api", "with_ip"),
        ("testharnessapi", "/testharnessapi", "with_ip"),
        ("demapi", "/demapi", "without_ip"),
    ]
    for a in apis:
        assert a["jwt"] == {
            "issuers": ["https://login.microsoftonline.com/tenant/v2.0"],
            "audiences": ["api://processfactorial"],
            "algorithms": ["RS256"],
            "jwks": {"cluster": "aad", "uri": "https://login.microsoftonline.com/tenant/v2.0/.well-known/openid-configuration"},
        }
    assert [a["inject_headers"] for a in apis] == [
        {"x-functions-key": {"env": "GATEGUARD_KEY_API"}},
        {"x-functions-key": {"env": "GATEGUARD_KEY_TESTHARNESSAPI"}},
        {"x-functions-key": {"env": "GATEGUARD_KEY_DEMAPI"}},
    ]
    # The operator learns which variables to set, without their values.
    for var in ["GATEGUARD_KEY_API=", "GATEGUARD_KEY_TESTHARNESSAPI=", "GATEGUARD_KEY_DEMAPI="]:
        assert var in r.stderr
    assert_validates(tmp_path, r.stdout)


def test_check_env_passes_once_the_listed_variables_are_set(tmp_path):
    out = tmp_path / "policy.json"
    r = import_env("--out", out, "--jwks-uri", "https://idp.example.com/keys", *JWT[:4], "--jwks-cluster", "idp",
                   settings=SEED)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    policy = json.loads(out.read_text())
    assert policy["apis"][0]["jwt"]["jwks"] == {"cluster": "idp", "uri": "https://idp.example.com/keys"}
    env = clean_env(GATEGUARD_KEY_API="a", GATEGUARD_KEY_TESTHARNESSAPI="b")
    assert run("validate", "--check-env", out, env=env).returncode == 1
    env["GATEGUARD_KEY_DEMAPI"] = "c"
    r = run("validate", "--check-env", out, env=env)
    assert r.returncode == 0, r.stderr


def test_unprotected_paths_need_no_jwt_flags_and_names_follow_paths(tmp_path):
    r = import_env(settings={"VALID_INPUT_PATHS": " api/ ; / ; /v1/orders ;", "API_KEY_VALUES": "k1; k2 ;k3;"})
    assert r.returncode == 0, r.stderr
    apis = json.loads(r.stdout)["apis"]
    assert [(a["name"], a["path_prefix"]) for a in apis] == [("api", "/api"), ("root", "/"), ("v1_orders", "/v1/orders")]
    assert all("jwt" not in a and "replay" not in a for a in apis)
    assert "GATEGUARD_KEY_V1_ORDERS=" in r.stderr
    assert_validates(tmp_path, r.stdout)


def test_env_file_with_comments_quotes_and_export(tmp_path):
    f = tmp_path / "portal.env"
    f.write_text(
        "# Portal backend settings\n"
        "\n"
        f'export VALID_INPUT_PATHS="/api;/testharnessapi;/demapi"\n'
        f"API_KEY_VALUES='{';'.join(KEYS)}'   # one per path\n"
        "TOKEN_PROTECTED_PATHS_WITH_IP=/api;/testharnessapi # recommended\n"
        'TOKEN_PROTECTED_PATHS_WITHOUT_IP = "/demapi"\n'
        "WEBSITE_RUN_FROM_PACKAGE=1\n"
    )
    # The file wins over the environment: nothing here is read from the process.
    r = run("import-env", "--env-file", f, *JWT, env=clean_env(VALID_INPUT_PATHS="/other", API_KEY_VALUES="x"))
    assert r.returncode == 0, r.stderr
    assert_no_secret(r)
    apis = json.loads(r.stdout)["apis"]
    assert [(a["path_prefix"], a["replay"]["mode"]) for a in apis] == [
        ("/api", "with_ip"), ("/testharnessapi", "with_ip"), ("/demapi", "without_ip")]
    assert_validates(tmp_path, r.stdout)


def test_env_file_errors_name_the_line_not_its_content(tmp_path):
    f = tmp_path / "bad.env"
    for stray in [KEYS[0], KEYS[0].rstrip("=")]:  # a key pasted alone, with or without "="
        f.write_text(f"VALID_INPUT_PATHS=/api\n{stray}\n")
        r = import_env("--env-file", f)
        assert r.returncode == 1
        assert "line 2" in r.stderr
        assert_no_secret(r)
    assert import_env("--env-file", tmp_path / "missing.env").returncode == 2


def test_json_object(tmp_path):
    f = tmp_path / "settings.json"
    f.write_text(json.dumps(dict(SEED, OTHER_SETTING="ignored")))
    r = import_env("--json", f, *JWT)
    assert r.returncode == 0, r.stderr
    assert_no_secret(r)
    assert [a["name"] for a in json.loads(r.stdout)["apis"]] == ["api", "testharnessapi", "demapi"]
    assert_validates(tmp_path, r.stdout)


def test_json_app_service_export(tmp_path):
    f = tmp_path / "appsettings.json"
    entries = [{"name": "FUNCTIONS_EXTENSION_VERSION", "value": "~4", "slotSetting": False}]
    entries += [{"name": k, "value": v, "slotSetting": False} for k, v in SEED.items()]
    f.write_text(json.dumps(entries, indent=2))
    r = import_env("--json", f, *JWT)
    assert r.returncode == 0, r.stderr
    assert_no_secret(r)
    apis = json.loads(r.stdout)["apis"]
    assert [a["replay"]["mode"] for a in apis] == ["with_ip", "with_ip", "without_ip"]
    assert_validates(tmp_path, r.stdout)


def test_json_setting_must_be_a_string(tmp_path):
    f = tmp_path / "settings.json"
    f.write_text(json.dumps({"VALID_INPUT_PATHS": ["/api"], "API_KEY_VALUES": "k"}))
    r = import_env("--json", f)
    assert r.returncode == 1 and "VALID_INPUT_PATHS" in r.stderr


@pytest.mark.parametrize("settings, expected", [
    ({"VALID_INPUT_PATHS": "/api;/testharnessapi;/demapi", "API_KEY_VALUES": ";".join(KEYS[:2])},
     ["API_KEY_VALUES[2]", "/demapi", "3 entries"]),
    ({"VALID_INPUT_PATHS": "/api", "API_KEY_VALUES": ";".join(KEYS[:2])}, ["API_KEY_VALUES[1]"]),
    ({"VALID_INPUT_PATHS": "/api;/demapi", "API_KEY_VALUES": ";".join(KEYS[:2]), "TOKEN_PROTECTED_PATHS_WITH_IP": "/api;/testharnessapi"},
     ["TOKEN_PROTECTED_PATHS_WITH_IP[1]", "/testharnessapi", "VALID_INPUT_PATHS"]),
    ({"VALID_INPUT_PATHS": "/api;/demapi", "API_KEY_VALUES": ";".join(KEYS[:2]),
      "TOKEN_PROTECTED_PATHS_WITH_IP": "/api;/demapi", "TOKEN_PROTECTED_PATHS_WITHOUT_IP": "/demapi"},
     ["TOKEN_PROTECTED_PATHS_WITHOUT_IP[0]", "TOKEN_PROTECTED_PATHS_WITH_IP[1]", "/demapi"]),
    ({"VALID_INPUT_PATHS": "/api;;/demapi", "API_KEY_VALUES": ";".join(KEYS)}, ["VALID_INPUT_PATHS[1] is empty"]),
    ({"VALID_INPUT_PATHS": "/api;/demapi", "API_KEY_VALUES": f"{KEYS[0]}; "}, ["API_KEY_VALUES", "has 1"]),
    ({"VALID_INPUT_PATHS": "/api;/API/", "API_KEY_VALUES": ";".join(KEYS[:2])}, ["VALID_INPUT_PATHS[1]", "VALID_INPUT_PATHS[0]"]),
    ({"API_KEY_VALUES": KEYS[0]}, ["VALID_INPUT_PATHS is not set"]),
    ({"VALID_INPUT_PATHS": "/api"}, ["API_KEY_VALUES is not set"]),
], ids=["fewer-keys", "more-keys", "protected-not-input", "both-lists", "empty-entry", "empty-key",
        "duplicate-path", "no-paths", "no-keys"])
def test_settings_errors(settings, expected):
    r = import_env(*JWT, settings=settings)
    assert r.returncode == 1
    assert r.stdout == ""
    for text in expected:
        assert text in r.stderr, r.stderr
    assert_no_secret(r)


def test_protected_paths_need_jwt_flags():
    r = import_env(settings=SEED)
    assert r.returncode == 1 and r.stdout == ""
    for flag in ["--issuer", "--audience", "--jwks-uri", "--openid-config", "--jwks-cluster"]:
        assert flag in r.stderr
    assert "/api in TOKEN_PROTECTED_PATHS_WITH_IP" in r.stderr
    assert_no_secret(r)
    r = import_env("--issuer", "https://idp/", "--audience", "a", settings=SEED)
    assert r.returncode == 1
    assert "--issuer" not in r.stderr and "--jwks-cluster" in r.stderr


def test_openid_config_must_be_a_discovery_url():
    r = import_env("--issuer", "i", "--audience", "a", "--openid-config", "https://idp.example.com/keys",
                   "--jwks-cluster", "idp", settings=SEED)
    assert r.returncode == 1 and "/.well-known/openid-configuration" in r.stderr


def test_inline_keys_and_key_header(tmp_path):
    out = tmp_path / "inline.json"
    r = import_env(*JWT, "--inline-keys", "--key-header", "x-api-key", "--out", out, settings=SEED)
    assert r.returncode == 0, r.stderr
    assert_no_secret(r)
    assert "not recommended" in r.stderr or "secret" in r.stderr
    apis = json.loads(out.read_text())["apis"]
    assert [a["inject_headers"] for a in apis] == [{"x-api-key": {"value": k}} for k in KEYS]
    if os.name == "posix":
        assert out.stat().st_mode & 0o077 == 0, "a policy holding keys is owner-only"
    assert_validates(tmp_path, out.read_text())


def test_key_header_is_checked():
    r = import_env(*JWT, "--key-header", "host", settings=SEED)
    assert r.returncode == 1 and "--key-header" in r.stderr


def test_print_secrets_prints_an_env_file_on_stderr(tmp_path):
    r = import_env(*JWT, "--print-secrets", settings=SEED)
    assert r.returncode == 0, r.stderr
    assert not any(k in r.stdout for k in KEYS)
    lines = [l for l in r.stderr.splitlines() if not l.startswith("#")]
    assert lines == [f"GATEGUARD_KEY_API={KEYS[0]}", f"GATEGUARD_KEY_TESTHARNESSAPI={KEYS[1]}",
                     f"GATEGUARD_KEY_DEMAPI={KEYS[2]}"]
    # ...which are exactly what the policy needs at load time.
    policy = tmp_path / "p.json"
    policy.write_text(r.stdout)
    env = clean_env(**dict(l.split("=", 1) for l in lines))
    assert run("validate", "--check-env", policy, env=env).returncode == 0


def test_help_describes_the_command():
    r = run("import-env", "--help")
    assert r.returncode == 0
    for text in ["VALID_INPUT_PATHS", "--env-file", "--json", "--inline-keys", "--key-header", "--openid-config"]:
        assert text in r.stdout


# ---- an input it cannot convert fully never yields a weaker policy ----

@pytest.mark.parametrize("source, content, expected", [
    # The protected list under another letter case: read by the backend (App Service on Windows
    # ignores case), so dropping it would serve /api without a token.
    ("json", {**SEED, "token_protected_paths_with_ip": SEED["TOKEN_PROTECTED_PATHS_WITH_IP"],
              "TOKEN_PROTECTED_PATHS_WITH_IP": ""}, '"token_protected_paths_with_ip" looks like'),
    ("appsettings", [{"name": k, "value": v} for k, v in {**SEED, "Token_Protected_Paths_Without_Ip": "/demapi"}.items()
                     if k != "TOKEN_PROTECTED_PATHS_WITHOUT_IP"], "[3]: \"Token_Protected_Paths_Without_Ip\" looks like TOKEN_PROTECTED_PATHS_WITHOUT_IP,"),
    ("dotenv", "\n".join(f"{k}={v}" for k, v in SEED.items()) + "\nTOKEN_PROTECTED_PATH_WITH_IP=/testharnessapi\n",
     'line 5: "TOKEN_PROTECTED_PATH_WITH_IP" looks like TOKEN_PROTECTED_PATHS_WITH_IP'),
    # Set twice: which one the backend used is not known.
    ("dotenv", "\n".join(f"{k}={v}" for k, v in SEED.items()) + "\nTOKEN_PROTECTED_PATHS_WITH_IP=\n",
     "line 5: TOKEN_PROTECTED_PATHS_WITH_IP is set again (first on line 3)"),
    # References the loader or App Service would resolve.
    ("dotenv", "\n".join(f"{k}={v}" for k, v in {**SEED, "TOKEN_PROTECTED_PATHS_WITH_IP": "${PROTECTED}"}.items()),
     "TOKEN_PROTECTED_PATHS_WITH_IP refers to another variable"),
    ("json", {**SEED, "API_KEY_VALUES": "@Microsoft.KeyVault(SecretUri=https://v.vault.azure.net/secrets/k/)"},
     "API_KEY_VALUES refers to a Key Vault secret"),
], ids=["json-lowercase", "appsettings-mixed-case", "dotenv-singular", "dotenv-twice", "dotenv-expansion",
        "keyvault-reference"])
def test_settings_it_cannot_read_exactly_are_refused(tmp_path, source, content, expected):
    f = tmp_path / "settings"
    f.write_text(content if isinstance(content, str) else json.dumps(content))
    flag = "--env-file" if source == "dotenv" else "--json"
    out = tmp_path / "deployed.json"
    out.write_text('{"apis": [{"name": "strict", "path_prefix": "/"}]}\n')
    before = out.read_bytes()
    r = import_env(flag, f, "--out", out, *JWT)
    assert r.returncode == 1, r.stderr
    assert r.stdout == ""
    assert expected in r.stderr, r.stderr
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deployed.json", "settings"]
    assert_no_secret(r)
    assert "SecretUri" not in r.stderr


def test_a_setting_like_name_in_the_environment_is_refused():
    r = import_env(*JWT, settings={**SEED, "Token_Protected_Paths_With_Ip": "/api"})
    assert r.returncode == 1 and r.stdout == ""
    assert '"Token_Protected_Paths_With_Ip" looks like TOKEN_PROTECTED_PATHS_WITH_IP' in r.stderr
