# -*- test-case-name: tests.integration.test_sentinel -*-
"""
A real gateway process (C{twistd -n caracal-gateway}) on Redis Sentinel
(C{REDIS_URL=redis+sentinel://...}, SPEC 16) through a forced failover:
before, during and after it, replays are refused and a revoked session stays
refused (never a fail-open 200); after it, single-use tokens work on the new
master, a revocation published there is enforced, and C{/ready} is 200.

The Redis nodes, the sentinel and the gateway are processes of the test's
own on free loopback ports (L{tests.support.sentinel}); the shared Redis is
not touched.
"""

from __future__ import annotations

import os
import secrets
import time
import uuid

import treq
from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from caracal.gateway.config import parse_redis_url
from caracal.gateway.redisconn import close_redis, connect_redis
from caracal.gateway.replay import RedisReplayGuard, ReplayCheckUnavailable
from caracal.gateway.revocations import REVOCATION_STREAM, RevocationFollower, RevocationStore
from tests.support.redis import PrivateRedis, SyncRedis
from tests.support.replicas import ReplicaSet
from tests.support.sentinel import SentinelGroup
from tests.support.waiting import wait_until
from tests.test_replay import InspectedRedisKeys, ReplayGuardContract

#: What a single-use token may meet while the master changes: served, or a
#: fail-closed 503 (the replay check, or the revocation state, unavailable).
FAIL_CLOSED = {"replay_check_unavailable", "revocation_state_unavailable"}

#: Bound on the whole switch: Sentinel reconfigures the old master as a
#: replica of the new one about 10 s after the promotion (until then the new
#: master, configured with min-replicas-to-write 1, refuses writes).
SWITCH_TIMEOUT = 60.0

#: Seconds the replica to be promoted is frozen (C{DEBUG SLEEP}) while the
#: failover starts: below the sentinel's down-after time (1 s), or it would
#: no longer count as a replica to promote.
STALL = 0.8
#: Seconds for the sentinel to send its promotion order (its timer runs
#: every 100 ms) before claims reach the master.
ORDER_QUEUED = 0.3
#: Single-use tokens presented at once in each round of the switch.
CONCURRENT = 4


