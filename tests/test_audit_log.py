"""End-to-end: the audit trail without raw client addresses (docs/policy.md, "Audit log";
docs/operations.md, "Audit trail"), in a real Envoy started once for the module.

Gateways with `log.client_ip` `masked` and `hashed`, on 127.0.0.1 and (where the machine has it)
::1, each with the file access log `gateguard render --access-log` writes. Requests come from
127.0.0.1 and ::1: the refusal lines, the `replay_unchecked` warning and the access log show
127.0.0.0 / `::` masked, or the HMAC the test computes itself with the same key, stable across
requests; the raw address appears in none of them. The masked IPv4 gateway also ships its
access log, through the OpenTelemetry block of docs/operations.md, to a small OTLP/gRPC
receiver in the test. The doc's block is validated by Envoy itself. A `hashed` policy without
its key is refused by `validate --check-env` and by Envoy, naming the field, never the key.
"""

import hashlib
import hmac
import json
import os
import re
import socket
import subprocess
import threading
import time
from concurrent import futures

import pytest

import jwtkit
from conftest import start_envoy
from envoy_harness import (
    CLI, ENVOY, ROOT, compose, envoy_version, connection_manager, free_port, gateway, request, run_with_policy_text,
    wait_for,
)

KEY_ENV = "GATEGUARD_LOG_IP_KEY"
HASH_KEY = "audit-test-key-0123456789abcdef"
ISS = "https://login.microsoftonline.com/tenant/v2.0"
AUD = "api://processfactorial"
DOC = ROOT / "docs" / "operations.md"


def ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HAS_IPV6 = ipv6_loopback()


def token_of(address, key=HASH_KEY):
    """What `hashed` shows for `address`: docs/policy.md's recipe, computed independently."""
    return "h:" + hmac.new(key.encode(), address.encode(), hashlib.sha256).hexdigest()[:32]


def policy(form, jwt_key=None, etcd_port=None):
    """`open` (no checks) and `keyed` (refuses without a subscription key); with `etcd_port`, an
    API whose replay store (etcd on a closed port, `on_unavailable: allow`) never answers, so its
    requests pass with a `replay_unchecked` warning."""
    apis = [
        {"name": "open", "path_prefix": "/open"},
        {"name": "keyed", "path_prefix": "/keyed",
         "subscription_key": {"keys_sha256": [hashlib.sha256(b"the-key").hexdigest()]}},
    ]
    log = {"client_ip": form}
    if form == "hashed":
        log["hash_key"] = {"env": KEY_ENV}
    out = {"apis": apis, "log": log}
    if etcd_port:
        apis.append(jwtkit.replay_api("unchecked", "without_ip", jwt_key, ISS, AUD))
        out["replay_store"] = {"etcd": {"timeout_ms": 500, "on_unavailable": "allow"}}
    return out


def doc_otel_block():
    """The OpenTelemetry access-log block of docs/operations.md: {"access_log": [...],
    "clusters": [...]}."""
    import yaml  # requirements-dev.txt

    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    found = [b for b in blocks if "envoy.access_loggers.open_telemetry" in b]
    assert len(found) == 1, "docs/operations.md should hold one OpenTelemetry access-log block"
    block = yaml.safe_load(found[0])
    assert set(block) == {"access_log", "clusters"}, block.keys()
    if envoy_version() < (1, 37):
        # As the doc's note says: Envoy 1.36 has `log_name` and `grpc_service` only under
        # `common_config` (with `transport_api_version: V3`), which 1.37+ deprecate.
        assert "put `log_name` and `grpc_service` under `common_config:`" in " ".join(DOC.read_text().split())
        config = block["access_log"][0]["typed_config"]
        config["common_config"] = {"log_name": config.pop("log_name"),
                                   "grpc_service": config.pop("grpc_service"),
                                   "transport_api_version": "V3"}
    return block


def with_otel(config, listener_name, port):
    """Adds the doc's OpenTelemetry access log to `listener_name` beside the file log, its
    collector cluster pointed at 127.0.0.1:`port` (the doc names `otel-collector`)."""
    block = doc_otel_block()
    manager = connection_manager(config, listener_name)
    manager["access_log"] = manager.get("access_log", []) + block["access_log"]
    for cluster in block["clusters"]:
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"].update(address="127.0.0.1", port_value=port)
        config["static_resources"]["clusters"].append(cluster)
    return config


class Collector:
    """An OTLP/gRPC LogsService on 127.0.0.1 that keeps the attributes of every record."""

    def __init__(self):
        import grpc  # requirements-dev.txt
        from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc

        self.records = []
        self.lock = threading.Lock()
        collector = self

        class Logs(logs_service_pb2_grpc.LogsServiceServicer):
            def Export(self, req, context):  # noqa: N802 - the service's method name
                with collector.lock:
                    for resource_logs in req.resource_logs:
                        for scope_logs in resource_logs.scope_logs:
                            for record in scope_logs.log_records:
                                collector.records.append(
                                    {kv.key: kv.value.string_value for kv in record.attributes})
                return logs_service_pb2.ExportLogsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def snapshot(self):
        with self.lock:
            return list(self.records)

    def stop(self):
        self.server.stop(0)


