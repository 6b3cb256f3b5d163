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

Every process, the database and the run's JTI keys are removed at the end,
also on errors and Ctrl-C.

Exit status: 0 every measured target valid; 1 a target had errors; 2 the
bench could not be set up (a target unavailable without C{--allow-missing}).
"""

from __future__ import annotations

import argparse
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


def format_table(results: dict, ratio: dict, checks: list[dict] | None = None) -> str:
    """The human-readable report."""
    lines = []
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
        args = self.args
        mode = "per_call" if name == "workers" else name
        if args.warmup:
            run_load(
                self.loader, port, mode, args.warmup, args.connections, args.threads,
                self.resource, warmup_file or token_file,
            )  # fmt: skip
        self.say(f"measuring {LABELS[name]} for {args.duration} s ...")
        front = self.processes.pid(FRONT[name])
        # The workers of a --workers N gateway are the front's children.
        pids = {"parent": front, **{
            f"worker {i}": pid for i, pid in enumerate(children_of(front), 1)
        }} if name == "workers" else {}  # fmt: skip
        split_before = {label: pid_cpu_seconds(pid) for label, pid in pids.items()}
        before = self.processes.cpu_seconds()
        raw = run_load(
            self.loader, port, mode, args.duration, args.connections, args.threads,
            self.resource, token_file,
        )  # fmt: skip
        after = self.processes.cpu_seconds()
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
            "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
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
