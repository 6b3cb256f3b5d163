# -*- test-case-name: tests.integration.test_pipeline -*-
"""
The whole gateway end to end, in process, over real sockets on 127.0.0.1:
TLS listener, real Postgres (temporary database), real Redis, the dev STS and
a local upstream. Each test shows what the caller got AND what was (or was
not) contacted behind the gateway.
"""

from __future__ import annotations

import json
import time

import treq
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.support.gateway import GatewayHarness
from tests.support.redis import SyncRedis
from tests.support.waiting import wait_until


class PipelineEndToEndTests(TestCase):
    timeout = 30
    env: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.gw = GatewayHarness(**self.env)
        self.addCleanup(self.gw.stop)
        yield self.gw.start()

    @defer.inlineCallbacks
    def error_of(self, response):
        body = yield response.json()
        self.assertEqual(body["request_id"], response.headers.getRawHeaders("x-request-id")[0])
        return body["error"]


class AllowedRequestTests(PipelineEndToEndTests):
    @defer.inlineCallbacks
    def test_forwardedWithMandateNotCallerToken(self):
        """A real request reaches the upstream with the STS's mandate, never the caller's token."""
        self.gw.add_resource()
        yield wait_until(lambda: self.gw.gateway.pipeline.resources.get("tools"))
        token = self.gw.mint(session_id="s-1")
        response = yield self.gw.request(
            token,
            path="/tools/run?a=1",
            headers={b"X-Request-Id": [b"req-e2e-1"], b"X-Caracal-Debug": [b"x"]},
            data=b'{"q": 1}',
        )
        self.assertEqual(response.code, 200)
        seen = yield response.json()
        headers = dict(seen["headers"])
        self.assertEqual(seen["path"], "/api/tools/run")
        self.assertEqual(seen["query"], "a=1")
        self.assertTrue(headers["authorization"].startswith("Bearer "))
        self.assertNotIn(token, json.dumps(seen))
        self.assertEqual(headers["x-forwarded-for"], "127.0.0.1")
        self.assertEqual(headers["x-request-id"], "req-e2e-1")
        self.assertNotIn("x-caracal-debug", headers)
        self.assertNotIn("x-caracal-resource", headers)
        self.assertEqual(response.headers.getRawHeaders("x-request-id"), ["req-e2e-1"])
        left = int(response.headers.getRawHeaders("x-caracal-token-expires-in")[0])
        self.assertTrue(250 < left <= 300)
        self.assertEqual(self.gw.sts.exchanges, 1)
        counters = self.gw.gateway.metrics.snapshot()
        self.assertEqual(counters["requests_allowed"], 1)

    @defer.inlineCallbacks
    def test_replayRefusedAndAuditedInRedis(self):
        """A replayed single-use token is refused and the replay audited in Redis."""
        self.gw.add_resource()
        yield wait_until(lambda: self.gw.gateway.pipeline.resources.get("tools"))
        token = self.gw.mint()
        first = yield self.gw.request(token)
        yield first.content()
        self.assertEqual(first.code, 200)
        second = yield self.gw.request(token)
        self.assertEqual(second.code, 401)
        self.assertEqual((yield self.error_of(second)), "invalid_token")
        self.assertEqual(self.gw.sts.exchanges, 1)
        request_id = second.headers.getRawHeaders("x-request-id")[0]
        redis = SyncRedis()
        self.addCleanup(redis.close)
        entries = redis.call("XREVRANGE", "caracal.audit.events", "+", "-", "COUNT", "200")
        events = [json.loads(dict(zip(f[::2], f[1::2], strict=True))["data"]) for _, f in entries]
        ours = {e["event_type"]: e for e in events if e.get("request_id") == request_id}
        self.assertEqual(set(ours), {"replay_detected", "gateway_call"})
        self.assertEqual(ours["replay_detected"]["suppressed"], 0)
        self.assertEqual(ours["gateway_call"]["reason"], "invalid_token")
        self.assertNotIn(token, json.dumps(events))

    @defer.inlineCallbacks
    def test_resourceAddedIsServedWithinASecond(self):
        """A resource added to Postgres is served within a second."""
        token = self.gw.mint(use="ambient")
        before = yield self.gw.request(token)
        self.assertEqual(before.code, 403)
        yield before.content()
        added = time.monotonic()
        self.gw.add_resource()

        @defer.inlineCallbacks
        def served():
            response = yield self.gw.request(token)
            yield response.content()
            return response.code == 200

        yield wait_until(served, timeout=1.0)
        self.assertLess(time.monotonic() - added, 1.0)

    @defer.inlineCallbacks
    def test_localEndpoints(self):
        """/health and /ready answer on the running gateway."""
        health = yield self.gw.client.get(self.gw.base_url + "/health")
        self.assertEqual(health.code, 200)
        yield health.content()
        ready = yield self.gw.client.get(self.gw.base_url + "/ready")
        document = yield ready.json()
        self.assertEqual((ready.code, document["status"]), (200, "ready"))
        metrics = yield self.gw.client.get(
            self.gw.base_url + "/metrics", headers={b"Accept": [b"text/plain"]}
        )
        text = yield metrics.text()
        self.assertIn("caracal_gateway_requests_total ", text)


