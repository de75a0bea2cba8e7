"""Starts a real Envoy with the built gateguard.wasm, once per test group, on configurations
`gateguard render` writes: what users deploy. A test that needs several gateways side by side
renders each and composes them into one Envoy; a test that departs from the rendered config
says so where it changes it."""

import http.client
import json
import os
import random
import re
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "gateguard.wasm"
CLI = ROOT / "target" / "release" / "gateguard"
# The Envoy every test runs, `envoy --mode validate` included: .venv's (the newest supported), or
# the one ENVOY_BIN names (`make test-compat` sets it to each version of docs/compatibility.md).
ENVOY = os.environ.get("ENVOY_BIN") or str(ROOT / ".venv" / "bin" / "envoy")


def envoy_version():
    """ENVOY's version as a tuple, e.g. (1, 36, 4), from `envoy --version`; raises RuntimeError
    naming ENVOY_BIN when the binary is missing or does not say."""
    global _ENVOY_VERSION
    if _ENVOY_VERSION is None:
        try:
            r = subprocess.run([ENVOY, "--version"], capture_output=True, text=True, timeout=60)
        except OSError as e:
            raise RuntimeError(f"ENVOY_BIN: cannot run {ENVOY}: {e}") from e
        m = re.search(r"version: [0-9a-f]+/(\d+)\.(\d+)\.(\d+)", r.stdout + r.stderr)
        if r.returncode != 0 or not m:
            raise RuntimeError(f"ENVOY_BIN: {ENVOY} --version exited with {r.returncode} and no "
                               f"version: {(r.stdout + r.stderr)[-500:]}")
        _ENVOY_VERSION = tuple(int(g) for g in m.groups())
    return _ENVOY_VERSION


_ENVOY_VERSION = None


def _ephemeral_low():
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_ISSUED_PORTS = set()
_PORT_RANDOM = random.Random()


def free_port():
    """A port on 127.0.0.1 that nothing listens on, for a server a test starts. It comes from
    below the kernel's ephemeral range, so no outgoing connection (Envoy to an upstream, a client
    to Envoy) can be holding it when the server binds a moment later, and it is never handed out
    twice in one run, so two servers of one test cannot get the same one."""
    low, high = 20000, _ephemeral_low()
    for _ in range(200 if high - low >= 1000 else 0):
        port = _PORT_RANDOM.randrange(low, high)
        if port in _ISSUED_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ISSUED_PORTS.add(port)
        return port
    for _ in range(1000):  # an unusual ephemeral range: the kernel's pick, still never twice
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ISSUED_PORTS:
            _ISSUED_PORTS.add(port)
            return port
    raise RuntimeError("no free port on 127.0.0.1")


def render(policy, **options):
    """What `gateguard render` writes for `policy` (a dict, or the policy's text), with this
    checkout's .wasm: the configuration users deploy, as a dict. `options` are render's own,
    `_` for `-`: `listen="127.0.0.1:8080"`, `tls_cert=path`, `access_log=path`...
    A policy render refuses raises RuntimeError with render's message."""
    text = policy if isinstance(policy, str) else json.dumps(policy, indent=1)
    with tempfile.TemporaryDirectory(prefix="gateguard-render-") as d:
        path = Path(d) / "policy.json"
        path.write_text(text)
        args = [str(CLI), "render", "--policy", str(path), "--wasm", str(WASM), "--format", "json"]
        for name, value in options.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        r = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"gateguard render exited with {r.returncode}:\n{r.stderr}")
    return json.loads(r.stdout)


def gateway(name, port, policy, upstream, address="127.0.0.1", **options):
    """A rendered gateway for `policy` listening on `address`:`port` in front of the upstream on
    127.0.0.1:`upstream`. Its listeners are named `name` (and `name`_tls with `tls_cert`), so
    that `compose` can put several gateways in one Envoy."""
    host = f"[{address}]" if ":" in address else address
    config = render(policy, listen=f"{host}:{port}", upstream=f"127.0.0.1:{upstream}", **options)
    names = {"gateway_http": name, "gateway_tls": f"{name}_tls"}
    for l in config["static_resources"]["listeners"]:
        l["name"] = names[l["name"]]
    return config


