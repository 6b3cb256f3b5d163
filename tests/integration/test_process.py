# -*- test-case-name: tests.integration.test_process -*-
"""
The gateway as operators run it: real C{twistd} processes on free
127.0.0.1 ports, in the foreground (C{twistd -n caracal-gateway}) and as a
daemon (C{twistd --pidfile P --logfile L caracal-gateway}).

Refused starts (SPEC 2): exit status non-zero, the message on one stderr
line, no traceback, nothing listening, no pidfile. Good starts answer
C{/health} over TLS; SIGTERM exits 0 and removes the pidfile (SPEC 11); a
renewed certificate reaches new connections without a restart (SPEC 3).
"""

from __future__ import annotations

import os
import signal
import socket

import treq
from twisted.application.service import Service
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.ssl import Certificate
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from caracal.gateway import tap
from caracal.gateway.app import Gateway
from caracal.gateway.config import GatewayConfig
from caracal.gateway.http import GatewaySite
from caracal.gateway.metrics import Metrics
from tests.support.certs import make_chain, make_leaf
from tests.support.postgres import TemporaryDatabase
from tests.support.process import (
    GatewayProcess,
    Subreaper,
    free_port,
    gateway_environ,
    kill_pid,
    own_database,
    pid_alive,
    port_accepts,
    read_pidfile,
)
from tests.support.waiting import became_true

HMAC_KEY_HEX = "c3" * 32

FOREGROUND = ("-n", "caracal-gateway")


def production(directory: str, port: int, **overrides):
    """A valid production environment (TLS, HMAC key, port 8081) plus C{overrides}."""
    values = {"CARACAL_ENV": "production", "PORT": "8081", "STREAMS_HMAC_KEY": HMAC_KEY_HEX}
    values.update(overrides)
    return gateway_environ(directory, port, **values)[0]


def dev(directory: str, port: int, **overrides):
    """A valid dev environment over TLS plus C{overrides}."""
    return gateway_environ(directory, port, **overrides)[0]


class ProcessTestMixin:
    """Spawning, cleaning up and querying gateways."""

    def directory(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def gateway(self, environ, args=FOREGROUND, cwd=None, root=None) -> GatewayProcess:
        environ = own_database(self, environ)
        process = GatewayProcess(environ, args, cwd=cwd or self.directory(), root=root)
        self.addCleanup(process.kill)
        return process

    def client(self, root=None):
        """A treq client trusting only the test root C{root} (plaintext when None)."""
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        if root is None:
            return treq.client.HTTPClient(Agent(reactor, pool=pool))
        policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(root.pem))
        return treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))

    @defer.inlineCallbacks
    def health(self, client, port: int, scheme: str = "https"):
        response = yield client.get(f"{scheme}://127.0.0.1:{port}/health", timeout=5)
        body = yield response.content()
        return response.code, body


