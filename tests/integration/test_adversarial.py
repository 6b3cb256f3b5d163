# -*- test-case-name: tests.integration.test_adversarial -*-
"""
The adversarial corpus of SPEC section 12: each row sent, as an attacker
would, to a real gateway process over TLS (raw bytes where a client library
would clean the input up), running under the connect guard. Every refusal
must carry its status and code, reach neither the STS nor the upstream, and
leave an access-log line naming its denial (see L{tests.support.adversary}).

The first two tests are the verified high-severity bypasses of issue 8; both
passed through the gateway before the fix (the upstream received C{GET
/api/..} without its pinned query, and the STS exchanged a mandate for the
provider credentials of another resource).
"""

from __future__ import annotations

import json

import treq
from twisted.internet import defer

from caracal.gateway.proxy import PROXIED_METHODS
from tests.support.adversary import (
    PINNED_RESOURCE,
    PROVIDER_RESOURCE,
    RESOURCE,
    AdversarialTestCase,
    raw_request,
)
from tests.support.waiting import wait_until

ALLOW_PROXIED = b", ".join(PROXIED_METHODS)


def bearer(token: str) -> tuple[bytes, bytes]:
    return (b"Authorization", b"Bearer " + token.encode("ascii"))


def resource(identifier: str) -> tuple[bytes, bytes]:
    return (b"X-Caracal-Resource", identifier.encode("ascii"))


class HighSeverityTests(AdversarialTestCase):
    """The two bypasses the adversarial review verified on the first release."""

    @defer.inlineCallbacks
    def test_fragment_escapes_base_path(self):
        """
        C{GET /..#} and C{GET /%2e%2e#} with a valid token for a resource
        whose upstream is C{/api?tenant=acme&readonly=1} are refused with 400
        C{invalid_request}: the upstream never gets C{GET /api/..} without
        its pinned query, and the STS is not asked for a mandate.
        """
        for target in (b"/..#", b"/%2e%2e#"):
            token = self.bench.mint()
            response = yield self.bench.send(
                raw_request(
                    b"GET",
                    target,
                    [bearer(token), resource(PINNED_RESOURCE), (b"Connection", b"close")],
                )
            )
            self.assertRefused(response, 400, "invalid_request")
            yield self.assertDenialLogged(response, "malformed_request")
        self.assertUntouched()

    @defer.inlineCallbacks
    def test_mandate_as_caller_token(self):
        """
        A mandate the gateway handed to one tool server (it carries C{act},
        a fresh C{jti} and no C{use}) presented back as a caller bearer for
        another resource of the same zone is refused with 401
        C{invalid_token}: the STS exchanges nothing and the provider
        upstream receives nothing.
        """
        status, seen = yield self.bench.call(self.bench.gateway, self.bench.mint())
        self.assertEqual(status, 200)
        headers = dict(seen["headers"])
        scheme, mandate = headers["authorization"].split(" ", 1)
        self.assertEqual(scheme, "Bearer")
        self.sts_before = self.bench.sts_seen()
        self.upstream_before = self.bench.upstream_seen()

        response = yield self.bench.send(
            raw_request(
                b"POST",
                b"/tools/run",
                [
                    bearer(mandate),
                    resource(PROVIDER_RESOURCE),
                    (b"Content-Length", b"2"),
                    (b"Connection", b"close"),
                ],
                b"{}",
            )
        )
        self.assertRefused(response, 401, "invalid_token")
        yield self.assertDenialLogged(response, "mandate_as_bearer")
        self.assertUntouched()


class PinnedQueryTests(AdversarialTestCase):
    """The upstream URL's own query reaches the upstream whatever the caller sends (H10)."""

    @defer.inlineCallbacks
    def test_colliding_parameters_dropped(self):
        """
        C{?TENANT=evil&readonly[]=0&tenant[]=x&page=2} through a resource
        pinned to C{tenant=acme&readonly=1} reaches the upstream as
        C{tenant=acme&readonly=1&page=2}: every name equal to a pinned one
        ignoring case or a trailing C{[]} is dropped.
        """
        response = yield treq.request(
            "GET",
            self.bench.url(
                self.bench.gateway, "/tools/run?TENANT=evil&readonly%5B%5D=0&tenant[]=x&page=2"
            ),
            headers={
                b"Authorization": [b"Bearer " + self.bench.mint().encode()],
                b"X-Caracal-Resource": [PINNED_RESOURCE.encode()],
            },
            agent=self.bench.agent,
        )
        body = yield response.content()
        self.assertEqual(response.code, 200, body)
        seen = json.loads(body)
        self.assertEqual(seen["path"], "/api/tools/run")
        self.assertEqual(seen["query"], "tenant=acme&readonly=1&page=2")


