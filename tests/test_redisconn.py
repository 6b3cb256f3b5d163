# -*- test-case-name: tests.test_redisconn -*-
"""
Unit tests for the Sentinel side of L{caracal.gateway.redisconn}: the watch
that moves a pool's connections to the master the sentinels name, on a
L{Clock}. The real thing, through real failovers, is in
L{tests.integration.test_sentinel}.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway.redisconn import _MasterWatch


class _Sentinels:
    """Answers discover_master with whatever C{answer} holds (an address or a Failure)."""

    def __init__(self, answer):
        self.answer = answer
        self.asked = 0

    def discover_master(self, name):
        self.asked += 1
        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)
        return defer.succeed(self.answer)


class _Connection:
    def __init__(self, master_address):
        self.master_address = master_address
        self.transport = StringTransport()


class _Factory:
    service_name = "caracal"

    def __init__(self, *connections):
        self.pool = list(connections)


class MasterWatchTests(SynchronousTestCase):
    """L{_MasterWatch} asks every second and drops connections to another address."""

    def setUp(self):
        self.clock = Clock()
        self.on_old = _Connection(("127.0.0.1", 6379))
        self.on_new = _Connection(("127.0.0.1", 6380))
        self.unknown = _Connection(None)
        self.factory = _Factory(self.on_old, self.on_new, self.unknown)
        self.sentinels = _Sentinels(("127.0.0.1", 6380))
        self.watch = _MasterWatch(self.sentinels, self.factory, self.clock)
        self.watch.start()
        self.addCleanup(self.watch.stop)

    def test_drops_connections_to_another_master(self):
        """After a tick, only the connection to the old address is closed."""
        self.assertEqual(self.sentinels.asked, 0)
        self.clock.advance(1.0)
        self.assertEqual(self.sentinels.asked, 1)
        self.assertTrue(self.on_old.transport.disconnecting)
        self.assertFalse(self.on_new.transport.disconnecting)
        self.assertFalse(self.unknown.transport.disconnecting, "not yet set up: left alone")

    def test_same_master_left_alone(self):
        """While the sentinels name the same master, nothing is dropped."""
        self.sentinels.answer = ("127.0.0.1", 6379)
        self.factory.pool = [self.on_old]
        for _ in range(3):
            self.clock.advance(1.0)
        self.assertEqual(self.sentinels.asked, 3)
        self.assertFalse(self.on_old.transport.disconnecting)

    def test_no_answer_drops_nothing_and_keeps_watching(self):
        """No sentinel answers: connections stay, the next tick asks again."""
        self.sentinels.answer = RuntimeError("no sentinel")
        self.clock.advance(1.0)
        self.assertFalse(self.on_old.transport.disconnecting)
        self.sentinels.answer = ("127.0.0.1", 6380)
        self.clock.advance(1.0)
        self.assertTrue(self.on_old.transport.disconnecting)

    def test_stop(self):
        """A stopped watch asks no more."""
        self.watch.stop()
        self.clock.advance(5.0)
        self.assertEqual(self.sentinels.asked, 0)
