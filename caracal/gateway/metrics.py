# -*- test-case-name: tests.test_metrics -*-
"""
The gateway's metrics: the JSON counters of SPEC section 10 and the
Prometheus families of SPEC section 15, fed through one object.

Call sites speak one small API whatever they feed:

 - C{metrics.increment(name, amount=1, **labels)}: a JSON counter of
   L{COUNTERS} and/or a Prometheus counter of L{PROMETHEUS_COUNTERS}
   (C{connections_refused}, C{audit_events_dropped}, ...);
 - C{metrics.observe(name, seconds, **labels)}: a latency histogram of
   L{HISTOGRAMS};
 - C{metrics.gauge(name, read)}: a gauge read from C{read()} when exposed;
   C{metrics.add(name, delta)} for the gauges kept by counting
   (open connections, requests in flight);
 - C{metrics.request_done(status, resource, seconds, denial)}: one finished
   request (L{caracal.gateway.http.GatewaySite.log} calls it for every
   request the pipeline saw).

The Prometheus side uses C{prometheus_client} with a registry of its own
per gateway (never the library's global one), so two gateways in one test
process do not share series. Label sets are bounded: C{resource} only takes
names the resource table holds (L{Metrics.known_resources}), C{unknown}
otherwise; C{reason} and C{command} take at most L{MAX_LABEL_VALUES}
values, C{other} after that.

Workers (C{--workers N}): the supervisor gives every worker the same
C{PROMETHEUS_MULTIPROC_DIR}, so C{prometheus_client} keeps each worker's
values in memory-mapped files there, and L{Metrics.exposition} answers with
every worker's series merged (its C{MultiProcessCollector}).
"""

from __future__ import annotations

import json
import math
import os
import re
from bisect import bisect_left
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from twisted.logger import Logger
from zope.interface import implementer

from caracal.gateway.interfaces import IMetrics

log = Logger()

#: The JSON counters of SPEC section 10 (C{revocations_rejected} is extra).
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
    "connections_refused",
    "audit_events_suppressed",
    "audit_events_dropped",
)

#: The JSON gauges of SPEC section 10.
GAUGES = ("bindings_loaded", "revocations_active")

PREFIX = "caracal_gateway_"

#: Histograms (SPEC 15): name -> (help, label names).
HISTOGRAMS = {
    "request_duration_seconds": (
        "Whole request, first byte in to last byte out",
        ("resource",),
    ),
    "sts_exchange_duration_seconds": ("STS token exchange", ()),
    "upstream_duration_seconds": ("Upstream request until response headers", ("resource",)),
    "redis_command_duration_seconds": ("One Redis command, sent to reply", ("command",)),
}

#: Prometheus-only counters (SPEC 15): the name call sites increment -> (help, label names).
#: The exposed family is C{caracal_gateway_<name>_total}.
PROMETHEUS_COUNTERS = {
    "connections_refused": ("Client connections closed at once: MAX_CONNECTIONS reached", ()),
    "audit_events_suppressed": ("Repeated audit events left out (counted in the next one)", ()),
    "audit_events_dropped": ("Audit events dropped: the spool was full", ()),
    "jwks_fetches": ("JWKS fetches from the STS, by result (ok, error)", ("result",)),
}

#: Gauges (SPEC 15): name -> (help, how workers' values combine).
#: C{livesum}: each worker holds its own part; C{livemax}: each worker holds
#: a copy of the same state (the largest is the most pessimistic).
PROMETHEUS_GAUGES = {
    "open_connections": ("Open client connections", "livesum"),
    "inflight_requests": (
        "Requests whose headers are in and whose answer is not finished",
        "livesum",
    ),
    "resources_loaded": ("Rows of the resource table held in memory", "livemax"),
    "revocations_active": ("Revoked sessions held in memory", "livemax"),
    "revocation_lag_seconds": (
        "Seconds since the revocation follower last heard from Redis",
        "livemax",
    ),
    "audit_spool_bytes": ("Bytes of audit events waiting in the local spool", "livesum"),
    "ready": ("1 when the last /ready answer was 200, 0 when it was 503", "livemin"),
}

#: A JSON gauge that also feeds a Prometheus gauge of another name.
_GAUGE_ALIASES = {"bindings_loaded": "resources_loaded"}

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: Distinct values a free-form label (C{reason}, C{command}) may take.
MAX_LABEL_VALUES = 64
UNKNOWN = "unknown"
OTHER = "other"

_LABEL_VALUE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

#: The text format every Prometheus version reads (the names here need nothing newer).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The environment variable C{prometheus_client} reads its multiprocess directory from.
MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("caracal-gateway")
    except Exception:
        return UNKNOWN


def _incrementer(metric) -> Callable[[float], None]:
    """
    C{metric.inc} for a counter's child or a gauge that nothing else sets,
    without what C{prometheus_client} checks on every call (that the metric
    is not a labelled parent, the gauge's mode, an exemplar): adds C{amount}
    to the very value C{inc} adds it to, under its lock (and, with workers,
    to its memory-mapped file). For the request path only, where the
    amount is known to be right (a counter's is never negative).
    """
    value = getattr(metric, "_value", None)
    inc = getattr(value, "inc", None)
    return inc if callable(inc) else metric.inc


