# -*- test-case-name: tests.integration.test_postgres_failover -*-
"""
Postgres behind a libpq multi-host DSN (SPEC 16): the resource store, and a
real gateway process, connect to the first host that accepts (with
C{target_session_attrs=read-write}, the first writable one: libpq iterates
the hosts), LISTEN there, and after the primary changes reconnect to the new
one and LISTEN again.

The "hosts" are L{tests.support.relay.Relay}s on loopback in front of the
shared Postgres, each test in a temporary database of its own.
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from caracal.gateway.registry import PostgresResourceStore
from tests.support.postgres import TemporaryDatabase, postgres_available
from tests.support.relay import Relay
from tests.support.replicas import RESOURCE, ReplicaSet
from tests.support.waiting import free_port, wait_until

_SKIP = postgres_available()
SHARED = ("127.0.0.1", 5432)

_INSERT = (
    "INSERT INTO gateway_resources (resource_identifier, zone_id, application_id,"
    " upstream_url) VALUES (%s, 'zone-pg', 'app-pg', 'https://tools.example.com/')"
)


def multi_host_url(database: TemporaryDatabase, *ports: int) -> str:
    """A URL-form multi-host DSN for C{database} on 127.0.0.1 at C{ports}, read-write only."""
    [(user,)] = database.execute("SELECT current_user")
    hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
    return f"postgresql://{user}@{hosts}/{database.name}?target_session_attrs=read-write"


class MultiHostStoreTests(TestCase):
    """L{PostgresResourceStore} over a multi-host DSN."""

    skip = _SKIP
    timeout = 60

    def setUp(self):
        self.database = TemporaryDatabase().create()
        self.addCleanup(self.database.drop)

    @defer.inlineCallbacks
    def start_store(self, dsn: str):
        store = PostgresResourceStore(
            dsn, reactor, reload_interval=3600.0, initial_backoff=0.05, max_backoff=0.2
        )
        store.startService()
        self.addCleanup(store.stopService)
        yield store.loaded
        return store

    def notified(self, store, identifier: str):
        """Insert a row; fire once the store has it (NOTIFY: the reload period is an hour)."""
        self.database.execute(_INSERT, (identifier,))
        return wait_until(lambda: store.get(identifier) is not None, timeout=10.0)

    @defer.inlineCallbacks
    def test_key_value_dsn_first_host_dead(self):
        """host=a,b port=dead,live: the store serves from the second host and is notified."""
        [(user,)] = self.database.execute("SELECT current_user")
        dsn = (
            f"host=127.0.0.1,127.0.0.1 port={free_port()},5432 dbname={self.database.name}"
            f" user={user} target_session_attrs=read-write"
        )
        store = yield self.start_store(dsn)
        self.assertTrue(store.connected)
        yield self.notified(store, "by-notify")
        yield store.check()

    @defer.inlineCallbacks
    def test_primary_change(self):
        """
        The primary (first host) goes away and the second host takes over:
        the store reconnects there, LISTENs again, and a change made on the
        new primary reaches it.
        """
        first = Relay(*SHARED).up()
        self.addCleanup(first.down)
        second = Relay(*SHARED)
        self.addCleanup(second.down)
        store = yield self.start_store(multi_host_url(self.database, first.port, second.port))
        yield self.notified(store, "on-the-first")
        self.assertEqual(second.connections, 0)

        yield first.down()
        second.up()
        yield wait_until(lambda: store.connected and len(second.carried) == 1, timeout=10.0)
        yield self.notified(store, "on-the-second")
        self.assertIsNotNone(store.get("on-the-first"), "the snapshot survived the switch")
        yield store.check()


class MultiHostGatewayTests(TestCase):
    """A real twistd gateway whose DATABASE_URL_FILE names a DSN whose first host is dead."""

    skip = _SKIP
    timeout = 90

    @defer.inlineCallbacks
    def test_serves_from_the_second_host_and_listens(self):
        """The gateway forwards calls, and a change to the table reaches it by NOTIFY."""
        directory = os.path.abspath(self.mktemp())
        replicas = ReplicaSet(directory)
        dsn_file = os.path.join(directory, "database-url")
        base_environ = replicas.environ

        def environ(port: int) -> dict[str, str]:
            values = base_environ(port)
            with open(dsn_file, "w") as secret:
                secret.write(multi_host_url(replicas.database, free_port(), 5432) + "\n")
            del values["DATABASE_URL"]
            values["DATABASE_URL_FILE"] = dsn_file
            return values

        replicas.environ = environ
        self.addCleanup(replicas.stop)
        yield replicas.start(count=1)
        gateway = replicas.gateways[0]
        yield replicas.serving(gateway)
        self.assertEqual((yield replicas.outcome(gateway, replicas.mint())), "allowed")

        # The gateway reloads periodically only every 30 s: within 10 s, only
        # the NOTIFY on its LISTEN connection can tell it.
        replicas.database.execute(
            "DELETE FROM gateway_resources WHERE resource_identifier = %s", (RESOURCE,)
        )

        @defer.inlineCallbacks
        def refused():
            return (yield replicas.outcome(gateway, replicas.mint(use="ambient"))) == (
                "access_denied"
            )

        yield wait_until(refused, timeout=10.0, interval=0.1)
