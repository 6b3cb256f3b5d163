"""
Contract test suites: what every implementation of an interface of
L{caracal.gateway.interfaces} does, written once and mixed into a
L{twisted.trial.unittest.TestCase} per implementation. The in-memory doubles
of L{caracal.gateway.testing} run them in C{tests.test_testing}; the real
implementations over real Redis, a real STS and a real upstream on
127.0.0.1 in C{tests.integration.test_contracts}. (The resource registry's
and the replay guard's contracts live beside their modules' tests:
C{tests.test_registry.ResourceStoreContract},
C{tests.test_replay.ReplayGuardContract}.)
"""

from __future__ import annotations

import uuid

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from txredisapi import ResponseError
from zope.interface.verify import verifyObject

from caracal.gateway.denials import Denial
from caracal.gateway.interfaces import (
    IAuditLog,
    IForwarder,
    IKeySource,
    IMetrics,
    IRedisConnection,
    IRevocations,
    ITokenExchange,
    IUpstreamGuard,
)
from caracal.gateway.jwks import UnknownKeyID
from caracal.gateway.revocations import ALREADY_DEAD_LETTERED, parse_entries, parse_xread
from caracal.gateway.sts import Mandate
from caracal.gateway.upstream import UpstreamRefused
from tests.support.requests import client_request, written
from tests.support.responses import parse_response


class KeySourceContract:
    """
    What every L{IKeySource} does. Subclasses provide C{make_source()}
    returning C{(source, zone_id, kid, public_key)}: a source that knows
    C{public_key} as C{kid} of C{zone_id}.
    """

    def setUp(self):
        self.source, self.zone_id, self.kid, self.public_key = self.make_source()

    def test_interface(self):
        """The source provides L{IKeySource}."""
        self.assertTrue(verifyObject(IKeySource, self.source))

    @defer.inlineCallbacks
    def test_known_key(self):
        """A known kid gives the zone's public key."""
        key = yield self.source.key_for(self.zone_id, self.kid)
        self.assertEqual(key.public_numbers(), self.public_key.public_numbers())

    @defer.inlineCallbacks
    def test_unknown_kid(self):
        """An unknown kid in a known zone fails with L{UnknownKeyID}."""
        yield self.source.key_for(self.zone_id, self.kid)
        with self.assertRaises(UnknownKeyID):
            yield self.source.key_for(self.zone_id, "no-such-kid")


class TokenExchangeContract:
    """
    What every L{ITokenExchange} does. Subclasses provide
    C{make_exchange()} returning C{(exchange, good_token, refused_token)}:
    the STS exchanges C{good_token} for zone C{zone-a} and refuses
    C{refused_token}.
    """

    def setUp(self):
        self.exchange, self.good_token, self.refused_token = self.make_exchange()

    def test_interface(self):
        """The exchange provides L{ITokenExchange}."""
        self.assertTrue(verifyObject(ITokenExchange, self.exchange))

    @defer.inlineCallbacks
    def test_mandate(self):
        """A good token is exchanged for a L{Mandate} with a Bearer token."""
        mandate = yield self.exchange.exchange(self.good_token, "zone-a", "app-1", "tools", "r-1")
        self.assertIsInstance(mandate, Mandate)
        self.assertTrue(mandate.access_token)
        self.assertEqual(mandate.token_type, "Bearer")

    @defer.inlineCallbacks
    def test_refused(self):
        """A refused token fails with a 4xx L{Denial} that does not quote it."""
        with self.assertRaises(Denial) as refused:
            yield self.exchange.exchange(self.refused_token, "zone-a", "app-1", "tools", "r-2")
        self.assertTrue(400 <= refused.exception.status < 500, refused.exception.status)
        self.assertNotIn(self.refused_token, refused.exception.description)


#: The DNS every guard under the contract is given.
CONTRACT_HOSTS = {
    "tools.example": ["203.0.114.7"],
    "intranet.example": ["10.1.2.3"],
    "mixed.example": ["203.0.114.8", "192.168.1.1"],
}


