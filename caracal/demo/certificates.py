# -*- test-case-name: tests.integration.test_demo -*-
"""
Certificates for the demo, and the builder behind them.

L{new_authority} and L{new_leaf} make CAs and server certificates with
C{cryptography}; the test suite builds its certificates with them too
(C{tests.support.certs}).

L{ensure_certificates} keeps the demo's in its state directory: a private
CA and a server certificate it issued for C{localhost} / C{127.0.0.1} /
C{::1}, reused while they are good. The CA's key is never written down:
when anything needs renewing, the CA and the certificate are made anew
together, so nobody can later mint certificates this demo CA vouches for.
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
#: The organization named in the demo's certificates.
ORGANIZATION = "Caracal demo"
#: Certificates start this long before they are made: a peer whose clock
#: is a little behind still accepts them.
BACKDATE = datetime.timedelta(minutes=5)


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


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization is not None:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Authority:
    """A CA (root or intermediate): its key and certificate, to issue with."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        """The CA's certificate in PEM: what a peer trusts."""
        return _cert_pem(self.cert)


@dataclass(frozen=True)
class Leaf:
    """A server certificate, its key and the intermediates above it (not the root)."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    intermediates: tuple[x509.Certificate, ...] = ()

    @property
    def chain_pem(self) -> bytes:
        """The certificate, then its intermediates: what C{TLS_CERT_FILE} holds."""
        return b"".join(_cert_pem(cert) for cert in (self.cert, *self.intermediates))

    @property
    def key_pem(self) -> bytes:
        """The private key in unencrypted PKCS#8 PEM."""
        return _key_pem(self.key)

    def write(self, directory: str, stem: str = "server") -> tuple[str, str]:
        """
        Write C{<stem>.crt} (the chain) and C{<stem>.key} (mode 0600 from
        its creation) in C{directory}.

        @return: their paths.
        """
        cert_path = os.path.join(directory, f"{stem}.crt")
        key_path = os.path.join(directory, f"{stem}.key")
        _write(key_path, self.key_pem, 0o600)
        _write(cert_path, self.chain_pem)
        return cert_path, key_path


def new_authority(
    common_name: str,
    issuer: Authority | None = None,
    organization: str | None = None,
    path_length: int | None = None,
    now: datetime.datetime | None = None,
) -> Authority:
    """
    A CA with a new P-256 key, valid for L{CA_LIFETIME}: self-signed (a
    root), or an intermediate issued by C{issuer}.

    @param path_length: how many intermediates may follow it (C{None}: any).
    """
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(common_name, organization)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), False
        )
    return Authority(key=key, cert=builder.sign(issuer.key if issuer else key, hashes.SHA256()))


def new_leaf(
    authority: Authority,
    hostnames: tuple[str, ...] = ("localhost",),
    addresses: tuple[str, ...] = ("127.0.0.1", "::1"),
    intermediates: tuple[Authority, ...] = (),
    not_after: datetime.datetime | None = None,
    common_name: str | None = None,
    organization: str | None = None,
    now: datetime.datetime | None = None,
) -> Leaf:
    """
    A server certificate with a new P-256 key for C{hostnames} and
    C{addresses}, issued by C{authority}, valid for L{SERVER_LIFETIME}
    unless C{not_after} says otherwise (an end in the past makes an expired
    certificate).

    @param intermediates: the CAs between the root and the leaf, the root's
        child first (C{authority} is the last); the leaf's chain lists them
        the other way round.
    @param common_name: the subject's CN (default: the first hostname).
    """
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = not_after or now + SERVER_LIFETIME
    alt_names = [x509.DNSName(name) for name in hostnames]
    alt_names += [x509.IPAddress(ipaddress.ip_address(address)) for address in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name or (hostnames[0] if hostnames else "server"), organization))
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(now - BACKDATE, not_after))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()), False
        )
        .sign(authority.key, hashes.SHA256())
    )
    return Leaf(key=key, cert=cert, intermediates=tuple(a.cert for a in reversed(intermediates)))


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

    # A CA for this one server: it can issue no intermediate.
    ca = new_authority("Caracal demo CA", organization=ORGANIZATION, path_length=0, now=now)
    server = new_leaf(ca, organization=ORGANIZATION, now=now)
    os.makedirs(directory, exist_ok=True)
    _write(ca_file, ca.pem)
    server.write(directory, "gateway")
    return DemoCertificates(
        ca_file, cert_file, key_file, server.cert.not_valid_after_utc, created=True
    )
