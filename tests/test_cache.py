# -*- test-case-name: tests.test_cache -*-
"""
Tests for L{caracal.gateway.cache.BoundedCache}: the bound, the order in
which entries are dropped, and expiry on a controlled clock.
"""

from __future__ import annotations

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway.cache import BoundedCache


class BoundTests(SynchronousTestCase):
    """The cache never holds more than its size, dropping the least recently used."""

    def test_never_beyond_size(self):
        """However many entries are put, at most C{size} are held."""
        cache = BoundedCache(3)
        for number in range(10):
            cache.put(number, str(number))
            self.assertLessEqual(len(cache), 3)
        self.assertEqual(len(cache), 3)

    def test_oldest_dropped_first(self):
        """Without reads, the entry put first is the first to go."""
        cache = BoundedCache(2)
        cache.put("a", 1)
        cache.put("b", 2)
        cache.put("c", 3)
        self.assertEqual([cache.get(key) for key in "abc"], [None, 2, 3])

    def test_read_keeps_an_entry(self):
        """A hit makes the entry the most recently used: the next one out is another."""
        cache = BoundedCache(2)
        cache.put("a", 1)
        cache.put("b", 2)
        self.assertEqual(cache.get("a"), 1)
        cache.put("c", 3)
        self.assertEqual([cache.get(key) for key in "abc"], [1, None, 3])

    def test_put_again_refreshes(self):
        """Putting a held key replaces its value and makes it the most recently used."""
        cache = BoundedCache(2)
        cache.put("a", 1)
        cache.put("b", 2)
        cache.put("a", 10)
        cache.put("c", 3)
        self.assertEqual(len(cache), 2)
        self.assertEqual([cache.get(key) for key in "abc"], [10, None, 3])

    def test_miss_is_the_default(self):
        """A key never put answers the default (C{None} unless given)."""
        cache = BoundedCache(1)
        self.assertIsNone(cache.get("a"))
        self.assertEqual(cache.get("a", "nothing"), "nothing")

    def test_size_below_one_refused(self):
        """A cache that could hold nothing is a mistake, refused at construction."""
        self.assertRaises(ValueError, BoundedCache, 0)


class ExpiryTests(SynchronousTestCase):
    """An entry put with an expiry is gone from that time on."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.cache = BoundedCache(4, self.clock)

    def test_expires_by_the_clock(self):
        """An entry answers until just before its expiry, and not at it."""
        self.cache.put("a", 1, expires=1010)
        self.clock.advance(9.9)
        self.assertEqual(self.cache.get("a"), 1)
        self.clock.advance(0.1)
        self.assertIsNone(self.cache.get("a"))
        self.assertEqual(len(self.cache), 0, "an expired entry read is dropped")

    def test_expires_by_the_callers_time(self):
        """A C{now} given to C{get} is used instead of the clock."""
        self.cache.put("a", 1, expires=1010)
        self.assertIsNone(self.cache.get("a", now=1010))
        self.cache.put("b", 2, expires=1010)
        self.assertEqual(self.cache.get("b", now=1009), 2)

    def test_without_expiry_lasts(self):
        """An entry put without an expiry stays whatever the time."""
        self.cache.put("a", 1)
        self.clock.advance(10**9)
        self.assertEqual(self.cache.get("a"), 1)

    def test_put_again_sets_a_new_expiry(self):
        """Putting a key again replaces its expiry too."""
        self.cache.put("a", 1, expires=1001)
        self.cache.put("a", 2, expires=2000)
        self.clock.advance(500)
        self.assertEqual(self.cache.get("a"), 2)

    def test_no_clock_needed_without_expiry(self):
        """A cache without a clock works as long as no read needs one."""
        cache = BoundedCache(1)
        cache.put("a", 1)
        self.assertEqual(cache.get("a"), 1)
        cache.put("b", 2, expires=5)
        self.assertEqual(cache.get("b", now=4), 2)
