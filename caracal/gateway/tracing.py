# -*- test-case-name: tests.test_tracing -*-
"""
OpenTelemetry tracing (SPEC section 15), switched on by the standard
variables: C{OTEL_EXPORTER_OTLP_ENDPOINT} (or
C{OTEL_EXPORTER_OTLP_TRACES_ENDPOINT}) set, or C{OTEL_TRACES_EXPORTER=otlp};
C{OTEL_TRACES_EXPORTER=none} or C{OTEL_SDK_DISABLED=true} keep it off.

One server span per proxied request continues the inbound C{traceparent};
the pipeline opens client spans under it for the JWKS fetch, the Redis JTI
claim, the STS exchange and the upstream request, and the STS and the
upstream receive the C{traceparent} of their own span.

Spans are handed to the SDK's C{BatchSpanProcessor}, which exports them
(OTLP over HTTP) from a thread of its own: ending a span on the reactor
thread only appends it to a bounded queue. An unreachable collector costs
the spans that do not fit in that queue, nothing else. Disabled, the
pipeline pays one C{is None} test per step and the SDK is not even imported.

The spans are passed explicitly (Deferred callbacks do not carry
C{contextvars} from one reactor turn to the next); only the JWKS fetch,
which starts inside the key cache, finds its parent as the current span
(L{Tracing.current}) set around the synchronous call that may start it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger

log = Logger()

DEFAULT_SERVICE_NAME = "caracal-gateway"
DEFAULT_ENDPOINT = "http://localhost:4318"
TRACES_PATH = "/v1/traces"

#: How long a stopping gateway waits for the last spans to leave.
SHUTDOWN_TIMEOUT = 2.0

_TRUE = ("1", "t", "T", "TRUE", "true", "True")


class TracingConfigError(ValueError):
    """An C{OTEL_*} variable the gateway cannot honour."""


@dataclass(frozen=True)
class TracingSettings:
    """
    The C{OTEL_*} variables the gateway reads (the SDK and the exporter read
    the others themselves: C{OTEL_TRACES_SAMPLER}, C{OTEL_EXPORTER_OTLP_HEADERS},
    C{OTEL_EXPORTER_OTLP_TIMEOUT}, C{OTEL_BSP_*}, ...).

    @ivar endpoint: the full traces URL (C{.../v1/traces}).
    """

    service_name: str = DEFAULT_SERVICE_NAME
    endpoint: str = DEFAULT_ENDPOINT + TRACES_PATH
    schedule_delay_ms: float | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> TracingSettings | None:
        """
        The settings when tracing is on, else C{None}.

        @raise TracingConfigError: C{OTEL_TRACES_EXPORTER} names an exporter
            other than C{otlp} or C{none}, or C{OTEL_BSP_SCHEDULE_DELAY} is
            not a number.
        """
        if (environ.get("OTEL_SDK_DISABLED") or "").strip() in _TRUE:
            return None
        exporter = (environ.get("OTEL_TRACES_EXPORTER") or "").strip().lower()
        if exporter not in ("", "otlp", "none"):
            raise TracingConfigError("OTEL_TRACES_EXPORTER must be otlp or none")
        traces = (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or "").strip()
        generic = (environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip()
        if exporter == "none" or (exporter == "" and not (traces or generic)):
            return None
        endpoint = traces or (generic or DEFAULT_ENDPOINT).rstrip("/") + TRACES_PATH
        delay = (environ.get("OTEL_BSP_SCHEDULE_DELAY") or "").strip()
        try:
            schedule_delay_ms = float(delay) if delay else None
        except ValueError:
            raise TracingConfigError("OTEL_BSP_SCHEDULE_DELAY must be milliseconds") from None
        name = (environ.get("OTEL_SERVICE_NAME") or "").strip() or DEFAULT_SERVICE_NAME
        return cls(service_name=name, endpoint=endpoint, schedule_delay_ms=schedule_delay_ms)


class Tracing:
    """
    The gateway's tracer: starts and ends the spans of SPEC 15 and writes
    the C{traceparent} of a span for an outbound request.
    """

    def __init__(self, provider, propagator=None) -> None:
        """
        @param provider: an SDK C{TracerProvider} (with its span processor).
        """
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("caracal.gateway")
        self._trace = trace
        self._propagator = propagator or TraceContextTextMapPropagator()

    @classmethod
    def from_settings(cls, settings: TracingSettings) -> Tracing:
        """A tracer exporting in batches, over OTLP/HTTP, to C{settings.endpoint}."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # shutdown_on_exit=False: the SDK's atexit hook would wait for an
        # unreachable collector for as long as its export timeout; the
        # gateway bounds that itself (L{shutdown}).
        provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            shutdown_on_exit=False,
        )
        processor = BatchSpanProcessor(
            OTLPSpanExporter(endpoint=settings.endpoint),
            schedule_delay_millis=settings.schedule_delay_ms,
        )
        provider.add_span_processor(processor)
        return cls(provider)

    # -- spans ----------------------------------------------------------------------

    def start_request(self, request):
        """
        The server span of a proxied request, continuing its inbound
        C{traceparent} (and C{tracestate}) when valid.
        """
        from opentelemetry.trace import SpanKind

        carrier = {}
        for name in (b"traceparent", b"tracestate"):
            values = request.requestHeaders.getRawHeaders(name)
            if values and len(values) == 1:
                carrier[name.decode("ascii")] = values[0].decode("latin-1")
        parent = self._propagator.extract(carrier) if carrier else None
        method = (request.method or b"").decode("ascii", "replace")
        return self.tracer.start_span(
            method or "HTTP",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": (request.path or b"").decode("ascii", "replace"),
            },
        )

    def end_request(self, span, request, resource=None) -> None:
        """
        End the server span of C{request} with what the pipeline learnt: the
        status, the resource and zone (when the resource was found) and the
        denial reason (when refused).
        """
        from opentelemetry.trace import Status, StatusCode

        status = getattr(request, "code", None)
        if status is None:  # twisted.web's test double
            status = getattr(request, "responseCode", None)
        if isinstance(status, int):
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
        if resource is not None:
            span.set_attribute("caracal.resource", resource.resource_identifier)
            span.set_attribute("caracal.zone", resource.zone_id)
        denial = (getattr(request, "log_fields", None) or {}).get("denial")
        if denial:
            span.set_attribute("caracal.denial", str(denial))
        span.end()

    def start_client(self, name: str, parent, attributes: dict | None = None):
        """A client span named C{name} under the span C{parent}."""
        from opentelemetry.trace import SpanKind

        return self.tracer.start_span(
            name,
            context=self._trace.set_span_in_context(parent),
            kind=SpanKind.CLIENT,
            attributes=attributes or {},
        )

    def end_client(self, span, result):
        """End C{span} when an outbound call is done (an errback-safe C{addBoth})."""
        from opentelemetry.trace import Status, StatusCode
        from twisted.python.failure import Failure

        if isinstance(result, Failure):
            span.set_status(Status(StatusCode.ERROR, result.getErrorMessage()[:200]))
        span.end()
        return result

    def traced(self, d: defer.Deferred, span) -> defer.Deferred:
        """End C{span} when C{d} fires, whatever its result."""
        return d.addBoth(lambda result: self.end_client(span, result))

    def traceparent(self, span) -> bytes:
        """The W3C C{traceparent} naming C{span}, for an outbound request."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        return carrier.get("traceparent", "").encode("ascii")

    @contextlib.contextmanager
    def current(self, span):
        """Make C{span} the current span for a synchronous call (see the module docstring)."""
        with self._trace.use_span(span, end_on_exit=False):
            yield

    def traced_jwks_fetch(self, fetch):
        """
        Wrap C{fetch(zone_id) -> Deferred} (the STS client's JWKS fetch) in a
        client span under the current span, when there is one.
        """

        def traced_fetch(zone_id: str) -> defer.Deferred:
            parent = self._trace.get_current_span()
            if not parent.get_span_context().is_valid:
                return fetch(zone_id)
            span = self.start_client("jwks fetch", parent, {"caracal.zone": zone_id})
            return self.traced(defer.maybeDeferred(fetch, zone_id), span)

        return traced_fetch

    # -- lifetime ---------------------------------------------------------------------

    def shutdown(self, clock, timeout: float = SHUTDOWN_TIMEOUT) -> defer.Deferred:
        """
        Flush and stop the exporter from a thread of its own; fires once it
        is done or after C{timeout} seconds, whichever comes first (an
        unreachable collector must not hold the drain).
        """
        done = defer.Deferred()

        def finished() -> None:
            if not done.called:
                done.callback(None)

        def run() -> None:
            try:
                self.provider.shutdown()
            except Exception:
                log.failure("tracing shutdown failed")
            clock.callFromThread(finished)

        threading.Thread(target=run, name="caracal-tracing-shutdown", daemon=True).start()
        timer = clock.callLater(timeout, finished)
        return done.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
