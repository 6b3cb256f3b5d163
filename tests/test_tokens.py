# -*- test-case-name: tests.test_tokens -*-
"""Tests for L{caracal.gateway.tokens}: bearer extraction, claim peek, ES256 verification."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from caracal.gateway.denials import Denial
from caracal.gateway.jwks import JWKSCache
from caracal.gateway.tokens import (
    NOT_AT_HAND,
    SignatureCache,
    extract_bearer,
    fingerprint,
    parse_token,
    peek,
    peek_claims,
    peek_header,
    replay_jti,
    seconds_left,
    session_id,
    single_use,
    verify_now,
    verify_token,
)
from tests.test_jwks import FakeSTS, ec_jwk

# Far in the past on purpose: verification must use the gateway's clock, not
# the wall clock (a token valid at NOW is long expired in real time).
NOW = 1_000_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value) -> str:
    return b64(json.dumps(value).encode("utf-8"))


def headers_with(*values: bytes) -> Headers:
    headers = Headers()
    for value in values:
        headers.addRawHeader(b"authorization", value)
    return headers


class DenialAssertions:
    def assertDenial(self, denial, status, code, metric, token=None):
        self.assertIsInstance(denial, Denial)
        self.assertEqual((denial.status, denial.code, denial.metric), (status, code, metric))
        self.assertTrue(denial.description)
        if token:
            # Nothing of the credential may reach an error body or a log line.
            for text in (denial.description, repr(denial), str(denial)):
                self.assertNotIn(token, text)
                for segment in token.split("."):
                    if len(segment) > 8:
                        self.assertNotIn(segment, text)


class FingerprintTests(SynchronousTestCase):
    def test_shortSHA256(self):
        """The fingerprint is the first 12 hex digits of the token's SHA-256."""
        token = "eyJhbGciOiJFUzI1NiJ9.eyJleHAiOjF9.c2ln"
        self.assertEqual(fingerprint(token), hashlib.sha256(token.encode()).hexdigest()[:12])
        self.assertEqual(len(fingerprint(token)), 12)
        self.assertNotEqual(fingerprint(token), fingerprint(token + "x"))


class ExtractBearerTests(SynchronousTestCase, DenialAssertions):
    def refused(self, headers, code, metric):
        denial = self.assertRaises(Denial, extract_bearer, headers)
        self.assertDenial(denial, 401, code, metric)

    def test_bearer(self):
        """The token after C{Bearer } is extracted."""
        self.assertEqual(extract_bearer(headers_with(b"Bearer abc.def.ghi")), "abc.def.ghi")

    def test_schemeCaseInsensitive(self):
        """The scheme is matched without regard to case."""
        self.assertEqual(extract_bearer(headers_with(b"bearer tok")), "tok")
        self.assertEqual(extract_bearer(headers_with(b"BEARER tok")), "tok")
        self.assertEqual(extract_bearer(headers_with(b"BeArEr tok")), "tok")

    def test_extraSpacesTolerated(self):
        """RFC 7235 allows one or more spaces between scheme and credentials."""
        self.assertEqual(extract_bearer(headers_with(b"Bearer   tok  ")), "tok")

    def test_missing(self):
        """No Authorization header is missing_token."""
        self.refused(Headers(), "missing_token", "denials_missing_auth")

    def test_otherScheme(self):
        """Basic credentials carry no bearer token: answered as missing."""
        self.refused(headers_with(b"Basic dXNlcjpwYXNz"), "missing_token", "denials_missing_auth")

    def test_schemeGluedToToken(self):
        """C{Bearertok} has no bearer token."""
        self.refused(headers_with(b"Bearertok"), "missing_token", "denials_missing_auth")

    def test_bearerWithoutToken(self):
        """A scheme without a token, or blank, is missing_token."""
        for value in (b"Bearer", b"Bearer ", b"Bearer \t ", b"", b"   "):
            self.refused(headers_with(value), "missing_token", "denials_missing_auth")

    def test_sizeLimit(self):
        """4096 bytes of token pass; 4097 are refused as invalid."""
        self.assertEqual(extract_bearer(headers_with(b"Bearer " + b"a" * 4096)), "a" * 4096)
        self.refused(headers_with(b"Bearer " + b"a" * 4097), "invalid_token", "denials_bad_bearer")

    def test_twoHeaders(self):
        """Two Authorization headers are ambiguous, even if both are bearers."""
        self.refused(headers_with(b"Bearer a", b"Bearer b"), "invalid_token", "denials_bad_bearer")
        self.refused(headers_with(b"Basic x", b"Bearer b"), "invalid_token", "denials_bad_bearer")

    def test_tokenWithSpaceOrNonASCII(self):
        """A token is one run of visible ASCII."""
        for value in (b"Bearer a b", b"Bearer a,Bearer b", b"Bearer caf\xc3\xa9", b"Bearer a\x00"):
            self.refused(headers_with(value), "invalid_token", "denials_bad_bearer")


