"""`make run`: the demo gateway on this machine.

Generates git-ignored dev material in .dev/ on first use, starts the demo function app, renders
nothing (envoy.yaml is the rendered demo policy), starts Envoy, prints how to call it, and
stops everything on Ctrl-C.
"""

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEV = ROOT / ".dev"
VENV = ROOT / ".venv"
ENVOY = VENV / "bin" / "envoy"
CLI = ROOT / "target" / "release" / "gateguard"
DEMO_KEY = "gateguard-demo-key"  # its SHA-256 is in policies/demo.json; a demo value, not a secret


def dev_secret(name, make):
    path = DEV / name
    if not path.exists():
        DEV.mkdir(exist_ok=True)
        path.write_text(make())
        path.chmod(0o600)
    return path.read_text().strip()


def wait_ready(proc, url, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.2)
    return False


def main():
    function_key = dev_secret("function-key", lambda: secrets.token_urlsafe(24))
    env = dict(os.environ, CONFIG_APP_KEY=function_key)
    procs = []

    def stop(*_):
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "upstream.py"), "8081", "--mask-secrets"], cwd=ROOT))
    log = open(DEV / "envoy.log", "wb")
    envoy = subprocess.Popen(
        [str(ENVOY), "-c", "envoy.yaml", "--concurrency", "2", "-l", "info", "--disable-hot-restart"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    procs.append(envoy)
    if not wait_ready(envoy, "http://127.0.0.1:9901/ready"):
        print("Envoy did not start; its log (.dev/envoy.log) ends with:\n", file=sys.stderr)
        print((DEV / "envoy.log").read_text(errors="replace")[-4000:], file=sys.stderr)
        stop()

    print(
        f"""
gateguard is running (Envoy log: .dev/envoy.log)
  gateway  http://127.0.0.1:8080   admin http://127.0.0.1:9901   function app http://127.0.0.1:8081

Try it:
  curl -i http://127.0.0.1:8080/api/forms -H 'Ocp-Apim-Subscription-Key: {DEMO_KEY}'
  curl -i http://127.0.0.1:8080/api/forms                          # 401: missing subscription key
  curl -i -X OPTIONS http://127.0.0.1:8080/api/forms -H 'Origin: http://localhost:3000' \\
       -H 'Access-Control-Request-Method: POST'                      # 204: CORS preflight
  curl -s http://127.0.0.1:9901/stats | grep gateguard               # counters per API and outcome

Ctrl-C stops everything.""",
        flush=True,
    )
    while True:
        for p in procs:
            if p.poll() is not None:
                print(f"{p.args[0]} exited with {p.returncode}; stopping", file=sys.stderr)
                stop()
        time.sleep(1)


if __name__ == "__main__":
    main()
