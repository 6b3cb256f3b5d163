"""
A whole gateway in the test process, listening over TLS on 127.0.0.1, wired
to the real Postgres (a temporary database), the real Redis, the dev STS and
a local upstream. Used by the end-to-end pipeline tests.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile

import treq
from twisted.internet import defer, reactor, task
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.client import Agent, HTTPConnectionPool

from caracal.gateway.app import build_gateway
from caracal.gateway.config import GatewayConfig
from caracal.gateway.tls import ServerTLS, client_tls_policy
from tests.support.certs import make_chain
from tests.support.postgres import TemporaryDatabase
from tests.support.redis import SyncRedis
from tests.support.sts import start_dev_sts, stop_listening
from tests.support.upstreams import LocalUpstream


class GatewayHarness:
    """
    Start with L{start}, stop with L{stop}. C{env} overrides the environment
    the gateway's configuration is read from.

    @ivar zone: a zone id unique to this harness (keys in Redis are per zone).
    """

    def __init__(self, **env: str) -> None:
        self.extra_env = env
        self.zone = f"zone-{secrets.token_hex(4)}"
        self.hmac_key = secrets.token_bytes(32)
        self.directory = tempfile.mkdtemp(prefix="caracal-gw-")
        self.root, self.leaf = make_chain(self.directory)
        self.ca_file = os.path.join(self.directory, "server-ca.pem")
        self.cert_file = os.path.join(self.directory, "server.crt")
        self.key_file = os.path.join(self.directory, "server.key")
        self.database = TemporaryDatabase()
        self.redis = SyncRedis()
        self.stream_ids: list[str] = []

    @defer.inlineCallbacks
    def start(self):
        self.database.create()
        self.sts, self.sts_url, self.sts_port = yield start_dev_sts(reactor)
        self.upstream = LocalUpstream(reactor).start()
        env = {
            "CARACAL_ENV": "dev",
            "PORT": "8081",  # unused: the harness listens on a free port itself
            "BIND_ADDRESS": "127.0.0.1",
            "TLS_CERT_FILE": self.cert_file,
            "TLS_KEY_FILE": self.key_file,
            "INSECURE_STS": "true",
            "STS_URL": self.sts_url,
            "DATABASE_URL": self.database.url,
            "REDIS_URL": "redis://127.0.0.1:6379/0",
            "STREAMS_HMAC_KEY": self.hmac_key.hex(),
            "ALLOW_PRIVATE_UPSTREAMS": "true",
            "AUDIT_SPOOL_DIR": os.path.join(self.directory, "audit-spool"),
        }
        env.update(self.extra_env)
        self.config = GatewayConfig.from_environ(env)
        self.gateway = build_gateway(self.config, reactor)
        self.gateway.service.startService()
        yield self.gateway.pipeline.resources.loaded
        self.server_tls = ServerTLS(self.cert_file, self.key_file, reactor)
        factory = TLSMemoryBIOFactory(self.server_tls.creator, False, self.gateway.site)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.base_url = f"https://localhost:{self.port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = treq.client.HTTPClient(
            Agent(reactor, contextFactory=client_tls_policy(self.ca_file), pool=self.pool)
        )
        for service in self.gateway.service:
            when_ready = getattr(service, "when_ready", None)
            if when_ready is not None:
                yield when_ready()

    @defer.inlineCallbacks
    def stop(self):
        """
        Stop whatever L{start} got to start, in reverse order; always drop the
        database and remove the harness's directory.
        """
        try:
            if hasattr(self, "pool"):
                yield self.pool.closeCachedConnections()
            if hasattr(self, "port"):
                yield defer.maybeDeferred(self.port.stopListening)
            if hasattr(self, "gateway"):
                yield defer.maybeDeferred(self.gateway.service.stopService)
                # txredisapi hands the rest of a packet that held a bulk reply
                # to a zero-delay call on the global reactor; one more turn
                # lets it run, so trial finds the reactor clean.
                yield task.deferLater(reactor, 0, lambda: None)
            if hasattr(self, "upstream"):
                yield self.upstream.stop()
            if hasattr(self, "sts_port"):
                yield stop_listening(self.sts_port)
            for key in self.redis.call("KEYS", f"seen:jti:{self.zone}:*") or []:
                self.redis.call("DEL", key)
            if self.stream_ids:
                self.redis.call("XDEL", "caracal.sessions.revoke", *self.stream_ids)
            self._delete_entries_of_zone("caracal.audit.events")
            self._delete_entries_of_zone("caracal.sessions.revoke.dead")
        finally:
            self.redis.close()
            self.database.drop()
            # The generated certificates and key, and the audit spool.
            shutil.rmtree(self.directory, ignore_errors=True)

    def _delete_entries_of_zone(self, stream: str) -> None:
        """XDEL this harness's entries (its zone is unique) from a shared stream."""
        entries = self.redis.call("XREVRANGE", stream, "+", "-", "COUNT", "2000") or []
        ours = [
            entry_id
            for entry_id, fields in entries
            if any(self.zone in str(value) for value in fields)
        ]
        if ours:
            self.redis.call("XDEL", stream, *ours)

    def add_resource(
        self,
        identifier: str = "tools",
        upstream: str | None = None,
        auth_mode: str = "caracal_jwt",
        auth_header: str | None = None,
        auth_scheme: str | None = None,
    ) -> None:
        """Insert a row into gateway_resources (NOTIFY reaches the gateway)."""
        self.database.execute(
            "INSERT INTO gateway_resources (resource_identifier, zone_id, application_id,"
            " upstream_url, auth_mode, auth_header, auth_scheme)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (
                identifier,
                self.zone,
                "app-1",
                upstream or self.upstream.url("/api"),
                auth_mode,
                auth_header,
                auth_scheme,
            ),
        )

    def mint(self, **claims) -> str:
        """A caller token for this harness's zone, from the dev STS."""
        return self.sts.mint(self.zone, "agent-1", **claims)

    def request(
        self,
        token=None,
        resource="tools",
        path="/tools/run",
        method="POST",
        headers=None,
        data=b"{}",
    ):
        """Send one request through the gateway; fires with the treq response."""
        all_headers = {}
        if token is not None:
            all_headers[b"Authorization"] = [b"Bearer " + token.encode()]
        if resource is not None:
            all_headers[b"X-Caracal-Resource"] = [resource.encode()]
        all_headers.update(headers or {})
        return self.client.request(method, self.base_url + path, headers=all_headers, data=data)

    def revoke(self, session_id: str, sign: bool = True) -> str:
        """XADD a revocation for C{session_id} to the shared stream."""
        from caracal.gateway.revocations import sign_fields

        fields = {"zone_id": self.zone, "session_id": session_id}
        if sign:
            fields["_sig"] = sign_fields(self.hmac_key, "caracal.sessions.revoke", fields)
        arguments = ["XADD", "caracal.sessions.revoke", "*"]
        for name, value in fields.items():
            arguments += [name, value]
        entry = self.redis.call(*arguments)
        entry = entry.decode() if isinstance(entry, bytes) else entry
        self.stream_ids.append(entry)
        return entry
