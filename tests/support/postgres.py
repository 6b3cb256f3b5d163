# -*- test-case-name: tests.integration.test_resource_store -*-
"""
Throw-away Postgres databases on the shared test server (127.0.0.1:5432, trust
auth) for integration tests, and a way to cut one of them off: terminating its
backends and refusing new connections to that database is a real outage for
whoever uses it, without touching the shared server or anyone else's data.

L{PrivatePostgres} is a whole server of a test's own, for outages of the
server itself (stopped, started again on the same port).
"""

from __future__ import annotations

import contextlib
import getpass
import glob
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator

import psycopg2
from psycopg2 import sql

# The packaged schema, exactly as the admin command's migrate applies it.
from caracal.gateway.admin import schema_sql
from tests.support.servers import stop_server, wait_for_server

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


def drop_database(name: str, admin_dsn: str = ADMIN_DSN) -> None:
    """
    Drop database C{name} if it exists: refuse new connections first, then
    terminate whoever is still connected (a gateway under test reconnects).
    """
    with _cursor(admin_dsn) as cursor:
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
    """
    C{None} when the shared server answers, else why not (for C{skip}).

    With C{CARACAL_TESTS_REQUIRE_SERVICES} set (C{.ci/run} sets it, having
    started the server), always C{None}: a server that does not answer then
    fails the tests with its own error instead of silently skipping them.
    """
    if os.environ.get("CARACAL_TESTS_REQUIRE_SERVICES"):
        return None
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

    def __init__(self, apply_schema: bool = True, admin_dsn: str = ADMIN_DSN) -> None:
        """
        @param admin_dsn: the server's maintenance connection (the shared
            server by default; L{PrivatePostgres.admin_dsn} for a private one).
        """
        self.admin_dsn = admin_dsn
        self.name = f"caracal_t_{secrets.token_hex(6)}"
        #: A login role allowed only to read the table, as a gateway should
        #: be; L{block_reader} cuts it off while the tests' own role writes on.
        self.reader = f"{self.name}_reader"
        self.apply_schema = apply_schema
        parameters = psycopg2.extensions.parse_dsn(admin_dsn)
        parameters["dbname"] = self.name
        self.dsn = psycopg2.extensions.make_dsn(**parameters)
        host = parameters.get("host", "127.0.0.1")
        port = parameters.get("port", "5432")
        user = parameters.get("user", "")
        self.url = f"postgresql://{user + '@' if user else ''}{host}:{port}/{self.name}"
        self.reader_url = f"postgresql://{self.reader}@{host}:{port}/{self.name}"

    def create(self) -> TemporaryDatabase:
        """Create the database (and apply the schema); returns C{self}."""
        with _cursor(self.admin_dsn) as cursor:
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
        with _cursor(self.admin_dsn) as cursor:
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
        with _cursor(self.admin_dsn) as cursor:
            cursor.execute(statement, parameters)

    def backends(self, application_name: str | None = None) -> int:
        """How many sessions are connected to this database (optionally by name)."""
        with _cursor(self.admin_dsn) as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                " AND (%s::text IS NULL OR application_name = %s)",
                (self.name, application_name, application_name),
            )
            return cursor.fetchone()[0]

    def drop(self) -> None:
        """Drop the database, terminating whoever is still connected, and its reader role."""
        drop_database(self.name, self.admin_dsn)
        # The role's only grants lived in the dropped database.
        self._admin_execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(self.reader)))


def _as_postgres_user() -> dict:
    """
    C{subprocess} arguments running a server binary as the C{postgres} user
    when the tests run as root (initdb and postgres refuse root), else as
    the test's own user.
    """
    if os.geteuid() != 0:
        return {}
    return {"user": "postgres", "group": "postgres"}


class PrivatePostgres:
    """
    A Postgres server of the test's own (C{initdb} into a temporary directory,
    trust authentication, 127.0.0.1 and a free port), which the test may stop
    and start again on the same port and data: a real outage, where every
    backend is terminated and connections are refused, that nobody else
    sees. Register L{destroy} as a cleanup.

    L{admin_dsn} is the maintenance connection to give L{TemporaryDatabase}.
    """

    def __init__(self) -> None:
        from tests.support.waiting import free_port

        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="caracal-pg-")
        self.data = os.path.join(self.directory, "data")
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user is not None:
            shutil.chown(self.directory, self.user, self.user)
        self._process: subprocess.Popen | None = None
        self._initialised = False
        owner = self.user or getpass.getuser()
        self.admin_dsn = f"host=127.0.0.1 port={self.port} dbname=postgres user={owner}"

    @staticmethod
    def binary(name: str) -> str | None:
        """Where the server binary C{name} is (PATH, then Debian's layout)."""
        found = shutil.which(name)
        if found:
            return found
        candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
        return candidates[0] if candidates else None

    @classmethod
    def unavailable(cls) -> str | None:
        """C{None} when a private server can be run here, else why not (for C{skip})."""
        for name in ("initdb", "postgres"):
            if cls.binary(name) is None:
                return f"no {name} binary"
        return None

    def start(self, deadline: float = 20.0) -> float:
        """
        Start the server (creating the cluster the first time) and wait until
        it accepts connections; returns the C{time.monotonic()} at which it
        first did.
        """
        if not self._initialised:
            subprocess.run(
                [self.binary("initdb"), "-D", self.data, "-A", "trust", "-E", "UTF8", "--no-sync"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                **_as_postgres_user(),
            )
            self._initialised = True
        self._process = subprocess.Popen(
            [
                self.binary("postgres"),
                "-D",
                self.data,
                "-p",
                str(self.port),
                "-k",
                self.directory,
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **_as_postgres_user(),
        )

        def answers() -> bool:
            psycopg2.connect(self.admin_dsn, connect_timeout=1).close()
            return True

        return wait_for_server(
            self._process,
            answers,
            deadline,
            f"private postgres did not start on port {self.port}",
            not_yet=(psycopg2.OperationalError,),
        )

    @property
    def running(self) -> bool:
        """Whether the server process is up."""
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """
        Fast shutdown (SIGINT): every backend is terminated, new connections
        are refused, and this returns once the server has exited.
        """
        process, self._process = self._process, None
        stop_server(process, signal.SIGINT, timeout=15)

    def terminate_backends(self, database: str) -> int:
        """C{pg_terminate_backend} every session of C{database}; how many were ended."""
        with _cursor(self.admin_dsn) as cursor:
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )
            return cursor.fetchone()[0]

    def destroy(self) -> None:
        """Stop the server and remove its files."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
