# -*- test-case-name: tests.test_tls -*-
"""
TLS for the gateway (SPEC section 3).

Inbound: L{ServerTLS} serves the certificate chain in C{TLS_CERT_FILE} with the
key in C{TLS_KEY_FILE} from a pyOpenSSL context (TLS 1.2 minimum, TLS 1.3
offered, the library's default ciphers). A renewed certificate is picked up by
L{ServerTLS.reload} (on SIGHUP, see L{install_sighup_reload}, or when the files
change, see L{ServerTLS.watch}) without a restart: new connections get the new
context, open ones keep the context they were made with.

Outbound: L{client_tls_policy} is the C{IPolicyForHTTPS} for the STS and https
upstreams: the peer certificate is verified against the hostname, trusting the
platform roots plus an optional PEM bundle.

Idle connections: L{ServerTLSFactory} (what the listener wraps the site
with) gives each connection's two memory BIOs back to the allocator once the
handshake flight or a larger exchange has gone through and both are empty
(L{release_bio_buffers}): a memory BIO otherwise keeps, for the life of the
connection, the largest buffer it ever held. Its connections gather their
small writes until the end of the reactor turn as Twisted's do, but hold a
buffer only while bytes wait, flushed by one timer for all
(L{ServerTLSProtocol}).

Startup refusals raise L{ConfigError} whose single line names the file and the
reason; key material never appears in a message or a log line.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import signal
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from twisted.internet import task
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import TLSVersion, optionsForClientTLS
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from caracal.gateway.cache import BoundedCache
from caracal.gateway.config import ConfigError

log = Logger(namespace="caracal.gateway.tls")

CERT_VARIABLE = "TLS_CERT_FILE"
KEY_VARIABLE = "TLS_KEY_FILE"

# Server options on top of OpenSSL's defaults: no TLS compression (CRIME),
# our cipher order rather than the client's, fresh ECDH/DH keys per handshake.
_SERVER_OPTIONS = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_SINGLE_ECDH_USE
    | SSL.OP_SINGLE_DH_USE
)

#: The one application protocol the listener offers over ALPN (SPEC 13): the
#: limits, timers and streaming rules are HTTP/1.1's.
ALPN_PROTOCOL = b"http/1.1"

# Outbound connections keep a small cache of connection creators per
# (hostname, port): building one loads the trust store, which is too costly
# to repeat for every new pooled connection.
_CLIENT_CREATOR_CACHE_SIZE = 256


#: A connection's memory BIOs are replaced by fresh ones (see
#: L{release_bio_buffers}) once a chunk larger than this has gone through
#: either of them: the handshake flight (the certificate chain: 2 to 6 KiB)
#: always, a request or response of a few hundred bytes never, so a small
#: keep-alive exchange costs no extra work.
BIO_RELEASE_BYTES = 512


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _stamp(moment: datetime.datetime) -> str:
    """C{2026-01-01T00:00:00Z}: the form used in operator messages."""
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read(variable: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        reason = error.strerror or error.__class__.__name__
        raise ConfigError(f"{variable} {path}: cannot read: {reason}") from None


def _fingerprint(certificate: x509.Certificate) -> str:
    der = certificate.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def _same_public_key(certificate: x509.Certificate, key) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return certificate.public_key().public_bytes(der, spki) == key.public_key().public_bytes(
        der, spki
    )


@dataclass(frozen=True)
class ServerCredentials:
    """
    A checked certificate chain and its private key, ready to serve.

    @ivar cert_file: the path the chain was read from.
    @ivar key_file: the path the key was read from.
    @ivar chain: the certificates, leaf first, then the intermediates.
    @ivar key: the private key (never shown in the repr).
    """

    cert_file: str
    key_file: str
    chain: tuple[x509.Certificate, ...]
    key: object = field(repr=False)

    @property
    def leaf(self) -> x509.Certificate:
        """The server's own certificate."""
        return self.chain[0]

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """The certificates sent after the leaf."""
        return self.chain[1:]

    @property
    def not_before(self) -> datetime.datetime:
        """Start of the leaf's validity (UTC)."""
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime.datetime:
        """End of the leaf's validity (UTC)."""
        return self.leaf.not_valid_after_utc

    @property
    def subject(self) -> str:
        """The leaf's subject, RFC 4514 form."""
        return self.leaf.subject.rfc4514_string()

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the leaf (hex): identifies the served certificate in logs."""
        return _fingerprint(self.leaf)


def load_server_certificate(
    cert_file: str, key_file: str, now: datetime.datetime | None = None
) -> ServerCredentials:
    """
    Read and check the server's PEM chain (leaf first, then intermediates)
    and its PEM private key.

    @param now: the moment the leaf must be valid at (default: the wall
        clock; a naive datetime is taken as UTC).
    @raise ConfigError: one line naming C{TLS_CERT_FILE} or C{TLS_KEY_FILE},
        the path and the reason: unreadable, no PEM certificate, not a PEM
        private key, key not matching the leaf, leaf expired or not yet valid.
    """
    now = now or _utcnow()
    if now.tzinfo is None:
        now = now.replace(tzinfo=datetime.timezone.utc)
    cert_data = _read(CERT_VARIABLE, cert_file)

    if b"-----BEGIN CERTIFICATE-----" not in cert_data:
        raise ConfigError(f"{CERT_VARIABLE} {cert_file}: no PEM certificate found")
    try:
        chain = tuple(x509.load_pem_x509_certificates(cert_data))
    except ValueError:
        raise ConfigError(f"{CERT_VARIABLE} {cert_file}: malformed PEM certificate") from None

    # Read only once the chain is good, so the operator fixes one file at a time.
    key_data = _read(KEY_VARIABLE, key_file)
    if b"PRIVATE KEY-----" not in key_data:
        hint = " (it holds a certificate)" if b"-----BEGIN CERTIFICATE-----" in key_data else ""
        raise ConfigError(f"{KEY_VARIABLE} {key_file}: not a PEM private key{hint}")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        # cryptography raises TypeError for a key that needs a passphrase.
        raise ConfigError(
            f"{KEY_VARIABLE} {key_file}: encrypted private keys are not supported"
        ) from None
    except ValueError:
        # The library's message is not echoed: it could quote key bytes.
        raise ConfigError(f"{KEY_VARIABLE} {key_file}: not a PEM private key") from None
    except UnsupportedAlgorithm:
        raise ConfigError(f"{KEY_VARIABLE} {key_file}: unsupported private key type") from None

    if not _same_public_key(chain[0], key):
        if any(_same_public_key(c, key) for c in chain[1:]):
            raise ConfigError(
                f"{CERT_VARIABLE} {cert_file}: the certificate for {KEY_VARIABLE} is not first"
                " (leaf first, then intermediates)"
            )
        raise ConfigError(
            f"{KEY_VARIABLE} {key_file}: does not match the certificate in {CERT_VARIABLE}"
        )

    leaf = chain[0]
    if now >= leaf.not_valid_after_utc:
        raise ConfigError(
            f"{CERT_VARIABLE} {cert_file}: certificate expired on"
            f" {_stamp(leaf.not_valid_after_utc)}"
        )
    if now < leaf.not_valid_before_utc:
        raise ConfigError(
            f"{CERT_VARIABLE} {cert_file}: certificate not valid before"
            f" {_stamp(leaf.not_valid_before_utc)}"
        )
    return ServerCredentials(cert_file=cert_file, key_file=key_file, chain=chain, key=key)


def server_context(credentials: ServerCredentials) -> SSL.Context:
    """
    A fresh server context serving C{credentials}: TLS 1.2 minimum, TLS 1.3
    allowed, OpenSSL's default cipher list (never weakened), the leaf plus
    every intermediate presented, ALPN C{http/1.1} (L{select_alpn}).

    @raise ConfigError: OpenSSL refused the certificate or key.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(_SERVER_OPTIONS)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_alpn_select_callback(select_alpn)
    try:
        context.use_certificate(crypto.X509.from_cryptography(credentials.leaf))
        for intermediate in credentials.intermediates:
            context.add_extra_chain_cert(crypto.X509.from_cryptography(intermediate))
        context.use_privatekey(crypto.PKey.from_cryptography_key(credentials.key))
        context.check_privatekey()
    except (SSL.Error, crypto.Error, TypeError, ValueError):
        # e.g. a key type or a too-weak key OpenSSL will not serve.
        raise ConfigError(
            f"{CERT_VARIABLE} {credentials.cert_file}: OpenSSL refused the certificate"
            f" or the key in {KEY_VARIABLE} {credentials.key_file}"
        ) from None
    return context


