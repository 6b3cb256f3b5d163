# -*- test-case-name: tests.test_audit,tests.integration.test_redis_stores -*-
"""
Audit events (SPEC section 9): C{XADD caracal.audit.events * id <uuid> data
<json>}, plus C{_sig} when a streams key is configured.

C{data} holds C{event_type}, C{request_id}, C{decision}, C{occurred_at}
(RFC 3339, UTC) and the caller's metadata, flattened beside them. Callers
never pass a token: they pass its fingerprint (C{token_fingerprint}). As a
last line of defence, metadata under a name that usually carries a credential
(L{CREDENTIAL_FIELDS}) is replaced by C{"[redacted]"}.

Emitting never fails the request: L{IAuditLog.emit} never errbacks, failures
are logged.

Delivery (L{RedisAuditLog}). Every C{XADD} caps the stream with C{MAXLEN ~
AUDIT_STREAM_MAXLEN} (SPEC 12 H9): a stream nobody trims must not grow until
Redis runs out of memory; consumers that keep history copy it out (see the
README). An entry Redis does not take (an error, a lost connection, no reply
within the timeout) goes to the L{caracal.gateway.spool.AuditSpool}, and so
does every entry still waiting for its reply and every later one until the
spool has been replayed: the stream receives them in the order they were
emitted.

Replays (SPEC 12 H9). L{ReplayEventThrottle} lets one C{replay_detected}
event per token fingerprint per second through; the refusals left out are
counted (C{audit_events_suppressed}) and carried by the next event of that
fingerprint in its C{suppressed} field.
"""

from __future__ import annotations

import json
import math
from json.encoder import encode_basestring_ascii

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from caracal.gateway import ids
from caracal.gateway.cache import BoundedCache
from caracal.gateway.interfaces import IAuditLog
from caracal.gateway.logs import utc_timestamp
from caracal.gateway.redisconn import send_packed
from caracal.gateway.revocations import sign_fields
from caracal.gateway.timeouts import TimeBound

AUDIT_STREAM = "caracal.audit.events"

#: SPEC 12 H9's default cap on the stream (C{AUDIT_STREAM_MAXLEN}).
DEFAULT_STREAM_MAXLEN = 1_000_000

#: Fingerprints whose replay state L{ReplayEventThrottle} keeps at most.
THROTTLE_ENTRIES = 10_000

CREDENTIAL_FIELDS = frozenset(
    {
        "token",
        "access_token",
        "subject_token",
        "provider_token",
        "id_token",
        "refresh_token",
        "bearer",
        "authorization",
        "mandate",
        "password",
        "secret",
    }
)

_CORE_FIELDS = ("event_type", "request_id", "decision", "occurred_at")

# Metadata names already found to be neither core fields nor credentials: the
# same few names come with every event. Bounded, though callers use fixed names.
_PLAIN_NAMES: set[str] = set()
_PLAIN_NAMES_KEPT = 1024

_log = Logger()

# The data document's encoding; json.dumps with options builds an encoder per call.
_DATA_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def rfc3339(seconds: float) -> str:
    """C{seconds} since the epoch as RFC 3339 UTC with milliseconds."""
    return utc_timestamp(seconds)


def audit_event(
    event_type: str, request_id: str, decision: str, occurred_at: float, metadata: dict
) -> dict:
    """
    The C{data} document of one audit event: the core fields, then the
    metadata (which can neither override a core field nor carry a credential).
    """
    event: dict[str, object] = {}
    plain = _PLAIN_NAMES
    for name, value in metadata.items():
        if name in plain:
            event[name] = value
        elif name in _CORE_FIELDS:
            continue
        elif name.lower() in CREDENTIAL_FIELDS:
            event[name] = "[redacted]"
        else:
            event[name] = value
            if len(plain) < _PLAIN_NAMES_KEPT:
                plain.add(name)
    event.update(
        event_type=event_type,
        request_id=request_id,
        decision=decision,
        occurred_at=rfc3339(occurred_at),
    )
    return event


#: Plans of L{_encode_data} by the names of an event's metadata, in their order.
_PLANS: dict[tuple, tuple] = {}
_PLANS_KEPT = 256