class PeekTests(SynchronousTestCase, DenialAssertions):
    def token(self, header=None, payload=None, signature="c2lnbmF0dXJl"):
        header = {"alg": "ES256", "kid": "k1"} if header is None else header
        payload = {"exp": NOW + 300, "sub": "agent"} if payload is None else payload
        return f"{b64json(header)}.{b64json(payload)}.{signature}"

    def refused(self, token):
        denial = self.assertRaises(Denial, peek_claims, token)
        self.assertDenial(denial, 401, "invalid_token", "denials_bad_bearer", token)

    def test_claims(self):
        """The payload is returned as decoded, without any verification."""
        self.assertEqual(peek_claims(self.token()), {"exp": NOW + 300, "sub": "agent"})
        self.assertEqual(peek_header(self.token()), {"alg": "ES256", "kid": "k1"})

    def test_realJWT(self):
        """The claims of a real JWT are read without verifying it."""
        key = ec.generate_private_key(ec.SECP256R1())
        token = jwt.encode({"exp": 123, "jti": "j"}, key, algorithm="ES256")
        self.assertEqual(peek_claims(token), {"exp": 123, "jti": "j"})

    def test_notAJWT(self):
        """A string that is not a JWT is an invalid token."""
        self.refused("not-a-jwt")

    def test_segmentCount(self):
        """Only exactly three non-empty segments make a JWT."""
        good = self.token()
        self.refused(".".join(good.split(".")[:2]))
        self.refused(good + ".extra")
        self.refused(good.rsplit(".", 1)[0] + ".")
        self.refused("." + good.split(".", 1)[1])

    def test_parsedOnce(self):
        """L{peek} hands step 8 the decoded header, claims, signing input and signature."""
        token = self.token()
        parsed = peek(token)
        self.assertEqual(parsed.header, {"alg": "ES256", "kid": "k1"})
        self.assertEqual(parsed.claims, {"exp": NOW + 300, "sub": "agent"})
        self.assertEqual(parsed.signing_input, token.rsplit(".", 1)[0].encode("ascii"))
        self.assertEqual(parsed.signature, b"signature")

    def test_strictLikePyJWT(self):
        """
        What pyjwt refused before the single parse is still refused: critical
        extensions, an unencoded payload, a non-string kid, non-canonical
        base64url; trailing padding it accepts is accepted.
        """
        self.refused(self.token(header={"alg": "ES256", "crit": ["exp"], "exp": 1}))
        self.refused(self.token(header={"alg": "ES256", "b64": False, "crit": ["b64"]}))
        self.refused(self.token(header={"alg": "ES256", "kid": 7}))
        # "c2lnbg" (b"sign") with the last character's unused bits set.
        self.refused(self.token(signature="c2lnbh"))
        self.refused(self.token(signature="c2lnbmF0dXJl==="))
        good = self.token()
        header, payload, signature = good.split(".")
        self.assertEqual(peek(f"{header}.{payload}.c2lnbg==").signature, b"sign")
        self.refused(f"{header}.{payload}.c2lnb==")

    def test_badBase64(self):
        """A segment that is not base64url is refused."""
        _, payload, signature = self.token().split(".")
        self.refused(f"!!!!.{payload}.{signature}")
        header, _, signature = self.token().split(".")
        self.refused(f"{header}.e30*.{signature}")

    def test_jsonAsJSONLoadsReadsIt(self):
        """
        The header and payload are read as C{json.loads} reads bytes: white
        space after the object and UTF-16 or UTF-32 are read, anything after
        the object, a second object, or bytes that are not UTF-8 are refused.
        """
        header, _, signature = self.token().split(".")
        claims = {"exp": NOW + 300, "sub": "agent\u00e9"}
        text = json.dumps(claims)
        for raw in (
            (text + " \n").encode("utf-8"),
            text.encode("utf-16"),
            text.encode("utf-32"),
            text.encode("utf-8-sig"),
        ):
            self.assertEqual(peek_claims(f"{header}.{b64(raw)}.{signature}"), claims, raw)
        for raw in (
            (text + " x").encode("utf-8"),
            (text + "{}").encode("utf-8"),
            text[:-1].encode("utf-8"),
            b'{"exp": 1, "sub": "\xff"}',
            b'{"exp": 1, "sub": "\xe9"}',
        ):
            self.refused(f"{header}.{b64(raw)}.{signature}")

    def test_base64urlAlphabetOnly(self):
        """
        Only base64url's alphabet is read: its C{-} and C{_} are, standard
        base64's C{+} and C{/} (the same bits) are not, nor are characters
        outside both, padding inside a segment, a length no base64 has, or
        more padding than completes the quantum.
        """
        # b"\xfb\xff\xbf" is "-_-_" in base64url, "+/+/" in standard base64.
        header, payload, _ = self.token().split(".")
        self.assertEqual(peek(f"{header}.{payload}.-_-_").signature, b"\xfb\xff\xbf")
        for signature in (
            "+/+/",
            "-_+_",
            "-_/_",
            "c2ln bmF0",
            "c2lu\u00e9mF0",
            "c2lu\x00mF0",
            "c2ln=mF0",
            "c2lnb",
            "c2lnbg===",
            "c2lnbg=",
            "=c2lnbg=",
        ):
            self.refused(f"{header}.{payload}.{signature}")

    def test_headerNotJSONObject(self):
        """A header that is not a JSON object is refused."""
        for header in ([], "ES256", 1):
            self.refused(self.token(header=header))
        _, payload, signature = self.token().split(".")
        self.refused(f"{b64(b'{not json')}.{payload}.{signature}")

    def test_payloadNotJSONObject(self):
        """A payload that is not a JSON object is refused."""
        self.refused(self.token(payload=[1, 2]))
        header, _, signature = self.token().split(".")
        self.refused(f"{header}.{b64(b'not json')}.{signature}")

    def test_peekHeaderRefusesGarbage(self):
        """Peeking at the header of garbage is an invalid token."""
        denial = self.assertRaises(Denial, peek_header, "a.b")
        self.assertDenial(denial, 401, "invalid_token", "denials_bad_bearer")

    def test_noExp(self):
        """A token without C{exp} is refused."""
        self.refused(self.token(payload={"sub": "agent"}))

    def test_expNotANumber(self):
        """An C{exp} that is not a number is refused."""
        for exp in (str(int(NOW + 300)), True, None, [1], {"a": 1}):
            self.refused(self.token(payload={"exp": exp}))

    def test_expNotFinite(self):
        """An C{exp} of NaN, infinity or beyond a float is refused."""
        header, _, signature = self.token().split(".")
        for raw in (b'{"exp": NaN}', b'{"exp": Infinity}', b'{"exp": 1' + b"0" * 400 + b"}"):
            self.refused(f"{header}.{b64(raw)}.{signature}")

    def test_mandateRefused(self):
        """
        SPEC 12 H4: a token carrying RFC 8693's C{act} claim (whatever its
        value) or a C{use} of C{resource} or C{mandate} is a mandate, not a
        caller credential: 401 C{invalid_token}, logged as
        C{mandate_as_bearer}.
        """
        for extra in (
            {"act": {"sub": "caracal-gateway"}},
            {"act": None},
            {"act": "x"},
            {"use": "resource"},
            {"use": "mandate"},
        ):
            token = self.token(payload={"exp": NOW + 300, "jti": "j1", **extra})
            denial = self.assertRaises(Denial, peek_claims, token)
            self.assertDenial(denial, 401, "invalid_token", "denials_bad_bearer", token)
            self.assertEqual(denial.reason, "mandate_as_bearer")

    def test_callerUsesAccepted(self):
        """The caller token uses (and claims that merely look alike) still pass."""
        for extra in ({"use": "per_call"}, {"use": "ambient"}, {"may_act": {"sub": "a"}}):
            claims = {"exp": NOW + 300, **extra}
            self.assertEqual(peek_claims(self.token(payload=claims)), claims)

    def test_stringClaimsMustBeShortStrings(self):
        """
        SPEC 12 H5: C{jti}, C{sid}, C{agent_session_id}, C{use} and
        C{zone_id}, when present, are strings of 1 to 256 characters; a
        number, null, list, object, empty or longer string is refused.
        """
        for name in ("jti", "sid", "agent_session_id", "use", "zone_id"):
            for value in (7, 1.5, True, None, [], ["a"], {}, "", "x" * 257):
                token = self.token(payload={"exp": NOW + 300, name: value})
                denial = self.assertRaises(Denial, peek_claims, token)
                self.assertDenial(denial, 401, "invalid_token", "denials_bad_bearer", token)
                self.assertEqual(denial.reason, "invalid_claim")
            if name != "use":
                for value in ("x", "x" * 256):
                    claims = {"exp": NOW + 300, name: value}
                    self.assertEqual(peek_claims(self.token(payload=claims)), claims)


