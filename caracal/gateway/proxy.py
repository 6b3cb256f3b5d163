# -*- test-case-name: tests.test_pipeline -*-
"""
The request pipeline of SPEC section 6, in one place.

L{GatewayResource.render} builds one deferred chain whose callbacks are the
SPEC's steps, in the SPEC's order. Each step either returns (the chain goes
on) or raises one L{Denial}; L{GatewayResource._deny} is the single errback
that turns a Denial into the status, error body, metric and log fields. The
first failing step answers and nothing after it runs: no STS call and no
upstream contact for a refused request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from caracal.gateway import cors, tokens
from caracal.gateway.audit import ReplayEventThrottle
from caracal.gateway.callevents import read_operation, watch_call
from caracal.gateway.denials import Denial, denial_body, error_body
from caracal.gateway.forward import MissingProviderToken, credential_headers
from caracal.gateway.interfaces import (
    IAuditLog,
    IForwarder,
    IKeySource,
    IMetrics,
    IReplayGuard,
    IRequestScreen,
    IResourceRegistry,
    IRevocations,
    ITokenExchange,
    IUpstreamGuard,
)
from caracal.gateway.mcp import MCPOperation
from caracal.gateway.registry import ToolResource
from caracal.gateway.replay import ReplayCheckUnavailable, ReplayKeyInvalid
from caracal.gateway.sts import Mandate
from caracal.gateway.upstream import PinnedUpstream, UpstreamRefused, path_problem

log = Logger(namespace="caracal.pipeline")

RESOURCE_HEADER = b"x-caracal-resource"
CLIENT_ID_HEADER = b"x-caracal-client-id"
REPLAY_EVENT = "replay_detected"

#: The methods the gateway forwards (SPEC 12 H2); any other is refused with 405.
PROXIED_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS")
#: The methods of the local endpoints (SPEC 10).
LOCAL_METHODS = (b"GET", b"HEAD")


def method_not_allowed(request, allowed: tuple[bytes, ...]) -> Denial:
    """
    The 405 for a method outside C{allowed} (SPEC 12 H2, SPEC 10), its
    C{Allow} header set on C{request}'s response.
    """
    allow = b", ".join(allowed)
    request.responseHeaders.setRawHeaders(b"allow", [allow])
    return Denial(405, "method_not_allowed", "use " + allow.decode("ascii"))


@dataclass
class Call:
    """What the pipeline has learnt about one request so far."""

    request: IRequest
    token: str = field(default="", repr=False)
    parsed: tokens.ParsedToken | None = field(default=None, repr=False)
    claims: dict = field(default_factory=dict, repr=False)
    seconds_left: float = 0.0
    resource: ToolResource | None = None
    mandate: Mandate | None = field(default=None, repr=False)
    pinned: PinnedUpstream | None = None
    #: The refusal answered, for the audit event (SPEC 14).
    denial: Denial | None = None
    #: Step 13 was reached: the call went to the upstream.
    forwarded: bool = False
    #: The MCP operation of the body (L{caracal.gateway.mcp}), or None.
    mcp: MCPOperation | None = None
    #: The request's server span when tracing is on (L{caracal.gateway.tracing}).
    span: Any = None

    @property
    def zone_id(self) -> str:
        return self.resource.zone_id

    @property
    def session_id(self) -> str | None:
        return tokens.session_id(self.claims)


@dataclass
class Pipeline:
    """
    Everything the steps talk to. Each collaborator provides an interface of
    L{caracal.gateway.interfaces}, with a real implementation (Postgres,
    Redis, treq, an Agent) and an in-memory one in L{caracal.gateway.testing}.
    """

    resources: IResourceRegistry
    jwks: IKeySource
    replay: IReplayGuard
    audit: IAuditLog
    revocations: IRevocations
    sts: ITokenExchange
    guard: IUpstreamGuard
    forwarder: IForwarder
    metrics: IMetrics
    clock: IReactorTime
    jti_fail_open: bool = False
    revocation_fail_open: bool = False
    max_token_lifetime: float = tokens.MAX_TOKEN_LIFETIME
    #: Verified signatures of reusable tokens (step 8 skips ES256 for them).
    signatures: tokens.SignatureCache = field(default_factory=tokens.SignatureCache)
    #: SPEC 12 H9: which replays are audited (L{ReplayEventThrottle}).
    replay_events: ReplayEventThrottle | None = None
    #: A L{caracal.gateway.tracing.Tracing}, or C{None} when tracing is off.
    tracing: Any = None


@implementer(IRequestScreen)
class GatewayResource(ReverseProxyResource):
    """
    The proxied part of the gateway. A L{ReverseProxyResource} whose upstream
    is chosen per request (from the resource table) and reached only after
    every guard of SPEC section 6 has passed.
    """

    isLeaf = True

    def __init__(self, pipeline: Pipeline) -> None:
        # The stock host/port/path are unused: the upstream comes from Postgres.
        ReverseProxyResource.__init__(self, "", 0, b"")
        self.pipeline = pipeline
        if pipeline.replay_events is None:
            pipeline.replay_events = ReplayEventThrottle(pipeline.clock, pipeline.metrics)
        self._steps = self._make_steps()

    def getChild(self, path, request):
        return self

    def screen(self, request) -> Denial | None:
        """
        The checks that need only the headers, run synchronously in SPEC
        order: the method (H2), then steps 2 to 7. The L{Call} they fill is
        kept on C{request} (C{gateway_call}) for L{render} to go on from.

        @return: the L{Denial} of the first failing check, or C{None}. The
            caller answers it (the HTTP layer at once, without reading the
            body; L{render} through its errback).
        """
        call = Call(request)
        request.gateway_call = call
        tracing = self.pipeline.tracing
        if tracing is not None:
            # The span covers the whole request, refused here or later.
            call.span = tracing.start_request(request)
            request.notifyFinish().addBoth(
                lambda _: tracing.end_request(call.span, request, call.resource)
            )
        try:
            self._check_method(call)  # SPEC 12 H2
            self._authenticate(call)  # steps 2-4
            self._route(call)  # steps 5-7
        except Denial as denial:
            call.denial = denial
            return denial
        return None

    def render(self, request):
        self.pipeline.metrics.increment("requests_total")
        call = getattr(request, "gateway_call", None)
        if call is None:
            self.screen(request)
            call = request.gateway_call
        run = _Run(self, call)
        # A client that leaves cancels the chain: the call in flight (JWKS
        # fetch, Redis claim, STS exchange, DNS lookup, upstream request) is
        # dropped and no later step runs.
        request.notifyFinish().addErrback(run.cancel)
        # Steps 2-7 ran in screen, as soon as the headers were in.
        if call.denial is not None:
            run.failed(Failure(call.denial))
        else:
            run.resume(call, 0)
        return NOT_DONE_YET

    def _make_steps(self) -> tuple:
        """The steps after the body is in, in SPEC order (see L{_Run}); made once."""
        return (
            read_operation,  # SPEC 14: the MCP method and target (the body is in)
            self._verify_signature,  # step 8
            self._guard_replay,  # step 9
            self._check_session,  # step 10
            self._exchange,  # step 11
            self._guard_upstream,  # step 12
            self._forward,  # step 13
        )

    # SPEC 12 H2: only the methods a tool call uses, before authentication.
    def _check_method(self, call: Call) -> Call:
        if call.request.method not in PROXIED_METHODS:
            raise method_not_allowed(call.request, PROXIED_METHODS)
        return call

    # Steps 2 to 4: a bearer JWT that is not about to expire, not a mandate.
    def _authenticate(self, call: Call) -> Call:
        call.token = tokens.extract_bearer(call.request.requestHeaders)
        call.request.log_fields["token_fingerprint"] = tokens.fingerprint(call.token)
        call.parsed = tokens.peek(call.token)
        call.claims = call.parsed.claims
        call.seconds_left = tokens.seconds_left(
            call.claims, self.pipeline.clock.seconds(), self.pipeline.max_token_lifetime
        )
        return call

    # Steps 5 to 7: which resource, and a path that cannot climb out of it.
    def _route(self, call: Call) -> Call:
        headers = call.request.requestHeaders
        if headers.hasHeader(CLIENT_ID_HEADER):
            raise Denial(
                400,
                "invalid_request",
                "X-Caracal-Client-ID must not be sent by the caller",
                metric="denials_bad_routing",
            )
        identifiers = headers.getRawHeaders(RESOURCE_HEADER) or []
        if len(identifiers) != 1 or not identifiers[0].strip():
            raise Denial(
                400,
                "invalid_request",
                "exactly one X-Caracal-Resource header is required",
                metric="denials_bad_routing",
            )
        identifier = identifiers[0].strip().decode("utf-8", "replace")
        call.request.log_fields["resource"] = identifier
        call.resource = self.pipeline.resources.get(identifier)
        if call.resource is None:
            raise Denial(403, "access_denied", "no such resource", metric="denials_binding")
        # From here on the call leaves one gateway_call event (SPEC 14).
        watch_call(call, self.pipeline.audit, self.pipeline.clock)
        call.request.log_fields["zone"] = call.resource.zone_id
        call.request.log_fields["application"] = call.resource.application_id
        problem = path_problem(call.request.path)
        if problem is not None:
            raise Denial(
                400,
                "invalid_request",
                problem,
                metric="denials_path_traversal",
                reason="path_traversal",
            )
        return call

    def _verify(self, call: Call) -> defer.Deferred:
        return tokens.verify_token(
            call.token,
            call.zone_id,
            self.pipeline.jwks,
            parsed=call.parsed,
            signatures=self.pipeline.signatures,
        )

    # Step 8: an ES256 signature from the resource's zone.
    def _verify_signature(self, call: Call) -> Call | defer.Deferred:
        tracing = self.pipeline.tracing
        if tracing is None:
            # With the zone's keys at hand (the usual case) the check needs
            # no Deferred; otherwise the JWKS lookup may fetch.
            claims = tokens.verify_now(
                call.token,
                call.zone_id,
                self.pipeline.jwks,
                call.parsed,
                self.pipeline.signatures,
            )
            if claims is not tokens.NOT_AT_HAND:
                call.claims = claims
                return call
            d = self._verify(call)
        else:
            # A JWKS fetch this lookup starts is a child of the request's span.
            with tracing.current(call.span):
                d = self._verify(call)

        def verified(claims):
            call.claims = claims
            return call

        return d.addCallback(verified)

    # Step 9: single-use tokens are used once, across every replica.
    def _guard_replay(self, call: Call):
        jti = tokens.replay_jti(call.claims)
        if jti is None:
            return call
        request_id = call.request.request_id
        ttl_ms = max(1, int(call.seconds_left * 1000))
        d = self.pipeline.replay.claim(call.zone_id, jti, request_id, ttl_ms)
        tracing = self.pipeline.tracing
        if tracing is not None:
            span = tracing.start_client(
                "redis SET",
                call.span,
                {"db.system": "redis", "db.operation.name": "SET", "caracal.zone": call.zone_id},
            )
            d = tracing.traced(d, span)

        def claimed(first_use):
            if first_use:
                return call
            fingerprint = tokens.fingerprint(call.token)
            suppressed = self.pipeline.replay_events.admit(fingerprint)
            if suppressed is not None:
                self.pipeline.audit.emit(
                    REPLAY_EVENT,
                    request_id,
                    "deny",
                    zone_id=call.zone_id,
                    resource=call.resource.resource_identifier,
                    token_fingerprint=fingerprint,
                    suppressed=suppressed,
                )
            raise Denial(
                401,
                "invalid_token",
                "token already used",
                metric="denials_jti_replay",
                reason="replay_detected",
            )

        def unavailable(failure):
            if failure.check(ReplayKeyInvalid):
                raise Denial(401, "invalid_token", "unusable jti", metric="denials_bad_bearer")
            failure.trap(ReplayCheckUnavailable)
            if self.pipeline.jti_fail_open:
                log.warn(
                    "replay check skipped: Redis unavailable and JTI_FAIL_OPEN=true"
                    " (request {request_id})",
                    request_id=request_id,
                )
                call.request.log_fields["replay_check"] = "skipped"
                return call
            raise Denial(503, "replay_check_unavailable", "the replay check is unavailable")

        return d.addCallbacks(claimed, unavailable)

    # Step 10: the caller's session has not been revoked. Only a current
    # revocation state can tell (SPEC 12): while it is not, fail closed.
    def _check_session(self, call: Call) -> Call:
        session = call.session_id
        if not session:
            return call
        revocations = self.pipeline.revocations
        stale = revocations.unavailable()
        if stale is not None:
            call.request.log_fields["revocation_state"] = stale
            if not self.pipeline.revocation_fail_open:
                raise Denial(
                    503,
                    "revocation_state_unavailable",
                    "the revocation state is unavailable",
                )
            log.warn(
                "revocation state not current ({reason}) and REVOCATION_FAIL_OPEN=true:"
                " session checked against the revocations loaded (request {request_id})",
                reason=stale,
                request_id=call.request.request_id,
            )
        if revocations.is_revoked(call.zone_id, session):
            raise Denial(401, "session_revoked", "the session is revoked", metric="denials_revoked")
        return call

    # Step 11: the per-call mandate from the STS.
    def _exchange(self, call: Call) -> defer.Deferred:
        started = self.pipeline.clock.seconds()
        resource = call.resource
        tracing = self.pipeline.tracing
        traced = {}
        if tracing is not None:
            span = tracing.start_client("sts exchange", call.span, {"caracal.zone": call.zone_id})
            # The STS sees its own span as the caller (its spans nest under it).
            traced["traceparent"] = tracing.traceparent(span)
        d = self.pipeline.sts.exchange(
            call.token,
            resource.zone_id,
            resource.application_id,
            resource.resource_identifier,
            call.request.request_id,
            **traced,
        )
        if tracing is not None:
            d = tracing.traced(d, span)

        def exchanged(mandate):
            elapsed = self.pipeline.clock.seconds() - started
            call.request.log_fields["sts_ms"] = round(elapsed * 1000, 1)
            self.pipeline.metrics.observe("sts_exchange_duration_seconds", elapsed)
            call.mandate = mandate
            return call

        return d.addCallback(exchanged)

    # Step 12: the upstream URL passes the SSRF rules; the address is pinned.
    def _guard_upstream(self, call: Call) -> defer.Deferred:
        d = self.pipeline.guard.check(call.resource.upstream_url)

        def pinned(upstream):
            call.pinned = upstream
            call.request.log_fields["upstream_host"] = upstream.url.host
            return call

        def refused(failure):
            failure.trap(UpstreamRefused)
            call.request.log_fields["upstream_refused"] = failure.value.reason
            raise Denial(
                403,
                "access_denied",
                "the resource's upstream is not allowed",
                metric="denials_binding",
                reason="upstream_refused",
            )

        return d.addCallbacks(pinned, refused)

    # Step 13: forward with the mandate, streaming the answer.
    def _forward(self, call: Call) -> defer.Deferred:
        try:
            credentials = credential_headers(call.resource, call.mandate)
        except MissingProviderToken:
            raise Denial(
                502,
                "sts_unavailable",
                "the STS returned no provider token for a provider-auth resource",
                metric="sts_exchange_errors",
            ) from None
        self.pipeline.metrics.increment("requests_allowed")
        call.forwarded = True
        watch = None
        session = call.session_id
        if session:
            revocations, zone = self.pipeline.revocations, call.zone_id

            def watch(cut):
                return revocations.watch(zone, session, cut)

        # Time left now, not at step 4: the JWKS and STS calls took some of it.
        seconds_left = call.claims["exp"] - self.pipeline.clock.seconds()
        tracing = self.pipeline.tracing
        span = None
        if tracing is not None:
            method = call.request.method.decode("ascii", "replace")
            span = tracing.start_client(
                f"upstream {method}",
                call.span,
                {"http.request.method": method, "server.address": call.pinned.url.host},
            )
            # The upstream gets the traceparent of its own span, replacing the
            # caller's (whose trace the span continues); the forwarder's
            # replace-by-name headers carry it like the credential.
            credentials = [*credentials, (b"traceparent", tracing.traceparent(span))]
        d = self.pipeline.forwarder.forward(
            call.request,
            call.pinned,
            credentials,
            seconds_left,
            watch,
            call.resource.upstream_timeout,
        )
        if span is None:
            return d

        def answered(result):
            # Forwarded: the status is the upstream's (a failure has none).
            code = getattr(call.request, "code", None)
            if isinstance(code, int):
                span.set_attribute("http.response.status_code", code)
            return result

        return tracing.traced(d.addCallback(answered), span)

    def _deny(self, failure, call: Call) -> None:
        failure.trap(Denial, defer.CancelledError)
        if failure.check(defer.CancelledError):
            # The client left: there is nobody to answer.
            return
        denial = failure.value
        request = call.request
        call.denial = denial
        request.log_fields["denial"] = denial.reason
        if denial.metric:
            self.pipeline.metrics.increment(denial.metric)
        if denial.metric not in ("upstream_errors",):
            self.pipeline.metrics.increment("requests_denied")
        if request.startedWriting:
            # The answer had begun; all we can do is cut it.
            request.loseConnection()
            return
        request.write(denial_body(request, denial))
        request.finish()

    def _fail(self, failure, call: Call) -> None:
        log.failure(
            "pipeline error (request {request_id})",
            failure,
            request_id=call.request.request_id,
        )
        request = call.request
        request.log_fields["denial"] = "internal_error"
        call.denial = Denial(500, "internal_error", "internal error")
        if request.startedWriting:
            request.loseConnection()
            return
        request.write(error_body(request, 500, "internal_error", "internal error"))
        request.finish()


class _Run:
    """
    One request's way through the steps of L{GatewayResource._steps}. Each
    step gets what the previous one returned; a step that answers at once
    returns its value and the next step runs in the same call, one that must
    wait returns a L{Deferred} and the next step runs when it fires. So the
    chain costs a Deferred only where something is awaited (Redis, the STS,
    a DNS lookup, the upstream), not one per step.

    The first step that raises, or whose Deferred fails, ends the run: the
    failure goes to L{GatewayResource._deny} and, if that cannot answer it,
    to L{GatewayResource._fail}, as the errbacks of a single chain would.
    L{cancel} cancels the Deferred being awaited, like cancelling that chain.
    """

    __slots__ = ("_resource", "_call", "_steps", "_pending")

    def __init__(self, resource: GatewayResource, call: Call) -> None:
        self._resource = resource
        self._call = call
        self._steps = resource._steps
        self._pending: defer.Deferred | None = None

    def resume(self, result, index: int) -> None:
        """Run the steps from C{index} on, C{result} the previous step's value."""
        self._pending = None
        steps = self._steps
        while index < len(steps):
            try:
                result = steps[index](result)
            except BaseException:
                self.failed(Failure())
                return
            index += 1
            if isinstance(result, defer.Deferred):
                self._pending = result
                result.addCallbacks(self.resume, self.failed, callbackArgs=(index,))
                return

    def failed(self, failure: Failure) -> None:
        """A step failed: answer it (the errbacks of the chain)."""
        self._pending = None
        resource, call = self._resource, self._call
        try:
            resource._deny(failure, call)
        except BaseException:
            try:
                resource._fail(Failure(), call)
            except BaseException:
                log.failure("answering a pipeline error failed", Failure())

    def cancel(self, _reason=None) -> None:
        """The client left: cancel what the run is waiting for, if anything."""
        pending = self._pending
        if pending is not None:
            pending.cancel()


