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

Claims that survive a failover. Redis replicates asynchronously: a claim the
master accepted but had not yet sent to a replica is lost when that replica
is promoted, and the token could then be spent a second time on the new
master. With C{min_replicas} (C{REPLAY_MIN_REPLICAS}, 1 by default behind
Sentinel) the claim is followed by C{WAIT <min_replicas> <ms>} on the same
connection (WAIT counts the acknowledgements of its own connection's
writes), and a token is only let through once that many replicas hold its
claim. Fewer acknowledgements in time fail closed (503): the key is set
anyway, so the token stays spent wherever the claim survives.
"""

from __future__ import annotations

import re

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from caracal.gateway.interfaces import IReplayGuard
from caracal.gateway.redisconn import send_packed
from caracal.gateway.timeouts import TimeBound

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


#: C0 controls, DEL and C1 controls: never in a key part.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _check_part(name: str, value) -> None:
    if not isinstance(value, str) or not value:
        raise ReplayKeyInvalid(f"{name} must be a non-empty string")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_KEY_PART_BYTES:
        raise ReplayKeyInvalid(f"{name} longer than {MAX_KEY_PART_BYTES} bytes")
    if _CONTROL.search(value):
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
        requests. It bounds the whole claim, replica acknowledgement
        included.
    @param min_replicas: replicas that must acknowledge a claim before the
        token is let through (C{0}: the master's C{OK} is enough). With
        more than 0, C{redis} should be a pool of the guard's own: each
        claim holds one of its connections until the replicas answered
        (L{CLAIM_POOL_SIZE} connections).
    """

    #: Share of C{timeout} given to the replicas (C{WAIT}'s own bound), so
    #: that the server answers "not enough replicas" before the guard's
    #: own timeout cuts the claim short, and the connection comes back free.
    wait_share = 0.5

    def __init__(self, redis, clock, timeout: float = 0.5, min_replicas: int = 0) -> None:
        self._redis = redis
        self._clock = clock
        self._timeout = timeout
        self._min_replicas = min_replicas
        self._wait_ms = max(1, int(timeout * self.wait_share * 1000))
        self._bound = TimeBound(clock, timeout)
        # A pool of caracal.gateway.redisconn sends the SET already packed.
        self._send_packed = getattr(redis, "send_packed", None)

    def claim(self, zone_id: str, jti: str, request_id: str, ttl_ms: int) -> defer.Deferred:
        """See L{IReplayGuard.claim}."""
        try:
            key, ttl_ms = claim_arguments(zone_id, jti, ttl_ms)
        except ValueError:
            return defer.fail()
        if self._min_replicas:
            d = self._claim_replicated(key, request_id, ttl_ms)
        else:
            d = self._set(key, request_id, ttl_ms)
            d.addCallback(self._answered)
        self._bound.bound(d)
        return d.addErrback(self._unavailable)

    def _set(self, key: str, request_id: str, ttl_ms: int) -> defer.Deferred:
        """
        C{SET key request_id PX ttl_ms NX}, the arguments txredisapi's
        C{set} would send in its order; its reply or failure.
        """
        if type(request_id) is str:
            sent = send_packed(self._send_packed, ("SET", key, request_id, "PX", ttl_ms, "NX"))
            if sent is not None:
                return sent
        return defer.maybeDeferred(
            self._redis.set, key, request_id, pexpire=ttl_ms, only_if_not_exists=True
        )

    @defer.inlineCallbacks
    def _claim_replicated(self, key: str, request_id: str, ttl_ms: int):
        # txredisapi's pipeline() lends one connection of the pool for this
        # claim alone and takes it back once both replies are in: SET and
        # WAIT go out together on it, and no other command queues behind a
        # WAIT that is waiting for the replicas.
        connection = yield self._redis.pipeline()
        claimed = _reply_of(
            connection.set(key, request_id, pexpire=ttl_ms, only_if_not_exists=True)
        )
        acknowledged = _reply_of(
            connection.execute_command("WAIT", self._min_replicas, self._wait_ms)
        )
        # Each reply is read through its own copy; this only returns the
        # connection to the pool.
        connection.execute_pipeline().addErrback(lambda _: None)
        try:
            first_use = self._answered((yield claimed))
        except BaseException:
            acknowledged.addErrback(lambda _: None)
            raise
        if not first_use:
            # A replay is refused whatever the replicas say, without waiting
            # for them.
            acknowledged.addErrback(lambda _: None)
            return False
        replicas = yield acknowledged
        if isinstance(replicas, bool) or not isinstance(replicas, int):
            raise ReplayCheckUnavailable(f"unexpected reply to WAIT: {type(replicas).__name__}")
        if replicas < self._min_replicas:
            raise ReplayCheckUnavailable(
                f"claim acknowledged by {replicas} of {self._min_replicas} replicas in time"
            )
        return True

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


def _reply_of(command: defer.Deferred) -> defer.Deferred:
    """
    A Deferred of its own firing with C{command}'s reply, leaving C{command}
    unchanged for the pipeline's C{DeferredList} (which consumes its result).
    """
    reply = defer.Deferred()

    def copy(result):
        if isinstance(result, Failure):
            reply.errback(result)
        else:
            reply.callback(result)
        return result

    command.addBoth(copy)
    return reply


#: Connections in a replicated guard's own pool: each claim holds one for a
#: round trip to the master and one from the master to a replica (under half
#: a millisecond on loopback), so eight outpace what one worker's CPU can
#: claim, and the request path's pool stays free for audit and probes.
CLAIM_POOL_SIZE = 8
