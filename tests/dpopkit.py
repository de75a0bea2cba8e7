"""DPoP (RFC 9449) for the end-to-end tests: a client's proof-of-possession key, its RFC 7638
thumbprint (what an identity provider puts in the token's `cnf.jkt`), the `ath` of a token, and
proofs: valid ones, and ones broken in exactly one property, which no DPoP library would mint.
Keys are jwtkit's (`cryptography`), so a proof can be signed with ES256, RS256, PS256 or EdDSA."""

import base64
import hashlib
import hmac
import json
import time
import uuid

from cryptography.hazmat.primitives.asymmetric import ec

from jwtkit import Key, b64, b64json

# Leave a member out of a proof's header or claims: `proof(..., claims={"jti": OMIT})`.
OMIT = object()

DEFAULT_ALG = {"rsa": "RS256", "ec": "ES256", "ed": "EdDSA"}

# RFC 7638 §3.2: the members a thumbprint hashes, per key type.
THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}


def public_jwk(key):
    """The public JWK a client puts in its proofs' `jwk` header: only the key's own members
    (no `kid`, no `use`)."""
    jwk = key.jwk()
    return {m: jwk[m] for m in THUMBPRINT_MEMBERS[jwk["kty"]]}


def thumbprint(jwk):
    """RFC 7638: base64url SHA-256 of the required members, in lexicographic order, without
    whitespace. `jwk` is a dict (extra members are ignored) or a jwtkit.Key."""
    if isinstance(jwk, Key):
        jwk = jwk.jwk()
    members = THUMBPRINT_MEMBERS[jwk["kty"]]
    canonical = json.dumps({m: jwk[m] for m in sorted(members)}, separators=(",", ":"), sort_keys=True)
    return b64(hashlib.sha256(canonical.encode()).digest())


def ath(token):
    """RFC 9449 §4.2: base64url SHA-256 of the access token's ASCII text."""
    return b64(hashlib.sha256(token.encode("ascii")).digest())


def private_jwk(key):
    """The client's key with its private members: a proof that leaks it must be refused."""
    jwk = public_jwk(key)
    if key.kind == "ec":
        jwk["d"] = b64(key.private.private_numbers().private_value.to_bytes(32, "big"))
    elif key.kind == "rsa":
        d = key.private.private_numbers().d
        jwk["d"] = b64(d.to_bytes((d.bit_length() + 7) // 8, "big"))
    else:
        raise ValueError(key.kind)
    return jwk


def _merge(base, changes):
    out = dict(base)
    for name, value in (changes or {}).items():
        if value is OMIT:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def proof(key, method, htu, token, alg=None, iat=None, jti=None, header=None, claims=None, signer=None):
    """A DPoP proof signed by `key` for `method` `htu` naming `token` (its `ath`), fresh
    (`iat` now, a random `jti`) unless told otherwise. `header` and `claims` change or, with
    OMIT, remove members; `signer` signs in place of `key` (whose `jwk` the header still
    names)."""
    alg = alg or DEFAULT_ALG[key.kind]
    h = _merge({"typ": "dpop+jwt", "alg": alg, "jwk": public_jwk(key)}, header)
    c = _merge({"jti": jti or str(uuid.uuid4()), "htm": method, "htu": htu,
                "iat": int(time.time()) if iat is None else iat, "ath": ath(token)}, claims)
    signing_input = f"{b64json(h)}.{b64json(c)}"
    return f"{signing_input}.{b64((signer or key).sign(signing_input.encode(), alg))}"


def unsigned_proof(key, method, htu, token, alg="none", header=None, claims=None, signature=""):
    """A proof with `alg` (default `none`) and the given signature text (default empty)."""
    h = _merge({"typ": "dpop+jwt", "alg": alg, "jwk": public_jwk(key)}, header)
    c = _merge({"jti": str(uuid.uuid4()), "htm": method, "htu": htu, "iat": int(time.time()),
                "ath": ath(token)}, claims)
    return f"{b64json(h)}.{b64json(c)}.{signature}"


def hs256_proof(key, method, htu, token, secret):
    """An HMAC proof naming `key`'s public jwk, keyed with `secret` (say, the public key's own
    bytes: the classic algorithm confusion)."""
    h = {"typ": "dpop+jwt", "alg": "HS256", "jwk": public_jwk(key)}
    c = {"jti": str(uuid.uuid4()), "htm": method, "htu": htu, "iat": int(time.time()), "ath": ath(token)}
    signing_input = f"{b64json(h)}.{b64json(c)}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def flip_signature_byte(jws, index=10):
    """`jws` with one byte of its signature changed (re-encoded, so the text stays canonical
    base64url)."""
    head, _, sig = jws.rpartition(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    raw[index] ^= 0x01
    return f"{head}.{b64(bytes(raw))}"


def ec_public_bytes(key):
    """The uncompressed point of an EC key (what an HMAC-confusion attacker would use as the
    secret)."""
    from cryptography.hazmat.primitives import serialization
    assert isinstance(key.private, ec.EllipticCurvePrivateKey)
    return key.private.public_key().public_bytes(serialization.Encoding.X962,
                                                 serialization.PublicFormat.UncompressedPoint)