def compose(gateways, admin_port):
    """One Envoy bootstrap serving rendered gateways side by side: every gateway's listeners,
    each cluster once (gateways render a cluster they share identically), the node identity a
    gateway that subscribes to files (ECDS, SDS) renders, the test's admin."""
    listeners, clusters, nodes = [], {}, []
    for config in gateways:
        listeners += config["static_resources"]["listeners"]
        for cluster in config["static_resources"]["clusters"]:
            assert clusters.setdefault(cluster["name"], cluster) == cluster, \
                f"two gateways render cluster {cluster['name']} differently"
        if "node" in config and config["node"] not in nodes:
            nodes.append(config["node"])
    assert len(nodes) <= 1, f"gateways render different node identities: {nodes}"
    share_env_keys(listeners)
    composed = bootstrap(listeners, list(clusters.values()), admin_port)
    if nodes:
        composed["node"] = nodes[0]
    return composed


def share_env_keys(listeners):
    """Gives every gateguard filter the union of the rendered `host_env_keys`. Envoy before 1.39
    runs filters whose vm_id and code are the same in ONE Wasm VM, created with the environment
    of the first (docs/compatibility.md): composed gateways that list different variables would
    otherwise see only the first one's. One rendered config lists the same keys on every listener."""
    configs = [f["typed_config"]["config"] for l in listeners for chain in l["filter_chains"]
               for nf in chain["filters"] for f in nf.get("typed_config", {}).get("http_filters", [])
               if f["name"] == "envoy.filters.http.wasm" and "vm_config" in f.get("typed_config", {}).get("config", {})]
    keys = sorted({k for c in configs for k in c["vm_config"].get("environment_variables", {}).get("host_env_keys", [])})
    for c in configs:
        if keys:
            c["vm_config"].setdefault("environment_variables", {})["host_env_keys"] = keys


def requires_envoy(minimum, why):
    """A pytest mark skipping a test on an Envoy older than `minimum` (a tuple), saying `why`."""
    import pytest

    return pytest.mark.skipif(envoy_version() < minimum,
                              reason=f"needs Envoy {'.'.join(map(str, minimum))} or newer "
                                     f"(this is {'.'.join(map(str, envoy_version()))}): {why}")


def connection_certificate_readable():
    return envoy_version() >= (1, 38)


def _connection_certificate(test):
    """Marks a test that needs a client certificate read from the TLS connection accepted."""
    import pytest

    return pytest.mark.skipif(
        not connection_certificate_readable(),
        reason="needs Envoy 1.38 or newer, the first to give Wasm filters the client certificate "
               "(the connection.peer_certificate attribute); older ones refuse these requests, "
               "fail closed (test_client_cert.py::test_connection_certificate_fails_closed_on_older_envoy)")(test)


CONNECTION_CERTIFICATE = _connection_certificate


def listener(config, name):
    return next(l for l in config["static_resources"]["listeners"] if l["name"] == name)


def connection_manager(config, name):
    """The HTTP connection manager of listener `name`, for a test that changes a setting of it."""
    return listener(config, name)["filter_chains"][0]["filters"][0]["typed_config"]


def filter_config(config, name):
    """The gateguard Wasm filter's `config` (policy, vm_config) on listener `name`."""
    return gateguard_filter(connection_manager(config, name))["typed_config"]["config"]


def wasm_filter(policy):
    """The gateguard filter as `render` writes it for `policy`, for a listener of the caller's own
    (scripts/bench.py's answer directly, without an upstream)."""
    return gateguard_filter(connection_manager(render(policy), "gateway_http"))


