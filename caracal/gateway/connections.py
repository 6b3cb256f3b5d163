# -*- test-case-name: tests.test_connections -*-
"""
The process-wide cap on open client connections (SPEC 12 H8,
C{MAX_CONNECTIONS}).

L{ConnectionLimit} wraps the listener's outermost factory (the TLS wrapper,
or the site when plaintext), so a connection over the cap is closed before
any TLS handshake or HTTP parsing is spent on it. Twisted's
L{twisted.protocols.policies.LimitConnectionsByPeer} counts per peer
address; this one counts every connection of the process.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory

log = Logger()


class ConnectionLimit(WrappingFactory):
    """
    A factory that builds protocols with C{wrappedFactory} while fewer than
    C{limit} connections it built are open. A connection beyond is refused:
    C{buildProtocol} returns C{None}, so the reactor closes the socket at
    once, and C{connections_refused} is counted. Open connections are never
    touched.

    @ivar limit: the most connections open at once.
    @ivar refused: connections refused so far.
    """

    # One line per refused connection would be an attacker's log flood.
    noisy = False

    def __init__(self, wrappedFactory, limit: int, metrics=None) -> None:
        super().__init__(wrappedFactory)
        self.limit = limit
        self.metrics = metrics
        self.refused = 0

    @property
    def open(self) -> int:
        """Connections built here and not lost yet."""
        return len(self.protocols)

    def buildProtocol(self, addr):
        """The wrapped factory's protocol, or C{None} when C{limit} are open."""
        if len(self.protocols) >= self.limit:
            self.refused += 1
            if self.metrics is not None:
                self.metrics.increment("connections_refused")
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warn(
                    "MAX_CONNECTIONS ({limit}) reached: new connections are closed"
                    " ({refused} so far)",
                    limit=self.limit,
                    refused=self.refused,
                )
            return None
        return super().buildProtocol(addr)
