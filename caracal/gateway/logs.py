# -*- test-case-name: tests.test_logs -*-
"""
The gateway's logs: one JSON access-log line per request (SPEC section 11)
and a twisted.logger observer writing every event as one JSON object per
line, filtered by C{LOG_LEVEL}.

An access record carries the request id, method, path (never the query
string: a query may carry secrets), status, sizes, timings, the client
address and the pipeline's L{LOG_FIELDS}. Headers and tokens are never part
of it; the pipeline records a token's fingerprint instead.
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime
from json.encoder import c_make_encoder, encode_basestring_ascii

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
)
from zope.interface import provider

ACCESS_NAMESPACE = "caracal.access"

# The keys the proxy pipeline fills on C{request.log_fields}; always present
# in the record (C{None} until filled) so every line has the same shape.
LOG_FIELDS = (
    "resource",
    "zone",
    "application",
    "upstream_host",
    "sts_ms",
    "upstream_ms",
    "denial",
    "token_fingerprint",
)

# The event key carrying the access record on C{caracal.access} events.
ACCESS_EVENT_KEY = "access"

# Status recorded when the connection went away before a response started
# (nginx's convention for "client closed request").
STATUS_NO_RESPONSE = 499

_LEVELS = (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error, LogLevel.critical)
_LEVEL_SET = frozenset(_LEVELS)


# The last whole second formatted by utc_timestamp, and its text: lines and
# events come many to a second.
_second: int | None = None
_second_text = ""


def utc_timestamp(seconds: float) -> str:
    """
    ISO 8601 (RFC 3339) UTC with milliseconds, e.g.
    C{2024-05-01T12:00:00.123Z}: exactly
    C{datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")}
    with C{Z} for C{+00:00}, the date and time of day formatted once a second.
    """
    global _second, _second_text
    # As datetime.fromtimestamp: the fraction rounded half-even to the
    # microsecond (carrying into the second), then cut to milliseconds.
    fraction, whole = math.modf(seconds)
    micro = round(fraction * 1e6)
    if micro >= 1_000_000:
        whole += 1.0
        micro -= 1_000_000
    elif micro < 0:
        whole -= 1.0
        micro += 1_000_000
    second = int(whole)
    if second != _second:
        _second_text = datetime.fromtimestamp(second, UTC).isoformat()[:19]
        _second = second
    return f"{_second_text}.{micro // 1000:03d}Z"


_timestamp = utc_timestamp


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("ascii", "backslashreplace")
    return value


def _request_path(request) -> str | None:
    # request.path never has the query; before the request line is fully
    # processed only uri is set, so strip the query from it ourselves.
    path = getattr(request, "path", None)
    if path is None:
        uri = getattr(request, "uri", None)
        if isinstance(uri, bytes):
            path = uri.split(b"?", 1)[0]
    return _text(path)


def _client_ip(request) -> str | None:
    try:
        address = request.getClientAddress()
    except Exception:
        return None
    return getattr(address, "host", None)


def access_record(request) -> dict:
    """
    The access-log record of C{request} (a L{caracal.gateway.http.GatewayRequest}).

    Keys: C{ts}, C{request_id}, C{method}, C{path} (no query string),
    C{status}, C{bytes_sent}, C{duration_ms}, C{client_ip}, then the
    pipeline's L{LOG_FIELDS} (and any other key it put in C{log_fields}; the
    core keys above cannot be overridden). A request whose connection was lost
    before it finished also has C{"aborted": true}; its status is the one sent
    or L{STATUS_NO_RESPONSE} when no response had started.
    """
    finished_at = getattr(request, "finished_at", None)
    if finished_at is None:
        finished_at = time.time()
    started_at = getattr(request, "started_at", None)
    duration_ms = None
    if started_at is not None:
        duration_ms = round(max(0.0, finished_at - started_at) * 1000.0, 3)
    complete = bool(
        getattr(request, "response_complete", False) or getattr(request, "finished", False)
    )
    status = request.code
    if not complete and not getattr(request, "startedWriting", False):
        status = STATUS_NO_RESPONSE
    method = request.method
    record = {
        "ts": _timestamp(finished_at),
        "request_id": getattr(request, "request_id", None),
        "method": method.decode("ascii", "backslashreplace") if type(method) is bytes else method,
        "path": _request_path(request),
        "status": status,
        "bytes_sent": request.sentLength,
        "duration_ms": duration_ms,
        "client_ip": _client_ip(request),
    }
    fields = getattr(request, "log_fields", None) or {}
    if tuple(fields)[:_LOG_FIELD_COUNT] == LOG_FIELDS and _CORE_KEYS.isdisjoint(fields):
        # The usual shape (GatewayRequest starts log_fields with LOG_FIELDS,
        # in order): the loops below would add exactly these, in this order.
        record.update(fields)
    else:
        for name in LOG_FIELDS:
            record[name] = fields.get(name)
        for name, value in fields.items():
            record.setdefault(name, value)
    if not complete:
        record["aborted"] = True
    return record


# The keys access_record writes before the pipeline's fields.
_CORE_KEYS = frozenset(
    ("ts", "request_id", "method", "path", "status", "bytes_sent", "duration_ms", "client_ip")
)
_LOG_FIELD_COUNT = len(LOG_FIELDS)

# One encoder for every line: json.dumps with options builds a new one per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)

# What _ENCODER.encode runs for a dict, made once: JSONEncoder builds this C
# encoder again on every call (c_make_encoder is None only without the _json
# accelerator module). No circular check: a record is flat, and its values
# are the pipeline's strings and numbers.
_ENCODE = (
    c_make_encoder(None, str, encode_basestring_ascii, None, ":", ",", False, False, True)
    if c_make_encoder is not None
    else None
)


def format_access_line(record: dict) -> str:
    """C{record} as one compact JSON line (no trailing newline)."""
    if _ENCODE is None or type(record) is not dict:
        return _ENCODER.encode(record)
    return "".join(_ENCODE(record, 0))


def level_named(name: str | LogLevel) -> LogLevel:
    """
    The L{LogLevel} for a C{LOG_LEVEL} value (C{debug}, C{info}, C{warn},
    C{error}); a L{LogLevel} is returned as is.

    @raise ValueError: unknown level name.
    """
    if isinstance(name, str):
        try:
            return LogLevel.levelWithName(name.strip().lower())
        except Exception:
            raise ValueError(f"unknown log level: {name!r}") from None
    return name


#: Namespaces whose routine chatter stays below C{warn} whatever C{LOG_LEVEL}
#: says: the outbound pools log "Starting factory" / "Stopping factory" for
#: every connection they open or close (twisted.web.client's factories),
#: which would bury the access log of a busy gateway.
QUIET_NAMESPACES = ("twisted.web.client",)


class _RememberedLevels(LogLevelFilterPredicate):
    """
    Twisted's per-namespace level filter, remembering each namespace's level:
    Twisted works it out again for every event, splitting the namespace and
    joining its prefixes (the access log's one line per request included).
    """

    _REMEMBERED = 1024  # namespaces are few (modules, classes); bounded all the same

    def __init__(self, *args, **kwargs) -> None:
        self._levels: dict[str, LogLevel] = {}
        # (namespace, level) -> whether Twisted's __call__ lets such an event pass.
        self._passing: dict[tuple, bool] = {}
        super().__init__(*args, **kwargs)

    def passes(self, event: dict) -> bool:
        """
        Whether Twisted's C{FilteringLogObserver} with this predicate alone
        would pass C{event} on (this predicate answers C{no} or C{maybe},
        and C{maybe} from the only predicate passes): its answer for the
        event's namespace and level, remembered for the L{LogLevel}s. Twisted
        asks it through C{shouldLogEvent} and C{LogLevel}'s comparison
        methods, some ten Python calls per event, the access line's included.
        """
        level = event.get("log_level")
        namespace = event.get("log_namespace", "")
        if level in _LEVEL_SET and type(namespace) is str:
            key = (namespace, level)
            passing = self._passing.get(key)
            if passing is None:
                passing = self(event) is not PredicateResult.no
                if len(self._passing) < self._REMEMBERED:
                    self._passing[key] = passing
            return passing
        return self(event) is not PredicateResult.no

    def logLevelForNamespace(self, namespace):  # noqa: N802 - Twisted's name
        level = self._levels.get(namespace)
        if level is None:
            level = super().logLevelForNamespace(namespace)
            if len(self._levels) < self._REMEMBERED:
                self._levels[namespace] = level
        return level

    def setLogLevelForNamespace(self, namespace, level):  # noqa: N802 - Twisted's name
        self._levels.clear()
        self._passing.clear()
        super().setLogLevelForNamespace(namespace, level)

    def clearLogLevels(self):  # noqa: N802 - Twisted's name
        self._levels.clear()
        self._passing.clear()
        super().clearLogLevels()


class _LevelFilteringObserver(FilteringLogObserver):
    """
    Twisted's C{FilteringLogObserver} with one L{_RememberedLevels} predicate,
    asking it through L{_RememberedLevels.passes}: the same events pass.
    """

    def __init__(self, observer: ILogObserver, predicate: _RememberedLevels) -> None:
        super().__init__(observer, [predicate])
        self.predicate = predicate
        self._passes = predicate.passes

    def __call__(self, event: dict) -> None:
        if self._passes(event):
            if "log_trace" in event:
                event["log_trace"].append((self, self._observer))
            self._observer(event)
        else:
            self._negativeObserver(event)


def level_filter(level: str | LogLevel = "info") -> _RememberedLevels:
    """
    Twisted's per-namespace level filter for C{LOG_LEVEL}: events below
    C{level} are dropped, and those of L{QUIET_NAMESPACES} below C{warn}
    (unless C{level} is C{debug}).
    """
    minimum = level_named(level)
    predicate = _RememberedLevels(defaultLogLevel=minimum)
    if minimum is not LogLevel.debug:  # debug shows everything
        quiet = max(minimum, LogLevel.warn, key=_LEVELS.index)
        for namespace in QUIET_NAMESPACES:
            predicate.setLogLevelForNamespace(namespace, quiet)
    return predicate


def json_log_observer(
    out_file, level: str | LogLevel = "info", extra: dict | None = None
) -> ILogObserver:
    """
    A twisted.logger observer writing one JSON object per line to
    C{out_file} (anything with C{write(str)}; flushed after each line when it
    can be) for every event at C{level} or above (L{level_filter}: Twisted's
    C{FilteringLogObserver} with a C{LogLevelFilterPredicate}).

    C{caracal.access} events are written as their access record; any other
    event as C{{"ts", "level", "namespace", "msg"}} (plus C{"traceback"}
    when the event carries a failure). Events without a level count as info.

    @param extra: keys added to every line (a worker's C{{"worker": N}}).
    """
    return _LevelFilteringObserver(_json_lines(out_file, extra), level_filter(level))


def _json_lines(out_file, extra: dict | None) -> ILogObserver:
    # The extra keys as a JSON fragment spliced before each line's closing
    # brace: the access line is already encoded (GatewaySite.log) and is
    # not encoded a second time for them.
    suffix = _ENCODER.encode(extra)[1:] if extra else None

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        event_level = event.get("log_level", LogLevel.info)
        record = event.get(ACCESS_EVENT_KEY)
        if event.get("log_namespace") == ACCESS_NAMESPACE and isinstance(record, dict):
            line = event.get("access_line")
            if not isinstance(line, str):
                line = format_access_line(record)
        else:
            entry = {
                "ts": _timestamp(event.get("log_time") or time.time()),
                "level": getattr(event_level, "name", str(event_level)),
                "namespace": event.get("log_namespace", "-"),
                "msg": formatEvent(event),
            }
            failure = event.get("log_failure")
            if failure is not None:
                try:
                    entry["traceback"] = failure.getTraceback()
                except Exception:
                    entry["traceback"] = "(unformattable traceback)"
            line = _ENCODER.encode(entry)
        if suffix is not None:
            line = line[:-1] + "," + suffix
        out_file.write(line + "\n")
        flush = getattr(out_file, "flush", None)
        if flush is not None:
            flush()

    return observe
