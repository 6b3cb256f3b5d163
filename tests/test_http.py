# -*- test-case-name: tests.test_http -*-
"""
Tests for L{caracal.gateway.http}: request ids, the body limit, the four
server timeouts and draining, on channels built by a L{GatewaySite} and fed
raw bytes through a L{StringTransport} with a L{Clock}.
"""

from __future__ import annotations

import json
import sys
import uuid
from io import BytesIO

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from caracal.gateway.config import GatewayConfig
from caracal.gateway.denials import Denial
from caracal.gateway.http import (
    LOCAL_ADDRESSES_KEPT,
    GatewayChannel,
    GatewaySite,
    choose_request_id,
)
from caracal.gateway.interfaces import IRequestScreen
from caracal.gateway.logs import ACCESS_NAMESPACE
from caracal.gateway.metrics import Metrics
from caracal.gateway.proxy import method_not_allowed
from tests.support.responses import parse_responses

LIMIT = 100
READ_HEADER = 5.0
READ = 10.0
WRITE = 20.0
IDLE = 40.0
STREAM_IDLE = 30.0


class RecordingResource(Resource):
    """
    Answers C{ok <body length>}; C{/slow} is left pending (NOT_DONE_YET) for
    the test to finish; C{/boom} raises.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.rendered: list = []
        self.bodies: list[bytes] = []
        self.pending: list = []

    def render(self, request):
        self.rendered.append(request)
        if request.path == b"/boom":
            raise RuntimeError("boom")
        body = request.content.read()
        self.bodies.append(body)
        if request.path.startswith(b"/slow"):
            self.pending.append(request)
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/plain")
        return b"ok %d" % (len(body),)


def one_response(transport: StringTransport):
    """The only response written to C{transport}: (status, headers, body)."""
    responses = parse_responses(transport.value())
    assert len(responses) == 1, responses
    return responses[0][:3]


class HTTPTestMixin:
    """Builds a site on a clock and connects StringTransport clients to it."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = RecordingResource()
        self.metrics = Metrics()
        self.config = GatewayConfig(
            max_request_bytes=LIMIT,
            read_header_timeout=READ_HEADER,
            read_timeout=READ,
            write_timeout=WRITE,
            idle_timeout=IDLE,
            stream_idle_timeout=STREAM_IDLE,
        )
        self.site = GatewaySite(self.resource, self.config, self.metrics, clock=self.clock)
        self.access_events: list[dict] = []
        self.site.access_log = Logger(
            namespace=ACCESS_NAMESPACE, observer=self.access_events.append
        )

    def connect(self):
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8081))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "203.0.113.7", 41000))
        channel.makeConnection(transport)
        return channel, transport

    def request(self, channel, path=b"/", headers=(), body=b"", method=b"POST"):
        head = [method + b" " + path + b" HTTP/1.1", b"Host: gateway.example"]
        head.extend(headers)
        if body or method == b"POST":
            head.append(b"Content-Length: %d" % (len(body),))
        channel.dataReceived(b"\r\n".join(head) + b"\r\n\r\n" + body)


