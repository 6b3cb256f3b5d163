# -*- test-case-name: tests.integration.test_demo -*-
"""
The demo's certificates: a private CA and a server certificate it issued for
C{localhost} / C{127.0.0.1} / C{::1}, kept in the demo's state directory
and reused while they are good. The CA's key is never written down: when
anything needs renewing, the CA and the certificate are made anew together,
so nobody can later mint certificates this demo CA vouches for.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Reissue the server certificate when it has less than this left.
RENEW_BEFORE = datetime.timedelta(days=7)
SERVER_LIFETIME = datetime.timedelta(days=90)
CA_LIFETIME = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class DemoCertificates:
    """Paths of the demo's PEM files."""

    ca_file: str
    cert_file: str
    key_file: str
    not_after: datetime.datetime
    created: bool


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    # Created with its final mode, so a key is never readable by others, not even briefly.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Caracal demo"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _usable(ca_file: str, cert_file: str, key_file: str, now: datetime.datetime):
    """The server certificate's end when all three files are good together, else None."""
    try:
        with open(ca_file, "rb") as f:
            ca = x509.load_pem_x509_certificate(f.read())
        with open(cert_file, "rb") as f:
            leaf = x509.load_pem_x509_certificates(f.read())[0]
        with open(key_file, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        leaf.verify_directly_issued_by(ca)
    except (OSError, ValueError, TypeError, Exception):  # noqa: BLE001 - any doubt: reissue
        return None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if leaf.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        return None
    if leaf.not_valid_after_utc - now < RENEW_BEFORE or ca.not_valid_after_utc <= now:
        return None
    return leaf.not_valid_after_utc


def ensure_certificates(directory: str, now: datetime.datetime | None = None) -> DemoCertificates:
    """
    C{ca.pem} (trust this), C{gateway.crt} and C{gateway.key} (the gateway
    serves these) in C{directory}: kept when still good, else made anew.
    """
    now = now or _now()
    ca_file = os.path.join(directory, "ca.pem")
    cert_file = os.path.join(directory, "gateway.crt")
    key_file = os.path.join(directory, "gateway.key")
    not_after = _usable(ca_file, cert_file, key_file, now)
    if not_after is not None:
        return DemoCertificates(ca_file, cert_file, key_file, not_after, created=False)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("Caracal demo CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + SERVER_LIFETIME)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    os.makedirs(directory, exist_ok=True)
    pem = serialization.Encoding.PEM
    _write(ca_file, ca.public_bytes(pem))
    _write(key_file, _key_pem(server_key), 0o600)
    _write(cert_file, server.public_bytes(pem))
    return DemoCertificates(ca_file, cert_file, key_file, server.not_valid_after_utc, created=True)
