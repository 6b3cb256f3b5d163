# -*- test-case-name: tests.integration.test_agent_clients -*-
"""
What a browser-based or MCP agent meets before its first proxied call
(SPEC 13), through a real gateway over TLS with real Postgres, Redis, the
dev STS and a local upstream: the RFC 9728 metadata, the RFC 6750 bearer
challenges, and CORS preflights that reach neither the STS nor the upstream.
"""

from __future__ import annotations

import socket
import ssl

from twisted.internet import defer, reactor, task, threads
from twisted.trial.unittest import TestCase

from tests.support.gateway import GatewayHarness
from tests.support.waiting import wait_until

PUBLIC_URL = "https://gw.example.com"
METADATA_URL = PUBLIC_URL + "/.well-known/oauth-protected-resource"
APP = "https://app.example.com"


class AgentClientTests(TestCase):
    """One gateway with PUBLIC_URL, two authorization servers and one CORS origin."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.gw = GatewayHarness(
            PUBLIC_URL=PUBLIC_URL,
            AUTHORIZATION_SERVERS="https://as1.example.com,https://as2.example.com",
            CORS_ALLOWED_ORIGINS=APP,
        )
        self.addCleanup(self.gw.stop)
        yield self.gw.start()
        self.gw.add_resource()
        yield wait_until(lambda: self.gw.gateway.pipeline.resources.get("tools"))

    def assertNothingContacted(self):
        self.assertEqual(self.gw.sts.exchanges, 0)
        self.assertEqual(self.gw.sts.jwks_fetches, 0)
        self.assertEqual(self.gw.upstream.requests, [])

    @defer.inlineCallbacks
    def test_metadata(self):
        """The metadata document of SPEC 13, exactly."""
        response = yield self.gw.client.get(
            self.gw.base_url + "/.well-known/oauth-protected-resource"
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(
            (yield response.json()),
            {
                "resource": PUBLIC_URL,
                "authorization_servers": ["https://as1.example.com", "https://as2.example.com"],
                "bearer_methods_supported": ["header"],
                "resource_name": "caracal-gateway",
            },
        )
        self.assertNothingContacted()

    @defer.inlineCallbacks
    def test_missing_token_challenge(self):
        """No token: realm and resource_metadata, no error attribute."""
        response = yield self.gw.request(None)
        self.assertEqual(response.code, 401)
        self.assertEqual(
            response.headers.getRawHeaders("www-authenticate"),
            [f'Bearer realm="caracal", resource_metadata="{METADATA_URL}"'],
        )
        self.assertEqual((yield response.json())["error"], "missing_token")

    @defer.inlineCallbacks
    def test_invalid_token_challenge(self):
        """A token that is not a JWT: error="invalid_token" and its description."""
        response = yield self.gw.request("not-a-jwt")
        self.assertEqual(response.code, 401)
        body = yield response.json()
        self.assertEqual(body["error"], "invalid_token")
        self.assertEqual(
            response.headers.getRawHeaders("www-authenticate"),
            [
                'Bearer realm="caracal", error="invalid_token",'
                f' error_description="{body["description"]}",'
                f' resource_metadata="{METADATA_URL}"'
            ],
        )
        self.assertNothingContacted()

    @defer.inlineCallbacks
    def test_revoked_session_challenge(self):
        """session_revoked stays its own code in the body, invalid_token in the header."""
        self.gw.revoke("s-gone")
        revocations = self.gw.gateway.pipeline.revocations
        yield wait_until(lambda: revocations.is_revoked(self.gw.zone, "s-gone"))
        response = yield self.gw.request(self.gw.mint(session_id="s-gone"))
        self.assertEqual(response.code, 401)
        body = yield response.json()
        self.assertEqual(body["error"], "session_revoked")
        self.assertEqual(
            response.headers.getRawHeaders("www-authenticate"),
            [
                'Bearer realm="caracal", error="invalid_token",'
                f' error_description="{body["description"]}",'
                f' resource_metadata="{METADATA_URL}"'
            ],
        )

    @defer.inlineCallbacks
    def test_preflight(self):
        """A preflight from the listed origin: 204, no token, nothing contacted."""
        response = yield self.gw.request(
            None,
            method="OPTIONS",
            data=None,
            headers={
                b"Origin": [APP.encode()],
                b"Access-Control-Request-Method": [b"POST"],
                b"Access-Control-Request-Headers": [b"authorization, mcp-session-id"],
            },
        )
        self.assertEqual(response.code, 204)
        headers = response.headers
        self.assertEqual(headers.getRawHeaders("access-control-allow-origin"), [APP])
        self.assertEqual(headers.getRawHeaders("vary"), ["Origin"])
        self.assertEqual(
            headers.getRawHeaders("access-control-allow-methods"),
            ["GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"],
        )
        self.assertEqual(
            headers.getRawHeaders("access-control-allow-headers"),
            [
                "Authorization, Content-Type, Accept, X-Caracal-Resource, Mcp-Session-Id,"
                " MCP-Protocol-Version, Last-Event-ID, X-Request-Id, traceparent"
            ],
        )
        self.assertEqual(headers.getRawHeaders("access-control-max-age"), ["600"])
        self.assertNothingContacted()

    @defer.inlineCallbacks
    def test_preflight_unlisted_origin(self):
        """A preflight from another origin: 403 cors_origin_denied, nothing contacted."""
        response = yield self.gw.request(
            None,
            method="OPTIONS",
            data=None,
            headers={
                b"Origin": [b"https://evil.example.com"],
                b"Access-Control-Request-Method": [b"POST"],
            },
        )
        self.assertEqual(response.code, 403)
        self.assertEqual((yield response.json())["error"], "cors_origin_denied")
        self.assertIsNone(response.headers.getRawHeaders("access-control-allow-origin"))
        self.assertNothingContacted()

    @defer.inlineCallbacks
    def test_proxied_answer_to_listed_origin(self):
        """A proxied call from the listed origin carries the allow and expose headers."""
        response = yield self.gw.request(
            self.gw.mint(), headers={b"Origin": [APP.encode()]}, data=b"{}"
        )
        self.assertEqual(response.code, 200)
        yield response.content()
        self.assertEqual(response.headers.getRawHeaders("access-control-allow-origin"), [APP])
        self.assertEqual(response.headers.getRawHeaders("vary"), ["Origin"])
        self.assertEqual(
            response.headers.getRawHeaders("access-control-expose-headers"),
            ["Mcp-Session-Id, X-Request-Id, WWW-Authenticate, X-Caracal-Token-Expires-In"],
        )

    @defer.inlineCallbacks
    def test_refusal_to_listed_origin(self):
        """A 401 to the listed origin is readable by the page, challenge included."""
        response = yield self.gw.request(None, headers={b"Origin": [APP.encode()]})
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders("access-control-allow-origin"), [APP])
        self.assertIn(
            "WWW-Authenticate", response.headers.getRawHeaders("access-control-expose-headers")[0]
        )

    @defer.inlineCallbacks
    def test_alpn_http11(self):
        """The real TLS listener selects http/1.1 for a client offering h2 and http/1.1."""
        port = self.gw.port.getHost().port

        def negotiate():
            context = ssl.create_default_context(cafile=self.gw.ca_file)
            context.set_alpn_protocols(["h2", "http/1.1"])
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                return tls.selected_alpn_protocol()

        self.assertEqual((yield threads.deferToThread(negotiate)), "http/1.1")


class SlowResourceTests(TestCase):
    """
    SPEC 13: a resource's upstream_timeout_ms replaces UPSTREAM_TIMEOUT for
    it alone, and the wait is not cut by WRITE_TIMEOUT either.
    """

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.gw = GatewayHarness(UPSTREAM_TIMEOUT="300ms", WRITE_TIMEOUT="500ms")
        self.addCleanup(self.gw.stop)
        yield self.gw.start()
        self.gw.add_resource("quick")
        self.gw.database.execute(
            "INSERT INTO gateway_resources (resource_identifier, zone_id, application_id,"
            " upstream_url, upstream_timeout_ms) VALUES (%s, %s, %s, %s, %s)",
            ("patient", self.gw.zone, "app-1", self.gw.upstream.url("/api"), 20000),
        )
        resources = self.gw.gateway.pipeline.resources
        yield wait_until(lambda: resources.get("quick") and resources.get("patient"))

    @defer.inlineCallbacks
    def test_resource_timeout(self):
        """
        The same slow upstream: 504 through the default resource, the answer
        through the one allowed 20 s, even past WRITE_TIMEOUT.
        """
        response = yield self.gw.request(self.gw.mint(), resource="quick", path="/slow")
        self.assertEqual(response.code, 504)
        self.assertEqual((yield response.json())["error"], "upstream_timeout")

        answered = self.gw.request(self.gw.mint(), resource="patient", path="/slow")
        yield wait_until(lambda: len(self.gw.upstream.slow) == 2)
        # Past both UPSTREAM_TIMEOUT and WRITE_TIMEOUT before it answers.
        yield task.deferLater(reactor, 1.0, lambda: None)
        request, _closed = self.gw.upstream.slow[1]
        request.setHeader(b"content-type", b"application/json")
        request.write(b'{"late": true}')
        request.finish()
        response = yield answered
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json()), {"late": True})
