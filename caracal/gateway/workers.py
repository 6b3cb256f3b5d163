# -*- test-case-name: tests.test_workers -*-
"""
C{twistd caracal-gateway --workers N}: N worker processes share one port.

The twistd process (the only one with the pidfile) binds N listening
sockets on the port, each with C{SO_REUSEPORT}, in
L{caracal.gateway.tap.makeService}, then does not serve: its
L{WorkerSupervisor} spawns N workers (C{python -m caracal.gateway.workerprocess}),
worker I inheriting socket I as file descriptor 3 and the configuration as
its environment. The kernel spreads new connections over the sockets by a
hash of their addresses, so keep-alive clients end up spread over the
workers instead of piling on the one that happened to be awake. A restarted
worker inherits its slot's socket again (connections that arrived meanwhile
wait in its backlog).

The supervisor does no work per request: workers write their own log lines
(L{caracal.gateway.tap.worker_log_destination}: the same file as the
supervisor, reopened on the SIGUSR1 the supervisor forwards, or the
inherited standard output), and C{/metrics} is answered by the workers
from shared files.

Each worker (L{caracal.gateway.workerprocess.main}) reads the configuration the same way, loads the
certificate, builds its own gateway (its own Redis, Postgres and STS
connections) and serves with L{caracal.gateway.tap.GatewayService}: SIGHUP
and the file watch reload the certificate, SIGTERM drains in-flight
requests (25 s) and exits 0. It writes its log as JSON lines on stdout.

The supervisor:
 - relays each worker's stderr (a traceback at start) into its own log,
   marked with the worker's index, and its stdout only when the log goes
   where workers cannot write themselves (syslog, another C{--logger});
 - restarts a worker that exits while it is not stopping, after
   L{RESTART_BACKOFF} seconds; when workers exited unexpectedly more than
   L{MAX_RESTARTS} times within L{RESTART_WINDOW} seconds the configuration
   or the host is broken, restarting again would only hide that: it gives
   up, stops everything and the twistd process exits with status 1 (after
   twistd removed the pidfile), so systemd or the operator sees a failure;
 - forwards SIGHUP (certificate reload) and SIGUSR1 (log reopen) to every
   worker;
 - on stop (SIGTERM) sends SIGTERM to every worker, waits for all of them
   (up to L{STOP_TIMEOUT} seconds, then SIGKILL), and exits 0.

Prometheus series (SPEC 15) are merged across workers by
C{prometheus_client}'s multiprocess mode: every worker gets
C{PROMETHEUS_MULTIPROC_DIR=<metrics dir>/prometheus} and keeps its values in
memory-mapped files there, any worker's scrape reads them all, and the
supervisor marks a dead worker's live gauges gone.

The JSON counters (C{/metrics}, SPEC 10) are summed across workers: every worker
writes its counters as JSON to C{<metrics dir>/<index>.json} (a private
0700 directory the supervisor creates) every L{METRICS_INTERVAL} seconds
and when it stops, and answers C{/metrics} with its live counters plus the
other workers' files (L{SharedMetrics}). Counters and histograms are
summed; the gauges (C{bindings_loaded}, C{revocations_active}) describe
state every worker holds a copy of, so they are the answering worker's own,
not a sum. A restarted worker carries on from its predecessor's file, so
the sums never go backwards. The other workers' part of an answer may be
up to L{METRICS_INTERVAL} seconds old.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections import deque

from twisted.application.service import Service
from twisted.internet import defer, error, protocol, task
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from caracal.gateway.logs import ACCESS_EVENT_KEY, ACCESS_NAMESPACE, format_access_line
from caracal.gateway.metrics import GAUGES, MULTIPROC_VARIABLE, merge_snapshots

log = Logger()
_access_log = Logger(namespace=ACCESS_NAMESPACE)

#: Seconds between a worker's unexpected exit and its replacement.
RESTART_BACKOFF = 1.0
#: More unexpected exits than this within L{RESTART_WINDOW} seconds: give up.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: How long the supervisor waits for workers after SIGTERM before SIGKILL;
#: longer than a worker's own drain (L{caracal.gateway.tap.DRAIN_TIMEOUT}).
STOP_TIMEOUT = 30.0
#: How often a worker publishes its counters to the others.
METRICS_INTERVAL = 0.5

#: The module a worker process runs (C{python -m}).
WORKER_MODULE = "caracal.gateway.workerprocess"

#: The file descriptor a worker finds the listening socket on.
LISTENER_FD = 3
#: The file descriptor a worker finds the C{METRICS_ADDRESS} socket on.
METRICS_LISTENER_FD = 4

_LEVELS = {level.name: level for level in LogLevel.iterconstants()}


def relay_line(index: int, line: str, stderr: bool = False) -> None:
    """
    Re-emit one line a worker wrote into this process's log.

    A JSON access record (from L{caracal.gateway.logs.json_log_observer}) is
    emitted again as an access event, with C{"worker": index} added; any
    other JSON event keeps its level and gets a C{worker N:} prefix; a
    plain line (a traceback on stderr) is logged as is, prefixed, at
    warning level when it came on stderr.
    """
    try:
        entry = json.loads(line)
    except ValueError:
        entry = None
    if isinstance(entry, dict) and "request_id" in entry and "status" in entry:
        record = dict(entry, worker=index)
        _access_log.info(
            "{access_line}", access_line=format_access_line(record), **{ACCESS_EVENT_KEY: record}
        )
        return
    if isinstance(entry, dict) and "msg" in entry:
        level = _LEVELS.get(entry.get("level"), LogLevel.info)
        text = str(entry["msg"])
        if entry.get("traceback"):
            text += "\n" + str(entry["traceback"]).rstrip("\n")
        log.emit(level, "worker {worker}: {line}", worker=index, line=text)
        return
    level = LogLevel.warn if stderr else LogLevel.info
    log.emit(level, "worker {worker}: {line}", worker=index, line=line)


class WorkerProtocol(protocol.ProcessProtocol):
    """
    One worker process as the supervisor sees it: its output relayed line by
    line, its end reported to the supervisor.

    @ivar index: the worker's slot, 0 to N-1 (kept across restarts).
    @ivar status: the exit status once ended (as C{subprocess} reports it:
        minus the signal number when killed), else C{None}.
    @ivar pid: the process id, kept after the process ended.
    """

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.status: int | None = None
        self.pid: int | None = None
        self._buffers = {1: b"", 2: b""}
        self._waiting: list[defer.Deferred] = []

    def connectionMade(self) -> None:
        # Twisted forgets the transport's pid once the process has ended;
        # the exit is logged with it, so keep it.
        self.pid = getattr(self.transport, "pid", None)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._buffers.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        self._buffers[childFD] = rest
        for line in lines:
            self._relay(childFD, line)

    def _relay(self, childFD: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if text:
            relay_line(self.index, text, stderr=childFD == 2)

    def signal(self, number: int) -> None:
        """Send signal C{number} to the worker, unless it has ended already."""
        if self.status is not None or self.transport is None:
            return
        with contextlib.suppress(error.ProcessExitedAlready, OSError):
            self.transport.signalProcess(number)

    def ended(self) -> defer.Deferred:
        """Fires with the exit status once the worker has ended."""
        if self.status is not None:
            return defer.succeed(self.status)
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def processEnded(self, reason) -> None:
        for childFD, rest in list(self._buffers.items()):
            if rest:
                self._relay(childFD, rest)
        self._buffers = {1: b"", 2: b""}
        value = reason.value
        signal_number = getattr(value, "signal", None)
        self.status = -signal_number if signal_number else (value.exitCode or 0)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self.status)
        self.supervisor.worker_ended(self)


def _install_sighup(handler):
    return signal.signal(signal.SIGHUP, handler)


def _restore_sighup(previous) -> None:
    signal.signal(signal.SIGHUP, previous)


def _install_sigusr1(handler):
    return signal.signal(signal.SIGUSR1, handler)


def _restore_sigusr1(previous) -> None:
    signal.signal(signal.SIGUSR1, previous)


class ListenerSlots:
    """
    The workers' listening sockets, by worker slot: each its own socket of
    one C{SO_REUSEPORT} group (or one socket shared by all).

    A dead worker's socket is closed at once when it can be rebound: the
    kernel then hashes new connections over the live workers' sockets only,
    instead of queueing a share of them behind a worker that is not there;
    its replacement gets a fresh socket of the group. (Connections already
    waiting in the closed socket's backlog are reset: clients retry.)
    """

    def __init__(self, fds: list[int], rebind=None, close=os.close) -> None:
        """
        @param rebind: C{rebind() -> fd}, a new listening socket of the
            group; C{None} when the sockets are shared (nothing is closed).
        """
        self.fds: list[int | None] = list(fds)
        self._rebind = rebind
        self._close = close

    def fd(self, index: int) -> int:
        """Slot C{index}'s socket, bound anew if its last worker died."""
        if self.fds[index] is None:
            self.fds[index] = self._rebind()
        return self.fds[index]

    def release(self, index: int) -> None:
        """Slot C{index}'s worker died: close its socket, if it can be replaced."""
        fd = self.fds[index]
        if self._rebind is None or fd is None:
            return
        self.fds[index] = None
        with contextlib.suppress(OSError):
            self._close(fd)


@implementer(IStreamServerEndpoint)
class ListenWhenServing:
    """
    An endpoint adopting the inherited socket C{fd} that first makes it
    listen: a worker's own socket of the port's C{SO_REUSEPORT} group is
    only bound until then (L{caracal.gateway.tap.bind_listeners}), so the
    kernel sends it no connection before the worker is ready to serve.
    (Listening again on a socket that already listens only resets its
    backlog.)
    """

    def __init__(self, endpoint, fd: int, backlog: int) -> None:
        self.endpoint = endpoint
        self.fd = fd
        self.backlog = backlog

    def listen(self, factory):
        """Listen on C{fd}, then adopt it (the wrapped endpoint)."""
        sock = socket.socket(fileno=self.fd)
        try:
            sock.listen(self.backlog)
        finally:
            sock.detach()
        return self.endpoint.listen(factory)


def prometheus_dir(metrics_dir: str) -> str:
    """The workers' C{PROMETHEUS_MULTIPROC_DIR} inside the shared metrics directory."""
    return os.path.join(metrics_dir, "prometheus")


def exit_after_shutdown(status: int):
    """
    Make this process exit with C{status} once twistd is done: after the
    reactor stopped and twistd removed the pidfile, which happens after its
    services stopped, so an C{atexit} handler is the first moment that
    leaves nothing behind. (twistd itself only knows "exit 0" or "die of
    the signal that stopped the reactor".)
    """

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)

    atexit.register(leave)


