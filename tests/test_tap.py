# -*- test-case-name: tests.test_tap -*-
"""
Tests for L{caracal.gateway.tap}: the command line, the refused start, and
the lifetime of L{GatewayService} (start order, TLS, certificate reload,
SIGTERM drain and exit status), all in memory.
"""

from __future__ import annotations

import datetime
import io
import os
import signal
import socket
import tempfile
from dataclasses import dataclass, field
from types import SimpleNamespace

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.test.iosim import FakeTransport, connect
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from caracal.gateway import logfile, tap, workers
from caracal.gateway.app import Gateway
from caracal.gateway.config import GatewayConfig
from caracal.gateway.connections import ConnectionLimit
from caracal.gateway.http import GatewaySite
from caracal.gateway.metrics import Metrics
from caracal.gateway.tls import ServerTLS, ServerTLSProtocol
from tests.support.certs import make_chain, make_leaf

DEV_PLAINTEXT = {
    "CARACAL_ENV": "dev",
    "INSECURE_HTTP": "true",
    "STS_URL": "https://127.0.0.1:8443",
    "DATABASE_URL": "postgresql://root@127.0.0.1/test",
    "REDIS_URL": "redis://127.0.0.1:6379",
    "PORT": "18081",
    "BIND_ADDRESS": "127.0.0.1",
    # Never the system state directory from a test.
    "AUDIT_SPOOL_DIR": os.path.join(tempfile.gettempdir(), "caracal-test-audit-spool"),
}


class OptionsTests(SynchronousTestCase):
    """C{twistd caracal-gateway} takes only C{--workers} on its command line."""

    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_default_one_worker(self) -> None:
        """Without --workers the gateway runs one worker, in process."""
        self.assertEqual(self.parse()["workers"], 1)

    def test_one_worker(self) -> None:
        """--workers 1 and --workers=1 both parse."""
        self.assertEqual(self.parse("--workers", "1")["workers"], 1)
        self.assertEqual(self.parse("--workers=1")["workers"], 1)

    def test_workers_must_be_a_number(self) -> None:
        """A non-numeric --workers is a usage error."""
        self.assertRaises(usage.UsageError, self.parse, "--workers", "many")

    def test_workers_at_least_one(self) -> None:
        """--workers 0 is a usage error saying the minimum."""
        error = self.assertRaises(usage.UsageError, self.parse, "--workers", "0")
        self.assertEqual(str(error), "--workers must be at least 1")

    def test_several_workers(self) -> None:
        """--workers 4 asks for four workers."""
        self.assertEqual(self.parse("--workers", "4")["workers"], 4)

    def test_help_points_at_the_environment(self) -> None:
        """C{--help} says configuration is environment variables and where they are listed."""
        text = " ".join(str(tap.Options()).split())
        self.assertIn("environment variables", text)
        self.assertIn("README's 'Configuration' section", text)
        self.assertIn("etc/caracal-gateway.env.example", text)
        self.assertIn("caracal-gateway-admin check-config", text)

    def test_no_positional_arguments(self) -> None:
        """Positional arguments are a usage error: everything else is environment."""
        self.assertRaises(usage.UsageError, self.parse, "extra")


