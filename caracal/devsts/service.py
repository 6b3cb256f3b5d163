# -*- test-case-name: tests.test_devsts -*-
"""
A development STS: a small, real implementation of SPEC section 5 for tests,
the demo and curl users. It is NOT part of the gateway and NOT fit for
production: keys are ephemeral (one ES256 key per zone, made on first use and
lost on restart), nothing authenticates the caller of the exchange, and
C{POST /dev/mint} hands out caller tokens to anyone who asks.

Endpoints (L{DevSTS.resource}):
  - C{POST /oauth/2/token}: RFC 8693 token exchange; verifies the subject
    token against the zone's key and answers with a mandate (which carries
    C{act}); a mandate offered as the subject token is 400 C{invalid_grant};
  - C{GET /.well-known/jwks.json?zone_id=Z}: zone Z's public key;
  - C{GET /health}: 200;
  - C{POST /dev/mint} (form C{zone_id}, C{use}, C{ttl}, C{sid}, C{sub}):
    C{{"token": ...}}, a caller token signed by the zone's key.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections import deque
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from jwt.algorithms import ECAlgorithm
from twisted.web.http import parse_qs
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from caracal.gateway.denials import Denial
from caracal.gateway.tokens import SignatureCache, es256_valid, parse_token

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 (a URN)
ISSUER = "caracal-devsts"
#: The actor named in every mandate's C{act} claim (RFC 8693 section 4.1).
ACTOR = "caracal-gateway"
#: Longest life of a mandate, in seconds; never past the caller token's C{exp}.
MANDATE_TTL = 120
#: Longest life of a token minted through C{POST /dev/mint}.
MAX_MINT_TTL = 24 * 3600
#: Tokens whose signature this STS remembers (it signed or verified them), so
#: exchanging one costs no ES256 verification: the bench mints its tokens
#: before it measures, tens of thousands. About 650 bytes each when full.
SIGNED_TOKENS = 65536
#: The one form encoding the token endpoint is specified with (SPEC section 5).
FORM_TYPE = b"application/x-www-form-urlencoded"
# One ECDSA-with-SHA256 object for every signature, not one per call.
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
# Compact JSON, as pyjwt writes a JWT's segments.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def _b64url(data: bytes) -> bytes:
    """Base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=")


@dataclass
class ZoneKey:
    """A zone's signing key and its key id."""

    kid: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    #: The verification key, derived once (every exchange verifies with it).
    public_key: ec.EllipticCurvePublicKey = field(init=False, repr=False)
    #: The encoded JOSE header with its trailing dot, the same for every
    #: token of this key (so each signature encodes only the claims).
    header_prefix: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.public_key = self.private_key.public_key()
        # pyjwt's header for ES256 with a kid: sorted keys, compact.
        header = {"alg": "ES256", "kid": self.kid, "typ": "JWT"}
        self.header_prefix = _b64url(_COMPACT.encode(header).encode("utf-8")) + b"."

    def sign(self, claims: dict) -> str:
        """
        C{claims} as a compact ES256 JWS with this key's C{kid}: what
        C{jwt.encode(claims, key, "ES256", headers={"kid": kid})} writes,
        without pyjwt's per-call set-up (header encoding, algorithm and hash
        objects, byte-by-byte signature conversion); the dev STS signs
        a mandate per exchange.
        """
        signing_input = self.header_prefix + _b64url(_COMPACT.encode(claims).encode("utf-8"))
        r, s = decode_dss_signature(self.private_key.sign(signing_input, _ECDSA_SHA256))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return (signing_input + b"." + _b64url(signature)).decode("ascii")

    def jwk(self) -> dict:
        """The public key as a JWK (kty EC, crv P-256, alg ES256, kid, x, y)."""
        jwk = ECAlgorithm.to_jwk(self.public_key, as_dict=True)
        jwk.update({"alg": "ES256", "kid": self.kid, "use": "sig"})
        return jwk


@dataclass(frozen=True)
class ExchangeRecord:
    """What one token exchange asked for (never the token itself)."""

    zone_id: str
    application_id: str
    resource: str
    request_id: str | None
    granted: bool
    #: The W3C trace context the caller sent, if any.
    traceparent: str | None = None


class InvalidSubject(Exception):
    """The subject token does not verify against the zone's key."""


class MandateAsSubject(InvalidSubject):
    """
    The subject token verifies but is a mandate, not a caller credential: it
    carries an C{act} claim (RFC 8693 section 4.1, which every mandate this
    STS issues has) or its C{use} is C{resource} or C{mandate}. A tool server
    holding a mandate must not trade it for another resource's credentials
    (SPEC section 12, H4); the real Caracal STS refuses it the same way.
    """


