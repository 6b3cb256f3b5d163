# -*- test-case-name: tests.integration.test_workers -*-
"""
C{twistd caracal-gateway --workers 2} as a real process tree on a free
127.0.0.1 port: both workers serve the one port, C{/metrics} answered by
either sums both, a killed worker is replaced while the port keeps
serving, and SIGTERM to the daemon stops every worker, removes the pidfile
and exits 0.
"""

from __future__ import annotations

import json
import os
import re
import signal

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from caracal.gateway import workers
from tests.support.clients import fresh_connection_client
from tests.support.process import (
    GatewayProcess,
    Subreaper,
    child_pids,
    free_port,
    gateway_environ,
    kill_pid,
    own_database,
    pid_alive,
    process_state,
    read_pidfile,
)
from tests.support.waiting import became_true

TWO_WORKERS = ("-n", "caracal-gateway", "--workers", "2")

#: Workers start a full interpreter each, then connect to their backends.
START_TIMEOUT = 30.0


def listening_workers(output: bytes) -> set[int]:
    """The indexes of the workers that logged they listen (each writes its own lines)."""
    return {
        int(index)
        for index in re.findall(
            rb'"msg":"caracal-gateway listening on[^\n]*"worker":(\d+)\}', output
        )
    }


def serving_workers(output: bytes) -> set[int]:
    """
    The indexes of the workers whose access lines for C{/tool/...} were
    written (the start's C{/health} probes do not count).
    """
    return {int(index) for index in re.findall(rb'"path":"/tool/[^\n]*"worker":(\d+)\}', output)}


