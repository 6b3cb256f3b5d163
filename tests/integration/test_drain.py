# -*- test-case-name: tests.integration.test_drain -*-
"""
SIGTERM with a proxied request in flight, on real processes (SPEC 11): a
real C{twistd caracal-gateway} over TLS in dev mode, wired to a temporary
Postgres database, the shared Redis, the dev STS and a local upstream, all
on 127.0.0.1 (L{tests.support.replicas.ReplicaSet} provides them).

The in-flight request is a server-sent-events stream the test drives
through the upstream (L{tests.support.upstreams.SSEStream}): the gateway has
forwarded it and the client has read its first event when SIGTERM arrives;
the rest is sent only after the test has seen the gateway stop accepting.

Cutting a request that outlives the drain bound (25 s, not configurable)
is tested in memory, on a clock, in L{tests.test_tap}.
"""

from __future__ import annotations

import os
import signal
import time

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from tests.support.process import (
    GatewayProcess,
    Subreaper,
    free_port,
    kill_pid,
    pid_alive,
    port_accepts,
    read_pidfile,
)
from tests.support.replicas import RESOURCE, ReplicaSet
from tests.support.waiting import became_true

#: How long a gateway with two workers may take to answer its first /health.
WORKERS_START_TIMEOUT = 30.0

#: How soon after SIGTERM a new connection must be refused.
REFUSAL_BOUND = 2.0

FIRST_EVENT = b'event: progress\ndata: {"step": 1}\n\n'
LAST_EVENT = b'event: result\ndata: {"done": true}\n\n'


