# -*- test-case-name: tests.test_sts -*-
"""
Unit tests of L{caracal.gateway.sts}: the STS client over an in-memory HTTP
connection (treq's L{RequestTraversalAgent}), time driven by a L{Clock}.
"""

from __future__ import annotations

import gzip
import json
from urllib.parse import parse_qs, urlencode

from hyperlink import EncodedURL
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from caracal.gateway.denials import Denial
from caracal.gateway.pools import PooledAgent
from caracal.gateway.sts import (
    MAX_EXCHANGE_BYTES,
    MAX_JWKS_BYTES,
    Mandate,
    PreparedURL,
    STSClient,
    STSUnavailable,
)

BASE = "http://sts.test:8080"
SUBJECT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJlLXN1YmplY3Q"
MANDATE = {
    "access_token": "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJtYW5kYXRlIn0.bWFuZGF0ZS1zaWc",
    "token_type": "Bearer",
    "expires_in": 120,
    "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
    "provider_token": "devprov-0123456789abcdef",
}


class STSDouble(Resource):
    """
    Answers every request with C{status} and C{body}; records requests.
    With C{hang}, answers nothing (the test writes with C{request.write}).
    """

    isLeaf = True

    def __init__(
        self, status=200, body=b"", hang=False, content_type=b"application/json", headers=None
    ):
        super().__init__()
        self.headers = headers or {}
        self.status = status
        self.body = json.dumps(body).encode() if isinstance(body, dict) else body
        self.hang = hang
        self.content_type = content_type
        self.requests = []
        self.bodies = []
        self.lost = []

    def render(self, request):
        self.requests.append(request)
        self.bodies.append(request.content.read())
        request.notifyFinish().addErrback(self.lost.append)
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", self.content_type)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        if self.hang:
            return NOT_DONE_YET
        return self.body


def client_for(resource, timeout=5.0):
    clock = Clock()
    agent = RequestTraversalAgent(resource)
    return STSClient(BASE, clock, timeout=timeout, agent=agent), clock, agent


def exchange(client, subject=SUBJECT, request_id="req-1"):
    return client.exchange(subject, "zone-a", "app-1", "res://tools/search", request_id)


