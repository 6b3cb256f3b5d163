# -*- test-case-name: tests.integration.test_adversarial -*-
"""
An adversary's bench: one real gateway process (C{twistd -n
caracal-gateway}, over TLS on 127.0.0.1) running under the connect guard
(C{connect_guard.c}, preloaded: the process cannot reach anything but
loopback), with the dev STS and a local upstream in the test process, and
the tools to attack it the way the SPEC section 12 review did: raw bytes
over a TLS socket, then checks that the refusal reached neither the STS nor
the upstream and left an access-log line naming its denial.

A test module adds rows by subclassing L{AdversarialTestCase}::

    class MyRows(AdversarialTestCase):
        gateway_env = {"MAX_CONNECTIONS": "8"}

        @defer.inlineCallbacks
        def test_something(self):
            \"\"\"...\"\"\"
            response = yield self.bench.send(raw_request(b"TRACE", b"/x"))
            self.assertRefused(response, 405, "method_not_allowed")
            yield self.assertDenialLogged(response, "method_not_allowed")
            self.assertUntouched()

The guard is checked when each test ends: its log must say C{LOADED} and
hold no C{BLOCK} line.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.replicas import RESOURCE, ReplicaSet
from tests.support.waiting import poll_until

GUARD_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "connect_guard.c")

#: A resource whose upstream URL pins a query the caller must not change.
PINNED_RESOURCE = "pinned"
PINNED_QUERY = "tenant=acme&readonly=1"
#: A provider-auth resource of the same zone: what a stolen mandate would buy.
PROVIDER_RESOURCE = "provider"

_built: dict[str, str] = {}


def build_connect_guard() -> str:
    """
    The connect guard compiled (once per test process) into a temporary
    directory; the path of the shared library.

    @raise SkipTest: no C compiler here, or it failed.
    """
    if "library" in _built:
        return _built["library"]
    compiler = shutil.which("cc")
    if compiler is None:
        raise SkipTest("no C compiler (cc) to build the connect guard the gateway must run under")
    directory = tempfile.mkdtemp(prefix="caracal-guard-")
    # Kept for the test process's life (gateways it starts load it), then removed.
    atexit.register(shutil.rmtree, directory, True)
    library = os.path.join(directory, "connect_guard.so")
    built = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", library, GUARD_SOURCE, "-ldl"],
        capture_output=True,
        check=False,
    )
    if built.returncode != 0:
        raise SkipTest(f"cannot build the connect guard: {built.stderr.decode(errors='replace')}")
    _built["library"] = library
    return library


def raw_request(
    method: bytes = b"GET",
    target: bytes = b"/tools/run",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    request_id: str | None = None,
    host: bytes = b"127.0.0.1",
) -> tuple[bytes, str]:
    """
    One HTTP/1.1 request as bytes, exactly as given (no normalisation of the
    target), with a C{Host}, a fresh C{X-Request-Id} to find its access
    line by, then C{headers} and C{body}. Returns C{(bytes, request_id)}.
    """
    request_id = request_id or f"adv-{uuid.uuid4().hex}"
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: " + host]
    lines.append(b"X-Request-Id: " + request_id.encode("ascii"))
    for name, value in headers or ():
        lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body, request_id


@dataclass
class RawResponse:
    """
    What came back on one raw connection.

    @ivar closed: the gateway closed the connection (within the wait).
    """

    request_id: str
    received: bytes
    closed: bool
    status: int | None = None
    headers: dict[bytes, list[bytes]] = field(default_factory=dict)
    body: bytes = b""

    def __post_init__(self) -> None:
        head, _sep, self.body = self.received.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) >= 2 and parts[1].isdigit():
            self.status = int(parts[1])
        for line in lines[1:]:
            name, _colon, value = line.partition(b":")
            self.headers.setdefault(name.strip().lower(), []).append(value.strip())

    def header(self, name: bytes) -> bytes | None:
        """The first value of header C{name}, or C{None}."""
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self) -> dict:
        """The body as JSON (a chunked body is not expected on a refusal)."""
        return json.loads(self.body)


class _RawClient(protocol.Protocol):
    """Writes a payload, collects everything until the gateway closes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""
        self.answered: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        if self.payload:
            self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received and not self.answered.called:
            self.answered.callback(None)

    def connectionLost(self, reason) -> None:
        if not self.answered.called:
            self.answered.callback(None)
        self.closed.callback(None)


