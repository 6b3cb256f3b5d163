# -*- test-case-name: tests.test_timeouts -*-
"""
Many deadlines on one reactor timer: L{TimeBound}, one fixed bound over
many Deferreds, and L{SiteDeadlines}, the named deadlines of a site's
connections.

Each request bounds three waits in time (the STS exchange, the JTI claim,
the audit entry), each always with the same number of seconds. Twisted's
C{Deferred.addTimeout} arms a reactor timer per Deferred, cancels it when
the Deferred fires, and adds two callbacks: about 25,000 instructions each
time (measured under callgrind). With one bound for all, deadlines come in
the order the Deferreds were bounded, so a queue in that order and one timer
at its oldest open deadline do the same work for the cost of one callback.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure

_log = Logger()


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


#: A deadline this close (seconds) to the clock counts as due: the timer is
#: set with C{when - now}, which floating point may land a hair before C{when}.
_SLACK = 1e-6


class SiteDeadlines:
    """
    The named deadlines of all a site's connections, served by one timer.

    A connection arms and stops four or five deadlines per request (header,
    read, write, idle) and holds one (idle) for as long as it waits for the
    next request: hours, for an agent's keep-alive connection. A timer per
    connection cost every idle one a C{DelayedCall}, its entry in the
    reactor's heap and a table of its own deadlines, about 0.7 KiB. Here a
    name is always armed with the same number of seconds (the site's
    configured timeout), so its deadlines fall due in the order they were
    armed: one queue per name in that order, and one reactor timer at the
    earliest head, do the same work, and a connection waiting for its next
    request holds one queue entry.

    Arming or stopping a deadline is a queue write; the timer is replaced
    only when a deadline comes earlier than it (a name with fewer seconds),
    and a stopped deadline leaves it as it is: it may fire for nothing once.
    No timer is left once no deadline is armed.

    @param clock: an L{IReactorTime}.
    """

    def __init__(self, clock) -> None:
        self._clock = clock
        # name -> {owner: deadline}, oldest first; name -> (seconds, action).
        self._queues: dict[str, OrderedDict] = {}
        self._kinds: dict[str, tuple] = {}
        self._armed = 0
        self._call = None
        self._expiring = False

    def __len__(self) -> int:
        """How many deadlines are armed, over all owners."""
        return self._armed

    def arm(self, owner, name: str, seconds: float, action) -> None:
        """
        Call C{action(owner)} in C{seconds} unless C{owner}'s deadline
        C{name} is stopped or armed again first (which replaces it).

        @param action: the same for every owner (e.g. an unbound method of
            the owners' class), so a deadline holds no callable of its own.
        @raise ValueError: C{name} was armed before with other C{seconds}
            (its queue would no longer be in deadline order) or another
            C{action}.
        """
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = OrderedDict()
            self._kinds[name] = (seconds, action)
        else:
            kind = self._kinds[name]
            if kind[0] != seconds or kind[1] is not action:
                raise ValueError(
                    f"deadline {name!r} is armed as {kind!r}, not {(seconds, action)!r}"
                )
        when = self._clock.seconds() + seconds
        if queue.pop(owner, None) is None:
            self._armed += 1
        queue[owner] = when
        if self._expiring:
            return  # _expire arms the timer for the earliest once done
        call = self._call
        if call is not None:
            if call.getTime() <= when:
                return
            call.cancel()
        self._call = self._clock.callLater(seconds, self._expire)

    def cancel(self, owner, *names: str) -> None:
        """Stop C{owner}'s named deadlines; all of them when none is named."""
        queues = self._queues
        for name in names or list(queues):
            queue = queues.get(name)
            if queue is not None and queue.pop(owner, None) is not None:
                self._armed -= 1
        if not self._armed and self._call is not None:
            # Nothing armed: no timer left behind (a stopped reactor,
            # trial's clean-reactor check); the next arm makes one.
            self._call.cancel()
            self._call = None

    def armed(self, owner) -> set[str]:
        """The names of C{owner}'s deadlines running."""
        return {name for name, queue in self._queues.items() if owner in queue}

    def _expire(self) -> None:
        self._call = None
        queues = self._queues.items()
        self._expiring = True
        try:
            while self._armed:
                # The earliest head of all queues (a handful of names).
                earliest = None
                for name, queue in queues:
                    if queue:
                        owner, when = next(iter(queue.items()))
                        if earliest is None or when < earliest[0]:
                            earliest = (when, owner, name, queue)
                when, owner, name, queue = earliest
                now = self._clock.seconds()
                if when > now + _SLACK:
                    self._call = self._clock.callLater(when - now, self._expire)
                    return
                queue.popitem(last=False)
                self._armed -= 1
                try:
                    self._kinds[name][1](owner)
                except Exception:
                    # One connection's failure must not stop the others' deadlines.
                    _log.failure("deadline action failed")
        finally:
            self._expiring = False
