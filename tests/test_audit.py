"""Tests for L{caracal.gateway.audit} that need no Redis."""

from __future__ import annotations

import json
import os

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from caracal.gateway.audit import (
    _DATA_ENCODER,
    RedisAuditLog,
    ReplayEventThrottle,
    audit_event,
    rfc3339,
)
from caracal.gateway.interfaces import IAuditLog
from caracal.gateway.metrics import Metrics
from caracal.gateway.revocations import verify_fields
from caracal.gateway.spool import AuditSpool
from caracal.gateway.testing import MemoryAuditLog
from tests.test_replay import claim_pool

KEY = bytes(range(32))


class FakeRedis:
    """Records commands; answers with C{reply} (a value or an exception)."""

    def __init__(self, reply="1-0"):
        self.reply = reply
        self.commands = []

    def execute_command(self, *arguments):
        self.commands.append(arguments)
        if isinstance(self.reply, Exception):
            return defer.fail(self.reply)
        if isinstance(self.reply, defer.Deferred):
            return self.reply
        return defer.succeed(self.reply)


class AuditEventTests(unittest.SynchronousTestCase):
    """The C{data} document."""

    def test_rfc3339(self):
        """Timestamps are RFC 3339 UTC with milliseconds."""
        self.assertEqual(rfc3339(1_700_000_000.25), "2023-11-14T22:13:20.250Z")

    def test_core_fields_win(self):
        """Metadata cannot override the core fields."""
        event = audit_event("replay_detected", "r-1", "deny", 0, {"decision": "allow", "zone": "z"})
        self.assertEqual(event["decision"], "deny")
        self.assertEqual(event["zone"], "z")
        self.assertEqual(event["occurred_at"], "1970-01-01T00:00:00.000Z")

    def test_credentials_redacted(self):
        """Metadata named like a credential never reaches the event."""
        event = audit_event("x", "r", "deny", 0, {"access_token": "eyJsecret", "Token": "t"})
        self.assertEqual(event["access_token"], "[redacted]")
        self.assertEqual(event["Token"], "[redacted]")
        self.assertNotIn("eyJsecret", json.dumps(event))


class _Named:
    """A value the JSON encoder only knows through C{default=str}."""

    def __str__(self):
        return "named \u00e9"


class _Count(int):
    pass


class EncodedDataTests(unittest.SynchronousTestCase):
    """
    The C{data} text L{RedisAuditLog} writes member by member is, for every
    kind of metadata, exactly C{_DATA_ENCODER.encode(audit_event(...))}:
    the document the tests above pin, encoded with sorted keys.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000.123)
        self.log = RedisAuditLog(FakeRedis(), None, self.clock)

    def assertSameText(self, metadata):
        expected = _DATA_ENCODER.encode(
            audit_event("gateway_call", "r-1", "allow", self.clock.seconds(), dict(metadata))
        )
        # As emit() writes it: from its own **metadata dict.
        fields = self.log._fields("gateway_call", "r-1", "allow", dict(metadata))
        self.assertEqual(fields["data"], expected)
        self.assertEqual(json.loads(expected)["request_id"], "r-1")

    def test_gateway_call(self):
        """The fields of a gateway_call event, twice (the second time from the kept plan)."""
        metadata = {
            "reason": None,
            "zone_id": "zone-a",
            "application_id": "app",
            "resource": "https://tool.example/",
            "method": "POST",
            "path": "/v1/x",
            "status": 200,
            "upstream_host": "tool.example",
            "sts_ms": 1.234,
            "upstream_ms": 0.5,
            "duration_ms": 3.0,
            "bytes_in": 0,
            "bytes_out": 26,
            "sub": "agent",
            "sid": None,
            "token_fingerprint": "abcdef012345",
            "mcp_method": "tools/call",
        }
        self.assertSameText(metadata)
        self.assertSameText(metadata)

    def test_values_of_every_kind(self):
        """Strings to escape, numbers, bools, nested values, specials, default=str."""
        self.assertSameText(
            {
                "quote": 'a "b" \\ c\n\u2603 \U0001f600 \udcff',
                "true": True,
                "false": False,
                "negative": -7,
                "big": 10**30,
                "subclass": _Count(3),
                "float": 1e-7,
                "nan": float("nan"),
                "infinite": float("inf"),
                "minus_infinite": float("-inf"),
                "nested": {"b": [1, 2.5, None], "a": {"z": "\u00e9"}},
                "tuple": (1, "two"),
                "object": _Named(),
                "string_subclass": type("S", (str,), {})("s"),
            }
        )

    def test_names(self):
        """Core fields win, credentials are redacted, names sort as sort_keys sorts them."""
        self.assertSameText(
            {
                "decision": "deny",
                "occurred_at": "never",
                "Token": "t",
                "access_token": "eyJsecret",
                "\u00e9t\u00e9": 1,
                "Zebra": 2,
                "_under": 3,
                "a b": 4,
            }
        )
        data = self.log.fields("x", "r", "allow", access_token="eyJsecret", occurred_at="x")["data"]
        self.assertNotIn("eyJsecret", data)
        self.assertEqual(json.loads(data)["occurred_at"], "2023-11-14T22:13:20.123Z")

    def test_no_metadata(self):
        """An event with the core fields alone."""
        self.assertSameText({})

    def test_many_name_sets(self):
        """Past the plans kept, events are written the same way."""
        for n in range(300):
            self.assertSameText({f"name_{n}": n, "common": "c"})


class MemoryAuditLogTests(unittest.SynchronousTestCase):
    """L{MemoryAuditLog} keeps the events in order."""

    def test_emit(self):
        """The in-memory log keeps each event's data document, in order."""
        clock = task.Clock()
        clock.advance(1_700_000_000)
        log = MemoryAuditLog(clock)
        self.assertTrue(verifyObject(IAuditLog, log))
        self.assertIsNone(
            self.successResultOf(
                log.emit("replay_detected", "r-1", "deny", zone_id="z", token_fingerprint="ab12")
            )
        )
        log.emit("other", "r-2", "allow")
        self.assertEqual(
            log.events[0],
            {
                "event_type": "replay_detected",
                "request_id": "r-1",
                "decision": "deny",
                "occurred_at": "2023-11-14T22:13:20.000Z",
                "zone_id": "z",
                "token_fingerprint": "ab12",
            },
        )
        self.assertEqual([e["request_id"] for e in log.events], ["r-1", "r-2"])