class UpstreamGuardContract:
    """
    What every L{IUpstreamGuard} does. Subclasses provide
    C{make_guard(hosts)}: a guard whose name resolution answers from
    C{hosts} (name -> addresses), private addresses not allowed.
    """

    def setUp(self):
        self.guard = self.make_guard(CONTRACT_HOSTS)

    def test_interface(self):
        """The guard provides L{IUpstreamGuard}."""
        self.assertTrue(verifyObject(IUpstreamGuard, self.guard))

    @defer.inlineCallbacks
    def assertRefused(self, url: str, reason: str | None = None):
        with self.assertRaises(UpstreamRefused) as refused:
            yield self.guard.check(url)
        if reason is not None:
            self.assertEqual(refused.exception.reason, reason)

    @defer.inlineCallbacks
    def test_public_host_pinned(self):
        """A host with a public address is pinned to that address."""
        pinned = yield self.guard.check("https://tools.example/api")
        self.assertEqual(pinned.address, "203.0.114.7")
        self.assertEqual((pinned.url.host, pinned.url.port), ("tools.example", 443))

    @defer.inlineCallbacks
    def test_public_address_pinned(self):
        """A public numeric host needs no resolution."""
        pinned = yield self.guard.check("http://203.0.114.9:8080/x")
        self.assertEqual((pinned.address, pinned.url.port), ("203.0.114.9", 8080))

    def test_private_host_refused(self):
        """A host resolving to a private address is refused."""
        return self.assertRefused("https://intranet.example/", "private_address")

    def test_any_private_address_refuses(self):
        """One private address among public ones is enough to refuse."""
        return self.assertRefused("https://mixed.example/", "private_address")

    def test_loopback_address_refused(self):
        """A loopback numeric host is refused."""
        return self.assertRefused("http://127.0.0.1:8080/", "private_address")

    def test_unresolvable_refused(self):
        """A host that does not resolve is refused."""
        return self.assertRefused("https://nowhere.example/", "unresolvable")

    def test_malformed_refused(self):
        """A URL that is not http(s) is refused before any resolution."""
        return self.assertRefused("ftp://tools.example/")


class AuditLogContract:
    """
    What every L{IAuditLog} does. Subclasses provide C{make_log()} and
    C{stored(request_id)}: a Deferred firing with the C{data} documents
    stored for C{request_id}.
    """

    def setUp(self):
        self.log = self.make_log()

    def test_interface(self):
        """The log provides L{IAuditLog}."""
        self.assertTrue(verifyObject(IAuditLog, self.log))

    @defer.inlineCallbacks
    def test_event_stored(self):
        """An emitted event is stored with its core fields and metadata."""
        request_id = str(uuid.uuid4())
        result = yield self.log.emit("replay_detected", request_id, "deny", zone_id="zone-a")
        self.assertIsNone(result)
        [event] = yield self.stored(request_id)
        self.assertEqual(
            (event["event_type"], event["request_id"], event["decision"], event["zone_id"]),
            ("replay_detected", request_id, "deny", "zone-a"),
        )
        self.assertTrue(event["occurred_at"].endswith("Z"))

    @defer.inlineCallbacks
    def test_credentials_redacted(self):
        """Metadata under a credential's name is never stored."""
        request_id = str(uuid.uuid4())
        yield self.log.emit("replay_detected", request_id, "deny", token="t0ken-value")
        [event] = yield self.stored(request_id)
        self.assertEqual(event["token"], "[redacted]")


class RedisStreamContract:
    """
    What every L{IRedisConnection} answers to the stream commands the
    revocation follower and the audit log send. Subclasses provide
    C{connect()}, C{new_stream()} (a stream name of the test's own) and
    C{let_block_expire(seconds)}: a Deferred firing once an C{XREAD BLOCK}
    of C{seconds} has had time to give up.
    """

    def setUp(self):
        self.connection = self.connect()
        self.stream = self.new_stream()

    def xadd(self, entry_id="*", **fields):
        arguments = ["XADD", self.stream, "MAXLEN", "~", 1000, entry_id]
        for name, value in fields.items():
            arguments += [name, value]
        return self.connection.execute_command(*arguments)

    def test_interface(self):
        """The connection provides L{IRedisConnection}."""
        self.assertTrue(verifyObject(IRedisConnection, self.connection, tentative=True))

    @defer.inlineCallbacks
    def test_xadd_xrange(self):
        """C{XADD *} answers the new id; C{XRANGE} gives entries in order, paged."""
        first = yield self.xadd(zone_id="z", session_id="s1")
        second = yield self.xadd(zone_id="z", session_id="s2")
        self.assertRegex(first, r"^\d+-\d+$")
        reply = yield self.connection.execute_command(
            "XRANGE", self.stream, "0-1", "+", "COUNT", 1000
        )
        self.assertEqual(
            parse_entries(reply),
            [
                (first, {"zone_id": "z", "session_id": "s1"}),
                (second, {"zone_id": "z", "session_id": "s2"}),
            ],
        )
        reply = yield self.connection.execute_command("XRANGE", self.stream, "0-1", "+", "COUNT", 1)
        self.assertEqual([entry_id for entry_id, _ in parse_entries(reply)], [first])

    @defer.inlineCallbacks
    def test_xread_ready(self):
        """C{XREAD BLOCK} answers at once with the entries after the id given."""
        first = yield self.xadd(n="1")
        second = yield self.xadd(n="2")
        reply = yield self.connection.execute_command(
            "XREAD", "BLOCK", 100, "COUNT", 10, "STREAMS", self.stream, first
        )
        self.assertEqual(parse_xread(reply, self.stream), [(second, {"n": "2"})])

    @defer.inlineCallbacks
    def test_xread_times_out_empty(self):
        """C{XREAD BLOCK} with nothing new answers nil once the block is over."""
        first = yield self.xadd(n="1")
        reading = self.connection.execute_command(
            "XREAD", "BLOCK", 100, "COUNT", 10, "STREAMS", self.stream, first
        )
        yield self.let_block_expire(0.1)
        reply = yield reading
        self.assertEqual(parse_xread(reply, self.stream), [])

    @defer.inlineCallbacks
    def test_xadd_explicit_id_not_above_top_refused(self):
        """An explicit id not above the stream's top is refused the way the follower expects."""
        first = yield self.xadd(n="1")
        with self.assertRaises(ResponseError) as refused:
            yield self.xadd(first, n="again")
        self.assertIn(ALREADY_DEAD_LETTERED, str(refused.exception))