def select_alpn(connection: SSL.Connection, offered: list[bytes]):
    """
    The ALPN choice: C{http/1.1} when the client offers it; otherwise no
    protocol is selected and the handshake goes on without ALPN (RFC 7301
    allows that; a client that only speaks h2 then fails at its own end
    rather than at ours with a fatal alert it cannot explain).
    """
    if ALPN_PROTOCOL in offered:
        return ALPN_PROTOCOL
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _bio_pending(bio) -> int:
    """Bytes written to memory BIO C{bio} and not read yet."""
    return _lib.BIO_get_mem_data(bio, _ffi.new("char **"))


def release_bio_buffers(connection: SSL.Connection) -> bool:
    """
    Replace the two memory BIOs of C{connection} (made without a socket) by
    fresh, empty ones when nothing is waiting in either, so the buffers they
    grew to are freed.

    An OpenSSL memory BIO grows its buffer to a third more than the most
    bytes it ever held and never shrinks it: after the handshake the BIO
    OpenSSL writes to holds the server's whole first flight (certificate
    chain included) and the one it reads from the client's hello, about
    2.3 KiB per connection measured with OpenSSL 4.0.3, kept for as long as
    the connection stays open (hours, for an agent's event stream).
    C{SSL_set_bio} frees the old pair; the record layer is told of the new
    one, so the connection goes on as before.

    pyOpenSSL has no public way to do this: it uses the connection's private
    C{_ssl}, C{_into_ssl} and C{_from_ssl} (pinned by tests.test_tls).

    @return: True when replaced, False when bytes were waiting (nothing done).
    """
    into, out = connection._into_ssl, connection._from_ssl
    if into is None or out is None or _bio_pending(into) or _bio_pending(out):
        return False
    fresh_into = _lib.BIO_new(_lib.BIO_s_mem())
    fresh_out = _lib.BIO_new(_lib.BIO_s_mem())
    if fresh_into == _ffi.NULL or fresh_out == _ffi.NULL:
        # Out of memory: keep the old pair, which works.
        for bio in (fresh_into, fresh_out):
            if bio != _ffi.NULL:
                _lib.BIO_free(bio)
        return False
    _lib.SSL_set_bio(connection._ssl, fresh_into, fresh_out)
    connection._into_ssl, connection._from_ssl = fresh_into, fresh_out
    return True