class RefusedStartTests(SynchronousTestCase):
    """
    A refused configuration ends L{tap.makeService} with one line on stderr
    and C{SystemExit(1)}, before anything listens.
    """

    def refused(self, environ: dict[str, str]) -> str:
        stderr = io.StringIO()
        self.patch(tap.os, "environ", environ)
        self.patch(tap.sys, "stderr", stderr)
        bound = []
        self.patch(tap, "bind_listener", lambda *args: bound.append(args))
        error = self.assertRaises(SystemExit, tap.makeService, tap.Options())
        self.assertEqual(error.code, 1)
        self.assertEqual(bound, [], "nothing may listen after a refusal")
        output = stderr.getvalue()
        self.assertTrue(output.endswith("\n"))
        self.assertEqual(output.count("\n"), 1, output)
        self.assertNotIn("Traceback", output)
        return output

    def test_nothing_configured(self) -> None:
        """An empty environment is refused with one line asking for TLS files or INSECURE_HTTP."""
        self.assertEqual(
            self.refused({}),
            "caracal-gateway: TLS_CERT_FILE/TLS_KEY_FILE required;"
            " set INSECURE_HTTP=true to run plaintext\n",
        )

    def test_unknown_environment(self) -> None:
        """An unknown CARACAL_ENV is refused with one line."""
        self.assertEqual(
            self.refused(dict(DEV_PLAINTEXT, CARACAL_ENV="staging")),
            "caracal-gateway: CARACAL_ENV must be production or dev\n",
        )

    def test_escape_hatch_in_production(self) -> None:
        """Escape hatches in production are refused with one line."""
        self.assertEqual(
            self.refused(dict(DEV_PLAINTEXT, CARACAL_ENV="production")),
            "caracal-gateway: INSECURE_HTTP and INSECURE_STS are forbidden"
            " when CARACAL_ENV=production\n",
        )

    def test_malformed_duration(self) -> None:
        """A duration without a unit is refused with one line giving examples."""
        self.assertEqual(
            self.refused(dict(DEV_PLAINTEXT, READ_TIMEOUT="30")),
            "caracal-gateway: READ_TIMEOUT must be a duration such as 250ms, 5s or 1m30s\n",
        )

    def test_unwritable_audit_spool(self) -> None:
        """SPEC 14: a spool directory that cannot be written is a refused start."""
        blocker = self.mktemp()
        with open(blocker, "w") as f:
            f.write("a file, not a directory")
        spool = os.path.join(blocker, "spool")
        output = self.refused(dict(DEV_PLAINTEXT, AUDIT_SPOOL_DIR=spool))
        self.assertTrue(
            output.startswith(f"caracal-gateway: AUDIT_SPOOL_DIR {spool} is not writable: "),
            output,
        )

    def test_missing_certificate_file(self) -> None:
        """The TLS files are loaded in makeService: a bad file is a refused start."""
        missing = os.path.join(self.mktemp(), "server.crt")
        environ = dict(DEV_PLAINTEXT, TLS_CERT_FILE=missing, TLS_KEY_FILE=missing)
        del environ["INSECURE_HTTP"]
        output = self.refused(environ)
        self.assertTrue(output.startswith("caracal-gateway: TLS_CERT_FILE "), output)
        self.assertIn(missing, output)

    def test_certificate_and_key_mismatch(self) -> None:
        """A key that does not match the certificate is refused with one line."""
        directory = self.mktemp()
        os.makedirs(directory)
        _root, leaf = make_chain(directory)
        other = make_leaf(make_chain(directory, stem="other")[0])
        cert_path, _ = leaf.write(directory, "server")
        _, other_key_path = other.write(directory, "other-leaf")
        environ = dict(DEV_PLAINTEXT, TLS_CERT_FILE=cert_path, TLS_KEY_FILE=other_key_path)
        del environ["INSECURE_HTTP"]
        output = self.refused(environ)
        self.assertTrue(output.startswith("caracal-gateway: "), output)
        self.assertTrue(cert_path in output or other_key_path in output, output)

    def test_unusable_ca_bundle(self) -> None:
        """CA bundles are read before daemonizing: a bad one is a refused start."""
        directory = self.mktemp()
        os.makedirs(directory)
        bundle = os.path.join(directory, "sts-ca.pem")
        with open(bundle, "w") as f:
            f.write("not a certificate\n")
        self.assertEqual(
            self.refused(dict(DEV_PLAINTEXT, STS_CA_FILE=bundle)),
            f"caracal-gateway: STS_CA_FILE {bundle}: no PEM certificate found\n",
        )
        missing = os.path.join(directory, "missing.pem")
        self.assertEqual(
            self.refused(dict(DEV_PLAINTEXT, UPSTREAM_CA_FILE=missing)),
            f"caracal-gateway: UPSTREAM_CA_FILE {missing}: cannot read:"
            " No such file or directory\n",
        )


class FakeListener:
    """What L{tap.bind_listener} returns, without a socket."""

    family = socket.AF_INET

    def __init__(self, fd: int = 97):
        self.detached = False
        self.fd = fd

    def detach(self) -> int:
        self.detached = True
        return self.fd


class MakeServiceTests(SynchronousTestCase):
    """A valid configuration: one serving process, or a supervisor of workers."""

    def make(self, *argv: str, environ=None):
        self.patch(tap.os, "environ", environ or DEV_PLAINTEXT)
        listener = FakeListener()
        self.bound = []

        def bind(address, port, variable="BIND_ADDRESS"):
            self.bound.append((address, port, variable))
            return listener if variable == "BIND_ADDRESS" else self.metrics_listener

        self.metrics_listener = FakeListener(98)
        self.patch(tap, "bind_listener", bind)
        options = tap.Options()
        options.parseOptions(list(argv))
        return tap.makeService(options), listener

    def test_metrics_address_bound_before_daemonizing(self) -> None:
        """
        METRICS_ADDRESS is bound in makeService like the public port (a
        busy address is a refused start) and served by the one process.
        """
        environ = dict(DEV_PLAINTEXT, METRICS_ADDRESS="127.0.0.1:19090")
        service, _ = self.make(environ=environ)
        self.assertEqual(
            self.bound,
            [("127.0.0.1", 18081, "BIND_ADDRESS"), ("127.0.0.1", 19090, "METRICS_ADDRESS")],
        )
        self.assertEqual(service.metrics_endpoint.fileno, 98)
        self.assertTrue(self.metrics_listener.detached)

    def test_one_process_tunes_itself_once_serving(self) -> None:
        """The serving process's service runs L{tap.serving_tunings} when it listens."""
        service, _ = self.make()
        called = []
        self.patch(tap, "serving_tunings", called.append)
        service._serving()
        self.assertEqual(called, [service.reactor])

    def test_no_metrics_address_no_second_listener(self) -> None:
        """Without METRICS_ADDRESS only the public port is bound."""
        service, _ = self.make()
        self.assertEqual(self.bound, [("127.0.0.1", 18081, "BIND_ADDRESS")])
        self.assertIsNone(service.metrics_endpoint)

    def test_workers_inherit_the_metrics_socket(self) -> None:
        """With --workers the supervisor hands the METRICS_ADDRESS socket to every worker."""
        created = []

        def for_listeners(fds, reactor, log_destination, rebind, metrics_fd=None):
            created.append((fds, metrics_fd))
            return "supervisor"

        self.patch(workers.WorkerSupervisor, "for_listeners", staticmethod(for_listeners))
        self.patch(tap, "bind_listeners", lambda address, port, count: [FakeListener()] * count)
        environ = dict(DEV_PLAINTEXT, METRICS_ADDRESS="127.0.0.1:19090")
        self.make("--workers", "2", environ=environ)
        self.assertEqual(created, [([97, 97], 98)])

    def test_one_worker_serves_in_process(self) -> None:
        """One worker serves in the twistd process on the socket bound before daemonizing."""
        service, listener = self.make()
        self.assertIsInstance(service, tap.GatewayService)
        self.assertEqual(service.endpoint.fileno, 97)
        self.assertTrue(listener.detached)

    def test_several_workers_supervised(self) -> None:
        """--workers 3: three listening sockets, one per worker, and a supervisor."""
        created = []

        def for_listeners(fds, reactor, log_destination, rebind, metrics_fd=None):
            created.append((fds, log_destination, rebind is not None, metrics_fd))
            return "supervisor"

        bound = []

        class Numbered(FakeListener):
            def detach(self) -> int:
                return 90 + bound.index(self)

            def getsockname(self):
                return ("127.0.0.1", 8081)

        def bind_listeners(address, port, count):
            bound.extend(Numbered() for _ in range(count))
            return bound

        self.patch(tap, "bind_listeners", bind_listeners)
        self.patch(workers.WorkerSupervisor, "for_listeners", staticmethod(for_listeners))
        service, listener = self.make("--workers", "3")
        self.assertEqual(service, "supervisor")
        self.assertEqual(created, [([90, 91, 92], ("stdout", None), True, None)])


