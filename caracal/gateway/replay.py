# -*- test-case-name: tests.test_replay,tests.integration.test_redis_stores -*-
"""
Refusal of replayed single-use tokens (SPEC section 6 step 9, section 9).

The first gateway to see a token's C{jti} claims it in Redis with
C{SET seen:jti:<zone_id>:<jti> <request_id> NX PX <ms left>}; every later
presentation of that token, on any gateway, finds the key and is a replay.

Key safety. C{zone_id} and C{jti} end up inside a Redis key, so they are
checked before use (L{replay_key}); a refused one raises L{ReplayKeyInvalid},
which the pipeline answers as C{invalid_token}:

 - both must be non-empty strings of at most 256 UTF-8 bytes without control
   characters (C0, DEL, C1), which keeps keys bounded and log-safe;
 - C{zone_id} must not contain C{:}. The zone is the only separator-delimited
   part of the key, so with a colon-free zone the key splits back into exactly
   one (zone, jti) pair even when the C{jti} contains colons: two different
   pairs can never share a key, and the key format stays the SPEC's verbatim.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from caracal.gateway.interfaces import IReplayGuard

KEY_PREFIX = "seen:jti:"
MAX_KEY_PART_BYTES = 256

_log = Logger()


class ReplayCheckUnavailable(Exception):
    """
    The replay check could not be made: Redis failed, is disconnected, or did
    not answer within the guard's time bound. SPEC: 503
    C{replay_check_unavailable} (or pass with a warning when fail-open).
    """


class ReplayKeyInvalid(ValueError):
    """A C{zone_id} or C{jti} unfit for a replay key (see the module docstring)."""


def _check_part(name: str, value) -> None:
    if not isinstance(value, str) or not value:
        raise ReplayKeyInvalid(f"{name} must be a non-empty string")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_KEY_PART_BYTES:
        raise ReplayKeyInvalid(f"{name} longer than {MAX_KEY_PART_BYTES} bytes")
    for character in value:
        code = ord(character)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            raise ReplayKeyInvalid(f"{name} contains a control character")


def replay_key(zone_id: str, jti: str) -> str:
    """
    The Redis key recording C{jti}'s first use in C{zone_id}.

    @raise ReplayKeyInvalid: either part is unfit for a key.
    """
    _check_part("zone_id", zone_id)
    _check_part("jti", jti)
    if ":" in zone_id:
        raise ReplayKeyInvalid("zone_id must not contain ':'")
    return f"{KEY_PREFIX}{zone_id}:{jti}"


def claim_arguments(zone_id: str, jti: str, ttl_ms) -> tuple[str, int]:
    """
    The key and TTL of a claim, checked the same way by every guard.

    @raise ValueError: an unfit zone, jti or TTL (L{ReplayKeyInvalid} for the key).
    """
    key = replay_key(zone_id, jti)
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms < 1:
        raise ValueError("ttl_ms must be a positive integer")
    return key, ttl_ms


#: The SPEC's name for the interface.
ReplayGuard = IReplayGuard


@implementer(IReplayGuard)
class RedisReplayGuard:
    """
    Replay guard shared by every gateway through Redis.

    @param redis: a handler from L{caracal.gateway.redisconn.connect_redis}.
    @param clock: the reactor (C{IReactorTime}) bounding each call.
    @param timeout: seconds a claim may take before it fails with
        L{ReplayCheckUnavailable}; keeps a stalled Redis from holding
        requests.
    """

    def __init__(self, redis, clock, timeout: float = 0.5) -> None:
        self._redis = redis
        self._clock = clock
        self._timeout = timeout

    def claim(self, zone_id: str, jti: str, request_id: str, ttl_ms: int) -> defer.Deferred:
        """See L{IReplayGuard.claim}."""
        try:
            key, ttl_ms = claim_arguments(zone_id, jti, ttl_ms)
        except ValueError:
            return defer.fail()
        d = defer.maybeDeferred(
            self._redis.set, key, request_id, pexpire=ttl_ms, only_if_not_exists=True
        )
        d.addTimeout(self._timeout, self._clock)
        return d.addCallbacks(self._answered, self._unavailable)

    @staticmethod
    def _answered(reply) -> bool:
        # SET ... NX answers +OK when it set the key and a nil bulk when the
        # key already existed.
        if reply == "OK":
            return True
        if reply is None:
            return False
        raise ReplayCheckUnavailable(f"unexpected reply to SET NX: {type(reply).__name__}")

    @staticmethod
    def _unavailable(failure):
        # The caller cancelled (its client left): not a Redis failure. The
        # command may already be sent; its reply is ignored.
        if failure.check(defer.CancelledError):
            return failure
        reason = failure.getErrorMessage() or failure.type.__name__
        if failure.check(defer.TimeoutError):
            reason = "no reply in time"
        _log.warn("replay check unavailable: {reason}", reason=reason)
        raise ReplayCheckUnavailable(reason)
