# -*- test-case-name: tests.test_config -*-
"""
The gateway's configuration: every variable of SPEC section 2, read once from
the environment into one immutable L{GatewayConfig}, with the startup rules
applied. A refused configuration raises L{ConfigError} whose message is the
one line the operator sees.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg2
from psycopg2.extensions import parse_dsn

from caracal.gateway.tracing import TracingConfigError, TracingSettings

PRODUCTION = "production"
DEV = "dev"
PRODUCTION_PORT = 8081

LOG_LEVELS = ("debug", "info", "warn", "error")

_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)", re.ASCII)
_DIGITS = re.compile(r"-?[0-9]+")
_HEX = re.compile(r"[0-9a-fA-F]+")
_SIZE = re.compile(r"([0-9]+)\s*(B|KiB|MiB|GiB|TiB|kB|KB|MB|GB|TB)?", re.ASCII)
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
}

#: Where a process spools audit events Redis cannot take (SPEC 14): the
#: systemd unit's state directory.
DEFAULT_AUDIT_SPOOL_DIR = "/var/lib/caracal-gateway/audit-spool"
DEFAULT_AUDIT_SPOOL_MAX_BYTES = 1024**3
DEFAULT_AUDIT_STREAM_MAXLEN = 1_000_000
#: More replicas than any deployment has is a typo: every claim would fail.
MAX_REPLAY_MIN_REPLICAS = 16

# What a configured URL may be made of: printable ASCII without the quote,
# backslash and angle brackets (these URLs are written into header values).
_URL_TEXT = re.compile(r"[\x21\x23-\x3b\x3d\x3f-\x5b\x5d-\x7e]+")

#: The RFC 9728 well-known path the gateway answers itself (SPEC 10, 13).
RESOURCE_METADATA_PATH = "/.well-known/oauth-protected-resource"


class ConfigError(Exception):
    """
    The configuration is refused. C{str(error)} is the single line shown to
    the operator (the first rule that failed); it never contains a secret
    value. C{messages} holds every failed rule, in the order they were
    checked (C{check-config} reports them all).
    """

    def __init__(self, message: str, messages: tuple[str, ...] | None = None) -> None:
        super().__init__(message)
        self.messages: tuple[str, ...] = tuple(messages) if messages else (message,)


#: Variables that may instead be read from the file named by C{<NAME>_FILE}
#: (SPEC section 16): how Kubernetes and systemd hand secrets over without
#: putting them in the environment, where C{/proc/<pid>/environ} and crash
#: reports would show them.
SECRET_FILE_VARIABLES = frozenset(
    {"DATABASE_URL", "REDIS_URL", "STREAMS_HMAC_KEY", "METRICS_BEARER"}
)


def read_secret(environ: Mapping[str, str], name: str) -> str | None:
    """
    The value of C{name}, from the environment or, for a
    L{SECRET_FILE_VARIABLES} member, from the file C{<name>_FILE} names (its
    content with one trailing newline stripped). C{None} when neither is set;
    an empty value counts as unset, as everywhere in the configuration.

    @raise ConfigError: both forms are set, or the file cannot be read; the
        message names the file, never its content.
    """
    value = environ.get(name)
    if value is not None and value.strip() == "":
        value = None
    if name not in SECRET_FILE_VARIABLES:
        return value
    file_variable = f"{name}_FILE"
    path = environ.get(file_variable)
    if path is None or path.strip() == "":
        return value
    if value is not None:
        raise ConfigError(f"{name} and {file_variable} are mutually exclusive")
    path = path.strip()
    try:
        with open(path, "rb") as secret:
            content = secret.read()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"{file_variable}: cannot read {path}: {reason}") from None
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{file_variable}: {path} is not UTF-8 text") from None
    # Editors and `echo` end the file with a newline; `printf` does not.
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if text.strip() == "":
        raise ConfigError(f"{file_variable}: {path} is empty")
    return text


def parse_duration(text: str) -> float:
    """
    Parse a Go duration (C{250ms}, C{5s}, C{1m30s}) into seconds.

    @raise ValueError: C{text} is not a non-negative Go duration.
    """
    text = text.strip()
    if text == "0":
        return 0.0
    if text.startswith("+"):
        text = text[1:]
    if not text:
        raise ValueError("empty duration")
    total = 0.0
    position = 0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None:
            raise ValueError(f"not a duration: {text!r}")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    return total


def parse_size(text: str) -> int:
    """
    Parse a byte size: a number of bytes (C{1000}) or a number with a binary
    (C{512MiB}, C{1GiB}) or decimal (C{10MB}) unit.

    @raise ValueError: C{text} is not such a size.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a size: {text!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def parse_bool(text: str) -> bool:
    """
    Parse a boolean the way Go's C{strconv.ParseBool} does.

    @raise ValueError: C{text} is not one of the accepted spellings.
    """
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r}")


