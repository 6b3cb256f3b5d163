# -*- test-case-name: tests.test_cors -*-
"""
CORS (SPEC 13): preflights answered by the gateway itself, before any token
is looked at, and the allow/expose headers on every other response to a
listed origin; in memory, through the real site and root.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from caracal.gateway.config import GatewayConfig
from caracal.gateway.http import GatewaySite
from caracal.gateway.metrics import Metrics
from caracal.gateway.proxy import GatewayRoot
from tests.test_http import one_response

APP = b"https://app.example.com"

PREFLIGHT_HEADERS = {
    b"access-control-allow-origin": [APP],
    b"vary": [b"Origin"],
    b"access-control-allow-methods": [b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"],
    b"access-control-allow-headers": [
        b"Authorization, Content-Type, Accept, X-Caracal-Resource, Mcp-Session-Id,"
        b" MCP-Protocol-Version, Last-Event-ID, X-Request-Id, traceparent"
    ],
    b"access-control-max-age": [b"600"],
}
EXPOSE = [b"Mcp-Session-Id, X-Request-Id, WWW-Authenticate, X-Caracal-Token-Expires-In"]


class Upstreamish(Resource):
    """
    Stands for the pipeline: records every request it is given and answers
    like an upstream that sets CORS headers of its own.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.rendered: list = []

    def render(self, request):
        self.rendered.append(request)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"access-control-allow-origin", b"*")
        request.setHeader(b"access-control-allow-credentials", b"true")
        request.setHeader(b"vary", b"Accept-Encoding")
        return b"{}"


class Local(Resource):
    """A local endpoint."""

    isLeaf = True

    def render(self, request):
        return b"ok"


class CORSTests(SynchronousTestCase):
    """The gateway owns CORS for the origins in CORS_ALLOWED_ORIGINS."""

    def setUp(self) -> None:
        self.proxy = Upstreamish()
        self.site = self.make_site(frozenset({APP.decode()}))

    def make_site(self, origins: frozenset[str]) -> GatewaySite:
        config = GatewayConfig(cors_allowed_origins=origins)
        root = GatewayRoot(self.proxy, {b"/health": Local()}, cors_allowed_origins=origins)
        return GatewaySite(root, config, Metrics(), clock=Clock())

    def send(self, method: bytes, path: bytes, headers: list[bytes], site=None):
        site = site or self.site
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8081))
        transport = StringTransport()
        channel.makeConnection(transport)
        head = [method + b" " + path + b" HTTP/1.1", b"Host: gw.example.com", *headers]
        channel.dataReceived(b"\r\n".join(head) + b"\r\n\r\n")
        return one_response(transport)

    def preflight(self, origin: bytes, site=None):
        return self.send(
            b"OPTIONS",
            b"/mcp",
            [
                b"Origin: " + origin,
                b"Access-Control-Request-Method: POST",
                b"Access-Control-Request-Headers: authorization, content-type, mcp-session-id",
            ],
            site,
        )

    def test_preflight_from_listed_origin(self) -> None:
        """204 with exactly the SPEC 13 headers; the pipeline never sees it."""
        status, headers, body = self.preflight(APP)
        self.assertEqual((status, body), (204, b""))
        for name, value in PREFLIGHT_HEADERS.items():
            self.assertEqual(headers.get(name), value, name)
        cors = {name for name in headers if name.startswith(b"access-control-")}
        self.assertEqual(cors, {name for name in PREFLIGHT_HEADERS if name != b"vary"})
        self.assertNotIn(b"www-authenticate", headers)
        self.assertEqual(self.proxy.rendered, [])

    def test_preflight_origin_compared_without_case(self) -> None:
        """An origin differing only in case is the same origin, echoed as sent."""
        status, headers, _ = self.preflight(b"https://APP.example.com")
        self.assertEqual(status, 204)
        self.assertEqual(headers[b"access-control-allow-origin"], [b"https://APP.example.com"])

    def test_preflight_from_unlisted_origin(self) -> None:
        """403 cors_origin_denied, no CORS header, the pipeline never sees it."""
        status, headers, body = self.preflight(b"https://evil.example.com")
        self.assertEqual(status, 403)
        self.assertEqual(json.loads(body)["error"], "cors_origin_denied")
        self.assertFalse([name for name in headers if name.startswith(b"access-control-")])
        self.assertEqual(self.proxy.rendered, [])

    def test_preflight_to_local_path(self) -> None:
        """A preflight is answered whatever the path, local endpoints included."""
        status, _, _ = self.send(
            b"OPTIONS", b"/health", [b"Origin: " + APP, b"Access-Control-Request-Method: GET"]
        )
        self.assertEqual(status, 204)

    def test_options_without_request_method_is_not_a_preflight(self) -> None:
        """An OPTIONS without Access-Control-Request-Method goes to the pipeline."""
        self.send(b"OPTIONS", b"/mcp", [b"Origin: " + APP])
        self.assertEqual(len(self.proxy.rendered), 1)

    def test_no_cors_configured(self) -> None:
        """Without CORS_ALLOWED_ORIGINS a preflight is an ordinary request."""
        site = self.make_site(frozenset())
        status, headers, _ = self.preflight(APP, site)
        self.assertEqual(status, 200)
        self.assertEqual(len(self.proxy.rendered), 1)
        self.assertFalse([name for name in headers if name.startswith(b"access-control-")])

    def test_response_to_listed_origin(self) -> None:
        """
        A proxied answer to a listed origin: the gateway's allow/expose
        headers replace the upstream's, and Origin joins its Vary.
        """
        status, headers, _ = self.send(b"POST", b"/mcp", [b"Origin: " + APP])
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"access-control-allow-origin"], [APP])
        self.assertEqual(headers[b"access-control-expose-headers"], EXPOSE)
        self.assertEqual(headers[b"vary"], [b"Accept-Encoding, Origin"])
        self.assertNotIn(b"access-control-allow-credentials", headers)

    def test_response_to_unlisted_origin(self) -> None:
        """No CORS header at all, not even the upstream's."""
        _, headers, _ = self.send(b"POST", b"/mcp", [b"Origin: https://evil.example.com"])
        self.assertFalse([name for name in headers if name.startswith(b"access-control-")])
        self.assertEqual(headers[b"vary"], [b"Accept-Encoding"])

    def test_response_without_origin(self) -> None:
        """A request without Origin gets no CORS header either."""
        _, headers, _ = self.send(b"POST", b"/mcp", [])
        self.assertFalse([name for name in headers if name.startswith(b"access-control-")])

    def test_repeated_origin_not_listed(self) -> None:
        """Two Origin headers are not one listed origin."""
        _, headers, _ = self.send(b"POST", b"/mcp", [b"Origin: " + APP, b"Origin: " + APP])
        self.assertNotIn(b"access-control-allow-origin", headers)

    def test_error_answers_carry_cors(self) -> None:
        """A refusal by the gateway to a listed origin is readable by the page."""
        status, headers, _ = self.send(b"DELETE", b"/health", [b"Origin: " + APP])
        self.assertEqual(status, 405)
        self.assertEqual(headers[b"access-control-allow-origin"], [APP])
        self.assertEqual(headers[b"vary"], [b"Origin"])
        self.assertEqual(headers[b"access-control-expose-headers"], EXPOSE)
