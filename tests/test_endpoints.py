# -*- test-case-name: tests.test_endpoints -*-
"""/health, /ready and /metrics (SPEC section 10)."""

import hmac
import json

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from caracal.gateway.endpoints import (
    HealthResource,
    MetricsResource,
    ReadyResource,
    UnexposedResource,
    bearer_matches,
    prefers_prometheus,
)
from caracal.gateway.metrics import Metrics


def render(resource, headers=()):
    request = DummyRequest([])
    request.request_id = "rid-1"
    request.log_fields = {}
    for name, value in headers:
        request.requestHeaders.addRawHeader(name, value)
    result = resource.render(request)
    if isinstance(result, bytes):
        request.write(result)
        request.finish()
    return request


class EndpointTests(SynchronousTestCase):
    def test_health(self):
        """C{/health} answers 200 C{{"status": "ok"}}."""
        request = render(HealthResource())
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(json.loads(b"".join(request.written)), {"status": "ok"})

    def test_readyWhenAllAnswer(self):
        """C{/ready} answers 200 when every dependency answers."""
        clock = task.Clock()
        ready = ReadyResource({"postgres": lambda: defer.succeed(None)}, clock)
        request = render(ready)
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(json.loads(b"".join(request.written))["status"], "ready")

    def test_readyNamesWhatFailed(self):
        """C{/ready} names each failing or silent dependency without leaking credentials."""
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
        """C{/metrics} answers JSON by default and the Prometheus text format when asked."""
        metrics = Metrics()
        metrics.increment("requests_total")
        metrics.increment("connections_refused")
        resource = MetricsResource(metrics.snapshot, metrics.exposition)
        as_json = render(resource)
        self.assertEqual(json.loads(b"".join(as_json.written))["requests_total"], 1)
        as_text = render(resource, [(b"accept", b"text/plain")])
        self.assertIn(b"caracal_gateway_connections_refused_total 1.0\n", b"".join(as_text.written))
        self.assertEqual(
            as_text.responseHeaders.getRawHeaders(b"content-type"),
            [b"text/plain; version=0.0.4; charset=utf-8"],
        )


class MetricsBearerTests(SynchronousTestCase):
    """C{METRICS_BEARER}: /metrics only for C{Authorization: Bearer <value>} (SPEC 12)."""

    BEARER = "metrics-bearer-0123456789abcdef"

    def setUp(self):
        self.metrics = Metrics()
        self.metrics.increment("requests_total", 5)
        self.resource = MetricsResource(
            self.metrics.snapshot, self.metrics.exposition, bearer=self.BEARER
        )

    def assertRefused(self, request, code):
        """A 401 with the JSON envelope, WWW-Authenticate, and no counters."""
        self.assertEqual(request.responseCode, 401)
        body = b"".join(request.written)
        self.assertEqual(
            json.loads(body),
            {"error": code, "description": json.loads(body)["description"], "request_id": "rid-1"},
        )
        self.assertNotIn(b"requests_total", body)
        self.assertNotIn(self.BEARER.encode(), body)
        self.assertTrue(
            request.responseHeaders.getRawHeaders(b"www-authenticate")[0].startswith(b"Bearer")
        )
        self.assertEqual(request.log_fields["denial"], "metrics_unauthorized")

    def test_missing_bearer_refused(self):
        """No Authorization header: 401 missing_token."""
        self.assertRefused(render(self.resource), "missing_token")

    def test_wrong_bearer_refused(self):
        """A wrong value, a prefix of the right one, another scheme: 401 invalid_token."""
        for value in (
            b"Bearer wrong",
            b"Bearer " + self.BEARER[:-1].encode(),
            b"Bearer " + self.BEARER.encode() + b"x",
            b"Basic " + self.BEARER.encode(),
            self.BEARER.encode(),
            b"Bearer",
        ):
            request = render(self.resource, [(b"authorization", value)])
            self.assertRefused(request, "invalid_token")

    def test_right_bearer_served(self):
        """The right bearer (scheme in any case) reads the counters, JSON or Prometheus."""
        for scheme in (b"Bearer", b"bearer", b"BEARER"):
            request = render(
                self.resource, [(b"authorization", scheme + b" " + self.BEARER.encode())]
            )
            # DummyRequest leaves responseCode None for the implicit 200.
            self.assertIsNone(request.responseCode)
            self.assertEqual(json.loads(b"".join(request.written))["requests_total"], 5)
        request = render(
            self.resource,
            [
                (b"authorization", b"Bearer " + self.BEARER.encode()),
                (b"accept", b"text/plain"),
            ],
        )
        self.assertIn(b"# TYPE caracal_gateway_requests_total counter", b"".join(request.written))

    def test_compare_uses_compare_digest(self):
        """The secret is compared with C{hmac.compare_digest} (constant time)."""
        compared = []
        real = hmac.compare_digest

        def spy(a, b):
            compared.append((a, b))
            return real(a, b)

        self.patch(hmac, "compare_digest", spy)
        self.assertTrue(bearer_matches(b"Bearer abc", b"abc"))
        self.assertFalse(bearer_matches(b"Bearer abd", b"abc"))
        self.assertEqual(compared, [(b"abc", b"abc"), (b"abd", b"abc")])

    def test_without_bearer_open(self):
        """No METRICS_BEARER: /metrics answers without Authorization (dev, METRICS_ADDRESS)."""
        request = render(MetricsResource(self.metrics.snapshot, self.metrics.exposition))
        self.assertIsNone(request.responseCode)
        self.assertEqual(json.loads(b"".join(request.written))["requests_total"], 5)


