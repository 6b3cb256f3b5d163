# -*- test-case-name: tests.test_metrics -*-
"""
The JSON counters of SPEC section 10 and the Prometheus families of SPEC
section 15, read back through C{prometheus_client}'s own parser.
"""

import json
import math

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway.metrics import (
    BUCKETS,
    CONTENT_TYPE,
    HISTOGRAMS,
    MAX_LABEL_VALUES,
    PROMETHEUS_COUNTERS,
    PROMETHEUS_GAUGES,
    Metrics,
    _incrementer,
    _observer,
    merge_snapshots,
    render_json,
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

#: SPEC 15's families (as the parser names them: counters without C{_total})
#: and their label names.
SPEC_FAMILIES = {
    "caracal_gateway_requests": ("counter", {"status_class", "resource"}),
    "caracal_gateway_denials": ("counter", {"reason"}),
    "caracal_gateway_request_duration_seconds": ("histogram", {"resource"}),
    "caracal_gateway_sts_exchange_duration_seconds": ("histogram", set()),
    "caracal_gateway_upstream_duration_seconds": ("histogram", {"resource"}),
    "caracal_gateway_redis_command_duration_seconds": ("histogram", {"command"}),
    "caracal_gateway_open_connections": ("gauge", set()),
    "caracal_gateway_inflight_requests": ("gauge", set()),
    "caracal_gateway_resources_loaded": ("gauge", set()),
    "caracal_gateway_revocations_active": ("gauge", set()),
    "caracal_gateway_revocation_lag_seconds": ("gauge", set()),
    "caracal_gateway_audit_spool_bytes": ("gauge", set()),
    "caracal_gateway_connections_refused": ("counter", set()),
    "caracal_gateway_audit_events_suppressed": ("counter", set()),
    "caracal_gateway_audit_events_dropped": ("counter", set()),
    "caracal_gateway_jwks_fetches": ("counter", {"result"}),
    "caracal_gateway_build_info": ("gauge", {"version"}),
    # Not in SPEC 15's list: what the "gateway not ready" alert watches.
    "caracal_gateway_ready": ("gauge", set()),
}


def families(metrics: Metrics) -> dict:
    """The exposition of C{metrics}, parsed: family name -> family."""
    text, _ = metrics.exposition()
    return {family.name: family for family in text_string_to_metric_families(text.decode())}


def samples(family, suffix: str = "", **labels) -> list:
    """The samples of C{family} named C{<family><suffix>} whose labels include C{labels}."""
    return [
        sample
        for sample in family.samples
        if sample.name == family.name + suffix
        and all(sample.labels.get(k) == v for k, v in labels.items())
    ]


def value(family, suffix: str = "", **labels) -> float:
    """The sum of the matching samples' values."""
    return sum(sample.value for sample in samples(family, suffix, **labels))


class JSONCountersTests(SynchronousTestCase):
    """SPEC 10's JSON counters stay exactly as they were."""

    def test_jsonHasExactlyTheSpecNames(self):
        """The JSON document has SPEC 10's names (and revocations_rejected), all zero."""
        document = json.loads(render_json(Metrics().snapshot()))
        self.assertEqual(
            sorted(document),
            sorted(
                [
                    *SPEC_NAMES,
                    "revocations_rejected",
                    "connections_refused",
                    "audit_events_suppressed",
                    "audit_events_dropped",
                ]
            ),
        )
        self.assertEqual(set(document.values()), {0})

    def test_incrementAndGauge(self):
        """increment adds, gauge reads its callable at snapshot time."""
        metrics = Metrics()
        metrics.increment("requests_total")
        metrics.increment("requests_total", 2)
        metrics.gauge("bindings_loaded", lambda: 7)
        document = json.loads(render_json(metrics.snapshot()))
        self.assertEqual(document["requests_total"], 3)
        self.assertEqual(document["bindings_loaded"], 7)

    def test_unknownCounterRefused(self):
        """A name that is neither a JSON nor a Prometheus counter is a KeyError."""
        self.assertRaises(KeyError, Metrics().increment, "no_such_counter")
        self.assertRaises(KeyError, Metrics().gauge, "no_such_gauge", lambda: 1)

    def test_mergeSumsWorkers(self):
        """merge_snapshots sums every counter of several processes."""
        a, b = Metrics(), Metrics()
        a.increment("requests_total", 2)
        b.increment("requests_total", 3)
        merged = merge_snapshots([a.snapshot(), b.snapshot()])
        self.assertEqual(merged["requests_total"], 5)


class ExpositionTests(SynchronousTestCase):
    """SPEC 15's families through prometheus_client's parser."""

    def test_everyFamilyAndLabel(self):
        """Every family of SPEC 15 is exposed with its type and label names."""
        metrics = Metrics(version="9.9.9")
        metrics.known_resources = lambda name: name == "tools"
        metrics.request_done(200, "tools", 0.01)
        metrics.request_done(401, "tools", 0.002, denial="missing_token")
        metrics.observe("sts_exchange_duration_seconds", 0.003)
        metrics.observe("upstream_duration_seconds", 0.004, resource="tools")
        metrics.observe("redis_command_duration_seconds", 0.0005, command="set")
        metrics.increment("jwks_fetches", result="ok")
        for name in ("connections_refused", "audit_events_suppressed", "audit_events_dropped"):
            metrics.increment(name)
        for name in PROMETHEUS_GAUGES:
            metrics.gauge(name, lambda: 4)
        found = families(metrics)
        for name, (kind, labels) in SPEC_FAMILIES.items():
            self.assertIn(name, found)
            family = found[name]
            self.assertEqual(family.type, kind, name)
            seen = set()
            for sample in family.samples:
                seen |= set(sample.labels) - {"le"}
            self.assertEqual(seen, labels, name)
        self.assertEqual(value(found["caracal_gateway_build_info"], version="9.9.9"), 1)
        self.assertEqual(value(found["caracal_gateway_revocation_lag_seconds"]), 4)
        self.assertEqual(
            value(found["caracal_gateway_redis_command_duration_seconds"], "_count", command="SET"),
            1,
        )
        self.assertIn("process_cpu_seconds", found, "the process collector")

    def test_everyDeclaredFamilyIsSpecs(self):
        """The declaration tables and the SPEC list agree (nothing declared and unlisted)."""
        declared = {f"caracal_gateway_{name}" for name in (*HISTOGRAMS, *PROMETHEUS_GAUGES)}
        declared |= {f"caracal_gateway_{name}" for name in PROMETHEUS_COUNTERS}
        declared |= {
            "caracal_gateway_requests",
            "caracal_gateway_denials",
            "caracal_gateway_build_info",
        }
        self.assertEqual(declared, set(SPEC_FAMILIES))

    def test_contentType(self):
        """The exposition is the 0.0.4 text format every Prometheus reads."""
        self.assertEqual(Metrics().exposition()[1], CONTENT_TYPE)
        self.assertTrue(CONTENT_TYPE.startswith("text/plain; version=0.0.4"))

    def test_requestDoneFeedsCountHistogramAndDenials(self):
        """Each finished request counts once in requests_total and the histogram."""
        metrics = Metrics()
        metrics.known_resources = lambda name: name == "tools"
        metrics.request_done(200, "tools", 0.02)
        metrics.request_done(503, "tools", 0.5, denial="sts_unavailable")
        metrics.request_done(499, None, 0.1)
        found = families(metrics)
        requests = found["caracal_gateway_requests"]
        self.assertEqual(value(requests, "_total", status_class="2xx", resource="tools"), 1)
        self.assertEqual(value(requests, "_total", status_class="5xx", resource="tools"), 1)
        self.assertEqual(value(requests, "_total", status_class="4xx", resource="unknown"), 1)
        histogram = found["caracal_gateway_request_duration_seconds"]
        self.assertEqual(value(histogram, "_count"), 3)
        self.assertEqual(value(histogram, "_bucket", resource="tools", le="0.025"), 1)
        denials = found["caracal_gateway_denials"]
        self.assertEqual(value(denials, "_total", reason="sts_unavailable"), 1)

    def test_repeatedObservationsKeepTheirLabels(self):
        """
        Observing again with the same labels lands in the same series; a
        resource label follows the resource table as it changes, and a
        command past the label bound stays C{other}.
        """
        metrics = Metrics()
        metrics.observe("upstream_duration_seconds", 0.004, resource="tools")
        metrics.known_resources = lambda name: name == "tools"
        metrics.observe("upstream_duration_seconds", 0.004, resource="tools")
        for index in range(MAX_LABEL_VALUES + 2):
            for _ in range(2):
                metrics.observe("redis_command_duration_seconds", 0.001, command=f"c{index}")
        found = families(metrics)
        upstream = found["caracal_gateway_upstream_duration_seconds"]
        self.assertEqual(value(upstream, "_count", resource="unknown"), 1)
        self.assertEqual(value(upstream, "_count", resource="tools"), 1)
        redis = found["caracal_gateway_redis_command_duration_seconds"]
        self.assertEqual(value(redis, "_count", command="C0"), 2)
        self.assertEqual(value(redis, "_count", command="other"), 4)

    def test_unknownResourcesShareOneLabel(self):
        """Names not in the resource table all land on resource="unknown"."""
        metrics = Metrics()
        metrics.known_resources = lambda name: name == "tools"
        for index in range(50):
            metrics.request_done(403, f"made-up-{index}", 0.001, denial="access_denied")
            metrics.observe("upstream_duration_seconds", 0.001, resource=f"made-up-{index}")
        found = families(metrics)
        for name in ("caracal_gateway_requests", "caracal_gateway_upstream_duration_seconds"):
            resources = {s.labels["resource"] for s in found[name].samples}
            self.assertEqual(resources, {"unknown"}, name)

    def test_freeFormLabelsBounded(self):
        """reason takes MAX_LABEL_VALUES well-formed values at most, then "other"."""
        metrics = Metrics()
        for index in range(MAX_LABEL_VALUES + 20):
            metrics.request_done(400, None, 0.001, denial=f"reason_{index}")
        metrics.request_done(400, None, 0.001, denial="not a label value!")
        reasons = {s.labels["reason"] for s in families(metrics)["caracal_gateway_denials"].samples}
        self.assertEqual(len(reasons), MAX_LABEL_VALUES + 1)
        self.assertIn("other", reasons)

    def test_countedGauges(self):
        """open_connections and inflight_requests move with add()."""
        metrics = Metrics()
        metrics.add("open_connections", 1)
        metrics.add("open_connections", 1)
        metrics.add("open_connections", -1)
        metrics.add("inflight_requests", 1)
        found = families(metrics)
        self.assertEqual(value(found["caracal_gateway_open_connections"]), 1)
        self.assertEqual(value(found["caracal_gateway_inflight_requests"]), 1)

    def test_bindingsLoadedFeedsResourcesLoaded(self):
        """The JSON bindings_loaded gauge's reader also feeds resources_loaded."""
        metrics = Metrics()
        metrics.gauge("bindings_loaded", lambda: 3)
        self.assertEqual(value(families(metrics)["caracal_gateway_resources_loaded"]), 3)

    def test_registriesIndependent(self):
        """Two gateways in one process count apart (no global registry)."""
        a, b = Metrics(), Metrics()
        a.increment("connections_refused", 5)
        self.assertEqual(value(families(b)["caracal_gateway_connections_refused"], "_total"), 0)
        self.assertEqual(value(families(a)["caracal_gateway_connections_refused"], "_total"), 5)


class FastPathTests(SynchronousTestCase):
    """
    The request path writes C{prometheus_client}'s values without its
    per-call checks and bucket walk (L{_observer}, L{_incrementer}): what a
    scrape reads is what the library's own C{observe} and C{inc} give.
    """

    AMOUNTS = (
        list(BUCKETS)
        + [bound * 0.999 for bound in BUCKETS]
        + [bound * 1.001 for bound in BUCKETS]
        + [0, 0.0, -0.5, 7, 31.0, 1e9, math.inf, -math.inf, math.nan]
    )

    def reference(self, amounts) -> dict:
        """The bucket counts and sum the library's own observe gives C{amounts}."""
        histogram = Histogram("reference", "", registry=CollectorRegistry(), buckets=BUCKETS)
        for amount in amounts:
            histogram.observe(amount)
        return self.buckets(histogram.collect()[0], "reference")

    def buckets(self, family, name: str, **labels) -> dict:
        found = {}
        for sample in family.samples:
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                if sample.name == name + "_bucket":
                    found[sample.labels["le"]] = sample.value
                elif sample.name == name + "_sum":
                    found["sum"] = repr(sample.value)
        return found

    def test_observationsLandWhereTheLibraryPutsThem(self):
        """
        Every amount, on a bucket bound, either side of one, zero, negative,
        infinite or NaN, lands in the bucket (and the sum) where
        C{Histogram.observe} puts it, with and without labels.
        """
        expected = self.reference(self.AMOUNTS)
        library = Histogram("laid_out", "", registry=CollectorRegistry(), buckets=BUCKETS)
        self.assertNotEqual(_observer(library), library.observe, "the fast path is not taken")
        metrics = Metrics()
        metrics.known_resources = lambda name: name == "tools"
        for amount in self.AMOUNTS:
            metrics.observe("sts_exchange_duration_seconds", amount)
            metrics.observe("redis_command_duration_seconds", amount, command="get")
            metrics.observe("upstream_duration_seconds", amount, resource="tools")
            metrics.request_done(200, "tools", amount)
        by_name = {family.name: family for family in metrics.registry.collect()}
        for name, labels in (
            ("sts_exchange_duration_seconds", {}),
            ("redis_command_duration_seconds", {"command": "GET"}),
            ("upstream_duration_seconds", {"resource": "tools"}),
            ("request_duration_seconds", {"resource": "tools"}),
        ):
            family = by_name["caracal_gateway_" + name]
            self.assertEqual(self.buckets(family, family.name, **labels), expected, (name, labels))

    def test_countedGaugeGoesBothWays(self):
        """A counted gauge takes negative and fractional steps, as C{Gauge.inc} does."""
        metrics = Metrics()
        for delta in (1, 1, -1, 0.5, -2):
            metrics.add("audit_spool_bytes", delta)
        self.assertEqual(value(families(metrics)["caracal_gateway_audit_spool_bytes"]), -0.5)

    def test_fallsBackToThePublicMethods(self):
        """A metric not laid out as expected is fed through its own C{observe} or C{inc}."""
        calls = []

        class Opaque:
            def observe(self, amount):
                calls.append(("observe", amount))

            def inc(self, amount):
                calls.append(("inc", amount))

        _observer(Opaque())(0.5)
        _incrementer(Opaque())(2)
        self.assertEqual(calls, [("observe", 0.5), ("inc", 2)])
