# -*- test-case-name: tests.test_callevents -*-
"""
SPEC 14's C{gateway_call} event through the real pipeline on in-memory
stores: exactly one per call whose resource is known, with the exact fields,
for every outcome after step 6; none before; the MCP method and target, and
never the arguments, a token or a query.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway.denials import Denial
from caracal.gateway.jwks import JWKSCache
from caracal.gateway.mcp import MAX_BODY_BYTES
from caracal.gateway.tokens import fingerprint
from caracal.gateway.upstream import UpstreamRefused
from tests.test_pipeline import ZONE, PipelineFixture

FIELDS = {
    "reason",
    "zone_id",
    "application_id",
    "resource",
    "method",
    "path",
    "status",
    "upstream_host",
    "sts_ms",
    "upstream_ms",
    "duration_ms",
    "bytes_in",
    "bytes_out",
    "sub",
    "sid",
    "token_fingerprint",
}


class StreamingForwarder:
    """Starts a response and leaves it open; the test ends it."""

    def __init__(self):
        self.requests = []

    def forward(self, request, pinned, credentials, expires_in, watch, *more):
        request.setResponseCode(200)
        request.write(b"event: 1\n\n")
        self.requests.append(request)
        return defer.succeed(None)


def lose_connection(request):
    """What Twisted does to a request whose connection went away."""
    observers, request._finishedDeferreds = request._finishedDeferreds, None
    for observer in observers or []:
        observer.errback(ConnectionError("connection lost"))


def metadata(event: dict) -> dict:
    """An event's C{data} without the core fields every event has."""
    core = ("event_type", "request_id", "decision", "occurred_at")
    return {name: value for name, value in event.items() if name not in core}


class CallEventFixture(PipelineFixture):
    """The pipeline fixture, reading the gateway_call events back."""

    def events(self):
        """The gateway_call events emitted so far, as (request id, decision, metadata)."""
        return [
            (event["request_id"], event["decision"], metadata(event))
            for event in self.audit.events
            if event["event_type"] == "gateway_call"
        ]

    def only_event(self, request):
        """The one gateway_call event, checked to belong to C{request}."""
        [(request_id, decision, metadata)] = self.events()
        self.assertEqual(request_id, request.request_id)
        return decision, metadata


