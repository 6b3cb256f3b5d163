# -*- test-case-name: tests.test_logs -*-
"""
Tests for L{caracal.gateway.logs}: the access-log record and line written by
L{GatewaySite}, and the JSON-lines observer with its level filter.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from io import StringIO

from twisted.logger import FilteringLogObserver, Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway.logs import (
    _LEVELS,
    ACCESS_NAMESPACE,
    LOG_FIELDS,
    access_record,
    format_access_line,
    json_log_observer,
    level_filter,
    level_named,
    utc_timestamp,
)
from tests.test_http import HTTPTestMixin, one_response

CORE_FIELDS = {
    "ts",
    "request_id",
    "method",
    "path",
    "status",
    "bytes_sent",
    "duration_ms",
    "client_ip",
}

TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJlLXNlY3JldA"


class AccessLogTests(HTTPTestMixin, SynchronousTestCase):
    """One JSON line per request, exactly the documented fields, no secrets."""

    def access_lines(self) -> list[str]:
        return [event["access_line"] for event in self.access_events]

    def test_one_line_with_exactly_the_fields(self) -> None:
        """A request gives one access line with exactly the SPEC's fields."""
        self.clock.advance(1_700_000_000)
        channel, transport = self.connect()
        channel.dataReceived(
            b"GET /slow/items?page=2 HTTP/1.1\r\nHost: g\r\nX-Request-Id: log-1\r\n\r\n"
        )
        [request] = self.resource.pending
        request.log_fields.update(resource="res-1", zone="z", token_fingerprint="ab12cd34")
        self.clock.advance(0.25)
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"content-length", b"5")
        request.write(b"hello")
        request.finish()
        self.assertEqual(one_response(transport)[0], 200)

        [line] = self.access_lines()
        record = json.loads(line)
        self.assertEqual(set(record), CORE_FIELDS | set(LOG_FIELDS))
        self.assertEqual(
            {name: record[name] for name in CORE_FIELDS - {"ts"}},
            {
                "request_id": "log-1",
                "method": "GET",
                "path": "/slow/items",
                "status": 200,
                "bytes_sent": 5,
                "duration_ms": 250.0,
                "client_ip": "203.0.113.7",
            },
        )
        self.assertEqual(record["ts"], "2023-11-14T22:13:20.250Z")
        self.assertEqual(record["resource"], "res-1")
        self.assertEqual(record["token_fingerprint"], "ab12cd34")
        self.assertIsNone(record["upstream_host"])
        self.assertNotIn("\n", line)
        self.assertEqual(self.access_events[0]["log_namespace"], ACCESS_NAMESPACE)
        self.assertEqual(self.access_events[0]["log_level"], LogLevel.info)

    def test_no_token_or_query_string_leaks(self) -> None:
        """The access line carries neither the token, the cookies nor the query string."""
        channel, transport = self.connect()
        channel.dataReceived(
            b"GET /items?token=secret&x=1 HTTP/1.1\r\nHost: g\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
            b"Cookie: session=cookie-secret\r\n\r\n"
        )
        self.assertEqual(one_response(transport)[0], 200)
        [line] = self.access_lines()
        for secret in ("secret", TOKEN, "token=", "Bearer", "Authorization", "page", "x=1"):
            self.assertNotIn(secret, line)
        self.assertEqual(json.loads(line)["path"], "/items")

    def test_413_line_names_the_denial(self) -> None:
        """A body refused as too large is logged with its denial and without the query."""
        channel, _ = self.connect()
        channel.dataReceived(
            b"POST /up?key=secret HTTP/1.1\r\nHost: g\r\nContent-Length: 1000\r\n\r\n"
        )
        [line] = self.access_lines()
        record = json.loads(line)
        self.assertEqual(record["status"], 413)
        self.assertEqual(record["denial"], "payload_too_large")
        self.assertEqual(record["path"], "/up")
        self.assertNotIn("secret", line)

    def test_aborted_request_logged(self) -> None:
        """A request whose client left is still logged, once."""
        channel, _ = self.connect()
        channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: g\r\nX-Request-Id: gone\r\n\r\n")
        self.clock.advance(3)
        channel.connectionLost(Failure(ConnectionError("client went away")))
        [line] = self.access_lines()
        record = json.loads(line)
        self.assertEqual(record["request_id"], "gone")
        self.assertEqual(record["status"], 499)
        self.assertTrue(record["aborted"])
        self.assertEqual(record["duration_ms"], 3000.0)

    def test_access_event_through_observer(self) -> None:
        """The access event reaches the JSON observer with its fields."""
        out = StringIO()
        self.site.access_log = Logger(
            namespace=ACCESS_NAMESPACE, observer=json_log_observer(out, "info")
        )
        channel, _ = self.connect()
        channel.dataReceived(b"GET /a?q=secret HTTP/1.1\r\nHost: g\r\nX-Request-Id: obs\r\n\r\n")
        [line] = out.getvalue().splitlines()
        record = json.loads(line)
        self.assertEqual(record["request_id"], "obs")
        self.assertEqual(set(record), CORE_FIELDS | set(LOG_FIELDS))
        self.assertNotIn("secret", out.getvalue())

    def test_format_access_line_compact(self) -> None:
        """An access line is compact JSON."""
        self.assertEqual(format_access_line({"a": 1, "b": None}), '{"a":1,"b":null}')

    def test_pipeline_fields_order_and_extras(self) -> None:
        """
        The record is the core keys, then L{LOG_FIELDS} in their order, then
        any other key of C{log_fields} in its order; a core key in
        C{log_fields} does not override the request's own, whatever order
        C{log_fields} holds its keys in.
        """
        channel, _ = self.connect()
        channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: g\r\nX-Request-Id: order\r\n\r\n")
        [request] = self.resource.pending
        core = ["ts", "request_id", "method", "path", "status"]
        core += ["bytes_sent", "duration_ms", "client_ip"]
        request.log_fields.update(resource="r", upstream_cut="drained", mcp="m")
        record = access_record(request)
        self.assertEqual(list(record), core + list(LOG_FIELDS) + ["upstream_cut", "mcp", "aborted"])
        self.assertEqual((record["resource"], record["upstream_cut"]), ("r", "drained"))
        request.log_fields = {"extra": 1, "zone": "z", "path": "/forged", "resource": "r"}
        record = access_record(request)
        self.assertEqual(list(record), core + list(LOG_FIELDS) + ["extra", "aborted"])
        self.assertEqual((record["path"], record["zone"], record["extra"]), ("/slow", "z", 1))
        self.assertIsNone(record["denial"])
        request.log_fields = dict.fromkeys(LOG_FIELDS, "v")
        request.log_fields["method"] = "FORGED"
        record = access_record(request)
        self.assertEqual(record["method"], "GET")
        self.assertEqual(list(record), core + list(LOG_FIELDS) + ["aborted"])

    def test_access_line_as_json_encodes_it(self) -> None:
        """
        The access line is what C{json.dumps} with compact separators and
        C{default=str} writes, whatever the pipeline put in a field.
        """
        record = {
            "ts": "2024-05-01T12:00:00.123Z",
            "path": '/\u00e9"\\\n\x00\u2028',
            "status": 200,
            "big": 10**30,
            "duration_ms": 0.1 + 0.2,
            "odd": [float("nan"), float("inf"), -float("inf"), -0.0, 1e300],
            "nested": {"a": [1, {"b": None}], 3: True, None: False},
            "other": object,
            "flag": False,
        }
        self.assertEqual(
            format_access_line(record),
            json.dumps(record, separators=(",", ":"), default=str),
        )

    def test_access_record_of_unfinished_request(self) -> None:
        """An unfinished request's record has status 499."""
        channel, _ = self.connect()
        channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: g\r\n\r\n")
        [request] = self.resource.pending
        record = access_record(request)
        self.assertEqual(record["status"], 499)
        self.assertTrue(record["aborted"])


