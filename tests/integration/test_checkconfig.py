# -*- test-case-name: tests.integration.test_checkconfig -*-
"""
C{caracal-gateway-admin check-config} as an operator runs it: a subprocess
reading a production-like environment, checking a real dev STS over TLS (in
this process, on 127.0.0.1), the real Redis and a temporary Postgres
database. One good environment passes every item; each broken one fails
the item it breaks, with exit status 1, and no secret is ever printed.
"""

from __future__ import annotations

import datetime
import os
import secrets
import sys
import time

from twisted.internet import protocol, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from caracal.devsts import DevSTS
from caracal.devsts.tap import tls_options
from tests.support.certs import make_authority, make_chain, make_leaf
from tests.support.postgres import TemporaryDatabase, postgres_available
from tests.support.sentinel import SentinelGroup
from tests.support.sts import ScriptedSTS, listen, stop_listening
from tests.support.waiting import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DB_PASSWORD = "pg-Pass-" + secrets.token_hex(6)


class CheckConfigTests(TestCase):
    timeout = 60

    def setUp(self):
        skip = postgres_available()
        if skip:
            self.skipTest(skip)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.root, self.leaf = make_chain(self.directory)
        self.cert_file = os.path.join(self.directory, "server.crt")
        self.key_file = os.path.join(self.directory, "server.key")
        self.ca_file = os.path.join(self.directory, "server-ca.pem")

        self.sts_url, self.sts_port = listen(
            reactor, DevSTS().resource(), tls_options(self.cert_file, self.key_file)
        )
        self.addCleanup(stop_listening, self.sts_port)

        self.database = TemporaryDatabase().create()
        self.addCleanup(self.database.drop)
        [(user,)] = self.database.execute("SELECT current_user")
        # Trust auth ignores the password; it is here to prove it is never shown.
        self.database_url = f"postgresql://{user}:{DB_PASSWORD}@127.0.0.1:5432/{self.database.name}"
        self.hmac_hex = secrets.token_hex(32)

    def environ(self, **overrides: str | None) -> dict[str, str]:
        environ = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "CARACAL_ENV": "production",
            "PORT": "8081",
            "TLS_CERT_FILE": self.cert_file,
            "TLS_KEY_FILE": self.key_file,
            "STS_URL": f"https://localhost:{self.sts_port.getHost().port}",
            "STS_CA_FILE": self.ca_file,
            "DATABASE_URL": self.database_url,
            "REDIS_URL": "redis://127.0.0.1:6379/0",
            "STREAMS_HMAC_KEY": self.hmac_hex,
        }
        environ.update(overrides)
        return {k: v for k, v in environ.items() if v is not None}

    async def check(self, environ, *args):
        """Run the command; return (status, stdout lines by item, whole output)."""
        out, err, status = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "caracal.gateway.admin", "check-config", *args],
            env=environ,
            path=ROOT,
            reactor=reactor,
        )
        out, err = out.decode(), err.decode()
        text = out + err
        self.assertNotIn("Traceback", text)
        self.assertNotIn(DB_PASSWORD, text)
        self.assertNotIn(self.hmac_hex, text)
        items = {}
        for line in out.splitlines()[:-1]:
            status_word, item = line.split()[:2]
            items.setdefault(item, status_word)
        return status, items, text

    async def test_production_ready(self):
        """
        A production environment with every service up passes every item and says where it looked.
        """
        status, items, text = await self.check(self.environ())
        self.assertEqual(status, 0, text)
        self.assertEqual(set(items.values()), {"PASS"}, text)
        for item in ("certificate", "chain", "key", "STS", "Redis", "Postgres", "STREAMS_HMAC_KEY"):
            self.assertIn(item, items)
        self.assertIn("GET /health answered 200 over verified TLS", text)
        self.assertIn("PING answered PONG", text)
        self.assertIn("gateway_resources readable (0 resources)", text)
        self.assertIn("postgresql://", text)
        self.assertIn(":***@127.0.0.1", text)
        self.assertIn("0 failed: ready for production", text)

    async def test_env_file(self):
        """
        C{--env-file} supplies the whole environment: the same checklist passes from the file alone.
        """
        path = os.path.join(self.directory, "gateway.env")
        with open(path, "w", encoding="utf-8") as f:
            for name, value in self.environ().items():
                if name not in ("PATH", "LANG"):
                    f.write(f"{name}={value}\n")
        environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        status, items, text = await self.check(environ, "--env-file", path)
        self.assertEqual(status, 0, text)
        self.assertEqual(set(items.values()), {"PASS"}, text)

    async def test_expired_certificate(self):
        """
        An expired TLS certificate fails the certificate item, naming the file, and the rest is
        still judged.
        """
        expired_dir = os.path.join(self.directory, "expired")
        os.makedirs(expired_dir)
        yesterday = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
        cert_file, key_file = make_leaf(self.root, not_after=yesterday).write(expired_dir)
        environ = self.environ(TLS_CERT_FILE=cert_file, TLS_KEY_FILE=key_file)
        status, items, text = await self.check(environ)
        self.assertEqual(status, 1, text)
        self.assertEqual(items["certificate"], "FAIL")
        self.assertIn(f"TLS_CERT_FILE {cert_file}: certificate expired on", text)
        # The rest of the checklist is still judged.
        self.assertEqual(items["Redis"], "PASS")

    async def test_wrong_chain_order(self):
        """
        A certificate file with its chain out of order fails the chain item, saying which link is
        wrong.
        """
        intermediate = self.leaf.intermediates[0]
        from cryptography.hazmat.primitives.serialization import Encoding

        misordered = os.path.join(self.directory, "misordered.crt")
        with open(misordered, "wb") as f:
            for certificate in (self.leaf.cert, self.root.cert, intermediate):
                f.write(certificate.public_bytes(Encoding.PEM))
        status, items, text = await self.check(self.environ(TLS_CERT_FILE=misordered))
        self.assertEqual(status, 1, text)
        self.assertEqual(items["chain"], "FAIL")
        self.assertIn("certificate 2 (CN=Caracal Test Root) did not issue certificate 1", text)

    async def test_redis_on_closed_port(self):
        """
        A Redis on a closed port fails the Redis item as refused, and Postgres is judged regardless.
        """
        environ = self.environ(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
        status, items, text = await self.check(environ)
        self.assertEqual(status, 1, text)
        self.assertEqual(items["Redis"], "FAIL")
        self.assertIn("cannot connect: Connection refused", text)
        self.assertEqual(items["Postgres"], "PASS")

    async def test_redis_through_sentinel(self):
        """A redis+sentinel:// URL is probed at the master the sentinel names (SPEC 16)."""
        group = SentinelGroup(self.mktemp())
        self.addCleanup(group.stop)
        group.start()
        master = group.master_port()
        dead = free_port()
        # The first sentinel listed is down: the next one answers.
        url = group.url.replace("127.0.0.1:", f"127.0.0.1:{dead},127.0.0.1:", 1)
        status, items, text = await self.check(self.environ(REDIS_URL=url))
        self.assertEqual(items["Redis"], "PASS", text)
        self.assertIn(f"names master 127.0.0.1:{master}; PING answered PONG", text)
        self.assertIn("1 replica(s) connected (REPLAY_MIN_REPLICAS=1)", text)
        self.assertEqual(status, 0, text)

    async def test_too_few_replicas_for_replay_min_replicas(self):
        """
        REPLAY_MIN_REPLICAS asks for more replicas than the master has: the
        Redis item fails, saying single-use tokens would all get 503.
        """
        environ = self.environ(REPLAY_MIN_REPLICAS="1")
        status, items, text = await self.check(environ)
        self.assertEqual(items["Redis"], "FAIL", text)
        self.assertIn(
            "the master has 0 connected replica(s) and REPLAY_MIN_REPLICAS is 1: every"
            " single-use token would get 503",
            text,
        )
        self.assertEqual(status, 1)

    async def test_sentinel_without_the_master(self):
        """A sentinel that knows no such master: the Redis item fails, saying so."""
        group = SentinelGroup(self.mktemp())
        self.addCleanup(group.stop)
        group.start()
        url = f"redis+sentinel://127.0.0.1:{group.sentinel_port}/no-such-master"
        status, items, text = await self.check(self.environ(REDIS_URL=url))
        self.assertEqual(items["Redis"], "FAIL", text)
        self.assertIn("knows no master named no-such-master", text)
        self.assertEqual(status, 1)

    async def test_redis_password_not_shown(self):
        """
        A refused Redis password fails the Redis item without the password appearing in the report.
        """
        password = "redis-Pass-" + secrets.token_hex(6)
        environ = self.environ(REDIS_URL=f"redis://:{password}@127.0.0.1:6379/0")
        status, items, text = await self.check(environ)
        # The shared Redis has no password: AUTH is refused, and says so.
        self.assertEqual(items["Redis"], "FAIL", text)
        self.assertIn("AUTH refused", text)
        self.assertNotIn(password, text)
        self.assertEqual(status, 1)

    async def test_sts_certificate_not_trusted(self):
        """
        An STS whose certificate the configured CA bundle does not trust fails the TLS handshake.
        """
        stranger = os.path.join(self.directory, "stranger.pem")
        with open(stranger, "wb") as f:
            f.write(make_authority("Somebody Else").pem)
        status, items, text = await self.check(self.environ(STS_CA_FILE=stranger))
        self.assertEqual(status, 1, text)
        self.assertEqual(items["STS"], "FAIL")
        self.assertIn("TLS handshake failed", text)

    async def test_sts_down(self):
        """An STS that refuses connections fails the STS item as connection refused."""
        environ = self.environ(STS_URL=f"https://localhost:{free_port()}")
        status, items, text = await self.check(environ)
        self.assertEqual((status, items["STS"]), (1, "FAIL"), text)
        self.assertIn("connection refused", text)

    async def test_schema_missing(self):
        """
        A database without the gateway's schema fails the Postgres item and says to run migrate.
        """
        bare = TemporaryDatabase(apply_schema=False).create()
        self.addCleanup(bare.drop)
        [(user,)] = bare.execute("SELECT current_user")
        url = f"postgresql://{user}:{DB_PASSWORD}@127.0.0.1:5432/{bare.name}"
        status, items, text = await self.check(self.environ(DATABASE_URL=url))
        self.assertEqual((status, items["Postgres"]), (1, "FAIL"), text)
        self.assertIn("gateway_resources table is missing; run caracal-gateway-admin migrate", text)

    async def test_dev_escape_hatches(self):
        """
        Dev settings (CARACAL_ENV, PORT, JTI_FAIL_OPEN) each fail their own item in one report.
        """
        environ = self.environ(CARACAL_ENV="dev", PORT="9443", JTI_FAIL_OPEN="true")
        status, items, text = await self.check(environ)
        self.assertEqual(status, 1, text)
        self.assertEqual(
            (items["CARACAL_ENV"], items["PORT"], items["JTI_FAIL_OPEN"]), ("FAIL",) * 3
        )

    async def test_probes_are_bounded(self):
        """
        An STS and a Redis that never answer fail within the timeout instead of hanging the check.
        """
        # An STS whose /health never answers and a "Redis" that never replies.
        sts = ScriptedSTS(reactor)
        sts.script(b"/health", hang=True)
        _, hanging_sts = sts.listen(tls_options(self.cert_file, self.key_file))
        self.addCleanup(stop_listening, hanging_sts)
        silent = reactor.listenTCP(
            0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1"
        )
        self.addCleanup(silent.stopListening)
        environ = self.environ(
            STS_URL=f"https://localhost:{hanging_sts.getHost().port}",
            REDIS_URL=f"redis://127.0.0.1:{silent.getHost().port}/0",
        )
        started = time.monotonic()
        status, items, text = await self.check(environ, "--timeout", "1")
        self.assertLess(time.monotonic() - started, 8.0)
        self.assertEqual((status, items["STS"], items["Redis"]), (1, "FAIL", "FAIL"), text)
        self.assertIn("GET /health failed: no answer in time", text)
        self.assertRegex(text, r"\nFAIL  Redis +redis://127\.0\.0\.1:")
        self.assertIn("timed out", text)
