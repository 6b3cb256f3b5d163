# -*- test-case-name: tests.integration.test_mcp -*-
"""
The official MCP SDK through a real gateway (SPEC 13): a real MCP server
(the SDK's C{MCPServer} over streamable HTTP, L{tests.support.mcp_server},
in its own process on 127.0.0.1) registered as a resource, a real
C{twistd caracal-gateway} over TLS in front of it (Postgres, Redis and the
dev STS of a L{ReplicaSet}), and the SDK's own C{Client} driven by the
README's code (extracted from C{README.rst} and run as it stands), with a
fresh per_call token on every HTTP request.

The gateway runs with C{WRITE_TIMEOUT=1s} and C{STREAM_IDLE_TIMEOUT=1s}:
every call here outlives both, and lives only because event streams are
bound by silence, not by duration, and keep-alives (C{SSE_KEEPALIVE=200ms})
fill the silence of the standing GET stream.

The SDK is asyncio: each scenario runs in a thread with its own event loop
while the reactor keeps serving the dev STS.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.process import GatewayProcess, free_port
from tests.support.replicas import ReplicaSet

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MCP_RESOURCE = "mcp-tools"

#: Generous: importing the SDK takes seconds on a busy machine.
SERVER_START_TIMEOUT = 90.0


def readme_snippet() -> dict:
    """
    Run the first Python code block of README.rst's "Connecting an MCP
    client" section; return its namespace (what a reader would copy).
    """
    with open(os.path.join(ROOT, "README.rst"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("Connecting an MCP client\n", 1)[1]
    block = section.split(".. code-block:: python\n", 1)[1]
    lines = []
    for line in block.splitlines()[1:]:
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    namespace: dict = {}
    exec(compile("\n".join(lines), "README.rst", "exec"), namespace)  # noqa: S102
    return namespace


def timestamp(text: str) -> float:
    """Seconds since the epoch of a log line's C{ts} (C{2026-01-01T00:00:00.123Z})."""
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
        return json.loads(response.read())


