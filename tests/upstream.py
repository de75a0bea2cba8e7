"""A small real HTTP upstream that echoes the request it got as JSON (the demo "function app").

Tests read the echoed headers to see what the gateway injected, stripped or rewrote.
Run standalone: python3 tests/upstream.py PORT
"""

import hashlib
import os
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


SECRET_HEADERS = {"x-functions-key"}


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The demo masks secrets it was given (it proves they arrived without showing them to the
    # caller); tests see them in full.
    mask_secrets = False

    def _echo(self):
        if "sleep=" in self.path:  # a slow function: ?sleep=SECONDS (at most 5)
            try:
                time.sleep(min(float(self.path.split("sleep=")[1].split("&")[0]), 5.0))
            except ValueError:
                pass
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {}
        for name, value in self.headers.items():
            if self.mask_secrets and name.lower() in SECRET_HEADERS:
                value = "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:12] + "..."
            headers.setdefault(name.lower(), []).append(value)
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


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8081
    EchoHandler.mask_secrets = "--mask-secrets" in sys.argv
    srv = ThreadingHTTPServer((os.environ.get("BIND", "127.0.0.1"), port), EchoHandler)
    print(f"demo function app listening on http://127.0.0.1:{port}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
