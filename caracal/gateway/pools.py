# -*- test-case-name: tests.test_pools -*-
"""
Persistent HTTP connection pools for the gateway's outbound traffic (the STS
and the upstreams). Their per-connection "Starting factory" lines are kept
out of the log by namespace (L{caracal.gateway.logs.QUIET_NAMESPACES}).
"""

from __future__ import annotations

from twisted.web.client import HTTPConnectionPool

#: Idle keep-alive connections kept per origin (the STS, each upstream). A
#: call that finds none idle opens a connection, and one returned to a full
#: pool is closed: with fewer than the calls in flight at once, a busy worker
#: keeps opening and closing connections (measured with bench/run.py
#: per_call at 32 connections: 16 cost about 20 % more CPU per call than 64).
IDLE_PER_ORIGIN = 64


def persistent_pool(reactor, max_per_host: int, idle_timeout: float) -> HTTPConnectionPool:
    """
    A keep-alive pool holding at most C{max_per_host} idle connections per
    origin, each dropped after C{idle_timeout} seconds unused.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = idle_timeout
    return pool