@pytest.fixture(scope="module")
def jwt_key():
    return jwtkit.Key("ed", "ed-1")


@pytest.fixture(scope="module")
def gw(request, echo_upstream, jwt_key, tmp_path_factory):
    logs = tmp_path_factory.mktemp("access")
    names = ["masked4", "hashed4"] + (["masked6", "hashed6"] if HAS_IPV6 else [])
    ports = {name: free_port() for name in names}
    access = {name: logs / f"{name}.log" for name in names}
    etcd_port = free_port()  # nothing listens there: etcd never answers
    gateways = []
    for name in names:
        form = "masked" if name.startswith("masked") else "hashed"
        v6 = name.endswith("6")
        # The replay API once, on the masked IPv4 gateway (render wants --etcd for it).
        extra = {"etcd": f"127.0.0.1:{etcd_port}"} if name == "masked4" else {}
        pol = policy(form, jwt_key, etcd_port if name == "masked4" else None)
        gateways.append(gateway(name, ports[name], pol, echo_upstream, address="::1" if v6 else "127.0.0.1",
                                access_log=access[name], **extra))
    config = compose(gateways, free_port())
    collector = Collector()
    request.addfinalizer(collector.stop)
    # Departs from the rendered config: the doc's OpenTelemetry log on the masked IPv4 gateway.
    with_otel(config, "masked4", collector.port)
    # Access-log files are written out every 10 s by default: every 0.5 s here, for quick tests.
    envoy = start_envoy(request, config, env={KEY_ENV: HASH_KEY},
                        extra_args=["--file-flush-interval-msec", "500"])
    envoy.ports, envoy.access, envoy.collector = ports, access, collector
    return envoy


def get(gw, name, path, headers=None):
    host = "::1" if name.endswith("6") else "127.0.0.1"
    return request(gw.ports[name], "GET", path, headers=headers, host=host)


def refusals(gw, mark, kind="refused", count=1):
    """gateguard's JSON lines of `kind` logged after `mark`, once `count` are there."""
    found = []

    def logged():
        found[:] = [json.loads(l[l.index("{"):]) for l in gw.log_text()[mark:].splitlines()
                    if f'"gateguard":"{kind}"' in l]
        return len(found) >= count

    assert wait_for(logged, timeout=10, interval=0.05), f"fewer than {count} {kind} lines"
    return found


def access_lines(gw, name, predicate, count=1):
    """Access-log lines of gateway `name` matching `predicate`, once `count` are there (Envoy
    flushes access logs asynchronously)."""
    found = []

    def written():
        path = gw.access[name]
        lines = path.read_text().splitlines() if path.exists() else []
        found[:] = [l for l in lines if predicate(l)]
        return len(found) >= count

    assert wait_for(written, timeout=20, interval=0.1), \
        f"{name}: fewer than {count} matching access-log lines"
    return found


def field(line, name):
    return re.search(rf"\b{name}=(\S+)", line).group(1)


def gateguard_lines(gw):
    """Every line gateguard wrote to Envoy's log."""
    return [l for l in gw.log_text().splitlines() if "wasm log" in l]


def assert_nowhere(gw, raw):
    """`raw` (the client's real address) is in none of gateguard's log lines nor any access log."""
    assert not [l for l in gateguard_lines(gw) if raw in l]
    for name, path in gw.access.items():
        text = path.read_text() if path.exists() else ""
        assert raw not in text, f"{raw} in {name}'s access log:\n{text}"


def check_gateway(gw, name, client, shown):
    """A refusal and an allowed request from `client`: both show `shown` in the refusal line
    and in the access log."""
    mark = len(gw.log_text())
    assert get(gw, name, "/keyed/x").status == 401
    assert get(gw, name, "/open/x").status == 200
    line = refusals(gw, mark)[0]
    assert (line["api"], line["check"], line["status"]) == ("keyed", "subscription_key", 401)
    assert line["client_ip"] == shown, line
    refused = access_lines(gw, name, lambda l: l.startswith("401 outcome=key_denied api=keyed"))
    allowed = access_lines(gw, name, lambda l: l.startswith("200 outcome=allowed api=open"))
    for l in refused + allowed:
        assert field(l, "client_ip") == shown, l
    # The access log's request id is the refusal line's.
    assert any(field(l, "request_id") == line["request_id"] for l in refused), (line, refused)
    assert_nowhere(gw, client)


def test_masked_ipv4_is_its_24_in_log_lines_and_access_log(gw):
    check_gateway(gw, "masked4", "127.0.0.1", "127.0.0.0")


