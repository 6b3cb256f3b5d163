# -*- test-case-name: tests.integration.test_sts_client -*-
"""
Integration tests of L{caracal.gateway.sts.STSClient} over real sockets on
127.0.0.1: against the development STS, a scripted failing STS, a closed
port, and an https STS whose certificate comes from a test CA.
"""

from __future__ import annotations

import json
import os
import time

import jwt
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from caracal.devsts import DevSTS
from caracal.devsts.tap import tls_options
from caracal.gateway.denials import Denial
from caracal.gateway.sts import MAX_EXCHANGE_BYTES, STSClient, STSUnavailable
from caracal.gateway.tls import client_tls_policy
from tests.support.certs import make_authority, make_chain, make_leaf
from tests.support.sts import ScriptedSTS, listen, start_dev_sts, stop_listening
from tests.support.waiting import wait_until


class STSClientTestCase(TestCase):
    def client(self, base_url, **kwargs):
        client = STSClient(base_url, reactor, **kwargs)
        self.addCleanup(client.close)
        return client

    def serve(self, port):
        # Cleanups run last-in first-out: the client's pool closes first.
        self.addCleanup(stop_listening, port)

    @inlineCallbacks
    def dev_sts(self):
        sts, base_url, port = yield start_dev_sts(reactor)
        self.serve(port)
        return sts, base_url, port

    def assertDenial(self, failure_or_denial, status, code="sts_unavailable"):
        self.assertEqual((failure_or_denial.status, failure_or_denial.code), (status, code))


class DevSTSTests(STSClientTestCase):
    @inlineCallbacks
    def test_exchange_over_ipv6_loopback(self):
        """An C{STS_URL} naming an IPv6 literal (C{http://[::1]:port}) works."""
        sts, base_url, port = yield start_dev_sts(reactor, interface="::1")
        self.serve(port)
        self.assertTrue(base_url.startswith("http://[::1]:"), base_url)
        client = self.client(base_url)
        token = sts.mint("zone-a", "agent-1", session_id="s1")
        mandate = yield client.exchange(token, "zone-a", "app-1", "res-1", "req-1")
        self.assertTrue(mandate.access_token)

    @inlineCallbacks
    def test_exchange(self):
        """A minted token exchanges for a mandate that verifies with the zone's JWKS."""
        sts, base_url, _ = yield self.dev_sts()
        client = self.client(base_url)
        token = sts.mint("zone-a", "agent-1", session_id="s1")
        mandate = yield client.exchange(token, "zone-a", "app-1", "res-1", "req-1")
        jwks = yield client.fetch_jwks("zone-a")
        key = jwt.PyJWK(jwks["keys"][0]).key
        claims = jwt.decode(mandate.access_token, key, algorithms=["ES256"])
        self.assertEqual((claims["sub"], claims["resource"]), ("agent-1", "res-1"))
        self.assertEqual(mandate.token_type, "Bearer")
        self.assertTrue(mandate.provider_token.startswith("devprov-"))
        yield client.health()
        self.assertEqual((sts.exchanges, sts.jwks_fetches, sts.health_checks), (1, 1, 1))

    @inlineCallbacks
    def test_refusal(self):
        """The STS's refusal of a token it did not sign is passed on as a Denial."""
        sts, base_url, _ = yield self.dev_sts()
        client = self.client(base_url)
        other = DevSTS()
        token = other.mint("zone-a", "agent-1")
        sts.zone_key("zone-a")
        error = yield self.assertFailure(
            client.exchange(token, "zone-a", "app", "res", "req"), Denial
        )
        self.assertDenial(error, 401, "invalid_token")
        self.assertNotIn(token, error.description)

    @inlineCallbacks
    def test_connection_reused(self):
        """Exchanges, JWKS and health calls share one kept-alive TCP connection."""
        sts, base_url, port = yield self.dev_sts()
        client = self.client(base_url)
        for _ in range(2):
            yield client.exchange(sts.mint("zone-a", "a"), "zone-a", "app", "res", "req")
        yield client.fetch_jwks("zone-a")
        yield client.health()
        self.assertEqual(sts.exchanges, 2)
        self.assertEqual(port.factory.connections, 1)

    @inlineCallbacks
    def test_server_closed_idle_connection(self):
        """An idle pooled connection the STS closed is replaced, not an error."""
        sts, base_url, port = yield self.dev_sts()
        client = self.client(base_url)
        yield client.exchange(sts.mint("zone-a", "a"), "zone-a", "app", "res", "r1")
        yield port.factory.close_connections()
        mandate = yield client.exchange(sts.mint("zone-a", "a"), "zone-a", "app", "res", "r2")
        self.assertTrue(mandate.access_token)
        self.assertEqual(port.factory.connections, 2)

    @inlineCallbacks
    def test_concurrent_exchanges(self):
        """Concurrent exchanges all succeed (the pool opens what it needs)."""
        from twisted.internet.defer import gatherResults

        sts, base_url, port = yield self.dev_sts()
        client = self.client(base_url)
        mandates = yield gatherResults(
            [
                client.exchange(sts.mint("zone-a", f"a{i}"), "zone-a", "app", "res", f"r{i}")
                for i in range(8)
            ]
        )
        self.assertEqual(len({m.access_token for m in mandates}), 8)
        self.assertLessEqual(port.factory.connections, 8)


