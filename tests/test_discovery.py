# -*- test-case-name: tests.test_discovery -*-
"""
The RFC 9728 protected-resource metadata (SPEC 13), through the real site
and root.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from caracal.gateway.config import RESOURCE_METADATA_PATH, GatewayConfig
from caracal.gateway.discovery import ProtectedResourceMetadata
from caracal.gateway.http import GatewaySite
from caracal.gateway.metrics import Metrics
from caracal.gateway.proxy import GatewayRoot
from tests.test_http import one_response


class NeverProxied(Resource):
    """Fails the test if the pipeline is reached."""

    isLeaf = True

    def render(self, request):
        raise AssertionError("the metadata path was proxied")


class MetadataTests(SynchronousTestCase):
    """C{GET /.well-known/oauth-protected-resource}."""

    def get(self, public_url, servers=(), method=b"GET"):
        config = GatewayConfig(public_url=public_url, authorization_servers=servers)
        metadata = ProtectedResourceMetadata(public_url, servers)
        root = GatewayRoot(NeverProxied(), {RESOURCE_METADATA_PATH.encode(): metadata})
        site = GatewaySite(root, config, Metrics(), clock=Clock())
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8081))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(
            method + b" /.well-known/oauth-protected-resource HTTP/1.1\r\nHost: gw\r\n\r\n"
        )
        return one_response(transport)

    def test_document(self) -> None:
        """With PUBLIC_URL set: exactly the SPEC 13 document, as JSON."""
        status, headers, body = self.get(
            "https://gw.example.com", ("https://sts.example.com", "https://as.example.com")
        )
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        self.assertEqual(
            json.loads(body),
            {
                "resource": "https://gw.example.com",
                "authorization_servers": ["https://sts.example.com", "https://as.example.com"],
                "bearer_methods_supported": ["header"],
                "resource_name": "caracal-gateway",
            },
        )

    def test_head(self) -> None:
        """HEAD is answered like GET, without the body."""
        status, headers, body = self.get("https://gw.example.com", (), method=b"HEAD")
        self.assertEqual((status, body), (200, b""))

    def test_without_public_url(self) -> None:
        """Without PUBLIC_URL there is nothing to describe: 404, never proxied."""
        status, headers, body = self.get(None)
        self.assertEqual(status, 404)
        self.assertEqual(json.loads(body)["error"], "not_found")