class SentinelFailoverTests(TestCase):
    """One gateway, one master, one replica, one sentinel, one forced failover."""

    timeout = 180

    @defer.inlineCallbacks
    def setUp(self):
        self.group = SentinelGroup(self.mktemp())
        self.addCleanup(self.group.stop)
        self.group.start()
        self.replicas = ReplicaSet(self.mktemp(), redis_port=self.group.initial_master)
        self.replicas.redis_url = self.group.url
        self.addCleanup(self.replicas.stop)
        yield self.replicas.start(count=1)
        self.gateway = self.replicas.gateways[0]
        yield self.replicas.serving(self.gateway)

    @defer.inlineCallbacks
    def ready_status(self):
        """C{GET /ready} on the gateway: the status code."""
        response = yield treq.get(
            self.replicas.url(self.gateway, "/ready"), agent=self.replicas.agent, timeout=5
        )
        yield response.content()
        return response.code

    def replicated(self, port: int) -> bool:
        """Everything written to the master on C{port} so far has reached its replica."""
        client = SyncRedis(port=port)
        try:
            return client.call("WAIT", 1, 2000) >= 1
        finally:
            client.close()

    @defer.inlineCallbacks
    def spend(self, count: int):
        """
        C{count} fresh single-use tokens presented at once; fires with the
        list of C{(token, outcome)}. Each outcome is served or fail-closed.
        """
        tokens = [self.replicas.mint() for _ in range(count)]
        outcomes = yield defer.gatherResults(
            [self.replicas.outcome(self.gateway, token) for token in tokens],
            consumeErrors=True,
        ).addErrback(lambda failure: failure.value.subFailure)
        for outcome in outcomes:
            self.assertIn(outcome, {"allowed"} | FAIL_CLOSED)
        return list(zip(tokens, outcomes, strict=True))

    @defer.inlineCallbacks
    def test_failover(self):
        """Fail closed during the switch, follow the new master after it."""
        replicas, gateway = self.replicas, self.gateway
        served = {"before": [], "during": [], "after": []}

        # Before: a spent single-use token and a revoked session.
        spent = replicas.mint()
        self.assertEqual((yield replicas.outcome(gateway, spent)), "allowed")
        self.assertEqual((yield replicas.outcome(gateway, spent)), "invalid_token")
        served["before"].append(spent)
        replicas.revoke("session-before")
        yield replicas.first_refusal(gateway, "session-before", time.monotonic(), timeout=5)
        self.assertTrue(self.replicated(self.group.initial_master))

        # During: the replica to be promoted is frozen (it lags), the
        # sentinel's order to promote it is queued first, then claims reach
        # the master. A claim the master takes now never reaches the new
        # master: the replica drops its link to the old one, unread, when it
        # obeys. Without replica acknowledgement those tokens would be
        # served here and served again after the switch.
        old = self.group.master_port()
        unstall = self.group.stall(self.group.replica_port(), STALL)
        self.addCleanup(unstall)
        self.group.failover()
        yield task.deferLater(reactor, ORDER_QUEUED, lambda: None)
        seen = set()
        started = time.monotonic()
        while not served["after"]:
            switched = self.group.master_port() != old
            for token, outcome in (yield self.spend(CONCURRENT)):
                seen.add(outcome)
                if outcome == "allowed":
                    served["after" if switched else "during"].append(token)
            replay = yield replicas.outcome(gateway, spent)
            self.assertIn(replay, {"invalid_token"} | FAIL_CLOSED, "a replay got through")
            revoked = yield replicas.outcome(
                gateway, replicas.mint(use="ambient", session_id="session-before")
            )
            self.assertIn(revoked, {"session_revoked"} | FAIL_CLOSED, "a revoked session passed")
            self.assertLess(
                time.monotonic() - started, SWITCH_TIMEOUT, f"never served again: {seen}"
            )
            yield task.deferLater(reactor, 0.05, lambda: None)
        new = self.group.master_port()
        self.assertNotEqual(new, old)
        self.assertEqual(self.group.role(new), "master")
        replicas.redis_port = new
        # The switch was seen failing closed, not skipped over.
        self.assertIn("replay_check_unavailable", seen)

        # After: every token served at any moment, before, during or after
        # the switch, is spent for good on the new master.
        for phase, tokens in served.items():
            for index, token in enumerate(tokens):
                outcome = yield replicas.outcome(gateway, token)
                self.assertEqual(
                    outcome, "invalid_token", f"token {index} of {len(tokens)} served {phase}"
                )
        # A revocation published on the new master is enforced.
        since = time.monotonic()
        replicas.revoke("session-after")
        yield replicas.first_refusal(gateway, "session-after", since, timeout=5)
        self.assertEqual(
            (
                yield replicas.outcome(
                    gateway, replicas.mint(use="ambient", session_id="session-before")
                )
            ),
            "session_revoked",
        )
        deadline = time.monotonic() + 10
        while (yield self.ready_status()) != 200:
            self.assertLess(time.monotonic(), deadline, "/ready never came back to 200")
            yield task.deferLater(reactor, 0.1, lambda: None)


class MasterWatchTests(TestCase):
    """
    The gateway's Redis clients move to a new master as soon as the sentinels
    name it, even when the old master is still up and still a master (cut
    off from the sentinels, not from the gateway): txredisapi alone would ask
    the sentinels only on its next reconnection, which never comes.
    """

    timeout = 120

    def setUp(self):
        self.group = SentinelGroup(self.mktemp(), isolated_old_master=True)
        self.addCleanup(self.group.stop)
        self.group.start()
        self.address = parse_redis_url(self.group.url)

    @defer.inlineCallbacks
    def switch(self):
        """Fail over; fires with the new master's port once it takes writes."""
        old = self.group.master_port()
        self.group.failover()
        new = yield self.group.wait_for_new_master(old)
        # The point of this setup: the old master did not step down.
        self.assertEqual(self.group.role(old), "master")
        return new

    def settle(self):
        """
        Let the reactor run once more after closing: txredisapi hands a
        reply that arrived while a connection closed to a zero-delay call.
        """
        return task.deferLater(reactor, 0.05, lambda: None)

    def on_node(self, port: int, *command):
        client = self.group.client(port)
        try:
            return client.call(*command)
        finally:
            client.close()

    @defer.inlineCallbacks
    def test_pool_follows_the_master(self):
        """Writes through the pool land on the new master after the switch."""
        redis = connect_redis(self.address, reactor)
        self.addCleanup(self.settle)
        self.addCleanup(close_redis, redis)
        self.assertEqual((yield redis.set("before", "1")), "OK")
        self.assertEqual(self.on_node(self.group.initial_master, "GET", "before"), "1")
        new = yield self.switch()

        @defer.inlineCallbacks
        def landed_on_new_master():
            d = defer.maybeDeferred(redis.set, "after", "1")
            d.addTimeout(1.0, reactor)
            try:
                yield d
            except Exception:
                return False
            return self.on_node(new, "GET", "after") == "1"

        yield wait_until(landed_on_new_master, timeout=15.0, interval=0.1)

    @defer.inlineCallbacks
    def test_revocation_follower_follows_the_master(self):
        """A revocation published on the new master reaches the follower's store."""
        store = RevocationStore(reactor)
        follower = RevocationFollower(self.address, store, None, reactor, block_ms=500)
        follower.startService()
        self.addCleanup(self.settle)
        self.addCleanup(follower.stopService)
        yield follower.when_ready()
        new = yield self.switch()
        self.on_node(new, "XADD", REVOCATION_STREAM, "*", "zone_id", "z", "session_id", "s-new")
        yield wait_until(lambda: store.is_revoked("z", "s-new"), timeout=15.0, interval=0.1)