class RequestIdTests(HTTPTestMixin, SynchronousTestCase):
    """SPEC step 0: the inbound id is kept when valid, else a UUID4 is made."""

    def sent_id(self, *header_lines: bytes) -> str:
        channel, transport = self.connect()
        self.request(channel, headers=header_lines)
        status, headers, _ = one_response(transport)
        self.assertEqual(status, 200)
        [echoed] = headers[b"x-request-id"]
        [request] = self.resource.rendered[-1:]
        self.assertEqual(request.request_id, echoed.decode("ascii"))
        return echoed.decode("ascii")

    def assertGenerated(self, request_id: str) -> None:
        self.assertEqual(uuid.UUID(request_id).version, 4)
        self.assertEqual(str(uuid.UUID(request_id)), request_id)

    def test_valid_id_kept(self) -> None:
        """A printable X-Request-Id without spaces is kept and sent back."""
        self.assertEqual(self.sent_id(b"X-Request-Id: req-42_~!{}"), "req-42_~!{}")

    def test_128_characters_kept(self) -> None:
        """An X-Request-Id of 128 characters, the limit, is kept."""
        value = "a" * 128
        self.assertEqual(self.sent_id(b"X-Request-Id: " + value.encode()), value)

    def test_129_characters_replaced(self) -> None:
        """An X-Request-Id of 129 characters is replaced by a generated one."""
        self.assertGenerated(self.sent_id(b"X-Request-Id: " + b"a" * 129))

    def test_inner_space_replaced(self) -> None:
        """An X-Request-Id with a space inside is replaced."""
        self.assertGenerated(self.sent_id(b"X-Request-Id: two words"))

    def test_non_ascii_replaced(self) -> None:
        """An X-Request-Id with a non-ASCII character is replaced."""
        self.assertGenerated(self.sent_id("X-Request-Id: caf\u00e9".encode()))

    def test_control_characters_replaced(self) -> None:
        """An X-Request-Id with a control character or DEL is replaced."""
        self.assertGenerated(self.sent_id(b"X-Request-Id: a\x01b"))
        self.assertGenerated(self.sent_id(b"X-Request-Id: a\x7fb"))

    def test_empty_replaced(self) -> None:
        """An empty X-Request-Id is replaced."""
        self.assertGenerated(self.sent_id(b"X-Request-Id: "))

    def test_absent_generated(self) -> None:
        """Without X-Request-Id each request gets its own generated id."""
        first = self.sent_id()
        second = self.sent_id()
        self.assertGenerated(first)
        self.assertNotEqual(first, second)

    def test_two_values_replaced(self) -> None:
        """Two X-Request-Id headers are replaced by a generated id, neither value kept."""
        request_id = self.sent_id(b"X-Request-Id: one", b"X-Request-Id: two")
        self.assertNotIn(request_id, ("one", "two"))
        self.assertGenerated(request_id)

    def test_choose_request_id(self) -> None:
        """L{choose_request_id} keeps one valid value and generates an id otherwise."""
        self.assertEqual(choose_request_id([b"!~"]), "!~")
        self.assertGenerated(choose_request_id(None))
        self.assertGenerated(choose_request_id([b"\x21" * 129]))
        self.assertGenerated(choose_request_id([b""]))

    def test_id_on_413(self) -> None:
        """A request refused as too large still gets its X-Request-Id back, in header and body."""
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST / HTTP/1.1\r\nHost: g\r\nX-Request-Id: big-one\r\nContent-Length: 101\r\n\r\n"
        )
        status, headers, body = one_response(transport)
        self.assertEqual(status, 413)
        self.assertEqual(headers[b"x-request-id"], [b"big-one"])
        self.assertEqual(json.loads(body)["request_id"], "big-one")

    def test_id_on_500(self) -> None:
        """
        A resource that raises gives a 500 envelope carrying the request id, and the error is
        logged.
        """
        channel, transport = self.connect()
        self.request(channel, path=b"/boom", headers=[b"X-Request-Id: crash-1"])
        status, headers, body = one_response(transport)
        self.assertEqual(status, 500)
        self.assertEqual(headers[b"x-request-id"], [b"crash-1"])
        self.assertEqual(
            json.loads(body),
            {"error": "internal_error", "description": "internal error", "request_id": "crash-1"},
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_id_on_400(self) -> None:
        """A malformed request gets a 400 whose header and body carry the same id, and is closed."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: g\r\nContent-Length: nope\r\n\r\n")
        status, headers, body = one_response(transport)
        self.assertEqual(status, 400)
        self.assertEqual(headers[b"x-request-id"], [json.loads(body)["request_id"].encode()])
        self.assertTrue(transport.disconnecting)

    def test_id_on_malformed_chunked_body(self) -> None:
        """
        A malformed chunked body gets a 400 with the request's id, logged once, never rendered.
        """
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST / HTTP/1.1\r\nHost: g\r\nX-Request-Id: bad-chunk\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"zz\r\n"
        )
        status, headers, body = one_response(transport)
        self.assertEqual(status, 400)
        self.assertEqual(headers[b"x-request-id"], [b"bad-chunk"])
        self.assertEqual(json.loads(body)["error"], "invalid_request")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.resource.rendered, [])
        self.assertEqual(self.site.inflight, 0)
        [event] = self.access_events
        self.assertEqual(event["access"]["status"], 400)

    def test_server_header(self) -> None:
        """Responses say Server: caracal-gateway and never name TwistedWeb."""
        channel, transport = self.connect()
        self.request(channel)
        _, headers, _ = one_response(transport)
        self.assertEqual(headers[b"server"], [b"caracal-gateway"])
        self.assertNotIn(b"TwistedWeb", transport.value())


class AccessEventTests(HTTPTestMixin, SynchronousTestCase):
    """The access-log event handed to the observer is the one C{Logger.info} would emit."""

    def test_same_event_as_logger_info(self):
        """Same keys and values as Logger.info's event, but for the time it was made."""
        channel, _transport = self.connect()
        self.request(channel)
        [event] = self.access_events
        reference = []
        Logger(namespace=ACCESS_NAMESPACE, observer=reference.append).info(
            "{access_line}", access_line=event["access_line"], access=event["access"]
        )
        [expected] = reference
        self.assertEqual(set(event), set(expected))
        for key in set(expected) - {"log_time", "log_logger"}:
            self.assertEqual(event[key], expected[key], key)
        self.assertIs(event["log_logger"], self.site.access_log)
        self.assertIs(event["log_level"], LogLevel.info)


class LocalAddressTests(HTTPTestMixin, SynchronousTestCase):
    """The channel's local address is asked of the transport once per connection."""

    def test_get_host_once(self):
        """Two requests on one connection: one C{getHost} on the transport, same address."""
        channel, transport = self.connect()
        asked = []
        real = transport.getHost

        def get_host():
            asked.append(True)
            return real()

        transport.getHost = get_host
        self.request(channel)
        self.request(channel)
        self.assertEqual(len(self.resource.rendered), 2)
        self.assertEqual(len(asked), 1)
        self.assertIs(self.resource.rendered[0].getHost(), self.resource.rendered[1].getHost())

    def connect_to(self, host: str, port: int = 8443):
        channel = self.site.buildProtocol(IPv4Address("TCP", "203.0.113.7", 41000))
        channel.makeConnection(StringTransport(hostAddress=IPv4Address("TCP", host, port)))
        return channel

    def test_one_object_per_local_address(self):
        """
        Connections to the same local address and port keep one address
        object between them (an idle connection holds no copy of its own);
        another address or port is another object.
        """
        first, second = self.connect_to("192.0.2.1"), self.connect_to("192.0.2.1")
        other_host, other_port = self.connect_to("192.0.2.2"), self.connect_to("192.0.2.1", 9443)
        self.assertIs(first.getHost(), second.getHost())
        self.assertEqual(first.getHost(), IPv4Address("TCP", "192.0.2.1", 8443))
        self.assertEqual(other_host.getHost(), IPv4Address("TCP", "192.0.2.2", 8443))
        self.assertEqual(other_port.getHost(), IPv4Address("TCP", "192.0.2.1", 9443))

    def test_shared_addresses_bounded(self):
        """Past LOCAL_ADDRESSES_KEPT distinct addresses, a connection keeps its own."""
        for index in range(LOCAL_ADDRESSES_KEPT):
            self.connect_to(f"192.0.2.{index}").getHost()
        late, late_again = self.connect_to("198.51.100.1"), self.connect_to("198.51.100.1")
        self.assertEqual(late.getHost(), late_again.getHost())
        self.assertIsNot(late.getHost(), late_again.getHost())
        self.assertEqual(len(self.site._local_addresses), LOCAL_ADDRESSES_KEPT)


class RefusalMixin(HTTPTestMixin):
    """
    Sends a request the gateway must refuse and checks the refusal: the JSON
    envelope, the id echoed, one access line with
    C{denial="malformed_request"}, the request counters, nothing rendered and
    nothing read after it.
    """

    def refused(self, raw: bytes, status: int = 400):
        channel, transport = self.connect()
        channel.dataReceived(raw)
        answer_status, headers, body = one_response(transport)
        self.assertEqual(answer_status, status, raw[:200])
        envelope = json.loads(body)
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        self.assertEqual(headers[b"x-request-id"], [envelope["request_id"].encode()])
        self.assertEqual(self.resource.rendered, [])
        self.assertEqual(self.site.inflight, 0)
        self.assertEqual(self.metrics.counters["requests_total"], 1)
        self.assertEqual(self.metrics.counters["requests_denied"], 1)
        [event] = self.access_events
        record = event["access"]
        self.assertEqual(record["status"], status)
        self.assertEqual(record["denial"], "malformed_request")
        self.assertEqual(record["request_id"], envelope["request_id"])
        # Nothing after the refused part reaches a request or the transport.
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: g\r\n\r\n")
        self.assertEqual(len(parse_responses(transport.value())), 1)
        self.assertEqual(len(self.access_events), 1)
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)
        return envelope, record

    def assertRefusedKeepingId(
        self,
        *header_lines: bytes,
        request_line: bytes = b"POST /tools/x?secret=1 HTTP/1.1",
        status: int = 400,
        error: str = "invalid_request",
        host: tuple[bytes, ...] = (b"Host: g",),
    ) -> dict:
        head = [request_line, *host, b"X-Request-Id: keep-me"]
        head.extend(header_lines)
        envelope, record = self.refused(b"\r\n".join(head) + b"\r\n\r\nabc", status)
        self.assertEqual(envelope["error"], error)
        self.assertEqual(envelope["request_id"], "keep-me")
        method, _, target = request_line.partition(b" ")
        path = target.rsplit(b" ", 1)[0].split(b"?", 1)[0]
        self.assertEqual((record["method"], record["path"]), (method.decode(), path.decode()))
        return envelope


