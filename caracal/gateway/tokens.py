# -*- test-case-name: tests.test_tokens -*-
"""
The caller's bearer token: SPEC section 6 steps 2 (extraction), 3 (it is a
JWT with an C{exp}), 4 (C{exp} at least 35 s away), 8 (ES256 signature) and
the claims steps 9 and 10 read (C{use}, C{jti}, C{sid}).

Every refusal is a L{Denial}. Descriptions are fixed texts: they never quote
the token, a claim or a header, so nothing of the credential reaches an error
body or a log line. Logs identify a token by L{fingerprint}.

Decisions where the SPEC is silent:
  - An C{Authorization} header with another scheme (C{Basic ...}) carries no
    bearer token, so it is answered like a missing one (401 C{missing_token}).
  - Several C{Authorization} headers are ambiguous (which one would the
    upstream or a cache believe?) and are refused as 401 C{invalid_token}.
  - "C{exp} at least 35 s away": exactly 35 s left passes, 34.9 s does not.
  - C{aud} and C{iss} are not checked: the SPEC names no audience or issuer,
    and the signing key is already chosen per zone, so only the zone's STS can
    have issued an accepted token. C{exp} is checked again at verification
    with no leeway; C{nbf} and C{iat}, when present, must not be more than
    5 s ahead of the gateway's clock.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import math
import re
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ec import ECDSA, EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.hashes import SHA256
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.web.http_headers import Headers

from caracal.gateway.cache import BoundedCache
from caracal.gateway.denials import Denial
from caracal.gateway.jwks import JWKSCache, JWKSUnavailable, UnknownKeyID

MAX_TOKEN_BYTES = 4096
MIN_SECONDS_LEFT = 35.0
#: Default bound on how far in the future C{exp} may be (C{MAX_TOKEN_LIFETIME}).
MAX_TOKEN_LIFETIME = 24 * 3600.0
#: Claims that must be a string of 1 to 256 characters when present (H5).
STRING_CLAIMS = ("jti", "sid", "agent_session_id", "use", "zone_id")
MAX_CLAIM_LENGTH = 256
#: C{use} values that mark a mandate (a token minted for an upstream).
MANDATE_USES = frozenset({"resource", "mandate"})
ALGORITHM = "ES256"
FINGERPRINT_LENGTH = 12
# How far ahead of our clock an nbf/iat may be (STS and gateway clocks differ).
CLOCK_SKEW = 5.0

# A bearer token is token68 (RFC 6750): visible ASCII, no whitespace. One
# regex pass instead of a Python loop over every byte.
_VISIBLE_ASCII = re.compile(rb"[\x21-\x7e]+")
# base64url to standard base64 and back: C{-} and C{_} become C{+} and C{/},
# and C{+} and C{/} (not base64url) become C{-} and C{_}, which standard base64
# does not have, so a segment holding them never re-encodes to itself.
_FROM_BASE64URL = bytes.maketrans(b"-_+/", b"+/-_")
# The padding a segment of each length modulo 4 lacks (1 is no base64 length).
_PADDING = (b"", None, b"==", b"=")
# What json.loads decodes with (its default decoder), and that decoder's scanner.
_JSON = json.JSONDecoder()
_SCAN = _JSON.scan_once
_ECDSA_SHA256 = ECDSA(SHA256())
#: Verified signatures remembered by a L{SignatureCache} unless told otherwise.
SIGNATURE_CACHE_SIZE = 4096


def fingerprint(token: str) -> str:
    """
    The short identifier of a token that logs carry instead of the token: the
    first 12 hex digits of its SHA-256.
    """
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:FINGERPRINT_LENGTH]


def _missing() -> Denial:
    return Denial(401, "missing_token", "a bearer token is required", metric="denials_missing_auth")


def _malformed(description: str = "the bearer token is malformed") -> Denial:
    return Denial(401, "invalid_token", description, metric="denials_bad_bearer")


def _bad_signature(description: str = "the bearer token could not be verified") -> Denial:
    return Denial(401, "invalid_token", description, metric="denials_signature")


def extract_bearer(headers: Headers) -> str:
    """
    The token of the request's single C{Authorization: Bearer <token>}
    header (scheme case-insensitive).

    @raise Denial: 401 C{missing_token} without an C{Authorization} header,
        with another scheme, or with an empty token; 401 C{invalid_token} for
        several C{Authorization} headers, a token over 4096 bytes, or one that
        is not a single run of visible ASCII.
    """
    values = headers.getRawHeaders(b"authorization")
    if not values:
        raise _missing()
    if len(values) > 1:
        raise _malformed("exactly one Authorization header is allowed")
    # Split on the first run of spaces/tabs: "<scheme> <credentials>".
    value = values[0].strip(b" \t")
    parts = value.split(None, 1)
    if not parts or parts[0].lower() != b"bearer":
        raise _missing()
    token = parts[1].strip(b" \t") if len(parts) == 2 else b""
    if not token:
        raise _missing()
    if len(token) > MAX_TOKEN_BYTES:
        raise _malformed("the bearer token is too large")
    if not _VISIBLE_ASCII.fullmatch(token):
        raise _malformed()
    return token.decode("ascii")


def _segments(token: str) -> None:
    """Refuse anything that is not three dot-separated non-empty JWS segments."""
    segments = token.split(".")
    if len(segments) != 3 or not all(segments):
        raise _malformed("the bearer token is not a JWT")


class ParsedToken:
    """
    A compact JWS split and decoded once: what the claim peek (step 3) and
    the signature check (step 8) both read, so a token is parsed once per
    request instead of once per step.

    @ivar header: the JOSE header (a dict).
    @ivar claims: the payload (a dict), NOT verified.
    @ivar signing_input: the bytes the signature covers.
    @ivar signature: the raw signature bytes.
    """

    __slots__ = ("header", "claims", "signing_input", "signature")

    def __init__(self, header: dict, claims: dict, signing_input: bytes, signature: bytes):
        self.header = header
        self.claims = claims
        self.signing_input = signing_input
        self.signature = signature


def _segment(segment: bytes) -> bytes:
    """
    One base64url segment decoded as strictly as pyjwt does: its alphabet,
    at most two padding characters and only where they complete a quantum,
    and the canonical encoding only.

    All three hold exactly when the segment, turned into standard base64
    (L{_FROM_BASE64URL}) and completed with the padding it lacks, is what
    encoding its decoded bytes gives back: the encoder writes only the
    alphabet, the one right padding, and zero unused bits. Two C calls,
    instead of a regex pass with a character class per byte, pyjwt's
    decoding in Python and a re-encoding to compare.

    @raise ValueError: anything else (C{binascii.Error} is one).
    """
    if segment[-1:] == b"=":
        if len(segment) % 4:
            raise ValueError("bad base64url padding")
        standard = segment.translate(_FROM_BASE64URL)
    else:
        padding = _PADDING[len(segment) % 4]
        if padding is None:
            raise ValueError("bad base64url length")
        standard = segment.translate(_FROM_BASE64URL) + padding
    decoded = binascii.a2b_base64(standard)
    if binascii.b2a_base64(decoded, newline=False) != standard:
        raise ValueError("not canonical base64url")
    return decoded


def _json(data: bytes) -> Any:
    """
    C{json.loads(data)}, for less: a JOSE header or payload is UTF-8 and
    starts with C{{}, and then C{json.loads} would pick UTF-8 (a BOM, or the
    zero bytes of UTF-16 or UTF-32, would come first) and hand the text to
    its default decoder, which scans one value from the start and refuses
    anything after it but whitespace. The scan is done here directly; text
    after the value, and anything not starting so, goes the whole way.

    @raise ValueError: not JSON (C{UnicodeDecodeError} and
        C{json.JSONDecodeError} are ones).
    """
    if data[:1] != b"{" or data[1:2] == b"\x00":
        return json.loads(data)
    text = data.decode("utf-8", "surrogatepass")
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:  # no value at all (not so at a "{"): as json.loads says it
        raise json.JSONDecodeError("Expecting value", text, 0) from None
    if end != len(text):
        return _JSON.decode(text)
    return value


def parse_token(token: str) -> ParsedToken:
    """
    Split and decode C{token} once (no verification).

    @raise Denial: 401 C{invalid_token} (metric C{denials_bad_bearer}) when it
        is not a compact JWS whose header and payload are base64url JSON
        objects (with an attached payload) and whose signature is base64url.
    """
    try:
        data = token.encode("ascii")
    except UnicodeEncodeError:
        raise _malformed("the bearer token is not a JWT") from None
    segments = data.split(b".")
    if len(segments) != 3 or not all(segments):
        raise _malformed("the bearer token is not a JWT")
    header_segment, payload_segment, signature_segment = segments
    try:
        header = _json(_segment(header_segment))
        if not isinstance(header, dict) or header.get("b64", True) is False:
            raise ValueError("header is not a JSON object with an attached payload")
        # No critical extension is implemented, so none may be required (RFC
        # 7515 4.1.11); and a kid, when present, is a string.
        if "crit" in header or not isinstance(header.get("kid", ""), str):
            raise ValueError("unsupported header")
        claims = _json(_segment(payload_segment))
        if not isinstance(claims, dict):
            raise ValueError("payload is not a JSON object")
        signature = _segment(signature_segment)
    except (ValueError, TypeError, RecursionError):
        raise _malformed("the bearer token is not a JWT") from None
    signing_input = data[: len(header_segment) + 1 + len(payload_segment)]
    return ParsedToken(header, claims, signing_input, signature)


def peek_header(token: str) -> dict[str, Any]:
    """
    The JOSE header of C{token}, decoded without any verification.

    @raise Denial: 401 C{invalid_token} when the token is not a compact JWS
        whose header is a base64url JSON object.
    """
    _segments(token)
    try:
        return jwt.get_unverified_header(token)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise _malformed("the bearer token is not a JWT") from None


def peek_claims(token: str) -> dict[str, Any]:
    """
    The claims of C{token}, decoded WITHOUT verifying the signature (SPEC
    step 3; the signature is step 8, once the resource names the zone).

    @raise Denial: 401 C{invalid_token} when the token is not a compact JWS
        with base64url JSON-object header and payload, has no finite numeric
        C{exp}, is a mandate (H4), or carries one of L{STRING_CLAIMS} that
        is not a string of 1 to 256 characters (H5).
    """
    return peek(token).claims


def peek(token: str) -> ParsedToken:
    """
    L{parse_token}, and the claims must hold a finite numeric C{exp} (SPEC
    step 3); pass the result on to L{verify_token} so step 8 does not parse
    the token again.

    @raise Denial: as L{peek_claims}.
    """
    parsed = parse_token(token)
    if _expiry(parsed.claims) is None:
        raise _malformed("the bearer token has no valid exp claim")
    claims = parsed.claims
    _check_claim_types(claims)
    if "act" in claims or claims.get("use") in MANDATE_USES:
        raise Denial(
            401,
            "invalid_token",
            "a mandate is not a caller credential",
            metric="denials_bad_bearer",
            reason="mandate_as_bearer",
        )
    return parsed


def _check_claim_types(claims: dict[str, Any]) -> None:
    """Refuse a present L{STRING_CLAIMS} claim that is not a string of 1-256 characters."""
    for name in STRING_CLAIMS:
        if name not in claims:
            continue
        value = claims[name]
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_CLAIM_LENGTH:
            raise Denial(
                401,
                "invalid_token",
                f"the bearer token's {name} claim must be a string of 1 to"
                f" {MAX_CLAIM_LENGTH} characters",
                metric="denials_bad_bearer",
                reason="invalid_claim",
            )


def _expiry(claims: dict[str, Any]) -> float | None:
    """C{exp} as a finite float, or None."""
    return _number(claims.get("exp"))


def _number(value: object) -> float | None:
    """A JSON date as a finite float, or None (bool, string, NaN, huge ints are not dates)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def seconds_left(
    claims: dict[str, Any], now: float, max_lifetime: float = MAX_TOKEN_LIFETIME
) -> float:
    """
    Seconds until the token's C{exp} (SPEC step 4).

    @param claims: claims from L{peek_claims}.
    @param now: the current POSIX time.
    @param max_lifetime: C{MAX_TOKEN_LIFETIME}: the most seconds C{exp} may
        be ahead of C{now} (SPEC 12 H6).
    @raise Denial: 401 C{credential_expired} when fewer than 35 s are left
        (expired tokens included); 401 C{invalid_token} without a valid
        C{exp} or with one more than C{max_lifetime} ahead.
    """
    exp = _expiry(claims)
    if exp is None:
        raise _malformed("the bearer token has no valid exp claim")
    left = exp - now
    if left < MIN_SECONDS_LEFT:
        raise Denial(
            401,
            "credential_expired",
            "the bearer token expires in less than 35 seconds",
            metric="denials_expiring",
        )
    if left > max_lifetime:
        raise Denial(
            401,
            "invalid_token",
            "the bearer token's lifetime exceeds the gateway's maximum",
            metric="denials_bad_bearer",
            reason="lifetime_exceeded",
        )
    return left


def single_use(claims: dict[str, Any]) -> bool:
    """Whether the token is single-use: every token whose C{use} is not C{ambient}."""
    return claims.get("use") != "ambient"


def replay_jti(claims: dict[str, Any]) -> str | None:
    """
    The C{jti} to claim in the replay guard (SPEC step 9), or None for an
    ambient token, which may be used many times.

    @raise Denial: 401 C{invalid_token} for a single-use token without a
        non-empty string C{jti}.
    """
    if not single_use(claims):
        return None
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti:
        raise _malformed("a single-use token must carry a jti claim")
    return jti


def session_id(claims: dict[str, Any]) -> str | None:
    """The caller's session (SPEC step 10): C{sid}, else C{agent_session_id}, else None."""
    for name in ("sid", "agent_session_id"):
        if name not in claims:
            continue
        value = claims[name]
        if isinstance(value, str) and value:
            return value
        # peek_claims refuses these first (H5); never skip the check quietly.
        raise _malformed(f"the bearer token's {name} claim must be a string")
    return None


class SignatureCache:
    """
    Verified signatures of reusable (C{use=ambient}) tokens, so that a token an
    agent sends on every call costs one ES256 verification, not one per call.

    An entry is keyed by the zone and the whole token, remembers the key
    object that verified it, and lasts until the token's C{exp}. A lookup
    hits only with the same zone, the same token and the very key object the
    zone's L{JWKSCache} hands out now: a refreshed or withdrawn key set means
    verifying again (or refusing). The claims' times, the replay guard and
    the session check still run on every request; only the signature is
    remembered. Single-use tokens are never stored (they pass once).

    @param size: most entries held; the least recently used is dropped beyond it.
    """

    def __init__(self, size: int = SIGNATURE_CACHE_SIZE) -> None:
        # (zone, token) -> the key object that verified it, until the token's exp.
        self._entries: BoundedCache[tuple[str, str], object] = BoundedCache(size)

    def __len__(self) -> int:
        return len(self._entries)

    def verified(self, zone_id: str, token: str, key: object, now: float) -> bool:
        """Whether C{key} verified C{token} for C{zone_id}, and its C{exp} is not past."""
        return self._entries.get((zone_id, token), now=now) is key

    def remember(self, zone_id: str, token: str, key: object, exp: float) -> None:
        """Record that C{key} verified C{token} for C{zone_id}, until C{exp}."""
        self._entries.put((zone_id, token), key, expires=exp)


def verify_token(
    token: str,
    zone_id: str,
    jwks_cache: JWKSCache,
    now: float | None = None,
    parsed: ParsedToken | None = None,
    signatures: SignatureCache | None = None,
) -> Deferred:
    """
    Verify C{token}'s ES256 signature with zone C{zone_id}'s keys (SPEC step 8).

    The header must name C{alg} exactly C{ES256} and a C{kid}; the key is
    looked up by C{kid} in the zone's JWKS only, and only ES256 is verified,
    so neither C{none}, HMAC-with-the-public-key nor RSA tokens pass.
    The times are checked against C{now} (default: the cache's clock, the
    reactor in production): C{exp} must be in the future with no leeway;
    C{nbf} and C{iat}, when present, may be at most 5 s ahead (clock skew
    between STS and gateway must not refuse every fresh token).

    @param parsed: C{token} as L{peek} already decoded it (else it is parsed here).
    @param signatures: a L{SignatureCache} remembering the signatures of
        reusable tokens, or C{None} to verify every time.
    @return: a L{Deferred} firing with the verified claims, or failing with
        L{Denial} 401 C{invalid_token} (metric C{denials_signature}) or 503
        C{sts_unavailable} (no metric) when the zone's keys cannot be fetched.
    """
    return maybeDeferred(_key_for_token, token, zone_id, jwks_cache, parsed).addCallbacks(
        _verified_claims,
        _key_failure,
        callbackArgs=(
            token,
            zone_id,
            now if now is not None else jwks_cache.clock.seconds(),
            signatures,
        ),
    )


def _es256_valid(message: bytes, key, signature: bytes) -> bool:
    """
    pyjwt's C{ECAlgorithm(SHA256).verify}, without what it redoes on every
    call: a new hash and ECDSA object and its byte-by-byte integer conversion. The raw C{r || s}
    signature must be exactly twice the curve's size, as pyjwt requires.
    """
    if isinstance(key, EllipticCurvePrivateKey):
        key = key.public_key()
    size = (key.curve.key_size + 7) // 8
    if len(signature) != 2 * size:
        return False
    der = encode_dss_signature(
        int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
    )
    try:
        key.verify(der, message, _ECDSA_SHA256)
    except InvalidSignature:
        return False
    return True


#: L{_es256_valid} under a public name for the dev STS (L{caracal.devsts}),
#: which checks its subject tokens with this very code rather than a copy.
es256_valid = _es256_valid


#: What L{verify_now} returns when the zone's key is not at hand.
NOT_AT_HAND = object()


def verify_now(
    token: str,
    zone_id: str,
    jwks_cache: JWKSCache,
    parsed: ParsedToken,
    signatures: SignatureCache | None = None,
):
    """
    L{verify_token} without a L{Deferred}, when the zone's key is already
    cached and fresh (the usual case: a JWKS lives five minutes): the
    verified claims, or a raised L{Denial}, exactly as L{verify_token}
    would give them. When the key source has no such key at hand (not
    fetched yet, past its TTL, unknown C{kid}, or a source without
    C{cached_key}) it returns L{NOT_AT_HAND} and the caller uses
    L{verify_token}, which fetches, serves stale keys or refuses.
    """
    cached_key = getattr(jwks_cache, "cached_key", None)
    if cached_key is None:
        return NOT_AT_HAND
    kid = _signing_kid(parsed)
    key = cached_key(zone_id, kid)
    if key is None:
        return NOT_AT_HAND
    return _verified_claims((key, parsed), token, zone_id, jwks_cache.clock.seconds(), signatures)


def _signing_kid(parsed: ParsedToken) -> str:
    """The header's C{kid}, once C{alg} is ES256 and a C{kid} is named."""
    header = parsed.header
    if header.get("alg") != ALGORITHM:
        raise _bad_signature("the bearer token must be signed with ES256")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise _bad_signature("the bearer token names no signing key")
    return kid


def _key_for_token(
    token: str, zone_id: str, jwks_cache: JWKSCache, parsed: ParsedToken | None
) -> Deferred:
    if parsed is None:
        try:
            parsed = parse_token(token)
        except Denial:
            raise _bad_signature("the bearer token is not a JWT") from None
    kid = _signing_kid(parsed)
    return jwks_cache.key_for(zone_id, kid).addCallback(lambda key: (key, parsed))


def _key_failure(failure):
    if failure.check(JWKSUnavailable):
        raise Denial(503, "sts_unavailable", "the token signing keys are unavailable")
    if failure.check(UnknownKeyID):
        raise _bad_signature("the bearer token is signed with an unknown key")
    return failure


def _verified_claims(
    found, token: str, zone_id: str, now: float, signatures: SignatureCache | None
) -> dict[str, Any]:
    key, parsed = found
    claims = parsed.claims
    remembered = signatures is not None and signatures.verified(zone_id, token, key, now)
    if not remembered:
        try:
            valid = _es256_valid(parsed.signing_input, key, parsed.signature)
        except (ValueError, TypeError, AttributeError):
            valid = False
        if not valid:
            raise _bad_signature()
    exp = _expiry(claims)
    if exp is None:
        raise _bad_signature("the bearer token has no valid exp claim")
    # What pyjwt's decode checked besides the signature: sub and jti are
    # strings when present.
    for name in ("sub", "jti"):
        if name in claims and not isinstance(claims[name], str):
            raise _bad_signature()
    if exp <= now:
        raise _bad_signature("the bearer token has expired")
    for name in ("nbf", "iat"):
        if name not in claims:
            continue
        moment = _number(claims[name])
        if moment is None or moment > now + CLOCK_SKEW:
            raise _bad_signature("the bearer token is not valid yet")
    if signatures is not None and not remembered and not single_use(claims):
        signatures.remember(zone_id, token, key, exp)
    return claims
