# -*- test-case-name: tests.test_callevents -*-
"""
Which MCP operation a request is (SPEC section 14, "Which tool"): every MCP
call is C{POST /mcp}, so the audit event names what was done from the
JSON-RPC 2.0 body: C{mcp_method} and, for C{tools/call}, C{prompts/get} and
C{resources/read}, C{mcp_target} (C{params.name}, or C{params.uri} for a
resource). Never the arguments.

Reading the body only looks: it is read from the request's spooled body
(at most L{MAX_BODY_BYTES}, whatever its size) and the file is rewound, so
the body is forwarded byte for byte. Anything that is not a single JSON-RPC
2.0 request object (a batch, malformed JSON, another content type, an
oversized body) gives nothing, never an error.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

#: Bodies larger than this are not inspected (SPEC 14: at most 1 MiB).
MAX_BODY_BYTES = 1024 * 1024

#: The longest C{mcp_method} / C{mcp_target} recorded; longer ones are cut.
MAX_NAME_CHARS = 256

#: The methods whose target is recorded, and the parameter naming it.
TARGETS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


@dataclass(frozen=True)
class MCPOperation:
    """What a JSON-RPC request asks for: its method and, for some, the target."""

    method: str
    target: str | None = None


def _is_json(headers) -> bool:
    values = headers.getRawHeaders(b"content-type") or []
    if len(values) != 1:
        return False
    media_type = values[0].split(b";", 1)[0].strip().lower()
    return media_type == b"application/json"


def _read_body(content) -> bytes | None:
    """The whole body when it is at most L{MAX_BODY_BYTES}, the file rewound."""
    if content is None:
        return None
    try:
        content.seek(0, os.SEEK_END)
        length = content.tell()
        if length == 0 or length > MAX_BODY_BYTES:
            return None
        content.seek(0)
        return content.read(MAX_BODY_BYTES + 1)
    except (OSError, ValueError):  # a closed file
        return None
    finally:
        with contextlib.suppress(OSError, ValueError):
            content.seek(0)


def parse_operation(body: bytes) -> MCPOperation | None:
    """The operation of a JSON-RPC 2.0 request body, or C{None}."""
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return None
    method = message.get("method")
    if not isinstance(method, str) or not method:
        return None
    target = None
    parameter = TARGETS.get(method)
    params = message.get("params")
    if parameter is not None and isinstance(params, dict):
        value = params.get(parameter)
        if isinstance(value, str):
            target = value[:MAX_NAME_CHARS]
    return MCPOperation(method=method[:MAX_NAME_CHARS], target=target)


def operation_of(request) -> MCPOperation | None:
    """
    The MCP operation C{request} carries (C{Content-Type: application/json}
    and a JSON-RPC 2.0 request object of at most 1 MiB), or C{None}.
    """
    if not _is_json(request.requestHeaders):
        return None
    body = _read_body(getattr(request, "content", None))
    if body is None:
        return None
    return parse_operation(body)
