"""Hot reload: `gateguard render --ecds-dir` delivers the filter through Envoy's extension config
discovery; a new policy takes effect without restarting Envoy or dropping in-flight requests,
and a policy Envoy refuses leaves the running one in place."""

import json
import os
import subprocess
import threading
import time

import pytest
import yaml

from envoy_harness import CLI, WASM, Envoy, free_port, request, wait_for

V1 = {"apis": [{"name": "alpha", "path_prefix": "/alpha"}]}
V2 = {"apis": [{"name": "beta", "path_prefix": "/beta"}, {"name": "alpha", "path_prefix": "/alpha",
                                                        "ip_filter": {"allow": ["10.0.0.0/8"]}}]}
BAD = {"apis": [{"name": "gamma", "path_prefix": "/gamma", "ip_filter": {"allow": ["10.0.0.0/33"]}}]}


def render(tmp_path, policy, ports, *extra):
    path = tmp_path / f"policy-{time.time_ns()}.json"
    path.write_text(json.dumps(policy))
    return subprocess.run(
        [str(CLI), "render", "--policy", str(path), "--ecds-dir", str(tmp_path / "ecds"), "--wasm", str(WASM),
         "--listen", f"127.0.0.1:{ports['listen']}", "--admin", f"127.0.0.1:{ports['admin']}",
         "--upstream", f"127.0.0.1:{ports['upstream']}", *extra],
        capture_output=True, text=True, timeout=60)




@pytest.fixture(scope="module")
def reloadable(tmp_path_factory, echo_upstream):
    tmp = tmp_path_factory.mktemp("reload")
    ports = {"listen": free_port(), "admin": free_port(), "upstream": echo_upstream}
    r = render(tmp, V1, ports, "--out", str(tmp / "envoy.yaml"))
    assert r.returncode == 0, r.stderr
    envoy = Envoy(tmp / "envoy.yaml", admin_port=ports["admin"], name="reload")
    envoy.start()
    envoy.tmp, envoy.ports = tmp, ports
    yield envoy
    envoy.stop()
    panics = [l for l in envoy.log_text().splitlines() if "panicked" in l or "wasm trap" in l]
    assert not panics, panics


def test_policy_swaps_without_restart_and_in_flight_requests_finish(reloadable):
    port = reloadable.ports["listen"]
    pid = reloadable.proc.pid
    assert request(port, "GET", "/alpha/x").status == 200
    assert request(port, "GET", "/beta/x").status == 404
    # A slow request in flight while the policy changes.
    slow = {}
    t = threading.Thread(target=lambda: slow.update(r=request(port, "GET", "/alpha/slow?sleep=2", timeout=20)))
    t.start()
    time.sleep(0.5)
    r = render(reloadable.tmp, V2, reloadable.ports, "--filter-only")
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: request(port, "GET", "/beta/x").status == 200), "new policy not applied"
    assert request(port, "GET", "/alpha/x").status == 403  # alpha now has an IP filter
    t.join(20)
    assert slow["r"].status == 200, slow
    assert reloadable.proc.pid == pid and reloadable.proc.poll() is None


def test_bad_policy_is_refused_and_the_running_one_keeps_serving(reloadable):
    port = reloadable.ports["listen"]
    # The CLI refuses it before it reaches Envoy, leaving the file untouched...
    filter_file = reloadable.tmp / "ecds" / "gateguard-filter.yaml"
    before = filter_file.read_text()
    r = render(reloadable.tmp, BAD, reloadable.ports, "--filter-only")
    assert r.returncode == 1 and "apis[0].ip_filter.allow[0]" in r.stderr
    assert filter_file.read_text() == before
    # ...and if one arrives anyway (hand-edited), Envoy rejects the update.
    rejected = int(reloadable.stats().get("extension_config_discovery.http_filter.gateguard.update_rejected", "0"))
    tmp = filter_file.with_name(".manual.tmp")
    tmp.write_text(before.replace("/beta", "/gamma").replace('"name": "beta"', '"name": "gamma"')
                   .replace('"10.0.0.0/8"', '"10.0.0.0/33"'))
    os.rename(tmp, filter_file)
    assert wait_for(lambda: int(reloadable.stats().get(
        "extension_config_discovery.http_filter.gateguard.update_rejected", "0")) > rejected)
    assert request(port, "GET", "/beta/x").status == 200
    assert request(port, "GET", "/gamma/x").status == 404
    assert "gateguard: policy refused" in reloadable.log_text()