class PasswordTests(TestCase):
    """
    C{redis+sentinel://:password@host:port/master} (SPEC 16): the password
    is the data nodes' (C{requirepass}); the sentinels are asked without it.
    """

    timeout = 120

    def setUp(self):
        self.password = "node-Pass-" + secrets.token_hex(8)
        self.group = SentinelGroup(self.mktemp(), password=self.password)
        self.addCleanup(self.group.stop)
        self.group.start()
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def guard(self, url: str) -> RedisReplayGuard:
        """A replica-acknowledged replay guard on its own pool through C{url}."""
        redis = connect_redis(parse_redis_url(url), reactor, pool_size=2)
        self.addCleanup(task.deferLater, reactor, 0.05, lambda: None)
        self.addCleanup(close_redis, redis)
        return RedisReplayGuard(redis, reactor, timeout=2.0, min_replicas=1)

    @defer.inlineCallbacks
    def test_claims_through_a_failover(self):
        """
        Claims authenticate to the master, wait for its replica, and go on
        after a failover (the nodes authenticate to each other); the password
        appears in no log event.
        """
        self.assertIn(f":{self.password}@", self.group.url)
        guard = self.guard(self.group.url)
        self.assertIs((yield guard.claim("zone-p", "jti-before", "r1", 60_000)), True)
        self.assertIs((yield guard.claim("zone-p", "jti-before", "r2", 60_000)), False)

        old = self.group.master_port()
        self.group.failover()
        yield self.group.wait_for_new_master(old)

        @defer.inlineCallbacks
        def claimed_on_new_master():
            try:
                return (yield guard.claim("zone-p", uuid.uuid4().hex, "r3", 60_000))
            except ReplayCheckUnavailable:
                return False

        yield wait_until(claimed_on_new_master, timeout=30.0, interval=0.1)
        self.assertIs((yield guard.claim("zone-p", "jti-before", "r4", 60_000)), False)
        shown = "\n".join(repr(event) + formatEvent(event) for event in self.logged)
        self.assertNotIn(self.password, shown)

    @defer.inlineCallbacks
    def test_password_required(self):
        """Without the password the nodes refuse the claim: it fails closed."""
        guard = self.guard(self.group.url.replace(f":{self.password}@", ""))
        yield self.assertFailure(
            guard.claim("zone-p", "jti-1", "r1", 60_000), ReplayCheckUnavailable
        )


class ReplicatedReplayGuardTests(InspectedRedisKeys, ReplayGuardContract, TestCase):
    """
    L{RedisReplayGuard} waiting for a replica passes the replay guard
    contract on a real master and replica, every claim read back from the
    replica: once a claim answered C{True}, the replica holds it.
    """

    #: A claim makes two round trips and the expiry test reads it back
    #: before it expires: room for a loaded machine (2 cores, several
    #: suites), where 200 ms between two steps were seen.
    ttl_ms = 1000

    def make_guard(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        # The replica's first sync starts at once, not after the default 5 s.
        master = PrivateRedis(extra_arguments=("--repl-diskless-sync-delay", "0"))
        self.addCleanup(master.stop)
        master.start()
        replica = PrivateRedis(
            extra_arguments=("--dir", directory, "--replicaof", "127.0.0.1", str(master.port))
        )
        self.addCleanup(replica.stop)
        replica.start()
        self.inspect = replica.client()
        self.addCleanup(self.inspect.close)
        # Until its first acknowledgement (sent once a second) a replica
        # that has just synced acknowledges nothing: claims would fail
        # closed for up to a second. Start once one write was acknowledged.
        probe = master.client()
        try:
            probe.call("SET", "caracal-test:sync-probe", "1")
            while probe.call("WAIT", 1, 100) < 1:
                pass
        finally:
            probe.close()
        redis = connect_redis(master.address, reactor, pool_size=2)
        self.addCleanup(task.deferLater, reactor, 0.05, lambda: None)
        self.addCleanup(close_redis, redis)
        return RedisReplayGuard(redis, reactor, timeout=2.0, min_replicas=1)

    def new_zone(self) -> str:
        return f"zone-{uuid.uuid4().hex[:8]}"