def gateguard_filter(manager):
    return next(f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.wasm")


def bootstrap(listeners, clusters, admin_port):
    return {
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
    }


# ---- for test_import_apim.py, until its fixture uses `gateway` and `compose` ----


def http_listener(name, port, policy, address="127.0.0.1", env_keys=(), upstream="upstream"):
    """The rendered HTTP listener for `policy`, routed to the test's own cluster `upstream`
    (`static_cluster`) instead of the rendered one. `env_keys` is unused: render lists every
    variable the policy reads."""
    config = gateway(name, port, policy, 9, address)
    routes = connection_manager(config, name)["route_config"]
    routes["virtual_hosts"][0]["routes"][0]["route"]["cluster"] = upstream
    return listener(config, name)


def static_cluster(name, port):
    return {
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


class Envoy:
    """One Envoy process. `config` is a full bootstrap dict."""

    def __init__(self, config, env=None, concurrency=2, name="envoy", admin_port=None, extra_args=()):
        """`config`: a bootstrap dict, or the path of a config file (then give `admin_port`).
        `extra_args`: more Envoy command-line options."""
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
        self.extra_args = list(extra_args)
        self.proc = None

    def start(self, wait=True, timeout=30):
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [ENVOY, "-c", str(self.config_path), "--concurrency", str(self.concurrency),
             "-l", "info", "--disable-hot-restart", "--base-id", str(free_port()), *self.extra_args],
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

    def rss_kib(self):
        """Envoy's resident set (VmRSS of its process), in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for Envoy (pid {self.proc.pid})")

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
        pairs = list((headers or []) if isinstance(headers, list) else (headers or {}).items())
        # A Host given by the test replaces the one http.client would add.
        own_host = any(name.lower() == "host" for name, _ in pairs)
        conn.putrequest(method, path, skip_host=own_host, skip_accept_encoding=True)
        for name, value in pairs:
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


JWT_CHALLENGE = 'Bearer error="invalid_token"'


def token_request(port, path, token=None, method="GET", headers=None, scheme="Bearer"):
    """`method` `path` with `Authorization: <scheme> <token>` (none when `token` is None)."""
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"{scheme} {token}"
    return request(port, method, path, headers=h)


def assert_jwt_401(r, message):
    """A 401 from the JWT check: the JSON body, RFC 6750's challenge, nothing from upstream."""
    assert r.status == 401, r
    assert r.json() == {"statusCode": 401, "message": message}
    assert r.header("www-authenticate") == JWT_CHALLENGE
    assert r.header("content-type") == "application/json"
    assert "demo-function-app" not in r.body


def refusal_reason(envoy, mark, timeout=10):
    """The `reason` of the first refusal gateguard logged after `mark` (an offset in Envoy's
    log: its JSON audit line), waiting a bounded time for Envoy to write it."""
    found = []

    def logged():
        for line in envoy.log_text()[mark:].splitlines():
            if '"gateguard":"refused"' in line:
                found.append(json.loads(line[line.index("{"):]))
                return True
        return False

    assert wait_for(logged, timeout=timeout, interval=0.05), "no refusal logged"
    return found[0]["reason"]


def wait_for(predicate, timeout=30, interval=0.1):
    """Polls `predicate` until it holds or `timeout` seconds pass (bounded: tests never hang)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def run_with_policy_text(policy, upstream, name):
    """Starts Envoy with `policy` (a dict or raw text) put by hand into a rendered config, the way
    a hand-edited file would bring a policy `render` refuses; waits for Envoy to exit and returns
    (exit code or None if it kept running, log text)."""
    config = compose([gateway("l", free_port(), {"apis": [{"name": "a", "path_prefix": "/a"}]}, upstream)],
                     free_port())
    text = policy if isinstance(policy, str) else json.dumps(policy)
    filter_config(config, "l")["configuration"]["value"] = text
    envoy = Envoy(config, concurrency=1, name=name)
    envoy.start(wait=False)
    try:
        return envoy.wait_exit(30), envoy.log_text()
    finally:
        envoy.stop()


def race(requests):
    """Sends every GET `(port, path, headers, source_ip)` at the same instant (each on its own
    connection, connected first so that the requests themselves race); returns the statuses in
    order, or the error a request met."""
    barrier = threading.Barrier(len(requests))
    results = [None] * len(requests)

    def worker(i, port, path, headers, source):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
        try:
            conn.connect()
            barrier.wait(timeout=30)
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
            r.read()
            results[i] = r.status
        except Exception as e:  # noqa: BLE001 - reported in the caller's assertion
            results[i] = repr(e)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i, *req)) for i, req in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results