class RefusedStartTests(ProcessTestMixin, TestCase):
    """
    Every kind of refused start, foreground and daemon side by side: exit
    status 1, one stderr line C{caracal-gateway: <message>}, no traceback,
    nothing listening, no pidfile.
    """

    timeout = 60

    @defer.inlineCallbacks
    def assertRefused(self, make_environ, expected, port=None):
        """
        Start C{twistd} both ways with C{make_environ(directory, port)} and
        check the refusal. C{expected} is the message, or a callable
        checking it (for messages naming generated paths).
        """
        port = port or free_port()
        directory = self.directory()
        environ = make_environ(directory, port)
        listened_before = yield port_accepts("127.0.0.1", int(environ["PORT"]))

        foreground_cwd = self.directory()
        foreground = self.gateway(environ, FOREGROUND, cwd=foreground_cwd)
        pidfile = os.path.join(directory, "daemon.pid")
        logfile = os.path.join(directory, "daemon.log")
        daemon = self.gateway(
            environ, ("--pidfile", pidfile, "--logfile", logfile, "caracal-gateway")
        )
        statuses = yield defer.gatherResults([foreground.run(), daemon.run()])

        for mode, process, status in (
            ("foreground", foreground, statuses[0]),
            ("daemon", daemon, statuses[1]),
        ):
            everything = (process.output + process.errors).decode(errors="replace")
            self.assertEqual(status, 1, f"{mode}: {everything}")
            self.assertNotIn("Traceback", everything, mode)
            lines = process.errors.decode().splitlines()
            self.assertEqual(len(lines), 1, f"{mode}: {lines}")
            prefix = "caracal-gateway: "
            self.assertTrue(lines[0].startswith(prefix), f"{mode}: {lines[0]}")
            message = lines[0][len(prefix) :]
            if callable(expected):
                expected(message)
            else:
                self.assertEqual(message, expected, mode)
        self.assertFalse(os.path.exists(os.path.join(foreground_cwd, "twistd.pid")))
        self.assertFalse(os.path.exists(pidfile))
        if not listened_before:
            self.assertFalse((yield port_accepts("127.0.0.1", int(environ["PORT"]))))

    def test_unknown_environment(self):
        """twistd refuses an unknown CARACAL_ENV on one stderr line, listening on nothing."""
        return self.assertRefused(
            lambda d, p: dev(d, p, CARACAL_ENV="staging"),
            "CARACAL_ENV must be production or dev",
        )

    def test_public_url_not_https(self):
        """SPEC 13: PUBLIC_URL is checked before listening."""
        return self.assertRefused(
            lambda d, p: dev(d, p, PUBLIC_URL="http://gw.example.com"),
            "PUBLIC_URL must be an absolute https URL of the gateway's root,"
            " such as https://gateway.example.com",
        )

    def test_one_tls_file(self):
        """Only one of the TLS files set is refused."""
        return self.assertRefused(
            lambda d, p: dev(d, p, TLS_KEY_FILE=None),
            "TLS_CERT_FILE and TLS_KEY_FILE must both be set",
        )

    def test_no_tls_files(self):
        """No TLS files without INSECURE_HTTP is refused."""
        return self.assertRefused(
            lambda d, p: dev(d, p, TLS_CERT_FILE=None, TLS_KEY_FILE=None),
            "TLS_CERT_FILE/TLS_KEY_FILE required; set INSECURE_HTTP=true to run plaintext",
        )

    def test_insecure_http_in_production(self):
        """INSECURE_HTTP in production is refused."""
        return self.assertRefused(
            lambda d, p: production(d, p, INSECURE_HTTP="true"),
            "INSECURE_HTTP and INSECURE_STS are forbidden when CARACAL_ENV=production",
        )

    def test_insecure_sts_in_production(self):
        """INSECURE_STS in production is refused."""
        return self.assertRefused(
            lambda d, p: production(d, p, INSECURE_STS="true"),
            "INSECURE_HTTP and INSECURE_STS are forbidden when CARACAL_ENV=production",
        )

    def test_jti_fail_open_in_production(self):
        """JTI_FAIL_OPEN in production is refused."""
        return self.assertRefused(
            lambda d, p: production(d, p, JTI_FAIL_OPEN="true"),
            "JTI_FAIL_OPEN is forbidden when CARACAL_ENV=production",
        )

    def test_port_in_production(self):
        """A PORT other than 8081 in production is refused."""
        return self.assertRefused(
            lambda d, p: production(d, p, PORT=str(p)),
            "PORT must be 8081",
        )

    def test_hmac_key_missing_in_production(self):
        """A production start without STREAMS_HMAC_KEY is refused."""
        return self.assertRefused(
            lambda d, p: production(d, p, STREAMS_HMAC_KEY=None),
            "STREAMS_HMAC_KEY is required when CARACAL_ENV=production",
        )

    def test_hmac_key_too_short(self):
        """An HMAC key under 32 bytes is refused."""
        return self.assertRefused(
            lambda d, p: dev(d, p, STREAMS_HMAC_KEY="ab" * 31),
            "STREAMS_HMAC_KEY must be hex-encoded and at least 32 bytes",
        )

    def test_private_upstreams_without_allowlist_in_production(self):
        """Private upstreams in production need an allowlist."""
        return self.assertRefused(
            lambda d, p: production(d, p, ALLOW_PRIVATE_UPSTREAMS="true"),
            "UPSTREAM_HOST_ALLOWLIST is required when ALLOW_PRIVATE_UPSTREAMS=true in production",
        )

    def test_sts_over_http(self):
        """A plaintext STS_URL is refused without INSECURE_STS."""
        return self.assertRefused(
            lambda d, p: dev(d, p, STS_URL=f"http://127.0.0.1:{p}"),
            "STS_URL must use https; set INSECURE_STS=true to override",
        )

    def test_malformed_duration(self):
        """A duration without a unit is refused."""
        return self.assertRefused(
            lambda d, p: dev(d, p, UPSTREAM_TIMEOUT="30"),
            "UPSTREAM_TIMEOUT must be a duration such as 250ms, 5s or 1m30s",
        )

    def test_malformed_boolean(self):
        """A boolean other than true or false is refused."""
        return self.assertRefused(
            lambda d, p: dev(d, p, JTI_FAIL_OPEN="yes"),
            "JTI_FAIL_OPEN must be a boolean (true or false)",
        )

    def test_secret_and_secret_file(self):
        """Both forms of a secret (SPEC 16): refused before listening, one line."""

        def environ(directory, port):
            path = os.path.join(directory, "redis-url")
            with open(path, "w") as secret:
                secret.write("redis://127.0.0.1:6379/0\n")
            return dev(directory, port, REDIS_URL_FILE=path)

        return self.assertRefused(environ, "REDIS_URL and REDIS_URL_FILE are mutually exclusive")

    def test_secret_file_unreadable(self):
        """A *_FILE naming no file: the message names the file, nothing else."""
        paths = []

        def environ(directory, port):
            paths.append(os.path.join(directory, "no-such-secret"))
            return dev(directory, port, DATABASE_URL=None, DATABASE_URL_FILE=paths[0])

        return self.assertRefused(
            environ,
            lambda message: self.assertEqual(
                message, f"DATABASE_URL_FILE: cannot read {paths[0]}: No such file or directory"
            ),
        )

    def names(self, variable: str, path: str, reason: str):
        """A check that the message names C{variable}, C{path} and C{reason}."""

        def check(message: str) -> None:
            self.assertTrue(message.startswith(f"{variable} {path}: "), message)
            self.assertIn(reason, message)

        return check

    def test_certificate_unreadable(self):
        """An unreadable certificate file is refused, naming it."""
        paths = {}

        def environ(d, p):
            paths["cert"] = os.path.join(d, "missing.crt")
            return dev(d, p, TLS_CERT_FILE=paths["cert"])

        return self.assertRefused(
            environ,
            lambda message: self.names("TLS_CERT_FILE", paths["cert"], "cannot read")(message),
        )

    def test_certificate_not_pem(self):
        """A certificate file without PEM is refused, naming it."""
        paths = {}

        def environ(d, p):
            paths["cert"] = os.path.join(d, "garbage.crt")
            with open(paths["cert"], "wb") as f:
                f.write(b"this is not a certificate\n")
            return dev(d, p, TLS_CERT_FILE=paths["cert"])

        return self.assertRefused(
            environ, lambda message: self.names("TLS_CERT_FILE", paths["cert"], "PEM")(message)
        )

    def test_key_not_matching(self):
        """A key that does not match the certificate is refused, naming it."""
        paths = {}

        def environ(d, p):
            _root, other = make_chain(d, stem="other")
            paths["key"] = os.path.join(d, "other.key")
            return dev(d, p, TLS_KEY_FILE=paths["key"])

        return self.assertRefused(
            environ,
            lambda message: self.names("TLS_KEY_FILE", paths["key"], "does not match")(message),
        )

    def test_leaf_expired(self):
        """An expired certificate is refused."""
        import datetime

        paths = {}

        def environ(d, p):
            root, _leaf = make_chain(d)
            expired = make_leaf(
                root,
                not_after=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1),
            )
            cert, key = expired.write(d, "expired")
            paths["cert"] = cert
            return dev(d, p, TLS_CERT_FILE=cert, TLS_KEY_FILE=key)

        return self.assertRefused(
            environ, lambda message: self.names("TLS_CERT_FILE", paths["cert"], "expired")(message)
        )

    @defer.inlineCallbacks
    def test_port_in_use(self):
        """A port already in use is refused on one line, naming the address."""
        port = free_port()
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", port))
        holder.listen(1)
        yield self.assertRefused(
            dev,
            f"cannot listen on 127.0.0.1:{port}: Address already in use",
            port=port,
        )


