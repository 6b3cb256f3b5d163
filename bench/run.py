# -*- test-case-name: tests.integration.test_bench_smoke -*-
"""
Benchmark of the gateway against a bare Twisted reverse proxy, on this machine,
in one run (see bench/README.rst):

    .venv/bin/python bench/run.py [--duration 10] [--connections 16]
        [--out bench/last-run.json]

Everything runs on 127.0.0.1, each server in its own process:

  - the upstream (C{bench/targets.py upstream}): a tiny JSON tool server;
  - (a) C{bare}: a minimal proxy resource over TLS sending each request
    through one C{Agent} on a persistent pool (C{bench/targets.py bare});
  - the dev STS (C{twistd -n caracal-devsts --insecure-http});
  - (b)/(c): C{twistd -n --logger caracal.gateway.logfile.observer
    caracal-gateway} (dev mode, TLS) with a temporary Postgres database
    holding one resource pointing at the upstream, and the shared Redis for
    JTIs. (b) sends one C{use=ambient} token on every
    request; (c) sends a fresh single-use C{per_call} token on every request
    (pre-minted through the STS's C{POST /dev/mint}; never one twice).

Before measuring, one request through every target must answer 200 with the
upstream's body (and a replayed per_call token must be refused), so no
error path is benchmarked. Load comes from C{wrk} (C{bench/wrk.lua}), or from
C{bench/pyload.py} when wrk is not installed. The table gives req/s, p50,
p99 and errors (non-2xx answers plus socket errors: a valid run has 0), the
ratios of (b) and (c) to (a), and the same as JSON in C{--out}.

With C{--cpu-quota CORES}, (c)'s gateway process and each worker of (d)
are held at CORES of a core by a cgroup CFS quota each, so that N workers
are compared with one process at the same budget per process on a machine
with fewer free cores than workers (see L{CpuCgroups} and bench/README.rst).

Every process, the database, the run's JTI keys and cgroups are removed at
the end, also on errors and Ctrl-C.

Exit status: 0 every measured target valid; 1 a target had errors; 2 the
bench could not be set up (a target unavailable without C{--allow-missing}).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
if REPO not in sys.path:
    # For tests.support.certs (certificates are made per run, never committed).
    sys.path.insert(0, REPO)

TARGETS = ("bare", "ambient", "per_call", "workers")
DEFAULT_TARGETS = ("bare", "ambient", "per_call")
LABELS = {
    "bare": "(a) bare pooled Twisted proxy, TLS",
    "ambient": "(b) gateway, ambient token",
    "per_call": "(c) gateway, per_call tokens",
    "workers": "(d) gateway, per_call, --workers N",
}
#: The process whose CPU is the target's own (the upstream and STS excluded).
FRONT = {"bare": "bare", "ambient": "gateway", "per_call": "gateway", "workers": "gateway-workers"}
#: SPEC 17 targets.
TARGET_CPU_RATIO = 3.0
TARGET_RPS_RATIO = 0.33
TARGET_P99_RATIO = 2.5
TARGET_WORKERS_SCALING = 0.85
TARGET_PARENT_CORE = 0.02
TARGET_SOAK_MB_PER_100K = 1.0
#: One MiB in MB (SPEC 17's memory targets are in MB).
MIB_IN_MB = 1.048576
TARGET_IDLE_MB_PER_1000 = 20.0
PATH = "/bench/tool"
UPSTREAM_BODY = b'{"ok":true,"tool":"bench"}'  # bench/targets.py UPSTREAM_BODY
ADMIN_DSN = os.environ.get("BENCH_POSTGRES", "host=127.0.0.1 port=5432 dbname=test")
REDIS = ("127.0.0.1", 6379)
START_TIMEOUT = 30.0
#: Caller tokens live long enough for any run; the gateway wants 35 s left.
TOKEN_TTL = 3600


class BenchError(Exception):
    """The bench cannot be set up or a target fails its check; one line for the operator."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- processes ------------------------------------------------------------


class Processes:
    """The bench's child processes, each logging to its own file; stopped in reverse order."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.running: list[tuple[str, subprocess.Popen, str]] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        """Start C{argv} with output into C{<directory>/<name>.log}."""
        log_path = os.path.join(self.directory, f"{name}.log")
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.directory,
                # Own session: the terminal's Ctrl-C reaches only run.py, which
                # then stops the children in order.
                start_new_session=True,
            )
        self.running.append((name, process, log_path))
        return process

    def log_tail(self, name: str, lines: int = 15) -> str:
        """The last lines of C{name}'s log (for error messages)."""
        for candidate, _process, path in self.running:
            if candidate == name:
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8", "replace")
                return "\n".join(text.splitlines()[-lines:])
        return ""

    def wait_listening(self, name: str, process: subprocess.Popen, port: int) -> None:
        """Wait until C{port} accepts; L{BenchError} if C{process} ends or time runs out."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BenchError(
                    f"{name} exited with status {process.returncode}:\n{self.log_tail(name)}"
                )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise BenchError(f"{name} did not listen on {port} within {START_TIMEOUT:.0f} s")

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) used so far by each running child, from /proc."""
        ticks = os.sysconf("SC_CLK_TCK")
        used = {}
        for name, process, _path in self.running:
            try:
                with open(f"/proc/{process.pid}/stat", encoding="ascii") as f:
                    # Fields after the parenthesised command: utime, stime are 12th, 13th.
                    fields = f.read().rsplit(")", 1)[1].split()
                used[name] = (int(fields[11]) + int(fields[12])) / ticks
            except (OSError, IndexError, ValueError):
                continue
        return used

    def pid(self, name: str) -> int | None:
        """The pid of the running child C{name}."""
        for candidate, process, _path in self.running:
            if candidate == name and process.poll() is None:
                return process.pid
        return None

    def memory_mib(self) -> dict[str, tuple[float, float]]:
        """Resident and peak resident memory (MiB) of each running child, from /proc."""
        memory = {}
        for name, process, _path in self.running:
            try:
                with open(f"/proc/{process.pid}/status", encoding="ascii") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                memory[name] = (
                    int(fields["VmRSS"].split()[0]) / 1024,
                    int(fields["VmHWM"].split()[0]) / 1024,
                )
            except (OSError, KeyError, ValueError):
                continue
        return memory

    def stop_all(self) -> None:
        """SIGTERM every child (newest first), SIGKILL any still there after 30 s."""
        for _name, process, _path in reversed(self.running):
            if process.poll() is None:
                process.terminate()
            try:
                # The gateway drains in-flight requests before exiting.
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.running.clear()


def children_of(pid: int) -> list[int]:
    """The direct children of C{pid} (the workers of a C{--workers N} gateway), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def pid_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of C{pid} itself (not its children), from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pid_rss_mib(pid: int) -> float:
    """Resident memory of C{pid} in MiB, from /proc."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


async def _hold_idle(port: int, ca_file: str, count: int, opened, release) -> int:
    """
    Open C{count} TLS connections to C{port}, send one keep-alive request on
    each (C{GET /health}) and read its answer, then leave them idle; call
    C{opened()} once all are idle, wait for C{release} and close them.
    Returns how many were open and idle.
    """
    import asyncio

    context = ssl.create_default_context(cafile=ca_file)
    gate = asyncio.Semaphore(64)
    streams = []

    async def one():
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            streams.append(writer)

    await asyncio.gather(*(one() for _ in range(count)))
    await asyncio.sleep(0.5)  # let the server settle (timers, buffers released)
    opened()
    while not release():
        await asyncio.sleep(0.1)
    for writer in streams:
        writer.close()
    return len(streams)


