# -*- test-case-name: tests.test_registry -*-
"""
The resource table (SPEC section 4), cached in memory.

The request path asks a L{IResourceRegistry} for a resource synchronously: the
answer comes from an in-memory snapshot and never waits for the database.
L{PostgresResourceStore} keeps that snapshot fresh: it LISTENs for the
C{gateway_resources_changed} notifications the schema's trigger sends, reloads
the whole table on each (bursts coalesced), reloads periodically as a safety
net, and through a Postgres outage keeps serving the last good snapshot while
it reconnects with a capped backoff. L{caracal.gateway.testing.MemoryResourceStore}
is the in-memory double for tests; both pass the same contract suite.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import psycopg2
from psycopg2.extensions import parse_dsn
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres.txpostgres import Connection
from zope.interface import implementer

from caracal.gateway import backoff
from caracal.gateway.config import ConfigError, redact_url
from caracal.gateway.headers import auth_header_problem, auth_scheme_problem
from caracal.gateway.interfaces import IResourceRegistry

CARACAL_JWT = "caracal_jwt"
PROVIDER_OAUTH = "provider_oauth"
PROVIDER_APIKEY = "provider_apikey"
AUTH_MODES = (CARACAL_JWT, PROVIDER_OAUTH, PROVIDER_APIKEY)

#: The channel the schema's trigger NOTIFYs on every change to the table.
CHANNEL = "gateway_resources_changed"

_SELECT_RESOURCES = (
    "SELECT resource_identifier, zone_id, application_id, upstream_url,"
    " auth_mode, auth_header, auth_scheme, upstream_timeout_ms FROM gateway_resources"
)


@dataclass(frozen=True)
class ToolResource:
    """
    One row of C{gateway_resources}: where a resource lives and how the
    gateway presents the mandate to it.

    @ivar auth_header: the credential header's name; C{None} means
        C{Authorization}.
    @ivar auth_scheme: the scheme before the credential; C{None} means
        C{Bearer} for C{caracal_jwt} and no scheme for the provider modes.
    @ivar upstream_timeout_ms: this resource's bound on the upstream's
        response headers, in milliseconds; C{None} means C{UPSTREAM_TIMEOUT}.
    """

    resource_identifier: str
    zone_id: str
    application_id: str
    upstream_url: str
    auth_mode: str = CARACAL_JWT
    auth_header: str | None = None
    auth_scheme: str | None = None
    upstream_timeout_ms: int | None = None

    def __post_init__(self) -> None:
        if self.auth_mode not in AUTH_MODES:
            raise ValueError(f"auth_mode must be one of {', '.join(AUTH_MODES)}")
        # Rows are written by people: a header name or scheme that cannot be
        # sent (a CR/LF, a space) must stop here, not after an STS exchange.
        if self.auth_header:
            problem = auth_header_problem(self.auth_header)
            if problem:
                raise ValueError(f"auth_header: {problem}")
        if self.auth_scheme is not None:
            problem = auth_scheme_problem(self.auth_scheme)
            if problem:
                raise ValueError(f"auth_scheme: {problem}")
        if self.upstream_timeout_ms is not None and self.upstream_timeout_ms <= 0:
            raise ValueError("upstream_timeout_ms must be positive")

    @property
    def upstream_timeout(self) -> float | None:
        """C{upstream_timeout_ms} in seconds, or C{None} for the default."""
        if self.upstream_timeout_ms is None:
            return None
        return self.upstream_timeout_ms / 1000.0

    @property
    def credential_header(self) -> str:
        """The name of the header that carries the credential upstream."""
        return self.auth_header or "Authorization"

    @property
    def credential_scheme(self) -> str:
        """The scheme put before the credential; C{""} for none."""
        if self.auth_scheme is not None:
            return self.auth_scheme
        return "Bearer" if self.auth_mode == CARACAL_JWT else ""

    def credential_value(self, credential: str) -> str:
        """The credential header's value for C{credential} (mandate or provider token)."""
        scheme = self.credential_scheme
        return f"{scheme} {credential}" if scheme else credential


class ResourceStoreUnavailable(Exception):
    """The resource store cannot answer a readiness check; C{str()} says why."""


def connection_parameters(dsn: str) -> dict[str, str]:
    """
    Parse C{dsn} (a C{postgresql://} URL or a libpq key=value DSN) into libpq
    parameters, adding TCP keepalives and an application name unless the DSN
    sets them: keepalives let a silently vanished server be noticed.

    @raise ConfigError: C{dsn} is neither; the message never contains it.
    """
    try:
        parameters = parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        raise ConfigError("DATABASE_URL is not a valid Postgres URL or DSN") from None
    defaults = {
        "application_name": "caracal-gateway",
        "keepalives": "1",
        "keepalives_idle": "30",
        "keepalives_interval": "10",
        "keepalives_count": "3",
    }
    return {**defaults, **parameters}


