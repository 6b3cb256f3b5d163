# -*- test-case-name: tests.test_audittail,tests.integration.test_audit_tail -*-
"""
C{caracal-gateway-admin audit tail}: the audit stream (SPEC 9 and 14) as
one human-readable line per event, so an operator can answer "what happened
to request X" without writing Redis commands.

    caracal-gateway-admin audit tail [--follow] [--resource R]
        [--decision allow|deny] [--request-id X] [--count N] [--redis-url URL]

Redis is C{--redis-url}, C{REDIS_URL} or the file C{REDIS_URL_FILE} names;
the events are read with the gateway's own client
(L{caracal.gateway.redisconn}). With C{STREAMS_HMAC_KEY} (or its C{_FILE})
set, each line ends with C{sig=ok}, or C{sig=BAD} for an entry whose
signature does not verify (forged or damaged: do not trust it); without a
key, C{sig=unchecked}.

Without C{--follow} the last C{--count} matching events are printed, oldest
first (at most L{SCAN_LIMIT} entries are looked through); with it, the
command then waits for new ones until interrupted.
"""

from __future__ import annotations

import argparse
import json
from typing import TextIO

from twisted.internet import defer

from caracal.gateway.audit import AUDIT_STREAM
from caracal.gateway.config import ConfigError, parse_redis_url, read_secret
from caracal.gateway.revocations import verify_fields

HELP = "show the audit trail, one line per event (audit tail)"

#: Entries looked through, newest first, for the last C{--count} matches.
SCAN_LIMIT = 100_000
BATCH = 500
#: Milliseconds one blocking read waits for new entries with C{--follow}.
BLOCK_MS = 5000
#: Seconds C{audit tail} waits for Redis to answer one read of past entries.
READ_TIMEOUT = 10.0


def configure(parser: argparse.ArgumentParser) -> None:
    """The arguments of C{audit tail}."""
    parser.add_argument("action", choices=["tail"], help="tail: print the latest events")
    parser.add_argument("--follow", "-f", action="store_true", help="then wait for new events")
    parser.add_argument("--resource", help="only events about this resource")
    parser.add_argument("--decision", choices=["allow", "deny"], help="only these decisions")
    parser.add_argument("--request-id", help="only events of this request")
    parser.add_argument(
        "--count", "-n", type=int, default=20, help="how many past events (default 20)"
    )
    parser.add_argument(
        "--redis-url", help="redis://... (default: $REDIS_URL or the file $REDIS_URL_FILE)"
    )


def _printable(value) -> str:
    """C{value} as text with control characters escaped (a line stays one line)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return "".join(
        ch if ch.isprintable() and ch not in "\r\n" else ch.encode("unicode_escape").decode()
        for ch in text
    )


def _decode(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _verbatim_in_json(value: str) -> bool:
    """C{value} appears unchanged inside its JSON string, however it is encoded."""
    return value.isascii() and json.dumps(value)[1:-1] == value


def entry_fields(flat) -> dict[str, str]:
    """An C{XRANGE}/C{XREAD} entry's flat field list as a dict of strings."""
    values = [_decode(v) for v in flat]
    return dict(zip(values[0::2], values[1::2], strict=False))


def event_of(fields: dict[str, str]) -> dict | None:
    """The C{data} document of an entry, or C{None} when it has none."""
    try:
        event = json.loads(fields.get("data", ""))
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


class Filter:
    """Which events the operator asked for."""

    def __init__(self, resource=None, decision=None, request_id=None) -> None:
        self.resource = resource
        self.decision = decision
        self.request_id = request_id

    def could_match(self, data: str) -> bool:
        """
        C{False} when the raw C{data} document cannot hold the request id or
        resource asked for: a substring test that spares decoding the JSON
        of every entry scanned. A value JSON would escape is not
        prefiltered (its encoded form may differ); L{__call__} decides.
        """
        for wanted in (self.request_id, self.resource):
            if wanted is not None and _verbatim_in_json(wanted) and wanted not in data:
                return False
        return True

    def __call__(self, event: dict | None) -> bool:
        if event is None:
            return False
        if self.resource is not None and event.get("resource") != self.resource:
            return False
        if self.decision is not None and event.get("decision") != self.decision:
            return False
        return self.request_id is None or event.get("request_id") == self.request_id


def format_line(
    entry_id: str, fields: dict[str, str], key: bytes | None, stream: str = AUDIT_STREAM
) -> str:
    """One entry as one line: when, what, the decision and its details."""
    event = event_of(fields) or {}
    if key is None:
        signature = "unchecked"
    elif verify_fields(key, stream, fields):
        signature = "ok"
    else:
        signature = "BAD"
    head = [
        event.get("occurred_at", "-"),
        event.get("event_type", "-"),
        event.get("decision", "-"),
    ]
    if event.get("event_type") == "gateway_call":
        head.append(f"{event.get('method')} {event.get('path')} -> {event.get('status')}")
    if event.get("reason"):
        head.append(f"({event['reason']})")
    details = []
    for label, name in (
        ("request", "request_id"),
        ("resource", "resource"),
        ("zone", "zone_id"),
        ("app", "application_id"),
        ("mcp", "mcp_method"),
        ("target", "mcp_target"),
        ("sub", "sub"),
        ("sid", "sid"),
        ("token", "token_fingerprint"),
        ("upstream", "upstream_host"),
        ("ms", "duration_ms"),
        ("suppressed", "suppressed"),
    ):
        value = event.get(name)
        if value is not None and value != "":
            details.append(f"{label}={_printable(value)}")
    details += [f"entry={entry_id}", f"id={fields.get('id', '-')}", f"sig={signature}"]
    return " ".join(_printable(part) for part in head) + " " + " ".join(details)


