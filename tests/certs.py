"""Certificates generated at test time (and by `make run` for the demo): a CA, a server
certificate for 127.0.0.1/localhost, and client certificates with chosen validity."""

import datetime
import hashlib
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


class Cert:
    def __init__(self, cert, key, cert_path=None, key_path=None):
        self.cert = cert
        self.key = key
        self.cert_path = cert_path
        self.key_path = key_path

    @property
    def der(self):
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self):
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def sha256(self):
        return hashlib.sha256(self.der).hexdigest()

    @property
    def sha1(self):
        return hashlib.sha1(self.der).hexdigest()

    def write(self, directory, name):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.cert_path = directory / f"{name}.crt"
        self.key_path = directory / f"{name}.key"
        self.cert_path.write_text(self.pem)
        self.key_path.write_bytes(self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        self.key_path.chmod(0o600)
        return self


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn="gateguard test CA"):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(_name(cn))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY).not_valid_after(NOW + 3650 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Cert(cert, key)


def make_leaf(ca, cn, not_before=None, not_after=None, server=False, dns_names=None):
    """A certificate signed by `ca`: for a client, or with `server` for a server named localhost
    and 127.0.0.1, or only `dns_names` when given (wildcards allowed: "*.app.test")."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(ca.cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY).not_valid_after(not_after or NOW + 365 * DAY)
    )
    if server:
        names = ([x509.DNSName(n) for n in dns_names] if dns_names else
                 [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        builder = builder.add_extension(
            x509.SubjectAlternativeName(names),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return Cert(builder.sign(ca.key, hashes.SHA256()), key)
