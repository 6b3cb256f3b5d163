# -*- test-case-name: tests.test_twisted_private -*-
"""
The private Twisted names the gateway still relies on, pinned. Twisted never
promised them, so each test here checks the behaviour the gateway counts on
and fails loudly, naming the user, the day a Twisted release changes it.

 - C{reactor._exitSignal}: L{caracal.gateway.tap.GatewayService} and
   L{caracal.gateway.workers} forget SIGTERM there so an orderly drain exits
   0 (twistd re-raises the remembered signal; there is no public way out);
 - C{Request._disconnected}: L{caracal.gateway.http}, L{caracal.gateway.forward}
   and L{caracal.gateway.endpoints} ask whether the client left before
   writing (Twisted offers only C{notifyFinish}, too late for a check);
 - C{HTTPChannel._waitingForTransport}, C{_dataBuffer}, C{_networkProducer}:
   L{caracal.gateway.http.GatewayChannel} keeps the write timeout running
   while the client reads slowly, spots pipelined requests and half-closes
   after a refusal; L{caracal.gateway.forward} starts an upstream body paused;
 - C{Headers._rawHeaders} and C{twisted.web.http_headers._nameEncoder}:
   L{caracal.gateway.headers.raw_fields} and C{canonical_name}, with which
   the forwarder and the outbound client copy and build headers without
   checking every name and value again;
 - C{TLSMemoryBIOProtocol._flushSendBIO} and C{_handshakeDone}:
   L{caracal.gateway.tls.ServerTLSProtocol} replaces the first to see what
   leaves the send BIO and to release both BIOs once the handshake is done;
 - C{twisted.internet._sslverify.IOpenSSLTrustRoot} and its
   C{_addCACertsToContext}: the only way to give C{optionsForClientTLS} the
   platform roots plus extra CAs (L{caracal.gateway.tls.PlatformTrustPlus}).
"""

from __future__ import annotations

import inspect
import signal

from twisted.application import app
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import _ISupportsExitSignalCapturing
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.scripts import twistd
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from caracal.gateway.tls import PlatformTrustPlus


class ExitSignalTests(SynchronousTestCase):
    """C{reactor._exitSignal}, cleared by the gateway after an orderly SIGTERM stop."""

    def test_sigterm_is_remembered(self):
        """The reactor's SIGTERM handler records the signal in C{_exitSignal}."""
        reactor = SelectReactor()
        self.addCleanup(reactor.waker.connectionLost, None)
        self.assertTrue(_ISupportsExitSignalCapturing.providedBy(reactor))
        self.assertIsNone(reactor._exitSignal)
        reactor.sigTerm(signal.SIGTERM)
        self.assertEqual(reactor._exitSignal, signal.SIGTERM)

    def test_twistd_reraises_it(self):
        """twistd copies C{reactor._exitSignal} after the run and re-raises it."""
        self.assertIn("self._exitSignal = reactor._exitSignal", inspect.getsource(app))
        self.assertIn("app._exitWithSignal(runner._exitSignal)", inspect.getsource(twistd))


class RequestDisconnectedTests(SynchronousTestCase):
    """C{Request._disconnected}: whether the client left before the answer was finished."""

    def test_set_by_connection_lost(self):
        """False while connected; True once the connection is lost."""
        request = Request(DummyChannel(), False)
        self.assertIs(request._disconnected, False)
        request.connectionLost(Failure(ConnectionDone()))
        self.assertIs(request._disconnected, True)


class ChannelInternalsTests(SynchronousTestCase):
    """The C{HTTPChannel} attributes L{GatewayChannel} reads."""

    def setUp(self):
        self.transport = StringTransport()
        self.channel = HTTPChannel()
        self.channel.makeConnection(self.transport)
        self.addCleanup(self.channel.connectionLost, Failure(ConnectionDone()))

    def test_waiting_for_transport(self):
        """C{_waitingForTransport} says whether the transport asked the channel to pause."""
        self.assertIs(self.channel._waitingForTransport, False)
        self.channel.pauseProducing()
        self.assertIs(self.channel._waitingForTransport, True)
        self.channel.resumeProducing()
        self.assertIs(self.channel._waitingForTransport, False)

    def test_data_buffer(self):
        """C{_dataBuffer} holds pipelined bytes received while a request is answered."""
        self.channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\n")
        self.assertTrue(any(self.channel._dataBuffer))

    def test_network_producer(self):
        """C{_networkProducer} is the transport, which can be unregistered from."""
        self.assertIs(self.channel._networkProducer, self.transport)
        self.assertTrue(callable(self.channel._networkProducer.unregisterProducer))


