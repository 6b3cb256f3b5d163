# -*- test-case-name: tests.test_registry -*-
"""
Tests for L{caracal.gateway.registry}: the resource row, the in-memory store,
the contract every store passes, and the Postgres store's life cycle driven
by a fake connection and a fake clock.
"""

from __future__ import annotations

import dataclasses

import psycopg2
from psycopg2.extensions import POLL_OK, Notify
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from caracal.gateway.config import ConfigError
from caracal.gateway.interfaces import IResourceRegistry
from caracal.gateway.registry import (
    CHANNEL,
    PostgresResourceStore,
    ResourceStoreUnavailable,
    ToolResource,
    _StoreConnection,
)
from caracal.gateway.testing import MemoryResourceStore

#: The resources every store under the contract is loaded with.
CONTRACT_RESOURCES = (
    ToolResource("mcp-weather", "zone-a", "app-1", "https://weather.example/mcp"),
    ToolResource(
        "github",
        "zone-b",
        "app-2",
        "https://api.github.example/v3",
        auth_mode="provider_oauth",
        auth_header="X-GitHub-Token",
        auth_scheme="token",
    ),
    ToolResource("search", "zone-a", "app-3", "http://search.example", auth_mode="provider_apikey"),
)


class ResourceTests(SynchronousTestCase):
    """The defaults SPEC section 4 gives NULL auth_header / auth_scheme."""

    def test_caracal_jwt_defaults(self):
        """A caracal_jwt resource sends C{Authorization: Bearer <mandate>} by default."""
        resource = ToolResource("r", "z", "a", "https://u.example")
        self.assertEqual(resource.auth_mode, "caracal_jwt")
        self.assertEqual(resource.credential_header, "Authorization")
        self.assertEqual(resource.credential_scheme, "Bearer")
        self.assertEqual(resource.credential_value("m.a.n"), "Bearer m.a.n")

    def test_provider_modes_have_no_default_scheme(self):
        """Provider modes send the bare provider token in Authorization by default."""
        for mode in ("provider_oauth", "provider_apikey"):
            resource = ToolResource("r", "z", "a", "https://u.example", auth_mode=mode)
            self.assertEqual(resource.credential_header, "Authorization")
            self.assertEqual(resource.credential_scheme, "")
            self.assertEqual(resource.credential_value("pt"), "pt")

    def test_explicit_header_and_scheme(self):
        """An explicit header name and scheme are used as given."""
        resource = ToolResource(
            "r", "z", "a", "https://u.example", "provider_apikey", "X-Api-Key", "Key"
        )
        self.assertEqual(resource.credential_header, "X-Api-Key")
        self.assertEqual(resource.credential_scheme, "Key")
        self.assertEqual(resource.credential_value("k"), "Key k")

    def test_empty_scheme_means_none_even_for_caracal_jwt(self):
        """An empty scheme means the bare credential, whatever the mode."""
        resource = ToolResource("r", "z", "a", "https://u.example", auth_scheme="")
        self.assertEqual(resource.credential_scheme, "")
        self.assertEqual(resource.credential_value("m"), "m")

    def test_empty_header_means_authorization(self):
        """An empty header name means Authorization."""
        resource = ToolResource("r", "z", "a", "https://u.example", auth_header="")
        self.assertEqual(resource.credential_header, "Authorization")

    def test_unknown_auth_mode_refused(self):
        """An unknown auth mode is refused when the row is built."""
        self.assertRaises(ValueError, ToolResource, "r", "z", "a", "https://u", auth_mode="basic")

    def test_frozen(self):
        """A resource row cannot be changed."""
        resource = ToolResource("r", "z", "a", "https://u.example")
        self.assertRaises(
            dataclasses.FrozenInstanceError, setattr, resource, "upstream_url", "http://x"
        )


