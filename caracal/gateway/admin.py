# -*- test-case-name: tests.test_admin -*-
"""
C{caracal-gateway-admin}: the operator's command for the resource table.

    caracal-gateway-admin migrate
    caracal-gateway-admin add RESOURCE --zone Z --application A --upstream URL
        [--auth-mode caracal_jwt|provider_oauth|provider_apikey]
        [--auth-header H] [--auth-scheme S] [--upstream-timeout 5m]
    caracal-gateway-admin list [--json]
    caracal-gateway-admin update RESOURCE [--zone Z] [--application A] [--upstream URL]
        [--auth-mode M] [--auth-header H | --default-auth-header]
        [--auth-scheme S | --default-auth-scheme]
        [--upstream-timeout 5m | --default-upstream-timeout]
    caracal-gateway-admin remove RESOURCE
    caracal-gateway-admin audit tail [--follow] [--resource R] [--decision deny]
        [--request-id X] [--count N]

The database is C{--database-url}, C{DATABASE_URL} or the file
C{DATABASE_URL_FILE} names (a URL or a libpq DSN).
Upstream URLs are checked with the proxy's own static rules
(L{caracal.gateway.upstream.parse_upstream}) and, when one is given, against
C{--allowlist} / C{UPSTREAM_HOST_ALLOWLIST}.

Exit status: 0 done; 2 the command line is wrong whatever the database holds
(usage, a refused value); 1 the operation failed (database unreachable or
erroring, the resource already exists or does not exist). Every error is one
line on stderr, never a traceback, never a password.

Subcommands live in a registry: L{register} adds one (its name, help, a
function adding its arguments, a function running it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import TextIO

import psycopg2
import psycopg2.errors
from psycopg2.extensions import parse_dsn

from caracal.gateway import audittail, checkconfig
from caracal.gateway.config import ConfigError, parse_duration, read_secret, redact_url
from caracal.gateway.registry import (
    AUTH_MODES,
    CARACAL_JWT,
    auth_header_problem,
    auth_scheme_problem,
)
from caracal.gateway.upstream import (
    UpstreamRefused,
    is_public_address,
    numeric_host,
    parse_upstream,
)

PROG = "caracal-gateway-admin"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# upstream_timeout_ms is a Postgres integer.
_MAX_TIMEOUT_MS = 2**31 - 1


class AdminError(Exception):
    """A refused command: C{str()} is the one line shown, C{status} the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def usage_error(message: str) -> AdminError:
    """The command line is wrong (exit 2)."""
    return AdminError(message, EXIT_USAGE)


def failure(message: str) -> AdminError:
    """The operation failed (exit 1)."""
    return AdminError(message, EXIT_FAILED)


@dataclass
class Context:
    """What a subcommand runs with."""

    args: argparse.Namespace
    environ: Mapping[str, str]
    stdout: TextIO
    stderr: TextIO
    connect: Callable[..., object]

    def database(self):
        """An autocommit psycopg2 connection to the configured database."""
        dsn = self.args.database_url
        if not dsn:
            try:
                dsn = (read_secret(self.environ, "DATABASE_URL") or "").strip()
            except ConfigError as error:
                raise usage_error(str(error)) from None
        if not dsn:
            raise usage_error("DATABASE_URL is required (or --database-url)")
        try:
            parse_dsn(dsn)
        except psycopg2.ProgrammingError:
            raise usage_error("DATABASE_URL is not a valid Postgres URL or DSN") from None
        try:
            connection = self.connect(
                dsn, connect_timeout=10, application_name="caracal-gateway-admin"
            )
        except psycopg2.Error as error:
            raise failure(
                f"cannot connect to the database at {redact_url(dsn)}: {_one_line(error)}"
            ) from None
        connection.autocommit = True
        return connection

    @contextlib.contextmanager
    def cursor(self) -> Iterator:
        """A cursor on a fresh L{database} connection, closed when the block ends."""
        connection = self.database()
        try:
            with connection.cursor() as cursor:
                yield cursor
        finally:
            connection.close()

    def warn(self, message: str) -> None:
        """One warning line on stderr."""
        print(f"{PROG}: warning: {message}", file=self.stderr)


