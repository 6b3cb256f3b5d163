# -*- test-case-name: tests.test_jwks -*-
"""
The per-zone cache of the STS's signing keys (SPEC section 5).

Each zone's JWKS is fetched from the STS, kept for five minutes, and shared by
every request of that zone. A token signed with a key the cache does not know
(a rotation) forces one refetch, but at most one per zone per thirty seconds,
so a stream of tokens with made-up C{kid}s cannot turn the gateway into a
load generator against the STS. Concurrent lookups of one zone share one
in-flight fetch. A failed fetch backs the zone off (no fetch for 1 s, doubling
up to 30 s), and the last good keys outlive their TTL by a bounded grace
period while the STS cannot be reached (see L{JWKSCache}).

Only ES256 keys are kept: C{kty} C{EC}, C{crv} C{P-256}, C{alg} C{ES256} or
absent, a C{kid}, no private part. Anything else in the set is skipped, so a
token can never be checked against a key of another type (the classic
algorithm-confusion attacks need exactly that).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePublicKey
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from caracal.gateway.interfaces import IKeySource

log = Logger()


class JWKSUnavailable(Exception):
    """
    The zone's keys could not be fetched (or a failed fetch is backing off)
    and no usable copy is cached; the gateway answers 503 C{sts_unavailable}.
    """


class UnknownKeyID(Exception):
    """
    The zone's key set (fresh, or refetched as often as allowed) has no
    usable key with the token's C{kid}; the token is refused as invalid.
    """


def usable_keys(jwks: object) -> dict[str, EllipticCurvePublicKey]:
    """
    The ES256 public keys of a JWKS document, by C{kid}.

    @param jwks: the decoded JSON of C{/.well-known/jwks.json}.
    @raise ValueError: the document is not a JSON object with a C{keys} list
        (a malformed set counts as a failed fetch, not as an empty one).
    """
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise ValueError("JWKS is not an object with a 'keys' list")
    keys: dict[str, EllipticCurvePublicKey] = {}
    for jwk in jwks["keys"]:
        key = _es256_public_key(jwk)
        if key is not None:
            keys[jwk["kid"]] = key
    return keys


def _es256_public_key(jwk: object) -> EllipticCurvePublicKey | None:
    """The public key of one JWK if it is a usable ES256 verification key."""
    if not isinstance(jwk, dict):
        return None
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        return None
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
        return None
    if jwk.get("alg", "ES256") != "ES256":
        return None
    if jwk.get("use", "sig") != "sig":
        return None
    if "d" in jwk:
        # A private key published by mistake; never verify with it.
        return None
    try:
        key = jwt.PyJWK(jwk, algorithm="ES256").key
    except (jwt.PyJWTError, ValueError, TypeError):
        # Off-curve point, wrong coordinate length, not base64: skip this key only.
        return None
    if not isinstance(key, EllipticCurvePublicKey) or not isinstance(key.curve, SECP256R1):
        return None
    return key


@dataclass
class _ZoneKeys:
    """What the cache knows about one zone."""

    keys: dict[str, EllipticCurvePublicKey] = field(default_factory=dict)
    # When the keys above were fetched; None until a fetch has succeeded.
    fetched_at: float | None = None
    # When the last fetch (successful or not) started; rate-limits refetches.
    attempted_at: float | None = None
    # Callers waiting on the in-flight fetch: (kid, their Deferred).
    waiting: list[tuple[str, Deferred]] | None = None
    # The in-flight fetch, cancelled when every waiter has been cancelled.
    fetching: Deferred | None = None
    # Fetches failed in a row since the last success; 0 when the STS answers.
    failures: int = 0
    # The current back-off delay and the time before which no fetch starts.
    backoff: float = 0.0
    retry_at: float | None = None
    # Whether "serving stale keys" was logged during the current outage.
    stale_logged: bool = False


# How usable a zone's cached keys are right now.
_FRESH = "fresh"
_STALE = "stale"


@implementer(IKeySource)
class JWKSCache:
    """
    Per-zone cache of the STS's ES256 verification keys.

    During an STS outage the cache protects both sides. After a failed fetch
    the zone is not fetched again for a back-off delay (C{initial_backoff},
    doubling per failure up to C{refetch_interval}, reset by a success);
    lookups in that window that need a fetch fail at once. And the last good
    key set stays in service past its TTL for up to C{stale_grace} seconds
    while refreshes fail (stale-if-error), so an outage of the JWKS endpoint
    does not turn every request into a 503 the moment the TTL runs out. The
    cost of that choice: a key the STS has withdrawn keeps verifying for up to
    C{stale_grace} past its TTL, but only while the STS cannot be reached to
    say so; the first successful refresh drops it.

    @param fetch: C{fetch(zone_id) -> Deferred[dict]}, the zone's JWKS JSON
        (L{caracal.gateway.sts.STSClient.fetch_jwks}).
    @param clock: an L{IReactorTime} (C{seconds()}).
    @param ttl: seconds a fetched key set is used without refetching.
    @param refetch_interval: minimum seconds between two fetches of one zone
        triggered by an unknown C{kid}; also the longest failure back-off.
    @param initial_backoff: seconds without fetches after a first failure.
    @param stale_grace: seconds past C{ttl} the last good key set is still
        used while refreshing it fails.
    @param metrics: counts each fetch in C{jwks_fetches_total{result}}
        (a L{caracal.gateway.metrics.Metrics}), or C{None}.
    """

    def __init__(
        self,
        fetch: Callable[[str], Deferred],
        clock,
        ttl: float = 300.0,
        refetch_interval: float = 30.0,
        initial_backoff: float = 1.0,
        stale_grace: float = 3600.0,
        metrics=None,
    ) -> None:
        self._fetch = fetch
        self._metrics = metrics
        self.clock = clock
        self.ttl = ttl
        self.refetch_interval = refetch_interval
        self.initial_backoff = initial_backoff
        self.stale_grace = stale_grace
        self._zones: dict[str, _ZoneKeys] = {}

    def key_for(self, zone_id: str, kid: str) -> Deferred:
        """
        The public key with id C{kid} in zone C{zone_id}'s key set.

        @return: a L{Deferred} firing with an L{EllipticCurvePublicKey}, or
            failing with L{UnknownKeyID} or L{JWKSUnavailable}.
        """
        zone = self._zones.setdefault(zone_id, _ZoneKeys())
        now = self.clock.seconds()
        usable = self._usable(zone, now)
        if usable is not None and kid in zone.keys:
            key = zone.keys[kid]
            if usable is _STALE:
                # May refresh synchronously and replace zone.keys: the key
                # was taken first, as this request was served stale.
                self._serving_stale(zone_id, zone, now)
            return succeed(key)
        waiter: Deferred = Deferred(lambda d: self._abandon(zone, d))
        if zone.waiting is not None:
            zone.waiting.append((kid, waiter))
            return waiter
        if not self._may_fetch(zone, now, usable):
            if usable is not None:
                return fail(UnknownKeyID())
            return fail(JWKSUnavailable(f"no keys for zone {zone_id}"))
        zone.waiting = [(kid, waiter)]
        self._start_fetch(zone_id, zone, now)
        return waiter

    def cached_key(self, zone_id: str, kid: str) -> EllipticCurvePublicKey | None:
        """
        The key L{key_for} would hand out at once, without a L{Deferred}: the
        zone's key C{kid} while its key set is within the TTL; else C{None}
        (the caller asks L{key_for}, which fetches, serves stale or refuses).
        """
        zone = self._zones.get(zone_id)
        if zone is None or zone.fetched_at is None:
            return None
        if self.clock.seconds() - zone.fetched_at >= self.ttl:
            return None
        return zone.keys.get(kid)

    def _usable(self, zone: _ZoneKeys, now: float) -> str | None:
        """
        C{_FRESH} within the TTL; C{_STALE} past it while refreshes fail and
        the grace period lasts; otherwise None (the keys must be fetched).
        """
        if zone.fetched_at is None:
            return None
        age = now - zone.fetched_at
        if age < self.ttl:
            return _FRESH
        if zone.failures and age < self.ttl + self.stale_grace:
            return _STALE
        return None

    def _may_fetch(self, zone: _ZoneKeys, now: float, usable: str | None) -> bool:
        """
        Whether a lookup the cache cannot answer may start a fetch now: never
        inside a failure back-off, and with usable keys in hand (an unknown
        C{kid}) at most once per C{refetch_interval}.
        """
        if zone.retry_at is not None and now < zone.retry_at:
            return False
        if usable is not None:
            return zone.attempted_at is None or now - zone.attempted_at >= self.refetch_interval
        return True

    def _serving_stale(self, zone_id: str, zone: _ZoneKeys, now: float) -> None:
        """
        A stale key is being used: say so once per outage, and retry the
        refresh in the background once the back-off allows (the request
        itself does not wait for the STS).
        """
        self._log_stale(zone_id, zone)
        if zone.waiting is None and (zone.retry_at is None or now >= zone.retry_at):
            zone.waiting = []
            self._start_fetch(zone_id, zone, now)

    def _log_stale(self, zone_id: str, zone: _ZoneKeys) -> None:
        if not zone.stale_logged:
            zone.stale_logged = True
            log.warn(
                "JWKS for zone {zone_id} cannot be refreshed; serving the last good "
                "keys (fetched {age:.0f}s ago) for up to {grace:.0f}s past their TTL",
                zone_id=zone_id,
                age=self.clock.seconds() - (zone.fetched_at or 0.0),
                grace=self.stale_grace,
            )

    def _abandon(self, zone: _ZoneKeys, waiter: Deferred) -> None:
        """
        C{waiter} was cancelled (its client left): forget it, and drop the
        fetch when nobody else waits for it (a background refresh of stale
        keys has no waiters and is never dropped this way).
        """
        if zone.waiting is None:
            return
        zone.waiting = [(kid, d) for kid, d in zone.waiting if d is not waiter]
        if not zone.waiting and zone.fetching is not None:
            zone.fetching.cancel()

    def _start_fetch(self, zone_id: str, zone: _ZoneKeys, now: float) -> None:
        zone.attempted_at = now
        zone.fetching = maybeDeferred(self._fetch, zone_id)
        zone.fetching.addCallback(usable_keys).addBoth(self._fetched, zone_id, zone)

    def _fetched(self, result: dict | Failure, zone_id: str, zone: _ZoneKeys) -> None:
        waiting, zone.waiting = zone.waiting or [], None
        zone.fetching = None
        now = self.clock.seconds()
        if isinstance(result, Failure) and result.check(CancelledError):
            # Dropped because every waiter left: not a failure of the STS.
            return
        if self._metrics is not None:
            result_label = "error" if isinstance(result, Failure) else "ok"
            self._metrics.increment("jwks_fetches", result=result_label)
        if isinstance(result, Failure):
            zone.failures += 1
            zone.backoff = min(max(zone.backoff * 2, self.initial_backoff), self.refetch_interval)
            zone.retry_at = now + zone.backoff
            log.warn(
                "JWKS fetch for zone {zone_id} failed ({failures} in a row, next "
                "attempt in {backoff:.0f}s at the earliest): {error}",
                zone_id=zone_id,
                failures=zone.failures,
                backoff=zone.backoff,
                error=result.getErrorMessage(),
            )
        else:
            zone.keys = result
            zone.fetched_at = now
            zone.failures = 0
            zone.backoff = 0.0
            zone.retry_at = None
            zone.stale_logged = False
        usable = self._usable(zone, now)
        for kid, waiter in waiting:
            if usable is not None and kid in zone.keys:
                if usable is _STALE:
                    self._log_stale(zone_id, zone)
                waiter.callback(zone.keys[kid])
            elif usable is not None:
                waiter.errback(UnknownKeyID())
            else:
                waiter.errback(JWKSUnavailable(f"no keys for zone {zone_id}"))
