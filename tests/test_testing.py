# -*- test-case-name: tests.test_testing -*-
"""
The in-memory doubles of L{caracal.gateway.testing} provide their interfaces
and pass the same contract suites (L{tests.support.contracts}) as the real
implementations; so do the real implementations that need no network
(L{JWKSCache} over an in-memory fetch, L{UpstreamGuard} over an in-memory
resolver, L{RedisAuditLog} over the in-memory Redis).
"""

from __future__ import annotations

import json

from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from caracal.gateway.audit import RedisAuditLog
from caracal.gateway.interfaces import IForwarder, IMetrics, IRevocations
from caracal.gateway.jwks import JWKSCache
from caracal.gateway.metrics import Metrics
from caracal.gateway.revocations import RevocationStore
from caracal.gateway.testing import (
    MemoryAuditLog,
    MemoryForwarder,
    MemoryKeySource,
    MemoryRedisServer,
    MemoryResolver,
    MemoryTokenExchange,
    MemoryUpstreamGuard,
)
from caracal.gateway.upstream import UpstreamGuard
from tests.support.contracts import (
    AuditLogContract,
    KeySourceContract,
    RedisStreamContract,
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


class DeclarationTests(unittest.SynchronousTestCase):
    """The collaborators without a contract suite of their own still provide their interfaces."""

    def test_forwarder(self):
        """L{MemoryForwarder} provides L{IForwarder}."""
        self.assertTrue(verifyObject(IForwarder, MemoryForwarder()))

    def test_metrics(self):
        """L{Metrics} (in memory already) provides L{IMetrics}."""
        self.assertTrue(verifyObject(IMetrics, Metrics()))

    def test_revocations(self):
        """L{RevocationStore} (in memory already) provides L{IRevocations}."""
        self.assertTrue(verifyObject(IRevocations, RevocationStore(_clock())))
