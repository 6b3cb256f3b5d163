# -*- test-case-name: tests.test_spool -*-
"""
L{caracal.gateway.spool}: the audit spool's file, cap, replay order,
resumption after a failed send and adoption of files left by a dead process.
Real files in a test directory; time from a task.Clock.
"""

from __future__ import annotations

import fcntl
import json
import os

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway.config import ConfigError
from caracal.gateway.metrics import Metrics
from caracal.gateway.spool import AuditSpool, check_spool_directory


def entry(number: int) -> dict:
    """A stream entry's fields as RedisAuditLog builds them."""
    return {"id": f"id-{number}", "data": json.dumps({"n": number}), "_sig": "ab" * 32}


class Sender:
    """Takes entries (C{sent}) until told to fail."""

    def __init__(self):
        self.sent: list[dict] = []
        self.fail_after: int | None = None

    def __call__(self, fields):
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            return defer.fail(ConnectionError("redis down"))
        self.sent.append(fields)
        return defer.succeed("1-0")


class SpoolTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.metrics = Metrics()

    def spool(self, max_bytes=1_000_000) -> AuditSpool:
        """A spool on the test directory."""
        return AuditSpool(self.directory, max_bytes, self.clock, self.metrics)

    def files(self) -> list[str]:
        """Spool files in the directory."""
        return sorted(n for n in os.listdir(self.directory) if n.endswith(".spool"))

    def test_file_created_only_when_needed(self):
        """No event waiting, no file; the first spooled event creates it, mode 0600."""
        spool = self.spool()
        self.assertEqual(self.files(), [])
        self.assertFalse(spool.holding)
        self.assertTrue(spool.append(entry(1)))
        [name] = self.files()
        self.assertTrue(name.startswith(f"audit-{os.getpid()}-"))
        self.assertEqual(os.stat(os.path.join(self.directory, name)).st_mode & 0o777, 0o600)
        self.assertTrue(spool.holding)

    def test_replay_in_order_then_removed(self):
        """Entries go out in the order spooled, unchanged; then the file is gone."""
        spool = self.spool()
        for number in range(50):
            spool.append(entry(number))
        sender = Sender()
        spool.start(sender)
        self.clock.advance(0.5)
        self.assertEqual(sender.sent, [entry(n) for n in range(50)])
        self.assertEqual(self.files(), [])
        self.assertFalse(spool.holding)
        self.assertEqual(spool.size, 0)
        spool.stop()

    def test_failed_send_resumes_at_that_entry(self):
        """A failing send stops the round; the next round starts again from it."""
        spool = self.spool()
        for number in range(10):
            spool.append(entry(number))
        sender = Sender()
        sender.fail_after = 4
        spool.start(sender)
        self.clock.advance(0.5)
        self.assertEqual(len(sender.sent), 4)
        self.assertTrue(spool.holding)
        spool.append(entry(10))
        sender.fail_after = None
        self.clock.advance(0.5)
        self.assertEqual(sender.sent, [entry(n) for n in range(11)])
        self.assertEqual(self.files(), [])
        spool.stop()

    def test_cap_drops_and_counts(self):
        """Past AUDIT_SPOOL_MAX_BYTES new events are dropped and counted."""
        line = len(json.dumps(entry(1), separators=(",", ":"), sort_keys=True)) + 1
        spool = self.spool(max_bytes=line * 3)
        results = [spool.append(entry(n)) for n in range(5)]
        self.assertEqual(results, [True, True, True, False, False])
        self.assertEqual(self.metrics.counters["audit_events_dropped"], 2)
        self.assertEqual(spool.size, line * 3)

    def test_adopts_unlocked_files(self):
        """
        A file nobody holds a lock on (its process died) is replayed, torn
        last line skipped, and removed; a locked one (a live process's) is
        left alone.
        """
        orphan = os.path.join(self.directory, "audit-1-dead.spool")
        with open(orphan, "wb") as f:
            for number in range(3):
                f.write(json.dumps(entry(number)).encode() + b"\n")
            f.write(b'{"id": "torn')
        live = os.path.join(self.directory, "audit-2-live.spool")
        with open(live, "wb") as f:
            f.write(json.dumps(entry(99)).encode() + b"\n")
        holder = os.open(live, os.O_RDONLY)
        self.addCleanup(os.close, holder)
        fcntl.flock(holder, fcntl.LOCK_EX)
        spool = self.spool()
        sender = Sender()
        spool.start(sender)
        self.clock.advance(0.5)
        self.assertEqual(sender.sent, [entry(n) for n in range(3)])
        self.assertEqual(self.files(), ["audit-2-live.spool"])
        fcntl.flock(holder, fcntl.LOCK_UN)
        self.clock.advance(10)
        self.clock.advance(0.5)
        self.assertEqual(sender.sent[-1], entry(99))
        self.assertEqual(self.files(), [])
        spool.stop()

    def test_two_spools_never_share_a_file(self):
        """A second spool in the same directory does not take a live spool's file."""
        first = self.spool()
        first.append(entry(1))
        second = self.spool()
        self.assertEqual(second.adopt(), 0)

    def test_check_directory(self):
        """A missing directory is created; one that cannot be written refuses the start."""
        fresh = os.path.join(self.directory, "new", "spool")
        check_spool_directory(fresh)
        self.assertTrue(os.path.isdir(fresh))
        self.assertEqual(os.listdir(fresh), [])
        blocker = os.path.join(self.directory, "a-file")
        with open(blocker, "w") as f:
            f.write("x")
        error = self.assertRaises(
            ConfigError, check_spool_directory, os.path.join(blocker, "spool")
        )
        self.assertIn("AUDIT_SPOOL_DIR", str(error))
        self.assertIn("is not writable", str(error))
        self.assertNotIn("\n", str(error))
