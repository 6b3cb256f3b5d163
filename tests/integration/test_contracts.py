# -*- test-case-name: tests.integration.test_contracts -*-
"""
The real implementations pass the contract suites their in-memory doubles
pass in C{tests.test_testing}: the Redis connection the revocation follower
uses and L{RedisAuditLog} on the shared Redis (streams of the test's own),
L{STSClient} and L{JWKSCache} against the development STS on 127.0.0.1,
L{Forwarder} to a real upstream on 127.0.0.1, and L{RevocationStore} fed by
its follower from a stream of the test's own on the shared Redis.
"""

from __future__ import annotations

import json
import socket

from twisted.internet import defer, reactor
from twisted.trial import unittest

from caracal.gateway.audit import RedisAuditLog
from caracal.gateway.forward import Forwarder
from caracal.gateway.jwks import JWKSCache
from caracal.gateway.redisconn import blocking_connection, close_redis
from caracal.gateway.revocations import (
    RevocationFollower,
    RevocationStore,
    parse_entries,
    publish_revocation,
)
from caracal.gateway.sts import STSClient
from caracal.gateway.upstream import PinnedUpstream, parse_upstream
from tests.support.contracts import (
    AuditLogContract,
    ForwarderContract,
    KeySourceContract,
    RedisStreamContract,
    RevocationsContract,
    TokenExchangeContract,
)
from tests.support.redis import SyncRedis, redis_namespace, shared_address
from tests.support.sts import start_dev_sts, stop_listening
from tests.support.upstreams import LocalUpstream
from tests.support.waiting import free_port, wait_until


class RedisStreams:
    """A stream name of the test's own on the shared Redis, deleted afterwards."""

    def own_stream(self, kind: str) -> str:
        stream = f"{redis_namespace(kind)}.stream"
        sync = SyncRedis()
        self.addCleanup(sync.close)
        self.addCleanup(sync.call, "DEL", stream)
        return stream

    def own_connection(self):
        connection = blocking_connection(shared_address(), reactor)
        self.addCleanup(close_redis, connection)
        return connection


class RedisStreamTests(RedisStreams, RedisStreamContract, unittest.TestCase):
    """A txredisapi connection to the real Redis answers as L{MemoryRedisConnection} does."""

    def connect(self):
        return self.own_connection()

    def new_stream(self):
        return self.own_stream("contract")

    def let_block_expire(self, seconds):
        # The real server ends the block itself: nothing to drive.
        return defer.succeed(None)


class RedisAuditLogContractTests(RedisStreams, AuditLogContract, unittest.TestCase):
    """L{RedisAuditLog} on the real Redis passes the audit log contract."""

    def make_log(self):
        self.stream = self.own_stream("audit")
        return RedisAuditLog(self.own_connection(), clock=reactor, stream=self.stream)

    def stored(self, request_id):
        sync = SyncRedis()
        self.addCleanup(sync.close)
        reply = sync.call("XRANGE", self.stream, "-", "+")
        events = [json.loads(fields["data"]) for _id, fields in parse_entries(reply)]
        return defer.succeed([event for event in events if event["request_id"] == request_id])


class DevSTS:
    """The development STS on a free port of 127.0.0.1, stopped afterwards."""

    @defer.inlineCallbacks
    def start_sts(self):
        sts, base_url, port = yield start_dev_sts(reactor)
        self.addCleanup(stop_listening, port)
        client = STSClient(base_url, reactor, timeout=5.0)
        self.addCleanup(client.close)
        return sts, client


class STSClientContractTests(DevSTS, TokenExchangeContract, unittest.TestCase):
    """L{STSClient} against the development STS passes the token exchange contract."""

    @defer.inlineCallbacks
    def setUp(self):
        sts, self.client = yield self.start_sts()
        self.token = sts.mint("zone-a", "agent-1")
        TokenExchangeContract.setUp(self)

    def make_exchange(self):
        return self.client, self.token, "not-a-token"


class JWKSCacheOverSTSTests(DevSTS, KeySourceContract, unittest.TestCase):
    """L{JWKSCache} fetching from the development STS passes the key source contract."""

    @defer.inlineCallbacks
    def setUp(self):
        self.sts, self.client = yield self.start_sts()
        KeySourceContract.setUp(self)

    def make_source(self):
        zone = self.sts.zone_key("zone-a")
        cache = JWKSCache(self.client.fetch_jwks, reactor)
        return cache, "zone-a", zone.kid, zone.public_key


def pinned_to(url: str) -> PinnedUpstream:
    """C{url} pinned to 127.0.0.1, as L{UpstreamGuard} pins a checked upstream."""
    return PinnedUpstream(parse_upstream(url), "127.0.0.1", socket.AF_INET)


class ForwarderOnLoopbackTests(ForwarderContract, unittest.TestCase):
    """L{Forwarder} to a real upstream on 127.0.0.1 passes the forwarder contract."""

    def make_forwarder(self):
        self.upstream = LocalUpstream(reactor).start()
        self.addCleanup(self.upstream.stop)
        forwarder = Forwarder(reactor, None, timeout=5.0)
        self.addCleanup(forwarder.close)
        return forwarder

    def answering(self, status):
        return pinned_to(self.upstream.url(f"/status?code={status}"))

    def unreachable(self):
        # Refused at once: nothing listens on a free loopback port.
        return pinned_to(f"http://127.0.0.1:{free_port()}/")


def _entry_key(entry_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds), int(sequence)


class FollowedOnRedisTests(RedisStreams, RevocationsContract, unittest.TestCase):
    """
    L{RevocationStore} fed by a L{RevocationFollower} reading a stream of the
    test's own on the real Redis passes the revocations contract.
    """

    def make_revocations(self):
        self.stream = self.own_stream("revocations")
        self.publisher = self.own_connection()
        store = RevocationStore(reactor)
        self.follower = RevocationFollower(
            shared_address(), store, None, reactor, stream=self.stream
        )
        self.follower.startService()
        self.addCleanup(self.follower.stopService)
        return self.follower.when_ready().addCallback(lambda _: store)

    @defer.inlineCallbacks
    def revoke(self, zone_id, session_id):
        entry_id = yield publish_revocation(
            self.publisher, zone_id, session_id, stream=self.stream, clock=reactor
        )

        def read_past() -> bool:
            last = self.follower.last_id
            return last is not None and _entry_key(last) >= _entry_key(entry_id)

        # Applied once the follower has read the entry just added.
        yield wait_until(read_past)