class MalformedRequestTests(RefusalMixin, SynchronousTestCase):
    """
    Requests Twisted's parser refuses get the JSON 400 through the request,
    the inbound id kept when it was read and valid.
    """

    def test_content_length_and_transfer_encoding(self) -> None:
        """Content-Length with Transfer-Encoding is refused (request smuggling)."""
        self.assertRefusedKeepingId(b"Content-Length: 3", b"Transfer-Encoding: chunked")

    def test_transfer_encoding_then_content_length(self) -> None:
        """Transfer-Encoding followed by Content-Length is refused too."""
        self.assertRefusedKeepingId(b"Transfer-Encoding: chunked", b"Content-Length: 3")

    def test_duplicate_content_length(self) -> None:
        """Two equal Content-Length headers are refused."""
        self.assertRefusedKeepingId(b"Content-Length: 3", b"Content-Length: 3")

    def test_differing_content_length(self) -> None:
        """Two differing Content-Length headers are refused."""
        self.assertRefusedKeepingId(b"Content-Length: 3", b"Content-Length: 4", b"X-After: 1")

    def test_non_numeric_content_length(self) -> None:
        """A Content-Length that is not plain digits is refused."""
        self.assertRefusedKeepingId(b"Content-Length: +3")

    def test_chunked_then_identity(self) -> None:
        """A Transfer-Encoding other than chunked alone is refused."""
        self.assertRefusedKeepingId(b"Transfer-Encoding: chunked, identity")

    def test_nul_in_a_header_value(self) -> None:
        """A NUL byte in a header value is refused."""
        self.assertRefusedKeepingId(b"X-Thing: a\x00b", b"Content-Length: 3")

    def test_header_without_colon(self) -> None:
        """A header line without a colon is refused."""
        self.assertRefusedKeepingId(b"no colon here", b"Content-Length: 3")

    def test_invalid_header_name(self) -> None:
        """A header name that is not an HTTP token is refused."""
        self.assertRefusedKeepingId(b"Bad Name: x", b"Content-Length: 3")

    def test_invalid_inbound_id_replaced(self) -> None:
        """A refused request with an invalid X-Request-Id gets a generated id."""
        envelope, _ = self.refused(
            b"POST / HTTP/1.1\r\nHost: g\r\nX-Request-Id: two words\r\n"
            b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n"
        )
        self.assertEqual(uuid.UUID(envelope["request_id"]).version, 4)

    def test_bad_request_line(self) -> None:
        """A malformed request line is refused with a generated id and no method or path logged."""
        for line in (b"GET /x", b"GET /x HTTP/2.0", b"G@T /x HTTP/1.1", b"GET  /x HTTP/1.1"):
            self.setUp()
            envelope, record = self.refused(line + b"\r\nX-Request-Id: lost\r\n\r\n")
            # The id header was never read: the request line came first.
            self.assertEqual(uuid.UUID(envelope["request_id"]).version, 4)
            self.assertEqual((record["method"], record["path"]), ("-", "-"))

    def test_request_line_over_16k(self) -> None:
        """A request line over 16 KB is refused as invalid, without method or path."""
        envelope, record = self.refused(b"GET /" + b"a" * 16400 + b" HTTP/1.1\r\n\r\n")
        self.assertEqual(envelope["error"], "invalid_request")
        self.assertEqual((record["method"], record["path"]), ("-", "-"))

    def test_request_line_over_16k_without_newline(self) -> None:
        """More than 16 KB without a line end is refused before the line ends."""
        envelope, record = self.refused(b"GET /" + b"a" * 16400)
        self.assertEqual((record["method"], record["path"]), ("-", "-"))

    def test_after_a_good_keep_alive_request(self) -> None:
        # The second request's refusal names the second request only.
        """A malformed second request on a keep-alive connection is refused under its own id."""
        channel, transport = self.connect()
        self.request(channel, headers=[b"X-Request-Id: first"])
        channel.dataReceived(
            b"GET /second HTTP/1.1\r\nHost: g\r\nX-Request-Id: second\r\n"
            b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n"
        )
        first, second = parse_responses(transport.value())
        self.assertEqual((first[0], second[0]), (200, 400))
        self.assertEqual(second[1][b"x-request-id"], [b"second"])
        records = [event["access"] for event in self.access_events]
        self.assertEqual([r["request_id"] for r in records], ["first", "second"])
        self.assertEqual(records[1]["path"], "/second")
        self.assertEqual(self.metrics.counters["requests_denied"], 1)


