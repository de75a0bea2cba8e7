"""A small real HTTP upstream that echoes the request it got as JSON (the demo "function app").

Tests read the echoed headers to see what the gateway injected, stripped or rewrote, and
`received(marker)` for what reached it at all: every request it saw (its path holding `marker`),
how many body bytes arrived, whether the body arrived whole and what it answered, including
requests whose connection was cut before the body ended, which no client ever sees echoed.
Run standalone: python3 tests/upstream.py PORT
"""

import collections
import hashlib
import os
import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# What this process's upstreams received, newest last (bounded: a session sends thousands).
_RECEIVED = collections.deque(maxlen=4096)
_RECEIVED_LOCK = threading.Lock()


class Received:
    """One request as the upstream saw it. `body_bytes` grows as the body arrives; `complete`
    says the whole body arrived (Content-Length reached, or the last chunk); `answered` is the
    status the upstream sent (None: it never answered); `done` is set once either is final."""

    def __init__(self, method, path, headers):
        self.method, self.path, self.headers = method, path, headers
        self.body_bytes = 0
        self.complete = False
        self.answered = None
        self.done = threading.Event()

    def __repr__(self):
        return (f"<Received {self.method} {self.path} body_bytes={self.body_bytes} "
                f"complete={self.complete} answered={self.answered}>")


def received(marker):
    """Every request whose path holds `marker` that reached any upstream of this process."""
    with _RECEIVED_LOCK:
        return [r for r in _RECEIVED if marker in r.path]


class Truncated(Exception):
    """The connection ended before the body did."""


SECRET_HEADERS = {"x-functions-key"}


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The demo masks secrets it was given (it proves they arrived without showing them to the
    # caller); tests see them in full.
    mask_secrets = False

    def _echo(self):
        headers = {}
        for name, value in self.headers.items():
            if self.mask_secrets and name.lower() in SECRET_HEADERS:
                value = "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:12] + "..."
            headers.setdefault(name.lower(), []).append(value)
        record = Received(self.command, self.path, headers)
        with _RECEIVED_LOCK:
            _RECEIVED.append(record)
        if "sleep=" in self.path:  # a slow function: ?sleep=SECONDS (at most 5)
            try:
                time.sleep(min(float(self.path.split("sleep=")[1].split("&")[0]), 5.0))
            except ValueError:
                pass
        try:
            body = self._read_body(record)
        except (Truncated, OSError, ValueError):
            self.close_connection = True
            record.done.set()
            return
        record.complete = True
        payload = json.dumps(
            {
                "app": "demo-function-app",
                "method": self.command,
                "path": self.path,
                "headers": headers,
                "body": body.decode("utf-8", "replace"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("vary", "Accept-Encoding")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        record.answered = 200
        record.done.set()

    def _read_body(self, record):
        """The request body, Content-Length or chunked, counted into `record` as it arrives."""
        def read(n):
            data = self.rfile.read(n)
            record.body_bytes += len(data)
            if len(data) < n:
                raise Truncated()
            return data

        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                line = self.rfile.readline(1024)
                if not line.endswith(b"\n"):
                    raise Truncated()
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    break
                parts.append(read(size))
                if self.rfile.readline(8) not in (b"\r\n", b"\n"):
                    raise Truncated()
            while True:  # trailers, up to the empty line
                line = self.rfile.readline(8192)
                if not line.endswith(b"\n"):
                    raise Truncated()
                if line in (b"\r\n", b"\n"):
                    break
            return b"".join(parts)
        length = int(self.headers.get("content-length") or 0)
        parts = []
        while length > 0:
            parts.append(read(min(length, 65536)))
            length -= len(parts[-1])
        return b"".join(parts)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _echo

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):  # keep test output clean
        pass


def start(port=0):
    server = ThreadingHTTPServer(("127.0.0.1", port), EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


class TlsEchoHandler(BaseHTTPRequestHandler):
    """Answers what the connection and the request carried: the SNI the client sent, the CN of
    its certificate, the TLS version, the Host header. One response per connection, so every
    request is a new handshake (a rotated client certificate shows on the next one)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        peer = self.connection.getpeercert() or {}
        subject = dict(pair for rdn in peer.get("subject", ()) for pair in rdn)
        payload = json.dumps({
            "app": "tls-function-app",
            "path": self.path,
            "host": self.headers.get("host"),
            "sni": self.server.sni.get(id(self.connection)),
            "client_cn": subject.get("commonName"),
            "tls_version": self.connection.version(),
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(payload)
        self.close_connection = True

    def log_message(self, *args):
        pass


class TlsEchoServer(ThreadingHTTPServer):
    """An HTTPS upstream on 127.0.0.1 for TLS tests; see `start_tls`."""

    daemon_threads = True

    def __init__(self, context):
        super().__init__(("127.0.0.1", 0), TlsEchoHandler)
        self.context = context
        self.sni = {}
        self.refused = []
        context.sni_callback = self._record_sni

    def _record_sni(self, tls_socket, server_name, _context):
        self.sni[id(tls_socket)] = server_name

    def finish_request(self, request, client_address):
        # The handshake runs in the connection's own thread: a slow or failing one holds up
        # no other.
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.refused.append(str(e))
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            self.sni.pop(id(tls), None)
            tls.close()


def start_tls(cert, client_ca=None, max_version=None):
    """An HTTPS upstream on 127.0.0.1 (random port) presenting `cert` (a certs.Cert written to
    files). With `client_ca`, it requires a client certificate issued by it (CERT_REQUIRED) and
    refuses the handshake without one; handshakes it refused are listed in `server.refused`
    (OpenSSL's reason). `max_version`: an ssl.TLSVersion it will not go above."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert.cert_path), str(cert.key_path))
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(client_ca.cert_path))
    if max_version is not None:
        context.maximum_version = max_version
    server = TlsEchoServer(context)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8081
    EchoHandler.mask_secrets = "--mask-secrets" in sys.argv
    srv = ThreadingHTTPServer((os.environ.get("BIND", "127.0.0.1"), port), EchoHandler)
    print(f"demo function app listening on http://127.0.0.1:{port}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
