# -*- test-case-name: tests.test_pools -*-
"""Outbound pools keep connections alive and stay out of the log."""

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway.forward import Forwarder
from caracal.gateway.pools import persistent_pool
from caracal.gateway.sts import STSClient


class PoolTests(SynchronousTestCase):
    def test_persistentAndBounded(self):
        """
        The pool keeps connections, at most C{max_per_host} per host for C{idle_timeout} seconds.
        """
        pool = persistent_pool(MemoryReactorClock(), max_per_host=7, idle_timeout=42)
        self.assertTrue(pool.persistent)
        self.assertEqual((pool.maxPersistentPerHost, pool.cachedConnectionTimeout), (7, 42))

    def test_connectionsDoNotLogTheirFactories(self):
        """The pool's connection factories do not log every connection."""
        pool = persistent_pool(MemoryReactorClock(), max_per_host=1, idle_timeout=1)
        factory = pool._factory(lambda protocol: None, "endpoint")
        self.assertFalse(factory.noisy)

    def test_clientsUseQuietPools(self):
        """The forwarder and the STS client use persistent, quiet pools."""
        reactor = MemoryReactorClock()
        for pool in (
            Forwarder(reactor, None, 1.0).pool,
            STSClient("http://127.0.0.1:1", reactor).pool,
        ):
            self.assertFalse(pool._factory(lambda protocol: None, "endpoint").noisy)
            self.assertTrue(pool.persistent)
