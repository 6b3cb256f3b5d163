"""Reading a gateway's Prometheus series back in tests."""

from __future__ import annotations


def sample_sum(metrics, sample_name: str, **labels) -> float:
    """
    The sum of C{metrics}' (a L{caracal.gateway.metrics.Metrics}) samples
    named C{sample_name} whose labels include C{labels}, over every series.
    """
    total = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == sample_name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


def upstream_observations(metrics) -> int:
    """How many upstream latencies C{metrics} recorded."""
    return int(sample_sum(metrics, "caracal_gateway_upstream_duration_seconds_count"))
