# -*- test-case-name: tests.test_admin -*-
"""
Tests for L{caracal.gateway.admin}: argument handling, validation and exit
statuses, with a recording fake in place of the database.
"""

from __future__ import annotations

import datetime
import io
import json

import psycopg2
import psycopg2.errors
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway import admin

DSN = "postgresql://admin:hunter2@db.internal:5432/caracal"


class FakeCursor:
    def __init__(self, database: FakeDatabase) -> None:
        self.database = database

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def execute(self, statement, parameters=None):
        self.database.executed.append((statement, parameters))
        if self.database.error is not None:
            raise self.database.error

    def fetchone(self):
        return self.database.results.pop(0)

    def fetchall(self):
        return self.database.results.pop(0)


class FakeDatabase:
    """Stands in for psycopg2.connect: records statements, answers from C{results}."""

    def __init__(self) -> None:
        self.executed: list[tuple[str, object]] = []
        self.results: list = []
        self.error: Exception | None = None
        self.connect_error: Exception | None = None
        self.connected_with: list = []
        self.closed = 0
        self.autocommit = False

    def __call__(self, dsn, **kwargs):
        self.connected_with.append((dsn, kwargs))
        if self.connect_error is not None:
            raise self.connect_error
        return self

    def cursor(self):
        return FakeCursor(self)

    def close(self):
        self.closed += 1