def _reason(failure: Failure) -> str:
    """A failure as one short log-safe line (libpq messages span lines)."""
    text = " ".join(str(failure.value).split()) or failure.type.__name__
    return text[:300]


def _settled(deferred: Deferred) -> Deferred[None]:
    """A Deferred firing C{None} when C{deferred} fires, leaving its result alone."""
    waiter: Deferred[None] = Deferred()

    def passthrough(result):
        waiter.callback(None)
        return result

    deferred.addBoth(passthrough)
    return waiter


class _StoreConnection(Connection):
    """
    A txpostgres connection that tells its owner when it is lost.

    txpostgres lets a failure to read from a dead connection escape from
    C{doRead} into the reactor (a logged traceback); here it becomes a
    C{lost} call instead.

    It also hands on a NOTIFY that arrived together with a query's result.
    psycopg2 moves libpq's notifications into C{connection.notifies} before
    it reads a result, not after; a notification read in the same packet as
    the result's end stays in libpq, the socket never turns readable again,
    and txpostgres never dispatches it (a change would wait for the periodic
    reload). Once the query is done, polling the idle psycopg2 connection
    moves it, and txpostgres's C{cursorFinished} dispatches it.
    """

    def __init__(self, reactor, lost: Callable[[Connection, Failure], None]) -> None:
        super().__init__(reactor=reactor)
        self._lost = lost

    def doRead(self) -> None:
        try:
            super().doRead()
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            self._lost(self, Failure())

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._lost(self, reason)

    def cursorFinished(self, cursor) -> None:
        # No query is in flight here (txpostgres runs one at a time and the
        # next starts after this cursor's Deferred has fired), so this poll
        # cannot take another query's result. C{_connection} is txpostgres's
        # psycopg2 connection; pinned by tests/test_twisted_private.py.
        if not self._connection.closed:
            with contextlib.suppress(psycopg2.Error):
                self._connection.poll()
        super().cursorFinished(cursor)


