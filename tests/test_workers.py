# -*- test-case-name: tests.test_workers -*-
"""
Tests for L{caracal.gateway.workers} and L{caracal.gateway.workerprocess}:
the supervisor's restarts, give-up, signal forwarding and stop with a fake
clock and fake processes; the log relay; the summed metrics with real files
in a temporary directory, handed to a worker's gateway by construction.
"""

from __future__ import annotations

import json
import os
import signal
import socket

from twisted.internet import error, task
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway import workerprocess, workers
from caracal.gateway.logs import ACCESS_NAMESPACE
from caracal.gateway.metrics import Metrics


class FakeReactor(task.Clock):
    """A clock that can also be stopped and called from a signal handler."""

    def __init__(self):
        super().__init__()
        self.stopped = 0
        self._exitSignal = None

    def stop(self):
        self.stopped += 1

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class FakeProcess:
    """The transport of one fake worker: records the signals it gets."""

    def __init__(self, pid: int):
        self.pid = pid
        self.signals: list[int] = []
        self.exited = False

    def signalProcess(self, number: int) -> None:
        if self.exited:
            raise error.ProcessExitedAlready()
        self.signals.append(number)


class Spawner:
    """A C{spawn(protocol, index)} recording every worker it started."""

    def __init__(self):
        self.started: list[tuple[int, workers.WorkerProtocol, FakeProcess]] = []
        self.fail = False

    def __call__(self, worker, index):
        if self.fail:
            raise OSError("fork failed")
        process = FakeProcess(1000 + len(self.started))
        worker.makeConnection(process)
        self.started.append((index, worker, process))
        return process

    def indexes(self) -> list[int]:
        return [index for index, _, _ in self.started]


def end(worker: workers.WorkerProtocol, code: int | None = 1, number: int | None = None) -> None:
    """Make C{worker}'s process end with exit C{code} or killed by signal C{number}."""
    worker.transport.exited = True
    # Twisted's process transport forgets its pid once the process ended.
    worker.transport.pid = None
    if number is not None:
        reason = error.ProcessTerminated(exitCode=None, signal=number)
    elif code == 0:
        reason = error.ProcessDone(0)
    else:
        reason = error.ProcessTerminated(exitCode=code)
    worker.processEnded(Failure(reason))


