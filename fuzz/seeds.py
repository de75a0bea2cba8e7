"""Writes the small seed corpora (fuzz/corpus/<target>/seed-*) from the repo's fixtures and
hand-made valid inputs: `python3 fuzz/seeds.py` (needs `cryptography`, as the e2e tests do).
The fuzz support library (src/lib.rs) names the same clock, issuer and key."""

import base64
import hashlib
import json
import pathlib
import struct
import urllib.parse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
import datetime

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent
NOW = 1_800_000_000
ISS = "https://login.example.com/tenant/v2.0"
# RFC 8037 A.1/A.2: the fuzz policy's Ed25519 key.
ED_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
ED_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"


def b64(data):
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def write(target, name, data):
    d = HERE / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / f"seed-{name}").write_bytes(data)


ED = ed25519.Ed25519PrivateKey.from_private_bytes(unb64(ED_D))
assert b64(ED.public_key().public_bytes_raw()) == ED_X


def token(claims, header=None):
    h = header or {"alg": "EdDSA", "typ": "JWT", "kid": "k1"}
    signing = f"{b64(json.dumps(h))}.{b64(json.dumps(claims))}"
    return f"{signing}.{b64(ED.sign(signing.encode()))}"


CLAIMS = {"iss": ISS, "aud": "api://a", "sub": "u1", "exp": NOW + 600, "roles": ["Forms.Submit"]}
TOKEN = token(CLAIMS)

# policy: the shipped policies.
for name in ["demo.json", "entra-example.json", "quickstart.json"]:
    write("policy", name.removesuffix(".json"), (ROOT / "policies" / name).read_bytes())

# jwt: Authorization values and tokens.
write("jwt", "bearer", f"Bearer {TOKEN}")
write("jwt", "token", TOKEN)
write("jwt", "two-values", f"Basic dXNlcjpwdw==\nBearer {TOKEN}")
write("jwt", "alg-none", token(CLAIMS, {"alg": "none"}).rsplit(".", 1)[0] + ".")

