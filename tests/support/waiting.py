"""
Waiting helpers shared by the integration tests: a free loopback port, and
polling a condition on the reactor until it holds (never a blocking sleep).

L{poll_until} reports what happened (the seconds it took, or C{None}) for
tests that assert on it themselves; L{became_true} says it as C{True} or
C{False}; L{wait_until} fails the test itself when the condition never
holds. All three are the same poll.
"""

from __future__ import annotations

import socket

from twisted.internet import defer, task

#: Seconds between two polls unless a caller says otherwise.
POLL_INTERVAL = 0.01


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on C{host} nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def poll_until(
    predicate, timeout: float, clock=None, interval: float = POLL_INTERVAL
) -> defer.Deferred:
    """
    Poll C{predicate()} (a bool or a Deferred of one) every C{interval}
    seconds until it is true. Fires with the seconds it took, or C{None}
    once C{timeout} seconds passed; an exception from the predicate ends the
    wait with that failure.
    """
    if clock is None:
        from twisted.internet import reactor as clock

    @defer.inlineCallbacks
    def poll():
        started = clock.seconds()
        while True:
            if (yield defer.maybeDeferred(predicate)):
                return clock.seconds() - started
            if clock.seconds() - started >= timeout:
                return None
            yield task.deferLater(clock, interval, lambda: None)

    return poll()


def wait_until(
    predicate, timeout: float = 5.0, interval: float = POLL_INTERVAL, clock=None
) -> defer.Deferred:
    """
    Like L{poll_until}, but exceptions from the predicate count as false
    until the deadline, and the Deferred errbacks with C{AssertionError}
    (naming the last exception) when the condition never held.
    """
    last_error: list[Exception] = []

    def tolerant():
        d = defer.maybeDeferred(predicate)

        def swallow(failure):
            last_error[:] = [failure.value]
            return False

        return d.addErrback(swallow)

    def check(took):
        if took is None:
            cause = last_error[0] if last_error else None
            raise AssertionError(f"condition not met within {timeout}s (last error: {cause!r})")
        return took

    return poll_until(tolerant, timeout, clock, interval).addCallback(check)


def became_true(
    predicate, timeout: float, clock=None, interval: float = POLL_INTERVAL
) -> defer.Deferred:
    """
    L{poll_until} as a yes/no: fires with C{True} once C{predicate} holds,
    C{False} once C{timeout} seconds passed.
    """
    return poll_until(predicate, timeout, clock, interval).addCallback(
        lambda took: took is not None
    )
