# -*- test-case-name: tests.test_pools -*-
"""
Keep-alive HTTP/1.1 connections for the gateway's outbound traffic (the STS
and the upstreams), and the agent the STS client hands to treq.

Twisted's L{HTTPConnectionPool} behind an L{Agent} costs, per request, a URI
parse, an endpoint lookup, a host header computed again, two or three
Deferreds and a timer armed and cancelled for every connection put back
(measured: about a tenth of a gateway call's CPU for its two outbound
exchanges). L{OriginPool} keeps connections of the gateway's own client
(L{caracal.gateway.h1client}) per origin, with Twisted's rule for retrying an
idempotent request that found its reused connection closed: callers name the
origin's key and endpoint they already hold, and one timer per pool closes
the connections left idle too long.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.web.client import (
    URI,
    Request,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer
from zope.interface import implementer

from caracal.gateway.cache import BoundedCache
from caracal.gateway.h1client import H1ClientProtocol, Response

#: Idle keep-alive connections kept per origin (the STS, each upstream). A
#: call that finds none idle opens a connection, and one returned to a full
#: pool closes the longest idle: with fewer than the calls in flight at once,
#: a busy worker keeps opening and closing connections (measured with
#: bench/run.py per_call at 32 connections: 16 cost about 20 % more CPU per
#: call than 64).
IDLE_PER_ORIGIN = 64


#: Methods a request may be sent again with when its reused connection turned
#: out closed (Twisted's list: idempotent, and never with a body).
_RETRIED_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"))


class _ClientFactory(Factory):
    """The client protocol, handed back to the pool when quiescent."""

    noisy = False  # no "Starting factory" line per outbound connection

    def __init__(self, quiescent: Callable[[H1ClientProtocol], None]) -> None:
        self._quiescent = quiescent

    def buildProtocol(self, addr) -> H1ClientProtocol:
        return H1ClientProtocol(self._quiescent)


def _stale(failure) -> bool:
    """
    Whether a request failed only because its reused connection was already
    closed: nothing was answered and nobody cancelled it.
    """
    if not failure.check(RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived):
        return False
    reasons = getattr(failure.value, "reasons", None) or []
    return not any(r.check(defer.CancelledError) for r in reasons)


class OriginPool:
    """
    Keep-alive connections per origin.

    A request goes on the connection of its origin that was idle the
    shortest time (the one least likely to have been closed by the server
    meanwhile), else on a new one. A connection whose response is complete
    comes back idle; one more than C{max_idle} closes the longest idle, and
    one idle for C{idle_timeout} seconds is closed.

    @param reactor: the clock of the idle timeout.
    @param max_idle: idle connections kept per origin (0: each connection is
        closed once its response is read).
    @param idle_timeout: seconds an idle connection is kept.
    """

    def __init__(self, reactor, max_idle: int = IDLE_PER_ORIGIN, idle_timeout: float = 60) -> None:
        self._reactor = reactor
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        # key -> [(protocol, idle since)], oldest first.
        self._idle: dict[Hashable, list[tuple[H1ClientProtocol, float]]] = {}
        self._sweep_call = None

    def idle(self, key: Hashable) -> int:
        """The number of idle connections kept for C{key}."""
        return len(self._idle.get(key, ()))

    def request(
        self, key: Hashable, endpoint: IStreamClientEndpoint, request: Request
    ) -> defer.Deferred[Response]:
        """
        Send C{request} to the origin C{key}, connecting with C{endpoint} if
        none of its connections is idle.

        @return: a Deferred firing with the L{Response}, or failing as
            L{H1ClientProtocol.request} does.
        """
        idle = self._idle.get(key)
        while idle:
            protocol, _since = idle.pop()
            if protocol.state != "QUIESCENT":
                continue  # closed while idle
            sent = protocol.request(request)
            if request.method in _RETRIED_METHODS and request.bodyProducer is None:
                # Twisted's retry: an idempotent request without a body that
                # finds its reused connection closed goes once more, on a new one.
                sent.addErrback(self._retry, key, endpoint, request)
            return sent
        return self._send_fresh(key, endpoint, request)

    def _retry(self, failure, key, endpoint, request):
        if not _stale(failure):
            return failure
        return self._send_fresh(key, endpoint, request)

    def _send_fresh(self, key, endpoint, request) -> defer.Deferred[Response]:
        connecting = endpoint.connect(_ClientFactory(lambda protocol: self._put(key, protocol)))
        return connecting.addCallback(lambda protocol: protocol.request(request))

    def _put(self, key: Hashable, protocol: H1ClientProtocol) -> None:
        if protocol.state != "QUIESCENT":
            return  # never keep a busy or closed one
        if self.max_idle <= 0:
            protocol.transport.loseConnection()  # a pool that keeps nothing
            return
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.max_idle:
            oldest, _since = idle.pop(0)
            oldest.transport.loseConnection()
        idle.append((protocol, self._reactor.seconds()))
        if self._sweep_call is None:
            self._sweep_call = self._reactor.callLater(self.idle_timeout, self._sweep)

    def _sweep(self) -> None:
        self._sweep_call = None
        now = self._reactor.seconds()
        expired_before = now - self.idle_timeout
        next_expiry = None
        for key, idle in list(self._idle.items()):
            expired = 0
            while expired < len(idle) and idle[expired][1] <= expired_before:
                expired += 1
            for protocol, _since in idle[:expired]:
                if protocol.state == "QUIESCENT":
                    protocol.transport.loseConnection()
            del idle[:expired]
            if not idle:
                del self._idle[key]
                continue
            expiry = idle[0][1] + self.idle_timeout
            if next_expiry is None or expiry < next_expiry:
                next_expiry = expiry
        if next_expiry is not None:
            self._sweep_call = self._reactor.callLater(next_expiry - now, self._sweep)

    def close(self) -> defer.Deferred[None]:
        """Close every idle connection; fires once they are closed."""
        if self._sweep_call is not None:
            self._sweep_call.cancel()
            self._sweep_call = None
        closing = [
            protocol.abort()
            for idle in self._idle.values()
            for protocol, _since in idle
            if protocol.state == "QUIESCENT"
        ]
        self._idle = {}
        return defer.gatherResults(closing).addCallback(lambda _: None)


def host_value(uri: URI) -> bytes:
    """The C{Host} header for C{uri}: the port only when not the scheme's default."""
    host = uri.host
    if b":" in host:
        host = b"[" + host + b"]"
    if (uri.scheme, uri.port) in ((b"http", 80), (b"https", 443)):
        return host
    return b"%b:%d" % (host, uri.port)


