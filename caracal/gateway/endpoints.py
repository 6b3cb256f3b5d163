# -*- test-case-name: tests.test_endpoints -*-
"""
The local endpoints of SPEC section 10: C{/health}, C{/ready}, C{/metrics}.
They are answered by the gateway itself and never proxied. Who may read
C{/metrics} is SPEC section 12's business: L{MetricsResource} asks for
C{METRICS_BEARER} when one is set, and L{UnexposedResource} answers 404 where
C{/metrics} is not served.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from caracal.gateway.denials import error_body
from caracal.gateway.metrics import render_json

log = Logger(namespace="caracal.ready")

READY_CHECK_TIMEOUT = 2.0

#: How long a readiness result is reused.
CACHE_SECONDS = 1.0
#: How long a failing one is: shorter, so that a dependency back in service
#: shows within the SPEC's 2 s (section 12) on top of its reconnection delay,
#: while still bounding the checks any caller can cause to four a second.
FAILED_CACHE_SECONDS = 0.25

PROMETHEUS = b"text/plain"
JSON = b"application/json"


def _gone(request) -> bool:
    """The answer can no longer be written (finished, or the client left)."""
    # Request._disconnected, private to Twisted (tests/test_twisted_private pins it):
    # no public "has the client left".
    return bool(request.finished or getattr(request, "_disconnected", False))


def _note_denial(request, reason: str) -> None:
    """Name the refusal in the access-log line (a L{GatewayRequest} has C{log_fields})."""
    fields = getattr(request, "log_fields", None)
    if fields is not None:
        fields["denial"] = reason


def _json(request, status: int, document: dict) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(document, sort_keys=True).encode("utf-8") + b"\n"


class HealthResource(Resource):
    """C{GET /health}: 200 while the process runs."""

    isLeaf = True

    def render(self, request):
        return _json(request, 200, {"status": "ok"})


class ReadyResource(Resource):
    """
    C{GET /ready}: 200 when every dependency answers, else 503 naming the ones
    that did not. Each check is bounded by a short timeout and run in parallel.
    Failure details go to the log, never to the body (they may hold addresses
    or credentials).
    """

    isLeaf = True

    def __init__(
        self,
        checks: dict[str, Callable[[], defer.Deferred]],
        clock,
        timeout: float = READY_CHECK_TIMEOUT,
    ) -> None:
        Resource.__init__(self)
        self.checks = checks
        self.clock = clock
        self.timeout = timeout
        self._result: tuple[float, dict] | None = None
        self._waiting: list[defer.Deferred] = []

    def _checked(self) -> defer.Deferred:
        """
        The checks' statuses, shared: concurrent requests wait for one run,
        and a result is reused for C{CACHE_SECONDS} (C{FAILED_CACHE_SECONDS}
        when a check failed), so callers of this public endpoint cannot turn
        it into load on the STS and the stores.
        """
        now = self.clock.seconds()
        if self._result is not None:
            checked_at, statuses = self._result
            failed = any(status != "ok" for status in statuses.values())
            if now - checked_at < (FAILED_CACHE_SECONDS if failed else CACHE_SECONDS):
                return defer.succeed(statuses)
        waiter = defer.Deferred()
        self._waiting.append(waiter)
        if len(self._waiting) == 1:
            names = sorted(self.checks)
            d = defer.gatherResults([self._run(name, self.checks[name]) for name in names])

            def done(results):
                statuses = dict(zip(names, results, strict=True))
                self._result = (self.clock.seconds(), statuses)
                waiting, self._waiting = self._waiting, []
                for each in waiting:
                    each.callback(statuses)

            d.addCallback(done)
        return waiter

    def last_ready(self) -> float:
        """
        1 when the last readiness result was "ready" (or none was asked for
        yet), 0 when a dependency failed: the C{caracal_gateway_ready} gauge.
        Probes (Kubernetes, the load balancer) keep it current.
        """
        if self._result is None:
            return 1.0
        return 0.0 if any(status != "ok" for status in self._result[1].values()) else 1.0

    def _run(self, name: str, check) -> defer.Deferred:
        d = defer.maybeDeferred(check)
        d.addTimeout(self.timeout, self.clock)

        def failed(failure):
            log.warn("readiness check {check} failed: {error}", check=name, error=failure.value)
            return "unavailable"

        return d.addCallbacks(lambda _: "ok", failed)

    def render(self, request):
        def answer(statuses):
            if _gone(request):
                return
            failed = [name for name, status in statuses.items() if status != "ok"]
            document = {"status": "not_ready" if failed else "ready", "checks": statuses}
            if failed:
                document["failed"] = failed
            request.write(_json(request, 503 if failed else 200, document))
            request.finish()

        self._checked().addCallback(answer)
        return NOT_DONE_YET


def bearer_matches(authorization: bytes | None, expected: bytes) -> bool:
    """
    Whether an C{Authorization} header value is C{Bearer <expected>} (the
    scheme in any case). The secret is compared in constant time
    (C{hmac.compare_digest}), so the answer's timing does not tell how much
    of a guess was right.
    """
    scheme, _, credential = (authorization or b"").strip().partition(b" ")
    matched = hmac.compare_digest(credential.strip(), expected)
    return matched and scheme.lower() == b"bearer"


class MetricsResource(Resource):
    """
    C{GET /metrics}: the JSON counters, or the Prometheus exposition when the
    client asks for C{text/plain}. C{snapshot} returns the counters to show
    (this process's, or every worker's summed); C{exposition} the Prometheus
    text and its content type (L{caracal.gateway.metrics.Metrics.exposition}).

    With a C{bearer} (C{METRICS_BEARER}), a request without
    C{Authorization: Bearer <bearer>} gets 401 (the JSON envelope and
    C{WWW-Authenticate}) and no counters.
    """

    isLeaf = True

    def __init__(
        self,
        snapshot: Callable[[], defer.Deferred | dict],
        exposition: Callable[[], tuple[bytes, str]],
        bearer: str | None = None,
    ) -> None:
        Resource.__init__(self)
        self.snapshot = snapshot
        self.exposition = exposition
        self._bearer = bearer.encode("ascii") if bearer is not None else None

    def _refused(self, request) -> bytes | None:
        """The 401 body when a bearer is required and not presented, else C{None}."""
        if self._bearer is None:
            return None
        authorization = request.getHeader(b"authorization")
        if bearer_matches(authorization, self._bearer):
            return None
        _note_denial(request, "metrics_unauthorized")
        if authorization is None:
            return error_body(request, 401, "missing_token", "/metrics requires a bearer token")
        return error_body(request, 401, "invalid_token", "bearer token not accepted")

    def render(self, request):
        refused = self._refused(request)
        if refused is not None:
            return refused
        prometheus = prefers_prometheus(request.getHeader(b"accept") or b"")

        def answer(snapshot):
            if _gone(request):
                return
            request.setHeader(b"cache-control", b"no-store")
            if prometheus:
                text, content_type = self.exposition()
                request.setHeader(b"content-type", content_type.encode("ascii"))
                request.write(text)
            else:
                request.setHeader(b"content-type", b"application/json")
                request.write(render_json(snapshot))
            request.finish()

        def failed(failure):
            log.failure("metrics snapshot failed", failure)
            if not _gone(request):
                request.write(error_body(request, 500, "internal_error", "metrics unavailable"))
                request.finish()

        # The exposition reads no other process: only JSON needs the snapshot.
        source = (lambda: None) if prometheus else self.snapshot
        defer.maybeDeferred(source).addCallback(answer).addErrback(failed)
        return NOT_DONE_YET


class UnexposedResource(Resource):
    """
    A local path not served on this listener (C{/metrics} on the public
    listener when SPEC section 12 keeps it off): 404, the JSON envelope, and
    never the proxy.
    """

    isLeaf = True

    def render(self, request):
        _note_denial(request, "not_found")
        return error_body(request, 404, "not_found", "no such endpoint")


def prefers_prometheus(accept: bytes) -> bool:
    """
    Whether an C{Accept} header asks for the Prometheus text format: its
    C{text/plain} quality is above zero and not below C{application/json}'s
    (Prometheus sends C{text/plain;version=0.0.4;q=0.5,*/*;q=0.1}).
    """
    weights: dict[bytes, float] = {}
    for part in accept.lower().split(b","):
        media, *parameters = part.split(b";")
        weight = 1.0
        for parameter in parameters:
            name, _, value = parameter.strip().partition(b"=")
            if name == b"q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        weights[media.strip()] = weight
    text = weights.get(PROMETHEUS, 0.0)
    return text > 0 and text >= weights.get(JSON, 0.0)
