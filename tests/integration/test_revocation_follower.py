"""
Integration tests of L{RevocationFollower} against real Redis servers: the
shared one (a random stream per test, deleted afterwards) and a private one
for the restart test. Waits poll with a deadline; nothing sleeps.
"""

from __future__ import annotations

import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from caracal.gateway.redisconn import close_redis, connect_redis
from caracal.gateway.revocations import (
    RevocationFollower,
    RevocationStore,
    publish_revocation,
    sign_fields,
)
from tests.support.redis import PrivateRedis, SyncRedis, redis_namespace, shared_address
from tests.support.waiting import wait_until

KEY = bytes(range(32))
DAY_MS = 24 * 3600 * 1000


class Metrics:
    """Records counter increments."""

    def __init__(self):
        self.counts = {}

    def increment(self, name, amount=1):
        self.counts[name] = self.counts.get(name, 0) + amount


class FollowerTestMixin:
    def setUp(self):
        self.stream = f"{redis_namespace('revoke')}.sessions"
        self.sync = SyncRedis()
        self.addCleanup(self.sync.close)
        self.addCleanup(self.sync.call, "DEL", self.stream, self.stream + ".dead")

    def publisher(self, address=None):
        handler = connect_redis(address or shared_address(), reactor, pool_size=1)
        self.addCleanup(close_redis, handler)
        return handler

    def start_follower(self, address=None, key=KEY, metrics=None, block_ms=1000):
        store = RevocationStore(reactor)
        follower = RevocationFollower(
            address or shared_address(),
            store,
            key,
            reactor,
            metrics=metrics,
            stream=self.stream,
            block_ms=block_ms,
        )
        follower.startService()
        self.addCleanup(follower.stopService)
        return follower, store

    def raw_xadd(self, entry_id, fields, key=KEY, stream=None):
        stream = stream or self.stream
        if key:
            fields = dict(fields, _sig=sign_fields(key, stream, fields))
        arguments = [item for pair in fields.items() for item in pair]
        return self.sync.call("XADD", stream, entry_id, *arguments)


class RevocationFollowerTests(FollowerTestMixin, unittest.TestCase):
    """Following C{caracal.sessions.revoke} on the shared Redis."""

    @defer.inlineCallbacks
    def test_initial_load(self):
        """Start loads the last 24 h of revocations, ignoring older ones."""
        now_ms = int(time.time() * 1000)
        self.raw_xadd(f"{now_ms - DAY_MS - 60_000}-0", {"zone_id": "z", "session_id": "ancient"})
        self.raw_xadd(f"{now_ms - 3_600_000}-0", {"zone_id": "z", "session_id": "hour-ago"})
        redis = self.publisher()
        yield publish_revocation(redis, "z", "recent", KEY, stream=self.stream)
        # the MINID trim is approximate: the ancient entry must still be there
        # for this test to prove that the follower skips it
        self.assertEqual(self.sync.call("XLEN", self.stream), 3)

        follower, store = self.start_follower()
        yield wait_until(lambda: follower.ready, timeout=5)
        self.assertTrue(store.is_revoked("z", "hour-ago"))
        self.assertTrue(store.is_revoked("z", "recent"))
        self.assertFalse(store.is_revoked("z", "ancient"))
        self.assertEqual(store.active(), 2)
        self.assertEqual(follower.rejected, 0)

    @defer.inlineCallbacks
    def test_follows_within_a_second(self):
        """A revocation published after start is enforced well within a second."""
        follower, store = self.start_follower()
        yield follower.when_ready()
        redis = self.publisher()
        for index in range(3):
            session = f"live-{index}"
            started = time.monotonic()
            yield publish_revocation(redis, "zone-a", session, KEY, stream=self.stream)
            yield wait_until(lambda s=session: store.is_revoked("zone-a", s), timeout=1.0)
            self.assertLess(time.monotonic() - started, 1.0)
        self.assertFalse(store.is_revoked("zone-b", "live-0"))

    @defer.inlineCallbacks
    def test_watch_fires_from_stream(self):
        """A watch on a session fires when its revocation arrives on the stream."""
        follower, store = self.start_follower()
        yield follower.when_ready()
        fired = []
        store.watch("z", "streaming", lambda: fired.append(True))
        yield publish_revocation(self.publisher(), "z", "streaming", KEY, stream=self.stream)
        yield wait_until(lambda: fired, timeout=1.0)
        self.assertEqual(fired, [True])

    @defer.inlineCallbacks
    def test_forged_ignored(self):
        """Unsigned, badly signed and malformed entries are ignored, counted, dead-lettered."""
        metrics = Metrics()
        follower, store = self.start_follower(metrics=metrics)
        yield follower.when_ready()
        redis = self.publisher()
        unsigned = yield publish_revocation(redis, "z", "unsigned", None, stream=self.stream)
        forged = yield publish_revocation(redis, "z", "forged", b"x" * 32, stream=self.stream)
        malformed = self.raw_xadd("*", {"zone_id": "z"})
        good = yield publish_revocation(redis, "z", "good", KEY, stream=self.stream)
        yield wait_until(lambda: store.is_revoked("z", "good"), timeout=1.0)
        self.assertEqual(follower.last_id, good)

        self.assertFalse(store.is_revoked("z", "unsigned"))
        self.assertFalse(store.is_revoked("z", "forged"))
        self.assertEqual(follower.rejected, 3)
        self.assertEqual(metrics.counts, {"revocations_rejected": 3})
        dead = []

        def dead_lettered():
            dead[:] = self.sync.call("XRANGE", self.stream + ".dead", "-", "+")
            return len(dead) == 3

        yield wait_until(dead_lettered, timeout=2.0)
        # each copy takes its source entry's id (idempotent dead-lettering)
        self.assertEqual([entry_id for entry_id, _ in dead], [unsigned, forged, malformed])
        copies = [dict(zip(flat[::2], flat[1::2], strict=True)) for _, flat in dead]
        self.assertEqual(
            [(c["reason"], c["source_id"], c.get("session_id")) for c in copies],
            [
                ("unsigned", unsigned, "unsigned"),
                ("bad_signature", forged, "forged"),
                ("malformed", malformed, None),
            ],
        )
        self.assertIn("_sig", copies[1])

    @defer.inlineCallbacks
    def test_every_instance_sees_every_message(self):
        """Two followers on one stream each apply every revocation (no splitting)."""
        first, first_store = self.start_follower()
        second, second_store = self.start_follower()
        yield defer.gatherResults([first.when_ready(), second.when_ready()])
        redis = self.publisher()
        sessions = [f"s{index}" for index in range(20)]
        for session in sessions:
            yield publish_revocation(redis, "z", session, KEY, stream=self.stream)
        yield wait_until(
            lambda: first_store.active() == 20 and second_store.active() == 20, timeout=2.0
        )
        for session in sessions:
            self.assertTrue(first_store.is_revoked("z", session))
            self.assertTrue(second_store.is_revoked("z", session))
        self.assertEqual(self.sync.call("XINFO", "GROUPS", self.stream), [])

    @defer.inlineCallbacks
    def test_stop_is_prompt(self):
        """Stopping does not wait for the block period to end."""
        follower, _ = self.start_follower(block_ms=5000)
        yield follower.when_ready()
        started = time.monotonic()
        yield follower.stopService()
        self.assertLess(time.monotonic() - started, 0.5)


