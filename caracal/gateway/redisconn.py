# -*- test-case-name: tests.integration.test_redis_stores -*-
"""
Connections to Redis (SPEC section 9), through txredisapi.

Two kinds, both reconnecting by themselves when Redis comes back:

 - L{connect_redis}: a small lazy pool for the short commands of the request
   path (the JTI C{SET}, audit C{XADD}s, readiness C{PING}).
 - L{blocking_connection}: one connection of its own for the revocation
   follower's C{XREAD BLOCK}, so a blocking read never sits in front of a
   request's C{SET}.

Neither applies a reply timeout: each caller bounds its own calls (the replay
guard with C{Deferred.addTimeout}, the follower with the block period plus a
margin), because only the caller knows how long it may wait.

C{rediss://} is honoured by wrapping the TCP endpoint in TLS
(L{twisted.internet.endpoints.wrapClientTLS}); the server certificate is
verified against the host name and the system trust roots unless the caller
passes its own C{tls_options}.
"""

from __future__ import annotations

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger

from caracal.gateway.backoff import reconnect_policy
from caracal.gateway.config import RedisAddress

#: Seconds allowed for one TCP (and TLS) connection attempt.
CONNECT_TIMEOUT = 2.0

_log = Logger()


class RedisUnavailable(Exception):
    """Redis did not answer (down, disconnected, or slower than allowed)."""


class _RedisProtocol(txredisapi.RedisProtocol):
    """
    txredisapi's protocol, except that a failed C{AUTH} or C{SELECT} only
    drops this connection. The library's own version also stops the pool slot
    from ever reconnecting, so a single hiccup during a Redis restart (the
    connection lost mid-handshake, C{LOADING}) would leave the gateway without
    Redis for good. Here the slot reconnects with its usual backoff and the
    failure is logged each time (a wrong password shows up in the log and in
    C{/ready}).
    """

    @defer.inlineCallbacks
    def connectionMade(self):
        try:
            if self.password is not None:
                yield self.auth(self.password, self.username)
            if self.dbid is not None:
                yield self.select(self.dbid)
        except Exception as error:
            _log.warn(
                "redis connection setup failed (AUTH/SELECT): {reason}",
                reason=str(error) or type(error).__name__,
            )
            self.transport.loseConnection()
            return
        self.connected = 1
        self._ready = True
        self._waiting_for_connect, waiting = [], self._waiting_for_connect
        for d in waiting:
            d.callback(self)

    def execute_command(self, *args, **kwargs):
        """
        Send one command; its time to reply goes to the factory's C{metrics}
        (C{redis_command_duration_seconds{command}}) when it has some. A
        blocking read (C{XREAD BLOCK}) waits by design and is not timed.
        """
        d = super().execute_command(*args, **kwargs)
        metrics = getattr(self.factory, "metrics", None)
        if metrics is None or not args or "BLOCK" in args:
            return d
        clock = self.factory.clock
        started = clock.seconds()
        command = str(args[0])

        def replied(result):
            metrics.observe(
                "redis_command_duration_seconds", clock.seconds() - started, command=command
            )
            return result

        return d.addBoth(replied)


class _ReconnectingRedisFactory(txredisapi.RedisFactory):
    """
    txredisapi's factory with L{_RedisProtocol} and a shorter reconnection
    backoff: the library's default starts at 1 s and grows to 10 s, which
    keeps the gateway failing JTI checks for up to 10 s after Redis is back.
    Here the gateway's shared policy (L{reconnect_policy}: 0.1 s doubling to
    0.5 s), so C{/ready} is 200 within 2 s of Redis accepting connections.
    """

    protocol = _RedisProtocol
    _policy = staticmethod(reconnect_policy())

    def retryDelay(self, attempt: int) -> float:
        """The delay before connection attempt C{attempt} (1 is the first retry)."""
        return self._policy(max(0, attempt - 1))


def _endpoint(address: RedisAddress, reactor, connect_timeout: float, tls_options):
    endpoint = HostnameEndpoint(reactor, address.host, address.port, timeout=connect_timeout)
    if address.tls:
        creator = tls_options if tls_options is not None else optionsForClientTLS(address.host)
        endpoint = wrapClientTLS(creator, endpoint)
    return endpoint


def _connect(address, reactor, pool_size, connect_timeout, tls_options, metrics=None):
    if reactor is None:
        from twisted.internet import reactor
    factory = _ReconnectingRedisFactory(
        uuid=f"{address.host}:{address.port}",
        # SELECT only when a database other than the default one is asked for
        dbid=address.db or None,
        poolsize=pool_size,
        isLazy=True,
        handler=txredisapi.ConnectionHandler,
        charset="utf-8",
        password=address.password,
        replyTimeout=None,
        # Stream field values (session ids, hex signatures) must stay strings:
        # txredisapi would otherwise turn "12345" into the integer 12345.
        convertNumbers=False,
    )
    factory.reconnect = True
    factory.metrics = metrics
    factory.clock = reactor
    # A lazy pool's handler is already in the caller's hands; this Deferred
    # only reports a pool that never filled up, which the calls' own time
    # bounds already surface.
    factory.deferred.addErrback(lambda _: None)
    factory.startConnecting(_endpoint(address, reactor, connect_timeout, tls_options))
    return factory.handler


def connect_redis(
    address: RedisAddress,
    reactor=None,
    pool_size: int = 4,
    connect_timeout: float = CONNECT_TIMEOUT,
    tls_options=None,
    metrics=None,
):
    """
    Open a lazy, self-reconnecting pool of C{pool_size} connections to
    C{address} (password, database number and C{rediss} TLS honoured).

    The handler is returned at once; a command issued while no connection is
    up waits for one, so callers must bound their calls in time.

    @param tls_options: an C{IOpenSSLClientConnectionCreator} for C{rediss},
        e.g. from C{optionsForClientTLS(host, trustRoot=...)}; by default the
        host name is verified against the system roots.
    @return: a txredisapi C{ConnectionHandler} (C{set}, C{execute_command},
        ...); close it with L{close_redis}.
    @param metrics: times every command (L{caracal.gateway.metrics.Metrics}), or C{None}.
    """
    return _connect(address, reactor, pool_size, connect_timeout, tls_options, metrics)


def blocking_connection(
    address: RedisAddress,
    reactor=None,
    connect_timeout: float = CONNECT_TIMEOUT,
    tls_options=None,
):
    """
    Open one self-reconnecting connection of its own, for blocking reads
    (C{XREAD BLOCK}) that must not delay the request path's commands.
    """
    return _connect(address, reactor, 1, connect_timeout, tls_options)


def close_redis(handler) -> defer.Deferred:
    """
    Stop reconnecting and close every connection of C{handler}; the Deferred
    fires once they are closed. Commands still waiting for a reply fail.
    """
    return handler.disconnect()


def check_redis(redis, clock, timeout: float = 1.0) -> defer.Deferred:
    """
    Readiness probe: C{PING} bounded by C{timeout} seconds. Fires with
    C{None}, or errbacks with L{RedisUnavailable}.
    """
    d = defer.maybeDeferred(redis.execute_command, "PING")
    d.addTimeout(timeout, clock)

    def answered(reply):
        if reply != "PONG":
            raise RedisUnavailable(f"unexpected PING reply {reply!r}")

    def failed(failure):
        raise RedisUnavailable(failure.getErrorMessage() or failure.type.__name__)

    return d.addCallbacks(answered, failed)