#: Bytes a connection gathers from small writes before they go to OpenSSL at
#: once instead of at the end of the reactor turn (Twisted's figure, from
#: C{BufferingTLSTransport}).
GATHER_BYTES = 64_000


class ServerTLSProtocol(TLSMemoryBIOProtocol):
    """
    Twisted's TLS transport for the listener, with two changes for
    connections that stay open long and idle:

      - the small writes of one reactor turn are gathered and handed to
        OpenSSL together at its end, as Twisted's C{BufferingTLSTransport}
        does (one TLS record instead of one per write), but a connection
        holds a buffer only while it has bytes waiting, and one timer per
        reactor turn flushes every connection's (L{ServerTLSFactory}):
        Twisted's gives every connection an aggregator object, its buffer
        and two bound methods for its whole life (0.3 KiB per idle
        connection);
      - the memory BIOs' buffers are released (L{release_bio_buffers})
        after a chunk of more than L{BIO_RELEASE_BYTES} went through them,
        as soon as both are empty.
    """

    # The largest chunk through either BIO since they were fresh; a class
    # default so a connection that never needs a release stores nothing.
    _bio_high = 0

    def __init__(self, factory, wrappedProtocol, _connectWrapped: bool = True) -> None:  # noqa: N803
        super().__init__(factory, wrappedProtocol, _connectWrapped)
        # Bytes written this reactor turn, not yet handed to OpenSSL (None:
        # nothing waiting), and how many more may gather before they go.
        self._gathered: list[bytes] | None = None
        self._gather_left = 0

    def write(self, data: bytes) -> None:
        """Gather C{data} for the end of the turn; past L{GATHER_BYTES}, send all now."""
        gathered = self._gathered
        if gathered is None:
            gathered = self._gathered = []
            self._gather_left = GATHER_BYTES
            self.factory.flush_soon(self)
        gathered.append(data + b"")  # a TypeError now for what is not bytes, as Twisted
        self._gather_left -= len(data)
        if self._gather_left < 0:
            self.flush_gathered()

    def writeSequence(self, sequence) -> None:
        """As L{write} of the joined sequence."""
        self.write(b"".join(sequence))

    def flush_gathered(self) -> None:
        """Hand what was gathered to OpenSSL (Twisted's own C{write})."""
        gathered = self._gathered
        if gathered is not None:
            self._gathered = None
            self._gather_left = 0  # a shared small int, not a count kept per idle connection
            TLSMemoryBIOProtocol.write(self, b"".join(gathered))

    def loseConnection(self) -> None:
        """What was written before goes out first, then as Twisted."""
        self.flush_gathered()
        super().loseConnection()

    def connectionLost(self, reason) -> None:
        """What was gathered goes to OpenSSL (which drops it if it cannot go), then as Twisted."""
        self.flush_gathered()
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        """Note the size of what goes into the read BIO, then as Twisted."""
        if len(data) > self._bio_high:
            self._bio_high = len(data)
        super().dataReceived(data)

    def _flushSendBIO(self) -> None:
        # Twisted's own (read up to 32 KiB and write it out), plus the note
        # of the size and the release; Twisted calls it after every handshake
        # step, every write and every read.
        try:
            data = self._tlsConnection.bio_read(2**15)
        except SSL.WantReadError:
            pass
        else:
            self.transport.write(data)
            if len(data) > self._bio_high:
                self._bio_high = len(data)
        if (
            self._bio_high > BIO_RELEASE_BYTES
            and self._handshakeDone
            and release_bio_buffers(self._tlsConnection)
        ):
            self._bio_high = 0