@implementer(IAgent)
class PooledAgent:
    """
    An L{IAgent} sending over an L{OriginPool}: what treq needs to call the
    STS. Each URL it is given is parsed once (the STS client calls a handful:
    the token endpoint, a JWKS per zone, health), its endpoint made once per
    origin with C{endpoint_for(uri)}.

    @param pool: the L{OriginPool}.
    @param endpoint_for: C{callable(URI) -> IStreamClientEndpoint}, for
        C{http} and C{https} URIs only.
    @param size: URLs remembered.
    """

    def __init__(self, pool: OriginPool, endpoint_for, size: int = 64) -> None:
        self.pool = pool
        self._endpoint_for = endpoint_for
        self._endpoints: BoundedCache[tuple[bytes, bytes, int], IStreamClientEndpoint] = (
            BoundedCache(16)
        )
        self._targets: BoundedCache[bytes, tuple] = BoundedCache(size)

    def _target(self, uri: bytes) -> tuple:
        target = self._targets.get(uri)
        if target is None:
            parsed = URI.fromBytes(uri)
            if parsed.scheme not in (b"http", b"https"):
                raise SchemeNotSupported(f"Unsupported scheme: {parsed.scheme!r}")
            key = (parsed.scheme, parsed.host, parsed.port)
            endpoint = self._endpoints.get(key)
            if endpoint is None:
                endpoint = self._endpoint_for(parsed)
                self._endpoints.put(key, endpoint)
            target = (key, endpoint, parsed.originForm, host_value(parsed))
            self._targets.put(uri, target)
        return target

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> defer.Deferred[Response]:
        """L{IAgent.request}: the Agent's, without its per-request work."""
        try:
            key, endpoint, path, host = self._target(uri)
            if headers is None:
                headers = Headers()
            if not headers.hasHeader(b"host"):
                headers = headers.copy()
                headers.addRawHeader(b"host", host)
            request = Request(method, path, headers, bodyProducer, persistent=True)
        except Exception:
            return defer.fail()
        return self.pool.request(key, endpoint, request)

    def close(self) -> defer.Deferred[None]:
        """Close the pool's idle connections."""
        return self.pool.close()