def _observer(histogram) -> Callable[[float], None]:
    """
    C{histogram.observe} (a histogram without labels, or a child) without its
    per-call checks and its bucket search in Python: the bucket is found by
    C{bisect} (C{prometheus_client} walks the bounds until C{amount <= bound},
    which is the bisection's C{bisect_left}), then the sum and that bucket are
    added to in C{prometheus_client}'s own order and values. NaN, which falls
    in no bucket there, is left to the library. Falls back to C{observe}
    when the histogram is not laid out as expected.
    """
    observe = histogram.observe
    try:
        add_sum = histogram._sum.inc
        add_bucket = [bucket.inc for bucket in histogram._buckets]
        bounds = tuple(float(bound) for bound in histogram._upper_bounds)
    except (AttributeError, TypeError, ValueError):
        return observe
    if not bounds or len(add_bucket) != len(bounds) or bounds[-1] != math.inf:
        return observe

    def fast_observe(amount: float) -> None:
        if amount != amount:
            observe(amount)
            return
        add_sum(amount)
        add_bucket[bisect_left(bounds, amount)](1)

    return fast_observe


class _BoundedLabel:
    """A label's values: the first C{limit} well-formed ones, then C{other}."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value) -> str:
        value = str(value)
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit or not _LABEL_VALUE.fullmatch(value):
            return OTHER
        self.seen.add(value)
        return value


@implementer(IMetrics)
class Metrics:
    """
    One gateway's metrics (see the module docstring).

    @ivar counters: the JSON counters.
    @ivar registry: the Prometheus registry this gateway's families live in.
    @ivar known_resources: C{known_resources(name) -> bool}, whether C{name}
        is in the resource table; until set every resource is C{unknown}.
    """

    def __init__(self, multiprocess_dir: str | None = None, version: str | None = None) -> None:
        """
        @param multiprocess_dir: the workers' shared directory; by default
            C{PROMETHEUS_MULTIPROC_DIR} when set (C{prometheus_client} then
            writes every value there, whatever is passed here).
        """
        if multiprocess_dir is None:
            multiprocess_dir = os.environ.get(MULTIPROC_VARIABLE) or None
        self.multiprocess_dir = multiprocess_dir
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.gauges: dict[str, Callable[[], float]] = {name: (lambda: 0) for name in GAUGES}
        self._prometheus_readers: dict[str, Callable[[], float]] = {}
        self.known_resources: Callable[[str], bool] = lambda name: False
        self._reasons = _BoundedLabel()
        self._commands = _BoundedLabel()
        self._others = _BoundedLabel()
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self._requests = Counter(
            PREFIX + "requests",
            "Requests to the pipeline, by status class and resource",
            ("status_class", "resource"),
            registry=registry,
        )
        self._denials = Counter(
            PREFIX + "denials",
            "Refused or failed requests, by reason",
            ("reason",),
            registry=registry,
        )
        self._histograms = {
            name: Histogram(PREFIX + name, text, labels, registry=registry, buckets=BUCKETS)
            for name, (text, labels) in HISTOGRAMS.items()
        }
        self._counters = {
            name: Counter(PREFIX + name, text, labels, registry=registry)
            for name, (text, labels) in PROMETHEUS_COUNTERS.items()
        }
        self._gauges = {
            name: Gauge(PREFIX + name, text, registry=registry, multiprocess_mode=mode)
            for name, (text, mode) in PROMETHEUS_GAUGES.items()
        }
        build = Gauge(
            PREFIX + "build_info",
            "The running version (always 1)",
            ("version",),
            registry=registry,
            multiprocess_mode="livemax",
        )
        build.labels(version=version or _version()).set(1)
        if multiprocess_dir is None:
            ProcessCollector(registry=registry)
        # What the request path calls, found once: each histogram's and
        # each child's observe (L{_observer}), each counted gauge's and each
        # request counter child's inc (L{_incrementer}).
        self._plain_observers = {
            name: _observer(histogram) for name, histogram in self._histograms.items()
        }
        self._adders = {name: _incrementer(gauge) for name, gauge in self._gauges.items()}
        self._status_children: dict[tuple[str, str], Callable[[float], None]] = {}
        self._duration_children: dict[str, Callable[[float], None]] = {}
        self._children: dict[tuple, object] = {}
        self._child_observers: dict[tuple, Callable[[float], None]] = {}
        self._observed: dict[tuple, Callable[[float], None]] = {}

    # -- the call sites' API ----------------------------------------------------

    def increment(self, name: str, amount: int = 1, **labels) -> None:
        """
        Add C{amount} to counter C{name}: the JSON counter of that name
        and/or the Prometheus counter of L{PROMETHEUS_COUNTERS}.

        @raise KeyError: C{name} is neither.
        """
        found = False
        if name in self.counters:
            self.counters[name] += amount
            found = True
        counter = self._counters.get(name)
        if counter is not None:
            if labels:
                counter = self._child(name, counter, self._bounded(labels))
            counter.inc(amount)
            found = True
        if not found:
            raise KeyError(name)

    def observe(self, name: str, seconds: float, **labels) -> None:
        """
        Record a latency in histogram C{name} (L{HISTOGRAMS}); a C{resource}
        label not in the resource table is recorded as C{unknown}.
        """
        if not labels:
            self._plain_observers[name](seconds)
            return
        # Each Redis command is timed: its child is found from the raw label
        # values in one lookup. Not for "resource", whose label changes with
        # the resource table; the others' bounded values never change.
        key = (name, *labels.items())
        try:
            observe = self._observed.get(key)
        except TypeError:  # an unhashable label value: bounded as a string below
            key, observe = None, None
        if observe is None:
            observe = self._child_observer(name, self._bounded(labels))
            if key is not None and "resource" not in labels and len(self._observed) < 1024:
                self._observed[key] = observe
        observe(seconds)

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """
        Make gauge C{name} report C{read()}: a JSON gauge of L{GAUGES} and/or
        a Prometheus gauge of L{PROMETHEUS_GAUGES} (C{bindings_loaded} feeds
        C{resources_loaded} too).
        """
        found = False
        if name in self.gauges:
            self.gauges[name] = read
            found = True
        prometheus = _GAUGE_ALIASES.get(name, name)
        if prometheus in self._gauges:
            self._prometheus_readers[prometheus] = read
            found = True
        if not found:
            raise KeyError(name)

    def add(self, name: str, delta: float) -> None:
        """Move gauge C{name} (L{PROMETHEUS_GAUGES}) by C{delta}."""
        self._adders[name](delta)

    def request_done(
        self, status: int, resource: str | None, seconds: float, denial: str | None = None
    ) -> None:
        """
        One request has finished (or its client left): C{requests_total},
        C{request_duration_seconds} and, when refused or failed,
        C{denials_total}.
        """
        label = self.resource_label(resource)
        status_class = f"{status // 100}xx" if 100 <= status < 600 else OTHER
        key = (status_class, label)
        count = self._status_children.get(key)
        if count is None:
            count = _incrementer(self._requests.labels(status_class, label))
            self._status_children[key] = count
        count(1)
        duration = self._duration_children.get(label)
        if duration is None:
            duration = _observer(self._histograms["request_duration_seconds"].labels(label))
            self._duration_children[label] = duration
        duration(seconds)
        if denial:
            self._denials.labels(self._reasons(denial)).inc()

    def resource_label(self, name: str | None) -> str:
        """C{name} when the resource table holds it, else C{unknown}."""
        if name and self.known_resources(name):
            return name
        return UNKNOWN

    # -- reading ------------------------------------------------------------------

    def refresh(self) -> None:
        """Set the read-on-demand Prometheus gauges from their readers."""
        for name, read in self._prometheus_readers.items():
            try:
                value = float(read())
            except Exception:
                # A broken reader must not take the whole scrape down.
                log.failure("gauge {gauge} could not be read", gauge=name)
            else:
                self._gauges[name].set(value)

    def exposition(self) -> tuple[bytes, str]:
        """
        The Prometheus text exposition and its content type: this process's
        families, or every worker's merged in multiprocess mode.
        """
        self.refresh()
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiprocess_dir)
        # The process collector describes the answering worker only.
        ProcessCollector(registry=merged)
        return generate_latest(merged), CONTENT_TYPE

    def snapshot(self) -> dict[str, object]:
        """The JSON counters and gauges as one flat dict."""
        values: dict[str, object] = dict(self.counters)
        for name, read in self.gauges.items():
            values[name] = int(read())
        return values

    # -- labels ---------------------------------------------------------------------

    def _child(self, name: str, family, labels: dict):
        # prometheus_client's labels() costs several microseconds a call;
        # the label values are bounded, so their children are kept.
        key = (name, *labels.items())
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(**labels)
        return child

    def _child_observer(self, name: str, labels: dict) -> Callable[[float], None]:
        # The observe of histogram name's child for these (bounded) labels.
        key = (name, *labels.items())
        observe = self._child_observers.get(key)
        if observe is None:
            child = self._child(name, self._histograms[name], labels)
            observe = self._child_observers[key] = _observer(child)
        return observe

    def _bounded(self, labels: dict) -> dict:
        bounded = {}
        for key, value in labels.items():
            if key == "resource":
                bounded[key] = self.resource_label(value)
            elif key == "command":
                bounded[key] = self._commands(str(value).upper())
            elif key == "reason":
                bounded[key] = self._reasons(value)
            else:
                bounded[key] = self._others(value)
        return bounded


def merge_snapshots(snapshots: list[dict]) -> dict[str, object]:
    """Sum several processes' JSON snapshots into one."""
    merged: dict[str, object] = dict.fromkeys(COUNTERS + GAUGES, 0)
    for snapshot in snapshots:
        for name in COUNTERS + GAUGES:
            merged[name] += int(snapshot.get(name, 0))
    return merged


def render_json(snapshot: dict) -> bytes:
    """The JSON counters of SPEC section 10."""
    flat = {name: snapshot[name] for name in COUNTERS + GAUGES}
    return json.dumps(flat, sort_keys=True).encode("utf-8") + b"\n"
