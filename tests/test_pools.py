# -*- test-case-name: tests.test_pools -*-
"""Outbound pools keep connections alive and stay out of the log."""

from io import StringIO

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway.forward import Forwarder
from caracal.gateway.logs import json_log_observer
from caracal.gateway.pools import IDLE_PER_ORIGIN, persistent_pool
from caracal.gateway.sts import STSClient


class PoolTests(SynchronousTestCase):
    def test_persistentAndBounded(self):
        """
        The pool keeps connections, at most C{max_per_host} per host for C{idle_timeout} seconds.
        """
        pool = persistent_pool(MemoryReactorClock(), max_per_host=7, idle_timeout=42)
        self.assertTrue(pool.persistent)
        self.assertEqual((pool.maxPersistentPerHost, pool.cachedConnectionTimeout), (7, 42))

    def test_defaults_keep_a_busy_workers_connections(self):
        """
        The forwarder's and the STS client's own pools keep
        L{IDLE_PER_ORIGIN} idle connections per origin, enough for the calls
        a busy worker has in flight (fewer made it open and close
        connections under load).
        """
        reactor = MemoryReactorClock()
        forwarder = Forwarder(reactor, None, timeout=5.0)
        client = STSClient("http://127.0.0.1:9", reactor)
        for pool in (forwarder.pool, client.pool):
            self.assertEqual(pool.maxPersistentPerHost, IDLE_PER_ORIGIN)
        self.assertGreaterEqual(IDLE_PER_ORIGIN, 64)

    def test_factory_noise_filtered_by_namespace(self):
        """
        The pool's own factory (Twisted's, found through the pool's private
        C{_factory}: this test fails loudly if Twisted moves it) logs
        "Starting factory" under a namespace the gateway's observer quiets.
        """
        pool = persistent_pool(MemoryReactorClock(), max_per_host=1, idle_timeout=1)
        factory = pool._factory(lambda protocol: None, "endpoint")
        self.assertTrue(factory.noisy, "Twisted's own, not a subclass")
        out = StringIO()
        events = []
        observer = json_log_observer(out, "info")

        def both(event):
            events.append(event)
            observer(event)

        globalLogPublisher.addObserver(both)
        self.addCleanup(globalLogPublisher.removeObserver, both)
        factory.doStart()
        factory.doStop()
        self.assertEqual(
            [formatEvent(e)[:16] for e in events], ["Starting factory", "Stopping factory"]
        )
        self.assertTrue(all(e["log_namespace"].startswith("twisted.web.client.") for e in events))
        self.assertEqual(out.getvalue(), "")

    def test_clientsUsePersistentPools(self):
        """The STS client and the forwarder keep their connections alive."""
        reactor = MemoryReactorClock()
        for pool in (
            Forwarder(reactor, None, 1.0).pool,
            STSClient("http://127.0.0.1:1", reactor).pool,
        ):
            self.assertTrue(pool.persistent)
