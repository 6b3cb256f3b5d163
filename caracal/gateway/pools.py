# -*- test-case-name: tests.test_pools -*-
"""
Persistent HTTP connection pools for the gateway's outbound traffic (the STS
and the upstreams), quiet in the log.
"""

from __future__ import annotations

from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory


class _QuietClientFactory(_HTTP11ClientFactory):
    # Twisted logs "Starting factory" / "Stopping factory" for every new
    # outbound connection: noise that buries the access log of a busy gateway.
    noisy = False


class QuietHTTPConnectionPool(HTTPConnectionPool):
    """An L{HTTPConnectionPool} whose connections do not log their factories."""

    _factory = _QuietClientFactory


def persistent_pool(reactor, max_per_host: int, idle_timeout: float) -> HTTPConnectionPool:
    """
    A keep-alive pool holding at most C{max_per_host} idle connections per
    origin, each dropped after C{idle_timeout} seconds unused.
    """
    pool = QuietHTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = idle_timeout
    return pool
