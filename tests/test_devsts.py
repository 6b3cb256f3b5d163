# -*- test-case-name: tests.test_devsts -*-
"""
Tests of the development STS (L{caracal.devsts}): minting, the token
exchange, the JWKS, zone isolation, and its twistd plugin options. The HTTP
side runs in memory (treq's L{StubTreq}); time is a L{Clock}.
"""

from __future__ import annotations

import io
import json
import os
import sys
from urllib.parse import urlencode

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http
from twisted.web.server import Site

from caracal.devsts import DevSTS, service
from caracal.devsts.tap import Options, makeService, refusal
from caracal.gateway.denials import Denial
from caracal.gateway.sts import STSClient
from tests.support.certs import make_chain

BASE = "http://devsts.test"
FORM = b"application/x-www-form-urlencoded"
T0 = 1_800_000_000


def make_sts():
    clock = Clock()
    clock.advance(T0)
    sts = DevSTS(clock=clock)
    return sts, clock, StubTreq(sts.resource())


def exchange_form(token, zone_id="zone-a", **overrides):
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": token,
        "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "zone_id": zone_id,
        "application_id": "app-1",
        "resource": "res-search",
    }
    form.update(overrides)
    return {k: v for k, v in form.items() if v is not None}


class DevSTSTests(SynchronousTestCase):
    def post(self, http, path, form):
        response = self.successResultOf(http.post(BASE + path, data=form))
        return response.code, json.loads(self.successResultOf(response.content()))

    def verify(self, sts, token, zone_id):
        """Decode C{token} with zone C{zone_id}'s published JWK, as a gateway would."""
        [jwk] = sts.jwks(zone_id)["keys"]
        key = jwt.PyJWK(jwk).key
        self.assertEqual(jwt.get_unverified_header(token)["kid"], jwk["kid"])
        return jwt.decode(
            token, key, algorithms=["ES256"], options={"verify_exp": False, "verify_iat": False}
        )

    def test_mint_claims(self):
        """
        A minted token carries the zone's issuer, the subject, session, jti and life asked for.
        """
        sts, _, _ = make_sts()
        token = sts.mint("zone-a", "agent-7", ttl=60, session_id="s1", jti="j1")
        claims = self.verify(sts, token, "zone-a")
        self.assertEqual(
            claims,
            {
                "iss": "caracal-devsts",
                "sub": "agent-7",
                "zone_id": "zone-a",
                "iat": T0,
                "exp": T0 + 60,
                "use": "per_call",
                "jti": "j1",
                "sid": "s1",
            },
        )

    def test_sign_writes_what_pyjwt_writes(self):
        """
        A zone key signs without pyjwt, yet the header and claims segments are
        byte for byte what C{jwt.encode} writes (sorted compact header with the
        kid, compact ASCII claims in their order), and the signature verifies
        with the published JWK.
        """
        sts, _, _ = make_sts()
        key = sts.zone_key("zone-a")
        claims = {"sub": "agent-\u00e9", "exp": T0 + 60, "act": {"sub": "x"}, "n": None, "l": [1]}
        token = key.sign(claims)
        expected = jwt.encode(claims, key.private_key, algorithm="ES256", headers={"kid": key.kid})
        self.assertEqual(token.split(".")[:2], expected.split(".")[:2])
        self.assertEqual(len(token), len(expected))
        self.assertEqual(self.verify(sts, token, "zone-a"), claims)
        self.patch(jwt, "encode", None)
        self.assertEqual(
            self.verify(sts, sts.mint("zone-a", "a", ttl=60), "zone-a")["exp"], T0 + 60
        )

    def test_mint_defaults(self):
        """Per-call tokens always get a fresh jti; ambient ones none unless given."""
        sts, _, _ = make_sts()
        a = self.verify(sts, sts.mint("zone-a", "agent"), "zone-a")
        b = self.verify(sts, sts.mint("zone-a", "agent"), "zone-a")
        self.assertNotEqual(a["jti"], b["jti"])
        ambient = self.verify(sts, sts.mint("zone-a", "agent", use="ambient"), "zone-a")
        self.assertNotIn("jti", ambient)
        self.assertTrue(ambient["sid"])
        extra = self.verify(
            sts, sts.mint("zone-a", "agent", extra_claims={"sid": None, "x": 1}), "zone-a"
        )
        self.assertEqual((extra["sid"], extra["x"]), (None, 1))

    def test_exchange_log_keeps_the_latest(self):
        """The exchange log keeps the last EXCHANGE_LOG_SIZE records, the oldest dropped first."""
        self.patch(service, "EXCHANGE_LOG_SIZE", 2)
        sts, _, http = make_sts()
        token = sts.mint("zone-a", "agent-7", ttl=60)
        for _ in range(3):
            self.post(http, "/oauth/2/token", exchange_form(token))
        self.assertEqual((sts.exchanges, len(sts.exchange_log)), (3, 2))

    def test_exchange_roundtrip(self):
        """A minted token exchanges for a zone-signed mandate within the caller's exp."""
        sts, _, http = make_sts()
        token = sts.mint("zone-a", "agent-7", ttl=60, session_id="s1")
        status, answer = self.post(http, "/oauth/2/token", exchange_form(token))
        self.assertEqual(status, 200)
        self.assertEqual(answer["token_type"], "Bearer")
        self.assertEqual(
            answer["issued_token_type"], "urn:ietf:params:oauth:token-type:access_token"
        )
        self.assertEqual(answer["expires_in"], 60)
        self.assertTrue(answer["provider_token"].startswith("devprov-"))
        mandate = self.verify(sts, answer["access_token"], "zone-a")
        self.assertEqual(mandate["sub"], "agent-7")
        self.assertEqual(mandate["zone_id"], "zone-a")
        self.assertEqual(mandate["application_id"], "app-1")
        self.assertEqual(mandate["resource"], "res-search")
        self.assertEqual(mandate["act"], {"sub": "caracal-gateway"})
        self.assertEqual(mandate["sid"], "s1")
        self.assertEqual(mandate["exp"], T0 + 60)
        self.assertEqual(sts.exchanges, 1)
        [record] = sts.exchange_log
        self.assertTrue(record.granted)
        self.assertEqual((record.application_id, record.resource), ("app-1", "res-search"))

    def test_mandate_life_capped(self):
        """A mandate lives at most 120 seconds, however long the subject token lives."""
        sts, _, http = make_sts()
        token = sts.mint("zone-a", "agent", ttl=3600)
        _, answer = self.post(http, "/oauth/2/token", exchange_form(token))
        self.assertEqual(answer["expires_in"], 120)
        self.assertEqual(self.verify(sts, answer["access_token"], "zone-a")["exp"], T0 + 120)

    def test_exchange_through_gateway_client(self):
        """The gateway's STSClient and the dev STS agree on the wire format."""
        sts, _, _ = make_sts()
        client = STSClient(BASE, Clock(), agent=RequestTraversalAgent(sts.resource()))
        token = sts.mint("zone-a", "agent")
        mandate = self.successResultOf(client.exchange(token, "zone-a", "app-1", "res", "r1"))
        self.assertEqual(self.verify(sts, mandate.access_token, "zone-a")["resource"], "res")
        self.assertEqual(sts.exchange_log[0].request_id, "r1")
        # And a refusal comes back as the STS's own 401.
        denial = self.failureResultOf(
            client.exchange(token + "x", "zone-a", "app-1", "res", "r2"), Denial
        ).value
        self.assertEqual((denial.status, denial.code), (401, "invalid_token"))
        jwks = self.successResultOf(client.fetch_jwks("zone-a"))
        self.assertEqual(jwks, sts.jwks("zone-a"))
        self.assertIsNone(self.successResultOf(client.health()))
        self.assertEqual((sts.exchanges, sts.jwks_fetches, sts.health_checks), (2, 1, 1))

    def test_bad_subject_refused(self):
        """A tampered subject token, or one signed by another STS, is refused."""
        sts, clock, http = make_sts()
        other = DevSTS(clock=clock)
        good = sts.mint("zone-a", "agent", ttl=60)
        header, payload, signature = good.split(".")
        tampered_payload = jwt.utils.base64url_encode(
            json.dumps({**json.loads(jwt.utils.base64url_decode(payload)), "sub": "root"}).encode()
        ).decode()
        for token in (
            "not-a-jwt",
            other.mint("zone-a", "agent"),  # another STS's key, same zone name
            f"{header}.{tampered_payload}.{signature}",
            jwt.encode({"sub": "a", "exp": T0 + 60}, "secret", algorithm="HS256"),
            sts.mint("zone-a", "agent", ttl=-1),  # expired
        ):
            status, answer = self.post(http, "/oauth/2/token", exchange_form(token))
            self.assertEqual((status, answer["error"]), (401, "invalid_token"))
            self.assertNotIn(token, json.dumps(answer))
        self.assertEqual(self.post(http, "/oauth/2/token", exchange_form(good))[0], 200)
        clock.advance(61)
        self.assertEqual(self.post(http, "/oauth/2/token", exchange_form(good))[0], 401)

    def test_subject_refusals_kept_without_pyjwt(self):
        """
        The subject check (the gateway's parse and ES256 check, not pyjwt's
        decode) still refuses, as 401, every token pyjwt's decode refused
        though signed by the zone's key: a non-string C{sub} or C{jti}, an
        C{aud}, another C{alg} or C{kid} in the header, a C{crit} or
        C{b64} header, a non-canonical segment; and pyjwt is not called.
        """
        sts, _, http = make_sts()
        key = sts.zone_key("zone-a")
        claims = {"sub": "agent", "zone_id": "zone-a", "exp": T0 + 60, "use": "per_call"}

        def signed(extra_claims=None, **headers):
            """An ES256 signature by the zone's key over any header and claims."""
            header = {"alg": "ES256", "typ": "JWT", "kid": key.kid, **headers}
            signing_input = b".".join(
                jwt.utils.base64url_encode(json.dumps(part).encode())
                for part in (header, {**claims, **(extra_claims or {})})
            )
            der = key.private_key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
            raw = jwt.utils.der_to_raw_signature(der, key.private_key.curve)
            return (signing_input + b"." + jwt.utils.base64url_encode(raw)).decode()

        good = signed()
        head, body, signature = good.split(".")
        last = jwt.utils.base64url_decode(signature)[-1:]
        # The signature's last character carries 4 unused bits: flipping
        # one decodes to the same bytes, so only a canonical check refuses it.
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        twin = alphabet[alphabet.index(signature[-1]) ^ 1]
        self.assertEqual(jwt.utils.base64url_decode(signature[:-1] + twin)[-1:], last)
        refused = [
            signed({"sub": 5}),
            signed({"sub": None}),
            signed({"jti": 7}),
            signed({"aud": "somebody"}),
            signed(kid="other-kid"),
            signed(alg="ES384"),
            signed(crit=["exp"], exp=1),
            f"{head}.{body}.{signature[:-1]}{twin}",
            f"{head}.{body}",
            f"{head}.{body}.{signature}.x",
        ]
        self.patch(jwt, "decode_complete", None)
        self.patch(jwt.api_jwt.PyJWT, "decode_complete", None)
        for token in refused:
            status, answer = self.post(http, "/oauth/2/token", exchange_form(token))
            self.assertEqual((status, answer["error"]), (401, "invalid_token"), token)
        self.assertEqual(self.post(http, "/oauth/2/token", exchange_form(good))[0], 200)
        # What pyjwt let through still passes: an empty aud.
        self.assertEqual(
            self.post(http, "/oauth/2/token", exchange_form(signed({"aud": ""})))[0], 200
        )

    def count_verifications(self) -> list:
        """Record each ES256 verification the dev STS runs from now on."""
        calls = []
        original = service.es256_valid

        def counting(*args):
            calls.append(args)
            return original(*args)

        self.patch(service, "es256_valid", counting)
        return calls

    def test_own_tokens_not_verified_again(self):
        """
        A token this STS minted, or already verified, is exchanged without a
        second ES256 verification; its claims are still judged every time
        (expiry, C{sub}, C{aud}, mandate marks), and a token it did not sign
        is verified, and refused.
        """
        sts, clock, http = make_sts()
        other = DevSTS(clock=clock)
        calls = self.count_verifications()
        token = sts.mint("zone-a", "agent", ttl=60)
        for _ in range(2):
            self.assertEqual(self.post(http, "/oauth/2/token", exchange_form(token))[0], 200)
        for extra, expected in (
            ({"sub": 5}, (401, "invalid_token")),
            ({"aud": "x"}, (401, "invalid_token")),
            ({"act": {"sub": "x"}}, (400, "invalid_grant")),
        ):
            status, answer = self.post(
                http, "/oauth/2/token", exchange_form(sts.mint("zone-a", "a", extra_claims=extra))
            )
            self.assertEqual((status, answer["error"]), expected, extra)
        self.assertEqual(calls, [])
        # Signed with the zone's key but not minted here: verified once.
        signed = sts.zone_key("zone-a").sign({"sub": "a", "exp": T0 + 60})
        for _ in range(2):
            self.assertEqual(self.post(http, "/oauth/2/token", exchange_form(signed))[0], 200)
        self.assertEqual(len(calls), 1)
        forged = other.mint("zone-a", "agent", extra_claims={"kid": "x"})
        forged = forged.replace(forged.split(".")[0], token.split(".")[0])
        self.assertEqual(self.post(http, "/oauth/2/token", exchange_form(forged))[0], 401)
        self.assertEqual(len(calls), 2)
        clock.advance(60)
        self.assertEqual(self.post(http, "/oauth/2/token", exchange_form(token))[0], 401)

    def test_remembered_signatures_bounded(self):
        """
        At most C{SIGNED_TOKENS} signatures are remembered: the oldest is
        forgotten, then verified again (and still accepted).
        """
        self.patch(service, "SIGNED_TOKENS", 2)
        sts, _, http = make_sts()
        calls = self.count_verifications()
        first, second, third = (sts.mint("zone-a", "agent") for _ in range(3))
        self.assertEqual(len(sts._signed), 2)
        for token in (second, third):
            self.assertEqual(self.post(http, "/oauth/2/token", exchange_form(token))[0], 200)
        self.assertEqual(calls, [])
        self.assertEqual(self.post(http, "/oauth/2/token", exchange_form(first))[0], 200)
        self.assertEqual(len(calls), 1)

    def test_issued_mandate_refused_as_subject(self):
        """
        A mandate this STS issued carries C{act} (RFC 8693 section 4.1), and
        presented back as a subject token it is 400 C{invalid_grant}: a tool
        server cannot trade it for another resource's credentials (H4).
        """
        sts, _, http = make_sts()
        status, answer = self.post(
            http, "/oauth/2/token", exchange_form(sts.mint("zone-a", "agent"))
        )
        self.assertEqual(status, 200)
        mandate = answer["access_token"]
        self.assertEqual(self.verify(sts, mandate, "zone-a")["act"], {"sub": "caracal-gateway"})
        status, answer = self.post(
            http, "/oauth/2/token", exchange_form(mandate, resource="res-other")
        )
        self.assertEqual((status, answer["error"]), (400, "invalid_grant"))
        self.assertNotIn(mandate, json.dumps(answer))
        self.assertEqual([r.granted for r in sts.exchange_log], [True, False])
        self.assertEqual(sts.exchange_log[1].resource, "res-other")

    def test_mandate_marks_refused_as_subject(self):
        """
        Any validly signed token with an C{act} claim (whatever its value) or
        a C{use} of C{resource} / C{mandate} is refused as a subject token.
        """
        sts, _, http = make_sts()
        for extra in (
            {"act": {"sub": "tool-server"}},
            {"act": None},
            {"use": "resource"},
            {"use": "mandate"},
        ):
            token = sts.mint("zone-a", "agent", extra_claims=extra)
            status, answer = self.post(http, "/oauth/2/token", exchange_form(token))
            self.assertEqual((status, answer["error"]), (400, "invalid_grant"), extra)
        for use in ("per_call", "ambient"):
            token = sts.mint("zone-a", "agent", use=use)
            self.assertEqual(self.post(http, "/oauth/2/token", exchange_form(token))[0], 200)

    def test_unsigned_mandate_is_invalid_token(self):
        """The mandate marks are judged only on a verified token: a forged one is 401."""
        sts, _, http = make_sts()
        other = DevSTS(clock=sts.clock)
        forged = other.mint("zone-a", "agent", extra_claims={"act": {"sub": "x"}})
        status, answer = self.post(http, "/oauth/2/token", exchange_form(forged))
        self.assertEqual((status, answer["error"]), (401, "invalid_token"))

    def test_missing_fields(self):
        """An exchange missing a required form field is refused."""
        sts, _, http = make_sts()
        token = sts.mint("zone-a", "agent")
        for override in (
            {"subject_token": None},
            {"zone_id": None},
            {"application_id": None},
            {"resource": None},
            {"grant_type": "client_credentials"},
            {"subject_token_type": None},
        ):
            status, answer = self.post(http, "/oauth/2/token", exchange_form(token, **override))
            self.assertEqual((status, answer["error"]), (400, "invalid_request"), override)

    def test_jwks_shape(self):
        """The JWKS holds the zone's ES256 public key with its kid."""
        sts, _, http = make_sts()
        response = self.successResultOf(
            http.get(BASE + "/.well-known/jwks.json", params={"zone_id": "zone-a"})
        )
        self.assertEqual(response.code, 200)
        document = json.loads(self.successResultOf(response.content()))
        [key] = document["keys"]
        self.assertEqual((key["kty"], key["crv"], key["alg"]), ("EC", "P-256", "ES256"))
        for name in ("kid", "x", "y"):
            self.assertIsInstance(key[name], str)
            self.assertTrue(key[name])
        self.assertNotIn("d", key, "the private part is never published")
        self.assertEqual(sts.jwks_fetches, 1)

    def test_zone_isolation(self):
        """Each zone has its own key: a zone-a token is refused for zone-b."""
        sts, _, http = make_sts()
        a = sts.jwks("zone-a")["keys"][0]
        b = sts.jwks("zone-b")["keys"][0]
        self.assertNotEqual(a["kid"], b["kid"])
        self.assertNotEqual((a["x"], a["y"]), (b["x"], b["y"]))
        token = sts.mint("zone-a", "agent")
        status, _ = self.post(http, "/oauth/2/token", exchange_form(token, zone_id="zone-b"))
        self.assertEqual(status, 401)
        # Even a zone-b-signed token claiming zone-a is refused for zone-b.
        forged = sts.mint("zone-b", "agent", extra_claims={"zone_id": "zone-a"})
        status, _ = self.post(http, "/oauth/2/token", exchange_form(forged, zone_id="zone-b"))
        self.assertEqual(status, 401)
        self.assertEqual(sts.jwks("zone-a")["keys"][0], a, "keys are stable per zone")

    def test_rotate(self):
        """After a rotation tokens signed with the old key are refused."""
        sts, _, http = make_sts()
        token = sts.mint("zone-a", "agent")
        sts.rotate("zone-a")
        self.assertEqual(self.post(http, "/oauth/2/token", exchange_form(token))[0], 401)

    def test_dev_mint_endpoint(self):
        """POST /dev/mint returns a token with the use, life and session asked for."""
        sts, _, http = make_sts()
        status, answer = self.post(
            http, "/dev/mint", {"zone_id": "zone-a", "use": "ambient", "ttl": "90", "sid": "s9"}
        )
        self.assertEqual(status, 200)
        claims = self.verify(sts, answer["token"], "zone-a")
        self.assertEqual(
            (claims["use"], claims["exp"] - claims["iat"], claims["sid"]), ("ambient", 90, "s9")
        )
        for bad in (
            {"use": "per_call"},
            {"zone_id": "z", "ttl": "x"},
            {"zone_id": "z", "ttl": "0"},
        ):
            self.assertEqual(self.post(http, "/dev/mint", bad)[0], 400)

    def test_health_and_unknown_paths(self):
        """
        /health answers 200 and is counted; a GET on the token path or an unknown path is a 404.
        """
        sts, _, http = make_sts()
        self.assertEqual(self.successResultOf(http.get(BASE + "/health")).code, 200)
        self.assertEqual(self.successResultOf(http.get(BASE + "/oauth/2/token")).code, 404)
        self.assertEqual(self.successResultOf(http.get(BASE + "/nope")).code, 404)
        self.assertEqual(sts.health_checks, 1)

    def test_scripted_failure(self):
        """fail_exchanges answers every exchange as told (failure drills)."""
        sts, _, http = make_sts()
        sts.fail_exchanges = (403, {"error": "access_denied"})
        status, answer = self.post(http, "/oauth/2/token", exchange_form(sts.mint("zone-a", "a")))
        self.assertEqual((status, answer), (403, {"error": "access_denied"}))
        self.assertEqual(sts.exchanges, 1)