#: C{use} values that mark a token issued for a resource, never a caller's.
MANDATE_USES = frozenset({"resource", "mandate"})


#: Exchange records a dev STS keeps (the most recent ones).
EXCHANGE_LOG_SIZE = 10_000


class DevSTS:
    """
    The development STS's state: per-zone keys and call counters.

    @ivar exchanges: token-exchange requests received (whatever their outcome).
    @ivar jwks_fetches: JWKS requests received.
    @ivar health_checks: health requests received.
    @ivar exchange_log: one L{ExchangeRecord} per exchange request received,
        the last L{EXCHANGE_LOG_SIZE} of them (tests read what they just
        caused; a long bench run would otherwise keep every one).
    @ivar fail_exchanges: when set to C{(status, body_dict)}, every exchange is
        answered with that instead (for failure drills).
    """

    def __init__(self, clock=None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self._zones: dict[str, ZoneKey] = {}
        # (zone, whole token) -> the ZoneKey that signed it, until its exp.
        self._signed = SignatureCache(SIGNED_TOKENS)
        self.exchanges = 0
        self.jwks_fetches = 0
        self.health_checks = 0
        self.exchange_log: deque[ExchangeRecord] = deque(maxlen=EXCHANGE_LOG_SIZE)
        self.fail_exchanges: tuple[int, dict] | None = None

    def now(self) -> int:
        """The clock's time in whole seconds."""
        return int(self.clock.seconds())

    def zone_key(self, zone_id: str) -> ZoneKey:
        """Zone C{zone_id}'s key, made on first use."""
        key = self._zones.get(zone_id)
        if key is None:
            key = ZoneKey(
                kid=secrets.token_urlsafe(12), private_key=ec.generate_private_key(ec.SECP256R1())
            )
            self._zones[zone_id] = key
        return key

    def rotate(self, zone_id: str) -> ZoneKey:
        """Replace zone C{zone_id}'s key by a fresh one (tokens of the old key stop verifying)."""
        self._zones.pop(zone_id, None)
        return self.zone_key(zone_id)

    def jwks(self, zone_id: str) -> dict:
        """Zone C{zone_id}'s JWKS document."""
        return {"keys": [self.zone_key(zone_id).jwk()]}

    def _sign(self, zone_id: str, claims: dict) -> str:
        return self.zone_key(zone_id).sign(claims)

    def mint(
        self,
        zone_id: str,
        subject: str,
        use: str = "per_call",
        ttl: int = 300,
        session_id: str | None = None,
        jti: str | None = None,
        extra_claims: dict | None = None,
    ) -> str:
        """
        A caller token for C{subject} in zone C{zone_id}, ES256-signed by the
        zone's key with its C{kid} in the header. Tokens whose C{use} is not
        C{ambient} always carry a C{jti} (random unless given); a C{sid} is
        random unless given. C{extra_claims} override the defaults.
        """
        now = self.now()
        claims: dict = {
            "iss": ISSUER,
            "sub": subject,
            "zone_id": zone_id,
            "iat": now,
            "exp": now + int(ttl),
            "use": use,
            "sid": session_id or "sess-" + secrets.token_hex(8),
        }
        if jti is not None or use != "ambient":
            claims["jti"] = jti or secrets.token_hex(16)
        claims.update(extra_claims or {})
        key = self.zone_key(zone_id)
        token = key.sign(claims)
        exp = claims.get("exp")
        if not isinstance(exp, bool) and isinstance(exp, (int, float)):
            # Signed here just now: the very token, with this very key, needs
            # no verification when it comes back (the claims are still checked).
            self._signed.remember(zone_id, token, key, exp)
        return token

    def verify_subject(self, token: str, zone_id: str) -> dict:
        """
        The claims of C{token} if it is an unexpired ES256 token signed by zone
        C{zone_id}'s current key and naming that zone; else L{InvalidSubject}
        (L{MandateAsSubject} when it is a mandate).
        """
        key = self._zones.get(zone_id)
        if key is None:
            raise InvalidSubject("unknown zone")
        # The gateway's own parse and ES256 check (caracal.gateway.tokens),
        # not pyjwt's decode, whose per-call set-up cost as much as the
        # signature itself: a strict compact JWS with JSON-object header and
        # claims, signed with ES256 by the zone's current key (its kid too).
        try:
            parsed = parse_token(token)
        except Denial as e:
            raise InvalidSubject("not a JWT") from e
        header, claims = parsed.header, parsed.claims
        if header.get("alg") != "ES256" or header.get("kid") != key.kid:
            raise InvalidSubject("wrong key")
        now = self.now()
        # A token this STS signed (or verified) with the zone's current key
        # object needs no ES256 check: the same bytes under the same key; a
        # rotated key is another object, so its old tokens are checked (and
        # refused). Everything below still runs on every exchange.
        remembered = self._signed.verified(zone_id, token, key, now)
        if not remembered:
            try:
                valid = es256_valid(parsed.signing_input, key.public_key, parsed.signature)
            except (ValueError, TypeError):
                valid = False
            if not valid:
                raise InvalidSubject("bad signature")
        # What pyjwt's decode refused besides the signature: a sub or jti
        # that is not a string, and an audience nobody asked for.
        if any(name in claims and not isinstance(claims[name], str) for name in ("sub", "jti")):
            raise InvalidSubject("bad claim type")
        if claims.get("aud"):
            raise InvalidSubject("unexpected audience")
        # Expiry is checked on our clock (tests drive it), not time.time().
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, (int, float)) or exp <= now:
            raise InvalidSubject("expired")
        if not remembered:
            self._signed.remember(zone_id, token, key, exp)
        if claims.get("zone_id", zone_id) != zone_id:
            raise InvalidSubject("other zone")
        if "act" in claims or claims.get("use") in MANDATE_USES:
            raise MandateAsSubject("a mandate is not a subject token")
        return claims

    def issue_mandate(self, subject_claims: dict, zone_id: str, application_id: str, resource):
        """The token-exchange answer (a dict) for a verified subject."""
        now = self.now()
        exp = min(now + MANDATE_TTL, int(subject_claims["exp"]))
        claims = {
            "iss": ISSUER,
            "sub": subject_claims.get("sub"),
            "zone_id": zone_id,
            "application_id": application_id,
            "resource": resource,
            "act": {"sub": ACTOR},
            "iat": now,
            "exp": exp,
            "jti": secrets.token_hex(16),
        }
        sid = subject_claims.get("sid") or subject_claims.get("agent_session_id")
        if sid:
            claims["sid"] = sid
        return {
            "access_token": self._sign(zone_id, claims),
            "token_type": "Bearer",
            "expires_in": max(exp - now, 0),
            "issued_token_type": ACCESS_TOKEN_TYPE,
            # The gateway only forwards this for provider auth modes.
            "provider_token": "devprov-" + secrets.token_hex(12),
        }

    def resource(self) -> Resource:
        """The twisted.web resource serving this STS's endpoints."""
        return _STSResource(self)

    def site(self, access_log: bool = False) -> Site:
        """
        The twisted.web site serving L{resource}, as C{twistd caracal-devsts}
        runs it: it reads an exactly C{application/x-www-form-urlencoded}
        body itself (see L{_STSRequest}) and writes an access line per
        request only when C{access_log} is set (see L{_STSSite}). Its
        timeouts run on this STS's clock.
        """
        return _STSSite(
            self.resource(), requestFactory=_STSRequest, reactor=self.clock, access_log=access_log
        )


