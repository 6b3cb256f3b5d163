# -*- test-case-name: tests.test_forward -*-
"""
Tests for the pure parts of L{caracal.gateway.forward}: target path, query
merge, header hygiene both ways and the credential by auth mode.
"""

from __future__ import annotations

import re

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from caracal.gateway.forward import (
    MissingProviderToken,
    credential_headers,
    forward_request_headers,
    make_traceparent,
    merge_query,
    response_headers,
    target_path,
)
from caracal.gateway.resources import Resource
from caracal.gateway.sts import Mandate

TARGET_PATHS = [
    (b"/api", b"/tools/x", b"/api/tools/x"),
    (b"/api/", b"/tools/x", b"/api/tools/x"),
    (b"/api//", b"/tools/x", b"/api/tools/x"),
    (b"/", b"/tools/x", b"/tools/x"),
    (b"", b"/tools/x", b"/tools/x"),
    (b"/api", b"/", b"/api/"),
    (b"/api", b"", b"/api"),
    (b"/", b"/", b"/"),
    (b"/", b"", b"/"),
    (b"/api", b"tools", b"/api/tools"),
    (b"/a%2Fb", b"/c%20d", b"/a%2Fb/c%20d"),
    (b"/api", b"//double", b"/api//double"),  # the caller's own path is kept
]

MERGED_QUERIES = [
    (b"", b"", b""),
    (b"a=1", b"", b"a=1"),
    (b"", b"b=2", b"b=2"),
    (b"a=1", b"b=2", b"a=1&b=2"),
    (b"a=1", b"a=2", b"a=1"),  # upstream wins
    (b"a=1", b"a=2&a=3&b=4", b"a=1&b=4"),
    (b"a=1&a=9", b"a=2", b"a=1&a=9"),
    (b"key=up", b"k%65y=down", b"key=up"),  # decoded keys compared
    (b"a+b=1", b"a%20b=2&c=3", b"a+b=1&c=3"),
    (b"flag", b"flag=1&x", b"flag&x"),
    (b"a=1&&", b"&&b=2", b"a=1&b=2"),
    (b"z=1&a=2", b"y=3&b=4", b"z=1&a=2&y=3&b=4"),  # order stable
    (b"a=%2F", b"b=%2f", b"a=%2F&b=%2f"),  # raw encodings kept
]


class PathAndQueryTests(SynchronousTestCase):
    """L{target_path} and L{merge_query}, table-driven."""

    def test_target_path(self):
        for base, path, expected in TARGET_PATHS:
            self.assertEqual(target_path(base, path), expected, (base, path))

    def test_merge_query(self):
        for upstream, request, expected in MERGED_QUERIES:
            self.assertEqual(merge_query(upstream, request), expected, (upstream, request))


