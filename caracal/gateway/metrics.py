# -*- test-case-name: tests.test_metrics -*-
"""
The counters and latency histograms of SPEC section 10, rendered as JSON or
in the Prometheus text exposition format.
"""

from __future__ import annotations

import json
from bisect import bisect_left

from zope.interface import implementer

from caracal.gateway.interfaces import IMetrics

COUNTERS = (
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
    "revocations_rejected",
)

GAUGES = ("bindings_loaded", "revocations_active")

HISTOGRAMS = {
    "request_duration_seconds": "Whole proxied request, first byte in to last byte out",
    "sts_exchange_duration_seconds": "STS token exchange",
    "upstream_duration_seconds": "Upstream request until response headers",
}

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """Cumulative-bucket latency histogram (seconds)."""

    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        """Record one observation."""
        self.counts[bisect_left(self.buckets, seconds)] += 1
        self.total += seconds
        self.count += 1

    def snapshot(self) -> dict[str, object]:
        """Non-cumulative counts per upper bound (the last one is +Inf)."""
        return {"buckets": list(self.counts), "sum": self.total, "count": self.count}


@implementer(IMetrics)
class Metrics:
    """
    The process's counters. Gauges are read from callables at render time so
    they are always current (the resource snapshot size, the revocations held).
    """

    def __init__(self) -> None:
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.gauges = {name: (lambda: 0) for name in GAUGES}
        self.histograms = {name: Histogram() for name in HISTOGRAMS}

    def increment(self, name: str, amount: int = 1) -> None:
        """Add C{amount} to counter C{name}."""
        self.counters[name] += amount

    def observe(self, name: str, seconds: float) -> None:
        """Record a latency in histogram C{name}."""
        self.histograms[name].observe(seconds)

    def gauge(self, name: str, read) -> None:
        """Make gauge C{name} report C{read()}."""
        self.gauges[name] = read

    def snapshot(self) -> dict[str, object]:
        """Counters and gauges as one flat dict, histograms under C{histograms}."""
        values: dict[str, object] = dict(self.counters)
        for name, read in self.gauges.items():
            values[name] = int(read())
        values["histograms"] = {
            name: histogram.snapshot() for name, histogram in self.histograms.items()
        }
        return values


def merge_snapshots(snapshots: list[dict]) -> dict[str, object]:
    """Sum several processes' snapshots into one (counters, gauges, histograms)."""
    merged: dict[str, object] = dict.fromkeys(COUNTERS + GAUGES, 0)
    histograms = {
        name: {"buckets": [0] * (len(BUCKETS) + 1), "sum": 0.0, "count": 0} for name in HISTOGRAMS
    }
    for snapshot in snapshots:
        for name in COUNTERS + GAUGES:
            merged[name] += int(snapshot.get(name, 0))
        for name, histogram in snapshot.get("histograms", {}).items():
            if name not in histograms:
                continue
            target = histograms[name]
            target["buckets"] = [
                a + b for a, b in zip(target["buckets"], histogram["buckets"], strict=True)
            ]
            target["sum"] += histogram["sum"]
            target["count"] += histogram["count"]
    merged["histograms"] = histograms
    return merged


def render_json(snapshot: dict) -> bytes:
    """The JSON counters of SPEC section 10 (histograms omitted)."""
    flat = {name: snapshot[name] for name in COUNTERS + GAUGES}
    return json.dumps(flat, sort_keys=True).encode("utf-8") + b"\n"


def render_prometheus(snapshot: dict) -> bytes:
    """The same snapshot in the Prometheus text format, version 0.0.4."""
    lines = []
    for name in COUNTERS:
        lines.append(f"# TYPE caracal_gateway_{name} counter")
        lines.append(f"caracal_gateway_{name} {snapshot[name]}")
    for name in GAUGES:
        lines.append(f"# TYPE caracal_gateway_{name} gauge")
        lines.append(f"caracal_gateway_{name} {snapshot[name]}")
    for name, help_text in HISTOGRAMS.items():
        histogram = snapshot["histograms"][name]
        full = f"caracal_gateway_{name}"
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} histogram")
        cumulative = 0
        for bound, count in zip((*BUCKETS, float("inf")), histogram["buckets"], strict=True):
            cumulative += count
            label = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{full}_bucket{{le="{label}"}} {cumulative}')
        lines.append(f"{full}_sum {histogram['sum']!r}")
        lines.append(f"{full}_count {histogram['count']}")
    return ("\n".join(lines) + "\n").encode("utf-8")
