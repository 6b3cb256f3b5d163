# -*- test-case-name: tests.test_redisconn -*-
"""
Unit tests for L{caracal.gateway.redisconn}: the Sentinel watch that moves a
pool's connections to the master the sentinels name, on a L{Clock}, and the
protocol and pool handler of every connection (hiredis, commands sent at
once), on L{StringTransport}s. The real thing, through real failovers, is in
L{tests.integration.test_sentinel}.
"""

from __future__ import annotations

import hiredis
import txredisapi
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway.redisconn import (
    _MasterProtocol,
    _MasterWatch,
    _PoolHandler,
    _ReconnectingRedisFactory,
    _RedisProtocol,
)


class _Sentinels:
    """Answers discover_master with whatever C{answer} holds (an address or a Failure)."""

    def __init__(self, answer):
        self.answer = answer
        self.asked = 0

    def discover_master(self, name):
        self.asked += 1
        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)
        return defer.succeed(self.answer)


class _Connection:
    def __init__(self, master_address):
        self.master_address = master_address
        self.transport = StringTransport()


class _Factory:
    service_name = "caracal"

    def __init__(self, *connections):
        self.pool = list(connections)


class MasterWatchTests(SynchronousTestCase):
    """L{_MasterWatch} asks every second and drops connections to another address."""

    def setUp(self):
        self.clock = Clock()
        self.on_old = _Connection(("127.0.0.1", 6379))
        self.on_new = _Connection(("127.0.0.1", 6380))
        self.unknown = _Connection(None)
        self.factory = _Factory(self.on_old, self.on_new, self.unknown)
        self.sentinels = _Sentinels(("127.0.0.1", 6380))
        self.watch = _MasterWatch(self.sentinels, self.factory, self.clock)
        self.watch.start()
        self.addCleanup(self.watch.stop)

    def test_drops_connections_to_another_master(self):
        """After a tick, only the connection to the old address is closed."""
        self.assertEqual(self.sentinels.asked, 0)
        self.clock.advance(1.0)
        self.assertEqual(self.sentinels.asked, 1)
        self.assertTrue(self.on_old.transport.disconnecting)
        self.assertFalse(self.on_new.transport.disconnecting)
        self.assertFalse(self.unknown.transport.disconnecting, "not yet set up: left alone")

    def test_same_master_left_alone(self):
        """While the sentinels name the same master, nothing is dropped."""
        self.sentinels.answer = ("127.0.0.1", 6379)
        self.factory.pool = [self.on_old]
        for _ in range(3):
            self.clock.advance(1.0)
        self.assertEqual(self.sentinels.asked, 3)
        self.assertFalse(self.on_old.transport.disconnecting)

    def test_no_answer_drops_nothing_and_keeps_watching(self):
        """No sentinel answers: connections stay, the next tick asks again."""
        self.sentinels.answer = RuntimeError("no sentinel")
        self.clock.advance(1.0)
        self.assertFalse(self.on_old.transport.disconnecting)
        self.sentinels.answer = ("127.0.0.1", 6380)
        self.clock.advance(1.0)
        self.assertTrue(self.on_old.transport.disconnecting)

    def test_stop(self):
        """A stopped watch asks no more."""
        self.watch.stop()
        self.clock.advance(5.0)
        self.assertEqual(self.sentinels.asked, 0)


def _connected_protocol(factory=None) -> _RedisProtocol:
    """A connected L{_RedisProtocol} (no AUTH, no SELECT) on a L{StringTransport}."""
    protocol = _RedisProtocol(charset="utf-8", convertNumbers=False)
    protocol.factory = factory
    protocol.makeConnection(StringTransport())
    return protocol