class TLSProtocolInternalsTests(SynchronousTestCase):
    """The C{TLSMemoryBIOProtocol} methods and flags L{ServerTLSProtocol} builds on."""

    def test_send_bio_flushed_through_one_method(self):
        """
        Twisted's own C{_flushSendBIO} is the only reader of the send BIO in
        the handshake, read and write paths; C{_handshakeDone} is the flag
        it keeps.
        """
        source = inspect.getsource(TLSMemoryBIOProtocol)
        self.assertEqual(source.count(".bio_read("), 1)
        flush = inspect.getsource(TLSMemoryBIOProtocol._flushSendBIO)
        self.assertIn("self._tlsConnection.bio_read(2**15)", flush)
        self.assertIn("self.transport.write(bytes)", flush)
        for caller in ("_checkHandshakeStatus", "_flushReceiveBIO", "_write"):
            self.assertIn(
                "self._flushSendBIO()", inspect.getsource(getattr(TLSMemoryBIOProtocol, caller))
            )
        self.assertIn("self._handshakeDone = True", source)


class TrustRootTests(SynchronousTestCase):
    """Twisted's TLS options hand their context to C{trustRoot._addCACertsToContext}."""

    def test_trust_root_called(self):
        """Building a client context calls L{PlatformTrustPlus._addCACertsToContext}."""
        calls = []

        class Recording(PlatformTrustPlus):
            def _addCACertsToContext(self, context):
                calls.append(context)
                super()._addCACertsToContext(context)

        context = CertificateOptions(trustRoot=Recording()).getContext()
        self.assertEqual(calls, [context])


class TxpostgresConnectionTests(SynchronousTestCase):
    """
    Not Twisted's, but as private: txpostgres's C{Connection._connection}, the
    psycopg2 connection the resource store's connection polls when a query
    is done (L{caracal.gateway.registry._StoreConnection.cursorFinished}) so
    a NOTIFY buffered by libpq is not lost.
    """

    def test_psycopg2_connection_is_kept_there(self):
        """C{connect} stores the psycopg2 connection it makes as C{_connection}."""
        from txpostgres.txpostgres import Connection

        made = []

        class Made:
            def fileno(self):
                return -1

            def poll(self):
                import psycopg2.extensions

                return psycopg2.extensions.POLL_OK

        def factory(*args, **kwargs):
            made.append(Made())
            return made[0]

        connection = Connection(reactor=SelectReactor())
        connection.connectionFactory = staticmethod(factory)
        connection.connect(dsn="")
        self.assertIs(connection._connection, made[0])
        self.assertTrue(callable(connection._connection.poll))

    def test_cursor_reports_the_end_of_its_query(self):
        """
        A txpostgres cursor calls its connection's C{cursorFinished} when its
        query is done, the hook the resource store's connection polls in.
        """
        from txpostgres.txpostgres import Cursor

        self.assertIn("self._connection.cursorFinished(self)", inspect.getsource(Cursor._doit))


class HeadersInternalsTests(SynchronousTestCase):
    """C{Headers._rawHeaders} and C{_nameEncoder}, behind L{caracal.gateway.headers.raw_fields}."""

    def test_raw_fields_is_the_headers_dict(self):
        """
        It is the dict Headers reads and writes, keyed by the canonical name,
        values as given (already free of CR and LF).
        """
        from twisted.web.http_headers import Headers

        from caracal.gateway.headers import canonical_name, raw_fields

        headers = Headers()
        headers.addRawHeader(b"x-forwarded-for", b"192.0.2.1")
        fields = raw_fields(headers)
        self.assertEqual(fields, {b"X-Forwarded-For": [b"192.0.2.1"]})
        fields[canonical_name(b"content-md5")] = [b"x"]
        fields[canonical_name(b"TRACEPARENT")] = [b"y"]
        self.assertEqual(headers.getRawHeaders(b"Content-MD5"), [b"x"])
        self.assertEqual(headers.getRawHeaders(b"traceparent"), [b"y"])
        self.assertEqual(
            [name for name, _values in headers.getAllRawHeaders()],
            [b"X-Forwarded-For", b"Content-MD5", b"Traceparent"],
        )

    def test_canonical_name_refuses_non_tokens(self):
        """A name that is not a token raises, as Headers would."""
        from twisted.web.http_headers import InvalidHeaderName

        from caracal.gateway.headers import canonical_name

        for name in (b"Bad Name", b"X\r\nY", b"", b"a:b"):
            self.assertRaises(InvalidHeaderName, canonical_name, name)

    def test_literal_canonical_names(self):
        """The names the forwarder and the client use as raw_fields keys are canonical."""
        from caracal.gateway.headers import canonical_name

        for name in (
            b"Host",
            b"X-Forwarded-For",
            b"X-Forwarded-Proto",
            b"X-Forwarded-Host",
            b"X-Request-Id",
            b"Traceparent",
            b"Content-Length",
            b"Transfer-Encoding",
        ):
            self.assertEqual(canonical_name(name.lower()), name)
