# -*- test-case-name: tests.integration.test_audit_trail -*-
"""
SPEC 14's "nothing is lost", against real gateway processes and a private
C{redis-server} of the test's own (started, stopped and restarted on one
port; the shared Redis is never touched):

 - Redis down for 200 calls, then back: all 200 C{gateway_call} events reach
   the stream, in order, each once by C{id}, signed; the spool is empty;
 - a gateway SIGKILLed with events spooled, and its successor SIGKILLed in
   the middle of replaying them (Redis refuses writes past a memory cap
   the test sets): a third gateway delivers every one (duplicates allowed);
 - a tiny C{AUDIT_SPOOL_MAX_BYTES}: events dropped and counted, every call
   still served, C{/ready} 200 once Redis is back.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from caracal.gateway.audit import RedisAuditLog
from caracal.gateway.revocations import verify_fields
from caracal.gateway.spool import AuditSpool, _SpoolFile
from tests.support.gateway import GatewayHarness
from tests.support.redis import PrivateRedis, SyncRedis
from tests.support.replicas import AUDIT_STREAM, RESOURCE, ReplicaSet
from tests.support.waiting import became_true

CALLS = 200


class AuditTrailOutageTests(TestCase):
    timeout = 120

    def setUp(self):
        self.redis = PrivateRedis()
        self.redis.start()
        self.addCleanup(self.redis.stop)
        self.replicas = ReplicaSet(self.mktemp(), redis_port=self.redis.port)
        self.spool_dir = os.path.abspath(self.mktemp())
        self.replicas.extra_env["AUDIT_SPOOL_DIR"] = self.spool_dir
        # The calls during the outage are to be served (and audited as such),
        # not refused for the revocation state going stale (SPEC 12).
        self.replicas.extra_env["REVOCATION_FAIL_OPEN"] = "true"
        self.addCleanup(self.replicas.stop)
        self.addCleanup(self.kill_all)

    def kill_all(self):
        """SIGKILL whatever gateway is still running (a failed test's leftovers)."""
        return defer.gatherResults([g.kill() for g in self.replicas.gateways])

    @defer.inlineCallbacks
    def start_gateway(self):
        """One more gateway process; fires with it once it answers /health."""
        if not self.replicas.gateways:
            yield self.replicas.start(count=1)
            return self.replicas.gateways[0]
        gateway = yield self.replicas.add_gateway()
        return gateway

    @defer.inlineCallbacks
    def call(self, gateway, request_id: str):
        """One allowed call (ambient token, no session) with our own request id."""
        response = yield treq.request(
            "POST",
            self.replicas.url(gateway),
            headers={
                b"Authorization": [b"Bearer " + self.replicas.mint(use="ambient").encode()],
                b"X-Caracal-Resource": [RESOURCE.encode()],
                b"X-Request-Id": [request_id.encode()],
                b"Content-Type": [b"application/json"],
            },
            data=b"{}",
            agent=self.replicas.agent,
            timeout=10,
        )
        yield response.content()
        return response.code

    @defer.inlineCallbacks
    def outage_calls(self, gateway, count: int = CALLS):
        """C{count} calls, one at a time, each answered 200; fires with their ids."""
        prefix = f"audit-{uuid.uuid4().hex[:8]}"
        request_ids = [f"{prefix}-{number:04d}" for number in range(count)]
        for request_id in request_ids:
            code = yield self.call(gateway, request_id)
            self.assertEqual(code, 200, request_id)
        return request_ids

    def call_events(self, request_ids) -> list[dict]:
        """Our gateway_call entries in the stream, in stream order, as fields + data."""
        wanted = set(request_ids)
        found = []
        for _entry_id, fields in self.replicas.entries(AUDIT_STREAM):
            data = json.loads(fields["data"])
            if data["event_type"] == "gateway_call" and data["request_id"] in wanted:
                found.append(dict(fields, event=data))
        return found

    def spooled_lines(self) -> int:
        """Entries held in spool files."""
        total = 0
        for name in os.listdir(self.spool_dir):
            if name.endswith(".spool"):
                with open(os.path.join(self.spool_dir, name), "rb") as f:
                    total += f.read().count(b"\n")
        return total

    def spool_files(self) -> list[str]:
        """The spool files in the directory."""
        return [n for n in os.listdir(self.spool_dir) if n.endswith(".spool")]

    @defer.inlineCallbacks
    def test_outage_loses_nothing_and_keeps_order(self):
        """Redis down for 200 calls, then back: all 200 events, in order, once each."""
        gateway = yield self.start_gateway()
        yield self.replicas.serving(gateway)
        self.redis.stop()
        request_ids = yield self.outage_calls(gateway)
        spooled = yield became_true(lambda: self.spooled_lines() >= CALLS, 15, reactor)
        self.assertTrue(spooled, f"{self.spooled_lines()} events spooled")
        self.redis.start()
        delivered = yield became_true(
            lambda: len(self.call_events(request_ids)) >= CALLS, 30, reactor
        )
        self.assertTrue(delivered, f"{len(self.call_events(request_ids))} delivered")
        events = self.call_events(request_ids)
        self.assertEqual([e["event"]["request_id"] for e in events], request_ids)
        self.assertEqual(len({e["id"] for e in events}), CALLS, "each event once")
        for entry in events:
            signed = {k: entry[k] for k in ("id", "data", "_sig")}
            self.assertTrue(verify_fields(self.replicas.hmac_key, AUDIT_STREAM, signed))
            self.assertEqual(entry["event"]["decision"], "allow")
            self.assertEqual(entry["event"]["status"], 200)
        emptied = yield became_true(lambda: self.spool_files() == [], 10, reactor)
        self.assertTrue(emptied, self.spool_files())

    def leave_orphan(self, count: int) -> list[str]:
        """
        A spool file of C{count} signed events as a process that died would
        leave it (written by the gateway's own spool class, lock released).
        Its name sorts first, so it is replayed first.
        """
        log = RedisAuditLog(None, self.replicas.hmac_key, reactor)
        spool = AuditSpool(self.spool_dir, 1 << 40, reactor)
        spool._open_own = lambda: _SpoolFile(
            os.path.join(self.spool_dir, "audit-0-orphan.spool"),
            os.open(
                os.path.join(self.spool_dir, "audit-0-orphan.spool"),
                os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                0o600,
            ),
        )
        request_ids = [f"orphan-{uuid.uuid4().hex[:8]}-{n}" for n in range(count)]
        for request_id in request_ids:
            spool.append(
                log.fields("gateway_call", request_id, "allow", zone_id=self.replicas.zone)
            )
        spool._own.reader.close()
        os.close(spool._own.fd)
        return request_ids

    def stream_length(self) -> int:
        """XLEN of the audit stream on the private Redis."""
        client = self.redis.client()
        try:
            return client.call("XLEN", AUDIT_STREAM)
        finally:
            client.close()

    @defer.inlineCallbacks
    def test_sigkill_mid_replay_loses_nothing(self):
        """
        A gateway killed with its events spooled, its successor killed in the
        middle of replaying them: a third gateway delivers every one
        (duplicates allowed, consumers dedupe on id).
        """
        first = yield self.start_gateway()
        yield self.replicas.serving(first)
        self.redis.stop()
        request_ids = yield self.outage_calls(first)
        spooled = yield became_true(lambda: self.spooled_lines() >= CALLS, 15, reactor)
        self.assertTrue(spooled, f"{self.spooled_lines()} events spooled")
        yield first.kill()
        # A second dead process's spool, long enough to be caught mid-replay.
        orphans = self.leave_orphan(20_000)
        self.assertEqual(len(self.spool_files()), 2)
        self.redis.start()
        before = self.stream_length()
        second = yield self.start_gateway()
        started = yield became_true(lambda: self.stream_length() > before, 20, reactor)
        self.assertTrue(started, "the successor never replayed the spools it adopted")
        yield second.kill()
        self.assertLess(self.stream_length() - before, len(orphans), "not cut mid-replay")
        self.assertNotEqual(self.spool_files(), [])
        yield self.start_gateway()
        everything = set(request_ids) | set(orphans)
        delivered = yield became_true(
            lambda: self.stream_length() - before >= len(everything), 60, reactor
        )
        self.assertTrue(delivered)
        emptied = yield became_true(lambda: self.spool_files() == [], 10, reactor)
        self.assertTrue(emptied, self.spool_files())
        seen = {e["event"]["request_id"] for e in self.call_events(everything)}
        self.assertEqual(seen, everything)

    @defer.inlineCallbacks
    def test_tiny_spool_drops_and_counts(self):
        """Past AUDIT_SPOOL_MAX_BYTES events are dropped and counted; serving goes on."""
        self.replicas.extra_env["AUDIT_SPOOL_MAX_BYTES"] = "2000"
        gateway = yield self.start_gateway()
        yield self.replicas.serving(gateway)
        self.redis.stop()
        yield self.outage_calls(gateway, count=20)

        @defer.inlineCallbacks
        def get(path):
            response = yield treq.get(
                self.replicas.url(gateway, path), agent=self.replicas.agent, timeout=5
            )
            body = yield response.content()
            return response.code, body

        metrics = {}

        @defer.inlineCallbacks
        def dropped():
            code, body = yield get("/metrics")
            metrics.update(json.loads(body))
            return metrics.get("audit_events_dropped", 0) >= 15

        counted = yield became_true(dropped, 15, reactor)
        self.assertTrue(counted, metrics)
        self.assertLessEqual(
            sum(os.path.getsize(os.path.join(self.spool_dir, n)) for n in self.spool_files()), 2000
        )
        self.redis.start()
        ready = yield became_true(
            lambda: get("/ready").addCallback(lambda r: r[0] == 200), 15, reactor
        )
        self.assertTrue(ready)


class CallEventEndToEndTests(TestCase):
    """gateway_call through a real gateway over TLS (shared Redis, this test's zone)."""

    @defer.inlineCallbacks
    def setUp(self):
        self.gw = GatewayHarness()
        self.addCleanup(self.gw.stop)
        yield self.gw.start()
        self.gw.add_resource()
        yield became_true(lambda: self.gw.gateway.pipeline.resources.get("tools"), 10, reactor)

    def events_of(self, request_id: str) -> list[dict]:
        """This request's events on the shared stream."""
        redis = SyncRedis()
        try:
            entries = redis.call("XREVRANGE", AUDIT_STREAM, "+", "-", "COUNT", "500") or []
        finally:
            redis.close()
        found = []
        for _entry_id, flat in entries:
            fields = dict(zip(flat[0::2], flat[1::2], strict=True))
            data = json.loads(fields["data"])
            if data.get("request_id") == request_id:
                found.append(dict(data, _fields=fields))
        return found

    @defer.inlineCallbacks
    def test_spooled_mcp_body_named_and_forwarded_byte_for_byte(self):
        """
        A tools/call body over 100 KB (spooled to a file by the HTTP layer)
        reaches the upstream unchanged, and the signed event names the tool,
        not its arguments, nor the query string.
        """
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": "summarise", "arguments": {"text": "secret-arg " * 20_000}},
            }
        ).encode()
        self.assertGreater(len(body), 150_000)
        request_id = f"mcp-{uuid.uuid4()}"
        token = self.gw.mint(use="ambient")
        response = yield self.gw.request(
            token,
            path="/mcp?api_key=query-secret",
            headers={
                b"Content-Type": [b"application/json"],
                b"X-Request-Id": [request_id.encode()],
            },
            data=body,
        )
        seen = json.loads((yield response.content()))
        self.assertEqual(response.code, 200)
        self.assertEqual(seen["body_length"], len(body))
        self.assertEqual(seen["body_sha256"], hashlib.sha256(body).hexdigest())
        found = yield became_true(lambda: len(self.events_of(request_id)) == 1, 10, reactor)
        self.assertTrue(found)
        [event] = self.events_of(request_id)
        fields = event.pop("_fields")
        self.assertTrue(verify_fields(self.gw.hmac_key, AUDIT_STREAM, fields))
        self.assertEqual(
            {k: event[k] for k in ("event_type", "decision", "reason", "status", "path")},
            {
                "event_type": "gateway_call",
                "decision": "allow",
                "reason": None,
                "status": 200,
                "path": "/mcp",
            },
        )
        self.assertEqual((event["mcp_method"], event["mcp_target"]), ("tools/call", "summarise"))
        self.assertEqual(event["bytes_in"], len(body))
        self.assertEqual(event["zone_id"], self.gw.zone)
        text = json.dumps(fields)
        for secret in ("secret-arg", "query-secret", token):
            self.assertNotIn(secret, text)

    @defer.inlineCallbacks
    def test_batch_forwarded_without_mcp_fields(self):
        """A JSON-RPC batch: forwarded as is, an event without mcp_* fields."""
        body = b'[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}]'
        request_id = f"batch-{uuid.uuid4()}"
        response = yield self.gw.request(
            self.gw.mint(use="ambient"),
            path="/mcp",
            headers={
                b"Content-Type": [b"application/json"],
                b"X-Request-Id": [request_id.encode()],
            },
            data=body,
        )
        seen = json.loads((yield response.content()))
        self.assertEqual(seen["body_sha256"], hashlib.sha256(body).hexdigest())
        yield became_true(lambda: len(self.events_of(request_id)) == 1, 10, reactor)
        [event] = self.events_of(request_id)
        self.assertNotIn("mcp_method", event)
        self.assertNotIn("mcp_target", event)

    @defer.inlineCallbacks
    def test_header_time_refusal_after_step_6(self):
        """
        A dot segment (step 7, refused as soon as the headers are in, before
        the body) for a known resource still leaves its deny event.
        """
        request_id = f"dots-{uuid.uuid4()}"
        response = yield self.gw.request(
            self.gw.mint(use="ambient"),
            path="/a/%2e%2e/b",
            headers={b"X-Request-Id": [request_id.encode()]},
        )
        yield response.content()
        self.assertEqual(response.code, 400)
        found = yield became_true(lambda: len(self.events_of(request_id)) == 1, 10, reactor)
        self.assertTrue(found)
        [event] = self.events_of(request_id)
        self.assertEqual(
            (event["decision"], event["reason"], event["status"], event["resource"]),
            ("deny", "invalid_request", 400, "tools"),
        )
