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
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from caracal.gateway.app import Gateway, build_gateway
from caracal.gateway.config import ConfigError, GatewayConfig
from caracal.gateway.tls import ServerTLS, install_sighup_reload

log = Logger()

#: How long SIGTERM waits for in-flight requests (SPEC section 11).
DRAIN_TIMEOUT = 25.0

#: How often the certificate files are checked for a renewal.
TLS_WATCH_INTERVAL = 5.0

LISTEN_BACKLOG = 511


class Options(usage.Options):
    """Command line of C{twistd caracal-gateway}; the rest is environment (SPEC 2)."""

    optParameters = [
        ["workers", None, 1, "Number of worker processes sharing the port.", int],
    ]

    def postOptions(self) -> None:
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be at least 1")
        if self["workers"] > 1:
            # Refused rather than silently ignored: one process would serve
            # while the operator believes several do.
            raise usage.UsageError("--workers greater than 1 is not supported by this version")


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


def bind_listener(address: str, port: int) -> socket.socket:
    """
    Bind and listen on C{address}:C{port} (all interfaces, IPv6 and IPv4,
    when C{address} is empty).

    @raise ConfigError: the address cannot be listened on (in use, not an
        address of this host, privileged port).
    """
    where = f"[{address}]:{port}" if ":" in address else f"{address or '*'}:{port}"
    try:
        if not address:
            if socket.has_dualstack_ipv6():
                return socket.create_server(
                    ("::", port),
                    family=socket.AF_INET6,
                    backlog=LISTEN_BACKLOG,
                    dualstack_ipv6=True,
                )
            return socket.create_server(("", port), backlog=LISTEN_BACKLOG)
        family, _, _, _, sockaddr = socket.getaddrinfo(
            address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        return socket.create_server(sockaddr, family=family, backlog=LISTEN_BACKLOG)
    except socket.gaierror as error:
        raise ConfigError(f"BIND_ADDRESS {address}: {error.strerror}") from None
    except OSError as error:
        raise ConfigError(f"cannot listen on {where}: {error.strerror or error}") from None


class GatewayService(Service):
    """
    One gateway's lifetime: start the background services, then listen;
    on stop, stop accepting, drain in-flight requests, then stop the
    background services.

    @ivar port: the C{IListeningPort} once listening, else C{None}.
    """

    def __init__(
        self,
        gateway: Gateway,
        endpoint,
        reactor,
        server_tls: ServerTLS | None = None,
        drain_timeout: float = DRAIN_TIMEOUT,
        install_sighup=install_sighup_reload,
        restore_sighup=None,
    ) -> None:
        """
        @param endpoint: the C{IStreamServerEndpoint} to listen on.
        @param server_tls: serve TLS with it; plaintext when C{None}.
        @param install_sighup: installs the SIGHUP reload and returns the
            previous handler (L{install_sighup_reload}).
        @param restore_sighup: puts the previous handler back (default:
            C{signal.signal(SIGHUP, previous)}).
        """
        self.gateway = gateway
        self.endpoint = endpoint
        self.reactor = reactor
        self.server_tls = server_tls
        self.drain_timeout = drain_timeout
        self._install_sighup = install_sighup
        self._restore_sighup = restore_sighup or (
            lambda previous: signal.signal(signal.SIGHUP, previous)
        )
        self._previous_sighup = None
        self._watch = None
        self.port = None
        self._listening = None

    def factory(self):
        """The protocol factory to listen with: the site, wrapped in TLS unless plaintext."""
        if self.server_tls is None:
            return self.gateway.site
        return TLSMemoryBIOFactory(self.server_tls.creator, False, self.gateway.site)

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self.gateway.service.privilegedStartService()

    def startService(self) -> None:
        Service.startService(self)
        config = self.gateway.config
        log.info(
            "caracal-gateway starting; effective configuration: {configuration}",
            configuration=json.dumps(config.redacted(), sort_keys=True),
        )
        for hatch in config.escape_hatches():
            log.warn(
                "escape hatch {hatch} is enabled; never use it where real credentials flow",
                hatch=hatch,
            )
        # Stores and followers first, so the first request finds them running.
        self.gateway.service.startService()
        if self.server_tls is not None:
            self._watch = self.server_tls.watch(TLS_WATCH_INTERVAL)
            self._previous_sighup = self._install_sighup(self.server_tls, self.reactor)
        self._listening = self.endpoint.listen(self.factory())
        self._listening.addCallbacks(self._listened, self._listen_failed)

    def _listened(self, port) -> None:
        self.port = port
        log.info(
            "caracal-gateway listening on {address} ({scheme})",
            address=port.getHost(),
            scheme="plaintext HTTP" if self.server_tls is None else "TLS",
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
        d.addCallback(lambda _: self.gateway.service.stopService())
        d.addCallbacks(self._stopped_cleanly, self._stop_failed)
        return d

    def _stop_listening(self):
        if self.port is None:
            return None
        port, self.port = self.port, None
        log.info("caracal-gateway no longer accepting connections")
        return port.stopListening()

    def _drain(self):
        site = self.gateway.site
        drain = getattr(site, "drain", None)
        if drain is None:
            return None
        log.info(
            "draining {inflight} in-flight requests (up to {timeout} s)",
            inflight=getattr(site, "inflight", "?"),
            timeout=self.drain_timeout,
        )
        d = defer.maybeDeferred(drain, self.drain_timeout)

        def drained(_):
            left = getattr(site, "inflight", 0)
            if left:
                log.warn(
                    "drain timed out after {timeout} s; {left} requests cut",
                    timeout=self.drain_timeout,
                    left=left,
                )

        return d.addCallback(drained)

    def _stopped_cleanly(self, _) -> None:
        # twistd remembers the signal that stopped the reactor
        # (reactor._exitSignal, set by the reactor's sigTerm) and, once the
        # reactor has returned, re-raises it on itself
        # (twisted.scripts.twistd.runApp -> app._exitWithSignal), so the
        # exit status would be "killed by SIGTERM" even after an orderly
        # drain. SPEC 11 wants 0, and the pidfile is removed before that
        # re-raise either way. Only SIGTERM is forgotten: SIGINT keeps the
        # shell convention.
        if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
            self.reactor._exitSignal = None
        log.info("caracal-gateway stopped")

    def _stop_failed(self, failure) -> None:
        # The exit signal is kept: an unclean stop must not look like success.
        log.failure("caracal-gateway did not stop cleanly", failure)


def makeService(options: Options) -> GatewayService:
    """
    Build the gateway from the environment (the C{IServiceMaker} entry
    point). A refused configuration ends the process here, see
    L{refuse_start}.
    """
    from twisted.internet import reactor

    try:
        config = GatewayConfig.from_environ(os.environ)
        server_tls = None
        if not config.insecure_http:
            server_tls = ServerTLS(config.tls_cert_file, config.tls_key_file, clock=reactor)
        gateway = build_gateway(config, reactor)
        listener = bind_listener(config.bind_address, config.port)
    except ConfigError as error:
        refuse_start(str(error))
    family = listener.family
    endpoint = AdoptedStreamServerEndpoint(reactor, listener.detach(), family)
    return GatewayService(gateway, endpoint, reactor, server_tls)