def idle_connections_mib(pid: int, port: int, ca_file: str, count: int) -> dict:
    """
    RSS of C{pid} before and while C{count} idle TLS keep-alive connections
    are open to C{port}: the memory an idle agent connection costs.
    """
    import asyncio

    before = pid_rss_mib(pid)
    held = {}

    def opened():
        held["rss"] = pid_rss_mib(pid)

    opened_count = asyncio.run(_hold_idle(port, ca_file, count, opened, lambda: "rss" in held))
    grown = held["rss"] - before
    return {
        "connections": opened_count,
        "rss_before_mib": round(before, 2),
        "rss_idle_mib": round(held["rss"], 2),
        "growth_mib": round(grown, 2),
        "kib_per_connection": round(grown * 1024 / max(1, opened_count), 2),
        "mib_per_1000": round(grown * 1000 / max(1, opened_count), 2),
    }


def measured_command(argv: list[str]) -> str:
    """
    The command line a report records: what was measured, without where the
    report was written (C{--out} names a path on the machine that ran it,
    which the report, kept in the repository, must not hold).
    """
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return " ".join(["python", "bench/run.py", *kept])


def python_command(script: str, *args: str) -> list[str]:
    """Run a bench script under this interpreter."""
    return [sys.executable, os.path.join(BENCH, script), *args]


#: twistd's C{--logger} in the systemd unit and the Dockerfile.
PRODUCTION_LOGGER = "caracal.gateway.logfile.observer"


def twistd_command(*args: str) -> list[str]:
    """C{twistd} of this environment, in the foreground, without a pidfile."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if not os.path.exists(script):
        script = shutil.which("twistd") or "twistd"
    return [sys.executable, script, "-n", "--pidfile=", *args]


# -- HTTP helpers (setup and checks only; the load comes from wrk) ---------


def https_get(port: int, ca_file: str, headers: dict[str, str], path: str = PATH):
    """One GET over verified TLS; returns C{(status, body)}."""
    context = ssl.create_default_context(cafile=ca_file)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def mint_tokens(sts_port: int, zone: str, count: int, use: str, workers: int = 4) -> list[str]:
    """
    C{count} caller tokens from the dev STS's C{POST /dev/mint}, over a few
    keep-alive connections in parallel.
    """
    if count <= 0:
        return []
    form = urllib.parse.urlencode(
        {"zone_id": zone, "use": use, "ttl": TOKEN_TTL, "sub": "bench-agent", "sid": "bench"}
    )
    headers = {"Content-Type": "application/x-www-form-urlencoded"}

    def mint_some(n: int) -> list[str]:
        connection = http.client.HTTPConnection("127.0.0.1", sts_port, timeout=10)
        tokens = []
        try:
            for _ in range(n):
                connection.request("POST", "/dev/mint", body=form, headers=headers)
                response = connection.getresponse()
                body = response.read()
                if response.status != 200:
                    raise BenchError(f"dev STS /dev/mint answered {response.status}: {body!r}")
                tokens.append(json.loads(body)["token"])
        finally:
            connection.close()
        return tokens

    shares = [count // workers + (1 if i < count % workers else 0) for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        return [token for part in pool.map(mint_some, shares) for token in part]


def write_tokens(path: str, tokens: list[str]) -> str:
    """One token per line (the file is removed with the run's temporary directory)."""
    with open(path, "w", encoding="ascii") as f:
        f.write("\n".join(tokens) + "\n")
    os.chmod(path, 0o600)
    return path


# -- Postgres and Redis ---------------------------------------------------


class TemporaryDatabase:
    """A database C{caracal_bench_<random>} on the shared server, dropped by L{drop}."""

    def __init__(self) -> None:
        import psycopg2.extensions

        self.name = f"caracal_bench_{secrets.token_hex(6)}"
        parameters = psycopg2.extensions.parse_dsn(ADMIN_DSN)
        host = parameters.get("host", "127.0.0.1")
        port = parameters.get("port", "5432")
        user = parameters.get("user", "")
        self.url = f"postgresql://{user + '@' if user else ''}{host}:{port}/{self.name}"
        self.created = False

    def _admin(self):
        import psycopg2

        connection = psycopg2.connect(ADMIN_DSN, connect_timeout=5)
        connection.autocommit = True
        return connection

    def create(self) -> None:
        from psycopg2 import sql

        connection = self._admin()
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
            self.created = True
        finally:
            connection.close()

    def drop(self) -> None:
        if not self.created:
            return
        from psycopg2 import sql

        connection = self._admin()
        try:
            with connection.cursor() as cursor:
                # FORCE: a gateway killed mid-way may leave a backend behind.
                cursor.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(self.name)
                    )
                )
            self.created = False
        finally:
            connection.close()


def redis_command(sock: socket.socket, reader, *arguments: str):
    """One RESP command on a blocking socket; returns the decoded reply."""
    payload = [b"*%d\r\n" % len(arguments)]
    for argument in arguments:
        data = argument.encode()
        payload.append(b"$%d\r\n%s\r\n" % (len(data), data))
    sock.sendall(b"".join(payload))
    return _redis_reply(reader)


def _redis_reply(reader):
    line = reader.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"-":
        raise BenchError(f"redis: {rest.decode()}")
    if kind == b":":
        return int(rest)
    if kind == b"+":
        return rest.decode()
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else reader.read(size + 2)[:-2].decode()
    if kind == b"*":
        return [_redis_reply(reader) for _ in range(int(rest))]
    raise BenchError(f"redis: unexpected reply {line!r}")


def delete_jti_keys(zone: str) -> int:
    """Delete this run's C{seen:jti:<zone>:*} keys (they would expire anyway)."""
    deleted = 0
    with socket.create_connection(REDIS, timeout=5) as sock:
        reader = sock.makefile("rb")
        cursor = "0"
        while True:
            cursor, keys = redis_command(
                sock, reader, "SCAN", cursor, "MATCH", f"seen:jti:{zone}:*", "COUNT", "1000"
            )
            if keys:
                deleted += redis_command(sock, reader, "DEL", *keys)
            if cursor == "0":
                return deleted


# -- CPU quota (cgroups) --------------------------------------------------

#: The CFS period (the kernel's default); a quota of CORES is CORES x this per period.
CFS_PERIOD_US = 100_000
#: The kernel refuses CFS quotas under 1 ms per period.
CFS_MIN_QUOTA_US = 1_000
#: The weight of a limited cgroup: ten times a task's default (v1
#: C{cpu.shares} 1024, v2 C{cpu.weight} 100). A quota only caps: under other
#: load the cgroup competes as one task against every other runnable task of
#: the machine and may get less than its budget; this weight lets it take its
#: budget first, and the quota keeps that at CORES.
CPU_SHARES_V1 = 10_240
CPU_WEIGHT_V2 = 1_000
#: A limited process that used less than this fraction of its quota was held
#: back by the machine, not by the quota: the comparison is not of equal budgets.
AT_QUOTA = 0.9


