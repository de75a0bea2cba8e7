"""End-to-end: the client IP the IP filter and `with_ip` replay judge, in a real Envoy.

X-Forwarded-For counts only when the TCP peer is one of `client_ip.trusted_proxies`; a client
that reaches the gateway directly is judged by its own address whatever it writes in the header.
Requests from 127.0.0.1 (and ::1 where listed) play the proxy; 127.0.0.2 and 127.0.0.3 are clients
that bypass it. A policy that trusts hops without naming the proxies is refused by `validate`,
`render` and the filter itself.
"""

import json
import subprocess
import time

import pytest

import jwtkit
from conftest import start_envoy
from envoy_harness import CLI, ROOT, compose, free_port, gateway, request, run_with_policy_text

ISS = "https://login.microsoftonline.com/tenant/v2.0"
AUD = "api://processfactorial"
FORBIDDEN = {"statusCode": 403, "message": "Forbidden: client IP not allowed"}
REPLAY = {"statusCode": 401, "message": "Token replay detected"}
PROXY, DIRECT, OTHER = "127.0.0.1", "127.0.0.2", "127.0.0.3"


@pytest.fixture(scope="module")
def key():
    return jwtkit.Key("ed", "ed-1")


def apis(key):
    return [
        # Only clients in 203.0.113.0/24, which sit behind the proxy.
        {"name": "fwd", "path_prefix": "/fwd", "ip_filter": {"allow": ["203.0.113.0/24"]}},
        # Loopback clients, minus two: one direct, one behind the proxy.
        {"name": "deny", "path_prefix": "/deny",
         "ip_filter": {"allow": ["127.0.0.0/8", "198.51.100.0/24", "203.0.113.0/24"],
                       "deny": [f"{DIRECT}/32", "203.0.113.66/32"]}},
        {"name": "withip", "path_prefix": "/withip", "replay": {"mode": "with_ip"},
         "jwt": {"issuers": [ISS], "audiences": [AUD], "algorithms": ["EdDSA"],
                 "jwks": {"inline": jwtkit.jwks(key)}}},
    ]


def policy(key, hops=1, proxies=(f"{PROXY}/32", "::1/128")):
    return {"apis": apis(key), "client_ip": {"trusted_proxy_hops": hops, "trusted_proxies": list(proxies)}}


@pytest.fixture(scope="module")
def gw(request, key, echo_upstream):
    ports = {name: free_port() for name in ("v4", "hops2", "v6", "v6_v4only", "v6_everyone")}
    gateways = [
        gateway("v4", ports["v4"], policy(key), echo_upstream),
        gateway("hops2", ports["hops2"], policy(key, hops=2), echo_upstream),
        gateway("v6", ports["v6"], policy(key), echo_upstream, address="::1"),
        # Trusting every IPv4 peer says nothing about IPv6 ones...
        gateway("v6_v4only", ports["v6_v4only"], policy(key, proxies=["0.0.0.0/0"]), echo_upstream, address="::1"),
        # ...trusting everyone takes both halves, explicitly.
        gateway("v6_everyone", ports["v6_everyone"], policy(key, proxies=["0.0.0.0/0", "::/0"]), echo_upstream,
                address="::1"),
    ]
    envoy = start_envoy(request, compose(gateways, free_port()))
    envoy.ports = ports
    return envoy


def get(gw, listener, path, source=PROXY, xff=None, headers=None):
    hdrs = list(headers or [])
    if xff is not None:
        hdrs += [("X-Forwarded-For", v) for v in ([xff] if isinstance(xff, str) else xff)]
    host = "::1" if listener.startswith("v6") else "127.0.0.1"
    return request(gw.ports[listener], "GET", path, headers=hdrs, host=host,
                   source=None if host == "::1" else source)


def assert_forbidden(r):
    assert r.status == 403 and r.json() == FORBIDDEN, r


# --- the IP filter -------------------------------------------------------------------------

