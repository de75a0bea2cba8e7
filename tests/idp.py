"""A small real identity provider for tests and the demo: serves an OpenID discovery document
and a JWKS over HTTP on 127.0.0.1, counts fetches, and can fail on demand.

Run standalone: python3 tests/idp.py PORT JWKS_FILE
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class IdentityProvider:
    def __init__(self, jwks, port=0):
        self.jwks = jwks
        self.fail_status = None  # e.g. 500 to simulate an outage
        # Faults served one per request, in order, before answering normally again (see
        # `fault`); `served` counts the good answers and the faults served.
        self.script = []
        self.served = {"good": 0, "faults": 0}
        self.fetches = {"discovery": 0, "jwks": 0}
        self.lock = threading.Lock()
        idp = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                kind = "discovery" if self.path.endswith("/.well-known/openid-configuration") else "jwks"
                with idp.lock:
                    idp.fetches[kind] += 1
                    fail = idp.fail_status
                    jwks = idp.jwks
                    fault = idp.script.pop(0) if idp.script else None
                    idp.served["faults" if fault or fail else "good"] += 1
                if fault and self.serve_fault(fault):
                    return
                if fail:
                    body, status = b'{"error":"unavailable"}', fail
                elif kind == "discovery":
                    host = self.headers.get("host", f"127.0.0.1:{idp.port}")
                    body, status = json.dumps({
                        "issuer": idp.issuer,
                        "jwks_uri": f"http://{host}/discovery/v2.0/keys",
                    }).encode(), 200
                elif self.path.split("?")[0] in ("/keys", "/discovery/v2.0/keys"):
                    body, status = json.dumps(jwks).encode(), 200
                else:
                    body, status = b'{"error":"not found"}', 404
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the gateway gave up first (an answer later than its timeout)

            def serve_fault(self, fault):
                """True when the fault was the whole answer; a slow answer is late, then normal."""
                kind, arg = fault
                if kind == "slow":
                    time.sleep(arg)
                    return False
                if kind == "close":  # the connection ends without an answer
                    self.close_connection = True
                    return True
                status, body = (arg, b'{"error":"unavailable"}') if kind == "status" else (200, arg)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass  # the gateway hung up first (a body larger than it reads)
                return True

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.issuer = f"http://127.0.0.1:{self.port}/dev-tenant/v2.0"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()

    def set_jwks(self, jwks):
        with self.lock:
            self.jwks = jwks

    def fail(self, status=500):
        with self.lock:
            self.fail_status = status

    def recover(self):
        with self.lock:
            self.fail_status = None

    def fault(self, *faults):
        """Serve these, one per request in order, then answer normally: ("status", 503),
        ("body", bytes) as a 200, ("slow", seconds) before a normal answer, ("close", None) for a
        connection closed without an answer."""
        with self.lock:
            self.script = list(faults)

    def pending_faults(self):
        with self.lock:
            return len(self.script)

    def good_answers(self):
        with self.lock:
            return self.served["good"]

    def count(self, kind="jwks"):
        with self.lock:
            return self.fetches[kind]


if __name__ == "__main__":
    port = int(sys.argv[1])
    with open(sys.argv[2]) as f:
        keys = json.load(f)
    idp = IdentityProvider(keys, port)
    print(f"dev identity provider on http://127.0.0.1:{port} (issuer {idp.issuer})", flush=True)
    try:
        idp.server.serve_forever()
    except KeyboardInterrupt:
        pass


def start_all(keys):
    """One identity provider per named key ({name: jwtkit.Key}), each serving that key's JWKS."""
    import jwtkit
    return {name: IdentityProvider(jwtkit.jwks(key)).start() for name, key in keys.items()}


def stop_all(servers):
    for server in servers.values():
        server.stop()
