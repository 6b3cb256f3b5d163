# -*- test-case-name: tests.test_sse -*-
"""
Relaying a C{text/event-stream} response (SPEC 13): where its events end,
keep-alive comments between events, and ending it at an event boundary when
the gateway drains.

An event ends with a blank line; lines end with CRLF, LF or CR (the SSE
grammar allows all three, even mixed), and a chunk boundary may fall
anywhere, a CRLF split in two included. The gateway never writes inside an
upstream event: a keep-alive or a drained end comes only after a blank line.
"""

from __future__ import annotations

from collections.abc import Callable

#: The comment written into a silent stream (SSE clients ignore comments).
KEEPALIVE = b": keep-alive\n\n"

_CR = 0x0D
_LF = 0x0A

EVENT_STREAM = b"text/event-stream"


def is_event_stream(content_types: list[bytes] | None) -> bool:
    """Whether a response with these C{Content-Type} values is an event stream."""
    if not content_types:
        return False
    media = content_types[0].split(b";", 1)[0].strip().lower()
    return media == EVENT_STREAM


class EventBoundary:
    """
    Follows the bytes of one event stream as they are forwarded and tells
    whether they stop between two events.

    @ivar at_boundary: C{True} when everything forwarded so far ends with a
        blank line (or nothing was forwarded).
    """

    def __init__(self) -> None:
        self.at_boundary = True
        self._line_empty = True
        self._after_cr = False

    def feed(self, data: bytes) -> int | None:
        """
        Take the next forwarded bytes.

        @return: the offset in C{data} just past the first blank line that
            ends an event (its CRLF whole when both halves are in C{data}),
            or C{None} when no event ends in C{data}.
        """
        first = None
        for index, byte in enumerate(data):
            if byte == _LF and self._after_cr:
                # The second half of a CRLF: the line already ended.
                self._after_cr = False
                if first == index:
                    first = index + 1
                continue
            self._after_cr = byte == _CR
            if byte in (_CR, _LF):
                if self._line_empty:
                    if not self.at_boundary and first is None:
                        first = index + 1
                    self.at_boundary = True
                self._line_empty = True
            else:
                self._line_empty = False
                self.at_boundary = False
        return first

    def advance(self, data: bytes) -> None:
        """
        Take the next forwarded bytes when where an event ends in them does
        not matter (the usual case): the same state as L{feed}, computed
        from the line endings at their end only, so a large event costs
        no per-byte work.
        """
        content = data.rstrip(b"\r\n")
        if content:
            # The last content byte leaves a line under way, inside an event.
            self.at_boundary = False
            self._line_empty = False
            self._after_cr = False
        self.feed(data[len(content) :])


class EventStreamRelay:
    """
    Writes one upstream event stream to the client: each piece as it comes,
    a L{KEEPALIVE} after C{keepalive} seconds of silence when the stream
    stands between events, and, once L{end_at_boundary} was called, the end
    of the stream at the next event boundary.

    @param clock: an C{IReactorTime}.
    @param keepalive: seconds of silence before a keep-alive; C{0} for none.
    @param write: writes bytes to the client.
    """

    def __init__(self, clock, keepalive: float, write: Callable[[bytes], None]) -> None:
        self._clock = clock
        self._keepalive = keepalive
        self._write = write
        self.boundary = EventBoundary()
        self._timer = None
        self._ending: Callable[[], None] | None = None
        self.stopped = False
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._keepalive > 0 and not self.stopped:
            self._timer = self._clock.callLater(self._keepalive, self._silent)

    def _silent(self) -> None:
        self._timer = None
        if self.stopped:
            return
        if self.boundary.at_boundary:
            self._write(KEEPALIVE)
            self.boundary.feed(KEEPALIVE)
            self._arm()
        # Inside an event: wait; the rest of it re-arms the timer.

    def relay(self, data: bytes) -> None:
        """Forward C{data}, the next bytes of the upstream stream."""
        if self.stopped:
            return
        if self._ending is None:
            self._write(data)
            self.boundary.advance(data)
            self._arm()
            return
        end = self.boundary.feed(data)
        if end is None:
            self._write(data)
            self._arm()
            return
        self._write(data[:end])
        self._end()

    def end_at_boundary(self, ending: Callable[[], None]) -> None:
        """
        End the stream between two events: now when it stands between two,
        else just after the event under way. C{ending()} is then called
        once, the relay stopped; the caller closes the response.
        """
        if self.stopped or self._ending is not None:
            return
        self._ending = ending
        if self.boundary.at_boundary:
            self._end()

    def _end(self) -> None:
        ending, self._ending = self._ending, None
        self.stop()
        ending()

    def stop(self) -> None:
        """Write nothing more (the response ended one way or another)."""
        self.stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