class SupervisorTests(SynchronousTestCase):
    """L{workers.WorkerSupervisor} with fake processes and a fake clock."""

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.spawner = Spawner()
        self.sighup: list = []
        self.sigusr1: list = []
        self.previous_sigusr1 = signal.SIG_DFL
        self.gave_up: list[int] = []
        self.log_events: list = []
        self.patch(workers, "log", Logger(observer=self.log_events.append))

    def supervisor(self, count: int = 2, **kwargs) -> workers.WorkerSupervisor:
        return workers.WorkerSupervisor(
            count,
            self.spawner,
            self.reactor,
            install_sighup=self.install_sighup,
            restore_sighup=lambda previous: self.sighup.append(("restore", previous)),
            give_up=self.gave_up.append,
            install_sigusr1=self.install_sigusr1,
            restore_sigusr1=lambda previous: self.sigusr1.append(("restore", previous)),
            **kwargs,
        )

    def install_sigusr1(self, handler):
        self.sigusr1.append(("install", handler))
        return self.previous_sigusr1

    def install_sighup(self, handler):
        self.sighup.append(("install", handler))
        return "previous handler"

    def logged(self) -> list[str]:
        return [formatEvent(event) for event in self.log_events]

    def test_sigusr1_reopens_own_log_then_forwards(self) -> None:
        """SIGUSR1: the previous handler (the log reopen) runs, then every worker gets it."""
        reopened = []
        self.previous_sigusr1 = lambda signum, frame: reopened.append(signum)
        supervisor = self.supervisor(2)
        supervisor.startService()
        [(action, handler)] = self.sigusr1
        self.assertEqual(action, "install")
        handler(signal.SIGUSR1, None)
        self.assertEqual(reopened, [signal.SIGUSR1])
        signalled = [w.transport.signals for w in supervisor.workers]
        self.assertEqual(signalled, [[signal.SIGUSR1], [signal.SIGUSR1]])
        supervisor.stopService()
        self.assertEqual(self.sigusr1[-1], ("restore", self.previous_sigusr1))

    def test_dead_worker_socket_released_and_rebound(self) -> None:
        """A dead worker's own socket closes at once; its replacement gets a fresh one."""
        closed = []
        fresh = iter([50, 51])
        slots = workers.ListenerSlots([10, 11], rebind=lambda: next(fresh), close=closed.append)
        supervisor = self.supervisor(2, listeners=slots)
        supervisor.startService()
        end(self.spawner.started[1][1], number=signal.SIGKILL)
        self.assertEqual((closed, slots.fds), ([11], [10, None]))
        self.reactor.advance(workers.RESTART_BACKOFF)
        self.assertEqual(slots.fd(1), 50)
        self.assertEqual(slots.fd(0), 10)

    def test_shared_socket_never_closed(self) -> None:
        """Without rebind (one shared socket) nothing is closed."""
        closed = []
        slots = workers.ListenerSlots([10, 10], close=closed.append)
        slots.release(1)
        self.assertEqual((closed, slots.fd(1)), ([], 10))

    def test_dead_worker_live_gauges_dropped(self) -> None:
        """A worker's end removes its live gauge files, not its counters."""
        directory = self.mktemp()
        prometheus = workers.prometheus_dir(directory)
        os.makedirs(prometheus)
        supervisor = self.supervisor(1, metrics_dir=directory)
        supervisor.startService()
        worker = self.spawner.started[0][1]
        names = [f"gauge_livesum_{worker.pid}.db", f"counter_{worker.pid}.db"]
        for name in names:
            with open(os.path.join(prometheus, name), "wb"):
                pass
        end(worker, code=1)
        self.assertEqual(os.listdir(prometheus), [names[1]])

    def test_starts_every_worker(self) -> None:
        """Starting spawns every worker, each with its index, and logs its pid."""
        supervisor = self.supervisor(3)
        supervisor.startService()
        self.assertEqual(self.spawner.indexes(), [0, 1, 2])
        self.assertEqual([w.index for w in supervisor.workers], [0, 1, 2])
        self.assertIn("worker 1 started (pid 1001)", self.logged())

    def test_unexpected_exit_restarts_after_backoff(self) -> None:
        """A worker that dies is replaced after the restart back-off."""
        supervisor = self.supervisor(2)
        supervisor.startService()
        _, worker, _ = self.spawner.started[1]
        end(worker, number=signal.SIGKILL)
        self.assertIsNone(supervisor.workers[1])
        self.assertIn("worker 1 (pid 1001) exited unexpectedly with status -9", self.logged())
        self.assertEqual(worker.pid, 1001)

        self.reactor.advance(workers.RESTART_BACKOFF - 0.01)
        self.assertEqual(self.spawner.indexes(), [0, 1])
        self.reactor.advance(0.01)
        self.assertEqual(self.spawner.indexes(), [0, 1, 1])
        replacement = self.spawner.started[2][1]
        self.assertIs(supervisor.workers[1], replacement)
        self.assertIsNot(replacement, worker)
        self.assertEqual(self.gave_up, [])
        self.assertEqual(self.reactor.stopped, 0)

    def test_clean_exit_is_unexpected_too(self) -> None:
        """A worker must only exit when told; exit 0 on its own is still restarted."""
        supervisor = self.supervisor(1)
        supervisor.startService()
        end(self.spawner.started[0][1], code=0)
        self.reactor.advance(workers.RESTART_BACKOFF)
        self.assertEqual(self.spawner.indexes(), [0, 0])

    def test_too_many_restarts_gives_up(self) -> None:
        """
        More than C{max_restarts} unexpected exits within the window: no more
        restarts, the reactor is stopped and the process will exit 1.
        """
        supervisor = self.supervisor(1, max_restarts=2, restart_window=60.0)
        supervisor.startService()
        for _ in range(2):
            end(self.spawner.started[-1][1])
            self.reactor.advance(workers.RESTART_BACKOFF)
        self.assertEqual(len(self.spawner.started), 3)
        self.assertEqual(self.gave_up, [])

        end(self.spawner.started[-1][1])
        self.assertTrue(supervisor.gave_up)
        self.assertEqual(self.gave_up, [1])
        self.assertEqual(self.reactor.stopped, 1)
        self.reactor.advance(workers.RESTART_BACKOFF * 10)
        self.assertEqual(len(self.spawner.started), 3, "no restart after giving up")
        self.assertIn(
            "workers exited 3 times within 60.0 s; giving up, caracal-gateway stops",
            self.logged(),
        )

        # The stop that follows keeps the failure: no exit-signal clearing.
        self.reactor._exitSignal = signal.SIGTERM
        self.successResultOf(supervisor.stopService())
        self.assertEqual(self.reactor._exitSignal, signal.SIGTERM)

    def test_exits_spread_out_are_tolerated(self) -> None:
        """Only the exits within the window count."""
        supervisor = self.supervisor(1, max_restarts=2, restart_window=60.0)
        supervisor.startService()
        for _ in range(6):
            end(self.spawner.started[-1][1])
            self.reactor.advance(31.0)
        self.assertEqual(len(self.spawner.started), 7)
        self.assertFalse(supervisor.gave_up)

    def test_spawn_failure_counts_as_an_exit(self) -> None:
        """A worker that cannot be spawned counts as an unexpected exit."""
        supervisor = self.supervisor(1, max_restarts=1)
        self.spawner.fail = True
        supervisor.startService()
        self.assertEqual(self.gave_up, [])
        self.reactor.advance(workers.RESTART_BACKOFF)
        self.assertEqual(self.gave_up, [1])
        self.assertIsNone(supervisor.workers[0])

    def test_sighup_forwarded_to_every_worker(self) -> None:
        """SIGHUP to the supervisor is sent on to every worker."""
        supervisor = self.supervisor(2)
        supervisor.startService()
        [(kind, handler)] = self.sighup
        self.assertEqual(kind, "install")
        handler(signal.SIGHUP, None)
        self.assertEqual(
            [process.signals for _, _, process in self.spawner.started],
            [[signal.SIGHUP], [signal.SIGHUP]],
        )

    def test_sighup_skips_a_worker_waiting_for_restart(self) -> None:
        """SIGHUP skips a slot whose worker is waiting to be restarted."""
        supervisor = self.supervisor(2)
        supervisor.startService()
        end(self.spawner.started[0][1])
        supervisor.signal_workers(signal.SIGHUP)
        self.assertEqual(self.spawner.started[1][2].signals, [signal.SIGHUP])
        self.assertEqual(self.spawner.started[0][2].signals, [])

    def test_stop_terminates_and_waits_for_every_worker(self) -> None:
        """
        Stopping sends SIGTERM to every worker, waits for all, removes the metrics directory and
        exits 0.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        supervisor = self.supervisor(2, metrics_dir=directory)
        supervisor.startService()
        self.reactor._exitSignal = signal.SIGTERM

        stopped = supervisor.stopService()
        self.assertEqual(
            [process.signals for _, _, process in self.spawner.started],
            [[signal.SIGTERM], [signal.SIGTERM]],
        )
        self.assertEqual(self.sighup[-1], ("restore", "previous handler"))
        end(self.spawner.started[0][1], code=0)
        self.assertNoResult(stopped)
        end(self.spawner.started[1][1], code=0)
        self.successResultOf(stopped)

        self.assertIsNone(self.reactor._exitSignal, "SIGTERM stop exits 0")
        self.assertFalse(os.path.exists(directory), "metrics directory removed")
        self.reactor.advance(workers.RESTART_BACKOFF * 10)
        self.assertEqual(len(self.spawner.started), 2, "no restart while stopping")
        self.assertEqual(self.gave_up, [])

    def test_stop_kills_workers_that_do_not_exit(self) -> None:
        """Workers still running at the stop timeout are killed."""
        supervisor = self.supervisor(2, stop_timeout=30.0)
        supervisor.startService()
        stopped = supervisor.stopService()
        end(self.spawner.started[0][1], code=0)
        self.reactor.advance(29.9)
        self.assertEqual(self.spawner.started[1][2].signals, [signal.SIGTERM])
        self.reactor.advance(0.1)
        self.assertEqual(self.spawner.started[1][2].signals, [signal.SIGTERM, signal.SIGKILL])
        self.assertEqual(self.spawner.started[0][2].signals, [signal.SIGTERM])
        self.assertNoResult(stopped)
        end(self.spawner.started[1][1], number=signal.SIGKILL)
        self.successResultOf(stopped)

    def test_stop_cancels_a_pending_restart(self) -> None:
        """Stopping cancels a pending restart."""
        supervisor = self.supervisor(1)
        supervisor.startService()
        end(self.spawner.started[0][1])
        self.successResultOf(supervisor.stopService())
        self.reactor.advance(workers.RESTART_BACKOFF * 2)
        self.assertEqual(len(self.spawner.started), 1)

    def test_sigint_stop_keeps_its_exit_signal(self) -> None:
        """A stop on SIGINT keeps its exit signal (only SIGTERM exits 0)."""
        supervisor = self.supervisor(1)
        supervisor.startService()
        self.reactor._exitSignal = signal.SIGINT
        stopped = supervisor.stopService()
        end(self.spawner.started[0][1], code=0)
        self.successResultOf(stopped)
        self.assertEqual(self.reactor._exitSignal, signal.SIGINT)


class RelayTests(SynchronousTestCase):
    """A worker's output, line by line, in the supervisor's log."""

    def setUp(self) -> None:
        self.events: list = []
        self.patch(workers, "log", Logger(observer=self.events.append))
        self.patch(
            workers, "_access_log", Logger(namespace=ACCESS_NAMESPACE, observer=self.events.append)
        )
        supervisor = workers.WorkerSupervisor(5, Spawner(), FakeReactor())
        self.worker = workers.WorkerProtocol(supervisor, 4)

    def test_access_record_keeps_its_fields_plus_the_worker(self) -> None:
        """A worker's access line is relayed whole, with its record and the worker's index."""
        record = {"request_id": "r-1", "status": 401, "path": "/x", "token_fingerprint": None}
        line = json.dumps(record).encode()
        # Split across two reads: only whole lines are relayed.
        self.worker.childDataReceived(1, line[:10])
        self.assertEqual(self.events, [])
        self.worker.childDataReceived(1, line[10:] + b"\n")
        [event] = self.events
        self.assertEqual(event["log_namespace"], ACCESS_NAMESPACE)
        self.assertEqual(event["access"], dict(record, worker=4))
        self.assertEqual(json.loads(formatEvent(event)), dict(record, worker=4))

    def test_event_keeps_its_level(self) -> None:
        """A worker's log event keeps its level and is marked with the worker."""
        entry = {"level": "error", "namespace": "x", "msg": "resource store reload failed"}
        self.worker.childDataReceived(1, json.dumps(entry).encode() + b"\n")
        [event] = self.events
        self.assertEqual(event["log_level"].name, "error")
        self.assertEqual(formatEvent(event), "worker 4: resource store reload failed")

    def test_traceback_follows_the_message(self) -> None:
        """A worker's traceback follows its message."""
        entry = {"level": "critical", "msg": "boom", "traceback": "Traceback...\nValueError\n"}
        self.worker.childDataReceived(1, json.dumps(entry).encode() + b"\n")
        self.assertEqual(formatEvent(self.events[0]), "worker 4: boom\nTraceback...\nValueError")

    def test_stderr_lines_are_warnings(self) -> None:
        """Each stderr line of a worker is relayed as a warning."""
        self.worker.childDataReceived(2, b"Traceback (most recent call last):\n  File x\n")
        self.assertEqual(
            [(e["log_level"].name, formatEvent(e)) for e in self.events],
            [
                ("warn", "worker 4: Traceback (most recent call last):"),
                ("warn", "worker 4:   File x"),
            ],
        )

    def test_unterminated_last_line_relayed_at_exit(self) -> None:
        """A last line without newline is relayed when the worker exits."""
        self.worker.makeConnection(FakeProcess(5))
        self.worker.childDataReceived(2, b"ImportError: no module")
        self.assertEqual(self.events, [])
        end(self.worker, code=1)
        self.assertIn("worker 4: ImportError: no module", [formatEvent(e) for e in self.events])


