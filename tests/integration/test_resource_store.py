# -*- test-case-name: tests.integration.test_resource_store -*-
"""
L{PostgresResourceStore} against the real Postgres: the schema's triggers, the
NOTIFY path, and a real outage of the store's own temporary database.
"""

from __future__ import annotations

import time

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from caracal.gateway.registry import PostgresResourceStore, ResourceStoreUnavailable, ToolResource
from tests.support.postgres import TemporaryDatabase, postgres_available, schema_sql
from tests.support.waiting import poll_until
from tests.test_registry import CONTRACT_RESOURCES, ResourceStoreContract

_SKIP = postgres_available()

SLOW = {"upstream_timeout_ms": 300000}

_INSERT = (
    "INSERT INTO gateway_resources (resource_identifier, zone_id, application_id,"
    " upstream_url, auth_mode, auth_header, auth_scheme, upstream_timeout_ms)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
)


def insert(database: TemporaryDatabase, resource: ToolResource) -> None:
    database.execute(
        _INSERT,
        (
            resource.resource_identifier,
            resource.zone_id,
            resource.application_id,
            resource.upstream_url,
            resource.auth_mode,
            resource.auth_header,
            resource.auth_scheme,
            resource.upstream_timeout_ms,
        ),
    )


class _DatabaseTestCase(TestCase):
    """A temporary database of its own for each test (trial has no setUpClass)."""

    skip = _SKIP

    def setUp(self):
        self.database = TemporaryDatabase().create()
        self.addCleanup(self.database.drop)

    @inlineCallbacks
    def start_store(self, reload_interval=3600.0, **kwargs):
        """A started store over the database, its first snapshot loaded."""
        store = PostgresResourceStore(
            self.database.url, reactor, reload_interval=reload_interval, **kwargs
        )
        store.startService()
        self.addCleanup(store.stopService)
        yield store.loaded
        return store


class PostgresResourceStoreContractTests(ResourceStoreContract, _DatabaseTestCase):
    """L{PostgresResourceStore} passes the contract every store passes."""

    @inlineCallbacks
    def setUp(self):
        super().setUp()
        for resource in CONTRACT_RESOURCES:
            insert(self.database, resource)
        self.store = yield self.start_store()


