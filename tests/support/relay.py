"""
A TCP relay on 127.0.0.1 standing in for one host of a multi-host service:
it forwards to a real server (the shared Postgres) while "up", and refuses
connections and cuts the ones it carries when taken "down". Two relays in
front of one server are two hosts of a libpq multi-host DSN whose primary can
be made to change under a client, without a second database server.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.protocols import portforward

from tests.support.waiting import free_port


class _RelayedServer(portforward.ProxyServer):
    def connectionMade(self):
        self.factory.relay.carried.add(self)
        self.factory.relay.connections += 1
        super().connectionMade()

    def connectionLost(self, reason):
        self.factory.relay.carried.discard(self)
        super().connectionLost(reason)


class Relay:
    """
    Listens on C{port} (a free one by default) while up.

    @ivar connections: how many client connections it has accepted in all.
    @ivar carried: the client connections open now.
    """

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self.connections = 0
        self.carried: set = set()
        self._listening = None

    def up(self) -> Relay:
        """Start accepting and relaying."""
        factory = portforward.ProxyFactory(*self.target)
        factory.protocol = _RelayedServer
        factory.relay = self
        self._listening = reactor.listenTCP(self.port, factory, interface="127.0.0.1")
        return self

    def down(self):
        """Refuse new connections and cut every open one; fires once no longer listening."""
        listening, self._listening = self._listening, None
        for server in list(self.carried):
            server.transport.abortConnection()
        if listening is None:
            from twisted.internet import defer

            return defer.succeed(None)
        return listening.stopListening()
