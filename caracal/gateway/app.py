# -*- test-case-name: tests.integration.test_pipeline -*-
"""
Assembly of one gateway process: configuration in, a L{Gateway} out, holding
the background services (stores, followers) and the HTTP site to listen with.
The listener itself is the tap's business (L{caracal.gateway.tap}).
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.application.service import IService, MultiService
from twisted.web.resource import Resource
from twisted.web.server import Site

from caracal.gateway.config import GatewayConfig
from caracal.gateway.metrics import Metrics


@dataclass
class Gateway:
    """
    The parts of one running gateway.

    @ivar service: background services to start before listening and stop
        after the listener has drained (stores, stream followers).
    @ivar site: the HTTP factory to listen with.
    """

    config: GatewayConfig
    metrics: Metrics
    service: IService
    site: Site


class _NotReady(Resource):
    isLeaf = True

    def render(self, request):
        if request.path == b"/health":
            request.setHeader(b"content-type", b"application/json")
            return b'{"status":"ok"}'
        request.setResponseCode(503)
        request.setHeader(b"content-type", b"application/json")
        return b'{"error":"not_ready","description":"pipeline not built"}'


def build_gateway(config: GatewayConfig, reactor) -> Gateway:
    """Build every part of a gateway from C{config}; nothing is started yet."""
    metrics = Metrics()
    return Gateway(config=config, metrics=metrics, service=MultiService(), site=Site(_NotReady()))
