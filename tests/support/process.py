"""
Running the gateway as a real C{twistd} process from tests.

A L{GatewayProcess} spawns C{twistd} (the one installed next to the test's
own interpreter, so a regular C{pip install .} is what runs) with an
environment built from scratch, collects its stdout and stderr, and tells
when it listens and when it ends::

    environ, root = gateway_environ(self.mktemp(), free_port())
    gateway = GatewayProcess(environ, root=root)
    yield gateway.start()               # fires once GET /health answers 200
    ...
    code = yield gateway.stop()         # SIGTERM, then the exit status

Daemon mode (C{twistd --pidfile P --logfile L caracal-gateway}) forks
away from its launcher; L{Subreaper} makes the test process adopt the
daemon so its exit status can still be read (L{Subreaper.wait_exit}).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import sys

from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS

from tests.support.certs import make_chain
from tests.support.waiting import became_true, free_port

#: How long L{GatewayProcess.start} waits for the port to accept: a bound,
#: not a delay, generous so a loaded CI machine does not fail a healthy start.
START_TIMEOUT = 30.0
POLL_INTERVAL = 0.05


#: The shared server's database that L{gateway_environ} names by default.
SHARED_DATABASE_URL = "postgresql://root@127.0.0.1:5432/test"


def twistd_command(*args: str) -> list[str]:
    """
    The argv running C{twistd} with C{args} under this interpreter: the
    C{twistd} script of this environment when there is one, so the test
    runs what an operator runs. (C{python -m twisted} is C{twist}, not
    C{twistd}: no daemon mode, no pidfile.)
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [sys.executable, script, *args]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args]


def gateway_environ(
    directory: str, port: int, tls: bool = True, **overrides: str | None
) -> tuple[dict[str, str], object | None]:
    """
    A dev environment listening on 127.0.0.1:C{port}, with a fresh test
    certificate chain written into C{directory} when C{tls}.

    @param overrides: variables to set; C{None} removes one.
    @return: the environment and the test root to trust (C{None} when
        plaintext). Only C{PATH} and locale come from the test's own
        environment, so no stray variable changes the gateway's behaviour.
    """
    os.makedirs(directory, exist_ok=True)
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONUNBUFFERED": "1",
        "CARACAL_ENV": "dev",
        "BIND_ADDRESS": "127.0.0.1",
        "PORT": str(port),
        "STS_URL": f"https://127.0.0.1:{free_port()}",
        "DATABASE_URL": SHARED_DATABASE_URL,
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "LOG_LEVEL": "debug",
        "AUDIT_SPOOL_DIR": os.path.join(directory, "audit-spool"),
    }
    root = None
    if tls:
        root, _leaf = make_chain(directory)
        environ["TLS_CERT_FILE"] = os.path.join(directory, "server.crt")
        environ["TLS_KEY_FILE"] = os.path.join(directory, "server.key")
    else:
        environ["INSECURE_HTTP"] = "true"
    for name, value in overrides.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    return environ, root


def own_database(testcase, environ: dict[str, str]) -> dict[str, str]:
    """
    Point C{environ} at a database of C{testcase}'s own, with the schema
    applied and dropped at cleanup, unless the test chose another one.

    A gateway waits (up to 10 s) for its resource snapshot before it
    listens; on the shared database, which has no table, every start would
    take that long.
    """
    if environ.get("DATABASE_URL") != SHARED_DATABASE_URL:
        return environ
    # Imported here: most users of this module never touch Postgres.
    from tests.support.postgres import TemporaryDatabase

    database = TemporaryDatabase().create()
    testcase.addCleanup(database.drop)
    environ["DATABASE_URL"] = database.url
    return environ


def exit_status(reason) -> int:
    """
    The exit status of an ended process as C{subprocess} reports it: the
    exit code, or minus the number of the signal that killed it.
    """
    value = reason.value
    if getattr(value, "signal", None) is not None:
        return -value.signal
    return value.exitCode or 0


class GatewayExited(Exception):
    """The process ended while it was expected to come up."""

    def __init__(self, status: int, errors: bytes):
        super().__init__(f"exit status {status}; stderr: {errors.decode(errors='replace')}")
        self.status = status
        self.errors = errors


class _Collector(protocol.ProcessProtocol):
    def __init__(self, owner: GatewayProcess):
        self.owner = owner

    def outReceived(self, data: bytes) -> None:
        self.owner.output += data

    def errReceived(self, data: bytes) -> None:
        self.owner.errors += data

    def processEnded(self, reason) -> None:
        self.owner._ended(exit_status(reason))


def port_accepts(host: str, port: int, reactor=None) -> defer.Deferred:
    """Fires C{True} when a TCP connection to C{host}:C{port} succeeds (then closes it)."""
    if reactor is None:
        from twisted.internet import reactor
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=1)
    d = endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))

    def connected(proto):
        proto.transport.abortConnection()
        return True

    return d.addCallbacks(connected, lambda failure: False)


