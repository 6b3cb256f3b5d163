# -*- test-case-name: tests.test_jwks -*-
"""Tests for L{caracal.gateway.jwks}: the per-zone cache of the STS's signing keys."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway import jwks
from caracal.gateway.jwks import JWKSCache, JWKSUnavailable, UnknownKeyID, usable_keys


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str, **extra) -> dict:
    """The public JWK of C{key} as the STS publishes it."""
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid=kid, alg="ES256", use="sig")
    jwk.update(extra)
    return jwk


def public_numbers(key) -> tuple[int, int]:
    numbers = key.public_numbers()
    return numbers.x, numbers.y


class FakeSTS:
    """
    A JWKS endpoint: C{keys[zone]} is the list of JWKs served; C{calls} counts
    fetches; with C{manual}, each fetch waits until the test fires it.
    """

    def __init__(self):
        self.keys: dict[str, list] = {}
        self.calls: list[str] = []
        self.down = False
        self.manual = False
        self.pending: list[tuple[str, defer.Deferred]] = []

    def fetch(self, zone_id):
        self.calls.append(zone_id)
        if self.manual:
            d = defer.Deferred()
            self.pending.append((zone_id, d))
            return d
        if self.down:
            return defer.fail(ConnectionRefusedError("sts down"))
        return defer.succeed({"keys": list(self.keys.get(zone_id, []))})

    def release(self):
        """Answer every pending fetch with the current keys."""
        pending, self.pending = self.pending, []
        for zone_id, d in pending:
            d.callback({"keys": list(self.keys.get(zone_id, []))})


class JWKSCacheTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.sts = FakeSTS()
        self.cache = JWKSCache(self.sts.fetch, self.clock)
        self.k1 = ec.generate_private_key(ec.SECP256R1())
        self.k2 = ec.generate_private_key(ec.SECP256R1())
        self.sts.keys["zone-a"] = [ec_jwk(self.k1, "k1")]

    def key(self, zone_id, kid):
        return self.successResultOf(self.cache.key_for(zone_id, kid))

    def assertKey(self, zone_id, kid, private):
        self.assertEqual(
            public_numbers(self.key(zone_id, kid)), public_numbers(private.public_key())
        )

    def test_fetchesOnFirstUse(self):
        """The first lookup of a zone fetches its JWKS and finds the key by kid."""
        self.assertKey("zone-a", "k1", self.k1)
        self.assertEqual(self.sts.calls, ["zone-a"])

    def test_cachedWithinTTL(self):
        """Lookups within five minutes are answered from the cache."""
        self.key("zone-a", "k1")
        self.clock.advance(299)
        self.key("zone-a", "k1")
        self.assertEqual(self.sts.calls, ["zone-a"])

    def test_refetchedAfterTTL(self):
        """After five minutes the zone's keys are fetched again."""
        self.key("zone-a", "k1")
        self.clock.advance(300)
        self.key("zone-a", "k1")
        self.assertEqual(self.sts.calls, ["zone-a", "zone-a"])

    def test_removedKeyGoneAfterTTL(self):
        """A key the STS stops publishing is no longer accepted after the refetch."""
        self.key("zone-a", "k1")
        self.sts.keys["zone-a"] = [ec_jwk(self.k2, "k2")]
        self.clock.advance(300)
        self.failureResultOf(self.cache.key_for("zone-a", "k1"), UnknownKeyID)

    def test_unknownKidRefetchesOnce(self):
        """
        An unknown kid forces one refetch; a second unknown kid within 30 s
        does not fetch again; after 30 s one may.
        """
        self.key("zone-a", "k1")
        self.clock.advance(30)
        self.failureResultOf(self.cache.key_for("zone-a", "nope"), UnknownKeyID)
        self.assertEqual(len(self.sts.calls), 2)
        self.clock.advance(29.9)
        self.failureResultOf(self.cache.key_for("zone-a", "other"), UnknownKeyID)
        self.failureResultOf(self.cache.key_for("zone-a", "nope"), UnknownKeyID)
        self.assertEqual(len(self.sts.calls), 2)
        self.clock.advance(0.1)
        self.failureResultOf(self.cache.key_for("zone-a", "nope"), UnknownKeyID)
        self.assertEqual(len(self.sts.calls), 3)

    def test_firstFetchCountsForRateLimit(self):
        """An unknown kid right after the first fetch does not fetch again."""
        self.failureResultOf(self.cache.key_for("zone-a", "nope"), UnknownKeyID)
        self.failureResultOf(self.cache.key_for("zone-a", "nope"), UnknownKeyID)
        self.assertEqual(len(self.sts.calls), 1)

    def test_rotation(self):
        """A key added by the STS is found by the refetch its unknown kid triggers."""
        self.key("zone-a", "k1")
        self.clock.advance(31)
        self.sts.keys["zone-a"].append(ec_jwk(self.k2, "k2"))
        self.assertKey("zone-a", "k2", self.k2)
        self.assertKey("zone-a", "k1", self.k1)
        self.assertEqual(len(self.sts.calls), 2)

    def test_concurrentLookupsShareOneFetch(self):
        """Lookups of one zone while its fetch is in flight wait for that fetch."""
        self.sts.manual = True
        first = self.cache.key_for("zone-a", "k1")
        second = self.cache.key_for("zone-a", "k1")
        unknown = self.cache.key_for("zone-a", "nope")
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual(self.sts.calls, ["zone-a"])
        self.sts.release()
        self.assertEqual(
            public_numbers(self.successResultOf(first)), public_numbers(self.k1.public_key())
        )
        self.assertEqual(
            public_numbers(self.successResultOf(second)), public_numbers(self.k1.public_key())
        )
        self.failureResultOf(unknown, UnknownKeyID)
        self.assertEqual(self.sts.calls, ["zone-a"])

    def test_unknownKidJoinsInFlightRefetch(self):
        """An unknown kid arriving during a refetch waits for it instead of failing."""
        self.key("zone-a", "k1")
        self.clock.advance(31)
        self.sts.manual = True
        first = self.cache.key_for("zone-a", "k2")
        second = self.cache.key_for("zone-a", "k2")
        self.sts.keys["zone-a"].append(ec_jwk(self.k2, "k2"))
        self.sts.release()
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(len(self.sts.calls), 2)

    def test_cancelledWaiterDoesNotDisturbOthers(self):
        """Cancelling one lookup leaves the shared fetch and other lookups alone."""
        self.sts.manual = True
        first = self.cache.key_for("zone-a", "k1")
        second = self.cache.key_for("zone-a", "k1")
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.sts.release()
        self.successResultOf(second)

    def test_lastCancelledWaiterDropsFetch(self):
        """When every lookup waiting on a fetch is cancelled, the fetch is cancelled too."""
        self.sts.manual = True
        first = self.cache.key_for("zone-a", "k1")
        second = self.cache.key_for("zone-a", "k1")
        [(_, fetch)] = self.sts.pending
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.assertFalse(fetch.called)
        second.cancel()
        self.failureResultOf(second, defer.CancelledError)
        self.assertTrue(fetch.called)

    def test_droppedFetchIsNotAnOutage(self):
        """A fetch dropped by its callers starts no back-off: the next lookup fetches at once."""
        self.sts.manual = True
        lookup = self.cache.key_for("zone-a", "k1")
        lookup.cancel()
        self.failureResultOf(lookup, defer.CancelledError)
        self.sts.manual = False
        self.assertKey("zone-a", "k1", self.k1)
        self.assertEqual(self.sts.calls, ["zone-a", "zone-a"])

    def test_zonesIndependent(self):
        """Each zone has its own keys, cache and refetch budget."""
        self.sts.keys["zone-b"] = [ec_jwk(self.k2, "k2")]
        self.assertKey("zone-a", "k1", self.k1)
        self.assertKey("zone-b", "k2", self.k2)
        # A key of zone B is unknown in zone A, and vice versa.
        self.failureResultOf(self.cache.key_for("zone-a", "k2"), UnknownKeyID)
        self.failureResultOf(self.cache.key_for("zone-b", "k1"), UnknownKeyID)
        self.assertEqual(self.sts.calls, ["zone-a", "zone-b"])
        # Zone A's exhausted refetch budget does not stop zone B's.
        self.clock.advance(31)
        self.failureResultOf(self.cache.key_for("zone-b", "nope"), UnknownKeyID)
        self.assertEqual(self.sts.calls, ["zone-a", "zone-b", "zone-b"])

    def test_fetchFailureWithoutCache(self):
        """No keys and no STS: the lookup fails with JWKSUnavailable."""
        self.sts.down = True
        self.failureResultOf(self.cache.key_for("zone-a", "k1"), JWKSUnavailable)
        # Once the one-second back-off has passed, the next request tries again.
        self.sts.down = False
        self.clock.advance(1)
        self.key("zone-a", "k1")
        self.assertEqual(len(self.sts.calls), 2)

    def test_fetchRaisingSynchronously(self):
        """A fetch function that raises is a fetch failure, not a crash."""

        def fetch(zone_id):
            raise RuntimeError("boom")

        cache = JWKSCache(fetch, self.clock)
        self.failureResultOf(cache.key_for("zone-a", "k1"), JWKSUnavailable)

    def test_fetchFailureWithFreshCache(self):
        """A failed refetch for an unknown kid keeps the cached keys in service."""
        self.key("zone-a", "k1")
        self.clock.advance(31)
        self.sts.down = True
        self.failureResultOf(self.cache.key_for("zone-a", "k2"), UnknownKeyID)
        self.key("zone-a", "k1")

    def test_fetchFailureWithExpiredCache(self):
        """
        Keys past their five minutes stay in service while the refresh fails,
        for the grace period past their TTL and no longer.
        """
        self.key("zone-a", "k1")
        self.clock.advance(300)
        self.sts.down = True
        self.assertKey("zone-a", "k1", self.k1)
        self.assertEqual(len(self.sts.calls), 2)
        self.clock.advance(3600 - 0.5)
        self.assertKey("zone-a", "k1", self.k1)
        self.clock.advance(0.5)
        self.failureResultOf(self.cache.key_for("zone-a", "k1"), JWKSUnavailable)

    def test_outageWithoutCacheBoundsFetches(self):
        """
        With no keys and the STS down, a stream of requests (bogus kids or
        not) fetches only when the back-off allows: 1, 2, 4, 8, 16 s apart,
        then at most once per 30 s; the others fail fast with JWKSUnavailable.
        """
        self.sts.down = True
        fetch_times = []
        start = self.clock.seconds()
        for i in range(480):  # one request every 250 ms for two minutes
            before = len(self.sts.calls)
            kid = "k1" if i % 2 else f"bogus-{i}"
            self.failureResultOf(self.cache.key_for("zone-a", kid), JWKSUnavailable)
            if len(self.sts.calls) > before:
                fetch_times.append(self.clock.seconds() - start)
            self.clock.advance(0.25)
        self.assertEqual(fetch_times, [0, 1, 3, 7, 15, 31, 61, 91])

    def test_outageWithStaleKeysBoundsFetches(self):
        """
        With stale keys and the STS down, known kids keep verifying without
        waiting for the STS, unknown kids fail fast as unknown, and the
        background refresh attempts follow the back-off.
        """
        self.key("zone-a", "k1")
        self.clock.advance(300)
        self.sts.down = True
        del self.sts.calls[:]
        for i in range(240):  # one request every 250 ms for a minute
            self.assertKey("zone-a", "k1", self.k1)
            self.failureResultOf(self.cache.key_for("zone-a", f"bogus-{i}"), UnknownKeyID)
            self.clock.advance(0.25)
        # Refreshes at 0, 1, 3, 7, 15, 31 s; no further one before 61 s.
        self.assertEqual(len(self.sts.calls), 6)

    def test_unknownKidDuringBackoffDoesNotFetch(self):
        """An unknown kid inside the back-off window is refused without a fetch."""
        self.key("zone-a", "k1")
        self.clock.advance(31)
        self.sts.down = True
        self.failureResultOf(self.cache.key_for("zone-a", "k2"), UnknownKeyID)
        self.assertEqual(len(self.sts.calls), 2)
        self.sts.down = False
        self.sts.keys["zone-a"].append(ec_jwk(self.k2, "k2"))
        self.clock.advance(0.5)
        self.failureResultOf(self.cache.key_for("zone-a", "k2"), UnknownKeyID)
        self.assertEqual(len(self.sts.calls), 2)
        # The refetch interval still applies once the back-off is over.
        self.clock.advance(30)
        self.assertKey("zone-a", "k2", self.k2)
        self.assertEqual(len(self.sts.calls), 3)

    def test_recoveryResetsBackoff(self):
        """A successful fetch ends the outage: the next failure backs off 1 s again."""
        self.sts.down = True
        for _ in range(4):  # failures back off 1, 2, 4, 8 s
            self.failureResultOf(self.cache.key_for("zone-a", "k1"), JWKSUnavailable)
            self.clock.advance(30)
        self.assertEqual(len(self.sts.calls), 4)
        self.sts.down = False
        self.key("zone-a", "k1")
        self.assertEqual(len(self.sts.calls), 5)
        # Past the grace period, so only a fetch can answer.
        self.clock.advance(300 + 3600)
        self.sts.down = True
        self.failureResultOf(self.cache.key_for("zone-a", "k1"), JWKSUnavailable)
        self.assertEqual(len(self.sts.calls), 6)
        self.sts.down = False
        self.clock.advance(0.9)
        self.failureResultOf(self.cache.key_for("zone-a", "k1"), JWKSUnavailable)
        self.assertEqual(len(self.sts.calls), 6)
        self.clock.advance(0.1)
        self.key("zone-a", "k1")
        self.assertEqual(len(self.sts.calls), 7)

    def test_recoveryDropsWithdrawnKey(self):
        """The first successful refresh after an outage drops keys the STS withdrew."""
        self.key("zone-a", "k1")
        self.clock.advance(300)
        self.sts.down = True
        self.assertKey("zone-a", "k1", self.k1)
        self.sts.down = False
        self.sts.keys["zone-a"] = [ec_jwk(self.k2, "k2")]
        self.clock.advance(1)
        # This lookup still gets the stale key and starts the refresh.
        self.assertKey("zone-a", "k1", self.k1)
        self.failureResultOf(self.cache.key_for("zone-a", "k1"), UnknownKeyID)
        self.assertKey("zone-a", "k2", self.k2)

    def test_staleKeysLoggedOncePerOutage(self):
        """Serving stale keys is logged once per zone per outage, not per request."""
        events = []
        self.patch(jwks, "log", Logger(observer=events.append))
        self.sts.keys["zone-b"] = [ec_jwk(self.k2, "k2")]
        self.key("zone-a", "k1")
        self.key("zone-b", "k2")
        self.clock.advance(300)
        self.sts.down = True
        for _ in range(50):
            self.key("zone-a", "k1")
            self.key("zone-b", "k2")
            self.clock.advance(1)

        def stale(zone_id):
            return [
                e for e in events if e.get("zone_id") == zone_id and "last good" in e["log_format"]
            ]

        self.assertEqual(len(stale("zone-a")), 1)
        self.assertEqual(len(stale("zone-b")), 1)
        # A success ends the outage; the next one is logged again.
        self.sts.down = False
        self.clock.advance(30)
        self.key("zone-a", "k1")
        self.key("zone-a", "k1")
        self.clock.advance(300)
        self.sts.down = True
        self.key("zone-a", "k1")
        self.assertEqual(len(stale("zone-a")), 2)

    def test_malformedJWKSIsFailure(self):
        """A JWKS that is not an object with a keys list counts as a failed fetch."""
        for document in (None, [], "keys", {}, {"keys": {}}, {"keys": "k1"}):
            cache = JWKSCache(lambda zone_id, d=document: defer.succeed(d), self.clock)
            self.failureResultOf(cache.key_for("zone-a", "k1"), JWKSUnavailable)

    def test_onlyES256KeysKept(self):
        """RSA, oct, other curves, other algs, encryption and private keys are skipped."""
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        rsa_jwk = RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
        rsa_jwk.update(kid="rsa", alg="RS256")
        p384 = ECAlgorithm.to_jwk(
            ec.generate_private_key(ec.SECP384R1()).public_key(), as_dict=True
        )
        p384.update(kid="p384")
        private = ECAlgorithm.to_jwk(self.k2, as_dict=True)
        private.update(kid="private")
        jwks = {
            "keys": [
                rsa_jwk,
                {"kty": "oct", "kid": "oct", "k": "c2VjcmV0"},
                p384,
                ec_jwk(self.k2, "hs", alg="HS256"),
                ec_jwk(self.k2, "enc", use="enc"),
                private,
                ec_jwk(self.k2, "bad-point", x="AAAA"),
                ec_jwk(self.k2, ""),
                "not a jwk",
                ec_jwk(self.k1, "good"),
            ]
        }
        keys = usable_keys(jwks)
        self.assertEqual(list(keys), ["good"])
        self.assertEqual(public_numbers(keys["good"]), public_numbers(self.k1.public_key()))

    def test_algAbsentAccepted(self):
        """An EC P-256 JWK without alg is an ES256 key."""
        jwk = ec_jwk(self.k1, "k1")
        del jwk["alg"], jwk["use"]
        self.assertEqual(list(usable_keys({"keys": [jwk]})), ["k1"])

    def test_nonECKeysIgnoredByCache(self):
        """A kid naming an RSA key in the set is unknown to the cache."""
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        rsa_jwk = RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
        rsa_jwk["kid"] = "rsa"
        self.sts.keys["zone-a"].append(rsa_jwk)
        self.failureResultOf(self.cache.key_for("zone-a", "rsa"), UnknownKeyID)
        self.key("zone-a", "k1")


class JWKSFetchMetricTests(SynchronousTestCase):
    """Each fetch lands in jwks_fetches_total{result}."""

    def test_okAndErrorCounted(self):
        """A successful fetch counts result="ok", a failed one result="error"."""
        from caracal.gateway.metrics import Metrics
        from tests.support.metrics import sample_sum

        clock = task.Clock()
        clock.advance(1_800_000_000)
        sts = FakeSTS()
        key = ec.generate_private_key(ec.SECP256R1())
        sts.keys["zone-a"] = [ec_jwk(key, "k1")]
        metrics = Metrics()
        cache = JWKSCache(sts.fetch, clock, metrics=metrics)
        self.successResultOf(cache.key_for("zone-a", "k1"))
        sts.down = True
        self.failureResultOf(cache.key_for("zone-b", "k1"))
        name = "caracal_gateway_jwks_fetches_total"
        self.assertEqual(sample_sum(metrics, name, result="ok"), 1)
        self.assertEqual(sample_sum(metrics, name, result="error"), 1)
        self.flushLoggedErrors()
