"""Shared fixtures: one upstream per session, Envoy started once per test group (module)."""

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import upstream  # noqa: E402
from envoy_harness import ENVOY, WASM, Envoy, envoy_version  # noqa: E402


def sha256_hex(text):
    return hashlib.sha256(text.encode()).hexdigest()


def pytest_report_header(config):
    try:
        return f"envoy: {ENVOY} ({'.'.join(map(str, envoy_version()))})"
    except RuntimeError as e:
        return f"envoy: {e}"


@pytest.fixture(scope="session", autouse=True)
def built_wasm():
    try:
        envoy_version()
    except RuntimeError as e:
        pytest.fail(str(e))
    if not WASM.exists():
        pytest.fail(f"{WASM} is missing: run `make build` (make test does it)")


@pytest.fixture(scope="session")
def echo_upstream():
    server = upstream.start()
    yield server.server_address[1]
    server.shutdown()


def start_envoy(request, config, **kw):
    """Start Envoy for a test module; on failure dump its log; always check for panics."""
    envoy = Envoy(config, name=request.module.__name__, **kw)
    envoy.start()

    def finish():
        problems = envoy.problems()
        envoy.stop()
        failed = getattr(request.node, "gateguard_failed", False)
        if failed or problems:
            sys.stderr.write(f"\n----- envoy log ({envoy.log_path}) -----\n{envoy.log_text()[-20000:]}\n")
        assert not problems, f"critical/panic lines in Envoy log: {problems}"

    request.addfinalizer(finish)
    return envoy


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        # Mark the module so its Envoy fixture dumps the log at teardown.
        item.module.__dict__.setdefault("_failed", True)
        for fixturedef_node in (item.session,):
            setattr(fixturedef_node, "gateguard_failed", True)
