# -*- test-case-name: tests.integration.test_tls_handshake -*-
"""
Real TLS handshakes on 127.0.0.1 against L{caracal.gateway.tls}: the server
behind the listener's C{ServerTLSFactory(creator, False, site)} with blocking
pyOpenSSL clients in threads, and the outbound policy through a real
C{twisted.web.client.Agent}.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct

from OpenSSL import SSL, crypto
from service_identity import VerificationError
from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from caracal.gateway.tls import ServerTLS, ServerTLSFactory, client_tls_policy
from tests.support.certs import client_context, make_authority, make_chain, make_leaf


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return b"hello"


@implementer(IOpenSSLServerConnectionCreator)
class _WeakServer:
    """
    A deliberately permissive server (TLS 1.0 and up, security level 0): the
    control proving a client can speak the old protocols at all.
    """

    def __init__(self, leaf, max_version=None):
        self.context = SSL.Context(SSL.TLS_METHOD)
        self.context.set_min_proto_version(SSL.TLS1_VERSION)
        if max_version is not None:
            self.context.set_max_proto_version(max_version)
        self.context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        self.context.use_certificate(crypto.X509.from_cryptography(leaf.cert))
        for intermediate in leaf.intermediates:
            self.context.add_extra_chain_cert(crypto.X509.from_cryptography(intermediate))
        self.context.use_privatekey(crypto.PKey.from_cryptography_key(leaf.key))

    def serverConnectionForTLS(self, tlsProtocol):
        return SSL.Connection(self.context, None)


class _Client:
    """A blocking pyOpenSSL client; every method runs in a worker thread."""

    def __init__(self, port, version=None, ca_file=None, seclevel0=False):
        self.context = client_context(version, seclevel0, ca_file)
        self.port = port
        self.connection = None

    def connect(self):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        # pyOpenSSL needs a blocking socket; kernel timeouts keep a stuck
        # test from hanging (a read then fails with WantReadError).
        sock.settimeout(None)
        ten_seconds = struct.pack("ll", 10, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, ten_seconds)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, ten_seconds)
        self.sock = sock
        connection = SSL.Connection(self.context, sock)
        connection.set_tlsext_host_name(b"localhost")
        connection.set_connect_state()
        self.connection = connection
        try:
            connection.do_handshake()
        except BaseException:
            self.close()
            raise
        return self

    def get(self) -> tuple[bytes, bytes]:
        """One keep-alive HTTP/1.1 request; returns (status line, body)."""
        self.connection.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.connection.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length:
            body += self.connection.recv(65536)
        return lines[0], body

    def version(self) -> str:
        return self.connection.get_protocol_version_name()

    def peer_chain(self):
        return [c.to_cryptography() for c in self.connection.get_peer_cert_chain()]

    def close(self):
        if self.connection is not None:
            # A polite close_notify; the server may already be gone.
            with contextlib.suppress(SSL.Error, OSError):
                self.connection.shutdown()
            self.sock.close()
            self.connection = None


class _ServerTestCase(TestCase):
    """Listening helpers that leave the reactor clean."""

    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.root, self.leaf = make_chain(self.directory)
        self.cert_file = os.path.join(self.directory, "server.crt")
        self.key_file = os.path.join(self.directory, "server.key")
        self.ca_file = os.path.join(self.directory, "server-ca.pem")

    def listen(self, creator) -> int:
        site = Site(_Hello())
        site.timeout = None
        # The gateway's TLS transport (it releases its handshake buffers),
        # so keep-alive requests below go through BIOs replaced mid-connection.
        factory = ServerTLSFactory(creator, False, site)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self._stop, port, factory)
        return port.getHost().port

    @defer.inlineCallbacks
    def _stop(self, port, factory):
        yield port.stopListening()
        # Wait for the server side of every client connection to go away, so
        # no socket is left for the next test.
        for _ in range(500):
            if not factory.protocols:
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        for protocol in list(factory.protocols):
            protocol.transport.abortConnection()

    def run_client(self, client, *steps):
        """Connect C{client} in a thread, run C{steps} on it, close it."""

        def work():
            try:
                client.connect()
                return [step(client) for step in steps]
            finally:
                client.close()

        return deferToThread(work)

    def open_client(self, client):
        """Connect C{client} in a thread and keep it open until cleanup."""
        self.addCleanup(deferToThread, client.close)
        return deferToThread(client.connect)


class ServerHandshakeTests(_ServerTestCase):
    """
    The gateway's TLS listener: protocol versions, chain, reload.
    """

    def setUp(self):
        super().setUp()
        self.server_tls = ServerTLS(self.cert_file, self.key_file)
        self.port = self.listen(self.server_tls.creator)

    @defer.inlineCallbacks
    def test_tls13_offered(self):
        """A default client lands on TLS 1.3 and is served."""
        version, response = yield self.run_client(_Client(self.port), _Client.version, _Client.get)
        self.assertEqual(version, "TLSv1.3")
        self.assertEqual(response, (b"HTTP/1.1 200 OK", b"hello"))

    @defer.inlineCallbacks
    def test_tls12_accepted(self):
        """A TLS 1.2 client completes the handshake and is served."""
        version, response = yield self.run_client(
            _Client(self.port, SSL.TLS1_2_VERSION), _Client.version, _Client.get
        )
        self.assertEqual(version, "TLSv1.2")
        self.assertEqual(response, (b"HTTP/1.1 200 OK", b"hello"))

    @defer.inlineCallbacks
    def _assert_refused(self, version, name):
        # Control: the same client settings complete a handshake with a
        # server that allows the old protocol, so a refusal below is the
        # gateway's doing, not a client unable to try.
        weak_port = self.listen(_WeakServer(self.leaf))
        try:
            [negotiated] = yield self.run_client(
                _Client(weak_port, version, seclevel0=True), _Client.version
            )
        except SSL.Error as error:
            self.skipTest(f"this OpenSSL cannot speak {name} even at level 0: {error}")
        self.assertEqual(negotiated, name)
        yield self.assertFailure(
            self.run_client(_Client(self.port, version, seclevel0=True), _Client.version),
            SSL.Error,
        )

    def test_tls10_refused(self):
        """A TLS 1.0 client is refused."""
        return self._assert_refused(SSL.TLS1_VERSION, "TLSv1")

    def test_tls11_refused(self):
        """A TLS 1.1 client is refused."""
        return self._assert_refused(SSL.TLS1_1_VERSION, "TLSv1.1")

    @defer.inlineCallbacks
    def test_chain_presented(self):
        """
        A client trusting only the root verifies the server: the intermediate
        came from the server. The same client refuses a server sending the
        leaf alone (control).
        """
        chain, response = yield self.run_client(
            _Client(self.port, ca_file=self.ca_file), _Client.peer_chain, _Client.get
        )
        self.assertEqual(chain, [self.leaf.cert, *self.leaf.intermediates])
        self.assertEqual(response[1], b"hello")

        leaf_only = make_leaf(make_authority("Other Intermediate", issuer=self.root))
        bare = _WeakServer(leaf_only)
        bare_port = self.listen(bare)
        yield self.assertFailure(
            self.run_client(_Client(bare_port, ca_file=self.ca_file), _Client.version),
            SSL.Error,
        )

    @defer.inlineCallbacks
    def test_reload_new_connections_only(self):
        """
        After a reload a new connection sees the new certificate; a connection
        opened before keeps working on its keep-alive connection.
        """
        before = _Client(self.port)
        yield self.open_client(before)
        first = yield deferToThread(before.get)
        self.assertEqual(first, (b"HTTP/1.1 200 OK", b"hello"))
        old_chain = yield deferToThread(before.peer_chain)
        self.assertEqual(old_chain[0], self.leaf.cert)

        staging = self.mktemp()
        os.makedirs(staging)
        _, renewed = make_chain(staging)
        os.replace(os.path.join(staging, "server.crt"), self.cert_file)
        os.replace(os.path.join(staging, "server.key"), self.key_file)
        self.assertTrue(self.server_tls.reload())

        after = _Client(self.port)
        yield self.open_client(after)
        new_chain = yield deferToThread(after.peer_chain)
        self.assertEqual(new_chain, [renewed.cert, *renewed.intermediates])
        second = yield deferToThread(after.get)
        self.assertEqual(second, (b"HTTP/1.1 200 OK", b"hello"))

        again = yield deferToThread(before.get)
        self.assertEqual(again, (b"HTTP/1.1 200 OK", b"hello"))

    @defer.inlineCallbacks
    def test_failed_reload_keeps_serving(self):
        """A reload that fails keeps the old certificate in service."""
        with open(self.key_file, "wb") as f:
            f.write(b"garbage")
        self.assertFalse(self.server_tls.reload())
        chain, response = yield self.run_client(
            _Client(self.port, ca_file=self.ca_file), _Client.peer_chain, _Client.get
        )
        self.assertEqual(chain[0], self.leaf.cert)
        self.assertEqual(response[1], b"hello")


class ClientPolicyTests(_ServerTestCase):
    """
    L{client_tls_policy} through a real Agent against local TLS servers.
    """

    def agent(self, policy):
        pool = HTTPConnectionPool(reactor, persistent=False)
        return Agent(reactor, contextFactory=policy, pool=pool)

    def serve(self, leaf) -> int:
        cert_file, key_file = leaf.write(self.directory, "policy")
        return self.listen(ServerTLS(cert_file, key_file).creator)

    @defer.inlineCallbacks
    def test_reaches_trusted_server(self):
        """The client policy with a CA bundle reaches a server that bundle signed."""
        port = self.listen(ServerTLS(self.cert_file, self.key_file).creator)
        agent = self.agent(client_tls_policy(self.ca_file, variable="STS_CA_FILE"))
        response = yield agent.request(b"GET", f"https://localhost:{port}/".encode())
        body = yield readBody(response)
        self.assertEqual((response.code, body), (200, b"hello"))

    @defer.inlineCallbacks
    def test_hostname_mismatch_refused(self):
        """A certificate for other.test only, from a trusted CA: refused for localhost."""
        intermediate = make_authority("Caracal Test Intermediate", issuer=self.root)
        other = make_leaf(
            intermediate, hostnames=("other.test",), addresses=(), intermediates=(intermediate,)
        )
        port = self.serve(other)
        agent = self.agent(client_tls_policy(self.ca_file))
        failure = yield self.assertFailure(
            agent.request(b"GET", f"https://localhost:{port}/".encode()), ResponseNeverReceived
        )
        [reason] = failure.reasons
        self.assertIsInstance(reason.value, VerificationError)
        self.assertIn("DNSMismatch", repr(reason.value))

    @defer.inlineCallbacks
    def test_untrusted_without_bundle(self):
        """The private root is trusted only through the bundle."""
        port = self.listen(ServerTLS(self.cert_file, self.key_file).creator)
        agent = self.agent(client_tls_policy(None))
        failure = yield self.assertFailure(
            agent.request(b"GET", f"https://localhost:{port}/".encode()), ResponseNeverReceived
        )
        self.assertIn("certificate verify failed", repr(failure.reasons))

    @defer.inlineCallbacks
    def test_old_protocol_server_refused(self):
        """An upstream speaking at most TLS 1.1 is not talked to."""
        port = self.listen(_WeakServer(self.leaf, max_version=SSL.TLS1_1_VERSION))
        agent = self.agent(client_tls_policy(self.ca_file))
        yield self.assertFailure(
            agent.request(b"GET", f"https://localhost:{port}/".encode()), ResponseNeverReceived
        )
