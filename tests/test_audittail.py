# -*- test-case-name: tests.test_audittail -*-
"""L{caracal.gateway.audittail}'s lines and filters, without Redis."""

from __future__ import annotations

import io
import json

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway import admin
from caracal.gateway.audit import RedisAuditLog
from caracal.gateway.audittail import BATCH, Filter, entry_fields, event_of, format_line, tail

KEY = bytes(range(32))


def fields_of(request_id="r-1", decision="deny", key=KEY, **metadata) -> dict:
    """An entry's fields as the gateway writes them."""
    clock = task.Clock()
    clock.advance(1_700_000_000)
    return RedisAuditLog(None, key, clock).fields("gateway_call", request_id, decision, **metadata)


class FormatTests(SynchronousTestCase):
    def test_gateway_call_line(self):
        """One line with the decision, the request, the outcome and a verified signature."""
        fields = fields_of(
            method="POST",
            path="/mcp",
            status=401,
            reason="session_revoked",
            resource="tools",
            mcp_method="tools/call",
            mcp_target="search",
            token_fingerprint="abcdef012345",
        )
        line = format_line("1-0", fields, KEY)
        self.assertTrue(
            line.startswith(
                "2023-11-14T22:13:20.000Z gateway_call deny POST /mcp -> 401 (session_revoked)"
            ),
            line,
        )
        for part in (
            "request=r-1",
            "resource=tools",
            "mcp=tools/call",
            "target=search",
            "token=abcdef012345",
            "entry=1-0",
            "sig=ok",
        ):
            self.assertIn(part, line)
        self.assertNotIn("\n", line)

    def test_signature_states(self):
        """A tampered entry says sig=BAD; without a key, sig=unchecked."""
        fields = fields_of()
        tampered = dict(fields, data=fields["data"].replace('"deny"', '"allow"'))
        self.assertTrue(format_line("1-0", tampered, KEY).endswith("sig=BAD"))
        self.assertTrue(format_line("1-0", fields, None).endswith("sig=unchecked"))

    def test_control_characters_escaped(self):
        """A hostile value cannot start a new line or forge one."""
        fields = fields_of(mcp_target="x\nforged sig=ok\x1b[31m")
        line = format_line("1-0", fields, KEY)
        self.assertNotIn("\n", line)
        self.assertNotIn("\x1b", line)
        self.assertIn("\\n", line)

    def test_filter(self):
        """--resource, --decision and --request-id select events."""
        event = event_of(fields_of(resource="tools"))
        self.assertTrue(Filter()(event))
        self.assertTrue(Filter(resource="tools", decision="deny", request_id="r-1")(event))
        self.assertFalse(Filter(resource="other")(event))
        self.assertFalse(Filter(decision="allow")(event))
        self.assertFalse(Filter(request_id="r-2")(event))
        self.assertFalse(Filter()(event_of({"data": "not json"})))

    def test_prefilter(self):
        """
        An entry whose raw document cannot hold the request id or resource
        asked for is passed over without decoding; one that JSON would
        escape is left to the full filter.
        """
        data = fields_of(request_id="r-1", resource="tools")["data"]
        self.assertTrue(Filter(request_id="r-1", resource="tools").could_match(data))
        self.assertTrue(Filter(decision="allow").could_match(data))
        self.assertFalse(Filter(request_id="r-2").could_match(data))
        self.assertFalse(Filter(resource="other").could_match(data))
        for escaped in ('r"1', "r\\1", "r-\u00e9"):
            quoted = fields_of(request_id=escaped)["data"]
            self.assertTrue(Filter(request_id=escaped).could_match(quoted))
            self.assertTrue(Filter(request_id=escaped)(event_of({"data": quoted})))

    def test_entry_fields(self):
        """A flat reply list becomes a dict of strings."""
        self.assertEqual(entry_fields([b"id", b"x", "data", "{}"]), {"id": "x", "data": "{}"})
        self.assertEqual(json.loads(entry_fields(["data", '{"a":1}'])["data"]), {"a": 1})


class CommandLineTests(SynchronousTestCase):
    def run_admin(self, *argv, environ=None):
        """Run the admin command; returns (status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        status = admin.main(list(argv), environ=environ or {}, stdout=out, stderr=err)
        return status, out.getvalue(), err.getvalue()

    def test_redis_url_required(self):
        """No REDIS_URL: a usage error in one line, exit 2."""
        status, _out, err = self.run_admin("audit", "tail")
        self.assertEqual(status, 2)
        self.assertEqual(
            err, "caracal-gateway-admin: error: REDIS_URL is required (or --redis-url)\n"
        )

    def test_bad_decision(self):
        """--decision takes allow or deny only."""
        status, _out, err = self.run_admin("audit", "tail", "--decision", "maybe")
        self.assertEqual(status, 2)
        self.assertEqual(err.count("\n"), 1)


class ScriptedRedis:
    """Answers each command with a Deferred the test fires (or never fires)."""

    def __init__(self) -> None:
        self.asked: list[tuple[tuple, defer.Deferred]] = []

    def execute_command(self, *command):
        d = defer.Deferred()
        self.asked.append((command, d))
        return d


class TailTimeoutTests(SynchronousTestCase):
    """The time bound of C{audit tail} is per read of Redis, not per scan."""

    def setUp(self):
        self.clock = task.Clock()
        self.redis = ScriptedRedis()
        self.out = io.StringIO()
        self.done = tail(
            self.redis,
            self.out,
            Filter(request_id="r-last"),
            KEY,
            count=1,
            stream="s",
            clock=self.clock,
            reply_timeout=10.0,
        )

    def batch(self, first: int, request_id="r-other"):
        """A full XREVRANGE reply of entries numbered from C{first} down."""
        fields = fields_of(request_id=request_id)
        flat = [item for pair in fields.items() for item in pair]
        return [(f"{first - n}-0", flat) for n in range(BATCH)]

    def test_long_scan_is_not_cut(self):
        """Many prompt replies adding up to more than the bound still finish."""
        for number in range(5):
            self.clock.advance(9.0)
            _command, reply = self.redis.asked[-1]
            reply.callback(self.batch(100_000 - number * BATCH))
        self.clock.advance(9.0)
        self.redis.asked[-1][1].callback(self.batch(50_000, request_id="r-last"))
        self.assertEqual(self.successResultOf(self.done), 1)
        self.assertIn("request=r-last", self.out.getvalue())

    def test_one_silent_read_times_out(self):
        """A read Redis does not answer within the bound fails the command."""
        self.redis.asked[-1][1].callback(self.batch(100_000))
        self.clock.advance(10.0)
        self.failureResultOf(self.done, defer.TimeoutError)
