# -*- test-case-name: tests.test_ids -*-
"""
Random UUID4 strings for request ids (SPEC step 0) and audit entry ids
(SPEC section 9), and the random trace context ids sent upstream, drawn on
every request.

C{str(uuid.uuid4())} costs a C{getrandom} system call, a L{uuid.UUID} object
and its formatting for each id. Here the operating system's random bytes
(C{os.urandom}, as C{uuid4} uses) are drawn a few kilobytes at a time and
formatted directly: the same RFC 9562 version 4 ids, from the same source,
at a fraction of the cost. A forked child starts with a fresh buffer, so no
two processes ever hand out ids from the same bytes.
"""

from __future__ import annotations

import os

# 256 ids per draw.
_DRAW = 4096

_pool = b""
_offset = _DRAW

# The variant bits (10xx) of the clock_seq_hi byte, indexed by its first hex digit.
_VARIANT = "89ab89ab89ab89ab"


def _forget() -> None:
    global _pool, _offset
    _pool, _offset = b"", _DRAW


os.register_at_fork(after_in_child=_forget)


def random_hex(size: int) -> str:
    """C{size} random bytes (at most 64) from the operating system's source, in hex."""
    global _pool, _offset
    offset = _offset
    if offset + size > _DRAW:
        _pool = os.urandom(_DRAW)
        offset = 0
    _offset = offset + size
    return _pool[offset : offset + size].hex()


def uuid4() -> str:
    """A new random UUID (version 4, RFC 9562 variant) in its canonical text form."""
    h = random_hex(16)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16)]}{h[17:20]}-{h[20:]}"
