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

C{redis+sentinel://} pools follow a Sentinel-managed master: each connection
attempt asks the sentinels where it is and checks with C{ROLE} that the server
is the master (txredisapi's Sentinel support), a server answering
C{READONLY} is dropped, and a watch asks the sentinels every second so that
connections to a former master are moved even when that server is still up
(L{_MasterWatch}). During the switch commands fail (a closed connection, no
master yet): the replay guard answers 503, never lets a token through; the
revocation follower re-reads its window from the new master.

Replies are parsed by hiredis (txredisapi uses its C{HiredisProtocol} when
the module is installed) and commands are built by C{hiredis.pack_command}:
txredisapi's own pure-Python parser and builder cost tens of microseconds
per command on the request path. A command is handed to a pooled connection
at once when one is up (L{_PoolHandler}); the request path's two commands,
the JTI claim and the audit entry, come already packed and take one Deferred
each (L{_PoolHandler.send_packed}).

C{rediss://} is honoured by wrapping the TCP endpoint in TLS
(L{twisted.internet.endpoints.wrapClientTLS}); the server certificate is
verified against the host name and the system trust roots unless the caller
passes its own C{tls_options}.
"""

from __future__ import annotations

import weakref

import hiredis
import txredisapi
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger

from caracal.gateway.backoff import reconnect_policy
from caracal.gateway.config import RedisAddress

#: Seconds allowed for one TCP (and TLS) connection attempt.
CONNECT_TIMEOUT = 2.0

_log = Logger()


class RedisUnavailable(Exception):
    """Redis did not answer (down, disconnected, or slower than allowed)."""


class _Reply(defer.Deferred):
    """
    The reply to one command sent with L{_RedisProtocol.send_packed}, fired
    by L{_RedisProtocol.replyReceived} itself.

    It has no canceller: cancelled (a caller's time bound), it stays in the
    connection's queue of waiting replies, so the replies that follow still
    go to their own commands, and its reply, when it comes, is dropped
    (C{Deferred.cancel} arranges that for a Deferred without a canceller).

    @ivar timed: C{(metrics, command, sent at)} when the command's time to
        reply is recorded, else C{None}.
    """

    timed = None


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
            yield self._prepare()
        except _NotMaster as refusal:
            _log.info("{reason}; asking the sentinels again", reason=str(refusal))
            self.transport.loseConnection()
            return
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

    def send_packed(self, packed: bytes, command: str) -> defer.Deferred:
        """
        Send one command already in RESP (C{hiredis.pack_command}'s bytes)
        on this connection, which must be up and neither pipelining nor in a
        transaction (a connection of the pool's queue never is: those
        commands take theirs out of it).

        The request path's two commands, the JTI claim and the audit entry,
        take this way: C{execute_command} makes a Deferred in the reply
        queue, a second one for the caller and three callbacks (its reply
        check, its copy to the second one, the timing); here one L{_Reply}
        is fired by L{replyReceived}, which also records the time.

        @param command: the command's name, the label of its
            C{redis_command_duration_seconds}.
        @return: a Deferred firing with the reply, or failing with the error
            reply (L{txredisapi.ResponseError}) or a lost connection's
            L{txredisapi.ConnectionError}, as C{execute_command}'s.
        """
        self.transport.write(packed)
        reply = _Reply()
        factory = self.factory
        metrics = getattr(factory, "metrics", None)
        if metrics is not None:
            reply.timed = (metrics, command, factory.clock.seconds())
        self.replyQueue.waiting.append(reply)
        return reply

    def replyReceived(self, reply):
        """
        Fire the oldest command's Deferred: a L{_Reply} directly, any other
        through txredisapi's reply queue.
        """
        waiting = self.replyQueue.waiting
        if waiting and type(waiting[0]) is _Reply:
            answered = waiting.pop(0)
            timed = answered.timed
            if timed is not None:
                metrics, command, sent = timed
                metrics.observe(
                    "redis_command_duration_seconds",
                    self.factory.clock.seconds() - sent,
                    command=command,
                )
            if isinstance(reply, Exception):
                answered.errback(reply)
            else:
                answered.callback(reply)
            return
        self.replyQueue.put(reply)

    def _build_command(self, *args, **kwargs):
        # hiredis builds the same bytes as txredisapi for str (UTF-8,
        # strict), bytes and int arguments, in a fraction of the time.
        # Anything else (a float, which txredisapi writes as "1.500000",
        # bool, bytearray, None) or a string UTF-8 cannot encode takes
        # txredisapi's way, with its own formatting and errors.
        if self.charset == "utf-8" and self.errors == "strict":
            for arg in args:
                kind = type(arg)
                if kind is not str and kind is not bytes and kind is not int:
                    break
            else:
                try:
                    return hiredis.pack_command(args)
                except UnicodeError:
                    pass
        return super()._build_command(*args, **kwargs)

    @defer.inlineCallbacks
    def _prepare(self):
        if self.password is not None:
            yield self.auth(self.password, self.username)
        if self.dbid is not None:
            yield self.select(self.dbid)


class _PoolHandler(txredisapi.ConnectionHandler):
    """
    txredisapi's pool handler, except that a command finding a connection up
    is sent on it at once. The library's own way takes the connection
    through an C{inlineCallbacks} generator and two more Deferreds per
    command, a large part of what a Redis command costs the request path.
    It sends on the first connection of the pool that is up, not on one at
    random as txredisapi does: the commands of one reactor turn (one
    request's claim, another's audit entry) then leave in one write and
    their replies come back in one read, instead of one system call and one
    reactor event per command per connection (Redis runs commands one at a
    time whatever the connection; the others stay for failover and for
    blocking commands). It falls back to the library for everything else:
    no connection yet (the command waits for one), blocking commands (which
    take a connection out of the pool).
    """

    def __getattr__(self, method):
        wrapper = super().__getattr__(method)
        if method.startswith("_"):
            return wrapper
        protocol_method = getattr(self._factory.protocol, method, None)
        if protocol_method is None or getattr(protocol_method, "_blocking", False):
            return wrapper
        factory = self._factory

        def send(*args, **kwargs):
            for connection in factory.connectionQueue.pending:
                if connection.connected:
                    try:
                        result = protocol_method(connection, *args, **kwargs)
                    except Exception:
                        return defer.fail()
                    if isinstance(result, defer.Deferred):
                        return result
                    return defer.succeed(result)
            return wrapper(*args, **kwargs)

        # Kept: the next lookup of this command finds it without a call here.
        self.__dict__[method] = send
        return send

    def send_packed(self, packed: bytes, command: str, args: tuple) -> defer.Deferred:
        """
        Send C{packed}, the RESP bytes of C{args}, on the first connection
        up (L{_RedisProtocol.send_packed}); with none up, C{args} go through
        C{execute_command} and wait for one.
        """
        for connection in self._factory.connectionQueue.pending:
            if connection.connected:
                return connection.send_packed(packed, command)
        return self.execute_command(*args)


def send_packed(send, args: tuple) -> defer.Deferred | None:
    """
    C{args} (a command and its arguments, C{str} and C{int} only) packed by
    hiredis and sent with C{send}, a pool's L{_PoolHandler.send_packed};
    C{None} when there is no such pool (C{send} is C{None}) or the
    arguments do not pack (text UTF-8 cannot encode): the caller then sends
    them txredisapi's way, which reports that error as it always did.
    """
    if send is None:
        return None
    try:
        packed = hiredis.pack_command(args)
    except UnicodeError:
        return None
    return send(packed, args[0], args)


class _NotMaster(Exception):
    """The server a sentinel named is not (or no longer) the master."""


class _MasterProtocol(_RedisProtocol):
    """
    A connection to the address the sentinels gave for the master: used only
    once the server itself confirms with C{ROLE} that it is the master. In a
    failover the sentinels' view and the servers' roles change at different
    moments; a demoted master (a replica now, answering C{READONLY}) or a
    replica not yet promoted is dropped, and the slot asks the sentinels
    again.

    @ivar master_address: the C{(host, port)} the sentinels named for this
        connection (compared by L{_MasterWatch}).
    """

    master_address = None

    @defer.inlineCallbacks
    def _prepare(self):
        self.master_address = self.factory.sentinel_manager.masters.get(self.factory.service_name)
        if self.password is not None:
            yield self.auth(self.password, self.username)
        role = yield self.role()
        if not role or role[0] != "master":
            peer = self.transport.getPeer()
            raise _NotMaster(f"redis at {peer.host}:{peer.port} is not the master")
        if self.dbid is not None:
            yield self.select(self.dbid)

    def replyReceived(self, reply):
        """
        A master turned replica answers writes with C{READONLY}: this
        connection is of no use any more, the next one asks the sentinels.
        The reply still goes to its command.
        """
        if isinstance(reply, txredisapi.ResponseError) and str(reply).startswith("READONLY"):
            self.transport.loseConnection()
        super().replyReceived(reply)


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


class _SentinelMasterFactory(txredisapi.SentinelConnectionFactory):
    """
    txredisapi's Sentinel factory (each connection attempt asks the sentinels
    where the master is, and a changed answer drops the pool's connections to
    the old one) with L{_MasterProtocol} and the same short backoff as
    L{_ReconnectingRedisFactory}.
    """

    protocol = _MasterProtocol
    initialDelay = 0.1
    maxDelay = 2.0

    def __init__(self, *args, created=None, **kwargs) -> None:
        """
        @param created: called with the new factory (txredisapi's
            C{master_for} builds it and returns only its handler).
        """
        super().__init__(*args, **kwargs)
        # As in _connect: the lazy pool's calls bound themselves.
        self.deferred.addErrback(lambda _: None)
        if created is not None:
            created(self)


class _Sentinels(txredisapi.Sentinel):
    """
    txredisapi's sentinel client, with its own C{discover_master}: the same
    question (C{SENTINEL MASTERS} to every sentinel, the first answer naming
    a healthy master wins), but bounded on the given clock with a shorter
    wait (a sentinel answers in milliseconds; while none does, connection
    attempts, and the requests waiting on them, should fail soon), every
    question still open cancelled by L{disconnect} (the library's leaves its
    timer behind), and the last answer remembered.

    @ivar masters: C{{name: (host, port)}} of the last discovery.
    """

    discovery_timeout = 2.0

    def __init__(self, addresses, clock, **kwargs) -> None:
        super().__init__(addresses, **kwargs)
        self._clock = clock
        self._asking: set[defer.Deferred] = set()
        self.masters: dict[str, tuple[str, int]] = {}

    def discover_master(self, service_name):
        """Fires with the master's C{(host, port)}, or fails with C{MasterNotFoundError}."""
        result = defer.Deferred()

        def answered(masters):
            state = masters.get(service_name)
            if not result.called and state and self.check_master_state(state):
                result.callback((state["ip"], int(state["port"])))

        for sentinel in self.sentinels:
            sentinel.sentinel_masters().addCallbacks(answered, lambda _: None)

        def unanswered(value, timeout):
            raise txredisapi.MasterNotFoundError(f"no sentinel named a master {service_name}")

        result.addTimeout(self.discovery_timeout, self._clock, onTimeoutCancel=unanswered)
        self._asking.add(result)

        def found(address):
            self.masters[service_name] = address
            return address

        def settled(outcome):
            self._asking.discard(result)
            return outcome

        return result.addBoth(settled).addCallback(found)

    def disconnect(self):
        """Cancel the questions still open, close the sentinel connections."""
        for asking in list(self._asking):
            asking.cancel()
        return super().disconnect()


class _MasterWatch:
    """
    Asks the sentinels every C{interval} seconds where the master is and
    drops the pool's connections to any other address.

    txredisapi asks the sentinels only when it connects, so a pool whose
    connections survive a failover (the old master is alive and not yet
    reconfigured as a replica, which Sentinel does some seconds later) would
    go on writing JTI claims to a server whose data the new master never
    sees, and the revocation follower would go on reading a stream nobody
    publishes to any more.
    """

    def __init__(self, sentinels: _Sentinels, factory, clock, interval: float = 1.0) -> None:
        self._sentinels = sentinels
        self._factory = factory
        self._loop = task.LoopingCall(self._check)
        self._loop.clock = clock
        self._interval = interval

    def start(self) -> None:
        """Start watching."""
        self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        """Stop watching."""
        if self._loop.running:
            self._loop.stop()

    def _check(self) -> defer.Deferred:
        d = self._sentinels.discover_master(self._factory.service_name)
        # No answer: nothing to compare with; the connections' own errors
        # and the next check decide.
        return d.addCallbacks(self._drop_others, lambda _: None)

    def _drop_others(self, address) -> None:
        for connection in list(self._factory.pool):
            if connection.master_address not in (None, address):
                _log.info(
                    "redis master {name} moved to {host}:{port}; reconnecting",
                    name=self._factory.service_name,
                    host=address[0],
                    port=address[1],
                )
                connection.transport.loseConnection()


def _endpoint(address: RedisAddress, reactor, connect_timeout: float, tls_options):
    endpoint = HostnameEndpoint(reactor, address.host, address.port, timeout=connect_timeout)
    if address.tls:
        creator = tls_options if tls_options is not None else optionsForClientTLS(address.host)
        endpoint = wrapClientTLS(creator, endpoint)
    return endpoint


def _connect(address, reactor, pool_size, connect_timeout, tls_options, metrics=None):
    if reactor is None:
        from twisted.internet import reactor
    options = {
        # SELECT only when a database other than the default one is asked for
        "dbid": address.db or None,
        "poolsize": pool_size,
        "isLazy": True,
        "handler": _PoolHandler,
        "charset": "utf-8",
        "password": address.password,
        "replyTimeout": None,
        # Stream field values (session ids, hex signatures) must stay strings:
        # txredisapi would otherwise turn "12345" into the integer 12345.
        "convertNumbers": False,
    }
    if address.sentinels:
        return _connect_through_sentinels(address, options, reactor, metrics)
    factory = _ReconnectingRedisFactory(uuid=f"{address.host}:{address.port}", **options)
    factory.reconnect = True
    factory.metrics = metrics
    factory.clock = reactor
    # A lazy pool's handler is already in the caller's hands; this Deferred
    # only reports a pool that never filled up, which the calls' own time
    # bounds already surface.
    factory.deferred.addErrback(lambda _: None)
    factory.startConnecting(_endpoint(address, reactor, connect_timeout, tls_options))
    return factory.handler


def _connect_through_sentinels(address, options, reactor, metrics=None):
    """
    A pool that follows the master named C{address.master_name}: every
    connection attempt asks the sentinels for its address and checks the
    server's role (txredisapi's Sentinel support, L{_SentinelMasterFactory}),
    and L{_MasterWatch} moves live connections when the master changes. The
    sentinels are asked without the password, which is the master's.
    """
    sentinels = _Sentinels(list(address.sentinels), reactor, charset="utf-8")
    factories = []

    def created(factory) -> None:
        # Before its first connection, as _connect does for a plain pool.
        factory.metrics = metrics
        factory.clock = reactor
        factories.append(factory)

    handler = sentinels.master_for(
        address.master_name, factory_class=_SentinelMasterFactory, created=created, **options
    )
    watch = _MasterWatch(sentinels, factories[0], reactor)
    watch.start()
    # close_redis stops these along with the pool.
    _SENTINELS_OF[handler] = (sentinels, watch)
    return handler


#: The sentinel client and watch of each handler made by
#: L{_connect_through_sentinels}.
_SENTINELS_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def connect_once(
    address: RedisAddress,
    reactor=None,
    connect_timeout: float = CONNECT_TIMEOUT,
    tls_options=None,
) -> defer.Deferred:
    """
    One connection of its own that does not reconnect, for a check that must
    say why Redis cannot be used (C{caracal-gateway-admin check-config}):
    the same endpoint (C{rediss} TLS), C{AUTH} and C{SELECT} as
    L{connect_redis}, each failure reported instead of retried. It connects
    to C{address.host} and C{address.port}; sentinels are the caller's to ask.

    @return: a Deferred firing with the connected txredisapi protocol (close
        it with C{transport.loseConnection()}), or failing with
        L{RedisUnavailable}; when the connection itself failed, that failure
        is its C{__cause__}. The caller bounds it in time.
    """
    if reactor is None:
        from twisted.internet import reactor
    connection = txredisapi.RedisProtocol(charset="utf-8", convertNumbers=False)
    d = connectProtocol(_endpoint(address, reactor, connect_timeout, tls_options), connection)

    def not_connected(failure):
        raise RedisUnavailable(f"cannot connect: {failure.getErrorMessage()}") from failure.value

    @defer.inlineCallbacks
    def prepare(_):
        steps = []
        if address.password:
            steps.append(("AUTH", lambda: connection.auth(address.password)))
        if address.db:
            steps.append(("SELECT", lambda: connection.select(address.db)))
        for name, step in steps:
            try:
                reply = yield step()
                if isinstance(reply, Exception):
                    raise reply
            except txredisapi.ResponseError as error:
                connection.transport.loseConnection()
                raise RedisUnavailable(f"{name} refused: {error}") from None
            except BaseException:
                # Cut short (the caller's time bound) or lost: never leave it open.
                connection.transport.loseConnection()
                raise
        return connection

    return d.addCallbacks(prepare, not_connected)


def close_redis(handler) -> defer.Deferred:
    """
    Stop reconnecting and close every connection of C{handler} (and its
    sentinel connections); the Deferred fires once they are closed.
    Commands still waiting for a reply fail.
    """
    closing = [handler.disconnect()]
    following = _SENTINELS_OF.pop(handler, None)
    if following is not None:
        sentinels, watch = following
        watch.stop()
        closing.append(sentinels.disconnect())
    return defer.gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)


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
        raise RedisUnavailable(
            failure.getErrorMessage() or failure.type.__name__
        ) from failure.value

    return d.addCallbacks(answered, failed)