class ListenersTests(SynchronousTestCase):
    """L{tap.bind_listeners}: one SO_REUSEPORT socket per worker, on one port."""

    def test_one_port_one_socket_each(self) -> None:
        """Every socket listens on the port the first one got, with SO_REUSEPORT."""
        if not hasattr(socket, "SO_REUSEPORT"):
            raise SkipTest("no SO_REUSEPORT here")
        listeners = tap.bind_listeners("127.0.0.1", 0, 3)
        for each in listeners:
            self.addCleanup(each.close)
        self.assertEqual(len({id(each) for each in listeners}), 3)
        self.assertEqual(len({each.getsockname()[1] for each in listeners}), 1)
        for each in listeners:
            self.assertEqual(each.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 1)
        # Only the first listens yet: the others join when their worker is ready.
        listening = [each.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) for each in listeners]
        self.assertEqual(listening, [1, 0, 0])

    def test_port_in_use_still_refused(self) -> None:
        """A port held by a socket without SO_REUSEPORT: a ConfigError."""
        holder = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(holder.close)
        port = holder.getsockname()[1]
        self.assertRaises(tap.ConfigError, tap.bind_listeners, "127.0.0.1", port, 2)

    def test_single_worker_single_socket(self) -> None:
        """One worker: one plain socket."""
        [listener] = tap.bind_listeners("127.0.0.1", 0, 1)
        self.addCleanup(listener.close)
        self.assertEqual(listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 0)


class WorkerLogDestinationTests(SynchronousTestCase):
    """Where workers write: what twistd was told about its own log."""

    def destination(self, environ=None, **twistd):
        from caracal.gateway import logfile

        self.patch(tap.os, "environ", environ or {})
        options = tap.Options()
        options.parent = {"logger": None, "syslog": False, "logfile": None, "nodaemon": False}
        options.parent.update(twistd)
        if options.parent["logger"] == "levelled":
            options.parent["logger"] = logfile.observer
        return tap.worker_log_destination(options)

    def test_table(self) -> None:
        """twistd's choices map to a file, the inherited stdout, or the relay."""
        here = os.path.abspath("twistd.log")
        self.assertEqual(self.destination(nodaemon=True), ("stdout", None))
        self.assertEqual(self.destination(logfile="-"), ("stdout", None))
        self.assertEqual(self.destination(), ("file", here))
        self.assertEqual(self.destination(logfile="/var/log/gw.log"), ("file", "/var/log/gw.log"))
        self.assertEqual(self.destination(syslog=True), ("relay", None))
        self.assertEqual(self.destination(logger=lambda: None), ("relay", None))
        self.assertEqual(self.destination(logger="levelled"), ("stdout", None))
        self.assertEqual(
            self.destination({"CARACAL_LOG_FILE": "/var/log/c.log"}, logger="levelled"),
            ("file", "/var/log/c.log"),
        )


class ExpiryWarningTests(SynchronousTestCase):
    """L{tap.warn_if_expiring}: a certificate close to its end is a warning at start."""

    NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)

    def setUp(self) -> None:
        self.log_events: list = []
        self.patch(tap, "log", Logger(observer=self.log_events.append))

    def served(self, days: float):
        return SimpleNamespace(not_after=self.NOW + datetime.timedelta(days=days))

    def test_expiring_soon_warns(self) -> None:
        """A certificate expiring within 14 days is a warning naming its expiry."""
        self.assertTrue(tap.warn_if_expiring(self.served(3.5), now=self.NOW))
        [event] = self.log_events
        self.assertEqual(event["log_level"].name, "warn")
        self.assertEqual(
            formatEvent(event),
            "TLS certificate expires in 3.5 days (2030-01-04T12:00:00+00:00); renew it",
        )

    def test_just_under_fourteen_days_warns(self) -> None:
        """Just under 14 days left still warns."""
        self.assertTrue(tap.warn_if_expiring(self.served(13.99), now=self.NOW))

    def test_fourteen_days_or_more_is_quiet(self) -> None:
        """14 days or more left is quiet."""
        self.assertFalse(tap.warn_if_expiring(self.served(14), now=self.NOW))
        self.assertFalse(tap.warn_if_expiring(self.served(90), now=self.NOW))
        self.assertEqual(self.log_events, [])

    def test_plaintext_is_quiet(self) -> None:
        """Without a certificate there is nothing to warn about."""
        self.assertFalse(tap.warn_if_expiring(None, now=self.NOW))
        self.assertEqual(self.log_events, [])


