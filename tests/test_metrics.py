# -*- test-case-name: tests.test_metrics -*-
"""Counters, histograms and their two renderings (SPEC section 10)."""

import json

from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway.metrics import (
    BUCKETS,
    COUNTERS,
    GAUGES,
    Metrics,
    merge_snapshots,
    render_json,
    render_prometheus,
)

SPEC_NAMES = [
    "requests_total",
    "requests_allowed",
    "requests_denied",
    "denials_missing_auth",
    "denials_bad_bearer",
    "denials_expiring",
    "denials_bad_routing",
    "denials_binding",
    "denials_path_traversal",
    "denials_signature",
    "denials_jti_replay",
    "denials_revoked",
    "sts_exchange_errors",
    "upstream_errors",
    "bindings_loaded",
    "revocations_active",
]


class MetricsTests(SynchronousTestCase):
    def test_jsonHasExactlyTheSpecNames(self):
        document = json.loads(render_json(Metrics().snapshot()))
        self.assertEqual(sorted(document), sorted([*SPEC_NAMES, "revocations_rejected"]))
        self.assertEqual(set(document.values()), {0})

    def test_incrementAndGauge(self):
        metrics = Metrics()
        metrics.increment("requests_total")
        metrics.increment("requests_total", 2)
        metrics.gauge("bindings_loaded", lambda: 7)
        document = json.loads(render_json(metrics.snapshot()))
        self.assertEqual(document["requests_total"], 3)
        self.assertEqual(document["bindings_loaded"], 7)

    def test_unknownCounterRefused(self):
        self.assertRaises(KeyError, Metrics().increment, "no_such_counter")

    def test_histogramBuckets(self):
        metrics = Metrics()
        for seconds in (0.0005, 0.003, 0.003, 100.0):
            metrics.observe("upstream_duration_seconds", seconds)
        histogram = metrics.snapshot()["histograms"]["upstream_duration_seconds"]
        self.assertEqual(histogram["count"], 4)
        self.assertEqual(histogram["buckets"][0], 1)
        self.assertEqual(histogram["buckets"][BUCKETS.index(0.005)], 2)
        self.assertEqual(histogram["buckets"][-1], 1)

    def test_prometheusFormat(self):
        metrics = Metrics()
        metrics.increment("denials_revoked")
        metrics.observe("request_duration_seconds", 0.02)
        text = render_prometheus(metrics.snapshot()).decode()
        self.assertIn("# TYPE caracal_gateway_denials_revoked counter\n", text)
        self.assertIn("caracal_gateway_denials_revoked 1\n", text)
        self.assertIn("# TYPE caracal_gateway_revocations_active gauge\n", text)
        self.assertIn('caracal_gateway_request_duration_seconds_bucket{le="0.01"} 0\n', text)
        self.assertIn('caracal_gateway_request_duration_seconds_bucket{le="0.025"} 1\n', text)
        self.assertIn('caracal_gateway_request_duration_seconds_bucket{le="+Inf"} 1\n', text)
        self.assertIn("caracal_gateway_request_duration_seconds_count 1\n", text)
        for name in COUNTERS + GAUGES:
            self.assertIn(f"\ncaracal_gateway_{name} ", "\n" + text)

    def test_mergeSumsWorkers(self):
        a, b = Metrics(), Metrics()
        a.increment("requests_total", 2)
        b.increment("requests_total", 3)
        a.observe("sts_exchange_duration_seconds", 0.01)
        b.observe("sts_exchange_duration_seconds", 0.01)
        merged = merge_snapshots([a.snapshot(), b.snapshot()])
        self.assertEqual(merged["requests_total"], 5)
        self.assertEqual(merged["histograms"]["sts_exchange_duration_seconds"]["count"], 2)