_REDACTED_TEXT = encode_basestring_ascii("[redacted]")


def _plan(names: tuple) -> tuple:
    """
    How L{_encode_data} writes the document of an event whose metadata has
    C{names}: one C{(text before the value, name of the value)} per key, in
    C{sort_keys}' order, the name C{None} when the text is the whole member
    (a credential's C{"[redacted]"}). The same keys as L{audit_event}'s: the
    core fields, and the metadata's but for a core field's name.
    """
    members = {name: name for name in _CORE_FIELDS}
    for name in names:
        if name in members:
            continue
        members[name] = None if name.lower() in CREDENTIAL_FIELDS else name
    plan = []
    for key in sorted(members):
        text = ("," if plan else "") + encode_basestring_ascii(key) + ":"
        name = members[key]
        plan.append((text if name is not None else text + _REDACTED_TEXT, name))
    return tuple(plan)


def _encode_data(values: dict) -> str:
    """
    C{_DATA_ENCODER.encode(audit_event(...))} without the event dict: the
    same text, written member by member in the order of a plan kept for
    each set of metadata names (the same few come with every event), with
    the JSON encoder left for values other than strings, C{None}, integers
    and finite floats.

    @param values: the metadata with the core fields written over it (by
        the caller, who owns it), the C{occurred_at} text included.
    """
    names = tuple(values)
    plan = _PLANS.get(names)
    if plan is None:
        plan = _plan(names)
        if len(_PLANS) < _PLANS_KEPT:
            _PLANS[names] = plan
    parts = ["{"]
    append = parts.append
    for text, name in plan:
        append(text)
        if name is None:
            continue
        value = values[name]
        kind = type(value)
        if kind is str:
            append(encode_basestring_ascii(value))
        elif value is None:
            append("null")
        elif kind is int:
            append(int.__repr__(value))
        elif kind is float and math.isfinite(value):
            append(float.__repr__(value))
        else:
            append(_DATA_ENCODER.encode(value))
    append("}")
    return "".join(parts)


class ReplayEventThrottle:
    """
    SPEC 12 H9: at most one C{replay_detected} event per token fingerprint
    per C{period} seconds in this process.

    Memory is bounded: at most C{entries} fingerprints are remembered, the
    least recently replayed one forgotten first (its pending C{suppressed}
    count then only lives on in the metric).

    @param metrics: counts C{audit_events_suppressed}; may be C{None}.
    """

    def __init__(self, clock, metrics=None, period: float = 1.0, entries: int = THROTTLE_ENTRIES):
        self._clock = clock
        self._metrics = metrics
        self._period = period
        # fingerprint -> [time of the last event, refusals left out since]
        self._seen: BoundedCache[str, list] = BoundedCache(entries)

    def admit(self, fingerprint: str) -> int | None:
        """
        Whether a replay of C{fingerprint} may be audited now.

        @return: C{None} when it must be left out (it is counted), else the
            number of replays left out since the last event (its
            C{suppressed} field).
        """
        now = self._clock.seconds()
        state = self._seen.get(fingerprint)
        if state is not None and now - state[0] < self._period:
            state[1] += 1
            if self._metrics is not None:
                self._metrics.increment("audit_events_suppressed")
            return None
        suppressed = state[1] if state is not None else 0
        self._seen.put(fingerprint, [now, 0])
        return suppressed

    def __len__(self) -> int:
        return len(self._seen)


