# -*- test-case-name: tests.test_h1client -*-
"""
The gateway's HTTP/1.1 client connection, for its two outbound exchanges per
call (the STS's token endpoint, through treq, and the upstream).

Twisted's L{twisted.web.client.HTTP11ClientProtocol} reads a response a line
at a time through a state machine, routes every header through L{Headers}
twice (once as read, once split into connection-control headers), and
chains four Deferreds per response; counted with callgrind (bench/count.py),
one pooled exchange through it costs about 0.68 M instructions, more than
the TLS server and the whole inbound request together (0.49 M). This
protocol reads a response head in one piece (one search for the blank line,
one split), frames the body from the head (C{Content-Length}, C{chunked}, or
until the connection closes), and hands out a L{Response} with Twisted's
interface and failure types, so treq and the forwarder read it as they read
Twisted's.

It is stricter than Twisted's client where a response could be read two
ways: a head with a bare CR or LF, a folded header line, a header name that
is not a token, a C{Content-Length} that is not decimal digits or disagrees
with another, one with C{Transfer-Encoding}, a transfer coding other than
C{chunked}, a malformed chunk, a C{101}, or a head or chunk line over its
limit fails the response (the forwarder answers 502), and the connection is
never reused.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import NO_BODY_CODES, PotentialDataLoss
from twisted.web.http_headers import Headers, InvalidHeaderName
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from caracal.gateway.headers import canonical_name, connection_tokens, raw_fields

#: Most bytes of a response head (status line and headers), as the gateway's
#: own server accepts for a request head.
MAX_HEAD = 64 * 1024
#: Most bytes of a chunk-size line (extensions included) or of the trailer
#: section of a chunked body.
MAX_CHUNK_LINE = 4096
MAX_TRAILERS = 16 * 1024
#: Interim (1xx) responses skipped before the final one; more fails it.
MAX_INTERIM = 16
#: Decimal digits of a Content-Length (a petabyte and more).
_MAX_LENGTH_DIGITS = 18

_HTTP_VERSIONS = {b"HTTP/1.1": (b"HTTP", 1, 1), b"HTTP/1.0": (b"HTTP", 1, 0)}
_HEX = frozenset(b"0123456789abcdefABCDEF")


class MalformedResponse(Exception):
    """The upstream's response could not be read one way only: it is refused."""