class ResourceStoreContract:
    """
    What every L{IResourceRegistry} does. Mix into a test case whose setUp sets
    C{self.store} to a ready store holding exactly L{CONTRACT_RESOURCES}.
    """

    store: IResourceRegistry

    def test_provides_interface(self):
        """The store provides L{IResourceRegistry}."""
        self.assertTrue(verifyObject(IResourceRegistry, self.store))

    def test_get_known(self):
        """Each loaded resource is found by its identifier."""
        for expected in CONTRACT_RESOURCES:
            self.assertEqual(self.store.get(expected.resource_identifier), expected)

    def test_get_unknown(self):
        """An unknown or empty identifier finds nothing."""
        self.assertIsNone(self.store.get("no-such-resource"))
        self.assertIsNone(self.store.get(""))

    def test_identifiers_are_exact(self):
        """Identifiers match exactly: no case folding, no trimming."""
        self.assertIsNone(self.store.get("GITHUB"))
        self.assertIsNone(self.store.get("github "))

    def test_count(self):
        """The count is the number of resources loaded."""
        self.assertEqual(self.store.count(), len(CONTRACT_RESOURCES))

    def test_fields(self):
        """Every column comes back, and the credential defaults follow the auth mode."""
        github = self.store.get("github")
        self.assertEqual(github.zone_id, "zone-b")
        self.assertEqual(github.application_id, "app-2")
        self.assertEqual(github.upstream_url, "https://api.github.example/v3")
        self.assertEqual(github.credential_header, "X-GitHub-Token")
        self.assertEqual(github.credential_scheme, "token")
        search = self.store.get("search")
        self.assertIsNone(search.auth_header)
        self.assertIsNone(search.auth_scheme)
        self.assertEqual(search.credential_scheme, "")
        weather = self.store.get("mcp-weather")
        self.assertEqual(weather.credential_scheme, "Bearer")


class MemoryResourceStoreContractTests(ResourceStoreContract, SynchronousTestCase):
    """L{MemoryResourceStore} passes the contract."""

    def setUp(self):
        self.store = MemoryResourceStore(CONTRACT_RESOURCES)


class MemoryResourceStoreTests(SynchronousTestCase):
    """The in-memory store's own surface: put, remove, simulated unavailability."""

    def test_empty(self):
        """An empty store holds nothing and is ready."""
        store = MemoryResourceStore()
        self.assertEqual(store.count(), 0)
        self.assertIsNone(self.successResultOf(store.check()))

    def test_put_replaces(self):
        """Putting a known identifier replaces its row."""
        store = MemoryResourceStore()
        store.put(ToolResource("r", "z", "a", "https://one.example"))
        store.put(ToolResource("r", "z", "a", "https://two.example"))
        self.assertEqual(store.count(), 1)
        self.assertEqual(store.get("r").upstream_url, "https://two.example")

    def test_remove(self):
        """Removing forgets a row; removing an unknown one is harmless."""
        store = MemoryResourceStore(CONTRACT_RESOURCES)
        store.remove("github")
        store.remove("never-there")
        self.assertIsNone(store.get("github"))
        self.assertEqual(store.count(), len(CONTRACT_RESOURCES) - 1)

    def test_unavailable(self):
        """A store set unavailable fails its readiness check and still answers lookups."""
        store = MemoryResourceStore(CONTRACT_RESOURCES)
        store.unavailable = ResourceStoreUnavailable("postgres unreachable")
        self.failureResultOf(store.check(), ResourceStoreUnavailable)
        # Lookups keep working, as they do from a real store's last snapshot.
        self.assertIsNotNone(store.get("github"))


def _row(resource: ToolResource) -> tuple:
    return (
        resource.resource_identifier,
        resource.zone_id,
        resource.application_id,
        resource.upstream_url,
        resource.auth_mode,
        resource.auth_header,
        resource.auth_scheme,
    )


