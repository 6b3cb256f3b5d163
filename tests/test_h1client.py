# -*- test-case-name: tests.test_h1client -*-
"""
The gateway's HTTP/1.1 client connection: what it writes, how it frames
responses, and every response it refuses to read more than one way.
"""

from io import BytesIO

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import (
    FileBodyProducer,
    Request,
    RequestNotSent,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface.verify import verifyObject

from caracal.gateway.h1client import (
    MAX_HEAD,
    MAX_INTERIM,
    BytesBody,
    H1ClientProtocol,
    MalformedResponse,
)


def get(method=b"GET", path=b"/tool", body=None, persistent=True, **headers):
    fields = Headers({b"Host": [b"tool.test"]})
    for name, value in headers.items():
        fields.setRawHeaders(name.replace("_", "-"), [value])
    return Request(method, path, fields, body, persistent=persistent)


class Reader(Protocol):
    """A body protocol that keeps what it is given."""

    def __init__(self):
        self.data = []
        self.reason = None

    def dataReceived(self, data):
        self.data.append(data)

    def connectionLost(self, reason):
        self.reason = reason

    @property
    def body(self):
        return b"".join(self.data)


class ClientTestCase(SynchronousTestCase):
    def setUp(self):
        self.quiescent = []
        self.protocol = H1ClientProtocol(self.quiescent.append)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, request=None):
        d = self.protocol.request(request or get())
        self.transport.clear()
        return d

    def respond(self, wire, request=None, chunk=None):
        """Send a request, feed C{wire} (C{chunk} bytes at a time): the response."""
        d = self.send(request)
        if chunk is None:
            self.protocol.dataReceived(wire)
        else:
            for i in range(0, len(wire), chunk):
                self.protocol.dataReceived(wire[i : i + chunk])
        return self.successResultOf(d)

    def read(self, response):
        reader = Reader()
        response.deliverBody(reader)
        return reader

    def refused(self, wire, request=None):
        """C{wire} fails the request as malformed and drops the connection."""
        d = self.send(request)
        self.protocol.dataReceived(wire)
        failure = self.failureResultOf(d, ResponseFailed)
        [reason] = failure.value.reasons
        self.assertTrue(reason.check(MalformedResponse))
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.protocol.state, "CLOSED")
        self.assertEqual(self.quiescent, [])
        return reason.value