class ServerTLSFactory(TLSMemoryBIOFactory):
    """
    C{TLSMemoryBIOFactory} making L{ServerTLSProtocol}s, and flushing what
    they gather at the end of each reactor turn with one timer for all.
    """

    protocol = ServerTLSProtocol

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._to_flush: list[ServerTLSProtocol] = []
        self._flush_call = None

    def flush_soon(self, protocol: ServerTLSProtocol) -> None:
        """Flush C{protocol}'s gathered writes at the end of this reactor turn."""
        self._to_flush.append(protocol)
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        protocols, self._to_flush = self._to_flush, []
        for protocol in protocols:
            try:
                protocol.flush_gathered()
            except Exception:
                # One connection's failure must not hold the others' bytes back.
                log.failure("flushing a TLS connection's writes failed")


def _file_stamp(path: str) -> tuple[int, int, int] | None:
    """What tells us a file was replaced or rewritten; None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The gateway's inbound TLS, reloadable while serving.

    Use C{server_tls.creator} with
    C{twisted.protocols.tls.TLSMemoryBIOFactory(creator, False, site)} (or
    C{listenSSL} / C{SSL4ServerEndpoint}). Each new connection is made from
    the context current at accept time; L{reload} replaces that context, so
    connections already open keep theirs and are not dropped.

    @ivar credentials: the L{ServerCredentials} being served.
    """

    def __init__(self, cert_file: str, key_file: str, clock=None):
        """
        Load and check the files now.

        @param clock: an C{IReactorTime} for L{watch} (default: the reactor).
        @raise ConfigError: the files cannot be served (see
            L{load_server_certificate}).
        """
        if clock is None:
            from twisted.internet import reactor as clock
        self.cert_file = cert_file
        self.key_file = key_file
        self._clock = clock
        self._stamps = self._file_stamps()
        self.credentials = load_server_certificate(cert_file, key_file)
        self._context = server_context(self.credentials)

    def __repr__(self) -> str:
        return (
            f"<ServerTLS {self.cert_file} subject={self.credentials.subject}"
            f" not_after={_stamp(self.not_after)}>"
        )

    @property
    def creator(self) -> IOpenSSLServerConnectionCreator:
        """The connection creator for the TLS listener (this object)."""
        return self

    @property
    def not_after(self) -> datetime.datetime:
        """End of validity (UTC) of the certificate currently served."""
        return self.credentials.not_after

    def factory(self, wrapped, clock) -> ServerTLSFactory:
        """
        The listener's protocol factory: C{wrapped} (the site) over TLS from
        this object's current context, each connection releasing its
        handshake buffers once idle (L{ServerTLSProtocol}).

        @param clock: the C{IReactorTime} Twisted's write buffering uses.
        """
        return ServerTLSFactory(self.creator, False, wrapped, clock=clock)

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        """
        A server-side connection from the current context (the
        C{IOpenSSLServerConnectionCreator} interface).
        """
        return SSL.Connection(self._context, None)

    def _file_stamps(self):
        return (_file_stamp(self.cert_file), _file_stamp(self.key_file))

    def reload(self) -> bool:
        """
        Re-read both files and serve them to new connections.

        @return: True when the new certificate is in service; False when the
            files were refused, in which case the previous certificate keeps
            being served and the reason is logged as an error.
        """
        # Stamped before reading, so a write racing with this read is seen by
        # the next poll of watch() and read again.
        self._stamps = self._file_stamps()
        try:
            credentials = load_server_certificate(self.cert_file, self.key_file)
            context = server_context(credentials)
        except ConfigError as error:
            log.error(
                "TLS certificate reload refused, still serving {subject}"
                " (valid until {not_after}): {reason}",
                reason=str(error),
                subject=self.credentials.subject,
                not_after=_stamp(self.not_after),
            )
            return False
        self.credentials = credentials
        self._context = context
        log.info(
            "TLS certificate reloaded: {subject} valid until {not_after}, sha256 {fingerprint}",
            subject=credentials.subject,
            not_after=_stamp(credentials.not_after),
            fingerprint=credentials.fingerprint,
        )
        return True

    def _poll(self) -> None:
        if self._file_stamps() != self._stamps:
            self.reload()

    def watch(self, interval: float = 5.0) -> task.LoopingCall:
        """
        Poll both files every C{interval} seconds on the clock; when either
        one's (mtime, size, inode) changes, L{reload}.

        @return: the running C{LoopingCall}; call C{.stop()} to end watching.
        """
        loop = task.LoopingCall(self._poll)
        loop.clock = self._clock
        done = loop.start(interval, now=False)
        # _poll cannot raise for a bad file (reload logs and keeps serving);
        # anything else is a bug worth a log line rather than a silent stop.
        done.addErrback(lambda failure: log.failure("TLS file watch stopped", failure))
        return loop


