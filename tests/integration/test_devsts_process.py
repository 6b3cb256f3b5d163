# -*- test-case-name: tests.integration.test_devsts_process -*-
"""
The dev STS as a real C{twistd -n caracal-devsts} process (SPEC section 12):
it refuses to start with C{CARACAL_ENV=production} or bound to an address
that is not loopback, with one stderr line naming the reason, exit status 1
and no traceback; on loopback in dev it serves.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.support.process import GatewayProcess, free_port, port_accepts


def devsts_environ(**overrides: str) -> dict[str, str]:
    """A minimal environment for the dev STS plus C{overrides}."""
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONUNBUFFERED": "1",
    }
    environ.update(overrides)
    return environ


class DevSTSProcessTests(TestCase):
    """Refused and accepted starts of C{twistd -n caracal-devsts}."""

    timeout = 60

    def devsts(self, environ, port: int, bind: str) -> GatewayProcess:
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        args = ("-n", "caracal-devsts", "--port", str(port), "--bind", bind, "--insecure-http")
        process = GatewayProcess(environ, args, cwd=cwd, port=port)
        self.addCleanup(process.kill)
        return process

    @defer.inlineCallbacks
    def assertRefused(self, environ, bind: str, reason: str):
        """One stderr line C{caracal-devsts: ...} containing C{reason}, status 1, nothing bound."""
        port = free_port()
        process = self.devsts(environ, port, bind)
        status = yield process.run()
        everything = (process.output + process.errors).decode(errors="replace")
        self.assertEqual(status, 1, everything)
        self.assertNotIn("Traceback", everything)
        lines = process.errors.decode().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("caracal-devsts: "), lines[0])
        self.assertIn(reason, lines[0])
        self.assertFalse((yield port_accepts("127.0.0.1", port)))
        self.assertFalse(os.path.exists(os.path.join(process.cwd, "twistd.pid")))

    def test_production_refused(self):
        """C{CARACAL_ENV=production}, even on loopback, is a refused start."""
        return self.assertRefused(
            devsts_environ(CARACAL_ENV="production"), "127.0.0.1", "CARACAL_ENV=production"
        )

    def test_wildcard_bind_refused(self):
        """Binding every interface is a refused start, naming the address."""
        return self.assertRefused(
            devsts_environ(CARACAL_ENV="dev"), "0.0.0.0", "refusing to bind 0.0.0.0"
        )

    @defer.inlineCallbacks
    def test_loopback_dev_serves(self):
        """On 127.0.0.1 in dev it starts and answers C{/health}."""
        process = self.devsts(devsts_environ(CARACAL_ENV="dev"), free_port(), "127.0.0.1")
        yield process.start()
        self.assertEqual((yield process.health()), 200)
        # Plain twistd dies of the SIGTERM it was stopped with (status -15).
        self.assertEqual((yield process.stop()), -15)