class ConformanceTests(RefusalMixin, SynchronousTestCase):
    """
    RFC 9112 checks made once the headers are in, before the resource runs,
    and header sections past Twisted's limits (431): answered with the
    envelope, logged and counted like a parser refusal.
    """

    def test_http_1_1_without_host(self) -> None:
        """An HTTP/1.1 request without Host is refused, saying so."""
        envelope = self.assertRefusedKeepingId(host=())
        self.assertIn("Host", envelope["description"])

    def test_two_host_headers(self) -> None:
        """Two Host headers are refused, even equal ones, even in HTTP/1.0."""
        self.assertRefusedKeepingId(host=(b"Host: g", b"Host: evil"))
        self.setUp()
        self.assertRefusedKeepingId(host=(b"Host: g", b"Host: g"), request_line=b"GET /x HTTP/1.0")

    def test_invalid_host(self) -> None:
        """A Host that is not a host name with an optional numeric port is refused."""
        for host in (b"Host: a b", b"Host: a/b", b"Host: a@b", b"Host: a:port"):
            self.setUp()
            self.assertRefusedKeepingId(host=(host,))

    def test_absolute_form(self) -> None:
        """An absolute-form request target is refused: the gateway is no forward proxy."""
        for request_line in (
            b"GET http://evil/x HTTP/1.1",
            b"GET http://g/health HTTP/1.1",
            b"POST https://127.0.0.1:8081/api HTTP/1.1",
        ):
            self.setUp()
            envelope = self.assertRefusedKeepingId(request_line=request_line)
            self.assertIn("forward proxy", envelope["description"])

    def test_asterisk_form(self) -> None:
        """The asterisk-form request target is refused."""
        self.assertRefusedKeepingId(request_line=b"OPTIONS * HTTP/1.1")

    def test_http_1_0_with_transfer_encoding(self) -> None:
        """An HTTP/1.0 request with Transfer-Encoding is refused, naming HTTP/1.0."""
        envelope = self.assertRefusedKeepingId(
            b"Transfer-Encoding: chunked", request_line=b"POST /up HTTP/1.0"
        )
        self.assertIn("HTTP/1.0", envelope["description"])

    def test_fragment_in_target(self) -> None:
        """
        SPEC 12 H1: a C{#} anywhere in the request-target is refused (an
        outbound client would cut the forwarded path there).
        """
        for request_line in (
            b"GET /..# HTTP/1.1",
            b"GET /%2e%2e# HTTP/1.1",
            b"GET /a#b HTTP/1.1",
            b"GET /a?x=1#frag HTTP/1.1",
            b"GET /health# HTTP/1.1",
        ):
            self.setUp()
            envelope = self.assertRefusedKeepingId(request_line=request_line)
            self.assertIn("fragment", envelope["description"])

    def test_control_character_in_target(self) -> None:
        """
        SPEC 12 H1: a raw NUL or any control character in the target is
        refused: Twisted's request-line parser refuses most (the id header
        is not read yet), the gateway the ones it lets through (DEL).
        """
        for request_line in (
            b"GET /a\x00b HTTP/1.1",
            b"GET /a?q=\x00 HTTP/1.1",
            b"GET /\x01 HTTP/1.1",
        ):
            self.setUp()
            envelope, _ = self.refused(request_line + b"\r\nHost: g\r\n\r\n")
            self.assertEqual(envelope["error"], "invalid_request")
        for request_line in (b"GET /a\x7f HTTP/1.1", b"GET /a?q=\x7f HTTP/1.1"):
            self.setUp()
            envelope = self.assertRefusedKeepingId(request_line=request_line)
            self.assertIn("control character", envelope["description"])

    def test_transfer_encoding_not_one_chunked(self) -> None:
        """
        SPEC 12 H3: C{Transfer-Encoding} other than exactly one C{chunked}
        (C{identity}, a list, two headers, in any order) is 400 and the
        connection closes.
        """
        for codings in (
            [b"Transfer-Encoding: identity"],
            [b"Transfer-Encoding: Identity", b"Content-Length: 3"],
            [b"Transfer-Encoding: gzip, chunked"],
            [b"Transfer-Encoding: identity", b"Transfer-Encoding: chunked"],
            [b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity"],
            [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
        ):
            self.setUp()
            self.assertRefusedKeepingId(*codings)

    def test_one_chunked_served(self) -> None:
        """One C{Transfer-Encoding: chunked} (any case) is the accepted framing."""
        for coding in (b"chunked", b"Chunked"):
            channel, transport = self.connect()
            channel.dataReceived(
                b"POST /x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: "
                + coding
                + b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            )
            status, _, body = one_response(transport)
            self.assertEqual((status, body), (200, b"ok 3"))

    def test_conforming_requests_served(self) -> None:
        """Conforming requests are served, and none is counted as denied."""
        for head in (
            b"GET /x HTTP/1.0",
            b"GET /x HTTP/1.0\r\nHost: g",
            b"GET /x?u=http://a HTTP/1.1\r\nHost: gateway.example:8081",
            b"GET /x HTTP/1.1\r\nHost: [::1]:8081",
            b"GET /x HTTP/1.1\r\nHost: 127.0.0.1",
            b"OPTIONS /x HTTP/1.1\r\nHost: g",
        ):
            channel, transport = self.connect()
            channel.dataReceived(head + b"\r\n\r\n")
            self.assertEqual(one_response(transport)[0], 200, head)
        self.assertEqual(self.metrics.counters["requests_denied"], 0)

    def test_over_500_headers(self) -> None:
        """More than 500 header fields are refused with 431, naming the limit."""
        headers = [b"X-H%d: v" % (n,) for n in range(501)]
        envelope = self.assertRefusedKeepingId(
            *headers, status=431, error="request_header_fields_too_large"
        )
        self.assertIn("500", envelope["description"])

    def test_500_headers_served(self) -> None:
        """A request with 500 header fields is served."""
        channel, transport = self.connect()
        head = [b"GET /x HTTP/1.1", b"Host: g"] + [b"X-H%d: v" % (n,) for n in range(498)]
        channel.dataReceived(b"\r\n".join(head) + b"\r\n\r\n")
        self.assertEqual(one_response(transport)[0], 200)

    def test_header_section_over_16k(self) -> None:
        """A header section over 16 KB is refused with 431."""
        headers = [b"X-H%d: %s" % (n, b"v" * 1000) for n in range(17)]
        self.assertRefusedKeepingId(*headers, status=431, error="request_header_fields_too_large")

    def test_one_header_field_over_16k(self) -> None:
        """One header field over 16 KB is refused with 431, even before its line ends."""
        self.assertRefusedKeepingId(
            b"X-Big: " + b"v" * 16400, status=431, error="request_header_fields_too_large"
        )
        self.setUp()
        # Still no line end after more than 16 KB of one header field.
        channel, transport = self.connect()
        channel.dataReceived(b"GET /x HTTP/1.1\r\nX-Request-Id: keep-me\r\nX-Big: ")
        channel.dataReceived(b"v" * 16400)
        status, headers, _ = one_response(transport)
        self.assertEqual((status, headers[b"x-request-id"]), (431, [b"keep-me"]))

    def test_431_status_line(self) -> None:
        """The 431 status line has its standard reason phrase."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /x HTTP/1.1\r\nX-Big: " + b"v" * 16400 + b"\r\n\r\n")
        self.assertTrue(
            transport.value().startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
        )


@implementer(IRequestScreen)
class ScreeningResource(RecordingResource):
    """
    A L{RecordingResource} with the pipeline's C{screen}: a request without
    an C{X-Token} header is refused on its headers (401), one to C{/local}
    with another method than GET (405, C{Allow: GET, HEAD}).
    """

    def __init__(self) -> None:
        super().__init__()
        self.screened: list = []

    def screen(self, request):
        self.screened.append(request)
        if request.path == b"/local":
            request.local = True
            if request.method != b"GET":
                return method_not_allowed(request, (b"GET", b"HEAD"))
        if not request.requestHeaders.hasHeader(b"x-token"):
            return Denial(401, "missing_token", "no token", metric="denials_missing_auth")
        return None


class HeaderTimeRefusalTests(HTTPTestMixin, SynchronousTestCase):
    """
    SPEC 12 H7: a request the resource's C{screen} refuses (steps 2-7 need
    only the headers) is answered as soon as its headers are in, its body
    never read, with C{Connection: close}; and H2's 405 for methods the
    gateway never serves, whatever the resource.
    """

    def setUp(self) -> None:
        super().setUp()
        self.resource = ScreeningResource()
        self.site = GatewaySite(self.resource, self.config, self.metrics, clock=self.clock)
        self.site.access_log = Logger(
            namespace=ACCESS_NAMESPACE, observer=self.access_events.append
        )

    def test_refused_on_headers_without_reading_body(self) -> None:
        """
        Headers declaring a body (within the limit) and no token: 401 at
        once, before any body byte, nothing stored, C{Connection: close},
        counted and logged; the body that follows is dropped.
        """
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST /tools HTTP/1.1\r\nHost: g\r\nX-Request-Id: early\r\n"
            b"Expect: 100-continue\r\nContent-Length: 90\r\n\r\n"
        )
        status, headers, body = one_response(transport)
        self.assertEqual(status, 401)
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertTrue(headers[b"www-authenticate"][0].startswith(b"Bearer"))
        self.assertEqual(json.loads(body)["error"], "missing_token")
        self.assertNotIn(b"100 Continue", transport.value())
        [request] = self.resource.screened
        # gotLength never ran: no body store was even made.
        self.assertIsNone(request.content)
        self.assertEqual(self.resource.rendered, [])
        self.assertEqual(self.metrics.counters["requests_total"], 1)
        self.assertEqual(self.metrics.counters["requests_denied"], 1)
        self.assertEqual(self.metrics.counters["denials_missing_auth"], 1)
        [event] = self.access_events
        self.assertEqual(event["access"]["denial"], "missing_token")
        self.assertEqual(event["access"]["request_id"], "early")
        transport.clear()
        channel.dataReceived(b"x" * 90 + b"GET / HTTP/1.1\r\nHost: g\r\nX-Token: t\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(request.body_bytes, 0)
        self.assertEqual(len(self.resource.screened), 1)
        self.assertTrue(transport.disconnecting)

    def test_huge_declared_body_refused_by_screen(self) -> None:
        """Step 1 still comes first: a Content-Length over the limit is 413, not 401."""
        channel, transport = self.connect()
        channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: g\r\nContent-Length: 101\r\n\r\n")
        self.assertEqual(one_response(transport)[0], 413)
        self.assertEqual(self.resource.screened, [])

    def test_passing_screen_reads_body_and_renders(self) -> None:
        """A request the screen lets through is read and rendered as before."""
        channel, transport = self.connect()
        self.request(channel, path=b"/tools", headers=[b"X-Token: t"], body=b"abc")
        self.assertEqual(one_response(transport)[:3:2], (200, b"ok 3"))
        self.assertEqual(len(self.resource.screened), 1)
        self.assertFalse(transport.disconnecting)

    def test_local_method_refused_by_screen(self) -> None:
        """The resource's own 405 (a local path) keeps its C{Allow}."""
        channel, transport = self.connect()
        self.request(channel, path=b"/local", headers=[b"X-Token: t"], body=b"abc")
        status, headers, body = one_response(transport)
        self.assertEqual(status, 405)
        self.assertEqual(headers[b"allow"], [b"GET, HEAD"])
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertEqual(self.access_events[0]["access"]["denial"], "method_not_allowed")
        # Local endpoints stay out of the request counters.
        self.assertEqual(self.metrics.counters["requests_total"], 0)

    def test_unserved_methods_without_screen(self) -> None:
        """
        SPEC 12 H2 at the HTTP layer: with a resource that has no C{screen},
        TRACE, CONNECT (even in authority form) and unknown methods are 405
        with the proxied methods in C{Allow}, never rendered.
        """
        self.resource = RecordingResource()
        self.site = GatewaySite(self.resource, self.config, self.metrics, clock=self.clock)
        for request_line in (
            b"TRACE /x HTTP/1.1",
            b"CONNECT evil:443 HTTP/1.1",
            b"CONNECT /x HTTP/1.1",
            b"PROPFIND * HTTP/1.1",
        ):
            channel, transport = self.connect()
            channel.dataReceived(request_line + b"\r\nHost: g\r\nContent-Length: 5\r\n\r\n")
            status, headers, body = one_response(transport)
            self.assertEqual(status, 405, request_line)
            self.assertEqual(json.loads(body)["error"], "method_not_allowed")
            self.assertEqual(headers[b"allow"], [b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"])
            self.assertEqual(headers[b"connection"], [b"close"])
        self.assertEqual(self.resource.rendered, [])


class MeasuringFile(BytesIO):
    """A request body store that fails the test if more than LIMIT is written."""

    def __init__(self, case: SynchronousTestCase) -> None:
        super().__init__()
        self.case = case
        self.largest = 0

    def write(self, data: bytes) -> int:
        written = super().write(data)
        self.largest = max(self.largest, self.tell())
        self.case.assertLessEqual(self.tell(), LIMIT)
        return written


class BodyLimitTests(HTTPTestMixin, SynchronousTestCase):
    """SPEC step 1: bodies over MAX_REQUEST_BYTES are refused with 413."""

    def assertPayloadTooLarge(self, transport: StringTransport) -> None:
        status, headers, body = one_response(transport)
        self.assertEqual(status, 413)
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        self.assertEqual(headers[b"connection"], [b"close"])
        envelope = json.loads(body)
        self.assertEqual(envelope["error"], "payload_too_large")
        self.assertEqual(envelope["request_id"], headers[b"x-request-id"][0].decode())
        self.assertEqual(self.resource.rendered, [])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.metrics.counters["requests_total"], 1)
        self.assertEqual(self.metrics.counters["requests_denied"], 1)

    def test_content_length_over_limit(self) -> None:
        """A Content-Length over the limit is answered 413 at once, and the body is dropped."""
        channel, transport = self.connect()
        channel.dataReceived(b"POST /upload HTTP/1.1\r\nHost: g\r\nContent-Length: 101\r\n\r\n")
        self.assertPayloadTooLarge(transport)
        self.assertEqual(channel.requests, [])
        # The body that follows is read and dropped, never stored or parsed.
        transport.clear()
        channel.dataReceived(b"x" * 101 + b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.resource.rendered, [])
        self.assertEqual(self.site.inflight, 0)

    def test_huge_content_length_answered_before_body(self) -> None:
        """A huge Content-Length with Expect: 100-continue is answered 413 without 100 Continue."""
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST / HTTP/1.1\r\nHost: g\r\nExpect: 100-continue\r\n"
            b"Content-Length: 20971520\r\n\r\n"
        )
        self.assertNotIn(b"100 Continue", transport.value())
        self.assertPayloadTooLarge(transport)

    def test_refused_connection_aborted_after_grace(self) -> None:
        """A connection refused for its body size is aborted after a grace period."""
        channel, transport = self.connect()
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: g\r\nContent-Length: 1000\r\n\r\n")
        self.assertFalse(transport.disconnected)
        self.clock.advance(2.0)
        self.assertTrue(transport.disconnected)

    def start_chunked(self):
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST /stream HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        [request] = channel.requests
        request.content = MeasuringFile(self)
        return channel, transport, request

    def test_chunked_over_limit(self) -> None:
        """
        A chunked body is refused on the chunk that crosses the limit, none of which is stored.
        """
        channel, transport, request = self.start_chunked()
        store = request.content
        for _ in range(3):
            channel.dataReceived(b"1e\r\n" + b"y" * 30 + b"\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(store.largest, 90)
        # 90 + 30 > 100: refused on this chunk, none of which is stored.
        channel.dataReceived(b"1e\r\n" + b"y" * 30 + b"\r\n")
        self.assertPayloadTooLarge(transport)
        self.assertEqual(store.largest, 90)
        transport.clear()
        channel.dataReceived(b"1e\r\n" + b"y" * 30 + b"\r\n0\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.resource.rendered, [])

    def test_chunked_single_huge_chunk(self) -> None:
        """One announced chunk over the limit is refused before it is all received."""
        channel, transport, request = self.start_chunked()
        store = request.content
        channel.dataReceived(b"100000\r\n" + b"z" * 60)
        channel.dataReceived(b"z" * 60)
        self.assertPayloadTooLarge(transport)
        self.assertEqual(store.largest, 60)

    def test_content_length_at_limit_accepted(self) -> None:
        """A body of exactly the limit is accepted and rendered."""
        channel, transport = self.connect()
        self.request(channel, body=b"b" * LIMIT)
        status, _, body = one_response(transport)
        self.assertEqual((status, body), (200, b"ok 100"))
        self.assertEqual(self.resource.bodies, [b"b" * LIMIT])
        self.assertFalse(transport.disconnecting)

    def test_chunked_at_limit_accepted(self) -> None:
        """A chunked body of exactly the limit is accepted."""
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST / HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"32\r\n" + b"c" * 50 + b"\r\n32\r\n" + b"c" * 50 + b"\r\n0\r\n\r\n"
        )
        status, _, body = one_response(transport)
        self.assertEqual((status, body), (200, b"ok 100"))

    def test_large_bodies_spool_to_a_file(self) -> None:
        """Large bodies are spooled to a file, small ones kept in memory."""
        config = GatewayConfig(max_request_bytes=10 * 1024 * 1024)
        site = GatewaySite(self.resource, config, self.metrics, clock=self.clock)
        channel = site.buildProtocol(None)
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: g\r\nContent-Length: 200000\r\n\r\n")
        large = channel.requests[0].content
        self.assertNotIsInstance(large, BytesIO)
        self.assertIsInstance(large.fileno(), int)
        channel.dataReceived(b"d" * 200000)
        self.assertEqual(self.resource.bodies, [b"d" * 200000])

        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: g\r\nContent-Length: 10\r\n\r\n")
        self.assertIsInstance(channel.requests[0].content, BytesIO)


class TimeoutTests(HTTPTestMixin, SynchronousTestCase):
    """The four server timeouts, each on the site's clock."""

    def test_twisted_idle_timer_off(self) -> None:
        """Twisted's own idle timer is off: the gateway's timers replace it."""
        channel, _ = self.connect()
        self.assertIsNone(channel.timeOut)
        self.assertIsNone(channel._TimeoutMixin__timeoutCall)

    def test_header_trickle_cut_other_client_served(self) -> None:
        """
        Headers trickled slowly are cut at the header timeout with 408, while another client is
        served.
        """
        slow, slow_transport = self.connect()
        slow.dataReceived(b"GET / HTTP/1.1\r\n")
        header = b"X-Slow: " + b"a" * 20
        for index in range(4):
            self.clock.advance(1)
            slow.dataReceived(header[index : index + 1])
            if index == 1:
                fast, fast_transport = self.connect()
                self.request(fast, method=b"GET")
        self.assertEqual(self.clock.seconds(), 4)
        self.assertFalse(slow_transport.disconnecting)
        self.clock.advance(0.9)
        self.assertFalse(slow_transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(slow_transport.disconnecting)
        status, headers, body = one_response(slow_transport)
        self.assertEqual(status, 408)
        self.assertEqual(json.loads(body)["request_id"], headers[b"x-request-id"][0].decode())

        status, _, body = one_response(fast_transport)
        self.assertEqual((status, body), (200, b"ok 0"))
        self.assertFalse(fast_transport.disconnecting)
        self.assertEqual(len(self.resource.rendered), 1)

    def test_silent_connection_closed_at_header_timeout(self) -> None:
        """A connection that sends nothing is closed silently at the header timeout."""
        _, transport = self.connect()
        self.clock.advance(READ_HEADER - 0.1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(2.0)
        self.assertTrue(transport.disconnected)

    def test_body_trickle_cut_at_read_timeout(self) -> None:
        """A body trickled slowly is cut at the read timeout with 408 carrying the request id."""
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST / HTTP/1.1\r\nHost: g\r\nX-Request-Id: trickle\r\nContent-Length: 90\r\n\r\n"
        )
        # Past READ_HEADER: the headers are in, so only READ_TIMEOUT applies.
        for _ in range(9):
            self.clock.advance(1)
            channel.dataReceived(b"e" * 5)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        status, headers, body = one_response(transport)
        self.assertEqual(status, 408)
        self.assertEqual(headers[b"x-request-id"], [b"trickle"])
        self.assertEqual(json.loads(body)["error"], "request_timeout")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.resource.rendered, [])
        self.assertEqual(self.site.inflight, 0)

    def test_response_not_written_aborts_at_write_timeout(self) -> None:
        """A response left unfinished is aborted at the write timeout."""
        channel, transport = self.connect()
        self.request(channel, path=b"/slow")
        [request] = self.resource.pending
        request.write(b"partial")
        self.clock.advance(WRITE - 0.1)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)

    def test_client_not_reading_aborts_at_write_timeout(self) -> None:
        """A client that does not read the response is aborted at the write timeout."""
        channel, transport = self.connect()
        self.request(channel, path=b"/slow")
        [request] = self.resource.pending
        channel.pauseProducing()  # the transport's buffer is full
        request.write(b"x" * 1000)
        request.finish()
        self.clock.advance(WRITE)
        self.assertTrue(transport.disconnected)

    def test_flushed_response_stops_write_timer(self) -> None:
        """A response that is flushed stops the write timer and starts the idle one."""
        channel, transport = self.connect()
        self.request(channel, path=b"/slow")
        [request] = self.resource.pending
        channel.pauseProducing()
        request.finish()
        self.clock.advance(WRITE / 2)
        channel.resumeProducing()
        self.assertEqual(channel.armed(), {"idle"})
        self.clock.advance(WRITE)
        self.assertFalse(transport.disconnecting)

    def test_idle_keep_alive_closed_at_idle_timeout(self) -> None:
        """An idle keep-alive connection is closed at the idle timeout, not the header one."""
        channel, transport = self.connect()
        self.request(channel)
        self.assertEqual(one_response(transport)[0], 200)
        # The header deadline does not run while idle: still open after it.
        self.clock.advance(IDLE - 0.1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_idle_connections_share_one_timer(self) -> None:
        """
        Many idle keep-alive connections wait on one reactor timer, not one
        each, and each is still closed at its own idle timeout, counted from
        the end of its last request.
        """
        connections = []
        for _ in range(5):
            channel, transport = self.connect()
            self.request(channel)
            connections.append((channel, transport))
            self.clock.advance(1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        # t = 5: the third one's next request; its idle time starts again.
        self.request(connections[2][0])
        self.clock.advance(IDLE - 5)  # t = IDLE: the first one went idle at 0
        self.assertEqual([t.disconnecting for _, t in connections], [True] + [False] * 4)
        closed = []
        for _ in range(5):
            self.clock.advance(1)
            closed.append([t.disconnecting for _, t in connections])
        self.assertEqual(
            closed,
            [
                [True, True, False, False, False],
                [True, True, False, False, False],
                [True, True, False, True, False],
                [True, True, False, True, True],
                [True, True, True, True, True],
            ],
        )

    def test_idle_restarts_after_each_request(self) -> None:
        """The idle timeout restarts after each request."""
        channel, transport = self.connect()
        self.request(channel)
        self.clock.advance(IDLE - 1)
        transport.clear()
        self.request(channel)
        self.assertEqual(one_response(transport)[0], 200)
        self.clock.advance(IDLE - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_idle_timer_stops_when_next_request_starts(self) -> None:
        """The idle timer stops when the next request starts, and restarts when it finishes."""
        config = GatewayConfig(
            read_header_timeout=READ_HEADER, read_timeout=READ, write_timeout=WRITE, idle_timeout=3
        )
        self.site = GatewaySite(self.resource, config, self.metrics, clock=self.clock)
        channel, transport = self.connect()
        self.request(channel)
        self.clock.advance(2)
        self.request(channel, path=b"/slow")
        self.assertEqual(channel.armed(), {"write"})
        self.clock.advance(WRITE - 0.1)
        self.assertFalse(transport.disconnecting)
        self.resource.pending[0].finish()
        self.assertEqual(channel.armed(), {"idle"})

    def test_keep_alive_request_gets_header_timeout_from_first_byte(self) -> None:
        """
        The next request on a keep-alive connection has the header timeout from its first byte.
        """
        channel, transport = self.connect()
        self.request(channel)
        self.clock.advance(30)
        transport.clear()
        channel.dataReceived(b"G")
        self.clock.advance(READ_HEADER - 0.1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(one_response(transport)[0], 408)

    def test_pipelined_requests_answered_in_order(self) -> None:
        """Pipelined requests are answered in order."""
        channel, transport = self.connect()
        channel.dataReceived(
            b"GET /slow HTTP/1.1\r\nHost: g\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\n\r\nhi"
        )
        [request] = self.resource.pending
        request.finish()
        statuses = [(r.status, r.body) for r in parse_responses(transport.value())]
        self.assertEqual(statuses, [(200, b""), (200, b"ok 2")])
        self.assertEqual(channel.armed(), {"idle"})


class EventStreamTimeoutTests(HTTPTestMixin, SynchronousTestCase):
    """
    SPEC 13: a text/event-stream response is bound by STREAM_IDLE_TIMEOUT
    of silence, not by WRITE_TIMEOUT.
    """

    def stream(self, content_type: bytes = b"text/event-stream; charset=utf-8"):
        channel, transport = self.connect()
        self.request(channel, path=b"/slow", method=b"GET")
        [request] = self.resource.pending
        request.setHeader(b"content-type", content_type)
        request.write(b"")
        return channel, transport, request

    def test_write_timeout_not_applied(self) -> None:
        """A stream writing every 10 s outlives WRITE_TIMEOUT many times over."""
        channel, transport, request = self.stream()
        self.assertEqual(channel.armed(), {"stream_idle"})
        for _ in range(12):
            self.clock.advance(10)
            request.write(b"data: tick\n\n")
        self.assertGreater(self.clock.seconds(), WRITE * 5)
        self.assertFalse(transport.disconnected)

    def test_cut_after_idle_timeout_of_silence(self) -> None:
        """Nothing written for STREAM_IDLE_TIMEOUT: the connection is aborted."""
        channel, transport, request = self.stream()
        request.write(b"data: 1\n\n")
        self.clock.advance(STREAM_IDLE - 0.1)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)

    def test_client_not_reading_is_cut(self) -> None:
        """
        Bytes the transport holds back (the client stopped reading) do not
        count as reaching the client: a stream still written to is cut.
        """
        channel, transport, request = self.stream()
        channel.pauseProducing()
        for _ in range(3):
            self.clock.advance(STREAM_IDLE / 3)
            request.write(b"data: x\n\n")
        self.assertTrue(transport.disconnected)

    def test_resumed_transport_counts_as_progress(self) -> None:
        """When the client reads again, the held bytes reached it: the timer restarts."""
        channel, transport, request = self.stream()
        channel.pauseProducing()
        request.write(b"data: x\n\n")
        self.clock.advance(STREAM_IDLE - 1)
        channel.resumeProducing()
        self.clock.advance(STREAM_IDLE - 1)
        self.assertFalse(transport.disconnected)
        self.clock.advance(1)
        self.assertTrue(transport.disconnected)

    def test_finished_stream_leaves_idle_keep_alive(self) -> None:
        """Once the stream ends, only the keep-alive idle timer runs."""
        channel, transport, request = self.stream()
        request.write(b"data: last\n\n")
        request.finish()
        self.assertEqual(channel.armed(), {"idle"})
        self.clock.advance(STREAM_IDLE)
        self.assertFalse(transport.disconnecting)

    def test_next_response_on_connection_gets_write_timeout(self) -> None:
        """The next request on the same connection is an ordinary one again."""
        channel, transport, request = self.stream()
        request.finish()
        self.request(channel, path=b"/slow2")
        self.assertEqual(channel.armed(), {"write"})
        self.resource.pending[1].write(b"x")
        self.clock.advance(WRITE)
        self.assertTrue(transport.disconnected)

    def test_other_content_types_keep_write_timeout(self) -> None:
        """A JSON response written to steadily is still cut at WRITE_TIMEOUT."""
        channel, transport, request = self.stream(b"application/json")
        self.assertEqual(channel.armed(), {"write"})
        for _ in range(3):
            self.clock.advance(WRITE / 3)
            request.write(b"{}")
        self.assertTrue(transport.disconnected)


class UpstreamWaitTests(HTTPTestMixin, SynchronousTestCase):
    """
    The wait for an upstream's headers is bounded by the upstream timeout
    (a resource may have 5 minutes, SPEC 13), not by WRITE_TIMEOUT.
    """

    def test_write_timeout_suspended_while_waiting(self) -> None:
        """WRITE_TIMEOUT does not run during the wait and starts afresh after it."""
        channel, transport = self.connect()
        self.request(channel, path=b"/slow")
        [request] = self.resource.pending
        channel.upstream_wait(True)
        self.assertEqual(channel.armed(), set())
        self.clock.advance(WRITE * 10)
        self.assertFalse(transport.disconnected)
        channel.upstream_wait(False)
        request.write(b"partial")
        self.clock.advance(WRITE - 0.1)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)

    def test_event_stream_keeps_its_idle_timer(self) -> None:
        """An event stream already under way is not given WRITE_TIMEOUT back."""
        channel, _ = self.connect()
        self.request(channel, path=b"/slow", method=b"GET")
        [request] = self.resource.pending
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"")
        channel.upstream_wait(False)
        self.assertEqual(channel.armed(), {"stream_idle"})


class PersistenceTests(HTTPTestMixin, SynchronousTestCase):
    """Connection: close is honoured in every spelling RFC 9110 allows."""

    def answered(self, *headers: bytes, version: bytes = b"HTTP/1.1"):
        channel, transport = self.connect()
        head = [b"GET / " + version, b"Host: gateway.example", *headers]
        channel.dataReceived(b"\r\n".join(head) + b"\r\n\r\n")
        status, response_headers, _ = one_response(transport)
        self.assertEqual(status, 200)
        return response_headers, transport

    def assertCloses(self, *headers: bytes, version: bytes = b"HTTP/1.1") -> None:
        response_headers, transport = self.answered(*headers, version=version)
        self.assertEqual(response_headers[b"connection"], [b"close"], headers)
        self.assertTrue(transport.disconnecting, headers)

    def test_close_in_a_comma_list(self) -> None:
        """A close token anywhere in a Connection list, in any case, closes the connection."""
        for header in (
            b"Connection: close, X-Hop",
            b"Connection: X-Hop,close",
            b"Connection: keep-alive ,  CLOSE",
            b"Connection: close",
            b"Connection: x-hop close",
        ):
            self.assertCloses(header)

    def test_close_in_a_second_header(self) -> None:
        """A close token in a second Connection header closes the connection."""
        self.assertCloses(b"Connection: keep-alive", b"Connection: close")

    def test_other_tokens_keep_alive(self) -> None:
        """Connection tokens other than close keep the connection alive."""
        for headers in ((), (b"Connection: keep-alive, X-Close",), (b"Connection: closed",)):
            response_headers, transport = self.answered(*headers)
            self.assertNotIn(b"connection", response_headers, headers)
            self.assertFalse(transport.disconnecting, headers)

    def test_http_1_0_closes(self) -> None:
        """An HTTP/1.0 request closes the connection after its response."""
        response_headers, transport = self.answered(version=b"HTTP/1.0")
        self.assertTrue(transport.disconnecting)


class DrainTests(HTTPTestMixin, SynchronousTestCase):
    """site.drain(): wait for requests in flight, close keep-alive connections."""

    def test_inflight_counts_requests_until_finished(self) -> None:
        """A request is counted in flight from its headers until its response finishes."""
        channel, transport = self.connect()
        self.assertEqual(self.site.inflight, 0)
        channel.dataReceived(b"POST /slow HTTP/1.1\r\nHost: g\r\nContent-Length: 4\r\n\r\n")
        self.assertEqual(self.site.inflight, 1)
        channel.dataReceived(b"body")
        self.assertEqual(self.site.inflight, 1)
        self.resource.pending[0].finish()
        self.assertEqual(self.site.inflight, 0)

    def test_client_gone_mid_body_logged_with_method_and_path(self) -> None:
        """
        A client gone mid-body is logged as 499 with method and path (no query), never rendered.
        """
        channel, _ = self.connect()
        channel.dataReceived(
            b"PUT /tools/upload?key=secret HTTP/1.1\r\nHost: g\r\nX-Request-Id: half\r\n"
            b"Content-Length: 50\r\n\r\npartial"
        )
        self.clock.advance(1)
        channel.connectionLost(Failure(ConnectionDone("client went away")))
        [event] = self.access_events
        record = event["access"]
        self.assertEqual(
            (record["request_id"], record["method"], record["path"], record["status"]),
            ("half", "PUT", "/tools/upload", 499),
        )
        self.assertTrue(record["aborted"])
        self.assertEqual(self.site.inflight, 0)
        self.assertEqual(self.resource.rendered, [])

    def test_client_gone_mid_chunked_body_logged_with_method_and_path(self) -> None:
        """A client gone mid chunked body is logged as 499 with method and path."""
        channel, _ = self.connect()
        channel.dataReceived(
            b"POST /a/b HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab"
        )
        channel.connectionLost(Failure(ConnectionDone("client went away")))
        [event] = self.access_events
        record = event["access"]
        self.assertEqual(
            (record["method"], record["path"], record["status"]), ("POST", "/a/b", 499)
        )

    def test_inflight_released_on_connection_lost(self) -> None:
        """A lost connection releases its request from the in-flight count."""
        channel, _ = self.connect()
        self.request(channel, path=b"/slow")
        self.assertEqual(self.site.inflight, 1)
        channel.connectionLost(None)
        self.assertEqual(self.site.inflight, 0)

    def test_drain_fires_when_inflight_finishes(self) -> None:
        """Draining closes idle connections at once and fires when the last request finishes."""
        channel, transport = self.connect()
        self.request(channel, path=b"/slow")
        idle_channel, idle_transport = self.connect()
        self.request(idle_channel)
        drained = self.site.drain(25)
        self.assertNoResult(drained)
        # The idle keep-alive connection is closed at once.
        self.assertTrue(idle_transport.disconnecting)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(10)
        self.resource.pending[0].finish()
        self.assertEqual(self.successResultOf(drained), 0)
        _, headers, _ = one_response(transport)
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertTrue(transport.disconnecting)
        # Once both connections are gone no timer is left: neither the
        # channels' nor the drain's own deadline.
        channel.connectionLost(None)
        idle_channel.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_drain_fires_at_timeout(self) -> None:
        """Draining fires at its bound with the number of requests still in flight."""
        channel, _ = self.connect()
        self.request(channel, path=b"/slow")
        drained = self.site.drain(25)
        self.clock.advance(24.9)
        self.assertNoResult(drained)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(drained), 1)

    def test_drain_hooks_called_at_start_requests_still_awaited(self) -> None:
        """
        SPEC 13 drain ordering: standing streams are told at once; the drain
        still waits for every request in flight, and fires as soon as the
        last one ends.
        """
        stream_channel, _ = self.connect()
        self.request(stream_channel, path=b"/slow-stream", method=b"GET")
        call_channel, _ = self.connect()
        self.request(call_channel, path=b"/slow-call")
        stream, call = self.resource.pending
        told = []
        self.site.when_draining(lambda: (told.append(self.clock.seconds()), stream.finish()))
        cancelled = []
        cancel = self.site.when_draining(lambda: cancelled.append(True))
        cancel()
        self.clock.advance(1)
        drained = self.site.drain(25)
        self.assertEqual(told, [1])
        self.assertEqual(cancelled, [])
        self.assertEqual(self.site.inflight, 1)
        self.assertNoResult(drained)
        self.clock.advance(3)
        call.finish()
        self.assertEqual(self.successResultOf(drained), 0)

    def test_when_draining_after_drain_started_calls_at_once(self) -> None:
        """A stream starting while the site drains is told at once."""
        self.site.drain(25)
        told = []
        self.site.when_draining(lambda: told.append(True))
        self.assertEqual(told, [True])

    def test_drain_without_requests_fires_at_once(self) -> None:
        """Draining with nothing in flight fires at once."""
        self.assertEqual(self.successResultOf(self.site.drain(25)), 0)

    def test_request_during_drain_closes_connection(self) -> None:
        """A request that arrives during draining is served with Connection: close."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\n")
        self.site.drain(25)
        channel.dataReceived(b"Host: gateway.example\r\n\r\n")
        status, headers, _ = one_response(transport)
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertTrue(transport.disconnecting)


class SiteMetricsTests(HTTPTestMixin, SynchronousTestCase):
    """The site feeds SPEC 15's request families and connection gauges."""

    def sample(self, name, **labels):
        from tests.support.metrics import sample_sum

        return sample_sum(self.metrics, name, **labels)

    def test_every_request_counted_once(self) -> None:
        """An answered request and a refused one each count once, with their duration."""
        channel, transport = self.connect()
        self.request(channel, path=b"/tools")
        self.request(channel, path=b"/tools", body=b"x" * (LIMIT + 1))
        self.assertEqual(self.sample("caracal_gateway_requests_total"), 2)
        self.assertEqual(self.sample("caracal_gateway_request_duration_seconds_count"), 2)
        self.assertEqual(
            self.sample("caracal_gateway_denials_total", reason="payload_too_large"), 1
        )
        self.assertEqual(self.metrics.snapshot()["requests_total"], 1, "JSON: the 413 only")

    def test_local_endpoints_not_counted(self) -> None:
        """A request the root marks local (/health, /metrics) is left out."""

        class Local(Resource):
            isLeaf = True

            def render(self, request):
                request.local = True
                return b"ok"

        self.site.resource = Local()
        channel, transport = self.connect()
        self.request(channel, path=b"/health", method=b"GET")
        self.assertEqual(one_response(transport)[0], 200)
        self.assertEqual(self.sample("caracal_gateway_requests_total"), 0)

    def test_connection_and_inflight_gauges(self) -> None:
        """open_connections follows connections, inflight_requests unfinished requests."""
        channel, transport = self.connect()
        self.connect()
        self.assertEqual(self.sample("caracal_gateway_open_connections"), 2)
        self.request(channel, path=b"/slow")
        self.assertEqual(self.sample("caracal_gateway_inflight_requests"), 1)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.sample("caracal_gateway_inflight_requests"), 0)
        self.assertEqual(self.sample("caracal_gateway_open_connections"), 1)
        self.assertEqual(self.sample("caracal_gateway_requests_total", status_class="4xx"), 1)


