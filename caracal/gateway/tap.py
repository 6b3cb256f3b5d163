# -*- test-case-name: tests.test_tap -*-
"""
C{twistd caracal-gateway}: configuration in, one running gateway out.

L{makeService} runs before twistd daemonizes and before it writes the
pidfile (C{ApplicationRunner.run}: C{createOrGetApplication} comes before
C{postApplication}, which daemonizes and writes the pidfile), so a refused
configuration is reported on the operator's terminal as one line, with
nothing listening and no pidfile left behind.

The listening socket is bound here too, for the same reason: an address
already in use is a refused start, not a traceback in a log file. The
running service adopts that socket once the reactor is set up.

The gateway itself (L{build_gateway}) is built in C{startService}, after
daemonizing, because its clients connect at once and a forked-away parent
must not own those connections; the files it reads (CA bundles) are checked
here first so their errors are refused starts too.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import signal
import socket
import sys

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage

from caracal.gateway.app import Gateway, build_gateway
from caracal.gateway.config import ConfigError, GatewayConfig
from caracal.gateway.connections import ConnectionLimit
from caracal.gateway.spool import check_spool_directory
from caracal.gateway.tls import ServerTLS, client_tls_policy, install_sighup_reload
from caracal.gateway.workers import WorkerSupervisor

log = Logger()

#: How long SIGTERM waits for in-flight requests (SPEC section 11).
DRAIN_TIMEOUT = 25.0

#: How long accepting waits for the resource snapshot and revocation window.
STARTUP_LOAD_TIMEOUT = 10.0

#: How often the certificate files are checked for a renewal.
TLS_WATCH_INTERVAL = 5.0

LISTEN_BACKLOG = 511

#: A served certificate expiring sooner than this is logged as a warning at start.
CERTIFICATE_EXPIRY_WARNING = datetime.timedelta(days=14)

#: The twistd C{--logger} that writes at C{LOG_LEVEL}.
LEVELLED_LOGGER = "caracal.gateway.logfile.observer"

# Levels twistd's own log cannot honour: it writes every event, so only a
# request for less than everything goes unheard (debug is what it shows).
_LEVELS_TWISTD_IGNORES = ("warn", "error")


class Options(usage.Options):
    """Command line of C{twistd caracal-gateway}; the rest is environment (SPEC 2)."""

    longdesc = (
        "Everything but --workers is configured through environment variables"
        " (CARACAL_ENV, PORT, TLS_CERT_FILE, STS_URL, DATABASE_URL, REDIS_URL, ...)."
        " The README's 'Configuration' section lists every variable with its default;"
        " etc/caracal-gateway.env.example is a commented starting point. Check an"
        " environment before starting with:"
        " caracal-gateway-admin check-config --env-file /etc/caracal/gateway.env"
    )

    optParameters = [
        ["workers", None, 1, "Number of worker processes sharing the port.", int],
    ]

    def postOptions(self) -> None:
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be at least 1")


def refuse_start(message: str, stderr=None) -> None:
    """
    Stop the process before it listens: one line on stderr, exit status 1.

    C{SystemExit} leaves twistd without a traceback, and since L{makeService}
    runs before the pidfile is written there is none to clean up.
    """
    stderr = sys.stderr if stderr is None else stderr
    stderr.write(f"caracal-gateway: {message}\n")
    stderr.flush()
    raise SystemExit(1)


def _server_socket(
    sockaddr, family: int, dualstack: bool, reuse_port: bool, listen: bool
) -> socket.socket:
    # socket.create_server, except that listening is optional.
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dualstack else 1)
        sock.bind(sockaddr)
        if listen:
            sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_listener(
    address: str,
    port: int,
    variable: str = "BIND_ADDRESS",
    reuse_port: bool = False,
    listen: bool = True,
) -> socket.socket:
    """
    Bind and listen on C{address}:C{port} (all interfaces, IPv6 and IPv4,
    when C{address} is empty).

    @param variable: the setting C{address} came from, named when it does
        not resolve.
    @param reuse_port: set C{SO_REUSEPORT}, so that more sockets of this
        user can listen on the same address (L{bind_listeners}).
    @param listen: C{False}: only bind; whoever serves calls C{listen()}
        when ready (L{caracal.gateway.workers.ListenWhenServing}).
    @raise ConfigError: the address cannot be listened on (in use, not an
        address of this host, privileged port).
    """
    where = f"[{address}]:{port}" if ":" in address else f"{address or '*'}:{port}"
    try:
        if not address:
            if socket.has_dualstack_ipv6():
                return _server_socket(("::", port), socket.AF_INET6, True, reuse_port, listen)
            return _server_socket(("", port), socket.AF_INET, False, reuse_port, listen)
        family, _, _, _, sockaddr = socket.getaddrinfo(
            address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        return _server_socket(sockaddr, family, False, reuse_port, listen)
    except socket.gaierror as error:
        raise ConfigError(f"{variable} {address}: {error.strerror}") from None
    except OSError as error:
        # create_server appends "(while attempting to bind ...)" to strerror.
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise ConfigError(f"cannot listen on {where}: {reason}") from None


def bind_listeners(address: str, port: int, count: int) -> list[socket.socket]:
    """
    C{count} sockets on C{address}:C{port}, one per worker, each with
    C{SO_REUSEPORT}: the kernel then spreads new connections over the
    listening ones by a hash of the connection's addresses, so long-lived
    keep-alive clients cannot all pile up on whichever worker wakes first
    (as they do on one shared socket, where a worker accepts every pending
    connection at each wake-up). The first one listens at once, so early
    clients queue as with one process; the others are only bound, and each
    joins the group when its worker is ready to serve (a connection never
    waits behind a worker still loading). The first bind reports an
    unusable address; where C{SO_REUSEPORT} does not exist, one socket is
    shared by all.

    @raise ConfigError: as L{bind_listener}.
    """
    if count < 2 or not hasattr(socket, "SO_REUSEPORT"):
        return [bind_listener(address, port)] * max(count, 1)
    first = bind_listener(address, port, reuse_port=True)
    # The others must land on the port the first got (port 0: an ephemeral one).
    bound = first.getsockname()[1]
    listeners = [first]
    try:
        for _ in range(count - 1):
            listeners.append(bind_listener(address, bound, reuse_port=True, listen=False))
    except ConfigError:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def worker_log_destination(options: usage.Options) -> tuple[str, str | None]:
    """
    Where C{--workers} workers write their log lines themselves, so that the
    supervising process does no work per request: from twistd's options
    (this plugin's C{options.parent}), one of

      - C{("file", path)}: append to C{path} and reopen it on SIGUSR1
        (twistd's C{--logfile PATH}, its C{twistd.log} default when
        daemonized, or C{CARACAL_LOG_FILE} with
        C{--logger caracal.gateway.logfile.observer});
      - C{("stdout", None)}: the inherited standard output (C{-n}, or
        C{--logfile -}, or the levelled logger without C{CARACAL_LOG_FILE});
      - C{("relay", None)}: through the supervisor, for destinations only it
        can write to (C{--syslog}, another C{--logger}).
    """
    twistd = getattr(options, "parent", None)
    if twistd is None:
        return ("stdout", None)
    logger = twistd.get("logger")
    if logger is not None:
        from caracal.gateway import logfile

        if logger is not logfile.observer:
            return ("relay", None)
        path = (os.environ.get(logfile.LOG_FILE_VARIABLE) or "").strip()
        return ("stdout", None) if path in ("", "-") else ("file", os.path.abspath(path))
    if twistd.get("syslog"):
        return ("relay", None)
    path = twistd.get("logfile")
    if path == "-" or (path is None and twistd.get("nodaemon")):
        return ("stdout", None)
    return ("file", os.path.abspath(path or "twistd.log"))


def warn_if_expiring(server_tls, now: datetime.datetime | None = None) -> bool:
    """
    Log a warning when the certificate C{server_tls} serves expires within
    L{CERTIFICATE_EXPIRY_WARNING} (an expired one was refused already).

    @return: C{True} when the warning was logged.
    """
    if server_tls is None:
        return False
    now = now or datetime.datetime.now(datetime.UTC)
    left = server_tls.not_after - now
    if left >= CERTIFICATE_EXPIRY_WARNING:
        return False
    log.warn(
        "TLS certificate expires in {days:.1f} days ({not_after}); renew it",
        days=left.total_seconds() / 86400.0,
        not_after=server_tls.not_after.isoformat(),
    )
    return True


def warn_if_keepalive_too_slow(config: GatewayConfig) -> bool:
    """
    Log a warning when C{SSE_KEEPALIVE} is on but not below
    C{STREAM_IDLE_TIMEOUT}: a silent event stream would then be cut by the
    gateway itself before its first keep-alive (SPEC 13).

    @return: C{True} when the warning was logged.
    """
    if not 0 < config.stream_idle_timeout <= config.sse_keepalive:
        return False
    log.warn(
        "SSE_KEEPALIVE ({keepalive} s) is not below STREAM_IDLE_TIMEOUT ({idle} s):"
        " silent event streams are cut before their keep-alive",
        keepalive=config.sse_keepalive,
        idle=config.stream_idle_timeout,
    )
    return True


def warn_if_level_ignored(config: GatewayConfig, options: usage.Options) -> bool:
    """
    Log a warning when C{LOG_LEVEL} asks for fewer lines than twistd's own
    log will write.

    Without C{--logger}, twistd picks the observer itself (standard output
    with C{-n}, C{--logfile}, C{--syslog}) and that observer writes events
    of every level; twistd offers no public way to filter it short of
    replacing its choice of destination. C{--logger}
    L{caracal.gateway.logfile.observer} applies C{LOG_LEVEL}. Another
    C{--logger} may or may not filter: nothing is said then.

    @param options: this plugin's options; twistd sets C{options.parent} to
        its own (C{--logger} is resolved to the factory by then).
    @return: C{True} when the warning was logged.
    """
    twistd = getattr(options, "parent", None)
    if twistd is None or config.log_level not in _LEVELS_TWISTD_IGNORES:
        return False
    if twistd.get("logger") is not None:
        return False
    log.warn(
        "LOG_LEVEL={log_level_name} is not applied to twistd's own log, which writes every level;"
        " run twistd with --logger {logger} to apply it",
        log_level_name=config.log_level,
        logger=LEVELLED_LOGGER,
    )
    return True


def log_metrics_exposure(config: GatewayConfig) -> str:
    """
    Say at start where C{/metrics} is served (SPEC section 12) and, when it
    is nowhere (production with neither C{METRICS_BEARER} nor
    C{METRICS_ADDRESS}), how to expose it.

    @return: C{"address"}, C{"public"} or C{"hidden"}.
    """
    if config.metrics_address is not None:
        log.info(
            "/health, /ready and /metrics are also served in plaintext on {address}"
            "{guard}; /metrics is off the public listener",
            address=config.metrics_address,
            guard=" (bearer required for /metrics)" if config.metrics_bearer else "",
        )
        return "address"
    if config.metrics_public:
        if config.metrics_bearer is None:
            log.warn(
                "/metrics is readable by anyone who reaches the public listener;"
                " set METRICS_BEARER or METRICS_ADDRESS"
            )
        else:
            log.info("/metrics is served on the public listener to METRICS_BEARER holders")
        return "public"
    log.info(
        "/metrics answers 404 on the public listener (CARACAL_ENV=production); to expose it,"
        " set METRICS_ADDRESS=host:port (a private plaintext listener) or METRICS_BEARER"
        " (a bearer token required on the public one)"
    )
    return "hidden"


def tls_factory(site, server_tls, reactor):
    """
    The protocol factory to listen with: C{site}, wrapped in TLS with
    C{server_tls} unless that is C{None} (plaintext). Shared by the single
    process and the workers (L{caracal.gateway.workers}).
    """
    if server_tls is None:
        return site
    return server_tls.factory(site, reactor)


#: The collector's first threshold once serving (CPython's default is 700).
COLLECTOR_THRESHOLD = 10_000


def tune_collector(collector=gc) -> None:
    """
    Make Python's cyclic garbage collector cheap for a serving gateway.

    A request allocates and frees thousands of objects, nearly all freed by
    reference counting; at CPython's default threshold (700 more objects
    alive than at the last collection) the collector still ran several
    times a second under load and scanned the whole start-up heap (modules,
    configuration, ~60,000 objects) at every full collection: about 5 % of
    the per_call CPU, measured with C{gc.callbacks} under the bench. So,
    once listening: collect what start-up left, move everything alive into
    the permanent generation (C{gc.freeze}: never scanned again, still freed
    when unreferenced) and raise the first threshold to
    L{COLLECTOR_THRESHOLD}. Garbage in cycles is still collected, in
    batches of at most that many objects.

    @param collector: the C{gc} module, or a stand-in for tests.
    """
    collector.collect()
    collector.freeze()
    _, second, third = collector.get_threshold()
    collector.set_threshold(COLLECTOR_THRESHOLD, second, third)


#: Seconds between two returns of malloc's free pages to the system.
TRIM_INTERVAL = 30.0


def _libc_malloc_trim():
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


def trim_malloc(malloc_trim=_libc_malloc_trim) -> bool:
    """
    glibc's C{malloc_trim(0)}: give the pages malloc holds free, inside its
    heap as well as at its top, back to the system. A serving gateway's
    native allocations (OpenSSL, hiredis, Python's larger objects) leave
    free holes between live blocks that malloc keeps: over a 170,000-request
    soak its RSS grew 2.1 MiB without this and 1.1 MiB with it every 10 s,
    while the memory in use stayed flat (C{mallinfo2}). About 0.2 ms a call.

    @param malloc_trim: finds the C function (C{None} where the C library
        has none, musl or macOS: then nothing is done).
    @return: whether it ran.
    """
    function = malloc_trim()
    if function is None:
        return False
    function(0)
    return True


def serving_tunings(reactor, collector=gc, trim=trim_malloc) -> LoopingCall:
    """
    What a gateway process does once it listens: L{tune_collector}, then
    L{trim_malloc} every L{TRIM_INTERVAL} seconds (for the process's life).
    """
    tune_collector(collector)
    trimming = LoopingCall(trim)
    trimming.clock = reactor
    trimming.start(TRIM_INTERVAL, now=False)
    return trimming


class GatewayService(Service):
    """
    One gateway's lifetime: build it and start its background services,
    then listen; on stop, stop accepting, drain in-flight requests, then
    stop the background services.

    @ivar gateway: the L{Gateway} once started, else C{None}.
    @ivar port: the C{IListeningPort} once listening, else C{None}.
    """

    def __init__(
        self,
        config: GatewayConfig,
        endpoint,
        reactor,
        server_tls: ServerTLS | None = None,
        drain_timeout: float = DRAIN_TIMEOUT,
        build=build_gateway,
        install_sighup=install_sighup_reload,
        restore_sighup=None,
        metrics_endpoint=None,
        serving=None,
    ) -> None:
        """
        @param endpoint: the C{IStreamServerEndpoint} to listen on.
        @param metrics_endpoint: the endpoint of C{METRICS_ADDRESS} (served in
            plaintext with the gateway's C{metrics_site}), or C{None}.
        @param server_tls: serve TLS with it; plaintext when C{None}.
        @param build: C{build(config, reactor) -> Gateway} (L{build_gateway}).
        @param install_sighup: installs the SIGHUP reload and returns the
            previous handler (L{install_sighup_reload}).
        @param restore_sighup: puts the previous handler back (default:
            C{signal.signal(SIGHUP, previous)}).
        @param serving: called once with no argument when the gateway
            listens (the processes pass L{serving_tunings}), or C{None}.
        """
        self.config = config
        self.endpoint = endpoint
        self.reactor = reactor
        self.server_tls = server_tls
        self.drain_timeout = drain_timeout
        self._build = build
        self._install_sighup = install_sighup
        self._restore_sighup = restore_sighup or (
            lambda previous: signal.signal(signal.SIGHUP, previous)
        )
        self._previous_sighup = None
        self._watch = None
        self.metrics_endpoint = metrics_endpoint
        self._serving = serving
        self.gateway: Gateway | None = None
        self.port = None
        self.metrics_port = None
        self._listening = None

    def factory(self):
        """
        The protocol factory to listen with: the site, wrapped in TLS unless
        plaintext, under the C{MAX_CONNECTIONS} cap (SPEC 12 H8).
        """
        return ConnectionLimit(
            tls_factory(self.gateway.site, self.server_tls, self.reactor),
            self.config.max_connections,
            self.gateway.metrics,
        )

    def _ensure_built(self) -> None:
        if self.gateway is None:
            self.gateway = self._build(self.config, self.reactor)
            self.gateway.service.privilegedStartService()

    def privilegedStartService(self) -> None:
        """
        Build the gateway: twistd calls this after daemonizing, so the
        connections its clients open belong to the daemon.
        """
        Service.privilegedStartService(self)
        self._ensure_built()

    def startService(self) -> None:
        Service.startService(self)
        config = self.config
        log.info(
            "caracal-gateway starting; effective configuration: {configuration}",
            configuration=json.dumps(config.redacted(), sort_keys=True),
        )
        for hatch in config.escape_hatches():
            log.warn(
                "escape hatch {hatch} is enabled; never use it where real credentials flow",
                hatch=hatch,
            )
        if config.insecure_http and config.tls_cert_file:
            log.warn("INSECURE_HTTP=true: TLS_CERT_FILE/KEY_FILE are ignored; serving plaintext")
        warn_if_expiring(self.server_tls)
        warn_if_keepalive_too_slow(config)
        log_metrics_exposure(config)
        self._ensure_built()
        # Stores and followers first, so the first request finds them running.
        self.gateway.service.startService()
        if self.server_tls is not None:
            self._watch = self.server_tls.watch(TLS_WATCH_INTERVAL)
            self._previous_sighup = self._install_sighup(self.server_tls, self.reactor)
        # Accepting waits (bounded) for the resource snapshot and the
        # revocation window: the socket is bound already, so early clients
        # queue in the backlog instead of meeting a half-loaded gateway.
        self._listening = self.gateway.when_loaded(self.reactor, STARTUP_LOAD_TIMEOUT)
        self._listening.addCallback(self._listen_when_loaded)
        self._listening.addCallbacks(self._listened, self._listen_failed)

    def _listen_when_loaded(self, loaded: bool):
        if not self.running:
            return defer.succeed(None)
        if not loaded:
            log.warn(
                "resources or revocations not loaded after {timeout} s; serving anyway"
                " (unknown resources are refused until the snapshot arrives; calls naming a"
                " session get 503 revocation_state_unavailable until the revocation window"
                " is loaded)",
                timeout=STARTUP_LOAD_TIMEOUT,
            )
        return self.endpoint.listen(self.factory())

    def _listened(self, port) -> None:
        if port is None:
            return
        if not self.running:
            port.stopListening()
            return
        self.port = port
        log.info(
            "caracal-gateway listening on {address} ({scheme})",
            address=port.getHost(),
            scheme="plaintext HTTP" if self.server_tls is None else "TLS",
        )
        if self._serving is not None:
            serving, self._serving = self._serving, None
            serving()
        if self.metrics_endpoint is not None and self.gateway.metrics_site is not None:
            d = self.metrics_endpoint.listen(self.gateway.metrics_site)
            d.addCallbacks(self._metrics_listened, self._listen_failed)

    def _metrics_listened(self, port) -> None:
        if not self.running or self.port is None:
            port.stopListening()
            return
        self.metrics_port = port
        log.info(
            "caracal-gateway serving /health, /ready and /metrics on {address} (plaintext HTTP)",
            address=port.getHost(),
        )

    def _listen_failed(self, failure) -> None:
        # makeService bound the socket already, so this is not an operator
        # error; a gateway that cannot serve must not linger.
        log.failure("caracal-gateway could not listen; stopping", failure)
        self.reactor.stop()

    def stopService(self) -> defer.Deferred:
        """
        Stop accepting, let in-flight requests finish (up to
        C{drain_timeout}), then stop the background services.
        """
        Service.stopService(self)
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        self._watch = None
        if self.server_tls is not None and self._previous_sighup is not None:
            self._restore_sighup(self._previous_sighup)
            self._previous_sighup = None
        d = defer.maybeDeferred(self._stop_listening)
        d.addCallback(lambda _: self._drain())
        d.addCallback(lambda _: self._stop_background())
        d.addCallbacks(self._stopped_cleanly, self._stop_failed)
        return d

    def _stop_listening(self):
        stopping = []
        if self.metrics_port is not None:
            metrics_port, self.metrics_port = self.metrics_port, None
            stopping.append(defer.maybeDeferred(metrics_port.stopListening))
        if self.port is not None:
            port, self.port = self.port, None
            log.info("caracal-gateway no longer accepting connections")
            stopping.append(defer.maybeDeferred(port.stopListening))
        if not stopping:
            return None
        return defer.gatherResults(stopping)

    def _stop_background(self):
        if self.gateway is None:
            return None
        return self.gateway.service.stopService()

    def _drain(self):
        if self.gateway is None:
            return None
        site = self.gateway.site
        log.info(
            "draining {inflight} in-flight requests (up to {timeout} s)",
            inflight=site.inflight,
            timeout=self.drain_timeout,
        )

        def drained(left: int) -> None:
            # GatewaySite.drain fires with the number of requests still in
            # flight: more than zero when the timeout cut them.
            if left:
                log.warn(
                    "drain timed out after {timeout} s; {left} requests cut",
                    timeout=self.drain_timeout,
                    left=left,
                )

        return defer.maybeDeferred(site.drain, self.drain_timeout).addCallback(drained)

    def _stopped_cleanly(self, _) -> None:
        # twistd remembers the signal that stopped the reactor
        # (reactor._exitSignal, set by the reactor's sigTerm) and, once the
        # reactor has returned, re-raises it on itself
        # (twisted.scripts.twistd.runApp -> app._exitWithSignal), so the
        # exit status would be "killed by SIGTERM" even after an orderly
        # drain. SPEC 11 wants 0, and the pidfile is removed before that
        # re-raise either way. Only SIGTERM is forgotten: SIGINT keeps the
        # shell convention.
        # No public way to forget it; private to Twisted (tests/test_twisted_private pins it).
        if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
            self.reactor._exitSignal = None
        log.info("caracal-gateway stopped")

    def _stop_failed(self, failure) -> None:
        # The exit signal is kept: an unclean stop must not look like success.
        log.failure("caracal-gateway did not stop cleanly", failure)


def makeService(options: Options) -> Service:
    """
    Read and check the configuration, load the certificate, bind the port
    (the C{IServiceMaker} entry point). A refused configuration ends the
    process here, see L{refuse_start}.

    With C{--workers 1} this process serves (L{GatewayService}); with more,
    it only supervises that many worker processes sharing the bound socket
    (L{caracal.gateway.workers.WorkerSupervisor}).
    """
    from twisted.internet import reactor

    try:
        config = GatewayConfig.from_environ(os.environ)
        server_tls = None
        if not config.insecure_http:
            server_tls = ServerTLS(config.tls_cert_file, config.tls_key_file, clock=reactor)
        # Read now so an unusable bundle is refused before daemonizing;
        # build_gateway reads them again in startService.
        client_tls_policy(config.sts_ca_file, variable="STS_CA_FILE")
        client_tls_policy(config.upstream_ca_file, variable="UPSTREAM_CA_FILE")
        # An audit trail that could not spool would lose events in an outage.
        check_spool_directory(config.audit_spool_dir)
        if options["workers"] > 1:
            listeners = bind_listeners(config.bind_address, config.port, options["workers"])
        else:
            listener = bind_listener(config.bind_address, config.port)
        metrics_listener = None
        if config.metrics_listen is not None:
            metrics_listener = bind_listener(*config.metrics_listen, variable="METRICS_ADDRESS")
    except ConfigError as error:
        refuse_start(str(error))
    # Logged before twistd's logging starts: held and written first.
    warn_if_level_ignored(config, options)
    if options["workers"] > 1:
        # The workers load the certificate themselves (and reload it); this
        # process only checked it. It keeps the sockets open so a restarted
        # worker can inherit its own again.
        rebind = None
        if len({id(each) for each in listeners}) > 1:
            # One socket each: a dead worker's is replaced by a new one of the group.
            port = listeners[0].getsockname()[1]

            def rebind() -> int:
                listener = bind_listener(config.bind_address, port, reuse_port=True, listen=False)
                return listener.detach()

        fds: dict[int, int] = {}
        for each in listeners:
            fds.setdefault(id(each), each.detach())
        return WorkerSupervisor.for_listeners(
            [fds[id(each)] for each in listeners],
            reactor,
            log_destination=worker_log_destination(options),
            rebind=rebind,
            # Every worker accepts on the METRICS_ADDRESS socket too: each one
            # answers /metrics with every worker's counters.
            metrics_fd=metrics_listener.detach() if metrics_listener is not None else None,
        )
    family = listener.family
    endpoint = AdoptedStreamServerEndpoint(reactor, listener.detach(), family)
    metrics_endpoint = None
    if metrics_listener is not None:
        metrics_family = metrics_listener.family
        metrics_endpoint = AdoptedStreamServerEndpoint(
            reactor, metrics_listener.detach(), metrics_family
        )
    return GatewayService(
        config,
        endpoint,
        reactor,
        server_tls,
        metrics_endpoint=metrics_endpoint,
        serving=lambda: serving_tunings(reactor),
    )