def snapshot_with(counts: dict, gauges: dict | None = None, observed: float | None = None):
    """A L{Metrics} snapshot with C{counts} added, the C{gauges} set."""
    metrics = Metrics()
    for name, amount in counts.items():
        metrics.increment(name, amount)
    for name, value in (gauges or {}).items():
        metrics.gauge(name, lambda value=value: value)
    if observed is not None:
        metrics.increment("upstream_errors")
    return metrics.snapshot()


class SharedMetricsTests(SynchronousTestCase):
    """Every worker's counters summed through the shared directory."""

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    def shared(self, index: int, counts: dict, gauges=None, observed=None):
        return workers.SharedMetrics(
            self.directory, index, lambda: snapshot_with(counts, gauges, observed)
        )

    def test_counters_and_histograms_summed_gauges_local(self) -> None:
        """Counters and histograms are summed across workers; gauges are the answering worker's."""
        other = self.shared(1, {"requests_total": 7}, {"bindings_loaded": 3}, observed=0.2)
        other.publish()
        mine = self.shared(
            0, {"requests_total": 5, "requests_denied": 2}, {"bindings_loaded": 3}, observed=0.3
        )
        merged = mine.snapshot()
        self.assertEqual(merged["requests_total"], 12)
        self.assertEqual(merged["requests_denied"], 2)
        self.assertEqual(merged["bindings_loaded"], 3, "a gauge is not summed")
        self.assertEqual(merged["upstream_errors"], 2)

    def test_own_file_ignored_in_favour_of_live_counters(self) -> None:
        """A worker answers with its live counters, not its own published file."""
        mine = self.shared(0, {"requests_total": 5})
        mine.publish()
        self.assertEqual(mine.snapshot()["requests_total"], 5)

    def test_unreadable_files_skipped(self) -> None:
        """Truncated files and temporary files are skipped."""
        with open(os.path.join(self.directory, "1.json"), "w") as f:
            f.write('{"requests_total": ')
        with open(os.path.join(self.directory, "2.json.123.tmp"), "w") as f:
            f.write('{"requests_total": 100}')
        self.assertEqual(self.shared(0, {"requests_total": 5}).snapshot()["requests_total"], 5)

    def test_publish_is_atomic_json(self) -> None:
        """Publishing writes the whole JSON file in one rename."""
        self.shared(2, {"upstream_errors": 4}).publish()
        self.assertEqual(os.listdir(self.directory), ["2.json"])
        with open(os.path.join(self.directory, "2.json")) as f:
            self.assertEqual(json.load(f)["upstream_errors"], 4)

    def test_restarted_worker_carries_its_predecessor_counts(self) -> None:
        """A restarted worker carries on from its predecessor's counts, so sums never go back."""
        self.shared(1, {"requests_total": 9}, {"revocations_active": 2}).publish()
        replacement = self.shared(1, {"requests_total": 1}, {"revocations_active": 4})
        self.assertEqual(replacement.own()["requests_total"], 10)
        self.assertEqual(replacement.own()["revocations_active"], 4)
        replacement.publish()
        self.assertEqual(self.shared(0, {}).snapshot()["requests_total"], 10)

    def test_periodic_publishing_and_final_write(self) -> None:
        """Counts are published periodically and once more when publishing stops."""
        counts = {"requests_total": 0}
        shared = workers.SharedMetrics(self.directory, 0, lambda: snapshot_with(counts))
        reader = self.shared(1, {})
        clock = task.Clock()
        shared.start(clock, interval=0.5)
        self.assertEqual(reader.snapshot()["requests_total"], 0)
        counts["requests_total"] = 3
        clock.advance(0.49)
        self.assertEqual(reader.snapshot()["requests_total"], 0)
        clock.advance(0.01)
        self.assertEqual(reader.snapshot()["requests_total"], 3)
        counts["requests_total"] = 4
        shared.stop()
        self.assertEqual(reader.snapshot()["requests_total"], 4)
        self.assertEqual(clock.getDelayedCalls(), [])

    def build_worker(self, metrics_dir):
        """
        Worker 0's gateway from L{workerprocess.build_worker_gateway}, with a
        stand-in for L{build_gateway} that records what it was handed.
        """
        handed = {}

        def build(config, reactor, **kwargs):
            handed.update(kwargs)
            return "gateway"

        gateway, shared = workerprocess.build_worker_gateway(
            "config", task.Clock(), 0, metrics_dir, build=build
        )
        self.assertEqual(gateway, "gateway")
        return handed, shared

    def test_metrics_endpoint_built_with_the_summed_snapshot(self) -> None:
        """A worker's gateway is built to answer /metrics with every worker's counters."""
        self.shared(1, {"requests_total": 6}).publish()
        handed, shared = self.build_worker(self.directory)
        handed["metrics"].increment("requests_total")
        self.assertEqual(handed["metrics_snapshot"], shared.snapshot)
        self.assertEqual(handed["metrics_snapshot"]()["requests_total"], 7)

    def test_without_a_directory_the_worker_answers_its_own(self) -> None:
        """Without a metrics directory nothing is shared: /metrics is the worker's own."""
        handed, shared = self.build_worker(None)
        self.assertIsNone(shared)
        self.assertNotIn("metrics_snapshot", handed)
        self.assertIsInstance(handed["metrics"], Metrics)

    def test_publishing_refreshes_the_prometheus_gauges(self) -> None:
        """Each publication sets the worker's read-on-demand gauges (another may be scraped)."""
        from tests.support.metrics import sample_sum

        handed, shared = self.build_worker(self.directory)
        metrics = handed["metrics"]
        metrics.gauge("revocation_lag_seconds", lambda: 3.5)
        name = "caracal_gateway_revocation_lag_seconds"
        self.assertEqual(sample_sum(metrics, name), 0)
        shared.publish()
        self.assertEqual(sample_sum(metrics, name), 3.5)


