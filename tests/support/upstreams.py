"""
A real upstream for integration tests: twisted.web on 127.0.0.1, plaintext
or TLS with a test certificate, counting the TCP connections it accepts (to
prove pooling, and to prove that a refused upstream was never contacted).

Endpoints, chosen by the last path segment (so any base path works):

- anything else: echo. Answers JSON with the request as the upstream saw it
  (method, path, query, headers in order, body length and SHA-256), and sends
  response headers the gateway must filter (hop-by-hop, X-Caracal-*).
- C{.../sse}: a server-sent-events stream driven by the test through
  L{SSEStream} (L{LocalUpstream.next_sse} waits for the next one).
- C{.../slow}: never answers (not even headers); L{LocalUpstream.slow} holds
  (request, Deferred firing when its connection closes).
- C{.../big?bytes=N}: N bytes written by a push producer that records how
  often the transport paused it (back-pressure).
- C{.../status?code=N}: answers status N with a small body.
"""

from __future__ import annotations

import hashlib
import json
from urllib.parse import parse_qs

from OpenSSL import crypto
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

# The headers the echo endpoint answers with that the gateway must remove.
HOSTILE_RESPONSE_HEADERS = [
    (b"Connection", b"X-Up-Hop"),
    (b"X-Up-Hop", b"1"),
    (b"Keep-Alive", b"timeout=5"),
    (b"Proxy-Authenticate", b"Basic"),
    (b"X-Caracal-Identity", b"leaked-mandate"),
    (b"X-Caracal-Token-Expires-In", b"99999"),
]


class SSEStream:
    """One open server-sent-events response, written by the test."""

    def __init__(self, request: server.Request) -> None:
        self.request = request
        self.sent: list[bytes] = []
        # Fires (with None or a failure) when the gateway hangs up or we finish.
        self.closed: defer.Deferred[None] = request.notifyFinish()
        self.closed.addErrback(lambda _: None)

    @property
    def open(self) -> bool:
        return not self.request._disconnected and not self.request.finished

    def send(self, data: bytes) -> None:
        """Write one event now."""
        self.sent.append(data)
        self.request.write(data)

    def finish(self) -> None:
        self.request.finish()


@implementer(IPushProducer)
class BigBody:
    """Writes C{total} bytes as fast as the transport lets it."""

    def __init__(self, request: server.Request, total: int, clock, chunk: int = 64 * 1024):
        self.request = request
        self.total = total
        self.written = 0
        self.pauses = 0
        self.paused = False
        self.stopped = False
        self._clock = clock
        self._chunk = b"x" * chunk
        self.closed: defer.Deferred[None] = request.notifyFinish()
        self.closed.addErrback(lambda _: None)

    def start(self) -> None:
        self.request.setHeader(b"content-type", b"application/octet-stream")
        self.request.setHeader(b"content-length", str(self.total).encode())
        self.request.registerProducer(self, True)
        self._write()

    def _write(self) -> None:
        while not self.paused and not self.stopped and self.written < self.total:
            data = self._chunk[: self.total - self.written]
            self.written += len(data)
            self.request.write(data)
        if self.written >= self.total and not self.stopped:
            self.stopped = True
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.pauses += 1
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._clock.callLater(0, self._write)

    def stopProducing(self) -> None:
        self.stopped = True


