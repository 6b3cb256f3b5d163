# -*- test-case-name: tests.integration.test_demo -*-
"""
C{python -m caracal.demo} as a newcomer runs it: a subprocess bringing up the
dev STS, the demo tool server and the gateway against the real Postgres and
Redis, sending one request through, and stopping everything. It must work
twice in a row, leave no process behind, and never print a token.

Each test uses its own state directory, database and zone; the ports are the
demo's defaults (or free ones when those are taken).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from caracal.demo.run import _clean_environ, alive, read_pid
from tests.support.postgres import drop_database, postgres_available
from tests.support.redis import SyncRedis

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STOPPED = re.compile(
    r"Stopped \(gateway (\d+), sts (\d+), upstream (\d+)\); nothing left running\."
)
# Any JWT (header.payload.signature, base64url of '{"') would start like this.
JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")


class DemoTests(SynchronousTestCase):
    def setUp(self):
        skip = postgres_available()
        if skip:
            raise self.skipTest(skip)
        self.state = os.path.abspath(self.mktemp())
        self.database = f"caracal_demo_t_{secrets.token_hex(4)}"
        self.zone = f"demo-zone-{secrets.token_hex(4)}"
        self.addCleanup(drop_database, self.database)
        self.addCleanup(self.delete_jti_keys)

    def delete_jti_keys(self):
        redis = SyncRedis()
        try:
            for key in redis.call("KEYS", f"seen:jti:{self.zone}:*") or []:
                redis.call("DEL", key)
        finally:
            redis.close()

    def demo_argv(self, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "caracal.demo",
            "--state-dir",
            self.state,
            "--database",
            self.database,
            "--zone",
            self.zone,
            *extra,
        ]

    def run_demo(self, *extra: str) -> str:
        result = subprocess.run(
            self.demo_argv(*extra),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output)
        self.assertNotIn("Traceback", output)
        self.assertIsNone(JWT.search(output), "a token was printed")
        return result.stdout

    def assertNothingLeft(self, output: str) -> None:
        match = STOPPED.search(output)
        self.assertIsNotNone(match, output)
        pids = [int(pid) for pid in match.groups()]
        self.assertEqual([pid for pid in pids if alive(pid)], [], "processes left running")
        self.assertEqual([name for name in os.listdir(self.state) if name.endswith(".pid")], [])

    def test_twice(self):
        """The demo runs twice: the second run reuses the database and resource."""
        first = self.run_demo()
        self.assertIn("-> 200 OK", first)
        self.assertIn(f"database      {self.database} (created, schema migrated)", first)
        self.assertIn("resource demo-tool -> http://127.0.0.1:", first)
        self.assertIn("(added)", first)
        self.assertIn("a mandate (not the caller's token", first)
        self.assertIn("issued by caracal-devsts for resource demo-tool", first)
        self.assertRegex(first, r"X-Request-Id: [0-9a-f-]{36}")
        self.assertRegex(
            first, r"the same token again \(replay\) +-> 401 \{\"error\": \"invalid_token\""
        )
        self.assertRegex(first, r"no token +-> 401 \{\"error\": \"missing_token\"")
        self.assertRegex(first, r"an unknown resource +-> 403 \{\"error\": \"access_denied\"")
        # Paths are shown relative to where the demo was started (here ROOT).
        shown = os.path.relpath(self.state, ROOT)
        self.assertIn(f"curl -sS --cacert {shown}/ca.pem", first)
        self.assertIn('-H "X-Caracal-Resource: demo-tool"', first)
        self.assertIn(f"{shown}/gateway.log", first)
        self.assertNothingLeft(first)

        # The second time, the gateway's port is taken: it moves to a free one.
        with socket.create_server(("127.0.0.1", 0)) as held:
            taken = held.getsockname()[1]
            second = self.run_demo("--gateway-port", str(taken))
        self.assertIn("-> 200 OK", second)
        self.assertRegex(second, r"gateway       https://localhost:\d+ ")
        self.assertNotIn(f"https://localhost:{taken}", second)
        self.assertIn(f"{self.database} (exists, schema migrated)", second)
        self.assertIn("(updated)", second)
        self.assertIn("(kept, valid until", second)
        self.assertNothingLeft(second)

    def test_keep_running_then_stop(self):
        """With --keep-running the demo serves until it is stopped, then exits cleanly."""
        os.makedirs(self.state)
        log_path = os.path.join(self.state, "demo.out")
        with open(log_path, "w") as log:
            demo = subprocess.Popen(
                self.demo_argv("--keep-running"),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.addCleanup(lambda: demo.poll() is None and demo.send_signal(signal.SIGINT))
        deadline = time.monotonic() + 60
        output = ""
        while "Running." not in output:
            self.assertIsNone(demo.poll(), output)
            self.assertLess(time.monotonic(), deadline, output)
            time.sleep(0.2)
            with open(log_path) as f:
                output = f.read()
        self.assertIn("-> 200 OK", output)
        pids = [
            read_pid(os.path.join(self.state, f"{name}.pid"))
            for name in ("gateway", "sts", "upstream")
        ]
        self.assertNotIn(None, pids)
        self.assertTrue(all(alive(pid) for pid in pids))

        # The printed curl line works while the demo runs.
        if shutil.which("curl"):
            line = output.split("Repeat it", 1)[1].splitlines()[1].strip()
            self.assertTrue(line.startswith("curl "), line)
            repeated = subprocess.run(
                ["bash", "-c", line], cwd=ROOT, capture_output=True, text=True, timeout=30
            )
            self.assertEqual(repeated.returncode, 0, repeated.stderr)
            self.assertIn('"iss": "caracal-devsts"', repeated.stdout)
            self.assertIn('"body": "{\\"text\\": \\"hello\\"}"', repeated.stdout)

        # A second demo on the same state refuses while this one runs.
        refused = subprocess.run(
            self.demo_argv(), cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        self.assertEqual(refused.returncode, 1)
        self.assertIn("a demo is already running", refused.stderr)
        self.assertTrue(all(alive(pid) for pid in pids))

        stopped = subprocess.run(
            self.demo_argv("--stop"), cwd=ROOT, capture_output=True, text=True, timeout=90
        )
        self.assertEqual(stopped.returncode, 0, stopped.stderr)
        self.assertIn(f"stopped: demo pid {demo.pid}", stopped.stdout)
        self.assertEqual(demo.wait(30), 0)
        self.assertEqual([pid for pid in pids if alive(pid)], [])
        with open(log_path) as f:
            self.assertIsNotNone(STOPPED.search(f.read()))
        self.assertEqual([name for name in os.listdir(self.state) if name.endswith(".pid")], [])

        again = subprocess.run(
            self.demo_argv("--stop"), cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        self.assertEqual((again.returncode, again.stdout), (0, "no demo was running\n"))


class CleanEnvironTests(SynchronousTestCase):
    """The children never inherit gateway settings from the newcomer's shell."""

    def test_gateway_variables_dropped(self):
        """The demo's gateway gets none of the shell's gateway variables."""
        from tests.integration.test_etc_files import SPEC_VARIABLES

        shell = dict.fromkeys((*SPEC_VARIABLES, "CARACAL_LOG_FILE"), "from-the-shell")
        shell["HOME"] = "/home/newcomer"
        self.patch(os, "environ", shell)
        self.assertEqual(_clean_environ(), {"HOME": "/home/newcomer", "PYTHONUNBUFFERED": "1"})
