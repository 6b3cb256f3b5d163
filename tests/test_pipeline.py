# -*- test-case-name: tests.test_pipeline -*-
"""
Every row of SPEC section 6, step by step, against in-memory stores and
fakes that count their calls: a refused request must reach neither the STS
nor the upstream. Deterministic: a task.Clock drives time.
"""

from __future__ import annotations

import io
import json
import uuid

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from twisted.internet import defer, task
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from caracal.gateway.denials import Denial
from caracal.gateway.jwks import JWKSCache
from caracal.gateway.metrics import Metrics
from caracal.gateway.proxy import GatewayResource, Pipeline
from caracal.gateway.registry import ToolResource
from caracal.gateway.revocations import RevocationStore
from caracal.gateway.testing import (
    MemoryAuditLog,
    MemoryForwarder,
    MemoryReplayGuard,
    MemoryResolver,
    MemoryResourceStore,
    MemoryTokenExchange,
    MemoryUpstreamGuard,
)
from caracal.gateway.upstream import UpstreamGuard, UpstreamRefused

ZONE = "zone-a"
NOW = 1_800_000_000.0


class PipelineRequest(DummyRequest):
    """A DummyRequest with what GatewayRequest adds (request id, log fields)."""

    def __init__(self, path=b"/tools/run", method=b"POST"):
        DummyRequest.__init__(self, [])
        self.path = path
        self.uri = path
        self.method = method
        self.request_id = str(uuid.uuid4())
        self.log_fields = {}
        self.startedWriting = False
        self.lost = False

    def write(self, data):
        self.startedWriting = True
        DummyRequest.write(self, data)

    def loseConnection(self):
        self.lost = True

    @property
    def body(self):
        return b"".join(self.written)

    @property
    def code(self):
        """The status set, under GatewayRequest's name."""
        return self.responseCode

    @property
    def sentLength(self):
        """Body bytes written, under GatewayRequest's name."""
        return len(self.body)


class Mandate:
    access_token = "mandate-token"
    token_type = "Bearer"
    expires_in = 60
    issued_token_type = "urn:ietf:params:oauth:token-type:access_token"
    provider_token = "provider-secret"


