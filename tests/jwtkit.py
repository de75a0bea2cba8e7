"""Keys, JWKS and tokens for the end-to-end tests, built with `cryptography` so tests can also
forge what no library would sign (alg none, r=s=0, swapped payloads)."""

import base64
import hashlib
import json
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64(data):
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj):
    return b64(json.dumps(obj, separators=(",", ":")))


def _int_bytes(n):
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


class Key:
    def __init__(self, kind, kid):
        self.kind, self.kid = kind, kid
        if kind == "rsa":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif kind == "ec":
            self.private = ec.generate_private_key(ec.SECP256R1())
        elif kind == "ed":
            self.private = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(kind)

    @classmethod
    def from_private_pem(cls, kind, kid, pem):
        """The key `private_pem` wrote (e.g. in another process: keys do not pickle)."""
        key = cls.__new__(cls)
        key.kind, key.kid = kind, kid
        key.private = serialization.load_pem_private_key(pem, password=None)
        return key

    def jwk(self):
        pub = self.private.public_key()
        if self.kind == "rsa":
            nums = pub.public_numbers()
            return {"kty": "RSA", "kid": self.kid, "use": "sig", "n": b64(_int_bytes(nums.n)), "e": b64(_int_bytes(nums.e))}
        if self.kind == "ec":
            nums = pub.public_numbers()
            return {"kty": "EC", "crv": "P-256", "kid": self.kid, "use": "sig",
                    "x": b64(nums.x.to_bytes(32, "big")), "y": b64(nums.y.to_bytes(32, "big"))}
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "kid": self.kid, "use": "sig", "x": b64(raw)}

    def public_pem(self):
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def private_pem(self):
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    def sign(self, data, alg):
        if alg == "RS256":
            return self.private.sign(data, padding.PKCS1v15(), hashes.SHA256())
        if alg == "PS256":
            return self.private.sign(data, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
        if alg == "ES256":
            r, s = decode_dss_signature(self.private.sign(data, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        if alg == "EdDSA":
            return self.private.sign(data)
        raise ValueError(alg)


def x5t_s256(cert_der):
    """RFC 8705's `cnf["x5t#S256"]` for a certificate: base64url (no padding) of the SHA-256 of
    its DER, what an identity provider puts in a certificate-bound token."""
    return b64(hashlib.sha256(cert_der).digest())


def jwks(*keys):
    return {"keys": [k.jwk() for k in keys]}


def claims(issuer, audience, ttl=600, **extra):
    now = int(time.time())
    c = {"iss": issuer, "aud": audience, "sub": "user-1", "iat": now - 5, "nbf": now - 5, "exp": now + ttl}
    c.update(extra)
    return c


def token(key, claims_, alg=None, header=None):
    alg = alg or {"rsa": "RS256", "ec": "ES256", "ed": "EdDSA"}[key.kind]
    h = {"alg": alg, "typ": "JWT", "kid": key.kid}
    if header:
        h.update(header)
    h = {k: v for k, v in h.items() if v is not None}
    signing_input = f"{b64json(h)}.{b64json(claims_)}"
    return f"{signing_input}.{b64(key.sign(signing_input.encode(), alg))}"


def unsigned(header, claims_, signature=""):
    return f"{b64json(header)}.{b64json(claims_)}.{signature}"


def hs256(secret, header, claims_):
    import hmac
    import hashlib
    signing_input = f"{b64json(header)}.{b64json(claims_)}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def replay_api(name, mode, key, issuer, audience):
    """An API at /`name` that takes EdDSA tokens from `key` (inline JWKS) with replay `mode`."""
    return {"name": name, "path_prefix": f"/{name}", "replay": {"mode": mode},
            "jwt": {"issuers": [issuer], "audiences": [audience], "algorithms": ["EdDSA"],
                    "jwks": {"inline": jwks(key)}}}
