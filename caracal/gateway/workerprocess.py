# -*- test-case-name: tests.test_workers -*-
"""
One worker process of C{twistd caracal-gateway --workers N}
(C{python -m caracal.gateway.workerprocess}, spawned by
L{caracal.gateway.workers.WorkerSupervisor}).

The worker reads the configuration the same way as a single process, loads
the certificate, builds its own gateway and serves it with
L{caracal.gateway.tap.GatewayService} on the listening socket it inherited.
It lives apart from the supervisor's module because it needs the tap's
service and the tap needs the supervisor: one module for both would be an
import cycle.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys

from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.logger import Logger, globalLogBeginner

from caracal.gateway.app import Gateway, build_gateway
from caracal.gateway.config import ConfigError, GatewayConfig
from caracal.gateway.logfile import ReopeningFile, install_reopen_handler
from caracal.gateway.logs import json_log_observer
from caracal.gateway.metrics import Metrics
from caracal.gateway.tap import LISTEN_BACKLOG, GatewayService, serving_tunings
from caracal.gateway.tls import ServerTLS
from caracal.gateway.workers import ListenWhenServing, SharedMetrics, parse_arguments

log = Logger()


def build_worker_gateway(
    config: GatewayConfig, reactor, index: int, metrics_dir: str | None, build=build_gateway
) -> tuple[Gateway, SharedMetrics | None]:
    """
    Worker C{index}'s gateway, its metrics handed in by construction: with
    a shared C{metrics_dir}, C{/metrics} answers every worker's counters
    summed and the returned L{SharedMetrics} publishes this worker's own
    (start it once serving); without one, the worker's own counters.

    @param build: L{build_gateway}, or a stand-in with its signature.
    """
    metrics = Metrics()
    if metrics_dir is None:
        return build(config, reactor, metrics=metrics), None
    shared = SharedMetrics(metrics_dir, index, metrics.snapshot, refresh=metrics.refresh)
    return build(config, reactor, metrics=metrics, metrics_snapshot=shared.snapshot), shared


def _die_with_parent(parent_pid: int | None) -> None:
    """
    Linux: get SIGTERM when the supervisor dies (even by SIGKILL), so no
    worker keeps serving the port without it. If it already died, leave.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    """
    Run one worker until it is stopped; returns the exit status: 0 after an
    orderly stop, 1 when it could not start or stop cleanly.
    """
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    _die_with_parent(arguments.parent_pid)

    # Imported here: importing the reactor installs the default one.
    from twisted.internet import reactor

    try:
        config = GatewayConfig.from_environ(os.environ)
        destination = sys.stdout
        extra = None
        if arguments.log_file is not None:
            destination = ReopeningFile(arguments.log_file)
            install_reopen_handler(destination)
        else:
            # The supervisor forwards SIGUSR1 (log reopen) to every worker;
            # with nothing to reopen, its default action would kill this one.
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        if arguments.log_file is not None or arguments.log_stdout:
            # Lines from several workers meet in one log: say whose.
            extra = {"worker": arguments.index}
        globalLogBeginner.beginLoggingTo(
            [json_log_observer(destination, config.log_level, extra)], redirectStandardIO=False
        )
        server_tls = None
        if not config.insecure_http:
            server_tls = ServerTLS(config.tls_cert_file, config.tls_key_file, clock=reactor)
    except (ConfigError, OSError) as e:
        sys.stderr.write(f"caracal-gateway worker {arguments.index}: {e}\n")
        return 1

    def adopted(fd: int):
        # The socket object finds out the family; the descriptor stays open
        # for the endpoint, which adopts (duplicates) and then closes it.
        probe = socket.socket(fileno=fd)
        family = probe.family
        probe.detach()
        return AdoptedStreamServerEndpoint(reactor, fd, family)

    shared: list[SharedMetrics] = []

    def build(config, reactor):
        gateway, publisher = build_worker_gateway(
            config, reactor, arguments.index, arguments.metrics_dir
        )
        if publisher is not None:
            shared.append(publisher)
        return gateway

    metrics_endpoint = None
    if arguments.metrics_fd is not None:
        metrics_endpoint = adopted(arguments.metrics_fd)
    service = GatewayService(
        config,
        # The worker's own socket joins the port's group once it is ready.
        ListenWhenServing(adopted(arguments.fd), arguments.fd, LISTEN_BACKLOG),
        reactor,
        server_tls,
        build=build,
        metrics_endpoint=metrics_endpoint,
        serving=lambda: serving_tunings(reactor),
    )
    failed: list[bool] = []

    def start() -> None:
        try:
            service.privilegedStartService()
            service.startService()
        except Exception:
            log.failure("worker {worker} could not start", worker=arguments.index)
            failed.append(True)
            reactor.stop()
            return
        for each in shared:
            each.start(reactor)

    def stop():
        if not service.running:
            return None

        def published(result):
            for each in shared:
                each.stop()
            return result

        return service.stopService().addBoth(published)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()
    # reactor._exitSignal, private to Twisted (tests/test_twisted_private pins it):
    # the signal that stopped the reactor.
    if failed or getattr(reactor, "_exitSignal", None) not in (None, signal.SIGINT):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
