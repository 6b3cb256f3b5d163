# -*- test-case-name: tests.test_discovery -*-
"""
How an agent finds out where to get a token (SPEC 13): the RFC 9728
protected-resource metadata (C{GET /.well-known/oauth-protected-resource})
that the bearer challenge of every 401 points to (see
L{caracal.gateway.denials.bearer_challenge}).
"""

from __future__ import annotations

import json

from twisted.web.resource import Resource

from caracal.gateway.denials import error_body

RESOURCE_NAME = "caracal-gateway"


def metadata_document(public_url: str, authorization_servers) -> dict:
    """The RFC 9728 protected-resource metadata of SPEC 13."""
    return {
        "resource": public_url,
        "authorization_servers": list(authorization_servers),
        "bearer_methods_supported": ["header"],
        "resource_name": RESOURCE_NAME,
    }


class ProtectedResourceMetadata(Resource):
    """
    C{GET /.well-known/oauth-protected-resource}: the metadata when
    C{PUBLIC_URL} is set, else 404 (there is no external URL to describe).
    Never proxied.
    """

    isLeaf = True

    def __init__(self, public_url: str | None, authorization_servers) -> None:
        Resource.__init__(self)
        self.body = None
        if public_url is not None:
            document = metadata_document(public_url, authorization_servers)
            self.body = json.dumps(document, separators=(",", ":")).encode("utf-8")

    def render(self, request):
        if self.body is None:
            request.log_fields["denial"] = "not_found"
            return error_body(
                request, 404, "not_found", "PUBLIC_URL is not set: no resource metadata"
            )
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"max-age=300")
        request.setHeader(b"content-length", b"%d" % (len(self.body),))
        return self.body
