# -*- test-case-name: tests.test_headers -*-
"""The header policy of L{caracal.gateway.headers}."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from caracal.gateway.headers import (
    HOP_BY_HOP,
    RESERVED_HEADERS,
    auth_header_problem,
    auth_scheme_problem,
    connection_tokens,
)


class HeaderPolicyTests(SynchronousTestCase):
    """Hop-by-hop names, C{Connection} tokens and the names a credential may not take."""

    def test_connection_tokens(self):
        """Every name a C{Connection} header lists, lowercased, across repeated headers."""
        headers = Headers({b"Connection": [b"Keep-Alive, X-Secret ,", b"close"]})
        self.assertEqual(connection_tokens(headers), {b"keep-alive", b"x-secret", b"close"})
        self.assertEqual(connection_tokens(Headers()), set())

    def test_reserved_includes_hop_by_hop(self):
        """No credential may travel in a hop-by-hop header."""
        self.assertEqual(
            RESERVED_HEADERS - {name.decode() for name in HOP_BY_HOP},
            {
                "host",
                "content-length",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-forwarded-host",
                "x-request-id",
                "traceparent",
            },
        )

    def test_auth_header_names(self):
        """Reserved and X-Caracal-* names are refused, in any case; other tokens pass."""
        self.assertEqual(auth_header_problem("Transfer-Encoding"), "reserved")
        self.assertEqual(auth_header_problem("X-Caracal-Identity"), "reserved")
        self.assertIsNotNone(auth_header_problem("Bad Name"))
        self.assertIsNone(auth_header_problem("X-Api-Key"))

    def test_auth_schemes(self):
        """A scheme is empty or one token."""
        self.assertIsNone(auth_scheme_problem(""))
        self.assertIsNone(auth_scheme_problem("Bearer"))
        self.assertIsNotNone(auth_scheme_problem("Bearer x"))