class RunningGatewayTests(ProcessTestMixin, TestCase):
    """Good starts: serving, SIGTERM, daemon mode, certificate renewal."""

    timeout = 60

    @defer.inlineCallbacks
    def test_foreground_tls_health_and_sigterm(self):
        """In the foreground over TLS the gateway answers /health and exits 0 on SIGTERM."""
        port = free_port()
        environ, root = gateway_environ(self.directory(), port)
        cwd = self.directory()
        gateway = self.gateway(environ, cwd=cwd, root=root)
        yield gateway.start()
        self.assertTrue(os.path.exists(os.path.join(cwd, "twistd.pid")))

        code, body = yield self.health(self.client(root), port)
        self.assertEqual(code, 200)

        status = yield gateway.stop(signal.SIGTERM)
        everything = (gateway.output + gateway.errors).decode(errors="replace")
        self.assertEqual(status, 0, everything)
        self.assertNotIn("Traceback", everything)
        self.assertFalse(os.path.exists(os.path.join(cwd, "twistd.pid")))
        self.assertFalse((yield port_accepts("127.0.0.1", port)))
        # twistd must not pickle the application into the working directory.
        self.assertEqual(sorted(os.listdir(cwd)), [])

    @defer.inlineCallbacks
    def test_plaintext_dev(self):
        """With INSECURE_HTTP in dev the gateway serves plaintext and says so."""
        port = free_port()
        environ, _ = gateway_environ(self.directory(), port, tls=False)
        gateway = self.gateway(environ)
        yield gateway.start()
        code, _body = yield self.health(self.client(), port, scheme="http")
        self.assertEqual(code, 200)
        self.assertIn(b"escape hatch INSECURE_HTTP is enabled", gateway.output)
        self.assertEqual((yield gateway.stop()), 0)

    @defer.inlineCallbacks
    def test_startup_log_redacts_secrets(self):
        """The effective configuration logged at start hides the secrets."""
        port = free_port()
        environ, _ = gateway_environ(
            self.directory(),
            port,
            tls=False,
            REDIS_URL="redis://:redis-pw-xyz@127.0.0.1:6379/0",
            STREAMS_HMAC_KEY=HMAC_KEY_HEX,
        )
        gateway = self.gateway(environ)
        # The shared Redis has no password, so AUTH fails and the revocation
        # window never loads: the gateway listens after its 10 s startup wait.
        yield gateway.start(timeout=30)
        self.assertEqual((yield gateway.stop()), 0)
        output = gateway.output + gateway.errors
        self.assertIn(b"effective configuration", output)
        self.assertIn(b'"REDIS_URL": "redis://:***@127.0.0.1:6379/0"', output)
        self.assertNotIn(b"redis-pw-xyz", output)
        self.assertNotIn(HMAC_KEY_HEX.encode(), output)

    @defer.inlineCallbacks
    def test_startup_log_redacts_escaped_dsn_password(self):
        """
        A libpq keyword DSN whose unquoted password holds an escaped blank is
        hidden whole in every line (the effective configuration and the
        resource store's connection lines), not only up to the blank.
        """
        port = free_port()
        database = TemporaryDatabase().create()
        self.addCleanup(database.drop)
        environ, _ = gateway_environ(
            self.directory(),
            port,
            tls=False,
            DATABASE_URL=f"host=127.0.0.1 port=5432 dbname={database.name} user=root"
            " password=pg-head\\ pg-tail-xyz",
        )
        gateway = self.gateway(environ)
        yield gateway.start()
        self.assertEqual((yield gateway.stop()), 0)
        output = gateway.output + gateway.errors
        self.assertIn(b"resource store connected to", output)
        self.assertIn(f"dbname={database.name} user=root password=***".encode(), output)
        self.assertNotIn(b"pg-head", output)
        self.assertNotIn(b"pg-tail-xyz", output)

    @defer.inlineCallbacks
    def test_sigint_is_not_reported_as_success(self):
        """Only SIGTERM is an orderly stop with status 0; SIGINT keeps its meaning."""
        port = free_port()
        environ, _ = gateway_environ(self.directory(), port, tls=False)
        gateway = self.gateway(environ)
        yield gateway.start()
        self.assertEqual((yield gateway.stop(signal.SIGINT)), -signal.SIGINT)

    @defer.inlineCallbacks
    def test_daemon(self):
        """
        The daemon writes its pidfile and log file, serves, and on SIGTERM
        removes the pidfile and exits 0.
        """
        Subreaper.for_test(self)

        port = free_port()
        directory = self.directory()
        environ, root = gateway_environ(directory, port)
        pidfile = os.path.join(directory, "gateway.pid")
        logfile = os.path.join(directory, "gateway.log")
        launcher = self.gateway(
            environ, ("--pidfile", pidfile, "--logfile", logfile, "caracal-gateway"), root=root
        )
        yield launcher.start(daemon=True)
        self.assertEqual(launcher.errors, b"")

        pid = read_pidfile(pidfile)
        self.addCleanup(kill_pid, pid)
        self.assertNotEqual(pid, launcher.pid)
        self.assertTrue(pid_alive(pid))
        code, _body = yield self.health(self.client(root), port)
        self.assertEqual(code, 200)
        with open(logfile) as f:
            self.assertIn("caracal-gateway listening on", f.read())

        os.kill(pid, signal.SIGTERM)
        status = yield Subreaper.wait_exit(pid, timeout=30)
        with open(logfile) as f:
            log = f.read()
        self.assertEqual(status, 0, log)
        self.assertFalse(os.path.exists(pidfile))
        self.assertIn("Server Shut Down.", log)
        self.assertNotIn("Traceback", log)

    @defer.inlineCallbacks
    def test_renewed_certificate_reaches_new_connections(self):
        """
        After the certificate files are replaced and SIGHUP is sent, new
        connections get the new certificate; a connection opened before
        keeps working.
        """
        port = free_port()
        directory = self.directory()
        environ, old_root = gateway_environ(directory, port)
        gateway = self.gateway(environ, root=old_root)
        yield gateway.start()

        kept_alive = self.client(old_root)
        code, _ = yield self.health(kept_alive, port)
        self.assertEqual(code, 200)

        staging = self.directory()
        new_root, new_leaf = make_chain(staging)
        os.replace(os.path.join(staging, "server.key"), environ["TLS_KEY_FILE"])
        os.replace(os.path.join(staging, "server.crt"), environ["TLS_CERT_FILE"])
        gateway.send_signal(signal.SIGHUP)

        @defer.inlineCallbacks
        def new_certificate_served():
            try:
                code, _ = yield self.health(self.client(new_root), port)
            except Exception:
                return False
            return code == 200

        self.assertTrue((yield became_true(new_certificate_served, 10)), gateway.output)
        # A new connection trusting only the old root is now refused ...
        yield self.assertFailure(self.health(self.client(old_root), port), Exception)
        # ... while the connection opened before the renewal still serves.
        code, _ = yield self.health(kept_alive, port)
        self.assertEqual(code, 200)
        self.assertIn(b"TLS certificate reloaded", gateway.output)
        self.assertTrue(gateway.running, "SIGHUP must not stop the gateway")
        self.assertEqual((yield gateway.stop()), 0)


