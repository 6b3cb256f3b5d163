# -*- test-case-name: tests.integration.test_prometheus -*-
"""
SPEC 15's Prometheus families as an operator scrapes them: a whole gateway
in process (real Postgres, Redis, dev STS, upstream), C{GET /metrics} with
C{Accept: text/plain}, the answer parsed by C{prometheus_client}'s parser.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.support.gateway import GatewayHarness
from tests.support.waiting import wait_until
from tests.test_metrics import SPEC_FAMILIES, value


class PrometheusScrapeTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.gw = GatewayHarness()
        self.addCleanup(self.gw.stop)
        yield self.gw.start()
        self.gw.add_resource()
        yield wait_until(lambda: self.gw.gateway.pipeline.resources.get("tools"))

    @defer.inlineCallbacks
    def scrape(self):
        """GET /metrics as Prometheus does; fires with the parsed families by name."""
        response = yield self.gw.client.get(
            self.gw.base_url + "/metrics",
            headers={b"Accept": [b"text/plain;version=0.0.4;q=0.5,*/*;q=0.1"]},
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"),
            ["text/plain; version=0.0.4; charset=utf-8"],
        )
        text = yield response.text()
        return {family.name: family for family in text_string_to_metric_families(text)}

    @defer.inlineCallbacks
    def call(self, token=None, resource="tools"):
        response = yield self.gw.request(token, resource=resource)
        yield response.content()
        return response.code

    @defer.inlineCallbacks
    def test_everyFamilyFedByRealCalls(self):
        """One allowed and one refused call feed every request-path family of SPEC 15."""
        self.assertEqual((yield self.call(self.gw.mint())), 200)
        self.assertEqual((yield self.call(None)), 401)
        found = yield self.scrape()
        for name, (kind, labels) in SPEC_FAMILIES.items():
            self.assertIn(name, found)
            self.assertEqual(found[name].type, kind, name)
            seen = set()
            for sample in found[name].samples:
                seen |= set(sample.labels) - {"le"}
            self.assertTrue(seen <= labels, (name, seen))
        requests = found["caracal_gateway_requests"]
        self.assertEqual(value(requests, "_total", status_class="2xx", resource="tools"), 1)
        # Refused at step 2, before the resource was looked at.
        self.assertEqual(value(requests, "_total", status_class="4xx", resource="unknown"), 1)
        denials = found["caracal_gateway_denials"]
        self.assertEqual(value(denials, "_total", reason="missing_token"), 1)
        self.assertEqual(
            value(found["caracal_gateway_upstream_duration_seconds"], "_count", resource="tools"),
            1,
        )
        self.assertEqual(value(found["caracal_gateway_sts_exchange_duration_seconds"], "_count"), 1)
        self.assertGreaterEqual(
            value(found["caracal_gateway_jwks_fetches"], "_total", result="ok"), 1
        )
        redis = found["caracal_gateway_redis_command_duration_seconds"]
        self.assertGreaterEqual(value(redis, "_count", command="SET"), 1, "the JTI claim")
        self.assertEqual(value(found["caracal_gateway_resources_loaded"]), 1)
        # The scrape's own, and perhaps a closed call's the server has not yet seen go.
        self.assertGreaterEqual(value(found["caracal_gateway_open_connections"]), 1)
        self.assertEqual(value(found["caracal_gateway_inflight_requests"]), 1, "the scrape")
        self.assertLess(value(found["caracal_gateway_revocation_lag_seconds"]), 10)
        self.assertIn("process_resident_memory_bytes", found)

    @defer.inlineCallbacks
    def test_unknownResourcesCreateNoLabelValues(self):
        """50 calls naming resources that do not exist add no resource label value."""
        token = self.gw.mint(use="ambient")
        self.assertEqual((yield self.call(token)), 200)
        before = yield self.scrape()
        for index in range(50):
            self.assertEqual((yield self.call(token, resource=f"no-such-{index}")), 403)
        after = yield self.scrape()
        for name in (
            "caracal_gateway_requests",
            "caracal_gateway_request_duration_seconds",
            "caracal_gateway_upstream_duration_seconds",
        ):
            labels = {s.labels["resource"] for s in after[name].samples if "resource" in s.labels}
            self.assertTrue(labels <= {"tools", "unknown"}, (name, labels))
        self.assertEqual(
            value(after["caracal_gateway_requests"], "_total", resource="unknown")
            - value(before["caracal_gateway_requests"], "_total", resource="unknown"),
            50,
        )

    @defer.inlineCallbacks
    def test_requestHistogramCountsEveryRequest(self):
        """Allowed, refused and malformed requests: the histogram counts each one."""
        token = self.gw.mint(use="ambient")
        codes = []
        for _ in range(3):
            codes.append((yield self.call(token)))
        codes.append((yield self.call(None)))
        codes.append((yield self.call(token, resource="nope")))
        response = yield self.gw.client.request(
            "TRACE", self.gw.base_url + "/tools/run", headers={b"X-Caracal-Resource": [b"tools"]}
        )
        yield response.content()
        codes.append(response.code)
        found = yield self.scrape()
        histogram = value(found["caracal_gateway_request_duration_seconds"], "_count")
        requests = value(found["caracal_gateway_requests"], "_total")
        self.assertEqual(histogram, len(codes), codes)
        self.assertEqual(requests, len(codes))
        self.assertEqual(self.gw.gateway.metrics.snapshot()["requests_total"], len(codes))