@implementer(IAgent)
class ScriptedAgent:
    """An IAgent whose request() answers from a list of callables (one per call)."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = 0

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.calls += 1
        return self.answers.pop(0)(method, uri, headers, bodyProducer)


class ExchangeRequestTests(SynchronousTestCase):
    """What the client sends."""

    def test_form_fields_and_headers(self):
        """The exchange is a form POST to /oauth/2/token with exactly SPEC's fields."""
        sts = STSDouble(body=MANDATE)
        client, _, _ = client_for(sts)
        self.successResultOf(exchange(client, request_id="req-42"))
        [request] = sts.requests
        self.assertEqual(request.method, b"POST")
        self.assertEqual(request.path, b"/oauth/2/token")
        self.assertEqual(
            parse_qs(sts.bodies[0].decode(), strict_parsing=True),
            {
                "grant_type": ["urn:ietf:params:oauth:grant-type:token-exchange"],
                "subject_token": [SUBJECT],
                "subject_token_type": ["urn:ietf:params:oauth:token-type:access_token"],
                "zone_id": ["zone-a"],
                "application_id": ["app-1"],
                "resource": ["res://tools/search"],
            },
        )
        headers = request.requestHeaders
        self.assertEqual(headers.getRawHeaders(b"accept"), [b"application/json"])
        self.assertEqual(
            headers.getRawHeaders(b"content-type"), [b"application/x-www-form-urlencoded"]
        )
        self.assertEqual(headers.getRawHeaders(b"x-request-id"), [b"req-42"])

    def test_form_values_are_encoded(self):
        """Values with form metacharacters arrive intact (no field injection)."""
        sts = STSDouble(body=MANDATE)
        client, _, _ = client_for(sts)
        self.successResultOf(client.exchange(SUBJECT, "z&zone_id=evil", "a b", "r=1", "req"))
        fields = parse_qs(sts.bodies[0].decode())
        self.assertEqual(fields["zone_id"], ["z&zone_id=evil"])
        self.assertEqual(fields["application_id"], ["a b"])
        self.assertEqual(fields["resource"], ["r=1"])

    def test_trailing_slash_in_base_url(self):
        """A trailing slash on STS_URL does not double the path's slash."""
        sts = STSDouble(body=MANDATE)
        client = STSClient(BASE + "/", Clock(), agent=RequestTraversalAgent(sts))
        self.successResultOf(exchange(client))
        self.assertEqual(sts.requests[0].uri, b"/oauth/2/token")

    def test_token_url_prepared_once(self):
        """
        The token endpoint's URL is turned into URI form once, when the client
        is made (treq would redo it, IDNA included, on every call); the
        Agent still receives exactly the URI treq would have built.
        """
        seen = []

        def answer(method, uri, headers, body):
            seen.append(uri)
            return Deferred()

        base = "http://st\u015b.example:8443/base path"
        client = STSClient(base, Clock(), agent=ScriptedAgent(answer))
        self.assertIs(client.token_url.to_uri(), client.token_url)
        exchange(client)
        expected = EncodedURL.from_text(base + "/oauth/2/token").to_uri().to_text()
        self.assertEqual(seen, [expected.encode("ascii")])
        self.assertEqual(expected, "http://xn--st-3sa.example:8443/base%20path/oauth/2/token")

    def test_form_is_what_urlencode_writes(self):
        """
        The form built from per-resource parts is byte for byte what
        C{urlencode} writes for the SPEC's fields, for a JWT (sent unquoted)
        and for a subject token that needs quoting, across resources.
        """
        sts = STSDouble(body=MANDATE)
        client, _, _ = client_for(sts)
        cases = [
            (SUBJECT, "zone-a", "app-1", "res://tools/search"),
            ("a b+c&d=e\u00e9", "zone-a", "app-1", "res://tools/search"),
            (SUBJECT, "z&zone_id=evil", "a b", "r=1"),
            (SUBJECT, "zone-a", "app-1", "res://tools/search"),
        ]
        for subject, zone, application, resource in cases:
            self.successResultOf(client.exchange(subject, zone, application, resource, "req"))
        expected = [
            urlencode(
                [
                    ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
                    ("subject_token", subject),
                    ("subject_token_type", "urn:ietf:params:oauth:token-type:access_token"),
                    ("zone_id", zone),
                    ("application_id", application),
                    ("resource", resource),
                ]
            ).encode("ascii")
            for subject, zone, application, resource in cases
        ]
        self.assertEqual(sts.bodies, expected)

    def test_host_header_as_the_agent_writes_it(self):
        """
        The exchange carries the Host header the Agent would add: the
        token URL's host, with the port only when it is not the default.
        """
        for base, host in [
            ("http://sts.test:8080", b"sts.test:8080"),
            ("http://sts.test", b"sts.test"),
            ("https://sts.test:443", b"sts.test"),
        ]:
            seen = []

            def answer(method, uri, headers, body, seen=seen):
                seen.append(headers)
                return Deferred()

            client = STSClient(base, Clock(), agent=ScriptedAgent(answer))
            exchange(client)
            self.assertEqual(seen[0].getRawHeaders(b"host"), [host], base)

    def test_sts_cookies_never_sent_back(self):
        """
        A cookie the STS sets (for any domain, the STS's own included) is
        kept nowhere: the next exchange, another caller's, carries no Cookie.
        """
        sts = STSDouble(body=MANDATE, headers={b"set-cookie": b"session=abc; Path=/"})
        client, _, _ = client_for(sts)
        self.successResultOf(exchange(client))
        self.successResultOf(exchange(client))
        self.assertEqual([r.getHeader(b"cookie") for r in sts.requests], [None, None])
        self.assertEqual(len(client._no_cookies), 0)

    def test_endpoint_made_once_per_origin(self):
        """
        The client's agent makes one endpoint per origin (a host name
        endpoint, as the stock Agent's) and reuses it for every request
        (the stock Agent makes one per request).
        """
        client = STSClient(BASE, MemoryReactorClock())
        agent = client._http._agent
        self.assertIsInstance(agent, PooledAgent)
        first = agent._target(b"http://sts.test:8080/oauth/2/token")[1]
        self.assertIsInstance(first, HostnameEndpoint)
        self.assertIs(agent._target(b"http://sts.test:8080/x")[1], first)
        self.assertIsNot(agent._target(b"http://sts.test:8081/x")[1], first)
        with self.assertRaises(SchemeNotSupported):
            agent._target(b"ftp://sts.test/x")

    def test_unprintable_request_id_not_sent(self):
        """A request id that could not be a header value is left out."""
        sts = STSDouble(body=MANDATE)
        client, _, _ = client_for(sts)
        self.successResultOf(exchange(client, request_id="bad\nid"))
        self.assertIsNone(sts.requests[0].requestHeaders.getRawHeaders(b"x-request-id"))


