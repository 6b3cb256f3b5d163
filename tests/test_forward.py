# -*- test-case-name: tests.test_forward -*-
"""
Tests for the pure parts of L{caracal.gateway.forward}: target path, query
merge, header hygiene both ways and the credential by auth mode.
"""

from __future__ import annotations

import re

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from caracal.gateway.config import GatewayConfig
from caracal.gateway.denials import Denial
from caracal.gateway.forward import (
    Forwarder,
    MissingProviderToken,
    credential_headers,
    forward_request_headers,
    make_traceparent,
    merge_query,
    response_headers,
    target_path,
)
from caracal.gateway.http import GatewaySite
from caracal.gateway.metrics import Metrics
from caracal.gateway.sts import Mandate
from caracal.gateway.upstream import PinnedUpstream, parse_upstream
from tests.support.metrics import upstream_observations
from tests.support.requests import client_request, written
from tests.support.resources import tool_resource

TARGET_PATHS = [
    (b"/api", b"/tools/x", b"/api/tools/x"),
    (b"/api/", b"/tools/x", b"/api/tools/x"),
    (b"/api//", b"/tools/x", b"/api/tools/x"),
    (b"/", b"/tools/x", b"/tools/x"),
    (b"", b"/tools/x", b"/tools/x"),
    (b"/api", b"/", b"/api/"),
    (b"/api", b"", b"/api"),
    (b"/", b"/", b"/"),
    (b"/", b"", b"/"),
    (b"/api", b"tools", b"/api/tools"),
    (b"/a%2Fb", b"/c%20d", b"/a%2Fb/c%20d"),
    (b"/api", b"//double", b"/api//double"),  # the caller's own path is kept
]

MERGED_QUERIES = [
    (b"", b"", b""),
    (b"a=1", b"", b"a=1"),
    (b"", b"b=2", b"b=2"),
    (b"a=1", b"b=2", b"a=1&b=2"),
    (b"a=1", b"a=2", b"a=1"),  # upstream wins
    (b"a=1", b"a=2&a=3&b=4", b"a=1&b=4"),
    (b"a=1&a=9", b"a=2", b"a=1&a=9"),
    (b"key=up", b"k%65y=down", b"key=up"),  # decoded keys compared
    (b"a+b=1", b"a%20b=2&c=3", b"a+b=1&c=3"),
    (b"flag", b"flag=1&x", b"flag&x"),
    (b"a=1&&", b"&&b=2", b"a=1&b=2"),
    (b"z=1&a=2", b"y=3&b=4", b"z=1&a=2&y=3&b=4"),  # order stable
    (b"a=%2F", b"b=%2f", b"a=%2F&b=%2f"),  # raw encodings kept
]


class PathAndQueryTests(SynchronousTestCase):
    """L{target_path} and L{merge_query}, table-driven."""

    def test_target_path(self):
        """
        The upstream base path and the request path join with exactly one slash, encoding kept.
        """
        for base, path, expected in TARGET_PATHS:
            self.assertEqual(target_path(base, path), expected, (base, path))

    def test_merge_query(self):
        """The upstream URL's query comes first, then the caller's, empty pairs dropped."""
        for upstream, request, expected in MERGED_QUERIES:
            self.assertEqual(merge_query(upstream, request), expected, (upstream, request))

    def test_merge_query_collisions(self):
        """
        SPEC 12 H10: an inbound parameter whose name equals a pinned one
        ignoring case or a trailing C{[]} (raw or percent-encoded) is
        dropped (and C{tenant[x]}, which replaces C{tenant} in the same
        frameworks); the upstream's value stands, other names pass.
        """
        for upstream, request, expected in (
            (b"tenant=acme", b"TENANT=evil", b"tenant=acme"),
            (b"tenant=acme", b"Tenant=evil&page=2", b"tenant=acme&page=2"),
            (b"tenant=acme", b"tenant[]=evil", b"tenant=acme"),
            (b"tenant=acme", b"tenant%5B%5D=evil", b"tenant=acme"),
            (b"tenant=acme", b"TeNaNt%5b%5d=evil", b"tenant=acme"),
            (b"tenant=acme", b"tenant[][]=evil", b"tenant=acme"),
            (b"ids[]=1", b"ids=2&IDS[]=3", b"ids[]=1"),
            (b"tenant=acme", b"tenant[x]=evil&tenants=ok&x[=1", b"tenant=acme&tenants=ok&x[=1"),
        ):
            self.assertEqual(merge_query(upstream, request), expected, (upstream, request))


