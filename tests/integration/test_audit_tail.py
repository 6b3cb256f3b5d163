# -*- test-case-name: tests.integration.test_audit_tail -*-
"""
C{audit tail} against the shared Redis: L{tail} on a stream of the test's
own (past events, filters, C{--follow}), and the real command line on the
gateway's stream, narrowed to this test's request ids.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from caracal.gateway.audit import AUDIT_STREAM, RedisAuditLog
from caracal.gateway.audittail import Filter, tail
from caracal.gateway.redisconn import blocking_connection, close_redis
from tests.support.redis import SyncRedis, redis_namespace, shared_address
from tests.support.waiting import became_true

KEY = os.urandom(32)


class TailTests(TestCase):
    def setUp(self):
        self.stream = redis_namespace("audit-tail")
        self.sync = SyncRedis()
        self.addCleanup(self.sync.close)
        self.addCleanup(self.sync.call, "DEL", self.stream)
        self.log = RedisAuditLog(None, KEY, reactor, stream=self.stream)
        self.redis = blocking_connection(shared_address(), reactor)
        self.addCleanup(close_redis, self.redis)

    def add(self, request_id, decision="allow", resource="tools"):
        """XADD one signed event to the test's stream."""
        fields = self.log.fields("gateway_call", request_id, decision, resource=resource)
        arguments = ["XADD", self.stream, "*"]
        for name, value in fields.items():
            arguments += [name, value]
        self.sync.call(*arguments)

    @defer.inlineCallbacks
    def test_last_matching_oldest_first(self):
        """The last N matching events, oldest first, signatures verified."""
        for number in range(10):
            self.add(f"r-{number}", "deny" if number % 2 else "allow")
        out = io.StringIO()
        printed = yield tail(
            self.redis, out, Filter(decision="deny"), KEY, count=3, stream=self.stream
        )
        lines = out.getvalue().splitlines()
        self.assertEqual(printed, 3)
        self.assertEqual(
            [line.split("request=")[1].split()[0] for line in lines], ["r-5", "r-7", "r-9"]
        )
        self.assertTrue(all(line.endswith("sig=ok") for line in lines))

    @defer.inlineCallbacks
    def test_follow(self):
        """--follow prints new matching events as they arrive."""
        self.add("old", resource="tools")
        out = io.StringIO()
        reading = tail(
            self.redis, out, Filter(resource="tools"), KEY, count=0, follow=True, stream=self.stream
        )
        reading.addErrback(lambda failure: failure.trap(defer.CancelledError))
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.add("other-resource", resource="else")
        self.add("new", resource="tools")
        arrived = yield became_true(lambda: "request=new" in out.getvalue(), 10, reactor)
        reading.cancel()
        self.assertTrue(arrived)
        self.assertNotIn("request=old", out.getvalue())
        self.assertNotIn("other-resource", out.getvalue())


class CommandTests(TestCase):
    def test_what_happened_to_request_x(self):
        """The real command, on the gateway's stream, finds one request's event."""
        request_id = f"tail-{uuid.uuid4()}"
        log = RedisAuditLog(None, KEY, reactor)
        fields = log.fields(
            "gateway_call", request_id, "deny", reason="session_revoked", resource="tools"
        )
        sync = SyncRedis()
        self.addCleanup(sync.close)
        arguments = ["XADD", AUDIT_STREAM, "*"]
        for name, value in fields.items():
            arguments += [name, value]
        entry = sync.call(*arguments)
        self.addCleanup(sync.call, "XDEL", AUDIT_STREAM, entry)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "caracal.gateway.admin",
                "audit",
                "tail",
                "--request-id",
                request_id,
            ],
            env={
                "PATH": os.environ.get("PATH", ""),
                "REDIS_URL": "redis://127.0.0.1:6379/0",
                "STREAMS_HMAC_KEY": KEY.hex(),
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        [line] = done.stdout.splitlines()
        self.assertIn("gateway_call deny", line)
        self.assertIn("(session_revoked)", line)
        self.assertIn(f"request={request_id}", line)
        self.assertTrue(line.endswith("sig=ok"), line)