def install_sighup_reload(server_tls: ServerTLS, reactor):
    """
    Make SIGHUP reload C{server_tls} (see L{ServerTLS.reload}).

    The handler only schedules the reload with C{reactor.callFromThread}: the
    files are read in the reactor thread, not inside the signal handler. Call
    it from the main thread (Python only installs signal handlers there), and
    after the reactor's own signal handlers if it installs any for SIGHUP.

    @return: the previous SIGHUP handler, to restore with
        C{signal.signal(signal.SIGHUP, previous)}.
    """

    def on_sighup(signum, frame):
        reactor.callFromThread(server_tls.reload)

    return signal.signal(signal.SIGHUP, on_sighup)


def _load_ca_bundle(ca_file: str, variable: str) -> tuple[crypto.X509, ...]:
    data = _read(variable, ca_file)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(f"{variable} {ca_file}: no PEM certificate found")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"{variable} {ca_file}: malformed PEM certificate") from None
    return tuple(crypto.X509.from_cryptography(c) for c in certificates)


@implementer(IOpenSSLTrustRoot)
class PlatformTrustPlus:
    """
    An C{IOpenSSLTrustRoot}: OpenSSL's default verify paths (the platform
    roots) plus extra CA certificates, read once at startup.

    The interface is only importable from Twisted's private C{_sslverify}
    module; Twisted's own C{OpenSSLDefaultPaths} is the same plus nothing.
    """

    def __init__(self, extra: tuple[crypto.X509, ...] = ()):
        self._extra = extra

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        store = context.get_cert_store()
        for certificate in self._extra:
            store.add_cert(certificate)


@implementer(IPolicyForHTTPS)
class GatewayTLSPolicy:
    """
    Outbound TLS for C{twisted.web.client.Agent} (and treq): TLS 1.2 minimum,
    the certificate verified against the hostname (service_identity) and a
    chain to a trusted root.
    """

    def __init__(self, trust_root: PlatformTrustPlus):
        self._trust_root = trust_root
        self._creators: BoundedCache[tuple[str, int], object] = BoundedCache(
            _CLIENT_CREATOR_CACHE_SIZE
        )

    def creatorForNetloc(self, hostname: bytes, port: int):
        """A client connection creator verifying C{hostname}."""
        name = hostname.decode("ascii") if isinstance(hostname, bytes) else hostname
        key = (name, port)
        creator = self._creators.get(key)
        if creator is None:
            creator = optionsForClientTLS(
                name,
                trustRoot=self._trust_root,
                extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
            )
            self._creators.put(key, creator)
        return creator


def client_tls_policy(ca_file: str | None, variable: str = "UPSTREAM_CA_FILE") -> IPolicyForHTTPS:
    """
    The C{IPolicyForHTTPS} for outbound TLS (the STS, https upstreams).

    @param ca_file: a PEM bundle of extra trusted CAs, on top of the platform
        roots; None for the platform roots only.
    @param variable: the variable C{ca_file} came from (C{STS_CA_FILE} or
        C{UPSTREAM_CA_FILE}), named in the error message.
    @raise ConfigError: the bundle is unreadable or holds no PEM certificate.
    """
    extra = _load_ca_bundle(ca_file, variable) if ca_file else ()
    return GatewayTLSPolicy(PlatformTrustPlus(extra))
