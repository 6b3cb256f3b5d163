# -*- test-case-name: tests.test_timeouts -*-
"""
Many deadlines on one reactor timer: L{TimeBound}, one fixed bound over
many Deferreds, and L{Deadlines}, a connection's named deadlines.

Each request bounds three waits in time (the STS exchange, the JTI claim,
the audit entry), each always with the same number of seconds. Twisted's
C{Deferred.addTimeout} arms a reactor timer per Deferred, cancels it when
the Deferred fires, and adds two callbacks: about 25,000 instructions each
time (measured under callgrind). With one bound for all, deadlines come in
the order the Deferreds were bounded, so a queue in that order and one timer
at its oldest open deadline do the same work for the cost of one callback.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.python.failure import Failure


class TimeBound:
    """
    Bound Deferreds by C{seconds} on C{clock}, as C{Deferred.addTimeout}
    does: one not fired in time is cancelled, and what the cancellation
    gives is replaced by C{onTimeoutCancel(result, seconds)}'s result (by
    default, as Twisted's, a C{CancelledError} becomes a L{TimeoutError}
    and anything else goes on). An outcome before the deadline goes on
    unchanged.

    @param clock: an L{IReactorTime}.
    @param seconds: the bound.
    @param onTimeoutCancel: C{callable(failure, seconds)}, as for
        C{addTimeout}.
    """

    def __init__(self, clock, seconds: float, onTimeoutCancel=None) -> None:  # noqa: N803
        self._clock = clock
        self.seconds = seconds
        self._on_timeout_cancel = onTimeoutCancel or _timeout_error
        # [deadline, the Deferred (None once it fired), timed out?], oldest first.
        self._open: deque[list] = deque()
        self._unsettled = 0
        self._call = None
        self._expiring = False

    def __len__(self) -> int:
        """How many bounded Deferreds have not fired yet (or are being cancelled)."""
        return self._unsettled

    def bound(self, d: Deferred) -> Deferred:
        """Bound C{d}; returns C{d}, as C{addTimeout} does."""
        open_entries = self._open
        while open_entries and open_entries[0][1] is None:
            open_entries.popleft()  # fired already: forget them as we go
        entry = [self._clock.seconds() + self.seconds, d, False]
        open_entries.append(entry)
        self._unsettled += 1
        if self._call is None and not self._expiring:
            self._call = self._clock.callLater(self.seconds, self._expire)
        on_timeout_cancel = self._on_timeout_cancel
        seconds = self.seconds

        def settled(result):
            entry[1] = None
            self._unsettled -= 1
            if not self._unsettled:
                # Nothing open: no timer left behind (a stopped reactor,
                # trial's clean-reactor check); the next bound arms one.
                self._open.clear()
                if self._call is not None:
                    self._call.cancel()
                    self._call = None
            if entry[2]:
                return on_timeout_cancel(result, seconds)
            return result

        return d.addBoth(settled)

    def _expire(self) -> None:
        self._call = None
        now = self._clock.seconds()
        open_entries = self._open
        # A cancellation's callbacks may bound new Deferreds (a retry): they
        # queue behind; the timer is armed once, below, for the oldest.
        self._expiring = True
        try:
            while open_entries:
                entry = open_entries[0]
                if entry[1] is None:
                    open_entries.popleft()
                    continue
                if entry[0] > now:
                    self._call = self._clock.callLater(entry[0] - now, self._expire)
                    return
                open_entries.popleft()
                entry[2] = True
                entry[1].cancel()
        finally:
            self._expiring = False


def _timeout_error(result, seconds: float):
    # Twisted's own conversion (defer._cancelledToTimedOutError).
    if isinstance(result, Failure):
        result.trap(CancelledError)
        raise TimeoutError(seconds, "Deferred")
    return result


class Deadlines:
    """
    Named deadlines on one clock, served by one timer.

    A channel arms and stops four or five deadlines per request (header,
    read, write, idle). As reactor timers that is a C{callLater} and a
    C{cancel} each; here arming or stopping one is a dict write, and the one
    timer is replaced only when a deadline comes earlier than it. A stopped
    deadline leaves the timer as it is: it may fire for nothing once, then
    waits for the next deadline. (Moving a timer earlier with
    C{DelayedCall.reset} would search the reactor's whole timer heap.)

    @param clock: an L{IReactorTime}.
    """

    def __init__(self, clock) -> None:
        self._clock = clock
        self._due: dict[str, tuple[float, object]] = {}
        self._call = None

    def arm(self, name: str, seconds: float, action) -> None:
        """Call C{action()} in C{seconds} unless stopped or armed again first."""
        when = self._clock.seconds() + seconds
        self._due[name] = (when, action)
        call = self._call
        if call is not None and call.active():
            if call.getTime() <= when:
                return
            call.cancel()
        self._call = self._clock.callLater(seconds, self._expire)

    def cancel(self, *names: str) -> None:
        """Stop the named deadlines; all of them, and the timer, when none is named."""
        if names:
            for name in names:
                self._due.pop(name, None)
            return
        self._due.clear()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def armed(self) -> set[str]:
        """The names of the deadlines running."""
        return set(self._due)

    def _expire(self) -> None:
        self._call = None
        while self._due:
            now = self._clock.seconds()
            name, (when, action) = min(self._due.items(), key=lambda item: item[1][0])
            if when > now:
                if self._call is None:
                    self._call = self._clock.callLater(when - now, self._expire)
                return
            del self._due[name]
            action()
