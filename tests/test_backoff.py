# -*- test-case-name: tests.test_backoff -*-
"""Tests for L{caracal.gateway.backoff}: the reconnection delays every client shares."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway import backoff
from caracal.gateway.backoff import reconnect_policy


class ReconnectPolicyTests(SynchronousTestCase):
    """Delays double from the initial one up to the cap; jitter stays bounded."""

    def test_doubles_up_to_the_cap(self) -> None:
        """Without jitter: 0.1, 0.2, 0.4, then the 0.5 s cap however long the outage."""
        policy = reconnect_policy(jitter=0)
        self.assertEqual(
            [round(policy(attempt), 3) for attempt in range(6)], [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
        )
        self.assertEqual(policy(10_000), backoff.MAX_DELAY)

    def test_jitter_is_bounded(self) -> None:
        """
        The default jitter adds at most L{backoff.JITTER} seconds (Twisted's
        own adds up to a second, too much for the 2 s recovery rule).
        """
        policy = reconnect_policy()
        delays = [policy(50) for _ in range(200)]
        self.assertTrue(all(0.5 <= delay <= 0.5 + backoff.JITTER for delay in delays), delays)
        self.assertGreater(len(set(delays)), 1)

    def test_cap_keeps_recovery_within_two_seconds(self) -> None:
        """
        The longest wait between two attempts plus the time a failing
        readiness result is reused stays well under the SPEC's 2 s, whatever
        the attempt number: a second is left for connecting and loading.
        """
        from caracal.gateway.endpoints import FAILED_CACHE_SECONDS

        worst = max(reconnect_policy(jitter=0)(n) for n in range(100)) + backoff.JITTER
        self.assertLessEqual(worst + FAILED_CACHE_SECONDS, 1.0)


class RedisReconnectionTests(SynchronousTestCase):
    """The Redis pools and the follower's connection reconnect on the shared policy."""

    def test_redis_factory_delays(self) -> None:
        """
        txredisapi asks the factory for the delay before each attempt (1 is
        the first retry): about 0.1 s first, never more than the cap however
        long Redis stays away (txredisapi's own grows to 10 s).
        """
        from caracal.gateway.redisconn import _ReconnectingRedisFactory

        factory = _ReconnectingRedisFactory(uuid="test", dbid=None, poolsize=1)
        self.assertLessEqual(factory.retryDelay(1), backoff.INITIAL_DELAY + backoff.JITTER)
        for attempt in range(1, 200):
            self.assertLessEqual(factory.retryDelay(attempt), backoff.MAX_DELAY + backoff.JITTER)
        self.assertGreaterEqual(factory.retryDelay(100), backoff.MAX_DELAY)