class ProtocolTests(SynchronousTestCase):
    """
    L{_RedisProtocol}: replies parsed by hiredis, commands built by
    C{hiredis.pack_command} with txredisapi's bytes.
    """

    def setUp(self):
        self.protocol = _connected_protocol()
        self.base = txredisapi.BaseRedisProtocol(charset="utf-8")

    def test_hiredis_parser(self):
        """Connections parse replies with hiredis (txredisapi's HiredisProtocol)."""
        self.assertIsInstance(self.protocol, txredisapi.HiredisProtocol)

    def test_same_bytes_as_txredisapi(self):
        """Every kind of argument is sent exactly as txredisapi would send it."""
        for args in [
            ("SET", "seen:jti:z:abc", "1", "NX", "PX", 30000),
            ("XADD", "caracal.audit.events", "MAXLEN", "~", "1000000", "*", "id", "x"),
            ("SET", b"\xff\x00", "\u00e9\u2603"),
            ("X", 1.5),
            ("X", True),
            ("X", None),
            ("X", bytearray(b"ab")),
            ("X", -7),
        ]:
            self.assertEqual(self.protocol._build_command(*args), self.base._build_command(*args))

    def test_built_by_hiredis(self):
        """str, bytes and int arguments are packed by hiredis; a float is not."""
        packed = []
        original = hiredis.pack_command

        def pack(args):
            packed.append(args)
            return original(args)

        self.patch(hiredis, "pack_command", pack)
        self.protocol._build_command("SET", b"k", 1)
        self.protocol._build_command("X", 1.5)
        self.assertEqual(packed, [("SET", b"k", 1)])

    def test_unencodable_string(self):
        """A string UTF-8 cannot encode fails as in txredisapi (InvalidData)."""
        self.assertRaises(txredisapi.InvalidData, self.protocol._build_command, "SET", "\udcff")

    def test_replies(self):
        """Status, bulk, integer, nil, nested and error replies, in order, as before."""
        replies = [
            self.protocol.execute_command("PING"),
            self.protocol.execute_command("GET", "a"),
            self.protocol.execute_command("INCR", "b"),
            self.protocol.execute_command("GET", "c"),
            self.protocol.execute_command("XREAD", "STREAMS", "s", "0"),
            self.protocol.execute_command("SET", "d", "1"),
        ]
        self.protocol.dataReceived(
            b"+PONG\r\n$5\r\n12345\r\n:7\r\n$-1\r\n"
            b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nk\r\n$1\r\nv\r\n"
        )
        self.protocol.dataReceived(b"-READONLY You can't write against a read only replica.\r\n")
        values = [self.successResultOf(d) for d in replies[:-1]]
        self.assertEqual(values, ["PONG", "12345", 7, None, [["s", [["1-0", ["k", "v"]]]]]])
        error = self.failureResultOf(replies[-1], txredisapi.ResponseError)
        self.assertTrue(str(error.value).startswith("READONLY"))


def _pool_factory() -> _ReconnectingRedisFactory:
    """A lazy two-connection factory with the pool handler, as the gateway builds one."""
    return _ReconnectingRedisFactory(
        uuid="test",
        dbid=None,
        poolsize=2,
        isLazy=True,
        handler=_PoolHandler,
        charset="utf-8",
        convertNumbers=False,
    )


