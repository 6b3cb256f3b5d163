# -*- test-case-name: tests.integration.test_replicas -*-
"""
Several real gateway processes (C{twistd -n caracal-gateway}) behind one
deployment, for the replica tests: they share one temporary Postgres
database, one Redis (the shared server, or a test's L{PrivateRedis}), the dev
STS and a local upstream, both running in the test process on 127.0.0.1.

    replicas = ReplicaSet(self.mktemp())
    self.addCleanup(replicas.stop)
    yield replicas.start(count=2)
    response = yield replicas.request(replicas.gateways[0], replicas.mint())

Everything a L{ReplicaSet} writes to Redis is for its own zone, and
L{ReplicaSet.stop} removes it again: the revocation entries it published
(and their dead-letter copies), the JTI keys of its zone and the audit events
about its zone.
"""

from __future__ import annotations

import json
import os
import secrets
import time

from twisted.internet import defer, task
from twisted.internet.ssl import Certificate
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from caracal.gateway.revocations import REVOCATION_STREAM, sign_fields
from tests.support.certs import make_chain
from tests.support.postgres import TemporaryDatabase
from tests.support.process import START_TIMEOUT, GatewayProcess, free_port, gateway_environ
from tests.support.redis import SHARED_PORT, SyncRedis
from tests.support.sts import start_dev_sts, stop_listening
from tests.support.upstreams import LocalUpstream

DEAD_LETTER_STREAM = REVOCATION_STREAM + ".dead"
AUDIT_STREAM = "caracal.audit.events"
RESOURCE = "tools"


class Refusal(AssertionError):
    """A gateway answered something other than what the test waited for."""