@dataclass(frozen=True)
class Command:
    """One subcommand of the registry."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Context], int]


#: The subcommands, in the order C{--help} lists them.
COMMANDS: dict[str, Command] = {}


def register(
    name: str, help: str, configure: Callable[[argparse.ArgumentParser], None] = lambda _: None
) -> Callable[[Callable[[Context], int]], Callable[[Context], int]]:
    """
    Decorate C{run(context) -> exit status} as the subcommand C{name};
    C{configure(parser)} adds its arguments.
    """

    def decorate(run: Callable[[Context], int]) -> Callable[[Context], int]:
        COMMANDS[name] = Command(name, help, configure, run)
        return run

    return decorate


def _one_line(error: BaseException | str) -> str:
    """An exception as one line (libpq messages span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def _database_message(error: psycopg2.Error) -> str:
    """The server's primary message when there is one (without the LINE/caret noise)."""
    diag = getattr(error, "diag", None)
    primary = diag.message_primary if diag is not None else None
    return _one_line(primary) if primary else _one_line(error)


# -- validation ----------------------------------------------------------

_VISIBLE = re.compile(r"^[\x21-\x7e]+$")


def identifier(what: str, text: str, limit: int = 512) -> str:
    """
    A resource, zone or application identifier: 1..limit visible ASCII
    characters (it travels in headers and form fields, where whitespace or
    control characters would be mangled).
    """
    if not text:
        raise usage_error(f"{what} must not be empty")
    if len(text) > limit or not _VISIBLE.match(text):
        raise usage_error(f"{what} must be 1-{limit} visible ASCII characters, no spaces")
    return text


def auth_header(text: str) -> str:
    """The credential header's name: an HTTP token the gateway does not own."""
    problem = auth_header_problem(text)
    if problem == "reserved":
        raise usage_error(f"--auth-header {text} is reserved")
    if problem:
        raise usage_error("--auth-header must be an HTTP header name (token characters)")
    return text


def auth_scheme(text: str) -> str:
    """The credential scheme: empty (none) or an HTTP token."""
    if auth_scheme_problem(text):
        raise usage_error("--auth-scheme must be empty or a single token such as Bearer")
    return text


def upstream_timeout_ms(text: str) -> int:
    """
    C{--upstream-timeout}: a Go duration (C{90s}, C{5m}) as whole
    milliseconds, positive and within a Postgres C{integer}.
    """
    try:
        seconds = parse_duration(text)
    except ValueError:
        seconds = -1.0
    milliseconds = round(seconds * 1000)
    if not 0 < milliseconds <= _MAX_TIMEOUT_MS:
        raise usage_error(
            "--upstream-timeout must be a positive duration such as 90s or 5m (at most 596h)"
        )
    return milliseconds


def _duration_text(milliseconds: int | None) -> str | None:
    """C{upstream_timeout_ms} as the operator wrote it, roughly: C{300s}, C{250ms}."""
    if milliseconds is None:
        return None
    if milliseconds % 1000:
        return f"{milliseconds}ms"
    return f"{milliseconds // 1000}s"


def allowlist(context: Context) -> frozenset[str]:
    """C{--allowlist}, else C{UPSTREAM_HOST_ALLOWLIST}, normalised as the gateway does."""
    text = context.args.allowlist
    if text is None:
        text = context.environ.get("UPSTREAM_HOST_ALLOWLIST", "")
    return frozenset(host.strip().lower().rstrip(".") for host in text.split(",") if host.strip())


def upstream(context: Context, url: str) -> str:
    """
    C{url} if the proxy's static rules accept it (and the allowlist, if
    any); warns about numeric private hosts, which only pass with
    C{ALLOW_PRIVATE_UPSTREAMS=true}.
    """
    try:
        parsed = parse_upstream(url)
    except UpstreamRefused as refused:
        raise usage_error(f"upstream URL refused: {refused.description}") from None
    hosts = allowlist(context)
    host = parsed.host.lower().rstrip(".")
    if hosts and host not in hosts:
        raise usage_error(f"upstream host {host} is not on UPSTREAM_HOST_ALLOWLIST")
    address = numeric_host(parsed.host)
    if address is not None and not is_public_address(address):
        context.warn(
            f"upstream host {parsed.host} is not a public address; the gateway refuses it"
            " unless ALLOW_PRIVATE_UPSTREAMS=true"
        )
    return url


# -- subcommands ---------------------------------------------------------


def schema_sql() -> str:
    """The schema shipped in the package (also C{etc/schema.sql})."""
    return files("caracal.gateway").joinpath("schema.sql").read_text(encoding="utf-8")


@register("migrate", "create or update the gateway_resources table and its triggers")
def migrate(context: Context) -> int:
    """Apply the schema; safe to repeat (it is idempotent and one transaction)."""
    statement = schema_sql()
    with context.cursor() as cursor:
        cursor.execute(statement)
    print("schema applied", file=context.stdout)
    return EXIT_OK


def _configure_add(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("resource", help="the resource identifier (X-Caracal-Resource)")
    parser.add_argument("--zone", required=True, help="the zone id")
    parser.add_argument("--application", required=True, help="the application id")
    parser.add_argument("--upstream", required=True, help="the upstream base URL")
    parser.add_argument("--auth-mode", choices=AUTH_MODES, default=CARACAL_JWT)
    parser.add_argument("--auth-header", help="credential header (default Authorization)")
    parser.add_argument(
        "--auth-scheme",
        help="credential scheme (default Bearer for caracal_jwt, none otherwise; '' for none)",
    )
    parser.add_argument(
        "--upstream-timeout",
        help="this resource's bound on the upstream's response headers, such as 5m"
        " (default: the gateway's UPSTREAM_TIMEOUT)",
    )


_COLUMNS = (
    "resource_identifier",
    "zone_id",
    "application_id",
    "upstream_url",
    "auth_mode",
    "auth_header",
    "auth_scheme",
    "upstream_timeout_ms",
    "updated_at",
)

#: The columns C{list} shows as a table, with their headings (C{--json} has them all).
_TABLE = (
    ("resource_identifier", "RESOURCE"),
    ("zone_id", "ZONE"),
    ("application_id", "APPLICATION"),
    ("upstream_url", "UPSTREAM"),
    ("auth_mode", "MODE"),
    ("auth_header", "HEADER"),
    ("auth_scheme", "SCHEME"),
    ("upstream_timeout_ms", "UPSTREAM_TIMEOUT"),
)


@register("add", "add a resource", _configure_add)
def add(context: Context) -> int:
    """Insert a resource; fails if it exists."""
    args = context.args
    row = (
        identifier("resource", args.resource),
        identifier("--zone", args.zone, 256),
        identifier("--application", args.application, 256),
        upstream(context, args.upstream),
        args.auth_mode,
        None if args.auth_header is None else auth_header(args.auth_header),
        None if args.auth_scheme is None else auth_scheme(args.auth_scheme),
        None if args.upstream_timeout is None else upstream_timeout_ms(args.upstream_timeout),
    )
    with context.cursor() as cursor:
        cursor.execute(
            "INSERT INTO gateway_resources (resource_identifier, zone_id, application_id,"
            " upstream_url, auth_mode, auth_header, auth_scheme, upstream_timeout_ms)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (resource_identifier) DO NOTHING RETURNING resource_identifier",
            row,
        )
        inserted = cursor.fetchone()
    if inserted is None:
        raise failure(f"resource {args.resource} already exists (use update)")
    print(f"added {args.resource}", file=context.stdout)
    return EXIT_OK


def _configure_list(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON array")


@register("list", "list the resources", _configure_list)
def list_(context: Context) -> int:
    """Print every resource, as a table or as JSON."""
    with context.cursor() as cursor:
        cursor.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM gateway_resources"  # noqa: S608 - constants
            " ORDER BY resource_identifier"
        )
        rows = cursor.fetchall()
    records = [dict(zip(_COLUMNS, row, strict=True)) for row in rows]
    for record in records:
        record["updated_at"] = record["updated_at"].isoformat()
    if context.args.json:
        json.dump(records, context.stdout, indent=2)
        context.stdout.write("\n")
        return EXIT_OK
    shown = [
        {**record, "upstream_timeout_ms": _duration_text(record["upstream_timeout_ms"])}
        for record in records
    ]
    table = [tuple(heading for _, heading in _TABLE)] + [
        tuple("-" if record[column] is None else str(record[column]) for column, _ in _TABLE)
        for record in shown
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(_TABLE))]
    for line in table:
        text = "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print(text.rstrip(), file=context.stdout)
    return EXIT_OK


def _configure_update(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("resource", help="the resource identifier")
    parser.add_argument("--zone")
    parser.add_argument("--application")
    parser.add_argument("--upstream")
    parser.add_argument("--auth-mode", choices=AUTH_MODES)
    header = parser.add_mutually_exclusive_group()
    header.add_argument("--auth-header")
    header.add_argument(
        "--default-auth-header", action="store_true", help="back to Authorization (NULL)"
    )
    scheme = parser.add_mutually_exclusive_group()
    scheme.add_argument("--auth-scheme")
    scheme.add_argument(
        "--default-auth-scheme", action="store_true", help="back to the mode's default (NULL)"
    )
    timeout = parser.add_mutually_exclusive_group()
    timeout.add_argument("--upstream-timeout", help="such as 5m")
    timeout.add_argument(
        "--default-upstream-timeout",
        action="store_true",
        help="back to the gateway's UPSTREAM_TIMEOUT (NULL)",
    )


@register("update", "change fields of a resource", _configure_update)
def update(context: Context) -> int:
    """Change the given fields of an existing resource."""
    args = context.args
    resource = identifier("resource", args.resource)
    changes: dict[str, str | int | None] = {}
    if args.zone is not None:
        changes["zone_id"] = identifier("--zone", args.zone, 256)
    if args.application is not None:
        changes["application_id"] = identifier("--application", args.application, 256)
    if args.upstream is not None:
        changes["upstream_url"] = upstream(context, args.upstream)
    if args.auth_mode is not None:
        changes["auth_mode"] = args.auth_mode
    if args.auth_header is not None:
        changes["auth_header"] = auth_header(args.auth_header)
    if args.default_auth_header:
        changes["auth_header"] = None
    if args.auth_scheme is not None:
        changes["auth_scheme"] = auth_scheme(args.auth_scheme)
    if args.default_auth_scheme:
        changes["auth_scheme"] = None
    if args.upstream_timeout is not None:
        changes["upstream_timeout_ms"] = upstream_timeout_ms(args.upstream_timeout)
    if args.default_upstream_timeout:
        changes["upstream_timeout_ms"] = None
    if not changes:
        raise usage_error("nothing to update: give at least one field option")
    assignments = ", ".join(f"{column} = %s" for column in changes)
    with context.cursor() as cursor:
        # Column names come from the fixed set above, values are parameters.
        cursor.execute(
            f"UPDATE gateway_resources SET {assignments}"  # noqa: S608
            " WHERE resource_identifier = %s RETURNING resource_identifier",
            (*changes.values(), resource),
        )
        updated = cursor.fetchone()
    if updated is None:
        raise failure(f"no resource {resource}")
    print(f"updated {resource}", file=context.stdout)
    return EXIT_OK


def _configure_remove(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("resource", help="the resource identifier")


@register("remove", "remove a resource", _configure_remove)
def remove(context: Context) -> int:
    """Delete a resource; fails if it does not exist."""
    resource = context.args.resource
    with context.cursor() as cursor:
        cursor.execute(
            "DELETE FROM gateway_resources WHERE resource_identifier = %s"
            " RETURNING resource_identifier",
            (resource,),
        )
        removed = cursor.fetchone()
    if removed is None:
        raise failure(f"no resource {resource}")
    print(f"removed {resource}", file=context.stdout)
    return EXIT_OK


# check-config lives in its own module (it reads the gateway's whole environment).
register("check-config", checkconfig.HELP, checkconfig.configure)(checkconfig.run)
# So does audit tail (it reads Redis, not Postgres).
register("audit", audittail.HELP, audittail.configure)(audittail.run)


# -- the command line ----------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line and an exception, not an exit."""

    def error(self, message: str):
        command = self.prog[len(PROG) :].strip()
        raise usage_error(f"{command}: {message}" if command else message)


def _add_common(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument(
        "--database-url",
        default=default,
        help="Postgres URL or libpq DSN (default: $DATABASE_URL or $DATABASE_URL_FILE)",
    )
    parser.add_argument(
        "--allowlist",
        default=default,
        help="comma-separated upstream hosts (default: $UPSTREAM_HOST_ALLOWLIST)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser for every registered subcommand."""
    parser = _Parser(prog=PROG, description="Manage the caracal-gateway resource table.")
    _add_common(parser, None)
    # The same options after the subcommand too; SUPPRESS keeps a value given
    # before it from being reset.
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, argparse.SUPPRESS)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for command in COMMANDS.values():
        sub = subparsers.add_parser(
            command.name, help=command.help, description=command.help, parents=[common]
        )
        command.configure(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    connect: Callable[..., object] = psycopg2.connect,
) -> int:
    """Run the command line C{argv}; return the exit status."""
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    try:
        args = build_parser().parse_args(argv)
        context = Context(
            args=args,
            environ=os.environ if environ is None else environ,
            stdout=stdout,
            stderr=stderr,
            connect=connect,
        )
        return args.run(context)
    except AdminError as error:
        print(f"{PROG}: error: {error}", file=stderr)
        return error.status
    except psycopg2.errors.UndefinedTable:
        print(
            f"{PROG}: error: the gateway_resources table does not exist; run {PROG} migrate",
            file=stderr,
        )
        return EXIT_FAILED
    except psycopg2.Error as error:
        print(f"{PROG}: error: database: {_database_message(error)}", file=stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # noqa: BLE001 - the operator gets one line, never a traceback
        print(f"{PROG}: error: {type(error).__name__}: {_one_line(error)}", file=stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
