# -*- test-case-name: tests.test_denials -*-
"""The JSON error envelope of SPEC section 6."""

import json

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from caracal.gateway.denials import Denial, denial_body, error_envelope


class DenialTests(SynchronousTestCase):
    def request(self):
        request = DummyRequest([])
        request.request_id = "rid-1"
        return request

    def test_envelope(self):
        self.assertEqual(
            json.loads(error_envelope("invalid_token", "bad", "rid")),
            {"error": "invalid_token", "description": "bad", "request_id": "rid"},
        )

    def test_401CarriesWwwAuthenticate(self):
        request = self.request()
        body = denial_body(request, Denial(401, "missing_token", "no bearer"))
        self.assertEqual(request.responseCode, 401)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"www-authenticate"), [b"Bearer"])
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"]
        )
        self.assertEqual(json.loads(body)["request_id"], "rid-1")

    def test_othersDoNot(self):
        request = self.request()
        denial_body(request, Denial(403, "access_denied", "no"))
        self.assertIsNone(request.responseHeaders.getRawHeaders(b"www-authenticate"))

    def test_reasonDefaultsToCode(self):
        self.assertEqual(Denial(401, "invalid_token", "x").reason, "invalid_token")
        self.assertEqual(Denial(401, "invalid_token", "x", reason="replay").reason, "replay")