class CallEventTests(CallEventFixture, SynchronousTestCase):
    def assertDeniedEvent(self, request, status, code):
        """One event: deny, the code as reason, the status, the common fields."""
        decision, metadata = self.only_event(request)
        self.assertEqual((decision, metadata["reason"], metadata["status"]), ("deny", code, status))
        self.assertEqual(set(metadata), FIELDS)
        self.assertEqual(metadata["resource"], "tools")
        self.assertEqual(metadata["zone_id"], ZONE)

    def test_allowed(self):
        """A forwarded call: allow, no reason, every field of SPEC 14, no token."""
        token = self.mint(sid="s-1")
        request = self.call(token=token, path=b"/tools/run", body=b"{}")
        self.clock.advance(0.25)
        decision, metadata = self.only_event(request)
        self.assertEqual(decision, "allow")
        self.assertEqual(set(metadata), FIELDS)
        duration = metadata.pop("duration_ms")
        self.assertGreaterEqual(duration, 0)
        self.assertEqual(
            metadata,
            {
                "reason": None,
                "zone_id": ZONE,
                "application_id": "app-1",
                "resource": "tools",
                "method": "POST",
                "path": "/tools/run",
                "status": 200,
                "upstream_host": "tools.example",
                "sts_ms": 0.0,
                "upstream_ms": None,
                "bytes_in": 2,
                "bytes_out": len(b"upstream says hi"),
                "sub": "agent-1",
                "sid": "s-1",
                "token_fingerprint": fingerprint(token),
            },
        )
        self.assertNotIn(token, json.dumps(self.audit.events))

    def test_no_event_before_the_resource_is_known(self):
        """Refusals at steps 2 to 6 leave no gateway_call event."""
        self.call(token=None)
        self.call(token="not-a-jwt")
        self.call(token=self.mint(ttl=20))
        self.call(token=self.mint(), headers=[(b"X-Caracal-Client-ID", b"x")])
        self.call(token=self.mint(), resource=None)
        self.call(token=self.mint(), resource=b"unknown")
        self.assertEqual(self.events(), [])
        self.assertEqual(self.metrics.counters["requests_denied"], 6)

    def test_path_traversal(self):
        """Step 7."""
        request = self.call(token=self.mint(), path=b"/a/../b")
        self.assertDeniedEvent(request, 400, "invalid_request")

    def test_bad_signature(self):
        """Step 8."""
        request = self.call(token=self.mint(kid="unknown"))
        self.assertDeniedEvent(request, 401, "invalid_token")

    def test_jwks_unreachable(self):
        """Step 8, the STS down."""
        self.jwks_down = True
        request = self.call(token=self.mint())
        self.assertDeniedEvent(request, 503, "sts_unavailable")

    def test_replay(self):
        """Step 9: the replay leaves its own gateway_call beside replay_detected."""
        token = self.mint()
        self.call(token=token)
        self.audit.events.clear()
        request = self.call(token=token)
        [(_, decision, metadata)] = self.events()
        self.assertEqual(
            (decision, metadata["reason"], metadata["status"]), ("deny", "invalid_token", 401)
        )
        self.assertEqual(
            [e["event_type"] for e in self.audit.events], ["replay_detected", "gateway_call"]
        )
        self.assertEqual(self.events()[0][0], request.request_id)

    def test_replay_check_unavailable(self):
        """Step 9, Redis down."""
        self.pipeline.replay.unavailable = True
        request = self.call(token=self.mint())
        self.assertDeniedEvent(request, 503, "replay_check_unavailable")

    def test_revoked(self):
        """Step 10."""
        self.revocations.revoke(ZONE, "s-1")
        request = self.call(token=self.mint(sid="s-1"))
        self.assertDeniedEvent(request, 401, "session_revoked")

    def test_revocation_state_unavailable(self):
        """Step 10, the revocation window not loaded: 503, a deny event."""
        self.revocations.expect_follower()
        request = self.call(token=self.mint(sid="s-1"))
        self.assertDeniedEvent(request, 503, "revocation_state_unavailable")

    def test_sts_refusal(self):
        """Step 11."""
        self.sts.denial = Denial(403, "access_denied", "no", metric="sts_exchange_errors")
        request = self.call(token=self.mint())
        self.assertDeniedEvent(request, 403, "access_denied")

    def test_upstream_refused(self):
        """Step 12."""
        self.guard.refusal = UpstreamRefused("private_address", "resolves to a private address")
        request = self.call(token=self.mint())
        self.assertDeniedEvent(request, 403, "access_denied")

    def test_upstream_failure_is_allowed_with_its_code(self):
        """Step 13: the gateway let the call through; the upstream failed it."""
        self.forwarder.denial = Denial(504, "upstream_timeout", "slow", metric="upstream_errors")
        request = self.call(token=self.mint())
        decision, metadata = self.only_event(request)
        self.assertEqual(
            (decision, metadata["reason"], metadata["status"]), ("allow", "upstream_timeout", 504)
        )

    def test_revoked_mid_stream(self):
        """A stream cut by a revocation (trailer and finish): revoked_mid_stream."""
        self.pipeline.forwarder = forwarder = StreamingForwarder()
        request = self.call(token=self.mint(sid="s-1"))
        self.assertEqual(self.events(), [], "nothing before the response ends")
        request.log_fields["upstream_cut"] = "session_revoked"
        request.finish()
        decision, metadata = self.only_event(request)
        self.assertEqual(
            (decision, metadata["reason"], metadata["status"]), ("allow", "revoked_mid_stream", 200)
        )
        self.assertEqual(metadata["bytes_out"], len(b"event: 1\n\n"))
        self.assertEqual(forwarder.requests, [request])

    def test_upstream_cut(self):
        """An upstream that broke off mid-body: upstream_cut, once."""
        self.pipeline.forwarder = StreamingForwarder()
        request = self.call(token=self.mint())
        request.log_fields["upstream_cut"] = "upstream_error"
        lose_connection(request)
        decision, metadata = self.only_event(request)
        self.assertEqual((decision, metadata["reason"]), ("allow", "upstream_cut"))

    def test_drained(self):
        """A standing stream ended by the drain (SIGTERM): drained, allow."""
        self.pipeline.forwarder = StreamingForwarder()
        request = self.call(token=self.mint())
        request.log_fields["upstream_cut"] = "drained"
        request.finish()
        decision, metadata = self.only_event(request)
        self.assertEqual((decision, metadata["reason"]), ("allow", "drained"))

    def test_client_gone_mid_stream(self):
        """The client left while the response streamed: client_gone, allow."""
        self.pipeline.forwarder = StreamingForwarder()
        request = self.call(token=self.mint())
        lose_connection(request)
        decision, metadata = self.only_event(request)
        self.assertEqual(
            (decision, metadata["reason"], metadata["status"]), ("allow", "client_gone", 200)
        )

    def test_client_gone_before_decision(self):
        """The client left during the JWKS fetch: client_gone, deny, 499, nothing forwarded."""
        release = defer.Deferred()
        self.pipeline.jwks = JWKSCache(lambda zone: release, self.clock)
        request = self.call(token=self.mint())
        lose_connection(request)
        self.fetch_jwks(ZONE).addCallback(release.callback)
        decision, metadata = self.only_event(request)
        self.assertEqual(
            (decision, metadata["reason"], metadata["status"]), ("deny", "client_gone", 499)
        )
        self.assertEqual(self.forwarder.calls, [])