class _STSRequest(Request):
    """
    A request whose form body, when its C{Content-Type} is exactly
    L{FORM_TYPE} (as the gateway's STS client and curl send it), is parsed
    without Twisted's per-request C{Content-Type} parse: Twisted hands every
    POST's C{Content-Type} to the stdlib C{email} header parser, about a
    tenth of the dev STS's CPU per exchange. The body is read by Twisted's
    own C{parse_qs}, as Twisted would, so C{args} come out the same. Any
    other C{Content-Type} (with parameters, multipart, or none) goes through
    Twisted's parse unchanged, so what it accepted or refused still is.
    """

    _form_body = False

    def requestReceived(self, command, path, version):
        content_type = self.requestHeaders.getRawHeaders(b"content-type")
        if command == b"POST" and content_type is not None and content_type[0] == FORM_TYPE:
            self._form_body = True
            # Twisted has no public per-request switch: this attribute is what
            # its own requestReceived reads (the constructor's
            # parsePOSTFormSubmission). Should a release rename it, Twisted
            # parses the body too and args stay the same, only slower.
            self._parsePOSTFormSubmission = False
        super().requestReceived(command, path, version)

    def process(self):
        if self._form_body:
            self.args.update(parse_qs(self.content.read(), 1))
            self.content.seek(0, 0)
        super().process()