def serve(site, request: bytes) -> tuple[int, dict]:
    """Send one raw HTTP/1.1 request through C{site} in memory; the status and JSON answer."""
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(request)
    channel.connectionLost(Failure(ConnectionDone()))
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def form_post(path: str, body: bytes, content_type: bytes | None) -> bytes:
    """A raw POST of C{body} with the C{Content-Type} given (none when C{None})."""
    lines = [f"POST {path} HTTP/1.1".encode(), b"Host: devsts.test"]
    if content_type is not None:
        lines.append(b"Content-Type: " + content_type)
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class SiteTests(SynchronousTestCase):
    """The site C{twistd caracal-devsts} serves (L{DevSTS.site})."""

    def setUp(self):
        self.sts, self.clock, _ = make_sts()
        self.site = self.sts.site()
        self.parsed = []
        original = http._parseContentType

        def recording(line):
            self.parsed.append(line)
            return original(line)

        self.patch(http, "_parseContentType", recording)

    def test_exact_form_type_read_without_header_parse(self):
        """
        An exchange whose C{Content-Type} is exactly the form type is answered
        without Twisted's C{email}-based C{Content-Type} parse, with the same
        outcome: 200 for a good form, 400 for a missing field, 401 for a bad token.
        """
        token = self.sts.mint("zone-a", "agent")
        body = urlencode(exchange_form(token)).encode()
        self.assertEqual(serve(self.site, form_post("/oauth/2/token", body, FORM))[0], 200)
        missing = urlencode(exchange_form(token, resource=None)).encode()
        status, answer = serve(self.site, form_post("/oauth/2/token", missing, FORM))
        self.assertEqual((status, answer["error"]), (400, "invalid_request"))
        bad = urlencode(exchange_form(token + "x")).encode()
        self.assertEqual(serve(self.site, form_post("/oauth/2/token", bad, FORM))[0], 401)
        self.assertEqual(self.parsed, [])
        self.assertEqual([r.granted for r in self.sts.exchange_log], [True, False, False])

    def test_other_content_types_as_twisted_reads_them(self):
        """
        Any other C{Content-Type} goes through Twisted's own parse: a form
        type with parameters or multipart is read, text or none is not (400).
        """
        token = self.sts.mint("zone-a", "agent")
        body = urlencode(exchange_form(token)).encode()
        with_charset = FORM + b"; charset=utf-8"
        self.assertEqual(serve(self.site, form_post("/oauth/2/token", body, with_charset))[0], 200)
        for content_type in (b"text/plain", None):
            status, answer = serve(self.site, form_post("/oauth/2/token", body, content_type))
            self.assertEqual((status, answer["error"]), (400, "invalid_request"), content_type)
        multipart = (
            b'--b\r\nContent-Disposition: form-data; name="zone_id"\r\n\r\nzone-a\r\n--b--\r\n'
        )
        status, answer = serve(
            self.site, form_post("/dev/mint", multipart, b"multipart/form-data; boundary=b")
        )
        self.assertEqual(status, 200)
        self.assertEqual(
            jwt.decode(answer["token"], options={"verify_signature": False})["zone_id"], "zone-a"
        )
        self.assertEqual(
            self.parsed, [with_charset, b"text/plain", b"multipart/form-data; boundary=b"]
        )