class TargetTests(AdversarialTestCase):
    """H1: hostile request targets, with a valid token for a real resource."""

    @defer.inlineCallbacks
    def test_dot_segments_and_nul(self):
        """
        Dot segments once percent-decoded or once a C{;} parameter is cut
        (in any position, the last included) and C{%00} are 400
        C{invalid_request} at step 7, logged as C{path_traversal}.
        """
        for target in (
            b"/tools/..;x/admin",
            b"/tools/%2e%2e;/admin",
            b"/tools/%2E%2E%3Bx",
            b"/tools/.%2e",
            b"/tools/..",
            b"/tools/%2e",
            b"/tools/a%00b",
            b"/tools/a%2500b?x=1",
        ):
            response = yield self.bench.send(
                raw_request(b"GET", target, [bearer(self.bench.mint()), resource(PINNED_RESOURCE)])
            )
            self.assertRefused(response, 400, "invalid_request")
            self.assertClosedByGateway(response)
            yield self.assertDenialLogged(response, "path_traversal")
        self.assertUntouched()

    @defer.inlineCallbacks
    def test_raw_nul_and_fragment(self):
        """
        A raw NUL byte or C{#} in the target is refused with 400
        C{invalid_request} before anything reads the request (a NUL even
        before the headers: its access line has no method or path).
        """
        response = yield self.bench.send(
            raw_request(b"GET", b"/tools/a#b", [bearer(self.bench.mint()), resource(RESOURCE)])
        )
        self.assertRefused(response, 400, "invalid_request")
        yield self.assertDenialLogged(response, "malformed_request")
        before = len(self.bench.access_lines())
        payload, request_id = raw_request(
            b"GET", b"/tools/a\x00b", [bearer(self.bench.mint()), resource(RESOURCE)]
        )
        response = yield self.bench.send((payload, request_id))
        self.assertEqual(response.status, 400)
        self.assertEqual(response.json()["error"], "invalid_request")
        self.assertTrue(response.closed)
        yield wait_until(lambda: len(self.bench.access_lines()) > before, 5.0)
        record = self.bench.access_lines()[-1]
        self.assertEqual((record["status"], record["denial"]), (400, "malformed_request"))
        self.assertUntouched()


class MethodTests(AdversarialTestCase):
    """H2: methods the gateway never forwards."""

    @defer.inlineCallbacks
    def test_trace_connect_and_unknown(self):
        """
        TRACE, CONNECT (authority form too) and an unknown method get 405
        C{method_not_allowed} with C{Allow}, before authentication (no token
        sent), and the connection closes; POST to a local path keeps its
        own C{Allow: GET, HEAD}.
        """
        for method, target in (
            (b"TRACE", b"/tools/run"),
            (b"CONNECT", b"169.254.169.254:443"),
            (b"CONNECT", b"/tools/run"),
            (b"PROPFIND", b"/tools/run"),
            (b"TRACE", b"/health"),
        ):
            response = yield self.bench.send(raw_request(method, target, [resource(RESOURCE)]))
            self.assertRefused(response, 405, "method_not_allowed")
            allow = b"GET, HEAD" if target == b"/health" else ALLOW_PROXIED
            self.assertEqual(response.header(b"allow"), allow)
            self.assertClosedByGateway(response)
            yield self.assertDenialLogged(response, "method_not_allowed")
        response = yield self.bench.send(
            raw_request(b"POST", b"/ready", [(b"Content-Length", b"0")])
        )
        self.assertRefused(response, 405, "method_not_allowed")
        self.assertEqual(response.header(b"allow"), b"GET, HEAD")
        self.assertUntouched()


class FramingTests(AdversarialTestCase):
    """H3: transfer codings other than exactly one C{chunked}."""

    @defer.inlineCallbacks
    def test_transfer_encoding_not_one_chunked(self):
        """
        C{Transfer-Encoding: identity}, a list, or two headers (either
        order) with a valid token: 400 C{invalid_request}, connection
        closed, nothing forwarded.
        """
        for codings in (
            [(b"Transfer-Encoding", b"identity")],
            [(b"Transfer-Encoding", b"chunked, identity")],
            [(b"Transfer-Encoding", b"identity"), (b"Transfer-Encoding", b"chunked")],
            [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"identity")],
        ):
            response = yield self.bench.send(
                raw_request(
                    b"POST",
                    b"/tools/run",
                    [bearer(self.bench.mint()), resource(RESOURCE), *codings],
                    b"3\r\nabc\r\n0\r\n\r\n",
                )
            )
            self.assertRefused(response, 400, "invalid_request")
            self.assertClosedByGateway(response)
            yield self.assertDenialLogged(response, "malformed_request")
        self.assertUntouched()


