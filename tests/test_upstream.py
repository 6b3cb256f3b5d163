# -*- test-case-name: tests.test_upstream -*-
"""
Tests for L{caracal.gateway.upstream}: the SSRF rules, table-driven, and the
pinned endpoint. Nothing here touches the network; the public addresses in
the tables are only classified, never connected to.
"""

from __future__ import annotations

import ipaddress
import socket

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IHostnameResolver, IOpenSSLClientConnectionCreator
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from caracal.gateway.testing import MemoryResolver
from caracal.gateway.upstream import (
    PinnedUpstream,
    UpstreamGuard,
    UpstreamRefused,
    UpstreamURL,
    has_dot_segment,
    is_public_address,
    numeric_host,
    parse_upstream,
    pinned_endpoint,
)

DOT_SEGMENTS = [
    b"/..",
    b"/../etc/passwd",
    b"/a/../b",
    b"/a/./b",
    b"/.",
    b"/a/.",
    b"..",
    b"/%2e%2e/x",
    b"/%2E%2e/x",
    b"/.%2e/x",
    b"/%2e./x",
    b"/%2e/x",
    b"/%252e%252e/x",  # double-encoded
    b"/%25252e%25252e/x",  # triple-encoded
    b"/a\\..\\b",
    b"/a%5c..%5cb",
    b"/a%5C..",
    b"/..%5cx",
    b"/%5c..",
    b"/a/..%2fb",
    b"/a%2f..%2fb",
    b"/a%252f..%252fb",
    b"/%c0%ae%c0%ae/x",  # overlong UTF-8
    b"/..;jsessionid=1/admin",  # servlet path parameter
    b"/.;/admin",
    b"/a/..?x=1",
    b"/%" + b"25" * 8 + b"2e",  # encoded deeper than we decode: refused
]

NOT_DOT_SEGMENTS = [
    b"/",
    b"",
    b"/a.b",
    b"/...",  # three dots: an ordinary name, not a dot segment
    b"/.../x",
    b"/.well-known/openid-configuration",
    b"/v1.2/x",
    b"/a..b",
    b"/..a",
    b"/a..",
    b"/%2ea",
    b"/a%2e",
    b"/a%2eb/c",
    b"/tools/x?path=../y",  # the query is not the path
    b"/x;..",  # parameter value, not a segment
    b"/a%20b",
    b"/%252ex",
]


class DotSegmentTests(SynchronousTestCase):
    """L{has_dot_segment} over every spelling, and the names that must pass."""

    def test_dot_segments(self):
        """Every spelling of a C{.} or C{..} segment (percent-encoded, backslashed) is found."""
        for path in DOT_SEGMENTS:
            self.assertTrue(has_dot_segment(path), path)

    def test_not_dot_segments(self):
        """Dots inside a segment's name are not dot segments."""
        for path in NOT_DOT_SEGMENTS:
            self.assertFalse(has_dot_segment(path), path)