class RedisAuditLogUnitTests(unittest.SynchronousTestCase):
    """L{RedisAuditLog} command shape and failure handling, against a fake client."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)

    def test_command(self):
        """
        Exactly SPEC 9's C{XADD <stream> MAXLEN ~ <AUDIT_STREAM_MAXLEN> * id ..
        data .. _sig ..}: the stream is capped (SPEC 12 H9).
        """
        redis = FakeRedis()
        log = RedisAuditLog(redis, KEY, self.clock, stream="s", maxlen=777)
        self.assertTrue(verifyObject(IAuditLog, log))
        self.successResultOf(log.emit("replay_detected", "r-1", "deny", zone_id="z"))
        [command] = redis.commands
        self.assertEqual(command[:6], ("XADD", "s", "MAXLEN", "~", "777", "*"))
        self.assertEqual(command[6::2], ("id", "data", "_sig"))
        fields = dict(zip(command[6::2], command[7::2], strict=True))
        self.assertEqual(set(fields), {"id", "data", "_sig"})
        self.assertTrue(verify_fields(KEY, "s", fields))
        self.assertEqual(json.loads(fields["data"])["event_type"], "replay_detected")

    def test_unsigned_without_key(self):
        """Without a key there is no C{_sig}."""
        redis = FakeRedis()
        RedisAuditLog(redis, None, self.clock, stream="s").emit("e", "r", "deny")
        self.assertEqual(redis.commands[0][:6], ("XADD", "s", "MAXLEN", "~", "1000000", "*"))
        self.assertEqual(redis.commands[0][6::2], ("id", "data"))

    def test_failure_swallowed(self):
        """A Redis error is logged, never passed to the caller."""
        log = RedisAuditLog(FakeRedis(ConnectionError("down")), KEY, self.clock)
        self.assertIsNone(self.successResultOf(log.emit("e", "r", "deny")))

    def test_timeout(self):
        """A Redis that never answers releases the emit after the timeout."""
        log = RedisAuditLog(FakeRedis(defer.Deferred()), KEY, self.clock, timeout=2.0)
        d = log.emit("e", "r", "deny")
        self.assertNoResult(d)
        self.clock.advance(2.0)
        self.assertIsNone(self.successResultOf(d))

    def test_failure_spools_in_order(self):
        """
        An entry Redis does not take goes to the spool together with every
        entry still waiting for its reply, in emission order; later ones
        queue behind them without touching Redis until the spool is replayed.
        """
        pending = [defer.Deferred(), defer.Deferred()]
        redis = FakeRedis()
        redis.execute_command = lambda *arguments: (
            redis.commands.append(arguments),
            pending[len(redis.commands) - 1],
        )[1]
        spool = AuditSpool(self.mktemp(), 10_000, self.clock)
        os.makedirs(spool.directory)
        log = RedisAuditLog(redis, KEY, self.clock, stream="s", spool=spool)
        log.emit("e", "r-1", "deny")
        log.emit("e", "r-2", "deny")
        pending[0].errback(ConnectionError("lost"))
        log.emit("e", "r-3", "deny")
        self.assertEqual(len(redis.commands), 2, "r-3 was spooled, not sent")
        sent = []
        spool._send = lambda fields: (sent.append(fields), defer.succeed("1-0"))[1]
        self.successResultOf(spool.replay())
        self.assertEqual([json.loads(f["data"])["request_id"] for f in sent], ["r-1", "r-2", "r-3"])
        for fields in sent:
            self.assertTrue(verify_fields(KEY, "s", fields))
        self.assertFalse(spool.holding)
        self.assertEqual(os.listdir(spool.directory), [])
        redis.execute_command = FakeRedis().execute_command
        self.successResultOf(log.emit("e", "r-4", "deny"))
        self.assertEqual(spool.size, 0, "Redis takes new events directly again")


class PackedAuditTests(unittest.SynchronousTestCase):
    """
    L{RedisAuditLog} on a pool of L{caracal.gateway.redisconn}: the C{XADD}
    is packed once and sent with C{send_packed}, with txredisapi's bytes.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.redis, (self.connection,) = claim_pool(1, self.clock)
        self.spool = AuditSpool(self.mktemp(), 10_000, self.clock)
        os.makedirs(self.spool.directory)
        self.log = RedisAuditLog(self.redis, KEY, self.clock, stream="s", spool=self.spool)

    def test_bytes(self):
        """Exactly what execute_command would write for the same entry."""
        fields = self.log.fields("e", "r-1", "allow", zone_id="z", status=200)
        self.log.send(fields)
        arguments = ["XADD", "s", "MAXLEN", "~", "1000000", "*"]
        for name, value in fields.items():
            arguments += [name, value]
        self.assertEqual(
            self.connection.transport.value(), self.connection._build_command(*arguments)
        )

    def test_stored(self):
        """The entry's id in reply: stored, nothing spooled."""
        d = self.log.emit("e", "r-1", "allow")
        self.connection.dataReceived(b"$3\r\n1-0\r\n")
        self.assertIsNone(self.successResultOf(d))
        self.assertFalse(self.spool.holding)

    def test_error_reply_spools(self):
        """An error reply: the entry goes to the spool."""
        d = self.log.emit("e", "r-1", "allow")
        self.connection.dataReceived(b"-OOM command not allowed\r\n")
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(self.spool.holding)

    def test_timeout_then_late_reply(self):
        """No reply in time: spooled; the late reply is dropped, not given to the next entry."""
        late = self.log.emit("e", "r-1", "allow")
        self.clock.advance(2.0)
        self.successResultOf(late)
        self.assertTrue(self.spool.holding)
        sent = []
        self.spool._send = lambda fields: (sent.append(fields), self.log.send(fields))[1]
        replayed = self.spool.replay()
        self.connection.dataReceived(b"$3\r\n1-0\r\n$3\r\n2-0\r\n")
        self.successResultOf(replayed)
        self.assertEqual([json.loads(f["data"])["request_id"] for f in sent], ["r-1"])
        self.assertFalse(self.spool.holding)

    def test_not_text_takes_txredisapi_way(self):
        """A field value that is not a string is formatted by txredisapi, as before."""
        self.log.send({"id": "x", "n": 1.5})
        self.assertIn(b"$8\r\n1.500000\r\n", self.connection.transport.value())


