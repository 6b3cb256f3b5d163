# -*- test-case-name: tests.test_pools -*-
"""Outbound pools keep connections alive, bounded in number and in idle time."""

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, Request, ResponseFailed, ResponseNeverReceived, readBody
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface.verify import verifyObject

from caracal.gateway.forward import Forwarder
from caracal.gateway.pools import IDLE_PER_ORIGIN, OriginPool, PooledAgent, host_value
from caracal.gateway.sts import STSClient

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class FakeEndpoint:
    """Connects each time to a new L{StringTransport}, at once."""

    def __init__(self) -> None:
        self.protocols = []

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.protocols.append(protocol)
        return defer.succeed(protocol)


def get(path=b"/"):
    return Request(b"GET", path, Headers({b"host": [b"origin.test"]}), None, persistent=True)


class OriginPoolTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.pool = OriginPool(self.reactor, max_idle=2, idle_timeout=30)
        self.endpoint = FakeEndpoint()

    def call(self, key="a", request=None):
        """Send a request and answer it on whichever connection it went: the body read."""
        d = self.pool.request(key, self.endpoint, request or get())
        protocol = self.used()
        protocol.dataReceived(OK)
        response = self.successResultOf(d)
        self.assertEqual(self.successResultOf(readBody(response)), b"ok")
        return protocol

    def used(self):
        """The connection that holds a request in flight."""
        [busy] = [p for p in self.endpoint.protocols if p.state == "WAITING"]
        return busy

    def test_reused(self):
        """A connection whose response is read goes idle; the next call to its origin reuses it."""
        first = self.call()
        self.assertEqual(self.pool.idle("a"), 1)
        self.assertIs(self.call(), first)
        self.assertEqual(len(self.endpoint.protocols), 1)

    def test_origins_apart(self):
        """A connection is only reused for its own origin key."""
        first = self.call("a")
        second = self.call("b")
        self.assertIsNot(first, second)
        self.assertEqual((self.pool.idle("a"), self.pool.idle("b")), (1, 1))

    def test_most_recently_idle_first(self):
        """Of several idle connections, the one idle the shortest time is used first."""
        one = self.pool.request("a", self.endpoint, get())
        two = self.pool.request("a", self.endpoint, get())
        first, second = self.endpoint.protocols
        second.dataReceived(OK)
        self.successResultOf(readBody(self.successResultOf(two)))
        self.reactor.advance(1)
        first.dataReceived(OK)
        self.successResultOf(readBody(self.successResultOf(one)))
        self.assertIs(self.call(), first)

    def test_bounded(self):
        """Past C{max_idle} idle connections per origin the longest idle one is closed."""
        pending = [self.pool.request("a", self.endpoint, get()) for _ in range(3)]
        for protocol, d in zip(self.endpoint.protocols, pending, strict=True):
            protocol.dataReceived(OK)
            self.successResultOf(readBody(self.successResultOf(d)))
            self.reactor.advance(1)
        self.assertEqual(self.pool.idle("a"), 2)
        closed = [p.transport.disconnecting for p in self.endpoint.protocols]
        self.assertEqual(closed, [True, False, False])

    def test_idle_timeout_one_timer(self):
        """
        Idle connections are closed C{idle_timeout} seconds after they were
        last used, by one timer for the whole pool (none armed and cancelled
        per request).
        """
        first = self.call("a")
        self.reactor.advance(10)
        second = self.call("b")
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.reactor.advance(20)
        self.assertTrue(first.transport.disconnecting)
        self.assertFalse(second.transport.disconnecting)
        self.assertEqual((self.pool.idle("a"), self.pool.idle("b")), (0, 1))
        self.reactor.advance(10)
        self.assertTrue(second.transport.disconnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_closed_while_idle_skipped(self):
        """A connection the server closed while it was idle is not used: a new one is made."""
        first = self.call()
        first.connectionLost(Failure(ConnectionDone()))
        second = self.call()
        self.assertIsNot(second, first)

    def test_idempotent_retried_on_a_new_connection(self):
        """
        An idempotent request without a body that finds its reused connection
        closed goes once more on a new connection (Twisted's retry), once.
        """
        first = self.call()
        d = self.pool.request("a", self.endpoint, get())
        first.connectionLost(Failure(ConnectionDone()))
        second = self.endpoint.protocols[-1]
        self.assertIsNot(second, first)
        second.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ResponseNeverReceived)
        self.assertEqual(len(self.endpoint.protocols), 2)

    def test_retry_succeeds(self):
        """The retried request's answer is the caller's."""
        first = self.call()
        d = self.pool.request("a", self.endpoint, get())
        first.connectionLost(Failure(ConnectionDone()))
        self.endpoint.protocols[-1].dataReceived(OK)
        self.assertEqual(self.successResultOf(readBody(self.successResultOf(d))), b"ok")

    def test_not_retried_after_an_answer_began(self):
        """A connection lost after some of the answer: not stale, not retried."""
        first = self.call()
        d = self.pool.request("a", self.endpoint, get())
        first.dataReceived(b"HTTP/1.1 200 OK\r\n")
        first.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ResponseFailed)
        self.assertEqual(len(self.endpoint.protocols), 1)

    def test_cancelled_not_retried(self):
        """A cancelled request is not sent again."""
        first = self.call()
        d = self.pool.request("a", self.endpoint, get())
        d.cancel()
        self.failureResultOf(d, ResponseNeverReceived)
        first.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.endpoint.protocols), 1)

    def test_post_not_retried(self):
        """A POST that finds its reused connection closed fails: it may have been acted on."""
        self.call()
        post = Request(b"POST", b"/", Headers({b"host": [b"o"]}), None, persistent=True)
        d = self.pool.request("a", self.endpoint, post)
        self.endpoint.protocols[0].connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d)
        self.assertEqual(len(self.endpoint.protocols), 1)

    def test_keeps_nothing(self):
        """With C{max_idle} 0 a connection is closed once its response is read."""
        pool = OriginPool(self.reactor, max_idle=0)
        d = pool.request("a", self.endpoint, get())
        [protocol] = self.endpoint.protocols
        protocol.dataReceived(OK)
        self.successResultOf(readBody(self.successResultOf(d)))
        self.assertTrue(protocol.transport.disconnecting)
        self.assertEqual(pool.idle("a"), 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_close(self):
        """close() aborts the idle connections, cancels the timer and fires."""
        first = self.call()
        d = self.pool.close()
        self.assertTrue(first.transport.disconnecting)
        first.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.pool.idle("a"), 0)

    def test_quiet_factory(self):
        """No "Starting factory" log line per outbound connection."""
        factories = []

        class Recording(FakeEndpoint):
            def connect(self, factory):
                factories.append(factory)
                return super().connect(factory)

        self.endpoint = Recording()
        self.call()
        self.assertFalse(factories[0].noisy)

    def test_defaults_keep_a_busy_workers_connections(self):
        """
        The forwarder's and the STS client's own pools keep
        L{IDLE_PER_ORIGIN} idle connections per origin, enough for the calls
        a busy worker has in flight (fewer made it open and close
        connections under load).
        """
        reactor = MemoryReactorClock()
        forwarder = Forwarder(reactor, None, timeout=5.0)
        client = STSClient("http://127.0.0.1:9", reactor)
        for pool in (forwarder.pool, client.pool):
            self.assertIsInstance(pool, OriginPool)
            self.assertEqual(pool.max_idle, IDLE_PER_ORIGIN)
        self.assertGreaterEqual(IDLE_PER_ORIGIN, 64)


class PooledAgentTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.endpoints = []

        def endpoint_for(uri):
            endpoint = FakeEndpoint()
            self.endpoints.append((uri.scheme, uri.host, uri.port, endpoint))
            return endpoint

        self.agent = PooledAgent(OriginPool(self.reactor), endpoint_for)

    def test_interface(self):
        """It is an L{IAgent}, so treq can use it."""
        verifyObject(IAgent, self.agent)

    def test_request_line_and_host(self):
        """The request goes in origin form with the Host header the Agent would add."""
        self.agent.request(b"POST", b"http://sts.test:8080/oauth/2/token?x=1")
        [(_s, _h, _p, endpoint)] = self.endpoints
        sent = endpoint.protocols[0].transport.value()
        self.assertTrue(sent.startswith(b"POST /oauth/2/token?x=1 HTTP/1.1\r\n"), sent)
        self.assertIn(b"\r\nHost: sts.test:8080\r\n", sent)

    def test_given_host_kept(self):
        """A Host header given with the request is sent as given, once."""
        self.agent.request(b"GET", b"http://sts.test/x", Headers({b"host": [b"other"]}))
        sent = self.endpoints[0][3].protocols[0].transport.value()
        self.assertEqual(sent.count(b"Host:"), 1)
        self.assertIn(b"\r\nHost: other\r\n", sent)

    def test_endpoint_made_once_per_origin(self):
        """One endpoint per origin (scheme, host, port), made on first use and reused."""
        for uri in (
            b"http://sts.test:8080/a",
            b"http://sts.test:8080/b",
            b"http://sts.test:8081/a",
        ):
            self.agent.request(b"GET", uri)
        origins = [(s, h, p) for s, h, p, _e in self.endpoints]
        self.assertEqual(origins, [(b"http", b"sts.test", 8080), (b"http", b"sts.test", 8081)])

    def test_other_scheme_refused(self):
        """Only http and https: anything else fails before any connection."""
        self.failureResultOf(self.agent.request(b"GET", b"ftp://sts.test/x"), SchemeNotSupported)
        self.assertEqual(self.endpoints, [])

    def test_bad_method_fails(self):
        """A method Twisted would not write fails the request instead of raising."""
        self.failureResultOf(self.agent.request(b"G T", b"http://sts.test/x"), ValueError)

    def test_host_value(self):
        """Host: the port only when not the scheme's default; IPv6 in brackets."""
        cases = {
            b"http://a.test/": b"a.test",
            b"https://a.test:443/": b"a.test",
            b"https://a.test:8443/": b"a.test:8443",
            b"http://[::1]:8080/": b"[::1]:8080",
        }
        for uri, host in cases.items():
            self.assertEqual(host_value(URI.fromBytes(uri)), host, uri)