class FakeConnection:
    """
    Stands in for a txpostgres connection: records what is asked of it and
    leaves every answer to the test.
    """

    def __init__(self, lost) -> None:
        self.lost = lost
        self.closed = 0
        self.parameters = None
        self.connecting: Deferred | None = None
        self.statements: list[tuple[str, Deferred]] = []
        self.observers: set = set()

    def addNotifyObserver(self, observer):
        self.observers.add(observer)

    def removeNotifyObserver(self, observer):
        self.observers.discard(observer)

    def connect(self, **parameters):
        self.parameters = parameters
        self.connecting = Deferred()
        return self.connecting

    def _run(self, statement):
        if self.closed:
            raise AssertionError(f"{statement!r} on a closed connection")
        answer = Deferred()
        self.statements.append((statement, answer))
        return answer

    runQuery = runOperation = _run

    def pending(self) -> list[str]:
        """Statements not answered yet."""
        return [statement for statement, answer in self.statements if not answer.called]

    def answer(self, statement_start: str, result=None):
        """Answer the oldest pending statement starting with C{statement_start}."""
        for statement, answer in self.statements:
            if not answer.called and statement.startswith(statement_start):
                answer.callback(result)
                return
        raise AssertionError(f"no pending {statement_start!r} in {self.pending()}")

    def fail(self, statement_start: str, error: Exception):
        for statement, answer in self.statements:
            if not answer.called and statement.startswith(statement_start):
                answer.errback(error)
                return
        raise AssertionError(f"no pending {statement_start!r}")

    def _abort(self, error: Exception, reason: Failure):
        if self.connecting is not None and not self.connecting.called:
            self.connecting.errback(error)
        for _, answer in self.statements:
            if not answer.called:
                answer.errback(error)
        self.lost(self, reason)

    def close(self):
        if self.closed:
            return
        self.closed = 1
        self._abort(psycopg2.InterfaceError("connection already closed"), Failure(ConnectionDone()))

    def die(self):
        """The server went away."""
        self.closed = 2
        error = psycopg2.OperationalError("server closed the connection unexpectedly")
        self._abort(error, Failure(error))

    def notify(self, payload: str, channel: str = CHANNEL):
        for observer in list(self.observers):
            observer(Notify(4242, channel, payload))


class HeldNotifyConnection:
    """
    A psycopg2 connection whose libpq holds a notification it read with a
    query's result: C{notifies} gets it only at the next C{poll}.
    """

    closed = 0

    def __init__(self) -> None:
        self.notifies: list = []
        self.held: list = []

    def poll(self):
        self.notifies.extend(self.held)
        del self.held[:]
        return POLL_OK

    def fileno(self):
        return 42


