# -*- test-case-name: tests.test_callevents -*-
"""
The C{gateway_call} audit event (SPEC section 14): exactly one per proxied
call whose resource is known (it reached step 6 of SPEC section 6), written
once the call is decided and, when forwarded, once its response has ended.

The pipeline calls L{watch_call} as soon as the resource is known; the
event is emitted when the request's C{notifyFinish} fires: a callback once
the response was finished (a refusal, a forwarded answer, a stream ended
with the revocation trailer), an errback when the connection was lost
first (the client left, or the gateway cut the response). So it never
delays the response: the answer is on its way before the event is built,
and the C{XADD} is not waited for.

C{decision} and C{reason}:

 - a refusal of the gateway: C{deny} and the SPEC's error code (an upstream
   that failed before answering, C{upstream_unreachable} /
   C{upstream_timeout}, is C{allow}: the gateway let the call through);
 - a response cut while it streamed: C{allow} and C{revoked_mid_stream},
   C{upstream_cut} (the upstream broke off) or C{drained} (shutdown);
 - the client gone before the response ended: C{client_gone}, C{allow}
   when the call had been forwarded, else C{deny};
 - a response that ended normally: C{allow}, no reason.

Never a token (its fingerprint), never a query string (C{path} is the path
alone), never the body: for MCP only the JSON-RPC method and target
(L{caracal.gateway.mcp}).
"""

from __future__ import annotations

from twisted.logger import Logger

from caracal.gateway import tokens
from caracal.gateway.logs import STATUS_NO_RESPONSE
from caracal.gateway.mcp import operation_of

CALL_EVENT = "gateway_call"

#: The forwarder's C{upstream_cut} log values, as event reasons.
CUT_REASONS = {
    "session_revoked": "revoked_mid_stream",
    "upstream_error": "upstream_cut",
    "drained": "drained",
}

#: Claims copied into the event are cut to this many characters.
MAX_CLAIM_CHARS = 256

_log = Logger()


def _text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("ascii", "backslashreplace")
    return str(value)


def _claim(claims: dict, name: str) -> str | None:
    value = claims.get(name) if isinstance(claims, dict) else None
    return value[:MAX_CLAIM_CHARS] if isinstance(value, str) else None


def _session(claims) -> str | None:
    session = tokens.session_id(claims) if isinstance(claims, dict) else None
    return session[:MAX_CLAIM_CHARS] if session else None


def _bytes_in(request) -> int | None:
    received = getattr(request, "body_bytes", None)
    if isinstance(received, int):
        return received
    content = getattr(request, "content", None)
    try:
        position = content.tell()
        content.seek(0, 2)
        size = content.tell()
        content.seek(position)
        return size
    except (AttributeError, OSError, ValueError):
        return None


def decide(call, gone: bool) -> tuple[str, str | None]:
    """The C{decision} and C{reason} of C{call} (see the module docstring)."""
    fields = getattr(call.request, "log_fields", None) or {}
    cut = fields.get("upstream_cut")
    if cut:
        return "allow", CUT_REASONS.get(cut, cut)
    denial = call.denial
    if denial is not None:
        return ("allow" if denial.metric == "upstream_errors" else "deny"), denial.code
    if gone:
        return ("allow" if call.forwarded else "deny"), "client_gone"
    return "allow", None


def call_event(call, gone: bool, now: float, began: float) -> tuple[str, dict]:
    """
    The decision and the metadata of C{call}'s C{gateway_call} event.

    @param gone: the connection was lost before the response ended.
    @param began: when the call began, if the request does not say.
    """
    request = call.request
    decision, reason = decide(call, gone)
    fields = getattr(request, "log_fields", None) or {}
    resource = call.resource
    started = getattr(request, "started_at", None)
    if not isinstance(started, (int, float)):
        started = began
    status = request.code
    if gone and not getattr(request, "startedWriting", False):
        status = STATUS_NO_RESPONSE
    metadata = {
        "reason": reason,
        "zone_id": resource.zone_id,
        "application_id": resource.application_id,
        "resource": resource.resource_identifier,
        "method": _text(request.method),
        "path": _text(request.path),
        "status": status,
        "upstream_host": fields.get("upstream_host"),
        "sts_ms": fields.get("sts_ms"),
        "upstream_ms": fields.get("upstream_ms"),
        "duration_ms": round(max(0.0, now - started) * 1000.0, 3),
        "bytes_in": _bytes_in(request),
        "bytes_out": getattr(request, "sentLength", None),
        "sub": _claim(call.claims, "sub"),
        "sid": _session(call.claims),
        "token_fingerprint": fields.get("token_fingerprint") or tokens.fingerprint(call.token),
    }
    if call.mcp is not None:
        metadata["mcp_method"] = call.mcp.method
        if call.mcp.target is not None:
            metadata["mcp_target"] = call.mcp.target
    return decision, metadata


def read_operation(call):
    """
    Note the MCP operation of C{call}'s body (L{caracal.gateway.mcp}) for
    its event. Run once the whole body is in (the body file is rewound);
    returns C{call}, to sit in the pipeline's chain.
    """
    call.mcp = operation_of(call.request)
    return call


def watch_call(call, audit, clock) -> None:
    """
    Arrange for C{call}'s one C{gateway_call} event on C{audit} (an
    L{caracal.gateway.audit.IAuditLog}) when its request ends. Needs only
    the headers; L{read_operation} adds the MCP fields once the body is in.
    """
    request = call.request
    began = clock.seconds()
    emitted = []

    def ended(_, gone: bool) -> None:
        if emitted:
            return
        emitted.append(True)
        try:
            decision, metadata = call_event(call, gone, clock.seconds(), began)
            audit.emit(CALL_EVENT, request.request_id, decision, **metadata)
        except Exception:
            _log.failure(
                "gateway_call event for request {request_id} not built",
                request_id=request.request_id,
            )

    if getattr(request, "_disconnected", False):
        ended(None, True)
        return
    request.notifyFinish().addCallbacks(ended, ended, callbackArgs=(False,), errbackArgs=(True,))