def test_a_listed_proxy_speaks_for_its_client(gw):
    assert get(gw, "v4", "/fwd/x", xff="203.0.113.9").status == 200
    assert get(gw, "v4", "/fwd/x", xff="198.51.100.1, 203.0.113.9:4711").status == 200
    assert_forbidden(get(gw, "v4", "/fwd/x", xff="198.51.100.1"))
    # The proxy's own address is not the client's: a loopback-only rule does not admit its clients.
    assert_forbidden(get(gw, "v4", "/deny/x", xff="203.0.113.66"))
    assert get(gw, "v4", "/deny/x", xff="198.51.100.1").status == 200


def test_a_direct_client_with_forged_forwarded_for_is_judged_by_its_peer(gw):
    # The attack: reach Envoy directly, claim an allowed address.
    assert_forbidden(get(gw, "v4", "/fwd/x", source=DIRECT, xff="203.0.113.9"))
    assert_forbidden(get(gw, "v4", "/fwd/x", source=OTHER, xff=["203.0.113.9", "203.0.113.9"]))
    # ...or escape a deny rule on its own address.
    assert_forbidden(get(gw, "v4", "/deny/x", source=DIRECT, xff="198.51.100.1"))
    assert_forbidden(get(gw, "v4", "/deny/x", source=DIRECT, xff="198.51.100.1, 127.0.0.1"))
    # A direct client is judged, not refused, for what it writes: the header is not read at all.
    for xff in (None, "", "garbage", "203.0.113.66", "1.1.1.1, nonsense"):
        assert get(gw, "v4", "/deny/x", source=OTHER, xff=xff).status == 200, xff


@pytest.mark.parametrize("xff", [None, "", "garbage", "203.0.113.9, not-an-ip", "999.1.1.1",
                                 "203.0.113.9:", "[203.0.113.9]:80", "unknown"])
def test_a_listed_proxy_without_a_usable_forwarded_for_is_refused(gw, xff):
    # Not taken as the client itself: loopback is allowed on /deny, the request still is not.
    assert_forbidden(get(gw, "v4", "/deny/x", xff=xff))


def test_several_forwarded_for_headers_are_one_list_in_order(gw):
    assert get(gw, "v4", "/fwd/x", xff=["198.51.100.1", "203.0.113.9"]).status == 200
    assert_forbidden(get(gw, "v4", "/fwd/x", xff=["203.0.113.9", "198.51.100.1"]))
    assert get(gw, "hops2", "/fwd/x", xff=["203.0.113.9", "10.0.0.1"]).status == 200
    assert_forbidden(get(gw, "hops2", "/fwd/x", xff=["203.0.113.9, 10.0.0.1", "10.0.0.2"]))


def test_hops_count_from_the_right_and_a_short_list_is_refused(gw):
    assert get(gw, "hops2", "/fwd/x", xff="198.51.100.1, 203.0.113.9, 10.0.0.1").status == 200
    assert_forbidden(get(gw, "hops2", "/fwd/x", xff="203.0.113.9, 198.51.100.1, 10.0.0.1"))
    assert_forbidden(get(gw, "hops2", "/fwd/x", xff="203.0.113.9"))
    assert_forbidden(get(gw, "hops2", "/fwd/x", source=DIRECT, xff="203.0.113.9, 10.0.0.1"))


def test_ipv6_peers_need_an_ipv6_entry(gw):
    assert get(gw, "v6", "/fwd/x", xff="203.0.113.9").status == 200
    assert get(gw, "v6", "/fwd/x", xff="[2001:db8::1]:443, 203.0.113.9").status == 200
    # 0.0.0.0/0 alone does not make ::1 a proxy: its forged header is ignored.
    assert_forbidden(get(gw, "v6_v4only", "/fwd/x", xff="203.0.113.9"))
    assert get(gw, "v6_everyone", "/fwd/x", xff="203.0.113.9").status == 200


# --- with_ip replay ------------------------------------------------------------------------

_n = [0]


def fresh(key):
    _n[0] += 1
    return jwtkit.token(key, jwtkit.claims(ISS, AUD, jti=f"ip-{_n[0]}-{time.time_ns()}"))


def call(gw, token, source=PROXY, xff=None):
    r = get(gw, "v4", "/withip/x", source=source, xff=xff, headers=[("Authorization", f"Bearer {token}")])
    return r.status, (r.json() if r.status != 200 else None)