class IdleChannelMemoryTests(HTTPTestMixin, SynchronousTestCase):
    """
    An idle keep-alive channel keeps its attributes in CPython's compact
    shared-key form (about 0.3 KiB) instead of a dict of its own (1.5 KiB):
    memory every idle agent connection holds (SPEC 17).
    """

    def setUp(self) -> None:
        super().setUp()
        if sys.implementation.name != "cpython" or sys.version_info[:2] != (3, 11):
            raise SkipTest("the shared-key attribute layout measured is CPython 3.11's")
        # A class of its own: a clean shared-key table, whatever other tests
        # did with GatewayChannel in this process; __init__ is the one tested.
        self.site.protocol = type("FreshChannel", (GatewayChannel,), {})

    def test_concurrent_channels_stay_compact(self) -> None:
        """
        Six channels connected at once, each answering three keep-alive
        requests in turn (Twisted's per-request attributes interleaved
        between them), each end idle with a compact attribute table; without
        the names set in C{GatewayChannel.__init__} each holds 1,584 bytes.
        """
        channels = [self.connect() for _ in range(6)]
        for _ in range(3):
            for channel, _transport in channels:
                self.request(channel, path=b"/health", method=b"GET")
        for channel, transport in channels:
            self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 3)
            self.assertEqual(channel.armed(), {"idle"})
            self.assertLess(sys.getsizeof(channel.__dict__), 600)

    def test_call_later_is_the_sites_clock(self) -> None:
        """
        A channel's C{callLater} (what Twisted's HTTPChannel schedules its
        abort with) is the site's clock's, read from the site rather than
        stored on the channel; setting it to another clock's is refused.
        """
        channel, _transport = self.connect()
        self.assertNotIn("callLater", vars(channel))
        call = channel.callLater(5, lambda: None)
        self.assertIn(call, self.clock.getDelayedCalls())
        call.cancel()
        with self.assertRaises(ValueError):
            channel.callLater = Clock().callLater
