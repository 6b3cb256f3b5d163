# -*- test-case-name: tests.test_denials -*-
"""
L{Denial}: the one way a pipeline step refuses a request, and the JSON error
envelope of SPEC section 6 that every refusal is answered with.
"""

from __future__ import annotations

import json


class Denial(Exception):
    """
    A request is refused.

    @ivar status: the HTTP status to answer with.
    @ivar code: the SPEC's C{error} code (C{invalid_token}, ...).
    @ivar description: a short human text; never contains a token.
    @ivar metric: the denial counter to increment, or C{None}.
    @ivar reason: a short machine word for the access log (defaults to C{code}).
    """

    def __init__(
        self,
        status: int,
        code: str,
        description: str,
        metric: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(status, code, description)
        self.status = status
        self.code = code
        self.description = description
        self.metric = metric
        self.reason = reason or code

    def __repr__(self) -> str:
        return f"Denial({self.status}, {self.code!r}, {self.description!r})"


def error_envelope(code: str, description: str, request_id: str) -> bytes:
    """The JSON error envelope of SPEC section 6."""
    return json.dumps(
        {"error": code, "description": description, "request_id": request_id},
        separators=(",", ":"),
    ).encode("utf-8")


def error_body(request, status: int, code: str, description: str) -> bytes:
    """
    Set the status and headers of an error answer on C{request} and return
    the body to write. C{request.request_id} must already be set.
    """
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
    if status == 401:
        request.responseHeaders.setRawHeaders(b"www-authenticate", [b"Bearer"])
    body = error_envelope(code, description, request.request_id)
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    return body


def denial_body(request, denial: Denial) -> bytes:
    """L{error_body} for a L{Denial}."""
    return error_body(request, denial.status, denial.code, denial.description)