class SecondsLeftTests(SynchronousTestCase, DenialAssertions):
    def test_enoughLeft(self):
        """The seconds left are returned when there are at least 35."""
        self.assertEqual(seconds_left({"exp": NOW + 36}, NOW), 36)
        self.assertEqual(seconds_left({"exp": NOW + 3600.5}, NOW), 3600.5)

    def test_exactly35(self):
        """'At least 35 s away': exactly 35 s passes."""
        self.assertEqual(seconds_left({"exp": NOW + 35}, NOW), 35)

    def test_underThreshold(self):
        """Under 35 seconds left, or expired, is credential_expired."""
        for exp in (NOW + 34.9, NOW + 1, NOW, NOW - 1, 0):
            denial = self.assertRaises(Denial, seconds_left, {"exp": exp}, NOW)
            self.assertDenial(denial, 401, "credential_expired", "denials_expiring")

    def test_badExp(self):
        """An unusable C{exp} is an invalid token."""
        denial = self.assertRaises(Denial, seconds_left, {"exp": "soon"}, NOW)
        self.assertDenial(denial, 401, "invalid_token", "denials_bad_bearer")

    def test_lifetimeBound(self):
        """
        SPEC 12 H6: C{exp} more than C{MAX_TOKEN_LIFETIME} (default 24 h)
        ahead is 401 C{invalid_token}; exactly the bound passes.
        """
        self.assertEqual(seconds_left({"exp": NOW + 86400}, NOW), 86400)
        for exp, bound in ((NOW + 86400.5, None), (NOW + 3601, 3600.0), (NOW + 10**9, None)):
            arguments = ({"exp": exp}, NOW) if bound is None else ({"exp": exp}, NOW, bound)
            denial = self.assertRaises(Denial, seconds_left, *arguments)
            self.assertDenial(denial, 401, "invalid_token", "denials_bad_bearer")
            self.assertEqual(denial.reason, "lifetime_exceeded")
        self.assertEqual(seconds_left({"exp": NOW + 3600}, NOW, 3600.0), 3600)


