# -*- test-case-name: tests.test_checkconfig -*-
"""
C{caracal-gateway-admin check-config}: is this environment fit for
production?

It first validates the environment exactly as C{twistd caracal-gateway}
would at startup (L{GatewayConfig.from_environ}, the certificate and key
with L{load_server_certificate} and OpenSSL, the CA bundles with
L{client_tls_policy}), then walks the production checklist of the operator
page (seed: "TLS and Production Hardening") and reaches out, each within a
few seconds, to the STS over TLS, Redis and Postgres.

Every item is one line, C{PASS}, C{WARN} or C{FAIL} with the reason; any
C{FAIL} makes the exit status 1. Values shown come from
L{GatewayConfig.redacted}: no password, key or token is ever printed.

The checklist is plain functions of a configuration (and certificate
credentials) returning L{Finding}s; the network probes
(L{caracal.gateway.probes}, the gateway's own STS, Redis and Postgres
clients) are passed in, so the rules are tested without a network.
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TextIO

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from caracal.gateway.config import (
    PRODUCTION_PORT,
    ConfigError,
    GatewayConfig,
)
from caracal.gateway.probes import ProbeFailed, Probes, settled_probes
from caracal.gateway.tls import (
    ServerCredentials,
    client_tls_policy,
    load_server_certificate,
    server_context,
)

PASS = "PASS"  # noqa: S105 - a verdict, not a password
WARN = "WARN"
FAIL = "FAIL"

#: A certificate closer to its end than this is a warning.
RENEWAL_WARNING = datetime.timedelta(days=14)

#: Bound on each network probe, in seconds.
PROBE_TIMEOUT = 3.0

#: Fewer distinct byte values than this in a 32+ byte key looks hand-made.
_MIN_DISTINCT_KEY_BYTES = 16

#: A C{METRICS_BEARER} shorter than this is guessable.
_MIN_METRICS_BEARER = 16

HELP = "check the gateway's environment against the production checklist"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


@dataclass(frozen=True)
class Finding:
    """One checklist item's outcome: C{status} is PASS, WARN or FAIL."""

    status: str
    item: str
    reason: str


# -- the checklist, item by item ----------------------------------------


def check_environment(config: GatewayConfig) -> Finding:
    """C{CARACAL_ENV=production}: the production rules apply."""
    if config.production:
        return Finding(PASS, "CARACAL_ENV", "production: the production startup rules apply")
    return Finding(FAIL, "CARACAL_ENV", f"{config.env}: the production startup rules are lifted")


