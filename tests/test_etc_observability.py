# -*- test-case-name: tests.test_etc_observability -*-
"""
The example Prometheus alert rules and Grafana dashboard in C{etc/} name
only series the gateway exports, with label names those series have.
"""

from __future__ import annotations

import json
import os
import re

import yaml
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway.metrics import PROMETHEUS_GAUGES, Metrics

ETC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")
RULES = os.path.join(ETC, "prometheus", "caracal-gateway-alerts.yml")
DASHBOARD = os.path.join(ETC, "grafana", "caracal-gateway-dashboard.json")

#: Series Prometheus itself adds to every scrape.
PROMETHEUS_OWN = {"up": {"job", "instance"}}
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
#: Alerts the issue asks for, by what they watch.
REQUIRED_ALERTS = (
    "HighDenialRate",
    "STSErrors",
    "UpstreamErrors",
    "RevocationLag",
    "AuditSpoolGrowing",
    "NotReady",
)

_SERIES = re.compile(r"\b((?:caracal_gateway|process)_[a-z0-9_]+|up)\b(\{[^}]*\})?")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def exported() -> dict[str, set[str]]:
    """Every sample name a gateway exports, with its label names (one of each fed)."""
    metrics = Metrics()
    metrics.known_resources = lambda name: True
    metrics.request_done(200, "tools", 0.01, denial="x")
    for name in ("sts_exchange_duration_seconds",):
        metrics.observe(name, 0.01)
    metrics.observe("upstream_duration_seconds", 0.01, resource="tools")
    metrics.observe("redis_command_duration_seconds", 0.01, command="SET")
    for name in ("connections_refused", "audit_events_suppressed", "audit_events_dropped"):
        metrics.increment(name)
    metrics.increment("jwks_fetches", result="ok")
    for name in PROMETHEUS_GAUGES:
        metrics.gauge(name, lambda: 1)
    metrics.refresh()
    names: dict[str, set[str]] = dict(PROMETHEUS_OWN)
    for family in metrics.registry.collect():
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def expressions_of_rules() -> list[str]:
    with open(RULES, encoding="utf-8") as f:
        document = yaml.safe_load(f)
    return [rule["expr"] for group in document["groups"] for rule in group["rules"]]


def expressions_of_dashboard() -> list[str]:
    with open(DASHBOARD, encoding="utf-8") as f:
        document = json.load(f)
    found = [target["expr"] for panel in document["panels"] for target in panel["targets"]]
    for variable in document["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            found.append(query["query"])
    return found


class ExampleFilesTests(SynchronousTestCase):
    """etc/prometheus and etc/grafana against what /metrics exports."""

    def setUp(self) -> None:
        self.exported = exported()

    def assertOnlyExported(self, expressions: list[str]) -> None:
        self.assertTrue(expressions)
        for expression in expressions:
            series = _SERIES.findall(expression)
            self.assertTrue(series, expression)
            used_labels: set[str] = set()
            for name, matchers in series:
                self.assertIn(name, self.exported, f"{name} in {expression!r}")
                labels = set(_MATCHER.findall(matchers))
                allowed = self.exported[name] | TARGET_LABELS
                self.assertTrue(labels <= allowed, f"{labels - allowed} on {name}")
                used_labels |= allowed
            for grouping in _GROUPING.findall(expression):
                for label in filter(None, (part.strip() for part in grouping.split(","))):
                    self.assertIn(label, used_labels | {"le"}, f"by ({label}) in {expression!r}")

    def test_alert_rules_name_exported_series(self) -> None:
        """Every alert expression uses exported series and their labels."""
        self.assertOnlyExported(expressions_of_rules())

    def test_alert_rules_cover_the_issue(self) -> None:
        """Denials, STS, upstream, revocation lag, audit spool and readiness are alerted on."""
        with open(RULES, encoding="utf-8") as f:
            document = yaml.safe_load(f)
        alerts = [rule["alert"] for group in document["groups"] for rule in group["rules"]]
        for wanted in REQUIRED_ALERTS:
            self.assertTrue(any(wanted in alert for alert in alerts), wanted)

    def test_dashboard_names_exported_series(self) -> None:
        """Every dashboard query uses exported series and their labels."""
        self.assertOnlyExported(expressions_of_dashboard())

    def test_checker_catches_a_typo(self) -> None:
        """The check fails on a series or a label the gateway does not export."""
        with self.assertRaises(self.failureException):
            self.assertOnlyExported(["rate(caracal_gateway_request_total[5m])"])
        with self.assertRaises(self.failureException):
            self.assertOnlyExported(['caracal_gateway_denials_total{resource="x"}'])