def test_with_ip_a_forged_forwarded_for_does_not_take_over_a_token(gw, key):
    t = fresh(key)
    assert call(gw, t, xff="203.0.113.5")[0] == 200
    # A thief who reaches the gateway directly and claims the owner's address is a replay.
    assert call(gw, t, source=DIRECT, xff="203.0.113.5") == (401, REPLAY)
    assert call(gw, t, xff="203.0.113.5")[0] == 200


def test_with_ip_a_forged_forwarded_for_does_not_bind_a_token_to_the_forged_address(gw, key):
    t = fresh(key)
    assert call(gw, t, source=OTHER, xff="203.0.113.7")[0] == 200  # bound to 127.0.0.3, its peer
    assert call(gw, t, xff="203.0.113.7") == (401, REPLAY)
    assert call(gw, t, source=DIRECT, xff="127.0.0.3") == (401, REPLAY)
    assert call(gw, t, source=OTHER, xff="198.51.100.9")[0] == 200


def test_with_ip_behind_the_proxy_without_forwarded_for_is_refused(gw, key):
    status, body = call(gw, fresh(key), xff="garbage")
    assert status == 401 and body == REPLAY


# --- a policy that trusts hops without naming the proxies is refused everywhere -------------

REFUSED = [
    ({"trusted_proxy_hops": 1}, "client_ip.trusted_proxies", "0.0.0.0/0"),
    ({"trusted_proxy_hops": 1, "trusted_proxies": []}, "client_ip.trusted_proxies", "empty"),
    ({"trusted_proxy_hops": 0, "trusted_proxies": ["10.0.0.0/8"]}, "client_ip.trusted_proxies", "no effect"),
    ({"trusted_proxy_hops": 1, "trusted_proxies": ["10.0.0.0/8", "10.0.0.0/33"]},
     "client_ip.trusted_proxies[1]", "not an IP"),
    ({"trusted_proxy_hops": 1, "trusted_proxies": ["10.0.0.0/8", "10.1.2.3/8"]},
     "client_ip.trusted_proxies[1]", "host bits"),
    ({"trusted_proxy_hops": 17, "trusted_proxies": ["10.0.0.0/8"]}, "client_ip.trusted_proxy_hops", "at most 16"),
    ({"trusted_proxy_hops": 1, "trusted_proxies": "10.0.0.0/8"}, "client_ip.trusted_proxies", "sequence"),
]
IDS = ["hops-without-list", "empty-list", "list-without-hops", "bad-cidr", "host-bits", "too-many-hops",
       "not-a-list"]


def refused_policy(client_ip):
    return {"apis": [{"name": "a", "path_prefix": "/a"}], "client_ip": client_ip}


@pytest.mark.parametrize("client_ip,path,reason", REFUSED, ids=IDS)
def test_validate_and_render_refuse(tmp_path, client_ip, path, reason):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(refused_policy(client_ip), indent=1))
    for args in (["validate", f], ["render", "--policy", f, "--out", tmp_path / "envoy.yaml"]):
        r = subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 1, (args, r.stderr)
        assert f"{path}:" in r.stderr and reason in r.stderr, r.stderr
    assert not (tmp_path / "envoy.yaml").exists()


@pytest.mark.parametrize("client_ip,path,reason", REFUSED[:4], ids=IDS[:4])
def test_envoy_refuses(echo_upstream, client_ip, path, reason):
    # Not as rendered: render refuses these policies (above), so each goes into a rendered
    # config by hand, as a hand-edited file would bring it.
    code, log = run_with_policy_text(refused_policy(client_ip), echo_upstream, "client-ip-refused")
    assert code not in (None, 0), "Envoy kept running with a policy that trusts any peer's X-Forwarded-For"
    assert "gateguard: policy refused" in log and f"{path}:" in log, log[-3000:]


def test_trusting_every_peer_is_explicit_and_accepted(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(refused_policy({"trusted_proxy_hops": 1, "trusted_proxies": ["0.0.0.0/0", "::/0"]})))
    r = subprocess.run([str(CLI), "validate", str(f)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