class ClaimTests(SynchronousTestCase, DenialAssertions):
    def test_singleUse(self):
        """Every token whose use is not exactly 'ambient' is single-use."""
        self.assertFalse(single_use({"use": "ambient"}))
        for claims in ({}, {"use": "per_call"}, {"use": "Ambient"}, {"use": None}):
            self.assertTrue(single_use(claims))

    def test_replayJti(self):
        """Single-use tokens give their jti; ambient ones give none."""
        self.assertEqual(replay_jti({"jti": "j-1"}), "j-1")
        self.assertIsNone(replay_jti({"use": "ambient"}))
        self.assertIsNone(replay_jti({"use": "ambient", "jti": "j-1"}))

    def test_singleUseNeedsJti(self):
        """A single-use token without a string jti is refused."""
        for claims in ({}, {"jti": ""}, {"jti": 7}, {"jti": None}, {"use": "per_call"}):
            denial = self.assertRaises(Denial, replay_jti, claims)
            self.assertDenial(denial, 401, "invalid_token", "denials_bad_bearer")

    def test_sessionId(self):
        """C{sid} names the session, else C{agent_session_id}; non-strings are ignored."""
        self.assertEqual(session_id({"sid": "s1", "agent_session_id": "a1"}), "s1")
        self.assertEqual(session_id({"agent_session_id": "a1"}), "a1")
        self.assertIsNone(session_id({}))

    def test_sessionIdNeverSkippedQuietly(self):
        """
        A C{sid} or C{agent_session_id} that is present but not a non-empty
        string is refused rather than read as "no session" (which skipped
        the revocation check). L{peek_claims} refuses such tokens first.
        """
        for claims in ({"sid": 5}, {"sid": ""}, {"sid": None, "agent_session_id": "a1"}):
            denial = self.assertRaises(Denial, session_id, claims)
            self.assertDenial(denial, 401, "invalid_token", "denials_bad_bearer")


