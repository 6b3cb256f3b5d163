# -*- test-case-name: tests.test_tracing -*-
"""
OpenTelemetry tracing (SPEC 15): which C{OTEL_*} settings switch it on, and
the spans the pipeline makes, read from the SDK's in-memory exporter. Every
pipeline test of L{tests.test_pipeline} runs again with tracing on, so
tracing is shown not to change what a caller gets.
"""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from twisted.internet import task
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway.config import ConfigError, GatewayConfig
from caracal.gateway.denials import Denial
from caracal.gateway.jwks import JWKSCache
from caracal.gateway.tracing import Tracing, TracingConfigError, TracingSettings
from tests.test_pipeline import PipelineTests

INBOUND_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INBOUND = f"00-{INBOUND_TRACE}-00f067aa0ba902b7-01"


def names_span(traceparent: bytes):
    """The (trace id, span id) a traceparent names (its flags aside), as the span's ids."""
    version, trace_id, span_id, _flags = traceparent.decode().split("-")
    assert version == "00"
    return int(trace_id, 16), int(span_id, 16)


def ids(span):
    """A finished span's (trace id, span id)."""
    return span.context.trace_id, span.context.span_id


class SettingsTests(SynchronousTestCase):
    """TracingSettings.from_environ: the standard variables decide."""

    def test_off_without_variables(self) -> None:
        """No OTEL_* variable: no tracing."""
        self.assertIsNone(TracingSettings.from_environ({}))

    def test_generic_endpoint_gets_the_traces_path(self) -> None:
        """OTEL_EXPORTER_OTLP_ENDPOINT switches it on; /v1/traces is appended."""
        settings = TracingSettings.from_environ(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
        )
        self.assertEqual(settings.endpoint, "http://collector:4318/v1/traces")
        self.assertEqual(settings.service_name, "caracal-gateway")

    def test_traces_endpoint_used_as_is(self) -> None:
        """OTEL_EXPORTER_OTLP_TRACES_ENDPOINT wins and is not altered."""
        settings = TracingSettings.from_environ(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:9999/custom",
                "OTEL_SERVICE_NAME": "edge-gw",
            }
        )
        self.assertEqual(
            (settings.endpoint, settings.service_name), ("http://b:9999/custom", "edge-gw")
        )

    def test_exporter_otlp_alone_uses_the_default_endpoint(self) -> None:
        """OTEL_TRACES_EXPORTER=otlp without an endpoint: the OTLP default."""
        settings = TracingSettings.from_environ({"OTEL_TRACES_EXPORTER": "otlp"})
        self.assertEqual(settings.endpoint, "http://localhost:4318/v1/traces")

    def test_explicitly_off(self) -> None:
        """OTEL_TRACES_EXPORTER=none or OTEL_SDK_DISABLED=true win over an endpoint."""
        endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
        self.assertIsNone(
            TracingSettings.from_environ({**endpoint, "OTEL_TRACES_EXPORTER": "none"})
        )
        self.assertIsNone(TracingSettings.from_environ({**endpoint, "OTEL_SDK_DISABLED": "true"}))

    def test_unknown_exporter_refused(self) -> None:
        """An exporter the gateway does not ship is a startup error naming the variable."""
        with self.assertRaises(TracingConfigError):
            TracingSettings.from_environ({"OTEL_TRACES_EXPORTER": "jaeger"})
        environ = {
            "CARACAL_ENV": "dev",
            "INSECURE_HTTP": "true",
            "INSECURE_STS": "true",
            "STS_URL": "http://127.0.0.1:1",
            "DATABASE_URL": "postgresql://127.0.0.1/x",
            "REDIS_URL": "redis://127.0.0.1:6379/0",
            "OTEL_TRACES_EXPORTER": "zipkin",
        }
        with self.assertRaises(ConfigError) as caught:
            GatewayConfig.from_environ(environ)
        self.assertIn("OTEL_TRACES_EXPORTER", str(caught.exception))
        del environ["OTEL_TRACES_EXPORTER"]
        self.assertIsNone(GatewayConfig.from_environ(environ).tracing)


class ShutdownTests(SynchronousTestCase):
    """Stopping never waits on the collector for longer than its bound."""

    def test_shutdown_bounded(self) -> None:
        """A provider whose shutdown hangs: the Deferred fires at the timeout anyway."""
        import threading

        release = threading.Event()
        self.addCleanup(release.set)

        class StuckProvider(TracerProvider):
            def shutdown(self):
                release.wait(30)

        clock = task.Clock()
        clock.callFromThread = lambda f, *a: None  # the thread never reports back
        d = Tracing(StuckProvider(shutdown_on_exit=False)).shutdown(clock, timeout=2.0)
        self.assertNoResult(d)
        clock.advance(2.0)
        self.assertIsNone(self.successResultOf(d))