class PoolHandlerTests(SynchronousTestCase):
    """
    L{_PoolHandler} sends a command on a connection that is up at once, and
    otherwise behaves as txredisapi's handler.
    """

    def setUp(self):
        self.factory = _pool_factory()
        self.handler = self.factory.handler

    def add_connection(self) -> _RedisProtocol:
        protocol = _connected_protocol(self.factory)
        self.factory.addConnection(protocol)
        return protocol

    def test_sent_at_once(self):
        """A connection is up: the command is written before the call returns, its reply fires."""
        protocol = self.add_connection()
        self.patch(self.factory, "getConnection", lambda peek=False: self.fail("not at once"))
        d = self.handler.execute_command("SET", "k", "v")
        self.assertEqual(protocol.transport.value(), b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
        self.assertNoResult(d)
        protocol.dataReceived(b"+OK\r\n")
        self.assertEqual(self.successResultOf(d), "OK")

    def test_named_commands(self):
        """Commands called by name (C{set}) take the same way."""
        protocol = self.add_connection()
        d = self.handler.set("k", "v", only_if_not_exists=True, pexpire=1000)
        self.assertIn(b"NX", protocol.transport.value())
        protocol.dataReceived(b"$-1\r\n")
        self.assertIsNone(self.successResultOf(d))

    def test_waits_for_a_connection(self):
        """No connection yet: the command waits and is sent once one is up."""
        d = self.handler.execute_command("PING")
        self.assertNoResult(d)
        protocol = self.add_connection()
        self.assertEqual(protocol.transport.value(), b"*1\r\n$4\r\nPING\r\n")
        protocol.dataReceived(b"+PONG\r\n")
        self.assertEqual(self.successResultOf(d), "PONG")

    def test_dead_connection_skipped(self):
        """A connection that went down is not written to; a live one is used."""
        dead = self.add_connection()
        dead.connected = 0
        live = self.add_connection()
        for _ in range(10):
            self.handler.execute_command("PING")
        self.assertEqual(dead.transport.value(), b"")
        self.assertEqual(live.transport.value(), b"*1\r\n$4\r\nPING\r\n" * 10)

    def test_synchronous_error_is_a_failure(self):
        """A command that raises while being sent gives a failed Deferred, not an exception."""
        self.add_connection()
        d = self.handler.execute_command("SET", "\udcff")
        self.failureResultOf(d, txredisapi.InvalidData)

    def test_not_connected_after_stop(self):
        """A stopped pool with no connection fails the command, as txredisapi does."""
        self.factory.stopped = True
        self.failureResultOf(self.handler.execute_command("PING"), txredisapi.ConnectionError)

    def test_one_connection_carries_the_commands(self):
        """
        Commands go on the first connection that is up, so those of one
        reactor turn leave in one write; when it goes down, the next one up
        takes them.
        """
        first, second = self.add_connection(), self.add_connection()
        for _ in range(3):
            self.handler.execute_command("PING")
        self.assertEqual(first.transport.value(), b"*1\r\n$4\r\nPING\r\n" * 3)
        self.assertEqual(second.transport.value(), b"")
        first.connected = 0
        self.handler.execute_command("PING")
        self.assertEqual(second.transport.value(), b"*1\r\n$4\r\nPING\r\n")


class _Metrics:
    """Records L{caracal.gateway.metrics.Metrics.observe} calls."""

    def __init__(self):
        self.observed = []

    def observe(self, name, seconds, **labels):
        self.observed.append((name, seconds, labels))


class SendPackedTests(SynchronousTestCase):
    """
    L{_RedisProtocol.send_packed} and L{_PoolHandler.send_packed}: a command
    already packed, its reply on one Deferred fired by C{replyReceived},
    in order with the commands sent by C{execute_command}.
    """

    def setUp(self):
        self.clock = Clock()
        self.metrics = _Metrics()
        self.factory = _pool_factory()
        self.factory.metrics = self.metrics
        self.factory.clock = self.clock
        self.handler = self.factory.handler
        self.protocol = _connected_protocol(self.factory)

    def send(self, *args, command="SET"):
        return self.protocol.send_packed(hiredis.pack_command(args), command)

    def test_written_and_answered(self):
        """The bytes are written as given; the reply fires the Deferred, decoded as before."""
        d = self.send("SET", "k", "v", "PX", 1000, "NX")
        self.assertEqual(
            self.protocol.transport.value(),
            self.protocol._build_command("SET", "k", "v", "PX", 1000, "NX"),
        )
        self.assertNoResult(d)
        self.protocol.dataReceived(b"+OK\r\n")
        self.assertEqual(self.successResultOf(d), "OK")

    def test_nil_and_bulk(self):
        """A nil reply is None, a bulk reply a string (convertNumbers off)."""
        nil, bulk = self.send("SET", "a", "1"), self.send("XADD", "s", "*", "f", "v")
        self.protocol.dataReceived(b"$-1\r\n$3\r\n1-0\r\n")
        self.assertIsNone(self.successResultOf(nil))
        self.assertEqual(self.successResultOf(bulk), "1-0")

    def test_error_reply(self):
        """An error reply fails the Deferred with txredisapi's ResponseError."""
        d = self.send("SET", "k", "v")
        self.protocol.dataReceived(b"-ERR wrong\r\n")
        self.assertEqual(str(self.failureResultOf(d, txredisapi.ResponseError).value), "ERR wrong")

    def test_in_order_with_execute_command(self):
        """Packed commands and execute_command's share the connection's order of replies."""
        first = self.protocol.execute_command("PING")
        second = self.send("SET", "k", "v")
        third = self.protocol.execute_command("GET", "k")
        fourth = self.send("SET", "k", "w")
        self.protocol.dataReceived(b"+PONG\r\n+OK\r\n$1\r\nv\r\n$-1\r\n")
        self.assertEqual(
            [self.successResultOf(d) for d in (first, second, third, fourth)],
            ["PONG", "OK", "v", None],
        )

    def test_cancelled_keeps_its_place(self):
        """
        A cancelled command (its caller's time bound) still takes its own
        reply when it comes, which is dropped: the next command gets the next
        reply.
        """
        cancelled = self.send("SET", "a", "1")
        after = self.send("SET", "b", "1")
        cancelled.cancel()
        self.failureResultOf(cancelled, defer.CancelledError)
        self.protocol.dataReceived(b"+OK\r\n$-1\r\n")
        self.assertIsNone(self.successResultOf(after))

    def test_connection_lost(self):
        """Commands waiting when the connection is lost fail with ConnectionError."""
        d = self.send("SET", "k", "v")
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, txredisapi.ConnectionError)

    def test_timed(self):
        """Each command's time to reply is recorded under its name."""
        d = self.send("XADD", "s", "*", "f", "v", command="XADD")
        self.clock.advance(0.25)
        self.protocol.dataReceived(b"$3\r\n1-0\r\n")
        self.successResultOf(d)
        self.assertEqual(
            self.metrics.observed, [("redis_command_duration_seconds", 0.25, {"command": "XADD"})]
        )

    def test_handler_sends_on_first_connection_up(self):
        """The pool handler writes on its first connection up, at once."""
        down = _connected_protocol(self.factory)
        self.factory.addConnection(down)
        down.connected = 0
        self.factory.addConnection(self.protocol)
        args = ("SET", "k", "v")
        d = self.handler.send_packed(hiredis.pack_command(args), "SET", args)
        self.assertEqual(down.transport.value(), b"")
        self.assertEqual(self.protocol.transport.value(), hiredis.pack_command(args))
        self.protocol.dataReceived(b"+OK\r\n")
        self.assertEqual(self.successResultOf(d), "OK")

    def test_handler_waits_for_a_connection(self):
        """No connection up: the arguments wait for one through execute_command."""
        args = ("SET", "k", "v")
        d = self.handler.send_packed(b"never written", "SET", args)
        self.assertNoResult(d)
        self.factory.addConnection(self.protocol)
        self.assertEqual(self.protocol.transport.value(), self.protocol._build_command(*args))
        self.protocol.dataReceived(b"+OK\r\n")
        self.assertEqual(self.successResultOf(d), "OK")