class AdversaryBench(ReplicaSet):
    """
    A L{ReplicaSet} of one gateway under the connect guard, with three
    resources of one zone: C{tools} (upstream C{/api}), C{pinned} (upstream
    C{/api?tenant=acme&readonly=1}) and C{provider} (C{provider_oauth}).

    @ivar gateway: the L{GatewayProcess}.
    @ivar guard_log: the connect guard's log file.
    @ivar tmpdir: the gateway's C{TMPDIR} (where it would spool bodies).
    """

    def __init__(self, directory: str, guard_library: str, **env: str) -> None:
        super().__init__(directory)
        self.guard_library = guard_library
        self.guard_log = os.path.join(self.directory, "connect-guard.log")
        self.tmpdir = os.path.join(self.directory, "tmp")
        os.makedirs(self.tmpdir, exist_ok=True)
        self.extra_env = env

    def environ(self, port: int) -> dict[str, str]:
        environ = super().environ(port)
        environ.update(
            LD_PRELOAD=self.guard_library,
            CONNECT_GUARD_LOG=self.guard_log,
            TMPDIR=self.tmpdir,
        )
        environ.update(self.extra_env)
        return environ

    @defer.inlineCallbacks
    def start(self, count: int = 1):
        """Start the STS, the upstream, the resources, then the gateway; fires once it serves."""
        yield super().start(count=0)
        for identifier, path, mode in (
            (PINNED_RESOURCE, "/api?" + PINNED_QUERY, "caracal_jwt"),
            (PROVIDER_RESOURCE, "/provider", "provider_oauth"),
        ):
            self.database.execute(
                "INSERT INTO gateway_resources (resource_identifier, zone_id, application_id,"
                " upstream_url, auth_mode) VALUES (%s, %s, %s, %s, %s)",
                (identifier, self.zone, "app-replicas", self.upstream.url(path), mode),
            )
        for _ in range(count):
            yield self.add_gateway()
        yield defer.gatherResults([self.serving(gateway) for gateway in self.gateways])

    @property
    def gateway(self):
        return self.gateways[0]

    # What the STS and the upstream saw.

    def sts_seen(self) -> int:
        """Requests the STS received: exchanges, JWKS fetches, health checks."""
        return self.sts.exchanges + self.sts.jwks_fetches + self.sts.health_checks

    def upstream_seen(self) -> int:
        """Requests the upstream received."""
        return len(self.upstream.requests)

    # Attacks.

    @defer.inlineCallbacks
    def send(
        self,
        request: tuple[bytes, str],
        wait_close: float = 5.0,
        on_answer=None,
        port: int | None = None,
    ):
        """
        Open a TLS connection to the gateway, write C{request} (from
        L{raw_request}) and wait up to C{wait_close} seconds for the gateway
        to close it. Fires with a L{RawResponse}.

        @param on_answer: called with the gateway's pid as soon as the
            response head is in, before waiting for the close (to look at
            the process while the connection is still open).
        """
        payload, request_id = request
        client = yield self.connect(payload, port)
        yield client.answered.addTimeout(wait_close, self.reactor)
        if on_answer is not None:
            on_answer(self.gateway.pid)
        closed = True
        try:
            yield client.closed.addTimeout(wait_close, self.reactor)
        except defer.TimeoutError:
            closed = False
            client.transport.abortConnection()
        return RawResponse(request_id, client.received, closed)

    def connect(self, payload: bytes = b"", port: int | None = None) -> defer.Deferred:
        """A TLS connection to the gateway that writes C{payload}; fires with the L{_RawClient}."""
        trust = Certificate.loadPEM(self.root.pem)
        endpoint = wrapClientTLS(
            optionsForClientTLS("127.0.0.1", trustRoot=trust),
            TCP4ClientEndpoint(self.reactor, "127.0.0.1", port or self.gateway.port, timeout=5),
        )
        return endpoint.connect(protocol.Factory.forProtocol(lambda: _RawClient(payload)))

    # The gateway's own records.

    def access_lines(self) -> list[dict]:
        """Every access-log record the gateway wrote to stdout so far."""
        records = []
        for line in self.gateway.output.splitlines():
            # twistd -n prefixes each line with a time and the namespace.
            if not line.startswith(b"{"):
                line = line.partition(b" [caracal.access#info] ")[2]
            if not line.startswith(b"{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "status" in record and "request_id" in record:
                records.append(record)
        return records

    def access_line(self, request_id: str) -> dict | None:
        """The access record of C{request_id}, or C{None} (yet)."""
        for record in self.access_lines():
            if record["request_id"] == request_id:
                return record
        return None

    def spooled_files(self) -> list[str]:
        """Files under the gateway's C{TMPDIR} it holds open (spooled bodies)."""
        directory = f"/proc/{self.gateway.pid}/fd"
        found = []
        for entry in os.listdir(directory):
            try:
                target = os.readlink(os.path.join(directory, entry))
            except OSError:
                continue
            if target.startswith(self.tmpdir):
                found.append(target)
        return found

    @defer.inlineCallbacks
    def metrics(self):
        """The gateway's JSON counters (GET /metrics over TLS)."""
        import treq

        response = yield treq.get(
            f"https://127.0.0.1:{self.gateway.port}/metrics", agent=self.agent
        )
        body = yield response.content()
        return json.loads(body)


class AdversarialTestCase(TestCase):
    """
    Each test gets a fresh L{AdversaryBench} (C{self.bench}) started with
    C{gateway_env} added to its environment; after the test the bench is
    stopped (the gateway must exit 0) and the connect guard's log checked.
    """

    timeout = 60
    gateway_env: dict[str, str] = {}

    @defer.inlineCallbacks
    def setUp(self):
        library = build_connect_guard()
        self.bench = AdversaryBench(self.mktemp(), library, **self.gateway_env)
        self.addCleanup(self._stop_bench)
        yield self.bench.start()
        self.sts_before = self.bench.sts_seen()
        self.upstream_before = self.bench.upstream_seen()

    @defer.inlineCallbacks
    def _stop_bench(self):
        statuses = yield self.bench.stop()
        self.assertEqual(statuses, [0] * len(statuses), "the gateway did not stop cleanly")
        with open(self.bench.guard_log) as f:
            log = f.read()
        self.assertIn("LOADED", log, "the connect guard was not loaded into the gateway")
        self.assertNotIn("BLOCK", log, "the gateway tried to reach a non-loopback address")

    def assertRefused(self, response: RawResponse, status: int, code: str) -> dict:
        """C{response} is the JSON error envelope with C{status} and C{code}; returns it."""
        self.assertEqual(response.status, status, response.received[:500])
        body = response.json()
        self.assertEqual(body["error"], code, body)
        self.assertEqual(body["request_id"], response.request_id)
        return body

    def assertClosedByGateway(self, response: RawResponse) -> None:
        """The answer said C{Connection: close} and the gateway closed the connection."""
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(response.closed, "the gateway kept the connection open")

    def assertUntouched(self) -> None:
        """Neither the STS nor the upstream received anything since setUp."""
        self.assertEqual(self.bench.sts_seen(), self.sts_before, "the STS was called")
        self.assertEqual(
            self.bench.upstream_seen(), self.upstream_before, "the upstream was called"
        )

    @defer.inlineCallbacks
    def assertDenialLogged(self, response: RawResponse, denial: str):
        """The gateway's access line for C{response} names C{denial}; fires with the record."""
        found = yield poll_until(
            lambda: self.bench.access_line(response.request_id) is not None, 5.0
        )
        tail = self.bench.gateway.output[-3000:].decode(errors="replace")
        self.assertIsNotNone(found, f"no access line for {response.request_id}; output: {tail}")
        record = self.bench.access_line(response.request_id)
        self.assertEqual(record["denial"], denial, record)
        self.assertEqual(record["status"], response.status, record)
        return record


__all__ = [
    "PINNED_QUERY",
    "PINNED_RESOURCE",
    "PROVIDER_RESOURCE",
    "RESOURCE",
    "AdversarialTestCase",
    "AdversaryBench",
    "RawResponse",
    "build_connect_guard",
    "raw_request",
]
