# -*- test-case-name: tests.test_pools -*-
"""
Persistent HTTP connection pools for the gateway's outbound traffic (the STS
and the upstreams). Their per-connection "Starting factory" lines are kept
out of the log by namespace (L{caracal.gateway.logs.QUIET_NAMESPACES}).
"""

from __future__ import annotations

from twisted.web.client import HTTPConnectionPool


def persistent_pool(reactor, max_per_host: int, idle_timeout: float) -> HTTPConnectionPool:
    """
    A keep-alive pool holding at most C{max_per_host} idle connections per
    origin, each dropped after C{idle_timeout} seconds unused.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = idle_timeout
    return pool
