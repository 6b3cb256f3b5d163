"""
Reading raw HTTP/1.1 responses as a client sees them on the wire, for tests
that talk to the gateway through a L{StringTransport} or a raw socket.
"""

from __future__ import annotations

from typing import NamedTuple


class RawResponse(NamedTuple):
    """One response: status, headers and trailers by lowercase name, and the body."""

    status: int
    headers: dict[bytes, list[bytes]]
    body: bytes
    trailers: dict[bytes, bytes]


def _chunked(rest: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """A chunked body: (body, trailers, what follows it)."""
    body = b""
    trailers: dict[bytes, bytes] = {}
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            # Trailer lines, up to the empty line that ends the message.
            while True:
                line, _, rest = rest.partition(b"\r\n")
                if not line:
                    return body, trailers, rest
                name, _, value = line.partition(b":")
                trailers[name.strip().lower()] = value.strip()
        body += rest[:size]
        rest = rest[size + 2 :]


def parse_responses(data: bytes) -> list[RawResponse]:
    """
    Split the bytes a server sent into responses. A body is framed by its
    C{Content-Length}, by chunking (trailers kept), or else runs to the end.
    """
    responses = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        trailers: dict[bytes, bytes] = {}
        if headers.get(b"transfer-encoding") == [b"chunked"]:
            body, trailers, data = _chunked(rest)
        elif b"content-length" in headers:
            length = int(headers[b"content-length"][0])
            body, data = rest[:length], rest[length:]
        else:
            body, data = rest, b""
        responses.append(RawResponse(status, headers, body, trailers))
    return responses


def parse_response(data: bytes) -> RawResponse:
    """The first response in C{data}."""
    return parse_responses(data)[0]