class WorkerSupervisor(Service):
    """
    The twistd process of C{--workers N}: runs N workers, restarts them,
    forwards SIGHUP and stops them on SIGTERM (see the module docstring).

    @ivar workers: the current L{WorkerProtocol} of each slot (C{None}
        while a replacement waits for its backoff).
    @ivar gave_up: C{True} once restarts were too frequent.
    """

    def __init__(
        self,
        count: int,
        spawn,
        reactor,
        metrics_dir: str | None = None,
        backoff: float = RESTART_BACKOFF,
        max_restarts: int = MAX_RESTARTS,
        restart_window: float = RESTART_WINDOW,
        stop_timeout: float = STOP_TIMEOUT,
        install_sighup=_install_sighup,
        restore_sighup=_restore_sighup,
        give_up=None,
        install_sigusr1=_install_sigusr1,
        restore_sigusr1=_restore_sigusr1,
        listeners: ListenerSlots | None = None,
    ) -> None:
        """
        @param spawn: C{spawn(protocol, index)} starts worker C{index} with
            C{protocol} (see L{spawn_worker}) and returns its transport.
        @param metrics_dir: the workers' shared metrics directory; removed
            when the supervisor stops.
        @param install_sighup: installs a SIGHUP handler, returns the
            previous one; C{restore_sighup} puts that back.
        @param give_up: C{give_up(status)} called once when restarts are too
            frequent, before the reactor is stopped (default
            L{exit_after_shutdown}).
        @param listeners: the workers' sockets; a dead worker's is released
            (L{ListenerSlots.release}) so that no connection waits for it.
        @param install_sigusr1: installs a SIGUSR1 handler, returns the
            previous one (twistd's or the log file's reopen, which the new
            handler still calls); C{restore_sigusr1} puts that back.
        """
        self.count = count
        self._spawn = spawn
        self.reactor = reactor
        self.metrics_dir = metrics_dir
        self.backoff = backoff
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.stop_timeout = stop_timeout
        self._install_sighup = install_sighup
        self._restore_sighup = restore_sighup
        self._install_sigusr1 = install_sigusr1
        self._restore_sigusr1 = restore_sigusr1
        self._previous_sigusr1 = None
        self.listeners = listeners
        self._give_up = give_up or exit_after_shutdown
        self._previous_sighup = None
        self.workers: list[WorkerProtocol | None] = [None] * count
        self._pending: dict[int, object] = {}
        self._exits: deque[float] = deque()
        self.stopping = False
        self.gave_up = False

    @classmethod
    def for_listeners(
        cls,
        fds: list[int],
        reactor,
        environ=None,
        log_destination=("stdout", None),
        rebind=None,
        metrics_fd: int | None = None,
    ) -> WorkerSupervisor:
        """
        The supervisor of one real worker process per listening socket of
        C{fds} (worker I inherits C{fds[I]}), with a fresh private metrics
        directory, writing its log to C{log_destination} (see
        L{caracal.gateway.tap.worker_log_destination}).

        @param rebind: see L{ListenerSlots}.
        @param metrics_fd: the C{METRICS_ADDRESS} socket, which every worker
            inherits too.
        """
        metrics_dir = tempfile.mkdtemp(prefix="caracal-gateway-metrics-")
        os.mkdir(prometheus_dir(metrics_dir), 0o700)
        slots = ListenerSlots(fds, rebind)
        spawn = spawn_worker(
            reactor, slots, metrics_dir, environ, log_destination, metrics_fd=metrics_fd
        )
        return cls(len(fds), spawn, reactor, metrics_dir=metrics_dir, listeners=slots)

    @classmethod
    def for_listener(
        cls, fd: int, count: int, reactor, environ=None, metrics_fd: int | None = None
    ) -> WorkerSupervisor:
        """C{count} workers sharing the one listening socket C{fd}."""
        return cls.for_listeners([fd] * count, reactor, environ, metrics_fd=metrics_fd)

    def startService(self) -> None:
        Service.startService(self)
        log.info("caracal-gateway supervising {count} workers", count=self.count)
        self._previous_sighup = self._install_sighup(self._on_sighup)
        self._previous_sigusr1 = self._install_sigusr1(self._on_sigusr1)
        for index in range(self.count):
            self._start_worker(index)

    def _on_sighup(self, signum, frame) -> None:
        # Signal handler context: only schedule the forwarding.
        self.reactor.callFromThread(self.signal_workers, signal.SIGHUP)

    def _on_sigusr1(self, signum, frame) -> None:
        # This process's own log first (twistd's rotate, the log file's
        # reopen: each only schedules its work), then the workers', which
        # reopen the same path once it names the new file.
        previous = self._previous_sigusr1
        if callable(previous):
            previous(signum, frame)
        self.reactor.callFromThread(self.signal_workers, signal.SIGUSR1)

    def signal_workers(self, number: int) -> None:
        """Send signal C{number} to every running worker."""
        for worker in self.workers:
            if worker is not None:
                worker.signal(number)

    def _start_worker(self, index: int) -> None:
        self._pending.pop(index, None)
        if self.stopping:
            return
        worker = WorkerProtocol(self, index)
        self.workers[index] = worker
        try:
            self._spawn(worker, index)
        except Exception:
            log.failure("could not start worker {worker}", worker=index)
            self.workers[index] = None
            self._unexpected_exit(index)
            return
        log.info("worker {worker} started (pid {pid})", worker=index, pid=worker.pid)

    def worker_ended(self, worker: WorkerProtocol) -> None:
        """Called by a L{WorkerProtocol} when its process has ended."""
        index = worker.index
        if self.workers[index] is worker:
            self.workers[index] = None
        self._forget_live_gauges(worker.pid)
        if self.stopping:
            log.info(
                "worker {worker} exited with status {status}", worker=index, status=worker.status
            )
            return
        if self.listeners is not None:
            self.listeners.release(index)
        log.error(
            "worker {worker} (pid {pid}) exited unexpectedly with status {status}",
            worker=index,
            pid=worker.pid,
            status=worker.status,
        )
        self._unexpected_exit(index)

    def _forget_live_gauges(self, pid: int | None) -> None:
        # A dead worker's open connections and in-flight requests are no
        # longer anyone's: drop its "live" gauge files (its counters stay,
        # so sums never go backwards).
        if self.metrics_dir is None or pid is None:
            return
        from prometheus_client import multiprocess

        try:
            multiprocess.mark_process_dead(pid, prometheus_dir(self.metrics_dir))
        except OSError as e:
            log.warn("cannot drop worker {pid}'s gauges: {error}", pid=pid, error=e)

    def _unexpected_exit(self, index: int) -> None:
        now = self.reactor.seconds()
        self._exits.append(now)
        while self._exits and self._exits[0] <= now - self.restart_window:
            self._exits.popleft()
        if len(self._exits) > self.max_restarts:
            self._stop_giving_up(len(self._exits))
            return
        log.info("restarting worker {worker} in {delay} s", worker=index, delay=self.backoff)
        self._pending[index] = self.reactor.callLater(self.backoff, self._start_worker, index)

    def _stop_giving_up(self, exits: int) -> None:
        if self.gave_up:
            return
        self.gave_up = True
        log.critical(
            "workers exited {exits} times within {window} s; giving up, caracal-gateway stops",
            exits=exits,
            window=self.restart_window,
        )
        self._give_up(1)
        self.reactor.stop()

    def stopService(self) -> defer.Deferred:
        """
        SIGTERM every worker, wait for all (SIGKILL after C{stop_timeout}),
        then remove the metrics directory.
        """
        Service.stopService(self)
        self.stopping = True
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        if self._previous_sighup is not None:
            self._restore_sighup(self._previous_sighup)
            self._previous_sighup = None
        if self._previous_sigusr1 is not None:
            self._restore_sigusr1(self._previous_sigusr1)
            self._previous_sigusr1 = None
        running = [worker for worker in self.workers if worker is not None]
        log.info("stopping {count} workers", count=len(running))
        ended = [worker.ended() for worker in running]
        for worker in running:
            worker.signal(signal.SIGTERM)
        timer = self.reactor.callLater(self.stop_timeout, self._kill, running)
        d = defer.gatherResults(ended)

        def done(statuses):
            if timer.active():
                timer.cancel()
            self._remove_metrics_dir()
            # Same as GatewayService: an orderly stop on SIGTERM exits 0,
            # not "killed by SIGTERM" (twistd re-raises the exit signal).
            if not self.gave_up and getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
                self.reactor._exitSignal = None
            log.info("caracal-gateway stopped; worker exit statuses {statuses}", statuses=statuses)

        return d.addCallback(done)

    def _kill(self, workers: list[WorkerProtocol]) -> None:
        for worker in workers:
            if worker.status is None:
                log.warn(
                    "worker {worker} still running after {timeout} s; killing it",
                    worker=worker.index,
                    timeout=self.stop_timeout,
                )
                worker.signal(signal.SIGKILL)

    def _remove_metrics_dir(self) -> None:
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)