class UnexposedTests(SynchronousTestCase):
    def test_not_found_envelope(self):
        """A local path kept off a listener is a 404 JSON envelope, named in the access log."""
        request = render(UnexposedResource())
        self.assertEqual(request.responseCode, 404)
        self.assertEqual(
            json.loads(b"".join(request.written)),
            {"error": "not_found", "description": "no such endpoint", "request_id": "rid-1"},
        )
        self.assertEqual(request.log_fields["denial"], "not_found")


class ReadyLoadTests(SynchronousTestCase):
    """/ready is public: callers must not be able to multiply checks."""

    def setUp(self):
        self.clock = task.Clock()
        self.calls = 0
        self.pending = []

        def check():
            self.calls += 1
            d = defer.Deferred()
            self.pending.append(d)
            return d

        self.ready = ReadyResource({"sts": check}, self.clock)

    def test_concurrentRequestsShareOneRun(self):
        """Concurrent readiness requests share one run of the checks."""
        requests = [render(self.ready) for _ in range(5)]
        self.assertEqual(self.calls, 1)
        self.pending[0].callback(None)
        self.assertEqual([r.responseCode for r in requests], [200] * 5)

    def test_lastReadyFollowsTheLastResult(self):
        """last_ready (the caracal_gateway_ready gauge) is 1, then 0 after a failed check."""
        self.assertEqual(self.ready.last_ready(), 1.0)
        render(self.ready)
        self.pending[0].callback(None)
        self.assertEqual(self.ready.last_ready(), 1.0)
        self.clock.advance(1.0)
        render(self.ready)
        self.pending[1].errback(ConnectionRefusedError("down"))
        self.assertEqual(self.ready.last_ready(), 0.0)

    def test_resultReusedForASecond(self):
        """A readiness result is reused for a second, then the checks run again."""
        render(self.ready)
        self.pending[0].callback(None)
        self.clock.advance(0.9)
        self.assertEqual(render(self.ready).responseCode, 200)
        self.assertEqual(self.calls, 1)
        self.clock.advance(0.1)
        render(self.ready)
        self.assertEqual(self.calls, 2)

    def test_failedResultReusedForAQuarterSecond(self):
        """
        A failing result is reused for less time, so a dependency back in
        service is seen quickly (SPEC 12: /ready 200 within 2 s of it), yet a
        caller still cannot run the checks more than four times a second.
        """
        render(self.ready)
        self.pending[0].errback(ConnectionRefusedError("down"))
        self.clock.advance(0.2)
        self.assertEqual(render(self.ready).responseCode, 503)
        self.assertEqual(self.calls, 1)
        self.clock.advance(0.05)
        request = render(self.ready)
        self.assertEqual(self.calls, 2)
        self.pending[1].callback(None)
        self.assertEqual(request.responseCode, 200)
        self.flushLoggedErrors()


class MetricsFailureTests(SynchronousTestCase):
    def test_failedSnapshotAnswers500(self):
        """A failing metrics snapshot is a JSON 500, logged, and the request finished."""
        request = DummyRequest([])
        request.request_id = "rid-9"
        MetricsResource(lambda: 1 / 0, lambda: (b"", "text/plain")).render(request)
        self.assertEqual(request.responseCode, 500)
        self.assertEqual(json.loads(b"".join(request.written))["error"], "internal_error")
        self.assertTrue(request.finished)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class AcceptTests(SynchronousTestCase):
    def test_table(self):
        """
        The Accept header picks the Prometheus format only when text/plain is acceptable and
        preferred.
        """
        for accept, prometheus in (
            (b"", False),
            (b"text/plain", True),
            (b"application/json", False),
            (b"text/plain;version=0.0.4;q=0.5,*/*;q=0.1", True),
            (b"application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5", True),
            (b"text/plain;q=0, application/json", False),
            (b"application/json, text/plain;q=0.5", False),
            (b"text/html,application/xhtml+xml,*/*;q=0.8", False),
            (b"TEXT/PLAIN", True),
            (b"text/plain;q=bogus", False),
        ):
            self.assertEqual(prefers_prometheus(accept), prometheus, accept)
