"""
A real MCP server for the integration tests: the official SDK's
C{MCPServer} over streamable HTTP (stateful: C{Mcp-Session-Id}, the standing
C{GET} stream, C{DELETE}), served by uvicorn on 127.0.0.1 in its own
process (the SDK is asyncio; the tests run on Twisted's reactor)::

    python tests/support/mcp_server.py PORT

Tools:
  - C{slow(seconds, steps)}: reports C{steps} progress notifications, one
    every C{seconds / steps}, then answers;
  - C{announce(delay)}: answers at once and, C{delay} seconds later, sends
    C{notifications/tools/list_changed} on the session's standing GET stream.

C{GET /stats} (outside the MCP endpoint) answers what the server saw: the
requests to C{/mcp} by method, and the distinct C{Authorization} values
(hashed) it received, so a test can tell one mandate per HTTP request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections import Counter

import uvicorn
from mcp.server import MCPServer
from mcp.server.mcpserver import Context

server = MCPServer("caracal-test-tools")

_background: set[asyncio.Task] = set()


@server.tool()
async def slow(seconds: float, steps: int, ctx: Context) -> str:
    """Take C{seconds}, reporting progress C{steps} times on the way."""
    for step in range(1, steps + 1):
        await asyncio.sleep(seconds / steps)
        await ctx.report_progress(step, steps, f"step {step}")
    return f"done after {steps} steps"


@server.tool()
async def announce(delay: float, ctx: Context) -> str:
    """Answer now; after C{delay} s tell the client the tool list changed."""
    session = ctx.session

    async def later() -> None:
        await asyncio.sleep(delay)
        await session.send_tool_list_changed()

    task = asyncio.get_running_loop().create_task(later())
    _background.add(task)
    task.add_done_callback(_background.discard)
    return "announced"


class Observed:
    """ASGI wrapper counting what reaches the MCP app and serving C{/stats}."""

    def __init__(self, app) -> None:
        self.app = app
        self.methods: Counter = Counter()
        self.credentials: set[str] = set()
        self.requests = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == "/stats":
            body = json.dumps(
                {
                    "methods": dict(self.methods),
                    "requests": self.requests,
                    "distinct_credentials": len(self.credentials),
                }
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return None
        self.methods[scope["method"]] += 1
        self.requests += 1
        for name, value in scope["headers"]:
            if name == b"authorization":
                self.credentials.add(hashlib.sha256(value).hexdigest())
        return await self.app(scope, receive, send)


def main(port: int) -> None:
    """Serve on 127.0.0.1:C{port} until killed."""
    app = Observed(server.streamable_http_app(streamable_http_path="/mcp"))
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