def worker_argv(
    index: int,
    metrics_dir: str | None,
    executable: str | None = None,
    metrics_listener: bool = False,
    log_destination=("relay", None),
) -> list[str]:
    """The command line of worker C{index}."""
    argv = [executable or sys.executable, "-m", WORKER_MODULE]
    argv += ["--fd", str(LISTENER_FD), "--index", str(index), "--parent-pid", str(os.getpid())]
    if metrics_dir is not None:
        argv += ["--metrics-dir", metrics_dir]
    if metrics_listener:
        argv += ["--metrics-fd", str(METRICS_LISTENER_FD)]
    kind, path = log_destination
    if kind == "file":
        argv += ["--log-file", path]
    elif kind == "stdout":
        argv += ["--log-stdout"]
    return argv


def spawn_worker(
    reactor,
    listener_fds: int | list[int] | ListenerSlots,
    metrics_dir: str | None,
    environ=None,
    log_destination=("relay", None),
    metrics_fd: int | None = None,
):
    """
    A C{spawn(protocol, index)} for L{WorkerSupervisor} running real worker
    processes: this interpreter, this environment (the configuration, plus
    C{PROMETHEUS_MULTIPROC_DIR} when there is a metrics directory), worker
    I's listening socket (from L{ListenerSlots}, C{listener_fds[I]}, or the
    one C{listener_fds} for all) inherited as fd L{LISTENER_FD} (and the
    C{METRICS_ADDRESS} socket C{metrics_fd} as fd L{METRICS_LISTENER_FD}:
    every worker accepts there too, like on the public port). stderr is
    piped back for the relay; stdout too when the workers' log is relayed,
    else inherited (the workers write their own lines). stdin is a pipe
    nobody writes to.
    """

    def spawn(worker: WorkerProtocol, index: int):
        env = dict(os.environ if environ is None else environ)
        if metrics_dir is not None:
            env[MULTIPROC_VARIABLE] = prometheus_dir(metrics_dir)
        argv = worker_argv(
            index,
            metrics_dir,
            metrics_listener=metrics_fd is not None,
            log_destination=log_destination,
        )
        if isinstance(listener_fds, ListenerSlots):
            fd = listener_fds.fd(index)
        elif isinstance(listener_fds, list):
            fd = listener_fds[index]
        else:
            fd = listener_fds
        stdout = "r" if log_destination[0] == "relay" else 1
        child_fds = {0: "w", 1: stdout, 2: "r", LISTENER_FD: fd}
        if metrics_fd is not None:
            child_fds[METRICS_LISTENER_FD] = metrics_fd
        return reactor.spawnProcess(worker, argv[0], argv, env=env, childFDs=child_fds)

    return spawn