class PostgresResourceStoreTests(_DatabaseTestCase):
    """Loading, change propagation and readiness."""

    @inlineCallbacks
    def test_initial_load_and_check(self):
        """The store loads the table and its readiness check passes."""
        insert(self.database, CONTRACT_RESOURCES[0])
        store = yield self.start_store()
        self.assertEqual(store.get("mcp-weather"), CONTRACT_RESOURCES[0])
        self.assertEqual(store.count(), 1)
        yield store.check()

    @inlineCallbacks
    def test_libpq_dsn(self):
        """A libpq key=value DSN connects too."""
        store = PostgresResourceStore(self.database.dsn, reactor, reload_interval=3600.0)
        store.startService()
        self.addCleanup(store.stopService)
        yield store.loaded
        self.assertEqual(store.count(), 0)
        self.assertEqual(self.database.backends("caracal-gateway"), 1)

    @inlineCallbacks
    def test_changes_arrive_by_notify_within_a_second(self):
        # The periodic reload is an hour away: only NOTIFY can be at work.
        """Inserts, updates and deletes arrive through NOTIFY within a second."""
        store = yield self.start_store(reload_interval=3600.0)
        self.assertIsNone(store.get("r1"))

        insert(self.database, ToolResource("r1", "z", "a", "https://one.example"))
        took = yield poll_until(lambda: store.get("r1") is not None, 1.0)
        self.assertIsNotNone(took, "INSERT did not arrive within a second")
        self.assertLess(took, 1.0)

        self.database.execute(
            "UPDATE gateway_resources SET upstream_url = 'https://two.example',"
            " auth_mode = 'provider_apikey', auth_header = 'X-Key' WHERE resource_identifier = 'r1'"
        )
        took = yield poll_until(lambda: store.get("r1").upstream_url == "https://two.example", 1.0)
        self.assertIsNotNone(took, "UPDATE did not arrive within a second")
        self.assertEqual(
            store.get("r1"),
            ToolResource("r1", "z", "a", "https://two.example", "provider_apikey", "X-Key", None),
        )

        self.database.execute("DELETE FROM gateway_resources WHERE resource_identifier = 'r1'")
        took = yield poll_until(lambda: store.get("r1") is None, 1.0)
        self.assertIsNotNone(took, "DELETE did not arrive within a second")

    @inlineCallbacks
    def test_truncate_arrives(self):
        """A TRUNCATE empties the snapshot within a second."""
        insert(self.database, CONTRACT_RESOURCES[0])
        store = yield self.start_store()
        self.assertEqual(store.count(), 1)
        self.database.execute("TRUNCATE gateway_resources")
        took = yield poll_until(lambda: store.count() == 0, 1.0)
        self.assertIsNotNone(took, "TRUNCATE did not arrive within a second")

    @inlineCallbacks
    def test_renamed_resource(self):
        """A renamed resource is found under its new name only."""
        insert(self.database, ToolResource("old-name", "z", "a", "https://x.example"))
        store = yield self.start_store()
        self.database.execute(
            "UPDATE gateway_resources SET resource_identifier = 'new-name'"
            " WHERE resource_identifier = 'old-name'"
        )
        took = yield poll_until(lambda: store.get("new-name") is not None, 1.0)
        self.assertIsNotNone(took)
        self.assertIsNone(store.get("old-name"))

    @inlineCallbacks
    def test_burst_of_changes(self):
        """A 500-row insert arrives whole."""
        store = yield self.start_store()
        values = ", ".join(f"('b{i}', 'z', 'a', 'https://b{i}.example')" for i in range(500))
        columns = "resource_identifier, zone_id, application_id, upstream_url"
        # Constant values, built here only to make one 500-row statement.
        self.database.execute(f"INSERT INTO gateway_resources ({columns}) VALUES {values}")  # noqa: S608
        for i in range(20):
            self.database.execute(
                "UPDATE gateway_resources SET zone_id = %s WHERE resource_identifier = 'b7'",
                (f"z{i}",),
            )
        took = yield poll_until(
            lambda: store.count() == 500 and store.get("b7").zone_id == "z19", 2.0
        )
        self.assertIsNotNone(took, f"burst not settled: {store.count()} resources")

    @inlineCallbacks
    def test_periodic_reload_is_a_safety_net(self):
        # Without the trigger nothing is NOTIFYed; the periodic reload still
        # brings the change in.
        """With the trigger disabled the periodic reload still brings changes in."""
        self.database.execute("ALTER TABLE gateway_resources DISABLE TRIGGER USER")
        self.addCleanup(self.database.execute, "ALTER TABLE gateway_resources ENABLE TRIGGER USER")
        store = yield self.start_store(reload_interval=0.2)
        insert(self.database, ToolResource("quiet", "z", "a", "https://q.example"))
        took = yield poll_until(lambda: store.get("quiet") is not None, 1.0)
        self.assertIsNotNone(took)

    def test_updated_at_touched(self):
        """An update sets updated_at."""
        insert(self.database, ToolResource("t", "z", "a", "https://t.example"))
        self.database.execute(
            "UPDATE gateway_resources SET updated_at = now() - interval '1 day'"
            " WHERE resource_identifier = 't'"
        )
        ((age,),) = self.database.execute(
            "SELECT extract(epoch FROM now() - updated_at) FROM gateway_resources"
        )
        # The touch trigger overrides even an explicit updated_at.
        self.assertLess(age, 60)

    def test_schema_applies_twice(self):
        """Applying the schema again keeps the rows."""
        insert(self.database, ToolResource("kept", "z", "a", "https://k.example"))
        self.database.execute(schema_sql())
        self.database.execute(schema_sql())
        self.assertEqual(
            self.database.execute("SELECT resource_identifier FROM gateway_resources"),
            [("kept",)],
        )
        triggers = self.database.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'gateway_resources'::regclass"
            " AND NOT tgisinternal ORDER BY tgname"
        )
        self.assertEqual(
            triggers,
            [
                ("gateway_resources_notify",),
                ("gateway_resources_notify_truncate",),
                ("gateway_resources_touch",),
            ],
        )

    def test_auth_mode_constraint(self):
        """The table refuses an unknown auth mode."""
        import psycopg2

        self.assertRaises(
            psycopg2.errors.CheckViolation,
            self.database.execute,
            _INSERT,
            ("r", "z", "a", "https://x.example", "basic", None, None, None),
        )

    def test_upstream_timeout_constraint(self):
        """SPEC 13: upstream_timeout_ms is NULL or positive."""
        import psycopg2

        for value in (0, -1):
            self.assertRaises(
                psycopg2.errors.CheckViolation,
                self.database.execute,
                _INSERT,
                ("r", "z", "a", "https://x.example", "caracal_jwt", None, None, value),
            )

    @inlineCallbacks
    def test_upstream_timeout_loaded(self):
        """A resource's upstream_timeout_ms reaches the snapshot."""
        insert(self.database, ToolResource("slow", "z", "a", "https://s.example", **SLOW))
        store = yield self.start_store()
        self.assertEqual(store.get("slow").upstream_timeout_ms, 300000)
        self.assertEqual(store.get("slow").upstream_timeout, 300.0)

    def test_schema_adds_column_to_first_release_table(self):
        """Applied over a first-release table, the schema adds the column and keeps the rows."""
        self.database.execute("ALTER TABLE gateway_resources DROP COLUMN upstream_timeout_ms")
        self.database.execute(
            "INSERT INTO gateway_resources (resource_identifier, zone_id, application_id,"
            " upstream_url) VALUES ('old', 'z', 'a', 'https://o.example')"
        )
        self.database.execute(schema_sql())
        self.assertEqual(
            self.database.execute(
                "SELECT resource_identifier, upstream_timeout_ms FROM gateway_resources"
            ),
            [("old", None)],
        )
        import psycopg2

        self.assertRaises(
            psycopg2.errors.CheckViolation,
            self.database.execute,
            "UPDATE gateway_resources SET upstream_timeout_ms = 0",
        )


