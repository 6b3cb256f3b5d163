# -*- test-case-name: tests.test_upstream -*-
"""
The SSRF rules of SPEC section 7: which upstream URLs the gateway may forward
to, and how the connection is pinned to an address that passed the check.

The order is fixed and matters: the static rules (L{parse_upstream}, including
the dot-segment rule) run first, then the allowlist, and only then is a name
resolved, once. The connection then goes to an address that was judged
(L{pinned_endpoint}), never to a second resolution of the name, while
TLS still verifies the certificate for the hostname.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes, urlsplit

import idna
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IResolutionReceiver
from zope.interface import implementer

from caracal.gateway.cache import BoundedCache
from caracal.gateway.interfaces import IUpstreamGuard

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORTS = {"http": 80, "https": 443}

# How many rounds of percent-decoding are examined. Each round is a layer an
# intermediary (or the upstream) might decode; a path still changing after
# this many rounds is refused as a dot segment, because nothing legitimate
# needs it.
_DECODE_ROUNDS = 4

# Overlong UTF-8 spellings of "." "/" "\" that old servers decode anyway.
_OVERLONG = (
    (b"\xc0\xae", b"."),
    (b"\xe0\x80\xae", b"."),
    (b"\xc0\xaf", b"/"),
    (b"\xe0\x80\xaf", b"/"),
    (b"\xc1\x9c", b"\\"),
    (b"\xc0\x5c", b"\\"),
)

# Most numeric-host verdicts an UpstreamGuard remembers (one per upstream URL).
_NUMERIC_CACHE_SIZE = 4096

_SEPARATORS = re.compile(rb"[/\\]")
_PERCENT = re.compile(rb"%[0-9a-fA-F]{2}")
#: What a dot segment or a NUL needs in some spelling (path_problem's fast way out).
_MAY_HIDE = re.compile(rb"[.%\x00]")


class UpstreamRefused(Exception):
    """
    An upstream URL broke an SSRF rule. The pipeline (step 12) answers 403
    C{access_denied}.

    @ivar reason: a short machine word for logs and metrics
        (C{bad_scheme}, C{dot_segment}, C{not_allowlisted},
        C{private_address}, ...).
    @ivar description: a human text; never contains the URL's query,
        userinfo or any other secret.
    """

    def __init__(self, reason: str, description: str) -> None:
        super().__init__(reason, description)
        self.reason = reason
        self.description = description

    def __str__(self) -> str:
        return f"{self.reason}: {self.description}"


def _segments_have_dots(path: bytes) -> bool:
    for segment in _SEPARATORS.split(path):
        # "..;x" is ".." to servlet containers (path parameters are dropped
        # before normalising), so judge the segment without its parameters.
        name = segment.split(b";", 1)[0]
        if name in (b".", b".."):
            return True
    return False


def has_dot_segment(path: bytes) -> bool:
    """
    Whether any segment of C{path} is C{.} or C{..} in any spelling a server
    on the way might normalise: raw, percent-encoded (C{%2e}, C{.%2E}),
    double-encoded (C{%252e}), overlong UTF-8 (C{%c0%ae}), separated by a
    backslash (C{\\..\\}, C{%5c..}), or hidden behind a path parameter
    (C{..;x}).

    C{...} and names merely containing dots (C{/a.b}, C{/.well-known},
    C{/v1.2/x}) are not dot segments: RFC 3986 removes only C{.} and C{..},
    and C{...} is an ordinary file name everywhere but in old Windows
    shells, which no upstream path reaches.

    @param path: the path only, without the query string (anything from the
        first C{?} is ignored, in case a caller passes a request target).
    """
    current = path.split(b"?", 1)[0]
    for _ in range(_DECODE_ROUNDS + 1):
        for overlong, plain in _OVERLONG:
            current = current.replace(overlong, plain)
        if _segments_have_dots(current):
            return True
        if not _PERCENT.search(current):
            return False
        current = unquote_to_bytes(current)
    # Still percent-encoded after every round: refuse rather than guess.
    return True


def path_problem(path: bytes) -> str | None:
    """
    Why a request path must not be forwarded (SPEC step 7 and 12 H1), or
    C{None}: a C{#} (a client never sends a fragment; an outbound client
    would cut the path there, dropping the upstream's pinned query), a NUL
    byte raw or percent-encoded (at any decoding depth L{has_dot_segment}
    examines), or a dot segment in any spelling L{has_dot_segment} knows.

    @param path: the path only, without the query string.
    """
    if b"#" in path:
        return "the request target contains a fragment"
    current = path.split(b"?", 1)[0]
    if not _MAY_HIDE.search(current):
        # Without a dot, a percent sign or a NUL no spelling of a dot
        # segment or of a NUL can be there (most tool paths: /mcp, /tools/x).
        return None
    for _ in range(_DECODE_ROUNDS + 1):
        if b"\x00" in current:
            return "the request path contains a NUL byte"
        if not _PERCENT.search(current):
            break
        current = unquote_to_bytes(current)
    if has_dot_segment(path):
        return "the request path contains a dot segment"
    return None


@dataclass(frozen=True)
class UpstreamURL:
    """
    An upstream URL that passed the static rules.

    @ivar scheme: C{"http"} or C{"https"}.
    @ivar host: lowercase; an IDNA (ASCII) name, or the canonical text of an
        IP address (IPv6 without brackets) whatever spelling the URL used.
    @ivar port: explicit or the scheme's default.
    @ivar base_path: the URL's path (C{b"/"} when empty), percent-encoded.
    @ivar query: the URL's query string without C{?} (C{b""} when none).
    """

    scheme: str
    host: str
    port: int
    base_path: bytes
    query: bytes

    @property
    def host_for_uri(self) -> str:
        """The host as it is written in a URI (IPv6 in brackets)."""
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def host_header(self) -> str:
        """C{Host} header value: the host, and the port when not the default."""
        if self.port == DEFAULT_PORTS[self.scheme]:
            return self.host_for_uri
        return f"{self.host_for_uri}:{self.port}"

    def uri(self, path: bytes, query: bytes = b"") -> bytes:
        """An absolute URI on this upstream (hostname, not address)."""
        target = f"{self.scheme}://{self.host_for_uri}:{self.port}".encode("ascii") + path
        if query:
            target += b"?" + query
        return target


def _refuse_characters(url: str) -> None:
    for char in url:
        code = ord(char)
        if code <= 0x20 or code == 0x7F or (0x80 <= code <= 0x9F):
            raise UpstreamRefused("bad_url", "upstream URL contains whitespace or control bytes")
        if char == "\\":
            raise UpstreamRefused("bad_url", "upstream URL contains a backslash")


def _split_netloc(netloc: str) -> tuple[str, str | None]:
    """Host and port text of C{netloc} (which holds no userinfo)."""
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise UpstreamRefused("bad_host", "unterminated IPv6 literal")
        host, rest = netloc[1:end], netloc[end + 1 :]
        if rest and not rest.startswith(":"):
            raise UpstreamRefused("bad_host", "garbage after IPv6 literal")
        host = "[" + host + "]"
        return host, (rest[1:] if rest else None)
    if netloc.count(":") > 1:
        raise UpstreamRefused("bad_host", "IPv6 literal without brackets")
    host, colon, port = netloc.partition(":")
    return host, (port if colon else None)


def _parse_port(text: str | None, scheme: str) -> int:
    if text is None or text == "":
        return DEFAULT_PORTS[scheme]
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise UpstreamRefused("bad_port", "port is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise UpstreamRefused("bad_port", "port out of range")
    return port


def _parse_v6_literal(inner: str) -> ipaddress.IPv6Address:
    # RFC 6874 writes the zone delimiter "%" as "%25" inside a URI.
    text = inner.replace("%25", "%")
    if text[:1] in ("v", "V"):
        raise UpstreamRefused("bad_host", "IPvFuture literals are not supported")
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        raise UpstreamRefused("bad_host", "malformed IPv6 literal") from None


_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?$")


def _normalise_name(host: str) -> str:
    trailing = host.endswith(".")
    bare = host[:-1] if trailing else host
    if not bare:
        raise UpstreamRefused("bad_host", "empty host")
    try:
        if bare.isascii():
            ascii_name = bare.lower()
        else:
            ascii_name = idna.encode(bare, uts46=True).decode("ascii")
    except idna.IDNAError:
        raise UpstreamRefused("bad_host", "host is not a valid IDNA name") from None
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or any(len(lbl) > 63 or not _LABEL.match(lbl) for lbl in labels):
        raise UpstreamRefused("bad_host", "host is not a valid DNS name")
    return ascii_name + ("." if trailing else "")


def parse_upstream(url: str) -> UpstreamURL:
    """
    Apply the static rules of SPEC section 7 to C{url}: scheme C{http} or
    C{https}, a host, no userinfo, a valid port, no whitespace, control byte
    or backslash anywhere, no dot segment in the path (L{has_dot_segment}).
    The fragment is dropped. Nothing here touches the network.

    The result depends on C{url} alone and URLs come from the resource
    table, so accepted URLs are remembered (L{UpstreamURL} is immutable);
    a refusal is worked out again each time.

    @raise UpstreamRefused: a rule failed.
    """
    if not isinstance(url, str) or not url:
        raise UpstreamRefused("bad_url", "upstream URL is empty")
    return _parse_upstream(url)


@functools.lru_cache(maxsize=4096)
def _parse_upstream(url: str) -> UpstreamURL:
    # urlsplit silently strips or tolerates these; refuse them up front.
    _refuse_characters(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        raise UpstreamRefused("bad_url", "upstream URL does not parse") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise UpstreamRefused("bad_scheme", "upstream scheme must be http or https")
    netloc = parts.netloc
    if "@" in netloc:
        raise UpstreamRefused("userinfo", "upstream URL must not carry userinfo")
    if not netloc:
        raise UpstreamRefused("bad_host", "upstream URL has no host")
    host_text, port_text = _split_netloc(netloc)
    port = _parse_port(port_text, scheme)
    if not host_text:
        raise UpstreamRefused("bad_host", "upstream URL has no host")
    host = canonical_host(host_text)
    # Non-ASCII in the path or query is percent-encoded (UTF-8); everything
    # else is kept exactly as written so the upstream sees what was configured.
    path = quote(parts.path, safe="".join(chr(c) for c in range(0x21, 0x7F))) or "/"
    if not path.startswith("/"):
        raise UpstreamRefused("bad_url", "upstream path must be absolute")
    base_path = path.encode("ascii")
    if has_dot_segment(base_path):
        raise UpstreamRefused("dot_segment", "upstream path has a . or .. segment")
    query = quote(parts.query, safe="".join(chr(c) for c in range(0x21, 0x7F)))
    return UpstreamURL(scheme, host, port, base_path, query.encode("ascii"))


def _inet_aton_part(text: str) -> int | None:
    if not text:
        return None
    lowered = text.lower()
    try:
        if lowered.startswith("0x"):
            digits = lowered[2:]
            # inet_aton takes "0x" alone as zero.
            return int(digits, 16) if digits else 0
        if len(lowered) > 1 and lowered.startswith("0"):
            return int(lowered[1:], 8)
        return int(lowered, 10) if lowered.isdigit() else None
    except ValueError:
        return None


def _inet_aton(text: str) -> ipaddress.IPv4Address | None:
    """
    The address glibc's C{inet_aton} (and so most resolvers and libraries)
    would read C{text} as: one to four parts, each decimal, octal (leading
    C{0}) or hex (C{0x}), the last part filling the remaining bytes. Our own
    parser, because Python's C{socket.inet_aton} accepts trailing garbage
    after whitespace.
    """
    if not text.isascii():
        return None
    parts = text.split(".")
    if len(parts) > 4:
        return None
    values = [_inet_aton_part(p) for p in parts]
    if any(v is None for v in values):
        return None
    *leading, last = values
    if any(v > 0xFF for v in leading):
        return None
    if last >= 1 << (8 * (4 - len(leading))):
        return None
    number = last
    for index, value in enumerate(leading):
        number |= value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def numeric_host(host: str) -> IPAddress | None:
    """
    The IP address C{host} denotes when it is numeric in any spelling, else
    C{None}: dotted quads, and every shorter or octal/hex form C{inet_aton}
    accepts (C{2130706433}, C{0x7f.1}, C{0177.0.0.1}, C{127.1},
    C{0x7f000001}); IPv6 with or without brackets, with a zone id (C{%eth0}
    or URI-style C{%25eth0}). One trailing dot is ignored, since some
    resolvers read C{127.0.0.1.} as the address.
    """
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text.replace("%25", "%"))
        except ValueError:
            return None
    if text.endswith("."):
        text = text[:-1]
    return _inet_aton(text)


def _net(text: str):
    return ipaddress.ip_network(text)


# Every IPv4 range that is not public unicast. Written out rather than left to
# ipaddress.is_global, whose table changed between Python releases and which
# calls multicast "global".
REFUSED_V4 = tuple(
    _net(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",  # RFC 1918
        "100.64.0.0/10",  # shared address space (carrier-grade NAT)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, cloud metadata 169.254.169.254
        "172.16.0.0/12",  # RFC 1918
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # TEST-NET-1
        "192.88.99.0/24",  # deprecated 6to4 relay anycast
        "192.168.0.0/16",  # RFC 1918
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # TEST-NET-2
        "203.0.113.0/24",  # TEST-NET-3
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, including 255.255.255.255
    )
)

# IPv6 outside 2000::/3 is never public unicast (this covers ::, ::1, the
# discard prefix, local-use NAT64 64:ff9b:1::/48, ULA fc00::/7, link-local
# fe80::/10, site-local fec0::/10 and multicast ff00::/8). Inside 2000::/3:
GLOBAL_UNICAST_V6 = _net("2000::/3")
REFUSED_V6 = tuple(
    _net(n)
    for n in (
        "2001::/23",  # IETF protocol assignments (Teredo is judged before this)
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation (RFC 9637)
    )
)

_MAPPED = _net("::ffff:0:0/96")
_TRANSLATED = _net("::ffff:0:0:0/96")
_COMPATIBLE = _net("::/96")
_NAT64 = _net("64:ff9b::/96")
_TEREDO = _net("2001::/32")


def _embedded_v4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address] | None:
    """The IPv4 addresses an IPv6 form carries, or None when it is plain IPv6."""
    low = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _MAPPED or ip in _TRANSLATED or ip in _NAT64:
        return [low]
    if ip in _COMPATIBLE and int(ip) > 1:
        return [low]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip in _TEREDO:
        server, client = ip.teredo
        return [server, client]
    return None


def _v4_is_public(ip: ipaddress.IPv4Address) -> bool:
    if any(ip in net for net in REFUSED_V4):
        return False
    return ip.is_global and not ip.is_multicast


def is_public_address(ip: IPAddress) -> bool:
    """
    Whether C{ip} is public unicast, the only kind an upstream may have
    unless C{ALLOW_PRIVATE_UPSTREAMS}. IPv6 forms carrying an IPv4 address
    (mapped, translated, compatible, NAT64 C{64:ff9b::/96}, 6to4, Teredo) are
    judged by the IPv4 address they carry (Teredo: both the server and the
    client address).
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_is_public(ip)
    embedded = _embedded_v4(ip)
    if embedded is not None:
        return all(_v4_is_public(v4) for v4 in embedded)
    if int(ip) <= 1:
        return False
    if ip not in GLOBAL_UNICAST_V6 or any(ip in net for net in REFUSED_V6):
        return False
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class PinnedUpstream:
    """
    An upstream that passed every rule, with the address to connect to.

    @ivar url: the parsed URL (its C{host} is what TLS verifies).
    @ivar address: the IP address (text) that passed the check: the first
        IPv4 address the name resolved to, else the first address.
    @ivar family: C{socket.AF_INET} or C{socket.AF_INET6}.
    """

    url: UpstreamURL
    address: str
    family: int


def _family(ip: IPAddress) -> int:
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


def canonical_host(host_text: str) -> str:
    """
    A host as L{parse_upstream} writes it: an IP address in its canonical
    text (whatever spelling it was given in, IPv6 without brackets), else
    the lowercase IDNA name (a trailing dot kept).

    @raise UpstreamRefused: not a valid host.
    """
    if host_text.startswith("["):
        return str(_parse_v6_literal(host_text[1:-1]))
    if "%" in host_text:
        raise UpstreamRefused("bad_host", "percent-encoded host")
    address = numeric_host(host_text)
    return str(address) if address is not None else _normalise_name(host_text)


def _host_key(host: str) -> str:
    # Allowlist entries and URL hosts are compared in one canonical form, so
    # "[::1]", "B\u00fccher.example" or "0x7f.1" on the list match the URL's host.
    try:
        host = canonical_host(host.strip())
    except UpstreamRefused:
        host = host.strip().lower()
    return host.rstrip(".")


@implementer(IResolutionReceiver)
class _Collector:
    """
    Gathers every address of one resolution. Cancelling C{done} cancels the
    resolution when the resolver can (getaddrinfo in a thread cannot: its
    answer is then ignored).
    """

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.resolution = None
        self.done: defer.Deferred[list[str]] = defer.Deferred(self._cancel)

    def _cancel(self, _done: defer.Deferred) -> None:
        if self.resolution is not None:
            with contextlib.suppress(NotImplementedError):
                self.resolution.cancel()

    def resolutionBegan(self, resolution) -> None:
        self.resolution = resolution

    def addressResolved(self, address) -> None:
        if isinstance(address, (IPv4Address, IPv6Address)):
            self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        if not self.done.called:  # not after a timeout or a cancel gave up on us
            self.done.callback(self.addresses)


@implementer(IUpstreamGuard)
class UpstreamGuard:
    """
    Decides whether the gateway may connect to an upstream URL, and pins the
    address it connects to (SPEC section 7, pipeline step 12).

    @param resolver: an L{IHostnameResolver}, normally
        C{reactor.nameResolver} (getaddrinfo in a thread).
    @param allowlist: lowercase hostnames; when non-empty only these hosts
        (case-insensitive, trailing dot ignored).
    @param allow_private: skip the public-address rule (the allowlist and
        the static rules still apply).
    @param clock: with C{timeout}, bounds the resolution: a resolver that
        does not answer within C{timeout} seconds refuses the upstream
        (getaddrinfo in a thread can hang far longer than any client waits).
    """

    def __init__(
        self,
        resolver,
        allowlist=frozenset(),
        allow_private: bool = False,
        clock=None,
        timeout: float | None = None,
    ) -> None:
        self._resolver = resolver
        self._allowlist = frozenset(_host_key(h) for h in allowlist)
        self._allow_private = allow_private
        self._clock = clock
        self._timeout = timeout
        # Pinned upstreams whose host is an address, by parsed URL.
        self._numeric: BoundedCache[UpstreamURL, PinnedUpstream] = BoundedCache(_NUMERIC_CACHE_SIZE)

    def check(self, url: str) -> defer.Deferred[PinnedUpstream]:
        """
        Apply every rule to C{url} and resolve its host at most once.

        @return: a Deferred firing with a L{PinnedUpstream}, or failing with
            L{UpstreamRefused}.
        """
        try:
            upstream = parse_upstream(url)
            self._check_allowlist(upstream)
        except UpstreamRefused:
            return defer.fail()
        pinned = self._numeric.get(upstream)
        if pinned is not None:
            return defer.succeed(pinned)
        address = numeric_host(upstream.host)
        if address is not None:
            try:
                pinned = self._pin(upstream, [upstream.host])
            except UpstreamRefused:
                return defer.fail()
            # A numeric host's verdict never changes (no DNS): keep it.
            self._numeric.put(upstream, pinned)
            return defer.succeed(pinned)
        collector = _Collector()
        try:
            self._resolver.resolveHostName(collector, upstream.host, 0)
        except Exception:
            return defer.fail(
                UpstreamRefused("unresolvable", f"upstream host {upstream.host} did not resolve")
            )
        done = collector.done
        if self._clock is not None and self._timeout is not None and not done.called:

            def timed_out(failure):
                # A cancel from the caller (its client left) stays a CancelledError.
                failure.trap(defer.TimeoutError)
                raise UpstreamRefused(
                    "resolution_timeout", f"upstream host {upstream.host} did not resolve in time"
                )

            done.addTimeout(self._timeout, self._clock)
            done.addErrback(timed_out)
        return done.addCallback(lambda found: self._pin(upstream, found))

    def _check_allowlist(self, upstream: UpstreamURL) -> None:
        if self._allowlist and _host_key(upstream.host) not in self._allowlist:
            raise UpstreamRefused(
                "not_allowlisted", f"upstream host {upstream.host} is not on the allowlist"
            )

    def _pin(self, upstream: UpstreamURL, found: list[str]) -> PinnedUpstream:
        addresses = []
        for text in found:
            # getaddrinfo may append the scope to link-local IPv6 ("fe80::1%2").
            address = numeric_host(text)
            if address is None:
                raise UpstreamRefused("bad_address", f"{upstream.host} resolved to a non-address")
            addresses.append((text, address))
        if not addresses:
            raise UpstreamRefused("unresolvable", f"upstream host {upstream.host} did not resolve")
        if not self._allow_private:
            for _text, address in addresses:
                if not is_public_address(address):
                    raise UpstreamRefused(
                        "private_address",
                        f"upstream host {upstream.host} has a non-public address",
                    )
        # A pinned address gets no happy-eyeballs fallback, so take the family
        # most likely to be routable from a server: the first IPv4 address,
        # else the first one.
        text, address = next(((t, a) for t, a in addresses if a.version == 4), addresses[0])
        return PinnedUpstream(url=upstream, address=text, family=_family(address))


def pinned_endpoint(pinned: PinnedUpstream, tls_policy, reactor, connect_timeout: float = 30.0):
    """
    The endpoint to C{pinned}'s checked address, never resolving the name
    again; for C{https}, wrapped in TLS verified for the upstream's host
    name. It holds no per-connection state: one serves every connection.

    @param tls_policy: an L{IPolicyForHTTPS}.
    @param connect_timeout: seconds allowed for the TCP connection.
    """
    url = pinned.url
    tcp = TCP6ClientEndpoint if pinned.family == socket.AF_INET6 else TCP4ClientEndpoint
    # TCP6ClientEndpoint takes an IPv6 scope id inside the host text.
    endpoint = tcp(reactor, pinned.address, url.port, timeout=connect_timeout)
    if url.scheme == "https":
        # The certificate names the host without the root's trailing dot.
        creator = tls_policy.creatorForNetloc(url.host.rstrip(".").encode("ascii"), url.port)
        endpoint = wrapClientTLS(creator, endpoint)
    return endpoint