def _date(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def check_expiry(credentials: ServerCredentials, now: datetime.datetime) -> Finding:
    """The leaf is valid now and not within L{RENEWAL_WARNING} of its end."""
    not_after = credentials.not_after
    where = f"{credentials.cert_file} ({credentials.subject})"
    if now >= not_after:
        return Finding(FAIL, "certificate", f"{where} expired on {_date(not_after)}")
    if now < credentials.not_before:
        return Finding(
            FAIL, "certificate", f"{where} not valid before {_date(credentials.not_before)}"
        )
    left = not_after - now
    if left < RENEWAL_WARNING:
        return Finding(
            WARN,
            "certificate",
            f"{where} expires in {left.days} days on {_date(not_after)}; renew it",
        )
    return Finding(
        PASS, "certificate", f"{where} valid until {_date(not_after)} ({left.days} days)"
    )


def _issued(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether C{issuer} signed C{child} (names match and the signature verifies)."""
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _describe(index: int, certificate: x509.Certificate) -> str:
    return f"certificate {index} ({certificate.subject.rfc4514_string()})"


def check_chain(chain: tuple[x509.Certificate, ...]) -> Finding:
    """
    The chain in C{TLS_CERT_FILE} is in serving order: the leaf first, then
    each certificate the issuer of the one before it.
    """
    leaf = chain[0]
    try:
        leaf_is_ca = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        leaf_is_ca = False
    for index in range(1, len(chain)):
        if not _issued(chain[index - 1], chain[index]):
            issuer = next(
                (
                    j
                    for j in range(len(chain))
                    if j != index - 1 and _issued(chain[index - 1], chain[j])
                ),
                None,
            )
            hint = f"; its issuer is certificate {issuer + 1}" if issuer is not None else ""
            return Finding(
                FAIL,
                "chain order",
                f"{_describe(index + 1, chain[index])} did not issue"
                f" {_describe(index, chain[index - 1])}{hint}: the file must hold the leaf,"
                " then each issuer in turn",
            )
    if leaf_is_ca:
        return Finding(WARN, "chain order", "the first certificate is a CA, not a server leaf")
    if len(chain) == 1:
        if _issued(leaf, leaf):
            return Finding(WARN, "chain order", "a self-signed leaf: clients must pin it")
        return Finding(
            PASS,
            "chain order",
            f"leaf only, issued by {leaf.issuer.rfc4514_string()} (clients must trust that CA)",
        )
    return Finding(
        PASS,
        "chain order",
        f"leaf first, then {len(chain) - 1} issuer(s), each signing the one before",
    )


def check_tls(
    config: GatewayConfig,
    now: datetime.datetime,
    load: Callable[..., ServerCredentials] = load_server_certificate,
    accept: Callable[[ServerCredentials], object] = server_context,
) -> list[Finding]:
    """
    The certificate and key as startup loads them, then their expiry, the
    chain order, and OpenSSL's acceptance of the pair.
    """
    if config.insecure_http or config.tls_cert_file is None:
        return [Finding(FAIL, "TLS", "no certificate: the gateway would serve plaintext")]
    try:
        credentials = load(config.tls_cert_file, config.tls_key_file, now=now)
    except ConfigError as error:
        # load_server_certificate names the file and why (expired, key mismatch, ...).
        return [Finding(FAIL, "certificate", str(error))]
    findings = [check_expiry(credentials, now), check_chain(credentials.chain)]
    try:
        accept(credentials)
    except ConfigError as error:
        findings.append(Finding(FAIL, "key", str(error)))
    else:
        findings.append(
            Finding(PASS, "key", f"{credentials.key_file} matches the leaf; OpenSSL accepts both")
        )
    return findings


def check_ca_bundles(
    config: GatewayConfig, policy: Callable[..., object] = client_tls_policy
) -> list[Finding]:
    """C{STS_CA_FILE} and C{UPSTREAM_CA_FILE} load as startup loads them."""
    findings = []
    for variable, path in (
        ("STS_CA_FILE", config.sts_ca_file),
        ("UPSTREAM_CA_FILE", config.upstream_ca_file),
    ):
        if path is None:
            findings.append(Finding(PASS, variable, "not set: the platform's roots only"))
            continue
        try:
            policy(path, variable=variable)
        except ConfigError as error:
            findings.append(Finding(FAIL, variable, str(error)))
        else:
            findings.append(
                Finding(PASS, variable, f"{path}: trusted on top of the platform roots")
            )
    return findings


def check_escape_hatches(config: GatewayConfig) -> list[Finding]:
    """
    C{INSECURE_HTTP}, C{INSECURE_STS}, C{JTI_FAIL_OPEN} and
    C{REVOCATION_FAIL_OPEN} are not set.
    """
    findings = []
    for variable, value, danger in (
        ("INSECURE_HTTP", config.insecure_http, "the gateway serves plaintext"),
        ("INSECURE_STS", config.insecure_sts, "mandates may travel over plaintext"),
        ("JTI_FAIL_OPEN", config.jti_fail_open, "replays pass while Redis is down"),
        (
            "REVOCATION_FAIL_OPEN",
            config.revocation_fail_open,
            "revoked sessions pass while the revocation state is unavailable",
        ),
    ):
        if value:
            findings.append(Finding(FAIL, variable, f"true: {danger}"))
        else:
            findings.append(Finding(PASS, variable, "not set"))
    return findings


def check_port(config: GatewayConfig) -> Finding:
    """C{PORT} is 8081, the only port exposed in production."""
    if config.port == PRODUCTION_PORT:
        return Finding(PASS, "PORT", f"{PRODUCTION_PORT}")
    return Finding(FAIL, "PORT", f"{config.port}: production listens on {PRODUCTION_PORT}")


def check_hmac_key(config: GatewayConfig) -> Finding:
    """
    C{STREAMS_HMAC_KEY} is set, at least 32 bytes, and does not look
    hand-made (too few distinct byte values for a random key).
    """
    key = config.streams_hmac_key
    if not key:
        return Finding(FAIL, "STREAMS_HMAC_KEY", "not set: revocation messages are not verified")
    if len(key) < 32:
        return Finding(FAIL, "STREAMS_HMAC_KEY", f"{len(key)} bytes: at least 32 are required")
    distinct = len(set(key))
    if distinct < _MIN_DISTINCT_KEY_BYTES:
        return Finding(
            WARN,
            "STREAMS_HMAC_KEY",
            f"{len(key)} bytes but only {distinct} distinct byte values: it does not look"
            " random; generate one with: openssl rand -hex 32",
        )
    return Finding(PASS, "STREAMS_HMAC_KEY", f"set, {len(key)} bytes")


def check_upstreams(config: GatewayConfig) -> Finding:
    """Private upstreams are refused, or allowed only for an allowlist."""
    hosts = sorted(config.upstream_host_allowlist)
    if not config.allow_private_upstreams:
        detail = f"; allowlist: {', '.join(hosts)}" if hosts else ""
        return Finding(PASS, "upstreams", f"private and loopback upstreams refused{detail}")
    if hosts:
        return Finding(
            PASS,
            "upstreams",
            f"private upstreams allowed only for the allowlist: {', '.join(hosts)}",
        )
    return Finding(
        FAIL,
        "upstreams",
        "ALLOW_PRIVATE_UPSTREAMS=true without UPSTREAM_HOST_ALLOWLIST: any private address"
        " (cloud metadata included) is reachable",
    )


def check_metrics(config: GatewayConfig) -> Finding:
    """
    Who may read C{/metrics} (SPEC section 12): a WARN when it is served
    without C{METRICS_BEARER} (on C{METRICS_ADDRESS}, or on the public
    listener outside production) or behind a short bearer.
    """
    bearer = config.metrics_bearer
    if bearer is not None and len(bearer) < _MIN_METRICS_BEARER:
        return Finding(
            WARN,
            "/metrics",
            f"METRICS_BEARER is {len(bearer)} characters: guessable; generate one with:"
            " openssl rand -hex 32",
        )
    if config.metrics_address is not None:
        if bearer is None:
            return Finding(
                WARN,
                "/metrics",
                f"served in plaintext on METRICS_ADDRESS {config.metrics_address} without"
                " METRICS_BEARER: anyone who reaches that address reads it",
            )
        return Finding(
            PASS,
            "/metrics",
            f"on METRICS_ADDRESS {config.metrics_address} only, bearer required",
        )
    if not config.metrics_public:
        return Finding(
            PASS,
            "/metrics",
            "not served (404 on the public listener); set METRICS_ADDRESS or METRICS_BEARER"
            " to scrape it",
        )
    if bearer is None:
        return Finding(
            WARN,
            "/metrics",
            "readable by anyone on the public listener: set METRICS_BEARER or METRICS_ADDRESS",
        )
    return Finding(PASS, "/metrics", "on the public listener, bearer required")


def _probe(item: str, probe, config: GatewayConfig, timeout: float, where: str) -> Finding:
    try:
        detail = probe(config, timeout)
    except ProbeFailed as failed:
        return Finding(FAIL, item, f"{where}: {failed}")
    return Finding(PASS, item, f"{where}: {detail}")


def check_services(config: GatewayConfig, probes: Probes, timeout: float) -> list[Finding]:
    """The STS (over TLS), Redis and Postgres answer within C{timeout} seconds each."""
    shown = config.redacted()
    findings = []
    if config.sts_url.startswith("https://"):
        findings.append(_probe("STS", probes.sts, config, timeout, str(shown["STS_URL"])))
    else:
        findings.append(
            Finding(FAIL, "STS", f"{shown['STS_URL']}: not TLS; the mandates would travel in clear")
        )
    findings.append(_probe("Redis", probes.redis, config, timeout, str(shown["REDIS_URL"])))
    findings.append(
        _probe("Postgres", probes.postgres, config, timeout, str(shown["DATABASE_URL"]))
    )
    return findings


def run_checks(
    environ: Mapping[str, str],
    probes: Probes,
    now: datetime.datetime | None = None,
    timeout: float = PROBE_TIMEOUT,
) -> list[Finding]:
    """
    Every check, in checklist order. A configuration startup would refuse
    is one FAIL per failed startup rule (all of them, not only the first
    startup would name) and nothing more: the rest cannot be judged without
    a configuration.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        config = GatewayConfig.from_environ(environ)
    except ConfigError as error:
        return [
            Finding(FAIL, "configuration", f"startup would refuse it: {message}")
            for message in error.messages
        ]
    findings = [
        Finding(PASS, "configuration", "accepted by the startup rules"),
        check_environment(config),
        *check_tls(config, now),
        *check_ca_bundles(config),
        *check_escape_hatches(config),
        check_port(config),
        check_hmac_key(config),
        check_upstreams(config),
        check_metrics(config),
        *check_services(config, probes, timeout),
    ]
    return findings


# -- output --------------------------------------------------------------


def format_finding(finding: Finding, width: int = 18) -> str:
    """C{PASS  item               reason}: one line per item."""
    reason = " ".join(finding.reason.split())
    return f"{finding.status}  {finding.item.ljust(width)} {reason}"


def format_report(findings: Iterable[Finding]) -> str:
    """The lines for every finding, then a one-line summary."""
    findings = list(findings)
    width = max((len(f.item) for f in findings), default=0)
    lines = [format_finding(f, width) for f in findings]
    counts = {status: sum(f.status == status for f in findings) for status in (PASS, WARN, FAIL)}
    verdict = "NOT ready for production" if counts[FAIL] else "ready for production"
    lines.append(
        f"{counts[PASS]} passed, {counts[WARN]} warnings, {counts[FAIL]} failed: {verdict}"
    )
    return "\n".join(lines) + "\n"


def exit_status(findings: Iterable[Finding]) -> int:
    """1 when any item FAILed, else 0 (warnings do not fail)."""
    return EXIT_FAILED if any(f.status == FAIL for f in findings) else EXIT_OK


# -- the command ---------------------------------------------------------


def read_env_file(path: str) -> dict[str, str]:
    """
    C{KEY=VALUE} lines as systemd's C{EnvironmentFile=} has them: blank
    lines and C{#} / C{;} comments skipped, an optional C{export}, values
    optionally in single or double quotes.

    @raise OSError: the file cannot be read.
    @raise ValueError: a line is not C{KEY=VALUE} (names the line number).
    """
    values: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.strip()
            if not text or text[0] in "#;":
                continue
            if text.startswith("export "):
                text = text[len("export ") :].lstrip()
            name, equals, value = text.partition("=")
            name = name.strip()
            if not equals or not name.replace("_", "").isalnum():
                raise ValueError(f"line {number} is not KEY=VALUE")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[name] = value
    return values


def configure(parser: argparse.ArgumentParser) -> None:
    """The subcommand's own options."""
    parser.add_argument(
        "--env-file",
        action="append",
        default=[],
        metavar="FILE",
        help="read KEY=VALUE lines (e.g. /etc/caracal/gateway.env) over the environment;"
        " may be repeated",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=PROBE_TIMEOUT,
        help=f"seconds allowed to each network check (default {PROBE_TIMEOUT:g})",
    )


def check_config(
    environ: Mapping[str, str],
    stdout: TextIO,
    probes: Probes | None = None,
    now: datetime.datetime | None = None,
    timeout: float = PROBE_TIMEOUT,
) -> int:
    """
    Run every check on C{environ}, print the report, return the exit status.

    @param probes: the network probes; by default the real ones
        (L{settled_probes}), run on the global reactor.
    """
    if probes is None:
        probes = settled_probes(environ, timeout)
    findings = run_checks(environ, probes, now=now, timeout=timeout)
    stdout.write(format_report(findings))
    stdout.flush()
    return exit_status(findings)


def run(context) -> int:
    """
    The C{check-config} subcommand of C{caracal-gateway-admin}: the
    environment (plus C{--env-file}s), as the gateway reads it at startup.
    """
    args = context.args
    # The admin command's --database-url / --allowlist would make this check
    # something other than what the gateway reads; refuse rather than ignore.
    if getattr(args, "database_url", None) or getattr(args, "allowlist", None):
        print(
            "caracal-gateway-admin: error: check-config reads the gateway's environment;"
            " set DATABASE_URL / UPSTREAM_HOST_ALLOWLIST (or use --env-file) instead of"
            " --database-url / --allowlist",
            file=context.stderr,
        )
        return EXIT_USAGE
    environ = dict(context.environ)
    for path in args.env_file:
        try:
            environ.update(read_env_file(path))
        except (OSError, ValueError) as error:
            reason = error.strerror if isinstance(error, OSError) else str(error)
            print(
                f"caracal-gateway-admin: error: --env-file {path}: {reason or error}",
                file=context.stderr,
            )
            return EXIT_USAGE
    if not args.timeout > 0:
        print("caracal-gateway-admin: error: --timeout must be positive", file=context.stderr)
        return EXIT_USAGE
    return check_config(environ, context.stdout, timeout=args.timeout)
