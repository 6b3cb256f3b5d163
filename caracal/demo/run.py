# -*- test-case-name: tests.integration.test_demo -*-
"""
C{python -m caracal.demo}: the newcomer's first five minutes.

On a machine with Postgres (127.0.0.1:5432) and Redis (127.0.0.1:6379) it
brings up, as C{twistd -n} child processes of its own:

  - the development STS (plaintext on 127.0.0.1: C{INSECURE_STS}, dev only),
  - a demo tool server (L{caracal.demo.upstream.EchoTool}) on 127.0.0.1,
  - the gateway in dev mode, over TLS with a certificate from a demo CA,

after creating the database C{caracal_demo} if missing, migrating it with
C{caracal-gateway-admin migrate} and registering the resource C{demo-tool}.
It then mints a per_call token at the dev STS, sends one real request
through the gateway, shows what the tool server received (a mandate, not the
caller's token) and what refusals look like, and prints a curl line to
repeat it.

By default everything is stopped again before it exits. C{--keep-running}
leaves the three processes up until Ctrl-C (pidfiles in the state
directory); C{--stop} stops such a demo from another terminal.

State (certificates, key, pidfiles, logs) lives in C{.demo/} (C{--state-dir}).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import http.client
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn

from caracal.demo.certificates import ensure_certificates
from caracal.gateway.config import GatewayConfig, parse_redis_url, redact_url
from caracal.gateway.logfile import LOG_FILE_VARIABLE
from caracal.gateway.probes import ProbeFailed, redis_answers
from caracal.gateway.tokens import fingerprint

PROG = "caracal.demo"

DEFAULT_GATEWAY_PORT = 18443
DEFAULT_STS_PORT = 18480
DEFAULT_UPSTREAM_PORT = 18481
DEFAULT_POSTGRES = "host=127.0.0.1 port=5432"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE = "caracal_demo"

LOOPBACK = "127.0.0.1"
ZONE = "demo-zone"
APPLICATION = "demo-app"
RESOURCE = "demo-tool"
TOOL_PATH = "/tools/echo"
TOKEN_TTL = 300

#: How long a child may take to answer its first probe.
START_TIMEOUT = 30.0
#: How long a child may take to exit after SIGTERM (the gateway drains first).
STOP_TIMEOUT = 30.0

#: Gateway variables a newcomer's shell might hold; the children never inherit
#: them. Derived from the configuration itself so a new setting is covered
#: without touching the demo.
GATEWAY_VARIABLES = frozenset(GatewayConfig().redacted()) | {LOG_FILE_VARIABLE}


#: The children's pidfile names and what their command lines contain.
CHILD_MARKERS = (
    ("gateway", "caracal-gateway"),
    ("sts", "caracal-devsts"),
    ("upstream", "EchoTool"),
)


class DemoError(Exception):
    """The demo cannot go on; C{str()} is what the newcomer reads."""


def say(text: str = "") -> None:
    """One line of the demo's story, at once (the children write logs, not here)."""
    # A closed stdout (the demo piped into head) must not stop the cleanup.
    with contextlib.suppress(BrokenPipeError):
        print(text, flush=True)


# -- the state directory -------------------------------------------------


@dataclass
class State:
    """The demo's directory: certificates, the HMAC key, pidfiles and logs."""

    directory: str

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def shown(self, name: str) -> str:
        """A path as the newcomer can paste it from where they ran the demo."""
        full = self.path(name)
        relative = os.path.relpath(full)
        return full if relative.startswith("..") else relative

    def hmac_key(self) -> str:
        """The demo's STREAMS_HMAC_KEY (hex), made once and kept (mode 0600)."""
        path = self.path("streams_hmac_key")
        with contextlib.suppress(OSError, ValueError):
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
            if len(bytes.fromhex(text)) >= 32:
                return text
        text = secrets.token_hex(32)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as f:
            f.write(text + "\n")
        return text