class ReplicaSet:
    """
    Gateways as separate processes on distinct free ports of 127.0.0.1, all
    over TLS with one test certificate chain, in dev mode, with a random
    C{STREAMS_HMAC_KEY} and a zone of their own.

    @ivar zone: the zone id of this set's resource and tokens.
    @ivar hmac_key: the C{STREAMS_HMAC_KEY} every gateway gets.
    @ivar gateways: the L{GatewayProcess}es started so far, in order.
    @ivar revocation_ids: the entries this set XADDed to the revocation stream.
    """

    def __init__(
        self,
        directory: str,
        redis_port: int = SHARED_PORT,
        reactor=None,
        database: TemporaryDatabase | None = None,
    ) -> None:
        """
        @param database: the (not yet created) database to use; by default a
            L{TemporaryDatabase} on the shared server.
        """
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.zone = f"zone-replicas-{secrets.token_hex(6)}"
        #: The smallest stream id an entry of this set can have: its streams
        #: are shared (the audit stream holds up to a million entries), so
        #: they are read from here on, never whole. A minute early, in case
        #: the clock steps back a little.
        self.first_entry_id = f"{int(time.time() * 1000) - 60_000}-0"
        self.hmac_key = secrets.token_bytes(32)
        self.redis_port = redis_port
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.database = database if database is not None else TemporaryDatabase()
        self.gateways: list[GatewayProcess] = []
        self.revocation_ids: list[str] = []
        self._started: list[str] = []
        #: More variables for every gateway started from now on.
        self.extra_env: dict[str, str] = {}

    # Lifecycle

    @defer.inlineCallbacks
    def start(self, count: int = 2, timeout: float = START_TIMEOUT):
        """
        Create the database with this set's resource, start the dev STS and
        the upstream, then C{count} gateways in parallel; fires when each of
        them answers C{GET /health} (within C{timeout} seconds).
        """
        self.database.create()
        self._started.append("database")
        self.sts, self.sts_url, self.sts_port = yield start_dev_sts(self.reactor)
        self._started.append("sts")
        self.upstream = LocalUpstream(self.reactor).start()
        self._started.append("upstream")
        self.database.execute(
            "INSERT INTO gateway_resources (resource_identifier, zone_id, application_id,"
            " upstream_url) VALUES (%s, %s, %s, %s)",
            (RESOURCE, self.zone, "app-replicas", self.upstream.url("/api")),
        )
        self.root, _leaf = make_chain(self.directory)
        self.pool = HTTPConnectionPool(self.reactor, persistent=True)
        self.pool.maxPersistentPerHost = 4
        self.pool.retryAutomatically = False
        policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(self.root.pem))
        self.agent = Agent(self.reactor, contextFactory=policy, pool=self.pool)
        self._started.append("client")
        yield defer.gatherResults(
            [self.add_gateway(timeout) for _ in range(count)], consumeErrors=True
        ).addErrback(lambda failure: failure.value.subFailure)

    def environ(self, port: int) -> dict[str, str]:
        """The environment of a gateway listening on C{port}."""
        environ, _root = gateway_environ(
            os.path.join(self.directory, f"gateway-{port}"),
            port,
            tls=False,
            INSECURE_HTTP=None,
            TLS_CERT_FILE=os.path.join(self.directory, "server.crt"),
            TLS_KEY_FILE=os.path.join(self.directory, "server.key"),
            INSECURE_STS="true",
            STS_URL=self.sts_url,
            DATABASE_URL=self.database.url,
            REDIS_URL=self.redis_url,
            STREAMS_HMAC_KEY=self.hmac_key.hex(),
            ALLOW_PRIVATE_UPSTREAMS="true",
            LOG_LEVEL="info",
        )
        environ.update(self.extra_env)
        return environ

    @defer.inlineCallbacks
    def add_gateway(self, timeout: float = START_TIMEOUT):
        """
        Start one more gateway process; fires with its L{GatewayProcess} once
        it answers C{GET /health} (no proxied call made: the caller decides
        what the first one is). A gateway whose dependencies are down listens
        only after its startup wait (10 s): give it a longer C{timeout}.
        """
        port = free_port()
        directory = os.path.join(self.directory, f"gateway-{port}")
        os.makedirs(directory, exist_ok=True)
        gateway = GatewayProcess(
            self.environ(port), cwd=directory, root=self.root, reactor=self.reactor
        )
        self.gateways.append(gateway)
        yield gateway.start(timeout)
        return gateway

    @defer.inlineCallbacks
    def serving(self, gateway: GatewayProcess, timeout: float = 10.0):
        """Wait until C{gateway} forwards a call of this zone (its stores are loaded)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                code, _body = yield self.call(gateway, self.mint(use="ambient"))
            except Exception as error:  # connection refused while it starts
                code, _body = None, repr(error)
            if code == 200:
                return
            if time.monotonic() > deadline:
                raise Refusal(f"gateway {gateway.port} not serving: {code} {_body!r}")
            yield task.deferLater(self.reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def stop(self):
        """
        Stop every gateway (SIGTERM, exit awaited), the upstream and the STS,
        drop the database and remove this set's Redis data.
        """
        statuses = yield defer.gatherResults(
            [gateway.stop() for gateway in self.gateways if gateway.status is None]
        )
        if "client" in self._started:
            yield self.pool.closeCachedConnections()
        if "upstream" in self._started:
            yield self.upstream.stop()
        if "sts" in self._started:
            yield stop_listening(self.sts_port)
        if "database" in self._started:
            self.database.drop()
        self.clean_redis()
        return statuses

    def clean_redis(self) -> None:
        """Delete what this set left in Redis (best effort when Redis is gone)."""
        try:
            redis = SyncRedis(port=self.redis_port)
        except OSError:
            return
        try:
            if self.revocation_ids:
                redis.call("XDEL", REVOCATION_STREAM, *self.revocation_ids)
            for stream in (DEAD_LETTER_STREAM, AUDIT_STREAM):
                mine = [entry_id for entry_id, _ in self.entries(stream, redis)]
                if mine:
                    redis.call("XDEL", stream, *mine)
            cursor = "0"
            while True:
                cursor, keys = redis.call(
                    "SCAN", cursor, "MATCH", f"seen:jti:{self.zone}:*", "COUNT", 1000
                )
                if keys:
                    redis.call("DEL", *keys)
                if cursor == "0":
                    break
        finally:
            redis.close()

    # Calls

    def mint(self, use: str = "per_call", session_id: str | None = None, **options) -> str:
        """A caller token of this set's zone, from the dev STS."""
        return self.sts.mint(self.zone, "agent-replicas", use=use, session_id=session_id, **options)

    def mint_without_session(self, use: str = "ambient") -> str:
        """
        A caller token of this set's zone naming no session (no C{sid}, no
        C{agent_session_id}), signed by the zone's key: the dev STS's own
        C{mint} always adds a C{sid}.
        """
        import jwt

        from caracal.devsts.service import ISSUER

        key = self.sts.zone_key(self.zone)
        now = self.sts.now()
        claims = {
            "iss": ISSUER,
            "sub": "agent-replicas",
            "zone_id": self.zone,
            "iat": now,
            "exp": now + 300,
            "use": use,
        }
        return jwt.encode(claims, key.private_key, algorithm="ES256", headers={"kid": key.kid})

    def url(self, gateway: GatewayProcess, path: str = "/tools/run") -> str:
        return f"https://127.0.0.1:{gateway.port}{path}"

    @defer.inlineCallbacks
    def call(
        self, gateway: GatewayProcess, token: str, timeout: float = 5.0, resource: str = RESOURCE
    ):
        """
        One proxied call through C{gateway} with C{token} to C{resource}.
        Fires with C{(status, body)}, the body parsed as JSON when it is JSON.
        """
        import treq

        response = yield treq.request(
            "POST",
            self.url(gateway),
            headers={
                b"Authorization": [b"Bearer " + token.encode()],
                b"X-Caracal-Resource": [resource.encode()],
                b"Content-Type": [b"application/json"],
            },
            data=b"{}",
            agent=self.agent,
            timeout=timeout,
        )
        body = yield response.content()
        content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
        if content_type.startswith(b"application/json"):
            body = json.loads(body)
        return response.code, body

    @defer.inlineCallbacks
    def ready(self, gateway: GatewayProcess, timeout: float = 5.0):
        """C{GET /ready} on C{gateway}: fires with C{(status, parsed JSON body)}."""
        import treq

        response = yield treq.get(self.url(gateway, "/ready"), agent=self.agent, timeout=timeout)
        body = yield response.content()
        return response.code, json.loads(body)

    @defer.inlineCallbacks
    def outcome(self, gateway: GatewayProcess, token: str):
        """C{"allowed"} (200 from the upstream) or the error code the gateway answered."""
        code, body = yield self.call(gateway, token)
        if code == 200:
            return "allowed"
        if isinstance(body, dict) and "error" in body:
            return body["error"]
        raise Refusal(f"gateway {gateway.port} answered {code}: {body!r}")

    # Revocations

    def revoke(self, session_id: str, signature: str | None = "valid", entry_id: str = "*") -> str:
        """
        XADD a revocation of C{session_id} in this set's zone; returns its id.

        @param signature: C{"valid"} signs with the set's key, C{None} sends
            no C{_sig}, any other string is sent as the C{_sig} as it is.
        @param entry_id: the entry id to ask for (C{*}: Redis picks one).
        """
        fields = {"zone_id": self.zone, "session_id": session_id}
        if signature == "valid":
            fields["_sig"] = sign_fields(self.hmac_key, REVOCATION_STREAM, fields)
        elif signature is not None:
            fields["_sig"] = signature
        arguments = ["XADD", REVOCATION_STREAM, entry_id]
        for name, value in fields.items():
            arguments += [name, value]
        redis = SyncRedis(port=self.redis_port)
        try:
            new_id = redis.call(*arguments)
        finally:
            redis.close()
        self.revocation_ids.append(new_id)
        return new_id

    def entries(self, stream: str, redis: SyncRedis | None = None) -> list[tuple[str, dict]]:
        """The entries of C{stream} about this set's zone, as C{(id, fields)}."""
        own = redis is None
        if own:
            redis = SyncRedis(port=self.redis_port)
        try:
            reply = redis.call("XRANGE", stream, self.first_entry_id, "+") or []
        finally:
            if own:
                redis.close()
        found = []
        for entry_id, flat in reply:
            fields = dict(zip(flat[0::2], flat[1::2], strict=True))
            zone = fields.get("zone_id")
            if zone is None and "data" in fields:
                try:
                    zone = json.loads(fields["data"]).get("zone_id")
                except (ValueError, AttributeError):
                    zone = None
            if zone == self.zone:
                found.append((entry_id, fields))
        return found

    @defer.inlineCallbacks
    def first_refusal(
        self,
        gateway: GatewayProcess,
        session_id: str,
        since: float,
        interval: float = 0.005,
        timeout: float = 2.0,
    ):
        """
        Poll C{gateway} with fresh ambient tokens of C{session_id}, one call
        at a time C{interval} seconds apart, until it answers 401
        C{session_revoked}. Fires with the seconds from C{since} (a
        C{time.monotonic()} reading) to that answer.

        @raise Refusal: another answer than 200 or C{session_revoked}, or
            still allowed after C{timeout} seconds.
        """
        while True:
            outcome = yield self.outcome(gateway, self.mint(use="ambient", session_id=session_id))
            now = time.monotonic()
            if outcome == "session_revoked":
                return now - since
            if outcome != "allowed":
                raise Refusal(f"gateway {gateway.port} answered {outcome!r} for {session_id}")
            if now - since > timeout:
                raise Refusal(f"gateway {gateway.port} still allows {session_id} after {timeout} s")
            yield task.deferLater(self.reactor, interval, lambda: None)
