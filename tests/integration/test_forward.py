# -*- test-case-name: tests.integration.test_forward -*-
"""
Integration tests for L{caracal.gateway.forward.Forwarder} and
L{caracal.gateway.upstream.UpstreamGuard} over real sockets on 127.0.0.1: a
raw HTTP client talks to a small gateway-side site that forwards every
request to a real local upstream (L{tests.support.upstreams}).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web import server
from twisted.web.resource import Resource

from caracal.gateway.denials import Denial, denial_body
from caracal.gateway.forward import Forwarder, credential_headers
from caracal.gateway.metrics import Metrics
from caracal.gateway.sts import Mandate
from caracal.gateway.tls import client_tls_policy
from caracal.gateway.upstream import (
    PinnedUpstream,
    UpstreamGuard,
    UpstreamRefused,
    parse_upstream,
)
from tests.support.certs import make_authority, make_leaf
from tests.support.metrics import upstream_observations
from tests.support.resources import tool_resource
from tests.support.responses import parse_response
from tests.support.upstreams import LocalUpstream, TrackingSite
from tests.support.waiting import wait_until

TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


MANDATE = Mandate(access_token="mandate-jwt", provider_token="provider-secret")


def pin(url: str, address: str = "127.0.0.1") -> PinnedUpstream:
    return PinnedUpstream(parse_upstream(url), address, socket.AF_INET)


class _Forwarding(Resource):
    """The gateway side: every request is forwarded as C{route} says."""

    isLeaf = True

    def __init__(self, forwarder: Forwarder) -> None:
        Resource.__init__(self)
        self.forwarder = forwarder
        self.route = None
        self.requests = []
        self.results = []

    def render(self, request):
        request.request_id = "req-test"
        request.log_fields = {}
        self.requests.append(request)
        pinned, credentials, expires_in, watch = self.route(request)
        d = self.forwarder.forward(request, pinned, credentials, expires_in, watch)
        outcome = []
        self.results.append(outcome)

        def done(result):
            outcome.append(result)

        def denied(failure):
            failure.trap(Denial)
            outcome.append(failure.value)
            request.write(denial_body(request, failure.value))
            request.finish()

        d.addCallbacks(done, denied)
        return server.NOT_DONE_YET


class RawClient(Protocol):
    """Sends bytes, keeps every byte received; the test reads them raw."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: defer.Deferred[bytes] = defer.Deferred()
        self._waiters: list[tuple[bytes, defer.Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for needle, d in list(self._waiters):
            if needle in self.data:
                self._waiters.remove((needle, d))
                d.callback(self.data)

    def connectionLost(self, reason) -> None:
        waiting, self._waiters = self._waiters, []
        for needle, d in waiting:
            d.errback(AssertionError(f"connection closed before {needle!r}: {self.data!r}"))
        self.closed.callback(self.data)

    def wait_for(self, needle: bytes, timeout: float = 5.0) -> defer.Deferred[bytes]:
        if needle in self.data:
            return defer.succeed(self.data)
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiters.append((needle, d))
        return d.addTimeout(timeout, reactor)


class Harness(TestCase):
    """A forwarder between a raw client and a real local upstream."""

    timeout = 30
    upstream_timeout = 5.0

    def setUp(self):
        self.metrics = Metrics()
        self.policy = client_tls_policy(None)
        self.forwarder = Forwarder(reactor, self.policy, self.upstream_timeout, self.metrics)
        self.addCleanup(self.forwarder.close)
        self.gateway = _Forwarding(self.forwarder)
        self.gateway_site = TrackingSite(self.gateway)
        self.gateway_port = reactor.listenTCP(0, self.gateway_site, interface="127.0.0.1")
        self.addCleanup(self.gateway_port.stopListening)
        self.addCleanup(self.gateway_site.drop_all)
        self.upstream = self.start_upstream()
        self.clients: list[RawClient] = []
        self.addCleanup(self._drop_clients)

    def start_upstream(self, leaf=None) -> LocalUpstream:
        upstream = LocalUpstream(reactor, leaf).start()
        self.addCleanup(upstream.stop)
        return upstream

    def _drop_clients(self):
        open_clients = [c for c in self.clients if not c.closed.called]
        for client in open_clients:
            client.transport.abortConnection()
        return defer.gatherResults([c.closed for c in open_clients])

    def route_to(self, url, credentials=(), expires_in=300, watch=None, address="127.0.0.1"):
        pinned = pin(url, address)
        self.gateway.route = lambda request: (pinned, list(credentials), expires_in, watch)
        return pinned

    @defer.inlineCallbacks
    def connect(self):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.gateway_port.getHost().port)
        client = yield endpoint.connect(Factory.forProtocol(RawClient))
        self.clients.append(client)
        return client

    @defer.inlineCallbacks
    def exchange(self, request: bytes):
        """Send one request with Connection: close; return the parsed answer."""
        client = yield self.connect()
        client.transport.write(request)
        raw = yield client.closed.addTimeout(10, reactor)
        return parse_response(raw)

    def echo_seen(self, body: bytes) -> dict:
        seen = json.loads(body)
        headers: dict[str, list[str]] = {}
        for name, value in seen["headers"]:
            headers.setdefault(name, []).append(value)
        seen["headers"] = headers
        return seen


class ForwardingTests(Harness):
    """Forwarding over plaintext HTTP."""

    # -- request side ------------------------------------------------------

    @defer.inlineCallbacks
    def test_echo_caracal_jwt(self):
        """
        Path joined, query merged (upstream wins), hop-by-hop and X-Caracal-*
        gone, the caller's bearer replaced by the mandate, X-Forwarded-For
        replaced, and the body intact.
        """
        self.route_to(
            self.upstream.url("/api?fixed=up&v=1"),
            credential_headers(tool_resource(), MANDATE),
            expires_in=300,
        )
        body = b'{"hello": "world"}'
        status, headers, answer, _ = yield self.exchange(
            b"POST /tools/x?fixed=caller&q=2 HTTP/1.1\r\n"
            b"Host: gateway.test\r\n"
            b"Authorization: Bearer caller-token\r\n"
            b"X-Caracal-Resource: tools\r\n"
            b"X-Caracal-Identity: forged\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\n"
            b"Connection: X-Hop, close\r\n"
            b"X-Hop: secret-hop\r\n"
            b"Keep-Alive: timeout=1\r\n"
            b"TE: trailers\r\n"
            b"Proxy-Authorization: Basic eDp5\r\n"
            b"X-End-To-End: kept\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.assertEqual(status, 200)
        seen = self.echo_seen(answer)
        self.assertEqual(seen["method"], "POST")
        self.assertEqual(seen["path"], "/api/tools/x")
        self.assertEqual(seen["query"], "fixed=up&v=1&q=2")
        sent = seen["headers"]
        self.assertEqual(sent["authorization"], ["Bearer mandate-jwt"])
        self.assertEqual(sent["x-forwarded-for"], ["127.0.0.1"])
        self.assertEqual(sent["x-forwarded-proto"], ["http"])
        self.assertEqual(sent["x-forwarded-host"], ["gateway.test"])
        self.assertEqual(sent["host"], [f"127.0.0.1:{self.upstream.port}"])
        self.assertEqual(sent["x-request-id"], ["req-test"])
        self.assertEqual(sent["x-end-to-end"], ["kept"])
        [trace] = sent["traceparent"]
        self.assertRegex(trace, TRACEPARENT)
        for name in ("x-hop", "keep-alive", "te", "proxy-authorization", "connection"):
            self.assertNotIn(name, sent)
        self.assertFalse([n for n in sent if n.startswith("x-caracal-")])
        self.assertNotIn("caller-token", answer.decode())
        self.assertEqual(seen["body_length"], len(body))
        self.assertEqual(seen["body_sha256"], hashlib.sha256(body).hexdigest())
        # The response side.
        self.assertEqual(headers[b"x-upstream"], [b"echo"])
        self.assertEqual(headers[b"content-length"], [b"%d" % len(answer)])
        self.assertNotIn(b"transfer-encoding", headers)
        for name in (b"x-caracal-identity", b"x-up-hop", b"keep-alive", b"proxy-authenticate"):
            self.assertNotIn(name, headers)
        [left] = headers[b"x-caracal-token-expires-in"]
        self.assertIn(int(left), (299, 300))
        [outcome] = self.gateway.results
        self.assertEqual(outcome, [None])
        [request] = self.gateway.requests
        self.assertIsInstance(request.log_fields["upstream_ms"], float)
        self.assertEqual(upstream_observations(self.metrics), 1)

    @defer.inlineCallbacks
    def test_provider_apikey(self):
        """The provider token in the resource's header, the mandate as identity."""
        self.route_to(
            self.upstream.url("/"),
            credential_headers(tool_resource("provider_apikey", auth_header="X-Api-Key"), MANDATE),
        )
        _, _, answer, _ = yield self.exchange(
            b"GET /x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n"
            b"Authorization: Bearer caller-token\r\nX-Api-Key: caller-key\r\n\r\n"
        )
        sent = self.echo_seen(answer)["headers"]
        self.assertEqual(sent["x-api-key"], ["provider-secret"])
        self.assertEqual(sent["x-caracal-identity"], ["mandate-jwt"])
        self.assertNotIn("authorization", sent)
        self.assertNotIn("content-length", sent)  # a GET stays without a body

    @defer.inlineCallbacks
    def test_spooled_body(self):
        """A body big enough to be spooled to a file arrives whole."""
        self.route_to(self.upstream.url("/"))
        body = os.urandom(300 * 1024)
        _, _, answer, _ = yield self.exchange(
            b"PUT /upload HTTP/1.1\r\nHost: g\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        seen = self.echo_seen(answer)
        self.assertEqual(seen["body_length"], len(body))
        self.assertEqual(seen["body_sha256"], hashlib.sha256(body).hexdigest())

    @defer.inlineCallbacks
    def test_upstream_errors_pass_through(self):
        """An upstream 5xx is the upstream's answer, not a gateway error."""
        self.route_to(self.upstream.url("/"))
        status, headers, body, _ = yield self.exchange(
            b"GET /status?code=503 HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual((status, body), (503, b"upstream says 503"))
        self.assertEqual(self.metrics.counters["upstream_errors"], 0)
        status, headers, body, _ = yield self.exchange(
            b"GET /status?code=204 HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual((status, body), (204, b""))
        status, headers, body, _ = yield self.exchange(
            b"HEAD /x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual((status, body), (200, b""))
        self.assertIn(b"x-caracal-token-expires-in", headers)

    @defer.inlineCallbacks
    def test_pooled(self):
        """Sequential forwards to one upstream share one TCP connection."""
        self.route_to(self.upstream.url("/"))
        ports = []
        for _ in range(3):
            _, _, answer, _ = yield self.exchange(
                b"GET /x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
            )
            ports.append(self.echo_seen(answer)["client_port"])
        self.assertEqual(self.upstream.connections, 1)
        self.assertEqual(len(set(ports)), 1)

    @defer.inlineCallbacks
    def test_pooled_connection_hop_by_hop(self):
        """
        Headers the upstream names in Connection stay hop-by-hop on a reused
        pooled connection too (Twisted wraps those in a retrying protocol).
        """
        self.route_to(self.upstream.url("/"))
        for _ in range(3):
            _, headers, _, _ = yield self.exchange(
                b"GET /x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
            )
            self.assertNotIn(b"x-up-hop", headers)
            self.assertNotIn(b"keep-alive", headers)
        self.assertEqual(self.upstream.connections, 1)

    # -- failures before the response --------------------------------------

    @defer.inlineCallbacks
    def test_refused_port(self):
        """Nothing listening: 502 upstream_unreachable."""
        probe = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        port = probe.getHost().port
        yield probe.stopListening()
        self.route_to(f"http://127.0.0.1:{port}/")
        status, headers, body, _ = yield self.exchange(
            b"GET /x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(status, 502)
        self.assertEqual(json.loads(body)["error"], "upstream_unreachable")
        [[denial]] = self.gateway.results
        self.assertEqual((denial.status, denial.metric), (502, "upstream_errors"))

    # -- streaming ---------------------------------------------------------

    def watcher(self):
        """A watch_revocation double: keeps the cut callback, counts cancels."""
        state = {"cut": None, "cancelled": 0}

        def watch(cut):
            state["cut"] = cut

            def cancel():
                state["cancelled"] += 1

            return cancel

        return state, watch

    @defer.inlineCallbacks
    def test_sse_event_by_event(self):
        """Each event reaches the client before the upstream writes the next."""
        state, watch = self.watcher()
        self.route_to(self.upstream.url("/"), watch=watch)
        opened = self.upstream.next_sse()
        client = yield self.connect()
        client.transport.write(b"GET /events/sse HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
        stream = yield opened.addTimeout(5, reactor)
        yield client.wait_for(b"\r\n\r\n")  # the head comes before any event
        self.assertNotIn(b"data:", client.data)
        stream.send(b"data: one\n\n")
        yield client.wait_for(b"data: one\n\n")
        self.assertEqual(stream.sent, [b"data: one\n\n"])
        stream.send(b"data: two\n\n")
        yield client.wait_for(b"data: two\n\n")
        stream.finish()
        raw = yield client.closed.addTimeout(5, reactor)
        status, headers, body, trailers = parse_response(raw)
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-type"], [b"text/event-stream"])
        self.assertEqual(headers[b"trailer"], [b"X-Caracal-Revoked"])
        self.assertEqual(body, b"data: one\n\ndata: two\n\n")
        self.assertEqual(trailers, {})
        self.assertEqual(state["cancelled"], 1)
        self.assertEqual(self.gateway.results, [[None]])

    @defer.inlineCallbacks
    def test_revocation_cuts_stream(self):
        """A revocation mid-stream ends it with the trailer and drops the upstream."""
        state, watch = self.watcher()
        self.route_to(self.upstream.url("/"), watch=watch)
        opened = self.upstream.next_sse()
        client = yield self.connect()
        client.transport.write(b"GET /sse HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
        stream = yield opened.addTimeout(5, reactor)
        stream.send(b"data: one\n\n")
        yield client.wait_for(b"data: one\n\n")
        state["cut"]()
        raw = yield client.closed.addTimeout(5, reactor)
        yield stream.closed.addTimeout(5, reactor)  # the upstream connection was dropped
        self.assertFalse(stream.open)
        status, headers, body, trailers = parse_response(raw)
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"trailer"], [b"X-Caracal-Revoked"])
        self.assertEqual(body, b"data: one\n\n")
        self.assertEqual(trailers, {b"x-caracal-revoked": b"true"})
        self.assertTrue(raw.endswith(b"0\r\nX-Caracal-Revoked: true\r\n\r\n"))
        self.assertEqual(state["cancelled"], 1)
        self.assertEqual(self.gateway.requests[0].log_fields["upstream_cut"], "session_revoked")

    @defer.inlineCallbacks
    def test_revocation_cuts_fixed_length(self):
        """A body with a length cannot carry a trailer: the connection is closed."""
        state, watch = self.watcher()
        self.route_to(self.upstream.url("/"), watch=watch)
        client = yield self.connect()
        client.transport.write(
            b"GET /big?bytes=%d HTTP/1.1\r\nHost: g\r\n\r\n" % (256 * 1024 * 1024)
        )
        yield client.wait_for(b"xxxx")
        client.transport.pauseProducing()
        state["cut"]()
        client.transport.resumeProducing()
        raw = yield client.closed.addTimeout(10, reactor)
        status, headers, body_received, _ = parse_response(raw)
        self.assertEqual(status, 200)
        self.assertNotIn(b"trailer", headers)
        self.assertNotIn(b"transfer-encoding", headers)
        # The client can tell the body was cut: fewer bytes than announced.
        self.assertEqual(headers[b"content-length"], [b"%d" % (256 * 1024 * 1024)])
        self.assertLess(len(body_received), 256 * 1024 * 1024)
        self.assertEqual(state["cancelled"], 1)
        [body] = self.upstream.bodies
        yield body.closed.addTimeout(5, reactor)

    @defer.inlineCallbacks
    def test_client_gone_stops_upstream(self):
        """A client hanging up mid-stream drops the upstream transfer."""
        self.route_to(self.upstream.url("/"))
        opened = self.upstream.next_sse()
        client = yield self.connect()
        client.transport.write(b"GET /sse HTTP/1.1\r\nHost: g\r\n\r\n")
        stream = yield opened.addTimeout(5, reactor)
        stream.send(b"data: one\n\n")
        yield client.wait_for(b"data: one\n\n")
        client.transport.abortConnection()
        yield stream.closed.addTimeout(5, reactor)
        self.assertFalse(stream.open)
        self.assertEqual(self.gateway.results, [[None]])

    @defer.inlineCallbacks
    def test_back_pressure(self):
        """
        A client that does not read pauses the upstream: the upstream's
        producer is paused, most of the body is never sent, and the gateway's
        buffer towards the client stays small.
        """
        total = 256 * 1024 * 1024
        self.route_to(self.upstream.url("/"))
        client = yield self.connect()
        client.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        client.transport.pauseProducing()  # never read
        client.transport.write(b"GET /big?bytes=%d HTTP/1.1\r\nHost: g\r\n\r\n" % total)
        deadline = time.monotonic() + 15
        last = -1
        while True:
            yield deferLater(reactor, 0.1, lambda: None)
            bodies = self.upstream.bodies
            if bodies and bodies[0].paused and bodies[0].written == last:
                break
            last = bodies[0].written if bodies else -1
            self.assertLess(time.monotonic(), deadline, "the upstream was never held back")
        [body] = self.upstream.bodies
        self.assertGreaterEqual(body.pauses, 1)
        self.assertLess(body.written, total // 4)
        [request] = self.gateway.requests
        towards_client = request.transport
        buffered = len(towards_client.dataBuffer) + towards_client._tempDataLen
        self.assertLess(buffered, 1024 * 1024)
        client.transport.abortConnection()
        yield body.closed.addTimeout(5, reactor)


class SlowUpstreamTests(Harness):
    """No response headers within the timeout: 504 and the upstream dropped."""

    upstream_timeout = 0.3

    @defer.inlineCallbacks
    def test_timeout(self):
        """An upstream slower than UPSTREAM_TIMEOUT gets the client a 504 in about that time."""
        self.route_to(self.upstream.url("/"))
        started = time.monotonic()
        status, headers, body, _ = yield self.exchange(
            b"GET /slow HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
        )
        elapsed = time.monotonic() - started
        self.assertEqual(status, 504)
        self.assertEqual(json.loads(body)["error"], "upstream_timeout")
        self.assertGreaterEqual(elapsed, 0.3)
        self.assertLess(elapsed, 3)
        [(_request, closed)] = self.upstream.slow
        yield closed.addTimeout(5, reactor)

    @defer.inlineCallbacks
    def test_client_gone_while_waiting(self):
        """A client hanging up before the headers cancels the upstream request."""
        self.route_to(self.upstream.url("/"))
        client = yield self.connect()
        client.transport.write(b"GET /slow HTTP/1.1\r\nHost: g\r\n\r\n")
        yield wait_until(lambda: self.upstream.slow)
        client.transport.abortConnection()
        [(_request, closed)] = self.upstream.slow
        yield closed.addTimeout(5, reactor)
        yield wait_until(lambda: self.gateway.results[0])
        self.assertEqual(self.gateway.results, [[None]])
        self.assertEqual(self.metrics.counters["upstream_errors"], 0)


class RevokedWhileWaitingTests(Harness):
    """A revocation before the upstream answered: 401, the upstream dropped."""

    @defer.inlineCallbacks
    def test_revoked_before_headers(self):
        """A revocation before the upstream's headers is a 401 session_revoked."""
        cuts = []

        def watch(cut):
            cuts.append(cut)
            return lambda: None

        self.route_to(self.upstream.url("/"), watch=watch)
        client = yield self.connect()
        client.transport.write(b"GET /slow HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
        yield wait_until(lambda: self.upstream.slow)
        cuts[0]()
        raw = yield client.closed.addTimeout(5, reactor)
        status, headers, body, _ = parse_response(raw)
        self.assertEqual(status, 401)
        self.assertEqual(json.loads(body)["error"], "session_revoked")
        [(_request, closed)] = self.upstream.slow
        yield closed.addTimeout(5, reactor)


class TLSUpstreamTests(Harness):
    """https upstreams: the name is verified while the address is pinned."""

    def setUp(self):
        self.root = make_authority()
        ca_file = self.mktemp()
        with open(ca_file, "wb") as f:
            f.write(self.root.pem)
        Harness.setUp(self)
        self.forwarder = Forwarder(reactor, client_tls_policy(ca_file), 5.0, self.metrics)
        self.addCleanup(self.forwarder.close)
        self.gateway.forwarder = self.forwarder

    @defer.inlineCallbacks
    def test_localhost_verified(self):
        """An https upstream whose certificate names the host is reached."""
        upstream = self.start_upstream(make_leaf(self.root, hostnames=("localhost",), addresses=()))
        self.route_to(upstream.url("/api", host="localhost"))
        status, _, answer, _ = yield self.exchange(
            b"GET /x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(status, 200)
        seen = self.echo_seen(answer)
        self.assertEqual(seen["path"], "/api/x")
        self.assertEqual(seen["headers"]["host"], [f"localhost:{upstream.port}"])

    @defer.inlineCallbacks
    def test_wrong_name_refused(self):
        """An https upstream whose certificate names another host is refused."""
        leaf = make_leaf(self.root, hostnames=("other.example",), addresses=())
        upstream = self.start_upstream(leaf)
        self.route_to(upstream.url("/", host="localhost"))
        status, _, body, _ = yield self.exchange(
            b"GET /x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(status, 502)
        self.assertEqual(json.loads(body)["error"], "upstream_unreachable")

    @defer.inlineCallbacks
    def test_untrusted_issuer_refused(self):
        """An https upstream with a certificate from an unknown CA is refused."""
        stranger = make_authority("Someone Else")
        upstream = self.start_upstream(make_leaf(stranger, hostnames=("localhost",)))
        self.route_to(upstream.url("/", host="localhost"))
        status, _, body, _ = yield self.exchange(
            b"GET /x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(status, 502)


class GuardTests(TestCase):
    """L{UpstreamGuard} with the real resolver against a live counting server."""

    timeout = 15

    def setUp(self):
        self.upstream = LocalUpstream(reactor).start()
        self.addCleanup(self.upstream.stop)

    @defer.inlineCallbacks
    def assertRefused(self, guard, url, reason):
        try:
            yield guard.check(url)
        except UpstreamRefused as refused:
            self.assertEqual(refused.reason, reason)
        else:
            self.fail(f"{url} was allowed")

    @defer.inlineCallbacks
    def test_loopback_refused_without_connecting(self):
        """Loopback upstreams, in any spelling, are refused without connecting."""
        guard = UpstreamGuard(reactor.nameResolver)
        port = self.upstream.port
        for url in (
            f"http://127.0.0.1:{port}/",
            f"http://0x7f.1:{port}/",
            f"http://2130706433:{port}/",
            f"http://localhost:{port}/",  # resolved, then refused
        ):
            yield self.assertRefused(guard, url, "private_address")
        self.assertEqual(self.upstream.connections, 0)

    @defer.inlineCallbacks
    def test_allow_private_then_forward(self):
        """The same URL with private upstreams allowed is pinned and reached."""
        guard = UpstreamGuard(reactor.nameResolver, allow_private=True)
        pinned = yield guard.check(f"http://localhost:{self.upstream.port}/echo")
        self.assertEqual(pinned.url.host, "localhost")
        self.assertIn(pinned.address, ("127.0.0.1", "::1"))
        pinned = yield guard.check(f"http://127.0.0.1:{self.upstream.port}/echo")
        self.assertEqual(self.upstream.connections, 0)  # checking never connects
        forwarder = Forwarder(reactor, client_tls_policy(None), 5.0)
        self.addCleanup(forwarder.close)
        gateway = _Forwarding(forwarder)
        gateway.route = lambda request: (pinned, [], 300, None)
        site = TrackingSite(gateway)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(site.drop_all)
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(RawClient)
        )
        client.transport.write(b"GET /x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n")
        raw = yield client.closed.addTimeout(5, reactor)
        self.assertEqual(parse_response(raw)[0], 200)
        self.assertEqual(self.upstream.connections, 1)


class _CannedUpstream(Protocol):
    """Answers every request head with its factory's next canned bytes."""

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self._seen = b""

    def dataReceived(self, data: bytes) -> None:
        self._seen += data
        while b"\r\n\r\n" in self._seen:
            _head, _, self._seen = self._seen.partition(b"\r\n\r\n")
            self.transport.write(self.factory.answers.pop(0))


class HostileUpstreamTests(Harness):
    """
    A real upstream answering with responses that could be read more than
    one way: the client gets a 502 or a visibly cut body, never a response
    framed differently from what the gateway read, and the connection is
    never reused.
    """

    def start_canned(self, *answers: bytes) -> Factory:
        factory = Factory.forProtocol(_CannedUpstream)
        factory.connections = 0
        factory.answers = list(answers)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.route_to(f"http://127.0.0.1:{port.getHost().port}/")
        return factory

    GOOD = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    @defer.inlineCallbacks
    def test_ambiguous_heads_refused(self):
        """Heads the gateway refuses to guess at: 502, and a new connection next time."""
        hostile = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\nX-A: b\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            b"HTTP/1.1 200 OK\r\n Content-Length: 3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nabc",
        ]
        upstream = self.start_canned(*[answer for h in hostile for answer in (h, self.GOOD)])
        for number, _answer in enumerate(hostile, 1):
            status, _headers, body, _ = yield self.exchange(
                b"GET /x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
            )
            self.assertEqual(status, 502, body)
            self.assertEqual(json.loads(body)["error"], "upstream_unreachable")
            status, _headers, body, _ = yield self.exchange(
                b"GET /x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
            )
            self.assertEqual((status, body), (200, b"ok"))
            # The refused answer's connection was dropped; the good one is kept.
            self.assertEqual(upstream.connections, number + 1)

    @defer.inlineCallbacks
    def test_smuggled_second_response_not_served(self):
        """
        Bytes after a complete response (a second response riding along) are
        never taken as the answer to the next request: that connection is
        dropped and the next request goes on a new one.
        """
        smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nSMUGGLE"
        upstream = self.start_canned(self.GOOD + smuggled, self.GOOD)
        for _ in range(2):
            status, _headers, body, _ = yield self.exchange(
                b"GET /x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
            )
            self.assertEqual((status, body), (200, b"ok"))
        self.assertEqual(upstream.connections, 2)

    @defer.inlineCallbacks
    def test_malformed_chunk_cuts_the_body(self):
        """A bad chunk mid-body: the client's body ends without its last chunk."""
        upstream = self.start_canned(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\nxx\r\n0\r\n\r\n"
        )
        client = yield self.connect()
        client.transport.write(b"GET /x HTTP/1.1\r\nHost: g\r\n\r\n")
        raw = yield client.closed.addTimeout(10, reactor)
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw)
        self.assertIn(b"\r\n2\r\nok\r\n", raw)
        self.assertFalse(raw.endswith(b"0\r\n\r\n"), raw)
        self.assertEqual(upstream.connections, 1)
