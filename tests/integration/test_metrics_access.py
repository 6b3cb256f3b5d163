# -*- test-case-name: tests.integration.test_metrics_access -*-
"""
Who may read C{/metrics} (SPEC section 12), against real C{twistd
caracal-gateway} processes on 127.0.0.x:

 - C{METRICS_ADDRESS}: C{/health}, C{/ready} and C{/metrics} answered in
   plaintext there, C{/metrics} a 404 on the public TLS listener, nothing
   else served (or proxied) there; with C{--workers 2} too, the counters
   summed over both workers;
 - C{METRICS_BEARER}: 401 (the JSON envelope, C{WWW-Authenticate}) without
   the bearer or with a wrong one, 200 with it;
 - production with neither: C{/metrics} a 404 on the public listener and
   the startup log says how to expose it.
"""

from __future__ import annotations

import json
import os
import random
import re

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from tests.support.certs import make_chain
from tests.support.clients import fresh_connection_client
from tests.support.postgres import TemporaryDatabase, postgres_available
from tests.support.process import (
    GatewayProcess,
    child_pids,
    free_port,
    gateway_environ,
    kill_pid,
)
from tests.support.waiting import became_true

BEARER = "metrics-bearer-" + "0123456789abcdef" * 2
HMAC_KEY_HEX = "d4" * 32
#: Workers start a full interpreter each, then connect to their backends.
START_TIMEOUT = 30.0