class RevocationFollowerRestartTests(FollowerTestMixin, unittest.TestCase):
    """A Redis restart while following (private server)."""

    def setUp(self):
        FollowerTestMixin.setUp(self)
        self.redis = PrivateRedis()
        self.redis.start()
        self.addCleanup(self.redis.stop)

    @defer.inlineCallbacks
    def test_resync_does_not_duplicate_dead_letters(self):
        """
        A lost connection makes the follower re-read its 24 h window; the
        refused entries in it keep exactly one dead letter each and are not
        counted again. A second follower adds no copies either.
        """
        metrics = Metrics()
        follower, store = self.start_follower(self.redis.address, metrics=metrics)
        yield follower.when_ready()
        redis = self.publisher(self.redis.address)
        unsigned = yield publish_revocation(redis, "z", "unsigned", None, stream=self.stream)
        forged = yield publish_revocation(redis, "z", "forged", b"x" * 32, stream=self.stream)
        yield publish_revocation(redis, "z", "first", KEY, stream=self.stream)
        yield wait_until(lambda: store.is_revoked("z", "first"), timeout=1.0)

        admin = self.redis.client()
        self.addCleanup(admin.close)
        # Drop the follower's connection (every client but this one): its
        # read fails, and it resyncs from the start of the window.
        admin.call("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        yield wait_until(lambda: follower.errors >= 1, timeout=2.0)
        second, second_store = self.start_follower(self.redis.address)
        yield second.when_ready()

        @defer.inlineCallbacks
        def published():
            try:
                yield publish_revocation(redis, "z", "second", KEY, stream=self.stream)
            except Exception:
                return False
            return True

        yield wait_until(published, timeout=5, interval=0.1)
        # The marker is read after the resync's re-read and its refused
        # copies, which went first on the same connection.
        yield wait_until(
            lambda: store.is_revoked("z", "second") and second_store.is_revoked("z", "second"),
            timeout=5.0,
        )
        dead = admin.call("XRANGE", self.stream + ".dead", "-", "+")
        self.assertEqual([entry_id for entry_id, _ in dead], [unsigned, forged])
        self.assertEqual(follower.rejected, 2)
        self.assertEqual(metrics.counts, {"revocations_rejected": 2})
        self.assertEqual(second.rejected, 2)

    @defer.inlineCallbacks
    def test_restart_mid_follow(self):
        """
        Redis restarts while the follower waits: revocations published once
        it is back are applied, and the ones held before stay.
        """
        follower, store = self.start_follower(self.redis.address)
        yield follower.when_ready()
        redis = self.publisher(self.redis.address)
        yield publish_revocation(redis, "z", "before", KEY, stream=self.stream)
        yield wait_until(lambda: store.is_revoked("z", "before"), timeout=1.0)

        self.redis.stop()
        # let the follower notice and start retrying before the server returns
        yield wait_until(lambda: follower.errors >= 1, timeout=2.0)
        self.redis.start()

        @defer.inlineCallbacks
        def published():
            try:
                yield publish_revocation(redis, "z", "after", KEY, stream=self.stream)
            except Exception:
                return False
            return True

        yield wait_until(published, timeout=10, interval=0.1)
        started = time.monotonic()
        yield wait_until(lambda: store.is_revoked("z", "after"), timeout=10)
        self.assertTrue(store.is_revoked("z", "before"))
        # the follower reconnects within its 2 s backoff cap
        self.assertLess(time.monotonic() - started, 4.0)
