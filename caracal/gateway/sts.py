# -*- test-case-name: tests.test_sts -*-
"""
The gateway's client of the STS (SPEC section 5 and step 11 of section 6):
the RFC 8693 token exchange that turns a caller's bearer into a per-call
L{Mandate}, the per-zone JWKS fetch, and the STS health probe.

Every call goes over one treq L{HTTPClient} on a
L{caracal.gateway.pools.PooledAgent}, so connections to the STS are kept
alive and reused.
Every call is bounded in time (C{timeout}, on the reactor) and in the size of
the body read; past either bound the connection is dropped, not drained.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from urllib.parse import quote_plus, urlencode

from hyperlink import EncodedURL
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    BrowserLikePolicyForHTTPS,
    GzipDecoder,
    RequestNotSent,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from zope.interface import implementer

from caracal.gateway.cache import BoundedCache
from caracal.gateway.denials import Denial
from caracal.gateway.h1client import BytesBody
from caracal.gateway.interfaces import ITokenExchange
from caracal.gateway.pools import IDLE_PER_ORIGIN, OriginPool, PooledAgent, host_value
from caracal.gateway.timeouts import TimeBound

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 (a URN)

#: Most bytes of a token-exchange answer the gateway reads (SPEC section 5).
MAX_EXCHANGE_BYTES = 16 * 1024
#: Most bytes of a JWKS document the gateway reads.
MAX_JWKS_BYTES = 64 * 1024
#: Most bytes of a health answer the gateway reads (it only wants the status).
MAX_HEALTH_BYTES = 4 * 1024

METRIC = "sts_exchange_errors"

# An STS error code is passed through to the caller only when it looks like
# an OAuth error code; anything else is replaced so the STS cannot inject text.
_ERROR_CODE = re.compile(r"[a-z0-9_]{1,64}\Z")
# Descriptions are passed through only as short printable ASCII.
_DESCRIPTION = re.compile(r"[\x20-\x7e]{1,200}\Z")
# Something shaped like a JWT (or its first two parts) is never echoed.
_JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}")
# Tokens are sent on as header values: visible ASCII only, no CR/LF.
_HEADER_TOKEN = re.compile(r"[\x21-\x7e]{1,8192}\Z")
_PROVIDER_TOKEN = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,8190}[\x21-\x7e])?\Z")
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}\Z")

# When the STS answers 4xx with an error code that is not a plain OAuth code,
# the status is kept and the code replaced by the SPEC's code for that status.
_GENERIC_CODES = {400: "invalid_request", 401: "invalid_token"}
#: The STS token endpoint (RFC 8693), under STS_URL.
TOKEN_PATH = "/oauth/2/token"  # noqa: S105 (a path)

# A subject token made only of characters that form encoding leaves as they
# are (a JWT's base64url segments and dots): it goes into the form unquoted.
_FORM_SAFE = re.compile(r"[A-Za-z0-9._-]*\Z")
#: Form tails (zone, application, resource) kept per resource; past this many
#: distinct ones the table is emptied (resources are few; this is a bound).
_FORM_TAILS_SIZE = 1024


class STSUnavailable(Exception):
    """The STS could not be asked (JWKS fetch or health): unreachable, slow or malformed."""


class _BodyTooLarge(Exception):
    """The STS sent more bytes than the call allows; the connection was dropped."""


class _MalformedAnswer(Exception):
    """The STS's answer was not what SPEC section 5 describes."""


@dataclass(frozen=True)
class Mandate:
    """
    The STS's answer to a token exchange: the per-call mandate forwarded to
    the upstream, and for provider auth modes the provider's credential.
    The tokens never appear in the repr.
    """

    access_token: str = field(repr=False)
    token_type: str = "Bearer"  # noqa: S105 (a scheme name)
    expires_in: int | None = None
    issued_token_type: str | None = None
    provider_token: str | None = field(default=None, repr=False)