TRACEPARENT = re.compile(rb"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def headers(*pairs) -> Headers:
    result = Headers()
    for name, value in pairs:
        result.addRawHeader(name, value)
    return result


def forwarded(inbound: Headers, **kwargs) -> dict[bytes, list[bytes]]:
    options = {
        "client_ip": "203.0.113.7",
        "proto": "https",
        "host": "api.example:8443",
        "request_id": "req-1",
    }
    options.update(kwargs)
    out = forward_request_headers(inbound, **options)
    return {name.lower(): values for name, values in out.getAllRawHeaders()}


class ForwardRequestHeadersTests(SynchronousTestCase):
    """L{forward_request_headers}: what reaches the upstream."""

    def test_end_to_end_headers_kept(self):
        out = forwarded(
            headers(
                (b"Accept", b"text/event-stream"),
                (b"Content-Type", b"application/json"),
                (b"X-Custom", b"a"),
                (b"X-Custom", b"b"),
                (b"Cookie", b"c=1"),
                (b"tracestate", b"k=v"),
            )
        )
        self.assertEqual(out[b"accept"], [b"text/event-stream"])
        self.assertEqual(out[b"content-type"], [b"application/json"])
        self.assertEqual(out[b"x-custom"], [b"a", b"b"])
        self.assertEqual(out[b"cookie"], [b"c=1"])
        self.assertEqual(out[b"tracestate"], [b"k=v"])

    def test_hop_by_hop_removed(self):
        out = forwarded(
            headers(
                (b"Connection", b"keep-alive, X-Hop"),
                (b"Connection", b"x-other"),
                (b"X-Hop", b"1"),
                (b"X-Other", b"1"),
                (b"Keep-Alive", b"timeout=5"),
                (b"Proxy-Connection", b"keep-alive"),
                (b"Proxy-Authenticate", b"Basic"),
                (b"Proxy-Authorization", b"Basic eDp5"),
                (b"TE", b"trailers"),
                (b"Trailer", b"X-T"),
                (b"Transfer-Encoding", b"chunked"),
                (b"Upgrade", b"websocket"),
                (b"Content-Length", b"12"),
                (b"Expect", b"100-continue"),
                (b"X-Kept", b"yes"),
            )
        )
        for name in (
            b"connection",
            b"x-hop",
            b"x-other",
            b"keep-alive",
            b"proxy-connection",
            b"proxy-authenticate",
            b"proxy-authorization",
            b"te",
            b"trailer",
            b"transfer-encoding",
            b"upgrade",
            b"content-length",
            b"expect",
        ):
            self.assertNotIn(name, out)
        self.assertEqual(out[b"x-kept"], [b"yes"])

    def test_caller_bearer_and_caracal_headers_removed(self):
        out = forwarded(
            headers(
                (b"Authorization", b"Bearer caller-token"),
                (b"X-Caracal-Resource", b"tools"),
                (b"x-caracal-identity", b"forged"),
                (b"X-CARACAL-Client-ID", b"forged"),
                (b"X-Api-Key", b"caller-key"),
            ),
            drop=[b"X-Api-Key"],
        )
        self.assertNotIn(b"authorization", out)
        self.assertNotIn(b"x-api-key", out)
        self.assertFalse([n for n in out if n.startswith(b"x-caracal-")])

    def test_forwarding_headers_replaced(self):
        out = forwarded(
            headers(
                (b"Host", b"gateway.example"),
                (b"X-Forwarded-For", b"6.6.6.6"),
                (b"X-Forwarded-Proto", b"ftp"),
                (b"X-Forwarded-Host", b"evil.example"),
                (b"Forwarded", b"for=6.6.6.6"),
                (b"X-Real-IP", b"6.6.6.6"),
                (b"X-Request-Id", b"caller-id"),
            )
        )
        self.assertEqual(out[b"host"], [b"api.example:8443"])
        self.assertEqual(out[b"x-forwarded-for"], [b"203.0.113.7"])
        self.assertEqual(out[b"x-forwarded-proto"], [b"https"])
        self.assertEqual(out[b"x-forwarded-host"], [b"gateway.example"])
        self.assertEqual(out[b"x-request-id"], [b"req-1"])
        self.assertNotIn(b"forwarded", out)
        self.assertNotIn(b"x-real-ip", out)

    def test_no_inbound_host(self):
        out = forwarded(headers(), client_ip=None)
        self.assertNotIn(b"x-forwarded-host", out)
        self.assertNotIn(b"x-forwarded-for", out)
        self.assertEqual(out[b"host"], [b"api.example:8443"])

    def test_traceparent(self):
        valid = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        out = forwarded(headers((b"traceparent", valid), (b"tracestate", b"k=v")))
        self.assertEqual(out[b"traceparent"], [valid])
        self.assertEqual(out[b"tracestate"], [b"k=v"])
        for bad in (
            b"garbage",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ):
            out = forwarded(headers((b"traceparent", bad), (b"tracestate", b"k=v")))
            [generated] = out[b"traceparent"]
            self.assertNotEqual(generated, bad)
            self.assertRegex(generated, TRACEPARENT)
            self.assertNotIn(b"tracestate", out)
        [generated] = forwarded(headers())[b"traceparent"]
        self.assertRegex(generated, TRACEPARENT)

    def test_make_traceparent_unique(self):
        values = {make_traceparent() for _ in range(50)}
        self.assertEqual(len(values), 50)
        for value in values:
            self.assertRegex(value, TRACEPARENT)


def resource(auth_mode="caracal_jwt", auth_header=None, auth_scheme=None) -> Resource:
    return Resource(
        resource_identifier="tools",
        zone_id="zone-1",
        application_id="app-1",
        upstream_url="https://api.example/",
        auth_mode=auth_mode,
        auth_header=auth_header,
        auth_scheme=auth_scheme,
    )


class CredentialHeadersTests(SynchronousTestCase):
    """L{credential_headers} by auth mode."""

    def test_table(self):
        mandate = Mandate(access_token="mandate-jwt", provider_token="provider-secret")
        cases = [
            (resource(), [(b"Authorization", b"Bearer mandate-jwt")]),
            (
                resource(auth_header="X-Mandate", auth_scheme="Caracal"),
                [(b"X-Mandate", b"Caracal mandate-jwt")],
            ),
            (resource(auth_scheme=""), [(b"Authorization", b"mandate-jwt")]),
            (
                resource("provider_oauth", auth_scheme="Bearer"),
                [
                    (b"Authorization", b"Bearer provider-secret"),
                    (b"X-Caracal-Identity", b"mandate-jwt"),
                ],
            ),
            (
                resource("provider_apikey", auth_header="X-Api-Key"),
                [(b"X-Api-Key", b"provider-secret"), (b"X-Caracal-Identity", b"mandate-jwt")],
            ),
            (
                resource("provider_oauth"),
                [(b"Authorization", b"provider-secret"), (b"X-Caracal-Identity", b"mandate-jwt")],
            ),
        ]
        for res, expected in cases:
            self.assertEqual(credential_headers(res, mandate), expected, res)

    def test_provider_mode_without_provider_token(self):
        mandate = Mandate(access_token="mandate-jwt")
        for mode in ("provider_oauth", "provider_apikey"):
            with self.assertRaises(MissingProviderToken) as caught:
                credential_headers(resource(mode), mandate)
            self.assertNotIn("mandate-jwt", str(caught.exception))


class ResponseHeadersTests(SynchronousTestCase):
    """L{response_headers}: what reaches the client."""

    def upstream(self) -> Headers:
        return headers(
            (b"Content-Type", b"text/event-stream"),
            (b"Content-Length", b"42"),
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
            (b"Connection", b"X-Up-Hop, close"),
            (b"X-Up-Hop", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Trailer", b"X-T"),
            (b"Upgrade", b"h2c"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"X-Caracal-Identity", b"mandate-jwt"),
            (b"X-Caracal-Token-Expires-In", b"9999"),
            (b"X-Request-Id", b"upstream-id"),
        )

    def test_filtered(self):
        out = {n.lower(): v for n, v in response_headers(self.upstream()).getAllRawHeaders()}
        self.assertEqual(
            out,
            {
                b"content-type": [b"text/event-stream"],
                b"content-length": [b"42"],
                b"set-cookie": [b"a=1", b"b=2"],
            },
        )

    def test_transformed_drops_length(self):
        out = response_headers(self.upstream(), transformed=True)
        self.assertFalse(out.hasHeader(b"content-length"))
        self.assertTrue(out.hasHeader(b"content-type"))
