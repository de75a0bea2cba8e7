"""Starts a real Envoy with the built gateguard.wasm and a policy, once per test group."""

import http.client
import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "gateguard.wasm"
ENVOY = os.environ.get("ENVOY_BIN") or str(ROOT / ".venv" / "bin" / "envoy")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wasm_filter(policy, env_keys=()):
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "gateguard",
                "root_id": "gateguard",
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": policy if isinstance(policy, str) else json.dumps(policy),
                },
                "vm_config": {
                    "vm_id": "gateguard",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(WASM)}},
                    "environment_variables": {"host_env_keys": list(env_keys)},
                },
                "fail_open": False,
            },
        },
    }


def static_cluster(name, port, tls_sni=None):
    cluster = {
        "name": name,
        "connect_timeout": "1s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}
            ],
        },
    }
    return cluster


ACCESS_LOG_FORMAT = ("%RESPONSE_CODE% outcome=%FILTER_STATE(wasm.gateguard_outcome:PLAIN)% "
                     "api=%FILTER_STATE(wasm.gateguard_api:PLAIN)% reason=%FILTER_STATE(wasm.gateguard_reason:PLAIN)%\n")


# What `gateguard render` sets on every HTTP connection manager: a client header whose name holds
# `_` never reaches the filter or the upstream (docs/deploy.md).
HEADERS_WITH_UNDERSCORES_ACTION = "DROP_HEADER"


def hcm(policy, upstream="upstream", env_keys=(), extra_filters=None, xff_hops=0, access_log=None,
        headers_with_underscores_action=HEADERS_WITH_UNDERSCORES_ACTION):
    """The connection manager `gateguard render` emits. X-Forwarded-For always reaches the filter
    as the client sent it; `client_ip.trusted_proxies` in the policy decides whether it counts
    (`xff_hops` is accepted for compatibility and unused). Pass
    `headers_with_underscores_action="ALLOW"` (Envoy's default) to let underscore spellings reach
    the filter, e.g. to test its own stripping as a hand-written config would run it."""
    filters = list(extra_filters or [])
    if policy is not None:
        filters.append(wasm_filter(policy, env_keys))
    filters.append(
        {"name": "envoy.filters.http.router",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    )
    extra = {}
    if access_log:
        extra["access_log"] = [{
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(access_log),
                "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}},
            },
        }]
    if headers_with_underscores_action:
        extra["common_http_protocol_options"] = {"headers_with_underscores_action": headers_with_underscores_action}
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "ingress",
            # source.address must be the TCP peer, never an address taken from X-Forwarded-For;
            # and X-Forwarded-For reaches gateguard as the client's proxies sent it.
            "use_remote_address": True,
            "skip_xff_append": True,
            "normalize_path": True,
            "merge_slashes": True,
            "route_config": {
                "virtual_hosts": [
                    {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": upstream}}]}
                ]
            },
            "http_filters": filters,
            **extra,
        },
    }


class Envoy:
    """One Envoy process. `config` is a full bootstrap dict."""

    def __init__(self, config, env=None, concurrency=2, name="envoy", admin_port=None):
        """`config`: a bootstrap dict, or the path of a config file (then give `admin_port`)."""
        self.dir = Path(tempfile.mkdtemp(prefix=f"gateguard-{name}-"))
        if isinstance(config, dict):
            self.config_path = self.dir / "envoy.json"
            self.config_path.write_text(json.dumps(config, indent=1))
            self.admin_port = config["admin"]["address"]["socket_address"]["port_value"]
        else:
            self.config_path = Path(config)
            self.admin_port = admin_port
        self.log_path = self.dir / "envoy.log"
        self.env = dict(os.environ, **(env or {}))
        self.concurrency = concurrency
        self.proc = None

    def start(self, wait=True, timeout=30):
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [ENVOY, "-c", str(self.config_path), "--concurrency", str(self.concurrency),
             "-l", "info", "--disable-hot-restart", "--base-id", str(free_port())],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
        )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.log_text()[-6000:]}")
            try:
                status, _, _ = self.admin("GET", "/ready")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"envoy not ready after {timeout}s:\n{self.log_text()[-6000:]}")

    def wait_exit(self, timeout=30):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def admin(self, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        try:
            conn.request(method, path, body=body)
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read().decode()
        finally:
            conn.close()

    def stats(self):
        _, _, text = self.admin("GET", "/stats")
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            out[name] = value
        return out

    def counter(self, name):
        """A gateguard counter; Envoy prefixes Wasm-defined stats with `wasmcustom.`."""
        stats = self.stats()
        for key in (name, "wasmcustom." + name):
            if key in stats:
                return int(stats[key])
        raise KeyError(f"{name} not in stats")

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def problems(self):
        """Lines that must never appear: critical logs and Wasm panics or traps."""
        bad = []
        for line in self.log_text().splitlines():
            low = line.lower()
            if "[critical]" in low or "panicked" in low or "wasm trap" in low or "unreachable" in low:
                bad.append(line)
        return bad

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()


def bootstrap(listeners, clusters, admin_port):
    return {
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
    }


def http_listener(name, port, policy, address="127.0.0.1", **kw):
    return {
        "name": name,
        "address": {"socket_address": {"address": address, "port_value": port}},
        "filter_chains": [{"filters": [hcm(policy, **kw)]}],
    }


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name):
        return self.headers.get(name.lower())

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.headers} {self.body[:300]!r}>"


def request(port, method="GET", path="/", headers=None, body=None, timeout=10, host="127.0.0.1", source=None):
    """`source`: the local address to connect from (e.g. "127.0.0.2"), i.e. the peer Envoy sees."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout,
                                      source_address=(source, 0) if source else None)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in (headers or []) if isinstance(headers, list) else (headers or {}).items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body.encode() if isinstance(body, str) else body)
        r = conn.getresponse()
        hdrs = {}
        for k, v in r.getheaders():
            k = k.lower()
            hdrs[k] = v if k not in hdrs else hdrs[k] + ", " + v
        return Response(r.status, hdrs, r.read().decode("utf-8", "replace"))
    finally:
        conn.close()