class FailureTests(STSClientTestCase):
    @inlineCallbacks
    def test_refused_port(self):
        """Nothing listening: 502, quickly."""
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        client = self.client(f"http://127.0.0.1:{number}")
        error = yield self.assertFailure(
            client.exchange("t.t.t", "zone", "app", "res", "req"), Denial
        )
        self.assertDenial(error, 502)
        yield self.assertFailure(client.fetch_jwks("zone"), STSUnavailable)
        yield self.assertFailure(client.health(), STSUnavailable)

    @inlineCallbacks
    def test_never_answers(self):
        """A server that accepts and never answers: 504 after the timeout, connection dropped."""
        scripted = ScriptedSTS(reactor)
        scripted.script(b"/oauth/2/token", hang=True)
        base_url, port = scripted.listen()
        self.serve(port)
        client = self.client(base_url, timeout=0.3)
        started = time.monotonic()
        error = yield self.assertFailure(
            client.exchange("t.t.t", "zone", "app", "res", "req"), Denial
        )
        elapsed = time.monotonic() - started
        self.assertDenial(error, 504)
        self.assertGreaterEqual(elapsed, 0.29)
        self.assertLess(elapsed, 3.0)
        self.assertEqual(scripted.calls[b"/oauth/2/token"], 1)
        # The client aborted the connection: the server side goes away too.
        yield wait_until(lambda: not port.factory.open)

    @inlineCallbacks
    def test_slow_answer_within_timeout(self):
        """An answer slower than usual but within the timeout is accepted."""
        scripted = ScriptedSTS(reactor)
        scripted.script(body={"access_token": "a.b.c"}, delay=0.1)
        base_url, port = scripted.listen()
        self.serve(port)
        mandate = yield self.client(base_url, timeout=2.0).exchange("t", "z", "a", "r", "q")
        self.assertEqual(mandate.access_token, "a.b.c")

    @inlineCallbacks
    def test_jwks_never_answers(self):
        """A JWKS endpoint that never answers is STSUnavailable after the timeout."""
        scripted = ScriptedSTS(reactor)
        scripted.script(b"/.well-known/jwks.json", hang=True)
        base_url, port = scripted.listen()
        self.serve(port)
        yield self.assertFailure(self.client(base_url, timeout=0.3).fetch_jwks("z"), STSUnavailable)

    @inlineCallbacks
    def test_errors_over_the_wire(self):
        """4xx JSON passthrough, 5xx and oversized answers, with the fallback JWKS still served."""
        dev = DevSTS()
        scripted = ScriptedSTS(reactor, fallback=dev)
        base_url, port = scripted.listen()
        self.serve(port)
        client = self.client(base_url)

        scripted.script(status=429, body={"error": "rate_limited", "error_description": "slow"})
        error = yield self.assertFailure(client.exchange("t", "z", "a", "r", "q"), Denial)
        self.assertEqual(
            (error.status, error.code, error.description), (429, "rate_limited", "slow")
        )

        scripted.script(status=500, body={"error": "server_error"})
        error = yield self.assertFailure(client.exchange("t", "z", "a", "r", "q"), Denial)
        self.assertDenial(error, 502)

        big = json.dumps({"access_token": "a.b.c", "pad": "x" * (4 * MAX_EXCHANGE_BYTES)})
        scripted.script(body=big.encode(), delay=0.01)  # chunked: no Content-Length
        error = yield self.assertFailure(client.exchange("t", "z", "a", "r", "q"), Denial)
        self.assertDenial(error, 502)

        jwks = yield client.fetch_jwks("zone-a")
        self.assertEqual(jwks, dev.jwks("zone-a"))
        self.assertEqual(scripted.calls[b"/oauth/2/token"], 3)
        self.assertEqual(dev.exchanges, 0)


class HTTPSTests(STSClientTestCase):
    """An https STS, its certificate from a test CA (STS_CA_FILE)."""

    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    @inlineCallbacks
    def https_sts(self, leaf_stem="server"):
        sts = DevSTS()
        cert = os.path.join(self.directory, f"{leaf_stem}.crt")
        key = os.path.join(self.directory, f"{leaf_stem}.key")
        base_url, port = listen(reactor, sts.resource(), tls_options(cert, key))
        self.serve(port)
        yield None
        return sts, port.getHost().port

    @inlineCallbacks
    def test_trusted_ca(self):
        """An https STS is reached by name and by address with its CA bundle."""
        make_chain(self.directory)
        sts, number = yield self.https_sts()
        policy = client_tls_policy(os.path.join(self.directory, "server-ca.pem"), "STS_CA_FILE")
        for host in ("localhost", "127.0.0.1"):
            client = self.client(f"https://{host}:{number}", tls_policy=policy)
            mandate = yield client.exchange(sts.mint("z", "a"), "z", "app", "res", "req")
            self.assertTrue(mandate.access_token)

    @inlineCallbacks
    def test_untrusted_ca(self):
        """Without the test CA the certificate does not verify: 502, no exchange."""
        make_chain(self.directory)
        sts, number = yield self.https_sts()
        client = self.client(f"https://localhost:{number}", tls_policy=client_tls_policy(None))
        error = yield self.assertFailure(
            client.exchange(sts.mint("z", "a"), "z", "app", "res", "req"), Denial
        )
        self.assertDenial(error, 502)
        self.assertEqual(sts.exchanges, 0)

    @inlineCallbacks
    def test_wrong_hostname(self):
        """A certificate from the trusted CA but for another name is refused."""
        root = make_authority()
        make_leaf(root, hostnames=("sts.example",), addresses=()).write(self.directory, "other")
        ca_file = os.path.join(self.directory, "ca.pem")
        with open(ca_file, "wb") as f:
            f.write(root.pem)
        sts, number = yield self.https_sts("other")
        client = self.client(
            f"https://localhost:{number}", tls_policy=client_tls_policy(ca_file, "STS_CA_FILE")
        )
        error = yield self.assertFailure(
            client.exchange(sts.mint("z", "a"), "z", "app", "res", "req"), Denial
        )
        self.assertDenial(error, 502)
        self.assertEqual(sts.exchanges, 0)
