"""
Server-side requests for tests that drive a resource or a forwarder without
a socket: a real L{twisted.web.server.Request} on a fake channel, and the
bytes it wrote.
"""

from __future__ import annotations

import io

from twisted.web import server
from twisted.web.test.requesthelper import DummyChannel


def client_request(method=b"GET", uri=b"/x?a=1", clientproto=b"HTTP/1.1") -> server.Request:
    """A real server Request on a fake channel, as the gateway's site makes them."""
    channel = DummyChannel()
    request = server.Request(channel, False)
    # Kept apart: the request forgets its channel once finished.
    request.test_transport = channel.transport
    request.method = method
    request.uri = uri
    request.path = uri.partition(b"?")[0]
    request.clientproto = clientproto
    request.content = io.BytesIO(b"")
    request.request_id = "req-1"
    request.log_fields = {}
    request.requestHeaders.setRawHeaders(b"host", [b"gateway.test"])
    return request


def written(request) -> bytes:
    """Every byte C{request} (from L{client_request}) wrote to its client."""
    return request.test_transport.written.getvalue()