class _Upstream(Resource):
    isLeaf = True

    def __init__(self, owner: LocalUpstream) -> None:
        Resource.__init__(self)
        self.owner = owner

    def render(self, request):
        owner = self.owner
        owner.requests.append(request)
        name = request.path.rstrip(b"/").rsplit(b"/", 1)[-1]
        query = parse_qs(request.uri.partition(b"?")[2].decode())
        if name == b"sse":
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-cache")
            request.write(b"")
            stream = SSEStream(request)
            owner.streams.append(stream)
            waiting, owner._sse_waiters = owner._sse_waiters, []
            for d in waiting:
                d.callback(stream)
            return server.NOT_DONE_YET
        if name == b"slow":
            closed = request.notifyFinish()
            closed.addErrback(lambda _: None)
            owner.slow.append((request, closed))
            return server.NOT_DONE_YET
        if name == b"big":
            body = BigBody(request, int(query["bytes"][0]), owner.reactor)
            owner.bodies.append(body)
            body.start()
            return server.NOT_DONE_YET
        if name == b"status":
            request.setResponseCode(int(query["code"][0]))
            request.setHeader(b"content-type", b"text/plain")
            return b"upstream says " + query["code"][0].encode()
        return self.echo(request)

    def echo(self, request) -> bytes:
        request.content.seek(0)
        body = request.content.read()
        seen = {
            "method": request.method.decode(),
            "path": request.path.decode(),
            "query": request.uri.partition(b"?")[2].decode(),
            "headers": [
                [name.decode().lower(), value.decode()]
                for name, values in request.requestHeaders.getAllRawHeaders()
                for value in values
            ],
            "body_length": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "client_port": request.getClientAddress().port,
        }
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-upstream", b"echo")
        for name, value in HOSTILE_RESPONSE_HEADERS:
            request.responseHeaders.addRawHeader(name, value)
        return json.dumps(seen).encode()


class _Channel(http.HTTPChannel):
    def connectionLost(self, reason):
        http.HTTPChannel.connectionLost(self, reason)
        self.factory._lost(self)


class TrackingSite(server.Site):
    """
    A Site that counts the connections it accepts and can drop them all,
    so a test ends with a clean reactor.

    @ivar connections: TCP connections accepted so far.
    """

    protocol = _Channel

    def __init__(self, resource) -> None:
        server.Site.__init__(self, resource)
        self.noisy = False
        self.connections = 0
        self.channels: set = set()
        self._idle_waiters: list[defer.Deferred] = []

    def buildProtocol(self, addr):
        channel = server.Site.buildProtocol(self, addr)
        self.connections += 1
        self.channels.add(channel)
        return channel

    def _lost(self, channel) -> None:
        self.channels.discard(channel)
        if not self.channels:
            waiting, self._idle_waiters = self._idle_waiters, []
            for d in waiting:
                d.callback(None)

    def drop_all(self) -> defer.Deferred[None]:
        """Abort every open connection; fires once all are gone."""
        if not self.channels:
            return defer.succeed(None)
        idle: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(idle)
        for channel in list(self.channels):
            if channel.transport is not None:
                channel.transport.abortConnection()
        return idle


def server_tls_options(leaf) -> CertificateOptions:
    """Server TLS options presenting C{leaf} (a L{tests.support.certs.Leaf})."""
    key = crypto.PKey.from_cryptography_key(leaf.key)
    return CertificateOptions(
        privateKey=key,
        certificate=crypto.X509.from_cryptography(leaf.cert),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in leaf.intermediates],
    )


class LocalUpstream:
    """
    An upstream HTTP(S) server on 127.0.0.1 and a free port.

    @ivar connections: TCP connections accepted so far.
    @ivar requests: every request received.
    """

    def __init__(self, reactor, leaf=None) -> None:
        self.reactor = reactor
        self.leaf = leaf
        self.site = TrackingSite(_Upstream(self))
        self.requests: list = []
        self.streams: list[SSEStream] = []
        self.slow: list = []
        self.bodies: list[BigBody] = []
        self._sse_waiters: list[defer.Deferred] = []
        self._port = None

    @property
    def connections(self) -> int:
        """TCP connections accepted so far."""
        return self.site.connections

    @property
    def scheme(self) -> str:
        return "https" if self.leaf is not None else "http"

    @property
    def port(self) -> int:
        return self._port.getHost().port

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def start(self) -> LocalUpstream:
        factory = self.site
        if self.leaf is not None:
            factory = TLSMemoryBIOFactory(server_tls_options(self.leaf), False, self.site)
            factory.noisy = False
        self._port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        return self

    def next_sse(self) -> defer.Deferred[SSEStream]:
        """Fires with the next SSE stream opened on this upstream."""
        d: defer.Deferred[SSEStream] = defer.Deferred()
        self._sse_waiters.append(d)
        return d

    def stop(self) -> defer.Deferred[None]:
        """Stop listening and drop every open connection."""
        stopped = defer.maybeDeferred(self._port.stopListening)
        dropped = self.site.drop_all()
        return defer.gatherResults([stopped, dropped]).addCallback(lambda _: None)