@implementer(IAuditLog)
class RedisAuditLog:
    """
    Audit log on the Redis stream C{caracal.audit.events}, with a spool for
    what Redis cannot take (see the module docstring).

    @param redis: a handler from L{caracal.gateway.redisconn.connect_redis}.
    @param hmac_key: C{STREAMS_HMAC_KEY}; when set each entry carries C{_sig}
        over its C{id} and C{data} fields (same rule as the revocation stream).
    @param clock: the reactor; gives C{occurred_at} and bounds each C{XADD}
        by C{timeout} seconds so a stalled Redis cannot pile up pending emits.
    @param maxlen: C{AUDIT_STREAM_MAXLEN}.
    @param spool: an L{caracal.gateway.spool.AuditSpool}, or C{None} (an
        entry Redis does not take is then logged and lost).
    """

    def __init__(
        self,
        redis,
        hmac_key: bytes | None = None,
        clock=None,
        stream: str = AUDIT_STREAM,
        timeout: float = 2.0,
        maxlen: int = DEFAULT_STREAM_MAXLEN,
        spool=None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self._redis = redis
        self._hmac_key = hmac_key
        self._clock = clock
        self._stream = stream
        self._timeout = timeout
        self._maxlen = str(maxlen)
        self._bound = TimeBound(clock, timeout)
        # A pool of caracal.gateway.redisconn sends the XADD already packed.
        self._send_packed = getattr(redis, "send_packed", None)
        self.spool = spool
        # id -> (fields, Deferred) of the XADDs sent and not yet answered,
        # in the order they were sent.
        self._inflight: dict[str, tuple[dict, defer.Deferred]] = {}

    def fields(self, event_type: str, request_id: str, decision: str, **metadata) -> dict:
        """The stream entry's fields (C{id}, C{data}, C{_sig}) for one event."""
        return self._fields(event_type, request_id, decision, metadata)

    def _fields(self, event_type: str, request_id: str, decision: str, metadata: dict) -> dict:
        # metadata is this call's own (**metadata): the core fields are
        # written over it, as audit_event lets them win.
        metadata["event_type"] = event_type
        metadata["request_id"] = request_id
        metadata["decision"] = decision
        metadata["occurred_at"] = rfc3339(self._clock.seconds())
        fields = {"id": ids.uuid4(), "data": _encode_data(metadata)}
        if self._hmac_key:
            fields["_sig"] = sign_fields(self._hmac_key, self._stream, fields)
        return fields

    def send(self, fields: dict) -> defer.Deferred:
        """C{XADD} one entry (capped); fails when Redis did not take it in time."""
        arguments = ["XADD", self._stream, "MAXLEN", "~", self._maxlen, "*"]
        packable = True
        for name, value in fields.items():
            arguments += [name, value]
            if type(name) is not str or type(value) is not str:
                packable = False
        arguments = tuple(arguments)
        d = send_packed(self._send_packed, arguments) if packable else None
        if d is None:
            d = defer.maybeDeferred(self._redis.execute_command, *arguments)
        return self._bound.bound(d)

    def start(self) -> None:
        """Start replaying the spool (this process's and any left by a crash)."""
        if self.spool is not None:
            self.spool.start(self.send)

    def stop(self) -> defer.Deferred:
        """Stop replaying; entries still held stay in the spool file."""
        if self.spool is None:
            return defer.succeed(None)
        return self.spool.stop()

    def emit(self, event_type: str, request_id: str, decision: str, **metadata) -> defer.Deferred:
        """See L{IAuditLog.emit}."""
        try:
            fields = self._fields(event_type, request_id, decision, metadata)
        except Exception:
            _log.failure("audit event {event_type} could not be built", event_type=event_type)
            return defer.succeed(None)
        if self.spool is not None and self.spool.holding:
            # Earlier entries wait in the spool: this one queues behind them.
            self.spool.append(fields)
            return defer.succeed(None)
        entry_id = fields["id"]
        d = self.send(fields)
        self._inflight[entry_id] = (fields, d)

        def stored(_):
            self._inflight.pop(entry_id, None)

        def failed(failure):
            if entry_id not in self._inflight:
                return  # already spooled, with the ones sent before it
            _log.warn(
                "audit event {event_type} for request {request_id} not stored: {reason}",
                event_type=event_type,
                request_id=request_id,
                reason=failure.getErrorMessage() or failure.type.__name__,
            )
            self._divert()

        return d.addCallbacks(stored, failed)

    def _divert(self) -> None:
        """Redis failed: every entry still in flight goes to the spool, in order."""
        inflight, self._inflight = self._inflight, {}
        for fields, d in inflight.values():
            if self.spool is not None:
                self.spool.append(fields)
            d.cancel()
