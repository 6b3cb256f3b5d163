# -*- test-case-name: tests.integration.test_demo -*-
"""
The demo's tool server: a tiny upstream behind the gateway that answers every
request with what it received, so a newcomer can see what the gateway sent.

It never echoes a token: the credential it got is shown as its fingerprint
and its (unverified) claims, which is enough to see that it is a mandate
issued by the STS for this resource, not the caller's own token.

Run it with C{twistd -n web --listen tcp:PORT:interface=127.0.0.1
--class caracal.demo.upstream.EchoTool}.
"""

from __future__ import annotations

import json

import jwt
from twisted.web.resource import Resource

from caracal.gateway.tokens import fingerprint

#: Claims worth showing from the credential the upstream received.
SHOWN_CLAIMS = ("iss", "sub", "zone_id", "application_id", "resource", "act", "sid", "exp")

#: Longest request body echoed back, in characters.
ECHOED_BODY = 512


def credential(authorization: str | None) -> dict:
    """
    What an C{Authorization} header carried, without the secret: the
    scheme, the credential's fingerprint and, when it is a JWT, some of its
    claims (read without verification; this server only displays them).
    """
    if not authorization:
        return {"present": False}
    scheme, _, value = authorization.partition(" ")
    seen: dict = {"present": True, "scheme": scheme, "fingerprint": fingerprint(value.strip())}
    try:
        claims = jwt.decode(value.strip(), options={"verify_signature": False})
    except jwt.PyJWTError:
        return seen
    seen["claims"] = {name: claims[name] for name in SHOWN_CLAIMS if name in claims}
    return seen


class EchoTool(Resource):
    """Answers any method on any path with a JSON description of the request."""

    isLeaf = True

    def render(self, request) -> bytes:
        headers = request.requestHeaders
        authorization = headers.getRawHeaders(b"authorization", [None])[0]
        body = request.content.read().decode("utf-8", "replace") if request.content else ""
        document = {
            "tool": "echo",
            "method": request.method.decode("ascii", "replace"),
            "path": request.uri.decode("ascii", "replace").split("?", 1)[0],
            "request_id": (headers.getRawHeaders(b"x-request-id", [b""])[0]).decode(
                "ascii", "replace"
            ),
            "forwarded_for": (headers.getRawHeaders(b"x-forwarded-for", [b""])[0]).decode(
                "ascii", "replace"
            ),
            "credential": credential(
                authorization.decode("latin-1") if authorization is not None else None
            ),
            "body": body[:ECHOED_BODY],
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(document, sort_keys=True).encode("utf-8")
