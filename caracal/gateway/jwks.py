# -*- test-case-name: tests.test_jwks -*-
"""
The per-zone cache of the STS's signing keys (SPEC section 5).

Each zone's JWKS is fetched from the STS, kept for five minutes, and shared by
every request of that zone. A token signed with a key the cache does not know
(a rotation) forces one refetch, but at most one per zone per thirty seconds,
so a stream of tokens with made-up C{kid}s cannot turn the gateway into a
load generator against the STS. Concurrent lookups of one zone share one
in-flight fetch.

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
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class JWKSUnavailable(Exception):
    """
    The zone's keys could not be fetched and no fresh copy is cached; the
    gateway answers 503 C{sts_unavailable}.
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


class JWKSCache:
    """
    Per-zone cache of the STS's ES256 verification keys.

    @param fetch: C{fetch(zone_id) -> Deferred[dict]}, the zone's JWKS JSON
        (L{caracal.gateway.sts.STSClient.fetch_jwks}).
    @param clock: an L{IReactorTime} (C{seconds()}).
    @param ttl: seconds a fetched key set is used without refetching.
    @param refetch_interval: minimum seconds between two fetches of one zone
        triggered by an unknown C{kid}.
    """

    def __init__(
        self,
        fetch: Callable[[str], Deferred],
        clock,
        ttl: float = 300.0,
        refetch_interval: float = 30.0,
    ) -> None:
        self._fetch = fetch
        self.clock = clock
        self.ttl = ttl
        self.refetch_interval = refetch_interval
        self._zones: dict[str, _ZoneKeys] = {}

    def key_for(self, zone_id: str, kid: str) -> Deferred:
        """
        The public key with id C{kid} in zone C{zone_id}'s key set.

        @return: a L{Deferred} firing with an L{EllipticCurvePublicKey}, or
            failing with L{UnknownKeyID} or L{JWKSUnavailable}.
        """
        zone = self._zones.setdefault(zone_id, _ZoneKeys())
        now = self.clock.seconds()
        fresh = zone.fetched_at is not None and now - zone.fetched_at < self.ttl
        if fresh and kid in zone.keys:
            return succeed(zone.keys[kid])
        if fresh and not self._may_refetch(zone, now) and zone.waiting is None:
            return fail(UnknownKeyID())
        waiter: Deferred = Deferred()
        if zone.waiting is None:
            zone.waiting = [(kid, waiter)]
            self._start_fetch(zone_id, zone, now)
        else:
            zone.waiting.append((kid, waiter))
        return waiter

    def _may_refetch(self, zone: _ZoneKeys, now: float) -> bool:
        """Whether an unknown C{kid} may trigger a fetch of this zone now."""
        return zone.attempted_at is None or now - zone.attempted_at >= self.refetch_interval

    def _start_fetch(self, zone_id: str, zone: _ZoneKeys, now: float) -> None:
        zone.attempted_at = now
        maybeDeferred(self._fetch, zone_id).addCallback(usable_keys).addBoth(
            self._fetched, zone_id, zone
        )

    def _fetched(self, result: dict | Failure, zone_id: str, zone: _ZoneKeys) -> None:
        waiting, zone.waiting = zone.waiting or [], None
        now = self.clock.seconds()
        if isinstance(result, Failure):
            log.warn(
                "JWKS fetch for zone {zone_id} failed: {error}",
                zone_id=zone_id,
                error=result.getErrorMessage(),
            )
        else:
            zone.keys = result
            zone.fetched_at = now
        fresh = zone.fetched_at is not None and now - zone.fetched_at < self.ttl
        for kid, waiter in waiting:
            # A cancelled waiter has already fired; Twisted ignores the late result.
            if fresh and kid in zone.keys:
                waiter.callback(zone.keys[kid])
            elif fresh:
                waiter.errback(UnknownKeyID())
            else:
                waiter.errback(JWKSUnavailable(f"no keys for zone {zone_id}"))