class VerifyTokenTests(SynchronousTestCase, DenialAssertions):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.other_zone_key = ec.generate_private_key(ec.SECP256R1())
        self.sts = FakeSTS()
        self.sts.keys["zone-a"] = [ec_jwk(self.key, "k1")]
        self.sts.keys["zone-b"] = [ec_jwk(self.other_zone_key, "kb")]
        self.cache = JWKSCache(self.sts.fetch, self.clock)

    def mint(self, key=None, kid="k1", algorithm="ES256", **claims):
        payload = {"sub": "agent-1", "exp": int(NOW + 300), "iat": int(NOW), "jti": "j-1"}
        payload.update(claims)
        headers = {"kid": kid} if kid is not None else {}
        return jwt.encode(payload, key or self.key, algorithm=algorithm, headers=headers)

    def forge(self, header: dict, payload: dict | None = None, sign=None) -> str:
        """A token built by hand, as an attacker would, with C{sign(signing_input)}."""
        payload = payload or {"sub": "agent-1", "exp": int(NOW + 300), "jti": "j-1"}
        signing_input = f"{b64json(header)}.{b64json(payload)}"
        signature = sign(signing_input.encode("ascii")) if sign else b""
        return f"{signing_input}.{b64(signature)}"

    def refused(self, token, zone_id="zone-a"):
        failure = self.failureResultOf(verify_token(token, zone_id, self.cache), Denial)
        self.assertDenial(failure.value, 401, "invalid_token", "denials_signature", token)
        return failure.value

    def test_valid(self):
        """A token signed by the zone's key verifies and gives its claims."""
        claims = self.successResultOf(verify_token(self.mint(use="ambient"), "zone-a", self.cache))
        self.assertEqual(claims["sub"], "agent-1")
        self.assertEqual(claims["use"], "ambient")

    def test_audAndIssNotRequired(self):
        """The SPEC names no audience or issuer: tokens carrying them still pass."""
        token = self.mint(aud="some-api", iss="https://sts.example")
        claims = self.successResultOf(verify_token(token, "zone-a", self.cache))
        self.assertEqual(claims["aud"], "some-api")

    def test_algNone(self):
        """An unsigned token is refused before any key is fetched."""
        self.refused(self.forge({"alg": "none", "kid": "k1"}))
        self.refused(self.forge({"alg": "none", "kid": "k1"}, sign=lambda data: b"x"))
        self.refused(self.forge({"alg": "None", "kid": "k1"}, sign=lambda data: b"x"))
        self.assertEqual(self.sts.calls, [])

    def test_algMissingOrOdd(self):
        """A missing, non-string or lowercase C{alg} is refused before any signature check."""
        self.refused(self.forge({"kid": "k1"}, sign=lambda data: b"x"))
        self.refused(self.forge({"alg": ["ES256"], "kid": "k1"}, sign=lambda data: b"x"))
        self.refused(self.forge({"alg": "es256", "kid": "k1"}, sign=lambda data: b"x"))

    def test_hmacKeyConfusion(self):
        """
        HS256 keyed with the zone's public key (PEM, DER point or JWK JSON),
        the classic confusion attack, is refused.
        """
        public = self.key.public_key()
        secrets = [
            public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            public.public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            ),
            json.dumps(ec_jwk(self.key, "k1")).encode(),
        ]
        for secret in secrets:
            for alg in ("HS256", "ES256"):
                token = self.forge(
                    {"alg": alg, "kid": "k1"},
                    sign=lambda data, s=secret: hmac.new(s, data, hashlib.sha256).digest(),
                )
                self.refused(token)

    def test_rs256(self):
        """RS256 is refused: only ES256 is accepted."""
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.refused(self.mint(key=rsa_key, algorithm="RS256"))

    def test_otherECAlgorithms(self):
        """ES384 is refused: only ES256 is accepted."""
        p384 = ec.generate_private_key(ec.SECP384R1())
        self.refused(self.mint(key=p384, algorithm="ES384"))

    def test_missingKid(self):
        """A missing, empty or non-string C{kid} is refused."""
        self.refused(self.mint(kid=None))
        self.refused(self.forge({"alg": "ES256", "kid": ""}, sign=lambda data: b"x"))
        self.refused(self.forge({"alg": "ES256", "kid": 1}, sign=lambda data: b"x"))

    def test_kidOfAnotherZone(self):
        """A key of zone B does not verify a token for a zone-A resource."""
        token = self.mint(key=self.other_zone_key, kid="kb")
        self.successResultOf(verify_token(token, "zone-b", self.cache))
        self.refused(token, "zone-a")

    def test_wrongKeyRightKid(self):
        """A known kid does not make another key's signature valid."""
        intruder = ec.generate_private_key(ec.SECP256R1())
        self.refused(self.mint(key=intruder, kid="k1"))

    def test_tamperedPayload(self):
        """A payload changed after signing fails verification."""
        header, _, signature = self.mint().split(".")
        forged = {"sub": "admin", "exp": int(NOW + 300), "iat": int(NOW), "jti": "j-1"}
        self.refused(f"{header}.{b64json(forged)}.{signature}")

    def test_tamperedSignature(self):
        """A changed or truncated signature fails verification."""
        header, payload, signature = self.mint().split(".")
        raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
        raw[5] ^= 1
        self.refused(f"{header}.{payload}.{b64(bytes(raw))}")
        self.refused(f"{header}.{payload}.{b64(bytes(raw[:40]))}")

    def test_expired(self):
        """exp is checked with no leeway against the gateway's clock."""
        self.refused(self.mint(exp=int(NOW) - 1))
        self.refused(self.mint(exp=int(NOW)))
        self.successResultOf(verify_token(self.mint(exp=int(NOW) + 1), "zone-a", self.cache))

    def test_usesGivenNow(self):
        """Expiry is judged at the C{now} given."""
        token = self.mint(exp=int(NOW) + 10)
        self.successResultOf(verify_token(token, "zone-a", self.cache, now=NOW + 9))
        failure = self.failureResultOf(verify_token(token, "zone-a", self.cache, now=NOW + 10))
        self.assertDenial(failure.value, 401, "invalid_token", "denials_signature", token)

    def test_expMissing(self):
        """A signed token without C{exp} is refused."""
        token = jwt.encode({"sub": "x"}, self.key, algorithm="ES256", headers={"kid": "k1"})
        self.refused(token)

    def test_notYetValid(self):
        """nbf/iat more than 5 s ahead are refused; small clock skew is tolerated."""
        self.refused(self.mint(nbf=int(NOW) + 60))
        self.refused(self.mint(iat=int(NOW) + 60))
        self.refused(self.mint(iat="yesterday"))
        self.successResultOf(verify_token(self.mint(nbf=int(NOW) + 5), "zone-a", self.cache))
        self.successResultOf(verify_token(self.mint(iat=int(NOW) + 3), "zone-a", self.cache))

    def test_garbage(self):
        """Garbage is refused as an invalid token."""
        for token in ("not-a-jwt", "a.b", "a.b.c", ""):
            self.refused(token)

    def test_headerSegmentSpelledOddly(self):
        """
        The header is read apart from pyjwt to pick the key; a header segment
        that is not plain base64url (padding, another alphabet, a non-canonical
        last character, deep nesting, not an object) is refused as a 401, never
        an unhandled error.
        """
        good = self.mint()
        header, rest = good.split(".", 1)
        for odd in (
            header + "=",
            header.replace("J", "+", 1),
            header[:-1] + chr(ord(header[-1]) + 1),
            b64(b"[" * 3000),
            b64(b'"ES256"'),
        ):
            self.refused(f"{odd}.{rest}")
        self.successResultOf(verify_token(good, "zone-a", self.cache))

    def test_jwksUnavailable(self):
        """The zone's keys cannot be fetched: 503 sts_unavailable, no denial metric."""
        self.sts.down = True
        token = self.mint()
        failure = self.failureResultOf(verify_token(token, "zone-a", self.cache), Denial)
        self.assertDenial(failure.value, 503, "sts_unavailable", None, token)

    def test_waitsForKeys(self):
        """Verification waits for the zone's keys to arrive."""
        self.sts.manual = True
        d = verify_token(self.mint(), "zone-a", self.cache)
        self.assertNoResult(d)
        self.sts.release()
        self.assertEqual(self.successResultOf(d)["jti"], "j-1")

    def test_unexpectedKeyFailurePropagates(self):
        """A programming error in the key lookup is not disguised as a bad token."""

        class BrokenCache:
            clock = self.clock

            def key_for(self, zone_id, kid):
                return defer.fail(ZeroDivisionError())

        self.failureResultOf(verify_token(self.mint(), "zone-a", BrokenCache()), ZeroDivisionError)


