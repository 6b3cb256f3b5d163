# -*- test-case-name: tests.test_revocations,tests.integration.test_revocation_follower -*-
"""
Revoked sessions (SPEC sections 6 step 10, 8 and 9).

Revocations are published on the Redis stream C{caracal.sessions.revoke}
(fields C{zone_id}, C{session_id}, C{_sig}). Every gateway process follows the
whole stream with its own cursor (no consumer group: a group would split the
messages between instances), loading the last 24 hours when it starts, and
keeps the revoked sessions in a L{RevocationStore} for 24 hours after their
revocation.

C{_sig} is the hex HMAC-SHA256, under C{STREAMS_HMAC_KEY}, of C{"<stream>\\n"}
followed by C{"<field>=<value>\\n"} for every other field, in byte order of the
field names (L{sign_fields}).

A refused entry (unsigned, badly signed or malformed, with a key configured)
is copied to C{caracal.sessions.revoke.dead} under its own entry id, so the
copy happens once however many instances refuse it and however often one
re-reads its window.

Fail closed (SPEC section 12). A store fed by a follower vouches that a
session it does not hold is not revoked only while it is current: its 24 h
window has been loaded and the follower has heard from Redis in the last
L{CONTACT_TIMEOUT} seconds. Contact is measured honestly: the follower's
C{XREAD BLOCK} is bounded to one second, so a healthy connection answers
(with entries or with nothing) at least that often, and each answer records
the time. A blocked read on a dead or stalled link answers nothing and the
silence grows.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import hmac
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from caracal.gateway.backoff import reconnect_policy
from caracal.gateway.interfaces import IRevocations
from caracal.gateway.redisconn import blocking_connection, close_redis

REVOCATION_STREAM = "caracal.sessions.revoke"
DEAD_LETTER_SUFFIX = ".dead"
#: Revocations are enforced for this long after their publication.
RETENTION_SECONDS = 24 * 3600.0
#: Approximate bound on the dead-letter stream's length.
DEAD_LETTER_MAXLEN = 10_000
SIGNATURE_FIELD = "_sig"
#: Seconds without an answer from Redis after which the follower is out of
#: contact and the revocation state is no longer current (SPEC section 12).
CONTACT_TIMEOUT = 5.0
#: Redis's answer to an C{XADD} whose explicit id is not above the stream's
#: top: for a dead letter, the entry was already copied (see C{_reject}).
ALREADY_DEAD_LETTERED = "equal or smaller than the target stream top item"

_log = Logger()


def _utf8(value) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogateescape")


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def _signed_message(stream: str, fields: dict) -> bytes:
    names = sorted(_utf8(name) for name in fields if name != SIGNATURE_FIELD)
    by_bytes = {_utf8(name): value for name, value in fields.items()}
    parts = [_utf8(stream), b"\n"]
    for name in names:
        parts += [name, b"=", _utf8(by_bytes[name]), b"\n"]
    return b"".join(parts)


def sign_fields(key: bytes, stream: str, fields: dict[str, str]) -> str:
    """
    The C{_sig} of a stream entry: hex HMAC-SHA256 under C{key} of
    C{"<stream>\\n"} then C{"<field>=<value>\\n"} for every field but C{_sig},
    sorted by the UTF-8 bytes of the names.
    """
    return hmac.new(key, _signed_message(stream, fields), hashlib.sha256).hexdigest()


def verify_fields(key: bytes, stream: str, fields: dict[str, str]) -> bool:
    """Whether C{fields} carries a valid C{_sig} under C{key} (constant-time compare)."""
    signature = fields.get(SIGNATURE_FIELD)
    if not isinstance(signature, (str, bytes)):
        return False
    expected = sign_fields(key, stream, fields).encode("ascii")
    return hmac.compare_digest(expected, _utf8(signature).lower())


class RevocationStateUnavailable(Exception):
    """
    The revoked sessions held may be incomplete (window not loaded, or the
    follower out of contact with Redis): a session absent from the store
    cannot be said not revoked. C{str()} says why. SPEC: 503
    C{revocation_state_unavailable} for a session-bearing call.
    """


@implementer(IRevocations)
class RevocationStore:
    """
    The sessions revoked in the last 24 hours, per zone.

    Entries expire C{retention} seconds after their revocation time; expired
    entries are pruned (driven by C{clock}) whenever the store is used, so it
    never holds more than a day of revocations.

    A store that a L{RevocationFollower} feeds is current only while the
    follower keeps reporting contact (L{synced}) at most C{contact_timeout}
    seconds apart; L{unavailable} and L{check} say when it is not. A store
    nobody follows (fed by hand, in tests) is always current.
    """

    def __init__(
        self,
        clock,
        retention: float = RETENTION_SECONDS,
        contact_timeout: float = CONTACT_TIMEOUT,
    ) -> None:
        self._clock = clock
        self._retention = retention
        self._contact_timeout = contact_timeout
        self._revoked: dict[tuple[str, str], float] = {}
        self._expiries: list[tuple[float, tuple[str, str]]] = []
        self._watchers: dict[tuple[str, str], dict[object, Callable[[], object]]] = {}
        self._followed = False
        self._synced_at: float | None = None

    def expect_follower(self) -> None:
        """
        Declare that a follower feeds this store: until its first L{synced},
        and whenever it has been silent longer than the contact timeout, the
        store is not current.
        """
        self._followed = True

    def synced(self) -> None:
        """
        The follower has just heard from Redis, and every revocation Redis
        held until then is applied (its window is loaded, or a read answered).
        """
        self._synced_at = self._clock.seconds()

    def silence(self) -> float | None:
        """
        Seconds since the follower last heard from Redis; C{None} before the
        window is loaded (and always C{0.0} for a store nobody follows).
        """
        if not self._followed:
            return 0.0
        if self._synced_at is None:
            return None
        return max(0.0, self._clock.seconds() - self._synced_at)

    def unavailable(self) -> str | None:
        """
        Why this store cannot vouch that a session it does not hold is not
        revoked, or C{None} while it is current.
        """
        silence = self.silence()
        if silence is None:
            return "revocation window not loaded yet"
        if silence > self._contact_timeout:
            return f"no contact with the revocation stream for {silence:.1f}s"
        return None

    def check(self) -> defer.Deferred:
        """
        Readiness: fires C{None} while current, errbacks with
        L{RevocationStateUnavailable} otherwise.
        """
        reason = self.unavailable()
        if reason is not None:
            return defer.fail(RevocationStateUnavailable(reason))
        return defer.succeed(None)

    def _prune(self) -> None:
        now = self._clock.seconds()
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, key = heapq.heappop(self._expiries)
            revoked_at = self._revoked.get(key)
            if revoked_at is not None and revoked_at + self._retention <= now:
                del self._revoked[key]

    def revoke(self, zone_id: str, session_id: str, revoked_at: float | None = None) -> None:
        """
        Revoke C{session_id} in C{zone_id} as of C{revoked_at} (seconds since
        the epoch; now by default) and fire its watchers. Revoking twice is
        harmless; a revocation older than the retention is ignored.
        """
        now = self._clock.seconds()
        if revoked_at is None:
            revoked_at = now
        key = (zone_id, session_id)
        self._prune()
        if revoked_at + self._retention <= now:
            return
        if revoked_at > self._revoked.get(key, float("-inf")):
            self._revoked[key] = revoked_at
            heapq.heappush(self._expiries, (revoked_at + self._retention, key))
        for callback in self._watchers.pop(key, {}).values():
            try:
                callback()
            except Exception:
                _log.failure("revocation watcher failed")

    def is_revoked(self, zone_id: str, session_id: str) -> bool:
        """Whether C{session_id} in C{zone_id} is revoked."""
        self._prune()
        return (zone_id, session_id) in self._revoked

    def watch(
        self, zone_id: str, session_id: str, callback: Callable[[], object]
    ) -> Callable[[], None]:
        """
        Call C{callback()} once, synchronously, when C{session_id} gets
        revoked (used to cut a streaming response). If it is already revoked
        the callback runs at once. Returns a callable that cancels the watch;
        calling it after the callback ran, or twice, does nothing.
        """
        if self.is_revoked(zone_id, session_id):
            callback()
            return lambda: None
        key = (zone_id, session_id)
        token = object()
        self._watchers.setdefault(key, {})[token] = callback

        def cancel() -> None:
            watchers = self._watchers.get(key)
            if watchers is not None:
                watchers.pop(token, None)
                if not watchers:
                    del self._watchers[key]

        return cancel

    def active(self) -> int:
        """How many revocations are held (the C{revocations_active} gauge)."""
        self._prune()
        return len(self._revoked)

    def watching(self) -> int:
        """How many watches are registered (to check that none leak)."""
        return sum(len(watchers) for watchers in self._watchers.values())


def _entry_time(entry_id: str) -> float | None:
    """Seconds since the epoch of a stream entry id C{<ms>-<seq>}."""
    milliseconds, _, sequence = entry_id.partition("-")
    if not (milliseconds.isdigit() and sequence.isdigit()):
        return None
    return int(milliseconds) / 1000.0


def _id_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id C{<ms>-<seq>} as a sortable pair (C{(-1, -1)} if malformed)."""
    milliseconds, _, sequence = entry_id.partition("-")
    if not (milliseconds.isdigit() and sequence.isdigit()):
        return (-1, -1)
    return int(milliseconds), int(sequence)


