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

The gateway never trims the stream (no C{MAXLEN}): an audit event is only
dropped by whoever consumes the stream, once it has been read.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from caracal.gateway.interfaces import IAuditLog
from caracal.gateway.revocations import sign_fields

AUDIT_STREAM = "caracal.audit.events"

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

_log = Logger()


def rfc3339(seconds: float) -> str:
    """C{seconds} since the epoch as RFC 3339 UTC with milliseconds."""
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def audit_event(
    event_type: str, request_id: str, decision: str, occurred_at: float, metadata: dict
) -> dict:
    """
    The C{data} document of one audit event: the core fields, then the
    metadata (which can neither override a core field nor carry a credential).
    """
    event: dict[str, object] = {}
    for name, value in metadata.items():
        if name in _CORE_FIELDS:
            continue
        event[name] = "[redacted]" if name.lower() in CREDENTIAL_FIELDS else value
    event.update(
        event_type=event_type,
        request_id=request_id,
        decision=decision,
        occurred_at=rfc3339(occurred_at),
    )
    return event


@implementer(IAuditLog)
class RedisAuditLog:
    """
    Audit log on the Redis stream C{caracal.audit.events}.

    @param redis: a handler from L{caracal.gateway.redisconn.connect_redis}.
    @param hmac_key: C{STREAMS_HMAC_KEY}; when set each entry carries C{_sig}
        over its C{id} and C{data} fields (same rule as the revocation stream).
    @param clock: the reactor; gives C{occurred_at} and bounds each C{XADD}
        by C{timeout} seconds so a stalled Redis cannot pile up pending emits.
    """

    def __init__(
        self,
        redis,
        hmac_key: bytes | None = None,
        clock=None,
        stream: str = AUDIT_STREAM,
        timeout: float = 2.0,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self._redis = redis
        self._hmac_key = hmac_key
        self._clock = clock
        self._stream = stream
        self._timeout = timeout

    def fields(self, event_type: str, request_id: str, decision: str, **metadata) -> dict:
        """The stream entry's fields (C{id}, C{data}, C{_sig}) for one event."""
        event = audit_event(event_type, request_id, decision, self._clock.seconds(), metadata)
        fields = {
            "id": str(uuid.uuid4()),
            "data": json.dumps(event, sort_keys=True, separators=(",", ":"), default=str),
        }
        if self._hmac_key:
            fields["_sig"] = sign_fields(self._hmac_key, self._stream, fields)
        return fields

    def emit(self, event_type: str, request_id: str, decision: str, **metadata) -> defer.Deferred:
        """See L{IAuditLog.emit}."""
        try:
            fields = self.fields(event_type, request_id, decision, **metadata)
        except Exception:
            _log.failure("audit event {event_type} could not be built", event_type=event_type)
            return defer.succeed(None)
        # No MAXLEN: trimming here would drop events no consumer has read
        # yet; the audit stream's retention belongs to its consumers.
        arguments = ["XADD", self._stream, "*"]
        for name, value in fields.items():
            arguments += [name, value]
        d = defer.maybeDeferred(self._redis.execute_command, *arguments)
        d.addTimeout(self._timeout, self._clock)

        def failed(failure):
            _log.warn(
                "audit event {event_type} for request {request_id} not stored: {reason}",
                event_type=event_type,
                request_id=request_id,
                reason=failure.getErrorMessage() or failure.type.__name__,
            )

        return d.addCallbacks(lambda _: None, failed)