class ObserverTests(SynchronousTestCase):
    """json_log_observer: one JSON object per line, filtered by level."""

    def emit(self, level_name: str, *levels: LogLevel) -> list[dict]:
        out = StringIO()
        log = Logger(namespace="caracal.test", observer=json_log_observer(out, level_name))
        for level in levels:
            log.emit(level, "event at {which}", which=level.name)
        return [json.loads(line) for line in out.getvalue().splitlines()]

    def test_event_shape(self) -> None:
        """Each JSON log entry has exactly ts, level, namespace and msg."""
        [entry] = self.emit("info", LogLevel.info)
        self.assertEqual(set(entry), {"ts", "level", "namespace", "msg"})
        self.assertEqual(entry["level"], "info")
        self.assertEqual(entry["namespace"], "caracal.test")
        self.assertEqual(entry["msg"], "event at info")
        self.assertTrue(entry["ts"].endswith("Z"))

    def test_level_filter(self) -> None:
        """Events below the configured level are dropped."""
        every = (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical)
        self.assertEqual(len(self.emit("debug", *every)), 5)
        self.assertEqual(
            [entry["level"] for entry in self.emit("info", *every)],
            ["info", "warn", "error", "critical"],
        )
        self.assertEqual(
            [entry["level"] for entry in self.emit("warn", *every)], ["warn", "error", "critical"]
        )
        self.assertEqual(
            [entry["level"] for entry in self.emit("error", *every)], ["error", "critical"]
        )

    def test_levels_remembered_and_forgotten_on_change(self) -> None:
        """
        The filter remembers each namespace's level (sub-namespaces of a
        quiet one included) and forgets them all when a level is set.
        """
        predicate = level_filter("info")
        self.assertEqual(predicate.logLevelForNamespace("twisted.web.client.X"), LogLevel.warn)
        self.assertEqual(predicate.logLevelForNamespace("caracal.access"), LogLevel.info)
        self.assertEqual(predicate._levels["caracal.access"], LogLevel.info)
        predicate.setLogLevelForNamespace("caracal", LogLevel.error)
        self.assertEqual(predicate.logLevelForNamespace("caracal.access"), LogLevel.error)
        predicate.clearLogLevels()
        self.assertEqual(predicate.logLevelForNamespace("twisted.web.client.X"), LogLevel.info)

    def test_passes_as_twisted_filters(self) -> None:
        """
        The observer lets through exactly the events Twisted's
        C{FilteringLogObserver} with the same level filter lets through:
        every level in a quiet namespace, its sub-namespaces and others,
        events without a level or namespace, and again once a level changed
        after such events had been decided.
        """
        ours, theirs = [], []
        observer = json_log_observer(StringIO(), "info")
        observer._observer = ours.append
        twisted = FilteringLogObserver(theirs.append, [observer.predicate])
        events = [
            {"log_level": level, "log_namespace": namespace}
            for level in _LEVELS
            for namespace in ("caracal.access", "twisted.web.client", "twisted.web.client.X", "")
        ]
        events += [{"log_namespace": "caracal.access"}, {"log_level": LogLevel.error}, {}]
        events += [{"log_level": None, "log_namespace": "caracal.access"}]
        for change in (None, ("caracal", LogLevel.error), ("twisted.web", LogLevel.debug), "clear"):
            if change == "clear":
                observer.predicate.clearLogLevels()
            elif change is not None:
                observer.predicate.setLogLevelForNamespace(*change)
            del ours[:], theirs[:]
            for event in events:
                observer(event)
                twisted(event)
            self.assertEqual(ours, theirs, change)
            self.assertTrue(0 < len(ours) < len(events), change)

    def test_access_line_encoded_once(self) -> None:
        """
        The line the emitter encoded (GatewaySite.log, the workers' relay) is
        written as is; a record without one is encoded here.
        """
        out = StringIO()
        log = Logger(namespace=ACCESS_NAMESPACE, observer=json_log_observer(out, "info"))
        record = {"request_id": "x", "status": 200}
        log.info("{access_line}", access_line=format_access_line(record), access=record)
        log.info("record only", access={"request_id": "y"})
        self.assertEqual(
            out.getvalue().splitlines(),
            ['{"request_id":"x","status":200}', '{"request_id":"y"}'],
        )

    def test_access_events_filtered_like_others(self) -> None:
        """Access events obey the level filter like every other event."""
        out = StringIO()
        log = Logger(namespace=ACCESS_NAMESPACE, observer=json_log_observer(out, "warn"))
        log.info("{access_line}", access_line="{}", access={"request_id": "x"})
        self.assertEqual(out.getvalue(), "")

    def test_failure_traceback(self) -> None:
        """A logged failure carries its traceback in the entry."""
        out = StringIO()
        log = Logger(namespace="caracal.test", observer=json_log_observer(out, "info"))
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.failure("it broke")
        [entry] = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(entry["level"], "critical")
        self.assertEqual(entry["msg"], "it broke")
        self.assertIn("ZeroDivisionError", entry["traceback"])

    def test_extra_keys_on_every_line(self) -> None:
        """extra (a worker's index) is added to access lines and other events alike."""
        out = StringIO()
        observer = json_log_observer(out, "info", extra={"worker": 3})
        Logger(namespace=ACCESS_NAMESPACE, observer=observer).info(
            "{access_line}", access_line='{"request_id":"x"}', access={"request_id": "x"}
        )
        Logger(namespace="caracal.test", observer=observer).info("hello")
        access, other = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(access, {"request_id": "x", "worker": 3})
        self.assertEqual((other["msg"], other["worker"]), ("hello", 3))

    def test_quiet_namespaces_below_warn(self) -> None:
        """twisted.web.client's info lines are dropped at info, kept at warn and at debug."""
        for level_name, expected in (("info", ["warn"]), ("debug", ["info", "warn"])):
            out = StringIO()
            log = Logger(
                namespace="twisted.web.client._HTTP11ClientFactory",
                observer=json_log_observer(out, level_name),
            )
            log.info("Starting factory")
            log.warn("something worth seeing")
            levels = [json.loads(line)["level"] for line in out.getvalue().splitlines()]
            self.assertEqual(levels, expected, level_name)

    def test_level_named(self) -> None:
        """
        A level is named by its text, in any case, or given as a LogLevel; other names are refused.
        """
        self.assertIs(level_named("WARN"), LogLevel.warn)
        self.assertIs(level_named(LogLevel.error), LogLevel.error)
        self.assertRaises(ValueError, level_named, "loud")


class TimestampTests(SynchronousTestCase):
    """L{utc_timestamp} formats exactly as C{datetime} does, a second at a time."""

    def test_as_datetime(self):
        """Whole seconds, rounding edges and random moments read as datetime's isoformat."""
        moments = [0, 0.0005, 0.0004995, 1_700_000_000.25, 1_700_000_000.9995]
        moments += [1_000_000_000 + edge for edge in (0.9999995, 0.9999994, 0.0000005, 0.0015)]
        moments += [253_402_300_799.999]
        generator = random.Random(14)
        moments += [generator.uniform(0, 4e9) for _ in range(2_000)]
        moments += [1.7e9 + generator.random() for _ in range(2_000)]
        for seconds in moments:
            expected = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
            self.assertEqual(utc_timestamp(seconds), expected.replace("+00:00", "Z"), seconds)

    def test_carry_into_the_next_second(self):
        """A fraction rounding up to a whole second moves to the next second."""
        self.assertEqual(utc_timestamp(1_000_000_000.9999996), "2001-09-09T01:46:41.000Z")
        self.assertEqual(utc_timestamp(1_000_000_000.5), "2001-09-09T01:46:40.500Z")
