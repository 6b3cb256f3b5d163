"""
Integration tests of the Redis-backed stores against real Redis servers: the
shared one on 127.0.0.1:6379 (unique names per test, deleted afterwards) and,
for outages, a private C{redis-server} the test stops and restarts.
"""

from __future__ import annotations

import json
import os
import time
import uuid

from twisted.internet import defer, reactor
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.trial import unittest

from caracal.gateway.audit import RedisAuditLog
from caracal.gateway.config import RedisAddress
from caracal.gateway.redisconn import (
    RedisUnavailable,
    check_redis,
    close_redis,
    connect_redis,
)
from caracal.gateway.replay import RedisReplayGuard, ReplayCheckUnavailable
from caracal.gateway.revocations import verify_fields
from tests.support.redis import PrivateRedis, SyncRedis, redis_namespace, shared_address
from tests.support.waiting import wait_until
from tests.test_replay import InspectedRedisKeys, ReplayGuardContract

KEY = bytes(range(32))


class RedisTestMixin:
    """Connections to the shared Redis, closed and cleaned after each test."""

    def connect(self, address=None, **kwargs):
        handler = connect_redis(address or shared_address(), reactor, **kwargs)
        self.addCleanup(close_redis, handler)
        return handler

    def sync(self, port=6379) -> SyncRedis:
        client = SyncRedis("127.0.0.1", port)
        self.addCleanup(client.close)
        return client

    def delete_later(self, pattern: str) -> None:
        def delete():
            client = SyncRedis()
            try:
                keys = client.call("KEYS", pattern)
                if keys:
                    client.call("DEL", *keys)
            finally:
                client.close()

        self.addCleanup(delete)


class RedisReplayGuardTests(
    RedisTestMixin, InspectedRedisKeys, ReplayGuardContract, unittest.TestCase
):
    """L{RedisReplayGuard} passes the replay guard contract on a real Redis."""

    def make_guard(self):
        self.namespace = redis_namespace("zone")
        self.delete_later(f"seen:jti:{self.namespace}*")
        self.inspect = self.sync()
        return RedisReplayGuard(self.connect(), reactor, timeout=2.0)

    def new_zone(self) -> str:
        return f"{self.namespace}-{uuid.uuid4().hex[:8]}"

    @defer.inlineCallbacks
    def test_two_gateways(self):
        """A token used through one connection is a replay through another (two gateways)."""
        other = RedisReplayGuard(self.connect(), reactor, timeout=2.0)
        zone, jti = self.new_zone(), self.new_jti()
        self.assertIs((yield self.guard.claim(zone, jti, "gw1-request", 60_000)), True)
        self.assertIs((yield other.claim(zone, jti, "gw2-request", 60_000)), False)
        self.assertEqual(self.inspect.call("GET", f"seen:jti:{zone}:{jti}"), "gw1-request")

    @defer.inlineCallbacks
    def test_concurrent_claims(self):
        """Of many simultaneous claims of one jti through several connections, one wins."""
        guards = [RedisReplayGuard(self.connect(), reactor, timeout=2.0) for _ in range(3)]
        zone, jti = self.new_zone(), self.new_jti()
        results = yield defer.gatherResults(
            [guards[i % 3].claim(zone, jti, f"r{i}", 60_000) for i in range(30)]
        )
        self.assertEqual(results.count(True), 1)


class RedisOutageTests(RedisTestMixin, unittest.TestCase):
    """Behaviour through a Redis outage, on a private server."""

    def setUp(self):
        self.redis = PrivateRedis()
        self.redis.start()
        self.addCleanup(self.redis.stop)

    @defer.inlineCallbacks
    def test_replay_guard_outage(self):
        """
        Redis down: claims fail with L{ReplayCheckUnavailable} within the
        timeout. Redis back: the same guard works again by itself.
        """
        guard = RedisReplayGuard(self.connect(self.redis.address), reactor, timeout=0.5)
        self.assertIs((yield guard.claim("zone", "jti-1", "r1", 60_000)), True)

        self.redis.stop()
        for jti in ("jti-2", "jti-3"):  # just after the drop, and once disconnected
            started = time.monotonic()
            yield self.assertFailure(guard.claim("zone", jti, "r2", 60_000), ReplayCheckUnavailable)
            self.assertLess(time.monotonic() - started, 0.5 + 0.25)

        self.redis.start()
        claims = []

        @defer.inlineCallbacks
        def claimed():
            try:
                claims.append((yield guard.claim("zone", "jti-4", "r4", 60_000)))
            except ReplayCheckUnavailable:
                return False
            return True

        yield wait_until(claimed, timeout=10, interval=0.1)
        self.assertEqual(claims[-1], True)
        # the restarted server has no memory of jti-1, but this new claim is recorded
        self.assertEqual(self.redis.client().call("GET", "seen:jti:zone:jti-4"), "r4")

    @defer.inlineCallbacks
    def test_check_redis(self):
        """The readiness probe answers while Redis is up and fails fast while it is down."""
        handler = self.connect(self.redis.address)
        yield check_redis(handler, reactor, timeout=2.0)
        self.redis.stop()
        started = time.monotonic()
        yield self.assertFailure(check_redis(handler, reactor, timeout=0.3), RedisUnavailable)
        self.assertLess(time.monotonic() - started, 1.0)

    @defer.inlineCallbacks
    def test_password_and_database(self):
        """The password and database number of the address are used."""
        admin = self.redis.client()
        admin.call("CONFIG", "SET", "requirepass", "s3cret")
        address = RedisAddress("127.0.0.1", self.redis.port, db=3, password="s3cret")
        handler = self.connect(address)
        yield handler.execute_command("SET", "where", "db3")
        admin.call("AUTH", "s3cret")
        admin.call("SELECT", "3")
        self.assertEqual(admin.call("GET", "where"), "db3")
        admin.call("SELECT", "0")
        self.assertIsNone(admin.call("GET", "where"))

    @defer.inlineCallbacks
    def test_auth_failure_recovers(self):
        """
        A refused AUTH does not stop the pool for good: once the server
        accepts the password, the same handler works.
        """
        admin = self.redis.client()
        admin.call("CONFIG", "SET", "requirepass", "old")
        address = RedisAddress("127.0.0.1", self.redis.port, db=1, password="new")
        guard = RedisReplayGuard(self.connect(address, pool_size=2), reactor, timeout=0.3)
        yield self.assertFailure(guard.claim("zone", "jti-1", "r1", 60_000), ReplayCheckUnavailable)
        admin.call("AUTH", "old")
        admin.call("CONFIG", "SET", "requirepass", "new")

        @defer.inlineCallbacks
        def claimed():
            try:
                return (yield guard.claim("zone", "jti-1", "r1", 60_000))
            except ReplayCheckUnavailable:
                return False

        yield wait_until(claimed, timeout=10, interval=0.1)