class AdminTests(SynchronousTestCase):
    def setUp(self):
        self.database = FakeDatabase()
        self.environ = {"DATABASE_URL": DSN}

    def run_admin(self, *argv):
        stdout, stderr = io.StringIO(), io.StringIO()
        status = admin.main(
            list(argv),
            environ=self.environ,
            stdout=stdout,
            stderr=stderr,
            connect=self.database,
        )
        return status, stdout.getvalue(), stderr.getvalue()

    def assertRefused(self, status, stderr, expected_status, fragment):
        self.assertEqual(status, expected_status, stderr)
        self.assertEqual(len(stderr.splitlines()), 1, stderr)
        self.assertTrue(stderr.startswith("caracal-gateway-admin: error: "), stderr)
        self.assertIn(fragment, stderr)
        self.assertNotIn("Traceback", stderr)
        self.assertNotIn("hunter2", stderr)

    # -- the registry and parsing -----------------------------------------

    def test_registry(self):
        """The subcommands, in the order --help lists them."""
        self.assertEqual(
            list(admin.COMMANDS),
            ["migrate", "add", "list", "update", "remove", "check-config", "audit"],
        )

    def test_no_command(self):
        """No subcommand is a usage error (status 2)."""
        status, _, stderr = self.run_admin()
        self.assertRefused(status, stderr, 2, "required")

    def test_unknown_command(self):
        """An unknown subcommand is a usage error."""
        status, _, stderr = self.run_admin("frobnicate")
        self.assertRefused(status, stderr, 2, "invalid choice")

    def test_missing_required_option(self):
        """A missing required option is a usage error, before any connection."""
        status, _, stderr = self.run_admin("add", "r", "--zone", "z")
        self.assertRefused(status, stderr, 2, "add: the following arguments are required")
        self.assertEqual(self.database.connected_with, [])

    def test_bad_auth_mode(self):
        """An unknown auth mode is a usage error."""
        status, _, stderr = self.run_admin(
            "add",
            "r",
            "--zone",
            "z",
            "--application",
            "a",
            "--upstream",
            "https://u.example",
            "--auth-mode",
            "basic",
        )
        self.assertRefused(status, stderr, 2, "invalid choice: 'basic'")

    def test_database_url_required(self):
        """Without DATABASE_URL (or the option) the command refuses to run."""
        self.environ = {}
        status, _, stderr = self.run_admin("list")
        self.assertRefused(status, stderr, 2, "DATABASE_URL is required")

    def test_database_url_file(self):
        """DATABASE_URL_FILE names the DSN, as for the gateway (SPEC 16)."""
        path = self.mktemp()
        with open(path, "w") as secret:
            secret.write(DSN + "\n")
        self.environ = {"DATABASE_URL_FILE": path}
        self.database.results = [[]]
        self.run_admin("list")
        self.assertEqual(self.database.connected_with[0][0], DSN)

    def test_database_url_and_file_refused(self):
        """Both forms set: the gateway's own message, as a usage error."""
        self.environ = {"DATABASE_URL": DSN, "DATABASE_URL_FILE": self.mktemp()}
        status, _, stderr = self.run_admin("list")
        self.assertRefused(
            status, stderr, 2, "DATABASE_URL and DATABASE_URL_FILE are mutually exclusive"
        )

    def test_malformed_database_url(self):
        """A malformed database URL is a usage error that does not quote the password."""
        status, _, stderr = self.run_admin("--database-url", "host=x password=hunter2 junk", "list")
        self.assertRefused(status, stderr, 2, "not a valid Postgres URL or DSN")

    def test_database_url_option_wins_in_either_position(self):
        """--database-url overrides the environment, before or after the subcommand."""
        other = "host=127.0.0.1 dbname=other"
        self.database.results = [[]]
        self.run_admin("--database-url", other, "list")
        self.database.results = [[]]
        self.run_admin("list", "--database-url", other)
        self.assertEqual([dsn for dsn, _ in self.database.connected_with], [other, other])

    def test_unreachable_database(self):
        """An unreachable database is status 1 with a one-line reason."""
        self.database.connect_error = psycopg2.OperationalError(
            'connection to server at "db.internal", port 5432 failed:\n  Connection refused\n'
        )
        status, _, stderr = self.run_admin("list")
        self.assertRefused(status, stderr, 1, "cannot connect to the database at")
        self.assertIn("postgresql://admin:***@db.internal:5432/caracal", stderr)
        self.assertIn("Connection refused", stderr)

    def test_connection_parameters(self):
        """The tool connects with the DSN given and names itself to Postgres."""
        self.database.results = [[]]
        self.run_admin("list")
        ((dsn, kwargs),) = self.database.connected_with
        self.assertEqual(dsn, DSN)
        self.assertEqual(kwargs["application_name"], "caracal-gateway-admin")
        self.assertTrue(self.database.autocommit)
        self.assertEqual(self.database.closed, 1)

    # -- migrate ------------------------------------------------------------

    def test_migrate_applies_packaged_schema(self):
        """migrate runs the packaged schema: the table and its change trigger."""
        status, stdout, _ = self.run_admin("migrate")
        self.assertEqual(status, 0)
        ((statement, _),) = self.database.executed
        self.assertIn("CREATE TABLE IF NOT EXISTS gateway_resources", statement)
        self.assertIn("gateway_resources_changed", statement)
        self.assertEqual(statement, admin.schema_sql())
        self.assertIn("schema applied", stdout)

    def test_migrate_database_error(self):
        """A database error during migrate is status 1 with the reason."""
        self.database.error = psycopg2.errors.InsufficientPrivilege(
            "permission denied for schema public"
        )
        status, _, stderr = self.run_admin("migrate")
        self.assertRefused(status, stderr, 1, "permission denied")

    # -- add ----------------------------------------------------------------

    def add(self, *extra, upstream="https://api.example/mcp"):
        return self.run_admin(
            "add",
            "res-1",
            "--zone",
            "zone-a",
            "--application",
            "app-1",
            "--upstream",
            upstream,
            *extra,
        )

    def test_add(self):
        """add inserts the row with every option given."""
        self.database.results = [("res-1",)]
        status, stdout, stderr = self.add(
            "--auth-mode", "provider_apikey", "--auth-header", "X-Api-Key", "--auth-scheme", ""
        )
        self.assertEqual((status, stderr), (0, ""))
        self.assertIn("added res-1", stdout)
        ((statement, parameters),) = self.database.executed
        self.assertIn("INSERT INTO gateway_resources", statement)
        self.assertEqual(
            parameters,
            (
                "res-1",
                "zone-a",
                "app-1",
                "https://api.example/mcp",
                "provider_apikey",
                "X-Api-Key",
                "",
                None,
            ),
        )

    def test_add_defaults_are_null(self):
        """Options not given are stored as NULL (their defaults)."""
        self.database.results = [("res-1",)]
        self.add()
        ((_, parameters),) = self.database.executed
        self.assertEqual(parameters[4:], ("caracal_jwt", None, None, None))

    def test_add_existing(self):
        """Adding an identifier that exists is refused."""
        self.database.results = [None]
        status, _, stderr = self.add()
        self.assertRefused(status, stderr, 1, "res-1 already exists")

    def test_add_refuses_bad_upstreams_before_connecting(self):
        """An upstream URL the gateway would refuse is refused before connecting."""
        for url, fragment in (
            ("http://user@x.example", "userinfo"),
            ("http://user:pw@x.example", "userinfo"),
            ("ftp://x.example", "scheme"),
            ("http://h.example/a/../b", ". or .."),
            ("http://h.example/a/%2e%2e/b", ". or .."),
            ("//no-scheme.example", "scheme"),
            ("https://", "host"),
            ("", "empty"),
        ):
            status, _, stderr = self.add(upstream=url)
            self.assertRefused(status, stderr, 2, fragment)
            self.assertIn("upstream URL refused", stderr)
            self.assertNotIn(":pw@", stderr)
        self.assertEqual(self.database.connected_with, [])

    def test_add_allowlist(self):
        """With an allowlist only its hosts (any case, trailing dot) are accepted."""
        self.environ["UPSTREAM_HOST_ALLOWLIST"] = "api.example, other.example"
        self.database.results = [("res-1",)]
        status, _, _ = self.add(upstream="https://API.example./mcp")
        self.assertEqual(status, 0)
        status, _, stderr = self.add(upstream="https://evil.example/")
        self.assertRefused(status, stderr, 2, "evil.example is not on UPSTREAM_HOST_ALLOWLIST")

    def test_allowlist_option_overrides_environment(self):
        """--allowlist replaces UPSTREAM_HOST_ALLOWLIST."""
        self.environ["UPSTREAM_HOST_ALLOWLIST"] = "api.example"
        status, _, stderr = self.add("--allowlist", "only.example")
        self.assertRefused(status, stderr, 2, "api.example is not on")

    def test_add_warns_about_private_numeric_host(self):
        """A private numeric upstream is added with a warning."""
        self.database.results = [("res-1",)]
        status, _, stderr = self.add(upstream="http://0x7f.1:8080/")
        self.assertEqual(status, 0)
        self.assertIn("warning: upstream host 127.0.0.1 is not a public address", stderr)

    def test_add_refuses_bad_identifiers(self):
        """Empty, overlong or not-visible-ASCII identifiers are usage errors."""

        def add(resource="r", zone="z", application="a"):
            return self.run_admin(
                "add",
                resource,
                "--zone",
                zone,
                "--application",
                application,
                "--upstream",
                "https://u.example",
            )

        for arguments, fragment in (
            ({"resource": ""}, "resource must not be empty"),
            ({"resource": "a b"}, "visible ASCII"),
            ({"zone": "z\r\n"}, "--zone"),
            ({"application": "x" * 300}, "--application"),
        ):
            status, _, stderr = add(**arguments)
            self.assertRefused(status, stderr, 2, fragment)

    def test_add_refuses_bad_header_and_scheme(self):
        """Unsendable or reserved credential headers and schemes are refused."""
        for extra, fragment in (
            (("--auth-header", "X Api"), "HTTP header name"),
            (("--auth-header", "X-Key\r\nInjected: 1"), "HTTP header name"),
            (("--auth-header", "Host"), "reserved"),
            (("--auth-header", "x-caracal-identity"), "reserved"),
            (("--auth-header", "Transfer-Encoding"), "reserved"),
            (("--auth-scheme", "Bearer extra"), "--auth-scheme"),
        ):
            status, _, stderr = self.add(*extra)
            self.assertRefused(status, stderr, 2, fragment)

    def test_missing_table(self):
        """A missing table says to run migrate."""
        self.database.error = psycopg2.errors.UndefinedTable(
            'relation "gateway_resources" does not exist'
        )
        status, _, stderr = self.add()
        self.assertRefused(status, stderr, 1, "run caracal-gateway-admin migrate")

    # -- list -----------------------------------------------------------------

    def rows(self):
        when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
        return [
            (
                "github",
                "zone-b",
                "app-2",
                "https://gh.example",
                "provider_oauth",
                "X-Tok",
                "token",
                300000,
                when,
            ),
            (
                "weather",
                "zone-a",
                "app-1",
                "https://w.example/mcp",
                "caracal_jwt",
                None,
                None,
                None,
                when,
            ),
        ]

    def test_list_table(self):
        """list prints a header line and one line per resource."""
        self.database.results = [self.rows()]
        status, stdout, _ = self.run_admin("list")
        self.assertEqual(status, 0)
        lines = stdout.splitlines()
        self.assertEqual(len(lines), 3)
        # Compared with single spaces: the padding is checked below.
        words = [" ".join(line.split()) for line in lines]
        self.assertEqual(
            words,
            [
                "RESOURCE ZONE APPLICATION UPSTREAM MODE HEADER SCHEME UPSTREAM_TIMEOUT",
                "github zone-b app-2 https://gh.example provider_oauth X-Tok token 300s",
                "weather zone-a app-1 https://w.example/mcp caracal_jwt - - -",
            ],
        )
        # Columns line up.
        self.assertEqual(lines[1].index("zone-b"), lines[0].index("ZONE"))

    def test_list_json(self):
        """list --json prints the rows as JSON records."""
        self.database.results = [self.rows()]
        status, stdout, _ = self.run_admin("list", "--json")
        self.assertEqual(status, 0)
        records = json.loads(stdout)
        self.assertEqual(records[1]["resource_identifier"], "weather")
        self.assertIsNone(records[1]["auth_header"])
        self.assertEqual(records[0]["updated_at"], "2026-01-02T03:04:05+00:00")
        self.assertEqual(records[0]["upstream_timeout_ms"], 300000)
        self.assertIsNone(records[1]["upstream_timeout_ms"])
        self.assertEqual(len(records[0]), 9)

    def test_list_empty_json(self):
        """An empty table lists as an empty JSON array."""
        self.database.results = [[]]
        status, stdout, _ = self.run_admin("list", "--json")
        self.assertEqual((status, json.loads(stdout)), (0, []))

    # -- update ---------------------------------------------------------------

    def test_update(self):
        """update changes only the columns given."""
        self.database.results = [("res-1",)]
        status, stdout, _ = self.run_admin(
            "update",
            "res-1",
            "--upstream",
            "https://new.example",
            "--auth-mode",
            "provider_oauth",
            "--default-auth-scheme",
        )
        self.assertEqual(status, 0)
        self.assertIn("updated res-1", stdout)
        ((statement, parameters),) = self.database.executed
        self.assertIn("SET upstream_url = %s, auth_mode = %s, auth_scheme = %s", statement)
        self.assertEqual(parameters, ("https://new.example", "provider_oauth", None, "res-1"))

    def test_add_upstream_timeout(self):
        """--upstream-timeout 5m is stored as 300000 ms."""
        self.database.results = [("res-1",)]
        status, _, _ = self.add("--upstream-timeout", "5m")
        self.assertEqual(status, 0)
        ((_, parameters),) = self.database.executed
        self.assertEqual(parameters[-1], 300000)

    def test_upstream_timeout_refused(self):
        """Zero, negative, malformed or past a Postgres integer: usage error, no database."""
        for value in ("0", "0s", "-5s", "soon", "5", "1000h", "0.1ms"):
            status, _, stderr = self.add(f"--upstream-timeout={value}")
            self.assertRefused(status, stderr, 2, "--upstream-timeout must be a positive duration")
        self.assertEqual(self.database.connected_with, [])

    def test_update_upstream_timeout(self):
        """update sets the resource's timeout, or puts it back to the default (NULL)."""
        self.database.results = [("res-1",), ("res-1",)]
        self.run_admin("update", "res-1", "--upstream-timeout", "1m30s")
        self.run_admin("update", "res-1", "--default-upstream-timeout")
        (statement, parameters), (statement2, parameters2) = self.database.executed
        self.assertIn("SET upstream_timeout_ms = %s", statement)
        self.assertEqual(parameters, (90000, "res-1"))
        self.assertIn("SET upstream_timeout_ms = %s", statement2)
        self.assertEqual(parameters2, (None, "res-1"))

    def test_update_nothing(self):
        """update without a change is a usage error."""
        status, _, stderr = self.run_admin("update", "res-1")
        self.assertRefused(status, stderr, 2, "nothing to update")

    def test_update_unknown(self):
        """Updating an unknown identifier is status 1."""
        self.database.results = [None]
        status, _, stderr = self.run_admin("update", "nope", "--zone", "z")
        self.assertRefused(status, stderr, 1, "no resource nope")

    def test_update_bad_upstream(self):
        """update refuses an upstream the gateway would refuse."""
        status, _, stderr = self.run_admin("update", "res-1", "--upstream", "http://h/a/../b")
        self.assertRefused(status, stderr, 2, "upstream URL refused")

    def test_update_header_conflict(self):
        """A header and --default-auth-header together are a usage error."""
        status, _, stderr = self.run_admin(
            "update", "res-1", "--auth-header", "X-A", "--default-auth-header"
        )
        self.assertRefused(status, stderr, 2, "not allowed with argument")

    # -- remove -------------------------------------------------------------

    def test_remove(self):
        """remove deletes the row and says so."""
        self.database.results = [("res-1",)]
        status, stdout, _ = self.run_admin("remove", "res-1")
        self.assertEqual(status, 0)
        self.assertIn("removed res-1", stdout)
        ((statement, parameters),) = self.database.executed
        self.assertIn("DELETE FROM gateway_resources", statement)
        self.assertEqual(parameters, ("res-1",))

    def test_remove_unknown(self):
        """Removing an unknown identifier is status 1."""
        self.database.results = [None]
        status, _, stderr = self.run_admin("remove", "nope")
        self.assertRefused(status, stderr, 1, "no resource nope")

    def test_unexpected_error_is_one_line(self):
        """An unexpected error is reported on one line, status 1."""
        self.database.connect_error = RuntimeError("boom\nsecond line")
        status, _, stderr = self.run_admin("list")
        self.assertRefused(status, stderr, 1, "RuntimeError: boom second line")