@implementer(IResourceRegistry)
class PostgresResourceStore(Service):
    """
    A L{IResourceRegistry} over the C{gateway_resources} table.

    Start it as a service. It never blocks the reactor and never fails to
    start: while Postgres cannot be reached it logs, keeps retrying with a
    capped backoff, and L{check} errbacks. Once connected it LISTENs, then
    loads the snapshot; each notification triggers a full reload (at most one
    in flight plus one queued, however many notifications arrive), and so
    does every C{reload_interval} seconds. After a reconnection it LISTENs
    and reloads again, so changes made during the outage are picked up.

    Whoever finds the connection dead starts the reconnection at once (SPEC
    section 12): its NOTIFY reader, a reload, or a readiness L{check}. The
    retries follow L{backoff.reconnect_policy} (0.1 s doubling to 0.5 s), so
    the store is back within a fraction of a second of Postgres accepting
    connections.

    @ivar loaded: fires C{None} once the first snapshot is in memory.
    """

    log = Logger()

    def __init__(
        self,
        dsn: str,
        reactor=None,
        reload_interval: float = 30.0,
        clock=None,
        *,
        initial_backoff: float = backoff.INITIAL_DELAY,
        max_backoff: float = backoff.MAX_DELAY,
        query_timeout: float = 10.0,
        check_timeout: float = 2.0,
        connection_factory: Callable[[Callable[[Connection, Failure], None]], Connection]
        | None = None,
    ) -> None:
        """
        @param dsn: C{DATABASE_URL}; parsed now so a malformed one fails at
            startup (L{ConfigError}).
        @param reactor: drives the database sockets (default: the global one).
        @param clock: schedules timers (default: C{reactor}).
        @param query_timeout: a connection attempt or reload taking longer is
            treated as a dead connection and retried.
        @param check_timeout: bound on the readiness C{SELECT 1}.
        @param connection_factory: makes a txpostgres-like connection given
            the C{lost(connection, reason)} callback (tests substitute one).
        """
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._parameters = connection_parameters(dsn)
        self._where = redact_url(dsn)
        self._reload_interval = reload_interval
        self._retry_delay = backoff.reconnect_policy(initial=initial_backoff, cap=max_backoff)
        self._query_timeout = query_timeout
        self._check_timeout = check_timeout
        self._factory = connection_factory or (lambda lost: _StoreConnection(self._reactor, lost))

        self._snapshot: dict[str, ToolResource] = {}
        self._loaded_at: float | None = None
        self.loaded: Deferred[None] = Deferred()

        self._connection: Connection | None = None  # LISTENing, usable
        self._pending: Connection | None = None  # connecting / LISTENing
        self._retry: IDelayedCall | None = None
        self._reloading = False
        self._reload_queued = False
        self._inflight: set[Deferred] = set()
        self._periodic: LoopingCall | None = None
        self._last_error = "not connected yet"
        self._down_since: float | None = None
        self._failures = 0
        self._warned_at: float | None = None

    # -- the IResourceRegistry interface -------------------------------------

    def get(self, identifier: str) -> ToolResource | None:
        """See L{IResourceRegistry.get}: a dict lookup, never a query."""
        return self._snapshot.get(identifier)

    def count(self) -> int:
        """See L{IResourceRegistry.count}."""
        return len(self._snapshot)

    def check(self) -> Deferred[None]:
        """
        See L{IResourceRegistry.check}: a C{SELECT 1} bounded by C{check_timeout}
        on the live connection; also fails until the first snapshot is loaded
        (a gateway without one would refuse every request). A probe that
        finds the connection dead starts the reconnection; one that is only
        slow does not.
        """
        connection = self._connection
        if connection is None:
            return fail(ResourceStoreUnavailable(f"postgres unreachable: {self._last_error}"))
        if self._loaded_at is None:
            return fail(ResourceStoreUnavailable(f"resources not loaded: {self._last_error}"))
        probe = self._bounded(connection.runQuery("SELECT 1"), self._check_timeout)

        def unavailable(failure: Failure) -> Failure:
            if connection.closed:
                # The probe was the first to touch a connection that died
                # (its reader may never fire again once a query failed on
                # it): reconnect now rather than at the next reload.
                self._lost(connection, failure)
            if failure.check(ResourceStoreUnavailable):
                return failure
            return Failure(ResourceStoreUnavailable(f"postgres check failed: {_reason(failure)}"))

        return probe.addCallbacks(lambda _: None, unavailable)

    def snapshot_age(self) -> float | None:
        """Seconds since the snapshot was last loaded; C{None} before the first load."""
        if self._loaded_at is None:
            return None
        return self._clock.seconds() - self._loaded_at

    @property
    def connected(self) -> bool:
        """C{True} while LISTENing on a live connection."""
        return self._connection is not None

    # -- IService --------------------------------------------------------

    def startService(self) -> None:
        """Start connecting (asynchronously) and the periodic reload."""
        super().startService()
        self.log.info("resource store connecting to {where}", where=self._where)
        self._connect()
        self._periodic = LoopingCall(self._request_reload)
        self._periodic.clock = self._clock
        self._periodic.start(self._reload_interval, now=False)

    def stopService(self) -> Deferred[None]:
        """Stop reloading and reconnecting, close the connection."""
        super().stopService()
        if self._periodic is not None and self._periodic.running:
            self._periodic.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        for connection in (self._pending, self._connection):
            if connection is not None:
                self._close(connection)
        self._pending = self._connection = None
        # Queries still in flight errback as their connection closes; wait
        # for them so nothing fires after the service has stopped.
        return gatherResults([_settled(inflight) for inflight in self._inflight]).addCallback(
            lambda _: None
        )

    # -- connection life cycle -------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        if not self.running:
            return
        connection = self._factory(self._lost)
        self._pending = connection
        connection.addNotifyObserver(self._notified)

        def listen(_):
            return self._bounded(connection.runOperation(f"LISTEN {CHANNEL}"), None, connection)

        attempt = self._bounded(connection.connect(**self._parameters), None, connection)
        attempt.addCallback(listen)
        attempt.addCallbacks(
            lambda _: self._listening(connection),
            lambda failure: self._attempt_failed(connection, failure),
        )
        self._track(attempt)

    def _listening(self, connection: Connection) -> None:
        if connection is not self._pending:
            return
        self._pending = None
        self._connection = connection
        if self._down_since is not None:
            self.log.info(
                "resource store reconnected to {where} after {seconds:.1f}s",
                where=self._where,
                seconds=self._clock.seconds() - self._down_since,
            )
        else:
            self.log.info("resource store connected to {where}", where=self._where)
        self._down_since = None
        self._failures = 0
        self._warned_at = None
        self._request_reload()

    def _attempt_failed(self, connection: Connection, failure: Failure) -> None:
        if connection is not self._pending:
            return
        self._pending = None
        self._close(connection)
        self._down(failure)

    def _lost(self, connection: Connection, reason: Failure) -> None:
        """A connection died (read error, server gone, closed by a timeout)."""
        if connection is self._pending:
            # The attempt's own Deferred errbacks too; it does the bookkeeping.
            return
        if connection is not self._connection:
            return
        self._connection = None
        self._close(connection)
        self._down(reason)

    def _down(self, reason: Failure) -> None:
        """Record an outage, log it (not too often) and schedule a reconnection."""
        self._last_error = _reason(reason)
        now = self._clock.seconds()
        self._failures += 1
        if self._down_since is None:
            self._down_since = now
        if not self.running:
            return
        if self._warned_at is None or now - self._warned_at >= 60.0:
            self._warned_at = now
            self.log.warn(
                "resource store cannot reach postgres at {where} ({error}); serving the last"
                " snapshot of {count} resources, retrying (attempt {attempt})",
                where=self._where,
                error=self._last_error,
                count=self.count(),
                attempt=self._failures,
            )
        # The shared policy's jitter spreads the reconnections of many
        # gateways after a restart; its cap keeps recovery within 2 s.
        delay = self._retry_delay(self._failures - 1)
        self._retry = self._clock.callLater(delay, self._connect)

    def _close(self, connection: Connection) -> None:
        connection.removeNotifyObserver(self._notified)
        # A connection that never opened or is already broken has nothing
        # left to release; closing it may raise.
        with contextlib.suppress(Exception):
            connection.close()

    # -- reloading -------------------------------------------------------

    def _notified(self, notify) -> None:
        if notify.channel == CHANNEL:
            self._request_reload()

    def _request_reload(self) -> None:
        """Reload now, or once more after the reload in flight."""
        if self._connection is None:
            return  # the reconnection reloads
        if self._reloading:
            self._reload_queued = True
            return
        self._reloading = True
        self._reload_queued = False
        connection = self._connection
        reload = self._track(
            self._bounded(connection.runQuery(_SELECT_RESOURCES), None, connection)
        )
        reload.addCallbacks(self._install, self._reload_failed, errbackArgs=(connection,))
        reload.addBoth(self._reload_done)

    def _install(self, rows) -> None:
        snapshot = {}
        for row in rows:
            try:
                snapshot[row[0]] = ToolResource(*row[:8])
            except ValueError as error:
                # Left out, so calls to it are refused (403) before any STS
                # exchange; the operator fixes the row with the admin command.
                self.log.error(
                    "resource {resource} ignored: {problem}", resource=row[0], problem=str(error)
                )
        self._snapshot = snapshot
        first = self._loaded_at is None
        self._loaded_at = self._clock.seconds()
        if first:
            self.log.info("resource store loaded {count} resources", count=len(self._snapshot))
            self.loaded.callback(None)
        else:
            self.log.debug("resource store reloaded {count} resources", count=len(self._snapshot))

    def _reload_failed(self, failure: Failure, connection: Connection) -> None:
        if connection is not self._connection:
            return  # that connection is already gone and being replaced
        if connection.closed:
            self._lost(connection, failure)
            return
        # The server answered but the query failed (no table yet, a
        # permission): keep the snapshot, the next notification or period
        # tries again.
        self._last_error = _reason(failure)
        self.log.error(
            "resource store reload failed ({error}); serving the last snapshot of"
            " {count} resources",
            error=self._last_error,
            count=self.count(),
        )

    def _reload_done(self, _) -> None:
        self._reloading = False
        if self._reload_queued:
            self._request_reload()

    # -- helpers ---------------------------------------------------------

    def _track(self, deferred: Deferred) -> Deferred:
        """Remember C{deferred} until it fires, so stopService can wait for it."""
        self._inflight.add(deferred)

        def forget(result):
            self._inflight.discard(deferred)
            return result

        return deferred.addBoth(forget)

    def _bounded(
        self, deferred: Deferred, timeout: float | None, connection: Connection | None = None
    ) -> Deferred:
        """
        C{deferred}, or L{ResourceStoreUnavailable} after C{timeout} seconds
        (C{query_timeout} when C{None}). With C{connection}, a timeout also
        closes it: a query that hangs that long means the link is dead, and
        closing is how txpostgres lets go of it. (Cancelling a txpostgres
        query raises into the caller instead of cancelling it.)
        """
        seconds = self._query_timeout if timeout is None else timeout
        result: Deferred = Deferred()

        def expire() -> None:
            # Close first, so whoever handles the errback sees a dead connection.
            if connection is not None:
                self._close(connection)
            result.errback(ResourceStoreUnavailable(f"no answer within {seconds:g}s"))

        timer = self._clock.callLater(seconds, expire)

        def settle(outcome):
            if timer.active():
                timer.cancel()
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)
            # After a timeout the late outcome is dropped on purpose.

        deferred.addBoth(settle)
        return result
