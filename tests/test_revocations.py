# -*- test-case-name: tests.test_revocations -*-
"""
Tests for L{caracal.gateway.revocations} that need no Redis: the signature
rule, the store, and the follower against an in-memory stream double driven
by a L{task.Clock}.
"""

from __future__ import annotations

import hashlib
import hmac

from twisted.internet import task
from twisted.logger import Logger, LogLevel
from twisted.trial import unittest

from caracal.gateway import revocations
from caracal.gateway.backoff import reconnect_policy
from caracal.gateway.revocations import (
    CONTACT_TIMEOUT,
    RETENTION_SECONDS,
    RevocationFollower,
    RevocationStateUnavailable,
    RevocationStore,
    parse_entries,
    parse_xread,
    sign_fields,
    verify_fields,
)
from caracal.gateway.testing import MemoryRedisServer

KEY = b"0123456789abcdef0123456789abcdef"
STREAM = "caracal.sessions.revoke"


def expected_signature(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()


class SignatureTests(unittest.SynchronousTestCase):
    """C{_sig}: HMAC-SHA256 of the stream name and the sorted fields."""

    def test_vector(self):
        """The signature matches the SPEC's rule applied by hand."""
        fields = {"zone_id": "zone-1", "session_id": "sess-9"}
        text = "caracal.sessions.revoke\nsession_id=sess-9\nzone_id=zone-1\n"
        self.assertEqual(sign_fields(KEY, STREAM, fields), expected_signature(KEY, text))

    def test_known_value(self):
        """
        A fixed vector, computed outside Python with
        C{printf 'st\\nsession_id=s\\nzone_id=z\\n' | openssl dgst -sha256 -hmac kkk...k}.
        """
        fields = {"zone_id": "z", "session_id": "s"}
        self.assertEqual(
            sign_fields(b"k" * 32, "st", fields),
            "00e9482b5de86eef98c10d756d036d8760a70726b2b719f2bacc01cc1bcf9433",
        )

    def test_byte_order(self):
        """Names sort by their UTF-8 bytes: upper case, lower case, then non-ASCII."""
        fields = {"\u00e9": "4", "a": "3", "Z": "2", "B": "1", "_x": "5"}
        text = "st\nB=1\nZ=2\n_x=5\na=3\n\u00e9=4\n"
        self.assertEqual(sign_fields(KEY, "st", fields), expected_signature(KEY, text))

    def test_sig_excluded(self):
        """The C{_sig} field itself is not signed."""
        fields = {"zone_id": "z", "session_id": "s"}
        with_sig = dict(fields, _sig="anything")
        self.assertEqual(sign_fields(KEY, STREAM, with_sig), sign_fields(KEY, STREAM, fields))

    def test_stream_bound(self):
        """A signature for one stream does not verify on another."""
        fields = {"zone_id": "z", "session_id": "s"}
        fields["_sig"] = sign_fields(KEY, STREAM, fields)
        self.assertTrue(verify_fields(KEY, STREAM, fields))
        self.assertFalse(verify_fields(KEY, "other", fields))

    def test_verify(self):
        """Verification refuses a missing, altered, or foreign-key signature."""
        fields = {"zone_id": "z", "session_id": "s"}
        self.assertFalse(verify_fields(KEY, STREAM, fields))
        fields["_sig"] = sign_fields(KEY, STREAM, fields)
        self.assertTrue(verify_fields(KEY, STREAM, fields))
        self.assertTrue(verify_fields(KEY, STREAM, dict(fields, _sig=fields["_sig"].upper())))
        self.assertFalse(verify_fields(KEY, STREAM, dict(fields, session_id="t")))
        self.assertFalse(verify_fields(b"x" * 32, STREAM, fields))
        self.assertFalse(verify_fields(KEY, STREAM, dict(fields, _sig="\u00e9")))
        self.assertFalse(verify_fields(KEY, STREAM, dict(fields, extra="1")))


class ParseTests(unittest.SynchronousTestCase):
    """Raw stream replies into entries."""

    def test_xrange(self):
        """
        An XRANGE reply becomes (id, fields) pairs; malformed entries keep their id with no fields.
        """
        reply = [["1-0", ["zone_id", "z", "session_id", "s"]], ["2-0", ["odd"]], ["3-0", None]]
        self.assertEqual(
            parse_entries(reply),
            [("1-0", {"zone_id": "z", "session_id": "s"}), ("2-0", None), ("3-0", None)],
        )

    def test_xread(self):
        """An XREAD reply gives the entries of the stream asked for only; a timeout gives none."""
        self.assertEqual(parse_xread(None, "s"), [])
        reply = [["s", [["1-0", ["a", "b"]]]], ["other", [["2-0", ["c", "d"]]]]]
        self.assertEqual(parse_xread(reply, "s"), [("1-0", {"a": "b"})])


class RevocationStoreTests(unittest.SynchronousTestCase):
    """The revoked-session store."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.store = RevocationStore(self.clock)

    def test_revoke(self):
        """A revoked session is revoked in its zone only."""
        self.assertFalse(self.store.is_revoked("z", "s"))
        self.store.revoke("z", "s")
        self.assertTrue(self.store.is_revoked("z", "s"))
        self.assertFalse(self.store.is_revoked("other", "s"))
        self.assertFalse(self.store.is_revoked("z", "t"))
        self.assertEqual(self.store.active(), 1)

    def test_expiry(self):
        """An entry expires 24 h after its revocation time, and is pruned."""
        self.store.revoke("z", "s")
        self.store.revoke("z", "old", revoked_at=self.clock.seconds() - 3600)
        self.assertEqual(self.store.active(), 2)
        self.clock.advance(RETENTION_SECONDS - 3600 - 1)
        self.assertTrue(self.store.is_revoked("z", "old"))
        self.clock.advance(1)
        self.assertFalse(self.store.is_revoked("z", "old"))
        self.assertTrue(self.store.is_revoked("z", "s"))
        self.clock.advance(3600)
        self.assertFalse(self.store.is_revoked("z", "s"))
        self.assertEqual(self.store.active(), 0)

    def test_too_old_ignored(self):
        """A revocation older than the retention is not held."""
        self.store.revoke("z", "s", revoked_at=self.clock.seconds() - RETENTION_SECONDS)
        self.assertFalse(self.store.is_revoked("z", "s"))
        self.assertEqual(self.store.active(), 0)

    def test_revoke_again_extends(self):
        """A later revocation of the same session restarts its 24 h."""
        self.store.revoke("z", "s")
        self.clock.advance(3600)
        self.store.revoke("z", "s")
        self.clock.advance(RETENTION_SECONDS - 1800)
        self.assertTrue(self.store.is_revoked("z", "s"))
        self.clock.advance(1800)
        self.assertFalse(self.store.is_revoked("z", "s"))

    def test_watch_fires_once(self):
        """The watch callback runs once, synchronously, on revocation."""
        calls = []
        self.store.watch("z", "s", lambda: calls.append("s"))
        self.store.watch("z", "other", lambda: calls.append("other"))
        self.store.revoke("z", "s")
        self.assertEqual(calls, ["s"])
        self.store.revoke("z", "s")
        self.assertEqual(calls, ["s"])
        self.assertEqual(self.store.watching(), 1)

    def test_watch_cancel(self):
        """A cancelled watch never fires and is forgotten; cancelling twice is fine."""
        calls = []
        cancel = self.store.watch("z", "s", lambda: calls.append(1))
        keep = self.store.watch("z", "s", lambda: calls.append(2))
        cancel()
        cancel()
        self.assertEqual(self.store.watching(), 1)
        self.store.revoke("z", "s")
        self.assertEqual(calls, [2])
        keep()
        self.assertEqual(self.store.watching(), 0)

    def test_watch_already_revoked(self):
        """Watching a session already revoked fires at once."""
        calls = []
        self.store.revoke("z", "s")
        self.store.watch("z", "s", lambda: calls.append(1))()
        self.assertEqual(calls, [1])
        self.assertEqual(self.store.watching(), 0)

    def test_watcher_error_isolated(self):
        """A failing watcher does not stop the others."""
        calls = []

        def boom():
            raise RuntimeError("boom")

        self.store.watch("z", "s", boom)
        self.store.watch("z", "s", lambda: calls.append(1))
        self.store.revoke("z", "s")
        self.assertEqual(calls, [1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class RevocationStateStoreTests(unittest.SynchronousTestCase):
    """
    The store's own side of SPEC 12's fail-closed rule: current once synced,
    stale after more than L{CONTACT_TIMEOUT} seconds without contact.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.store = RevocationStore(self.clock)

    def test_unfollowed_store_is_current(self):
        """A store nobody follows (fed by hand) always vouches for its content."""
        self.assertIsNone(self.store.unavailable())
        self.successResultOf(self.store.check())
        self.clock.advance(3600)
        self.assertIsNone(self.store.unavailable())

    def test_followed_store_not_loaded(self):
        """Once a follower is expected, the store is not current until its first sync."""
        self.store.expect_follower()
        self.assertEqual(self.store.unavailable(), "revocation window not loaded yet")
        self.assertIsNone(self.store.silence())
        failure = self.failureResultOf(self.store.check(), RevocationStateUnavailable)
        self.assertIn("not loaded", str(failure.value))

    def test_contact_timeout_boundary(self):
        """Exactly 5 s of silence is still contact; a moment more is not."""
        self.store.expect_follower()
        self.store.synced()
        self.assertIsNone(self.store.unavailable())
        self.clock.advance(CONTACT_TIMEOUT)
        self.assertIsNone(self.store.unavailable())
        self.clock.advance(0.001)
        self.assertEqual(self.store.unavailable(), "no contact with the revocation stream for 5.0s")
        self.failureResultOf(self.store.check(), RevocationStateUnavailable)
        self.store.synced()
        self.assertIsNone(self.store.unavailable())
        self.successResultOf(self.store.check())

    def test_revocations_enforced_while_stale(self):
        """A stale store still knows the sessions it holds are revoked."""
        self.store.expect_follower()
        self.store.synced()
        self.store.revoke("z", "s")
        self.clock.advance(60)
        self.assertIsNotNone(self.store.unavailable())
        self.assertTrue(self.store.is_revoked("z", "s"))


class Metrics:
    def __init__(self):
        self.counts = {}

    def increment(self, name, amount=1):
        self.counts[name] = self.counts.get(name, 0) + amount


class RevocationFollowerUnitTests(unittest.SynchronousTestCase):
    """The follower's logic against L{MemoryRedisServer}, time driven by a Clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.redis = MemoryRedisServer(self.clock)
        self.store = RevocationStore(self.clock)
        self.metrics = Metrics()

    def follower(self, key=KEY):
        follower = RevocationFollower(
            None, self.store, key, self.clock, self.metrics, connect=self.redis.connect
        )
        # The production policy adds up to 50 ms of jitter; these tests count delays.
        follower.retry_delay = reconnect_policy(jitter=0)
        self.addCleanup(lambda: follower.running and follower.stopService())
        return follower

    def publish(self, zone, session, key=KEY, entry_id=None, **extra):
        fields = {"zone_id": zone, "session_id": session, **extra}
        if key:
            fields["_sig"] = sign_fields(key, STREAM, fields)
        return self.redis.add(STREAM, fields, entry_id)

    def test_initial_load(self):
        """Start loads the last 24 h and skips older entries; then it is ready."""
        now_ms = int(self.clock.seconds() * 1000)
        self.publish("z", "too-old", entry_id=f"{now_ms - 86_400_001}-0")
        self.publish("z", "recent", entry_id=f"{now_ms - 3_600_000}-0")
        follower = self.follower()
        ready = follower.when_ready()
        follower.startService()
        self.successResultOf(ready)
        self.assertTrue(follower.ready)
        self.assertTrue(self.store.is_revoked("z", "recent"))
        self.assertFalse(self.store.is_revoked("z", "too-old"))
        # the recent entry expires 24 h after its XADD, not after the load
        self.clock.advance(RETENTION_SECONDS - 3600)
        self.assertFalse(self.store.is_revoked("z", "recent"))

    def test_load_pages(self):
        """The initial load reads in pages until a short page."""
        for index in range(5):
            self.publish("z", f"s{index}")
        follower = self.follower()
        follower.page_size = 2
        follower.startService()
        self.assertEqual(self.store.active(), 5)
        ranges = [c for c in self.redis.commands if c[0] == "XRANGE"]
        self.assertEqual(len(ranges), 3)

    def test_follow(self):
        """An entry published after start is applied as it arrives."""
        follower = self.follower()
        follower.startService()
        self.publish("z", "s")
        self.assertTrue(self.store.is_revoked("z", "s"))
        self.assertEqual(follower.applied, 1)

    def test_lag_grows_only_out_of_contact(self):
        """lag() is the time since Redis last answered: small while reads return."""
        follower = self.follower()
        self.assertEqual(follower.lag(), 0.0)
        follower.startService()
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        self.assertLessEqual(follower.lag(), 1.0)
        self.redis.stall = True
        for _ in range(10):
            self.clock.advance(1.0)
        self.assertGreaterEqual(follower.lag(), 5.0)

    def test_block_timeout_continues(self):
        """An empty block period leads to another read from the same id."""
        follower = self.follower()
        follower.startService()
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        reads = [c for c in self.redis.commands if c[0] == "XREAD"]
        self.assertEqual(len(reads), 3)
        self.assertEqual(reads[0][:7], ("XREAD", "BLOCK", 1000, "COUNT", 500, "STREAMS", STREAM))
        self.assertEqual({c[-1] for c in reads}, {follower.last_id})
        self.publish("z", "s")
        self.assertTrue(self.store.is_revoked("z", "s"))

    def test_rejected(self):
        """Unsigned, forged and malformed entries are ignored, counted, dead-lettered."""
        follower = self.follower()
        follower.startService()
        unsigned = self.publish("z", "unsigned", key=None)
        forged = self.publish("z", "forged", key=b"y" * 32)
        fields = {"zone_id": "z"}
        fields["_sig"] = sign_fields(KEY, STREAM, fields)
        malformed = self.redis.add(STREAM, fields)
        self.assertEqual(self.store.active(), 0)
        self.assertEqual(follower.rejected, 3)
        self.assertEqual(self.metrics.counts, {"revocations_rejected": 3})
        dead = self.redis.streams[STREAM + ".dead"]
        # each copy takes its source entry's id, so copying is idempotent
        self.assertEqual([entry_id for entry_id, _ in dead], [unsigned, forged, malformed])
        reasons = [dict(zip(flat[::2], flat[1::2], strict=True)) for _, flat in dead]
        self.assertEqual(
            [(r["reason"], r["source_id"], r.get("session_id")) for r in reasons],
            [
                ("unsigned", unsigned, "unsigned"),
                ("bad_signature", forged, "forged"),
                ("malformed", malformed, None),
            ],
        )
        self.publish("z", "good")
        self.assertTrue(self.store.is_revoked("z", "good"))

    def test_rejected_once_across_instances(self):
        """
        Two instances rejecting the same entries leave one dead letter per
        entry; the second one's refused copies are not errors. Each instance
        counts its own rejections.
        """
        events = []
        self.patch(revocations, "_log", Logger(observer=events.append))
        first = self.follower()
        first.startService()
        unsigned = self.publish("z", "unsigned", key=None)
        second_metrics = Metrics()
        second = RevocationFollower(
            None,
            RevocationStore(self.clock),
            KEY,
            self.clock,
            second_metrics,
            connect=self.redis.connect,
        )
        second.startService()
        self.addCleanup(second.stopService)
        forged = self.publish("z", "forged", key=b"y" * 32)
        dead = self.redis.streams[STREAM + ".dead"]
        self.assertEqual([entry_id for entry_id, _ in dead], [unsigned, forged])
        self.assertEqual((first.rejected, second.rejected), (2, 2))
        self.assertEqual(self.metrics.counts, {"revocations_rejected": 2})
        self.assertEqual(second_metrics.counts, {"revocations_rejected": 2})
        xadds = [c for c in self.redis.commands if c[0] == "XADD"]
        self.assertEqual(len(xadds), 4)
        self.assertEqual(
            [e["log_level"] for e in events if "dead-lettered" in e["log_format"]],
            [LogLevel.debug, LogLevel.debug],
        )

    def test_resync_does_not_duplicate_dead_letters(self):
        """
        After a Redis error the follower re-reads its 24 h window: the
        rejected entries in it are neither dead-lettered nor counted again.
        """
        events = []
        self.patch(revocations, "_log", Logger(observer=events.append))
        follower = self.follower()
        follower.startService()
        unsigned = self.publish("z", "unsigned", key=None)
        self.redis.fail_next = 1
        self.clock.advance(1.0)  # the pending read ends, the next one fails
        self.clock.advance(0.1)  # backoff, then the resync
        ranges = [c for c in self.redis.commands if c[0] == "XRANGE"]
        self.assertEqual(len(ranges), 2)
        self.assertEqual(follower.errors, 1)
        forged = self.publish("z", "forged", key=b"y" * 32)
        dead = self.redis.streams[STREAM + ".dead"]
        self.assertEqual([entry_id for entry_id, _ in dead], [unsigned, forged])
        self.assertEqual(follower.rejected, 2)
        self.assertEqual(self.metrics.counts, {"revocations_rejected": 2})
        # the re-read entry was copied again and refused: a debug line, no warning
        xadds = [c for c in self.redis.commands if c[0] == "XADD"]
        self.assertEqual([c[5] for c in xadds], [unsigned, unsigned, forged])
        warnings = [
            e["entry_id"] for e in events if e["log_level"] >= LogLevel.warn and "entry_id" in e
        ]
        self.assertEqual(warnings, [unsigned, forged])

    def test_dead_letter_failure_logged(self):
        """Any other error copying to the dead letters is a warning."""
        events = []
        self.patch(revocations, "_log", Logger(observer=events.append))
        follower = self.follower()
        follower.startService()
        self.redis.fail_next = 1  # the XADD of the dead letter
        self.publish("z", "unsigned", key=None)
        [failed] = [e for e in events if "not dead-lettered" in e["log_format"]]
        self.assertEqual(failed["log_level"], LogLevel.warn)
        self.assertEqual(failed["reason"], "Lost connection")

    def test_metrics_without_counter(self):
        """A Metrics that does not know the counter yet does not break the follower."""

        class StrictMetrics:
            def increment(self, name, amount=1):
                raise KeyError(name)

        self.metrics = StrictMetrics()
        follower = self.follower()
        follower.startService()
        self.publish("z", "s", key=None)
        self.assertEqual(follower.rejected, 1)

    def test_no_key_accepts_unsigned(self):
        """Without a key (dev) unsigned entries apply."""
        follower = self.follower(key=None)
        follower.startService()
        self.publish("z", "s", key=None)
        self.assertTrue(self.store.is_revoked("z", "s"))

    def test_retry_backoff(self):
        """Errors are retried with a capped backoff, resuming from the last id."""
        follower = self.follower()
        follower.startService()
        self.publish("z", "before")
        last = follower.last_id
        self.redis.fail_next = 9
        self.clock.advance(1.0)  # the pending read ends, the next ones fail
        first_failure = len(self.redis.commands) - 1
        for _ in range(12):
            # jump exactly to the next timer: the backoff wait or the read's block
            next_call = min(call.getTime() for call in self.clock.getDelayedCalls())
            self.clock.advance(next_call - self.clock.seconds())
        times = self.redis.times[first_failure:]
        delays = [round(b - a, 3) for a, b in zip(times, times[1:], strict=False)]
        # Capped at 0.5 s so the follower is back within the 2 s rule.
        self.assertEqual(delays[:9], [0.1, 0.2, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
        self.assertEqual(follower.errors, 9)
        # after the outage: reads resume from the last id seen, nothing lost
        self.publish("z", "during")
        self.assertTrue(self.store.is_revoked("z", "during"))
        reads = [c for c in self.redis.commands[first_failure:] if c[0] == "XREAD"]
        self.assertEqual(reads[0][-1], last)

    def test_stuck_read_reconnects(self):
        """A read with no answer past the block period plus margin gets a new connection."""
        follower = self.follower()
        follower.startService()
        self.redis.stall = True
        self.clock.advance(1.0)  # current read ends, the next one gets no answer
        self.clock.advance(1.0 + follower.read_margin)
        self.assertEqual(len(self.redis.connections), 2)
        self.assertTrue(self.redis.connections[0].closed)
        self.redis.stall = False
        self.clock.advance(0.1)
        self.publish("z", "s")
        self.assertTrue(self.store.is_revoked("z", "s"))

    def test_stop_prompt(self):
        """Stopping interrupts a blocked read at once."""
        follower = self.follower()
        follower.startService()
        self.successResultOf(follower.stopService())
        self.assertTrue(self.redis.connections[0].closed)
        self.assertFalse(follower.running)

    def test_stop_during_backoff(self):
        """Stopping interrupts the backoff wait too."""
        follower = self.follower()
        self.redis.fail_next = 1
        follower.startService()
        self.assertFalse(follower.ready)
        self.successResultOf(follower.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RevocationStateFollowerTests(unittest.SynchronousTestCase):
    """
    The follower keeps its store current (SPEC 12): loaded window, contact
    lost for more than 5 s, contact back. Driven by a Clock against
    L{MemoryRedisServer}, whose C{XREAD BLOCK} answers an empty reply at the
    end of the block period like Redis does.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.redis = MemoryRedisServer(self.clock)
        self.store = RevocationStore(self.clock)

    def follower(self):
        follower = RevocationFollower(
            None, self.store, KEY, self.clock, Metrics(), connect=self.redis.connect
        )
        follower.retry_delay = reconnect_policy(jitter=0)
        self.addCleanup(lambda: follower.running and follower.stopService())
        return follower

    def publish(self, session):
        fields = {"zone_id": "z", "session_id": session}
        fields["_sig"] = sign_fields(KEY, STREAM, fields)
        return self.redis.add(STREAM, fields)

    def advance(self, seconds, step=0.05):
        """Advance the clock in small steps, so every timer fires on time."""
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def test_not_current_before_the_window_is_loaded(self):
        """
        Attaching a follower makes its store not current at once, before
        the follower even starts; the first loaded window makes it current.
        """
        follower = self.follower()
        self.assertEqual(self.store.unavailable(), "revocation window not loaded yet")
        self.redis.stall = True
        follower.startService()
        self.advance(30)
        self.assertFalse(follower.ready)
        self.assertEqual(self.store.unavailable(), "revocation window not loaded yet")
        self.redis.stall = False
        self.advance(7)
        self.assertTrue(follower.ready)
        self.assertIsNone(self.store.unavailable())

    def test_healthy_blocked_read_is_contact(self):
        """
        A quiet stream: the follower sits in XREAD BLOCK for a minute with
        nothing published, and the store never stops being current.
        """
        follower = self.follower()
        follower.startService()
        for _ in range(600):
            self.clock.advance(0.1)
            self.assertIsNone(self.store.unavailable(), self.clock.seconds())
            self.assertLessEqual(self.store.silence(), 1.0)
        reads = [c for c in self.redis.commands if c[0] == "XREAD"]
        # One read per block period (the float steps make a few last 1.1 s).
        self.assertGreaterEqual(len(reads), 50)

    def test_contact_lost_after_five_seconds(self):
        """
        Redis stops answering: the store stays current for 5 s after the
        last answer, then is not; a session revoked meanwhile is not missed
        once contact is back, and the store is current again only after the
        window has been re-read.
        """
        follower = self.follower()
        follower.startService()
        self.clock.advance(0.5)
        self.redis.stall = True
        # The read in flight still ends at its block period: last contact.
        self.clock.advance(0.5)
        last_contact = self.clock.seconds()
        self.advance(5.0)
        self.assertIsNone(self.store.unavailable())
        self.advance(0.1)
        self.assertEqual(self.store.unavailable(), "no contact with the revocation stream for 5.1s")
        # Published while out of contact (the fake stores it; nobody reads it).
        self.publish("during-outage")
        self.advance(20)
        self.assertGreater(self.clock.seconds() - last_contact, 20)
        self.assertIsNotNone(self.store.unavailable())
        self.assertFalse(self.store.is_revoked("z", "during-outage"))

        self.redis.stall = False
        # The stuck read times out, the follower reconnects, waits its
        # backoff (at most 0.5 s), re-reads the window: current again.
        self.advance(7)
        self.assertIsNone(self.store.unavailable())
        self.assertTrue(self.store.is_revoked("z", "during-outage"))

    def test_short_error_keeps_the_state_current(self):
        """
        One failed read (a connection blip) is retried at once: the silence
        never reaches 5 s, so calls are never refused for it.
        """
        follower = self.follower()
        follower.startService()
        self.redis.fail_next = 2
        for _ in range(100):
            self.clock.advance(0.1)
            self.assertIsNone(self.store.unavailable())
        self.assertEqual(follower.errors, 2)

    def test_current_only_after_the_resync(self):
        """
        After an error the window is re-read before reading on; while that
        re-read gets no answer the store does not become current again on
        the strength of an old contact.
        """
        follower = self.follower()
        follower.startService()
        self.redis.fail_next = 1
        self.clock.advance(1.0)  # the pending read ends; the next one fails
        self.redis.stall = True
        self.advance(6)
        ranges = [c for c in self.redis.commands if c[0] == "XRANGE"]
        self.assertGreaterEqual(len(ranges), 2)  # the initial load, then re-reads
        self.assertIsNotNone(self.store.unavailable())
        self.redis.stall = False
        self.advance(6)
        self.assertIsNone(self.store.unavailable())