# jwks: key sets and a discovery document.
EC = ec.generate_private_key(ec.SECP256R1())
nums = EC.public_key().public_numbers()
EC_JWK = {"kty": "EC", "crv": "P-256", "x": b64(nums.x.to_bytes(32, "big")), "y": b64(nums.y.to_bytes(32, "big"))}
write("jwks", "okp", json.dumps({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k1", "x": ED_X}]}))
write("jwks", "ec", json.dumps({"keys": [dict(EC_JWK, kid="e1", alg="ES256", use="sig")]}))
write("jwks", "rsa", json.dumps({"keys": [{"kty": "RSA", "kid": "r1", "n": b64(b"\xc1" * 256), "e": "AQAB"}]}))
write("jwks", "discovery", json.dumps({"issuer": ISS, "jwks_uri": "https://idp.example/keys"}))

# dpop: a proof for POST https://api.example.com/a/orders and token "a.b.c", then its key's
# thumbprint on the second line.
def jkt(jwk):
    members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    return b64(hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest())


def es256(signing):
    r, s = decode_dss_signature(EC.sign(signing.encode(), ec.ECDSA(hashes.SHA256())))
    return b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


proof_h = {"typ": "dpop+jwt", "alg": "ES256", "jwk": EC_JWK}
proof_c = {"htm": "POST", "htu": "https://api.example.com/a/orders", "iat": NOW, "jti": "j1",
           "ath": b64(hashlib.sha256(b"a.b.c").digest())}
signing = f"{b64(json.dumps(proof_h))}.{b64(json.dumps(proof_c))}"
PROOF = f"{signing}.{es256(signing)}"
write("dpop", "proof", f"{PROOF}\n{jkt(EC_JWK)}")
write("dpop", "jwk", json.dumps(EC_JWK))

# cert: selector byte (0 peer certificate, 1 XFCC, 2 X-ARR-ClientCert, 3 certificate file).
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz-client")])
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(datetime.datetime(2026, 1, 1))
        .not_valid_after(datetime.datetime(2028, 1, 1)).sign(key, hashes.SHA256()))
der = cert.public_bytes(serialization.Encoding.DER)
pem = cert.public_bytes(serialization.Encoding.PEM)
url_pem = urllib.parse.quote(pem.decode(), safe="")
write("cert", "peer-pem", b"\x00" + pem)
write("cert", "peer-url-pem", b"\x00" + url_pem.encode())
write("cert", "peer-der", b"\x00" + der)
xfcc = f'By=spiffe://cluster.local/gw;Hash={hashlib.sha256(der).hexdigest()};Cert="{url_pem}";Subject="CN=fuzz-client";URI='
write("cert", "xfcc", b"\x01" + f"By=spiffe://a;Hash={'0' * 64},{xfcc}".encode())
write("cert", "xfcc-hash-only", b"\x01" + f"Hash={hashlib.sha256(der).hexdigest()}".encode())
write("cert", "arr", b"\x02" + base64.b64encode(der))
write("cert", "file-pem", b"\x03" + b"-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n" + pem)

# path: the examples of docs/policy.md, "Path matching".
for i, p in enumerate(["/odata/%24metadata", "/%61pi/x", "/api/admin;v=1/users", "/api;x/admin",
                       "/api/admin%3Bx", "//api///x", "/api/%2e%2e/admin", "/api/100%25",
                       "/api/%252e%252e/admin", "/api/%C0%AE%C0%AE/admin", "/api/x?q=1#f"]):
    write("path", f"{i:02}", p)

# header_patterns: the pattern, then `name:value` lines.
write("header_patterns", "uuid", "[0-9a-fA-F-]{36}\nx-h:0f8fad5b-d9cb-469f-a165-70867728950e")
write("header_patterns", "literal", "abc\nx-h:abc\nX_H:abc")
write("header_patterns", "escape", "a)|(?:.*\nx-h:zzz")


# etcd: flags, 8 digest bytes, then (status u8, message length u8, body length u16, message, body)*.
def varint(n):
    n &= (1 << 64) - 1
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(tag, wire, payload):
    key = varint(tag << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    return key + varint(len(payload)) + payload


def reply(status, body, message=b""):
    return bytes([status, len(message)]) + struct.pack(">H", len(body)) + message + body


flags = 4  # with_ip, an IP, no credentials
digest = bytes(range(1, 9))
exp = NOW + flags * 7
window_end = -(-exp // 10) * 10
prefix = b"gateguard/"
h = hashlib.sha256(b"gateguard/etcd-lease/v1\0" + prefix + b"\0" + window_end.to_bytes(8, "big")).digest()
lease = max(int.from_bytes(h[:8], "big") & ((1 << 63) - 1), 1)
grant = field(2, 0, lease) + field(3, 0, 120)
key = prefix + (digest + bytes(24)).hex().encode()
kv = field(1, 2, key) + field(5, 2, b"ip:10.1.2.3")
range_resp = field(2, 2, kv)
txn_failed = field(3, 2, field(1, 2, range_resp))
head = bytes([flags]) + digest
write("etcd", "first-use", head + reply(0, grant) + reply(0, field(2, 0, 1)))
write("etcd", "same-owner", head + reply(0, grant) + reply(0, txn_failed))
write("etcd", "lease-exists", head + reply(9, b"", b"lease already exists") + reply(0, field(1, 0, lease) + field(2, 0, 500)) + reply(0, field(2, 0, 1)))
write("etcd", "auth", bytes([0]) + digest + reply(0, field(2, 2, b"tok")) + reply(16, b"") + reply(0, field(2, 2, b"tok2")) + reply(0, grant))


# replay_record: a live bucket with two entries, a sealed one, a pointer.
def entry(d, expiry, owner=None, confirmed=False):
    flags_ = (1 if owner else 0) | (2 if confirmed else 0)
    return d + struct.pack(">Q", expiry) + bytes([flags_]) + (owner or bytes(16))


live = b"GR\x02\x29" + entry(bytes(range(16)), NOW + 60) + entry(bytes(16), NOW, bytes(10) + b"\xff\xff\x0a\x01\x02\x03", True)
write("replay_record", "live", live)
write("replay_record", "sealed", b"GS\x02" + struct.pack(">II", 2, 64))
write("replay_record", "pointer", b"GP\x02" + struct.pack(">II", 1, 16) + b"\x01" + struct.pack(">II", 2, 64))

# rate_limit: 16-byte id, calls, period u16, now offset, then the stored bucket.
ident = bytes(range(16))
bucket = b"\x02" + ident + struct.pack(">QQI", NOW - 5, NOW + 55, 1) + bytes(16) + struct.pack(">QQI", NOW - 100, NOW - 1, 9)
write("rate_limit", "bucket", ident + bytes([4]) + struct.pack(">H", 60) + b"\x03" + bucket)
write("rate_limit", "empty", ident + bytes([0]) + struct.pack(">H", 1) + b"\x00")

# client_ip: hops byte, the peer, then X-Forwarded-For values.
write("client_ip", "two-hops", b"\x01" + b"10.0.0.1:443\n203.0.113.9, 10.0.0.2\n10.0.0.3")
write("client_ip", "ports", b"\x00" + b"[::1]:8443\n[2001:db8::1]:51000, 192.0.2.7:443")

# pipeline: the request format of src/lib.rs.
write("pipeline", "a-get", f"GET /a/x\n10.1.2.3:5555\nauthorization: Bearer {TOKEN}\nocp-apim-subscription-key: k\norigin: https://portal.example.com\nx-correlation-id: 0f8fad5b")
write("pipeline", "a-preflight", "OPTIONS /a/x\n10.1.2.3:5555\norigin: https://x.contoso.com\naccess-control-request-method: POST")
write("pipeline", "a-dpop", f"POST /a/orders\n10.1.2.3:5555\n:scheme: https\n:authority: api.example.com\nauthorization: DPoP {TOKEN}\ndpop: {PROOF}\nocp-apim-subscription-key: k")
write("pipeline", "b-xfcc", f"GET /b/x?subscription-key=k\n10.0.0.1:443\nx-forwarded-for: 10.9.9.9\nx-forwarded-client-cert: {xfcc}")
write("pipeline", "b-peer-cert", "GET /b/x\n10.1.2.3:1\nocp-apim-subscription-key: k\n--\n" + pem.decode())
write("pipeline", "c-token", f"GET /anything\n192.0.2.1:1\nauthorization: Bearer {token(dict(CLAIMS, aud='api://c'))}")