class TracedPipelineTests(PipelineTests):
    """Every pipeline test with tracing on, and the spans of a call."""

    def setUp(self):
        super().setUp()
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider(shutdown_on_exit=False)
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracing = Tracing(provider)
        self.pipeline.tracing = self.tracing
        self.pipeline.jwks = JWKSCache(self.tracing.traced_jwks_fetch(self.fetch_jwks), self.clock)

    def spans(self) -> dict:
        return {span.name: span for span in self.exporter.get_finished_spans()}

    def test_forwardedWithMandate(self):
        """As untraced, plus the upstream's traceparent beside the credential."""
        token = self.mint(sid="s-9")
        request = self.call(token=token)
        self.assertEqual(request.responseCode, 200)
        [(pinned, credentials, expires_in, watch)] = self.forwarder.calls
        self.assertEqual(credentials[0], (b"Authorization", b"Bearer mandate-token"))
        [(name, traceparent)] = credentials[1:]
        upstream = self.spans()["upstream POST"]
        self.assertEqual(name, b"traceparent")
        self.assertEqual(names_span(traceparent), ids(upstream))

    def test_spans_of_an_allowed_call(self):
        """Server span continuing the inbound trace; four client children with their attributes."""
        request = self.call(
            token=self.mint(sid="s-1"), headers=[(b"traceparent", INBOUND.encode())]
        )
        self.assertEqual(request.responseCode, 200)
        spans = self.spans()
        self.assertEqual(
            set(spans), {"POST", "jwks fetch", "redis SET", "sts exchange", "upstream POST"}
        )
        server = spans["POST"]
        self.assertEqual(server.kind, SpanKind.SERVER)
        self.assertEqual(f"{server.context.trace_id:032x}", INBOUND_TRACE)
        self.assertEqual(f"{server.parent.span_id:016x}", "00f067aa0ba902b7")
        self.assertEqual(server.attributes["http.request.method"], "POST")
        self.assertEqual(server.attributes["url.path"], "/tools/run")
        self.assertEqual(server.attributes["http.response.status_code"], 200)
        self.assertEqual(server.attributes["caracal.resource"], "tools")
        self.assertEqual(server.attributes["caracal.zone"], "zone-a")
        for name in ("jwks fetch", "redis SET", "sts exchange", "upstream POST"):
            self.assertEqual(spans[name].kind, SpanKind.CLIENT, name)
            self.assertEqual(spans[name].parent.span_id, server.context.span_id, name)
        self.assertEqual(spans["upstream POST"].attributes["server.address"], "tools.example")

    def test_sts_gets_its_span_traceparent(self):
        """The exchange is sent the traceparent of the sts exchange span."""
        sent = []
        exchange = self.sts.exchange

        def recording(*args, **kwargs):
            sent.append(kwargs.get("traceparent"))
            return exchange(*args, **kwargs)

        self.sts.exchange = recording
        self.call(token=self.mint())
        [traceparent] = sent
        self.assertEqual(names_span(traceparent), ids(self.spans()["sts exchange"]))

    def test_denied_call_names_the_denial(self):
        """A refused call: only the server span, with caracal.denial and the status."""
        self.call(token=None)
        [span] = self.exporter.get_finished_spans()
        self.assertEqual(span.attributes["caracal.denial"], "missing_token")
        self.assertEqual(span.attributes["http.response.status_code"], 401)
        self.assertNotIn("caracal.resource", span.attributes)

    def test_failed_client_span_marked_as_error(self):
        """A JWKS fetch that fails ends its span with an error status."""
        self.jwks_down = True
        self.call(token=self.mint())
        span = self.spans()["jwks fetch"]
        self.assertFalse(span.status.is_ok)
        self.flushLoggedErrors()

    def test_client_gone_still_ends_the_span(self):
        """A client that leaves mid-exchange (the exchange is cancelled) ends both spans."""
        self.sts.pending = []
        request = self.call(token=self.mint())
        request.processingFailed(Failure(ConnectionDone("client left")))
        self.assertTrue(self.sts.pending[0].called, "cancelled")
        spans = self.spans()
        self.assertFalse(spans["sts exchange"].status.is_ok)
        self.assertIn("POST", spans)
        self.assertIn("sts exchange", spans)
        self.assertNotIn("upstream POST", spans)

    def test_upstream_failure_marks_its_span(self):
        """An upstream timeout: its span is an error without a status; the server span says 504."""
        self.forwarder.denial = Denial(504, "upstream_timeout", "slow", metric="upstream_errors")
        self.call(token=self.mint())
        spans = self.spans()
        upstream = spans["upstream POST"]
        self.assertFalse(upstream.status.is_ok)
        self.assertNotIn("http.response.status_code", upstream.attributes)
        self.assertEqual(spans["POST"].attributes["http.response.status_code"], 504)
        self.assertEqual(spans["POST"].attributes["caracal.denial"], "upstream_timeout")