class VerifyNowTests(SynchronousTestCase, DenialAssertions):
    """
    L{verify_now}: with the zone's keys fresh in the cache it answers
    without a Deferred exactly what L{verify_token} answers; otherwise it
    steps aside (L{NOT_AT_HAND}) without fetching anything.
    """

    setUp = VerifyTokenTests.setUp
    mint = VerifyTokenTests.mint
    forge = VerifyTokenTests.forge

    def outcome(self, result):
        if isinstance(result, Denial):
            return ("denied", result.status, result.code, result.description, result.metric)
        return ("claims", result)

    def test_sameAnswersAsVerifyToken(self):
        """Valid, forged, expired, early, unknown-key and wrong-alg tokens: same outcome."""
        other = ec.generate_private_key(ec.SECP256R1())
        tokens = [
            self.mint(),
            self.mint(use="ambient"),
            self.mint(key=other),
            self.mint(exp=int(NOW)),
            self.mint(nbf=int(NOW + 60)),
            self.mint(iat=int(NOW + 60)),
            self.mint(jti=7),
            self.mint(kid="unknown"),
            self.forge({"alg": "none", "kid": "k1"}, sign=lambda data: b"x"),
            self.forge({"alg": "ES256"}, sign=lambda data: b"x" * 64),
            self.forge({"alg": "ES256", "kid": "k1"}, sign=lambda data: b"x" * 10),
        ]
        self.successResultOf(self.cache.key_for("zone-a", "k1"))
        for token in tokens:
            parsed = parse_token(token)
            deferred = verify_token(token, "zone-a", self.cache, parsed=parsed)
            expected = self.outcome(
                self.successResultOf(deferred)
                if deferred.called and not isinstance(deferred.result, Failure)
                else self.failureResultOf(deferred, Denial).value
            )
            fetches = len(self.sts.calls)
            try:
                got = verify_now(token, "zone-a", self.cache, parsed)
            except Denial as denial:
                got = denial
            self.assertEqual(len(self.sts.calls), fetches)  # never fetches
            if got is NOT_AT_HAND:
                # Only a kid the fresh set lacks is left to verify_token.
                self.assertEqual(parsed.header.get("kid"), "unknown")
                continue
            self.assertEqual(self.outcome(got), expected, token)

    def test_notAtHandWithoutFreshKeys(self):
        """No keys yet, or keys past their TTL: L{NOT_AT_HAND}, and nothing is fetched."""
        token = self.mint()
        self.assertIs(verify_now(token, "zone-a", self.cache, peek(token)), NOT_AT_HAND)
        self.assertEqual(self.sts.calls, [])
        self.successResultOf(self.cache.key_for("zone-a", "k1"))
        self.assertEqual(verify_now(token, "zone-a", self.cache, peek(token))["jti"], "j-1")
        self.clock.advance(self.cache.ttl)
        self.assertIs(verify_now(token, "zone-a", self.cache, peek(token)), NOT_AT_HAND)
        self.assertEqual(len(self.sts.calls), 1)

    def test_keySourceWithoutCachedKey(self):
        """A key source that only has C{key_for} always gets L{verify_token}'s path."""

        class Source:
            clock = self.clock

            def key_for(self, zone_id, kid):
                raise AssertionError("not asked")

        token = self.mint()
        self.assertIs(verify_now(token, "zone-a", Source(), peek(token)), NOT_AT_HAND)

    def test_signatureCacheShared(self):
        """An ambient token verified now is remembered like by L{verify_token}."""
        signatures = SignatureCache()
        token = self.mint(use="ambient")
        self.successResultOf(self.cache.key_for("zone-a", "k1"))
        verify_now(token, "zone-a", self.cache, peek(token), signatures)
        self.assertEqual(len(signatures), 1)