@implementer(IRequestScreen)
class GatewayRoot(Resource):
    """
    The site's root: CORS preflights (SPEC 13), the local endpoints of SPEC
    section 10 by exact path, every other request to the pipeline.
    """

    isLeaf = True

    def __init__(
        self,
        proxy: Resource,
        local: dict[bytes, Resource],
        cors_allowed_origins: frozenset[str] = frozenset(),
    ) -> None:
        Resource.__init__(self)
        self.proxy = proxy
        self.local = local
        self.cors_allowed_origins = cors_allowed_origins

    def screen(self, request) -> Denial | None:
        """
        The header-only checks for C{request} (see L{GatewayResource.screen}):
        for a CORS preflight none (it carries no token; L{render} answers
        it), for a local path its method, else the pipeline's.
        """
        if cors.is_preflight(request, self.cors_allowed_origins):
            return None
        if request.path in self.local:
            request.local = True
            if request.method in LOCAL_METHODS:
                return None
            return self._local_method_denial(request)
        screener = IRequestScreen(self.proxy, None)
        return screener.screen(request) if screener is not None else None

    def _local_method_denial(self, request) -> Denial:
        # The local paths are never proxied, whatever the method.
        return method_not_allowed(request, LOCAL_METHODS)

    def render(self, request):
        # A CORS preflight carries no token: the gateway answers it itself.
        if cors.is_preflight(request, self.cors_allowed_origins):
            return cors.answer_preflight(request, self.cors_allowed_origins)
        endpoint = self.local.get(request.path)
        if endpoint is None:
            return self.proxy.render(request)
        request.local = True
        if request.method in LOCAL_METHODS:
            return endpoint.render(request)
        denial = self._local_method_denial(request)
        request.log_fields["denial"] = denial.reason
        return denial_body(request, denial)