class _BoundedBody(Protocol):
    """
    Collect a response body up to C{limit} bytes. Past the limit (announced by
    Content-Length or actually received) the connection is dropped and
    C{finished} errbacks with L{_BodyTooLarge}; nothing more is kept.

    With C{gzip}, the bytes received are gunzipped here, never more than the
    limit at a time, so a small compressed answer cannot inflate without bound.
    """

    def __init__(self, limit: int, declared: int, finished: Deferred, gzip: bool = False) -> None:
        self._limit = limit
        self._declared = declared
        self._finished: Deferred | None = finished
        self._chunks: list[bytes] = []
        self._size = 0
        self._received = 0
        self._gunzip = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None

    def connectionMade(self) -> None:
        if self._declared != UNKNOWN_LENGTH and self._declared > self._limit:
            self._fail(_BodyTooLarge(self._declared))

    def dataReceived(self, data: bytes) -> None:
        if self._finished is None:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._fail(_BodyTooLarge(self._received))
            return
        if self._gunzip is not None:
            try:
                # At most one byte past what is still allowed: enough to tell.
                data = self._gunzip.decompress(data, self._limit - self._size + 1)
            except zlib.error as e:
                self._fail(_MalformedAnswer(f"bad gzip body: {e}"))
                return
        self._size += len(data)
        if self._size > self._limit:
            self._fail(_BodyTooLarge(self._size))
            return
        self._chunks.append(data)

    def connectionLost(self, reason=connectionDone) -> None:
        if self._finished is None:
            return
        finished, self._finished = self._finished, None
        if not isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            finished.errback(reason)
        elif self._gunzip is not None and not self._gunzip.eof:
            finished.errback(_MalformedAnswer("truncated gzip body"))
        else:
            finished.callback(b"".join(self._chunks))
        self._chunks = []

    def abort(self) -> None:
        """Stop reading: drop the connection (it cannot go back to the pool)."""
        self._finished = None
        self._chunks = []
        transport = self.transport
        if transport is None:
            return
        abort = getattr(transport, "abortConnection", None) or transport.loseConnection
        abort()

    def _fail(self, exception: Exception) -> None:
        finished = self._finished
        self.abort()
        if finished is not None:
            finished.errback(exception)


def read_bounded(response, limit: int) -> Deferred:
    """
    Read C{response}'s body, at most C{limit} bytes. Cancelling the returned
    L{Deferred} drops the connection.
    """
    protocol: _BoundedBody
    raw = getattr(response, "original", response)  # under treq's wrapper
    gzip = isinstance(raw, GzipDecoder)
    if gzip:
        # treq asks for gzip and would inflate it unbounded; take the raw
        # bytes and inflate them here under the limit instead.
        raw = raw.original

    def cancel(_deferred: Deferred) -> None:
        protocol.abort()

    finished: Deferred = Deferred(cancel)
    protocol = _BoundedBody(limit, raw.length, finished, gzip=gzip)
    raw.deliverBody(protocol)
    return finished


def _text(value: object, pattern: re.Pattern) -> str | None:
    if isinstance(value, str) and pattern.match(value):
        return value
    return None