class AccessLogTests(SynchronousTestCase):
    """The dev STS's access log: a line per request only when asked for."""

    def served_log(self, **options) -> str:
        """What the site's access log received for one exchange."""
        sts, _, _ = make_sts()
        site = sts.site(**options)
        site.startFactory()
        self.addCleanup(site.stopFactory)
        log = io.StringIO()
        site.logFile = log
        body = urlencode(exchange_form(sts.mint("zone-a", "agent"))).encode()
        self.assertEqual(serve(site, form_post("/oauth/2/token", body, FORM))[0], 200)
        return log.getvalue()

    def test_off_by_default(self):
        """By default no access line is formatted or written."""
        self.assertEqual(self.served_log(), "")

    def test_on_when_asked(self):
        """With C{access_log} one combined-format line per request is written."""
        [line] = self.served_log(access_log=True).splitlines()
        self.assertIn('"POST /oauth/2/token HTTP/1.1" 200', line)


class TapTests(SynchronousTestCase):
    """C{twistd caracal-devsts} options."""

    def parse(self, *argv):
        options = Options()
        options.parseOptions(list(argv))
        return options

    def start(self, options):
        """Start L{makeService}'s service on a memory reactor; return the reactor and service."""
        reactor = MemoryReactor()
        service = makeService(options, reactor, environ={})
        service.startService()
        self.addCleanup(service.stopService)
        return reactor, service

    def test_plaintext(self):
        """C{--insecure-http} listens in plaintext on the port and address given."""
        options = self.parse("--insecure-http", "--port", "8081")
        reactor, service = self.start(options)
        [(port, factory, _backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (8081, "127.0.0.1"))
        self.assertEqual(reactor.sslServers, [])
        self.assertIsInstance(factory, Site)
        self.assertIsInstance(service.sts, DevSTS)
        self.assertFalse(factory.access_log)

    def test_access_log_flag(self):
        """C{--access-log} turns the site's access log on."""
        options = self.parse("--insecure-http", "--access-log")
        [(_port, factory, _backlog, _interface)] = self.start(options)[0].tcpServers
        self.assertTrue(factory.access_log)

    def test_refuses_production(self):
        """
        C{CARACAL_ENV=production} (any case) is refused: one line naming the
        reason on stderr, exit status 1, no service.
        """
        options = self.parse("--insecure-http", "--port", "0")
        for value in ("production", " Production "):
            stderr = io.StringIO()
            self.patch(sys, "stderr", stderr)
            error = self.assertRaises(
                SystemExit, makeService, options, environ={"CARACAL_ENV": value}
            )
            self.assertEqual(error.code, 1)
            lines = stderr.getvalue().splitlines()
            self.assertEqual(len(lines), 1)
            self.assertTrue(lines[0].startswith("caracal-devsts: "), lines)
            self.assertIn("CARACAL_ENV=production", lines[0])
        self.assertIsNone(refusal(options, {"CARACAL_ENV": "dev"}))
        self.assertIsNone(refusal(options, {}))

    def test_refuses_non_loopback_bind(self):
        """Only loopback IP literals may be bound; names and wildcards are refused."""
        for bind in ("0.0.0.0", "::", "", "10.1.2.3", "192.0.2.1", "localhost", "example.com"):
            options = self.parse("--insecure-http", "--bind", bind)
            reason = refusal(options, {})
            self.assertIsNotNone(reason, bind)
            self.assertIn("loopback", reason)
            self.patch(sys, "stderr", io.StringIO())
            self.assertRaises(SystemExit, makeService, options, environ={})
        for bind in ("127.0.0.1", "127.8.9.10", "::1"):
            self.assertIsNone(refusal(self.parse("--insecure-http", "--bind", bind), {}), bind)

    def test_tls_required_or_explicitly_plaintext(self):
        """TLS files are required in pairs unless --insecure-http, and exclude it."""
        self.assertRaises(usage.UsageError, self.parse)
        self.assertRaises(usage.UsageError, self.parse, "--tls-cert", "a.pem")
        self.assertRaises(
            usage.UsageError, self.parse, "--tls-cert", "a", "--tls-key", "b", "--insecure-http"
        )

    def test_tls_files(self):
        """C{--tls-cert}/C{--tls-key} listen with TLS, presenting the whole chain."""
        directory = self.mktemp()
        os.makedirs(directory)
        _root, _leaf = make_chain(directory)
        cert, key = os.path.join(directory, "server.crt"), os.path.join(directory, "server.key")
        options = self.parse("--tls-cert", cert, "--tls-key", key, "--bind", "::1")
        reactor, _service = self.start(options)
        [(port, _factory, context_factory, _backlog, interface)] = reactor.sslServers
        self.assertIs(context_factory, options["tls"])
        self.assertEqual((port, interface), (8443, "::1"))
        # The whole chain is presented: leaf plus the intermediate.
        self.assertEqual(len(options["tls"].extraCertChain), 1)

    def test_tls_file_errors_name_the_file(self):
        """Each unreadable, malformed or mismatched TLS file is a usage error naming it."""
        directory = self.mktemp()
        os.makedirs(directory)
        make_chain(directory)
        cert, key = os.path.join(directory, "server.crt"), os.path.join(directory, "server.key")
        _, other_leaf = make_chain(directory, stem="other")
        missing = os.path.join(directory, "missing.crt")
        garbage = os.path.join(directory, "garbage.pem")
        with open(garbage, "wb") as f:
            f.write(b"not pem")
        other_key = os.path.join(directory, "other.key")
        for c, k, named in (
            (missing, key, missing),
            (garbage, key, garbage),
            (cert, garbage, garbage),
            (cert, other_key, other_key),
        ):
            error = self.assertRaises(usage.UsageError, self.parse, "--tls-cert", c, "--tls-key", k)
            self.assertIn(named, str(error))
