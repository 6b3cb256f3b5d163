# -*- test-case-name: tests.test_audittail -*-
"""L{caracal.gateway.audittail}'s lines and filters, without Redis."""

from __future__ import annotations

import io
import json

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway import admin
from caracal.gateway.audit import RedisAuditLog
from caracal.gateway.audittail import Filter, entry_fields, event_of, format_line

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