class RedisAuditLogTests(RedisTestMixin, unittest.TestCase):
    """L{RedisAuditLog} on a real stream."""

    def setUp(self):
        self.stream = f"{redis_namespace('audit')}.events"
        self.delete_later(self.stream)

    @defer.inlineCallbacks
    def test_xadd_shape(self):
        """One entry with C{id} (a UUID), C{data} (the event JSON) and a verifiable C{_sig}."""
        log = RedisAuditLog(self.connect(), KEY, reactor, stream=self.stream)
        result = yield log.emit(
            "replay_detected", "req-1", "deny", zone_id="z", token_fingerprint="ab12cd"
        )
        self.assertIsNone(result)
        [[entry_id, flat]] = self.sync().call("XRANGE", self.stream, "-", "+")
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        self.assertEqual(flat[::2], ["id", "data", "_sig"])
        uuid.UUID(fields["id"])
        self.assertTrue(verify_fields(KEY, self.stream, fields))
        data = json.loads(fields["data"])
        self.assertEqual(
            {k: data[k] for k in ("event_type", "request_id", "decision", "zone_id")},
            {
                "event_type": "replay_detected",
                "request_id": "req-1",
                "decision": "deny",
                "zone_id": "z",
            },
        )
        self.assertRegex(data["occurred_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    @defer.inlineCallbacks
    def test_unsigned(self):
        """Without a key the entry has no C{_sig}."""
        log = RedisAuditLog(self.connect(), None, reactor, stream=self.stream)
        yield log.emit("replay_detected", "req-1", "deny")
        [[_, flat]] = self.sync().call("XRANGE", self.stream, "-", "+")
        self.assertEqual(flat[::2], ["id", "data"])

    @defer.inlineCallbacks
    def test_outage_never_errbacks(self):
        """With Redis down, emit still fires (after its bound) without an error."""
        private = PrivateRedis()
        private.start()
        self.addCleanup(private.stop)
        log = RedisAuditLog(self.connect(private.address), KEY, reactor, timeout=0.3)
        yield log.emit("warmup", "req-0", "allow")
        private.stop()
        result = yield log.emit("replay_detected", "req-1", "deny")
        self.assertIsNone(result)


class RedisTLSTests(RedisTestMixin, unittest.TestCase):
    """C{rediss://}: TLS to Redis, with the server certificate verified."""

    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.redis = PrivateRedis(tls_directory=directory)
        self.redis.start()
        self.addCleanup(self.redis.stop)

    @defer.inlineCallbacks
    def test_trusted(self):
        """With the server's CA trusted, commands go through TLS."""
        with open(self.redis.ca_file, "rb") as ca:
            trust = Certificate.loadPEM(ca.read())
        options = optionsForClientTLS("localhost", trustRoot=trust)
        guard = RedisReplayGuard(
            self.connect(self.redis.address, tls_options=options), reactor, timeout=2.0
        )
        self.assertIs((yield guard.claim("zone", "jti-1", "r1", 60_000)), True)
        self.assertEqual(self.redis.client().call("GET", "seen:jti:zone:jti-1"), "r1")

    @defer.inlineCallbacks
    def test_untrusted(self):
        """By default (system roots) the test CA is not trusted: no command is sent."""
        guard = RedisReplayGuard(self.connect(self.redis.address), reactor, timeout=0.5)
        yield self.assertFailure(guard.claim("zone", "jti-1", "r1", 60_000), ReplayCheckUnavailable)
        self.assertIsNone(self.redis.client().call("GET", "seen:jti:zone:jti-1"))
