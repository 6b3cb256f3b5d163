# -*- test-case-name: tests.integration.test_replicas -*-
"""
Correctness does not depend on which replica a call reaches (SPEC 6 step 9,
SPEC 9). Every test runs at least two real C{twistd -n caracal-gateway}
processes on distinct 127.0.0.1 ports, over TLS, sharing one temporary
Postgres database and one Redis, with the dev STS and the upstream in the
test process:

  - a single-use token spent on one replica is a replay on another;
  - one signed revocation is enforced by every replica within a second
    (measured: worst and median delay from the XADD to the first refusal,
    written to the test log and to C{revocation-latency.txt} in trial's
    working directory);
  - a replica started after a revocation enforces it;
  - an unsigned or forged revocation is enforced by none and dead-lettered
    once (not once per replica);
  - a restart of a non-persistent Redis loses no revocation published once
    it is back, even when the new entry ids are lower than the old ones.
"""

from __future__ import annotations

import os
import secrets
import statistics
import time

from twisted.internet import defer
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from caracal.gateway.revocations import REVOCATION_STREAM, sign_fields
from tests.support.redis import SHARED_PORT, PrivateRedis, SyncRedis, redis_namespace
from tests.support.replicas import DEAD_LETTER_STREAM, ReplicaSet
from tests.support.waiting import wait_until

log = Logger()

#: Distinct sessions revoked in the latency measurement.
LATENCY_REVOCATIONS = 50
LATENCY_REPORT = "revocation-latency.txt"


def session(label: str) -> str:
    return f"sess-{label}-{secrets.token_hex(4)}"


class ReplicaTestCase(TestCase):
    """Starts a L{ReplicaSet} of C{replicas} gateways on the shared Redis."""

    timeout = 60
    replicas = 2

    def redis_port(self) -> int:
        """The Redis the replicas share (the shared server by default)."""
        return SHARED_PORT

    @defer.inlineCallbacks
    def setUp(self):
        self.set = ReplicaSet(self.mktemp(), redis_port=self.redis_port())
        self.addCleanup(self.stop_set)
        yield self.set.start(self.replicas)
        yield defer.gatherResults([self.set.serving(g) for g in self.set.gateways])

    @defer.inlineCallbacks
    def stop_set(self):
        statuses = yield self.set.stop()
        # SIGTERM is an orderly stop (SPEC 11): a replica that did not exit 0
        # would hide a failure of its own behind the test's result.
        self.assertEqual(statuses, [0] * len(statuses))

    @defer.inlineCallbacks
    def outcomes(self, token_for):
        """The outcome on every gateway of a call with C{token_for()} (one token each)."""
        results = yield defer.gatherResults(
            [self.set.outcome(gateway, token_for()) for gateway in self.set.gateways]
        )
        return results

    @defer.inlineCallbacks
    def enforced_everywhere(self, session_id: str, since: float, timeout: float = 2.0):
        """Wait until every gateway refuses C{session_id}; fires with the delays."""
        delays = yield defer.gatherResults(
            [
                self.set.first_refusal(gateway, session_id, since, timeout=timeout)
                for gateway in self.set.gateways
            ]
        )
        return delays


class SingleUseAcrossReplicasTests(ReplicaTestCase):
    @defer.inlineCallbacks
    def test_perCallTokenSpentOnOneReplicaIsAReplayOnAnother(self):
        """
        A per_call token accepted by gateway A is refused by gateway B with
        401 invalid_token, and only A's call reached the upstream.
        """
        first, second = self.set.gateways[:2]
        before_upstream = len(self.set.upstream.requests)
        before_exchanges = self.set.sts.exchanges
        token = self.set.mint(use="per_call")
        code, body = yield self.set.call(first, token)
        self.assertEqual(code, 200, body)
        code, body = yield self.set.call(second, token)
        self.assertEqual((code, body["error"]), (401, "invalid_token"))
        self.assertEqual(len(self.set.upstream.requests) - before_upstream, 1)
        self.assertEqual(self.set.sts.exchanges - before_exchanges, 1)