class _HealthProbe(protocol.Protocol):
    """Asks C{GET /health} once; fires C{status} with the status code (or None)."""

    def __init__(self):
        self.status: defer.Deferred = defer.Deferred()
        self._received = b""

    def connectionMade(self) -> None:
        self.transport.write(
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        self._received += data
        if b"\r\n" in self._received and not self.status.called:
            line = self._received.split(b"\r\n", 1)[0].split()
            self.status.callback(int(line[1]) if len(line) > 1 and line[1].isdigit() else None)
            self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        if not self.status.called:
            self.status.callback(None)


def health_status(host: str, port: int, root=None, reactor=None, timeout: float = 2.0):
    """
    C{GET /health} over one fresh connection (TLS trusting only the test
    root C{root}, or plaintext when C{root} is None). Fires with the status
    code, or C{None} when no answer came (refused, TLS failure, timeout).

    An answer proves the reactor runs; a TCP connect alone does not: the
    gateway binds its socket before twistd starts the reactor.
    """
    if reactor is None:
        from twisted.internet import reactor
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if root is not None:
        trust = Certificate.loadPEM(root.pem)
        endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=trust), endpoint)
    d = endpoint.connect(protocol.Factory.forProtocol(_HealthProbe))

    def connected(probe):
        status = probe.status
        status.addTimeout(timeout, reactor, onTimeoutCancel=lambda *a: None)
        status.addErrback(lambda failure: None)

        def close(result):
            probe.transport.abortConnection()
            return result

        return status.addBoth(close)

    return d.addCallbacks(connected, lambda failure: None)


class GatewayProcess:
    """
    One C{twistd} process.

    @ivar output: everything written to stdout so far.
    @ivar errors: everything written to stderr so far.
    @ivar pid: the spawned process (the launcher, in daemon mode).
    @ivar status: the exit status once ended (see L{exit_status}), else C{None}.
    """

    def __init__(
        self,
        environ: dict[str, str],
        args: tuple[str, ...] = ("-n", "caracal-gateway"),
        cwd: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        root=None,
        reactor=None,
    ):
        """
        @param args: twistd's arguments (default: foreground).
        @param cwd: working directory (where twistd puts C{twistd.pid} by
            default); default: a new temporary directory.
        @param port: the port to wait for (default: C{environ["PORT"]}).
        @param root: the test root the gateway's certificate chains to (from
            L{gateway_environ}); C{None} for a plaintext gateway.
        """
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.environ = environ
        self.argv = twistd_command(*args)
        self.cwd = cwd
        self.host = host
        self.port = int(port if port is not None else environ["PORT"])
        self.root = root
        self.output = b""
        self.errors = b""
        self.pid: int | None = None
        self.status: int | None = None
        self._transport = None
        self._waiting: list[defer.Deferred] = []

    def spawn(self) -> None:
        """Start the process; return at once."""
        if self.cwd is None:
            import tempfile

            self.cwd = tempfile.mkdtemp(prefix="caracal-twistd-")
        self._transport = self.reactor.spawnProcess(
            _Collector(self), self.argv[0], self.argv, env=self.environ, path=self.cwd
        )
        self.pid = self._transport.pid

    def _ended(self, status: int) -> None:
        self.status = status
        self._transport = None
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(status)

    def kill(self) -> defer.Deferred:
        """SIGKILL the process if it still runs (a test's cleanup); fires once it ended."""
        if not self.running:
            return defer.succeed(self.status)
        self.send_signal(signal.SIGKILL)
        return self.ended()

    def ended(self) -> defer.Deferred:
        """Fires with the exit status once the process has ended."""
        if self.status is not None:
            return defer.succeed(self.status)
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    @property
    def running(self) -> bool:
        return self._transport is not None

    def accepts(self) -> defer.Deferred:
        """Fires C{True} when the gateway's port accepts a TCP connection now."""
        return port_accepts(self.host, self.port, self.reactor)

    def health(self) -> defer.Deferred:
        """C{GET /health} on a fresh connection: the status code, or C{None}."""
        return health_status(self.host, self.port, self.root, self.reactor)

    @defer.inlineCallbacks
    def start(self, timeout: float = START_TIMEOUT, daemon: bool = False):
        """
        Spawn and wait until C{GET /health} answers 200 (the reactor runs,
        so its signal handlers are in place).

        @param daemon: the spawned launcher is expected to exit 0 once the
            daemon is up; any other exit, or a foreground process exiting at
            all, fails with L{GatewayExited}.
        @raise GatewayExited: the process ended first.
        @raise TimeoutError: no answer within C{timeout}.
        """
        self.spawn()
        if daemon:
            status = yield self.wait(timeout)
            if status != 0:
                raise GatewayExited(status, self.errors)

        @defer.inlineCallbacks
        def ready():
            if self.status is not None and not daemon:
                raise GatewayExited(self.status, self.errors)
            return (yield self.health()) == 200

        if not (yield became_true(ready, timeout, self.reactor, POLL_INTERVAL)):
            raise TimeoutError(
                f"twistd did not answer on {self.host}:{self.port} within {timeout} s;"
                f" stderr: {self.errors.decode(errors='replace')}"
            )

    @defer.inlineCallbacks
    def run(self, timeout: float = 20.0):
        """Spawn and wait for the process to end (a refused start); fires with the status."""
        self.spawn()
        status = yield self.wait(timeout)
        return status

    def send_signal(self, number: int) -> None:
        """Send signal C{number} to the spawned process."""
        if self._transport is not None:
            self._transport.signalProcess(number)

    @defer.inlineCallbacks
    def wait(self, timeout: float = 30.0):
        """
        Wait for the process to end; after C{timeout} seconds kill it and
        raise C{TimeoutError}. Fires with the exit status.
        """
        done = self.ended()
        timer = self.reactor.callLater(timeout, self._kill)
        status = yield done
        if timer.active():
            timer.cancel()
            return status
        raise TimeoutError(f"twistd did not exit within {timeout} s")

    def _kill(self) -> None:
        with contextlib.suppress(error.ProcessExitedAlready):
            self.send_signal(signal.SIGKILL)

    def stop(self, number: int = signal.SIGTERM, timeout: float = 30.0) -> defer.Deferred:
        """Send C{number} (SIGTERM by default) and fire with the exit status."""
        if self.status is not None:
            return defer.succeed(self.status)
        self.send_signal(number)
        return self.wait(timeout)