class ForwarderContract:
    """
    What every L{IForwarder} does with an accepted request. Subclasses
    provide C{make_forwarder()}, C{answering(status)}: a pinned upstream
    that answers a C{GET /} with C{status} and the body C{upstream says
    <status>}, and C{unreachable()}: a pinned upstream nothing answers for
    (its connection is refused).
    """

    def setUp(self):
        self.forwarder = self.make_forwarder()

    def forward(self, request, pinned):
        return self.forwarder.forward(request, pinned, [(b"Authorization", b"Bearer m")], 300)

    def test_interface(self):
        """The forwarder provides L{IForwarder}."""
        self.assertTrue(verifyObject(IForwarder, self.forwarder))

    @defer.inlineCallbacks
    def test_answer_relayed(self):
        """The upstream's status and body reach the client; the Deferred fires C{None} after."""
        request = client_request(uri=b"/")
        result = yield self.forward(request, self.answering(201))
        self.assertIsNone(result)
        status, _headers, body, _rest = parse_response(written(request))
        self.assertEqual((status, body), (201, b"upstream says 201"))
        self.assertTrue(request.finished)

    @defer.inlineCallbacks
    def test_upstream_error_is_an_answer(self):
        """An upstream's own 5xx is relayed as its answer, not turned into a refusal."""
        request = client_request(uri=b"/")
        yield self.forward(request, self.answering(503))
        status, _headers, body, _rest = parse_response(written(request))
        self.assertEqual((status, body), (503, b"upstream says 503"))

    @defer.inlineCallbacks
    def test_unreachable_refused_before_writing(self):
        """An unreachable upstream fails with a 502 L{Denial}, nothing written to the client."""
        request = client_request(uri=b"/")
        with self.assertRaises(Denial) as refused:
            yield self.forward(request, self.unreachable())
        self.assertEqual(
            (refused.exception.status, refused.exception.code), (502, "upstream_unreachable")
        )
        self.assertEqual(written(request), b"")
        self.assertFalse(request.finished)