class SlowResource(Resource):
    """Answers after C{delay} seconds: a request still in flight at SIGTERM."""

    isLeaf = True

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    def render_GET(self, request):
        def answer():
            request.write(b"finished")
            request.finish()

        reactor.callLater(self.delay, answer)
        return NOT_DONE_YET


class DrainTests(ProcessTestMixin, TestCase):
    """
    SIGTERM with a request in flight, in-process: the tap's L{GatewayService}
    over a real L{GatewaySite} and a real socket (the stub application has
    no slow request to interrupt).
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_inflight_request_finishes(self):
        """A request in flight at stop finishes before the service stops."""
        config = GatewayConfig.from_environ(gateway_environ(self.directory(), 1, tls=False)[0])
        site = GatewaySite(SlowResource(1.0), config, Metrics(), clock=reactor)
        gateway = Gateway(
            config=config, metrics=Metrics(), service=_Background(), site=site, pipeline=None
        )
        service = tap.GatewayService(
            config,
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
            reactor,
            build=lambda config, reactor: gateway,
        )
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        port = service.port.getHost().port

        client = self.client()
        pending = client.get(f"http://127.0.0.1:{port}/slow", timeout=10)
        self.assertTrue((yield became_true(lambda: site.inflight == 1, 5)))

        stopped = service.stopService()
        self.assertFalse((yield port_accepts("127.0.0.1", port)), "still accepting")
        self.assertNoResult(stopped)
        self.assertTrue(gateway.service.running, "background stopped before the drain")

        response = yield pending
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.content()), b"finished")
        yield stopped
        self.assertFalse(gateway.service.running)


class _Background(Service):
    """A background service that only records whether it runs."""