@defer.inlineCallbacks
def tail(
    redis,
    out: TextIO,
    matches: Filter,
    key: bytes | None,
    count: int = 20,
    follow: bool = False,
    stream: str = AUDIT_STREAM,
    scan_limit: int = SCAN_LIMIT,
    clock=None,
    reply_timeout: float | None = None,
):
    """
    Print the last C{count} matching entries of C{stream}, oldest first;
    with C{follow}, then print new matching entries as they come (until
    cancelled). Fires with the number of lines printed.

    With C{clock} and C{reply_timeout}, each read of past entries fails with
    L{defer.TimeoutError} when Redis does not answer it in time; the scan as
    a whole is bounded by C{scan_limit} entries, not by a time.
    """
    found: list[tuple[str, dict]] = []
    newest = None
    end = "+"
    scanned = 0
    while len(found) < count and scanned < scan_limit:
        reading = redis.execute_command("XREVRANGE", stream, end, "-", "COUNT", BATCH)
        if clock is not None and reply_timeout is not None:
            reading.addTimeout(reply_timeout, clock)
        reply = yield reading
        if not reply:
            break
        for entry_id, flat in reply:
            entry_id = _decode(entry_id)
            newest = newest or entry_id
            fields = entry_fields(flat)
            if matches.could_match(fields.get("data", "")) and matches(event_of(fields)):
                found.append((entry_id, fields))
                if len(found) >= count:
                    break
        scanned += len(reply)
        if len(reply) < BATCH:
            break
        end = "(" + _decode(reply[-1][0])
    printed = 0
    for entry_id, fields in reversed(found):
        out.write(format_line(entry_id, fields, key, stream) + "\n")
        printed += 1
    out.flush()
    last = newest or "$"
    while follow:
        reply = yield redis.execute_command(
            "XREAD", "BLOCK", BLOCK_MS, "COUNT", BATCH, "STREAMS", stream, last
        )
        for _stream, entries in reply or []:
            for entry_id, flat in entries:
                last = _decode(entry_id)
                fields = entry_fields(flat)
                if matches(event_of(fields)):
                    out.write(format_line(last, fields, key, stream) + "\n")
                    printed += 1
        out.flush()
    return printed


class _Refused(Exception):
    """One line for the operator and the exit status (2 usage, 1 failure)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _settings(context) -> tuple:
    args = context.args
    try:
        url = args.redis_url or read_secret(context.environ, "REDIS_URL")
        key_text = read_secret(context.environ, "STREAMS_HMAC_KEY")
    except ConfigError as error:
        raise _Refused(str(error), 2) from None
    if not url:
        raise _Refused("REDIS_URL is required (or --redis-url)", 2)
    try:
        address = parse_redis_url(url)
    except ValueError as error:
        raise _Refused(f"REDIS_URL is malformed: {error}", 2) from None
    try:
        key = bytes.fromhex(key_text) if key_text else None
    except ValueError:
        raise _Refused("STREAMS_HMAC_KEY must be hex-encoded", 2) from None
    if args.count < 0:
        raise _Refused("--count must not be negative", 2)
    return address, key


def run(context) -> int:
    """
    C{audit tail}: read the stream with the gateway's Redis client. Errors
    are one line on stderr (this runs as C{__main__}'s subcommand, so it
    reports them itself rather than through the admin module's exception).
    """
    try:
        return _run(context)
    except _Refused as refused:
        print(f"caracal-gateway-admin: error: {refused}", file=context.stderr)
        return refused.status


def _run(context) -> int:
    from caracal.gateway.redisconn import blocking_connection, close_redis

    args = context.args
    address, key = _settings(context)
    from twisted.internet import reactor

    outcome: dict[str, object] = {}

    @defer.inlineCallbacks
    def main():
        redis = blocking_connection(address, reactor)
        try:
            reading = tail(
                redis,
                context.stdout,
                Filter(args.resource, args.decision, args.request_id),
                key,
                count=args.count,
                follow=args.follow,
                clock=reactor,
                reply_timeout=READ_TIMEOUT,
            )
            yield reading
        except defer.TimeoutError:
            outcome["error"] = f"no answer from Redis within {READ_TIMEOUT:g} s"
        except Exception as error:  # noqa: BLE001 - reported as one line below
            outcome["error"] = str(error) or type(error).__name__
        finally:
            yield close_redis(redis)
            if reactor.running:
                reactor.stop()

    reactor.callWhenRunning(main)
    reactor.run()
    if "error" in outcome:
        raise _Refused(f"cannot read the audit stream: {outcome['error']}", 1)
    return 0