class RevocationLatencyTests(ReplicaTestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_revocationEnforcedByEveryReplicaWithinASecond(self):
        """
        Over L{LATENCY_REVOCATIONS} distinct sessions, each revoked by one
        signed XADD, every replica refuses the session within a second of the
        XADD. The delay per (revocation, replica) runs from just before the
        XADD to the first 401 session_revoked answer, polling every 5 ms.
        """
        delays_by_port: dict[int, list[float]] = {g.port: [] for g in self.set.gateways}
        for index in range(LATENCY_REVOCATIONS):
            sid = session(f"latency-{index}")
            # The session works everywhere first, so the refusal below is the
            # revocation's doing and not some other denial.
            outcomes = yield self.outcomes(lambda sid=sid: self.set.mint("ambient", sid))
            self.assertEqual(outcomes, ["allowed"] * len(self.set.gateways))
            started = time.monotonic()
            self.set.revoke(sid)
            delays = yield self.enforced_everywhere(sid, started)
            for gateway, delay in zip(self.set.gateways, delays, strict=True):
                delays_by_port[gateway.port].append(delay)

        every = sorted(delay for delays in delays_by_port.values() for delay in delays)
        worst, median = every[-1], statistics.median(every)
        lines = [
            f"revocation latency over {LATENCY_REVOCATIONS} revocations x"
            f" {len(self.set.gateways)} replicas ({len(every)} measurements):"
            f" worst {worst * 1000:.1f} ms, p50 {median * 1000:.1f} ms,"
            f" p95 {every[int(len(every) * 0.95) - 1] * 1000:.1f} ms",
        ]
        for port, delays in delays_by_port.items():
            lines.append(
                f"  replica on port {port}: worst {max(delays) * 1000:.1f} ms,"
                f" p50 {statistics.median(delays) * 1000:.1f} ms"
            )
        report = "\n".join(lines)
        log.info("{report}", report=report)
        with open(os.path.abspath(LATENCY_REPORT), "w") as f:
            f.write(report + "\n")
        self.assertEqual(len(every), LATENCY_REVOCATIONS * len(self.set.gateways))
        self.assertLess(worst, 1.0, report)


class LateReplicaTests(ReplicaTestCase):
    @defer.inlineCallbacks
    def test_replicaStartedAfterTheRevocationEnforcesIt(self):
        """
        A third gateway started after the XADD never lets the session
        through: it loads the last 24 hours of the stream before its first
        verdict on a session.
        """
        sid = session("late")
        outcomes = yield self.outcomes(lambda: self.set.mint("ambient", sid))
        self.assertEqual(outcomes, ["allowed", "allowed"])
        self.set.revoke(sid)
        yield self.enforced_everywhere(sid, time.monotonic())

        late = yield self.set.add_gateway()
        started = time.monotonic()
        # From its very first call on, the new replica must never let the
        # session through. Until its resource snapshot is loaded it answers
        # 403 access_denied for every call (it listens before its stores
        # are loaded), which lets nothing through either; past that, the
        # answer must be the revocation's.
        loading = 0
        while True:
            outcome = yield self.set.outcome(late, self.set.mint("ambient", sid))
            if outcome != "access_denied":
                break
            loading += 1
            self.assertLess(time.monotonic() - started, 5.0, "resource table never loaded")
        log.info(
            "late replica: {loading} calls answered access_denied during {seconds:.3f} s"
            " after /health answered",
            loading=loading,
            seconds=time.monotonic() - started,
        )
        self.assertEqual(outcome, "session_revoked")
        # And it is a working replica, not one refusing everything.
        outcome = yield self.set.outcome(late, self.set.mint("ambient", session("other")))
        self.assertEqual(outcome, "allowed")


class PrivateRedisMixin:
    """The replicas share a private C{redis-server} of the test's own."""

    def redis_port(self) -> int:
        self.redis = PrivateRedis()
        self.redis.start()
        self.addCleanup(self.redis.stop)
        return self.redis.port


class ForgedRevocationTests(PrivateRedisMixin, ReplicaTestCase):
    """
    On a private Redis: on the shared one, every gateway of every other test
    follows the same stream with a key of its own and rightly dead-letters
    this test's entries too, so the dead letters would not be ours alone.
    """

    @defer.inlineCallbacks
    def test_unsignedOrForgedRevocationEnforcedByNone(self):
        """
        An unsigned revocation and one signed with another key are enforced
        by no replica, even once a signed revocation published after them is
        enforced everywhere; each is copied to the dead-letter stream exactly
        once, however many replicas refused it.
        """
        unsigned, forged, marker = session("unsigned"), session("forged"), session("marker")
        unsigned_id = self.set.revoke(unsigned, signature=None)
        wrong_key = secrets.token_bytes(32)
        forged_id = self.set.revoke(
            forged,
            signature=sign_fields(
                wrong_key, REVOCATION_STREAM, {"zone_id": self.set.zone, "session_id": forged}
            ),
        )
        self.set.revoke(marker)
        # The stream is read in order: once the marker is enforced, the two
        # before it have been seen and judged by every replica.
        yield self.enforced_everywhere(marker, time.monotonic())
        for sid in (unsigned, forged):
            outcomes = yield self.outcomes(lambda sid=sid: self.set.mint("ambient", sid))
            self.assertEqual(outcomes, ["allowed"] * len(self.set.gateways), sid)

        # Each replica follows the whole stream and judges each entry, but the
        # copy takes the source entry's id, so Redis keeps exactly one dead
        # letter per refused entry (the later copies are refused as already
        # there). The marker was enforced everywhere, so every replica has
        # sent its copies by now (they are not awaited by the follower).
        expected = sorted(
            [
                (unsigned_id, unsigned_id, unsigned, "unsigned"),
                (forged_id, forged_id, forged, "bad_signature"),
            ]
        )

        def dead_letters():
            return sorted(
                (
                    entry_id,
                    fields.get("source_id"),
                    fields.get("session_id"),
                    fields.get("reason"),
                )
                for entry_id, fields in self.set.entries(DEAD_LETTER_STREAM)
            )

        yield wait_until(lambda: len(dead_letters()) >= len(expected), timeout=2.0)
        self.assertEqual(dead_letters(), expected)


class RedisRestartTests(PrivateRedisMixin, ReplicaTestCase):
    """The gateways use a private, non-persistent Redis that the test restarts."""

    timeout = 90

    @defer.inlineCallbacks
    def restart_redis(self):
        """
        Stop Redis; show that per_call calls fail closed (503
        replay_check_unavailable) on every replica while it is down, and
        that revocations already known are still enforced; start it again
        on the same port, empty.
        """
        self.redis.stop()
        outcomes = yield self.outcomes(lambda: self.set.mint("per_call"))
        self.assertEqual(outcomes, ["replay_check_unavailable"] * len(self.set.gateways))
        self.redis.start()
        client = self.redis.client()
        self.addCleanup(client.close)
        self.assertEqual(client.call("XLEN", "caracal.sessions.revoke"), 0)

    @defer.inlineCallbacks
    def test_revocationAfterRestartEnforcedEverywhere(self):
        """
        R1 published before the restart stays enforced; R2 published after
        it is enforced by every replica within a few seconds, and per_call
        calls work again.
        """
        first = session("r1")
        self.set.revoke(first)
        yield self.enforced_everywhere(first, time.monotonic())
        yield self.restart_redis()
        second = session("r2")
        self.set.revoke(second)
        yield self.enforced_everywhere(second, time.monotonic(), timeout=5.0)
        outcomes = yield self.outcomes(lambda: self.set.mint("ambient", first))
        self.assertEqual(outcomes, ["session_revoked"] * len(self.set.gateways))
        yield defer.gatherResults([self.set.serving(g) for g in self.set.gateways])
        outcomes = yield self.outcomes(lambda: self.set.mint("per_call"))
        self.assertEqual(outcomes, ["allowed"] * len(self.set.gateways))

    @defer.inlineCallbacks
    def test_revocationWithLowerIdAfterRestartEnforcedEverywhere(self):
        """
        The restarted Redis's entry ids start lower than the last id the
        replicas saw (here: the old server's clock ran a minute ahead, so its
        last entry id is in the future): a follower that goes on reading
        after its old id would miss R2. Every replica must still enforce it.
        """
        ahead = f"{int(time.time() * 1000) + 60_000}-0"
        first = session("r1-ahead")
        self.assertEqual(self.set.revoke(first, entry_id=ahead), ahead)
        yield self.enforced_everywhere(first, time.monotonic())
        yield self.restart_redis()
        second = session("r2-lower")
        second_id = self.set.revoke(second)
        self.assertLess(int(second_id.split("-")[0]), int(ahead.split("-")[0]))
        yield self.enforced_everywhere(second, time.monotonic(), timeout=5.0)


class SharedStreamReadTests(TestCase):
    """A replica set reads a shared stream from its own start, never whole."""

    def test_entries_older_than_the_set_are_not_read(self):
        """
        C{entries} returns this set's entries written since it was made and
        does not fetch older ones (a shared audit stream can hold a million).
        """
        stream = redis_namespace("replicas-stream")
        redis = SyncRedis()
        self.addCleanup(redis.close)
        self.addCleanup(redis.call, "DEL", stream)
        replicas = ReplicaSet(self.mktemp())
        redis.call("XADD", stream, "1-1", "zone_id", replicas.zone)
        new = redis.call("XADD", stream, "*", "zone_id", replicas.zone)
        redis.call("XADD", stream, "*", "zone_id", "another-zone")
        self.assertEqual([entry_id for entry_id, _ in replicas.entries(stream, redis)], [new])