class PostgresOutageTests(_DatabaseTestCase):
    """
    A real outage as the store sees it: its sessions are terminated and it
    may not log in again (L{TemporaryDatabase.block_reader}), while the tests
    keep writing through their own role. The store serves its last snapshot,
    then reconnects, LISTENs again and picks up what changed meanwhile.
    """

    def start_reader_store(self):
        store = PostgresResourceStore(
            self.database.reader_url, reactor, reload_interval=3600.0, max_backoff=0.5
        )
        store.startService()
        self.addCleanup(store.stopService)
        return store

    @inlineCallbacks
    def test_outage_and_recovery(self):
        """
        Through an outage the last snapshot is served and readiness fails; after it the store
        reconnects and picks up the changes.
        """
        insert(self.database, CONTRACT_RESOURCES[0])
        store = self.start_reader_store()
        yield store.loaded
        yield store.check()

        self.database.block_reader()
        lost = yield poll_until(lambda: not store.connected, 5.0)
        self.assertIsNotNone(lost, "the store did not notice its connection was terminated")
        # The last good snapshot keeps serving; readiness reports the outage.
        self.assertEqual(store.get("mcp-weather"), CONTRACT_RESOURCES[0])
        yield self.assertFailure(store.check(), ResourceStoreUnavailable)

        # Changes made during the outage, while reconnections are refused.
        insert(self.database, CONTRACT_RESOURCES[1])
        self.database.execute(
            "DELETE FROM gateway_resources WHERE resource_identifier = %s", ("mcp-weather",)
        )
        yield deferLater(reactor, 1.0, lambda: None)
        self.assertFalse(store.connected)
        self.assertEqual(store.get("mcp-weather"), CONTRACT_RESOURCES[0])
        self.assertIsNone(store.get("github"))

        self.database.allow_reader()
        took = yield poll_until(lambda: store.get("github") is not None, 5.0)
        self.assertIsNotNone(took, "change made during the outage not picked up")
        self.assertIsNone(store.get("mcp-weather"))
        self.assertTrue(store.connected)
        yield store.check()

        # And it LISTENs again: a later change arrives by NOTIFY, not by the
        # hourly reload.
        insert(self.database, CONTRACT_RESOURCES[2])
        took = yield poll_until(lambda: store.get("search") is not None, 1.0)
        self.assertIsNotNone(took, "no NOTIFY after reconnecting")
        self.assertLess(took, 1.0)

    @inlineCallbacks
    def test_database_down_at_startup(self):
        """
        A database down at startup leaves the store running and not ready; it loads within 2 s of
        coming back.
        """
        self.database.block_reader()
        insert(self.database, CONTRACT_RESOURCES[0])
        store = self.start_reader_store()
        yield deferLater(reactor, 1.0, lambda: None)
        self.assertTrue(store.running)
        self.assertFalse(store.loaded.called)
        self.assertIsNone(store.get("mcp-weather"))
        failure = yield self.assertFailure(store.check(), ResourceStoreUnavailable)
        self.assertIn("unreachable", str(failure))

        self.database.allow_reader()
        started = time.monotonic()
        yield store.loaded
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertEqual(store.get("mcp-weather"), CONTRACT_RESOURCES[0])
        yield store.check()

    @inlineCallbacks
    def test_whole_database_unavailable(self):
        """When no connection is possible the store notices, and recovers when it is."""
        insert(self.database, CONTRACT_RESOURCES[0])
        store = yield self.start_store(max_backoff=0.5)
        self.database.block_connections()
        lost = yield poll_until(lambda: not store.connected, 5.0)
        self.assertIsNotNone(lost)
        self.assertEqual(store.get("mcp-weather"), CONTRACT_RESOURCES[0])
        self.database.allow_connections()
        took = yield poll_until(lambda: store.connected, 5.0)
        self.assertIsNotNone(took, "no reconnection after the database came back")
        yield store.check()