class _STSSite(Site):
    """
    A L{Site} whose access log is off unless asked for: under twistd's
    default observer each access line is formatted and written as a log
    event, about a tenth of the dev STS's CPU per exchange, paid for nothing
    by a bench that shares the machine with it.

    @ivar access_log: whether L{log} writes the access line.
    """

    def __init__(self, resource, *, access_log: bool = False, **kwargs) -> None:
        super().__init__(resource, **kwargs)
        self.access_log = access_log

    def log(self, request) -> None:
        if self.access_log:
            super().log(request)


def _json(request, status: int, document: dict) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def _arg(request, name: str) -> str | None:
    values = request.args.get(name.encode("ascii"))
    if not values or len(values) != 1:
        return None
    try:
        value = values[0].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return value or None


class _STSResource(Resource):
    isLeaf = True

    def __init__(self, sts: DevSTS) -> None:
        super().__init__()
        self.sts = sts

    def render(self, request):
        route = (request.method, request.path)
        if route == (b"POST", b"/oauth/2/token"):
            return self._exchange(request)
        if route == (b"GET", b"/.well-known/jwks.json"):
            return self._jwks(request)
        if route == (b"GET", b"/health"):
            self.sts.health_checks += 1
            return _json(request, 200, {"status": "ok"})
        if route == (b"POST", b"/dev/mint"):
            return self._mint(request)
        return _json(request, 404, {"error": "not_found"})

    def _exchange(self, request) -> bytes:
        sts = self.sts
        sts.exchanges += 1
        fields = {
            name: _arg(request, name)
            for name in (
                "grant_type",
                "subject_token",
                "subject_token_type",
                "zone_id",
                "application_id",
                "resource",
            )
        }
        request_id = request.getHeader(b"x-request-id")
        traceparent = request.getHeader(b"traceparent")
        record = {
            "zone_id": fields["zone_id"] or "",
            "application_id": fields["application_id"] or "",
            "resource": fields["resource"] or "",
            "request_id": request_id.decode("ascii", "replace") if request_id else None,
            "traceparent": traceparent.decode("ascii", "replace") if traceparent else None,
        }
        if sts.fail_exchanges is not None:
            sts.exchange_log.append(ExchangeRecord(granted=False, **record))
            status, document = sts.fail_exchanges
            return _json(request, status, document)
        if (
            None in fields.values()
            or fields["grant_type"] != GRANT_TYPE
            or fields["subject_token_type"] != ACCESS_TOKEN_TYPE
        ):
            sts.exchange_log.append(ExchangeRecord(granted=False, **record))
            return _json(
                request,
                400,
                {"error": "invalid_request", "error_description": "missing or wrong form fields"},
            )
        try:
            claims = sts.verify_subject(fields["subject_token"], fields["zone_id"])
        except MandateAsSubject:
            sts.exchange_log.append(ExchangeRecord(granted=False, **record))
            # RFC 8693 section 2.2.2: an unacceptable subject_token is invalid_grant.
            return _json(
                request,
                400,
                {
                    "error": "invalid_grant",
                    "error_description": "subject token is a mandate, not a caller credential",
                },
            )
        except InvalidSubject:
            sts.exchange_log.append(ExchangeRecord(granted=False, **record))
            return _json(
                request,
                401,
                {"error": "invalid_token", "error_description": "subject token not valid"},
            )
        sts.exchange_log.append(ExchangeRecord(granted=True, **record))
        answer = sts.issue_mandate(
            claims, fields["zone_id"], fields["application_id"], fields["resource"]
        )
        return _json(request, 200, answer)

    def _jwks(self, request) -> bytes:
        self.sts.jwks_fetches += 1
        zone_id = _arg(request, "zone_id")
        if zone_id is None:
            return _json(request, 400, {"error": "invalid_request"})
        return _json(request, 200, self.sts.jwks(zone_id))

    def _mint(self, request) -> bytes:
        zone_id = _arg(request, "zone_id")
        use = _arg(request, "use") or "per_call"
        try:
            ttl = int(_arg(request, "ttl") or 300)
        except ValueError:
            ttl = -1
        if zone_id is None or not 0 < ttl <= MAX_MINT_TTL:
            return _json(request, 400, {"error": "invalid_request"})
        token = self.sts.mint(
            zone_id,
            _arg(request, "sub") or "dev-agent",
            use=use,
            ttl=ttl,
            session_id=_arg(request, "sid"),
        )
        return _json(request, 200, {"token": token})