class KeepaliveWarningTests(SynchronousTestCase):
    """L{tap.warn_if_keepalive_too_slow}: keep-alives slower than the idle cut are useless."""

    def setUp(self) -> None:
        self.log_events: list = []
        self.patch(tap, "log", Logger(observer=self.log_events.append))

    def test_keepalive_not_below_idle_timeout_warns(self) -> None:
        """SSE_KEEPALIVE=5m with STREAM_IDLE_TIMEOUT=1m: warned, both named."""
        config = GatewayConfig(stream_idle_timeout=60.0, sse_keepalive=300.0)
        self.assertTrue(tap.warn_if_keepalive_too_slow(config))
        [event] = self.log_events
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertIn(
            "SSE_KEEPALIVE (300.0 s) is not below STREAM_IDLE_TIMEOUT", formatEvent(event)
        )

    def test_defaults_and_off_are_quiet(self) -> None:
        """The defaults (15 s under 5 m) and SSE_KEEPALIVE=0 say nothing."""
        self.assertFalse(tap.warn_if_keepalive_too_slow(GatewayConfig()))
        self.assertFalse(
            tap.warn_if_keepalive_too_slow(GatewayConfig(stream_idle_timeout=1.0, sse_keepalive=0))
        )
        self.assertEqual(self.log_events, [])


class LevelIgnoredWarningTests(SynchronousTestCase):
    """
    twistd's own log writes every level; a LOG_LEVEL asking for less says
    so at start, naming the --logger that applies it.
    """

    def setUp(self) -> None:
        self.log_events: list = []
        self.patch(tap, "log", Logger(observer=self.log_events.append))

    def twistd_options(self, *argv: str) -> tap.Options:
        """This plugin's options as twistd parses them (real ServerOptions)."""
        from twisted.scripts.twistd import ServerOptions

        server = ServerOptions()
        server.parseOptions([*argv, "caracal-gateway"])
        return server.subOptions

    def warned(self, level: str, options) -> list[str]:
        config = GatewayConfig.from_environ(dict(DEV_PLAINTEXT, LOG_LEVEL=level))
        returned = tap.warn_if_level_ignored(config, options)
        lines = [formatEvent(event) for event in self.log_events]
        self.assertEqual(returned, bool(lines))
        return lines

    def test_warn_under_twistd_default_log(self) -> None:
        """
        LOG_LEVEL=warn under twistd's own log warns that it is not applied and names the logger to
        use.
        """
        self.assertEqual(
            self.warned("warn", self.twistd_options("-n")),
            [
                "LOG_LEVEL=warn is not applied to twistd's own log, which writes every"
                " level; run twistd with --logger caracal.gateway.logfile.observer to apply it"
            ],
        )
        self.assertEqual(self.log_events[0]["log_level"], LogLevel.warn)

    def test_error_under_logfile(self) -> None:
        """LOG_LEVEL=error with --logfile warns too, whatever its case."""
        self.assertEqual(len(self.warned("ERROR", self.twistd_options("--logfile", "x.log"))), 1)

    def test_quiet_with_the_levelled_logger(self) -> None:
        """With the levelled logger there is nothing to warn about."""
        self.assertEqual(
            self.warned("error", self.twistd_options("-n", "--logger", tap.LEVELLED_LOGGER)), []
        )

    def test_levelled_logger_is_the_logfile_observer(self) -> None:
        """The logger name resolves to the levelled observer."""
        options = self.twistd_options("-n", "--logger", tap.LEVELLED_LOGGER)
        self.assertIs(options.parent["logger"], logfile.observer)

    def test_quiet_with_another_logger(self) -> None:
        """Another --logger may filter; the gateway cannot tell, so it says nothing."""
        options = self.twistd_options("-n", "--logger", "twisted.logger.globalLogPublisher")
        self.assertEqual(self.warned("warn", options), [])

    def test_quiet_when_everything_is_asked_for(self) -> None:
        """twistd's log writes debug and info lines: those levels are honoured."""
        options = self.twistd_options("-n")
        self.assertEqual(self.warned("debug", options), [])
        self.assertEqual(self.warned("info", options), [])

    def test_quiet_outside_twistd(self) -> None:
        """Options parsed on their own (no twistd parent): nothing is known."""
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(self.warned("error", options), [])

    def test_make_service_warns(self) -> None:
        """makeService itself gives the warning."""
        self.patch(tap.os, "environ", dict(DEV_PLAINTEXT, LOG_LEVEL="warn"))
        self.patch(tap, "bind_listener", lambda address, port: FakeListener())
        service = tap.makeService(self.twistd_options("-n"))
        self.assertIsInstance(service, tap.GatewayService)
        [event] = self.log_events
        self.assertIn("LOG_LEVEL=warn is not applied", formatEvent(event))