def test_hashed_ipv4_is_the_keyed_hmac_and_stable(gw):
    shown = token_of("127.0.0.1")
    check_gateway(gw, "hashed4", "127.0.0.1", shown)
    mark = len(gw.log_text())
    for _ in range(3):
        assert get(gw, "hashed4", "/keyed/x").status == 401
    assert {l["client_ip"] for l in refusals(gw, mark, count=3)} == {shown}
    # The key never appears, in the log or the access logs.
    assert HASH_KEY not in gw.log_text()
    assert all(HASH_KEY not in p.read_text() for p in gw.access.values() if p.exists())


@pytest.mark.skipif(not HAS_IPV6, reason="this machine has no IPv6 loopback")
def test_masked_ipv6_is_its_48(gw):
    check_gateway(gw, "masked6", "::1", "::")


@pytest.mark.skipif(not HAS_IPV6, reason="this machine has no IPv6 loopback")
def test_hashed_ipv6_is_the_keyed_hmac_of_its_text(gw):
    check_gateway(gw, "hashed6", "::1", token_of("::1"))
    assert token_of("::1") != token_of("127.0.0.1")


def test_replay_unchecked_warning_is_masked(gw, jwt_key):
    mark = len(gw.log_text())
    token = jwtkit.token(jwt_key, jwtkit.claims(ISS, AUD, jti=f"audit-{time.time_ns()}"))
    r = request(gw.ports["masked4"], "GET", "/unchecked/x", headers={"Authorization": f"Bearer {token}"})
    assert r.status == 200, r
    warning = refusals(gw, mark, kind="replay_unchecked")[0]
    assert warning["api"] == "unchecked" and warning["client_ip"] == "127.0.0.0", warning
    line = access_lines(gw, "masked4", lambda l: "api=unchecked" in l)[0]
    assert field(line, "client_ip") == "127.0.0.0", line
    assert token not in gw.log_text()
    assert_nowhere(gw, "127.0.0.1")


def test_access_log_reaches_an_opentelemetry_collector_masked(gw):
    assert get(gw, "masked4", "/keyed/otel").status == 401
    assert get(gw, "masked4", "/open/otel").status == 200

    def shipped():
        outcomes = {(r.get("api"), r.get("outcome")) for r in gw.collector.snapshot()}
        return {("keyed", "key_denied"), ("open", "allowed")} <= outcomes

    assert wait_for(shipped, timeout=15, interval=0.2), gw.collector.snapshot()[-5:]
    records = gw.collector.snapshot()
    refused = next(r for r in records if r.get("outcome") == "key_denied")
    assert (refused["status"], refused["api"], refused["reason"]) == ("401", "keyed", "subscription key missing")
    assert refused["request_id"], refused
    for r in records:
        assert r.get("client_ip") == "127.0.0.0", r
        assert "127.0.0.1" not in json.dumps(r), r


def test_doc_opentelemetry_block_passes_envoy_validation(tmp_path):
    """docs/operations.md's block, as written (collector `otel-collector:4317`), in a rendered
    config: Envoy's own validation accepts it."""
    config = gateway("gw", free_port(), policy("masked"), 9)
    block = doc_otel_block()
    manager = connection_manager(config, "gw")
    manager["access_log"] = block["access_log"]
    config["static_resources"]["clusters"] += block["clusters"]
    config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": free_port()}}}
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    r = subprocess.run([ENVOY, "--mode", "validate", "-c", str(path), "-l", "warning"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "deprecated" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


def test_hashed_without_its_key_is_refused_naming_the_field(echo_upstream, tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy("hashed")))
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    r = subprocess.run([str(CLI), "validate", "--check-env", str(path)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 1, r
    assert "log.hash_key" in r.stderr and KEY_ENV in r.stderr, r.stderr
    # A short key: refused, and not shown.
    r = subprocess.run([str(CLI), "validate", "--check-env", str(path)], capture_output=True, text=True,
                       env={**env, KEY_ENV: "short-s3cret"}, timeout=60)
    assert r.returncode == 1 and "log.hash_key" in r.stderr and "16 bytes" in r.stderr, r.stderr
    assert "short-s3cret" not in r.stdout + r.stderr
    # A literal key: refused, and not shown, in the reason or the context lines.
    literal = policy("hashed")
    literal["log"]["hash_key"] = {"value": "literal-s3cret-literal-s3cret"}
    path.write_text(json.dumps(literal, indent=1))
    r = subprocess.run([str(CLI), "validate", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "log.hash_key" in r.stderr, r.stderr
    assert "literal-s3cret" not in r.stdout + r.stderr
    # Envoy refuses it at load when the variable is not in the VM's environment.
    code, log = run_with_policy_text(policy("hashed"), echo_upstream, "audit-nokey")
    assert code not in (None, 0), log[-3000:]
    assert "policy refused: log.hash_key" in log and KEY_ENV in log, log[-3000:]
