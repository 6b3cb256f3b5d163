"""
Redis for tests: unique names on the shared server (127.0.0.1:6379), a
private C{redis-server} that a test may stop and restart (outage tests never
touch the shared one) and a tiny synchronous client for setup and
inspection. Polling helpers live in L{tests.support.waiting}.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import uuid

from caracal.gateway.config import RedisAddress
from tests.support.servers import stop_server, wait_for_server
from tests.support.waiting import free_port

SHARED_HOST = "127.0.0.1"
SHARED_PORT = 6379


def redis_namespace(kind: str = "test") -> str:
    """A random, colon-free name prefix (usable as a zone id or stream name part)."""
    return f"{kind}-{uuid.uuid4().hex[:16]}"


def shared_address() -> RedisAddress:
    """The shared Redis every integration test uses (with unique names)."""
    return RedisAddress(host=SHARED_HOST, port=SHARED_PORT, db=0)


class RedisReplyError(Exception):
    """Redis answered with an error reply."""


class SyncRedis:
    """
    A minimal blocking RESP client for test setup and inspection (one short
    command at a time; never used for blocking reads).
    """

    def __init__(
        self,
        host: str = SHARED_HOST,
        port: int = SHARED_PORT,
        timeout: float = 2.0,
        tls: ssl.SSLContext | None = None,
    ):
        self._socket = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            self._socket = tls.wrap_socket(self._socket, server_hostname=host)
        self._buffer = b""

    def close(self) -> None:
        """Close the connection."""
        self._socket.close()

    def call(self, *arguments):
        """Send one command and return its decoded reply (bulk strings as str)."""
        parts = [b"*%d\r\n" % len(arguments)]
        for argument in arguments:
            data = argument if isinstance(argument, bytes) else str(argument).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._socket.sendall(b"".join(parts))
        return self._reply()

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            chunk = self._socket.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def _exact(self, size: int) -> bytes:
        while len(self._buffer) < size + 2:
            chunk = self._socket.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self._buffer += chunk
        data, self._buffer = self._buffer[:size], self._buffer[size + 2 :]
        return data

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisReplyError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self._exact(size).decode("utf-8", "replace")
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._reply() for _ in range(count)]
        raise ConnectionError(f"unexpected reply {line!r}")


class PrivateRedis:
    """
    A C{redis-server} of the test's own, on 127.0.0.1 and a free port, with
    no persistence: started, stopped and restarted (same port) by the test
    to simulate an outage. Register C{stop} as a cleanup.

    With C{tls_directory}, it speaks TLS only (C{rediss}), with a certificate
    for C{localhost} / C{127.0.0.1} from a test CA written there
    (C{redis-ca.pem} is the root to trust).
    """

    def __init__(
        self, tls_directory: str | None = None, extra_arguments: tuple[str, ...] = ()
    ) -> None:
        """
        @param extra_arguments: more C{redis-server} options (e.g. C{--replicaof}).
        """
        self.extra_arguments = extra_arguments
        self.port = free_port()
        self._process: subprocess.Popen | None = None
        self.tls_directory = tls_directory
        self.ca_file = None
        if tls_directory is not None:
            from tests.support.certs import make_chain

            make_chain(tls_directory, "redis")
            self.ca_file = os.path.join(tls_directory, "redis-ca.pem")

    @property
    def address(self) -> RedisAddress:
        """Where this server listens."""
        host = "localhost" if self.tls_directory else "127.0.0.1"
        return RedisAddress(host=host, port=self.port, db=0, tls=self.tls_directory is not None)

    def _listen_arguments(self) -> list[str]:
        if self.tls_directory is None:
            return ["--port", str(self.port)]
        directory = self.tls_directory
        return [
            "--port",
            "0",
            "--tls-port",
            str(self.port),
            "--tls-cert-file",
            os.path.join(directory, "redis.crt"),
            "--tls-key-file",
            os.path.join(directory, "redis.key"),
            "--tls-ca-cert-file",
            self.ca_file,
            "--tls-auth-clients",
            "no",
        ]

    def _client_tls(self) -> ssl.SSLContext | None:
        if self.tls_directory is None:
            return None
        return ssl.create_default_context(cafile=self.ca_file)

    def start(self, deadline: float = 10.0) -> None:
        """Start the server and wait until it answers C{PING}."""
        executable = shutil.which("redis-server") or "redis-server"
        self._process = subprocess.Popen(
            [
                executable,
                "--bind",
                "127.0.0.1",
                *self._listen_arguments(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                *self.extra_arguments,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def answers() -> bool:
            client = self.client(timeout=0.5)
            try:
                return client.call("PING") == "PONG"
            finally:
                client.close()

        wait_for_server(
            self._process,
            answers,
            deadline,
            f"redis-server did not start on port {self.port}",
            not_yet=(OSError,),
        )

    def stop(self) -> None:
        """Stop the server (no-op when it is not running) and wait for it to exit."""
        process, self._process = self._process, None
        stop_server(process)

    def client(self, timeout: float = 2.0) -> SyncRedis:
        """A synchronous client to this server."""
        host = "localhost" if self.tls_directory else "127.0.0.1"
        return SyncRedis(host, self.port, timeout=timeout, tls=self._client_tls())
