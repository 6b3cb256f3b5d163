# -*- test-case-name: tests.test_cors -*-
"""
CORS for browser-based agents (SPEC 13, C{CORS_ALLOWED_ORIGINS}).

The gateway owns CORS: a preflight is answered here (L{answer_preflight}),
before authentication, without an STS call or upstream contact, and every
other response to a listed C{Origin} gets the allow/expose headers
(L{add_response_headers}). An upstream's own C{Access-Control-*} headers
never reach the client: cross-origin access is the gateway's policy, not a
tool server's.
"""

from __future__ import annotations

from caracal.gateway.denials import error_body

#: The methods SPEC 12 H2 serves.
ALLOWED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

#: The request headers a browser-based MCP client sends.
ALLOWED_HEADERS = (
    b"Authorization, Content-Type, Accept, X-Caracal-Resource, Mcp-Session-Id,"
    b" MCP-Protocol-Version, Last-Event-ID, X-Request-Id, traceparent"
)

#: The response headers such a client must be able to read.
EXPOSED_HEADERS = b"Mcp-Session-Id, X-Request-Id, WWW-Authenticate, X-Caracal-Token-Expires-In"

MAX_AGE = b"600"

_ACCESS_CONTROL = b"access-control-"


def _origin(request) -> bytes | None:
    """The request's one C{Origin}, or C{None} (absent or repeated)."""
    values = request.requestHeaders.getRawHeaders(b"origin")
    if values is None or len(values) != 1:
        return None
    return values[0]


def _listed(origin: bytes | None, allowed: frozenset[str]) -> bool:
    if origin is None or not allowed:
        return False
    try:
        return origin.decode("ascii").lower() in allowed
    except UnicodeDecodeError:
        return False


def is_preflight(request, allowed: frozenset[str]) -> bool:
    """
    Whether the gateway answers C{request} as a CORS preflight: CORS is
    configured and it is an C{OPTIONS} with C{Origin} and
    C{Access-Control-Request-Method}. Without C{CORS_ALLOWED_ORIGINS} an
    C{OPTIONS} is an ordinary request (and needs a token).
    """
    return (
        bool(allowed)
        and request.method == b"OPTIONS"
        and request.requestHeaders.hasHeader(b"origin")
        and request.requestHeaders.hasHeader(b"access-control-request-method")
    )


def answer_preflight(request, allowed: frozenset[str]) -> bytes:
    """
    Answer a preflight: 204 with the SPEC 13 headers for a listed origin,
    403 C{cors_origin_denied} for any other. Returns the body to write.
    """
    request.cors_answered = True
    origin = _origin(request)
    if not _listed(origin, allowed):
        request.log_fields["denial"] = "cors_origin_denied"
        return error_body(request, 403, "cors_origin_denied", "this origin is not allowed")
    request.setResponseCode(204)
    headers = request.responseHeaders
    headers.setRawHeaders(b"access-control-allow-origin", [origin])
    headers.setRawHeaders(b"vary", [b"Origin"])
    headers.setRawHeaders(b"access-control-allow-methods", [ALLOWED_METHODS])
    headers.setRawHeaders(b"access-control-allow-headers", [ALLOWED_HEADERS])
    headers.setRawHeaders(b"access-control-max-age", [MAX_AGE])
    return b""


def add_response_headers(request, allowed: frozenset[str]) -> None:
    """
    Just before a response's head is written: drop any C{Access-Control-*}
    header (an upstream's), then, for a listed C{Origin}, allow it, add
    C{Origin} to C{Vary} and expose the headers an MCP client reads.
    A preflight answered by L{answer_preflight} is left as it is.
    """
    if getattr(request, "cors_answered", False):
        return
    headers = request.responseHeaders
    for name, _values in list(headers.getAllRawHeaders()):
        if name.lower().startswith(_ACCESS_CONTROL):
            headers.removeHeader(name)
    origin = _origin(request)
    if not _listed(origin, allowed):
        return
    headers.setRawHeaders(b"access-control-allow-origin", [origin])
    vary = [v.strip() for value in headers.getRawHeaders(b"vary", []) for v in value.split(b",")]
    if not any(v.lower() in (b"origin", b"*") for v in vary):
        vary.append(b"Origin")
    headers.setRawHeaders(b"vary", [b", ".join(v for v in vary if v)])
    headers.setRawHeaders(b"access-control-expose-headers", [EXPOSED_HEADERS])
