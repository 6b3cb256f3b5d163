"""
A tiny OTLP/HTTP trace receiver on 127.0.0.1 for the tracing tests: it
decodes each C{POST /v1/traces} with C{opentelemetry-proto} and keeps the
spans.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from twisted.web.resource import Resource
from twisted.web.server import Site

#: OTLP's SpanKind numbers.
SERVER, CLIENT = 2, 3


@dataclass
class ReceivedSpan:
    """One span as the collector got it (ids in lowercase hex)."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict
    service_name: str | None


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class _Traces(Resource):
    isLeaf = True

    def __init__(self, receiver: OTLPReceiver) -> None:
        Resource.__init__(self)
        self.receiver = receiver

    def render_POST(self, request):
        body = request.content.read()
        if request.getHeader(b"content-encoding") == b"gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        self.receiver.posts += 1
        for resource_spans in message.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.receiver.spans.append(
                        ReceivedSpan(
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            service_name=resource.get("service.name"),
                        )
                    )
        request.setHeader(b"content-type", b"application/x-protobuf")
        return ExportTraceServiceResponse().SerializeToString()


class OTLPReceiver:
    """Start with L{start} (fires nothing: listening is synchronous), stop with L{stop}."""

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.spans: list[ReceivedSpan] = []
        self.posts = 0
        self.port = None

    def start(self) -> OTLPReceiver:
        root = Resource()
        v1 = Resource()
        root.putChild(b"v1", v1)
        v1.putChild(b"traces", _Traces(self))
        self.port = self.reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        return self

    @property
    def endpoint(self) -> str:
        """The value for C{OTEL_EXPORTER_OTLP_ENDPOINT}."""
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def stop(self):
        return self.port.stopListening()
