"""`make run`: the demo gateway on this machine.

On first use it generates git-ignored dev material in .dev/ (a function key, a JWT signing key
and its JWKS, a CA with a server and a client certificate), then starts a dev identity provider
(OpenID discovery + JWKS on 127.0.0.1:8082), the demo function app (127.0.0.1:8081) and Envoy
with gateguard: HTTP on 8080, TLS on 8443 (client certificate requested), admin on 9901. It
prints ready-to-paste curl lines and stops everything on Ctrl-C.

The demo policy is policies/demo.json (rendered as envoy.yaml). For 8443, run.py adds one API,
`partnerapi`, pinned to the thumbprint of the dev client certificate it generated, and renders
.dev/envoy.yaml with the TLS listener.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from certs import make_ca, make_leaf  # noqa: E402

DEV = ROOT / ".dev"
ENVOY = ROOT / ".venv" / "bin" / "envoy"
CLI = ROOT / "target" / "release" / "gateguard"
DEMO_KEY = "gateguard-demo-key"  # its SHA-256 is in policies/demo.json; a demo value, not a secret
ISSUER = "http://127.0.0.1:8082/dev-tenant/v2.0"
AUDIENCE = "api://processfactorial"


def cli(*args):
    return subprocess.run([str(CLI), *map(str, args)], check=True, capture_output=True, text=True).stdout


def dev_material():
    DEV.mkdir(exist_ok=True)
    key_file = DEV / "function-key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(24))
        key_file.chmod(0o600)
    signing = DEV / "jwt-signing.pem"
    if not signing.exists():
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        signing.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
        signing.chmod(0o600)
    (DEV / "jwks.json").write_text(cli("jwks", "--key", signing, "--kid", "dev-1"))
    if not (DEV / "client.crt").exists():
        ca = make_ca("gateguard dev CA").write(DEV, "ca")
        make_leaf(ca, "localhost", server=True).write(DEV, "server")
        make_leaf(ca, "apim-client").write(DEV, "client")
    thumb = json.loads(cli("thumbprint", DEV / "client.crt", "--json"))[0]
    policy = json.loads((ROOT / "policies" / "demo.json").read_text())
    policy["apis"].append({
        "name": "partnerapi",
        "path_prefix": "/partner",
        "client_certificate": {"thumbprints": [thumb["sha256"]], "sources": ["connection"], "check_validity": True},
        "inject_headers": {"x-functions-key": {"env": "CONFIG_APP_KEY"}},
    })
    (DEV / "demo-policy.json").write_text(json.dumps(policy, indent=2) + "\n")
    cli("render", "--policy", DEV / "demo-policy.json", "--out", DEV / "envoy.yaml",
        "--tls-cert", DEV / "server.crt", "--tls-key", DEV / "server.key")
    return key_file.read_text().strip()


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
    function_key = dev_material()
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

    py = sys.executable
    procs.append(subprocess.Popen([py, str(ROOT / "tests" / "idp.py"), "8082", str(DEV / "jwks.json")], cwd=ROOT))
    procs.append(subprocess.Popen([py, str(ROOT / "tests" / "upstream.py"), "8081", "--mask-secrets"], cwd=ROOT))
    log = open(DEV / "envoy.log", "wb")
    envoy = subprocess.Popen(
        [str(ENVOY), "-c", str(DEV / "envoy.yaml"), "--concurrency", "2", "-l", "info", "--disable-hot-restart"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    procs.append(envoy)
    if not wait_ready(envoy, "http://127.0.0.1:9901/ready"):
        print("Envoy did not start; its log (.dev/envoy.log) ends with:\n", file=sys.stderr)
        print((DEV / "envoy.log").read_text(errors="replace")[-4000:], file=sys.stderr)
        stop()
    token = cli("token", "--key", DEV / "jwt-signing.pem", "--kid", "dev-1", "--iss", ISSUER, "--aud", AUDIENCE,
                "--sub", "dev-user", "--claim", 'roles=["Forms.Submit"]', "--ttl", "3600").strip()
    once = cli("token", "--key", DEV / "jwt-signing.pem", "--kid", "dev-1", "--iss", ISSUER, "--aud", AUDIENCE,
               "--sub", "dev-user", "--claim", "jti=demo-once", "--ttl", "3600").strip()

    print(
        f"""
gateguard is running (Envoy log: .dev/envoy.log, policy: .dev/demo-policy.json)
  gateway  http://127.0.0.1:8080  https://127.0.0.1:8443   admin http://127.0.0.1:9901
  function app http://127.0.0.1:8081   dev identity provider {ISSUER}

A dev token (1 hour, roles Forms.Submit) is in $TOKEN:
  export TOKEN='{token}'

  # 200: key, token and client IP all fine (the function app echoes what it received)
  curl -i http://127.0.0.1:8080/api/forms -H 'Ocp-Apim-Subscription-Key: {DEMO_KEY}' -H "Authorization: Bearer $TOKEN"
  # 401 Token replay detected: the same token from another client IP (with_ip)
  curl -i --interface 127.0.0.2 http://127.0.0.1:8080/api/forms -H 'Ocp-Apim-Subscription-Key: {DEMO_KEY}' -H "Authorization: Bearer $TOKEN"
  # 401: missing subscription key; 401 Missing or malformed Authorization header
  curl -i http://127.0.0.1:8080/api/forms
  curl -i http://127.0.0.1:8080/api/forms -H 'Ocp-Apim-Subscription-Key: {DEMO_KEY}'
  # without_ip: the first call is 200, the second 401 Token replay detected
  curl -i http://127.0.0.1:8080/demapi/submit -H 'Authorization: Bearer {once}'
  # 204: CORS preflight answered by the gateway
  curl -i -X OPTIONS http://127.0.0.1:8080/api/forms -H 'Origin: http://localhost:3000' -H 'Access-Control-Request-Method: POST'
  # mTLS: 200 with the dev client certificate, 403 Invalid client certificate without it
  curl -i --cacert .dev/ca.crt --cert .dev/client.crt --key .dev/client.key https://127.0.0.1:8443/partner/orders
  curl -i --cacert .dev/ca.crt https://127.0.0.1:8443/partner/orders
  # counters per API and outcome
  curl -s http://127.0.0.1:9901/stats | grep gateguard

Mint more tokens: target/release/gateguard token --key .dev/jwt-signing.pem --kid dev-1 --iss {ISSUER} --aud {AUDIENCE}
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
