# -*- test-case-name: tests.test_sse -*-
"""
Event boundaries, keep-alives and the drained end of an event stream
(SPEC 13), on a clock.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway.sse import KEEPALIVE, EventBoundary, EventStreamRelay, is_event_stream


class IsEventStreamTests(SynchronousTestCase):
    """Which responses are event streams."""

    def test_media_type(self):
        """The media type decides, parameters and case aside."""
        self.assertTrue(is_event_stream([b"text/event-stream"]))
        self.assertTrue(is_event_stream([b"Text/Event-Stream; charset=utf-8"]))
        self.assertFalse(is_event_stream([b"application/json"]))
        self.assertFalse(is_event_stream([b"text/event-streams"]))
        self.assertFalse(is_event_stream(None))


class EventBoundaryTests(SynchronousTestCase):
    """Where events end, for every line ending and every split."""

    def test_nothing_forwarded_is_a_boundary(self):
        """Before the first byte the stream stands between events."""
        self.assertTrue(EventBoundary().at_boundary)

    def test_line_endings(self):
        """LF LF, CRLF CRLF, CR CR and mixed forms end an event; one line ending does not."""
        for event in [
            b"data: x\n\n",
            b"data: x\r\n\r\n",
            b"data: x\r\r",
            b"data: x\r\n\n",
            b"data: x\n\r\n",
            b"event: a\ndata: x\r\nid: 1\r\r",
        ]:
            boundary = EventBoundary()
            self.assertEqual(boundary.feed(event), len(event), event)
            self.assertTrue(boundary.at_boundary, event)
        for partial in [b"data: x", b"data: x\n", b"data: x\r\n", b"data: x\r", b"a\n\nb"]:
            boundary = EventBoundary()
            boundary.feed(partial)
            self.assertFalse(boundary.at_boundary, partial)

    def test_every_split(self):
        """Fed in two pieces split anywhere, each of two events is seen ending once."""
        for stream in [b"data: a\r\n\r\ndata: b\r\n\r\n", b"data: a\n\ndata: b\n\n", b"a\r\rb\r\r"]:
            for cut in range(len(stream) + 1):
                boundary = EventBoundary()
                ends = []
                for offset, piece in ((0, stream[:cut]), (cut, stream[cut:])):
                    end = boundary.feed(piece)
                    if end is not None:
                        ends.append(offset + end)
                    # Past each event's end, feed the rest to find the next.
                    while end is not None and end < len(piece):
                        rest = piece[end:]
                        offset, piece = offset + end, rest
                        end = boundary.feed(piece)
                        if end is not None:
                            ends.append(offset + end)
                self.assertTrue(boundary.at_boundary, (stream, cut))
                # Two events, the second ending at the end (or at its CR when
                # the cut falls between its CR and LF).
                self.assertEqual(len(ends), 2, (stream, cut, ends))
                self.assertIn(ends[-1], (len(stream), len(stream) - 1), (stream, cut))

    def test_first_boundary_in_a_chunk(self):
        """The offset is just past the blank line, its LF included after a CR."""
        self.assertEqual(EventBoundary().feed(b"data: a\r\n\r\ndata: b"), 11)
        self.assertEqual(EventBoundary().feed(b"data: a\n\ndata: b\n\n"), 9)
        boundary = EventBoundary()
        self.assertIsNone(boundary.feed(b"data: a\r\n"))
        self.assertEqual(boundary.feed(b"\r\ndata: b"), 2)
        self.assertFalse(boundary.at_boundary)

    def test_advance_agrees_with_feed(self):
        """The fast path ends in the same state as the byte-by-byte one, for every split."""
        streams = [
            b"data: a\r\n\r\ndata: b\r\n",
            b"event: x\ndata: 1\n\n\n\ndata: 2\r\r",
            b"\r\n\r\n: c\r\n\r",
            b"data: " + b"y" * 100 + b"\n\n",
        ]
        for stream in streams:
            for cut in range(len(stream) + 1):
                slow, fast = EventBoundary(), EventBoundary()
                for piece in (stream[:cut], stream[cut:]):
                    slow.feed(piece)
                    fast.advance(piece)
                    self.assertEqual(vars(fast), vars(slow), (stream, cut))

    def test_extra_blank_lines_are_not_a_new_event_end(self):
        """At a boundary, more blank lines keep it there without reporting an end."""
        boundary = EventBoundary()
        boundary.feed(b"data: a\n\n")
        self.assertIsNone(boundary.feed(b"\n\n"))
        self.assertTrue(boundary.at_boundary)


class RelayTests(SynchronousTestCase):
    """Keep-alives and the drained end, on a clock."""

    def setUp(self):
        self.clock = Clock()
        self.written: list[bytes] = []
        self.relay = EventStreamRelay(self.clock, 15.0, self.written.append)
        self.ended: list[bool] = []

    def test_keepalive_after_silence_between_events(self):
        """15 s without a byte after an event: one comment, then every 15 s."""
        self.relay.relay(b"data: 1\n\n")
        self.clock.advance(14.9)
        self.assertEqual(self.written, [b"data: 1\n\n"])
        self.clock.advance(0.1)
        self.assertEqual(self.written, [b"data: 1\n\n", KEEPALIVE])
        self.clock.advance(15)
        self.assertEqual(self.written, [b"data: 1\n\n", KEEPALIVE, KEEPALIVE])

    def test_keepalive_before_the_first_event(self):
        """A stream that has sent nothing yet stands between events."""
        self.clock.advance(15)
        self.assertEqual(self.written, [KEEPALIVE])

    def test_traffic_postpones_keepalive(self):
        """Each forwarded piece restarts the silence."""
        for _ in range(5):
            self.clock.advance(10)
            self.relay.relay(b"data: x\n\n")
        self.assertNotIn(KEEPALIVE, self.written)
        self.clock.advance(15)
        self.assertEqual(self.written[-1], KEEPALIVE)

    def test_never_inside_an_event(self):
        """Silent in the middle of an event (split across chunks): no comment."""
        self.relay.relay(b"event: progress\r\n")
        self.relay.relay(b'data: {"step"')
        self.clock.advance(60)
        self.assertNotIn(KEEPALIVE, self.written)
        self.relay.relay(b": 1}\r\n")
        self.clock.advance(60)
        self.assertNotIn(KEEPALIVE, self.written)
        self.relay.relay(b"\r\n")
        self.clock.advance(15)
        self.assertEqual(self.written[-1], KEEPALIVE)
        self.assertEqual(self.written.count(KEEPALIVE), 1)

    def test_keepalive_after_split_crlf(self):
        """A blank line ended by a lone CR so far is a boundary too."""
        self.relay.relay(b"data: x\r\n\r")
        self.clock.advance(15)
        self.assertEqual(self.written[-1], KEEPALIVE)

    def test_off(self):
        """SSE_KEEPALIVE=0: no timer, no comment."""
        self.relay.stop()
        relay = EventStreamRelay(self.clock, 0, self.written.append)
        relay.relay(b"data: x\n\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(3600)
        self.assertEqual(self.written, [b"data: x\n\n"])

    def test_stop_cancels_the_timer(self):
        """A stopped relay leaves no timer and writes nothing more."""
        self.relay.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.relay.relay(b"data: late\n\n")
        self.assertEqual(self.written, [])

    def test_drain_when_idle_ends_at_once(self):
        """Between events, the drained end comes at once."""
        self.relay.relay(b"data: 1\n\n")
        self.relay.end_at_boundary(lambda: self.ended.append(True))
        self.assertEqual(self.ended, [True])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.relay.relay(b"data: 2\n\n")
        self.assertEqual(self.written, [b"data: 1\n\n"])

    def test_drain_mid_event_waits_for_its_end(self):
        """Inside an event: the rest of it is written, nothing after it."""
        self.relay.relay(b"data: 1\n\nevent: progress\n")
        self.relay.end_at_boundary(lambda: self.ended.append(True))
        self.assertEqual(self.ended, [])
        self.clock.advance(60)
        self.assertNotIn(KEEPALIVE, self.written)
        self.relay.relay(b"data: 2\n")
        self.assertEqual(self.ended, [])
        self.relay.relay(b"\ndata: 3\n\n")
        self.assertEqual(self.ended, [True])
        self.assertEqual(b"".join(self.written), b"data: 1\n\nevent: progress\ndata: 2\n\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_drain_ends_once(self):
        """A second drain request changes nothing."""
        self.relay.end_at_boundary(lambda: self.ended.append(1))
        self.relay.end_at_boundary(lambda: self.ended.append(2))
        self.assertEqual(self.ended, [1])