TRACEPARENT = re.compile(rb"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def headers(*pairs) -> Headers:
    result = Headers()
    for name, value in pairs:
        result.addRawHeader(name, value)
    return result


def forwarded(inbound: Headers, **kwargs) -> dict[bytes, list[bytes]]:
    options = {
        "client_ip": "203.0.113.7",
        "proto": "https",
        "host": "api.example:8443",
        "request_id": "req-1",
    }
    options.update(kwargs)
    out = forward_request_headers(inbound, **options)
    return {name.lower(): values for name, values in out.getAllRawHeaders()}


class ForwardRequestHeadersTests(SynchronousTestCase):
    """L{forward_request_headers}: what reaches the upstream."""

    def test_end_to_end_headers_kept(self):
        """End-to-end request headers reach the upstream unchanged."""
        out = forwarded(
            headers(
                (b"Accept", b"text/event-stream"),
                (b"Content-Type", b"application/json"),
                (b"X-Custom", b"a"),
                (b"X-Custom", b"b"),
                (b"Cookie", b"c=1"),
                (b"tracestate", b"k=v"),
            )
        )
        self.assertEqual(out[b"accept"], [b"text/event-stream"])
        self.assertEqual(out[b"content-type"], [b"application/json"])
        self.assertEqual(out[b"x-custom"], [b"a", b"b"])
        self.assertEqual(out[b"cookie"], [b"c=1"])
        self.assertEqual(out[b"tracestate"], [b"k=v"])

    def test_hop_by_hop_removed(self):
        """Hop-by-hop headers, and every name a Connection header lists, are not forwarded."""
        out = forwarded(
            headers(
                (b"Connection", b"keep-alive, X-Hop"),
                (b"Connection", b"x-other"),
                (b"X-Hop", b"1"),
                (b"X-Other", b"1"),
                (b"Keep-Alive", b"timeout=5"),
                (b"Proxy-Connection", b"keep-alive"),
                (b"Proxy-Authenticate", b"Basic"),
                (b"Proxy-Authorization", b"Basic eDp5"),
                (b"TE", b"trailers"),
                (b"Trailer", b"X-T"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Upgrade", b"websocket"),
                (b"Content-Length", b"12"),
                (b"Expect", b"100-continue"),
                (b"X-Kept", b"yes"),
            )
        )
        for name in (
            b"connection",
            b"x-hop",
            b"x-other",
            b"keep-alive",
            b"proxy-connection",
            b"proxy-authenticate",
            b"proxy-authorization",
            b"te",
            b"trailer",
            b"transfer-encoding",
            b"upgrade",
            b"content-length",
            b"expect",
        ):
            self.assertNotIn(name, out)
        self.assertEqual(out[b"x-kept"], [b"yes"])

    def test_caller_bearer_and_caracal_headers_removed(self):
        """The caller's bearer and every X-Caracal-* header stay at the gateway."""
        out = forwarded(
            headers(
                (b"Authorization", b"Bearer caller-token"),
                (b"X-Caracal-Resource", b"tools"),
                (b"x-caracal-identity", b"forged"),
                (b"X-CARACAL-Client-ID", b"forged"),
                (b"X-Api-Key", b"caller-key"),
            ),
            drop=[b"X-Api-Key"],
        )
        self.assertNotIn(b"authorization", out)
        self.assertNotIn(b"x-api-key", out)
        self.assertFalse([n for n in out if n.startswith(b"x-caracal-")])

    def test_forwarding_headers_replaced(self):
        """Host and the X-Forwarded-* headers are the gateway's, never the caller's."""
        out = forwarded(
            headers(
                (b"Host", b"gateway.example"),
                (b"X-Forwarded-For", b"6.6.6.6"),
                (b"X-Forwarded-Proto", b"ftp"),
                (b"X-Forwarded-Host", b"evil.example"),
                (b"Forwarded", b"for=6.6.6.6"),
                (b"X-Real-IP", b"6.6.6.6"),
                (b"X-Request-Id", b"caller-id"),
            )
        )
        self.assertEqual(out[b"host"], [b"api.example:8443"])
        self.assertEqual(out[b"x-forwarded-for"], [b"203.0.113.7"])
        self.assertEqual(out[b"x-forwarded-proto"], [b"https"])
        self.assertEqual(out[b"x-forwarded-host"], [b"gateway.example"])
        self.assertEqual(out[b"x-request-id"], [b"req-1"])
        self.assertNotIn(b"forwarded", out)
        self.assertNotIn(b"x-real-ip", out)

    def test_no_inbound_host(self):
        """Without an inbound Host or client address those forwarding headers are left out."""
        out = forwarded(headers(), client_ip=None)
        self.assertNotIn(b"x-forwarded-host", out)
        self.assertNotIn(b"x-forwarded-for", out)
        self.assertEqual(out[b"host"], [b"api.example:8443"])

    def test_traceparent(self):
        """
        A valid traceparent and its tracestate pass; a malformed one is replaced and its tracestate
        dropped.
        """
        valid = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        out = forwarded(headers((b"traceparent", valid), (b"tracestate", b"k=v")))
        self.assertEqual(out[b"traceparent"], [valid])
        self.assertEqual(out[b"tracestate"], [b"k=v"])
        for bad in (
            b"garbage",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ):
            out = forwarded(headers((b"traceparent", bad), (b"tracestate", b"k=v")))
            [generated] = out[b"traceparent"]
            self.assertNotEqual(generated, bad)
            self.assertRegex(generated, TRACEPARENT)
            self.assertNotIn(b"tracestate", out)
        [generated] = forwarded(headers())[b"traceparent"]
        self.assertRegex(generated, TRACEPARENT)

    def test_make_traceparent_unique(self):
        """Each new traceparent is well-formed and different."""
        values = {make_traceparent() for _ in range(50)}
        self.assertEqual(len(values), 50)
        for value in values:
            self.assertRegex(value, TRACEPARENT)


class CredentialHeadersTests(SynchronousTestCase):
    """L{credential_headers} by auth mode."""

    def test_table(self):
        """Each auth mode, header and scheme gives its credential headers."""
        mandate = Mandate(access_token="mandate-jwt", provider_token="provider-secret")
        cases = [
            (tool_resource(), [(b"Authorization", b"Bearer mandate-jwt")]),
            (
                tool_resource(auth_header="X-Mandate", auth_scheme="Caracal"),
                [(b"X-Mandate", b"Caracal mandate-jwt")],
            ),
            (tool_resource(auth_scheme=""), [(b"Authorization", b"mandate-jwt")]),
            (
                tool_resource("provider_oauth", auth_scheme="Bearer"),
                [
                    (b"Authorization", b"Bearer provider-secret"),
                    (b"X-Caracal-Identity", b"mandate-jwt"),
                ],
            ),
            (
                tool_resource("provider_apikey", auth_header="X-Api-Key"),
                [(b"X-Api-Key", b"provider-secret"), (b"X-Caracal-Identity", b"mandate-jwt")],
            ),
            (
                tool_resource("provider_oauth"),
                [(b"Authorization", b"provider-secret"), (b"X-Caracal-Identity", b"mandate-jwt")],
            ),
        ]
        for res, expected in cases:
            self.assertEqual(credential_headers(res, mandate), expected, res)

    def test_provider_mode_without_provider_token(self):
        """A provider mode without a provider token is refused, without quoting the mandate."""
        mandate = Mandate(access_token="mandate-jwt")
        for mode in ("provider_oauth", "provider_apikey"):
            with self.assertRaises(MissingProviderToken) as caught:
                credential_headers(tool_resource(mode), mandate)
            self.assertNotIn("mandate-jwt", str(caught.exception))


class ResponseHeadersTests(SynchronousTestCase):
    """L{response_headers}: what reaches the client."""

    def upstream(self) -> Headers:
        return headers(
            (b"Content-Type", b"text/event-stream"),
            (b"Content-Length", b"42"),
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
            (b"Connection", b"X-Up-Hop, close"),
            (b"X-Up-Hop", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Trailer", b"X-T"),
            (b"Upgrade", b"h2c"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"X-Caracal-Identity", b"mandate-jwt"),
            (b"X-Caracal-Token-Expires-In", b"9999"),
            (b"X-Request-Id", b"upstream-id"),
        )

    def test_filtered(self):
        """Hop-by-hop, X-Caracal-* and X-Request-Id response headers are not relayed."""
        out = {n.lower(): v for n, v in response_headers(self.upstream()).getAllRawHeaders()}
        self.assertEqual(
            out,
            {
                b"content-type": [b"text/event-stream"],
                b"content-length": [b"42"],
                b"set-cookie": [b"a=1", b"b=2"],
            },
        )

    def test_transformed_drops_length(self):
        """A transformed body loses the upstream's Content-Length."""
        out = response_headers(self.upstream(), transformed=True)
        self.assertFalse(out.hasHeader(b"content-length"))
        self.assertTrue(out.hasHeader(b"content-type"))


class ForwarderTests(SynchronousTestCase):
    """L{Forwarder} on a memory reactor, with the upstream played by the test."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.metrics = Metrics()
        self.forwarder = Forwarder(self.reactor, None, 5.0, self.metrics)
        self.pinned = PinnedUpstream(parse_upstream("http://api.example/base"), "93.184.216.34", 2)
        self.cancelled = 0
        self.cut = None

    def watch(self, cut):
        self.cut = cut

        def cancel():
            self.cancelled += 1

        return cancel

    def forward(self, request, watch=None):
        return self.forwarder.forward(
            request, self.pinned, [(b"Authorization", b"Bearer mandate")], 300, watch
        )

    def connect_upstream(self) -> StringTransport:
        """Complete the pending TCP connection; return the upstream's transport."""
        [(host, port, factory, _timeout, _bind)] = self.reactor.tcpClients
        self.assertEqual((host, port), ("93.184.216.34", 80))
        transport = StringTransport()
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(transport)
        self.upstream_protocol = protocol
        return transport

    def respond(self, data: bytes) -> None:
        self.upstream_protocol.dataReceived(data)

    def test_request_sent(self):
        """The upstream receives the joined path and query and the credential header."""
        self.forward(client_request())
        upstream = self.connect_upstream()
        sent = upstream.value()
        self.assertTrue(sent.startswith(b"GET /base/x?a=1 HTTP/1.1\r\n"), sent)
        self.assertIn(b"Authorization: Bearer mandate\r\n", sent)
        self.assertIn(b"Host: api.example\r\n", sent)

    def test_endpoint_reused_per_pinned_upstream(self):
        """
        Requests to one pinned upstream with one connect timeout share an
        endpoint; another address or timeout gets its own, and each connects
        where it was pinned.
        """
        endpoint = self.forwarder._endpoint(self.pinned, 5.0)
        self.assertIs(self.forwarder._endpoint(self.pinned, 5.0), endpoint)
        same = PinnedUpstream(parse_upstream("http://api.example/base"), "93.184.216.34", 2)
        self.assertIs(self.forwarder._endpoint(same, 5.0), endpoint)
        self.assertIsNot(self.forwarder._endpoint(self.pinned, 9.0), endpoint)
        moved = PinnedUpstream(parse_upstream("http://api.example/base"), "93.184.216.35", 2)
        self.forwarder.forward(client_request(), moved, [], 300)
        self.forward(client_request())
        self.assertEqual(
            [c[:2] for c in self.reactor.tcpClients],
            [("93.184.216.35", 80), ("93.184.216.34", 80)],
        )

    def test_pooled_connection_kept_to_its_pinned_address(self):
        """
        A kept-alive connection is reused for the next call to the same
        pinned address, never for a call pinned to another address of the
        same host name (the name may resolve elsewhere by then).
        """
        self.successResultOf(self.finish_one(self.pinned))
        self.forward(client_request())
        self.assertEqual(len(self.reactor.tcpClients), 1, "reused")
        moved = PinnedUpstream(parse_upstream("http://api.example/base"), "93.184.216.35", 2)
        self.forwarder.forward(client_request(), moved, [], 300)
        self.assertEqual(
            [c[:2] for c in self.reactor.tcpClients],
            [("93.184.216.34", 80), ("93.184.216.35", 80)],
        )

    def finish_one(self, pinned):
        """Forward one call to C{pinned} and answer it in full (its connection goes idle)."""
        d = self.forwarder.forward(client_request(), pinned, [], 300)
        self.connect_upstream()
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return d

    def test_timeout(self):
        """No response headers within UPSTREAM_TIMEOUT is a 504 upstream_timeout."""
        d = self.forward(client_request())
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.reactor.advance(0.2)
        denial = self.failureResultOf(d, Denial).value
        self.assertEqual((denial.status, denial.code), (504, "upstream_timeout"))
        self.assertEqual(denial.metric, "upstream_errors")

    def test_timeout_after_connect_aborts(self):
        """A timeout after connecting aborts the upstream connection."""
        d = self.forward(client_request())
        upstream = self.connect_upstream()
        self.reactor.advance(5.1)
        self.assertEqual(self.failureResultOf(d, Denial).value.status, 504)
        self.assertTrue(upstream.disconnecting or upstream.disconnected)

    def test_refused(self):
        """A refused connection is a 502 upstream_unreachable."""
        d = self.forward(client_request())
        [(_host, _port, factory, _timeout, _bind)] = self.reactor.tcpClients
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        denial = self.failureResultOf(d, Denial).value
        self.assertEqual((denial.status, denial.code), (502, "upstream_unreachable"))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stream_then_finish(self):
        """An event stream is relayed as it arrives, then the request finishes."""
        request = client_request()
        d = self.forward(request, self.watch)
        self.connect_upstream()
        self.respond(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"X-Caracal-Identity: leak\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        head = written(request)
        self.assertIn(b"Trailer: X-Caracal-Revoked\r\n", head)
        self.assertIn(b"X-Caracal-Token-Expires-In: 300\r\n", head)
        self.assertNotIn(b"leak", head)
        self.respond(b"b\r\ndata: one\n\n\r\n")
        self.assertTrue(written(request).endswith(b"b\r\ndata: one\n\n\r\n"))
        self.assertNoResult(d)
        self.respond(b"0\r\n\r\n")
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(written(request).endswith(b"0\r\n\r\n"))
        self.assertEqual(request.finished, 1)
        self.assertEqual(self.cancelled, 1)
        self.assertIsNone(request.producer)
        self.assertEqual(upstream_observations(self.metrics), 1)

    def test_cut_writes_trailer(self):
        """A revocation mid-stream ends a chunked answer with the X-Caracal-Revoked trailer."""
        request = client_request()
        d = self.forward(request, self.watch)
        upstream = self.connect_upstream()
        self.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        self.cut()
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(
            written(request).endswith(b"5\r\nhello\r\n0\r\nX-Caracal-Revoked: true\r\n\r\n")
        )
        self.assertEqual(request.finished, 1)
        self.assertEqual(upstream.producerState, "stopped")
        self.respond(b"5\r\nlater\r\n")
        self.assertNotIn(b"later", written(request))
        self.assertEqual(request.log_fields["upstream_cut"], "session_revoked")

    def test_cut_fixed_length_closes(self):
        """A revocation mid-way through a fixed-length answer closes the connection."""
        request = client_request()
        d = self.forward(request, self.watch)
        self.connect_upstream()
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello")
        self.assertIn(b"Content-Length: 100\r\n", written(request))
        self.assertNotIn(b"Trailer", written(request))
        self.cut()
        self.assertIsNone(self.successResultOf(d))
        self.assertFalse(request.finished)
        self.assertTrue(request.test_transport.disconnected)

    def test_http10_client_not_chunked(self):
        """An HTTP/1.0 client gets no Trailer announcement."""
        request = client_request(clientproto=b"HTTP/1.0")
        self.forward(request, self.watch)
        self.connect_upstream()
        self.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        self.assertNotIn(b"Trailer", written(request))
        self.cut()
        self.assertTrue(request.test_transport.disconnected)

    def test_back_pressure(self):
        """The client's transport pausing the request pauses the upstream read."""
        request = client_request()
        self.forward(request)
        upstream = self.connect_upstream()
        self.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        [(producer, streaming)] = request.test_transport.producers
        self.assertTrue(streaming)
        self.assertEqual(upstream.producerState, "producing")
        producer.pauseProducing()
        self.assertEqual(upstream.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual(upstream.producerState, "producing")

    def test_client_gone_mid_stream(self):
        """A client leaving mid-stream stops the upstream and the revocation watch."""
        request = client_request()
        d = self.forward(request, self.watch)
        upstream = self.connect_upstream()
        self.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        request.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(upstream.producerState, "stopped")
        self.assertEqual(self.cancelled, 1)

    def test_client_gone_while_waiting(self):
        """A client leaving before the headers drops the upstream connection and the timer."""
        request = client_request()
        d = self.forward(request)
        upstream = self.connect_upstream()
        request.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(upstream.disconnecting or upstream.disconnected)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancel_while_waiting_drops_upstream(self):
        """Cancelling the forward (the pipeline's client left) drops the upstream request."""
        request = client_request()
        d = self.forward(request)
        upstream = self.connect_upstream()
        d.cancel()
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(upstream.disconnecting or upstream.disconnected)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_client_already_gone(self):
        """A client gone before forwarding starts is not forwarded for at all."""
        request = client_request()
        request.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.successResultOf(self.forward(request, self.watch)))
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertIsNone(self.cut)

    def test_already_revoked(self):
        """A watch that fires at once: 401, and the upstream is never contacted."""

        def revoked(cut):
            cut()
            return lambda: setattr(self, "cancelled", self.cancelled + 1)

        d = self.forward(client_request(), revoked)
        denial = self.failureResultOf(d, Denial).value
        self.assertEqual((denial.status, denial.code), (401, "session_revoked"))
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.cancelled, 1)

    # -- SPEC 13: event streams ---------------------------------------------

    SSE_HEAD = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )

    def stream(self, method=b"GET", keepalive=15.0):
        """An event stream relayed to a client of a real (draining-capable) site."""
        self.forwarder = Forwarder(self.reactor, None, 5.0, self.metrics, sse_keepalive=keepalive)
        request = client_request(method=method)
        request.gateway_site = GatewaySite(None, GatewayConfig(), Metrics(), clock=self.reactor)
        d = self.forward(request)
        self.connect_upstream()
        self.respond(self.SSE_HEAD)
        return request, d

    def chunk(self, data: bytes) -> None:
        self.respond(b"%x\r\n%s\r\n" % (len(data), data))

    def test_keepalive_between_events(self):
        """A silent stream between events gets a keep-alive comment chunk."""
        request, _d = self.stream()
        self.chunk(b"data: 1\n\n")
        self.reactor.advance(15)
        self.assertTrue(written(request).endswith(b"e\r\n: keep-alive\n\n\r\n"))

    def test_no_keepalive_inside_an_event(self):
        """An event split across chunks is never interrupted by a comment."""
        request, _d = self.stream()
        self.chunk(b"event: progress\r\ndata: {")
        self.reactor.advance(60)
        self.assertNotIn(b"keep-alive", written(request))
        self.chunk(b"}\r\n\r\n")
        self.reactor.advance(15)
        self.assertIn(b"keep-alive", written(request))

    def test_keepalive_off(self):
        """SSE_KEEPALIVE=0: no comment, however long the silence."""
        request, _d = self.stream(keepalive=0)
        self.reactor.advance(600)
        self.assertNotIn(b"keep-alive", written(request))

    def test_no_keepalive_for_other_content(self):
        """Only event streams get keep-alives."""
        self.forwarder = Forwarder(self.reactor, None, 5.0, self.metrics, sse_keepalive=1.0)
        request = client_request()
        self.forward(request)
        self.connect_upstream()
        self.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n")
        self.reactor.advance(10)
        self.assertNotIn(b"keep-alive", written(request))

    def test_keepalive_stops_with_the_stream(self):
        """Once the upstream ends the stream no timer is left behind."""
        request, d = self.stream()
        self.chunk(b"data: 1\n\n")
        self.respond(b"0\r\n\r\n")
        self.successResultOf(d)
        # Only the pool's idle-connection timer is left.
        timers = [call.func.__name__ for call in self.reactor.getDelayedCalls()]
        self.assertEqual(timers, ["_sweep"])

    def test_drain_ends_idle_get_stream_at_once(self):
        """Draining ends a GET stream between events at once: whole message, logged drained."""
        request, d = self.stream()
        self.chunk(b"data: 1\n\n")
        upstream = self.upstream_protocol.transport
        self.successResultOf(request.gateway_site.drain(25))
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(written(request).endswith(b"data: 1\n\n\r\n0\r\n\r\n"))
        self.assertEqual(request.finished, 1)
        self.assertEqual(request.log_fields["upstream_cut"], "drained")
        self.assertEqual(upstream.producerState, "stopped")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_drain_waits_for_the_event_under_way(self):
        """Mid-event, the rest of the event is relayed, then the stream ends."""
        request, d = self.stream()
        self.chunk(b"data: 1\n\nevent: progress\n")
        request.gateway_site.drain(25)
        self.assertNoResult(d)
        self.reactor.advance(60)
        self.assertNotIn(b"keep-alive", written(request))
        self.chunk(b"data: 2\n\ndata: 3\n\n")
        self.assertIsNone(self.successResultOf(d))
        body = written(request).split(b"\r\n\r\n", 1)[1]
        self.assertNotIn(b"data: 3", body)
        self.assertTrue(body.endswith(b"data: 2\n\n\r\n0\r\n\r\n"), body)
        self.assertEqual(request.log_fields["upstream_cut"], "drained")

    def test_drain_leaves_post_stream_running(self):
        """A POST answered with an event stream (a tool call) completes: it is not drained."""
        request, d = self.stream(method=b"POST")
        self.chunk(b"data: progress\n\n")
        request.gateway_site.drain(25)
        self.assertNoResult(d)
        self.chunk(b"data: result\n\n")
        self.respond(b"0\r\n\r\n")
        self.assertIsNone(self.successResultOf(d))
        self.assertIn(b"data: result", written(request))
        self.assertNotIn("upstream_cut", request.log_fields)

    def test_finished_stream_unregisters_from_drain(self):
        """A GET stream that ended by itself is not called when the site drains later."""
        request, d = self.stream()
        self.respond(b"0\r\n\r\n")
        self.successResultOf(d)
        self.assertEqual(request.gateway_site._drain_hooks, [])

    def test_write_timeout_suspended_during_upstream_wait(self):
        """The channel is told when the wait for the upstream's headers starts and ends."""
        for answer in ("response", "timeout"):
            request = client_request()
            waits = []
            request.channel.upstream_wait = waits.append
            d = self.forward(request)
            self.assertEqual(waits, [True])
            if answer == "response":
                self.connect_upstream()
                self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                self.successResultOf(d)
            else:
                self.reactor.advance(6)
                self.failureResultOf(d, Denial)
            self.assertEqual(waits, [True, False], answer)
            self.reactor.tcpClients.clear()

    def test_resource_timeout_replaces_default(self):
        """A resource's own upstream timeout bounds the wait for the headers."""
        d = self.forwarder.forward(
            client_request(), self.pinned, [(b"Authorization", b"Bearer m")], 300, None, 12.0
        )
        [(_host, _port, _factory, connect_timeout, _bind)] = self.reactor.tcpClients
        self.assertEqual(connect_timeout, 12.0)
        self.reactor.advance(11.9)
        self.assertNoResult(d)
        self.reactor.advance(0.2)
        self.assertEqual(self.failureResultOf(d, Denial).value.code, "upstream_timeout")

    def test_upstream_dies_mid_body(self):
        """A truncated upstream body is not passed off as complete."""
        request = client_request()
        d = self.forward(request)
        upstream = self.connect_upstream()
        self.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        self.upstream_protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.successResultOf(d))
        self.assertFalse(request.finished)
        self.assertFalse(written(request).endswith(b"0\r\n\r\n"))
        self.assertTrue(request.test_transport.disconnected)
        del upstream
