"""
Certificates made on the fly for tests: a root CA, an intermediate and a leaf
for C{localhost} / C{127.0.0.1}, written as PEM files into a test's temporary
directory. Nothing here is ever committed. They are built by the package's
own builder (L{caracal.demo.certificates}), under test names.
"""

from __future__ import annotations

import os

from OpenSSL import SSL

from caracal.demo.certificates import Authority, Leaf, new_authority, new_leaf

__all__ = ["Authority", "Leaf", "client_context", "make_authority", "make_chain", "make_leaf"]

#: The builder's server certificate, under the name the tests know it by.
make_leaf = new_leaf


def make_authority(
    common_name: str = "Caracal Test Root", issuer: Authority | None = None
) -> Authority:
    """A self-signed root, or an intermediate signed by C{issuer}."""
    return new_authority(common_name, issuer=issuer)


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
