# -*- test-case-name: tests.test_devsts -*-
"""
C{twistd -n caracal-devsts --port 8443 --bind 127.0.0.1
[--tls-cert F --tls-key K | --insecure-http] [--access-log]}: serve the
development STS (an access line per request only with C{--access-log}).

For development and tests only (see L{caracal.devsts}): it refuses to
start with C{CARACAL_ENV=production} or bound to anything but a loopback
address (one line on stderr, exit status 1), since it mints caller tokens
for whoever asks.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Mapping

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.python import usage

from caracal.devsts.service import DevSTS


def tls_options(cert_file: str, key_file: str) -> CertificateOptions:
    """
    Server TLS options from a PEM chain (leaf first, then intermediates) and
    a PEM key: TLS 1.2 at least, the whole chain presented. Raises
    L{usage.UsageError} naming the file and the reason.
    """
    try:
        with open(cert_file, "rb") as f:
            chain_pem = f.read()
        with open(key_file, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise usage.UsageError(f"{e.filename}: cannot read: {e.strerror}") from e
    try:
        chain = [
            crypto.X509.from_cryptography(c) for c in x509.load_pem_x509_certificates(chain_pem)
        ]
    except ValueError as e:
        raise usage.UsageError(f"{cert_file}: not a PEM certificate chain") from e
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except crypto.Error as e:
        raise usage.UsageError(f"{key_file}: not a PEM private key") from e
    options = CertificateOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:],
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    try:
        # Builds the context now, so a key that does not match fails at startup.
        options.getContext()
    except SSL.Error as e:
        raise usage.UsageError(f"{key_file}: does not match {cert_file}") from e
    return options


class Options(usage.Options):
    """Command line of C{twistd caracal-devsts}."""

    synopsis = "[--port P] [--bind A] [--tls-cert F --tls-key K | --insecure-http] [--access-log]"
    optParameters = [
        ["port", "p", 8443, "TCP port to listen on", int],
        ["bind", "b", "127.0.0.1", "address to listen on"],
        ["tls-cert", None, None, "PEM certificate chain (leaf first)"],
        ["tls-key", None, None, "PEM private key"],
    ]
    optFlags = [
        ["insecure-http", None, "serve plaintext HTTP (development only)"],
        ["access-log", None, "log a line per request (off: it costs CPU per request)"],
    ]

    def postOptions(self) -> None:
        cert, key = self["tls-cert"], self["tls-key"]
        if bool(cert) != bool(key):
            raise usage.UsageError("--tls-cert and --tls-key must both be set")
        if cert and self["insecure-http"]:
            raise usage.UsageError("--insecure-http and --tls-cert/--tls-key exclude each other")
        if not cert and not self["insecure-http"]:
            raise usage.UsageError(
                "--tls-cert/--tls-key required; pass --insecure-http for plaintext"
            )
        # Loaded here so a bad file is a usage error on the terminal, not a traceback.
        self["tls"] = tls_options(cert, key) if cert else None


def refusal(options: Options, environ: Mapping[str, str]) -> str | None:
    """
    Why the dev STS must not start with C{options} in C{environ}, or
    C{None}: C{CARACAL_ENV} says production (any case), or C{--bind} is not
    a loopback IP address (a host name could resolve anywhere, so only
    literals count: C{127.0.0.0/8} and C{::1}).
    """
    if (environ.get("CARACAL_ENV") or "").strip().lower() == "production":
        return (
            "refusing to start with CARACAL_ENV=production: the dev STS mints tokens"
            " for anyone who asks"
        )
    bind = options["bind"]
    try:
        loopback = ipaddress.ip_address(bind).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return (
            f"refusing to bind {bind or 'every interface'}: the dev STS listens only on a"
            " loopback address (127.0.0.1 or ::1)"
        )
    return None


def refuse_start(message: str, stderr=None) -> None:
    """
    Stop before listening: one line on stderr, exit status 1. C{SystemExit}
    leaves twistd without a traceback, before it writes a pidfile (as
    L{caracal.gateway.tap.refuse_start}).
    """
    stderr = sys.stderr if stderr is None else stderr
    stderr.write(f"caracal-devsts: {message}\n")
    stderr.flush()
    raise SystemExit(1)


def makeService(options: Options, reactor=None, environ: Mapping[str, str] | None = None):
    """
    The listening service of the development STS: a server endpoint (TLS
    or plaintext) serving the STS's site, unless L{refusal} finds a reason
    not to start (then the process exits, see L{refuse_start}).
    """
    reason = refusal(options, os.environ if environ is None else environ)
    if reason is not None:
        refuse_start(reason)
    if reactor is None:
        from twisted.internet import reactor
    sts = DevSTS()
    site = sts.site(access_log=options["access-log"])
    if options["tls"] is not None:
        endpoint = SSL4ServerEndpoint(
            reactor, options["port"], options["tls"], interface=options["bind"]
        )
    else:
        endpoint = TCP4ServerEndpoint(reactor, options["port"], interface=options["bind"])
    service = StreamServerEndpointService(endpoint, site)
    # Reachable for whoever embeds the service (e.g. to read the counters).
    service.sts = sts
    return service
