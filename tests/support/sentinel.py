# -*- test-case-name: tests.integration.test_sentinel -*-
"""
A Redis Sentinel deployment of the test's own, on 127.0.0.1: a master, one
replica and one sentinel (quorum 1, short down-after and failover timeouts),
each a private process on a free port, never the shared Redis.

    group = SentinelGroup(self.mktemp())
    self.addCleanup(group.stop)
    group.start()
    url = group.url                      # redis+sentinel://127.0.0.1:<port>/<name>
    group.failover()                     # SENTINEL FAILOVER, returns at once
    yield group.wait_for_new_master(old)

Both data nodes run with C{min-replicas-to-write 1}, as the README asks of a
production deployment: a master cut off from its replica (the old master
while a failover promotes the replica) refuses writes instead of accepting
JTI claims that the new master will never see.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from urllib.parse import quote

from twisted.internet import defer

from tests.support.redis import PrivateRedis, SyncRedis
from tests.support.servers import stop_server, wait_for_server
from tests.support.waiting import free_port, wait_until

MASTER_NAME = "caracal-test"

#: Keep a failed master's clients waiting this little before failing over.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000

_DATA_NODE_ARGUMENTS = (
    "--min-replicas-to-write",
    "1",
    "--min-replicas-max-lag",
    "10",
    # A joining replica syncs at once instead of after the default 5 s.
    "--repl-diskless-sync-delay",
    "0",
)
#: DEBUG SLEEP (L{SentinelGroup.stall}) from the test's own loopback client.
_DEBUG_ARGUMENTS = ("--enable-debug-command", "local")


class _DataNode(PrivateRedis):
    """A L{PrivateRedis} whose clients authenticate when it has a password."""

    def __init__(self, password: str | None, extra_arguments: tuple[str, ...]) -> None:
        super().__init__(extra_arguments=extra_arguments)
        self.password = password

    def client(self, timeout: float = 2.0) -> SyncRedis:
        """A synchronous client, authenticated (C{AUTH}) when the node asks for it."""
        client = super().client(timeout)
        if self.password is not None:
            try:
                client.call("AUTH", self.password)
            except BaseException:
                client.close()
                raise
        return client


class SentinelGroup:
    """
    Master, replica and sentinel. C{stop} stops all three (register it as a
    cleanup before C{start}).

    @ivar nodes: both data nodes (L{PrivateRedis}), by port.
    """

    def __init__(
        self,
        directory: str,
        name: str = MASTER_NAME,
        isolated_old_master: bool = False,
        password: str | None = None,
    ) -> None:
        """
        @param isolated_old_master: the first master ignores the sentinel's
            order to become a replica (C{REPLICAOF} is disabled on it), as a
            master cut off from the sentinels but not from the gateways would:
            after a failover it goes on answering as a master, and only the
            gateway's own watch of the sentinels moves it to the new one.
            Neither node then asks for C{min-replicas-to-write}, or the new
            master, left without a replica, would refuse every write.
        @param password: the data nodes require it (C{requirepass}) and use
            it with each other (C{masterauth}); the sentinel monitors them
            with it (C{auth-pass}) and asks none of its own clients. L{url}
            then carries it, as SPEC 16 writes it.
        """
        self.directory = os.path.abspath(directory)
        self.name = name
        self.password = password
        arguments = _DEBUG_ARGUMENTS + (() if isolated_old_master else _DATA_NODE_ARGUMENTS)
        if password is not None:
            arguments += ("--requirepass", password, "--masterauth", password)
        isolation = ("--rename-command", "REPLICAOF", "", "--rename-command", "SLAVEOF", "")
        first = _DataNode(
            password,
            extra_arguments=(
                *arguments,
                *(isolation if isolated_old_master else ()),
                "--dir",
                self._node_directory("first"),
            ),
        )
        second = _DataNode(
            password,
            extra_arguments=(
                *arguments,
                "--dir",
                self._node_directory("second"),
                "--replicaof",
                "127.0.0.1",
                str(first.port),
            ),
        )
        self.nodes = {first.port: first, second.port: second}
        self.initial_master = first.port
        self.sentinel_port = free_port()
        self._sentinel: subprocess.Popen | None = None

    def _node_directory(self, name: str) -> str:
        # Where a node keeps the files replication writes (never the cwd).
        path = os.path.join(self.directory, name)
        os.makedirs(path, exist_ok=True)
        return path

    @property
    def url(self) -> str:
        """C{REDIS_URL} for the gateway."""
        credentials = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        return f"redis+sentinel://{credentials}127.0.0.1:{self.sentinel_port}/{self.name}"

    def start(self, deadline: float = 20.0) -> None:
        """Start the nodes and the sentinel; return once the sentinel knows the replica."""
        for node in self.nodes.values():
            node.start()
        config = os.path.join(self.directory, "sentinel.conf")
        with open(config, "w") as output:
            output.write(
                f"port {self.sentinel_port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.directory}\n"
                f"sentinel monitor {self.name} 127.0.0.1 {self.initial_master} 1\n"
                f"sentinel down-after-milliseconds {self.name} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {self.name} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {self.name} 1\n"
            )
            if self.password is not None:
                output.write(f"sentinel auth-pass {self.name} {self.password}\n")
        executable = shutil.which("redis-server") or "redis-server"
        self._sentinel = subprocess.Popen(
            [executable, config, "--sentinel", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_server(
            self._sentinel,
            self._replica_known,
            deadline,
            "the sentinel did not come up with a replica it can promote",
            interval=0.05,
        )

    def _replica_known(self) -> bool:
        """The sentinel sees a healthy replica in sync: a failover can be asked for."""
        try:
            replicas = self.sentinel_call("SENTINEL", "REPLICAS", self.name)
        except (OSError, ConnectionError):
            return False
        for flat in replicas or []:
            fields = dict(zip(flat[0::2], flat[1::2], strict=True))
            if fields.get("flags") == "slave" and fields.get("master-link-status") == "ok":
                return True
        return False

    def sentinel_call(self, *arguments):
        """One command to the sentinel."""
        client = SyncRedis(port=self.sentinel_port, timeout=2.0)
        try:
            return client.call(*arguments)
        finally:
            client.close()

    def client(self, port: int) -> SyncRedis:
        """A synchronous client to the data node on C{port}, authenticated if need be."""
        return self.nodes[port].client()

    def master_port(self) -> int:
        """The master's port as the sentinel names it now."""
        _host, port = self.sentinel_call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
        return int(port)

    def role(self, port: int) -> str:
        """What the node on C{port} says it is (C{master} or C{slave})."""
        client = self.client(port)
        try:
            return client.call("ROLE")[0]
        finally:
            client.close()

    def replica_port(self) -> int:
        """The port of the data node the sentinel does not name as the master."""
        master = self.master_port()
        (port,) = (port for port in self.nodes if port != master)
        return port

    def stall(self, port: int, seconds: float):
        """
        Freeze the node on C{port} for C{seconds} (C{DEBUG SLEEP}) and return
        at once: what reaches it meanwhile (replication, a sentinel's orders)
        waits in its sockets. Returns a callable closing the connection used.
        """
        connection = socket.create_connection(("127.0.0.1", port), timeout=2.0)
        commands = [("DEBUG", "SLEEP", f"{seconds:.3f}")]
        if self.password is not None:
            commands.insert(0, ("AUTH", self.password))
        parts = []
        for command in commands:
            parts.append(b"*%d\r\n" % len(command))
            for argument in command:
                parts.append(b"$%d\r\n%s\r\n" % (len(argument), argument.encode()))
        connection.sendall(b"".join(parts))
        return connection.close

    def failover(self) -> None:
        """Ask the sentinel for a failover now (C{SENTINEL FAILOVER}); returns at once."""
        self.sentinel_call("SENTINEL", "FAILOVER", self.name)

    def wait_for_new_master(self, old_port: int, timeout: float = 30.0) -> defer.Deferred:
        """
        Fires with the new master's port once the sentinel names another
        master than C{old_port}, that node says it is the master, and it takes
        writes (its new replica, the old master, has attached to it).
        """
        found: list[int] = []

        def switched() -> bool:
            port = self.master_port()
            if port == old_port or self.role(port) != "master":
                return False
            client = self.client(port)
            try:
                # min-replicas-to-write: refused until the old master follows.
                client.call("SET", "caracal-test:failover-probe", "1", "PX", 1000)
            finally:
                client.close()
            found[:] = [port]
            return True

        d = wait_until(switched, timeout=timeout, interval=0.05)
        return d.addCallback(lambda _: found[0])

    def stop(self) -> None:
        """Stop the sentinel and both nodes (no-op for what is not running)."""
        process, self._sentinel = self._sentinel, None
        stop_server(process)
        for node in self.nodes.values():
            node.stop()