class MetricsAccessTests(TestCase):
    """/metrics exposure with real gateway processes."""

    timeout = 120

    def setUp(self):
        skip = postgres_available()
        if skip:
            raise self.skipTest(skip)
        # A database with the schema, so the gateway's first snapshot loads
        # at once and it listens without waiting out the startup bound.
        self.database = TemporaryDatabase().create()
        self.addCleanup(self.database.drop)

    def directory(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def gateway(self, environ, args=("-n", "caracal-gateway"), **kwargs) -> GatewayProcess:
        process = GatewayProcess(environ, args, cwd=self.directory(), **kwargs)

        @defer.inlineCallbacks
        def kill():
            children = child_pids(process.pid) if process.pid else []
            yield process.kill()
            for pid in children:
                kill_pid(pid)

        self.addCleanup(kill)
        return process

    def client(self, root=None):
        """A treq client: plaintext, or TLS trusting only the test root C{root}."""
        return fresh_connection_client(root)

    @defer.inlineCallbacks
    def get(self, client, url: str, headers=None):
        response = yield client.get(url, headers=headers, timeout=10)
        body = yield response.content()
        return response, body

    def assertEnvelope(self, response, body, status: int, code: str):
        """C{status} with the JSON error envelope naming C{code}."""
        self.assertEqual(response.code, status, body)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"application/json"], body
        )
        self.assertEqual(json.loads(body)["error"], code)

    @defer.inlineCallbacks
    def test_metrics_address_plaintext_and_gone_from_public_tls(self):
        """
        With METRICS_ADDRESS, the three local endpoints answer there in
        plaintext; the public TLS listener answers /metrics with 404 and
        still serves /health; other paths on the metrics listener are 404s.
        """
        port, metrics_port = free_port(), free_port()
        environ, root = gateway_environ(
            self.directory(),
            port,
            DATABASE_URL=self.database.url,
            METRICS_ADDRESS=f"127.0.0.1:{metrics_port}",
        )
        gateway = self.gateway(environ, root=root)
        yield gateway.start()
        plain, tls = self.client(), self.client(root)
        metrics_base = f"http://127.0.0.1:{metrics_port}"

        response, body = yield self.get(plain, f"{metrics_base}/metrics")
        self.assertEqual(response.code, 200, body)
        self.assertIn("requests_total", json.loads(body))
        response, body = yield self.get(
            plain, f"{metrics_base}/metrics", headers={b"accept": [b"text/plain"]}
        )
        self.assertIn(b"caracal_gateway_requests_total", body)
        response, body = yield self.get(plain, f"{metrics_base}/health")
        self.assertEqual((response.code, json.loads(body)), (200, {"status": "ok"}))
        response, body = yield self.get(plain, f"{metrics_base}/ready")
        self.assertIn(response.code, (200, 503))
        self.assertIn("checks", json.loads(body))
        response, body = yield self.get(plain, f"{metrics_base}/tool/anything")
        self.assertEnvelope(response, body, 404, "not_found")

        response, body = yield self.get(tls, f"https://127.0.0.1:{port}/metrics")
        self.assertEnvelope(response, body, 404, "not_found")
        response, _ = yield self.get(tls, f"https://127.0.0.1:{port}/health")
        self.assertEqual(response.code, 200)
        self.assertIn(b"/metrics is off the public listener", gateway.output)
        self.assertEqual((yield gateway.stop()), 0, gateway.errors.decode(errors="replace"))

    @defer.inlineCallbacks
    def test_metrics_bearer(self):
        """METRICS_BEARER: 401 without it or with a wrong one, 200 with it; never echoed."""
        port = free_port()
        environ, _ = gateway_environ(
            self.directory(),
            port,
            tls=False,
            DATABASE_URL=self.database.url,
            METRICS_BEARER=BEARER,
        )
        gateway = self.gateway(environ)
        yield gateway.start()
        client = self.client()
        url = f"http://127.0.0.1:{port}/metrics"

        for headers, code in (
            (None, "missing_token"),
            ({b"authorization": [b"Bearer not-the-bearer"]}, "invalid_token"),
            ({b"authorization": [b"Basic " + BEARER.encode()]}, "invalid_token"),
        ):
            response, body = yield self.get(client, url, headers=headers)
            self.assertEnvelope(response, body, 401, code)
            self.assertTrue(
                response.headers.getRawHeaders(b"www-authenticate")[0].startswith(b"Bearer")
            )
            self.assertNotIn(b"requests_total", body)
        response, body = yield self.get(
            client, url, headers={b"authorization": [b"Bearer " + BEARER.encode()]}
        )
        self.assertEqual(response.code, 200, body)
        self.assertIn("requests_total", json.loads(body))

        self.assertEqual((yield gateway.stop()), 0)
        output = gateway.output + gateway.errors
        self.assertNotIn(BEARER.encode(), output)
        self.assertIn(b'"METRICS_BEARER": "***"', output)
        self.assertIn(b'"denial":"metrics_unauthorized"', output)

    @defer.inlineCallbacks
    def test_production_default_hides_metrics(self):
        """
        Production with neither variable: /metrics on the public listener is
        a 404 (never proxied), and the startup log says how to expose it.
        Production listens on port 8081, so on a random 127.0.0.x address
        of its own.
        """
        address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
        directory = self.directory()
        root, _ = make_chain(directory, addresses=(address,))
        environ, _ = gateway_environ(
            directory,
            8081,
            tls=False,
            CARACAL_ENV="production",
            BIND_ADDRESS=address,
            STREAMS_HMAC_KEY=HMAC_KEY_HEX,
            DATABASE_URL=self.database.url,
            INSECURE_HTTP=None,
            TLS_CERT_FILE=os.path.join(directory, "server.crt"),
            TLS_KEY_FILE=os.path.join(directory, "server.key"),
        )
        gateway = self.gateway(environ, host=address, root=root)
        yield gateway.start()
        tls = self.client(root)
        response, body = yield self.get(tls, f"https://{address}:8081/metrics")
        self.assertEnvelope(response, body, 404, "not_found")
        response, _ = yield self.get(tls, f"https://{address}:8081/health")
        self.assertEqual(response.code, 200)
        self.assertEqual((yield gateway.stop()), 0)
        output = (gateway.output + gateway.errors).decode(errors="replace")
        self.assertIn("/metrics answers 404 on the public listener", output)
        self.assertIn("METRICS_ADDRESS=host:port", output)
        self.assertRegex(output, r'"path":"/metrics","status":404')

    @defer.inlineCallbacks
    def test_workers_serve_metrics_address_summed(self):
        """
        With --workers 2, both workers accept on METRICS_ADDRESS and answer
        there with both workers' counters summed; /metrics is a 404 on the
        public port.
        """
        port, metrics_port = free_port(), free_port()
        environ, _ = gateway_environ(
            self.directory(),
            port,
            tls=False,
            LOG_LEVEL="info",
            DATABASE_URL=self.database.url,
            METRICS_ADDRESS=f"127.0.0.1:{metrics_port}",
        )
        gateway = self.gateway(environ, args=("-n", "caracal-gateway", "--workers", "2"))
        yield gateway.start(timeout=START_TIMEOUT)

        def both_serving_metrics():
            # Each worker writes its own JSON lines, with its index.
            pattern = rb'"msg":"caracal-gateway serving /health[^\n]*"worker":(\d+)\}'
            found = re.findall(pattern, gateway.output)
            return {int(index) for index in found} == {0, 1}

        self.assertTrue(
            (yield became_true(both_serving_metrics, START_TIMEOUT, reactor)),
            gateway.output.decode(errors="replace")[-3000:],
        )
        client = self.client()
        sent = 40
        answers = yield defer.gatherResults(
            [self.get(client, f"http://127.0.0.1:{port}/tool/{n}") for n in range(sent)]
        )
        self.assertEqual({response.code for response, _ in answers}, {401})
        response, body = yield self.get(client, f"http://127.0.0.1:{port}/metrics")
        self.assertEnvelope(response, body, 404, "not_found")

        @defer.inlineCallbacks
        def summed():
            response, body = yield self.get(client, f"http://127.0.0.1:{metrics_port}/metrics")
            self.assertEqual(response.code, 200)
            return json.loads(body)["requests_total"] == sent

        self.assertTrue((yield became_true(summed, 10, reactor)), f"{sent} requests sent")
        self.assertEqual((yield gateway.stop()), 0, gateway.errors.decode(errors="replace"))
