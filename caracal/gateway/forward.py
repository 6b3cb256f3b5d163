# -*- test-case-name: tests.test_forward -*-
"""
Forwarding a request to its upstream (SPEC section 8, pipeline step 13):
the target URL, header hygiene in both directions, the credential by auth
mode, and the streaming relay of the response with back-pressure, client
disconnects and revocation cuts.

The pure functions at the top decide what is sent; L{Forwarder} sends it.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import FileBodyProducer, Request, ResponseDone
from twisted.web.http import NO_BODY_CODES, PotentialDataLoss
from twisted.web.http_headers import Headers
from zope.interface import implementer

from caracal.gateway import ids
from caracal.gateway.cache import BoundedCache
from caracal.gateway.denials import Denial
from caracal.gateway.h1client import BytesBody
from caracal.gateway.headers import (
    CARACAL_PREFIX,
    DROPPED_REQUEST,
    DROPPED_RESPONSE,
    HOP_BY_HOP,
    connection_tokens,
    raw_fields,
)
from caracal.gateway.interfaces import IForwarder
from caracal.gateway.pools import IDLE_PER_ORIGIN, OriginPool
from caracal.gateway.sse import EventStreamRelay, is_event_stream
from caracal.gateway.upstream import PinnedUpstream, pinned_endpoint

log = Logger()

REVOKED_TRAILER = b"X-Caracal-Revoked"
#: Request bodies up to this size are read from the spool and sent with the
#: head; larger ones are streamed from the spool file.
_INLINE_BODY = 64 * 1024
#: Pinned upstreams (with their connect timeout) whose endpoint is kept.
_ENDPOINT_CACHE_SIZE = 1024

_TRACEPARENT = re.compile(rb"^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")


class MissingProviderToken(Exception):
    """
    A provider auth mode needs the STS's C{provider_token} and the mandate
    has none. The pipeline answers 502 C{sts_unavailable}.
    """


def _bytes(text) -> bytes:
    return text.encode("latin-1") if isinstance(text, str) else text


def _name(header) -> bytes:
    return (header.encode("ascii") if isinstance(header, str) else header).lower()


def target_path(base_path: bytes, request_path: bytes) -> bytes:
    """
    The upstream base path joined with the request path, with exactly one
    slash between them (C{/api} + C{/tools/x} is C{/api/tools/x}; C{/} +
    C{/x} is C{/x}; C{/api} + C{/} is C{/api/}). Both stay percent-encoded
    as received.
    """
    base = base_path or b"/"
    if not base.startswith(b"/"):
        base = b"/" + base
    if not request_path:
        return base
    if not request_path.startswith(b"/"):
        request_path = b"/" + request_path
    return base.rstrip(b"/") + request_path


def _query_pairs(query: bytes) -> list[tuple[bytes, bytes]]:
    """(decoded key, raw pair) for each non-empty pair of C{query}."""
    pairs = []
    for raw in query.split(b"&"):
        if not raw:
            continue
        key = raw.split(b"=", 1)[0]
        pairs.append((unquote_to_bytes(key.replace(b"+", b" ")), raw))
    return pairs


def _parameter_name(key: bytes) -> bytes:
    """
    A decoded query key as frameworks read it: case folded (ASP.NET, many
    others) and without a trailing bracket suffix (PHP, Rails and qs read
    C{a[]} and C{a[x]} as parameter C{a}), so every spelling of one
    parameter compares equal. SPEC 12 H10 names C{[]}; C{a[x]} replaces
    C{a} in the same frameworks, so it goes too.
    """
    key = key.lower()
    bracket = key.find(b"[")
    if bracket > 0 and key.endswith(b"]"):
        key = key[:bracket]
    return key


def merge_query(upstream_query: bytes, request_query: bytes) -> bytes:
    """
    The upstream URL's query with the request's query after it, except the
    request's pairs naming a parameter the upstream already sets: upstream
    values win. Names are compared after percent-decoding (C{a%62} cannot
    sneak past C{ab}), ignoring case and a trailing C{[]} (SPEC 12 H10:
    C{TENANT=x} or C{tenant[]=x} cannot override C{tenant=acme}). Pairs keep
    their order and their raw encoding.
    """
    upstream = _query_pairs(upstream_query)
    pinned = {_parameter_name(key) for key, _raw in upstream}
    merged = [raw for _key, raw in upstream]
    merged += [
        raw for key, raw in _query_pairs(request_query) if _parameter_name(key) not in pinned
    ]
    return b"&".join(merged)


# What every forwarded request and response loses, whatever it carries.
_REMOVED_REQUEST = HOP_BY_HOP | DROPPED_REQUEST
_REMOVED_RESPONSE = HOP_BY_HOP | DROPPED_RESPONSE


def make_traceparent() -> bytes:
    """A fresh W3C trace context header value (version 00, not sampled)."""
    # 16 bytes of trace id and 8 of span id, from the buffered random source.
    trace = ids.random_hex(24).encode("ascii")
    return b"00-" + trace[:32] + b"-" + trace[32:] + b"-00"


def forward_request_headers(
    inbound: Headers,
    client_ip: str | None,
    proto: str,
    host: str,
    request_id: str,
    drop=(),
) -> Headers:
    """
    The headers to send upstream: C{inbound} minus hop-by-hop headers (and
    every header C{Connection} names), every C{X-Caracal-*}, the caller's
    C{Authorization} and the names in C{drop} (the credential header), then
    C{Host} = C{host} (the upstream's host[:port]), C{X-Forwarded-For} =
    C{client_ip} (replaced, never appended), C{X-Forwarded-Proto} = C{proto},
    C{X-Forwarded-Host} = the inbound C{Host}, C{X-Request-Id} and a
    C{traceparent} when the caller sent no valid one.
    """
    removed = _REMOVED_REQUEST.union(connection_tokens(inbound), [_name(n) for n in drop])
    outbound = _without(inbound, removed)
    # Set by canonical name: values the gateway made or already checked (an
    # IP address, the upstream's host, a request id of visible ASCII, the
    # inbound Host as Headers holds it), none with a CR or LF.
    fields = raw_fields(outbound)
    fields[b"Host"] = [host.encode("ascii")]
    if client_ip:
        fields[b"X-Forwarded-For"] = [client_ip.encode("ascii")]
    fields[b"X-Forwarded-Proto"] = [proto.encode("ascii")]
    inbound_host = raw_fields(inbound).get(b"Host")
    if inbound_host:
        fields[b"X-Forwarded-Host"] = [inbound_host[0]]
    fields[b"X-Request-Id"] = [request_id.encode("ascii")]
    trace = fields.get(b"Traceparent")
    if not trace or len(trace) != 1 or not _TRACEPARENT.match(trace[0].strip().lower()):
        # Absent or malformed: W3C says start a new trace, and drop the
        # tracestate that belonged to the broken one.
        fields[b"Traceparent"] = [make_traceparent()]
        if trace:
            outbound.removeHeader(b"tracestate")
    return outbound


def credential_headers(resource, mandate) -> list[tuple[bytes, bytes]]:
    """
    The headers carrying the mandate to the upstream, by the resource's
    C{auth_mode}: C{caracal_jwt} puts the mandate in the credential header;
    the provider modes put the STS's provider token there and the mandate in
    C{X-Caracal-Identity}. An empty scheme means the bare token.

    @raise MissingProviderToken: a provider mode without a provider token.
    """
    name = resource.credential_header.encode("ascii")
    if resource.auth_mode == "caracal_jwt":
        return [(name, resource.credential_value(mandate.access_token).encode("latin-1"))]
    if resource.auth_mode in ("provider_oauth", "provider_apikey"):
        if not mandate.provider_token:
            raise MissingProviderToken(resource.auth_mode)
        return [
            (name, resource.credential_value(mandate.provider_token).encode("latin-1")),
            (b"X-Caracal-Identity", mandate.access_token.encode("latin-1")),
        ]
    raise ValueError(f"unknown auth_mode {resource.auth_mode!r}")


def response_headers(upstream: Headers, transformed: bool = False) -> Headers:
    """
    The upstream's response headers minus hop-by-hop ones (and those its
    C{Connection} names), every C{X-Caracal-*} (C{X-Caracal-Identity} above
    all) and its C{X-Request-Id} (the gateway's own is echoed). The
    C{Content-Length} stays unless the body is C{transformed}.
    """
    return _without(upstream, _response_removed(upstream, transformed))


def _response_removed(upstream: Headers, transformed: bool = False) -> frozenset[bytes]:
    """The names L{response_headers} leaves out of C{upstream} (besides C{X-Caracal-*})."""
    removed = _REMOVED_RESPONSE.union(connection_tokens(upstream))
    if transformed:
        removed |= {b"content-length"}
    return removed


def _without(headers: Headers, removed: set[bytes], into: Headers | None = None) -> Headers:
    """
    A copy of C{headers} without the C{removed} names and every
    C{X-Caracal-*}; with C{into}, those headers set there (each replacing
    its name) instead of into a new L{Headers}.
    """
    kept = Headers() if into is None else into
    # Names already canonical and values already checked by C{headers}.
    fields = raw_fields(kept)
    for name, values in raw_fields(headers).items():
        lowered = name.lower()
        if lowered in removed or lowered.startswith(CARACAL_PREFIX):
            continue
        fields[name] = list(values)
    return kept


def _body_producer(request):
    """The spooled request body as a producer of known length, or None."""
    content = getattr(request, "content", None)
    if content is None:
        return None
    content.seek(0, os.SEEK_END)
    length = content.tell()
    content.seek(0)
    framed = request.requestHeaders.hasHeader(
        b"content-length"
    ) or request.requestHeaders.hasHeader(b"transfer-encoding")
    if length == 0 and not framed:
        # A GET without a body must stay without Content-Length upstream.
        return None
    if length <= _INLINE_BODY:
        # Written with the head, in one write (an MCP call's JSON-RPC body).
        return BytesBody(content.read())
    return FileBodyProducer(content)


def _client_ip(request) -> str | None:
    try:
        address = request.getClientAddress()
    except AttributeError:
        return None
    return getattr(address, "host", None)


@implementer(IForwarder)
class Forwarder:
    """
    Sends requests to pinned upstreams over one shared persistent connection
    pool and relays the responses.

    @param reactor: the reactor (clock and connections).
    @param tls_policy: an L{IPolicyForHTTPS} verifying upstream certificates.
    @param timeout: seconds to wait for the response headers
        (C{UPSTREAM_TIMEOUT}); also bounds the TCP connect.
    @param metrics: a L{caracal.gateway.metrics.Metrics} or None.
    @param pool: an L{OriginPool}; one of its own if None.
    @param sse_keepalive: seconds of silence after which an event stream
        gets a keep-alive comment between events (C{SSE_KEEPALIVE}); C{0}
        for none.
    """

    def __init__(
        self, reactor, tls_policy, timeout: float, metrics=None, pool=None, sse_keepalive=0.0
    ) -> None:
        self._reactor = reactor
        self._tls_policy = tls_policy
        self._timeout = timeout
        self._metrics = metrics
        self._sse_keepalive = sse_keepalive
        if pool is None:
            pool = OriginPool(reactor, IDLE_PER_ORIGIN, idle_timeout=60)
        self.pool = pool
        # One endpoint per pinned upstream and connect timeout, not one per request.
        self._endpoints: BoundedCache[tuple[PinnedUpstream, float], object] = BoundedCache(
            _ENDPOINT_CACHE_SIZE
        )

    def _endpoint(self, pinned: PinnedUpstream, timeout: float):
        key = (pinned, timeout)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = pinned_endpoint(pinned, self._tls_policy, self._reactor, timeout)
            self._endpoints.put(key, endpoint)
        return endpoint

    def close(self) -> defer.Deferred:
        """Close the idle pooled connections (at shutdown)."""
        return self.pool.close()

    def forward(
        self,
        request,
        pinned: PinnedUpstream,
        credential_headers,
        token_expires_in: float,
        watch_revocation=None,
        timeout: float | None = None,
    ) -> defer.Deferred[None]:
        """
        Forward C{request} to C{pinned} and stream the response into it.

        @param credential_headers: (name, value) pairs from
            L{credential_headers}; each replaces any inbound header of that
            name.
        @param token_expires_in: seconds left on the caller's token; sent
            back (less the time spent here) as C{X-Caracal-Token-Expires-In}.
        @param watch_revocation: C{callable(cut) -> cancel}: calls C{cut()}
            when the caller's session is revoked; the stream is then cut.
        @param timeout: this resource's bound on the response headers (its
            C{upstream_timeout_ms}), replacing C{UPSTREAM_TIMEOUT}; C{None}
            for the default.

        @return: a Deferred that fires with None once the response is fully
            written, cut, or the client has gone (the request is then
            finished or its connection closed: the caller writes nothing
            more). It fails with a L{Denial} (502 C{upstream_unreachable},
            504 C{upstream_timeout}, 401 C{session_revoked}) only when no
            response byte was written yet.
        """
        # Request._disconnected, private to Twisted (tests/test_twisted_private pins it):
        # the client left before we were called.
        if getattr(request, "_disconnected", False):
            # The client left before we were called: contact nobody (its
            # body file is closed and notifyFinish would never fire).
            return defer.succeed(None)
        url = pinned.url
        path = target_path(url.base_path, request.path)
        query = merge_query(url.query, request.uri.partition(b"?")[2])
        request_id = getattr(request, "request_id", None) or ids.uuid4()
        credentials = [(_bytes(n), _bytes(v)) for n, v in credential_headers]
        headers = forward_request_headers(
            request.requestHeaders,
            _client_ip(request),
            "https" if request.isSecure() else "http",
            url.host_header,
            request_id,
            drop=[n for n, _v in credentials],
        )
        for name, value in credentials:
            headers.setRawHeaders(name, [value])
        if timeout is None:
            timeout = self._timeout
        exchange = _Exchange(self, request, token_expires_in, watch_revocation, timeout)
        # Connections are pooled per pinned address: one made to an address
        # that passed the checks is never reused for another the name now
        # resolves to.
        origin = (url.scheme, url.host, url.port, pinned.address)
        endpoint = self._endpoint(pinned, timeout)
        target = path + b"?" + query if query else path
        exchange.start(self.pool, origin, endpoint, target, headers, _body_producer(request))
        return exchange.result


def _upstream_denial(failure) -> Denial:
    return Denial(
        502,
        "upstream_unreachable",
        "the upstream could not be reached",
        metric="upstream_errors",
        reason=f"upstream_unreachable:{failure.type.__name__}",
    )


class _Exchange:
    """
    One forwarded request's life: C{waiting} for response headers, then
    C{streaming}, then C{done} (finished, failed, cut, drained or client
    gone).
    """

    def __init__(
        self, forwarder: Forwarder, request, token_expires_in, watch_revocation, timeout: float
    ):
        self._forwarder = forwarder
        self._timeout = timeout
        self._reactor = forwarder._reactor
        self._request = request
        self._token_expires_in = token_expires_in
        self._watch = watch_revocation
        self._cancel_watch = None
        self._timer = None
        self._pending = None
        self._relay: _BodyRelay | None = None
        self._events: EventStreamRelay | None = None
        self._cancel_drain = None
        self._trailer = False
        self.state = "waiting"
        self.result: defer.Deferred[None] = defer.Deferred(self._cancelled)

    def _upstream_wait(self, waiting: bool) -> None:
        # The gateway's channel suspends WRITE_TIMEOUT while the upstream
        # timeout bounds the wait (other channels have no such timer).
        channel = getattr(self._request, "channel", None)
        hook = getattr(channel, "upstream_wait", None)
        if hook is not None:
            hook(waiting)

    def start(
        self, pool: OriginPool, origin, endpoint, target: bytes, headers: Headers, body
    ) -> None:
        self._started = self._reactor.seconds()
        self._upstream_wait(True)
        self._request.notifyFinish().addCallbacks(lambda _: None, self._client_gone)
        self._timer = self._reactor.callLater(self._timeout, self._timed_out)
        if self._watch is not None:
            cancel = self._watch(self.cut)
            if self.state != "waiting":
                # Already revoked: the watch called cut() before returning.
                cancel()
                return
            self._cancel_watch = cancel
        try:
            request = Request(self._request.method, target, headers, body, persistent=True)
        except Exception:  # a method or target Twisted refuses to write
            self._pending = defer.fail()
        else:
            self._pending = pool.request(origin, endpoint, request)
        self._pending.addCallbacks(self._got_response, self._request_failed)
        self._pending.addErrback(self._unexpected)

    # -- before the response headers ---------------------------------------

    def _fail(self, denial: Denial) -> None:
        self._upstream_wait(False)
        self._close("done")
        if self._pending is not None:
            self._pending.cancel()
        self.result.errback(denial)

    def _timed_out(self) -> None:
        self._timer = None
        if self.state == "waiting":
            self._fail(
                Denial(
                    504,
                    "upstream_timeout",
                    "the upstream did not answer in time",
                    metric="upstream_errors",
                )
            )

    def _request_failed(self, failure) -> None:
        if self.state != "waiting":
            return None  # we cancelled it: timed out, revoked or client gone
        log.info(
            "upstream request failed: {error}", error=failure.getErrorMessage() or failure.type
        )
        self._pending = None
        self._fail(_upstream_denial(failure))
        return None

    def _unexpected(self, failure) -> None:
        """A bug of ours while handling the response: never leave it hanging."""
        log.failure("relaying the upstream response failed", failure)
        if self.state == "waiting":
            self._fail(_upstream_denial(failure))
        elif self.state == "streaming":
            self._close("done")
            if self._relay is not None:
                self._relay.stop_upstream()
            if self._connected():
                self._request.loseConnection()
            self.result.callback(None)

    def _got_response(self, response) -> None:
        self._pending = None
        if self.state != "waiting":
            response.deliverBody(_Discard())
            return
        elapsed = self._reactor.seconds() - self._started
        log_fields = getattr(self._request, "log_fields", None)
        if log_fields is not None:
            log_fields["upstream_ms"] = round(elapsed * 1000, 1)
        metrics = self._forwarder._metrics
        if metrics is not None:
            resource = log_fields.get("resource") if log_fields is not None else None
            metrics.observe("upstream_duration_seconds", elapsed, resource=resource)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.state = "streaming"
        self._upstream_wait(False)
        self._write_head(response, elapsed)
        if self.state != "streaming":
            return  # the client went away while the headers were written
        relay = self._relay = _BodyRelay(self)
        self._request.registerProducer(relay, True)
        # HTTPChannel._waitingForTransport, private to Twisted (tests/test_twisted_private pins it):
        # the client is not reading.
        if getattr(self._request.channel, "_waitingForTransport", False):
            # The client is already not reading: start paused.
            relay.paused = True
        response.deliverBody(relay)
        # deliverBody resumes the upstream transport after handing over any
        # buffered data; a pause asked for meanwhile must hold.
        if relay.paused and self.state == "streaming":
            relay.transport.pauseProducing()
        if self._events is not None and self._request.method == b"GET":
            # A standing event stream never ends by itself: when the gateway
            # drains, it ends at its next event boundary (SPEC 13).
            site = getattr(self._request, "gateway_site", None)
            if site is not None and self.state == "streaming":
                self._cancel_drain = site.when_draining(self.drain)

    def _write_head(self, response, elapsed: float) -> None:
        request = self._request
        request.setResponseCode(response.code, response.phrase)
        # The client's response.headers are the upstream's as received,
        # Connection (it names more hop-by-hop headers) and Content-Length
        # included; the body is relayed unchunked, so a chunked one has
        # no length and the gateway's channel chunks it again.
        upstream = response.headers
        # response_headers(upstream), set straight into the response's headers.
        _without(upstream, _response_removed(upstream), into=request.responseHeaders)
        left = max(0, int(self._token_expires_in - elapsed))
        request.responseHeaders.setRawHeaders(
            b"X-Caracal-Token-Expires-In", [str(left).encode("ascii")]
        )
        will_chunk = (
            request.clientproto == b"HTTP/1.1"
            and not request.responseHeaders.hasHeader(b"content-length")
            and request.method != b"HEAD"
            and response.code not in NO_BODY_CODES
        )
        if self._watch is not None and will_chunk:
            request.responseHeaders.setRawHeaders(b"Trailer", [REVOKED_TRAILER])
            self._trailer = True
        # Send the head now: an SSE client must see it before the first event.
        request.write(b"")
        self._trailer = self._trailer and bool(getattr(request, "chunked", False))
        if (
            is_event_stream(request.responseHeaders.getRawHeaders(b"content-type"))
            and request.method != b"HEAD"
            and response.code not in NO_BODY_CODES
        ):
            self._events = EventStreamRelay(
                self._reactor, self._forwarder._sse_keepalive, request.write
            )

    # -- while streaming ---------------------------------------------------

    def _close(self, state: str) -> None:
        self.state = state
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._events is not None:
            self._events.stop()
        if self._cancel_drain is not None:
            cancel_drain, self._cancel_drain = self._cancel_drain, None
            cancel_drain()
        if self._cancel_watch is not None:
            cancel, self._cancel_watch = self._cancel_watch, None
            cancel()

    def _connected(self) -> bool:
        # Request._disconnected, private to Twisted (tests/test_twisted_private pins it):
        # no public "has the client left".
        return not getattr(self._request, "_disconnected", False) and (
            self._request.channel is not None
        )

    def _release_client(self) -> None:
        if self._relay is not None and self._connected() and self._request.producer is not None:
            self._request.unregisterProducer()

    def write(self, data: bytes) -> None:
        if self.state == "streaming":
            if self._events is not None:
                self._events.relay(data)
            else:
                self._request.write(data)

    def drain(self) -> None:
        """The gateway drains: end this event stream at its next boundary."""
        if self.state == "streaming" and self._events is not None:
            self._events.end_at_boundary(self._drained)

    def _drained(self) -> None:
        if self.state != "streaming":
            return
        self._close("drained")
        log_fields = getattr(self._request, "log_fields", None)
        if log_fields is not None:
            log_fields["upstream_cut"] = "drained"
        self._release_client()
        if self._connected():
            # A whole message: the client sees the stream end cleanly and
            # reconnects (to another gateway) with Last-Event-ID.
            self._request.finish()
        if self._relay is not None:
            self._relay.stop_upstream()
        self.result.callback(None)

    def body_ended(self, reason) -> None:
        """The upstream body is complete, or the upstream connection failed."""
        if self.state != "streaming":
            return
        self._close("done")
        self._release_client()
        # isinstance, not Failure.check: check names every class of the
        # error's MRO on each call, and this runs once per forwarded call.
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            # PotentialDataLoss: an upstream without length or chunking ends
            # its body by closing; that is how such a body ends.
            if self._connected():
                self._request.finish()
        else:
            log.info("upstream body interrupted: {error}", error=reason.getErrorMessage())
            log_fields = getattr(self._request, "log_fields", None)
            if log_fields is not None:
                log_fields["upstream_cut"] = "upstream_error"
            # The client must see a truncated message, not a complete one:
            # close without the final chunk.
            if self._connected():
                self._request.loseConnection()
        self.result.callback(None)

    def cut(self) -> None:
        """The caller's session was revoked: stop the upstream now."""
        if self.state == "waiting":
            self._fail(
                Denial(401, "session_revoked", "the session was revoked", metric="denials_revoked")
            )
            return
        if self.state != "streaming":
            return
        self._close("cut")
        log_fields = getattr(self._request, "log_fields", None)
        if log_fields is not None:
            log_fields["upstream_cut"] = "session_revoked"
        self._release_client()
        if self._connected():
            request = self._request
            if self._trailer and request.chunked:
                # twisted.web has no trailer support: end the chunked body
                # ourselves, then stop finish() from writing a second
                # terminator.
                request.channel.write(b"0\r\n" + REVOKED_TRAILER + b": true\r\n\r\n")
                request.chunked = 0
                request.finish()
            else:
                # No way to mark the body as cut except closing.
                request.loseConnection()
        if self._relay is not None:
            self._relay.stop_upstream()
        self.result.callback(None)

    def _cancelled(self, _result: defer.Deferred) -> None:
        # Whoever waits on us was cancelled because the client left: stop
        # as when notifyFinish says so, dropping the upstream request.
        self._client_gone(None)

    def _client_gone(self, failure) -> None:
        if self.state == "waiting":
            self._close("gone")
            if self._pending is not None:
                self._pending.cancel()
            self.result.callback(None)
        elif self.state == "streaming":
            self._close("gone")
            if self._relay is not None:
                self._relay.stop_upstream()
            self.result.callback(None)


@implementer(IPushProducer)
class _BodyRelay(Protocol):
    """
    Receives the upstream body (as the Response's body protocol) and is the
    producer registered on the client's request, so that the client's
    transport pausing us pauses the upstream connection's reading.
    """

    def __init__(self, exchange: _Exchange) -> None:
        self._exchange = exchange
        self.paused = False

    # self.transport is the client protocol's TransportProxyProducer: it
    # stops forwarding to the real connection once this response is done, so
    # a pooled connection is never left paused (or closed) by us.

    def dataReceived(self, data: bytes) -> None:
        self._exchange.write(data)

    def connectionLost(self, reason) -> None:
        self._exchange.body_ended(reason)

    def pauseProducing(self) -> None:
        self.paused = True
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.stop_upstream()

    def stop_upstream(self) -> None:
        """Drop the upstream connection (its body is not wanted any more)."""
        if self.transport is not None:
            self.transport.stopProducing()


class _Discard(Protocol):
    """Body protocol for a response nobody wants: close its connection."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()
