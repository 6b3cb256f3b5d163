"""
Tests for L{caracal.gateway.replay}: the key rules, and the contract every
L{IReplayGuard} must honour (L{ReplayGuardContract}), run here against the
in-memory guard and in C{tests.integration.test_redis_stores} against Redis.
"""

from __future__ import annotations

import uuid

from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from caracal.gateway.config import ConfigError, GatewayConfig
from caracal.gateway.interfaces import IReplayGuard
from caracal.gateway.redisconn import _PoolHandler, _ReconnectingRedisFactory
from caracal.gateway.replay import (
    RedisReplayGuard,
    ReplayCheckUnavailable,
    ReplayKeyInvalid,
    replay_key,
)
from caracal.gateway.testing import MemoryReplayGuard
from tests import test_config
from tests.support.waiting import wait_until


class InspectedRedisKeys:
    """
    C{stored} and C{let_expire} of L{ReplayGuardContract} for a guard on a
    real Redis, read through C{self.inspect} (a L{tests.support.redis.SyncRedis}
    on the server that holds the claims).
    """

    def stored(self, zone_id, jti):
        key = replay_key(zone_id, jti)
        value = self.inspect.call("GET", key)
        if value is None:
            return defer.succeed(None)
        return defer.succeed((value, self.inspect.call("PTTL", key)))

    def let_expire(self, zone_id, jti, ttl_ms):
        key = replay_key(zone_id, jti)
        return wait_until(
            lambda: self.inspect.call("EXISTS", key) == 0, timeout=ttl_ms / 1000 + 2, interval=0.02
        )


class ReplayGuardContract:
    """
    Tests every replay guard passes. Subclasses (also L{unittest.TestCase})
    provide:

     - C{make_guard()}: a fresh guard;
     - C{stored(zone_id, jti)}: Deferred firing C{(request_id, ms left)} or
       C{None}, read from the guard's backing store;
     - C{let_expire(zone_id, jti, ttl_ms)}: Deferred firing once a claim made
       with C{ttl_ms} has expired;
     - C{new_zone()}: a zone id unique to the test.
    """

    ttl_ms = 200

    def setUp(self):
        self.guard = self.make_guard()

    def new_jti(self) -> str:
        return str(uuid.uuid4())

    def test_interface(self):
        """The guard provides L{IReplayGuard}."""
        self.assertTrue(verifyObject(IReplayGuard, self.guard))

    @defer.inlineCallbacks
    def test_first_use(self):
        """The first claim of a jti succeeds and records the request id."""
        zone, jti = self.new_zone(), self.new_jti()
        first = yield self.guard.claim(zone, jti, "request-1", 60_000)
        self.assertIs(first, True)
        request_id, left = yield self.stored(zone, jti)
        self.assertEqual(request_id, "request-1")
        self.assertGreater(left, 0)
        self.assertLessEqual(left, 60_000)

    @defer.inlineCallbacks
    def test_replay(self):
        """A second claim of the same jti is a replay and keeps the first request id."""
        zone, jti = self.new_zone(), self.new_jti()
        yield self.guard.claim(zone, jti, "request-1", 60_000)
        second = yield self.guard.claim(zone, jti, "request-2", 60_000)
        self.assertIs(second, False)
        request_id, _ = yield self.stored(zone, jti)
        self.assertEqual(request_id, "request-1")

    @defer.inlineCallbacks
    def test_zones_independent(self):
        """The same jti in two zones is two first uses."""
        zone_a, zone_b, jti = self.new_zone(), self.new_zone(), self.new_jti()
        self.assertIs((yield self.guard.claim(zone_a, jti, "request-1", 60_000)), True)
        self.assertIs((yield self.guard.claim(zone_b, jti, "request-2", 60_000)), True)
        self.assertIs((yield self.guard.claim(zone_a, jti, "request-3", 60_000)), False)

    @defer.inlineCallbacks
    def test_jti_with_colon_distinct(self):
        """Jtis containing colons do not collide with other jtis."""
        zone = self.new_zone()
        self.assertIs((yield self.guard.claim(zone, "a:b", "request-1", 60_000)), True)
        self.assertIs((yield self.guard.claim(zone, "a", "request-2", 60_000)), True)
        self.assertIs((yield self.guard.claim(zone, "a:b", "request-3", 60_000)), False)

    @defer.inlineCallbacks
    def test_expiry(self):
        """Once the ttl has passed, the jti can be claimed again."""
        zone, jti = self.new_zone(), self.new_jti()
        self.assertIs((yield self.guard.claim(zone, jti, "request-1", self.ttl_ms)), True)
        _, left = yield self.stored(zone, jti)
        self.assertLessEqual(left, self.ttl_ms)
        yield self.let_expire(zone, jti, self.ttl_ms)
        self.assertIsNone((yield self.stored(zone, jti)))
        self.assertIs((yield self.guard.claim(zone, jti, "request-2", self.ttl_ms)), True)

    @defer.inlineCallbacks
    def test_invalid_zone(self):
        """A zone id with a colon is refused with L{ReplayKeyInvalid}."""
        yield self.assertFailure(
            self.guard.claim("zone:x", self.new_jti(), "request-1", 60_000), ReplayKeyInvalid
        )

    @defer.inlineCallbacks
    def test_invalid_ttl(self):
        """A non-positive ttl is a programming error, refused with C{ValueError}."""
        yield self.assertFailure(
            self.guard.claim(self.new_zone(), self.new_jti(), "request-1", 0), ValueError
        )