NUMERIC = [
    ("127.0.0.1", "127.0.0.1"),
    ("2130706433", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"),
    ("0X7F.0.0.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),
    ("0", "0.0.0.0"),
    ("0x", "0.0.0.0"),
    ("169.254.43518", "169.254.169.254"),
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
    ("127.0.0.1.", "127.0.0.1"),
    ("8.8.8.8", "8.8.8.8"),
    ("::1", "::1"),
    ("[::1]", "::1"),
    ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
    ("fe80::1%25eth0", "fe80::1%eth0"),
    ("[fe80::1%eth0]", "fe80::1%eth0"),
]

NOT_NUMERIC = [
    "example.com",
    "localhost",
    "256.0.0.1",
    "1.2.3.4.5",
    "08.0.0.1",  # 8 is not an octal digit
    "0x100.0.0.1",
    "1.2.3.4 extra",
    "4294967296",
    "1.16777216",
    "",
    "[::1",
    "::g",
    "１２７.0.0.1",  # fullwidth digits
]


class NumericHostTests(SynchronousTestCase):
    """L{numeric_host} reads every spelling inet_aton accepts."""

    def test_numeric(self):
        """
        Every numeric host form inet_aton accepts (octal, hex, short forms, IPv6) is read as its
        address.
        """
        for host, expected in NUMERIC:
            self.assertEqual(numeric_host(host), ipaddress.ip_address(expected), host)

    def test_not_numeric(self):
        """Host names, and numbers out of range, are not numeric hosts."""
        for host in NOT_NUMERIC:
            self.assertIsNone(numeric_host(host), host)


REFUSED_ADDRESSES = [
    # IPv4
    "0.0.0.0",
    "0.1.2.3",
    "10.0.0.1",
    "10.255.255.255",
    "100.64.0.1",
    "100.127.255.254",
    "127.0.0.1",
    "127.8.9.10",
    "169.254.169.254",  # cloud metadata
    "169.254.0.1",
    "172.16.0.1",
    "172.31.255.254",
    "192.0.0.1",
    "192.0.0.9",
    "192.0.0.170",
    "192.0.2.1",
    "192.88.99.1",
    "192.168.1.1",
    "198.18.0.1",
    "198.19.255.254",
    "198.51.100.7",
    "203.0.113.9",
    "224.0.0.1",
    "239.255.255.250",
    "240.0.0.1",
    "255.255.255.255",
    # IPv6
    "::",
    "::1",
    "fc00::1",
    "fd12:3456:789a::1",
    "fe80::1",
    "fe80::1%eth0",
    "fec0::1",
    "ff02::1",
    "ff0e::1",
    "2001:db8::1",
    "3fff::1",
    "100::1",
    "2001:2::1",
    "2001:10::1",
    # IPv4 forms, judged by the embedded address
    "::ffff:127.0.0.1",  # mapped
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:0:127.0.0.1",  # translated
    "::127.0.0.1",  # compatible
    "::10.1.2.3",
    "64:ff9b::127.0.0.1",  # NAT64
    "64:ff9b::a9fe:a9fe",
    "64:ff9b::192.168.0.1",
    "64:ff9b:1::8.8.8.8",  # local-use NAT64: never public
    "64:ff9b:1::a00:1",
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo, client 10.0.0.1
    "2001:0:a00:1::f7f7:f7f7",  # Teredo, server 10.0.0.1, client 8.8.8.8
]

PUBLIC_ADDRESSES = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "100.63.255.255",  # just below 100.64/10
    "100.128.0.1",  # just above it
    "172.15.255.255",
    "172.32.0.1",
    "192.0.3.1",
    "198.17.255.255",
    "198.20.0.1",
    "223.255.255.254",
    "2606:4700:4700::1111",
    "2a00:1450:4001:81c::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::8.8.8.8",
    "2002:808:808::1",  # 6to4 of 8.8.8.8
    "2001:0:4136:e378:8000:63bf:f7f7:f7f7",  # Teredo, client 8.8.8.8
]


class AddressClassTests(SynchronousTestCase):
    """L{is_public_address} over every refused class and public examples."""

    def test_refused(self):
        """Loopback, private, link-local, reserved and embedded-private addresses are not public."""
        for text in REFUSED_ADDRESSES:
            self.assertFalse(is_public_address(ipaddress.ip_address(text)), text)

    def test_public(self):
        """Ordinary internet addresses are public."""
        for text in PUBLIC_ADDRESSES:
            self.assertTrue(is_public_address(ipaddress.ip_address(text)), text)


GOOD_URLS = [
    ("http://example.com", UpstreamURL("http", "example.com", 80, b"/", b"")),
    ("https://example.com", UpstreamURL("https", "example.com", 443, b"/", b"")),
    ("HTTPS://Example.COM:8443/API", UpstreamURL("https", "example.com", 8443, b"/API", b"")),
    ("http://example.com:/x", UpstreamURL("http", "example.com", 80, b"/x", b"")),
    ("http://example.com/a?b=1&c#frag", UpstreamURL("http", "example.com", 80, b"/a", b"b=1&c")),
    ("http://example.com/a%2Fb", UpstreamURL("http", "example.com", 80, b"/a%2Fb", b"")),
    ("http://[::1]:8080/", UpstreamURL("http", "::1", 8080, b"/", b"")),
    ("http://[FE80::1%25eth0]/", UpstreamURL("http", "fe80::1%eth0", 80, b"/", b"")),
    ("http://0x7f.1/", UpstreamURL("http", "127.0.0.1", 80, b"/", b"")),
    ("http://2130706433:81/", UpstreamURL("http", "127.0.0.1", 81, b"/", b"")),
    ("http://bücher.example/ä", UpstreamURL("http", "xn--bcher-kva.example", 80, b"/%C3%A4", b"")),
    ("http://example.com./", UpstreamURL("http", "example.com.", 80, b"/", b"")),
    ("http://my_service.internal/", UpstreamURL("http", "my_service.internal", 80, b"/", b"")),
    (
        "http://example.com/.well-known/x",
        UpstreamURL("http", "example.com", 80, b"/.well-known/x", b""),
    ),
    ("http://example.com:65535/", UpstreamURL("http", "example.com", 65535, b"/", b"")),
]

BAD_URLS = [
    ("", "bad_url"),
    ("example.com/x", "bad_scheme"),
    ("ftp://example.com/", "bad_scheme"),
    ("file:///etc/passwd", "bad_scheme"),
    ("gopher://example.com/", "bad_scheme"),
    ("http:///x", "bad_host"),
    ("http://", "bad_host"),
    ("http://:80/", "bad_host"),
    ("http://user:pass@example.com/", "userinfo"),
    ("http://user@example.com/", "userinfo"),
    ("http://example.com@127.0.0.1/", "userinfo"),
    ("http://@example.com/", "userinfo"),
    ("http://example.com:0/", "bad_port"),
    ("http://example.com:65536/", "bad_port"),
    ("http://example.com:-1/", "bad_port"),
    ("http://example.com:+80/", "bad_port"),
    ("http://example.com:8o/", "bad_port"),
    ("http://example.com:١٢/", "bad_port"),  # Arabic-Indic digits
    ("http://example.com/../admin", "dot_segment"),
    ("http://example.com/a/%2e%2e/admin", "dot_segment"),
    ("http://example.com/a/%252e%252e/admin", "dot_segment"),
    ("http://example.com/a/..;/admin", "dot_segment"),
    ("http://example.com\\@127.0.0.1/", "bad_url"),
    ("http://example.com/a\\..\\b", "bad_url"),
    ("http://exa mple.com/", "bad_url"),
    (" http://example.com/", "bad_url"),
    ("http://example.com/\t", "bad_url"),
    ("http://example.com/\n", "bad_url"),
    ("http://example.com\r\n.evil/", "bad_url"),
    ("http://example.com/\x00", "bad_url"),
    ("http://example.com/\x7f", "bad_url"),
    ("http://example.com/\x85", "bad_url"),
    ("http://::1/", "bad_host"),
    ("http://[::1/", "bad_url"),
    ("http://[::1]x/", "bad_host"),
    ("http://[v1.fe]/", "bad_host"),
    ("http://[127.0.0.1]/", "bad_url"),  # urlsplit refuses it
    ("http://exa%6dple.com/", "bad_host"),
    ("http://-example.com/", "bad_host"),
    ("http://example..com/", "bad_host"),
    ("http://exa$mple.com/", "bad_host"),
    ("http://" + "a" * 64 + ".com/", "bad_host"),
]


class ParseUpstreamTests(SynchronousTestCase):
    """L{parse_upstream}: the static rules."""

    def test_good(self):
        """Well-formed http(s) URLs parse into their parts, the host normalised."""
        for url, expected in GOOD_URLS:
            self.assertEqual(parse_upstream(url), expected, url)

    def test_bad(self):
        """Each malformed or forbidden URL is refused with its own reason."""
        for url, reason in BAD_URLS:
            with self.assertRaises(UpstreamRefused, msg=repr(url)) as caught:
                parse_upstream(url)
            self.assertEqual(caught.exception.reason, reason, url)

    def test_refusal_hides_secrets(self):
        """Neither the userinfo nor the query appears in the refusal."""
        for url in ("http://admin:hunter2@example.com/", "ftp://example.com/?key=hunter2"):
            with self.assertRaises(UpstreamRefused) as caught:
                parse_upstream(url)
            self.assertNotIn("hunter2", str(caught.exception))
            self.assertNotIn("hunter2", repr(caught.exception))

    def test_remembered(self):
        """An accepted URL is parsed once; a refused one is refused every time."""
        first = parse_upstream("http://remembered.example:8080/api?x=1")
        self.assertIs(parse_upstream("http://remembered.example:8080/api?x=1"), first)
        for _ in range(2):
            with self.assertRaises(UpstreamRefused):
                parse_upstream("http://remembered.example/../admin")
        for url in (None, b"http://example.com/", ""):
            with self.assertRaises(UpstreamRefused):
                parse_upstream(url)

    def test_frozen(self):
        """A parsed upstream URL cannot be changed afterwards."""
        url = parse_upstream("http://example.com/")
        with self.assertRaises(AttributeError):
            url.host = "evil.example"

    def test_host_header_and_uri(self):
        """The Host header omits a default port; the request URI always names the port."""
        cases = [
            ("http://example.com/", "example.com", b"http://example.com:80/x?q"),
            ("http://example.com:8080/", "example.com:8080", b"http://example.com:8080/x?q"),
            ("https://example.com:443/", "example.com", b"https://example.com:443/x?q"),
            ("http://[::1]:81/", "[::1]:81", b"http://[::1]:81/x?q"),
            ("https://[2606:4700::1]/", "[2606:4700::1]", b"https://[2606:4700::1]:443/x?q"),
        ]
        for url, host_header, uri in cases:
            parsed = parse_upstream(url)
            self.assertEqual(parsed.host_header, host_header)
            self.assertEqual(parsed.uri(b"/x", b"q"), uri)


@implementer(IHostnameResolver)
class SilentResolver:
    """A resolver that never answers (a hung getaddrinfo)."""

    def resolveHostName(self, resolutionReceiver, hostName, *args, **kwargs):
        resolutionReceiver.resolutionBegan(None)


class _GAIResolution:
    """Like Twisted's threaded resolver's resolution: it cannot be cancelled."""

    def cancel(self):
        raise NotImplementedError()


@implementer(IHostnameResolver)
class UncancellableResolver:
    """A resolver that answers only when the test says so, and cannot cancel."""

    def resolveHostName(self, resolutionReceiver, hostName, *args, **kwargs):
        self.receiver = resolutionReceiver
        resolutionReceiver.resolutionBegan(_GAIResolution())


@implementer(IHostnameResolver)
class BrokenResolver:
    """A resolver that raises instead of answering."""

    def resolveHostName(self, *args, **kwargs):
        raise OSError("resolver exploded")


@implementer(IHostnameResolver)
class RefusingResolver:
    """A resolver that must not be asked: the rule before it refuses."""

    def __init__(self, case):
        self.case = case

    def resolveHostName(self, *args, **kwargs):
        self.case.fail("the resolver was asked")


class UpstreamGuardTests(SynchronousTestCase):
    """L{UpstreamGuard.check}: the rules in order, one resolution."""

    def refused(self, d) -> UpstreamRefused:
        return self.failureResultOf(d, UpstreamRefused).value

    def test_public_name_pinned(self):
        """A name with public addresses is pinned to its first IPv4 address, the URL kept."""
        resolver = MemoryResolver({"api.example": ["93.184.216.34", "2606:4700::1"]})
        guard = UpstreamGuard(resolver)
        pinned = self.successResultOf(guard.check("https://API.example/v1?x=1"))
        self.assertEqual(
            pinned,
            PinnedUpstream(
                url=UpstreamURL("https", "api.example", 443, b"/v1", b"x=1"),
                address="93.184.216.34",
                family=socket.AF_INET,
            ),
        )
        self.assertEqual(resolver.asked, ["api.example"])

    def test_ipv6_pinned(self):
        """A name with only an IPv6 address is pinned to it, family AF_INET6."""
        guard = UpstreamGuard(MemoryResolver({"v6.example": ["2606:4700::1"]}))
        pinned = self.successResultOf(guard.check("http://v6.example/"))
        self.assertEqual((pinned.address, pinned.family), ("2606:4700::1", socket.AF_INET6))

    def test_name_to_private_refused(self):
        """A name resolving to any non-public address is refused as private_address."""
        for address in ("127.0.0.1", "10.0.0.5", "169.254.169.254", "::1", "::ffff:10.0.0.1"):
            guard = UpstreamGuard(MemoryResolver({"internal.example": [address]}))
            refusal = self.refused(guard.check("http://internal.example/"))
            self.assertEqual(refusal.reason, "private_address", address)

    def test_mixed_public_private_refused(self):
        """Every address must be public, not just the first."""
        guard = UpstreamGuard(MemoryResolver({"rebind.example": ["93.184.216.34", "127.0.0.1"]}))
        self.assertEqual(
            self.refused(guard.check("http://rebind.example/")).reason, "private_address"
        )

    def test_allowlist_miss_before_resolving(self):
        """A host off the allowlist is refused without resolving it."""
        guard = UpstreamGuard(RefusingResolver(self), allowlist=frozenset({"api.example"}))
        refusal = self.refused(guard.check("http://other.example/"))
        self.assertEqual(refusal.reason, "not_allowlisted")

    def test_allowlist_case_and_trailing_dot(self):
        """Allowlist matching ignores case and a trailing dot; the URL's host is kept as written."""
        resolver = MemoryResolver({"api.example.": ["93.184.216.34"], "api.example": ["8.8.8.8"]})
        guard = UpstreamGuard(resolver, allowlist=frozenset({"api.example."}))
        self.successResultOf(guard.check("http://api.example/"))
        pinned = self.successResultOf(guard.check("http://API.EXAMPLE./"))
        self.assertEqual(pinned.url.host, "api.example.")

    def test_allowlist_entries_in_any_spelling(self):
        """Allowlist entries are read the way upstream hosts are: one canonical form."""
        resolver = MemoryResolver({"xn--bcher-kva.example": ["93.184.216.34"]})
        for entry, url in (
            ("[::1]", "http://[::1]/"),
            ("0x7f.1", "http://127.0.0.1/"),
            ("127.0.0.1", "http://2130706433/"),
            ("B\u00fccher.example", "http://b\u00fccher.example/"),
            ("xn--bcher-kva.example", "http://B\u00dcCHER.example/"),
        ):
            guard = UpstreamGuard(resolver, allowlist=frozenset({entry}), allow_private=True)
            self.successResultOf(guard.check(url))

    def test_dot_segment_before_resolving(self):
        """A dot segment in the upstream path is refused without resolving."""
        guard = UpstreamGuard(RefusingResolver(self))
        self.assertEqual(
            self.refused(guard.check("http://x.example/%2e%2e/")).reason, "dot_segment"
        )

    def test_static_rules_before_resolving(self):
        """
        Scheme, userinfo and port rules apply before resolving, even with private upstreams allowed.
        """
        guard = UpstreamGuard(RefusingResolver(self), allow_private=True)
        for url in ("ftp://x.example/", "http://u:p@x.example/", "http://x.example:0/"):
            self.refused(guard.check(url))

    def test_numeric_host_judged_without_resolving(self):
        """A numeric host in any spelling is judged as the address it is, without DNS."""
        guard = UpstreamGuard(RefusingResolver(self))
        for url in (
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://0xa9fea9fe/",
        ):
            self.assertEqual(self.refused(guard.check(url)).reason, "private_address", url)
        pinned = self.successResultOf(guard.check("http://8.8.8.8/"))
        self.assertEqual((pinned.address, pinned.family), ("8.8.8.8", socket.AF_INET))

    def test_numeric_verdicts_remembered_per_guard(self):
        """
        A numeric host's pin is kept (it cannot change), a refusal is given
        again every time, and one guard's verdict is not another's.
        """
        open_guard = UpstreamGuard(RefusingResolver(self), allow_private=True)
        strict = UpstreamGuard(RefusingResolver(self))
        pinned = self.successResultOf(open_guard.check("http://127.0.0.1:9/"))
        self.assertIs(self.successResultOf(open_guard.check("http://127.0.0.1:9/")), pinned)
        for _ in range(2):
            self.assertEqual(
                self.refused(strict.check("http://127.0.0.1:9/")).reason, "private_address"
            )
        listed = UpstreamGuard(RefusingResolver(self), {"10.0.0.1"}, allow_private=True)
        self.successResultOf(listed.check("http://10.0.0.1/"))
        self.assertEqual(self.refused(listed.check("http://10.0.0.2/")).reason, "not_allowlisted")

    def test_allow_private(self):
        """With private upstreams allowed, loopback names and addresses are pinned."""
        guard = UpstreamGuard(MemoryResolver({"localhost": ["127.0.0.1"]}), allow_private=True)
        pinned = self.successResultOf(guard.check("http://127.0.0.1:8080/"))
        self.assertEqual((pinned.address, pinned.url.port), ("127.0.0.1", 8080))
        pinned = self.successResultOf(guard.check("http://localhost:8080/"))
        self.assertEqual((pinned.address, pinned.url.host), ("127.0.0.1", "localhost"))

    def test_allow_private_keeps_allowlist(self):
        """Allowing private upstreams does not lift the allowlist."""
        guard = UpstreamGuard(
            RefusingResolver(self), allowlist=frozenset({"api.internal"}), allow_private=True
        )
        self.assertEqual(self.refused(guard.check("http://10.0.0.1/")).reason, "not_allowlisted")

    def test_resolution_failure_refused(self):
        """A name that resolves to nothing is refused as unresolvable."""
        resolver = MemoryResolver({})
        guard = UpstreamGuard(resolver, allow_private=True)
        self.assertEqual(
            self.refused(guard.check("http://nowhere.example/")).reason, "unresolvable"
        )
        self.assertEqual(resolver.asked, ["nowhere.example"])

    def test_prefers_ipv4(self):
        """Of a dual-stack name the IPv4 address is pinned."""
        resolver = MemoryResolver({"dual.example": ["2606:4700::1", "93.184.216.34"]})
        pinned = self.successResultOf(UpstreamGuard(resolver).check("http://dual.example/"))
        self.assertEqual((pinned.address, pinned.family), ("93.184.216.34", socket.AF_INET))

    def test_resolution_timeout(self):
        """A resolver silent past the timeout refuses the upstream, and leaves no timer."""
        clock = Clock()
        guard = UpstreamGuard(SilentResolver(), clock=clock, timeout=2.0)
        d = guard.check("http://hang.example/")
        clock.advance(1.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        self.assertEqual(self.refused(d).reason, "resolution_timeout")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel_drops_resolution(self):
        """Cancelling a check cancels the resolution and its timer; it is no refusal."""
        clock = Clock()
        resolver = MemoryResolver()
        resolver.pending = []
        guard = UpstreamGuard(resolver, clock=clock, timeout=2.0)
        d = guard.check("http://slow.example/")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        [(_receiver, resolution)] = resolver.pending
        self.assertTrue(resolution.cancelled)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel_uncancellable_resolution(self):
        """getaddrinfo cannot be cancelled: the check still ends, and its late answer is ignored."""
        resolver = UncancellableResolver()
        guard = UpstreamGuard(resolver)
        d = guard.check("http://slow.example/")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        resolver.receiver.addressResolved(IPv4Address("TCP", "93.184.216.34", 0))
        resolver.receiver.resolutionComplete()

    def test_resolution_in_time_cancels_timer(self):
        """A resolution in time cancels its timeout."""
        clock = Clock()
        guard = UpstreamGuard(MemoryResolver({"a.example": ["8.8.8.8"]}), clock=clock, timeout=2.0)
        self.successResultOf(guard.check("http://a.example/"))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_resolver_raising(self):
        """A resolver that raises refuses the upstream as unresolvable."""
        guard = UpstreamGuard(BrokenResolver())
        self.assertEqual(self.refused(guard.check("http://a.example/")).reason, "unresolvable")

    def test_resolves_once(self):
        """One check resolves the host once."""
        resolver = MemoryResolver({"api.example": ["93.184.216.34"]})
        guard = UpstreamGuard(resolver)
        self.successResultOf(guard.check("http://api.example/"))
        self.assertEqual(len(resolver.asked), 1)


@implementer(IOpenSSLClientConnectionCreator)
class FakeCreator:
    def __init__(self, hostname):
        self.hostname = hostname

    def clientConnectionForTLS(self, tlsProtocol):
        raise NotImplementedError("not connected in these tests")


@implementer(IPolicyForHTTPS)
class RecordingPolicy:
    def __init__(self):
        self.asked = []

    def creatorForNetloc(self, hostname, port):
        self.asked.append((hostname, port))
        return FakeCreator(hostname)


class PinnedEndpointTests(SynchronousTestCase):
    """L{pinned_endpoint} connects to the pinned address only."""

    def connect(self, pinned):
        reactor = MemoryReactorClock()
        policy = RecordingPolicy()
        endpoint = pinned_endpoint(pinned, policy, reactor, connect_timeout=7)
        from twisted.internet.protocol import Factory, Protocol

        endpoint.connect(Factory.forProtocol(Protocol))
        return reactor, policy

    def test_http_connects_to_pinned_ipv4(self):
        """An http upstream connects to the pinned address and port, without TLS."""
        pinned = PinnedUpstream(parse_upstream("http://api.example:8080/"), "93.184.216.34", 2)
        reactor, policy = self.connect(pinned)
        [(host, port, _factory, timeout, _bind)] = reactor.tcpClients
        self.assertEqual((host, port, timeout), ("93.184.216.34", 8080, 7))
        self.assertEqual(policy.asked, [])

    def test_https_verifies_hostname(self):
        """An https upstream connects to the pinned address and verifies the URL's host name."""
        pinned = PinnedUpstream(parse_upstream("https://api.example/"), "93.184.216.34", 2)
        reactor, policy = self.connect(pinned)
        [(host, port, _factory, _timeout, _bind)] = reactor.tcpClients
        self.assertEqual((host, port), ("93.184.216.34", 443))
        self.assertEqual(policy.asked, [(b"api.example", 443)])

    def test_https_trailing_dot_verified_without_it(self):
        """Certificates never name the root's trailing dot."""
        pinned = PinnedUpstream(parse_upstream("https://api.example./"), "93.184.216.34", 2)
        _, policy = self.connect(pinned)
        self.assertEqual(policy.asked, [(b"api.example", 443)])

    def test_ipv6(self):
        """An IPv6 pin connects over IPv6 to the pinned address."""
        pinned = PinnedUpstream(
            parse_upstream("https://v6.example:8443/"), "2606:4700::1", socket.AF_INET6
        )
        reactor, policy = self.connect(pinned)
        [(host, port, _factory, _timeout, _bind)] = reactor.tcpClients
        self.assertEqual((host, port), ("2606:4700::1", 8443))
        self.assertEqual(policy.asked, [(b"v6.example", 8443)])


class PathFastWayOutTests(SynchronousTestCase):
    """path_problem's early answer for paths that cannot hide a dot segment or a NUL."""

    def test_agrees_with_the_full_check(self):
        """
        On 20,000 paths built from the characters dot segments, encodings
        and fragments are made of, the answer is the one the full check gives.
        """
        import random
        import re

        from caracal.gateway import upstream

        rng = random.Random(1207)
        pieces = [
            b"a",
            b"/",
            b".",
            b"..",
            b"%",
            b"2",
            b"e",
            b"E",
            b"5",
            b"c",
            b"0",
            b"\\",
            b";",
            b"#",
            b"?",
            b"\x00",
            b"%2e",
            b"%2E",
            b"%00",
            b"%c0%ae",
            b"%252e",
        ]
        paths = [
            b"/" + b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
            for _ in range(20000)
        ]
        fast = [upstream.path_problem(p) for p in paths]
        # A pattern that always matches: every path takes the full check.
        self.patch(upstream, "_MAY_HIDE", re.compile(rb""))
        full = [upstream.path_problem(p) for p in paths]
        disagreeing = [(p, f, g) for p, f, g in zip(paths, fast, full, strict=True) if f != g]
        self.assertEqual(disagreeing[:3], [])
        self.assertIn(None, fast)
        self.assertTrue(any(fast))