class MandateTests(SynchronousTestCase):
    """Parsing a 200 answer."""

    def test_full_mandate(self):
        """A full answer becomes a Mandate with every field."""
        client, _, _ = client_for(STSDouble(body=MANDATE))
        mandate = self.successResultOf(exchange(client))
        self.assertEqual(mandate, Mandate(**MANDATE))

    def test_minimal_mandate(self):
        """Only access_token is required; provider_token is absent outside provider modes."""
        client, _, _ = client_for(STSDouble(body={"access_token": "abc.def.ghi"}))
        mandate = self.successResultOf(exchange(client))
        self.assertEqual(mandate.access_token, "abc.def.ghi")
        self.assertEqual(mandate.token_type, "Bearer")
        self.assertIsNone(mandate.expires_in)
        self.assertIsNone(mandate.provider_token)

    def test_repr_hides_tokens(self):
        """A Mandate's repr and str show neither token."""
        mandate = Mandate(**MANDATE)
        text = repr(mandate) + str(mandate)
        self.assertNotIn(MANDATE["access_token"], text)
        self.assertNotIn(MANDATE["provider_token"], text)
        self.assertIn("Bearer", text)

    def test_mandate_is_frozen(self):
        """A Mandate cannot be changed."""
        mandate = Mandate(**MANDATE)
        with self.assertRaises(AttributeError):
            mandate.access_token = "other"