class ES256CheckTests(SynchronousTestCase):
    """The signature check answers exactly what pyjwt's ECAlgorithm(SHA256).verify answers."""

    def test_sameAsPyjwt(self):
        """Valid, tampered, short and long signatures; P-256, P-384, private and RSA keys."""
        from jwt.algorithms import ECAlgorithm

        from caracal.gateway.tokens import _es256_valid

        pyjwt = ECAlgorithm(ECAlgorithm.SHA256)
        p256 = ec.generate_private_key(ec.SECP256R1())
        p384 = ec.generate_private_key(ec.SECP384R1())
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        message = b"header.payload"
        signature = pyjwt.sign(message, p256)
        signature384 = pyjwt.sign(message, p384)
        tampered = signature[:-1] + bytes([signature[-1] ^ 1])
        cases = [
            (p256.public_key(), signature),
            (p256, signature),
            (p256.public_key(), tampered),
            (p256.public_key(), signature[:-1]),
            (p256.public_key(), signature + b"\0"),
            (p256.public_key(), b"\0" * 64),
            (p384.public_key(), signature384),
            (p384.public_key(), signature),
            (ec.generate_private_key(ec.SECP256R1()).public_key(), signature),
            (rsa_key.public_key(), signature),
        ]
        results = []
        for key, sig in cases:
            outcomes = []
            for check in (pyjwt.verify, _es256_valid):
                try:
                    outcomes.append(check(message, key, sig))
                except (ValueError, TypeError, AttributeError):
                    outcomes.append(False)
            self.assertEqual(outcomes[0], outcomes[1], (key, sig))
            results.append(outcomes[0])
        self.assertEqual(results, [True, True] + [False] * 4 + [True] + [False] * 3)


