# -*- test-case-name: tests.test_denials -*-
"""
L{Denial}: the one way a pipeline step refuses a request, and the JSON error
envelope of SPEC section 6 that every refusal is answered with, with the
RFC 6750 bearer challenge of SPEC 13 on a 401.
"""

from __future__ import annotations

import json
import re

REALM = "caracal"

#: The 401 code for a request without any credentials: RFC 6750 section 3.1
#: says such a challenge carries no error information.
MISSING_TOKEN = "missing_token"  # noqa: S105 - an error code, not a secret

# RFC 6750 section 3: error_description is limited to these characters; any
# other is replaced so the header stays one well-formed quoted-string.
_NOT_DESCRIPTION = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")


def bearer_challenge(code: str, description: str, metadata_url: str | None = None) -> bytes:
    """
    The C{WWW-Authenticate} value for a 401 answered with the SPEC's C{code}.

    Every code but C{missing_token} (C{invalid_token}, C{credential_expired},
    C{session_revoked}, ...) is an RFC 6750 C{invalid_token}: the token was
    sent and cannot be used, and the client should get a new one; the
    gateway's own code stays in the JSON body.

    @param metadata_url: the RFC 9728 metadata URL, added as
        C{resource_metadata} when given.
    """
    parameters = [f'realm="{REALM}"']
    if code != MISSING_TOKEN:
        parameters.append('error="invalid_token"')
        parameters.append(f'error_description="{_NOT_DESCRIPTION.sub("?", description)}"')
    if metadata_url is not None:
        parameters.append(f'resource_metadata="{metadata_url}"')
    return ("Bearer " + ", ".join(parameters)).encode("ascii")


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
        challenge = bearer_challenge(code, description, _metadata_url(request))
        request.responseHeaders.setRawHeaders(b"www-authenticate", [challenge])
    body = error_envelope(code, description, request.request_id)
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    return body


def _metadata_url(request) -> str | None:
    """The RFC 9728 metadata URL of the gateway serving C{request}, if any."""
    config = getattr(getattr(request, "gateway_site", None), "config", None)
    return getattr(config, "resource_metadata_url", None)


def denial_body(request, denial: Denial) -> bytes:
    """L{error_body} for a L{Denial}."""
    return error_body(request, denial.status, denial.code, denial.description)
