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
