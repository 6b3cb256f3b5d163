# -*- test-case-name: tests.integration.test_resource_store -*-
"""
Throw-away Postgres databases on the shared test server (127.0.0.1:5432, trust
auth) for integration tests, and a way to cut one of them off: terminating its
backends and refusing new connections to that database is a real outage for
whoever uses it, without touching the shared server or anyone else's data.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

import psycopg2
from psycopg2 import sql

# The packaged schema, exactly as the admin command's migrate applies it.
from caracal.gateway.admin import schema_sql

#: The shared server's maintenance connection; override with CARACAL_TEST_POSTGRES.
ADMIN_DSN = os.environ.get("CARACAL_TEST_POSTGRES", "host=127.0.0.1 port=5432 dbname=test")


@contextlib.contextmanager
def _cursor(dsn: str = ADMIN_DSN) -> Iterator:
    """A cursor on a fresh autocommit connection (by default the maintenance one)."""
    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            yield cursor
    finally:
        connection.close()


def drop_database(name: str) -> None:
    """
    Drop database C{name} if it exists: refuse new connections first, then
    terminate whoever is still connected (a gateway under test reconnects).
    """
    with _cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cursor.fetchone() is None:
            return
        database = sql.Identifier(name)
        cursor.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(database))
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(database))


def postgres_available() -> str | None:
    """C{None} when the shared server answers, else why not (for C{skip})."""
    try:
        with _cursor():
            pass
    except psycopg2.Error as error:
        return f"no Postgres at {ADMIN_DSN}: {' '.join(str(error).split())}"
    return None


class TemporaryDatabase:
    """
    A uniquely named database (C{caracal_t_<random>}) with the schema applied.

    Call L{create}, use L{dsn} / L{url} / L{execute}, and L{drop} in cleanup
    (it terminates remaining backends first).
    """

    def __init__(self, apply_schema: bool = True) -> None:
        self.name = f"caracal_t_{secrets.token_hex(6)}"
        #: A login role allowed only to read the table, as a gateway should
        #: be; L{block_reader} cuts it off while the tests' own role writes on.
        self.reader = f"{self.name}_reader"
        self.apply_schema = apply_schema
        parameters = psycopg2.extensions.parse_dsn(ADMIN_DSN)
        parameters["dbname"] = self.name
        self.dsn = psycopg2.extensions.make_dsn(**parameters)
        host = parameters.get("host", "127.0.0.1")
        port = parameters.get("port", "5432")
        user = parameters.get("user", "")
        self.url = f"postgresql://{user + '@' if user else ''}{host}:{port}/{self.name}"
        self.reader_url = f"postgresql://{self.reader}@{host}:{port}/{self.name}"

    def create(self) -> TemporaryDatabase:
        """Create the database (and apply the schema); returns C{self}."""
        with _cursor() as cursor:
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
        if self.apply_schema:
            self.execute(schema_sql())
            self.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(self.reader)))
            self.execute(
                sql.SQL("GRANT SELECT ON gateway_resources TO {}").format(
                    sql.Identifier(self.reader)
                )
            )
        return self

    def execute(self, statement: str, parameters=None) -> list[tuple]:
        """Run one statement (autocommit) in the database; rows if it returns any."""
        with _cursor(self.dsn) as cursor:
            cursor.execute(statement, parameters)
            return cursor.fetchall() if cursor.description is not None else []

    def block_connections(self) -> None:
        """
        An outage of this database: refuse new connections, then terminate
        every existing backend of it.
        """
        with _cursor() as cursor:
            cursor.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
                    sql.Identifier(self.name)
                )
            )
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.name,),
            )

    def allow_connections(self) -> None:
        """End the outage started by L{block_connections}."""
        self._admin_execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(self.name))
        )

    def block_reader(self) -> None:
        """
        An outage as the reader role sees it: it may no longer log in, and its
        sessions are terminated. The database stays writable for the tests.
        """
        self._admin_execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(self.reader)))
        self._admin_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
            (self.reader,),
        )

    def allow_reader(self) -> None:
        """End the outage started by L{block_reader}."""
        self._admin_execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(self.reader)))

    def _admin_execute(self, statement, parameters=None) -> None:
        with _cursor() as cursor:
            cursor.execute(statement, parameters)

    def backends(self, application_name: str | None = None) -> int:
        """How many sessions are connected to this database (optionally by name)."""
        with _cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                " AND (%s::text IS NULL OR application_name = %s)",
                (self.name, application_name, application_name),
            )
            return cursor.fetchone()[0]

    def drop(self) -> None:
        """Drop the database, terminating whoever is still connected, and its reader role."""
        drop_database(self.name)
        # The role's only grants lived in the dropped database.
        self._admin_execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(self.reader)))
