# -*- test-case-name: tests.integration.test_admin_cli -*-
"""
C{caracal-gateway-admin} end to end: run as a subprocess
(C{python -m caracal.gateway.admin}) against a temporary database.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import TestCase

from tests.support.postgres import TemporaryDatabase, postgres_available

_SKIP = postgres_available()


class AdminCommandTests(TestCase):
    """Every subcommand against the real Postgres."""

    skip = _SKIP

    def setUp(self):
        # An empty database: migrate is what creates the table here.
        self.database = TemporaryDatabase(apply_schema=False).create()
        self.addCleanup(self.database.drop)

    def admin(self, *argv, environ=None):
        """Run the command; return (exit status, stdout, stderr)."""
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("DATABASE_URL", "UPSTREAM_HOST_ALLOWLIST")
        }
        env["DATABASE_URL"] = self.database.url
        env.update(environ or {})
        completed = subprocess.run(
            [sys.executable, "-m", "caracal.gateway.admin", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return completed.returncode, completed.stdout, completed.stderr

    def assertOneLineError(self, result, status, fragment):
        code, _, stderr = result
        self.assertEqual(code, status, stderr)
        self.assertEqual(len(stderr.splitlines()), 1, stderr)
        self.assertIn(fragment, stderr)
        self.assertNotIn("Traceback", stderr)

    def table(self) -> list[tuple]:
        return self.database.execute(
            "SELECT resource_identifier, zone_id, application_id, upstream_url, auth_mode,"
            " auth_header, auth_scheme FROM gateway_resources ORDER BY 1"
        )

    def test_before_migrate(self):
        """Before migrate, list says on one line to run migrate."""
        result = self.admin("list")
        self.assertOneLineError(result, 1, "run caracal-gateway-admin migrate")

    def test_migrate_twice(self):
        """migrate can run twice and leaves an empty table."""
        for _ in range(2):
            code, stdout, stderr = self.admin("migrate")
            self.assertEqual((code, stderr), (0, ""))
            self.assertIn("schema applied", stdout)
        self.assertEqual(self.table(), [])
        triggers = self.database.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'gateway_resources'::regclass"
            " AND NOT tgisinternal"
        )
        self.assertEqual(triggers, [(3,)])

    def test_add_list_update_remove(self):
        """add, list, update and remove against a real database."""
        self.assertEqual(self.admin("migrate")[0], 0)

        code, stdout, stderr = self.admin(
            "add", "weather", "--zone", "zone-a", "--application", "app-1",
            "--upstream", "https://weather.example/mcp",
        )  # fmt: skip
        self.assertEqual((code, stderr), (0, ""))
        self.assertIn("added weather", stdout)
        code, _, stderr = self.admin(
            "add", "github", "--zone", "zone-b", "--application", "app-2",
            "--upstream", "https://api.github.example/v3", "--auth-mode", "provider_oauth",
            "--auth-header", "X-GitHub-Token", "--auth-scheme", "token",
        )  # fmt: skip
        self.assertEqual((code, stderr), (0, ""))
        self.assertEqual(
            self.table(),
            [
                ("github", "zone-b", "app-2", "https://api.github.example/v3",
                 "provider_oauth", "X-GitHub-Token", "token"),
                ("weather", "zone-a", "app-1", "https://weather.example/mcp",
                 "caracal_jwt", None, None),
            ],
        )  # fmt: skip

        # The same identifier twice is refused and changes nothing.
        result = self.admin(
            "add", "weather", "--zone", "z", "--application", "a", "--upstream", "https://x.example"
        )
        self.assertOneLineError(result, 1, "weather already exists")

        code, stdout, _ = self.admin("list")
        self.assertEqual(code, 0)
        lines = stdout.splitlines()
        self.assertEqual(lines[0].split()[0], "RESOURCE")
        self.assertEqual([line.split()[0] for line in lines[1:]], ["github", "weather"])

        code, stdout, _ = self.admin("list", "--json")
        records = json.loads(stdout)
        self.assertEqual([r["resource_identifier"] for r in records], ["github", "weather"])
        self.assertEqual(records[0]["auth_header"], "X-GitHub-Token")
        self.assertIn("updated_at", records[0])

        code, stdout, stderr = self.admin(
            "update", "github", "--upstream", "https://gh2.example", "--default-auth-header",
            "--auth-scheme", "",
        )  # fmt: skip
        self.assertEqual((code, stderr), (0, ""))
        self.assertEqual(
            self.table()[0],
            ("github", "zone-b", "app-2", "https://gh2.example", "provider_oauth", None, ""),
        )
        self.assertOneLineError(self.admin("update", "nope", "--zone", "z"), 1, "no resource nope")

        code, stdout, _ = self.admin("remove", "weather")
        self.assertEqual(code, 0)
        self.assertEqual([row[0] for row in self.table()], ["github"])
        self.assertOneLineError(self.admin("remove", "weather"), 1, "no resource weather")

    def test_upstream_timeout(self):
        """
        SPEC 13: --upstream-timeout on add and update lands in
        upstream_timeout_ms, list shows it, --default-upstream-timeout clears it.
        """
        self.assertEqual(self.admin("migrate")[0], 0)
        code, _, stderr = self.admin(
            "add", "slow", "--zone", "z", "--application", "a",
            "--upstream", "https://slow.example/mcp", "--upstream-timeout", "5m",
        )  # fmt: skip
        self.assertEqual((code, stderr), (0, ""))
        rows = self.database.execute("SELECT upstream_timeout_ms FROM gateway_resources")
        self.assertEqual(rows, [(300000,)])
        code, stdout, _ = self.admin("list")
        header, row = stdout.splitlines()
        self.assertEqual(header.split()[-1], "UPSTREAM_TIMEOUT")
        self.assertEqual(row.split()[-1], "300s")
        records = json.loads(self.admin("list", "--json")[1])
        self.assertEqual(records[0]["upstream_timeout_ms"], 300000)
        self.assertEqual(self.admin("update", "slow", "--upstream-timeout", "90s")[0], 0)
        rows = self.database.execute("SELECT upstream_timeout_ms FROM gateway_resources")
        self.assertEqual(rows, [(90000,)])
        self.assertEqual(self.admin("update", "slow", "--default-upstream-timeout")[0], 0)
        rows = self.database.execute("SELECT upstream_timeout_ms FROM gateway_resources")
        self.assertEqual(rows, [(None,)])

    def test_bad_upstreams_refused(self):
        """add and update refuse upstreams the gateway would refuse, on one line."""
        self.assertEqual(self.admin("migrate")[0], 0)
        for url in ("http://user@x.example", "ftp://x.example", "http://h.example/a/../b"):
            result = self.admin("add", "r", "--zone", "z", "--application", "a", "--upstream", url)
            self.assertOneLineError(result, 2, "upstream URL refused")
            result = self.admin("update", "r", "--upstream", url)
            self.assertOneLineError(result, 2, "upstream URL refused")
        self.assertEqual(self.table(), [])

    def test_allowlist_from_environment(self):
        """UPSTREAM_HOST_ALLOWLIST from the environment limits the upstreams add accepts."""
        self.assertEqual(self.admin("migrate")[0], 0)
        environ = {"UPSTREAM_HOST_ALLOWLIST": "api.example"}
        result = self.admin(
            "add", "r", "--zone", "z", "--application", "a", "--upstream", "https://evil.example",
            environ=environ,
        )  # fmt: skip
        self.assertOneLineError(result, 2, "not on UPSTREAM_HOST_ALLOWLIST")
        code, _, _ = self.admin(
            "add", "r", "--zone", "z", "--application", "a", "--upstream", "https://api.example",
            environ=environ,
        )  # fmt: skip
        self.assertEqual(code, 0)

    def test_unreachable_database(self):
        """An unreachable database is one line that does not quote the password."""
        result = self.admin(
            "list", environ={"DATABASE_URL": "postgresql://gw:hunter2@127.0.0.1:1/nothing"}
        )
        self.assertOneLineError(result, 1, "cannot connect to the database")
        self.assertNotIn("hunter2", result[2])
        self.assertIn("postgresql://gw:***@127.0.0.1:1/nothing", result[2])

    def test_libpq_dsn(self):
        """--database-url takes a libpq key=value DSN."""
        code, _, stderr = self.admin("--database-url", self.database.dsn, "migrate")
        self.assertEqual((code, stderr), (0, ""))


class PsqlSchemaTests(TestCase):
    """C{etc/schema.sql} is appliable with plain C{psql -f}, repeatedly."""

    skip = _SKIP or (None if shutil.which("psql") else "psql is not installed")

    def test_psql_twice(self):
        """etc/schema.sql applies twice through psql."""
        database = TemporaryDatabase(apply_schema=False).create()
        self.addCleanup(database.drop)
        schema = os.path.join(os.path.dirname(__file__), "..", "..", "etc", "schema.sql")
        for _ in range(2):
            completed = subprocess.run(
                ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", schema, database.url],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            self.assertEqual(completed.returncode, 0, completed.stderr)
            self.assertNotIn("ERROR", completed.stderr)
        database.execute(
            "INSERT INTO gateway_resources (resource_identifier, zone_id, application_id,"
            " upstream_url) VALUES ('r', 'z', 'a', 'https://u.example')"
        )
        self.assertEqual(
            database.execute("SELECT auth_mode, auth_header, auth_scheme FROM gateway_resources"),
            [("caracal_jwt", None, None)],
        )