class MCPFieldTests(CallEventFixture, SynchronousTestCase):
    """mcp_method / mcp_target from the JSON-RPC body (SPEC 14, "Which tool")."""

    def mcp_call(self, body: bytes, content_type: bytes = b"application/json"):
        """POST /mcp with C{body}; returns the request and its event's metadata."""
        seen = []
        forward = self.forwarder.forward

        def forwarding(request, *arguments):
            seen.append(request.content.read())
            return forward(request, *arguments)

        self.forwarder.forward = forwarding
        request = self.call(
            token=self.mint(),
            path=b"/mcp",
            headers=[(b"content-type", content_type)],
            body=body,
        )
        self.forwarder.forward = forward
        [(_, _, fields)] = self.events()
        self.assertEqual(seen, [body], "the body reaches the upstream byte for byte")
        self.assertEqual(fields["bytes_in"], len(body))
        return request, fields

    def test_tools_call(self):
        """tools/call: the tool's name; the arguments never."""
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 7,
                "method": "tools/call",
                "params": {"name": "search", "arguments": {"query": "top-secret-argument"}},
            }
        ).encode()
        _, metadata = self.mcp_call(body)
        self.assertEqual((metadata["mcp_method"], metadata["mcp_target"]), ("tools/call", "search"))
        self.assertNotIn("top-secret-argument", json.dumps(metadata))

    def test_prompts_get_and_resources_read(self):
        """prompts/get names the prompt; resources/read the resource's URI."""
        prompt = {"jsonrpc": "2.0", "id": 1, "method": "prompts/get", "params": {"name": "p1"}}
        _, metadata = self.mcp_call(json.dumps(prompt).encode(), b"application/json; charset=utf-8")
        self.assertEqual((metadata["mcp_method"], metadata["mcp_target"]), ("prompts/get", "p1"))
        self.audit.events.clear()
        read = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "resources/read",
            "params": {"uri": "file:///a" + "x" * 300},
        }
        _, metadata = self.mcp_call(json.dumps(read).encode())
        self.assertEqual(metadata["mcp_method"], "resources/read")
        self.assertEqual(metadata["mcp_target"], ("file:///a" + "x" * 300)[:256])

    def test_method_without_target(self):
        """Other methods: mcp_method only."""
        body = b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}'
        _, metadata = self.mcp_call(body)
        self.assertEqual(metadata["mcp_method"], "tools/list")
        self.assertNotIn("mcp_target", metadata)

    def test_not_a_jsonrpc_request(self):
        """A batch, malformed JSON, JSON-RPC 1, another type, an oversized body: no mcp_*."""
        tools_call = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}'
        cases = [
            (b"[" + tools_call + b"]", b"application/json"),
            (b'{"jsonrpc":"2.0","method":', b"application/json"),
            (b'{"jsonrpc":"1.0","id":1,"method":"tools/call"}', b"application/json"),
            (b'{"jsonrpc":"2.0","id":1,"method":7}', b"application/json"),
            (tools_call, b"text/plain"),
            (b"\xff\xfe\x00garbage", b"application/json"),
            (tools_call[:-1] + b" " * MAX_BODY_BYTES + b"}", b"application/json"),
        ]
        for body, content_type in cases:
            self.audit.events.clear()
            request, metadata = self.mcp_call(body, content_type)
            self.assertEqual(request.responseCode, 200)
            self.assertEqual(set(metadata), FIELDS, body[:40])
