# -*- test-case-name: tests.test_connections -*-
"""Tests for L{caracal.gateway.connections}: the C{MAX_CONNECTIONS} cap (SPEC 12 H8)."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway.connections import ConnectionLimit
from caracal.gateway.metrics import Metrics

PEER = IPv4Address("TCP", "198.51.100.9", 50000)


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class ConnectionLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = Metrics()
        self.limit = ConnectionLimit(Factory.forProtocol(Echo), 2, self.metrics)

    def connect(self):
        """What the reactor does for an accepted socket: build, then connect (or close)."""
        protocol = self.limit.buildProtocol(PEER)
        if protocol is None:
            return None
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_refused_beyond_the_limit(self) -> None:
        """
        With C{limit} connections open, the next one gets no protocol (the
        reactor closes the socket at once) and is counted in
        C{connections_refused}.
        """
        self.assertIsNotNone(self.connect())
        self.assertIsNotNone(self.connect())
        self.assertIsNone(self.connect())
        self.assertIsNone(self.connect())
        self.assertEqual(self.metrics.counters["connections_refused"], 2)
        self.assertEqual((self.limit.open, self.limit.refused), (2, 2))

    def test_open_connections_undisturbed(self) -> None:
        """Refusing a new connection leaves the open ones working."""
        first, first_transport = self.connect()
        self.connect()
        self.assertIsNone(self.connect())
        first.dataReceived(b"still here")
        self.assertEqual(first_transport.value(), b"still here")
        self.assertFalse(first_transport.disconnecting)

    def test_closing_frees_a_place(self) -> None:
        """A connection that ends makes room for a new one."""
        first, _ = self.connect()
        self.connect()
        self.assertIsNone(self.connect())
        first.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.limit.open, 1)
        self.assertIsNotNone(self.connect())
        self.assertEqual(self.metrics.counters["connections_refused"], 1)

    def test_without_metrics(self) -> None:
        """The cap holds without a metrics object (it still counts refusals itself)."""
        limit = ConnectionLimit(Factory.forProtocol(Echo), 1)
        limit.buildProtocol(PEER).makeConnection(StringTransport())
        self.assertIsNone(limit.buildProtocol(PEER))
        self.assertEqual(limit.refused, 1)
