# -*- test-case-name: tests.test_testing,tests.integration.test_contracts -*-
"""
In-memory doubles of the pipeline's collaborators, for tests (in the spirit
of C{treq.testing}): each provides the same interface from
L{caracal.gateway.interfaces} as the real implementation and passes the same
contract test suite, so a unit test written against a double tells the truth
about the real thing.

Time is driven by the C{clock} each double is given (a L{task.Clock} in
tests); nothing here touches the network.
"""

from __future__ import annotations

import heapq
import socket
from collections.abc import Iterable

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from txredisapi import ResponseError
from zope.interface import implementer

from caracal.gateway.audit import audit_event
from caracal.gateway.denials import Denial
from caracal.gateway.interfaces import (
    IAuditLog,
    IForwarder,
    IKeySource,
    IRedisConnection,
    IReplayGuard,
    IResourceRegistry,
    ITokenExchange,
    IUpstreamGuard,
)
from caracal.gateway.jwks import JWKSUnavailable, UnknownKeyID
from caracal.gateway.registry import ToolResource
from caracal.gateway.replay import ReplayCheckUnavailable, claim_arguments, replay_key
from caracal.gateway.sts import Mandate
from caracal.gateway.upstream import (
    PinnedUpstream,
    UpstreamRefused,
    is_public_address,
    numeric_host,
    parse_upstream,
)