def read_pid(path: str) -> int | None:
    """The pid in a pidfile, or None (missing, empty, garbage)."""
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Whether C{pid} is a running process (a zombie is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def command_line(pid: int) -> str | None:
    """The process's command line (Linux /proc), or None when unknown."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return None


def ours(pid: int | None, marker: str) -> bool:
    """
    Whether C{pid} is alive and (where the OS tells) still the process the
    pidfile was written for, not a stranger who got the recycled pid.
    """
    if pid is None or not alive(pid):
        return False
    line = command_line(pid)
    return line is None or marker in line


# -- ports ---------------------------------------------------------------


def port_free(port: int) -> bool:
    """Whether 127.0.0.1:C{port} can be listened on (as twistd would, SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def pick_port(preferred: int | None, taken: set[int]) -> int:
    """C{preferred} if given and free, else any free port; never one of C{taken}."""
    if preferred and preferred not in taken and port_free(preferred):
        taken.add(preferred)
        return preferred
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((LOOPBACK, 0))
            port = probe.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


# -- HTTP, synchronously ---------------------------------------------------


@dataclass
class Reply:
    """An HTTP answer."""

    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes

    def json(self):
        return json.loads(self.body)


def call(
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    tls: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One HTTP(S) request; raises OSError when the server cannot be reached."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=tls
        )
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request(method, target or "/", body=body, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, response.reason, response.headers, response.read())
    finally:
        connection.close()


# -- child processes -------------------------------------------------------


def twistd_argv(*args: str) -> list[str]:
    """C{twistd ARGS} under this interpreter (the twistd next to it when there is one)."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [sys.executable, script, *args]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args]


@dataclass
class Child:
    """One C{twistd -n} process of the demo, with its pidfile and logs in the state."""

    name: str
    label: str
    args: list[str]
    state: State
    env: dict[str, str]
    process: subprocess.Popen | None = None

    @property
    def pidfile(self) -> str:
        return self.state.path(f"{self.name}.pid")

    @property
    def logfile(self) -> str:
        return self.state.path(f"{self.name}.log")

    @property
    def outfile(self) -> str:
        """What twistd writes outside its log (a refused start)."""
        return self.state.path(f"{self.name}.out")

    #: Where this run's lines begin in the log (twistd appends to it).
    log_offset: int = 0

    def start(self) -> None:
        try:
            self.log_offset = os.path.getsize(self.logfile)
        except OSError:
            self.log_offset = 0
        argv = twistd_argv("-n", "--pidfile", self.pidfile, "--logfile", self.logfile, *self.args)
        with open(self.outfile, "wb") as out:
            self.process = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C reaches the demo only, which then
                # stops the children in order (gateway first).
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def written(self) -> str:
        """What this run of the child wrote so far (its stray output, then its log)."""
        text = ""
        with contextlib.suppress(OSError), open(self.outfile, errors="replace") as f:
            text += f.read()
        with contextlib.suppress(OSError), open(self.logfile, errors="replace") as f:
            f.seek(self.log_offset)
            text += f.read()
        return text

    def port_taken(self) -> bool:
        """Whether the child died because its port was taken meanwhile."""
        return not self.running() and "Address already in use" in self.written()

    def tail(self, lines: int = 8) -> str:
        """The end of what the child wrote, to explain a failure."""
        text = []
        for path in (self.outfile, self.logfile):
            with contextlib.suppress(OSError):
                with open(path, encoding="utf-8", errors="replace") as f:
                    last = f.read().splitlines()[-lines:]
                if last:
                    text.append(f"  {self.state.shown(os.path.basename(path))}:")
                    text += [f"    {line}" for line in last]
        return "\n".join(text)

    def wait_ready(self, probe, timeout: float = START_TIMEOUT) -> None:
        """Poll C{probe()} until it returns True; fail if the child exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                code = self.process.returncode if self.process is not None else None
                raise DemoError(f"{self.label} exited (status {code}):\n{self.tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException, ssl.SSLError):
                if probe():
                    return
            if time.monotonic() > deadline:
                raise DemoError(f"{self.label} did not answer within {timeout:g} s:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, wait (the gateway drains), SIGKILL if it will not go; reap it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # twistd removes its pidfile on a clean stop; not after SIGKILL.
        if read_pid(self.pidfile) == self.process.pid:
            with contextlib.suppress(OSError):
                os.unlink(self.pidfile)


@dataclass
class Supervisor:
    """The demo's children; L{stop_all} stops them whatever happens."""

    children: list[Child] = field(default_factory=list)
    stopped: bool = False

    def add(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def stop_all(self) -> list[Child]:
        """Stop every child, newest first (the gateway before what it uses)."""
        if self.stopped:
            return []
        self.stopped = True
        # A second Ctrl-C must not cut the cleanup short.
        previous = {
            number: signal.signal(number, signal.SIG_IGN)
            for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        try:
            for child in reversed(self.children):
                child.stop()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        return [child for child in self.children if child.process is not None]


def _interrupted(signum, frame):
    raise KeyboardInterrupt


# -- the steps -------------------------------------------------------------


def check_services(postgres: str, redis_url: str) -> None:
    """Postgres and Redis answer, or the newcomer learns which one is missing."""
    try:
        redis_answers(parse_redis_url(redis_url), timeout=3.0)
    except (ProbeFailed, ValueError) as error:
        raise DemoError(
            f"Redis is not reachable at {redact_url(redis_url)}: {error}."
            " The demo needs a local Redis (e.g. apt install redis-server)."
        ) from None
    connection = _maintenance_connection(postgres)
    connection.close()


def _maintenance_connection(postgres: str):
    last = None
    for dbname in ("postgres", "template1"):
        try:
            connection = psycopg2.connect(make_dsn(postgres, dbname=dbname), connect_timeout=5)
        except psycopg2.Error as error:
            last = error
            continue
        connection.autocommit = True
        return connection
    reason = " ".join(str(last).split())
    raise DemoError(
        f"Postgres is not reachable at {redact_url(postgres)}: {reason}."
        " The demo needs a local Postgres its user may create databases in."
    )


def prepare_database(postgres: str, name: str) -> tuple[str, bool]:
    """Create database C{name} if missing; return its DSN and whether it was created."""
    connection = _maintenance_connection(postgres)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            created = cursor.fetchone() is None
            if created:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg2.Error as error:
        raise DemoError(f"cannot create database {name}: {' '.join(str(error).split())}") from None
    finally:
        connection.close()
    return make_dsn(postgres, dbname=name), created


def admin(database_url: str, *args: str) -> subprocess.CompletedProcess:
    """Run C{caracal-gateway-admin ARGS} against the demo database."""
    env = _clean_environ()
    env["UPSTREAM_HOST_ALLOWLIST"] = "127.0.0.1,localhost"
    return subprocess.run(
        [sys.executable, "-m", "caracal.gateway.admin", "--database-url", database_url, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def register_resource(database_url: str, upstream_url: str, zone: str) -> str:
    """Migrate the schema and add (or update) C{demo-tool}; returns what was done."""
    migrated = admin(database_url, "migrate")
    if migrated.returncode != 0:
        raise DemoError(f"caracal-gateway-admin migrate failed: {migrated.stderr.strip()}")
    fields = ["--zone", zone, "--application", APPLICATION, "--upstream", upstream_url]
    added = admin(database_url, "add", RESOURCE, *fields)
    if added.returncode == 0:
        return "added"
    if "already exists" not in added.stderr:
        raise DemoError(f"caracal-gateway-admin add failed: {added.stderr.strip()}")
    updated = admin(
        database_url,
        "update",
        RESOURCE,
        *fields,
        "--auth-mode",
        "caracal_jwt",
        "--default-auth-header",
        "--default-auth-scheme",
    )
    if updated.returncode != 0:
        raise DemoError(f"caracal-gateway-admin update failed: {updated.stderr.strip()}")
    return "updated"


def _clean_environ() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in GATEWAY_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def mint(sts_url: str, zone: str, session: str) -> str:
    """A fresh per_call caller token from the dev STS."""
    form = urlencode({"zone_id": zone, "use": "per_call", "ttl": TOKEN_TTL, "sid": session})
    reply = call(
        "POST",
        sts_url + "/dev/mint",
        {"Content-Type": "application/x-www-form-urlencoded"},
        form.encode("ascii"),
    )
    if reply.status != 200:
        raise DemoError(f"the dev STS refused to mint a token: HTTP {reply.status}")
    return reply.json()["token"]


def _one_line_json(body: bytes) -> str:
    try:
        return json.dumps(json.loads(body), sort_keys=False)
    except ValueError:
        return body.decode("utf-8", "replace")[:200]


@dataclass
class Demo:
    """One run of the demo, from the state directory to the last line."""

    options: argparse.Namespace
    state: State
    supervisor: Supervisor = field(default_factory=Supervisor)
    taken: set[int] = field(default_factory=set)

    def launch(self, preferred: int, make, probe, marker, attempts: int = 3):
        """
        Start the child C{make(port)} on C{preferred} (or a free port when it
        is taken) and wait until C{probe(port)} succeeds and its log shows
        C{marker(port)}: the log proves the answer came from this child and
        not from something else that took the port meanwhile, in which case
        it is tried again on another free port. Returns C{(child, port)}.
        """
        for attempt in range(attempts):
            port = pick_port(preferred if attempt == 0 else None, self.taken)
            child = self.supervisor.add(make(port))
            child.start()
            try:
                child.wait_ready(
                    lambda child=child, port=port: marker(port) in child.written() and probe(port)
                )
            except DemoError:
                if not child.port_taken():
                    raise
                self.supervisor.children.remove(child)
                continue
            return child, port
        raise DemoError(f"{child.label}: no free port after {attempts} attempts")

    def refuse_if_running(self) -> None:
        running = []
        for name, marker in (("demo", "caracal.demo"), *CHILD_MARKERS):
            pid = read_pid(self.state.path(f"{name}.pid"))
            if ours(pid, marker):
                running.append(f"{name} pid {pid}")
        if running:
            raise DemoError(
                f"a demo is already running ({', '.join(running)}); stop it with:"
                f" {stop_command(self.options)}"
            )

    def run(self) -> int:
        options, state = self.options, self.state
        os.makedirs(state.directory, exist_ok=True)
        self.refuse_if_running()
        check_services(options.postgres, options.redis_url)

        say(f"caracal demo: state in {state.shown('')}")
        certificates = ensure_certificates(state.directory)
        say(
            f"  certificates  {state.shown('ca.pem')} (demo CA, trust this),"
            f" {state.shown('gateway.crt')} for localhost/127.0.0.1"
            f" ({'new' if certificates.created else 'kept'},"
            f" valid until {certificates.not_after:%Y-%m-%d})"
        )
        hmac_key = state.hmac_key()
        say(f"  hmac key      {state.shown('streams_hmac_key')} (STREAMS_HMAC_KEY)")

        environ = _clean_environ()
        upstream, upstream_port = self.launch(
            options.upstream_port,
            lambda port: Child(
                "upstream",
                "the demo tool server",
                [
                    "web",
                    "--listen",
                    f"tcp:{port}:interface={LOOPBACK}",
                    "--class",
                    "caracal.demo.upstream.EchoTool",
                ],
                state,
                environ,
            ),
            lambda port: call("GET", f"http://{LOOPBACK}:{port}/").status == 200,
            lambda port: f"Site starting on {port}",
        )
        upstream_url = f"http://{LOOPBACK}:{upstream_port}"
        say(f"  tool server   {upstream_url} (pid {upstream.pid}): echoes what it receives")

        sts, sts_port = self.launch(
            options.sts_port,
            lambda port: Child(
                "sts",
                "the dev STS",
                ["caracal-devsts", "--port", str(port), "--bind", LOOPBACK, "--insecure-http"],
                state,
                environ,
            ),
            lambda port: call("GET", f"http://{LOOPBACK}:{port}/health").status == 200,
            lambda port: f"Site starting on {port}",
        )
        sts_url = f"http://{LOOPBACK}:{sts_port}"
        say(f"  dev STS       {sts_url} (pid {sts.pid}): plaintext, INSECURE_STS (dev only)")

        database_url, created = prepare_database(options.postgres, options.database)
        done = register_resource(database_url, upstream_url, options.zone)
        say(
            f"  database      {options.database} ({'created' if created else 'exists'},"
            f" schema migrated); resource {RESOURCE} -> {upstream_url} ({done})"
        )

        def gateway_child(port: int) -> Child:
            gateway_env = dict(environ)
            gateway_env.update(
                {
                    "CARACAL_ENV": "dev",
                    "PORT": str(port),
                    "BIND_ADDRESS": LOOPBACK,
                    "TLS_CERT_FILE": certificates.cert_file,
                    "TLS_KEY_FILE": certificates.key_file,
                    # Dev only: the dev STS speaks plaintext on loopback.
                    "INSECURE_STS": "true",
                    "STS_URL": sts_url,
                    "DATABASE_URL": database_url,
                    "REDIS_URL": options.redis_url,
                    "STREAMS_HMAC_KEY": hmac_key,
                    # Dev only: the tool server is on loopback, which production refuses.
                    "ALLOW_PRIVATE_UPSTREAMS": "true",
                    "UPSTREAM_HOST_ALLOWLIST": "127.0.0.1,localhost",
                    # The demo's own spool, not the system state directory.
                    "AUDIT_SPOOL_DIR": os.path.join(state.directory, "audit-spool"),
                }
            )
            return Child("gateway", "the gateway", ["caracal-gateway"], state, gateway_env)

        # Verified against the demo CA: only our own gateway passes this probe.
        tls = ssl.create_default_context(cafile=certificates.ca_file)
        gateway, gateway_port = self.launch(
            options.gateway_port,
            gateway_child,
            lambda port: (
                call("GET", f"https://localhost:{port}/ready", tls=tls, timeout=3).status == 200
            ),
            lambda port: f"port={port})",
        )
        gateway_url = f"https://localhost:{gateway_port}"
        say(f"  gateway       {gateway_url} (pid {gateway.pid}): CARACAL_ENV=dev, TLS, ready")
        say()

        self.show_request(gateway_url, sts_url, tls)
        self.show_refusals(gateway_url, sts_url, tls)
        self.show_repeat(gateway_url, sts_url)
        say("Logs (the gateway's has one JSON access line per request):")
        for child in (gateway, sts, upstream):
            say(f"  {state.shown(child.name + '.log')}")
        say()

        if options.keep_running:
            self.keep_running()
        return 0

    def show_request(self, gateway_url: str, sts_url: str, tls: ssl.SSLContext) -> None:
        token = mint(sts_url, self.options.zone, "demo-session")
        self.token = token
        say(
            f"One request through the gateway (a fresh per_call token {fingerprint(token)}"
            " from the dev STS):"
        )
        say(f"  POST {gateway_url}{TOOL_PATH}   X-Caracal-Resource: {RESOURCE}")
        reply = call(
            "POST",
            gateway_url + TOOL_PATH,
            {
                "Authorization": f"Bearer {token}",
                "X-Caracal-Resource": RESOURCE,
                "Content-Type": "application/json",
            },
            b'{"text": "hello from the caracal demo"}',
            tls=tls,
        )
        say(
            f"  -> {reply.status} {reply.reason}"
            f"   X-Request-Id: {reply.headers.get('X-Request-Id')}"
            f"   X-Caracal-Token-Expires-In: {reply.headers.get('X-Caracal-Token-Expires-In')}"
        )
        if reply.status != 200:
            raise DemoError(
                f"the gateway answered {reply.status}: {_one_line_json(reply.body)}\n"
                + self.supervisor.children[-1].tail()
            )
        echo = reply.json()
        seen = echo.get("credential", {})
        claims = seen.get("claims", {})
        if seen.get("fingerprint") == fingerprint(token):
            raise DemoError("the caller's own token reached the tool server")
        say(
            f"  the tool server received: {seen.get('scheme')} {seen.get('fingerprint')},"
            f" a mandate (not the caller's token {fingerprint(token)})"
        )
        say(
            f"    issued by {claims.get('iss')} for resource {claims.get('resource')},"
            f" application {claims.get('application_id')}, zone {claims.get('zone_id')},"
            f" acting party {claims.get('act', {}).get('sub')}"
        )
        say(f"  the tool server's answer: {json.dumps(echo, sort_keys=True)}")
        say()

    def show_refusals(self, gateway_url: str, sts_url: str, tls: ssl.SSLContext) -> None:
        say("What refusals look like (one line each):")
        headers = {"X-Caracal-Resource": RESOURCE, "Content-Type": "application/json"}
        cases = [
            ("the same token again (replay)", {"Authorization": f"Bearer {self.token}"}),
            ("no token", {}),
            (
                "an unknown resource",
                {
                    "Authorization": f"Bearer {mint(sts_url, self.options.zone, 'demo-session')}",
                    "X-Caracal-Resource": "no-such-tool",
                },
            ),
        ]
        for label, extra in cases:
            reply = call("POST", gateway_url + TOOL_PATH, {**headers, **extra}, b"{}", tls=tls)
            say(f"  {label:30} -> {reply.status} {_one_line_json(reply.body)}")
        say()

    def show_repeat(self, gateway_url: str, sts_url: str) -> None:
        mint_command = (
            f"curl -s -d zone_id={self.options.zone} -d use=per_call {sts_url}/dev/mint"
            " | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"token\"])'"
        )
        line = (
            f"curl -sS --cacert {self.state.shown('ca.pem')}"
            f' -H "Authorization: Bearer $({mint_command})"'
            f' -H "X-Caracal-Resource: {RESOURCE}" -H "Content-Type: application/json"'
            f' -d \'{{"text": "hello"}}\' {gateway_url}{TOOL_PATH}'
        )
        if self.options.keep_running:
            say("Repeat it (a fresh token each time; the services keep running):")
        else:
            say(
                f"Repeat it while the services run ({demo_command()} --keep-running keeps them up):"
            )
        say(f"  {line}")
        say()

    def keep_running(self) -> None:
        pidfile = self.state.path("demo.pid")
        with open(pidfile, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
        try:
            say(f"Running. Ctrl-C here, or {stop_command(self.options)}, stops it.")
            while all(child.running() for child in self.supervisor.children):
                time.sleep(0.5)
            gone = [c for c in self.supervisor.children if not c.running()]
            raise DemoError(
                "\n".join(
                    f"{c.label} exited (status {c.process.returncode}):\n{c.tail()}" for c in gone
                )
            )
        finally:
            with contextlib.suppress(OSError):
                os.unlink(pidfile)


def stop_command(options: argparse.Namespace) -> str:
    """The command line that stops a kept-running demo with these options."""
    extra = "" if options.state_dir == ".demo" else f" --state-dir {options.state_dir}"
    return f"{demo_command()} --stop{extra}"


def demo_command() -> str:
    """How this demo was started, e.g. C{.venv/bin/python -m caracal.demo}, to paste again."""
    python = os.path.relpath(sys.executable)
    if python.startswith(".."):
        python = sys.executable
    elif os.sep not in python:
        python = os.path.join(".", python)
    return f"{python} -m {PROG}"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def stop_kept(state: State) -> int:
    """C{--stop}: stop a kept-running demo (its supervisor, then any child left)."""
    stopped = []
    children = {name: read_pid(state.path(f"{name}.pid")) for name, _ in CHILD_MARKERS}
    demo_pid = read_pid(state.path("demo.pid"))
    if ours(demo_pid, "caracal.demo"):
        # The kept-running demo stops its own children, in order.
        os.kill(demo_pid, signal.SIGTERM)
        if _wait_gone(demo_pid, STOP_TIMEOUT + 10):
            stopped.append(f"demo pid {demo_pid}")
            stopped += [
                f"{name} pid {pid}"
                for name, pid in children.items()
                if pid is not None and not alive(pid)
            ]
    for name, marker in CHILD_MARKERS:
        path = state.path(f"{name}.pid")
        pid = read_pid(path)
        if ours(pid, marker):
            os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, STOP_TIMEOUT):
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 5)
            stopped.append(f"{name} pid {pid}")
        with contextlib.suppress(OSError):
            if pid is not None and not alive(pid):
                os.unlink(path)
    with contextlib.suppress(OSError):
        os.unlink(state.path("demo.pid"))
    if stopped:
        say(f"stopped: {', '.join(stopped)}; nothing left running")
    else:
        say("no demo was running")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Run the Caracal gateway locally and send one request through it.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--keep-running", action="store_true", help="leave the services up until Ctrl-C"
    )
    mode.add_argument("--stop", action="store_true", help="stop a demo left running")
    parser.add_argument("--state-dir", default=".demo", help="certificates, pidfiles, logs")
    parser.add_argument("--database", default=DEFAULT_DATABASE, help="database to use")
    parser.add_argument("--zone", default=ZONE, help=f"the demo resource's zone ({ZONE})")
    parser.add_argument(
        "--postgres", default=DEFAULT_POSTGRES, help=f"Postgres server DSN ({DEFAULT_POSTGRES})"
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS, help=f"Redis ({DEFAULT_REDIS})")
    parser.add_argument("--gateway-port", type=int, default=DEFAULT_GATEWAY_PORT)
    parser.add_argument("--sts-port", type=int, default=DEFAULT_STS_PORT)
    parser.add_argument("--upstream-port", type=int, default=DEFAULT_UPSTREAM_PORT)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status (0 done, 1 failed, 2 usage)."""
    options = build_parser().parse_args(argv)
    state = State(os.path.abspath(options.state_dir))
    if options.stop:
        return stop_kept(state)
    try:
        parse_dsn(options.postgres)
    except psycopg2.ProgrammingError:
        print(f"{PROG}: error: --postgres is not a valid DSN", file=sys.stderr)
        return 2
    demo = Demo(options, state)
    atexit.register(demo.supervisor.stop_all)
    previous = {n: signal.signal(n, _interrupted) for n in (signal.SIGTERM, signal.SIGHUP)}
    status = 0
    try:
        status = demo.run()
    except DemoError as error:
        print(f"{PROG}: {error}", file=sys.stderr, flush=True)
        status = 1
    except KeyboardInterrupt:
        status = 0 if options.keep_running else 130
    finally:
        children = demo.supervisor.stop_all()
        for number, handler in previous.items():
            signal.signal(number, handler)
        left = [c for c in children if c.process.poll() is None or alive(c.process.pid)]
        if left:
            print(f"{PROG}: still running: {[c.pid for c in left]}", file=sys.stderr)
            status = status or 1
        elif children:
            pids = ", ".join(f"{c.name} {c.pid}" for c in reversed(children))
            say(f"Stopped ({pids}); nothing left running.")
    return status
