# -*- test-case-name: tests.test_headers,tests.test_forward,tests.test_registry -*-
"""
The gateway's header policy, in one place: which headers describe one
connection rather than the message (hop-by-hop, and every name a
C{Connection} header lists), which the gateway owns and never passes on in
either direction, and which names a resource's credential may not take.
"""

from __future__ import annotations

import re

from twisted.web.http_headers import Headers, _nameEncoder

# Hop-by-hop headers (RFC 9110 section 7.6.1 and the old proxy ones): they
# describe one connection, never the end-to-end message.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# The X-Caracal-* names belong to the gateway in both directions.
CARACAL_PREFIX = b"x-caracal-"

# Request headers the gateway never passes on besides the hop-by-hop ones:
# the caller's own bearer, framing the Agent recomputes (Content-Length,
# Host, Expect: the body is already received), and client-IP claims a caller
# could forge (X-Forwarded-For is replaced, so its siblings are dropped too).
DROPPED_REQUEST = frozenset(
    {
        b"authorization",
        b"content-length",
        b"host",
        b"expect",
        b"forwarded",
        b"x-real-ip",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
    }
)

# Response headers the gateway sets itself and never takes from upstream.
DROPPED_RESPONSE = frozenset({b"x-request-id"})

#: Headers the gateway or HTTP itself owns; a credential there would break
#: framing or be overwritten.
RESERVED_HEADERS = frozenset(
    {name.decode("ascii") for name in HOP_BY_HOP}
    | {
        "host",
        "content-length",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "traceparent",
    }
)

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def connection_tokens(headers: Headers) -> set[bytes]:
    """Header names listed in C{Connection}: hop-by-hop for this message."""
    tokens = set()
    for value in headers.getRawHeaders(b"connection", []):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def auth_header_problem(name: str) -> str | None:
    """Why C{name} cannot carry a credential upstream, or C{None} when it can."""
    if not _TOKEN.match(name) or len(name) > 128:
        return "not an HTTP header name (token characters)"
    lower = name.lower()
    if lower in RESERVED_HEADERS or lower.startswith(CARACAL_PREFIX.decode("ascii")):
        return "reserved"
    return None


def auth_scheme_problem(scheme: str) -> str | None:
    """Why C{scheme} cannot precede a credential, or C{None} when it can (C{""} is none)."""
    if scheme and (not _TOKEN.match(scheme) or len(scheme) > 64):
        return "not empty or a single token such as Bearer"
    return None


def raw_fields(headers: Headers) -> dict[bytes, list[bytes]]:
    """
    The dict inside C{headers}: canonical name (C{Http-Header-Case}) to its
    values, each free of CR and LF. Copying from one L{Headers} to another
    through it skips re-checking and re-encoding every name and value (each
    L{Headers.setRawHeaders} does both). Twisted's private C{_rawHeaders},
    pinned by tests.test_twisted_private.
    """
    return headers._rawHeaders


#: A header name in the case L{Headers} keeps it (raises for a non-token),
#: for names put into L{raw_fields} directly. Twisted's private
#: C{_nameEncoder.encode}, pinned by tests.test_twisted_private.
canonical_name = _nameEncoder.encode