class ExchangeErrorTests(SynchronousTestCase):
    """Every STS failure becomes the Denial of SPEC step 11."""

    def denial(self, status, body, content_type=b"application/json"):
        client, _, _ = client_for(STSDouble(status=status, body=body, content_type=content_type))
        denial = self.failureResultOf(exchange(client), Denial).value
        self.assertEqual(denial.metric, "sts_exchange_errors")
        self.assertNotIn(SUBJECT, denial.description)
        return denial

    def assertUnavailable(self, denial, status=502):
        self.assertEqual((denial.status, denial.code), (status, "sts_unavailable"))

    def test_4xx_json_error_passed_through(self):
        """An STS 4xx with a JSON error answers with that status, code and description."""
        denial = self.denial(403, {"error": "access_denied", "error_description": "not granted"})
        self.assertEqual(
            (denial.status, denial.code, denial.description), (403, "access_denied", "not granted")
        )

    def test_4xx_json_error_without_description(self):
        """An STS error without a description gets a fixed one."""
        denial = self.denial(401, {"error": "invalid_token"})
        self.assertEqual((denial.status, denial.code), (401, "invalid_token"))
        self.assertEqual(denial.description, "the STS refused the token exchange")

    def test_description_echoing_the_token_is_replaced(self):
        """An STS that quotes the subject token does not get it into the error body."""
        for description in (f"bad token {SUBJECT}", "bad eyJhbGciOiJIUzI1NiJ9 header"):
            denial = self.denial(401, {"error": "invalid_token", "error_description": description})
            self.assertEqual(denial.description, "the STS refused the token exchange")

    def test_description_with_control_characters_is_replaced(self):
        """An STS description with control characters is replaced, never relayed."""
        denial = self.denial(400, {"error": "invalid_request", "error_description": "a\r\nb"})
        self.assertEqual(denial.description, "the STS refused the token exchange")

    def test_odd_error_code_is_replaced(self):
        """A code that is not [a-z0-9_] keeps the status, with the SPEC code for it."""
        self.assertEqual(self.denial(401, {"error": "Bad Code <b>"}).code, "invalid_token")
        self.assertEqual(self.denial(400, {"error": "x" * 65}).code, "invalid_request")
        self.assertEqual(self.denial(403, {"error": "nope!"}).code, "access_denied")

    def test_4xx_without_json_error(self):
        """A 4xx without a JSON error code means the STS is unavailable."""
        self.assertUnavailable(self.denial(400, b"<html>bad</html>", b"text/html"))
        self.assertUnavailable(self.denial(404, {"message": "no error field"}))
        self.assertUnavailable(self.denial(400, {"error": 17}))

    def test_5xx(self):
        """A 5xx is a 502 even when it carries a JSON error."""
        self.assertUnavailable(self.denial(500, {"error": "server_error"}))
        self.assertUnavailable(self.denial(503, b""))

    def test_redirect_not_followed(self):
        """A redirect is not followed: the STS is unavailable."""
        sts = STSDouble(status=302, body=b"")
        sts.hang = False
        client, _, _ = client_for(sts)
        self.assertUnavailable(self.failureResultOf(exchange(client), Denial).value)
        self.assertEqual(len(sts.requests), 1)

    def test_bad_json(self):
        """A 200 answer that is not a JSON object means the STS is unavailable."""
        self.assertUnavailable(self.denial(200, b"{not json"))
        self.assertUnavailable(self.denial(200, b"\xff\xfe"))
        self.assertUnavailable(self.denial(200, b'["access_token"]'))

    def test_missing_or_malformed_access_token(self):
        """A missing or unsendable access_token means the STS is unavailable."""
        self.assertUnavailable(self.denial(200, {"token_type": "Bearer"}))
        self.assertUnavailable(self.denial(200, {"access_token": ""}))
        self.assertUnavailable(self.denial(200, {"access_token": 12}))
        self.assertUnavailable(self.denial(200, {"access_token": "a\r\nX-Evil: 1"}))

    def test_malformed_optional_fields(self):
        """Optional fields of the wrong type mean the STS is unavailable."""
        for extra in (
            {"expires_in": "120"},
            {"expires_in": -1},
            {"expires_in": True},
            {"provider_token": 5},
            {"provider_token": "k\nX: y"},
            {"token_type": None},
        ):
            self.assertUnavailable(self.denial(200, {"access_token": "a.b.c", **extra}))

    def test_declared_oversized_body(self):
        """A Content-Length over 16 KiB is refused without reading it."""
        self.assertUnavailable(
            self.denial(200, json.dumps({"access_token": "a" * MAX_EXCHANGE_BYTES}).encode())
        )

    def test_streamed_oversized_body_stops_reading(self):
        """Past 16 KiB of a chunked body the client drops the connection."""
        sts = STSDouble(hang=True)
        client, _, agent = client_for(sts)
        d = exchange(client)
        [request] = sts.requests
        request.write(b" " * (MAX_EXCHANGE_BYTES - 100))
        agent.flush()
        self.assertNoResult(d)
        request.write(b" " * 200)
        agent.flush()
        self.assertUnavailable(self.failureResultOf(d, Denial).value)
        self.assertEqual(len(sts.lost), 1, "the server saw the connection dropped")

    def test_body_exactly_at_limit_is_read(self):
        """A body of exactly the limit is read."""
        body = json.dumps({"access_token": "a.b.c"}).encode()
        body += b" " * (MAX_EXCHANGE_BYTES - len(body))
        client, _, _ = client_for(STSDouble(body=body))
        self.assertEqual(self.successResultOf(exchange(client)).access_token, "a.b.c")

    def gzipped(self, body):
        return STSDouble(body=gzip.compress(body), headers={b"content-encoding": b"gzip"})

    def test_gzip_answer(self):
        """A gzip-encoded mandate (treq asks for gzip) is read."""
        client, _, _ = client_for(self.gzipped(json.dumps(MANDATE).encode()))
        self.assertEqual(self.successResultOf(exchange(client)), Mandate(**MANDATE))

    def test_gzip_bomb(self):
        """A small compressed answer that inflates past 16 KiB is refused."""
        bomb = b'{"access_token": "a.b.c", "pad": "' + b"0" * (50 * MAX_EXCHANGE_BYTES) + b'"}'
        sts = self.gzipped(bomb)
        self.assertLess(len(sts.body), MAX_EXCHANGE_BYTES)
        client, _, _ = client_for(sts)
        self.assertUnavailable(self.failureResultOf(exchange(client), Denial).value)

    def test_bad_gzip(self):
        """A gzip body that does not inflate means the STS is unavailable."""
        for body in (b"not gzip at all", gzip.compress(json.dumps(MANDATE).encode())[:-12]):
            sts = STSDouble(body=body, headers={b"content-encoding": b"gzip"})
            client, _, _ = client_for(sts)
            self.assertUnavailable(self.failureResultOf(exchange(client), Denial).value)

    def test_timeout_waiting_for_headers(self):
        """No answer within the timeout: 504, and the connection is aborted."""
        sts = STSDouble(hang=True)
        client, clock, agent = client_for(sts, timeout=2.0)
        d = exchange(client)
        clock.advance(1.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        self.assertUnavailable(self.failureResultOf(d, Denial).value, 504)
        agent.flush()
        self.assertEqual(len(sts.lost), 1, "the server saw the connection dropped")

    def test_timeout_reading_body(self):
        """The bound covers the whole exchange, body included."""
        sts = STSDouble(hang=True)
        client, clock, agent = client_for(sts, timeout=2.0)
        d = exchange(client)
        sts.requests[0].write(b'{"access_token": ')
        agent.flush()
        clock.advance(2.0)
        self.assertUnavailable(self.failureResultOf(d, Denial).value, 504)
        agent.flush()
        self.assertEqual(len(sts.lost), 1)

    def test_connection_refused(self):
        """A refused connection is tried once and means the STS is unavailable."""
        agent = ScriptedAgent(lambda *a: fail(ConnectionRefusedError()))
        client = STSClient(BASE, Clock(), agent=agent)
        self.assertUnavailable(self.failureResultOf(exchange(client), Denial).value)
        self.assertEqual(agent.calls, 1)

    def test_stale_pooled_connection_retried_once(self):
        """A connection dropped before any answer is retried once, then it is a 502."""
        lost = lambda *a: fail(ResponseNeverReceived([Failure(ConnectionDone())]))  # noqa: E731
        agent = ScriptedAgent(lost, lost, lost)
        client = STSClient(BASE, Clock(), agent=agent)
        self.assertUnavailable(self.failureResultOf(exchange(client), Denial).value)
        self.assertEqual(agent.calls, 2)

    def test_stale_pooled_connection_retry_succeeds(self):
        """A pooled connection the STS closed is retried once on a fresh one."""
        sts = STSDouble(body=MANDATE)
        real = RequestTraversalAgent(sts)
        agent = ScriptedAgent(
            lambda *a: fail(ResponseNeverReceived([Failure(ConnectionDone())])),
            real.request,
        )
        client = STSClient(BASE, Clock(), agent=agent)
        self.assertEqual(self.successResultOf(exchange(client)), Mandate(**MANDATE))
        self.assertEqual(len(sts.requests), 1)

    def test_other_lost_responses_not_retried(self):
        """Only a peer closing the connection is retried, not e.g. a TLS failure."""
        broken = lambda *a: fail(ResponseNeverReceived([Failure(ValueError("tls"))]))  # noqa: E731
        agent = ScriptedAgent(broken, broken)
        client = STSClient(BASE, Clock(), agent=agent)
        self.assertUnavailable(self.failureResultOf(exchange(client), Denial).value)
        self.assertEqual(agent.calls, 1)

    def test_caller_cancellation_is_not_a_denial(self):
        """A cancelled exchange (the caller went away) stays a cancellation."""
        sts = STSDouble(hang=True)
        client, _, agent = client_for(sts)
        d = exchange(client)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        agent.flush()
        self.assertEqual(len(sts.lost), 1)


class JWKSTests(SynchronousTestCase):
    """fetch_jwks."""

    jwks = {"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "x": "AA", "y": "BB"}]}

    def test_fetch(self):
        """The JWKS is fetched with a GET naming the zone, query-encoded."""
        sts = STSDouble(body=self.jwks)
        client, _, _ = client_for(sts)
        self.assertEqual(self.successResultOf(client.fetch_jwks("zone a&b")), self.jwks)
        [request] = sts.requests
        self.assertEqual(request.method, b"GET")
        self.assertEqual(request.path, b"/.well-known/jwks.json")
        self.assertEqual(request.args, {b"zone_id": [b"zone a&b"]})

    def test_failures(self):
        """A JWKS answer that is not a 200 JSON key set is STSUnavailable."""
        for status, body in (
            (500, self.jwks),
            (404, {"error": "unknown_zone"}),
            (200, b"not json"),
            (200, {"no": "keys"}),
            (200, {"keys": "nope"}),
            (200, json.dumps({"keys": [], "pad": "x" * MAX_JWKS_BYTES}).encode()),
        ):
            client, _, _ = client_for(STSDouble(status=status, body=body))
            self.failureResultOf(client.fetch_jwks("z"), STSUnavailable)

    def test_timeout(self):
        """A JWKS fetch past the timeout is STSUnavailable."""
        sts = STSDouble(hang=True)
        client, clock, agent = client_for(sts, timeout=1.0)
        d = client.fetch_jwks("z")
        clock.advance(1.0)
        self.failureResultOf(d, STSUnavailable)
        agent.flush()
        self.assertEqual(len(sts.lost), 1)

    def test_unreachable(self):
        """An unreachable STS is STSUnavailable for the JWKS."""
        client = STSClient(
            BASE, Clock(), agent=ScriptedAgent(lambda *a: fail(ConnectionRefusedError()))
        )
        self.failureResultOf(client.fetch_jwks("z"), STSUnavailable)


class HealthTests(SynchronousTestCase):
    """health."""

    def test_up(self):
        """A 200 from /health means the STS is up."""
        sts = STSDouble(body={"status": "ok"})
        client, _, _ = client_for(sts)
        self.assertIsNone(self.successResultOf(client.health()))
        self.assertEqual(sts.requests[0].path, b"/health")

    def test_down(self):
        """Any other status means it is down."""
        client, _, _ = client_for(STSDouble(status=503, body=b"down"))
        self.failureResultOf(client.health(), STSUnavailable)

    def test_timeout(self):
        """No answer in time means it is down."""
        client, clock, _ = client_for(STSDouble(hang=True), timeout=1.0)
        d = client.health()
        clock.advance(1.0)
        self.failureResultOf(d, STSUnavailable)


class PreparedURLTests(SynchronousTestCase):
    """L{PreparedURL.prepare} for every kind of host."""

    def test_ipv6_literal(self):
        """An IPv6 literal host is kept as it is (IDNA would refuse it)."""
        prepared = PreparedURL.prepare("http://[::1]:8080/a b/oauth/2/token")
        self.assertEqual(prepared.to_text(), "http://[::1]:8080/a%20b/oauth/2/token")
        self.assertEqual(prepared.host, "::1")

    def test_ipv4_and_names(self):
        """IPv4 literals and ASCII names come out as the URI treq would build."""
        for url in ("http://127.0.0.1:8080/t", "https://sts.example/x/oauth/2/token"):
            self.assertEqual(
                PreparedURL.prepare(url).to_text(), EncodedURL.from_text(url).to_uri().to_text()
            )