def test_every_kind_of_bad_update_is_rejected_and_a_good_one_applies_after(reloadable):
    """Hand-edited or truncated updates of every kind reach Envoy: each is rejected (Envoy's
    counter, gateguard's log line), the running policy keeps answering as before, the worker
    VMs survive (no panic: checked at teardown), and the next good update applies."""
    port = reloadable.ports["listen"]
    stat = "extension_config_discovery.http_filter.gateguard.update_rejected"
    filter_file = reloadable.tmp / "ecds" / "gateguard-filter.yaml"
    document = yaml.safe_load(filter_file.read_text())
    running = {path: request(port, "GET", path).status for path in ("/alpha/x", "/beta/x", "/gamma/x")}
    bad = {
        "not JSON": '{"apis": [{"name": "gamma", "path_prefix": "/gamma"',
        "empty": "",
        "not an object": "[]",
        "an unknown field": json.dumps({"apis": [{"name": "gamma", "path_prefix": "/gamma", "ipfilter": {}}]}),
        "over 1 MiB": json.dumps({"apis": [{"name": "gamma", "path_prefix": "/gamma"}],
                                  "padding": "x" * (1024 * 1024 + 1)}),
        "invalid UTF-8 escape": '{"apis": [{"name": "gamma\\ud800", "path_prefix": "/gamma"}]}',
    }
    for kind, policy in bad.items():
        rejected = int(reloadable.stats().get(stat, "0"))
        config = document["resources"][0]["typed_config"]["config"]
        config["configuration"]["value"] = policy
        tmp = filter_file.with_name(".bad.tmp")
        tmp.write_text(yaml.safe_dump(document))
        os.rename(tmp, filter_file)
        assert wait_for(lambda: int(reloadable.stats().get(stat, "0")) > rejected), kind
        for path, status in running.items():
            assert request(port, "GET", path).status == status, (kind, path)
        assert reloadable.proc.poll() is None, kind
    assert reloadable.log_text().count("gateguard: policy refused") >= len(bad)
    # The next good update applies.
    with_delta = {"apis": V2["apis"] + [{"name": "delta", "path_prefix": "/delta"}]}
    r = render(reloadable.tmp, with_delta, reloadable.ports, "--filter-only")
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: request(port, "GET", "/delta/x").status == 200), "the good update did not apply"
    assert request(port, "GET", "/beta/x").status == 200


def test_a_policy_needing_jwt_authn_is_refused_where_none_runs(reloadable):
    # Rendered for V1, the running configuration has no jwt_authn in front of gateguard: a policy
    # whose tokens Envoy verifies would refuse every one of them (docs/policy.md, "Verifying
    # with Envoy's jwt_authn").
    needs = {"apis": [{"name": "alpha", "path_prefix": "/alpha", "jwt": {
        "issuers": ["https://idp/"], "audiences": ["api://a"], "algorithms": ["RS256"],
        "jwks": {"cluster": "idp", "uri": "https://idp.example/keys"}, "verify_with": "envoy"}}]}
    filter_file = reloadable.tmp / "ecds" / "gateguard-filter.yaml"
    before = filter_file.read_text()
    r = render(reloadable.tmp, needs, reloadable.ports, "--filter-only")
    assert r.returncode == 2 and "render it again without --filter-only" in r.stderr, r.stderr
    assert filter_file.read_text() == before
    assert not (reloadable.tmp / "ecds" / "jwt-authn-filter.yaml").exists()