def parse_mandate(body: bytes) -> Mandate:
    """
    Parse a 200 token-exchange answer. Raises L{_MalformedAnswer} unless it is
    a JSON object with a usable C{access_token} and well-typed optional fields.
    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise _MalformedAnswer("token exchange answer is not JSON") from e
    if not isinstance(document, dict):
        raise _MalformedAnswer("token exchange answer is not a JSON object")
    access_token = _text(document.get("access_token"), _HEADER_TOKEN)
    if access_token is None:
        raise _MalformedAnswer("token exchange answer has no usable access_token")
    token_type = document.get("token_type", "Bearer")
    if not isinstance(token_type, str) or not _DESCRIPTION.match(token_type):
        raise _MalformedAnswer("token exchange answer has a malformed token_type")
    expires_in = document.get("expires_in")
    if expires_in is not None and (
        isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in < 0
    ):
        raise _MalformedAnswer("token exchange answer has a malformed expires_in")
    issued_token_type = document.get("issued_token_type")
    if issued_token_type is not None and _text(issued_token_type, _DESCRIPTION) is None:
        raise _MalformedAnswer("token exchange answer has a malformed issued_token_type")
    provider_token = document.get("provider_token")
    if provider_token is not None and _text(provider_token, _PROVIDER_TOKEN) is None:
        raise _MalformedAnswer("token exchange answer has a malformed provider_token")
    return Mandate(
        access_token=access_token,
        token_type=token_type,
        expires_in=expires_in,
        issued_token_type=issued_token_type,
        provider_token=provider_token,
    )


def refusal(status: int, body: bytes, subject_token: str) -> Denial | None:
    """
    The L{Denial} for an STS 4xx answer carrying a JSON C{error}, or C{None}
    when the answer carries none (the caller then answers 502). The STS's
    description is passed on only when it is short printable text that holds
    nothing token-like.
    """
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict) or not isinstance(document.get("error"), str):
        return None
    code = document["error"]
    if not _ERROR_CODE.match(code):
        code = _GENERIC_CODES.get(status, "access_denied")
    description = _text(document.get("error_description"), _DESCRIPTION)
    if (
        description is None
        or _JWT_LIKE.search(description)
        or (subject_token and subject_token in description)
    ):
        description = "the STS refused the token exchange"
    return Denial(status, code, description, metric=METRIC)


def _endpoint_for(reactor, tls_policy):
    """
    The endpoint the stock Agent would use for a URI (TCP, TLS verified by
    C{tls_policy} for https), for L{PooledAgent}, which makes one per origin
    and reuses it: an endpoint holds no per-connection state.
    """

    def endpoint(uri: URI):
        endpoint = HostnameEndpoint(reactor, uri.host.decode("ascii"), uri.port)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(tls_policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint

    return endpoint


_FORM_HEAD = (urlencode([("grant_type", GRANT_TYPE)]) + "&subject_token=").encode("ascii")


class PreparedURL(EncodedURL):
    """
    A URL already in URI form (ASCII: IDNA host, percent-encoded path) whose
    text is computed once. treq turns every URL it is given into URI text
    (C{to_uri().to_text()}, IDNA included) on every request; handing it this
    instead makes that a lookup, for the one URL the gateway calls per
    request (the STS's token endpoint).
    """

    @classmethod
    def prepare(cls, url: str) -> PreparedURL:
        """The URI form of C{url}, prepared."""
        parsed = EncodedURL.from_text(url)
        if ":" in parsed.host:
            # An IPv6 literal: hyperlink would pass it through IDNA, which
            # refuses the colons. It is already URI text; only the rest of
            # the URL needs converting.
            uri = parsed.replace(host="ipv6.invalid").to_uri().replace(host=parsed.host)
        else:
            uri = parsed.to_uri()
        prepared = cls.from_text(uri.to_text())
        prepared._uri_text = uri.to_text()
        return prepared

    def to_uri(self, *args, **kwargs) -> PreparedURL:
        return self

    def to_text(self, with_password: bool = False) -> str:
        text = getattr(self, "_uri_text", None)
        if text is None or with_password:
            return EncodedURL.to_text(self, with_password)
        return text


class _NoCookies(IndexableCookieJar):
    """
    A cookie jar that never stores a cookie nor adds one to a request. treq
    asks its jar on every call; a jar with a refusing policy still walks its
    (empty) store, clears expired cookies and parses every Set-Cookie header
    of the answer before refusing them.
    """

    def add_cookie_header(self, request) -> None:
        """Send no cookie."""

    def extract_cookies(self, response, request) -> None:
        """Keep no cookie the STS sets."""

    def set_cookie(self, cookie) -> None:
        """Keep no cookie at all."""


@implementer(ITokenExchange)
class STSClient:
    """
    Client of one STS.

    @param base_url: the STS's base URL (C{STS_URL}); a trailing slash is ignored.
    @param reactor: the reactor, also the clock of the timeouts.
    @param tls_policy: an L{IPolicyForHTTPS} for an https STS (the Agent's
        default, the system roots, when C{None}).
    @param timeout: seconds a whole call (connect, request, answer) may take.
    @param pool: the L{OriginPool} to use; one of its own by default.
    @param agent: an L{IAgent} to use instead of building one (tests).
    """

    log = Logger()

    def __init__(
        self,
        base_url: str,
        reactor,
        tls_policy=None,
        timeout: float = 5.0,
        pool: OriginPool | None = None,
        agent=None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token_url = PreparedURL.prepare(self.base_url + TOKEN_PATH)
        self.timeout = timeout
        self._reactor = reactor
        self._bound = TimeBound(reactor, timeout, onTimeoutCancel=_timed_out)
        if agent is None:
            if pool is None:
                # Many concurrent exchanges share one STS; keep enough idle
                # connections that a burst does not reconnect every time, and
                # drop idle ones before a typical 60 s server idle timeout so a
                # POST is not sent on a connection the STS is closing.
                pool = OriginPool(reactor, IDLE_PER_ORIGIN, idle_timeout=50)
            if tls_policy is None:
                tls_policy = BrowserLikePolicyForHTTPS()
            agent = PooledAgent(pool, _endpoint_for(reactor, tls_policy))
        self.pool = pool
        # The STS has no business setting cookies that every caller would
        # share: the client's jar keeps none and sends none. An empty jar is
        # also each call's cookies, so treq builds none from a dict per call.
        self._no_cookies = _NoCookies()
        self._http = HTTPClient(agent, cookiejar=self._no_cookies, data_to_body_producer=BytesBody)
        # The exchange's fixed headers, Host included: the Agent adds Host
        # (copying the headers to do so) only when it is missing.
        token_uri = URI.fromBytes(self.token_url.to_text().encode("ascii"))
        self._exchange_headers = {
            b"Accept": [b"application/json"],
            b"Content-Type": [b"application/x-www-form-urlencoded"],
            b"Host": [host_value(token_uri)],
        }
        self._form_tails: BoundedCache[tuple[str, str, str], bytes] = BoundedCache(_FORM_TAILS_SIZE)

    def close(self) -> Deferred:
        """Close the pooled idle connections (fires when they are closed)."""
        if self.pool is None:
            return succeed(None)
        return self.pool.close()

    def _bounded(self, d: Deferred) -> Deferred:
        # Whatever failure the cancellation surfaces as (the Agent may wrap it
        # in ResponseNeverReceived), a timed-out call is a TimeoutError.
        return self._bound.bound(d)

    def _request(
        self,
        method: str,
        path: str | EncodedURL,
        headers: dict | Headers,
        body: bytes | None = None,
    ):
        kwargs = {
            "headers": headers,
            # Never buffer: the body is read by read_bounded, under a limit.
            "unbuffered": True,
            # The STS answers directly; a redirect is a misconfiguration.
            "allow_redirects": False,
            "cookies": self._no_cookies,
        }
        if body is not None:
            kwargs["data"] = body
        url = path if isinstance(path, EncodedURL) else self.base_url + path
        return self._http.request(method, url, **kwargs)

    def _form(self, subject_token: str, zone_id: str, application_id: str, resource: str) -> bytes:
        """
        The exchange's form, as C{urlencode} writes it: the fields after the
        subject token are the resource's, encoded once per resource; a
        subject token of form-safe characters (every JWT) needs no quoting.
        """
        tail_key = (zone_id, application_id, resource)
        tail = self._form_tails.get(tail_key)
        if tail is None:
            tail = urlencode(
                [
                    ("subject_token_type", ACCESS_TOKEN_TYPE),
                    ("zone_id", zone_id),
                    ("application_id", application_id),
                    ("resource", resource),
                ]
            ).encode("ascii")
            self._form_tails.put(tail_key, tail)
        if not _FORM_SAFE.match(subject_token):
            subject_token = quote_plus(subject_token)
        return b"".join((_FORM_HEAD, subject_token.encode("ascii"), b"&", tail))

    def exchange(
        self,
        subject_token: str,
        zone_id: str,
        application_id: str,
        resource: str,
        request_id: str,
        traceparent: bytes | None = None,
    ) -> Deferred:
        """
        Exchange the caller's bearer for a per-call mandate (SPEC step 11).

        @param traceparent: the W3C trace context to send (tracing on).

        @return: a L{Deferred} firing with a L{Mandate}, or failing with a
            L{Denial}: the STS's own 4xx status and code when it answers with
            a JSON error, 504 C{sts_unavailable} on timeout, 502
            C{sts_unavailable} on any other failure.
        """
        form = self._form(subject_token, zone_id, application_id, resource)
        headers = Headers(self._exchange_headers)
        if _REQUEST_ID.match(request_id or ""):
            headers.setRawHeaders(b"X-Request-Id", [request_id.encode("ascii")])
        if traceparent:
            headers.setRawHeaders(b"traceparent", [traceparent])

        def attempt() -> Deferred:
            return self._request("POST", self.token_url, headers, form)

        def retry_stale(failure):
            # A pooled connection the STS closed while idle fails before any
            # answer; the exchange has no side effect, so try once more on a
            # fresh connection (still inside the same time bound).
            failure.trap(RequestNotSent, ResponseNeverReceived)
            reasons = getattr(failure.value, "reasons", None) or []
            if not all(r.check(ConnectionDone, ConnectionLost) for r in reasons):
                # Cancelled (timeout or caller), a TLS failure...: not a stale
                # connection, so a second attempt would not fare better.
                return failure
            return attempt()

        def answered(response):
            return read_bounded(response, MAX_EXCHANGE_BYTES).addCallback(
                lambda body: (response.code, body)
            )

        def judged(result):
            status, body = result
            if status == 200:
                try:
                    return parse_mandate(body)
                except _MalformedAnswer as e:
                    self.log.warn("STS token exchange answer malformed: {why}", why=str(e))
                    raise _unavailable(502, "the STS answered with a malformed mandate") from e
            if 400 <= status < 500:
                denial = refusal(status, body, subject_token)
                if denial is not None:
                    raise denial
            self.log.warn("STS token exchange answered HTTP {status}", status=status)
            raise _unavailable(502, "the STS could not exchange the token")

        def failed(failure):
            if failure.check(Denial):
                return failure
            if _cancelled(failure):
                # The caller cancelled (its client went away): not an STS failure.
                raise CancelledError()
            if failure.check(TimeoutError):
                self.log.warn("STS token exchange timed out after {timeout}s", timeout=self.timeout)
                raise _unavailable(504, "the STS did not answer in time")
            self.log.warn("STS token exchange failed: {error}", error=_describe_failure(failure))
            raise _unavailable(502, "the STS could not be reached")

        d = attempt()
        d.addErrback(retry_stale)
        d.addCallback(answered)
        self._bounded(d)
        d.addCallback(judged)
        d.addErrback(failed)
        return d

    def _get(self, path: str, limit: int) -> Deferred:
        """GET C{path} under the time bound; fire with (status, body) or fail STSUnavailable."""
        d = self._request("GET", path, {b"Accept": [b"application/json"]})
        d.addCallback(
            lambda response: read_bounded(response, limit).addCallback(
                lambda body: (response.code, body)
            )
        )
        self._bounded(d)

        def failed(failure):
            if failure.check(STSUnavailable):
                return failure
            if _cancelled(failure):
                raise CancelledError()
            raise STSUnavailable(
                f"STS {path.split('?')[0]}: {_describe_failure(failure)}"
            ) from failure.value

        return d.addErrback(failed)

    def fetch_jwks(self, zone_id: str) -> Deferred:
        """
        Fetch zone C{zone_id}'s JWKS document.

        @return: a L{Deferred} firing with the JWKS dict (it has a C{keys}
            list), or failing with L{STSUnavailable}.
        """
        path = "/.well-known/jwks.json?" + urlencode([("zone_id", zone_id)])

        def judged(result):
            status, body = result
            if status != 200:
                raise STSUnavailable(f"STS JWKS answered HTTP {status}")
            try:
                document = json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                raise STSUnavailable("STS JWKS is not JSON") from e
            if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
                raise STSUnavailable("STS JWKS has no keys list")
            return document

        return self._get(path, MAX_JWKS_BYTES).addCallback(judged)

    def health(self) -> Deferred:
        """
        Probe C{GET /health}: fire with C{None} on 200, else fail with
        L{STSUnavailable}.
        """

        def judged(result):
            status, _body = result
            if status != 200:
                raise STSUnavailable(f"STS health answered HTTP {status}")

        return self._get("/health", MAX_HEALTH_BYTES).addCallback(judged)


def _cancelled(failure) -> bool:
    """Whether C{failure} is a cancellation, bare or wrapped by the Agent."""
    if failure.check(CancelledError):
        return True
    reasons = getattr(failure.value, "reasons", None) or []
    return any(isinstance(r, Failure) and r.check(CancelledError) for r in reasons)


def _timed_out(result, timeout: float):
    if isinstance(result, Failure):
        raise TimeoutError(timeout, "STS call")
    return result


def _unavailable(status: int, description: str) -> Denial:
    return Denial(status, "sts_unavailable", description, metric=METRIC)


def _describe_failure(failure) -> str:
    """A one-line reason for a log line: the exception type, and the body-size case."""
    if failure.check(TimeoutError):
        return "timed out"
    if failure.check(_BodyTooLarge):
        return "answer too large"
    error = failure.value
    reasons = getattr(error, "reasons", None)
    if reasons:
        # ResponseFailed & co. wrap the real reasons.
        return ", ".join(type(r.value).__name__ for r in reasons)
    return type(error).__name__