def read_pidfile(path: str) -> int:
    """The pid a twistd pidfile holds."""
    with open(path) as f:
        return int(f.read().strip())


def pid_alive(pid: int) -> bool:
    """C{True} while C{pid} is a process that has not exited (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError as e:
            return e.errno == errno.EPERM
        return True
    return state not in ("Z", "X")


def process_state(pid: int) -> str:
    """
    What a stuck process is doing, for a failure message: its scheduler
    state, the kernel function it waits in, and its signal masks (a pending
    but blocked or ignored SIGTERM shows there).
    """
    parts = []
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(
                    ("State:", "SigPnd:", "ShdPnd:", "SigBlk:", "SigIgn:", "SigCgt:")
                ):
                    parts.append(" ".join(line.split()))
        with open(f"/proc/{pid}/wchan") as f:
            parts.append(f"wchan: {f.read().strip() or '-'}")
    except OSError as e:
        parts.append(f"/proc unreadable: {e}")
    return "; ".join(parts)


def kill_pid(pid: int) -> None:
    """SIGKILL C{pid} if it still runs and reap it when it is our child (test cleanup)."""
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


class Subreaper:
    """
    Make this process the reaper of its orphaned descendants (Linux
    C{PR_SET_CHILD_SUBREAPER}), so a daemon that double-forked away from a
    launcher we spawned becomes our child and its exit status readable.
    """

    PR_SET_CHILD_SUBREAPER = 36

    def __init__(self):
        self._libc = ctypes.CDLL(None, use_errno=True)

    @classmethod
    def available(cls) -> bool:
        """C{True} on Linux."""
        return sys.platform.startswith("linux")

    def _set(self, value: int) -> None:
        if self._libc.prctl(self.PR_SET_CHILD_SUBREAPER, value, 0, 0, 0) != 0:
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number))

    def enable(self) -> None:
        self._set(1)

    def disable(self) -> None:
        self._set(0)

    @classmethod
    def for_test(cls, case) -> Subreaper:
        """
        Enable a subreaper for the trial test C{case} until it ends; skip the
        test where reading a daemon's exit status is impossible.
        """
        if not cls.available():
            raise case.skipException("reading a daemon's exit status needs Linux's subreaper")
        subreaper = cls()
        subreaper.enable()
        case.addCleanup(subreaper.disable)
        return subreaper

    @staticmethod
    def wait_exit(pid: int, timeout: float = 30.0, reactor=None) -> defer.Deferred:
        """
        Fires with C{pid}'s exit status (as L{exit_status}) once it ended;
        errbacks C{TimeoutError} after C{timeout}. C{pid} must be our child
        (adopted thanks to L{enable}).
        """
        result: list[int] = []

        def reaped():
            try:
                waited, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                raise RuntimeError(f"pid {pid} is not a child of the test process") from None
            if waited == 0:
                return False
            result.append(
                -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            )
            return True

        def done(finished):
            if not finished:
                raise TimeoutError(
                    f"pid {pid} did not exit within {timeout} s; {process_state(pid)}"
                )
            return result[0]

        return became_true(reaped, timeout, reactor, POLL_INTERVAL).addCallback(done)


def child_pids(pid: int) -> list[int]:
    """The live processes whose parent is C{pid} (Linux C{/proc}); empty elsewhere."""
    children = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command: state, then the parent's pid.
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            children.append(int(entry))
    return sorted(children)