def _after(entry_id: str) -> str:
    """The smallest entry id greater than C{entry_id} (for exclusive ranges)."""
    milliseconds, _, sequence = entry_id.partition("-")
    return f"{milliseconds}-{int(sequence or 0) + 1}"


def parse_entries(reply) -> list[tuple[str, dict]]:
    """
    Turn an C{XRANGE} reply (C{[[id, [field, value, ...]], ...]}) into
    C{[(id, {field: value})]}. Fields of a malformed entry come back as
    C{None}, so the caller can dead-letter it.
    """
    entries = []
    for item in reply or ():
        if not isinstance(item, list) or len(item) != 2:
            continue
        entry_id, flat = item
        fields = None
        if isinstance(flat, list) and len(flat) % 2 == 0:
            names = [
                n.decode("utf-8", "surrogateescape") if isinstance(n, bytes) else n
                for n in flat[0::2]
            ]
            fields = dict(zip(names, flat[1::2], strict=True))
        entries.append((_text(entry_id), fields))
    return entries


def parse_xread(reply, stream: str) -> list[tuple[str, dict]]:
    """The entries of C{stream} in an C{XREAD} reply (C{None} after a timeout)."""
    entries = []
    for item in reply or ():
        if isinstance(item, list) and len(item) == 2 and item[0] in (stream, stream.encode()):
            entries += parse_entries(item[1])
    return entries


