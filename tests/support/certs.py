"""
Certificates made on the fly for tests: a root CA, an intermediate and a leaf
for C{localhost} / C{127.0.0.1}, written as PEM files into a test's temporary
directory. Nothing here is ever committed.
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
from OpenSSL import SSL


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Authority:
    """A CA that can sign certificates."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return _pem_cert(self.cert)


@dataclass
class Leaf:
    """A server certificate, its key and the chain above it (without the root)."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    intermediates: list[x509.Certificate]

    @property
    def chain_pem(self) -> bytes:
        """Leaf first, then intermediates: what TLS_CERT_FILE holds."""
        return b"".join(_pem_cert(c) for c in [self.cert, *self.intermediates])

    @property
    def key_pem(self) -> bytes:
        return _pem_key(self.key)

    def write(self, directory: str, stem: str = "server") -> tuple[str, str]:
        """Write C{<stem>.crt} (chain) and C{<stem>.key}; return their paths."""
        cert_path = os.path.join(directory, f"{stem}.crt")
        key_path = os.path.join(directory, f"{stem}.key")
        with open(cert_path, "wb") as f:
            f.write(self.chain_pem)
        with open(key_path, "wb") as f:
            f.write(self.key_pem)
        os.chmod(key_path, 0o600)
        return cert_path, key_path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def make_authority(common_name: str = "Caracal Test Root", issuer: Authority | None = None):
    """A self-signed root, or an intermediate signed by C{issuer}."""
    key = ec.generate_private_key(ec.SECP256R1())
    signer_key = issuer.key if issuer else key
    issuer_name = issuer.cert.subject if issuer else _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(days=1))
        .not_valid_after(_now() + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
        .sign(signer_key, hashes.SHA256())
    )
    return Authority(key=key, cert=cert)


def make_leaf(
    authority: Authority,
    hostnames: tuple[str, ...] = ("localhost",),
    addresses: tuple[str, ...] = ("127.0.0.1", "::1"),
    intermediates: tuple[Authority, ...] = (),
    not_after: datetime.datetime | None = None,
    common_name: str | None = None,
) -> Leaf:
    """A server certificate signed by C{authority} (the last intermediate, if any)."""
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names = [x509.DNSName(h) for h in hostnames]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    not_after = not_after or _now() + datetime.timedelta(days=90)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name or (hostnames[0] if hostnames else "server")))
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(_now() - datetime.timedelta(days=1), not_after))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(authority.key, hashes.SHA256())
    )
    chain = [a.cert for a in reversed(intermediates)]
    return Leaf(key=key, cert=cert, intermediates=chain)


def make_chain(directory: str, stem: str = "server", **leaf_options) -> tuple[Authority, Leaf]:
    """
    A root, one intermediate and a leaf signed by the intermediate, written to
    C{directory}. Returns the root (to trust) and the leaf (with its chain).
    """
    root = make_authority()
    intermediate = make_authority("Caracal Test Intermediate", issuer=root)
    leaf = make_leaf(intermediate, intermediates=(intermediate,), **leaf_options)
    leaf.write(directory, stem)
    with open(os.path.join(directory, f"{stem}-ca.pem"), "wb") as f:
        f.write(root.pem)
    return root, leaf


def client_context(
    version: int | None = None, seclevel0: bool = False, ca_file: str | None = None
) -> SSL.Context:
    """
    A pyOpenSSL client context for handshake tests: pinned to C{version}
    when given, verifying the server against C{ca_file} when given.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    if version is not None:
        context.set_min_proto_version(version)
        context.set_max_proto_version(version)
    if seclevel0:
        # Lets this client even try TLS 1.0/1.1 (OpenSSL 3 refuses them above level 0).
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    if ca_file is not None:
        context.load_verify_locations(ca_file)
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, None)
    return context
