# -*- test-case-name: tests.test_denials -*-
"""The JSON error envelope of SPEC section 6."""

import json
from types import SimpleNamespace

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from caracal.gateway.denials import Denial, bearer_challenge, denial_body, error_envelope


class DenialTests(SynchronousTestCase):
    def request(self):
        request = DummyRequest([])
        request.request_id = "rid-1"
        return request

    def test_envelope(self):
        """The error envelope holds the code, the description and the request id."""
        self.assertEqual(
            json.loads(error_envelope("invalid_token", "bad", "rid")),
            {"error": "invalid_token", "description": "bad", "request_id": "rid"},
        )

    def test_401CarriesWwwAuthenticate(self):
        """A 401 carries C{WWW-Authenticate: Bearer} and a JSON body."""
        request = self.request()
        body = denial_body(request, Denial(401, "missing_token", "no bearer"))
        self.assertEqual(request.responseCode, 401)
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"www-authenticate"), [b'Bearer realm="caracal"']
        )
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"]
        )
        self.assertEqual(json.loads(body)["request_id"], "rid-1")

    def test_othersDoNot(self):
        """Refusals other than 401 carry no C{WWW-Authenticate}."""
        request = self.request()
        denial_body(request, Denial(403, "access_denied", "no"))
        self.assertIsNone(request.responseHeaders.getRawHeaders(b"www-authenticate"))

    def test_reasonDefaultsToCode(self):
        """The access log's reason is the code unless one is given."""
        self.assertEqual(Denial(401, "invalid_token", "x").reason, "invalid_token")
        self.assertEqual(Denial(401, "invalid_token", "x", reason="replay").reason, "replay")


METADATA = "https://gw.example.com/.well-known/oauth-protected-resource"


class BearerChallengeTests(SynchronousTestCase):
    """RFC 6750 section 3 challenges with the RFC 9728 pointer (SPEC 13)."""

    def challenge(self, code: str, description: str, public_url: str | None) -> bytes:
        request = DummyRequest([])
        request.request_id = "rid-1"
        config = SimpleNamespace(
            resource_metadata_url=public_url
            and public_url + "/.well-known/oauth-protected-resource"
        )
        request.gateway_site = SimpleNamespace(config=config)
        denial_body(request, Denial(401, code, description))
        [value] = request.responseHeaders.getRawHeaders(b"www-authenticate")
        return value

    def test_missing_token_has_no_error(self):
        """Without any token the challenge names the realm (and metadata) only."""
        self.assertEqual(
            self.challenge("missing_token", "no bearer token", None), b'Bearer realm="caracal"'
        )
        self.assertEqual(
            self.challenge("missing_token", "no bearer token", "https://gw.example.com"),
            b'Bearer realm="caracal", resource_metadata="' + METADATA.encode() + b'"',
        )

    def test_invalid_token(self):
        """A bad token: error="invalid_token", its description, the metadata URL."""
        self.assertEqual(
            self.challenge("invalid_token", "token already used", "https://gw.example.com"),
            b'Bearer realm="caracal", error="invalid_token",'
            b' error_description="token already used",'
            b' resource_metadata="' + METADATA.encode() + b'"',
        )

    def test_revoked_and_expired_are_invalid_token(self):
        """session_revoked and credential_expired are RFC 6750 invalid_token too."""
        for code, description in [
            ("session_revoked", "the session is revoked"),
            ("credential_expired", "token expires too soon"),
        ]:
            self.assertEqual(
                self.challenge(code, description, None),
                b'Bearer realm="caracal", error="invalid_token", error_description="'
                + description.encode()
                + b'"',
            )

    def test_description_kept_to_rfc6750_characters(self):
        """A quote, a backslash or a non-ASCII character cannot break the header."""
        self.assertEqual(
            bearer_challenge("invalid_token", 'a "b" \\ c\u00e9'),
            b'Bearer realm="caracal", error="invalid_token", error_description="a ?b? ? c?"',
        )
