# -*- test-case-name: tests.test_endpoints -*-
"""/health, /ready and /metrics (SPEC section 10)."""

import json

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from caracal.gateway.endpoints import HealthResource, MetricsResource, ReadyResource
from caracal.gateway.metrics import Metrics


def render(resource, headers=()):
    request = DummyRequest([])
    for name, value in headers:
        request.requestHeaders.addRawHeader(name, value)
    result = resource.render(request)
    if isinstance(result, bytes):
        request.write(result)
        request.finish()
    return request


class EndpointTests(SynchronousTestCase):
    def test_health(self):
        request = render(HealthResource())
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(json.loads(b"".join(request.written)), {"status": "ok"})

    def test_readyWhenAllAnswer(self):
        clock = task.Clock()
        ready = ReadyResource({"postgres": lambda: defer.succeed(None)}, clock)
        request = render(ready)
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(json.loads(b"".join(request.written))["status"], "ready")

    def test_readyNamesWhatFailed(self):
        clock = task.Clock()
        hanging = defer.Deferred()
        ready = ReadyResource(
            {
                "postgres": lambda: defer.succeed(None),
                "redis": lambda: defer.fail(ConnectionRefusedError("redis://:hunter2@10.0.0.1")),
                "sts": lambda: hanging,
            },
            clock,
            timeout=2.0,
        )
        request = render(ready)
        self.assertFalse(request.finished)
        clock.advance(2.0)
        self.assertEqual(request.responseCode, 503)
        body = b"".join(request.written)
        document = json.loads(body)
        self.assertEqual(document["failed"], ["redis", "sts"])
        self.assertEqual(document["checks"]["postgres"], "ok")
        self.assertNotIn(b"hunter2", body)
        self.flushLoggedErrors()

    def test_metricsJsonAndPrometheus(self):
        metrics = Metrics()
        metrics.increment("requests_total")
        resource = MetricsResource(metrics.snapshot)
        as_json = render(resource)
        self.assertEqual(json.loads(b"".join(as_json.written))["requests_total"], 1)
        as_text = render(resource, [(b"accept", b"text/plain")])
        self.assertIn(b"caracal_gateway_requests_total 1\n", b"".join(as_text.written))
        self.assertTrue(
            as_text.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
        )