def publish_revocation(
    redis,
    zone_id: str,
    session_id: str,
    hmac_key: bytes | None = None,
    stream: str = REVOCATION_STREAM,
    clock=None,
) -> defer.Deferred:
    """
    Publish a revocation: C{XADD stream MINID ~ <24 h ago> * zone_id <zone>
    session_id <session> [_sig <sig>]}, signed when C{hmac_key} is given. The
    C{MINID} trim keeps the stream to about a day of entries.

    @return: a Deferred firing with the new entry's id.
    """
    if clock is None:
        from twisted.internet import reactor as clock
    fields = {"zone_id": zone_id, "session_id": session_id}
    if hmac_key:
        fields[SIGNATURE_FIELD] = sign_fields(hmac_key, stream, fields)
    oldest_kept = int((clock.seconds() - RETENTION_SECONDS) * 1000)
    arguments = ["XADD", stream, "MINID", "~", oldest_kept, "*"]
    for name, value in fields.items():
        arguments += [name, value]
    return defer.maybeDeferred(redis.execute_command, *arguments).addCallback(str)


class RevocationFollower(Service):
    """
    Follows the revocation stream into a L{RevocationStore}.

    On start it loads the last 24 hours with C{XRANGE} (pages of 1000), then
    loops on C{XREAD BLOCK block_ms COUNT 500 STREAMS <stream> <last id>} on a
    connection of its own, applying each entry as soon as it arrives. On any
    Redis error it retries with a capped backoff (L{reconnect_policy}: 0.1 s
    doubling to 0.5 s) and re-reads its window, so nothing is missed;
    applying an entry twice is harmless.

    Every answer from Redis (a loaded window, a read with entries or an empty
    block period) marks the store L{RevocationStore.synced}: C{block_ms}
    must stay well under L{CONTACT_TIMEOUT}, or a healthy but quiet stream
    would look like a lost contact.

    With C{hmac_key} set, an entry whose C{_sig} is missing or wrong, or that
    lacks C{zone_id} / C{session_id}, is ignored, counted (C{rejected}, and
    the C{revocations_rejected} metric), logged and copied to
    C{<stream>.dead} with C{reason} and C{source_id}. Without a key (dev),
    signatures are not checked.

    @ivar ready: C{True} once the initial 24 h load is done.
    @ivar rejected: entries refused since start.
    @ivar applied: entries applied since start.
    @ivar errors: failed Redis calls since start (each one retried).
    """

    name = "revocation-follower"

    page_size = 1000
    read_count = 500
    #: Seconds allowed beyond the block period before a read counts as stuck.
    read_margin = 5.0

    def __init__(
        self,
        redis_address,
        store: RevocationStore,
        hmac_key: bytes | None,
        reactor,
        metrics=None,
        stream: str = REVOCATION_STREAM,
        block_ms: int = 1000,
        connect=blocking_connection,
    ) -> None:
        self._address = redis_address
        self._store = store
        store.expect_follower()
        self._hmac_key = hmac_key
        self._reactor = reactor
        self._metrics = metrics
        self.stream = stream
        self.dead_letter_stream = stream + DEAD_LETTER_SUFFIX
        self._block_ms = int(block_ms)
        self._connect = connect
        #: C{policy(attempt) -> seconds} between two attempts after errors.
        self.retry_delay = reconnect_policy()
        self._connection = None
        self._waiting: defer.Deferred | None = None
        self._loop: defer.Deferred | None = None
        self._ready_waiters: list[defer.Deferred] = []
        self.last_id: str | None = None
        # The highest entry id rejected (and counted) so far, so that a
        # resync re-reading the window does not count its rejections twice.
        self._rejected_through: tuple[int, int] | None = None
        self.ready = False
        #: When Redis last answered; C{None} until it has.
        self.last_contact: float | None = None
        self._started_at: float | None = None
        # Set by a Redis error: re-read the 24 h window before reading on.
        self._resync = False
        self.rejected = 0
        self.applied = 0
        self.errors = 0

    def when_ready(self) -> defer.Deferred:
        """A Deferred firing C{None} once the initial 24 h load is done."""
        if self.ready:
            return defer.succeed(None)
        d = defer.Deferred()
        self._ready_waiters.append(d)
        return d

    def startService(self) -> None:
        """Connect and start following."""
        Service.startService(self)
        self._started_at = self._reactor.seconds()
        self._connection = self._connect(self._address, self._reactor)
        self._loop = self._follow()

    def stopService(self) -> defer.Deferred:
        """Stop at once: close the connection, interrupt any wait."""
        Service.stopService(self)
        connection, self._connection = self._connection, None
        closed = close_redis(connection) if connection is not None else defer.succeed(None)
        if self._waiting is not None:
            self._waiting.cancel()
        loop = self._loop if self._loop is not None else defer.succeed(None)
        return defer.gatherResults([closed, loop], consumeErrors=True).addCallback(lambda _: None)

    def _wait(self, d: defer.Deferred) -> defer.Deferred:
        # Remember what the loop waits on so stopService can interrupt it.
        self._waiting = d
        return d

    def _call(self, timeout: float, *arguments) -> defer.Deferred:
        d = defer.maybeDeferred(self._connection.execute_command, *arguments)
        d.addTimeout(timeout, self._reactor)
        d.addCallback(self._heard)
        return self._wait(d)

    def _heard(self, reply):
        self.last_contact = self._reactor.seconds()
        return reply

    def lag(self) -> float:
        """
        Seconds since Redis last answered the follower (since it started,
        when it never has): about the C{XREAD BLOCK} period at most while all
        is well, growing while the follower is out of contact.
        """
        since = self.last_contact if self.last_contact is not None else self._started_at
        if since is None:
            return 0.0
        return max(0.0, self._reactor.seconds() - since)

    @defer.inlineCallbacks
    def _follow(self):
        failures = 0
        while self.running:
            try:
                if not self.ready:
                    yield self._load()
                    self._store.synced()
                    self._caught_up()
                elif self._resync:
                    # Redis may be back empty (restarted without persistence),
                    # handing out ids lower than the last one we saw: reading
                    # on after that id would skip them. Re-read the whole
                    # window instead; applying an entry twice is harmless.
                    self.last_id = None
                    yield self._load()
                    self._resync = False
                    self._store.synced()
                yield self._read()
                failures = 0
            except Exception as error:
                if not self.running:
                    break
                self._resync = True
                self.errors += 1
                delay = self.retry_delay(failures)
                failures += 1
                _log.warn(
                    "revocation stream {stream}: {reason}; retrying in {delay:.1f}s",
                    stream=self.stream,
                    reason=str(error) or type(error).__name__,
                    delay=delay,
                )
                if isinstance(error, defer.TimeoutError):
                    # A read that never answers means a dead connection the
                    # client has not noticed: replace it.
                    self._reconnect()
                try:
                    yield self._wait(task.deferLater(self._reactor, delay, lambda: None))
                except defer.CancelledError:
                    break
        self._waiting = None

    def _reconnect(self) -> None:
        old, self._connection = self._connection, self._connect(self._address, self._reactor)
        if old is not None:
            close_redis(old).addErrback(lambda _: None)

    def _caught_up(self) -> None:
        self.ready = True
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(None)
        _log.info(
            "revocation stream {stream} loaded: {active} sessions revoked",
            stream=self.stream,
            active=self._store.active(),
        )

    def _horizon(self) -> int:
        return int((self._reactor.seconds() - RETENTION_SECONDS) * 1000)

    @defer.inlineCallbacks
    def _load(self):
        if self.last_id is None:
            self.last_id = f"{self._horizon()}-0"
        while True:
            reply = yield self._call(
                self.read_margin,
                "XRANGE",
                self.stream,
                _after(self.last_id),
                "+",
                "COUNT",
                self.page_size,
            )
            entries = parse_entries(reply)
            self._apply(entries)
            if len(entries) < self.page_size:
                return

    @defer.inlineCallbacks
    def _read(self):
        reply = yield self._call(
            self._block_ms / 1000.0 + self.read_margin,
            "XREAD",
            "BLOCK",
            self._block_ms,
            "COUNT",
            self.read_count,
            "STREAMS",
            self.stream,
            self.last_id,
        )
        self._apply(parse_xread(reply, self.stream))
        # An answer, even an empty one at the end of the block period, is
        # contact: everything up to now has been seen.
        self._store.synced()

    def _apply(self, entries: list[tuple[str, dict | None]]) -> None:
        horizon = self._horizon()
        for entry_id, fields in entries:
            self.last_id = entry_id
            revoked_at = _entry_time(entry_id)
            if revoked_at is not None and revoked_at * 1000 <= horizon:
                continue
            reason = self._refusal(fields)
            if reason is not None:
                self._reject(entry_id, fields, reason)
                continue
            self._store.revoke(fields["zone_id"], fields["session_id"], revoked_at=revoked_at)
            self.applied += 1

    def _refusal(self, fields: dict | None) -> str | None:
        if fields is None:
            return "malformed"
        if self._hmac_key:
            if SIGNATURE_FIELD not in fields:
                return "unsigned"
            if not verify_fields(self._hmac_key, self.stream, fields):
                return "bad_signature"
        for name in ("zone_id", "session_id"):
            value = fields.get(name)
            if not isinstance(value, str) or not value:
                return "malformed"
        return None

    def _reject(self, entry_id: str, fields: dict | None, reason: str) -> None:
        key = _id_key(entry_id)
        if self._rejected_through is not None and key <= self._rejected_through:
            # Read again after a resync: already counted and logged here.
            _log.debug(
                "revocation entry {entry_id} on {stream} ignored again: {reason}",
                entry_id=entry_id,
                stream=self.stream,
                reason=reason,
            )
        else:
            self._rejected_through = key
            self.rejected += 1
            if self._metrics is not None:
                # the Metrics of this version may not know this counter yet
                with contextlib.suppress(KeyError):
                    self._metrics.increment("revocations_rejected")
            _log.warn(
                "revocation entry {entry_id} on {stream} ignored: {reason}",
                entry_id=entry_id,
                stream=self.stream,
                reason=reason,
            )
        # The dead letter takes the source entry's id, which makes the copy
        # idempotent: every instance, and every resync, copies the same entry,
        # and Redis refuses an id not above the dead stream's top (it keeps
        # that top through trimming). Each instance reads the source in order
        # and sends these on one connection, so a refused id is one some
        # instance has already copied.
        arguments = [
            "XADD",
            self.dead_letter_stream,
            "MAXLEN",
            "~",
            DEAD_LETTER_MAXLEN,
            entry_id,
        ]
        for name, value in (fields or {}).items():
            if name not in ("reason", "source_id"):
                arguments += [name, value]
        arguments += ["reason", reason, "source_id", entry_id]
        # Not awaited: copying to the dead letters must not delay the next read.
        d = defer.maybeDeferred(self._connection.execute_command, *arguments)
        d.addErrback(self._dead_letter_failed, entry_id)

    def _dead_letter_failed(self, failure, entry_id: str) -> None:
        message = failure.getErrorMessage()
        if ALREADY_DEAD_LETTERED in message:
            _log.debug(
                "revocation entry {entry_id} already dead-lettered on {stream}",
                entry_id=entry_id,
                stream=self.dead_letter_stream,
            )
            return
        _log.warn(
            "revocation entry {entry_id} not dead-lettered: {reason}",
            entry_id=entry_id,
            reason=message,
        )