class _Stallable:
    """
    A double whose calls can be made to wait. With C{pending} set to a list,
    each call gets a Deferred appended there instead of an answer, for the
    test to fire (a slow backend) or to see cancelled: C{cancelled} counts
    the waiting calls cancelled by their caller.
    """

    pending: list[defer.Deferred] | None = None
    cancelled = 0

    def _wait(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred(self._count_cancel)
        self.pending.append(d)
        return d

    def _count_cancel(self, _d: defer.Deferred) -> None:
        self.cancelled += 1


@implementer(IResourceRegistry)
class MemoryResourceStore:
    """
    A resource table held in a dict.

    @ivar unavailable: when set to an exception, L{check} fails with it (to
        exercise readiness failures); lookups keep working.
    """

    def __init__(self, resources: Iterable[ToolResource] = ()) -> None:
        self._resources = {resource.resource_identifier: resource for resource in resources}
        self.unavailable: Exception | None = None

    def put(self, resource: ToolResource) -> None:
        """Add or replace C{resource}."""
        self._resources[resource.resource_identifier] = resource

    def remove(self, identifier: str) -> None:
        """Forget the resource named C{identifier}, if known."""
        self._resources.pop(identifier, None)

    def get(self, identifier: str) -> ToolResource | None:
        """See L{IResourceRegistry.get}."""
        return self._resources.get(identifier)

    def count(self) -> int:
        """See L{IResourceRegistry.count}."""
        return len(self._resources)

    def check(self) -> defer.Deferred[None]:
        """See L{IResourceRegistry.check}."""
        if self.unavailable is not None:
            return defer.fail(self.unavailable)
        return defer.succeed(None)


@implementer(IKeySource)
class MemoryKeySource(_Stallable):
    """
    Verification keys held in a dict: C{keys[zone_id][kid]}.

    @ivar unavailable: when set, every lookup fails with L{JWKSUnavailable}
        (the STS is down).
    """

    def __init__(self, keys: dict | None = None) -> None:
        self.keys: dict[str, dict] = keys if keys is not None else {}
        self.unavailable = False

    def key_for(self, zone_id: str, kid: str) -> defer.Deferred:
        """See L{IKeySource.key_for}."""
        if self.pending is not None:
            return self._wait()
        if self.unavailable:
            return defer.fail(JWKSUnavailable(f"no keys for zone {zone_id}"))
        zone = self.keys.get(zone_id)
        if zone is None:
            return defer.fail(JWKSUnavailable(f"no keys for zone {zone_id}"))
        if kid not in zone:
            return defer.fail(UnknownKeyID())
        return defer.succeed(zone[kid])


@implementer(IReplayGuard)
class MemoryReplayGuard(_Stallable):
    """
    A replay guard in a dict; expiry is driven by C{clock}. Expired entries
    are pruned on every claim, so memory holds only unexpired claims.

    @ivar unavailable: when set, every claim fails with
        L{ReplayCheckUnavailable} (Redis is down).
    """

    def __init__(self, clock) -> None:
        self._clock = clock
        self._claims: dict[str, tuple[str, float]] = {}
        self._expiries: list[tuple[float, str]] = []
        self.unavailable = False

    def _prune(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, key = heapq.heappop(self._expiries)
            held = self._claims.get(key)
            if held is not None and held[1] == expires_at:
                del self._claims[key]

    def claim(self, zone_id: str, jti: str, request_id: str, ttl_ms: int) -> defer.Deferred:
        """See L{IReplayGuard.claim}."""
        try:
            key, ttl_ms = claim_arguments(zone_id, jti, ttl_ms)
        except ValueError:
            return defer.fail()
        if self.unavailable:
            return defer.fail(ReplayCheckUnavailable("unavailable"))
        if self.pending is not None:
            return self._wait()
        now = self._clock.seconds()
        self._prune(now)
        if key in self._claims:
            return defer.succeed(False)
        expires_at = now + ttl_ms / 1000.0
        self._claims[key] = (request_id, expires_at)
        heapq.heappush(self._expiries, (expires_at, key))
        return defer.succeed(True)

    def lookup(self, zone_id: str, jti: str) -> tuple[str, int] | None:
        """
        The claim held for C{jti}: C{(request_id, milliseconds left)}, or
        C{None} (the counterpart of Redis C{GET} and C{PTTL}).
        """
        now = self._clock.seconds()
        self._prune(now)
        held = self._claims.get(replay_key(zone_id, jti))
        if held is None:
            return None
        return held[0], round((held[1] - now) * 1000)

    def __len__(self) -> int:
        self._prune(self._clock.seconds())
        return len(self._claims)


@implementer(IAuditLog)
class MemoryAuditLog:
    """An audit log kept in a list (C{events}) of the C{data} documents."""

    def __init__(self, clock) -> None:
        self._clock = clock
        self.events: list[dict] = []

    def emit(self, event_type: str, request_id: str, decision: str, **metadata) -> defer.Deferred:
        """See L{IAuditLog.emit}."""
        self.events.append(
            audit_event(event_type, request_id, decision, self._clock.seconds(), metadata)
        )
        return defer.succeed(None)


@implementer(ITokenExchange)
class MemoryTokenExchange(_Stallable):
    """
    An STS that answers every exchange with C{mandate} and records the calls
    (C{calls}, the arguments of each).

    @ivar denial: when set to a L{Denial}, every exchange fails with it.
    @ivar refused: subject tokens refused with C{invalid_grant}, as an STS
        refuses a token it cannot verify.
    """

    def __init__(self, mandate: Mandate | None = None) -> None:
        self.mandate = mandate or Mandate(access_token="mandate-token", expires_in=60)  # noqa: S106
        self.calls: list[tuple[str, str, str, str, str]] = []
        self.denial = None
        self.refused: set[str] = set()

    def exchange(
        self,
        subject_token: str,
        zone_id: str,
        application_id: str,
        resource: str,
        request_id: str,
        traceparent: bytes | None = None,
    ) -> defer.Deferred:
        """See L{ITokenExchange.exchange}."""
        self.calls.append((subject_token, zone_id, application_id, resource, request_id))
        if self.denial is not None:
            return defer.fail(self.denial)
        if subject_token in self.refused:
            return defer.fail(
                Denial(400, "invalid_grant", "subject token refused", metric="sts_exchange_errors")
            )
        if self.pending is not None:
            return self._wait()
        return defer.succeed(self.mandate)


def _family(address) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6


@implementer(IUpstreamGuard)
class MemoryUpstreamGuard(_Stallable):
    """
    An upstream guard whose DNS is a dict (C{hosts}: name -> addresses);
    it applies the real URL rules and the public-address rule, and records
    each checked URL in C{calls}.

    @ivar refusal: when set to an L{UpstreamRefused}, every check fails with it.
    """

    def __init__(self, hosts: dict[str, list[str]] | None = None) -> None:
        self.hosts = hosts if hosts is not None else {}
        self.calls: list[str] = []
        self.refusal: UpstreamRefused | None = None

    def check(self, url: str) -> defer.Deferred:
        """See L{IUpstreamGuard.check}."""
        self.calls.append(url)
        if self.refusal is not None:
            return defer.fail(self.refusal)
        if self.pending is not None:
            return self._wait()
        try:
            upstream = parse_upstream(url)
        except UpstreamRefused:
            return defer.fail()
        if numeric_host(upstream.host) is not None:
            found = [upstream.host]
        else:
            found = self.hosts.get(upstream.host.lower(), [])
        if not found:
            return defer.fail(
                UpstreamRefused("unresolvable", f"upstream host {upstream.host} did not resolve")
            )
        addresses = [numeric_host(text) for text in found]
        if not all(address is not None and is_public_address(address) for address in addresses):
            return defer.fail(
                UpstreamRefused(
                    "private_address", f"upstream host {upstream.host} has a non-public address"
                )
            )
        return defer.succeed(
            PinnedUpstream(url=upstream, address=found[0], family=_family(addresses[0]))
        )


@implementer(IHostResolution)
class MemoryResolution:
    """One resolution by L{MemoryResolver}; C{cancelled} once cancelled."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cancelled = False

    def cancel(self) -> None:
        """See L{IHostResolution.cancel}."""
        self.cancelled = True


@implementer(IHostnameResolver)
class MemoryResolver:
    """
    An L{IHostnameResolver} over a dict (C{hosts}: name -> addresses), to
    run the real L{caracal.gateway.upstream.UpstreamGuard} without DNS.
    Every name asked for is recorded in C{asked}.

    """

    def __init__(self, hosts: dict[str, list[str]] | None = None) -> None:
        self.hosts = hosts if hosts is not None else {}
        self.pending: list | None = None
        self.asked: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver,
        hostName,
        portNumber=0,
        addressTypes=None,
        transportSemantics="TCP",
    ):
        """See L{IHostnameResolver.resolveHostName}."""
        self.asked.append(hostName)
        resolution = MemoryResolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        if self.pending is not None:
            self.pending.append((resolutionReceiver, resolution))
            return resolution
        for text in self.hosts.get(hostName.lower(), []):
            kind = IPv6Address if ":" in text else IPv4Address
            resolutionReceiver.addressResolved(kind("TCP", text, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


@implementer(IForwarder)
class MemoryForwarder(_Stallable):
    """
    A forwarder that answers every request itself with C{status} and
    C{body}, recording each call's C{(pinned, credential_headers,
    token_expires_in, watch_revocation)} in C{calls} and its C{timeout} in
    C{timeouts}.

    @ivar denial: when set to a L{Denial}, every forward fails with it
        before writing anything (an unreachable upstream).
    """

    def __init__(self, status: int = 200, body: bytes = b"upstream says hi") -> None:
        self.status = status
        self.body = body
        self.calls: list[tuple] = []
        self.timeouts: list[float | None] = []
        self.denial = None

    def forward(
        self,
        request,
        pinned,
        credential_headers,
        token_expires_in,
        watch_revocation=None,
        timeout=None,
    ) -> defer.Deferred:
        """See L{IForwarder.forward}."""
        self.calls.append((pinned, credential_headers, token_expires_in, watch_revocation))
        self.timeouts.append(timeout)
        if self.denial is not None:
            return defer.fail(self.denial)
        if self.pending is not None:
            return self._wait()
        request.setResponseCode(self.status)
        request.write(self.body)
        request.finish()
        return defer.succeed(None)


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


class MemoryRedisServer:
    """
    An in-memory Redis serving the stream commands the gateway uses
    (C{XADD} with or without C{MAXLEN ~}, C{XRANGE}, C{XREAD BLOCK}) to
    L{MemoryRedisConnection}s, with Redis's replies in txredisapi's shapes.

    @ivar fail_next: that many commands fail with C{ConnectionError}.
    @ivar stall: commands never answer (a hung server).
    @ivar commands: every command received, in order.
    @ivar times: when (C{clock.seconds()}) each command arrived.
    @ivar connections: every connection made by L{connect}.
    """

    def __init__(self, clock) -> None:
        self.clock = clock
        self.streams: dict[str, list[tuple[str, list[str]]]] = {}
        self.blocked: list[tuple[defer.Deferred, str, str]] = []
        self.fail_next = 0
        self.stall = False
        self.commands: list[tuple] = []
        self.times: list[float] = []
        self.connections: list[MemoryRedisConnection] = []
        self._last = (0, 0)
        # Each stream's top id, which Redis keeps even through trimming.
        self.tops: dict[str, tuple[int, int]] = {}

    def connect(self, address=None, reactor=None) -> MemoryRedisConnection:
        """A new connection (the signature of L{redisconn.blocking_connection})."""
        connection = MemoryRedisConnection(self)
        self.connections.append(connection)
        return connection

    def next_id(self) -> str:
        """The id C{XADD *} would give now."""
        ms = int(self.clock.seconds() * 1000)
        seq = self._last[1] + 1 if ms == self._last[0] else 0
        return f"{ms}-{seq}"

    def add(self, stream: str, fields: dict, entry_id: str | None = None) -> str:
        """Append an entry to C{stream}, waking blocked reads; return its id."""
        entry_id = entry_id or self.next_id()
        self._last = max(self._last, _entry_key(entry_id))
        self.tops[stream] = max(self.tops.get(stream, (0, 0)), _entry_key(entry_id))
        flat = [str(item) for pair in fields.items() for item in pair]
        self.streams.setdefault(stream, []).append((entry_id, flat))
        # Reads issued by the callbacks below land in a fresh list.
        waiting, self.blocked = self.blocked, []
        still = []
        for d, name, after in waiting:
            if name == stream and not d.called:
                d.callback([[name, self._after(name, after, 500)]])
            elif not d.called:
                still.append((d, name, after))
        self.blocked = still + self.blocked
        return entry_id

    def _after(self, stream: str, after: str, count: int) -> list:
        return [
            [entry_id, list(flat)]
            for entry_id, flat in self.streams.get(stream, [])
            if _entry_key(entry_id) > _entry_key(after)
        ][: int(count)]

    def execute(self, command: str, *arguments) -> defer.Deferred:
        """Answer one command as Redis would."""
        self.commands.append((command, *arguments))
        self.times.append(self.clock.seconds())
        if self.stall:
            return defer.Deferred()
        if self.fail_next:
            self.fail_next -= 1
            return defer.fail(ConnectionError("Lost connection"))
        command = command.upper()
        if command == "XRANGE":
            stream, start, _end, _count_word, count = arguments
            if start.startswith("("):
                return defer.succeed(self._after(stream, start[1:], count))
            ms, seq = _entry_key(start if "-" in start else f"{start}-0")
            before = f"{ms}-{seq - 1}" if seq else f"{ms - 1}-99999"
            return defer.succeed(self._after(stream, before, count))
        if command == "XREAD":
            block = int(arguments[1])
            count, stream, after = arguments[3], arguments[5], arguments[6]
            ready = self._after(stream, after, count)
            if ready:
                return defer.succeed([[stream, ready]])
            d: defer.Deferred = defer.Deferred()
            self.blocked.append((d, stream, after))
            self.clock.callLater(block / 1000, lambda: d.called or d.callback(None))
            return d
        if command == "XADD":
            stream, rest = arguments[0], list(arguments[1:])
            if rest[0] == "MAXLEN":
                # Never trims (tests stay far below any bound).
                rest = rest[3:]
            entry_id, flat = rest[0], rest[1:]
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            if entry_id == "*":
                return defer.succeed(self.add(stream, fields))
            top = self.tops.get(stream)
            if top is not None and _entry_key(entry_id) <= top:
                # What txredisapi raises for Redis's answer (the "ERR " stripped).
                return defer.fail(
                    ResponseError(
                        " The ID specified in XADD is equal or smaller than "
                        "the target stream top item"
                    )
                )
            return defer.succeed(self.add(stream, fields, entry_id))
        return defer.fail(ResponseError(f"unknown command '{command}'"))


@implementer(IRedisConnection)
class MemoryRedisConnection:
    """One client connection to a L{MemoryRedisServer}."""

    def __init__(self, server: MemoryRedisServer) -> None:
        self.server = server
        self.closed = False
        self.pending: list[defer.Deferred] = []

    def execute_command(self, *arguments) -> defer.Deferred:
        """See L{IRedisConnection.execute_command}."""
        if self.closed:
            return defer.fail(ConnectionError("Not connected"))
        d = self.server.execute(*arguments)
        if not d.called:
            self.pending.append(d)
        return d

    def disconnect(self) -> defer.Deferred:
        """See L{IRedisConnection.disconnect}: pending commands fail."""
        self.closed = True
        for d in self.pending:
            if not d.called:
                d.errback(ConnectionError("Lost connection"))
        self.pending = []
        return defer.succeed(None)