class PipelineFixture:
    """A pipeline on in-memory stores and fakes, driven by a task.Clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.kid = "k1"
        self.jwks_fetches = 0
        self.jwks_down = False
        self.sts = MemoryTokenExchange(Mandate())
        self.guard = MemoryUpstreamGuard({"tools.example": ["203.0.114.7"]})
        self.forwarder = MemoryForwarder()
        self.audit = MemoryAuditLog(self.clock)
        self.metrics = Metrics()
        self.revocations = RevocationStore(self.clock)
        self.resources = MemoryResourceStore(
            [
                ToolResource(
                    resource_identifier="tools",
                    zone_id=ZONE,
                    application_id="app-1",
                    upstream_url="https://tools.example/api",
                    auth_mode="caracal_jwt",
                    auth_header=None,
                    auth_scheme=None,
                )
            ]
        )
        self.pipeline = Pipeline(
            resources=self.resources,
            jwks=JWKSCache(self.fetch_jwks, self.clock),
            replay=MemoryReplayGuard(self.clock),
            audit=self.audit,
            revocations=self.revocations,
            sts=self.sts,
            guard=self.guard,
            forwarder=self.forwarder,
            metrics=self.metrics,
            clock=self.clock,
        )
        self.resource = GatewayResource(self.pipeline)

    def fetch_jwks(self, zone_id):
        self.jwks_fetches += 1
        if self.jwks_down:
            return defer.fail(ConnectionRefusedError("sts down"))
        jwk = ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        jwk.update(kid=self.kid, alg="ES256")
        return defer.succeed({"keys": [jwk]})

    def mint(self, key=None, kid="k1", ttl=300, **claims):
        payload = {"sub": "agent-1", "exp": int(NOW + ttl), "iat": int(NOW), "use": "per_call"}
        payload["jti"] = str(uuid.uuid4())
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        headers = {"kid": kid} if kid else {}
        return jwt.encode(payload, key or self.key, algorithm="ES256", headers=headers)

    def call(self, token=None, resource=b"tools", path=b"/tools/run", headers=(), body=b""):
        request = PipelineRequest(path=path)
        request.content = io.BytesIO(body)
        if token is not None:
            request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + token.encode()])
        if resource is not None:
            request.requestHeaders.setRawHeaders(b"x-caracal-resource", [resource])
        for name, value in headers:
            request.requestHeaders.addRawHeader(name, value)
        self.resource.render(request)
        return request

    def assertDenied(self, request, status, code, metric=None):
        self.assertEqual(request.responseCode, status)
        body = json.loads(request.body)
        self.assertEqual(body["error"], code)
        self.assertEqual(body["request_id"], request.request_id)
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"]
        )
        if status == 401:
            # SPEC 13 / RFC 6750: no error attribute without a token.
            [challenge] = request.responseHeaders.getRawHeaders(b"www-authenticate")
            self.assertTrue(challenge.startswith(b'Bearer realm="caracal"'), challenge)
            self.assertEqual(
                b'error="invalid_token"' in challenge, code != "missing_token", challenge
            )
        self.assertTrue(request.log_fields.get("denial"))
        if metric:
            self.assertEqual(self.metrics.counters[metric], 1)
        self.assertEqual(self.metrics.counters["requests_denied"], 1)
        self.assertEqual(self.forwarder.calls, [])

    def assertNoSTS(self):
        self.assertEqual(self.sts.calls, [])
        self.assertEqual(self.guard.calls, [])


class PipelineTests(PipelineFixture, SynchronousTestCase):
    # step 2
    def test_missingToken(self):
        """Step 2: no bearer token is a 401 missing_token, before any JWKS fetch or STS call."""
        request = self.call(token=None)
        self.assertDenied(request, 401, "missing_token", "denials_missing_auth")
        self.assertNoSTS()
        self.assertEqual(self.jwks_fetches, 0)

    def test_oversizedToken(self):
        """Step 2: a bearer longer than 4096 bytes is an invalid token."""
        request = self.call(token="a" * 4097)
        self.assertDenied(request, 401, "invalid_token", "denials_bad_bearer")
        self.assertNoSTS()

    # step 3
    def test_notAJWT(self):
        """Step 3: a bearer that is not a JWT is an invalid token."""
        request = self.call(token="not-a-jwt")
        self.assertDenied(request, 401, "invalid_token", "denials_bad_bearer")
        self.assertNoSTS()

    def test_noExp(self):
        """Step 3: a JWT without C{exp} is an invalid token."""
        token = jwt.encode({"sub": "x"}, self.key, algorithm="ES256", headers={"kid": "k1"})
        request = self.call(token=token)
        self.assertDenied(request, 401, "invalid_token", "denials_bad_bearer")

    # step 4
    def test_expiringSoon(self):
        """Step 4: a token with less than 35 seconds left is refused as credential_expired."""
        request = self.call(token=self.mint(ttl=20))
        self.assertDenied(request, 401, "credential_expired", "denials_expiring")
        self.assertNoSTS()

    def test_expiryCheckedBeforeRouting(self):
        """The first failing step answers: an expiring token to an unknown resource."""
        request = self.call(token=self.mint(ttl=20), resource=b"nope")
        self.assertDenied(request, 401, "credential_expired")

    # step 5
    def test_inboundClientIdRefused(self):
        """Step 5: a caller may not send X-Caracal-Client-ID itself."""
        request = self.call(token=self.mint(), headers=[(b"X-Caracal-Client-ID", b"spoof")])
        self.assertDenied(request, 400, "invalid_request", "denials_bad_routing")
        self.assertNoSTS()

    def test_resourceHeaderMissing(self):
        """Step 5: a request without X-Caracal-Resource is a 400."""
        request = self.call(token=self.mint(), resource=None)
        self.assertDenied(request, 400, "invalid_request", "denials_bad_routing")

    # step 6
    def test_unknownResource(self):
        """Step 6: an unknown resource is a 403, decided without fetching any key."""
        request = self.call(token=self.mint(), resource=b"unknown")
        self.assertDenied(request, 403, "access_denied", "denials_binding")
        self.assertNoSTS()
        self.assertEqual(self.jwks_fetches, 0)

    # step 7
    def test_pathTraversal(self):
        """Step 7: every spelling of a dot segment in the path is refused before any key fetch."""
        for path in (b"/a/../b", b"/a/%2e%2e/b", b"/a/%2E%2e", b"/./x", b"/a/..%5cb"):
            self.metrics = Metrics()
            self.pipeline.metrics = self.metrics
            request = self.call(token=self.mint(), path=path)
            self.assertDenied(request, 400, "invalid_request", "denials_path_traversal")
        self.assertNoSTS()
        self.assertEqual(self.jwks_fetches, 0)

    def test_hostilePaths(self):
        """
        SPEC 12 H1: a C{#}, a NUL byte raw or percent-encoded (at any
        depth), and a dot segment once decoded or once its C{;} parameters
        are dropped, in any position including the last, are 400
        C{invalid_request}, logged as C{path_traversal}.
        """
        for path in (
            b"/..#",
            b"/a#b",
            b"/a\x00b",
            b"/a%00b",
            b"/a%2500b",
            b"/..;x",
            b"/a/%2e%2e;",
            b"/a/%2E%2E%3Bjsessionid=1",
            b"/a/.;/b",
            b"/a/..",
            b"/a/.",
            b"/a/%2e",
        ):
            self.metrics = Metrics()
            self.pipeline.metrics = self.metrics
            request = self.call(token=self.mint(), path=path)
            self.assertDenied(request, 400, "invalid_request", "denials_path_traversal")
            self.assertEqual(request.log_fields["denial"], "path_traversal")
        self.assertNoSTS()
        self.assertEqual(self.jwks_fetches, 0)

    def test_dotsInNamesPass(self):
        """Names merely containing dots or encoded characters are forwarded."""
        for path in (b"/a.b", b"/.well-known/x", b"/v1.2/x", b"/...", b"/a%20b", b"/a;b=1"):
            self.forwarder.calls = []
            self.call(token=self.mint(), path=path)
            self.assertEqual(len(self.forwarder.calls), 1, path)

    # SPEC 12 H2
    def test_methodNotAllowed(self):
        """
        TRACE, CONNECT and any other method outside GET HEAD POST PUT PATCH
        DELETE OPTIONS get 405 C{method_not_allowed} with C{Allow}, before
        authentication (no token at all here).
        """
        for method in (b"TRACE", b"CONNECT", b"PROPFIND", b"get"):
            self.metrics = Metrics()
            self.pipeline.metrics = self.metrics
            request = PipelineRequest(method=method)
            self.resource.render(request)
            self.assertDenied(request, 405, "method_not_allowed")
            self.assertEqual(
                request.responseHeaders.getRawHeaders(b"allow"),
                [b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"],
            )
            self.assertEqual(request.log_fields["denial"], "method_not_allowed")
        self.assertNoSTS()

    # SPEC 12 H4-H6
    def test_mandateRefused(self):
        """
        A token minted for an upstream (C{act} claim, or C{use} of
        C{resource} / C{mandate}), even validly signed by the zone's key, is
        refused at step 3: no JWKS fetch, no STS exchange.
        """
        for claims in ({"act": {"sub": "gw"}}, {"use": "resource"}, {"use": "mandate"}):
            self.metrics = Metrics()
            self.pipeline.metrics = self.metrics
            request = self.call(token=self.mint(**claims))
            self.assertDenied(request, 401, "invalid_token", "denials_bad_bearer")
            self.assertEqual(request.log_fields["denial"], "mandate_as_bearer")
        self.assertNoSTS()
        self.assertEqual(self.jwks_fetches, 0)

    def test_numericSessionRefused(self):
        """
        A numeric C{sid} (which used to skip the revocation check) or any
        other mistyped key claim is 401 C{invalid_token} at step 3.
        """
        for claims in ({"sid": 42}, {"agent_session_id": ["s"]}, {"jti": 7}, {"zone_id": 1}):
            self.metrics = Metrics()
            self.pipeline.metrics = self.metrics
            request = self.call(token=self.mint(**claims))
            self.assertDenied(request, 401, "invalid_token", "denials_bad_bearer")
        self.assertNoSTS()

    def test_lifetimeBound(self):
        """
        C{exp} more than C{MAX_TOKEN_LIFETIME} ahead is 401
        C{invalid_token} at step 4 (after step 3, before routing).
        """
        self.pipeline.max_token_lifetime = 3600.0
        request = self.call(token=self.mint(ttl=3601), resource=b"unknown")
        self.assertDenied(request, 401, "invalid_token", "denials_bad_bearer")
        self.assertEqual(request.log_fields["denial"], "lifetime_exceeded")
        self.forwarder.calls = []
        self.call(token=self.mint(ttl=3600))
        self.assertEqual(len(self.forwarder.calls), 1)

    # SPEC 12 H7: screen, then render from the screened call
    def test_screenRefusesOnHeaders(self):
        """
        L{GatewayResource.screen} runs steps 2-7 synchronously on the headers
        and returns the first denial without answering or counting it.
        """
        request = PipelineRequest()
        denial = self.resource.screen(request)
        self.assertEqual((denial.status, denial.code), (401, "missing_token"))
        self.assertEqual(request.written, [])
        self.assertEqual(self.metrics.counters["requests_denied"], 0)

    def test_screensProvideTheInterface(self):
        """The pipeline and the site's root both offer the HTTP layer L{IRequestScreen}."""
        from zope.interface.verify import verifyObject

        from caracal.gateway.interfaces import IRequestScreen
        from caracal.gateway.proxy import GatewayRoot

        self.assertTrue(verifyObject(IRequestScreen, self.resource))
        self.assertTrue(verifyObject(IRequestScreen, GatewayRoot(self.resource, {})))

    def test_rootScreen(self):
        """
        The root screens a local path by its own methods (GET and HEAD pass
        without a token; anything else is 405 with C{Allow: GET, HEAD}) and
        every other path by the pipeline.
        """
        from caracal.gateway.endpoints import HealthResource
        from caracal.gateway.proxy import GatewayRoot

        root = GatewayRoot(self.resource, {b"/health": HealthResource()})
        self.assertIsNone(root.screen(PipelineRequest(path=b"/health", method=b"GET")))
        request = PipelineRequest(path=b"/health", method=b"TRACE")
        denial = root.screen(request)
        self.assertEqual((denial.status, denial.code), (405, "method_not_allowed"))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"allow"), [b"GET, HEAD"])
        denial = root.screen(PipelineRequest(path=b"/tools/run", method=b"GET"))
        self.assertEqual((denial.status, denial.code), (401, "missing_token"))

    def test_renderReusesScreen(self):
        """
        A screened request is not authenticated or routed again by render:
        steps 2-7 ran once, the chain goes on from step 8 with the screened
        call.
        """
        request = PipelineRequest()
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + self.mint().encode()])
        request.requestHeaders.setRawHeaders(b"x-caracal-resource", [b"tools"])
        self.assertIsNone(self.resource.screen(request))
        call = request.gateway_call
        # Were steps 2-7 run again, these would now refuse the request.
        request.requestHeaders.removeHeader(b"authorization")
        self.resources.remove("tools")
        self.resource.render(request)
        self.assertEqual(len(self.forwarder.calls), 1)
        self.assertEqual(self.sts.calls[0][0], call.token)

    # step 8
    def test_wrongKey(self):
        """Step 8: a token signed by a key the zone does not publish fails the signature check."""
        other = ec.generate_private_key(ec.SECP256R1())
        request = self.call(token=self.mint(key=other))
        self.assertDenied(request, 401, "invalid_token", "denials_signature")
        self.assertNoSTS()

    def test_missingKid(self):
        """Step 8: a token without C{kid} cannot be verified and is refused."""
        request = self.call(token=self.mint(kid=None))
        self.assertDenied(request, 401, "invalid_token")
        self.assertNoSTS()

    def test_jwksUnreachable(self):
        """Step 8: when the zone's keys cannot be fetched the answer is a 503 sts_unavailable."""
        self.jwks_down = True
        request = self.call(token=self.mint())
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(json.loads(request.body)["error"], "sts_unavailable")
        self.assertNoSTS()

    # step 9
    def test_replayRefusedAndAudited(self):
        """
        Step 9: a single-use token's second use is refused and audited, without the token in the
        event.
        """
        token = self.mint()
        first = self.call(token=token)
        self.assertEqual(first.responseCode, 200)
        second = self.call(token=token)
        self.assertEqual(second.responseCode, 401)
        self.assertEqual(json.loads(second.body)["error"], "invalid_token")
        self.assertEqual(self.metrics.counters["denials_jti_replay"], 1)
        self.assertEqual(len(self.sts.calls), 1)
        [event] = [e for e in self.audit.events if e["event_type"] == "replay_detected"]
        self.assertEqual(
            (event["event_type"], event["request_id"], event["decision"]),
            ("replay_detected", second.request_id, "deny"),
        )
        self.assertEqual(event["suppressed"], 0)
        self.assertNotIn(token, json.dumps(event))

    def test_replayEventsThrottled(self):
        """
        SPEC 12 H9: replays of one token leave one replay_detected event per
        second; the next one carries how many were left out, and the metric
        counts them.
        """
        token = self.mint()
        self.call(token=token)
        for _ in range(5):
            self.assertEqual(self.call(token=token).responseCode, 401)
        self.clock.advance(0.5)
        self.call(token=token)
        self.clock.advance(0.5)
        self.call(token=token)
        replays = [e for e in self.audit.events if e["event_type"] == "replay_detected"]
        self.assertEqual([m["suppressed"] for m in replays], [0, 5])
        self.assertEqual(self.metrics.counters["audit_events_suppressed"], 5)
        self.assertEqual(self.metrics.counters["denials_jti_replay"], 7)
        other = self.mint()
        self.call(token=other)
        self.call(token=other)
        replays = [e for e in self.audit.events if e["event_type"] == "replay_detected"]
        self.assertEqual(len(replays), 3, "another token has its own budget")

    def test_ambientTokensReusable(self):
        """Step 9: ambient tokens (no jti) may be used again."""
        token = self.mint(use="ambient", jti=None)
        self.assertEqual(self.call(token=token).responseCode, 200)
        self.assertEqual(self.call(token=token).responseCode, 200)

    def test_ambientSignatureRemembered(self):
        """Step 8 remembers an ambient token's signature; a per_call token's is never kept."""
        ambient = self.mint(use="ambient", jti=None)
        self.assertEqual(self.call(token=ambient).responseCode, 200)
        self.assertEqual(len(self.pipeline.signatures), 1)
        self.assertEqual(self.call(token=ambient).responseCode, 200)
        self.assertEqual(self.call(token=self.mint()).responseCode, 200)
        self.assertEqual(len(self.pipeline.signatures), 1)

    def test_replayRefusedWithSignatureCache(self):
        """A per_call token sent again is refused even after ambient tokens filled the cache."""
        self.assertEqual(self.call(token=self.mint(use="ambient", jti=None)).responseCode, 200)
        token = self.mint()
        self.assertEqual(self.call(token=token).responseCode, 200)
        second = self.call(token=token)
        self.assertEqual(second.responseCode, 401)
        self.assertEqual(self.metrics.counters["denials_jti_replay"], 1)

    def test_revokedSessionRefusedDespiteRememberedSignature(self):
        """An ambient token whose signature is remembered is refused once its session is revoked."""
        token = self.mint(use="ambient", jti=None, sid="s-1")
        self.assertEqual(self.call(token=token).responseCode, 200)
        self.assertEqual(len(self.pipeline.signatures), 1)
        self.revocations.revoke(ZONE, "s-1")
        request = self.call(token=token)
        self.assertEqual(request.responseCode, 401)
        self.assertEqual(json.loads(request.body)["error"], "session_revoked")
        self.assertEqual(self.metrics.counters["denials_revoked"], 1)

    def test_singleUseWithoutJti(self):
        """Step 9: a single-use token without C{jti} is an invalid token."""
        request = self.call(token=self.mint(jti=None))
        self.assertDenied(request, 401, "invalid_token")
        self.assertNoSTS()

    def test_unusableJtiRefused(self):
        """A jti Redis keys cannot hold unambiguously is an invalid token, not a 500."""
        for jti in ("x" * 257, "a\nb"):
            self.metrics = self.pipeline.metrics = Metrics()
            request = self.call(token=self.mint(jti=jti))
            self.assertDenied(request, 401, "invalid_token", "denials_bad_bearer")
        self.assertNoSTS()

    def test_replayGuardUnavailableFailsClosed(self):
        """Step 9: without the replay guard the answer is a 503, before the STS is asked."""
        self.pipeline.replay.unavailable = True
        request = self.call(token=self.mint())
        self.assertDenied(request, 503, "replay_check_unavailable")
        self.assertNoSTS()

    def test_replayGuardUnavailableFailOpen(self):
        """Step 9: with JTI_FAIL_OPEN an unavailable replay guard is skipped and the skip logged."""
        self.pipeline.replay.unavailable = True
        self.pipeline.jti_fail_open = True
        request = self.call(token=self.mint())
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(request.log_fields["replay_check"], "skipped")

    # step 10
    def test_revokedSession(self):
        """Step 10: a revoked C{sid} is refused as session_revoked before the STS is asked."""
        self.revocations.revoke(ZONE, "s-1")
        request = self.call(token=self.mint(sid="s-1"))
        self.assertDenied(request, 401, "session_revoked", "denials_revoked")
        self.assertNoSTS()

    def test_revokedAgentSessionId(self):
        """Step 10: C{agent_session_id} names the session when C{sid} is absent."""
        self.revocations.revoke(ZONE, "s-2")
        request = self.call(token=self.mint(agent_session_id="s-2"))
        self.assertDenied(request, 401, "session_revoked")

    def test_revocationIsPerZone(self):
        """Step 10: a session revoked in another zone is not revoked here."""
        self.revocations.revoke("other-zone", "s-1")
        self.assertEqual(self.call(token=self.mint(sid="s-1")).responseCode, 200)

    def forgetCalls(self):
        """Forget what earlier calls did and counted, before checking a refused one."""
        self.metrics = self.pipeline.metrics = Metrics()
        self.sts.calls[:] = []
        self.guard.calls[:] = []
        self.forwarder.calls[:] = []

    def assertRevocationStateUnavailable(self, request):
        """A 503 at step 10: neither the STS nor the upstream was contacted."""
        self.assertDenied(request, 503, "revocation_state_unavailable")
        self.assertNoSTS()
        self.assertEqual(self.forwarder.calls, [])
        self.assertEqual(request.log_fields["denial"], "revocation_state_unavailable")

    def test_revocationWindowNotLoadedFailsClosed(self):
        """
        SPEC 12: while the follower has not loaded the window, a call whose
        token names a session (sid, else agent_session_id) gets 503.
        """
        self.revocations.expect_follower()
        for claims in ({"sid": "s-1"}, {"agent_session_id": "s-2"}):
            self.forgetCalls()
            request = self.call(token=self.mint(**claims))
            self.assertRevocationStateUnavailable(request)
            self.assertEqual(
                request.log_fields["revocation_state"], "revocation window not loaded yet"
            )

    def test_revocationContactLostFailsClosed(self):
        """
        Current, then more than 5 s without contact: 503; contact back: the
        same kind of call is forwarded again.
        """
        self.revocations.expect_follower()
        self.revocations.synced()
        self.assertEqual(self.call(token=self.mint(sid="s-1")).responseCode, 200)
        self.clock.advance(5.5)
        self.forgetCalls()
        self.assertRevocationStateUnavailable(self.call(token=self.mint(sid="s-1")))
        self.revocations.synced()
        self.assertEqual(self.call(token=self.mint(sid="s-1")).responseCode, 200)

    def test_sessionlessTokenPassesWithoutRevocationState(self):
        """A token naming no session has nothing to look up: it passes step 10."""
        self.revocations.expect_follower()
        request = self.call(token=self.mint())
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(len(self.forwarder.calls), 1)
        self.assertNotIn("revocation_state", request.log_fields)

    def test_revocationFailOpen(self):
        """
        REVOCATION_FAIL_OPEN=true lets a session-bearing call through with a
        warning (and a log field) while the state is not current; a
        revocation already loaded is still enforced.
        """
        from twisted.logger import LogLevel, globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.pipeline.revocation_fail_open = True
        self.revocations.expect_follower()
        request = self.call(token=self.mint(sid="s-1"))
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(request.log_fields["revocation_state"], "revocation window not loaded yet")
        warnings = [
            e
            for e in events
            if e.get("log_level") == LogLevel.warn and "REVOCATION_FAIL_OPEN" in e["log_format"]
        ]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["request_id"], request.request_id)
        self.revocations.revoke(ZONE, "s-2")
        self.forgetCalls()
        self.assertDenied(self.call(token=self.mint(sid="s-2")), 401, "session_revoked")

    # step 11
    def test_stsErrorPassedThrough(self):
        """Step 11: the STS's refusal is the answer, and the upstream is not checked."""
        self.sts.denial = Denial(403, "access_denied", "no grant", metric="sts_exchange_errors")
        request = self.call(token=self.mint())
        self.assertDenied(request, 403, "access_denied", "sts_exchange_errors")
        self.assertEqual(self.guard.calls, [])

    def test_stsExchangeArguments(self):
        """
        Step 11: the exchange names the caller's token, the resource's zone, application and
        identifier, and the request id.
        """
        token = self.mint()
        request = self.call(token=token)
        self.assertEqual(self.sts.calls, [(token, ZONE, "app-1", "tools", request.request_id)])

    # step 12
    def test_upstreamRefused(self):
        """Step 12: an upstream the SSRF rules refuse is a 403, and nothing is forwarded."""
        self.guard.refusal = UpstreamRefused("private_address", "resolves to a private address")
        request = self.call(token=self.mint())
        self.assertDenied(request, 403, "access_denied")
        self.assertEqual(self.guard.calls, ["https://tools.example/api"])

    # step 13
    def test_forwardedWithMandate(self):
        """
        Step 13: the request goes upstream with the mandate as credential, never the caller's token.
        """
        token = self.mint(sid="s-9")
        request = self.call(token=token)
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(request.body, b"upstream says hi")
        [(pinned, credentials, expires_in, watch)] = self.forwarder.calls
        self.assertEqual(credentials, [(b"Authorization", b"Bearer mandate-token")])
        self.assertNotIn(token.encode(), repr(credentials).encode())
        self.assertEqual(expires_in, 300)
        self.assertIsNotNone(watch)
        self.assertEqual(self.metrics.counters["requests_allowed"], 1)
        self.assertEqual(self.metrics.counters["requests_denied"], 0)
        self.assertEqual(request.log_fields["zone"], ZONE)
        self.assertEqual(request.log_fields["upstream_host"], "tools.example")

    def test_defaultUpstreamTimeout(self):
        """A resource without upstream_timeout_ms leaves the forwarder's default."""
        self.call(token=self.mint())
        self.assertEqual(self.forwarder.timeouts, [None])

    def test_resourceUpstreamTimeout(self):
        """A resource's upstream_timeout_ms replaces UPSTREAM_TIMEOUT for its calls."""
        self.resources.put(
            ToolResource(
                resource_identifier="tools",
                zone_id=ZONE,
                application_id="app-1",
                upstream_url="https://tools.example/api",
                upstream_timeout_ms=300000,
            )
        )
        self.call(token=self.mint())
        self.assertEqual(self.forwarder.timeouts, [300.0])

    def test_expiresInCountsTheExchange(self):
        """X-Caracal-Token-Expires-In is what is left after the STS answered."""
        self.sts.pending = []
        self.call(token=self.mint(ttl=300))
        self.clock.advance(3)
        self.sts.pending[0].callback(Mandate())
        [(_, _, expires_in, _)] = self.forwarder.calls
        self.assertEqual(expires_in, 297)

    def test_forwardFailure(self):
        """Step 13: the forwarder's refusal (an upstream timeout) is answered and counted."""
        self.forwarder.denial = Denial(504, "upstream_timeout", "slow", metric="upstream_errors")
        request = self.call(token=self.mint())
        self.assertEqual(request.responseCode, 504)
        self.assertEqual(json.loads(request.body)["error"], "upstream_timeout")
        self.assertEqual(self.metrics.counters["upstream_errors"], 1)

    def test_noTokenInBodiesOrLogFields(self):
        """The caller's token appears in no answer and no log field; its fingerprint does."""
        token = self.mint()
        for request in (self.call(token=token), self.call(token=token)):
            self.assertNotIn(token.encode(), request.body)
            self.assertNotIn(token, json.dumps(request.log_fields))
            self.assertEqual(len(request.log_fields["token_fingerprint"]), 12)

    def test_localPathsNeverProxied(self):
        """POST /health is a 405 from the gateway, not a proxied call."""
        from caracal.gateway.endpoints import HealthResource
        from caracal.gateway.proxy import GatewayRoot

        root = GatewayRoot(self.resource, {b"/health": HealthResource()})
        request = PipelineRequest(path=b"/health", method=b"POST")
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + self.mint().encode()])
        request.requestHeaders.setRawHeaders(b"x-caracal-resource", [b"tools"])
        request.write(root.render(request))
        self.assertEqual(request.responseCode, 405)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"allow"), [b"GET, HEAD"])
        self.assertEqual(json.loads(request.body)["error"], "method_not_allowed")
        self.assertEqual(request.log_fields["denial"], "method_not_allowed")
        self.assertEqual((self.sts.calls, self.forwarder.calls), ([], []))

    # A client that leaves cancels the chain, whatever it is waiting on.
    def leave(self, request):
        """The client's connection is lost, as C{Request.connectionLost} reports it."""
        request.processingFailed(Failure(ConnectionLost("client left")))

    def assertAbandoned(self, request):
        """Nothing was answered, refused or forwarded."""
        self.assertEqual(request.written, [])
        self.assertEqual(self.metrics.counters["requests_denied"], 0)
        self.assertEqual(self.forwarder.calls, [])

    def test_clientGoneDuringJWKSFetch(self):
        """The JWKS fetch in flight is cancelled; the STS is never asked for a mandate."""
        fetches = []

        def fetch(zone_id):
            d = defer.Deferred(lambda _: fetches.append("cancelled"))
            fetches.append(d)
            return d

        self.pipeline.jwks = JWKSCache(fetch, self.clock)
        request = self.call(token=self.mint())
        self.leave(request)
        self.assertEqual(fetches[1:], ["cancelled"])
        self.assertEqual(self.sts.calls, [])
        self.assertAbandoned(request)

    def test_clientGoneDuringReplayClaim(self):
        """The Redis claim in flight is cancelled, even with JTI_FAIL_OPEN."""
        self.pipeline.jti_fail_open = True
        self.pipeline.replay.pending = []
        request = self.call(token=self.mint())
        self.leave(request)
        self.assertEqual(self.pipeline.replay.cancelled, 1)
        self.assertEqual(self.sts.calls, [])
        self.assertNotIn("replay_check", request.log_fields)
        self.assertAbandoned(request)

    def test_clientGoneDuringExchange(self):
        """The STS exchange in flight is cancelled; the upstream is not checked."""
        self.sts.pending = []
        request = self.call(token=self.mint())
        self.leave(request)
        self.assertEqual(self.sts.cancelled, 1)
        self.assertEqual(self.guard.calls, [])
        self.assertAbandoned(request)

    def test_clientGoneDuringResolution(self):
        """The upstream's DNS lookup in flight is cancelled, not turned into a refusal."""
        resolver = MemoryResolver()
        resolver.pending = []
        self.pipeline.guard = UpstreamGuard(resolver, clock=self.clock, timeout=5.0)
        request = self.call(token=self.mint())
        self.leave(request)
        [(_receiver, resolution)] = resolver.pending
        self.assertTrue(resolution.cancelled)
        self.assertNotIn("upstream_refused", request.log_fields)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertAbandoned(request)

    def test_clientGoneDuringForward(self):
        """The forward in flight is cancelled (the forwarder drops the upstream request)."""
        self.forwarder.pending = []
        request = self.call(token=self.mint())
        self.leave(request)
        self.assertEqual(self.forwarder.cancelled, 1)
        self.assertEqual(request.written, [])
        self.assertEqual(self.metrics.counters["requests_denied"], 0)

    def test_bugInAStepIsAnInternalError(self):
        """
        A step that raises something other than a Denial, at once or through
        its Deferred, is answered 500 internal_error and logged; no later
        step runs.
        """
        for answer in (
            lambda *a, **k: 1 / 0,
            lambda *a, **k: defer.fail(ZeroDivisionError()),
        ):
            self.sts.exchange = answer
            request = self.call(token=self.mint())
            self.assertEqual(request.responseCode, 500)
            self.assertEqual(json.loads(request.body)["error"], "internal_error")
            self.assertEqual(request.log_fields["denial"], "internal_error")
            self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.guard.calls, [])
        self.assertEqual(self.forwarder.calls, [])

    def test_finishedRequestNotCancelled(self):
        """A request answered normally is not cancelled afterwards."""
        request = self.call(token=self.mint())
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(self.sts.cancelled + self.forwarder.cancelled, 0)