class BindListenerTests(SynchronousTestCase):
    """L{tap.bind_listener} turns an unusable address into a L{ConfigError}."""

    def test_listens_dual_stack_or_not(self) -> None:
        """A real bind: listening by default, bound only on request, IPv6-only on ::1."""
        listener = tap.bind_listener("127.0.0.1", 0)
        self.addCleanup(listener.close)
        self.assertEqual(listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN), 1)
        bound = tap.bind_listener("127.0.0.1", 0, listen=False)
        self.addCleanup(bound.close)
        self.assertEqual(bound.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN), 0)
        if socket.has_ipv6:
            try:
                six = tap.bind_listener("::1", 0)
            except tap.ConfigError:
                return  # no IPv6 loopback here
            self.addCleanup(six.close)
            self.assertEqual(six.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), 1)

    def test_message_names_the_address(self) -> None:
        """An address already in use is refused, naming the address and port."""

        def refuse(*args, **kwargs):
            raise OSError(98, "Address already in use")

        self.patch(tap, "_server_socket", refuse)
        error = self.assertRaises(tap.ConfigError, tap.bind_listener, "127.0.0.1", 8081)
        self.assertEqual(str(error), "cannot listen on 127.0.0.1:8081: Address already in use")
        error = self.assertRaises(tap.ConfigError, tap.bind_listener, "::1", 8081)
        self.assertEqual(str(error), "cannot listen on [::1]:8081: Address already in use")
        error = self.assertRaises(tap.ConfigError, tap.bind_listener, "", 8081)
        self.assertEqual(str(error), "cannot listen on *:8081: Address already in use")


# Doubles for GatewayService: each records what happens to it in one shared
# list, so the tests can assert the order of the lifecycle steps.


@dataclass
class FakePort:
    events: list

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 8081)

    def stopListening(self):
        self.events.append("stop listening")


@dataclass
class FakeEndpoint:
    events: list
    factories: list = field(default_factory=list)
    failure: Exception | None = None

    def listen(self, factory):
        self.events.append("listen")
        self.factories.append(factory)
        if self.failure is not None:
            return defer.fail(self.failure)
        return defer.succeed(FakePort(self.events))


class FakeBackground(Service):
    def __init__(self, events: list, stop_error: Exception | None = None):
        self.events = events
        self.stop_error = stop_error

    def privilegedStartService(self):
        self.events.append("background privileged start")

    def startService(self):
        Service.startService(self)
        self.events.append("background start")

    def stopService(self):
        Service.stopService(self)
        self.events.append("background stop")
        if self.stop_error is not None:
            raise self.stop_error


class DrainingSite(Site):
    """A site with the HTTP helper's C{drain}/C{inflight}, driven by the test."""

    def __init__(self, events: list, reactor):
        # Our reactor, or the channels' timeouts land on the global one.
        Site.__init__(self, Resource(), reactor=reactor)
        self.events = events
        self.inflight = 0  # only read by the log line
        self.drains: list[defer.Deferred] = []

    def drain(self, timeout: float) -> defer.Deferred:
        self.events.append(f"drain {timeout}")
        d = defer.Deferred()
        self.drains.append(d)
        return d


class StopError(Exception):
    pass


