# -*- test-case-name: tests.integration.test_tracing -*-
"""
SPEC 15's traces as a collector receives them: a whole gateway in process
(real Postgres, Redis, dev STS, upstream) with C{OTEL_EXPORTER_OTLP_ENDPOINT}
pointing at an in-test OTLP/HTTP receiver on 127.0.0.1
(L{tests.support.otlp}), which decodes the spans with C{opentelemetry-proto}.
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from tests.support.gateway import GatewayHarness
from tests.support.otlp import CLIENT, SERVER, OTLPReceiver
from tests.support.process import free_port
from tests.support.waiting import became_true, wait_until

INBOUND_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INBOUND_PARENT = "00f067aa0ba902b7"
INBOUND = f"00-{INBOUND_TRACE}-{INBOUND_PARENT}-01"


class TracingTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def start_gateway(self, endpoint: str):
        self.gw = GatewayHarness(
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_SERVICE_NAME="gw-under-test",
            OTEL_BSP_SCHEDULE_DELAY="50",
        )
        self.addCleanup(self.gw.stop)
        yield self.gw.start()
        self.gw.add_resource()
        yield wait_until(lambda: self.gw.gateway.pipeline.resources.get("tools"))

    @defer.inlineCallbacks
    def call(self, token, resource="tools", traceparent=INBOUND):
        headers = {b"traceparent": [traceparent.encode()]} if traceparent else {}
        response = yield self.gw.request(token, resource=resource, headers=headers)
        yield response.content()
        return response

    @defer.inlineCallbacks
    def test_server_span_with_client_children(self):
        """
        One server span continuing the inbound trace; JWKS, Redis, STS and
        upstream client spans under it; STS and upstream get their span's
        traceparent.
        """
        receiver = OTLPReceiver(reactor).start()
        self.addCleanup(receiver.stop)
        yield self.start_gateway(receiver.endpoint)
        response = yield self.call(self.gw.mint(session_id="s-1"))
        self.assertEqual(response.code, 200)
        request_id = response.headers.getRawHeaders("x-request-id")[0]

        def arrived():
            return len([s for s in receiver.spans if s.trace_id == INBOUND_TRACE]) >= 5

        self.assertTrue((yield became_true(arrived, 10.0)), receiver.spans)
        spans = [s for s in receiver.spans if s.trace_id == INBOUND_TRACE]
        [server] = [s for s in spans if s.kind == SERVER]
        self.assertEqual(server.parent_span_id, INBOUND_PARENT, "the inbound trace continues")
        self.assertEqual(server.service_name, "gw-under-test")
        self.assertEqual(server.attributes["http.request.method"], "POST")
        self.assertEqual(server.attributes["url.path"], "/tools/run")
        self.assertEqual(server.attributes["http.response.status_code"], 200)
        self.assertEqual(server.attributes["caracal.resource"], "tools")
        self.assertEqual(server.attributes["caracal.zone"], self.gw.zone)
        self.assertNotIn("caracal.denial", server.attributes)
        clients = {s.name: s for s in spans if s.kind == CLIENT}
        self.assertEqual(set(clients), {"jwks fetch", "redis SET", "sts exchange", "upstream POST"})
        for span in clients.values():
            self.assertEqual(span.parent_span_id, server.span_id, span.name)
        self.assertEqual(clients["redis SET"].attributes["db.system"], "redis")
        self.assertEqual(clients["upstream POST"].attributes["server.address"], "127.0.0.1")
        self.assertEqual(clients["upstream POST"].attributes["http.response.status_code"], 200)

        [upstream_request] = self.gw.upstream.requests
        [sent] = upstream_request.requestHeaders.getRawHeaders(b"traceparent")
        upstream_span = clients["upstream POST"].span_id
        self.assertEqual(sent.decode(), f"00-{INBOUND_TRACE}-{upstream_span}-01")
        [exchange] = [e for e in self.gw.sts.exchange_log if e.request_id == request_id]
        sts_span = clients["sts exchange"].span_id
        self.assertEqual(exchange.traceparent, f"00-{INBOUND_TRACE}-{sts_span}-01")

    @defer.inlineCallbacks
    def test_refused_call_span_names_the_denial(self):
        """A refused call has its server span, with caracal.denial and no client span."""
        receiver = OTLPReceiver(reactor).start()
        self.addCleanup(receiver.stop)
        yield self.start_gateway(receiver.endpoint)
        response = yield self.call(self.gw.mint(), resource="nope")
        self.assertEqual(response.code, 403)

        def arrived():
            return any(s.trace_id == INBOUND_TRACE for s in receiver.spans)

        self.assertTrue((yield became_true(arrived, 10.0)))
        [server] = [s for s in receiver.spans if s.trace_id == INBOUND_TRACE]
        self.assertEqual(server.kind, SERVER)
        self.assertEqual(server.attributes["caracal.denial"], "access_denied")
        self.assertEqual(server.attributes["http.response.status_code"], 403)

    @defer.inlineCallbacks
    def test_new_trace_without_inbound_traceparent(self):
        """Without an inbound traceparent the upstream still gets its span's, in a new trace."""
        receiver = OTLPReceiver(reactor).start()
        self.addCleanup(receiver.stop)
        yield self.start_gateway(receiver.endpoint)
        response = yield self.call(self.gw.mint(use="ambient"), traceparent=None)
        self.assertEqual(response.code, 200)
        [upstream_request] = self.gw.upstream.requests
        [sent] = upstream_request.requestHeaders.getRawHeaders(b"traceparent")
        _, trace_id, span_id, _ = sent.decode().split("-")

        def arrived():
            return any(s.span_id == span_id for s in receiver.spans)

        self.assertTrue((yield became_true(arrived, 10.0)))
        [span] = [s for s in receiver.spans if s.span_id == span_id]
        self.assertEqual((span.name, span.trace_id), ("upstream POST", trace_id))

    @defer.inlineCallbacks
    def test_collector_down_requests_unaffected(self):
        """With nothing listening at the collector's address, calls pass as usual."""
        yield self.start_gateway(f"http://127.0.0.1:{free_port()}")
        for _ in range(5):
            response = yield self.call(self.gw.mint())
            self.assertEqual(response.code, 200)
        # Stopping flushes towards the dead collector: bounded, it still ends
        # (the trial timeout would fail the test otherwise).
        yield self.gw.gateway.service.stopService()
        del self.gw.gateway  # stopped already
