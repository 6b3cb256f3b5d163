# -*- test-case-name: tests.test_cache -*-
"""
One bounded cache for the whole gateway: at most C{size} entries, the least
recently used dropped first, each entry optionally lasting only until a
given time.

It sits on the per-request path (verified signatures, the replay event
throttle, pinned numeric upstreams, outbound TLS creators), so C{get} and
C{put} stay plain dictionary work: no Deferred, nothing allocated but the
entry itself. Expiry is checked lazily on C{get}, against the caller's
C{now} or the injected clock; nothing runs in the background.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """
    A least-recently-used map of at most C{size} entries.

    @ivar size: the most entries held; putting one more drops the entry
        used least recently (read by L{get} or written by L{put}).
    """

    __slots__ = ("size", "_clock", "_entries")

    def __init__(self, size: int, clock=None) -> None:
        """
        @param size: the bound, at least 1.
        @param clock: an C{IReactorTime} for entries put with an expiry and
            read without a C{now}; C{None} when every such read passes one.
        @raise ValueError: C{size} is below 1.
        """
        if size < 1:
            raise ValueError(f"a bounded cache holds at least one entry, not {size}")
        self.size = size
        self._clock = clock
        # key -> (value, expires or None); the first entry is the least recently used.
        self._entries: OrderedDict[K, tuple[V, float | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K, default: V | None = None, now: float | None = None) -> V | None:
        """
        The value put under C{key}, or C{default} when there is none or it
        expired (an expired entry is dropped). A hit makes C{key} the most
        recently used.

        @param now: the time to judge expiry by (default: the clock's).
        """
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            return default
        expires = entry[1]
        if expires is not None:
            if now is None:
                now = self._clock.seconds()
            if expires <= now:
                del entries[key]
                return default
        entries.move_to_end(key)
        return entry[0]

    def put(self, key: K, value: V, expires: float | None = None) -> None:
        """
        Hold C{value} under C{key} as the most recently used entry, until
        C{expires} (a time on the same scale as the clock's) when given;
        beyond L{size} entries the least recently used goes.
        """
        entries = self._entries
        entries[key] = (value, expires)
        entries.move_to_end(key)
        if len(entries) > self.size:
            entries.popitem(last=False)