class SignatureCacheTests(SynchronousTestCase, DenialAssertions):
    """
    L{SignatureCache}: a reusable token's signature is verified once per key
    and zone, until its C{exp}; the cache stays bounded.
    """

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.sts = FakeSTS()
        self.sts.keys["zone-a"] = [ec_jwk(self.key, "k1")]
        self.sts.keys["zone-b"] = [ec_jwk(self.key, "k1")]
        self.jwks = JWKSCache(self.sts.fetch, self.clock)
        self.signatures = SignatureCache(size=3)

    def mint(self, **claims):
        payload = {"sub": "agent-1", "exp": int(NOW + 300), "iat": int(NOW), "use": "ambient"}
        payload.update(claims)
        return jwt.encode(payload, self.key, algorithm="ES256", headers={"kid": "k1"})

    def verify(self, token, zone_id="zone-a"):
        return verify_token(
            token, zone_id, self.jwks, parsed=peek(token), signatures=self.signatures
        )

    def key_of(self, zone_id="zone-a"):
        return self.successResultOf(self.jwks.key_for(zone_id, "k1"))

    def test_ambientRemembered(self):
        """A verified ambient token's signature is remembered for its zone and key."""
        token = self.mint()
        self.assertEqual(self.successResultOf(self.verify(token))["use"], "ambient")
        self.assertEqual(len(self.signatures), 1)
        self.assertTrue(self.signatures.verified("zone-a", token, self.key_of(), NOW))
        self.assertEqual(self.successResultOf(self.verify(token))["sub"], "agent-1")
        self.assertEqual(len(self.signatures), 1)

    def test_rememberedSignatureNotVerifiedAgain(self):
        """
        A hit skips the ES256 verification: an entry recorded for a token with
        a bad signature lets it through, so the cache must only ever be fed
        by a successful verification (as L{verify_token} does).
        """
        token = self.mint()
        forged = token.rsplit(".", 1)[0] + "." + b64(b"\x01" * 64)
        self.refused(self.verify(forged))
        self.signatures.remember("zone-a", forged, self.key_of(), NOW + 300)
        self.successResultOf(self.verify(forged))

    def refused(self, d, code="invalid_token"):
        failure = self.failureResultOf(d, Denial)
        self.assertEqual((failure.value.status, failure.value.code), (401, code))
        return failure.value

    def test_singleUseNotRemembered(self):
        """per_call (and any non-ambient) tokens pass once: never stored."""
        for use in ("per_call", "once"):
            self.successResultOf(self.verify(self.mint(use=use, jti="j-1")))
        self.assertEqual(len(self.signatures), 0)

    def test_expiry(self):
        """An entry lasts until the token's exp; past it the token is refused, not served."""
        token = self.mint(exp=int(NOW + 100))
        self.successResultOf(self.verify(token))
        key = self.key_of()
        self.assertTrue(self.signatures.verified("zone-a", token, key, NOW + 99.9))
        self.assertFalse(self.signatures.verified("zone-a", token, key, NOW + 100))
        self.assertEqual(len(self.signatures), 0)
        self.clock.advance(100)
        self.refused(self.verify(token))

    def test_otherZoneOrKeyVerifiesAgain(self):
        """An entry holds for its zone and the very key object that verified it only."""
        token = self.mint()
        self.successResultOf(self.verify(token))
        self.assertFalse(self.signatures.verified("zone-b", token, self.key_of("zone-b"), NOW))
        other = ec.generate_private_key(ec.SECP256R1()).public_key()
        self.assertFalse(self.signatures.verified("zone-a", token, other, NOW))

    def test_withdrawnKeyRefused(self):
        """A key the zone's JWKS no longer lists refuses the token, remembered or not."""
        token = self.mint()
        self.successResultOf(self.verify(token))
        self.sts.keys["zone-a"] = [ec_jwk(ec.generate_private_key(ec.SECP256R1()), "k2")]
        self.clock.advance(self.jwks.ttl + 1)
        self.refused(self.verify(token))

    def test_sizeBound(self):
        """Beyond C{size} entries the least recently remembered is dropped."""
        tokens = [self.mint(sub=f"agent-{i}") for i in range(5)]
        for token in tokens:
            self.successResultOf(self.verify(token))
        self.assertEqual(len(self.signatures), 3)
        key = self.key_of()
        self.assertFalse(self.signatures.verified("zone-a", tokens[0], key, NOW))
        self.assertTrue(self.signatures.verified("zone-a", tokens[4], key, NOW))
