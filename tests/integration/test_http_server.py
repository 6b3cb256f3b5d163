# -*- test-case-name: tests.integration.test_http_server -*-
"""
L{GatewaySite} on a real listening socket on 127.0.0.1: a client trickling
its headers is cut at READ_HEADER_TIMEOUT while another is served, and a
20 MB body is refused with 413 at once; a request with both
Content-Length and Transfer-Encoding, or in a forward-proxy form, gets the
JSON 400 with its own id.
"""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from caracal.gateway.config import GatewayConfig
from caracal.gateway.http import GatewaySite
from caracal.gateway.metrics import Metrics

HEADER_TIMEOUT = 0.5
TWENTY_MB = 20 * 1024 * 1024


class Hello(Resource):
    """Answers C{hello}; counts the times it was called."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def render(self, request):
        self.calls += 1
        request.setHeader(b"content-type", b"text/plain")
        return b"hello"


class RawClient(Protocol):
    """Collects what the server sends and when the connection ended."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred = Deferred()
        self.lost_at: float | None = None
        self.first_byte_at: float | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = reactor.seconds()
        self.received += data

    def connectionLost(self, reason) -> None:
        self.lost_at = reactor.seconds()
        self.lost.callback(self.received)


class HTTPServerTests(TestCase):
    """A real GatewaySite listening on 127.0.0.1:0."""

    def setUp(self) -> None:
        self.resource = Hello()
        self.metrics = Metrics()
        config = GatewayConfig(
            bind_address="127.0.0.1",
            max_request_bytes=1024 * 1024,
            read_header_timeout=HEADER_TIMEOUT,
            read_timeout=5.0,
            write_timeout=5.0,
            idle_timeout=5.0,
        )
        self.site = GatewaySite(self.resource, config, self.metrics, clock=reactor)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.wait_for_server_connections)
        self.addCleanup(self.port.stopListening)

    @inlineCallbacks
    def wait_for_server_connections(self):
        # Leave no server-side connection (nor its timers) behind the test.
        for _ in range(300):
            if not self.site._channels:
                return
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail("server connections still open")

    def connect(self) -> Deferred:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        return connectProtocol(endpoint, RawClient())

    @inlineCallbacks
    def test_slow_headers_cut_while_normal_client_served(self):
        """A client trickling its headers is cut while a normal client is served."""
        slow = yield self.connect()
        opened_at = reactor.seconds()
        slow.transport.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        trickle = iter(b"X-Trickle: " + b"a" * 1000)
        drip = LoopingCall(lambda: slow.transport.write(bytes([next(trickle)])))
        drip.start(0.05)
        slow.lost.addBoth(lambda result: (drip.running and drip.stop(), result)[1])

        yield deferLater(reactor, 0.2, lambda: None)
        normal = yield self.connect()
        normal.transport.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = yield normal.lost
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        self.assertTrue(answer.endswith(b"\r\n\r\nhello"), answer)
        self.assertIsNone(slow.lost_at, "the slow client must still be connected here")

        cut = yield slow.lost
        elapsed = slow.lost_at - opened_at
        self.assertGreaterEqual(elapsed, HEADER_TIMEOUT - 0.05)
        self.assertLess(elapsed, HEADER_TIMEOUT + 1.5)
        self.assertTrue(cut.startswith(b"HTTP/1.1 408 "), cut)
        self.assertEqual(self.resource.calls, 1)

    @inlineCallbacks
    def test_20mb_content_length_refused_at_once(self):
        """A 20 MB Content-Length is refused at once, before the body."""
        client = yield self.connect()
        sent_at = reactor.seconds()
        client.transport.write(
            b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: big-upload\r\n"
            b"Content-Length: %d\r\n\r\n" % (TWENTY_MB,)
        )
        answer = yield client.lost
        self.assertLess(client.first_byte_at - sent_at, 1.0)
        self.assertLess(client.lost_at - sent_at, 1.5)
        self.assertPayloadTooLarge(answer)

    @inlineCallbacks
    def test_20mb_body_sent_in_full_still_gets_413(self):
        # A client that writes its whole body before reading still gets the
        # 413: the refused body is read and dropped, never stored.
        """A client that sends its whole 20 MB body first still gets the 413."""
        client = yield self.connect()
        sent_at = reactor.seconds()
        client.transport.write(
            b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: big-upload\r\n"
            b"Content-Length: %d\r\n\r\n" % (TWENTY_MB,) + b"\0" * TWENTY_MB
        )
        answer = yield client.lost
        self.assertLess(client.lost_at - sent_at, 3.0)
        self.assertPayloadTooLarge(answer)

    @inlineCallbacks
    def test_smuggling_framing_refused_with_envelope(self):
        # Content-Length with Transfer-Encoding (a request-smuggling shape):
        # the JSON 400 carries the caller's id, the connection ends, and the
        # body bytes are never taken for a second request.
        """Content-Length with Transfer-Encoding is a JSON 400 that ends the connection."""
        client = yield self.connect()
        client.transport.write(
            b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: smuggle-1\r\n"
            b"Content-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /inner HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        answer = yield client.lost
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 400 "), head)
        self.assertIn(b"\r\nX-Request-Id: smuggle-1", head)
        self.assertEqual(
            json.loads(body),
            {
                "error": "invalid_request",
                "description": "malformed request",
                "request_id": "smuggle-1",
            },
        )
        self.assertEqual(self.resource.calls, 0)
        self.assertEqual(self.metrics.counters["requests_total"], 1)
        self.assertEqual(self.metrics.counters["requests_denied"], 1)

    @inlineCallbacks
    def test_forward_proxy_forms_refused(self):
        # The gateway is not a forward proxy: an absolute-form target or a
        # CONNECT (405, SPEC 12 H2) never reaches the resource, and neither
        # does an HTTP/1.1 request without Host.
        """
        Absolute-form targets, CONNECT and Host-less HTTP/1.1 requests never reach the resource.
        """
        for raw, status, error in (
            (
                b"GET http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\n",
                400,
                "invalid_request",
            ),
            (
                b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n",
                405,
                "method_not_allowed",
            ),
            (b"GET /x HTTP/1.1\r\n", 400, "invalid_request"),
        ):
            client = yield self.connect()
            client.transport.write(raw + b"X-Request-Id: proxy-form\r\n\r\n")
            answer = yield client.lost
            head, _, body = answer.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 %d " % (status,)), raw)
            self.assertIn(b"\r\nX-Request-Id: proxy-form", head)
            self.assertEqual(json.loads(body)["error"], error)
        self.assertEqual(self.resource.calls, 0)
        self.assertEqual(self.metrics.counters["requests_denied"], 3)

    def assertPayloadTooLarge(self, answer: bytes) -> None:
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
        self.assertIn(b"\r\nX-Request-Id: big-upload", head)
        self.assertEqual(json.loads(body)["error"], "payload_too_large")
        self.assertEqual(self.resource.calls, 0)
        self.assertEqual(self.metrics.counters["requests_denied"], 1)