class MemoryReplayGuardTests(ReplayGuardContract, unittest.TestCase):
    """L{MemoryReplayGuard} passes the replay guard contract (clock-driven, no sleeps)."""

    def make_guard(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        return MemoryReplayGuard(self.clock)

    def new_zone(self) -> str:
        return f"zone-{uuid.uuid4().hex[:8]}"

    def stored(self, zone_id, jti):
        return defer.succeed(self.guard.lookup(zone_id, jti))

    def let_expire(self, zone_id, jti, ttl_ms):
        self.clock.advance(ttl_ms / 1000.0)
        return defer.succeed(None)

    def test_not_expired_before_ttl(self):
        """One millisecond before the ttl the claim still holds."""
        zone, jti = self.new_zone(), self.new_jti()
        self.successResultOf(self.guard.claim(zone, jti, "request-1", 1000))
        self.clock.advance(0.999)
        self.assertIs(self.successResultOf(self.guard.claim(zone, jti, "request-2", 1000)), False)
        self.assertEqual(self.guard.lookup(zone, jti), ("request-1", 1))

    def test_pruned(self):
        """Expired claims are dropped from memory."""
        for _ in range(5):
            self.successResultOf(self.guard.claim(self.new_zone(), self.new_jti(), "r", 1000))
        self.assertEqual(len(self.guard), 5)
        self.clock.advance(1)
        self.assertEqual(len(self.guard), 0)


class ReplayKeyTests(unittest.SynchronousTestCase):
    """The replay key format and the rules keeping caller strings out of trouble."""

    def test_format(self):
        """The key is the SPEC's C{seen:jti:<zone_id>:<jti>}."""
        self.assertEqual(replay_key("zone-1", "abc"), "seen:jti:zone-1:abc")
        self.assertEqual(replay_key("zone-1", "a:b"), "seen:jti:zone-1:a:b")

    def test_refused(self):
        """Empty, oversized, control-character and colon-zone parts are refused."""
        refused = [
            ("", "jti"),
            ("zone", ""),
            ("zone:1", "jti"),
            ("z" * 257, "jti"),
            ("zone", "j" * 257),
            ("zone", "\u00e9" * 129),  # 258 UTF-8 bytes
            ("zone", "a\nb"),
            ("zone\r", "jti"),
            ("zone", "a\x00"),
            ("zone", "a\x7f"),
            ("zone", "a\x85"),
            (None, "jti"),
            ("zone", b"jti"),
        ]
        for zone_id, jti in refused:
            with self.assertRaises(ReplayKeyInvalid, msg=repr((zone_id, jti))):
                replay_key(zone_id, jti)

    def test_control_range_edges(self):
        """Exactly C0 (to 0x1f), DEL and C1 (0x7f-0x9f) are refused; their neighbours pass."""
        for code in (0x00, 0x1F, 0x7F, 0x9F):
            with self.assertRaises(ReplayKeyInvalid, msg=hex(code)):
                replay_key("zone", "a" + chr(code))
        for code in (0x20, 0x7E, 0xA0, 0x2028):
            self.assertTrue(replay_key("zone", "a" + chr(code)).endswith(chr(code)), hex(code))

    def test_limits_accepted(self):
        """Exactly 256 bytes and non-ASCII printable characters are fine."""
        self.assertTrue(replay_key("z" * 256, "j" * 256).endswith("j" * 256))
        self.assertEqual(replay_key("zone", "\u00e9t\u00e9"), "seen:jti:zone:\u00e9t\u00e9")

    def test_claim_invalid_is_errback(self):
        """A refused key reaches the caller as an errback, not an exception."""
        guard = MemoryReplayGuard(task.Clock())
        self.failureResultOf(guard.claim("zone", "a\nb", "r", 1000), ReplayKeyInvalid)


class StalledRedis:
    """A Redis whose C{SET} never answers; counts the commands cancelled."""

    def __init__(self):
        self.cancelled = 0

    def set(self, *arguments, **options):
        return defer.Deferred(lambda _: setattr(self, "cancelled", self.cancelled + 1))


class RedisReplayGuardCancellationTests(unittest.SynchronousTestCase):
    """A claim cancelled by its caller is dropped, and is not a Redis failure."""

    def test_cancelled_claim(self):
        """The pending command is cancelled and the claim fails with CancelledError."""
        clock = task.Clock()
        redis = StalledRedis()
        guard = RedisReplayGuard(redis, clock, timeout=0.5)
        d = guard.claim("zone-a", "jti-1", "req-1", 1000)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(redis.cancelled, 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timeout_still_unavailable(self):
        """A claim Redis does not answer in time is still L{ReplayCheckUnavailable}."""
        clock = task.Clock()
        guard = RedisReplayGuard(StalledRedis(), clock, timeout=0.5)
        d = guard.claim("zone-a", "jti-1", "req-1", 1000)
        clock.advance(0.5)
        self.assertEqual(
            str(self.failureResultOf(d, ReplayCheckUnavailable).value), "no reply in time"
        )


def claim_pool(size: int, clock):
    """
    A txredisapi pool of C{size} connections, as L{connect_redis} builds it,
    each connected to a L{StringTransport}: what each connection was sent
    is in its transport, and a test answers with C{dataReceived}.
    """
    factory = _ReconnectingRedisFactory(
        uuid="test",
        dbid=None,
        poolsize=size,
        isLazy=True,
        handler=_PoolHandler,
        charset="utf-8",
        convertNumbers=False,
    )
    factory.metrics = None
    factory.clock = clock
    connections = []
    for _ in range(size):
        connection = factory.protocol(charset="utf-8", convertNumbers=False)
        connection.factory = factory
        connection.makeConnection(StringTransport())
        factory.addConnection(connection)
        connections.append(connection)
    return factory.handler, connections


def sent(connection) -> list[list[str]]:
    """The commands written to C{connection} so far, each as its arguments."""
    commands = []
    lines = connection.transport.value().decode("utf-8").split("\r\n")
    index = 0
    while index < len(lines) and lines[index]:
        count = int(lines[index][1:])
        commands.append([lines[index + 2 + 2 * n] for n in range(count)])
        index += 1 + 2 * count
    return commands


class ReplicatedClaimTests(unittest.SynchronousTestCase):
    """
    L{RedisReplayGuard} with C{min_replicas}: a claim counts once a replica
    holds it (C{SET NX PX} then C{WAIT} on the same connection), otherwise
    it fails closed.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.redis, self.connections = claim_pool(2, self.clock)
        self.guard = RedisReplayGuard(self.redis, self.clock, timeout=0.5, min_replicas=1)

    def claim(self, jti="jti-1"):
        return self.guard.claim("zone-a", jti, "req-1", 60_000)

    def test_set_and_wait_on_one_connection(self):
        """SET NX PX and WAIT go out together on one connection, the other stays idle."""
        self.claim()
        first, second = self.connections
        self.assertEqual(
            sent(first),
            [
                ["SET", "seen:jti:zone-a:jti-1", "req-1", "PX", "60000", "NX"],
                ["WAIT", "1", "250"],
            ],
        )
        self.assertEqual(sent(second), [])

    def test_connection_held_until_acknowledged(self):
        """A second claim in flight gets the other connection, not a place behind WAIT."""
        self.claim("jti-1")
        self.claim("jti-2")
        first, second = self.connections
        self.assertEqual([command[0] for command in sent(first)], ["SET", "WAIT"])
        self.assertEqual(sent(second)[0][1], "seen:jti:zone-a:jti-2")

    def test_acknowledged(self):
        """WAIT answering 1: claimed."""
        d = self.claim()
        self.connections[0].dataReceived(b"+OK\r\n")
        self.assertNoResult(d)
        self.connections[0].dataReceived(b":1\r\n")
        self.assertIs(self.successResultOf(d), True)

    def test_not_acknowledged(self):
        """WAIT answering 0: the replay check is unavailable (the key is set all the same)."""
        d = self.claim()
        self.connections[0].dataReceived(b"+OK\r\n:0\r\n")
        failure = self.failureResultOf(d, ReplayCheckUnavailable)
        self.assertEqual(str(failure.value), "claim acknowledged by 0 of 1 replicas in time")

    def test_more_replicas_asked(self):
        """With min_replicas 2, one acknowledgement is not enough."""
        guard = RedisReplayGuard(self.redis, self.clock, timeout=0.5, min_replicas=2)
        d = guard.claim("zone-a", "jti-1", "req-1", 60_000)
        self.assertEqual(sent(self.connections[0])[1], ["WAIT", "2", "250"])
        self.connections[0].dataReceived(b"+OK\r\n:1\r\n")
        self.failureResultOf(d, ReplayCheckUnavailable)

    def test_timeout(self):
        """No answer within the guard's timeout: unavailable, and the connection stays lent."""
        d = self.claim()
        self.connections[0].dataReceived(b"+OK\r\n")
        self.clock.advance(0.5)
        failure = self.failureResultOf(d, ReplayCheckUnavailable)
        self.assertEqual(str(failure.value), "no reply in time")
        self.claim("jti-2")
        self.assertEqual(len(sent(self.connections[0])), 2)
        self.assertEqual(len(sent(self.connections[1])), 2)
        # The late reply is dropped quietly and the connection is lent again.
        self.connections[0].dataReceived(b":0\r\n")
        self.claim("jti-3")
        self.assertEqual(len(sent(self.connections[0])), 4)

    def test_replay(self):
        """A replay is refused at once: the WAIT reply is not awaited."""
        d = self.claim()
        self.connections[0].dataReceived(b"$-1\r\n")
        self.assertIs(self.successResultOf(d), False)
        self.connections[0].dataReceived(b":0\r\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_set_refused(self):
        """A master refusing the write (READONLY, NOREPLICAS): unavailable."""
        d = self.claim()
        self.connections[0].dataReceived(
            b"-NOREPLICAS Not enough good replicas to write.\r\n:0\r\n"
        )
        failure = self.failureResultOf(d, ReplayCheckUnavailable)
        self.assertIn("NOREPLICAS", str(failure.value))

    def test_connection_lost(self):
        """A connection lost before the replies: unavailable, no unhandled error."""
        d = self.claim()
        self.connections[0].connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ReplayCheckUnavailable)

    def test_cancelled(self):
        """A claim cancelled by its caller fails with CancelledError, no timer left."""
        d = self.claim()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_wait_without_replicas(self):
        """min_replicas 0 (plain Redis by default): SET NX alone, as before."""
        guard = RedisReplayGuard(self.redis, self.clock, timeout=0.5)
        d = guard.claim("zone-a", "jti-1", "req-1", 60_000)
        # A plain command goes to any connection of the pool, picked at random.
        (used,) = [connection for connection in self.connections if sent(connection)]
        self.assertEqual([command[0] for command in sent(used)], ["SET"])
        used.dataReceived(b"+OK\r\n")
        self.assertIs(self.successResultOf(d), True)


class PackedClaimTests(unittest.SynchronousTestCase):
    """
    L{RedisReplayGuard} on a pool of L{caracal.gateway.redisconn}: the C{SET}
    is packed once and sent with C{send_packed}, with the bytes and outcomes
    of txredisapi's C{set}.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.redis, (self.connection,) = claim_pool(1, self.clock)
        self.guard = RedisReplayGuard(self.redis, self.clock, timeout=0.5)

    def claim(self, jti="jti-1"):
        return self.guard.claim("zone-a", jti, "req-1", 60_000)

    def test_bytes(self):
        """Exactly what txredisapi's set(..., pexpire=, only_if_not_exists=True) writes."""
        sent_by_txredisapi = claim_pool(1, self.clock)
        sent_by_txredisapi[0].set(
            "seen:jti:zone-a:jti-1", "req-1", pexpire=60_000, only_if_not_exists=True
        )
        self.claim()
        self.assertEqual(
            self.connection.transport.value(), sent_by_txredisapi[1][0].transport.value()
        )

    def test_first_use_and_replay(self):
        """OK: first use; nil: a replay."""
        first, second = self.claim(), self.claim()
        self.connection.dataReceived(b"+OK\r\n$-1\r\n")
        self.assertIs(self.successResultOf(first), True)
        self.assertIs(self.successResultOf(second), False)

    def test_error_reply(self):
        """An error reply: unavailable, naming the error."""
        d = self.claim()
        self.connection.dataReceived(b"-MISCONF cannot persist\r\n")
        self.assertIn("MISCONF", str(self.failureResultOf(d, ReplayCheckUnavailable).value))

    def test_unexpected_reply(self):
        """Neither OK nor nil: unavailable."""
        d = self.claim()
        self.connection.dataReceived(b":1\r\n")
        self.failureResultOf(d, ReplayCheckUnavailable)

    def test_timeout_then_late_reply(self):
        """
        No reply in time: unavailable; its late reply is dropped and the next
        claim gets its own.
        """
        late = self.claim("jti-1")
        self.clock.advance(0.5)
        self.assertEqual(
            str(self.failureResultOf(late, ReplayCheckUnavailable).value), "no reply in time"
        )
        d = self.claim("jti-2")
        self.connection.dataReceived(b"+OK\r\n$-1\r\n")
        self.assertIs(self.successResultOf(d), False)

    def test_connection_lost(self):
        """The connection lost before the reply: unavailable."""
        d = self.claim()
        self.connection.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ReplayCheckUnavailable)

    def test_no_connection_up(self):
        """No connection up: the claim waits for one (within its bound), then is sent."""
        self.connection.connected = 0
        d = self.claim()
        self.assertEqual(self.connection.transport.value(), b"")
        self.clock.advance(0.5)
        self.failureResultOf(d, ReplayCheckUnavailable)

    def test_unencodable(self):
        """A jti UTF-8 cannot encode (a lone surrogate) fails closed, as before."""
        d = self.claim("jti-\udcff")
        self.failureResultOf(d, ReplayCheckUnavailable)
        self.assertEqual(self.connection.transport.value(), b"")


class ReplayMinReplicasSettingTests(unittest.SynchronousTestCase):
    """C{REPLAY_MIN_REPLICAS}: its default follows the kind of C{REDIS_URL}."""

    sentinel_url = "redis+sentinel://:pw@127.0.0.1:26379,127.0.0.1:26380/caracal"

    def config(self, **overrides):
        return GatewayConfig.from_environ(test_config.dev(**overrides))

    def test_default_plain_redis(self):
        """A plain redis:// waits for no replica (one round trip, as before)."""
        config = self.config()
        self.assertEqual(config.replay_min_replicas, 0)
        self.assertEqual(config.redacted()["REPLAY_MIN_REPLICAS"], 0)

    def test_default_sentinel(self):
        """Behind Sentinel a claim waits for one replica by default."""
        self.assertEqual(self.config(REDIS_URL=self.sentinel_url).replay_min_replicas, 1)

    def test_explicit(self):
        """The setting wins over the default, either way."""
        self.assertEqual(
            self.config(REDIS_URL=self.sentinel_url, REPLAY_MIN_REPLICAS="0").replay_min_replicas,
            0,
        )
        self.assertEqual(self.config(REPLAY_MIN_REPLICAS="2").replay_min_replicas, 2)

    def test_malformed(self):
        """Not a number, or more replicas than any deployment has: refused, naming it."""
        for value, message in (
            ("one", "REPLAY_MIN_REPLICAS must be an integer"),
            ("-1", "REPLAY_MIN_REPLICAS must be between 0 and 16"),
            ("17", "REPLAY_MIN_REPLICAS must be between 0 and 16"),
        ):
            error = self.assertRaises(
                ConfigError, GatewayConfig.from_environ, test_config.dev(REPLAY_MIN_REPLICAS=value)
            )
            self.assertEqual(str(error), message)