class ListenWhenServingTests(SynchronousTestCase):
    """A worker's socket joins the port's group only when the worker listens."""

    def test_listen_then_adopt(self) -> None:
        """listen() makes the bound socket listen, then hands over to the wrapped endpoint."""
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        adopted = []

        class Endpoint:
            def listen(self, factory):
                listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                adopted.append((factory, listening))
                return "port"

        endpoint = workers.ListenWhenServing(Endpoint(), sock.fileno(), 16)
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN), 0)
        self.assertEqual(endpoint.listen("factory"), "port")
        self.assertEqual(adopted, [("factory", 1)])
        self.assertNotEqual(sock.fileno(), -1, "the descriptor stays open")


class SpawnTests(SynchronousTestCase):
    """The real worker's command line and inherited descriptors."""

    def test_argv(self) -> None:
        """
        A worker runs this interpreter on the workers module with its index and metrics directory.
        """
        argv = workers.worker_argv(2, "/run/m", executable="/usr/bin/python3")
        self.assertEqual(
            argv,
            [
                "/usr/bin/python3",
                "-m",
                "caracal.gateway.workerprocess",
                "--fd",
                "3",
                "--index",
                "2",
                "--parent-pid",
                str(os.getpid()),
                "--metrics-dir",
                "/run/m",
            ],
        )
        parsed = workers.parse_arguments(argv[3:])
        self.assertEqual((parsed.fd, parsed.index, parsed.metrics_dir), (3, 2, "/run/m"))

    def test_listener_inherited_as_fd_3_with_the_environment(self) -> None:
        """A worker inherits the listening socket as fd 3, and the environment."""
        calls = []

        class Reactor:
            def spawnProcess(self, proto, executable, args, env, childFDs):
                calls.append((proto, executable, args, env, childFDs))
                return "transport"

        spawn = workers.spawn_worker(Reactor(), 11, None, environ={"PORT": "8081"})
        self.assertEqual(spawn("protocol", 0), "transport")
        [(proto, executable, args, env, child_fds)] = calls
        self.assertEqual(proto, "protocol")
        self.assertEqual(executable, args[0])
        self.assertNotIn("--metrics-dir", args)
        self.assertEqual(env, {"PORT": "8081"})
        self.assertEqual(child_fds, {0: "w", 1: "r", 2: "r", 3: 11})

    def test_metrics_socket_inherited_as_fd_4(self) -> None:
        """
        With METRICS_ADDRESS, every worker inherits its socket as fd 4 and
        is told so on its command line (each accepts there, like on fd 3).
        """
        calls = []

        class Reactor:
            def spawnProcess(self, proto, executable, args, env, childFDs):
                calls.append((args, childFDs))
                return "transport"

        spawn = workers.spawn_worker(Reactor(), 11, None, environ={}, metrics_fd=12)
        spawn("protocol", 1)
        [(args, child_fds)] = calls
        self.assertEqual(child_fds, {0: "w", 1: "r", 2: "r", 3: 11, 4: 12})
        self.assertEqual(args[args.index("--metrics-fd") + 1], "4")
        self.assertEqual(workers.parse_arguments(args[3:]).metrics_fd, 4)
        self.assertIsNone(workers.parse_arguments(["--index", "0"]).metrics_fd)

    def test_exit_after_shutdown_registers_an_exit(self) -> None:
        """exit_after_shutdown makes the process exit with the status once Python has shut down."""
        registered = []
        exits = []
        self.patch(workers.atexit, "register", registered.append)
        self.patch(workers.os, "_exit", exits.append)
        workers.exit_after_shutdown(1)
        self.assertEqual(exits, [], "not before twistd is done")
        [leave] = registered
        leave()
        self.assertEqual(exits, [1])
