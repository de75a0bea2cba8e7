"""A bad policy is refused by Envoy at startup, with the field and the reason in its log."""

import pytest

from envoy_harness import run_with_policy_text

BAD = [
    ({"apis": [{"name": "a", "path_prefix": "/a", "ip_filter": {"allow": ["10.0.0.0/33"]}}]}, "apis[0].ip_filter.allow[0]"),
    ({"apis": [{"name": "a", "path_prefix": "/a", "ip_filter": {"allow": []}}]}, "apis[0].ip_filter.allow"),
    ({"apis": [{"name": "a", "path_prefix": "/a", "surprise": 1}]}, "unknown field `surprise`"),
    ({"apis": [{"name": "a", "path_prefix": "/a", "cors": {"allowed_origins": ["https://*"]}}]}, "apis[0].cors.allowed_origins[0]"),
    ({"apis": [{"name": "a", "path_prefix": "/a", "subscription_key": {"keys_sha256": ["abc"]}}]}, "apis[0].subscription_key.keys_sha256[0]"),
    ({"apis": [{"name": "a", "path_prefix": "/a", "inject_headers": {"x-k": {"env": "GATEGUARD_UNSET_VAR"}}}]}, "GATEGUARD_UNSET_VAR"),
    ("{not json", "policy refused"),
]


@pytest.mark.parametrize("policy,expected", BAD)
def test_envoy_refuses_bad_policy(echo_upstream, policy, expected):
    # Not as rendered: render refuses most of these policies itself (test_cli.py), so each goes
    # into a rendered config by hand, as a hand-edited file would bring it.
    code, log = run_with_policy_text(policy, echo_upstream, "bad")
    assert code not in (None, 0), "Envoy kept running with a bad policy"
    assert "gateguard: policy refused" in log, log[-3000:]
    assert expected in log, log[-3000:]


def test_envoy_log_lists_every_error_of_a_refused_policy(echo_upstream):
    policy = {"apis": [
        {"name": "a", "path_prefix": "/a", "corz": {}},
        {"name": "b", "path_prefix": "/b", "ip_filter": {"allow": ["10.0.0.0/33"]}},
        {"name": "c", "path_prefix": "/c", "inject_headers": {"x-k": {"value": "s3cret-value", "x": 1}}},
    ], "token_cache": {"max_entries": 2000000}}
    code, log = run_with_policy_text(policy, echo_upstream, "many-errors")
    assert code not in (None, 0), "Envoy kept running with a bad policy"
    line = next(l for l in log.splitlines() if "gateguard: policy refused" in l)
    assert "4 errors:" in line, line
    for path in ("apis[0].corz", "apis[1].ip_filter.allow[0]", "apis[2].inject_headers.x-k", "token_cache.max_entries"):
        assert path in line, line
    assert "s3cret" not in log


def test_envoy_serves_a_policy_with_a_byte_order_mark(echo_upstream):
    import json

    from envoy_harness import Envoy, compose, filter_config, free_port, gateway, request

    port = free_port()
    config = compose([gateway("l", port, {"apis": [{"name": "a", "path_prefix": "/a"}]}, echo_upstream)], free_port())
    # Put by hand, as an editor saved it: render itself leaves the mark out.
    text = "\ufeff" + json.dumps({"apis": [{"name": "bom", "path_prefix": "/bom", "methods": ["GET"]}]})
    filter_config(config, "l")["configuration"]["value"] = text
    envoy = Envoy(config, concurrency=1, name="bom").start()
    try:
        assert request(port, "GET", "/bom/x").status == 200
        assert request(port, "POST", "/bom/x", body="").status == 405
        assert "policy refused" not in envoy.log_text()
    finally:
        envoy.stop()