class RevocationsContract:
    """
    What every L{IRevocations} does, however revocations reach it.
    Subclasses provide C{make_revocations()}: the store, current (or a
    Deferred of it), and C{revoke(zone_id, session_id)}: a Deferred firing
    once that revocation has reached the store.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.revocations = yield self.make_revocations()

    def test_interface(self):
        """The store provides L{IRevocations}."""
        self.assertTrue(verifyObject(IRevocations, self.revocations))

    @defer.inlineCallbacks
    def test_current(self):
        """A loaded store vouches for what it does not hold: ready, no reason given."""
        self.assertIsNone(self.revocations.unavailable())
        self.assertIsNone((yield self.revocations.check()))

    @defer.inlineCallbacks
    def test_revoked_in_its_zone_only(self):
        """A revoked session is revoked in its zone, not elsewhere; others are not."""
        self.assertFalse(self.revocations.is_revoked("zone-a", "s-1"))
        yield self.revoke("zone-a", "s-1")
        self.assertTrue(self.revocations.is_revoked("zone-a", "s-1"))
        self.assertFalse(self.revocations.is_revoked("zone-b", "s-1"))
        self.assertFalse(self.revocations.is_revoked("zone-a", "s-2"))
        self.assertEqual(self.revocations.active(), 1)

    @defer.inlineCallbacks
    def test_revoked_twice_held_once(self):
        """Revoking a session again is harmless: it is held once."""
        yield self.revoke("zone-a", "s-1")
        yield self.revoke("zone-a", "s-1")
        self.assertEqual(self.revocations.active(), 1)

    @defer.inlineCallbacks
    def test_watch_fires_once(self):
        """A watch is called once when its session gets revoked, not for another."""
        calls = []
        self.revocations.watch("zone-a", "s-1", lambda: calls.append("s-1"))
        yield self.revoke("zone-a", "s-2")
        self.assertEqual(calls, [])
        yield self.revoke("zone-a", "s-1")
        yield self.revoke("zone-a", "s-1")
        self.assertEqual(calls, ["s-1"])

    @defer.inlineCallbacks
    def test_watch_of_a_revoked_session_fires_at_once(self):
        """Watching a session already revoked calls back at once."""
        yield self.revoke("zone-a", "s-1")
        calls = []
        self.revocations.watch("zone-a", "s-1", lambda: calls.append(True))
        self.assertEqual(calls, [True])

    @defer.inlineCallbacks
    def test_cancelled_watch_silent(self):
        """A cancelled watch is not called when its session gets revoked."""
        calls = []
        cancel = self.revocations.watch("zone-a", "s-1", lambda: calls.append(True))
        cancel()
        yield self.revoke("zone-a", "s-1")
        self.assertTrue(self.revocations.is_revoked("zone-a", "s-1"))
        self.assertEqual(calls, [])


def exposed(metrics, sample_name: str, **labels) -> float:
    """
    The sum of the samples named C{sample_name} with C{labels} in the
    Prometheus text C{metrics} exposes: what a scrape reads.
    """
    text, _content_type = metrics.exposition()
    total = 0.0
    for family in text_string_to_metric_families(text.decode("utf-8")):
        for sample in family.samples:
            if sample.name == sample_name and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


class MetricsContract:
    """
    What every L{IMetrics} does, read back only through its JSON snapshot
    and its Prometheus exposition. Subclasses provide C{make_metrics()}.
    """

    def setUp(self):
        self.metrics = self.make_metrics()

    def test_interface(self):
        """The metrics provide L{IMetrics}."""
        self.assertTrue(verifyObject(IMetrics, self.metrics))

    def test_counter(self):
        """An incremented JSON counter shows in the snapshot and as a Prometheus counter."""
        self.metrics.increment("upstream_errors")
        self.metrics.increment("upstream_errors", 2)
        self.assertEqual(self.metrics.snapshot()["upstream_errors"], 3)
        self.metrics.increment("jwks_fetches", result="ok")
        self.assertEqual(
            exposed(self.metrics, "caracal_gateway_jwks_fetches_total", result="ok"), 1
        )

    def test_unknown_counter_refused(self):
        """Incrementing a name no counter has is a mistake, not a new counter."""
        self.assertRaises(KeyError, self.metrics.increment, "no_such_counter")

    def test_gauge_read_when_reported(self):
        """A gauge reports what its reader says at the time it is read."""
        held = [2]
        self.metrics.gauge("revocations_active", lambda: held[0])
        held[0] = 5
        self.assertEqual(self.metrics.snapshot()["revocations_active"], 5)
        self.assertEqual(exposed(self.metrics, "caracal_gateway_revocations_active"), 5)

    def test_counted_gauge(self):
        """A counted gauge moves by what is added."""
        self.metrics.add("inflight_requests", 1)
        self.metrics.add("inflight_requests", 1)
        self.metrics.add("inflight_requests", -1)
        self.assertEqual(exposed(self.metrics, "caracal_gateway_inflight_requests"), 1)

    def test_observation(self):
        """An observed latency is counted and summed in its histogram."""
        self.metrics.observe("sts_exchange_duration_seconds", 0.25)
        name = "caracal_gateway_sts_exchange_duration_seconds"
        self.assertEqual(exposed(self.metrics, name + "_count"), 1)
        self.assertEqual(exposed(self.metrics, name + "_sum"), 0.25)

    def test_request_done(self):
        """A finished request is counted by status class; a refusal by its reason too."""
        self.metrics.request_done(200, None, 0.01)
        self.metrics.request_done(403, None, 0.02, denial="denials_binding")
        requests = "caracal_gateway_requests_total"
        self.assertEqual(exposed(self.metrics, requests, status_class="2xx"), 1)
        self.assertEqual(exposed(self.metrics, requests, status_class="4xx"), 1)
        self.assertEqual(
            exposed(self.metrics, "caracal_gateway_denials_total", reason="denials_binding"), 1
        )
        self.assertEqual(exposed(self.metrics, "caracal_gateway_request_duration_seconds_count"), 2)
