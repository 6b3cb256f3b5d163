# -*- test-case-name: tests.integration.test_pipeline -*-
"""
Assembly of one gateway process: configuration in, a L{Gateway} out, holding
the background services (stores, followers) and the HTTP site to listen with.
The listener itself is the tap's business (L{caracal.gateway.tap}).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import IService, IServiceCollection, MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger

from caracal.gateway.config import RESOURCE_METADATA_PATH, GatewayConfig, redact_url
from caracal.gateway.discovery import ProtectedResourceMetadata
from caracal.gateway.endpoints import (
    HealthResource,
    MetricsResource,
    ReadyResource,
    UnexposedResource,
)
from caracal.gateway.metrics import Metrics
from caracal.gateway.proxy import GatewayResource, GatewayRoot, Pipeline

log = Logger()

#: Upper bound on resolving an upstream's name (also bounded by UPSTREAM_TIMEOUT).
DNS_TIMEOUT = 5.0


@dataclass
class Gateway:
    """
    The parts of one running gateway.

    @ivar service: background services to start before listening and stop
        after the listener has drained (stores, stream followers).
    @ivar site: the HTTP factory to listen with (a L{GatewaySite}).
    @ivar pipeline: the collaborators of the request pipeline.
    @ivar metrics_site: the plaintext factory for C{METRICS_ADDRESS}
        (C{/health}, C{/ready}, C{/metrics} only), or C{None} when unset.
    """

    config: GatewayConfig
    metrics: Metrics
    service: IService
    site: Any
    pipeline: Pipeline
    metrics_site: Any = None

    def when_loaded(self, clock, timeout: float) -> defer.Deferred:
        """
        Fire once the state the pipeline decides on is in memory: the first
        resource snapshot and each follower's initial window (the last 24 h
        of revocations). Serving before then would wrongly refuse known
        resources and, worse, let a revoked session through. Fires C{True}
        when loaded, C{False} when C{timeout} passed first (a dependency is
        down: the caller serves anyway, failing closed on what is missing).
        """
        waits = []
        loaded = getattr(getattr(self.pipeline, "resources", None), "loaded", None)
        if isinstance(loaded, defer.Deferred):
            observed = defer.Deferred()
            loaded.addBoth(lambda result: (observed.callback(None), result)[1])
            waits.append(observed)
        children = self.service if IServiceCollection.providedBy(self.service) else []
        for child in children:
            when_ready = getattr(child, "when_ready", None)
            if when_ready is not None:
                waits.append(when_ready())
        d = defer.gatherResults(waits, consumeErrors=True)
        d.addTimeout(timeout, clock)
        return d.addCallbacks(lambda _: True, lambda _: False)


class AuditService(Service):
    """Replays the audit spool while the gateway runs (L{RedisAuditLog.start})."""

    def __init__(self, audit) -> None:
        self.audit = audit

    def startService(self) -> None:
        Service.startService(self)
        self.audit.start()

    def stopService(self) -> defer.Deferred:
        Service.stopService(self)
        return self.audit.stop()


class ClosingService(Service):
    """Closes clients (connection pools) when the gateway stops."""

    def __init__(self, *closers) -> None:
        self.closers = closers

    def stopService(self) -> defer.Deferred:
        Service.stopService(self)
        return defer.gatherResults([defer.maybeDeferred(close) for close in self.closers])


@dataclass
class Backends:
    """
    What the pipeline talks to outside the process. L{build_backends} makes
    the real ones; tests may pass their own.
    """

    resources: Any
    replay: Any
    audit: Any
    revocations: Any
    sts: Any
    checks: dict
    services: list
    #: Extra gauges of their own: name -> C{read()} (L{Metrics.gauge}).
    gauges: dict = field(default_factory=dict)


def build_backends(config: GatewayConfig, reactor, metrics: Metrics) -> Backends:
    """The real stores and clients: Postgres, Redis, the STS over treq."""
    from caracal.gateway.audit import RedisAuditLog
    from caracal.gateway.redisconn import check_redis, close_redis, connect_redis
    from caracal.gateway.registry import PostgresResourceStore
    from caracal.gateway.replay import CLAIM_POOL_SIZE, RedisReplayGuard
    from caracal.gateway.revocations import RevocationFollower, RevocationStore
    from caracal.gateway.spool import AuditSpool
    from caracal.gateway.sts import STSClient
    from caracal.gateway.tls import client_tls_policy

    resources = PostgresResourceStore(config.database_url, reactor)
    redis = connect_redis(config.redis, reactor, metrics=metrics)
    claims = redis
    if config.replay_min_replicas:
        # A pool of its own: each claim holds a connection until replicas
        # acknowledged it, which must not delay audit writes or probes.
        claims = connect_redis(config.redis, reactor, CLAIM_POOL_SIZE, metrics=metrics)
    revocations = RevocationStore(reactor)
    follower = RevocationFollower(
        config.redis, revocations, config.streams_hmac_key, reactor, metrics
    )
    sts_policy = client_tls_policy(config.sts_ca_file, variable="STS_CA_FILE")
    sts = STSClient(config.sts_base_url, reactor, sts_policy, config.sts_timeout)
    audit = RedisAuditLog(
        redis,
        config.streams_hmac_key,
        reactor,
        maxlen=config.audit_stream_maxlen,
        spool=AuditSpool(config.audit_spool_dir, config.audit_spool_max_bytes, reactor, metrics),
    )
    return Backends(
        resources=resources,
        replay=RedisReplayGuard(claims, reactor, min_replicas=config.replay_min_replicas),
        audit=audit,
        revocations=revocations,
        sts=sts,
        checks={
            "postgres": resources.check,
            "redis": lambda: check_redis(redis, reactor),
            "sts": sts.health,
            # SPEC 12: not ready while session-bearing calls are refused
            # for want of a current revocation state.
            "revocations": revocations.check,
        },
        # Stopped in reverse: the spool's replay ends before Redis is closed.
        services=[
            resources,
            follower,
            ClosingService(
                lambda: close_redis(redis),
                lambda: None if claims is redis else close_redis(claims),
                sts.close,
            ),
            AuditService(audit),
        ],
        gauges={
            "revocation_lag_seconds": follower.lag,
            "audit_spool_bytes": lambda: audit.spool.size,
        },
    )


def build_gateway(
    config: GatewayConfig,
    reactor,
    backends: Backends | None = None,
    metrics: Metrics | None = None,
    metrics_snapshot=None,
) -> Gateway:
    """
    Build every part of a gateway from C{config}. Clients open their
    connections at once (Redis), so call this in the process that will run
    them: after twistd has daemonized, i.e. from C{startService}.

    @param metrics: the process's L{Metrics} (a new one when C{None}).
    @param metrics_snapshot: what C{/metrics} answers in JSON, when not
        C{metrics.snapshot}: a worker passes every worker's counters
        summed (L{caracal.gateway.workers.SharedMetrics.snapshot}).
    @raise caracal.gateway.config.ConfigError: a CA bundle is unusable.
    """
    from caracal.gateway.forward import Forwarder
    from caracal.gateway.http import GatewaySite
    from caracal.gateway.jwks import JWKSCache
    from caracal.gateway.tls import client_tls_policy
    from caracal.gateway.upstream import UpstreamGuard

    if metrics is None:
        metrics = Metrics()
    if backends is None:
        backends = build_backends(config, reactor, metrics)
    tracing = None
    fetch_jwks = backends.sts.fetch_jwks
    if config.tracing is not None:
        from caracal.gateway.tracing import Tracing

        tracing = Tracing.from_settings(config.tracing)
        fetch_jwks = tracing.traced_jwks_fetch(fetch_jwks)
        log.info(
            "tracing on: spans of service {service} exported to {endpoint}",
            service=config.tracing.service_name,
            endpoint=redact_url(config.tracing.endpoint),
        )
    upstream_policy = client_tls_policy(config.upstream_ca_file, variable="UPSTREAM_CA_FILE")
    pipeline = Pipeline(
        resources=backends.resources,
        jwks=JWKSCache(fetch_jwks, reactor, metrics=metrics),
        replay=backends.replay,
        audit=backends.audit,
        revocations=backends.revocations,
        sts=backends.sts,
        guard=UpstreamGuard(
            reactor.nameResolver,
            allowlist=config.upstream_host_allowlist,
            allow_private=config.allow_private_upstreams,
            clock=reactor,
            # A name that never resolves must not hold the request forever.
            timeout=min(config.upstream_timeout, DNS_TIMEOUT),
        ),
        forwarder=Forwarder(
            reactor,
            upstream_policy,
            config.upstream_timeout,
            metrics,
            sse_keepalive=config.sse_keepalive,
        ),
        metrics=metrics,
        clock=reactor,
        jti_fail_open=config.jti_fail_open,
        revocation_fail_open=config.revocation_fail_open,
        max_token_lifetime=config.max_token_lifetime,
        tracing=tracing,
    )
    metrics.gauge("bindings_loaded", backends.resources.count)
    metrics.gauge("revocations_active", backends.revocations.active)
    for name, read in backends.gauges.items():
        metrics.gauge(name, read)
    # The resource label takes only names of the table: callers cannot grow it.
    resources = backends.resources
    metrics.known_resources = lambda name: resources.get(name) is not None

    ready = ReadyResource(backends.checks, reactor)
    metrics.gauge("ready", ready.last_ready)
    health = HealthResource()
    metrics_resource = MetricsResource(
        metrics_snapshot or metrics.snapshot, metrics.exposition, bearer=config.metrics_bearer
    )
    root = GatewayRoot(
        GatewayResource(pipeline),
        {
            b"/health": health,
            b"/ready": ready,
            # SPEC 12: off the public listener when METRICS_ADDRESS serves it,
            # and in production unless a bearer guards it.
            b"/metrics": metrics_resource if config.metrics_public else UnexposedResource(),
            RESOURCE_METADATA_PATH.encode("ascii"): ProtectedResourceMetadata(
                config.public_url, config.authorization_servers
            ),
        },
        cors_allowed_origins=config.cors_allowed_origins,
    )
    metrics_site = None
    if config.metrics_address is not None:
        # Nothing is proxied from this listener: any other path is a 404.
        metrics_root = GatewayRoot(
            UnexposedResource(),
            {b"/health": health, b"/ready": ready, b"/metrics": metrics_resource},
        )
        metrics_site = GatewaySite(metrics_root, config, metrics, clock=reactor)
    service = MultiService()
    children = [*backends.services, ClosingService(pipeline.forwarder.close)]
    if tracing is not None:
        # First in, so stopped last (MultiService stops in reverse): the
        # spans of the last requests leave after everything else stopped.
        children.insert(0, ClosingService(lambda: tracing.shutdown(reactor)))
    for child in children:
        child.setServiceParent(service)
    site = GatewaySite(root, config, metrics, clock=reactor)
    return Gateway(
        config=config,
        metrics=metrics,
        service=service,
        site=site,
        pipeline=pipeline,
        metrics_site=metrics_site,
    )