def cfs_quota_us(cores: float, period_us: int = CFS_PERIOD_US) -> int:
    """The CFS quota (microseconds per C{period_us}) that allows C{cores} of a core."""
    quota = round(cores * period_us)
    if quota < CFS_MIN_QUOTA_US:
        raise BenchError(
            f"--cpu-quota {cores}: at least {CFS_MIN_QUOTA_US / period_us:g} of a core"
            f" (the kernel's smallest CFS quota is {CFS_MIN_QUOTA_US} us per {period_us} us)"
        )
    return quota


def quota_problem(cores: float, processes: int, cpus: int) -> str | None:
    """
    Why C{processes} gateway processes of C{cores} each cannot all get their
    budget on C{cpus} cores, or C{None}: one core stays for the rig (wrk, the
    dev STS, the upstream, Redis), otherwise a worker would wait for a core
    instead of its quota and the ratio would measure the machine again.
    """
    if cores <= 0:
        return f"--cpu-quota must be positive, not {cores}"
    if processes * cores > cpus - 1 + 1e-9:
        return (
            f"--cpu-quota {cores:g} x {processes} gateway process(es) = {processes * cores:g}"
            f" cores, more than the {cpus} cores minus one for wrk, the STS and the upstream"
            f" ({cpus - 1}): lower --cpu-quota or --workers"
        )
    return None


def find_cpu_cgroup(mounts: str = "/proc/self/mounts") -> tuple[str, str]:
    """
    C{(version, root)} of a writable cgroup hierarchy with the C{cpu}
    controller: C{("v1", "/sys/fs/cgroup/cpu")} (or C{cpu,cpuacct}), else
    C{("v2", <cgroup2 mount>)} when its root offers C{cpu}. L{BenchError}
    saying what is missing when neither is there or writable.
    """
    try:
        with open(mounts, encoding="utf-8") as f:
            entries = [line.split() for line in f if line.strip()]
    except OSError as error:
        raise BenchError(f"--cpu-quota: cannot read {mounts}: {error}") from error
    seen = []
    for fields in entries:
        if len(fields) >= 4 and fields[2] == "cgroup" and "cpu" in fields[3].split(","):
            seen.append(f"cgroup v1 cpu at {fields[1]}")
            if os.access(fields[1], os.W_OK) and os.path.exists(
                os.path.join(fields[1], "cpu.cfs_quota_us")
            ):
                return "v1", fields[1]
    for fields in entries:
        if len(fields) >= 3 and fields[2] == "cgroup2":
            try:
                with open(os.path.join(fields[1], "cgroup.controllers"), encoding="ascii") as f:
                    controllers = f.read().split()
            except OSError:
                continue
            if "cpu" in controllers:
                seen.append(f"cgroup v2 at {fields[1]}")
                if os.access(fields[1], os.W_OK):
                    return "v2", fields[1]
    found = "; found " + ", ".join(seen) + " (not writable: run as root)" if seen else ""
    raise BenchError(
        "--cpu-quota needs a writable cgroup cpu controller (cgroup v1 'cpu' with"
        f" cpu.cfs_quota_us, or cgroup v2 offering 'cpu' in cgroup.controllers){found}"
    )