class MCPServerProcess:
    """L{tests.support.mcp_server} in a subprocess on a free loopback port."""

    def __init__(self, directory: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(os.path.join(directory, "mcp-server.log"), "wb")  # noqa: SIM115
        self.process = subprocess.Popen(  # noqa: S603
            [
                sys.executable,
                os.path.join(ROOT, "tests", "support", "mcp_server.py"),
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"MCP server exited with {self.process.returncode}")
            try:
                _get_json(self.url + "/stats")
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"MCP server not up within {SERVER_START_TIMEOUT} s")

    def stats(self) -> dict:
        return _get_json(self.url + "/stats")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._log.close()


class MCPThroughGatewayTests(TestCase):
    """The SDK's client and server, with the gateway between them."""

    timeout = 180

    @defer.inlineCallbacks
    def setUp(self):
        try:
            import mcp.server  # noqa: F401
        except ImportError:
            raise SkipTest("the mcp SDK (the test extra of setup.cfg) is not installed") from None
        self.snippet = readme_snippet()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.server = MCPServerProcess(directory)
        self.addCleanup(self.server.stop)
        self.replicas = ReplicaSet(self.mktemp(), reactor=reactor)
        self.addCleanup(self.replicas.stop)
        yield self.replicas.start(count=0)
        yield threads.deferToThread(self.server.wait_ready)
        self.replicas.database.execute(
            "INSERT INTO gateway_resources (resource_identifier, zone_id, application_id,"
            " upstream_url) VALUES (%s, %s, %s, %s)",
            (MCP_RESOURCE, self.replicas.zone, "app-mcp", self.server.url),
        )
        port = free_port()
        directory = os.path.join(self.replicas.directory, f"mcp-{port}")
        os.makedirs(directory)
        environ = self.replicas.environ(port)
        environ.update(
            WRITE_TIMEOUT="1s",
            STREAM_IDLE_TIMEOUT="1s",
            SSE_KEEPALIVE="200ms",
        )
        # JSON log lines with millisecond timestamps (the systemd unit's logger).
        self.gateway = GatewayProcess(
            environ,
            ("-n", "--logger", "caracal.gateway.logfile.observer", "caracal-gateway"),
            cwd=directory,
            root=self.replicas.root,
        )
        self.addCleanup(self.gateway.kill)
        yield self.gateway.start()
        yield self.replicas.serving(self.gateway)
        self.verify = ssl.create_default_context(cadata=self.replicas.root.pem.decode("ascii"))
        self.mints = 0

    def session(self, **options):
        """The README's C{gateway_session}, minting per_call tokens from the dev STS."""
        dev_mint = self.snippet["dev_minter"](
            self.replicas.sts_url, self.replicas.zone, "mcp-session-1"
        )

        async def mint():
            self.mints += 1
            return await dev_mint()

        return self.snippet["gateway_session"](
            f"https://127.0.0.1:{self.gateway.port}/mcp",
            MCP_RESOURCE,
            mint,
            verify=self.verify,
            **options,
        )

    def run_client(self, scenario):
        """Run the coroutine function C{scenario} in a thread with its own loop."""
        return threads.deferToThread(asyncio.run, scenario())

    @defer.inlineCallbacks
    def test_long_tool_call_streams_progress_one_by_one(self):
        """
        A tool call of 3 s (three times WRITE_TIMEOUT) completes, and each
        progress notification reaches the client before the server even
        sends the next one. Every HTTP request of the session carried its
        own per_call token, each accepted once and exchanged for its own
        mandate.
        """
        progress: list[tuple[float, float]] = []

        async def on_progress(value, total, message):
            progress.append((value, time.time()))

        async def scenario():
            async with self.session() as client:
                started = time.monotonic()
                result = await client.call_tool(
                    "slow", {"seconds": 3.0, "steps": 5}, progress_callback=on_progress
                )
                took = time.monotonic() - started
                tools = await client.list_tools()
            return result, took, tools

        result, took, tools = yield self.run_client(scenario)
        self.assertFalse(result.is_error, result)
        self.assertEqual(result.content[0].text, "done after 5 steps")
        self.assertGreater(took, 2.0)
        self.assertEqual([value for value, _ in progress], [1, 2, 3, 4, 5])
        # One by one: step n arrived well before step n + 1 (0.6 s apart at
        # the server); a buffering gateway would deliver them together.
        arrivals = [at for _, at in progress]
        for earlier, later in zip(arrivals, arrivals[1:], strict=False):
            self.assertGreater(later - earlier, 0.3, arrivals)
        self.assertEqual({tool.name for tool in tools.tools}, {"slow", "announce"})
        stats = self.server.stats()
        # initialize, initialized, the GET stream, tools/call, tools/list,
        # DELETE: each one HTTP request with a token of its own, each
        # forwarded with a mandate of its own.
        self.assertGreaterEqual(stats["requests"], 5)
        self.assertEqual(self.mints, stats["requests"])
        self.assertEqual(stats["distinct_credentials"], stats["requests"])
        self.assertEqual(stats["methods"].get("DELETE"), 1)

    @defer.inlineCallbacks
    def test_standing_get_stream_survives_silence(self):
        """
        The standing GET stream stays open through 2.5 s of silence from
        the server (STREAM_IDLE_TIMEOUT is 1 s: keep-alives carry it), and
        the notification sent at the end of it arrives on that same stream.
        """
        changed = []

        async def scenario():
            arrived = asyncio.Event()

            async def on_message(message):
                method = getattr(getattr(message, "root", message), "method", None)
                if method == "notifications/tools/list_changed":
                    changed.append(time.monotonic())
                    arrived.set()

            async with self.session(message_handler=on_message) as client:
                asked = time.monotonic()
                await client.call_tool("announce", {"delay": 2.5})
                await asyncio.wait_for(arrived.wait(), 30)
                return changed[0] - asked

        waited = yield self.run_client(scenario)
        self.assertGreater(waited, 2.0)
        # One GET: the stream was never cut and reopened.
        self.assertEqual(self.server.stats()["methods"].get("GET"), 1)

    @defer.inlineCallbacks
    def test_sigterm_drains_stream_and_completes_call(self):
        """
        SIGTERM with the standing GET stream open and a tool call in
        flight: the call completes with its result, the GET stream is ended
        by the gateway (logged as drained, not as an upstream error), and
        the process exits 0 within a second of the call's end.

        The second is measured on the gateway's own log (millisecond
        timestamps): from the end of the call's response to the last line
        the process writes (the reactor's stop, after the drain and the
        background services). What follows it, the interpreter's teardown
        and the reaping, is the machine's speed, not the gateway's
        behaviour; on a loaded CI machine it alone can take a second.
        """
        progressed = threading.Event()

        async def on_progress(value, total, message):
            progressed.set()

        async def scenario():
            async with self.session() as client:
                # Listed first: the SDK lists the tools before its first call
                # of one, and once the gateway has stopped accepting, no new
                # request of this client can reach it.
                await client.list_tools()
                result = await client.call_tool(
                    "slow", {"seconds": 3.0, "steps": 3}, progress_callback=on_progress
                )
                return result, time.monotonic()

        running = self.run_client(scenario)
        yield threads.deferToThread(progressed.wait, 60)
        self.assertTrue(progressed.is_set())
        self.gateway.send_signal(signal.SIGTERM)
        ended = self.gateway.ended().addCallback(lambda status: (status, time.monotonic()))
        result, finished_at = yield running
        status, exited_at = yield ended
        log = (self.gateway.output + self.gateway.errors).decode(errors="replace")
        self.assertFalse(result.is_error, result)
        self.assertEqual(result.content[0].text, "done after 3 steps")
        self.assertEqual(status, 0, log)
        self.assertLess(exited_at - finished_at, 10.0, log)
        lines = [json.loads(line) for line in self.gateway.output.splitlines() if line.strip()]
        access = [line for line in lines if "request_id" in line and "method" in line]
        gets = [line for line in access if line["method"] == "GET" and line["path"] == "/mcp"]
        self.assertEqual([line.get("upstream_cut") for line in gets], ["drained"], log)
        [call] = [
            line
            for line in access
            if line["method"] == "POST" and line["duration_ms"] > 2000 and line["status"] == 200
        ]
        self.assertIn("caracal-gateway stopped", [line.get("msg") for line in lines])
        self.assertLess(timestamp(lines[-1]["ts"]) - timestamp(call["ts"]), 1.0, log)
        self.assertNotIn("upstream_error", log)
        self.assertNotIn("Traceback", log)
