"""
STS doubles for tests, on real sockets bound to 127.0.0.1:

  - L{start_dev_sts}: the development STS (L{caracal.devsts.DevSTS}), the
    real thing for the happy path;
  - L{ScriptedSTS}: a configurable STS for failure cases: per path, answer
    with a given status, body and delay, or never answer; paths it has no
    script for are served by a L{DevSTS} when one is given (so the JWKS still
    works while the exchange fails). It counts every call.

Listeners are L{CountingSite}s: they count TCP connections (connection reuse
tests) and L{stop_listening} closes every server-side connection so trial
finds a clean reactor.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from caracal.devsts import DevSTS


class CountingSite(Site):
    """
    A L{Site} that counts the connections it accepted (C{connections}) and
    keeps the open ones (C{open}) so a test can close them.
    """

    def __init__(self, resource, *args, **kwargs) -> None:
        super().__init__(resource, *args, **kwargs)
        self.connections = 0
        self.open: set = set()
        self._closed_waiters: list[Deferred] = []

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        self.connections += 1
        self.open.add(protocol)
        lost = protocol.connectionLost

        def connectionLost(reason):
            self.open.discard(protocol)
            try:
                return lost(reason)
            finally:
                if not self.open:
                    waiters, self._closed_waiters = self._closed_waiters, []
                    for waiter in waiters:
                        waiter.callback(None)

        protocol.connectionLost = connectionLost
        return protocol

    def close_connections(self) -> Deferred:
        """Abort every open server connection; fire once they are all gone."""
        if not self.open:
            return succeed(None)
        waiter: Deferred = Deferred()
        self._closed_waiters.append(waiter)
        for protocol in list(self.open):
            # Site's protocol is a wrapper around the HTTPChannel that holds the transport.
            channel = getattr(protocol, "_channel", protocol)
            transport = getattr(channel, "transport", None)
            if transport is not None:
                transport.abortConnection()
        return waiter


def site_of(port) -> CountingSite:
    """The L{CountingSite} behind C{port} (under the TLS wrapper, if any)."""
    return getattr(port.factory, "wrappedFactory", port.factory)


def stop_listening(port) -> Deferred:
    """Stop C{port} and close the connections its L{CountingSite} still holds."""
    return DeferredList(
        [port.stopListening(), site_of(port).close_connections()], fireOnOneErrback=True
    )


def listen(reactor, resource, tls_options=None, interface="127.0.0.1"):
    """
    Serve C{resource} on C{interface} (a loopback address) on a free port,
    plaintext or with C{tls_options}. Returns C{(base_url, port)};
    L{site_of}C{(port)} is the L{CountingSite} (C{port.factory} itself for
    plaintext).
    """
    site = CountingSite(resource)
    if tls_options is None:
        port = reactor.listenTCP(0, site, interface=interface)
        scheme = "http"
    else:
        port = reactor.listenSSL(0, site, tls_options, interface=interface)
        scheme = "https"
    host = f"[{interface}]" if ":" in interface else interface
    return f"{scheme}://{host}:{port.getHost().port}", port


def start_dev_sts(reactor, clock=None, interface="127.0.0.1") -> Deferred:
    """
    Start a development STS on C{interface} (127.0.0.1 unless another
    loopback address is given) on a free port, plaintext.

    @return: a L{Deferred} firing with C{(DevSTS, base_url, port)}; stop it
        with L{stop_listening}C{(port)}.
    """
    sts = DevSTS(clock=clock or reactor)
    base_url, port = listen(reactor, sts.resource(), interface=interface)
    return succeed((sts, base_url, port))


@dataclass(frozen=True)
class Script:
    """One scripted answer: status, body, headers, delay; C{hang} never answers."""

    status: int = 200
    body: bytes = b""
    content_type: bytes = b"application/json"
    delay: float = 0.0
    hang: bool = False


@dataclass(frozen=True)
class ScriptedCall:
    """A request the scripted STS received."""

    method: bytes
    path: bytes
    args: dict
    headers: dict


class ScriptedSTS(Resource):
    """
    An STS that answers as told. C{script(path, ...)} sets the answer for a
    path; unscripted paths go to C{fallback} (a L{DevSTS}) or get a 404.

    @ivar calls: a L{Counter} of requests received per path (bytes).
    @ivar received: every L{ScriptedCall}, in order.
    @ivar pending: requests of C{hang} scripts, still open.
    """

    isLeaf = True

    def __init__(self, reactor, fallback: DevSTS | None = None) -> None:
        super().__init__()
        self._reactor = reactor
        self._fallback = fallback.resource() if fallback is not None else None
        self._scripts: dict[bytes, Script] = {}
        self.calls: Counter = Counter()
        self.received: list[ScriptedCall] = []
        self.pending: list = []

    def script(
        self,
        path: bytes = b"/oauth/2/token",
        status: int = 200,
        body: bytes | dict = b"",
        delay: float = 0.0,
        hang: bool = False,
        content_type: bytes = b"application/json",
    ) -> None:
        """Answer requests for C{path} like this from now on (a dict body is JSON)."""
        if isinstance(body, dict):
            body = json.dumps(body).encode("utf-8")
        self._scripts[path] = Script(status, body, content_type, delay, hang)

    def unscript(self, path: bytes = b"/oauth/2/token") -> None:
        """Serve C{path} by the fallback again."""
        self._scripts.pop(path, None)

    def render(self, request):
        self.calls[request.path] += 1
        self.received.append(
            ScriptedCall(
                request.method,
                request.path,
                dict(request.args),
                {k: list(v) for k, v in request.requestHeaders.getAllRawHeaders()},
            )
        )
        script = self._scripts.get(request.path)
        if script is None:
            if self._fallback is not None:
                return self._fallback.render(request)
            request.setResponseCode(404)
            return b'{"error":"not_found"}'
        if script.hang:
            self.pending.append(request)
            request.notifyFinish().addErrback(lambda _: None)
            return NOT_DONE_YET
        request.setResponseCode(script.status)
        request.setHeader(b"content-type", script.content_type)
        if not script.delay:
            return script.body

        def answer():
            if not request._disconnected:
                request.write(script.body)
                request.finish()

        call = self._reactor.callLater(script.delay, answer)
        request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
        return NOT_DONE_YET

    def listen(self, tls_options=None):
        """Serve on 127.0.0.1 on a free port: C{(base_url, port)}."""
        return listen(self._reactor, self, tls_options)