class ReplayEventThrottleTests(unittest.SynchronousTestCase):
    """SPEC 12 H9's one event per fingerprint per second, in bounded memory."""

    def test_one_per_second(self):
        """Within a second only the first replay is audited; the next carries the count."""
        clock = task.Clock()
        metrics = Metrics()
        throttle = ReplayEventThrottle(clock, metrics)
        self.assertEqual(throttle.admit("f1"), 0)
        self.assertIsNone(throttle.admit("f1"))
        self.assertIsNone(throttle.admit("f1"))
        self.assertEqual(throttle.admit("f2"), 0)
        clock.advance(1.0)
        self.assertEqual(throttle.admit("f1"), 2)
        self.assertEqual(throttle.admit("f2"), 0)
        self.assertEqual(metrics.counters["audit_events_suppressed"], 2)

    def test_replayed_fingerprint_kept_longest(self):
        """
        A fingerprint still being replayed is not the one forgotten when the
        table is full: its replays stay throttled.
        """
        clock = task.Clock()
        throttle = ReplayEventThrottle(clock, entries=2)
        self.assertEqual(throttle.admit("f1"), 0)
        self.assertEqual(throttle.admit("f2"), 0)
        self.assertIsNone(throttle.admit("f1"))
        self.assertEqual(throttle.admit("f3"), 0)
        self.assertIsNone(throttle.admit("f1"), "f2 was forgotten, not f1")

    def test_bounded(self):
        """At most C{entries} fingerprints are remembered, the oldest forgotten first."""
        clock = task.Clock()
        throttle = ReplayEventThrottle(clock, entries=100)
        for number in range(1000):
            throttle.admit(f"f{number}")
        self.assertEqual(len(throttle), 100)
        self.assertIsNone(throttle.admit("f999"))
        self.assertEqual(throttle.admit("f0"), 0)