class StoreConnectionTests(SynchronousTestCase):
    """The store's txpostgres connection, around a fake psycopg2 connection."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.connection = _StoreConnection(self.reactor, lambda connection, reason: None)
        self.connection._connection = self.psycopg2 = HeldNotifyConnection()
        self.connection.cooperator = Cooperator(
            scheduler=lambda work: self.reactor.callLater(0, work), started=True
        )
        self.seen: list = []
        self.connection.addNotifyObserver(self.seen.append)

    def test_notify_read_with_a_result_is_dispatched(self):
        """
        A NOTIFY that libpq read together with the end of a query's result
        reaches the observers once the query is done, without any further
        traffic on the socket.
        """
        cursor = object()
        self.connection.cursorRunning(cursor)
        notify = Notify(4242, CHANNEL, "x")
        self.psycopg2.held.append(notify)
        self.connection.cursorFinished(cursor)
        self.reactor.advance(0)
        self.reactor.advance(0)
        self.assertEqual(self.seen, [notify])

    def test_closed_connection_is_not_polled(self):
        """A query that ended with its connection closed polls nothing."""
        cursor = object()
        self.connection.cursorRunning(cursor)
        self.psycopg2.closed = 1
        self.psycopg2.held.append(Notify(4242, CHANNEL, "x"))
        self.connection.cursorFinished(cursor)
        self.reactor.advance(0)
        self.assertEqual(self.psycopg2.held, [Notify(4242, CHANNEL, "x")])
        self.assertEqual(self.seen, [])


class PostgresResourceStoreTests(SynchronousTestCase):
    """The Postgres store's life cycle, with a fake connection and clock."""

    def setUp(self):
        self.clock = Clock()
        self.connections: list[FakeConnection] = []
        self.events: list[dict] = []
        self.store = self.make_store()

    def make_store(self, dsn="postgresql://gw:s3cret-pw@db.internal:5432/caracal", **kwargs):
        def factory(lost):
            connection = FakeConnection(lost)
            self.connections.append(connection)
            return connection

        store = PostgresResourceStore(
            dsn,
            reactor=object(),
            clock=self.clock,
            reload_interval=30.0,
            connection_factory=factory,
            **kwargs,
        )
        store.log = Logger(namespace="test", observer=self.events.append)
        self.addCleanup(self.stop, store)
        return store

    def stop(self, store):
        if store.running:
            self.successResultOf(store.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def retry_delay(self) -> float:
        """Seconds until the scheduled reconnection."""
        (retry,) = [c for c in self.clock.getDelayedCalls() if c.func == self.store._connect]
        return retry.getTime() - self.clock.seconds()

    @property
    def connection(self) -> FakeConnection:
        return self.connections[-1]

    def bring_up(self, resources=CONTRACT_RESOURCES):
        """Start the store and let it connect, LISTEN and load C{resources}."""
        self.store.startService()
        self.connect_and_load(resources)

    def connect_and_load(self, resources=CONTRACT_RESOURCES):
        self.connection.connecting.callback(None)
        self.connection.answer(f"LISTEN {CHANNEL}")
        self.connection.answer("SELECT resource_identifier", [_row(r) for r in resources])

    def test_start_does_not_wait_for_postgres(self):
        """Starting connects in the background: nothing is loaded yet and nothing waits."""
        self.store.startService()
        self.assertEqual(len(self.connections), 1)
        self.assertIsNone(self.store.get("github"))
        self.assertEqual(self.store.count(), 0)
        self.assertNoResult(self.store.loaded)
        failure = self.failureResultOf(self.store.check(), ResourceStoreUnavailable)
        self.assertIn("unreachable", str(failure.value))

    def test_connection_parameters(self):
        """The DSN's parameters reach libpq, with keepalives and an application name added."""
        self.store.startService()
        parameters = self.connection.parameters
        self.assertEqual(parameters["host"], "db.internal")
        self.assertEqual(parameters["dbname"], "caracal")
        self.assertEqual(parameters["password"], "s3cret-pw")
        self.assertEqual(parameters["keepalives"], "1")
        self.assertEqual(parameters["application_name"], "caracal-gateway")

    def test_libpq_dsn_accepted(self):
        """A libpq key=value DSN works too, and its own settings win."""
        store = self.make_store("host=127.0.0.1 dbname=test application_name=mine")
        store.startService()
        self.assertEqual(self.connection.parameters["dbname"], "test")
        self.assertEqual(self.connection.parameters["application_name"], "mine")

    def test_malformed_dsn(self):
        """A malformed DSN is a ConfigError that does not quote the password."""
        error = self.assertRaises(
            ConfigError, PostgresResourceStore, "host=x password=s3cret junk", reactor=object()
        )
        self.assertNotIn("s3cret", str(error))

    def test_listen_before_load(self):
        """LISTEN is issued before the snapshot is read, so no change falls between."""
        self.store.startService()
        self.connection.connecting.callback(None)
        # The snapshot is read only after LISTEN took effect, so no change
        # can fall between the two.
        self.assertEqual(self.connection.pending(), [f"LISTEN {CHANNEL}"])
        self.connection.answer("LISTEN")
        self.assertEqual(len(self.connection.pending()), 1)
        self.assertTrue(self.connection.pending()[0].startswith("SELECT resource_identifier"))

    def test_initial_load(self):
        """The first snapshot fires C{loaded} and fills the store."""
        self.bring_up()
        self.assertIsNone(self.successResultOf(self.store.loaded))
        self.assertEqual(self.store.count(), 3)
        self.assertEqual(self.store.get("github"), CONTRACT_RESOURCES[1])
        self.assertEqual(self.store.snapshot_age(), 0)
        self.clock.advance(7)
        self.assertEqual(self.store.snapshot_age(), 7)

    def test_check(self):
        """The readiness check is a C{SELECT 1}."""
        self.bring_up()
        checked = self.store.check()
        self.assertNoResult(checked)
        self.connection.answer("SELECT 1", [(1,)])
        self.assertIsNone(self.successResultOf(checked))

    def test_check_is_bounded(self):
        """A readiness check Postgres does not answer fails after its bound."""
        self.bring_up()
        checked = self.store.check()
        self.clock.advance(2.0)
        self.failureResultOf(checked, ResourceStoreUnavailable)
        # A slow probe alone is no reason to drop the connection.
        self.assertEqual(self.connection.closed, 0)
        self.connection.answer("SELECT 1", [(1,)])

    def test_check_finding_the_connection_dead_reconnects(self):
        """
        SPEC 12: the readiness probe is the first to touch a connection the
        server terminated. txpostgres then stops watching it, so no reader
        would ever report it: the probe itself must start the reconnection,
        not the periodic reload 30 s later.
        """
        self.bring_up()
        checked = self.store.check()
        # What psycopg2 does to a backend terminated under it: the query
        # fails and the connection is marked broken (closed == 2), without a
        # lost() call.
        self.connection.closed = 2
        self.connection.fail(
            "SELECT 1", psycopg2.OperationalError("terminating connection due to administrator")
        )
        failure = self.failureResultOf(checked, ResourceStoreUnavailable)
        self.assertIn("terminating connection", str(failure.value))
        self.assertFalse(self.store.connected)
        self.assertLess(self.retry_delay(), 0.15)
        self.clock.advance(self.retry_delay())
        self.assertEqual(len(self.connections), 2)
        self.connect_and_load()
        self.assertTrue(self.store.connected)
        checked = self.store.check()
        self.connection.answer("SELECT 1", [(1,)])
        self.successResultOf(checked)

    def test_check_failing_on_a_live_connection_keeps_it(self):
        """A probe that fails while the connection stays usable does not reconnect."""
        self.bring_up()
        checked = self.store.check()
        self.connection.fail("SELECT 1", psycopg2.errors.QueryCanceled("statement timeout"))
        self.failureResultOf(checked, ResourceStoreUnavailable)
        self.assertTrue(self.store.connected)
        self.assertEqual(len(self.connections), 1)

    def test_check_before_first_snapshot(self):
        """Before a first snapshot the check fails and says why."""
        self.store.startService()
        self.connection.connecting.callback(None)
        self.connection.answer("LISTEN")
        self.connection.fail(
            "SELECT resource_identifier", psycopg2.errors.UndefinedTable("no gateway_resources")
        )
        failure = self.failureResultOf(self.store.check(), ResourceStoreUnavailable)
        self.assertIn("not loaded", str(failure.value))
        self.assertIn("no gateway_resources", str(failure.value))

    def test_notification_reloads(self):
        """A notification reloads the snapshot."""
        self.bring_up()
        self.connection.notify("new")
        added = ToolResource("new", "zone-c", "app-9", "https://new.example")
        self.connection.answer(
            "SELECT resource_identifier", [_row(r) for r in (*CONTRACT_RESOURCES, added)]
        )
        self.assertEqual(self.store.get("new"), added)
        self.assertEqual(self.store.count(), 4)

    def test_other_channels_ignored(self):
        """Notifications on other channels are ignored."""
        self.bring_up()
        self.connection.notify("x", channel="something_else")
        self.assertEqual(self.connection.pending(), [])

    def test_deletion_reaches_snapshot(self):
        """A deleted row leaves the snapshot on the next reload."""
        self.bring_up()
        self.connection.notify("github")
        self.connection.answer("SELECT resource_identifier", [_row(CONTRACT_RESOURCES[0])])
        self.assertIsNone(self.store.get("github"))
        self.assertEqual(self.store.count(), 1)

    def test_notification_burst_coalesced(self):
        """A burst of notifications costs one reload in flight and one queued."""
        self.bring_up()
        for index in range(50):
            self.connection.notify(f"r{index}")
        # One reload in flight, one queued behind it, however many notifications.
        self.assertEqual(len(self.connection.pending()), 1)
        self.connection.answer("SELECT resource_identifier", [])
        self.assertEqual(len(self.connection.pending()), 1)
        self.connection.answer("SELECT resource_identifier", [])
        self.assertEqual(self.connection.pending(), [])
        selects = [s for s, _ in self.connection.statements if s.startswith("SELECT resource")]
        self.assertEqual(len(selects), 3)  # the initial load plus the two

    def test_periodic_reload(self):
        """The snapshot is reloaded periodically even without notifications."""
        self.bring_up()
        self.clock.advance(29.9)
        self.assertEqual(self.connection.pending(), [])
        self.clock.advance(0.1)
        self.assertEqual(len(self.connection.pending()), 1)

    def test_failed_reload_keeps_snapshot_and_connection(self):
        """A failed reload keeps the last snapshot and the connection."""
        self.bring_up()
        self.connection.notify("x")
        self.connection.fail(
            "SELECT resource_identifier", psycopg2.errors.InsufficientPrivilege("denied")
        )
        self.assertEqual(self.store.count(), 3)
        self.assertTrue(self.store.connected)
        self.assertEqual(len(self.connections), 1)
        self.assertTrue(any("reload failed" in formatEvent(e) for e in self.events))

    def test_outage_keeps_snapshot_and_reconnects(self):
        """
        Through an outage the last snapshot is served, the check fails, and the store reconnects.
        """
        self.bring_up()
        self.connection.die()
        self.assertFalse(self.store.connected)
        self.assertEqual(self.store.get("github"), CONTRACT_RESOURCES[1])
        self.failureResultOf(self.store.check(), ResourceStoreUnavailable)
        self.assertEqual(len(self.connections), 1)
        self.clock.advance(0.5)
        self.assertEqual(len(self.connections), 2)
        # After reconnecting it LISTENs again and reloads: a change made
        # during the outage is picked up.
        changed = dataclasses.replace(CONTRACT_RESOURCES[1], upstream_url="https://moved.example")
        self.connect_and_load([changed])
        self.assertTrue(self.store.connected)
        self.assertEqual(self.store.get("github"), changed)
        self.assertEqual(self.store.count(), 1)

    def test_outage_during_reload(self):
        """A connection lost mid-reload keeps the snapshot."""
        self.bring_up()
        self.connection.notify("x")
        self.connection.die()
        self.assertFalse(self.store.connected)
        self.assertEqual(self.store.count(), 3)
        self.clock.advance(0.5)
        self.connect_and_load()
        self.assertTrue(self.store.connected)

    def test_reconnect_backoff_is_capped(self):
        """Reconnection delays grow to a cap."""
        self.store.startService()
        delays = []
        for _ in range(8):
            self.connection.connecting.errback(psycopg2.OperationalError("refused"))
            delays.append(self.retry_delay())
            self.clock.advance(delays[-1])
        self.assertEqual(len(self.connections), 9)
        # 0.1 s doubling to the 0.5 s cap, plus at most 50 ms of jitter: the
        # store is back within a fraction of a second of Postgres.
        self.assertTrue(all(d <= 0.55 for d in delays), delays)
        self.assertGreaterEqual(min(delays[3:]), 0.5)  # reached the cap
        self.assertLess(delays[0], 0.15)
        self.assertLess(delays[0], delays[3])
        for connection in self.connections[:-1]:
            self.assertTrue(connection.closed)

    def test_backoff_resets_after_success(self):
        """A successful connection resets the reconnection delay."""
        self.store.startService()
        for _ in range(5):
            self.connection.connecting.errback(psycopg2.OperationalError("refused"))
            self.clock.advance(5.0)
        self.connect_and_load()
        self.connection.die()
        self.assertLessEqual(self.retry_delay(), 0.5)

    def test_connect_timeout(self):
        """A connection attempt that hangs is abandoned and retried."""
        self.store.startService()
        self.clock.advance(10.0)
        self.assertTrue(self.connections[0].closed)
        self.clock.advance(0.5)
        self.assertEqual(len(self.connections), 2)

    def test_hung_reload_drops_connection(self):
        """A reload that hangs drops the connection."""
        self.bring_up()
        self.connection.notify("x")
        self.clock.advance(10.0)
        self.assertTrue(self.connections[0].closed)
        self.assertFalse(self.store.connected)
        self.assertEqual(self.store.count(), 3)
        self.clock.advance(0.5)
        self.connect_and_load([])
        self.assertEqual(self.store.count(), 0)

    def test_stop(self):
        """Stopping closes the connection and leaves no timer."""
        self.bring_up()
        self.connection.notify("x")
        self.successResultOf(self.store.stopService())
        self.assertTrue(self.connection.closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_while_down(self):
        """Stopping during an outage leaves no timer and no new connection."""
        self.store.startService()
        self.connection.connecting.errback(psycopg2.OperationalError("refused"))
        self.successResultOf(self.store.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.connections), 1)

    def test_logs_never_contain_the_password(self):
        """No log line quotes the database password."""
        self.store.startService()
        self.connection.connecting.errback(psycopg2.OperationalError("refused"))
        self.clock.advance(1)
        self.connect_and_load()
        text = "\n".join(formatEvent(event) for event in self.events)
        self.assertIn("db.internal", text)
        self.assertIn("refused", text)
        self.assertNotIn("s3cret-pw", text)

    def test_outage_logged_once_a_minute(self):
        """A long outage is logged once a minute, not on every attempt."""
        self.store.startService()
        for _ in range(12):
            self.connection.connecting.errback(psycopg2.OperationalError("refused"))
            self.clock.advance(5.0)
        warnings = [e for e in self.events if "cannot reach" in formatEvent(e)]
        self.assertEqual(len(warnings), 1)
        for _ in range(12):
            self.connection.connecting.errback(psycopg2.OperationalError("refused"))
            self.clock.advance(5.0)
        warnings = [e for e in self.events if "cannot reach" in formatEvent(e)]
        self.assertEqual(len(warnings), 2)


class CredentialHeaderRulesTests(SynchronousTestCase):
    """A row whose credential header or scheme cannot be sent is refused."""

    def make(self, **fields):
        base = {
            "resource_identifier": "r",
            "zone_id": "z",
            "application_id": "a",
            "upstream_url": "https://tools.example/",
        }
        return ToolResource(**{**base, **fields})

    def test_bad_header_names(self):
        """Header names that are not tokens, or are reserved, are refused."""
        for name in ("X-Bad\r\nInjected: 1", "X Key", "Host", "Transfer-Encoding", "X-Caracal-Id"):
            self.assertRaises(ValueError, self.make, auth_header=name)

    def test_bad_schemes(self):
        """Schemes that are not a single ASCII token are refused."""
        for scheme in ("Bearer\r\nX: 1", "Two words", "\u00e9t\u00e9"):
            self.assertRaises(ValueError, self.make, auth_scheme=scheme)

    def test_good_ones(self):
        """A token header name and an empty scheme are accepted."""
        resource = self.make(auth_mode="provider_apikey", auth_header="X-Api-Key", auth_scheme="")
        self.assertEqual(resource.credential_value("k"), "k")

    def test_store_leaves_bad_rows_out(self):
        """A row with an unsendable credential header is left out of the snapshot."""
        store = PostgresResourceStore("postgresql://127.0.0.1/unused", clock=Clock())
        good = ("good", "z", "a", "https://t.example/", "caracal_jwt", None, None)
        bad = ("bad", "z", "a", "https://t.example/", "caracal_jwt", "X-Bad\r\nX: 1", None)
        store._install([good, bad])
        self.assertIsNotNone(store.get("good"))
        self.assertIsNone(store.get("bad"))
        [event] = [e for e in self.logged if "ignored" in e.get("log_format", "")]
        self.assertEqual(event["resource"], "bad")

    def setUp(self):
        from twisted.logger import globalLogPublisher

        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)