class RequestHeadTests(ClientTestCase):
    def test_get(self):
        """A request without a body: its line, its headers, a blank line, in one write."""
        self.protocol.request(get(x_request_id=b"abc"))
        self.assertEqual(
            self.transport.value(),
            b"GET /tool HTTP/1.1\r\nHost: tool.test\r\nX-Request-Id: abc\r\n\r\n",
        )

    def test_bytes_body(self):
        """An in-memory body goes with the head, with its Content-Length."""
        self.protocol.request(get(b"POST", body=BytesBody(b"a=1")))
        self.assertEqual(
            self.transport.value(),
            b"POST /tool HTTP/1.1\r\nHost: tool.test\r\nContent-Length: 3\r\n\r\na=1",
        )

    def test_not_persistent(self):
        """A request that is not persistent says so."""
        self.protocol.request(get(persistent=False))
        self.assertIn(b"\r\nConnection: close\r\n", self.transport.value())

    def test_streamed_body(self):
        """A body of unknown length is written by Twisted's request, chunked."""

        class Unknown:
            length = UNKNOWN_LENGTH

            def startProducing(self, consumer):
                consumer.write(b"hello")
                from twisted.internet.defer import succeed

                return succeed(None)

            def stopProducing(self):
                pass

        self.protocol.request(get(b"POST", body=Unknown()))
        wire = self.transport.value()
        self.assertIn(b"Transfer-Encoding: chunked\r\n", wire)
        self.assertTrue(wire.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"))

    def test_busy(self):
        """A second request on a busy connection is not sent."""
        self.send()
        self.failureResultOf(self.protocol.request(get()), RequestNotSent)
        self.assertEqual(self.transport.value(), b"")


class FramingTests(ClientTestCase):
    def test_content_length(self):
        """A body of Content-Length bytes; the connection then goes back to the pool."""
        response = self.respond(
            b"HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
        )
        verifyObject(IResponse, response)
        self.assertEqual(
            (response.version, response.code, response.phrase), ((b"HTTP", 1, 1), 201, b"Created")
        )
        self.assertEqual(response.length, 5)
        # Every header as received, framing ones included.
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"5"])
        reader = self.read(response)
        self.assertEqual(reader.body, b"hello")
        self.assertTrue(reader.reason.check(ResponseDone))
        self.assertEqual(self.protocol.state, "QUIESCENT")
        self.assertEqual(self.quiescent, [self.protocol])
        self.assertFalse(self.transport.disconnecting)

    def test_byte_by_byte(self):
        """A response split anywhere reads the same."""
        wire = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello"
        reader = self.read(self.respond(wire, chunk=1))
        self.assertEqual(reader.body, b"hello")
        self.assertTrue(reader.reason.check(ResponseDone))
        self.assertEqual(self.quiescent, [self.protocol])

    def test_chunked(self):
        """Chunks (with extensions) decoded, trailers read and dropped, however split."""
        wire = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;name=value\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
        )
        for chunk in (None, 1, 7):
            self.setUp()
            response = self.respond(wire, chunk=chunk)
            self.assertEqual(response.length, UNKNOWN_LENGTH)
            reader = self.read(response)
            self.assertEqual(reader.body, b"hello 0123456789")
            self.assertTrue(reader.reason.check(ResponseDone))
            self.assertEqual(self.quiescent, [self.protocol])

    def test_until_close(self):
        """No length, no chunking: the body ends with the connection, never reused."""
        response = self.respond(b"HTTP/1.1 200 OK\r\n\r\nsome")
        self.assertEqual(response.length, UNKNOWN_LENGTH)
        reader = self.read(response)
        self.protocol.dataReceived(b" more")
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(reader.body, b"some more")
        self.assertTrue(reader.reason.check(PotentialDataLoss))
        self.assertEqual(self.quiescent, [])

    def test_no_body(self):
        """HEAD, 204 and 304 have no body whatever their headers say."""
        for request, wire in (
            (get(b"HEAD"), b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
            (get(), b"HTTP/1.1 204 No Content\r\n\r\n"),
            (get(), b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
        ):
            self.setUp()
            response = self.respond(wire, request)
            self.assertEqual(response.length, 0)
            reader = self.read(response)
            self.assertEqual(reader.body, b"")
            self.assertTrue(reader.reason.check(ResponseDone))
            self.assertEqual(self.quiescent, [self.protocol])

    def test_interim_skipped(self):
        """100 and 103 before the final answer are read and skipped."""
        response = self.respond(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        self.assertEqual(response.code, 200)
        self.assertFalse(response.headers.hasHeader(b"link"))
        self.assertEqual(self.read(response).body, b"ok")

    def test_not_reused(self):
        """Connection: close, HTTP/1.0 or a non-persistent request: closed after the body."""
        for request, wire in (
            (
                get(),
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n",
            ),
            (get(), b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
            (get(persistent=False), b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        ):
            self.setUp()
            reader = self.read(self.respond(wire, request))
            self.assertTrue(reader.reason.check(ResponseDone))
            self.assertEqual(self.quiescent, [])
            self.assertTrue(self.transport.disconnecting)
            self.assertEqual(self.protocol.state, "CLOSED")

    def test_bytes_after_response(self):
        """Bytes past the response: the connection cannot frame the next one."""
        reader = self.read(self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1"))
        self.assertEqual(reader.body, b"ok")
        self.assertTrue(reader.reason.check(ResponseDone))
        self.assertEqual(self.quiescent, [])
        self.assertTrue(self.transport.disconnecting)

    def test_bytes_while_idle(self):
        """Bytes on an idle connection: dropped, never used again."""
        self.read(self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
        self.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.protocol.state, "CLOSED")
        self.failureResultOf(self.protocol.request(get()), RequestNotSent)


class MalformedTests(ClientTestCase):
    def test_bare_line_feeds_and_carriage_returns(self):
        """A CR or LF that is not part of a CRLF: refused."""
        for wire in (
            b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-A: a\nContent-Length: 5\r\n\r\n",
        ):
            self.setUp()
            self.refused(wire)

    def test_status_lines(self):
        """Only an HTTP/1.0 or 1.1 status line with a three-digit status."""
        for line in (
            b"HTTP/2 200 OK",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 +20 OK",
            b"ICY 200 OK",
            b"HTTP/1.1",
        ):
            self.setUp()
            self.refused(line + b"\r\nContent-Length: 0\r\n\r\n")

    def test_header_lines(self):
        """Folded lines, lines without a colon, names that are not tokens: refused."""
        for line in (
            b" folded",
            b"\tfolded",
            b"No-Colon",
            b"Bad Name: x",
            b": empty-name",
            b"B\x00d: x",
        ):
            self.setUp()
            self.refused(b"HTTP/1.1 200 OK\r\nX-A: a\r\n" + line + b"\r\nContent-Length: 0\r\n\r\n")

    def test_content_lengths(self):
        """Anything but one decimal length (repeated equal at most): refused."""
        for values in (
            [b"+5"],
            [b"-1"],
            [b"0x5"],
            [b"5 5"],
            [b""],
            [b"5", b"6"],
            [b"5, 6"],
            [b"9" * 19],
        ):
            self.setUp()
            fields = b"".join(b"Content-Length: " + v + b"\r\n" for v in values)
            self.refused(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\nhello")

    def test_repeated_equal_content_length(self):
        """The same length twice (RFC 9112 allows it) reads as that length."""
        response = self.respond(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nok"
        )
        self.assertEqual(response.length, 2)

    def test_transfer_codings(self):
        """Only a single chunked coding, and never beside Content-Length."""
        for fields in (
            b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            b"Transfer-Encoding: gzip\r\n",
            b"Transfer-Encoding: gzip, chunked\r\n",
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        ):
            self.setUp()
            self.refused(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n0\r\n\r\n")

    def test_switching_protocols(self):
        """A 101 (the gateway never asks to upgrade): refused."""
        self.refused(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")

    def test_endless_interim(self):
        """More than MAX_INTERIM interim answers: refused."""
        self.refused(b"HTTP/1.1 100 Continue\r\n\r\n" * (MAX_INTERIM + 1))

    def test_head_too_large(self):
        """A head past MAX_HEAD, even in small pieces: refused, connection dropped."""
        d = self.send()
        self.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        for _ in range(MAX_HEAD // 1000 + 1):
            self.protocol.dataReceived(b"X-A: " + b"a" * 993 + b"\r\n")
        [reason] = self.failureResultOf(d, ResponseFailed).value.reasons
        self.assertTrue(reason.check(MalformedResponse))
        self.assertTrue(self.transport.disconnected)

    def body_refused(self, body, fed=None):
        """A chunked body C{body} fails the reader and drops the connection."""
        response = self.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        reader = self.read(response)
        for part in fed or [body]:
            self.protocol.dataReceived(part)
        self.assertTrue(reader.reason.check(ResponseFailed), reader.reason)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.quiescent, [])
        return reader

    def test_chunk_sizes(self):
        """A chunk size that is not hexadecimal on its own CRLF line: the body fails."""
        for body in (b"x\r\n", b"-1\r\n", b"\r\n", b"5\nhello\r\n", b"12345678901234567\r\n"):
            self.setUp()
            self.body_refused(body)

    def test_chunk_without_crlf(self):
        """Chunk data not followed by CRLF: the body fails after what was framed."""
        reader = self.body_refused(b"2\r\nokXX0\r\n\r\n")
        self.assertEqual(reader.body, b"ok")

    def test_chunk_line_too_long(self):
        """A chunk-size line (extensions included) past its limit: the body fails."""
        self.body_refused(None, fed=[b"5;" + b"x" * 2000, b"x" * 2500])

    def test_trailers_too_large(self):
        """Trailers past their limit: the body fails."""
        self.body_refused(None, fed=[b"0\r\n"] + [b"X-T: " + b"t" * 1000 + b"\r\n"] * 17)


class ConnectionTests(ClientTestCase):
    def test_lost_before_any_answer(self):
        """Closed before any byte: ResponseNeverReceived (retryable)."""
        d = self.send()
        self.protocol.connectionLost(Failure(ConnectionDone()))
        [reason] = self.failureResultOf(d, ResponseNeverReceived).value.reasons
        self.assertTrue(reason.check(ConnectionDone))
        self.failureResultOf(self.protocol.request(get()), RequestNotSent)

    def test_lost_in_head(self):
        """Closed inside the head: ResponseFailed (not retryable)."""
        d = self.send()
        self.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.protocol.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(d, ResponseFailed)

    def test_lost_in_body(self):
        """Closed inside a framed body: the reader gets ResponseFailed."""
        reader = self.read(self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel"))
        self.protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(reader.body, b"hel")
        self.assertTrue(reader.reason.check(ResponseFailed))

    def test_cancel(self):
        """Cancelled while waiting: dropped, and the failure says it was cancelled."""
        d = self.send()
        d.cancel()
        [reason] = self.failureResultOf(d, ResponseNeverReceived).value.reasons
        self.assertTrue(reason.check(CancelledError))
        self.assertTrue(self.transport.disconnected)
        closed = self.protocol.abort()
        self.assertNoResult(closed)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(closed)

    def test_body_buffered_until_delivered(self):
        """Reading pauses once the head is read, until a reader takes the body."""
        response = self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
        self.assertEqual(self.transport.producerState, "paused")
        self.protocol.dataReceived(b"def")
        reader = self.read(response)
        self.assertEqual(reader.body, b"abcdef")
        self.assertTrue(reader.reason.check(ResponseDone))
        self.assertEqual(self.transport.producerState, "producing")
        self.assertRaises(RuntimeError, response.deliverBody, Reader())

    def test_whole_body_with_head_not_paused(self):
        """A body that came whole with its head: reading is never paused and resumed."""
        pauses = []
        self.transport.pauseProducing = lambda: pauses.append("pause")
        reader = self.read(self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
        self.assertEqual(reader.body, b"ok")
        self.assertEqual(pauses, [])
        self.assertEqual(self.quiescent, [self.protocol])
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok")
        self.assertEqual(pauses, ["pause"])

    def test_reader_flow_control(self):
        """The reader's transport pauses and resumes the connection, and lets go at the end."""
        response = self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
        reader = self.read(response)
        reader.transport.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        reader.transport.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")
        self.protocol.dataReceived(b"abcd")
        self.assertEqual(self.quiescent, [self.protocol])
        reader.transport.pauseProducing()
        reader.transport.stopProducing()
        self.assertEqual(self.transport.producerState, "producing")
        self.assertFalse(self.transport.disconnecting)

    def test_reader_stops(self):
        """A reader that stops the body drops the connection, and hears of the end once."""
        reader = self.read(self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab"))
        reader.transport.stopProducing()
        self.assertEqual(self.transport.producerState, "stopped")
        self.assertEqual(self.protocol.state, "CLOSED")
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(reader.reason.check(ResponseFailed))
        self.assertEqual(self.quiescent, [])

    def test_back_in_the_pool_before_the_reader_hears(self):
        """What the reader does at the end of the body can reuse the connection."""
        response = self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        again = []

        class Chaining(Reader):
            def connectionLost(inner, reason):
                again.append(self.protocol.request(get(path=b"/next")))

        response.deliverBody(Chaining())
        self.transport.clear()
        self.protocol.dataReceived(b"ok")
        self.assertTrue(self.transport.value().startswith(b"GET /next HTTP/1.1\r\n"))
        self.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(again[0]).code, 200)

    def test_file_body_streamed(self):
        """A large body is streamed from its file with its Content-Length."""
        from twisted.internet.task import Cooperator

        steps = []
        cooperator = Cooperator(scheduler=lambda f: steps.append(f) or object())
        producer = FileBodyProducer(BytesIO(b"x" * 10), cooperator=cooperator)
        d = self.protocol.request(get(b"POST", body=producer))
        while steps:
            steps.pop(0)()
        wire = self.transport.value()
        self.assertIn(b"Content-Length: 10\r\n", wire)
        self.assertTrue(wire.endswith(b"\r\n\r\n" + b"x" * 10))
        self.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.successResultOf(d)
        self.assertEqual(self.quiescent, [self.protocol])