_METRICS_BEARER = re.compile(r"[\x21-\x7e]+")
_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


def parse_host_port(text: str) -> tuple[str, int]:
    """
    Parse C{host:port} (C{[v6]:port} for an IPv6 address); the host is an
    IP address or a DNS name, never empty.

    @raise ValueError: C{text} is not that.
    """
    host, colon, port_text = text.rpartition(":")
    if not colon or not port_text.isascii() or not port_text.isdigit():
        raise ValueError("not host:port")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError("port out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
        return host, port
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not _HOST_NAME.fullmatch(host):
            raise ValueError("not a host") from None
    return host, port


@dataclass(frozen=True)
class RedisAddress:
    """
    Where Redis is, parsed from C{REDIS_URL}.

    With C{sentinels} set (C{redis+sentinel://}), C{host} and C{port} are the
    first sentinel's, and the master named C{master_name} is asked of the
    sentinels before every connection.
    """

    host: str
    port: int
    db: int
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None


#: The default port of a Redis Sentinel.
SENTINEL_PORT = 26379
_SENTINEL_SCHEME = "redis+sentinel"
_MASTER_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    """C{host[:port]} or C{[v6]:port} into a pair."""
    parts = urlsplit(f"//{text}")
    try:
        port = parts.port or default_port
    except ValueError as error:
        raise ValueError("bad port") from error
    if not parts.hostname:
        raise ValueError("host missing")
    return parts.hostname, port


def _parse_sentinel_url(text: str) -> RedisAddress:
    """
    C{redis+sentinel://[:password@]host:port[,host:port...]/<master>[/<db>]}.
    The password authenticates to the master (sentinels are asked without
    it), as for C{redis://}.
    """
    rest = text[len(_SENTINEL_SCHEME) + 3 :]
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        hosts, userinfo = netloc, ""
    password = None
    if userinfo:
        _user, _, secret = userinfo.partition(":")
        password = unquote(secret) or None
    sentinels = tuple(_host_port(item, SENTINEL_PORT) for item in hosts.split(",") if item)
    if not sentinels:
        raise ValueError("sentinel host missing")
    segments = path.split("/") if path else []
    if segments and segments[-1] == "":
        segments.pop()
    if not segments or not _MASTER_NAME.fullmatch(segments[0]):
        raise ValueError("master name missing")
    if len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
        raise ValueError("database must be a number")
    if "?" in text or "#" in text:
        raise ValueError("no query or fragment allowed")
    return RedisAddress(
        host=sentinels[0][0],
        port=sentinels[0][1],
        db=int(segments[1]) if len(segments) == 2 else 0,
        password=password,
        sentinels=sentinels,
        master_name=segments[0],
    )


def parse_redis_url(text: str) -> RedisAddress:
    """
    Parse C{redis://[:password@]host[:port][/db]} (or C{rediss://}), or
    C{redis+sentinel://[:password@]host:port[,host:port...]/<master>[/<db>]}.

    @raise ValueError: the URL is malformed.
    """
    if text.startswith(f"{_SENTINEL_SCHEME}://"):
        return _parse_sentinel_url(text)
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("scheme must be redis, rediss or redis+sentinel")
    if not parts.hostname:
        raise ValueError("host missing")
    try:
        port = parts.port or 6379
    except ValueError as error:
        raise ValueError("bad port") from error
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError("database must be a number")
    password = unquote(parts.password) if parts.password is not None else None
    return RedisAddress(
        host=parts.hostname,
        port=port,
        db=int(path) if path else 0,
        password=password or None,
        tls=parts.scheme == "rediss",
    )


#: libpq keywords (and URL query parameters) whose value is a secret.
_SECRET_KEYWORDS = frozenset({"password", "sslpassword"})
#: libpq's separators between C{key=value} pairs (C isspace in the C locale).
_DSN_SPACE = " \t\n\r\f\v"
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
#: Below this length a password may be part of any text: not looked for.
_SAFETY_NET_MIN = 4
REDACTED = "***"


def _redact_keyword_dsn(text: str) -> str:
    """
    C{text}, a libpq C{key=value} DSN, with the value of every secret
    keyword replaced by C{***}. The values are delimited exactly as libpq's
    C{conninfo_parse} does: a quoted value runs to the next unescaped quote,
    an unquoted one to the next blank, and a backslash escapes the next
    character in both (C{password=a\\ b} is one value). Anything libpq would
    refuse is C{***} as a whole: it cannot be split safely.
    """
    kept: list[str] = []
    copied = 0
    position, end = 0, len(text)
    while True:
        while position < end and text[position] in _DSN_SPACE:
            position += 1
        if position == end:
            break
        start = position
        while position < end and text[position] != "=" and text[position] not in _DSN_SPACE:
            position += 1
        name = text[start:position]
        while position < end and text[position] in _DSN_SPACE:
            position += 1
        if position == end or text[position] != "=":
            return REDACTED
        position += 1
        while position < end and text[position] in _DSN_SPACE:
            position += 1
        value_start = position
        if position < end and text[position] == "'":
            position += 1
            while True:
                if position >= end:
                    return REDACTED  # unterminated quote
                if text[position] == "\\":
                    position += 2
                elif text[position] == "'":
                    position += 1
                    break
                else:
                    position += 1
        else:
            while position < end and text[position] not in _DSN_SPACE:
                position += 2 if text[position] == "\\" else 1
        position = min(position, end)
        if name.lower() in _SECRET_KEYWORDS:
            kept += [text[copied:value_start], REDACTED]
            copied = position
    kept.append(text[copied:])
    return "".join(kept)


def _redact_query(query: str) -> str:
    """A URL query with secret parameters' values (names percent-decoded, any case) hidden."""
    parts = []
    for parameter in query.split("&"):
        name, equals, _ = parameter.partition("=")
        if equals and unquote(name).lower() in _SECRET_KEYWORDS:
            parameter = f"{name}={REDACTED}"
        parts.append(parameter)
    return "&".join(parts)


def _redact_uri(text: str, scheme_end: int) -> str:
    """
    C{text}, a URL (C{postgresql://}, C{redis://}, C{https://}, ...), with
    the userinfo password and secret query parameters hidden.

    Python's C{urlsplit} ends the userinfo at the first C{/?#} and libpq at
    the first C{@}: a password holding C{#} or C{?} would be cut differently
    by each. The authority is therefore taken up to the first C{/} and the
    userinfo up to its last C{@}, which covers both; an C{@} left after that
    (a password with a raw C{/}, which libpq refuses) hides the whole URL.
    """
    prefix, rest = text[:scheme_end], text[scheme_end:]
    slash = rest.find("/")
    authority, tail = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    at = authority.rfind("@")
    if at >= 0:
        user, colon, _ = authority[:at].partition(":")
        authority = user + (":" + REDACTED if colon else "") + authority[at:]
    rest = authority + tail
    head, question, query = rest.partition("?")
    if "@" in head[len(authority) :]:
        return REDACTED
    if question:
        rest = head + "?" + _redact_query(query)
    return prefix + rest


def _dsn_secrets(text: str) -> list[str]:
    """The secrets libpq itself would read out of C{text} (none if it cannot parse it)."""
    try:
        parameters = parse_dsn(text)
    except psycopg2.Error:
        return []
    return [parameters[name] for name in _SECRET_KEYWORDS if parameters.get(name)]


def redact_url(text: str) -> str:
    """
    Return C{text} (a URL or a libpq C{key=value} DSN) with every password
    replaced by C{***}: the userinfo one, a C{password=} / C{sslpassword=}
    query parameter, and a DSN's C{password} / C{sslpassword}, quoted or
    not, with backslash escapes. Multi-host URLs
    (C{postgresql://h1:5432,h2:5432/db}, C{redis+sentinel://s1,s2/m}) keep
    their host list. Use it on every DSN or URL that reaches a log line or
    an error message.

    As a safety net, a password that libpq reads out of C{text} and that
    still shows after the redaction (a form the rules above missed) hides
    the whole value.
    """
    if not text:
        return text
    scheme = _URL_SCHEME.match(text)
    redacted = _redact_keyword_dsn(text) if scheme is None else _redact_uri(text, scheme.end())
    for secret in _dsn_secrets(text):
        if len(secret) >= _SAFETY_NET_MIN and secret in redacted:
            return REDACTED
    return redacted


@dataclass(frozen=True)
class GatewayConfig:
    """
    The whole configuration of one gateway process (SPEC section 2).

    Durations are in seconds. Build it with L{GatewayConfig.from_environ}.
    """

    env: str = PRODUCTION
    port: int = PRODUCTION_PORT
    bind_address: str = ""
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    insecure_http: bool = False
    insecure_sts: bool = False
    sts_url: str = ""
    sts_ca_file: str | None = None
    upstream_ca_file: str | None = None
    database_url: str = field(default="", repr=False)
    redis_url: str = field(default="", repr=False)
    jti_fail_open: bool = False
    #: C{REPLAY_MIN_REPLICAS}; C{None} (unset) means L{replay_min_replicas}'s default.
    replay_min_replicas_setting: int | None = None
    revocation_fail_open: bool = False
    streams_hmac_key: bytes | None = field(default=None, repr=False)
    allow_private_upstreams: bool = False
    upstream_host_allowlist: frozenset[str] = frozenset()
    max_request_bytes: int = 10 * 1024 * 1024
    sts_timeout: float = 5.0
    upstream_timeout: float = 30.0
    read_header_timeout: float = 5.0
    read_timeout: float = 30.0
    write_timeout: float = 60.0
    idle_timeout: float = 120.0
    max_token_lifetime: float = 24 * 3600.0
    max_connections: int = 10000
    log_level: str = "info"
    # SPEC 13: long-lived streams and agent (MCP) clients.
    stream_idle_timeout: float = 300.0
    sse_keepalive: float = 15.0
    public_url: str | None = None
    authorization_servers: tuple[str, ...] = ()
    cors_allowed_origins: frozenset[str] = frozenset()
    metrics_bearer: str | None = field(default=None, repr=False)
    metrics_address: str | None = None
    audit_stream_maxlen: int = DEFAULT_AUDIT_STREAM_MAXLEN
    audit_spool_dir: str = DEFAULT_AUDIT_SPOOL_DIR
    audit_spool_max_bytes: int = DEFAULT_AUDIT_SPOOL_MAX_BYTES
    #: A L{caracal.gateway.tracing.TracingSettings} when tracing is on.
    tracing: Any = None

    @property
    def production(self) -> bool:
        """C{True} when the production-only rules apply."""
        return self.env == PRODUCTION

    @property
    def tls_enabled(self) -> bool:
        """C{True} when the listener speaks TLS (INSECURE_HTTP wins over the files)."""
        return self.tls_cert_file is not None and not self.insecure_http

    @property
    def redis(self) -> RedisAddress:
        """C{REDIS_URL}, parsed."""
        return parse_redis_url(self.redis_url)

    @property
    def replay_min_replicas(self) -> int:
        """
        Replicas that must hold a JTI claim before its token is let through
        (C{REPLAY_MIN_REPLICAS}): by default 1 behind Sentinel, where a
        failover promotes a replica and only what it holds survives, and 0
        (no C{WAIT}) on a plain C{redis://}.
        """
        if self.replay_min_replicas_setting is not None:
            return self.replay_min_replicas_setting
        return 1 if self.redis_url.startswith(f"{_SENTINEL_SCHEME}://") else 0

    @property
    def resource_metadata_url(self) -> str | None:
        """
        Where the RFC 9728 protected-resource metadata is published (from
        C{PUBLIC_URL}), or C{None} when C{PUBLIC_URL} is unset.
        """
        if self.public_url is None:
            return None
        return self.public_url.rstrip("/") + RESOURCE_METADATA_PATH

    @property
    def metrics_listen(self) -> tuple[str, int] | None:
        """C{METRICS_ADDRESS} as C{(host, port)}, or C{None} when unset."""
        if self.metrics_address is None:
            return None
        return parse_host_port(self.metrics_address)

    @property
    def metrics_public(self) -> bool:
        """
        Whether C{/metrics} is served on the public listener: not when
        C{METRICS_ADDRESS} takes it away, and in production only behind
        C{METRICS_BEARER} (SPEC section 12).
        """
        if self.metrics_address is not None:
            return False
        return self.metrics_bearer is not None or not self.production

    @property
    def sts_base_url(self) -> str:
        """C{STS_URL} without a trailing slash, ready for path joining."""
        return self.sts_url.rstrip("/")

    def escape_hatches(self) -> list[str]:
        """The names of the development escape hatches this configuration uses."""
        hatches = []
        for name, value in (
            ("INSECURE_HTTP", self.insecure_http),
            ("INSECURE_STS", self.insecure_sts),
            ("JTI_FAIL_OPEN", self.jti_fail_open),
            ("REVOCATION_FAIL_OPEN", self.revocation_fail_open),
            ("ALLOW_PRIVATE_UPSTREAMS", self.allow_private_upstreams),
        ):
            if value:
                hatches.append(name)
        return hatches

    def redacted(self) -> dict[str, object]:
        """The effective configuration as a JSON-able dict with secrets redacted."""
        return {
            "CARACAL_ENV": self.env,
            "PORT": self.port,
            "BIND_ADDRESS": self.bind_address or "*",
            "TLS_CERT_FILE": self.tls_cert_file,
            "TLS_KEY_FILE": self.tls_key_file,
            "INSECURE_HTTP": self.insecure_http,
            "INSECURE_STS": self.insecure_sts,
            "STS_URL": redact_url(self.sts_url),
            "STS_CA_FILE": self.sts_ca_file,
            "UPSTREAM_CA_FILE": self.upstream_ca_file,
            "DATABASE_URL": redact_url(self.database_url),
            "REDIS_URL": redact_url(self.redis_url),
            "JTI_FAIL_OPEN": self.jti_fail_open,
            "REPLAY_MIN_REPLICAS": self.replay_min_replicas,
            "REVOCATION_FAIL_OPEN": self.revocation_fail_open,
            "STREAMS_HMAC_KEY": "***" if self.streams_hmac_key else None,
            "ALLOW_PRIVATE_UPSTREAMS": self.allow_private_upstreams,
            "UPSTREAM_HOST_ALLOWLIST": sorted(self.upstream_host_allowlist),
            "MAX_REQUEST_BYTES": self.max_request_bytes,
            "STS_TIMEOUT": self.sts_timeout,
            "UPSTREAM_TIMEOUT": self.upstream_timeout,
            "READ_HEADER_TIMEOUT": self.read_header_timeout,
            "READ_TIMEOUT": self.read_timeout,
            "WRITE_TIMEOUT": self.write_timeout,
            "IDLE_TIMEOUT": self.idle_timeout,
            "MAX_TOKEN_LIFETIME": self.max_token_lifetime,
            "MAX_CONNECTIONS": self.max_connections,
            "LOG_LEVEL": self.log_level,
            "STREAM_IDLE_TIMEOUT": self.stream_idle_timeout,
            "SSE_KEEPALIVE": self.sse_keepalive,
            "PUBLIC_URL": self.public_url,
            "AUTHORIZATION_SERVERS": list(self.authorization_servers),
            "CORS_ALLOWED_ORIGINS": sorted(self.cors_allowed_origins),
            "METRICS_BEARER": "***" if self.metrics_bearer else None,
            "METRICS_ADDRESS": self.metrics_address,
            "AUDIT_STREAM_MAXLEN": self.audit_stream_maxlen,
            "AUDIT_SPOOL_DIR": self.audit_spool_dir,
            "AUDIT_SPOOL_MAX_BYTES": self.audit_spool_max_bytes,
        }

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> GatewayConfig:
        """
        Read and validate the configuration.

        @raise ConfigError: a value is malformed or a startup rule fails; the
            message is the SPEC's, verbatim, for the first failed rule, and
            C{messages} lists every failed rule.
        """
        reader = _Reader(environ)
        try:
            config = reader.read()
        except ConfigError as error:
            # A rule that cannot let the reading go on stops it here.
            reader.refuse(str(error))
        if reader.errors:
            raise ConfigError(reader.errors[0], tuple(reader.errors))
        return config


def _split_url(name: str, text: str):
    """
    C{text} split as an absolute URL with a host and without credentials,
    query or fragment.

    @raise ConfigError: it is not one; the message names C{name}.
    """
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        parts = None
    if (
        parts is None
        or not parts.scheme
        or not parts.hostname
        or "@" in parts.netloc
        or parts.query
        or "#" in text
        or not _URL_TEXT.fullmatch(text)
    ):
        raise ConfigError(f"{name} must hold absolute URLs without credentials, query or fragment")
    return parts


class _Reader:
    """
    Reads typed values out of an environment, naming the variable on error.
    A malformed value or a failed rule is recorded in C{errors} and reading
    goes on (a malformed value reads as its default), so that every failed
    rule can be reported at once.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.errors: list[str] = []
        #: Variables whose C{_FILE} form was refused (L{text}).
        self.unreadable: set[str] = set()

    def refuse(self, message: str) -> None:
        """Record a failed rule (L{GatewayConfig.from_environ} raises them)."""
        self.errors.append(message)

    def text(self, name: str) -> str | None:
        # Every variable goes through read_secret, so a secret added later
        # to SECRET_FILE_VARIABLES gets its _FILE form without more code.
        try:
            value = read_secret(self.environ, name)
        except ConfigError as error:
            # Reported once; the variable then reads as unset, which a rule
            # requiring it must not report again (see unset).
            if name not in self.unreadable:
                self.unreadable.add(name)
                self.refuse(str(error))
            return None
        if value is None:
            return None
        return value.strip()

    def unset(self, name: str) -> bool:
        """
        After L{text} gave C{None} for C{name}: whether it is really unset,
        rather than its C{_FILE} refused (reported already, once is enough).
        """
        return name not in self.unreadable

    def boolean(self, name: str) -> bool:
        value = self.text(name)
        if value is None:
            return False
        try:
            return parse_bool(value)
        except ValueError:
            self.refuse(f"{name} must be a boolean (true or false)")
            return False

    def duration(self, name: str, default: float) -> float:
        value = self.text(name)
        if value is None:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError:
            self.refuse(f"{name} must be a duration such as 250ms, 5s or 1m30s")
            return default
        if seconds <= 0:
            self.refuse(f"{name} must be a positive duration")
            return default
        return seconds

    def duration_or_off(self, name: str, default: float) -> float:
        """A duration where C{0} means off (returned as C{0.0})."""
        value = self.text(name)
        if value is None:
            return default
        try:
            return parse_duration(value)
        except ValueError:
            raise ConfigError(
                f"{name} must be a duration such as 250ms, 5s or 1m30s (0 turns it off)"
            ) from None

    def items(self, name: str) -> list[str]:
        """A comma-separated list, blanks dropped."""
        return [item.strip() for item in (self.text(name) or "").split(",") if item.strip()]

    def agent_clients(self, sts_url: str) -> dict:
        """
        The SPEC 13 settings: stream timers, RFC 9728 discovery and CORS.

        @raise ConfigError: C{PUBLIC_URL} is not an absolute https URL of
            the gateway's root, an authorization server or an allowed origin
            is malformed.
        """
        public_url = self.text("PUBLIC_URL")
        if public_url is not None:
            parts = _split_url("PUBLIC_URL", public_url)
            if parts.scheme != "https" or parts.path not in ("", "/"):
                raise ConfigError(
                    "PUBLIC_URL must be an absolute https URL of the gateway's root,"
                    " such as https://gateway.example.com"
                )
            public_url = public_url.rstrip("/")
        # An STS_URL refused already ("") is not checked a second time here.
        servers = self.items("AUTHORIZATION_SERVERS") or ([sts_url] if sts_url else [])
        for server in servers:
            parts = _split_url("AUTHORIZATION_SERVERS", server)
            if parts.scheme not in ("http", "https"):
                raise ConfigError("AUTHORIZATION_SERVERS must list absolute http(s) URLs")
        origins = set()
        for origin in self.items("CORS_ALLOWED_ORIGINS"):
            parts = _split_url("CORS_ALLOWED_ORIGINS", origin)
            if parts.scheme not in ("http", "https") or parts.path:
                raise ConfigError(
                    "CORS_ALLOWED_ORIGINS must list origins such as https://app.example.com"
                    " (scheme, host and optional port; no path, no wildcard)"
                )
            origins.add(origin.lower())
        return {
            "stream_idle_timeout": self.duration("STREAM_IDLE_TIMEOUT", 300.0),
            "sse_keepalive": self.duration_or_off("SSE_KEEPALIVE", 15.0),
            "public_url": public_url,
            "authorization_servers": tuple(servers),
            "cors_allowed_origins": frozenset(origins),
        }

    def integer(self, name: str, default: int | None, low: int, high: int) -> int | None:
        value = self.text(name)
        if value is None:
            return default
        # int() would also take "8_081", "+8081" or non-ASCII digits.
        if not _DIGITS.fullmatch(value):
            self.refuse(f"{name} must be an integer")
            return default
        number = int(value, 10)
        if not low <= number <= high:
            self.refuse(f"{name} must be between {low} and {high}")
            return default
        return number

    def size(self, name: str, default: int) -> int:
        value = self.text(name)
        if value is None:
            return default
        try:
            return parse_size(value)
        except ValueError:
            self.refuse(f"{name} must be a size in bytes such as 1000, 512MiB or 1GiB")
            return default

    def read(self) -> GatewayConfig:
        env = self.text("CARACAL_ENV") or PRODUCTION
        if env not in (PRODUCTION, DEV):
            self.refuse("CARACAL_ENV must be production or dev")
            # The other rules are judged as for production (fail closed).
            env = PRODUCTION
        production = env == PRODUCTION

        cert = self.text("TLS_CERT_FILE")
        key = self.text("TLS_KEY_FILE")
        insecure_http = self.boolean("INSECURE_HTTP")
        insecure_sts = self.boolean("INSECURE_STS")
        jti_fail_open = self.boolean("JTI_FAIL_OPEN")
        revocation_fail_open = self.boolean("REVOCATION_FAIL_OPEN")
        allow_private = self.boolean("ALLOW_PRIVATE_UPSTREAMS")
        port = self.integer("PORT", PRODUCTION_PORT, 1, 65535)
        max_request_bytes = self.integer("MAX_REQUEST_BYTES", 10 * 1024 * 1024, 1, 2**62)
        timeouts = {
            "sts_timeout": self.duration("STS_TIMEOUT", 5.0),
            "upstream_timeout": self.duration("UPSTREAM_TIMEOUT", 30.0),
            "read_header_timeout": self.duration("READ_HEADER_TIMEOUT", 5.0),
            "read_timeout": self.duration("READ_TIMEOUT", 30.0),
            "write_timeout": self.duration("WRITE_TIMEOUT", 60.0),
            "idle_timeout": self.duration("IDLE_TIMEOUT", 120.0),
            "max_token_lifetime": self.duration("MAX_TOKEN_LIFETIME", 24 * 3600.0),
        }
        max_connections = self.integer("MAX_CONNECTIONS", 10000, 1, 10**7)
        log_level = (self.text("LOG_LEVEL") or "info").lower()
        if log_level not in LOG_LEVELS:
            self.refuse("LOG_LEVEL must be one of debug, info, warn, error")
            log_level = "info"

        # The startup rules, in the order of SPEC section 2.
        if (cert is None) != (key is None):
            self.refuse("TLS_CERT_FILE and TLS_KEY_FILE must both be set")
        elif cert is None and not insecure_http:
            self.refuse(
                "TLS_CERT_FILE/TLS_KEY_FILE required; set INSECURE_HTTP=true to run plaintext"
            )
        if production and (insecure_http or insecure_sts):
            self.refuse("INSECURE_HTTP and INSECURE_STS are forbidden when CARACAL_ENV=production")
        if production and jti_fail_open:
            self.refuse("JTI_FAIL_OPEN is forbidden when CARACAL_ENV=production")
        if production and revocation_fail_open:
            self.refuse("REVOCATION_FAIL_OPEN is forbidden when CARACAL_ENV=production")
        if production and port != PRODUCTION_PORT:
            self.refuse("PORT must be 8081")

        hmac_text = self.text("STREAMS_HMAC_KEY")
        if hmac_text is None and production and self.unset("STREAMS_HMAC_KEY"):
            self.refuse("STREAMS_HMAC_KEY is required when CARACAL_ENV=production")
        hmac_key = None
        if hmac_text is not None:
            # bytes.fromhex would skip spaces; a key is one unbroken hex string.
            try:
                hmac_key = bytes.fromhex(hmac_text) if _HEX.fullmatch(hmac_text) else b""
            except ValueError:  # an odd number of digits
                hmac_key = b""
            if len(hmac_key) < 32:
                self.refuse("STREAMS_HMAC_KEY must be hex-encoded and at least 32 bytes")
                hmac_key = None

        allowlist = frozenset(
            host.strip().lower().rstrip(".")
            for host in (self.text("UPSTREAM_HOST_ALLOWLIST") or "").split(",")
            if host.strip()
        )
        if production and allow_private and not allowlist:
            self.refuse(
                "UPSTREAM_HOST_ALLOWLIST is required when ALLOW_PRIVATE_UPSTREAMS=true"
                " in production"
            )

        metrics_bearer = self.text("METRICS_BEARER")
        if metrics_bearer is not None and not _METRICS_BEARER.fullmatch(metrics_bearer):
            self.refuse("METRICS_BEARER must be printable ASCII without spaces")
            metrics_bearer = None
        metrics_address = self.text("METRICS_ADDRESS")
        if metrics_address is not None:
            try:
                parse_host_port(metrics_address)
            except ValueError:
                self.refuse("METRICS_ADDRESS must be host:port, e.g. 127.0.0.1:9090")
                metrics_address = None

        sts_url = self.sts_url(insecure_sts)
        database_url = self.database_url()
        redis_url = self.redis_url()
        try:
            agent_clients = self.agent_clients(sts_url)
        except ConfigError as error:
            self.refuse(str(error))
            agent_clients = {}

        return GatewayConfig(
            env=env,
            port=port,
            bind_address=self.text("BIND_ADDRESS") or "",
            tls_cert_file=cert,
            tls_key_file=key,
            insecure_http=insecure_http,
            insecure_sts=insecure_sts,
            sts_url=sts_url,
            sts_ca_file=self.text("STS_CA_FILE"),
            upstream_ca_file=self.text("UPSTREAM_CA_FILE"),
            database_url=database_url,
            redis_url=redis_url,
            jti_fail_open=jti_fail_open,
            replay_min_replicas_setting=self.integer(
                "REPLAY_MIN_REPLICAS", None, 0, MAX_REPLAY_MIN_REPLICAS
            ),
            revocation_fail_open=revocation_fail_open,
            streams_hmac_key=hmac_key,
            allow_private_upstreams=allow_private,
            upstream_host_allowlist=allowlist,
            max_request_bytes=max_request_bytes,
            max_connections=max_connections,
            log_level=log_level,
            metrics_bearer=metrics_bearer,
            metrics_address=metrics_address,
            audit_stream_maxlen=self.integer(
                "AUDIT_STREAM_MAXLEN", DEFAULT_AUDIT_STREAM_MAXLEN, 1, 2**62
            ),
            audit_spool_dir=self.text("AUDIT_SPOOL_DIR") or DEFAULT_AUDIT_SPOOL_DIR,
            audit_spool_max_bytes=self.size("AUDIT_SPOOL_MAX_BYTES", DEFAULT_AUDIT_SPOOL_MAX_BYTES),
            tracing=self.tracing(),
            **timeouts,
            **agent_clients,
        )

    def sts_url(self, insecure_sts: bool) -> str:
        """C{STS_URL}, checked (C{""} after a refusal)."""
        sts_url = self.text("STS_URL")
        if sts_url is None:
            if self.unset("STS_URL"):
                self.refuse("STS_URL is required")
            return ""
        try:
            sts_parts = urlsplit(sts_url)
            sts_parts.port  # noqa: B018 - raises on a malformed port
        except ValueError:
            self.refuse("STS_URL must be an absolute http(s) URL")
            return ""
        if sts_parts.scheme not in ("http", "https") or not sts_parts.hostname:
            self.refuse("STS_URL must be an absolute http(s) URL")
        elif "@" in sts_parts.netloc or sts_parts.query or sts_parts.fragment or "#" in sts_url:
            # Paths are appended to it, and the startup log prints it.
            self.refuse("STS_URL must not carry credentials, a query or a fragment")
        elif sts_parts.scheme == "http" and not insecure_sts:
            self.refuse("STS_URL must use https; set INSECURE_STS=true to override")
        return sts_url

    def database_url(self) -> str:
        """C{DATABASE_URL}, checked by libpq's own parser (C{""} after a refusal)."""
        database_url = self.text("DATABASE_URL")
        if database_url is None:
            if self.unset("DATABASE_URL"):
                self.refuse("DATABASE_URL is required")
            return ""
        try:
            parse_dsn(database_url)
        except psycopg2.ProgrammingError:
            self.refuse("DATABASE_URL is not a valid Postgres URL or DSN")
            return ""
        return database_url

    def redis_url(self) -> str:
        """C{REDIS_URL}, checked (C{""} after a refusal)."""
        redis_url = self.text("REDIS_URL")
        if redis_url is None:
            if self.unset("REDIS_URL"):
                self.refuse("REDIS_URL is required")
            return ""
        try:
            parse_redis_url(redis_url)
        except ValueError as error:
            self.refuse(f"REDIS_URL is malformed: {error}")
            return ""
        return redis_url

    def tracing(self):
        """The OpenTelemetry settings (SPEC 15), C{None} when tracing is off."""
        try:
            return TracingSettings.from_environ(self.environ)
        except TracingConfigError as error:
            self.refuse(str(error))
            return None