@implementer(IBodyProducer)
class BytesBody:
    """
    A request body already in memory, written with the head in one write
    (an L{IBodyProducer} for callers that hand bodies to Twisted too).
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self.body)
        return succeed(None)

    def stopProducing(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


def request_head(request) -> list[bytes]:
    """
    The lines of C{request}'s head (a L{twisted.web.client.Request}, whose
    constructor checked its method and target), as Twisted's client writes
    them, without the body's framing header or the blank line.
    """
    lines = [request.method, b" ", request.uri, b" HTTP/1.1\r\n"]
    if not request.persistent:
        lines.append(b"Connection: close\r\n")
    for name, values in request.headers.getAllRawHeaders():
        for value in values:
            # Headers keeps no CR or LF in a name or value.
            lines += (name, b": ", value, b"\r\n")
    return lines


def _content_length(values: list[bytes]) -> int:
    length = None
    for value in values:
        for part in value.split(b","):
            part = part.strip(b" \t")
            if not part.isdigit() or len(part) > _MAX_LENGTH_DIGITS:
                raise MalformedResponse("Content-Length is not a decimal number")
            if length is not None and int(part) != length:
                raise MalformedResponse("Content-Length values disagree")
            length = int(part)
    if length is None:
        raise MalformedResponse("empty Content-Length")
    return length


def parse_head(head: bytes) -> tuple[tuple, int, bytes, Headers]:
    """
    The version, status, reason phrase and headers of a response head
    (without its blank line).

    @raise MalformedResponse: any part of it can be read more than one way.
    """
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
        raise MalformedResponse("bare CR or LF in the response head")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    version = _HTTP_VERSIONS.get(parts[0])
    if version is None or len(parts) < 2:
        raise MalformedResponse("not an HTTP/1.x status line")
    code = parts[1]
    if len(code) != 3 or not code.isdigit():
        raise MalformedResponse("the status is not three digits")
    headers = Headers()
    fields = raw_fields(headers)
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        try:
            # Refuses a name that is not a token: also a folded line
            # (leading space, obsolete and read two ways) or an empty name.
            name = canonical_name(name)
        except InvalidHeaderName:
            raise MalformedResponse("malformed header line") from None
        if not colon:
            raise MalformedResponse("malformed header line")
        # No CR or LF anywhere in the head: the value needs no cleaning.
        values = fields.get(name)
        if values is None:
            fields[name] = [value.strip(b" \t")]
        else:
            values.append(value.strip(b" \t"))
    return version, int(code), parts[2] if len(parts) == 3 else b"", headers


@implementer(IPushProducer)
class _BodyProducer:
    """
    What a body protocol gets as its transport: pausing it pauses reading
    from the connection, stopping it drops the connection. It lets go of the
    connection once the body is complete, so a connection back in the pool
    is never paused or closed by a former response's reader.
    """

    def __init__(self, protocol: H1ClientProtocol) -> None:
        self._protocol: H1ClientProtocol | None = protocol

    def release(self) -> None:
        self._protocol = None

    def pauseProducing(self) -> None:
        if self._protocol is not None:
            self._protocol.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self._protocol is not None:
            self._protocol.transport.resumeProducing()

    def stopProducing(self) -> None:
        if self._protocol is not None:
            protocol, self._protocol = self._protocol, None
            protocol.stop()


@implementer(IResponse)
class Response:
    """
    A response whose body is delivered to one protocol (L{deliverBody}),
    buffered until then. C{headers} holds every header as received,
    connection-control ones included.
    """

    previousResponse = None

    def __init__(self, version, code, phrase, headers, length, request, producer) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self.request = request
        self._producer = producer
        self._protocol = None
        self._buffer: list[bytes] | None = []
        self._ended: Failure | None = None

    def setPreviousResponse(self, response) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol) -> None:
        if self._protocol is not None or self._buffer is None:
            raise RuntimeError("the response body was already delivered")
        self._protocol = protocol
        buffered, self._buffer = self._buffer, None
        protocol.makeConnection(self._producer)
        for data in buffered:
            protocol.dataReceived(data)
        if self._ended is not None:
            protocol.connectionLost(self._ended)
        else:
            # Reading was paused until someone wanted the body.
            self._producer.resumeProducing()

    def _data(self, data: bytes) -> None:
        if self._protocol is not None:
            self._protocol.dataReceived(data)
        elif self._buffer is not None:
            self._buffer.append(data)

    def _end(self, reason: Failure) -> None:
        self._producer.release()
        if self._protocol is not None:
            self._protocol.connectionLost(reason)
        else:
            self._ended = reason


class H1ClientProtocol(Protocol):
    """
    One HTTP/1.1 client connection, one request at a time.

    C{state}: C{QUIESCENT} (idle, reusable), C{WAITING} (request sent, no
    whole head yet), C{BODY} (reading the body), C{CLOSED} (closed or being
    closed: never reused).

    @param quiescent: called with this protocol each time a response is
        complete and the connection can carry another request.
    """

    state = "QUIESCENT"

    def __init__(self, quiescent: Callable[[H1ClientProtocol], object] | None = None) -> None:
        self._quiescent = quiescent
        self._request = None
        self._deferred: Deferred | None = None
        self._sending: Deferred | None = None
        self._buffer = b""
        self._received = False
        self._interim = 0
        self._response: Response | None = None
        self._reusable = False
        # Body framing: bytes left of a length or of the current chunk (None:
        # until the connection closes), and where a chunked body is.
        self._remaining: int | None = None
        self._chunked = False
        self._chunk_state = "size"
        self._trailers = 0
        self._lost = False
        self._closed: Deferred | None = None

    # -- sending -----------------------------------------------------------

    def request(self, request) -> Deferred:
        """
        Send C{request} (a L{twisted.web.client.Request}); a Deferred firing
        with the L{Response} once its head is read, or failing with
        L{ResponseNeverReceived} (nothing read; C{CancelledError} among the
        reasons when cancelled), L{ResponseFailed} (a partial or malformed
        head), L{RequestNotSent} (connection busy or closed) or
        L{RequestTransmissionFailed} (the body could not be sent).
        """
        if self.state != "QUIESCENT" or self._lost:
            return fail(RequestNotSent())
        self.state = "WAITING"
        self._request = request
        self._received = False
        self._interim = 0
        self._deferred = deferred = Deferred(self._cancel)
        body = request.bodyProducer
        if body is None or isinstance(body, BytesBody):
            lines = request_head(request)
            if body is not None:
                lines += (b"Content-Length: %d\r\n\r\n" % body.length, body.body)
            else:
                lines.append(b"\r\n")
            self.transport.write(b"".join(lines))
        else:
            # A streamed body: Twisted's request writes its head and body
            # (Content-Length or chunked) and fails on a wrong length.
            self._sending = sending = request.writeTo(self.transport)
            sending.addCallbacks(self._sent, self._send_failed)
        return deferred

    def _sent(self, _ignored) -> None:
        self._sending = None

    def _send_failed(self, failure: Failure) -> None:
        self._sending = None
        state, self.state = self.state, "CLOSED"
        self.abort()
        if state == "WAITING":
            self._fail_request(RequestTransmissionFailed([failure]))

    def _cancel(self, deferred: Deferred) -> None:
        self._deferred = None
        self.state = "CLOSED"
        if self._sending is not None:
            self._sending.cancel()
        self.abort()
        deferred.errback(ResponseNeverReceived([Failure(CancelledError())]))

    def _fail_request(self, error: Exception) -> None:
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            deferred.errback(error)

    # -- receiving ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        while data:
            if self.state == "WAITING":
                data = self._head_received(data)
            elif self.state == "BODY":
                data = self._body_received(data)
            elif self.state == "QUIESCENT":
                # Bytes nobody asked for: the connection cannot be trusted
                # to frame the next response.
                self.state = "CLOSED"
                self.abort()
                return
            else:
                return

    def _head_received(self, data: bytes) -> bytes:
        self._received = True
        buffer = self._buffer + data if self._buffer else data
        end = buffer.find(b"\r\n\r\n")
        if end < 0 or end > MAX_HEAD:
            if len(buffer) > MAX_HEAD + 3:
                self._malformed(MalformedResponse("response head too large"))
            else:
                self._buffer = buffer
            return b""
        self._buffer = b""
        rest = buffer[end + 4 :]
        try:
            version, code, phrase, headers = parse_head(buffer[:end])
            if code < 200:
                if code == 101 or self._interim >= MAX_INTERIM:
                    raise MalformedResponse(f"unexpected {code} response")
                self._interim += 1  # 100, 103: skipped, as RFC 9110 allows
                return rest
            length = self._framing(code, headers)
        except MalformedResponse as e:
            self._malformed(e)
            return b""
        request = self._request
        self._reusable = (
            request.persistent
            and version == (b"HTTP", 1, 1)
            and (self._chunked or self._remaining is not None)
            and b"close" not in connection_tokens(headers)
        )
        self.state = "BODY"
        response = self._response = Response(
            version, code, phrase, headers, length, request, _BodyProducer(self)
        )
        if self._remaining == 0 and not self._chunked:
            self._finish(rest)
        else:
            if rest:
                self._body_received(rest)
            if self._response is response:
                # The body goes on: nothing more is read until it has a
                # reader (deliverBody). A body that came whole with its
                # head (a small answer) costs no pause and resume.
                self.transport.pauseProducing()
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            deferred.callback(response)
        return b""

    def _framing(self, code: int, headers: Headers) -> int:
        """Set how the body ends; the response's length (or UNKNOWN_LENGTH)."""
        self._chunked = False
        fields = raw_fields(headers)
        lengths = fields.get(b"Content-Length")
        codings = fields.get(b"Transfer-Encoding")
        if codings is not None:
            if lengths is not None:
                raise MalformedResponse("both Content-Length and Transfer-Encoding")
            if len(codings) != 1 or codings[0].strip(b" \t").lower() != b"chunked":
                raise MalformedResponse("a transfer coding other than chunked")
        length = _content_length(lengths) if lengths is not None else None
        if code in NO_BODY_CODES or self._request.method == b"HEAD":
            self._remaining = 0
            return 0
        if codings is not None:
            self._chunked = True
            self._chunk_state = "size"
            return UNKNOWN_LENGTH
        self._remaining = length
        return UNKNOWN_LENGTH if length is None else length

    def _body_received(self, data: bytes) -> bytes:
        if self._chunked:
            self._chunk_received(data)
            return b""
        remaining = self._remaining
        if remaining is None:
            self._response._data(data)
        elif len(data) < remaining:
            self._remaining = remaining - len(data)
            self._response._data(data)
        else:
            self._remaining = 0
            self._response._data(data[:remaining])
            if self.state == "BODY":  # the reader may have dropped the connection
                self._finish(data[remaining:])
        return b""

    def _chunk_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        while buffer and self.state == "BODY":
            state = self._chunk_state
            if state == "data":
                left = self._remaining
                if len(buffer) < left:
                    self._remaining = left - len(buffer)
                    self._response._data(buffer)
                    return
                self._chunk_state = "crlf"
                self._response._data(buffer[:left])
                buffer = buffer[left:]
                continue
            if state == "crlf":
                if len(buffer) < 2:
                    self._buffer = buffer
                    return
                if buffer[:2] != b"\r\n":
                    self._malformed(MalformedResponse("chunk data not followed by CRLF"))
                    return
                self._chunk_state = "size"
                buffer = buffer[2:]
                continue
            end = buffer.find(b"\r\n")
            limit = MAX_CHUNK_LINE if state == "size" else MAX_TRAILERS - self._trailers
            if end < 0 or end > limit:
                if len(buffer) > limit + 1:
                    self._malformed(MalformedResponse("chunk line or trailers too long"))
                else:
                    self._buffer = buffer
                return
            line, buffer = buffer[:end], buffer[end + 2 :]
            if state == "trailers":
                # Trailer fields are read and dropped, as Twisted's client does.
                if not line:
                    self._finish(buffer)
                    return
                self._trailers += end + 2
                continue
            size = line.partition(b";")[0].strip(b" \t")
            if not size or len(size) > 16 or not _HEX.issuperset(size):
                self._malformed(MalformedResponse("malformed chunk size"))
                return
            self._remaining = int(size, 16)
            if self._remaining:
                self._chunk_state = "data"
            else:
                self._chunk_state = "trailers"
                self._trailers = 0

    def _finish(self, rest: bytes) -> None:
        """
        The response's body is complete: the connection goes back to the
        pool (before the reader hears of the end, so that what the reader
        does next can reuse it), unless it cannot frame another response.
        """
        response, self._response = self._response, None
        self._request = None
        reusable = self._reusable and self._sending is None and not rest
        if reusable:
            self.state = "QUIESCENT"
            self.transport.resumeProducing()
            if self._quiescent is not None:
                self._quiescent(self)
        else:
            self.state = "CLOSED"
            self.transport.loseConnection()
        response._end(Failure(ResponseDone()))

    def _malformed(self, error: MalformedResponse) -> None:
        reason = Failure(error)
        state, self.state = self.state, "CLOSED"
        self.abort()
        if state == "WAITING":
            self._fail_request(ResponseFailed([reason]))
        elif state == "BODY":
            self._end_body(Failure(ResponseFailed([reason])))

    def _end_body(self, reason: Failure) -> None:
        response, self._response = self._response, None
        if response is not None:
            response._end(reason)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        state, self.state = self.state, "CLOSED"
        if state == "WAITING":
            error = ResponseFailed if self._received else ResponseNeverReceived
            self._fail_request(error([reason]))
        elif state == "BODY":
            if not self._chunked and self._remaining is None:
                # A body without length or chunking ends with the connection.
                self._end_body(Failure(PotentialDataLoss()))
            else:
                self._end_body(Failure(ResponseFailed([reason])))
        else:
            # Closed by us (done, malformed, cancelled): the reader was told.
            self._end_body(Failure(ResponseFailed([reason])))
        self._request = None
        closed, self._closed = self._closed, None
        if closed is not None:
            closed.callback(None)

    def stop(self) -> None:
        """
        The body is not wanted: stop the connection as a transport stops
        producing (closed, never reused); the reader hears of the end.
        """
        self.state = "CLOSED"
        if not self._lost and self.transport is not None:
            self.transport.stopProducing()

    def abort(self) -> Deferred:
        """Drop the connection now (never reused); fires once it is closed."""
        self.state = "CLOSED"
        if self._lost or self.transport is None:
            return succeed(None)
        if self._closed is None:
            self._closed = Deferred()
        closed = self._closed
        self.transport.abortConnection()
        return closed
