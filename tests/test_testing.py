# -*- test-case-name: tests.test_testing -*-
"""
The in-memory doubles of L{caracal.gateway.testing} provide their interfaces
and pass the same contract suites (L{tests.support.contracts}) as the real
implementations; so do the real implementations that need no network
(L{JWKSCache} over an in-memory fetch, L{UpstreamGuard} over an in-memory
resolver, L{RedisAuditLog} and the revocation follower over the in-memory
Redis, L{Metrics}).
"""

from __future__ import annotations

import json
import socket

from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from twisted.internet import defer, task
from twisted.trial import unittest

from caracal.gateway.audit import RedisAuditLog
from caracal.gateway.denials import Denial
from caracal.gateway.jwks import JWKSCache
from caracal.gateway.metrics import Metrics
from caracal.gateway.revocations import RevocationFollower, RevocationStore
from caracal.gateway.testing import (
    MemoryAuditLog,
    MemoryForwarder,
    MemoryKeySource,
    MemoryRedisServer,
    MemoryResolver,
    MemoryTokenExchange,
    MemoryUpstreamGuard,
)
from caracal.gateway.upstream import PinnedUpstream, UpstreamGuard, parse_upstream
from tests.support.contracts import (
    AuditLogContract,
    ForwarderContract,
    KeySourceContract,
    MetricsContract,
    RedisStreamContract,
    RevocationsContract,
    TokenExchangeContract,
    UpstreamGuardContract,
)

NOW = 1_800_000_000.0


def _clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(NOW)
    return clock


class MemoryKeySourceTests(KeySourceContract, unittest.TestCase):
    """L{MemoryKeySource} passes the key source contract."""

    def make_source(self):
        public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        return MemoryKeySource({"zone-a": {"k1": public_key}}), "zone-a", "k1", public_key


class JWKSCacheContractTests(KeySourceContract, unittest.TestCase):
    """L{JWKSCache} over an in-memory JWKS passes the key source contract."""

    def make_source(self):
        public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        jwk = ECAlgorithm.to_jwk(public_key, as_dict=True)
        jwk.update(kid="k1", alg="ES256")
        cache = JWKSCache(lambda zone_id: defer.succeed({"keys": [jwk]}), _clock())
        return cache, "zone-a", "k1", public_key


class MemoryTokenExchangeTests(TokenExchangeContract, unittest.TestCase):
    """L{MemoryTokenExchange} passes the token exchange contract."""

    def make_exchange(self):
        exchange = MemoryTokenExchange()
        exchange.refused.add("refused-token")
        return exchange, "good-token", "refused-token"


class MemoryUpstreamGuardTests(UpstreamGuardContract, unittest.TestCase):
    """L{MemoryUpstreamGuard} passes the upstream guard contract."""

    def make_guard(self, hosts):
        return MemoryUpstreamGuard(hosts)


class UpstreamGuardContractTests(UpstreamGuardContract, unittest.TestCase):
    """L{UpstreamGuard} over L{MemoryResolver} passes the upstream guard contract."""

    def make_guard(self, hosts):
        return UpstreamGuard(MemoryResolver(hosts))


class MemoryAuditLogTests(AuditLogContract, unittest.TestCase):
    """L{MemoryAuditLog} passes the audit log contract."""

    def make_log(self):
        return MemoryAuditLog(_clock())

    def stored(self, request_id):
        return defer.succeed([e for e in self.log.events if e["request_id"] == request_id])


class RedisAuditLogOnMemoryRedisTests(AuditLogContract, unittest.TestCase):
    """L{RedisAuditLog} on L{MemoryRedisServer} passes the audit log contract."""

    def make_log(self):
        clock = _clock()
        self.redis = MemoryRedisServer(clock)
        return RedisAuditLog(self.redis.connect(), clock=clock, stream="audit")

    def stored(self, request_id):
        events = []
        for _entry_id, flat in self.redis.streams.get("audit", []):
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            event = json.loads(fields["data"])
            if event["request_id"] == request_id:
                events.append(event)
        return defer.succeed(events)


class MemoryRedisStreamTests(RedisStreamContract, unittest.TestCase):
    """L{MemoryRedisConnection} answers stream commands as Redis does."""

    def connect(self):
        self.clock = _clock()
        self.server = MemoryRedisServer(self.clock)
        return self.server.connect()

    def new_stream(self):
        return "stream"

    def let_block_expire(self, seconds):
        self.clock.advance(seconds)
        return defer.succeed(None)

    def test_disconnect_fails_pending(self):
        """Disconnecting fails a blocked read and every later command."""
        reading = self.connection.execute_command(
            "XREAD", "BLOCK", 1000, "COUNT", 1, "STREAMS", self.stream, "0-0"
        )
        self.connection.disconnect()
        self.failureResultOf(reading, ConnectionError)
        self.failureResultOf(self.connection.execute_command("PING"), ConnectionError)


def _pinned(url: str = "http://tools.example/") -> PinnedUpstream:
    return PinnedUpstream(parse_upstream(url), "203.0.114.7", socket.AF_INET)


class MemoryForwarderTests(ForwarderContract, unittest.TestCase):
    """L{MemoryForwarder} passes the forwarder contract."""

    def make_forwarder(self):
        return MemoryForwarder()

    def answering(self, status):
        self.forwarder.status = status
        self.forwarder.body = b"upstream says %d" % (status,)
        return _pinned()

    def unreachable(self):
        self.forwarder.denial = Denial(
            502, "upstream_unreachable", "the upstream could not be reached", "upstream_errors"
        )
        return _pinned()


class RevocationStoreTests(RevocationsContract, unittest.TestCase):
    """L{RevocationStore} fed by hand passes the revocations contract."""

    def make_revocations(self):
        self.store = RevocationStore(_clock())
        return self.store

    def revoke(self, zone_id, session_id):
        self.store.revoke(zone_id, session_id)
        return defer.succeed(None)


class FollowedOnMemoryRedisTests(RevocationsContract, unittest.TestCase):
    """
    L{RevocationStore} fed by a L{RevocationFollower} reading
    L{MemoryRedisServer} passes the revocations contract.
    """

    def make_revocations(self):
        clock = _clock()
        self.redis = MemoryRedisServer(clock)
        store = RevocationStore(clock)
        follower = RevocationFollower(
            None, store, None, clock, stream="revocations", connect=self.redis.connect
        )
        follower.startService()
        self.addCleanup(follower.stopService)
        return follower.when_ready().addCallback(lambda _: store)

    def revoke(self, zone_id, session_id):
        # The follower's blocked XREAD answers as the entry is added.
        self.redis.add("revocations", {"zone_id": zone_id, "session_id": session_id})
        return defer.succeed(None)


class MetricsTests(MetricsContract, unittest.TestCase):
    """L{Metrics}, the one implementation (in memory already), passes the metrics contract."""

    def make_metrics(self):
        return Metrics()