class NeverAnswers(Resource):
    """An upstream call that outlives any drain: rendered, never finished."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.pending: list = []

    def render(self, request):
        self.pending.append(request)
        return NOT_DONE_YET


class GatewayServiceTests(SynchronousTestCase):
    """The lifetime of one gateway process, with the reactor in memory."""

    def setUp(self) -> None:
        self.events: list = []
        self.log_events: list = []
        self.patch(tap, "log", Logger(observer=self.log_events.append))
        self.reactor = MemoryReactorClock()
        self.endpoint = FakeEndpoint(self.events)
        self.sighup: list = []

    def service(
        self,
        environ=None,
        site=None,
        server_tls=None,
        background=None,
        metrics_site=None,
        metrics_endpoint=None,
    ) -> tap.GatewayService:
        config = GatewayConfig.from_environ(environ or DEV_PLAINTEXT)
        gateway = Gateway(
            config=config,
            metrics=Metrics(),
            service=background or FakeBackground(self.events),
            site=site if site is not None else DrainingSite(self.events, self.reactor),
            pipeline=None,
            metrics_site=metrics_site,
        )

        def build(built_config, reactor):
            self.assertIs(built_config, config)
            self.assertIs(reactor, self.reactor)
            self.events.append("build")
            return gateway

        return tap.GatewayService(
            config,
            self.endpoint,
            self.reactor,
            server_tls=server_tls,
            build=build,
            install_sighup=self.install_sighup,
            restore_sighup=self.restore_sighup,
            metrics_endpoint=metrics_endpoint,
        )

    def install_sighup(self, server_tls, reactor):
        self.sighup.append(("install", server_tls, reactor))
        return "previous handler"

    def restore_sighup(self, previous):
        self.sighup.append(("restore", previous))

    def logged(self) -> list[str]:
        return [formatEvent(event) for event in self.log_events]

    def tls_files(self):
        directory = self.mktemp()
        os.makedirs(directory)
        root, leaf = make_chain(directory)
        return directory, root, leaf

    def handshake(self, factory, root) -> bytes:
        """
        Connect an in-memory TLS client trusting C{root} to C{factory}; return
        the DER of the certificate the server presented.
        """
        server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        client_factory = TLSMemoryBIOFactory(
            optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(root.pem)),
            True,
            Factory.forProtocol(Protocol),
        )
        client = client_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8081))
        pump = connect(
            server,
            FakeTransport(server, isServer=True),
            client,
            FakeTransport(client, isServer=False),
        )
        pump.flush()
        peer = client.getPeerCertificate()
        self.assertIsNotNone(peer, "TLS handshake did not complete")
        return Certificate(peer).dump()

    def test_built_after_daemonizing(self) -> None:
        """
        Nothing is built until twistd starts the service (after it has
        daemonized): clients connect as soon as they are built.
        """
        service = self.service()
        self.assertEqual(self.events, [])
        self.assertIsNone(service.gateway)
        service.privilegedStartService()
        self.assertEqual(self.events, ["build", "background privileged start"])

    def test_background_starts_before_listening(self) -> None:
        """The gateway is built and its background services started before it listens."""
        service = self.service()
        service.privilegedStartService()
        service.startService()
        self.assertEqual(
            self.events,
            ["build", "background privileged start", "background start", "listen"],
        )
        self.assertIsNotNone(service.port)

    def test_serving_hook_once_listening(self) -> None:
        """The C{serving} hook runs once, when the gateway listens, not before."""
        service = self.service()
        service._serving = lambda: self.events.append("serving")
        service.startService()
        self.assertEqual(self.events[-2:], ["listen", "serving"])
        service._listened(service.port)
        self.assertEqual(self.events.count("serving"), 1)

    def test_processes_tune_the_collector(self) -> None:
        """
        C{tune_collector} collects, freezes what start-up left and raises the
        first threshold only, keeping the other two.
        """
        calls = []

        class Collector:
            def collect(self):
                calls.append("collect")

            def freeze(self):
                calls.append("freeze")

            def get_threshold(self):
                return (700, 11, 12)

            def set_threshold(self, *thresholds):
                calls.append(thresholds)

        tap.tune_collector(Collector())
        self.assertEqual(calls, ["collect", "freeze", (tap.COLLECTOR_THRESHOLD, 11, 12)])

    def test_serving_tunings_trim_every_interval(self) -> None:
        """
        Once serving: the collector is tuned, and malloc's free pages are given
        back every L{tap.TRIM_INTERVAL} seconds, not at once.
        """
        clock = Clock()
        tuned, trims = [], []
        self.patch(tap, "tune_collector", tuned.append)

        def trim():
            trims.append(clock.seconds())

        calls = tap.serving_tunings(clock, collector="gc", trim=trim)
        self.assertEqual(tuned, ["gc"])
        self.assertEqual(trims, [])
        clock.advance(tap.TRIM_INTERVAL)
        clock.advance(tap.TRIM_INTERVAL)
        self.assertEqual(trims, [tap.TRIM_INTERVAL, tap.TRIM_INTERVAL * 2])
        calls.stop()

    def test_trim_malloc(self) -> None:
        """trim_malloc calls malloc_trim(0) where the C library has it, and nothing elsewhere."""
        called = []
        self.assertTrue(tap.trim_malloc(lambda: called.append))
        self.assertEqual(called, [0])
        self.assertFalse(tap.trim_malloc(lambda: None))
        # This machine's glibc has it; the call returns memory and raises nothing.
        self.assertIsInstance(tap.trim_malloc(), bool)

    def test_start_without_privileged_start(self) -> None:
        """Starting without privilegedStartService still starts everything in order."""
        service = self.service()
        service.startService()
        self.assertEqual(
            self.events,
            ["build", "background privileged start", "background start", "listen"],
        )

    def test_plaintext_listens_with_the_site(self) -> None:
        """Plaintext listens with the site behind the connection limit."""
        site = DrainingSite(self.events, self.reactor)
        service = self.service(site=site)
        service.startService()
        [factory] = self.endpoint.factories
        self.assertIsInstance(factory, ConnectionLimit)
        self.assertIs(factory.wrappedFactory, site)
        self.assertEqual(self.sighup, [], "no certificate to reload in plaintext")

    def test_listener_capped_by_max_connections(self) -> None:
        """
        SPEC 12 H8: the listener's outermost factory caps open connections
        at C{MAX_CONNECTIONS} and counts refusals in the gateway's metrics.
        """
        service = self.service(environ={**DEV_PLAINTEXT, "MAX_CONNECTIONS": "3"})
        service.startService()
        [factory] = self.endpoint.factories
        self.assertEqual(factory.limit, 3)
        self.assertIs(factory.metrics, service.gateway.metrics)

    def test_tls_serves_the_chain(self) -> None:
        """With TLS the listener serves the whole certificate chain."""
        directory, root, leaf = self.tls_files()
        server_tls = ServerTLS(
            os.path.join(directory, "server.crt"),
            os.path.join(directory, "server.key"),
            clock=self.reactor,
        )
        site = DrainingSite(self.events, self.reactor)
        service = self.service(site=site, server_tls=server_tls)
        service.startService()
        [limit] = self.endpoint.factories
        self.assertIsInstance(limit, ConnectionLimit)
        factory = limit.wrappedFactory
        self.assertIsInstance(factory, TLSMemoryBIOFactory)
        # Idle connections give their handshake buffers back (tls.ServerTLSProtocol).
        self.assertIs(factory.protocol, ServerTLSProtocol)
        self.assertIs(factory.wrappedFactory, site)
        self.assertEqual(self.handshake(factory, root), leaf.cert.public_bytes(Encoding.DER))

    def test_start_warns_of_a_certificate_expiring_soon(self) -> None:
        """Starting with a certificate close to expiry warns."""
        directory = self.mktemp_dir()
        not_after = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=5)
        make_chain(directory, not_after=not_after)
        server_tls = ServerTLS(
            os.path.join(directory, "server.crt"),
            os.path.join(directory, "server.key"),
            clock=self.reactor,
        )
        self.service(server_tls=server_tls).startService()
        expiring = [line for line in self.logged() if line.startswith("TLS certificate expires")]
        self.assertEqual(len(expiring), 1, self.logged())
        self.assertIn("renew it", expiring[0])

    def test_start_quiet_for_a_fresh_certificate(self) -> None:
        """Starting with a fresh certificate does not warn."""
        directory, _root, _leaf = self.tls_files()
        server_tls = ServerTLS(
            os.path.join(directory, "server.crt"),
            os.path.join(directory, "server.key"),
            clock=self.reactor,
        )
        self.service(server_tls=server_tls).startService()
        self.assertFalse([line for line in self.logged() if "expires in" in line])

    def mktemp_dir(self) -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        return directory

    def replace_files(self, leaf, cert_path: str, key_path: str) -> None:
        """Replace the files the way renewal tools do: write aside, then rename."""
        staging = self.mktemp_dir()
        new_cert, new_key = leaf.write(staging, "renewed")
        os.replace(new_key, key_path)
        os.replace(new_cert, cert_path)

    def test_certificate_file_change_reloads(self) -> None:
        """
        The certificate files are watched while the service runs: a renewed
        certificate reaches new connections, and watching ends on stop.
        """
        directory, _root, leaf = self.tls_files()
        cert_path = os.path.join(directory, "server.crt")
        key_path = os.path.join(directory, "server.key")
        server_tls = ServerTLS(cert_path, key_path, clock=self.reactor)
        service = self.service(server_tls=server_tls)
        service.startService()
        [factory] = self.endpoint.factories

        renewed_root, renewed = make_chain(self.mktemp_dir())
        self.replace_files(renewed, cert_path, key_path)
        self.reactor.advance(tap.TLS_WATCH_INTERVAL)
        self.assertEqual(
            self.handshake(factory, renewed_root), renewed.cert.public_bytes(Encoding.DER)
        )

        service.stopService()
        self.replace_files(leaf, cert_path, key_path)
        self.reactor.advance(tap.TLS_WATCH_INTERVAL * 3)
        self.assertEqual(
            self.handshake(factory, renewed_root), renewed.cert.public_bytes(Encoding.DER)
        )

    def test_sighup_reload_installed_and_restored(self) -> None:
        """SIGHUP reloads the certificate while serving; the old handler comes back at stop."""
        directory, _root, _leaf = self.tls_files()
        server_tls = ServerTLS(
            os.path.join(directory, "server.crt"),
            os.path.join(directory, "server.key"),
            clock=self.reactor,
        )
        service = self.service(server_tls=server_tls)
        service.startService()
        self.assertEqual(self.sighup, [("install", server_tls, self.reactor)])
        service.stopService()
        self.assertEqual(
            self.sighup,
            [("install", server_tls, self.reactor), ("restore", "previous handler")],
        )

    def test_startup_logs_configuration_and_escape_hatches(self) -> None:
        """
        The start logs the effective configuration, secrets redacted, and every escape hatch in use.
        """
        environ = dict(
            DEV_PLAINTEXT,
            JTI_FAIL_OPEN="true",
            REDIS_URL="redis://:redis-pw-123@127.0.0.1:6379",
            STREAMS_HMAC_KEY="b2" * 32,
        )
        self.service(environ=environ).startService()
        text = "\n".join(self.logged())
        self.assertIn('"CARACAL_ENV": "dev"', text)
        self.assertIn('"REDIS_URL": "redis://:***@127.0.0.1:6379"', text)
        self.assertNotIn("redis-pw-123", text)
        self.assertNotIn("b2b2", text)
        warnings = [
            formatEvent(event) for event in self.log_events if event["log_level"].name == "warn"
        ]
        self.assertEqual(
            warnings,
            [
                f"escape hatch {name} is enabled; never use it where real credentials flow"
                for name in ("INSECURE_HTTP", "JTI_FAIL_OPEN")
            ]
            + [
                "/metrics is readable by anyone who reaches the public listener;"
                " set METRICS_BEARER or METRICS_ADDRESS"
            ],
        )

    def test_metrics_listener_served_and_stopped(self) -> None:
        """
        METRICS_ADDRESS's endpoint listens (plaintext) with the gateway's
        metrics site once the public port listens, and stops with it.
        """
        metrics_events: list = []
        metrics_endpoint = FakeEndpoint(metrics_events)
        metrics_site = Site(Resource())
        site = DrainingSite(self.events, self.reactor)
        service = self.service(
            site=site, metrics_site=metrics_site, metrics_endpoint=metrics_endpoint
        )
        service.startService()
        self.assertEqual(metrics_endpoint.factories, [metrics_site])
        self.assertIsNotNone(service.metrics_port)
        self.assertTrue(
            any("and /metrics on IPv4Address" in line for line in self.logged()), self.logged()
        )
        stopped = service.stopService()
        site.drains[0].callback(0)
        self.successResultOf(stopped)
        self.assertEqual(metrics_events, ["listen", "stop listening"])
        self.assertIsNone(service.metrics_port)

    def test_startup_says_how_to_expose_metrics(self) -> None:
        """In production with neither variable, the startup log says how to expose /metrics."""
        config = GatewayConfig(env="production", sts_url="https://sts.example")
        self.assertEqual(tap.log_metrics_exposure(config), "hidden")
        [line] = self.logged()
        self.assertIn("/metrics answers 404", line)
        self.assertIn("METRICS_ADDRESS=host:port", line)
        self.assertIn("METRICS_BEARER", line)

    def test_startup_names_where_metrics_are(self) -> None:
        """Each other exposure is named in one line; a public, unguarded one is a warning."""
        self.assertEqual(
            tap.log_metrics_exposure(GatewayConfig(env="dev", metrics_address="[::1]:9")),
            "address",
        )
        self.assertEqual(
            tap.log_metrics_exposure(GatewayConfig(env="production", metrics_bearer="b" * 20)),
            "public",
        )
        self.assertEqual(tap.log_metrics_exposure(GatewayConfig(env="dev")), "public")
        levels = [event["log_level"] for event in self.log_events]
        self.assertEqual(levels, [LogLevel.info, LogLevel.info, LogLevel.warn])
        self.assertIn("[::1]:9", self.logged()[0])

    def test_sigterm_stops_accepting_drains_then_stops_background(self) -> None:
        """SIGTERM stops accepting, drains, stops the background services, and exits 0."""
        site = DrainingSite(self.events, self.reactor)
        service = self.service(site=site)
        service.startService()
        self.reactor._exitSignal = signal.SIGTERM
        del self.events[:]

        stopped = service.stopService()
        self.assertEqual(self.events, ["stop listening", f"drain {tap.DRAIN_TIMEOUT}"])
        self.assertNoResult(stopped)
        self.assertEqual(self.reactor._exitSignal, signal.SIGTERM)

        site.drains[0].callback(0)
        self.successResultOf(stopped)
        self.assertEqual(
            self.events, ["stop listening", f"drain {tap.DRAIN_TIMEOUT}", "background stop"]
        )
        # twistd would re-raise SIGTERM on itself after the reactor stops.
        self.assertIsNone(self.reactor._exitSignal)

    def test_drain_timeout_logged(self) -> None:
        """Requests cut at the drain bound are logged."""
        site = DrainingSite(self.events, self.reactor)
        service = self.service(site=site)
        service.startService()
        stopped = service.stopService()
        site.drains[0].callback(2)
        self.successResultOf(stopped)
        self.assertIn("drain timed out after 25.0 s; 2 requests cut", self.logged())
        self.assertIn("background stop", self.events)

    def test_request_outliving_the_drain_bound_is_cut(self) -> None:
        """
        With the real site, the stop waits exactly L{tap.DRAIN_TIMEOUT}
        (SPEC 11: 25 s) for a request that never finishes, then goes on:
        background stopped, the cut logged, exit status 0. twistd then stops
        the reactor, whose shutdown closes the unanswered connection.
        """
        config = GatewayConfig.from_environ(DEV_PLAINTEXT)
        resource = NeverAnswers()
        site = GatewaySite(resource, config, Metrics(), clock=self.reactor)
        service = self.service(site=site)
        service.startService()
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8081))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 41000))
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /slow HTTP/1.1\r\nHost: gateway.example\r\n\r\n")
        self.assertEqual((len(resource.pending), site.inflight), (1, 1))
        self.reactor._exitSignal = signal.SIGTERM

        stopped = service.stopService()
        self.reactor.advance(tap.DRAIN_TIMEOUT - 0.1)
        self.assertNoResult(stopped)
        self.assertNotIn("background stop", self.events)
        self.reactor.advance(0.1)
        self.successResultOf(stopped)

        self.assertIn("background stop", self.events)
        self.assertIn("drain timed out after 25.0 s; 1 requests cut", self.logged())
        self.assertEqual(site.inflight, 1)
        self.assertEqual(transport.value(), b"", "the request was answered after all")
        self.assertIsNone(self.reactor._exitSignal)
        channel.connectionLost(None)

    def test_clean_drain_logs_no_warning(self) -> None:
        """A drain that empties in time logs no warning."""
        site = DrainingSite(self.events, self.reactor)
        service = self.service(site=site)
        service.startService()
        stopped = service.stopService()
        site.drains[0].callback(0)
        self.successResultOf(stopped)
        self.assertFalse([line for line in self.logged() if "drain timed out" in line])

    def test_sigint_keeps_its_exit_signal(self) -> None:
        """A stop on SIGINT keeps its exit signal."""
        service = self.service()
        service.startService()
        self.reactor._exitSignal = signal.SIGINT
        stopped = service.stopService()
        service.gateway.site.drains[0].callback(0)
        self.successResultOf(stopped)
        self.assertEqual(self.reactor._exitSignal, signal.SIGINT)

    def test_failed_stop_keeps_exit_signal(self) -> None:
        """An unclean stop must not exit 0."""
        service = self.service(background=FakeBackground(self.events, StopError("boom")))
        service.startService()
        self.reactor._exitSignal = signal.SIGTERM
        stopped = service.stopService()
        service.gateway.site.drains[0].callback(0)
        self.successResultOf(stopped)
        self.assertEqual(self.reactor._exitSignal, signal.SIGTERM)
        self.assertIn("caracal-gateway did not stop cleanly", self.logged())

    def test_stop_before_start(self) -> None:
        """Stopping a service that never started has nothing to undo."""
        service = self.service()
        self.reactor._exitSignal = signal.SIGTERM
        self.successResultOf(service.stopService())
        self.assertEqual(self.events, [])
        self.assertIsNone(self.reactor._exitSignal)

    def test_listen_failure_stops_the_reactor(self) -> None:
        """A listener that cannot be adopted stops the reactor."""
        self.endpoint.failure = OSError("adoption failed")
        service = self.service()
        service.startService()
        self.assertTrue(self.reactor.hasStopped)
        self.assertIsNone(service.port)
        self.assertIn("caracal-gateway could not listen; stopping", self.logged())