class RefusedRequestTests(PipelineEndToEndTests):
    @defer.inlineCallbacks
    def assertRefused(self, response, status, code):
        self.assertEqual(response.code, status)
        self.assertEqual((yield self.error_of(response)), code)
        if status == 401:
            [challenge] = response.headers.getRawHeaders("www-authenticate")
            self.assertTrue(challenge.startswith('Bearer realm="caracal"'), challenge)
        self.assertEqual(self.gw.sts.exchanges, 0)
        self.assertEqual(self.gw.upstream.requests, [])

    @defer.inlineCallbacks
    def test_missingToken(self):
        """No token is a 401 missing_token over the wire."""
        response = yield self.gw.request(None)
        yield self.assertRefused(response, 401, "missing_token")

    @defer.inlineCallbacks
    def test_unknownResource(self):
        """An unknown resource is a 403 over the wire."""
        response = yield self.gw.request(self.gw.mint(), resource="nope")
        yield self.assertRefused(response, 403, "access_denied")

    @defer.inlineCallbacks
    def test_traversal(self):
        """An encoded dot segment is a 400 over the wire."""
        self.gw.add_resource()
        yield wait_until(lambda: self.gw.gateway.pipeline.resources.get("tools"))
        response = yield self.gw.request(self.gw.mint(), path="/a/%2e%2e/admin")
        yield self.assertRefused(response, 400, "invalid_request")

    @defer.inlineCallbacks
    def test_otherZonesKeyRefused(self):
        """A token signed by another zone's key is refused."""
        self.gw.add_resource()
        yield wait_until(lambda: self.gw.gateway.pipeline.resources.get("tools"))
        foreign = self.gw.sts.mint("another-zone", "agent-1")
        response = yield self.gw.request(foreign)
        yield self.assertRefused(response, 401, "invalid_token")

    @defer.inlineCallbacks
    def test_revokedSessionWithinASecond(self):
        """A session revoked through Redis is refused within a second."""
        self.gw.add_resource()
        yield wait_until(lambda: self.gw.gateway.pipeline.resources.get("tools"))
        self.gw.revoke("s-revoked")
        revocations = self.gw.gateway.pipeline.revocations
        yield wait_until(lambda: revocations.is_revoked(self.gw.zone, "s-revoked"), timeout=1.0)
        response = yield self.gw.request(self.gw.mint(session_id="s-revoked"))
        yield self.assertRefused(response, 401, "session_revoked")

    @defer.inlineCallbacks
    def test_forgedRevocationIgnored(self):
        """An unsigned revocation is ignored while a signed one after it is applied."""
        self.gw.add_resource()
        yield wait_until(lambda: self.gw.gateway.pipeline.resources.get("tools"))
        self.gw.revoke("s-forged", sign=False)
        self.gw.revoke("s-marker")
        revocations = self.gw.gateway.pipeline.revocations
        yield wait_until(lambda: revocations.is_revoked(self.gw.zone, "s-marker"), timeout=1.0)
        self.assertFalse(revocations.is_revoked(self.gw.zone, "s-forged"))

    @defer.inlineCallbacks
    def test_oversizedBody(self):
        """A body over the limit is a 413 before any STS call."""
        response = yield self.gw.request(self.gw.mint(), data=b"x" * (64 * 1024 + 1))
        self.assertEqual(response.code, 413)
        self.assertEqual((yield self.error_of(response)), "payload_too_large")
        self.assertEqual(self.gw.sts.exchanges, 0)


RefusedRequestTests.env = {"MAX_REQUEST_BYTES": "65536"}


class SSRFTests(PipelineEndToEndTests):
    """With private upstreams not allowed, a loopback upstream is never contacted."""

    env = {"ALLOW_PRIVATE_UPSTREAMS": "false"}

    @defer.inlineCallbacks
    def check_refused(self, upstream):
        self.gw.add_resource(upstream=upstream)
        yield wait_until(lambda: self.gw.gateway.pipeline.resources.get("tools"))
        response = yield self.gw.request(self.gw.mint())
        self.assertEqual(response.code, 403)
        body = yield response.json()
        self.assertEqual(body["error"], "access_denied")
        self.assertEqual(self.gw.upstream.connections, 0)
        self.assertEqual(self.gw.upstream.requests, [])

    def test_loopbackAddress(self):
        """An upstream on a loopback address is refused."""
        return self.check_refused(self.gw.upstream.url("/api"))

    def test_loopbackName(self):
        """An upstream named localhost is refused."""
        return self.check_refused(self.gw.upstream.url("/api", host="localhost"))

    def test_decimalSpelling(self):
        """A loopback address spelled as one decimal number is refused."""
        return self.check_refused(f"http://2130706433:{self.gw.upstream.port}/api")

    def test_mappedIPv6(self):
        """A loopback address mapped into IPv6 is refused."""
        return self.check_refused(f"http://[::ffff:127.0.0.1]:{self.gw.upstream.port}/api")


class StreamingTests(PipelineEndToEndTests):
    @defer.inlineCallbacks
    def test_sseEventsArriveOneByOneAndRevocationCuts(self):
        """Server-sent events arrive one by one, and a revocation cuts the stream."""
        self.gw.add_resource()
        yield wait_until(lambda: self.gw.gateway.pipeline.resources.get("tools"))
        opened = self.gw.upstream.next_sse()
        response = yield self.gw.request(self.gw.mint(session_id="s-live"), path="/sse")
        self.assertEqual(response.code, 200)
        stream = yield opened
        received = []
        arrived = defer.Deferred()

        def collect(data):
            received.append(data)
            if not arrived.called:
                arrived.callback(None)

        done = treq.collect(response, collect)
        stream.send(b"data: one\n\n")
        yield arrived
        self.assertEqual(b"".join(received), b"data: one\n\n")
        self.gw.revoke("s-live")
        yield done
        self.assertEqual(response.headers.getRawHeaders("trailer"), ["X-Caracal-Revoked"])
        self.assertNotIn(b"two", b"".join(received))