class CpuCgroups:
    """
    The cgroups this run made, each holding one gateway process limited to
    C{cores} of a core by a CFS quota (cgroup v1 C{cpu.cfs_quota_us}, v2
    C{cpu.max}), so that one process and each of N workers get the same
    budget whatever else runs on the machine. L{remove_all} takes every one
    away again (moving out any process still inside first).
    """

    def __init__(
        self, cores: float, version: str, root: str, prefix: str | None = None, rmdir=os.rmdir
    ) -> None:
        """
        @param root: the hierarchy's mount (L{find_cpu_cgroup}); the cgroups
            are made directly under it.
        @param rmdir: removes one cgroup directory (a test's stand-in
            directory holds plain files where cgroupfs has control files).
        """
        self.cores = cores
        self.version = version
        self.root = root
        self.period_us = CFS_PERIOD_US
        self.quota_us = cfs_quota_us(cores, self.period_us)
        self.prefix = prefix or f"caracal-bench-{secrets.token_hex(4)}"
        self._rmdir = rmdir
        self.made: list[str] = []
        #: pid -> the cgroup directory it was in before L{limit} moved it.
        self.origin: dict[int, str] = {}

    def settings(self) -> dict:
        """What the report records about the quota."""
        return {
            "cores": self.cores,
            "cgroup": self.version,
            "quota_us": self.quota_us,
            "period_us": self.period_us,
            # The limited gateways' and the rig's weight (the rig is not capped).
            "weight": CPU_SHARES_V1 if self.version == "v1" else CPU_WEIGHT_V2,
            "parent": "unlimited",
        }

    @staticmethod
    def _write(path: str, value: str) -> None:
        # One value per write(2): cgroupfs takes one pid per write.
        with open(path, "w", encoding="ascii") as f:
            f.write(value)

    def _current(self, pid: int) -> str:
        """The directory of C{pid}'s cgroup in this hierarchy (the root when unknown)."""
        key = "" if self.version == "v2" else "cpu"
        try:
            with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
                for line in f:
                    _id, controllers, path = line.rstrip("\n").split(":", 2)
                    if (self.version == "v2" and controllers == key) or (
                        self.version == "v1" and key in controllers.split(",")
                    ):
                        candidate = os.path.join(self.root, path.lstrip("/"))
                        if os.path.isdir(candidate):
                            return candidate
        except (OSError, ValueError):
            pass
        return self.root

    def limit(self, name: str, pid: int, capped: bool = True) -> str:
        """
        Make cgroup C{<prefix>-<name>} limited to C{cores} (only weighted
        when not C{capped}), move C{pid} into it; its path.
        """
        path = os.path.join(self.root, f"{self.prefix}-{name}")
        if self.version == "v2":
            control = os.path.join(self.root, "cgroup.subtree_control")
            with open(control, encoding="ascii") as f:
                enabled = f.read().split()
            if "cpu" not in enabled:
                self._write(control, "+cpu")
        os.mkdir(path)
        self.made.append(path)
        if self.version == "v1":
            if capped:
                self._write(os.path.join(path, "cpu.cfs_period_us"), str(self.period_us))
                self._write(os.path.join(path, "cpu.cfs_quota_us"), str(self.quota_us))
            self._write(os.path.join(path, "cpu.shares"), str(CPU_SHARES_V1))
        else:
            if capped:
                self._write(os.path.join(path, "cpu.max"), f"{self.quota_us} {self.period_us}")
            self._write(os.path.join(path, "cpu.weight"), str(CPU_WEIGHT_V2))
        self.origin.setdefault(pid, self._current(pid))
        self._write(os.path.join(path, "cgroup.procs"), str(pid))
        return path

    @staticmethod
    def stat(path: str) -> dict[str, int]:
        """The cgroup's C{cpu.stat}: periods, throttled periods, throttled time (us)."""
        values = {}
        with open(os.path.join(path, "cpu.stat"), encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if value.strip().isdigit():
                    values[key] = int(value)
        throttled_us = values.get("throttled_usec", values.get("throttled_time", 0) // 1000)
        return {
            "periods": values.get("nr_periods", 0),
            "throttled_periods": values.get("nr_throttled", 0),
            "throttled_us": throttled_us,
        }

    def release(self, path: str) -> None:
        """Move every process of cgroup C{path} back where it was, then remove the cgroup."""
        try:
            with open(os.path.join(path, "cgroup.procs"), encoding="ascii") as f:
                pids = [int(line) for line in f if line.strip()]
        except FileNotFoundError:
            # Already gone (removed by hand): nothing to move or remove.
            self.made.remove(path)
            return
        for pid in pids:
            with contextlib.suppress(OSError):  # ended meanwhile
                self._write(os.path.join(self.origin.get(pid, self.root), "cgroup.procs"), str(pid))
        self._rmdir(path)
        self.made.remove(path)

    def remove_all(self) -> list[str]:
        """Release every cgroup still there; the problems, one line each."""
        problems = []
        for path in list(reversed(self.made)):
            try:
                self.release(path)
            except OSError as error:
                problems.append(f"could not remove cgroup {path}: {error}")
        return problems


# -- load -----------------------------------------------------------------


def loader_available(choice: str) -> str:
    """C{wrk} when installed (or asked for), else the Python fallback."""
    if choice == "python":
        return "python"
    if shutil.which("wrk"):
        return "wrk"
    if choice == "wrk":
        raise BenchError("wrk is not installed (apt-get install -y wrk), or use --loader python")
    return "python"


def run_load(
    loader: str,
    port: int,
    mode: str,
    duration: int,
    connections: int,
    threads: int,
    resource: str = "",
    token_file: str = "",
) -> dict:
    """One load run against 127.0.0.1:C{port}; returns the parsed C{BENCH_RESULT}."""
    url = f"https://127.0.0.1:{port}{PATH}"
    script_args = [mode, str(threads), resource, token_file]
    if loader == "wrk":
        argv = [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{duration}s",
            "--timeout",
            "5s",
            "-s",
            os.path.join(BENCH, "wrk.lua"),
            url,
            "--",
            *script_args,
        ]
    else:
        argv = python_command(
            "pyload.py",
            "--url",
            url,
            "--connections",
            str(connections),
            "--duration",
            str(duration),
            "--",
            *script_args,
        )
    completed = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration + 60, check=False
    )
    for line in completed.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT ") :])
    raise BenchError(
        f"{loader} gave no result (status {completed.returncode}): "
        f"{(completed.stderr or completed.stdout)[-600:]}"
    )


def summarize(raw: dict) -> dict:
    """req/s, p50/p99 in ms and the error count of one load run."""
    seconds = raw["duration_us"] / 1e6
    errors = raw["non2xx"] + sum(raw["socket_errors"].values())
    return {
        "requests": raw["requests"],
        "seconds": round(seconds, 3),
        "rps": round(raw["requests"] / seconds, 1) if seconds else 0.0,
        "p50_ms": round(raw["latency_us"]["p50"] / 1000, 2),
        "p90_ms": round(raw["latency_us"]["p90"] / 1000, 2),
        "p99_ms": round(raw["latency_us"]["p99"] / 1000, 2),
        "max_ms": round(raw["latency_us"]["max"] / 1000, 2),
        "errors": errors,
        "non2xx": raw["non2xx"],
        "non2xx_by_status": raw.get("non2xx_by_status", {}),
        "socket_errors": raw["socket_errors"],
        "tokens_exhausted": raw["exhausted"],
        "valid": errors == 0 and raw["exhausted"] == 0 and raw["requests"] > 0,
    }


def ratios(results: dict) -> dict:
    """(b)/(a), (c)/(a) for throughput, p50, p99 and CPU per request; (d)/(c) scaling."""
    bare = results.get("bare")
    out = {}
    if bare and "rps" in bare:
        for name in ("ambient", "per_call"):
            other = results.get(name)
            if not other or "rps" not in other:
                continue
            out[f"{name}/bare"] = {
                "rps": round(other["rps"] / bare["rps"], 3) if bare["rps"] else None,
                "p50": round(other["p50_ms"] / bare["p50_ms"], 3) if bare["p50_ms"] else None,
                "p99": round(other["p99_ms"] / bare["p99_ms"], 3) if bare["p99_ms"] else None,
            }
            if bare.get("front_cpu_us_per_request") and other.get("front_cpu_us_per_request"):
                out[f"{name}/bare"]["cpu_per_request"] = round(
                    other["front_cpu_us_per_request"] / bare["front_cpu_us_per_request"], 3
                )
    one, many = results.get("per_call"), results.get("workers")
    if one and many and "rps" in one and "rps" in many and one["rps"]:
        out["workers/per_call"] = {
            "workers": many["workers"],
            "scaling": round(many["rps"] / one["rps"], 3),
            "parent_core_share": many.get("parent_core_share"),
        }
    return out


def spec_checks(results: dict, ratio: dict) -> list[dict]:
    """
    Each SPEC 17 figure this run measured, next to its target:
    C{{"what", "value", "target", "ok"}} (C{value} and C{target} as printed).
    """
    checks = []

    def check(what: str, value: float, op: str, limit: float, unit: str = "x") -> None:
        ok = {"<=": value <= limit, "<": value < limit, ">=": value >= limit}[op]
        checks.append(
            {
                "what": what,
                "value": f"{value:.3g}{unit}",
                "target": f"{op} {limit:.3g}{unit}",
                "ok": ok,
            }
        )

    per_call = ratio.get("per_call/bare")
    if per_call:
        if per_call.get("cpu_per_request") is not None:
            check(
                "per_call CPU/request vs bare", per_call["cpu_per_request"], "<=", TARGET_CPU_RATIO
            )
        if per_call.get("rps") is not None:
            check("per_call req/s vs bare (1 process)", per_call["rps"], ">=", TARGET_RPS_RATIO)
        if per_call.get("p99") is not None:
            check("per_call p99 vs bare", per_call["p99"], "<=", TARGET_P99_RATIO)
    scaling = ratio.get("workers/per_call")
    if scaling:
        n = scaling["workers"]
        check(
            f"--workers {n} req/s vs 1 process", scaling["scaling"], ">=",
            round(TARGET_WORKERS_SCALING * n, 3),
        )  # fmt: skip
        if scaling.get("parent_core_share") is not None:
            check(
                "--workers parent CPU, share of a core",
                100 * scaling["parent_core_share"], "<", 100 * TARGET_PARENT_CORE, "%",
            )  # fmt: skip
    soak = results.get("soak")
    if soak and "mib_per_100k" in soak:
        # SPEC 17 says MB: the MiB measured, in MB (10^6 bytes), is what is compared.
        check(
            "RSS growth per 100k requests (after warm-up)", soak["mib_per_100k"] * MIB_IN_MB,
            "<", TARGET_SOAK_MB_PER_100K, " MB",
        )  # fmt: skip
    idle = results.get("idle")
    if idle and "gateway" in idle:
        check(
            "1,000 idle TLS keep-alive connections", idle["gateway"]["mib_per_1000"] * MIB_IN_MB,
            "<", TARGET_IDLE_MB_PER_1000, " MB",
        )  # fmt: skip
    return checks


def format_table(
    results: dict, ratio: dict, checks: list[dict] | None = None, settings: dict | None = None
) -> str:
    """The human-readable report."""
    lines = []
    quota = (settings or {}).get("cpu_quota")
    if quota:
        lines.append(
            f"cpu quota: {quota['cores']:g} of a core for (c)'s gateway and for each worker of"
            f" (d), parent unlimited (cgroup {quota['cgroup']}: {quota['quota_us']} us per"
            f" {quota['period_us']} us)"
        )
    if any(results.get(name) is not None for name in TARGETS):
        lines.append(f"{'target':<38}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for name in TARGETS:
        result = results.get(name)
        if result is None:
            continue
        if "rps" not in result:
            lines.append(f"{LABELS[name]:<38}  unavailable: {result.get('unavailable')}")
            continue
        flag = "" if result["valid"] else "  INVALID"
        if result["tokens_exhausted"]:
            flag += (
                f" ({result['tokens_exhausted']} requests without a fresh token;"
                " measure ambient too or raise --assumed-rate)"
            )
        label = LABELS[name].replace("N", str(result.get("workers", "N")))
        lines.append(
            f"{label:<38}{result['rps']:>10.1f}{result['p50_ms']:>10.2f}"
            f"{result['p99_ms']:>10.2f}{result['errors']:>8d}{flag}"
        )
    for name in TARGETS:
        cpu = results.get(name, {}).get("cpu_s")
        if cpu:
            if results[name].get("cpu_split"):
                # The front's own line counts the parent only; its workers are in the split.
                cpu = {**cpu, FRONT[name]: sum(results[name]["cpu_split"].values())}
            spent = ", ".join(f"{process} {seconds:.1f} s" for process, seconds in cpu.items())
            front = results[name].get("front_cpu_us_per_request", 0.0)
            lines.append(f"cpu during {name}: {spent} ({FRONT[name]}: {front:.0f} us per request)")
        split = results.get(name, {}).get("cpu_split")
        if split:
            seconds = results[name]["seconds"]
            shares = ", ".join(
                f"{process} {100 * used / seconds:.0f}%" for process, used in split.items()
            )
            lines.append(f"cpu split during {name} (share of a core): {shares}")
        limited = results.get(name, {}).get("cpu_quota")
        if limited:
            held = ", ".join(
                f"{process} {100 * (q['core_share'] or 0):.0f}% (throttled in"
                f" {q['throttled_periods']} of {q['periods']} periods)"
                for process, q in limited["processes"].items()
            )
            lines.append(f"cpu quota during {name} ({limited['cores']:g} of a core): {held}")
    for name in TARGETS:
        memory = results.get(name, {}).get("memory_mib")
        if memory:
            held = ", ".join(
                f"{process} {m['rss']:.0f} MiB (peak {m['peak']:.0f})"
                for process, m in memory.items()
                if process in ("bare", "gateway")
            )
            if held:
                lines.append(f"memory after {name}: {held}")
    soak = results.get("soak")
    if soak:
        lines.append(
            f"soak: {soak['requests']} requests ({soak['target']}) after"
            f" {soak.get('warmup_requests', 0)} of warm-up, gateway RSS"
            f" {soak['rss_before_mib']:.2f} -> {soak['rss_after_mib']:.2f} MiB"
            f" ({soak['mib_per_100k']:+.3f} MiB per 100k requests;"
            f" {soak.get('mib_per_100k_with_warmup', soak['mib_per_100k']):+.3f} counting"
            f" the warm-up from {soak.get('rss_start_mib', soak['rss_before_mib']):.2f} MiB)"
        )
    for name, idle in (results.get("idle") or {}).items():
        lines.append(
            f"idle: {idle['connections']} TLS keep-alive connections to {name}: RSS"
            f" {idle['rss_before_mib']:.1f} -> {idle['rss_idle_mib']:.1f} MiB"
            f" ({idle['kib_per_connection']:.1f} KiB each,"
            f" {idle['mib_per_1000']:.1f} MiB per 1,000)"
        )
    for key, value in ratio.items():
        if key == "workers/per_call":
            continue
        letter = {"ambient/bare": "(b)/(a)", "per_call/bare": "(c)/(a)"}[key]
        cpu = value.get("cpu_per_request")
        lines.append(
            f"ratio {letter}: throughput {value['rps']:.3f}x, p50 {value['p50']:.2f}x,"
            f" p99 {value['p99']:.2f}x" + (f", cpu/request {cpu:.2f}x" if cpu else "")
        )
    for item in checks or []:
        verdict = "ok" if item["ok"] else "MISSED"
        lines.append(
            f"SPEC 17: {item['what']:<40} {item['value']:>10}  (target {item['target']}) {verdict}"
        )
    return "\n".join(lines)


# -- the run --------------------------------------------------------------


class Bench:
    """One benchmark run: setup, checks, measurements, teardown."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.directory = tempfile.mkdtemp(prefix="caracal-bench-")
        self.processes = Processes(self.directory)
        self.database: TemporaryDatabase | None = None
        self.zone = f"bench-{secrets.token_hex(6)}"
        self.resource = f"bench-tool-{secrets.token_hex(4)}"
        self.results: dict = {}
        self.notes: list[str] = []
        self.bare_port: int | None = None
        self.gateway_port: int | None = None
        #: With --cpu-quota, the cgroups limiting (c)'s process and (d)'s workers.
        self.cgroups: CpuCgroups | None = None

    def say(self, message: str) -> None:
        if not self.args.quiet:
            print(message, file=sys.stderr, flush=True)

    # setup

    def start_upstream_and_certs(self) -> None:
        from tests.support.certs import make_chain

        make_chain(self.directory)
        self.cert = os.path.join(self.directory, "server.crt")
        self.key = os.path.join(self.directory, "server.key")
        self.ca = os.path.join(self.directory, "server-ca.pem")
        self.upstream_port = free_port()
        process = self.processes.start(
            "upstream", python_command("targets.py", "upstream", "--port", str(self.upstream_port))
        )
        self.processes.wait_listening("upstream", process, self.upstream_port)

    def start_bare(self) -> None:
        self.bare_port = free_port()
        process = self.processes.start(
            "bare",
            python_command(
                "targets.py",
                "bare",
                "--port",
                str(self.bare_port),
                "--upstream-port",
                str(self.upstream_port),
                "--cert",
                self.cert,
                "--key",
                self.key,
            ),
        )
        self.processes.wait_listening("bare", process, self.bare_port)

    def start_gateway(self) -> None:
        """The dev STS, a database with the bench resource, and the gateway."""
        self.sts_port = free_port()
        sts = self.processes.start(
            "devsts",
            twistd_command(
                "caracal-devsts", "--port", str(self.sts_port), "--bind", "127.0.0.1",
                "--insecure-http",
            ),
        )  # fmt: skip
        self.processes.wait_listening("devsts", sts, self.sts_port)

        self.database = TemporaryDatabase()
        self.database.create()
        admin_env = {**os.environ, "DATABASE_URL": self.database.url}
        upstream_url = f"http://127.0.0.1:{self.upstream_port}/"
        for command in (
            ["migrate"],
            ["add", self.resource, "--zone", self.zone, "--application", "bench-app",
             "--upstream", upstream_url],
        ):  # fmt: skip
            done = subprocess.run(
                [sys.executable, "-m", "caracal.gateway.admin", *command],
                env=admin_env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if done.returncode != 0:
                raise BenchError(f"admin {command[0]} failed: {done.stderr.strip()}")

        self.gateway_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "PYTHONUNBUFFERED": "1",
            "CARACAL_ENV": "dev",
            "BIND_ADDRESS": "127.0.0.1",
            "TLS_CERT_FILE": self.cert,
            "TLS_KEY_FILE": self.key,
            "STS_URL": f"http://127.0.0.1:{self.sts_port}",
            "INSECURE_STS": "true",
            "DATABASE_URL": self.database.url,
            "REDIS_URL": f"redis://{REDIS[0]}:{REDIS[1]}/0",
            "ALLOW_PRIVATE_UPSTREAMS": "true",
            "LOG_LEVEL": "info",
            "AUDIT_SPOOL_DIR": os.path.join(self.directory, "audit-spool"),
        }
        if self.args.otel:
            # Tracing on: every gateway process exports its spans to a local sink.
            self.gateway_env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.start_trace_sink()
        self.gateway_port = self.start_gateway_process("gateway")

    def start_gateway_process(self, name: str, *options: str) -> int:
        """One C{twistd caracal-gateway} (C{options} after the plugin name); its port once ready."""
        port = free_port()
        env = {**self.gateway_env, "PORT": str(port)}
        # The logger production runs with (etc/caracal-gateway.service, the
        # Dockerfile): JSON lines at LOG_LEVEL on standard output.
        command = twistd_command("--logger", PRODUCTION_LOGGER, "caracal-gateway", *options)
        gateway = self.processes.start(name, command, env)
        self.processes.wait_listening(name, gateway, port)
        # Listening is not serving: wait until Postgres, Redis and the STS are reachable.
        deadline = time.monotonic() + START_TIMEOUT
        status, body = None, b""
        while time.monotonic() < deadline:
            try:
                status, body = https_get(port, self.ca, {}, "/ready")
            except OSError as error:
                status, body = None, str(error).encode()
            if status == 200:
                return port
            time.sleep(0.25)
        raise BenchError(f"{name} not ready: {status} {body[:300]!r}")

    def start_trace_sink(self) -> str:
        """
        An OTLP/HTTP endpoint on 127.0.0.1 that takes every export and
        answers 200 (in a thread of this process, whose CPU is not counted),
        so that C{--otel} measures what exporting costs the gateway.
        """
        import http.server
        import threading

        class Sink(http.server.BaseHTTPRequestHandler):
            exports = 0

            def do_POST(self):  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                Sink.exports += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.trace_sink = Sink
        return f"http://127.0.0.1:{server.server_address[1]}"

    # checks

    def expect_ok(self, name: str, port: int, headers: dict[str, str]) -> None:
        status, body = https_get(port, self.ca, headers)
        if status != 200 or body != UPSTREAM_BODY:
            raise BenchError(f"{LABELS[name]}: check request answered {status} {body[:300]!r}")

    def gateway_headers(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}", "X-Caracal-Resource": self.resource}

    def check_per_call(self) -> None:
        """A fresh per_call token passes once; the same token again must be refused."""
        (token,) = mint_tokens(self.sts_port, self.zone, 1, "per_call", workers=1)
        self.expect_ok("per_call", self.gateway_port, self.gateway_headers(token))
        status, _ = https_get(self.gateway_port, self.ca, self.gateway_headers(token))
        if status != 401:
            raise BenchError(
                f"a replayed per_call token answered {status}, not 401: (c) would not"
                " measure single-use tokens"
            )

    # measurements

    def measure(self, name: str, port: int, token_file: str = "", warmup_file: str = "") -> None:
        mode = "per_call" if name == "workers" else name
        front = self.processes.pid(FRONT[name])
        # The workers of a --workers N gateway are the front's children.
        workers = children_of(front) if name == "workers" else []
        limited = self.limit_cpu(name, front, workers)
        try:
            self._measure(name, port, mode, front, workers, limited, token_file, warmup_file)
            if limited and workers and children_of(front) != workers:
                # A replacement worker starts in the parent's (unlimited) cgroup.
                self.notes.append(
                    f"{name}: a worker was replaced during the measurement and ran"
                    " without the quota"
                )
        finally:
            # The same process serves (b), the soak and --idle unlimited.
            for path in limited.values():
                self.cgroups.release(path)

    def limit_cpu(self, name: str, front: int, workers: list[int]) -> dict[str, str]:
        """
        With C{--cpu-quota}: (c)'s process, or each worker of (d), in its
        own cgroup limited to the quota, before the warm-up; C{{process:
        cgroup}} (empty without a quota or for the other targets).

        (d)'s parent stays unlimited where it was: SPEC 17 judges its CPU
        on its own (under 2 % of a core), a limit could only hide it, and a
        worker the parent restarts would inherit the parent's cgroup.
        """
        if self.cgroups is None or name not in ("per_call", "workers"):
            return {}
        if name == "workers" and len(workers) != self.args.workers:
            raise BenchError(
                f"--cpu-quota: found {len(workers)} workers of pid {front}, not {self.args.workers}"
            )
        pids = (
            {"gateway": front}
            if name == "per_call"
            else {f"worker {i}": pid for i, pid in enumerate(workers, 1)}
        )
        limited = {}
        try:
            for process, pid in pids.items():
                limited[process] = self.cgroups.limit(f"{name}-{process.replace(' ', '-')}", pid)
        except OSError as error:
            for path in limited.values():
                self.cgroups.release(path)
            raise BenchError(f"--cpu-quota: cannot limit {name} {process}: {error}") from error
        return limited

    def quota_result(self, name: str, result: dict, before: dict, after: dict) -> dict:
        """
        The quota and, per limited process, its share of a core and how
        often the kernel throttled it during the measurement: a process
        held at its quota shows a share near it and most periods throttled.
        A process under L{AT_QUOTA} of its quota was held back by something
        else (the machine, the STS, too few connections): noted, since the
        ratio then does not compare equal budgets.
        """
        cores = self.cgroups.cores
        seconds = result["seconds"]
        used = result.get("cpu_split") or {"gateway": result["cpu_s"].get("gateway", 0.0)}
        per_process = {}
        for process in before:
            share = used.get(process, 0.0) / seconds if seconds else 0.0
            per_process[process] = {
                "core_share": round(share, 3),
                "at_quota": share >= AT_QUOTA * cores,
                **{key: after[process][key] - before[process][key] for key in after[process]},
            }
        below = [p for p, q in per_process.items() if not q["at_quota"]]
        if below:
            self.notes.append(
                f"{name}: {', '.join(below)} used less than {AT_QUOTA:.0%} of the {cores:g}-core"
                " quota: held back by something other than the quota (other load on the"
                " machine, the STS, too few connections), so budgets were not equal"
            )
        return {"cores": cores, "processes": per_process}

    def _measure(
        self, name: str, port: int, mode: str, front: int, workers: list[int],
        limited: dict[str, str], token_file: str, warmup_file: str,
    ) -> None:  # fmt: skip
        args = self.args
        if args.warmup:
            run_load(
                self.loader, port, mode, args.warmup, args.connections, args.threads,
                self.resource, warmup_file or token_file,
            )  # fmt: skip
        self.say(f"measuring {LABELS[name]} for {args.duration} s ...")
        pids = {"parent": front, **{
            f"worker {i}": pid for i, pid in enumerate(workers, 1)
        }} if name == "workers" else {}  # fmt: skip
        split_before = {label: pid_cpu_seconds(pid) for label, pid in pids.items()}
        quota_before = {process: CpuCgroups.stat(path) for process, path in limited.items()}
        before = self.processes.cpu_seconds()
        raw = run_load(
            self.loader, port, mode, args.duration, args.connections, args.threads,
            self.resource, token_file,
        )  # fmt: skip
        after = self.processes.cpu_seconds()
        quota_after = {process: CpuCgroups.stat(path) for process, path in limited.items()}
        split = {
            label: round(pid_cpu_seconds(pid) - split_before[label], 2)
            for label, pid in pids.items()
        }
        result = summarize(raw)
        # Resident memory after the load, and the peak so far, per process.
        result["memory_mib"] = {
            process: {"rss": round(rss, 1), "peak": round(peak, 1)}
            for process, (rss, peak) in self.processes.memory_mib().items()
        }
        # Where the cores went during the measurement (the load generator excluded).
        result["cpu_s"] = {
            process: round(after[process] - before[process], 2)
            for process in after
            if process in before and after[process] - before[process] >= 0.05
        }
        # CPU per request depends much less on other load than req/s does.
        if result["requests"]:
            result["cpu_ms_per_request"] = round(
                1000 * sum(result["cpu_s"].values()) / result["requests"], 3
            )
            # The target's own process (with its workers): what SPEC 17 compares.
            own = sum(split.values()) if split else result["cpu_s"].get(FRONT[name], 0.0)
            result["front_cpu_us_per_request"] = round(1e6 * own / result["requests"], 1)
        if split:
            result["workers"] = len(split) - 1
            result["cpu_split"] = split
            result["parent_core_share"] = round(split["parent"] / result["seconds"], 4)
        if limited:
            result["cpu_quota"] = self.quota_result(name, result, quota_before, quota_after)
        self.results[name] = result

    def per_call_budget(self, seconds: int, measured: str = "ambient") -> int:
        """
        Tokens enough for C{seconds} at twice (b)'s rate, or at C{--assumed-rate}
        when (b) was not measured; twice, because the rate of one run varies
        with whatever else the machine is doing.
        """
        rate = self.results.get(measured, {}).get("rps") or self.args.assumed_rate
        if measured == "per_call":
            # N workers serve up to N times one process.
            rate *= self.args.workers
        return math.ceil(rate * seconds * 2) + 10 * self.args.connections

    def run(self) -> dict:
        args = self.args
        self.loader = loader_available(args.loader)
        self.load_at_start = os.getloadavg()
        if args.cpu_quota is not None:
            self.cgroups = CpuCgroups(args.cpu_quota, *find_cpu_cgroup())
            # The rig (this process and all it starts: wrk, the upstream, the
            # dev STS, the gateways until they are limited) weighted too, not
            # capped: on a machine busy with other work a starved STS or wrk
            # would hold the limited gateways under their budget again.
            try:
                self.cgroups.limit("rig", os.getpid(), capped=False)
            except OSError as error:
                raise BenchError(f"--cpu-quota: cannot make the rig's cgroup: {error}") from error
            self.say(
                f"cpu quota: {args.cpu_quota:g} of a core per gateway process"
                f" (cgroup {self.cgroups.version} under {self.cgroups.root})"
            )
        self.say(f"load generator: {self.loader}; temporary files in {self.directory}")
        self.start_upstream_and_certs()
        # --idle-only: bare and the gateway are started (and checked) for the
        # idle measurement, no load target is measured.
        wanted = [] if args.idle_only else args.targets
        if "bare" in wanted or args.idle_only:
            self.start_bare()
            self.expect_ok("bare", self.bare_port, {})
        gateway_ready = False
        if {"ambient", "per_call", "workers"} & set(wanted) or args.soak or args.idle_only:
            try:
                self.start_gateway()
                self.ambient_token = mint_tokens(self.sts_port, self.zone, 1, "ambient", 1)[0]
                if "ambient" in wanted:
                    self.expect_ok(
                        "ambient", self.gateway_port, self.gateway_headers(self.ambient_token)
                    )
                if "per_call" in wanted:
                    self.check_per_call()
                gateway_ready = True
            except BenchError as error:
                if not args.allow_missing:
                    raise
                for name in ("ambient", "per_call"):
                    if name in wanted:
                        self.results[name] = {"unavailable": str(error).splitlines()[0]}
                self.say(f"gateway targets unavailable: {error}")

        if "bare" in wanted:
            self.measure("bare", self.bare_port)
        if gateway_ready and "ambient" in wanted:
            token_file = write_tokens(
                os.path.join(self.directory, "ambient.tokens"), [self.ambient_token]
            )
            self.measure("ambient", self.gateway_port, token_file)
        if gateway_ready and "per_call" in wanted:
            warmup = mint_tokens(
                self.sts_port, self.zone, self.per_call_budget(args.warmup), "per_call"
            ) if args.warmup else []  # fmt: skip
            count = self.per_call_budget(args.duration)
            self.say(f"minting {count} single-use tokens ...")
            started = time.monotonic()
            tokens = mint_tokens(self.sts_port, self.zone, count, "per_call")
            self.notes.append(
                f"per_call: {count} tokens minted in {time.monotonic() - started:.1f} s"
                " before the measurement (not measured)"
            )
            self.measure(
                "per_call",
                self.gateway_port,
                write_tokens(os.path.join(self.directory, "per_call.tokens"), tokens),
                write_tokens(os.path.join(self.directory, "warmup.tokens"), warmup or ["none"]),
            )
        if gateway_ready and "workers" in wanted:
            self.workers_port = self.start_gateway_process(
                "gateway-workers", "--workers", str(args.workers)
            )
            count = self.per_call_budget(args.duration, "per_call")
            self.say(f"minting {count} single-use tokens for --workers {args.workers} ...")
            warmup = mint_tokens(
                self.sts_port, self.zone, self.per_call_budget(args.warmup, "per_call"),
                "per_call",
            ) if args.warmup else []  # fmt: skip
            tokens = mint_tokens(self.sts_port, self.zone, count, "per_call")
            self.measure(
                "workers",
                self.workers_port,
                write_tokens(os.path.join(self.directory, "workers.tokens"), tokens),
                write_tokens(os.path.join(self.directory, "wwarmup.tokens"), warmup or ["none"]),
            )
        if gateway_ready and args.soak:
            self.soak(args.soak)
        if args.idle:
            self.results["idle"] = {}
            for name, port in (("bare", self.bare_port), ("gateway", self.gateway_port)):
                if port is None or (name == "gateway" and not gateway_ready):
                    continue
                self.say(f"holding {args.idle} idle TLS connections to {name} ...")
                self.results["idle"][name] = idle_connections_mib(
                    self.processes.pid(name), port, self.ca, args.idle
                )
        return self.report()

    def soak(self, requests: int) -> None:
        """
        About C{requests} ambient requests through the gateway (a long wrk run
        sized from (b)'s rate) and its RSS before and after: growth per 100k.
        A fifth as many requests go first, unmeasured: what a process takes
        once while its pools, caches and allocator arenas fill up is not
        growth per request (a leak keeps growing after it). Both figures
        are kept; SPEC 17 is checked against the one after the warm-up.
        """
        rate = self.results.get("ambient", {}).get("rps") or self.args.assumed_rate
        token_file = write_tokens(
            os.path.join(self.directory, "ambient.tokens"), [self.ambient_token]
        )
        pid = self.processes.pid("gateway")

        def load(count: int) -> dict:
            seconds = max(1, math.ceil(count / rate))
            raw = run_load(
                self.loader, self.gateway_port, "ambient", seconds, self.args.connections,
                self.args.threads, self.resource, token_file,
            )  # fmt: skip
            return summarize(raw)

        start = pid_rss_mib(pid)
        self.say(f"soak: ambient warm-up (about {requests // 5} requests) ...")
        warmup = load(requests // 5)
        before = pid_rss_mib(pid)
        self.say(f"soak: ambient load (about {requests} requests) ...")
        done = load(requests)
        after = pid_rss_mib(pid)
        self.results["soak"] = {
            "target": "ambient",
            "requests": done["requests"],
            "errors": done["errors"] + warmup["errors"],
            "valid": done["valid"] and warmup["valid"],
            "warmup_requests": warmup["requests"],
            "rss_start_mib": round(start, 2),
            "rss_before_mib": round(before, 2),
            "rss_after_mib": round(after, 2),
            "mib_per_100k": round((after - before) * 100_000 / max(1, done["requests"]), 3),
            "mib_per_100k_with_warmup": round(
                (after - start) * 100_000 / max(1, done["requests"] + warmup["requests"]), 3
            ),
        }

    def report(self) -> dict:
        import twisted

        args = self.args
        ratio = ratios(self.results)
        loader_version = ""
        if self.loader == "wrk":
            loader_version = subprocess.run(
                ["wrk", "-v"], capture_output=True, text=True, check=False
            ).stdout.splitlines()[0:1]
            loader_version = loader_version[0] if loader_version else "wrk"
        return {
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "command": measured_command(sys.argv[1:]),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "twisted": twisted.__version__,
                # Other work on the machine skews the figures; recorded to judge them.
                "loadavg_at_start": [round(x, 2) for x in self.load_at_start],
            },
            "settings": {
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "connections": args.connections,
                "threads": args.threads,
                "loader": self.loader,
                "loader_version": loader_version,
                "path": PATH,
                "tracing": args.otel,
                "trace_exports": getattr(getattr(self, "trace_sink", None), "exports", None),
                "cpu_quota": self.cgroups.settings() if self.cgroups else None,
            },
            "targets": {name: self.results[name] for name in TARGETS if name in self.results},
            "soak": self.results.get("soak"),
            "idle": self.results.get("idle"),
            "ratios": ratio,
            "spec17": spec_checks(self.results, ratio),
            "notes": self.notes,
        }

    def teardown(self) -> None:
        """Stop every process, drop the database, delete the JTI keys, remove temp files."""
        # A second Ctrl-C must not leave servers, the database or keys behind;
        # every step below is bounded in time.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        problems = []
        self.processes.stop_all()
        if self.cgroups is not None:
            # After the processes: a cgroup can only go once it is empty.
            problems += self.cgroups.remove_all()
        if self.database is not None:
            try:
                self.database.drop()
            except Exception as error:  # noqa: BLE001 - teardown goes on; reported below
                problems.append(f"could not drop database {self.database.name}: {error}")
        try:
            deleted = delete_jti_keys(self.zone)
            if deleted:
                self.say(f"deleted {deleted} JTI keys of zone {self.zone}")
        except (OSError, BenchError) as error:
            problems.append(f"could not delete JTI keys seen:jti:{self.zone}:*: {error}")
        if self.args.keep_temp:
            self.say(f"kept {self.directory}")
        else:
            shutil.rmtree(self.directory, ignore_errors=True)
        for problem in problems:
            print(f"bench: warning: {problem}", file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description="Gateway vs bare Twisted reverse proxy, on this machine."
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per target (10)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent connections (16)")
    parser.add_argument(
        "--threads", type=int, default=1, help="wrk threads (1: leave the cores to the servers)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="seconds of unmeasured load before each target (1)"
    )
    parser.add_argument("--out", default=os.path.join(BENCH, "last-run.json"))
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="comma-separated subset of bare,ambient,per_call,workers (bare,ambient,per_call)",
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 2,
        help="N of target (d), a per_call run of 'twistd caracal-gateway --workers N' (cores)",
    )  # fmt: skip
    parser.add_argument(
        "--soak", type=int, default=0, metavar="REQUESTS",
        help="after the targets, about REQUESTS ambient requests: gateway RSS growth per 100k",
    )  # fmt: skip
    parser.add_argument(
        "--idle", type=int, default=0, metavar="CONNECTIONS",
        help="hold CONNECTIONS idle TLS keep-alive connections to bare and gateway: RSS each",
    )  # fmt: skip
    parser.add_argument(
        "--idle-only", action="store_true",
        help="with --idle: start bare and the gateway, measure only the idle connections"
        " (no load, --targets ignored)",
    )  # fmt: skip
    parser.add_argument("--loader", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="report the gateway targets as unavailable instead of failing when they cannot run",
    )
    parser.add_argument(
        "--assumed-rate",
        type=float,
        default=500.0,
        help="req/s used to size the per_call token pool when (b) was not measured first",
    )
    parser.add_argument(
        "--otel",
        action="store_true",
        help="tracing on: the gateway exports spans to a local OTLP sink",
    )
    parser.add_argument(
        "--cpu-quota", type=float, default=None, metavar="CORES",
        help="limit (c)'s gateway and each worker of (d) to CORES of a core (cgroup CFS quota)",
    )  # fmt: skip
    parser.add_argument("--keep-temp", action="store_true", help="keep logs and certificates")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown or not args.targets:
        parser.error(f"--targets: choose from {', '.join(TARGETS)}")
    if args.duration < 1 or args.connections < 1 or args.threads < 1 or args.warmup < 0:
        parser.error("--duration, --connections and --threads must be at least 1")
    if args.idle_only and args.idle < 1:
        parser.error("--idle-only needs --idle CONNECTIONS")
    if args.threads > args.connections:
        args.threads = args.connections
    if args.cpu_quota is not None:
        if args.idle_only or not {"per_call", "workers"} & set(args.targets):
            parser.error("--cpu-quota applies to the per_call and workers targets only")
        processes = args.workers if "workers" in args.targets else 1
        problem = quota_problem(args.cpu_quota, processes, os.cpu_count() or 1)
        if problem is None:
            try:
                cfs_quota_us(args.cpu_quota)
            except BenchError as error:
                problem = str(error)
        if problem:
            parser.error(problem)
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    bench = Bench(args)
    try:
        report = bench.run()
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        bench.teardown()
    print(
        format_table(
            {**report["targets"], "soak": report["soak"], "idle": report["idle"]},
            report["ratios"],
            report["spec17"],
            report["settings"],
        )
    )
    for note in report["notes"]:
        print(f"note: {note}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    measured = [r for r in report["targets"].values() if "rps" in r]
    if args.idle_only:
        # Valid when every connection was opened and held on both servers.
        held = (report["idle"] or {}).values()
        return 0 if held and all(r["connections"] == args.idle for r in held) else 1
    return 0 if measured and all(r["valid"] for r in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