class SharedMetrics:
    """
    One worker's side of the summed metrics.

    @ivar directory: the shared directory (one C{<index>.json} per worker).
    @ivar carried: what this slot's previous worker had counted (read from
        its file at start), so a restart does not make the sums drop.
    """

    def __init__(self, directory: str, index: int, live, refresh=None) -> None:
        """
        @param live: this process's C{snapshot()} (L{Metrics.snapshot}).
        @param refresh: called before each publication, or C{None}:
            L{Metrics.refresh}, so the gauges this worker holds in the
            shared Prometheus files stay current even when other workers
            answer the scrapes.
        """
        self.directory = directory
        self.index = index
        self.live = live
        self.refresh = refresh
        self.path = os.path.join(directory, f"{index}.json")
        self.carried = self._read(self.path)
        self._loop = None

    @staticmethod
    def _read(path: str) -> dict | None:
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f)
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def own(self) -> dict:
        """This slot's counters: the live ones plus the carried ones."""
        live = self.live()
        if self.carried is None:
            return live
        merged = merge_snapshots([self.carried, live])
        for name in GAUGES:
            merged[name] = live.get(name, 0)
        return merged

    def publish(self) -> None:
        """Write L{own} atomically to this worker's file."""
        if self.refresh is not None:
            self.refresh()
        temporary = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as f:
                json.dump(self.own(), f)
            os.replace(temporary, self.path)
        except OSError as e:
            log.warn("cannot publish metrics to {path}: {error}", path=self.path, error=e)

    def others(self) -> list[dict]:
        """The other workers' last published counters."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        found = []
        for name in sorted(names):
            if not name.endswith(".json") or name == f"{self.index}.json":
                continue
            value = self._read(os.path.join(self.directory, name))
            if value is not None:
                found.append(value)
        return found

    def snapshot(self) -> dict:
        """
        Every worker's counters and histograms summed; the gauges are this
        worker's own (each worker holds the same bindings and revocations).
        """
        own = self.own()
        merged = merge_snapshots([own, *self.others()])
        for name in GAUGES:
            merged[name] = own.get(name, 0)
        return merged

    def start(self, clock, interval: float = METRICS_INTERVAL) -> None:
        """Publish every C{interval} seconds, from now."""
        self._loop = task.LoopingCall(self.publish)
        self._loop.clock = clock
        self._loop.start(interval, now=True)

    def stop(self) -> None:
        """Stop the periodic publishing and publish one last time."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self.publish()


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """The worker's command line (written by L{worker_argv})."""
    parser = argparse.ArgumentParser(prog=WORKER_MODULE)
    parser.add_argument("--fd", type=int, default=LISTENER_FD)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--metrics-dir", default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--metrics-fd", type=int, default=None)
    where = parser.add_mutually_exclusive_group()
    # Default: JSON lines on stdout, relayed by the supervisor.
    where.add_argument("--log-file", default=None, help="append to this file, reopen on SIGUSR1")
    where.add_argument("--log-stdout", action="store_true", help="the inherited stdout")
    return parser.parse_args(argv)
