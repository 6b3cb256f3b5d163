# -*- test-case-name: tests.integration.test_checkconfig,tests.test_checkconfig -*-
"""
The network probes of C{caracal-gateway-admin check-config}: can the STS,
Redis and Postgres of a configuration be reached, the way the gateway
reaches them?

Each probe goes through the gateway's own client, so that what it proves is
what the gateway will do: the STS through L{STSClient.health} with the STS
TLS policy, Redis through L{redisconn.connect_once} (the gateway's endpoint,
C{rediss} TLS, C{AUTH} and C{SELECT}; the sentinels asked in turn so that the
report names the one that answered) and L{redisconn.check_redis},
Postgres through txpostgres with the resource registry's
L{connection_parameters}. Each is a function C{probe(config, timeout,
reactor)} returning a L{Deferred} that fires with a detail for the PASS line
or fails with L{ProbeFailed}; L{settled_probes} runs the ones a configuration
needs on the global reactor, all at once, and hands the checklist their
outcomes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import txredisapi
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer
from twisted.internet import error as internet_error
from twisted.python.failure import Failure
from txpostgres.txpostgres import Connection

from caracal.gateway import redisconn
from caracal.gateway.config import ConfigError, GatewayConfig, RedisAddress
from caracal.gateway.pools import OriginPool
from caracal.gateway.registry import connection_parameters
from caracal.gateway.sts import STSClient, STSUnavailable
from caracal.gateway.tls import client_tls_policy


class ProbeFailed(Exception):
    """A network probe did not succeed; C{str()} is the one-line reason."""


@dataclass(frozen=True)
class Probes:
    """
    The network probes as the checklist calls them, each C{probe(config,
    timeout) -> str} (a detail for the PASS line) raising L{ProbeFailed}.
    """

    sts: Callable[[GatewayConfig, float], str]
    redis: Callable[[GatewayConfig, float], str]
    postgres: Callable[[GatewayConfig, float], str]


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _scrub(text: str, *secrets: str | bytes | None) -> str:
    """C{text} without any of C{secrets} (libraries may quote what they were given)."""
    for secret in secrets:
        if isinstance(secret, bytes):
            secret = secret.decode("latin-1")
        if secret:
            text = text.replace(secret, "***")
    return text


def _tls_reason(error: BaseException) -> str:
    """An OpenSSL error list as its reason strings."""
    reasons = []
    for entry in getattr(error, "args", ()) or ():
        if isinstance(entry, list):
            reasons += [item[-1] for item in entry if isinstance(item, tuple) and item[-1]]
    return ", ".join(reasons) or type(error).__name__


#: What a call cut at its time limit fails with (a cancelled call included).
_TIMEOUTS = (
    internet_error.TimeoutError,
    defer.TimeoutError,
    TimeoutError,
    defer.CancelledError,
)


def describe_connection_failure(failure: Failure) -> str:
    """
    One line for why a connection or an HTTP call through Twisted's Agent
    failed: the wrapped reasons (TLS verification, hostname, refused,
    timeout) unwrapped.
    """
    value = failure.value
    reasons = getattr(value, "reasons", None)
    if reasons:
        return "; ".join(describe_connection_failure(reason) for reason in reasons)
    if isinstance(value, VerificationError):
        return f"the certificate does not match the host name ({_one_line(value)})"
    if isinstance(value, SSL.Error):
        return f"TLS handshake failed: {_tls_reason(value)}"
    if isinstance(value, internet_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, internet_error.DNSLookupError):
        return "cannot resolve the host name"
    # A bounded call is cancelled at its time limit.
    timeouts = (
        internet_error.TimeoutError | defer.TimeoutError | TimeoutError | defer.CancelledError
    )
    if isinstance(value, timeouts):
        return "no answer in time"
    if isinstance(value, internet_error.ConnectionDone | internet_error.ConnectionLost):
        return "the connection was closed before an answer"
    return _one_line(value) or type(value).__name__


# -- the STS ---------------------------------------------------------------


def probe_sts(config: GatewayConfig, timeout: float, reactor) -> defer.Deferred:
    """
    C{GET {STS_URL}/health} through L{STSClient.health}, with the gateway's
    STS policy (C{STS_CA_FILE} plus the platform roots, the host name
    verified) and a connection of its own.
    """
    policy = client_tls_policy(config.sts_ca_file, variable="STS_CA_FILE")
    client = STSClient(
        config.sts_base_url,
        reactor,
        tls_policy=policy,
        timeout=timeout,
        pool=OriginPool(reactor, max_idle=0),
    )
    started = time.monotonic()

    def answered(_):
        elapsed = (time.monotonic() - started) * 1000
        return f"GET /health answered 200 over verified TLS in {elapsed:.0f} ms"

    def failed(failure):
        cause = failure.value.__cause__ if failure.check(STSUnavailable) else None
        if cause is None and failure.check(STSUnavailable):
            # The STS answered, with another status: the client says which.
            status = str(failure.value).rsplit(" ", 1)[-1]
            raise ProbeFailed(f"GET /health answered HTTP {status}")
        reason = describe_connection_failure(Failure(cause) if cause is not None else failure)
        raise ProbeFailed(f"GET /health failed: {reason}")

    d = client.health().addCallbacks(answered, failed)
    return d.addBoth(lambda outcome: client.close().addBoth(lambda _: outcome))


# -- Redis -----------------------------------------------------------------


def _connect_reason(failure: Failure, password: str | None) -> str:
    """Why L{redisconn.connect_once} failed: the connection, or C{AUTH}/C{SELECT}."""
    cause = failure.value.__cause__ if failure.check(redisconn.RedisUnavailable) else None
    if isinstance(cause, internet_error.ConnectionRefusedError):
        return "cannot connect: Connection refused"
    if isinstance(cause or failure.value, _TIMEOUTS):
        return "cannot connect: timed out"
    if cause is not None:
        return f"cannot connect: {describe_connection_failure(Failure(cause))}"
    return _scrub(_one_line(failure.getErrorMessage()), password) or failure.type.__name__


def _replicas_enough(connection, timeout: float, reactor, min_replicas: int) -> defer.Deferred:
    """
    C{ROLE}: the server is a master with at least C{min_replicas} connected
    replicas (what C{REPLAY_MIN_REPLICAS} waits for on every claim); the
    detail, or L{ProbeFailed}.
    """
    d = connection.execute_command("ROLE")
    d.addTimeout(timeout, reactor)

    def judged(reply):
        role = _one_line(reply[0].decode() if isinstance(reply[0], bytes) else reply[0])
        if role != "master":
            raise ProbeFailed(f"answers ROLE {role}, not master")
        connected = len(reply[2])
        if connected < min_replicas:
            raise ProbeFailed(
                f"the master has {connected} connected replica(s) and REPLAY_MIN_REPLICAS is"
                f" {min_replicas}: every single-use token would get 503"
            )
        return f"{connected} replica(s) connected (REPLAY_MIN_REPLICAS={min_replicas})"

    def failed(failure):
        if failure.check(ProbeFailed):
            return failure
        raise ProbeFailed(f"ROLE failed: {_one_line(failure.getErrorMessage())}")

    return d.addCallbacks(judged, failed)


def _ping(address: RedisAddress, timeout: float, reactor, min_replicas: int = 0) -> defer.Deferred:
    """
    Connect to C{address} itself and C{PING} (and with C{min_replicas}, count
    the master's replicas): the detail, or L{ProbeFailed}.
    """
    started = time.monotonic()
    connected = redisconn.connect_once(address, reactor, connect_timeout=timeout)
    connected.addTimeout(timeout, reactor)

    def not_connected(failure):
        raise ProbeFailed(_connect_reason(failure, address.password))

    def ping(connection):
        d = redisconn.check_redis(connection, reactor, timeout)

        def unanswered(failure):
            if isinstance(failure.value.__cause__, _TIMEOUTS):
                raise ProbeFailed("timed out")
            raise ProbeFailed(_scrub(_one_line(failure.getErrorMessage()), address.password))

        d.addCallbacks(
            lambda _: f"PING answered PONG in {(time.monotonic() - started) * 1000:.0f} ms",
            unanswered,
        )
        if min_replicas:

            def replicas(pinged: str) -> defer.Deferred:
                counted = _replicas_enough(connection, timeout, reactor, min_replicas)
                return counted.addCallback(lambda detail: f"{pinged}; {detail}")

            d.addCallback(replicas)
        return d.addBoth(lambda outcome: _disconnected(connection, outcome))

    return connected.addCallbacks(ping, not_connected)


def _disconnected(connection, outcome):
    connection.transport.loseConnection()
    return outcome


def _sentinel_master(host: str, port: int, name: str, timeout: float, reactor):
    """Ask the sentinel at C{host}:C{port} where master C{name} is (without a password)."""
    sentinel = RedisAddress(host=host, port=port, db=0, password=None, tls=False)
    connected = redisconn.connect_once(sentinel, reactor, connect_timeout=timeout)
    connected.addTimeout(timeout, reactor)

    def ask(connection):
        d = connection.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", name)
        d.addTimeout(timeout, reactor)

        def answered(reply):
            if not reply:
                raise ProbeFailed(f"knows no master named {name}")
            master_host, master_port = reply
            return str(master_host), int(master_port)

        def failed(failure):
            if failure.check(ProbeFailed):
                return failure
            if failure.check(txredisapi.ResponseError):
                raise ProbeFailed(f"refused: {_one_line(failure.value)}")
            raise ProbeFailed(describe_connection_failure(failure))

        d.addCallbacks(answered, failed)
        return d.addBoth(lambda outcome: _disconnected(connection, outcome))

    def not_connected(failure):
        raise ProbeFailed(_connect_reason(failure, None))

    return connected.addCallbacks(ask, not_connected)


@defer.inlineCallbacks
def probe_redis(address: RedisAddress, timeout: float, reactor, min_replicas: int = 0):
    """
    A connection to C{address} (C{REDIS_URL}) as the gateway opens them
    (C{AUTH} and C{SELECT} included), then C{PING}, each step bounded by
    C{timeout}; for C{redis+sentinel://}, at the master the first sentinel
    that answers names. With C{min_replicas} (C{REPLAY_MIN_REPLICAS}), the
    master must have that many replicas connected, or every claim of a
    single-use token would fail closed.
    """
    if not address.sentinels:
        return (yield _ping(address, timeout, reactor, min_replicas))
    failures = []
    for host, port in address.sentinels:
        try:
            master = yield _sentinel_master(host, port, address.master_name, timeout, reactor)
        except ProbeFailed as failure:
            failures.append(f"sentinel {host}:{port}: {failure}")
            continue
        located = dataclasses.replace(address, host=master[0], port=master[1], sentinels=())
        detail = yield _ping(located, timeout, reactor, min_replicas)
        return f"sentinel {host}:{port} names master {master[0]}:{master[1]}; {detail}"
    raise ProbeFailed("; ".join(failures))


# -- Postgres --------------------------------------------------------------


def probe_postgres(config: GatewayConfig, timeout: float, reactor) -> defer.Deferred:
    """
    Connect to C{DATABASE_URL} with the registry's connection parameters
    (bounded by C{timeout}), check that the C{gateway_resources} table is
    there and readable, and count its rows.
    """
    try:
        parameters = connection_parameters(config.database_url)
    except ConfigError as error:
        return defer.fail(ProbeFailed(str(error)))
    password = parameters.get("password")
    parameters.update(
        connect_timeout=str(max(1, round(timeout))),
        options=f"-c statement_timeout={int(timeout * 1000)}",
        application_name="caracal-gateway-admin check-config",
    )
    connection = Connection(reactor=reactor)
    d = connection.connect(**parameters)
    d.addTimeout(timeout, reactor)

    def connect_failed(failure):
        reason = describe_connection_failure(failure)
        raise ProbeFailed(f"cannot connect: {_scrub(reason, password)}")

    def table(_):
        query = connection.runQuery("SELECT to_regclass('gateway_resources') IS NOT NULL")
        return query.addCallback(lambda rows: rows[0][0])

    def count(present):
        if not present:
            raise ProbeFailed(
                "connected, but the gateway_resources table is missing;"
                " run caracal-gateway-admin migrate"
            )
        return connection.runQuery("SELECT count(*) FROM gateway_resources")

    def query_failed(failure):
        if failure.check(ProbeFailed):
            return failure
        reason = _scrub(_one_line(failure.getErrorMessage()), password)
        raise ProbeFailed(f"gateway_resources: {reason}")

    def close(outcome):
        if not connection.closed:
            connection.close()
        return outcome

    d.addCallbacks(table, connect_failed)
    d.addCallback(count)
    d.addCallback(lambda rows: f"connected; gateway_resources readable ({rows[0][0]} resources)")
    d.addErrback(query_failed)
    return d.addBoth(close)


# -- running them ----------------------------------------------------------


def run_once(start: Callable[[object], defer.Deferred]):
    """
    Run the global reactor until the Deferred C{start(reactor)} returns has
    fired, and return its result or raise its exception. For commands that
    do not otherwise run the reactor; it cannot be run a second time.
    """
    # Imported here, not at the top: importing it installs the default
    # reactor, which the gateway's own processes choose for themselves.
    from twisted.internet import reactor

    outcome: list = []

    def started():
        d = defer.maybeDeferred(start, reactor)
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(started)
    reactor.run(installSignalHandlers=False)
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def _settled(d: defer.Deferred) -> defer.Deferred:
    """Fire with C{(True, detail)} or C{(False, ProbeFailed)}, never fail."""

    def failed(failure):
        if failure.check(ProbeFailed):
            return (False, failure.value)
        return (False, ProbeFailed(_one_line(failure.getErrorMessage()) or failure.type.__name__))

    return d.addCallbacks(lambda detail: (True, detail), failed)


def _replay(outcome) -> Callable[[GatewayConfig, float], str]:
    def probe(config: GatewayConfig, timeout: float) -> str:
        succeeded, value = outcome
        if not succeeded:
            raise value
        return value

    return probe


def settled_probes(environ: Mapping[str, str], timeout: float) -> Probes:
    """
    Run, at once on the global reactor, every probe the checklist will ask
    about for C{environ} (the STS only when it is reached over TLS; none when
    startup would refuse the configuration), and return L{Probes} answering
    with their outcomes.
    """
    try:
        config = GatewayConfig.from_environ(environ)
    except ConfigError:
        config = None

    def start(reactor) -> defer.Deferred:
        probes: dict[str, Callable] = {}
        if config is not None:
            if config.sts_url.startswith("https://"):
                probes["sts"] = probe_sts
            probes["redis"] = lambda config, timeout, reactor: probe_redis(
                config.redis, timeout, reactor, config.replay_min_replicas
            )
            probes["postgres"] = probe_postgres
        names = list(probes)
        running = [
            _settled(defer.maybeDeferred(probes[name], config, timeout, reactor)) for name in names
        ]
        gathered = defer.gatherResults(running)
        return gathered.addCallback(lambda outcomes: dict(zip(names, outcomes, strict=True)))

    outcomes = run_once(start) if config is not None else {}
    not_probed = (False, ProbeFailed("not probed"))
    return Probes(
        **{name: _replay(outcomes.get(name, not_probed)) for name in ("sts", "redis", "postgres")}
    )


def redis_answers(address: RedisAddress, timeout: float) -> str:
    """
    L{probe_redis} for a command that does not otherwise run the reactor
    (the demo checks its Redis before it starts anything).

    @raise ProbeFailed: Redis does not answer; C{str()} says why.
    """
    return run_once(lambda reactor: probe_redis(address, timeout, reactor))
