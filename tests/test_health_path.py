"""`gateguard render --health-path` in a real Envoy (docs/deploy.md, "Health checks"): Envoy's own
health check answers the exact path in front of gateguard, 200 while serving and 503 while
failed or draining, and nothing about it opens a way around the policy: every other spelling
(case, trailing slash, query string, dot segments, encodings) goes through gateguard, and no
request for the health path ever reaches the function app, token or body or not."""

import hashlib
import json
import subprocess

import pytest

import upstream
from envoy_harness import CLI, ROOT, WASM, Envoy, free_port, request

HEALTH = "/healthz-e2e"
KEY = "health-test-key"
POLICY = {"apis": [{"name": "all", "path_prefix": "/",
                    "subscription_key": {"keys_sha256": [hashlib.sha256(KEY.encode()).hexdigest()]}}]}


@pytest.fixture(scope="module", params=["embedded", "ecds"])
def gateway(request, tmp_path_factory, echo_upstream):
    tmp = tmp_path_factory.mktemp(f"health-{request.param}")
    ports = {"http": free_port(), "admin": free_port()}
    (tmp / "policy.json").write_text(json.dumps(POLICY))
    args = [str(CLI), "render", "--policy", str(tmp / "policy.json"), "--out", str(tmp / "envoy.yaml"),
            "--wasm", str(WASM), "--listen", f"127.0.0.1:{ports['http']}",
            "--admin", f"127.0.0.1:{ports['admin']}", "--upstream", f"127.0.0.1:{echo_upstream}",
            "--health-path", HEALTH]
    if request.param == "ecds":
        # Rendered as for a container: the files written here, Envoy told where it finds them.
        args += ["--ecds-dir", str(tmp / "written"), "--ecds-envoy-dir", str(tmp / "written")]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "covers it" in r.stderr, r.stderr  # the note: API "all" never sees exactly HEALTH
    envoy = Envoy(tmp / "envoy.yaml", admin_port=ports["admin"], name=f"health-{request.param}")
    envoy.start()
    envoy.port = ports["http"]
    yield envoy
    envoy.stop()
    assert not envoy.problems(), envoy.problems()


def reached_upstream():
    return len(upstream.received("healthz-e2e")) + len(upstream.received("HEALTHZ-E2E"))


def test_the_health_path_is_answered_by_envoy(gateway):
    before = reached_upstream()
    for method in ("GET", "HEAD"):
        r = request(gateway.port, method, HEALTH)
        assert r.status == 200, r
    assert reached_upstream() == before


def test_everything_else_is_still_guarded(gateway):
    assert request(gateway.port, "GET", "/api/x").status == 401
    r = request(gateway.port, "GET", "/api/x", headers={"Ocp-Apim-Subscription-Key": KEY})
    assert r.status == 200 and r.json()["path"] == "/api/x", r


# Requests an attacker might hope reach the function app without a key through the health check.
NOT_THE_HEALTH_PATH = [
    f"{HEALTH}?x",
    f"{HEALTH}?subscription-key=wrong",
    f"{HEALTH}/",
    f"{HEALTH}/x",
    f"{HEALTH}/../api/x",
    f"{HEALTH}/%2e%2e/api/x",
    f"{HEALTH}%2F..%2Fapi",
    f"{HEALTH}%00",
    f"{HEALTH};x",
    f"{HEALTH}#x",
    HEALTH.upper(),
    "/Healthz-E2E",
    f"{HEALTH}x",
    f"/api{HEALTH}",
    f"/api/x?next={HEALTH}",
]


@pytest.mark.parametrize("path", NOT_THE_HEALTH_PATH)
def test_no_other_spelling_passes_without_a_key(gateway, path):
    before = reached_upstream() + len(upstream.received("/api"))
    r = request(gateway.port, "GET", path)
    assert r.status in (400, 401, 404), (path, r)
    assert reached_upstream() + len(upstream.received("/api")) == before, path


# Spellings Envoy normalizes to the health path itself: answered by Envoy, never forwarded.
NORMALIZED_TO_HEALTH = [f"/{HEALTH}", f"/x/..{HEALTH}", f"/.{HEALTH}"]


@pytest.mark.parametrize("path", NORMALIZED_TO_HEALTH)
def test_spellings_normalized_to_the_health_path_are_answered_not_forwarded(gateway, path):
    before = reached_upstream()
    r = request(gateway.port, "GET", path)
    assert r.status == 200, (path, r)
    assert reached_upstream() == before


def test_a_token_a_key_or_a_body_on_the_health_path_goes_nowhere(gateway):
    before = reached_upstream()
    for method, headers, body in [
        ("GET", {"Authorization": "Bearer eyJhbGciOiJub25lIn0.e30."}, None),
        ("GET", {"Ocp-Apim-Subscription-Key": KEY}, None),
        ("POST", {"Content-Type": "application/json"}, '{"delete": "everything"}'),
        ("DELETE", {"X-HTTP-Method-Override": "DELETE"}, None),
    ]:
        r = request(gateway.port, method, HEALTH, headers=headers, body=body)
        assert r.status == 200, (method, headers, r)
    assert reached_upstream() == before


def test_failing_or_draining_answers_503_and_keeps_guarding(gateway):
    status, _, _ = gateway.admin("POST", "/healthcheck/fail")
    assert status == 200
    try:
        assert request(gateway.port, "GET", HEALTH).status == 503
        assert request(gateway.port, "GET", "/api/x").status == 401
    finally:
        gateway.admin("POST", "/healthcheck/ok")
    assert request(gateway.port, "GET", HEALTH).status == 200
