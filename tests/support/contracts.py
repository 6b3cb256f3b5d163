"""
Contract test suites: what every implementation of an interface of
L{caracal.gateway.interfaces} does, written once and mixed into a
L{twisted.trial.unittest.TestCase} per implementation. The in-memory doubles
of L{caracal.gateway.testing} run them in C{tests.test_testing}; the real
implementations over real Redis and a real STS in
C{tests.integration.test_contracts}. (The resource registry's and the replay
guard's contracts live beside their modules' tests:
C{tests.test_registry.ResourceStoreContract},
C{tests.test_replay.ReplayGuardContract}.)
"""

from __future__ import annotations

import uuid

from twisted.internet import defer
from txredisapi import ResponseError
from zope.interface.verify import verifyObject

from caracal.gateway.denials import Denial
from caracal.gateway.interfaces import (
    IAuditLog,
    IKeySource,
    IRedisConnection,
    ITokenExchange,
    IUpstreamGuard,
)
from caracal.gateway.jwks import UnknownKeyID
from caracal.gateway.revocations import ALREADY_DEAD_LETTERED, parse_entries, parse_xread
from caracal.gateway.sts import Mandate
from caracal.gateway.upstream import UpstreamRefused


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