class ClaimTests(AdversarialTestCase):
    """H4-H6: validly signed tokens that must still not be accepted."""

    gateway_env = {"MAX_TOKEN_LIFETIME": "1h"}

    @defer.inlineCallbacks
    def refused_token(self, token: str, denial: str):
        response = yield self.bench.send(
            raw_request(b"GET", b"/tools/run", [bearer(token), resource(RESOURCE)])
        )
        self.assertRefused(response, 401, "invalid_token")
        self.assertTrue(response.header(b"www-authenticate").startswith(b"Bearer"))
        self.assertClosedByGateway(response)
        yield self.assertDenialLogged(response, denial)

    @defer.inlineCallbacks
    def test_mandate_uses(self):
        """H4: C{use} of C{resource} or C{mandate}, or an C{act} claim: 401 at step 3."""
        zone = self.bench.zone
        for options in (
            {"use": "resource"},
            {"use": "mandate"},
            {"extra_claims": {"act": {"sub": "someone"}}},
        ):
            token = self.bench.sts.mint(zone, "agent-x", **options)
            yield self.refused_token(token, "mandate_as_bearer")
        self.assertUntouched()

    @defer.inlineCallbacks
    def test_mistyped_claims(self):
        """
        H5: a numeric C{sid} (which skipped the revocation check), a numeric
        C{jti}, an empty C{agent_session_id}, a list C{use}, an over-long
        C{zone_id}: 401 C{invalid_token} at step 3.
        """
        zone = self.bench.zone
        for claims in (
            {"sid": 42},
            {"jti": 1234},
            {"agent_session_id": ""},
            {"use": ["per_call"]},
            {"zone_id": "z" * 257},
        ):
            token = self.bench.sts.mint(zone, "agent-x", extra_claims=claims)
            yield self.refused_token(token, "invalid_claim")
        self.assertUntouched()

    @defer.inlineCallbacks
    def test_lifetime_over_max(self):
        """
        H6: with C{MAX_TOKEN_LIFETIME=1h}, a token valid for two hours is
        401 C{invalid_token} at step 4; one valid for the hour passes.
        """
        yield self.refused_token(self.bench.mint(ttl=7200), "lifetime_exceeded")
        self.assertUntouched()
        status, _ = yield self.bench.call(self.bench.gateway, self.bench.mint(ttl=3590))
        self.assertEqual(status, 200)


class PreAuthTests(AdversarialTestCase):
    """H7: refused on the headers, before any of the body is read."""

    @defer.inlineCallbacks
    def test_large_body_without_token(self):
        """
        Headers announcing a 10 MB body (under MAX_REQUEST_BYTES) and no
        token: 401 C{missing_token} at once, without a body byte sent,
        C{Connection: close}, the connection closed, and the gateway holds
        no spool file (its open descriptors under its C{TMPDIR}) while it
        answers.
        """
        spooled = []
        response = yield self.bench.send(
            raw_request(
                b"POST",
                b"/tools/run",
                [resource(RESOURCE), (b"Content-Length", b"10000000")],
            ),
            on_answer=lambda pid: spooled.extend(self.bench.spooled_files()),
        )
        self.assertRefused(response, 401, "missing_token")
        self.assertClosedByGateway(response)
        self.assertEqual(spooled, [])
        self.assertEqual(self.bench.spooled_files(), [])
        yield self.assertDenialLogged(response, "missing_token")
        self.assertUntouched()

    @defer.inlineCallbacks
    def test_spool_observed_for_accepted_request(self):
        """
        The descriptor check can see a spool: a request that passes the
        header checks and announces a large body gets its body spooled to
        a file under the gateway's C{TMPDIR} while it is being received.
        """
        payload, _ = raw_request(
            b"POST",
            b"/tools/run",
            [
                bearer(self.bench.mint()),
                resource(RESOURCE),
                (b"Content-Length", b"1000000"),
            ],
            b"x" * 200_000,
        )
        client = yield self.bench.connect(payload)
        yield wait_until(lambda: self.bench.spooled_files() != [], 5.0)
        client.transport.abortConnection()
        yield client.closed


class ConnectionCapTests(AdversarialTestCase):
    """H8: MAX_CONNECTIONS open client connections per process."""

    gateway_env = {"MAX_CONNECTIONS": "4"}

    @defer.inlineCallbacks
    def held(self):
        """A keep-alive connection that has been served one C{GET /health}."""
        payload, _ = raw_request(b"GET", b"/health")
        client = yield self.bench.connect(payload)
        yield client.answered.addTimeout(5, self.bench.reactor)
        return client if client.received.startswith(b"HTTP/1.1 200") else None

    @defer.inlineCallbacks
    def test_connection_over_cap_closed(self):
        """
        With four connections open, a fifth is closed at once (no answer)
        and counted in C{connections_refused}; the four still serve.
        """
        yield self.bench.pool.closeCachedConnections()
        holding: list = []

        @defer.inlineCallbacks
        def fill():
            # The pool's own connection may take a moment to close on the
            # gateway's side: a refused attempt is retried until it did.
            client = yield self.held()
            if client is not None:
                holding.append(client)
            return len(holding) == 4

        yield wait_until(fill, 10.0)
        response = yield self.bench.send(raw_request(b"GET", b"/health"))
        self.assertEqual(response.received, b"")
        self.assertTrue(response.closed)
        for client in holding:
            client.answered = defer.Deferred()
            client.received = b""
            client.transport.write(raw_request(b"GET", b"/health")[0])
            yield client.answered.addTimeout(5, self.bench.reactor)
            self.assertTrue(client.received.startswith(b"HTTP/1.1 200"), client.received)
        for client in holding:
            client.transport.abortConnection()
            yield client.closed
        metrics = yield self.bench.metrics()
        self.assertGreaterEqual(metrics["connections_refused"], 1)
        self.assertUntouched()