class _SentinelFactory:
    """What L{_MasterProtocol} reads of its factory while it connects."""

    service_name = "caracal"
    metrics = None

    def __init__(self):
        self.sentinel_manager = type("Sentinels", (), {"masters": {"caracal": ("h", 1)}})()


class DemotedMasterTests(SynchronousTestCase):
    """
    A Sentinel master connection answered C{READONLY} (the master was
    demoted) is closed, whichever way the command was sent; the command
    still fails with the error.
    """

    def setUp(self):
        self.protocol = _MasterProtocol(charset="utf-8", convertNumbers=False)
        self.protocol.factory = _SentinelFactory()
        self.protocol.makeConnection(StringTransport())
        # The server confirms it is the master (ROLE).
        self.protocol.dataReceived(b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n")
        self.assertTrue(self.protocol._ready)
        self.protocol.transport.clear()

    def test_execute_command(self):
        """A command sent by execute_command."""
        d = self.protocol.execute_command("SET", "k", "v")
        self.protocol.dataReceived(b"-READONLY You can't write against a read only replica.\r\n")
        self.failureResultOf(d, txredisapi.ResponseError)
        self.assertTrue(self.protocol.transport.disconnecting)

    def test_send_packed(self):
        """A command sent packed."""
        d = self.protocol.send_packed(hiredis.pack_command(("SET", "k", "v")), "SET")
        self.protocol.dataReceived(b"-READONLY You can't write against a read only replica.\r\n")
        self.failureResultOf(d, txredisapi.ResponseError)
        self.assertTrue(self.protocol.transport.disconnecting)

    def test_other_errors(self):
        """Any other error leaves the connection open."""
        d = self.protocol.send_packed(hiredis.pack_command(("SET", "k", "v")), "SET")
        self.protocol.dataReceived(b"-ERR something else\r\n")
        self.failureResultOf(d, txredisapi.ResponseError)
        self.assertFalse(self.protocol.transport.disconnecting)


class PrivateNamesTests(SynchronousTestCase):
    """
    What L{_RedisProtocol.send_packed} relies on, outside the public APIs of
    txredisapi and Twisted: an upgrade changing any of it fails here.
    """

    def test_reply_queue(self):
        """Replies go in order to the Deferreds of C{replyQueue.waiting}, a list."""
        protocol = _connected_protocol()
        self.assertIsInstance(protocol.replyQueue.waiting, list)
        d = protocol.execute_command("PING")
        self.assertEqual(len(protocol.replyQueue.waiting), 1)
        protocol.dataReceived(b"+PONG\r\n")
        self.assertEqual(protocol.replyQueue.waiting, [])
        self.successResultOf(d)

    def test_pool_queue(self):
        """A pool's connections up are in C{connectionQueue.pending}."""
        factory = _ReconnectingRedisFactory(
            uuid="t", dbid=None, poolsize=1, isLazy=True, handler=_PoolHandler
        )
        protocol = _connected_protocol(factory)
        factory.addConnection(protocol)
        self.assertEqual(list(factory.connectionQueue.pending), [protocol])

    def test_cancelled_deferred_drops_its_result(self):
        """A Deferred without canceller, cancelled, ignores the one result that follows."""
        d = defer.Deferred()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        d.callback("late")
        self.assertRaises(defer.AlreadyCalledError, d.callback, "later")


class PackOrFallBackTests(SynchronousTestCase):
    """redisconn.send_packed: hiredis's bytes through a pool, or None for txredisapi's way."""

    def test_packed_and_sent(self):
        """The command's RESP bytes, its name and its arguments go to the pool's sender."""
        from caracal.gateway.redisconn import send_packed

        sent = []
        result = send_packed(lambda *a: sent.append(a) or "reply", ("SET", "k", "v", "PX", 5))
        self.assertEqual(result, "reply")
        self.assertEqual(
            sent,
            [(b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n$2\r\nPX\r\n$1\r\n5\r\n", "SET",
              ("SET", "k", "v", "PX", 5))],
        )  # fmt: skip

    def test_no_pool_or_unpackable(self):
        """No pool sender, or text UTF-8 cannot encode: None, nothing sent."""
        from caracal.gateway.redisconn import send_packed

        sent = []
        self.assertIsNone(send_packed(None, ("SET", "k", "v")))
        self.assertIsNone(send_packed(sent.append, ("SET", "k", "\udc80")))
        self.assertEqual(sent, [])
