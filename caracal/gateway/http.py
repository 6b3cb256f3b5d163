# -*- test-case-name: tests.test_http -*-
"""
The gateway's HTTP server layer on twisted.web: the request id (SPEC step
0), the request body limit (step 1), the four server timeouts, draining at
shutdown, and the JSON access log.

Everything here happens before or around the resource's C{render}: a body
over C{MAX_REQUEST_BYTES} is answered with 413 as soon as it is known to be
too large, a request the parser or the RFC 9112 checks refuse with 400 (431
for a header section past Twisted's limits), without the resource ever being
called, each with an access line and the counters; a request the root
resource refuses on its headers alone (L{IRequestScreen}: the method, then
the pipeline's steps 2-7) is answered the moment its headers are in, with
C{Connection: close} and without a byte of its body read or spooled (SPEC
12 H7); and a slow or idle client is cut by the channel's own timers (driven
by the C{clock} given to the site) without holding anyone else up.

The timeouts follow Go's C{http.Server}, whose knobs the SPEC copies:

  - C{READ_HEADER_TIMEOUT} runs from the start of a request (connection open
    for the first one, the first byte of the next one on keep-alive) until
    all of its headers are in;
  - C{READ_TIMEOUT} runs from the same start until the whole body is in;
  - C{WRITE_TIMEOUT} runs from the end of reading the request until the
    response is completely handed to the kernel; past it the connection is
    aborted, which also bounds a client that stops reading. The wait for a
    proxied upstream's response headers is not counted: the upstream
    timeout bounds it, and C{WRITE_TIMEOUT} starts afresh after it. A
    C{text/event-stream} response (SPEC 13) is bound instead by
    C{STREAM_IDLE_TIMEOUT}, restarted whenever its bytes reach the client:
    it may last as long as it keeps moving;
  - C{IDLE_TIMEOUT} closes a keep-alive connection waiting for its next
    request.

Twisted's own 60 s idle timer (L{twisted.protocols.policies.TimeoutMixin})
is switched off so these rule alone.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel
from twisted.web.http import HTTPChannel, datetimeToString
from twisted.web.iweb import INonQueuedRequestFactory
from twisted.web.server import Request, Site

from caracal.gateway import cors, sse
from caracal.gateway.denials import Denial, error_body, error_envelope
from caracal.gateway.ids import uuid4
from caracal.gateway.interfaces import IRequestScreen
from caracal.gateway.logs import (
    ACCESS_EVENT_KEY,
    ACCESS_NAMESPACE,
    LOG_FIELDS,
    access_record,
    format_access_line,
)
from caracal.gateway.proxy import PROXIED_METHODS, method_not_allowed
from caracal.gateway.timeouts import SiteDeadlines

SERVER_NAME = b"caracal-gateway"

# How long a connection we decided to close may take to go away (flush the
# last answer, let the client read it) before it is aborted.
CLOSE_GRACE = 2.0

_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")
# RFC 9110 7.2 / RFC 3986 3.2.2: Host = uri-host [ ":" port ], uri-host an
# IP literal or a (possibly empty) reg-name of unreserved, pct-encoded and
# sub-delims characters.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")
# Reason phrases Twisted does not know.
_REASONS = {431: b"Request Header Fields Too Large"}
# A fragment or a control character: never part of a request-target (SPEC 12 H1).
_TARGET_FORBIDDEN = re.compile(rb"[#\x00-\x1f\x7f]")
# What separates the tokens of a Connection header (a comma-separated list).
_LIST_SEPARATORS = re.compile(rb"[,\s]+")

# The access log's C{denial} for a request the HTTP parser (or the protocol
# checks) refused: one value for operators to look for, whatever the defect.
MALFORMED_REQUEST = "malformed_request"

_log = Logger()


def choose_request_id(values: list[bytes] | None) -> str:
    """
    The request id for a request whose inbound C{X-Request-Id} values are
    C{values}: the inbound one when there is exactly one and it is 1 to 128
    printable ASCII characters (0x21-0x7e), else a new UUID4.
    """
    if values and len(values) == 1 and _REQUEST_ID.fullmatch(values[0]):
        return values[0].decode("ascii")
    return uuid4()


def _nonconforming(request, method: bytes, target: bytes, version: bytes) -> str | None:
    """
    Why a request whose headers are in breaks RFC 9112 in a way the gateway
    must refuse with 400 before anything acts on it, or C{None}.

    The gateway is not a forward proxy: only origin-form targets (a path)
    are served, so absolute-form (C{GET http://host/x}) and asterisk-form
    (C{OPTIONS *}) targets are refused rather than taken as a path; a
    method the gateway never serves (C{CONNECT}, C{TRACE}, ...) is left to
    the screen's 405 (SPEC 12 H2) whatever its target. A target carrying a
    C{#} or a control character (NUL above all) is refused (SPEC 12 H1: RFC
    9112 allows neither, and an outbound client would cut the path at the
    C{#}). HTTP/1.1 needs exactly one valid C{Host} (RFC 9112 3.2); an
    HTTP/1.0 message cannot carry C{Transfer-Encoding} (RFC 9112 6.1: its
    framing is not to be trusted), and in HTTP/1.1 the only transfer coding
    accepted is exactly one C{chunked} (SPEC 12 H3: C{identity}, a list or
    two headers leave two parties reading two different bodies).
    """
    if method in PROXIED_METHODS:
        if target == b"*":
            return "an asterisk-form request target is not supported"
        if not target.startswith(b"/"):
            return "the request target must be a path: the gateway is not a forward proxy"
        if _TARGET_FORBIDDEN.search(target):
            return "the request target contains a fragment or a control character"
    hosts = request.requestHeaders.getRawHeaders(b"host")
    if hosts is None:
        if version == b"HTTP/1.1":
            return "an HTTP/1.1 request must carry a Host header"
    elif len(hosts) > 1:
        return "more than one Host header"
    elif not _HOST.fullmatch(hosts[0]):
        return "invalid Host header"
    codings = request.requestHeaders.getRawHeaders(b"transfer-encoding")
    if codings is not None:
        if version != b"HTTP/1.1":
            return "Transfer-Encoding is not allowed in an HTTP/1.0 request"
        if len(codings) != 1 or codings[0].strip(b" \t").lower() != b"chunked":
            return "Transfer-Encoding must be exactly one chunked"
    return None


class GatewayRequest(Request):
    """
    One request to the gateway.

    @ivar request_id: the SPEC step 0 request id; set as soon as the headers
        are in and echoed as C{X-Request-Id} on every response.
    @ivar log_fields: filled by the pipeline (L{LOG_FIELDS}: resource, zone,
        application, upstream_host, sts_ms, upstream_ms, denial,
        token_fingerprint) and written to the access log when the request
        finishes. Never put a token or a header value here.
    @ivar started_at: clock time the request began (its first line).
    @ivar finished_at: clock time it finished (or its connection was lost).
    @ivar response_complete: C{True} once the whole response was handed over.
    @ivar local: C{True} for the local endpoints (C{/health}, C{/ready},
        C{/metrics}), which the request counters leave out.
    """

    local = False

    # A proxy must not invent a content type for an upstream answer without
    # one; local endpoints and error envelopes set their own.
    defaultContentType = None

    def __init__(self, channel, *args, **kwargs) -> None:
        # Set by the channel once the headers are in; until then (an answer
        # sent before that) a fresh one is made on first use, so most
        # requests never draw the random bytes of an id they would not keep.
        self._request_id: str | None = None
        super().__init__(channel, *args, **kwargs)
        self.gateway_site = channel.site
        self._clock = self.gateway_site.clock
        self.log_fields: dict = dict.fromkeys(LOG_FIELDS)
        self.started_at = self._clock.seconds()
        self.finished_at: float | None = None
        self.response_complete = False
        self.body_bytes = 0
        self._limit = self.gateway_site.config.max_request_bytes
        self._answered_early = False
        self._inflight = False
        self.event_stream = False

    @property
    def request_id(self) -> str:
        """The request id (SPEC step 0); a new UUID4 until the channel chose one."""
        if self._request_id is None:
            self._request_id = uuid4()
        return self._request_id

    @request_id.setter
    def request_id(self, value: str) -> None:
        self._request_id = value

    # -- body ---------------------------------------------------------------

    def handleContentChunk(self, data: bytes) -> None:
        """
        Take a piece of the request body; refuse the request (413) the moment
        the body grows past C{MAX_REQUEST_BYTES}, before storing the piece.
        """
        if self._answered_early:
            return
        self.body_bytes += len(data)
        if self.body_bytes > self._limit:
            self.channel.body_too_large(self)
            return
        self.content.write(data)

    # -- response -----------------------------------------------------------

    def _prepare_response_headers(self) -> None:
        self.responseHeaders.setRawHeaders(b"server", [SERVER_NAME])
        self.responseHeaders.setRawHeaders(b"x-request-id", [self.request_id.encode("ascii")])
        cors.add_response_headers(self, self.gateway_site.config.cors_allowed_origins)
        channel = getattr(self, "channel", None)
        if channel is not None and sse.is_event_stream(
            self.responseHeaders.getRawHeaders(b"content-type")
        ):
            self.event_stream = True
            channel.event_stream_started()
        if channel is not None and (self.gateway_site.draining or not channel.persistent):
            self.responseHeaders.setRawHeaders(b"connection", [b"close"])
            channel.persistent = False

    def write(self, data: bytes) -> None:
        """Write response data; the first write fixes the gateway's own headers."""
        # Request._disconnected, private to Twisted (tests/test_twisted_private pins it):
        # Twisted's only record that the client left.
        if not self.startedWriting and not self._disconnected:
            self._prepare_response_headers()
        super().write(data)
        if self.event_stream and data and self.channel is not None:
            self.channel.event_stream_moved()

    def finish(self) -> None:
        """Finish the response; the access log line is written from here."""
        if self._disconnected or self.finished:
            return super().finish()
        self.finished_at = self._clock.seconds()
        # Site.log runs inside http.Request.finish, before it sets finished.
        self.response_complete = True
        try:
            return super().finish()
        finally:
            self._mark_done()

    def connectionLost(self, reason) -> None:
        """The connection went away before the response finished."""
        super().connectionLost(reason)
        if self._inflight and not self.finished:
            self.finished_at = self._clock.seconds()
            self.gateway_site.log(self)
        self._mark_done()

    def processingFailed(self, reason):
        """An unexpected error while rendering: a JSON 500, never a traceback."""
        _log.failure(
            "unhandled error rendering request {request_id}",
            failure=reason,
            request_id=self.request_id,
        )
        if self._disconnected or self.finished:
            return reason
        if self.startedWriting:
            # Too late for a clean answer; the client must not take a
            # truncated body for a whole one.
            self.channel.transport.abortConnection()
            return reason
        body = error_body(self, 500, "internal_error", "internal error")
        self.write(body)
        self.finish()
        return reason

    # -- for the channel ----------------------------------------------------

    def mark_inflight(self) -> None:
        """Count this request as in flight (its headers are in)."""
        if not self._inflight:
            self._inflight = True
            self.gateway_site._request_started()

    def _mark_done(self) -> None:
        if self._inflight:
            self._inflight = False
            self.gateway_site._request_ended()

    def answer_early(
        self, command: bytes, uri: bytes, version: bytes, status: int, code: str, description: str
    ) -> None:
        """
        Answer with the JSON error envelope before the request was fully read
        (413, 408): the resource is never called.
        """
        self._answered_early = True
        self.method, self.uri, self.clientproto = command, uri, version
        self.path = uri.split(b"?", 1)[0]
        self.site = self.gateway_site
        self.responseHeaders.setRawHeaders(b"date", [datetimeToString()])
        body = error_body(self, status, code, description)
        if status in _REASONS:
            self.setResponseCode(status, _REASONS[status])
        self.write(body)
        self.finish()


#: The attributes Twisted's HTTPChannel (and LineReceiver, Protocol) set on a
#: channel after construction, on the way to the end of its first request;
#: with GatewayChannel's own six and the four the factories set, 29 names.
_TWISTED_CHANNEL_ATTRIBUTES = (
    "connected",
    "transport",
    "_networkProducer",
    "_busyReceiving",
    "_buffer",
    "_receivedHeaderSize",
    "_HTTPChannel__first_line",
    "_command",
    "_path",
    "_version",
    "_HTTPChannel__header",
    "_receivedHeaderCount",
    "persistent",
    "length",
    "line_mode",
)


class GatewayChannel(HTTPChannel):
    """
    An L{HTTPChannel} enforcing the body limit and the four server timeouts
    with the site's clock. Built by L{GatewaySite.buildProtocol}.
    """

    # TimeoutMixin's idle timer is off; our own timers below rule.
    timeOut = None
    # Set only on a connection about to close or whose client reads slowly:
    # as class defaults they take no place in the others' attributes (__init__).
    _refused = False
    _closing = False
    _flush_pending = False

    def __init__(self) -> None:
        super().__init__()
        self._state = "reading"
        self._request_bytes_seen = False
        self._headers_in = False
        self._event_stream = False
        self._host = None
        # CPython 3.11 keeps a channel's attributes in a compact table shared
        # by the class (0.3 KiB) only while every channel adds the same names
        # in the same order and they are few (29 fit, 30 do not, measured);
        # otherwise each channel gets a dict of its own (1.5 KiB, held by
        # every idle keep-alive connection). Twisted sets these on the first
        # request, in an order that interleaves between concurrent channels,
        # so they are set here first, to the values Twisted starts them with.
        for name in _TWISTED_CHANNEL_ATTRIBUTES:
            setattr(self, name, getattr(self, name, None))

    @property
    def callLater(self):
        """
        The site's clock's C{callLater}, which C{HTTPFactory.buildProtocol}
        stores on every channel: read from the factory instead, so it takes
        no attribute of its own (see C{__init__}).
        """
        return self.factory.reactor.callLater

    @callLater.setter
    def callLater(self, value) -> None:
        if value != self.factory.reactor.callLater:
            raise ValueError("a GatewayChannel schedules on its site's clock")

    def getHost(self):
        """
        The local address, asked of the socket once per connection: Twisted's
        Request asks for it on every request, a C{getsockname} call each time.
        Kept as the site's shared object for that address
        (L{GatewaySite.local_address}).
        """
        if self._host is None:
            self._host = self.site.local_address(super().getHost())
        return self._host

    # -- timers ---------------------------------------------------------------

    @property
    def _config(self):
        return self.site.config

    def _arm(self, name: str, seconds: float, action) -> None:
        # action: the class's function, called with the channel when due, so
        # an idle connection's deadline holds no bound method of its own.
        self.site.deadlines.arm(self, name, seconds, action)

    def _cancel(self, *names: str) -> None:
        self.site.deadlines.cancel(self, *names)

    def armed(self) -> set[str]:
        """The names of the timers currently running (for tests and debugging)."""
        return self.site.deadlines.armed(self)

    def _start_reading(self) -> None:
        # A request begins: its headers and its whole body each get a deadline.
        self._state = "reading"
        self._headers_in = False
        self._request_bytes_seen = False
        self._cancel("idle")
        self._arm("header", self._config.read_header_timeout, GatewayChannel._header_timed_out)
        self._arm("read", self._config.read_timeout, GatewayChannel._read_timed_out)

    def _enter_idle(self) -> None:
        self._state = "idle"
        self._cancel("header", "read")
        if self.site.draining:
            self._close_soon()
        elif not self._flush_pending:
            self._arm("idle", self._config.idle_timeout, GatewayChannel._idle_timed_out)

    # -- connection -----------------------------------------------------------

    def connectionMade(self) -> None:
        """Start the first request's header and read deadlines."""
        super().connectionMade()
        self.site._channel_opened(self)
        self._start_reading()

    def connectionLost(self, reason) -> None:
        """Stop every timer; unfinished requests are told (and logged)."""
        self._cancel()
        self.site._channel_closed(self)
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        """Feed the parser; a byte after an idle wait starts a new request."""
        if self._refused or self._closing:
            # Read and drop: a refused body is never stored, and reading it
            # lets the client see our answer instead of a reset.
            return
        if self._state == "idle" and data:
            self._start_reading()
        if self._state == "reading" and data:
            self._request_bytes_seen = True
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        """Body bytes (or pipelined requests); dropped once refused."""
        if self._refused or self._closing:
            return
        super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        """
        Headers are in: stop the header deadline, fill in the request line,
        choose the request id, count the request in flight, refuse a request
        breaking RFC 9112 (no or several C{Host}, a forward-proxy target,
        C{Transfer-Encoding} in HTTP/1.0) and a declared body over the limit,
        before reading any of the body or calling the resource.
        """
        if self._refused or self._closing:
            return
        self._cancel("header")
        self._headers_in = True
        request = self.requests[-1]
        # Twisted sets these only in requestReceived, once the body is in; a
        # request whose client leaves mid-body would be logged without them.
        request.method, request.uri, request.clientproto = self._command, self._path, self._version
        request.path = self._path.split(b"?", 1)[0]
        request.request_id = choose_request_id(
            request.requestHeaders.getRawHeaders(b"x-request-id")
        )
        request.mark_inflight()
        problem = _nonconforming(request, self._command, self._path, self._version)
        if problem is not None:
            self._refuse(request, 400, "invalid_request", problem, denial=MALFORMED_REQUEST)
            return
        limit = self._config.max_request_bytes
        if self.length is not None and self.length > limit:
            self._refuse(request, 413, "payload_too_large", f"request body exceeds {limit} bytes")
            return
        # SPEC 12 H7: the checks that need only the headers (the method,
        # steps 2-7) answer now; the body is then never read, let alone
        # spooled. The resource's render goes on from the screened call.
        denial = self._screen(request)
        if denial is not None:
            self._refuse_denial(request, denial)
            return
        super().allHeadersReceived()

    def checkPersistence(self, request, version: bytes) -> bool:
        """
        Whether the connection may stay open after this request: HTTP/1.1
        without a C{close} token in any C{Connection} header. Twisted reads
        only the first header and splits it on spaces, so C{Connection:
        close, X-Hop} (the RFC 9110 list form) kept the connection open;
        here tokens are split on commas (and whitespace, as before).
        """
        if version != b"HTTP/1.1":
            # As Twisted: HTTP/1.0 and 0.9 responses end by closing.
            return False
        for value in request.requestHeaders.getRawHeaders(b"connection", ()):
            if b"close" in _LIST_SEPARATORS.split(value.lower()):
                request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
                return False
        return True

    def allContentReceived(self) -> None:
        """The whole request is in: the response now has WRITE_TIMEOUT."""
        if self._refused or self._closing:
            return
        self._cancel("header", "read")
        self._state = "handling"
        self._arm("write", self._config.write_timeout, GatewayChannel._write_timed_out)
        super().allContentReceived()

    def requestDone(self, request) -> None:
        """
        The response is handed to the transport. Keep WRITE_TIMEOUT running
        while the transport still holds more than it wants (the client is
        slow to read), then wait for the next request or close.
        """
        if self.site.draining:
            self.persistent = False
        # An event stream's last bytes are still bound by its idle timer.
        self._event_stream = False
        if self.persistent and not self._closing:
            # HTTPChannel._waitingForTransport, private (tests/test_twisted_private pins it):
            # the client reads slowly.
            if self._waitingForTransport:
                self._flush_pending = True
            else:
                self._cancel("write", "stream_idle")
            # HTTPChannel._dataBuffer, private to Twisted (tests/test_twisted_private pins it):
            # bytes of a pipelined request.
            if any(self._dataBuffer):
                # A pipelined request is already waiting to be parsed.
                self._start_reading()
                self._request_bytes_seen = True
            else:
                self._enter_idle()
        super().requestDone(request)

    def resumeProducing(self) -> None:
        """The transport drained its buffer: a pending response is written."""
        super().resumeProducing()
        if self._event_stream and not self._closing:
            # What the transport held has reached the client.
            self._arm_stream_idle()
        if self._flush_pending and self.persistent and not self._closing:
            self._flush_pending = False
            self._cancel("write", "stream_idle")
            if self._state == "idle":
                self._enter_idle()

    def loseConnection(self) -> None:
        """
        Close after what is written. After a refusal a plain TCP connection
        is only half-closed so the client, perhaps still sending its body,
        reads the answer instead of a reset; the abort timer bounds it.
        """
        if self._closing:
            return
        self._closing = True
        self._cancel("header", "read", "idle")
        transport = self.transport
        if (
            self._refused
            and not interfaces.ISSLTransport.providedBy(transport)
            and hasattr(transport, "loseWriteConnection")
        ):
            # HTTPChannel._networkProducer, private to Twisted (tests/test_twisted_private pins it):
            # no public way to half-close.
            self._networkProducer.unregisterProducer()
            transport.loseWriteConnection()
            return
        super().loseConnection()

    def lineReceived(self, line: bytes) -> None:
        """
        A request or header line; dropped once the request was refused.
        Twisted keeps feeding the lines already buffered after it reported a
        bad one, and those would land on a request that is already answered.
        A header line taking the header section past Twisted's total
        (C{totalHeadersSize}) is answered 431 here rather than Twisted's 400.
        """
        if self._refused or self._closing:
            return
        if (
            self._in_header_section()
            and self._receivedHeaderSize + len(line) > self.totalHeadersSize
        ):
            self._headers_too_large(f"request header section exceeds {self.totalHeadersSize} bytes")
            return
        super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        """One header line; past C{maxHeaders} of them the request gets 431."""
        if self._refused or self._closing:
            return False
        if self._receivedHeaderCount >= self.maxHeaders:
            self._headers_too_large(f"more than {self.maxHeaders} request header fields")
            return False
        return super().headerReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """
        A line longer than Twisted's limit: 431 for a header field, 400 for
        a request line.
        """
        if self._in_header_section():
            self._headers_too_large(f"a request header field exceeds {self.MAX_LENGTH} bytes")
            return
        self._respondToBadRequestAndDisconnect()

    def _in_header_section(self) -> bool:
        # Twisted sets _command once the request line parsed and deletes it
        # when the whole request is in.
        return not self._headers_in and getattr(self, "_command", None) is not None

    def _headers_too_large(self, description: str) -> None:
        if self._closing or self._refused:
            return
        request = self._request_being_read()
        request.request_id = self._request_id_so_far(request)
        self._refuse(
            request, 431, "request_header_fields_too_large", description, denial=MALFORMED_REQUEST
        )

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's version writes a bare 400. Ours answers through the
        # request like any other refusal: the JSON envelope, the inbound
        # request id when it was valid and already read (SPEC step 0), the
        # access line (SPEC 11) and the request counters.
        if self._closing or self._refused:
            return
        if self._headers_in and self._state == "reading" and self.requests:
            # A malformed body: the request already has its id.
            description = "malformed request body"
        else:
            description = "malformed request"
        request = self._request_being_read()
        if not self._headers_in:
            request.request_id = self._request_id_so_far(request)
        self._refuse(request, 400, "invalid_request", description, denial=MALFORMED_REQUEST)

    def _request_id_so_far(self, request) -> str:
        """
        The request id from the headers read before a refusal. Twisted
        parses a header line only once the next one arrives (it may be
        continued), so a refusal caused by that next line would miss an
        C{X-Request-Id} still pending; it is looked at here too.
        """
        values = list(request.requestHeaders.getRawHeaders(b"x-request-id", ()))
        name, colon, value = getattr(self, "_HTTPChannel__header", b"").partition(b":")
        if colon and name.lower() == b"x-request-id":
            values.append(value.strip(b" \t"))
        return choose_request_id(values)

    def _request_being_read(self):
        """
        The request whose line or headers are being parsed. Twisted makes it
        when the request line arrives; a request line too long to be one
        never gets that far, so one is made here to answer and log it.
        """
        if self.requests:
            return self.requests[-1]
        if INonQueuedRequestFactory.providedBy(self.requestFactory):
            request = self.requestFactory(self)
        else:
            request = self.requestFactory(self, len(self.requests))
        self.requests.append(request)
        return request

    # -- refusals and timeouts -----------------------------------------------

    def body_too_large(self, request) -> None:
        """A chunked body grew past the limit: 413 and close."""
        limit = self._config.max_request_bytes
        self._refuse(request, 413, "payload_too_large", f"request body exceeds {limit} bytes")

    def _screen(self, request) -> Denial | None:
        """
        The root resource's header-only checks when it provides
        L{IRequestScreen}; a resource that does not still never gets a
        method the gateway does not serve.
        """
        screener = IRequestScreen(self.site.resource, None)
        if screener is not None:
            return screener.screen(request)
        if request.method not in PROXIED_METHODS:
            return method_not_allowed(request, PROXIED_METHODS)
        return None

    def _refuse_denial(self, request, denial: Denial) -> None:
        """
        Answer a L{Denial} of the screen at once, count it and close. A
        local endpoint's refusal (its 405) stays out of the request
        counters, as when its render answers it.
        """
        if denial.metric:
            self.site.metrics.increment(denial.metric)
        self._refuse(
            request,
            denial.status,
            denial.code,
            denial.description,
            denial=denial.reason,
            counted=not request.local,
        )

    def _refuse(
        self,
        request,
        status: int,
        code: str,
        description: str,
        denial: str | None = None,
        counted: bool = True,
    ) -> None:
        # Answer through the request so the id, the access log and the
        # metrics are the same as for any other answer. The request line may
        # be unknown (too long, malformed): the log then says "-".
        self._refused = True
        self.persistent = False
        self._cancel()
        self._arm("abort", CLOSE_GRACE, GatewayChannel._abort)
        if counted:
            metrics = self.site.metrics
            metrics.increment("requests_total")
            metrics.increment("requests_denied")
        request.log_fields["denial"] = denial or code
        request.answer_early(
            getattr(self, "_command", None) or b"-",
            getattr(self, "_path", None) or b"-",
            getattr(self, "_version", None) or b"HTTP/1.1",
            status,
            code,
            description,
        )

    def _write_raw_error(
        self, status: int, reason: bytes, code: str, description: str, request_id: str
    ) -> None:
        body = error_envelope(code, description, request_id)
        head = [
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"Server: " + SERVER_NAME + b"\r\n",
            b"Date: " + datetimeToString() + b"\r\n",
            b"Content-Type: application/json\r\n",
            b"Cache-Control: no-store\r\n",
            b"X-Request-Id: " + request_id.encode("ascii") + b"\r\n",
            b"Content-Length: %d\r\n" % (len(body),),
            b"Connection: close\r\n\r\n",
        ]
        self.transport.writeSequence([*head, body])

    def _close_soon(self) -> None:
        self._cancel()
        self._arm("abort", CLOSE_GRACE, GatewayChannel._abort)
        self.loseConnection()

    def _abort(self) -> None:
        self.transport.abortConnection()

    def _peer(self) -> str:
        return str(getattr(self.transport.getPeer(), "host", "-"))

    def _header_timed_out(self) -> None:
        _log.info("request headers not received in time from {peer}", peer=self._peer())
        self._timed_out_reading()

    def _read_timed_out(self) -> None:
        _log.info("request not received in time from {peer}", peer=self._peer())
        self._timed_out_reading()

    def _timed_out_reading(self) -> None:
        if self._headers_in and self.requests:
            self._refuse(self.requests[-1], 408, "request_timeout", "request not received in time")
            return
        if self._request_bytes_seen:
            self._write_raw_error(
                408,
                b"Request Timeout",
                "request_timeout",
                "request not received in time",
                uuid4(),
            )
        self._close_soon()

    def upstream_wait(self, waiting: bool) -> None:
        """
        The response waits for an upstream's headers (C{waiting}) or has
        them. That wait is bounded by the upstream timeout (the resource's
        own, SPEC 13, or C{UPSTREAM_TIMEOUT}), so C{WRITE_TIMEOUT} is
        suspended meanwhile and runs afresh once the answer starts: a
        resource allowed 5 minutes is not cut at C{WRITE_TIMEOUT}.
        """
        if self._closing or self._state != "handling" or self._event_stream:
            return
        if waiting:
            self._cancel("write")
        else:
            self._arm("write", self._config.write_timeout, GatewayChannel._write_timed_out)

    def event_stream_started(self) -> None:
        """
        The response is a C{text/event-stream}: it is no longer bound by
        C{WRITE_TIMEOUT} but by C{STREAM_IDLE_TIMEOUT} of silence (SPEC 13).
        """
        if self._closing:
            return
        self._event_stream = True
        self._cancel("write")
        self._arm_stream_idle()

    def event_stream_moved(self) -> None:
        """
        Bytes of the event stream were handed to the transport: they count
        as reaching the client unless the transport is holding back (the
        client stopped reading); then L{resumeProducing} counts them.
        """
        if self._event_stream and not self._closing and not self._waitingForTransport:
            self._arm_stream_idle()

    def _arm_stream_idle(self) -> None:
        self._arm(
            "stream_idle", self._config.stream_idle_timeout, GatewayChannel._stream_idle_timed_out
        )

    def _stream_idle_timed_out(self) -> None:
        if self._event_stream:
            _log.info(
                "event stream to {peer} silent for {seconds} s; cut",
                peer=self._peer(),
                seconds=self._config.stream_idle_timeout,
            )
        else:
            # The stream ended; its connection was to close and has not.
            _log.debug("connection to {peer} not closed in time; aborted", peer=self._peer())
        self._cancel()
        self.transport.abortConnection()

    def _write_timed_out(self) -> None:
        _log.info("response not written in time to {peer}", peer=self._peer())
        self._cancel()
        self.transport.abortConnection()

    def _idle_timed_out(self) -> None:
        self._close_soon()

    def drain_started(self) -> None:
        """The site drains: close this connection now if no request is under way."""
        if self._closing or self._refused:
            return
        if self._state == "idle" or (self._state == "reading" and not self._request_bytes_seen):
            self._close_soon()


#: How many distinct local addresses a site shares between its connections
#: (L{GatewaySite.local_address}): a listener bound to every interface sees
#: one per local address a client reached it on, a handful.
LOCAL_ADDRESSES_KEPT = 64


class GatewaySite(Site):
    """
    The gateway's L{Site}: L{GatewayRequest}s on L{GatewayChannel}s, one JSON
    access-log line per request, the in-flight count and draining.

    @ivar draining: set by L{drain}; responses then carry C{Connection: close}
        and idle keep-alive connections are closed.
    @ivar access_log: the L{Logger} (namespace C{caracal.access}) the access
        lines are emitted through.
    """

    requestFactory = GatewayRequest
    protocol = GatewayChannel

    def __init__(self, resource, config, metrics, clock=None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        super().__init__(resource, timeout=None, reactor=clock, parsePOSTFormSubmission=False)
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.draining = False
        self.access_log = Logger(namespace=ACCESS_NAMESPACE)
        self._inflight = 0
        self._channels: set[GatewayChannel] = set()
        self._drain_waiters: list[Deferred] = []
        self._drain_hooks: list = []
        #: Every channel's timeouts, on one timer (L{SiteDeadlines}).
        self.deadlines = SiteDeadlines(clock)
        self._local_addresses: dict = {}

    @property
    def inflight(self) -> int:
        """Requests whose headers are in and whose response has not finished."""
        return self._inflight

    def buildProtocol(self, addr):
        """A L{GatewayChannel} for a new connection."""
        channel = super().buildProtocol(addr)
        channel.timeOut = None
        return channel

    def acceptableProtocols(self) -> list[bytes]:
        """HTTP/1.1 only: the limits and timers here are HTTP/1.1's."""
        return [b"http/1.1"]

    def startFactory(self) -> None:
        """Nothing: the legacy access log file of L{HTTPFactory} is not used."""

    def stopFactory(self) -> None:
        """Nothing to undo (see L{startFactory})."""

    def log(self, request) -> None:
        """Emit the one JSON access-log line of C{request}."""
        record = access_record(request)
        log = self.access_log
        # The event Logger.info would emit, handed to its observer directly:
        # Logger.emit first checks the level against every LogLevel constant,
        # once per request here.
        log.observer(
            {
                "access_line": format_access_line(record),
                ACCESS_EVENT_KEY: record,
                "log_logger": log,
                "log_level": LogLevel.info,
                "log_namespace": log.namespace,
                "log_source": log.source,
                "log_format": "{access_line}",
                "log_time": time.time(),
            }
        )
        if not request.local:
            fields = request.log_fields
            self.metrics.request_done(
                record["status"],
                fields.get("resource"),
                (record["duration_ms"] or 0.0) / 1000.0,
                fields.get("denial"),
            )

    def drain(self, timeout: float) -> Deferred:
        """
        Stop keeping connections alive and wait for the requests in flight.

        @return: a L{Deferred} firing with the number of requests still in
            flight: C{0} as soon as none is left, more if C{timeout} seconds
            passed first.
        """
        self.draining = True
        for channel in list(self._channels):
            channel.drain_started()
        hooks, self._drain_hooks = self._drain_hooks, []
        for hook in hooks:
            hook()
        waiter: Deferred = Deferred()
        if self._inflight == 0:
            waiter.callback(0)
            return waiter
        self._drain_waiters.append(waiter)

        def expired(_cancelled, _timeout) -> int:
            # The bound passed first: report the requests still in flight.
            if waiter in self._drain_waiters:
                self._drain_waiters.remove(waiter)
            return self._inflight

        return waiter.addTimeout(timeout, self.clock, onTimeoutCancel=expired)

    def when_draining(self, hook) -> Callable[[], None]:
        """
        Call C{hook()} when L{drain} starts (at once if it has): a response
        that would never end by itself (a standing event stream) ends then.

        @return: a callable that unregisters C{hook}.
        """
        if self.draining:
            hook()
            return lambda: None
        self._drain_hooks.append(hook)

        def cancel() -> None:
            if hook in self._drain_hooks:
                self._drain_hooks.remove(hook)

        return cancel

    def local_address(self, address):
        """
        The one object standing for C{address}, a connection's local
        address: every connection to the same listening address and port
        keeps the same object instead of its own (0.2 KiB: the address, its
        host string and port, held by each idle keep-alive connection). At
        most L{LOCAL_ADDRESSES_KEPT} distinct ones are kept; past that a
        connection keeps its own.
        """
        shared = self._local_addresses.get(address)
        if shared is not None:
            return shared
        if len(self._local_addresses) < LOCAL_ADDRESSES_KEPT:
            self._local_addresses[address] = address
        return address

    def _channel_opened(self, channel: GatewayChannel) -> None:
        self._channels.add(channel)
        self.metrics.add("open_connections", 1)

    def _channel_closed(self, channel: GatewayChannel) -> None:
        if channel in self._channels:
            self._channels.discard(channel)
            self.metrics.add("open_connections", -1)

    def _request_started(self) -> None:
        self._inflight += 1
        self.metrics.add("inflight_requests", 1)

    def _request_ended(self) -> None:
        self._inflight -= 1
        self.metrics.add("inflight_requests", -1)
        if self._inflight == 0:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(0)