class WorkersTests(TestCase):
    timeout = 120

    def directory(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def gateway(self, environ, args=TWO_WORKERS, root=None) -> GatewayProcess:
        environ = own_database(self, environ)
        process = GatewayProcess(environ, args, cwd=self.directory(), root=root)
        self.addCleanup(self.kill, process)
        return process

    @defer.inlineCallbacks
    def kill(self, process: GatewayProcess):
        children = child_pids(process.pid) if process.pid else []
        yield process.kill()
        for pid in children:
            kill_pid(pid)

    def client(self, root=None):
        """A treq client opening a new connection per request, so both workers get some."""
        return fresh_connection_client(root)

    @defer.inlineCallbacks
    def get(self, client, url: str):
        response = yield client.get(url, timeout=10)
        body = yield response.content()
        return response.code, body

    @defer.inlineCallbacks
    def both_listening(self, gateway: GatewayProcess):
        ready = yield became_true(
            lambda: listening_workers(gateway.output) == {0, 1}, START_TIMEOUT, reactor
        )
        self.assertTrue(ready, gateway.output.decode(errors="replace")[-3000:])

    @defer.inlineCallbacks
    def test_both_workers_serve_and_metrics_are_summed(self):
        """With --workers 2 both workers serve and /metrics sums them."""
        port = free_port()
        environ, _ = gateway_environ(self.directory(), port, tls=False, LOG_LEVEL="info")
        gateway = self.gateway(environ)
        yield gateway.start(timeout=START_TIMEOUT)
        yield self.both_listening(gateway)
        client = self.client()
        base = f"http://127.0.0.1:{port}"

        # Concurrent batches of tokenless requests (401 each, counted in
        # requests_total) until the access lines show both workers served.
        sent = 0
        for _ in range(10):
            answers = yield defer.gatherResults(
                [self.get(client, f"{base}/tool/{sent + n}") for n in range(20)]
            )
            sent += 20
            self.assertEqual({code for code, _ in answers}, {401})
            both = yield became_true(lambda: len(serving_workers(gateway.output)) == 2, 1, reactor)
            if both:
                break
        self.assertEqual(serving_workers(gateway.output), {0, 1})

        @defer.inlineCallbacks
        def summed():
            code, body = yield self.get(client, f"{base}/metrics")
            self.assertEqual(code, 200)
            return json.loads(body)["requests_total"] == sent

        # Workers publish every 0.5 s: an answer may miss the other
        # worker's last half second. Once that has passed, every answer,
        # whichever worker gives it, is the sum.
        self.assertTrue((yield became_true(summed, 5, reactor)), f"{sent} requests sent")
        yield task.deferLater(reactor, 3 * workers.METRICS_INTERVAL, lambda: None)
        for _ in range(10):
            code, body = yield self.get(client, f"{base}/metrics")
            self.assertEqual(
                json.loads(body)["requests_total"],
                sent,
                gateway.output.decode(errors="replace")[-4000:],
            )
        self.assertEqual(listening_workers(gateway.output), {0, 1})

        self.assertEqual((yield gateway.stop()), 0, gateway.errors.decode(errors="replace"))

    @defer.inlineCallbacks
    def test_keep_alive_connections_spread_and_one_scrape_totals(self):
        """
        16 keep-alive connections land on both workers (a socket each, so
        the kernel spreads them), and one Prometheus scrape of either
        worker counts every request of both.
        """
        port = free_port()
        environ, _ = gateway_environ(self.directory(), port, tls=False, LOG_LEVEL="info")
        gateway = self.gateway(environ)
        yield gateway.start(timeout=START_TIMEOUT)
        yield self.both_listening(gateway)
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 16
        self.addCleanup(pool.closeCachedConnections)
        client = treq.client.HTTPClient(Agent(reactor, pool=pool))
        base = f"http://127.0.0.1:{port}"
        sent = 0
        for _ in range(4):
            answers = yield defer.gatherResults(
                [self.get(client, f"{base}/tool/{sent + n}") for n in range(16)]
            )
            sent += 16
            self.assertEqual({code for code, _ in answers}, {401})
        both = yield became_true(lambda: serving_workers(gateway.output) == {0, 1}, 5, reactor)
        self.assertTrue(both, gateway.output.decode(errors="replace")[-3000:])

        response = yield client.get(
            f"{base}/metrics", headers={b"Accept": [b"text/plain"]}, timeout=10
        )
        text = yield response.text()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        requests = sum(
            s.value
            for s in families["caracal_gateway_requests"].samples
            if s.name == "caracal_gateway_requests_total"
        )
        self.assertEqual(requests, sent)
        histogram = sum(
            s.value
            for s in families["caracal_gateway_request_duration_seconds"].samples
            if s.name.endswith("_count")
        )
        self.assertEqual(histogram, sent)
        yield pool.closeCachedConnections()

        # SIGUSR1 (logrotate's) reaches workers that log to stdout: ignored, not fatal.
        children = child_pids(gateway.pid)
        os.kill(gateway.pid, signal.SIGUSR1)
        for _ in range(5):
            self.assertEqual((yield gateway.health()), 200)
        self.assertEqual(child_pids(gateway.pid), children)
        self.assertNotIn(b"exited unexpectedly", gateway.output)
        self.assertEqual((yield gateway.stop()), 0, gateway.errors.decode(errors="replace"))

    @defer.inlineCallbacks
    def test_workers_write_their_own_log_and_reopen_it(self):
        """
        With the levelled logger and CARACAL_LOG_FILE, workers append their
        own lines to the file (the supervisor relays nothing) and, after a
        logrotate-style rename and SIGUSR1 to the supervisor, to the new one.
        """
        port = free_port()
        directory = self.directory()
        logfile = os.path.join(directory, "gateway.log")
        environ, _ = gateway_environ(
            directory, port, tls=False, LOG_LEVEL="info", CARACAL_LOG_FILE=logfile
        )
        args = ("-n", "--logger", "caracal.gateway.logfile.observer", *TWO_WORKERS[1:])
        gateway = self.gateway(environ, args)
        yield gateway.start(timeout=START_TIMEOUT)

        def written() -> bytes:
            with open(logfile, "rb") as f:
                return f.read()

        self.assertTrue(
            (
                yield became_true(
                    lambda: listening_workers(written()) == {0, 1}, START_TIMEOUT, reactor
                )
            )
        )
        client = self.client()
        base = f"http://127.0.0.1:{port}"
        for n in range(4):
            yield self.get(client, f"{base}/tool/before-{n}")
        self.assertTrue((yield became_true(lambda: b"/tool/before-3" in written(), 5, reactor)))
        self.assertNotIn(b"worker 0:", written(), "nothing relayed by the supervisor")

        os.rename(logfile, logfile + ".1")
        os.kill(gateway.pid, signal.SIGUSR1)

        def reopened_by_both() -> bool:
            try:
                text = written()
            except FileNotFoundError:
                return False
            return len(re.findall(rb'"msg":"log file reopened[^\n]*"worker":', text)) == 2

        self.assertTrue((yield became_true(reopened_by_both, 10, reactor)))
        for n in range(8):
            yield self.get(client, f"{base}/tool/after-{n}")
        self.assertTrue((yield became_true(lambda: b"/tool/after-7" in written(), 5, reactor)))
        with open(logfile + ".1", "rb") as f:
            self.assertNotIn(b"/tool/after-", f.read())
        self.assertEqual((yield gateway.stop()), 0, gateway.errors.decode(errors="replace"))

    @defer.inlineCallbacks
    def test_killed_worker_is_restarted(self):
        """A SIGKILLed worker is replaced while the port keeps serving."""
        port = free_port()
        environ, root = gateway_environ(self.directory(), port, LOG_LEVEL="info")
        gateway = self.gateway(environ, root=root)
        yield gateway.start(timeout=START_TIMEOUT)
        yield self.both_listening(gateway)
        children = child_pids(gateway.pid)
        self.assertEqual(len(children), 2, children)

        victim = children[0]
        os.kill(victim, signal.SIGKILL)

        def noticed() -> bool:
            return f"(pid {victim}) exited unexpectedly".encode() in gateway.output

        # Once the supervisor saw it die (SIGCHLD: at once), the dead worker's
        # socket is closed and the other worker alone serves the port, every
        # connection (before that, one hashed to the dead socket is reset).
        self.assertTrue((yield became_true(noticed, 10, reactor)))
        for _ in range(10):
            self.assertEqual((yield gateway.health()), 200)

        def replaced():
            now = child_pids(gateway.pid)
            return len(now) == 2 and victim not in now

        self.assertTrue((yield became_true(replaced, START_TIMEOUT, reactor)))
        self.assertRegex(
            gateway.output.decode(errors="replace"),
            rf"worker \d \(pid {victim}\) exited unexpectedly with status -9",
        )

        def relistening():
            return len(re.findall(rb"caracal-gateway listening on", gateway.output)) == 3

        self.assertTrue((yield became_true(relistening, START_TIMEOUT, reactor)))
        for _ in range(10):
            self.assertEqual((yield gateway.health()), 200)

        self.assertEqual((yield gateway.stop()), 0, gateway.errors.decode(errors="replace"))
        for pid in child_pids(gateway.pid) + children:
            self.assertFalse(pid_alive(pid))

    @defer.inlineCallbacks
    def test_daemon_sigterm_stops_every_worker(self):
        """SIGTERM to the daemon stops every worker and exits 0."""
        Subreaper.for_test(self)

        port = free_port()
        directory = self.directory()
        environ, root = gateway_environ(directory, port, LOG_LEVEL="info")
        pidfile = os.path.join(directory, "gateway.pid")
        logfile = os.path.join(directory, "gateway.log")
        launcher = self.gateway(
            environ,
            ("--pidfile", pidfile, "--logfile", logfile, "caracal-gateway", "--workers", "2"),
            root=root,
        )
        yield launcher.start(timeout=START_TIMEOUT, daemon=True)
        self.assertEqual(launcher.errors, b"")

        pid = read_pidfile(pidfile)
        self.addCleanup(kill_pid, pid)

        def two_workers():
            with open(logfile, "rb") as f:
                return listening_workers(f.read()) == {0, 1}

        self.assertTrue((yield became_true(two_workers, START_TIMEOUT, reactor)))
        children = child_pids(pid)
        self.assertEqual(len(children), 2, children)
        for worker in children:
            self.addCleanup(kill_pid, worker)
        self.assertEqual((yield launcher.health()), 200)

        os.kill(pid, signal.SIGTERM)
        try:
            status = yield Subreaper.wait_exit(pid, timeout=40)
        except TimeoutError as stuck:
            with open(logfile) as f:
                tail = "".join(f.readlines()[-15:])
            workers = "; ".join(f"worker {w}: {process_state(w)}" for w in children)
            self.fail(f"{stuck}\n{workers}\nlog tail:\n{tail}")
        with open(logfile) as f:
            log = f.read()
        self.assertEqual(status, 0, log)
        self.assertFalse(os.path.exists(pidfile))
        for worker in children:
            self.assertFalse(pid_alive(worker), f"worker {worker} outlived the daemon")
        self.assertIn("worker 0 exited with status 0", log)
        self.assertIn("worker 1 exited with status 0", log)
        self.assertIn("Server Shut Down.", log)
        self.assertNotIn("Traceback", log)
