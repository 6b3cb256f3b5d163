# -*- test-case-name: tests.test_testing,tests.integration.test_contracts -*-
"""
What the request pipeline (L{caracal.gateway.proxy.Pipeline}) asks of each
collaborator, declared with C{zope.interface}.

Every interface here has a real implementation (Postgres, Redis, treq, an
L{Agent}) and an in-memory one in L{caracal.gateway.testing}; both provide
the interface (checked with C{verifyObject}) and pass the same contract test
suite, so a fake cannot drift from what it stands for.
"""

from __future__ import annotations

from zope.interface import Interface


class IResourceRegistry(Interface):
    """The resource table (SPEC section 4), answered from memory."""

    def get(identifier: str):
        """
        The L{caracal.gateway.registry.ToolResource} named C{identifier}, or
        C{None} if unknown. Synchronous: never waits for the database.
        """

    def count() -> int:
        """How many resources the snapshot holds."""

    def check():
        """
        Readiness: a Deferred firing C{None} when the backing store answers,
        failing with L{caracal.gateway.registry.ResourceStoreUnavailable}
        otherwise.
        """


class IKeySource(Interface):
    """The STS's ES256 verification keys, per zone (SPEC step 8)."""

    def key_for(zone_id: str, kid: str):
        """
        The public key C{kid} of zone C{zone_id}.

        @return: a Deferred firing with an C{EllipticCurvePublicKey}, or
            failing with L{caracal.gateway.jwks.UnknownKeyID} or
            L{caracal.gateway.jwks.JWKSUnavailable}.
        """


class IReplayGuard(Interface):
    """Records the first use of each single-use token (SPEC step 9)."""

    def claim(zone_id: str, jti: str, request_id: str, ttl_ms: int):
        """
        Claim C{jti} in C{zone_id} for C{ttl_ms} milliseconds.

        @return: a Deferred firing C{True} on first use, C{False} for a
            replay; failing with L{caracal.gateway.replay.ReplayKeyInvalid}
            for an unfit zone/jti, C{ValueError} for a non-positive
            C{ttl_ms}, L{caracal.gateway.replay.ReplayCheckUnavailable} when
            the check cannot be made.
        """


class IAuditLog(Interface):
    """Where security events go (SPEC section 12)."""

    def emit(event_type: str, request_id: str, decision: str, **metadata):
        """
        Record one event. The Deferred fires C{None} once the event is stored
        or the attempt failed (failures are logged); it never errbacks.
        Metadata must not contain tokens: pass fingerprints.
        """


class IRevocations(Interface):
    """The sessions revoked in the last 24 hours (SPEC step 10)."""

    def revoke(zone_id: str, session_id: str, revoked_at: float | None = None) -> None:
        """Revoke C{session_id} in C{zone_id} as of C{revoked_at} (now by default)."""

    def is_revoked(zone_id: str, session_id: str) -> bool:
        """Whether C{session_id} in C{zone_id} is revoked."""

    def watch(zone_id: str, session_id: str, callback):
        """
        Call C{callback()} once when the session gets revoked (at once if it
        already is); return a callable that cancels the watch.
        """

    def active() -> int:
        """How many revocations are held."""

    def unavailable():
        """
        Why a session not held cannot be said not revoked (the window is not
        loaded, or its follower lost contact with Redis more than 5 s ago:
        SPEC section 12), or C{None} while the state is current.
        """

    def check():
        """
        Readiness: a Deferred firing C{None} while the state is current,
        failing with L{caracal.gateway.revocations.RevocationStateUnavailable}
        otherwise.
        """


class ITokenExchange(Interface):
    """The STS's token exchange (SPEC step 11)."""

    def exchange(
        subject_token: str,
        zone_id: str,
        application_id: str,
        resource: str,
        request_id: str,
        traceparent: bytes | None = None,
    ):
        """
        Exchange the caller's bearer for a per-call mandate; C{traceparent}
        (tracing on) is sent along as the W3C trace context.

        @return: a Deferred firing with a L{caracal.gateway.sts.Mandate}, or
            failing with a L{caracal.gateway.denials.Denial}. Cancelling it
            drops the call.
        """


class IUpstreamGuard(Interface):
    """The SSRF rules and address pinning of SPEC section 7 (step 12)."""

    def check(url: str):
        """
        Apply every rule to C{url}, resolving its host at most once.

        @return: a Deferred firing with a
            L{caracal.gateway.upstream.PinnedUpstream}, or failing with
            L{caracal.gateway.upstream.UpstreamRefused}.
        """


class IForwarder(Interface):
    """Sends an accepted request upstream and relays the answer (step 13)."""

    def forward(
        request, pinned, credential_headers, token_expires_in, watch_revocation=None, timeout=None
    ):
        """
        Forward C{request} to the pinned upstream with C{credential_headers}
        and stream the answer into C{request}. C{timeout} bounds the wait for
        the response headers (the resource's C{upstream_timeout_ms});
        C{None} means C{UPSTREAM_TIMEOUT}.

        @return: a Deferred firing C{None} once the answer is written, cut
            or the client has gone; failing with a
            L{caracal.gateway.denials.Denial} only when no answer byte was
            written yet.
        """


class IMetrics(Interface):
    """
    The process's counters, gauges and latency histograms (the JSON counters
    of SPEC 10 and the Prometheus families of SPEC 15).
    """

    def increment(name: str, amount: int = 1, **labels) -> None:
        """Add C{amount} to counter C{name} (with C{labels} for a labelled family)."""

    def observe(name: str, seconds: float, **labels) -> None:
        """Record a latency in histogram C{name}."""

    def gauge(name: str, read) -> None:
        """Make gauge C{name} report C{read()}."""

    def add(name: str, delta: float) -> None:
        """Move a counted gauge (open connections, requests in flight) by C{delta}."""

    def request_done(status: int, resource, seconds: float, denial=None) -> None:
        """One request finished: its status, resource, duration and denial reason."""

    def exposition() -> tuple:
        """The Prometheus text exposition and its content type."""

    def snapshot() -> dict:
        """The JSON counters and gauges as one dict."""


class IRedisConnection(Interface):
    """
    The part of a txredisapi connection the revocation follower and the
    audit log use: raw commands on one connection.
    """

    def execute_command(*arguments):
        """Send one command; a Deferred firing with Redis's reply."""

    def disconnect():
        """Close the connection; a Deferred firing when it is closed."""


class IRequestScreen(Interface):
    """
    A resource that can judge a request on its headers alone (SPEC 12 H7):
    the HTTP layer (L{caracal.gateway.http.GatewayChannel}) asks it as soon
    as the headers are in and answers a refusal before reading the body.
    """

    def screen(request):
        """
        Run the checks that need only C{request}'s method, target and
        headers, synchronously, in SPEC order.

        @return: the L{caracal.gateway.denials.Denial} of the first failing
            check (not answered, not counted: the caller does both), or
            C{None} when the request may be read and rendered.
        """