class DrainTests(TestCase):
    """SIGTERM: stop accepting, finish what is in flight, exit 0, pidfile gone."""

    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.replicas = ReplicaSet(self.mktemp(), reactor=reactor)
        self.addCleanup(self.replicas.stop)
        yield self.replicas.start(count=0)

    def spawn(self, args: tuple[str, ...]) -> GatewayProcess:
        port = free_port()
        directory = os.path.join(self.replicas.directory, f"drain-{port}")
        os.makedirs(directory)
        gateway = GatewayProcess(
            self.replicas.environ(port),
            args,
            cwd=directory,
            root=self.replicas.root,
            reactor=reactor,
        )
        self.addCleanup(gateway.kill)
        return gateway

    @defer.inlineCallbacks
    def open_stream(self, gateway: GatewayProcess, method: str = "POST"):
        """
        Start a proxied SSE call through C{gateway} and let its first event
        reach the client. Fires with C{(response, stream, chunks, body_done)}.
        """
        opened = self.replicas.upstream.next_sse()
        response = yield treq.request(
            method,
            self.replicas.url(gateway, "/tools/sse"),
            headers={
                b"Authorization": [b"Bearer " + self.replicas.mint().encode()],
                b"X-Caracal-Resource": [RESOURCE.encode()],
                b"Content-Type": [b"application/json"],
            },
            data=b"{}" if method == "POST" else None,
            agent=self.replicas.agent,
            timeout=30,
        )
        self.assertEqual(response.code, 200)
        stream = yield opened
        chunks: list[bytes] = []
        body_done = treq.collect(response, chunks.append)
        stream.send(FIRST_EVENT)
        arrived = yield became_true(lambda: b"".join(chunks) == FIRST_EVENT, 5)
        self.assertTrue(arrived, f"first event not streamed: {chunks!r}")
        return response, stream, chunks, body_done

    @defer.inlineCallbacks
    def drain(self, gateway: GatewayProcess, terminate, alive):
        """
        The SPEC 11 sequence with one request in flight; C{terminate()}
        sends SIGTERM, C{alive()} tells whether the gateway still runs.
        """
        yield self.replicas.serving(gateway)
        _response, stream, chunks, body_done = yield self.open_stream(gateway)

        terminate()
        sent = time.monotonic()
        refused = yield became_true(
            lambda: port_accepts("127.0.0.1", gateway.port).addCallback(lambda ok: not ok),
            REFUSAL_BOUND,
        )
        self.assertTrue(refused, f"still accepting {REFUSAL_BOUND} s after SIGTERM")
        self.assertLess(time.monotonic() - sent, REFUSAL_BOUND)
        # Refusing new connections is not stopping: the stream is still open
        # on both sides and the process waits for it.
        self.assertTrue(alive(), "gateway exited with a request in flight")
        self.assertTrue(stream.open, "gateway dropped the in-flight upstream request")
        self.assertNoResult(body_done)

        stream.send(LAST_EVENT)
        stream.finish()
        yield body_done
        self.assertEqual(b"".join(chunks), FIRST_EVENT + LAST_EVENT)

    def assertCleanLog(self, log: str) -> None:
        self.assertIn("caracal-gateway no longer accepting connections", log)
        self.assertIn("draining 1 in-flight requests (up to 25.0 s)", log)
        self.assertIn("caracal-gateway stopped", log)
        self.assertNotIn("drain timed out", log)
        self.assertNotIn("Traceback", log)

    @defer.inlineCallbacks
    def test_foreground(self):
        """
        C{twistd -n caracal-gateway}: after SIGTERM new connections are
        refused at once, the streamed call in flight completes with its whole
        body, then the process exits 0 and removes its pidfile.
        """
        gateway = self.spawn(("-n", "caracal-gateway"))
        yield gateway.start()
        pidfile = os.path.join(gateway.cwd, "twistd.pid")
        self.assertTrue(os.path.exists(pidfile))

        yield self.drain(
            gateway, lambda: gateway.send_signal(signal.SIGTERM), lambda: gateway.running
        )
        status = yield gateway.wait(10)
        log = (gateway.output + gateway.errors).decode(errors="replace")
        self.assertEqual(status, 0, log)
        self.assertFalse(os.path.exists(pidfile))
        self.assertCleanLog(log)

    @defer.inlineCallbacks
    def test_daemon(self):
        """
        C{twistd --pidfile P --logfile L caracal-gateway}: the same drain,
        then exit 0 with the pidfile removed.
        """
        Subreaper.for_test(self)

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        pidfile = os.path.join(directory, "gateway.pid")
        logfile = os.path.join(directory, "gateway.log")
        launcher = self.spawn(("--pidfile", pidfile, "--logfile", logfile, "caracal-gateway"))
        yield launcher.start(daemon=True)
        pid = read_pidfile(pidfile)
        self.addCleanup(kill_pid, pid)
        self.assertNotEqual(pid, launcher.pid)

        yield self.drain(launcher, lambda: os.kill(pid, signal.SIGTERM), lambda: pid_alive(pid))
        status = yield Subreaper.wait_exit(pid, timeout=10)
        with open(logfile) as f:
            log = f.read()
        self.assertEqual(status, 0, log)
        self.assertFalse(os.path.exists(pidfile))
        self.assertCleanLog(log)

    @defer.inlineCallbacks
    def test_workers_end_standing_get_stream(self):
        """
        SPEC 13 with C{--workers 2}: a standing GET event stream, idle
        between events, is ended by the gateway as soon as SIGTERM arrives
        (a whole message, the upstream connection released), so the
        process exits 0 at once instead of after the 25 s drain bound.
        """
        gateway = self.spawn(("-n", "caracal-gateway", "--workers", "2"))
        # Two workers take longer to come up than one on a busy machine.
        yield gateway.start(timeout=WORKERS_START_TIMEOUT)
        yield self.replicas.serving(gateway)
        _response, stream, chunks, body_done = yield self.open_stream(gateway, method="GET")
        sent = time.monotonic()
        gateway.send_signal(signal.SIGTERM)
        yield body_done
        self.assertEqual(b"".join(chunks), FIRST_EVENT)
        closed = yield became_true(lambda: not stream.open, 5)
        self.assertTrue(closed, "the upstream stream was not released")
        status = yield gateway.wait(20)
        log = (gateway.output + gateway.errors).decode(errors="replace")
        self.assertEqual(status, 0, log)
        self.assertLess(time.monotonic() - sent, 10, log)
        self.assertIn('"upstream_cut":"drained"', log)
        self.assertNotIn("drain timed out", log)
