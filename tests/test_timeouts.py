# -*- test-case-name: tests.test_timeouts -*-
"""L{TimeBound}: Deferred.addTimeout's behaviour for many Deferreds, with one timer."""

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway.timeouts import TimeBound


class TimeBoundTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.bound = TimeBound(self.clock, 2.0)

    def test_fired_in_time_unchanged(self):
        """A Deferred that fires before its deadline keeps its result; no timeout later."""
        d = self.bound.bound(Deferred())
        self.clock.advance(1.9)
        d.callback("ok")
        self.assertEqual(self.successResultOf(d), "ok")
        self.clock.advance(10)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timed_out(self):
        """Not fired in time: cancelled, and the caller sees a TimeoutError, as with addTimeout."""
        cancelled = []
        d = self.bound.bound(Deferred(cancelled.append))
        self.clock.advance(1.99)
        self.assertNoResult(d)
        self.clock.advance(0.01)
        self.assertEqual(len(cancelled), 1)
        failure = self.failureResultOf(d, TimeoutError)
        self.assertEqual(failure.value.args, (2.0, "Deferred"))

    def test_same_as_add_timeout(self):
        """Each outcome is what Deferred.addTimeout gives for the same story."""

        def stories(make):
            clock = Clock()
            bound = make(clock)
            results = []
            for fire_at, value in ((1.0, "early"), (None, None), (3.0, "late")):
                d = Deferred()
                bound(d)
                d.addBoth(results.append)
                if fire_at is not None and fire_at < 2.0:
                    clock.advance(fire_at)
                    d.callback(value)
            clock.advance(5)
            return [r if isinstance(r, str) else r.type for r in results]

        theirs = stories(lambda clock: lambda d: d.addTimeout(2.0, clock))
        ours = stories(lambda clock: TimeBound(clock, 2.0).bound)
        self.assertEqual(ours, theirs)
        self.assertEqual(ours, ["early", TimeoutError, TimeoutError])

    def test_each_its_own_deadline(self):
        """Deferreds bounded at different times time out at their own deadlines, in order."""
        first = self.bound.bound(Deferred())
        self.clock.advance(1.5)
        second = self.bound.bound(Deferred())
        self.clock.advance(0.5)
        self.failureResultOf(first, TimeoutError)
        self.assertNoResult(second)
        self.clock.advance(1.49)
        self.assertNoResult(second)
        self.clock.advance(0.01)
        self.failureResultOf(second, TimeoutError)

    def test_one_timer(self):
        """However many Deferreds are open, one reactor timer serves them."""
        for _ in range(50):
            self.bound.bound(Deferred())
            self.clock.advance(0.01)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(len(self.bound), 50)

    def test_fired_ones_forgotten(self):
        """Deferreds that fired are dropped from the queue as new ones come."""
        held = self.bound.bound(Deferred())
        for _ in range(100):
            self.bound.bound(Deferred()).callback(None)
        held.callback(None)
        self.bound.bound(Deferred())
        self.assertEqual(len(self.bound._open), 1)

    def test_no_timer_when_nothing_is_open(self):
        """Once every bounded Deferred has fired, no timer is left on the clock."""
        first, second = self.bound.bound(Deferred()), self.bound.bound(Deferred())
        first.callback(None)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        second.callback(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.bound), 0)

    def test_caller_cancel_is_not_a_timeout(self):
        """A Deferred its caller cancels fails with CancelledError, not TimeoutError."""
        d = self.bound.bound(Deferred())
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.clock.advance(5)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bounded_while_timing_out(self):
        """
        A Deferred bounded by the callbacks of one timing out (a retry) gets
        its own deadline, and one timer, not two, is left for it.
        """
        later = []

        def retry(failure):
            later.append(self.bound.bound(Deferred()))
            return failure

        first = self.bound.bound(Deferred())
        first.addErrback(retry)
        self.clock.advance(1)
        second = self.bound.bound(Deferred())  # still open, due later
        self.clock.advance(1)
        self.failureResultOf(first, TimeoutError)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1)
        self.failureResultOf(second, TimeoutError)
        self.assertNoResult(later[0])
        self.clock.advance(1)
        self.failureResultOf(later[0], TimeoutError)

    def test_on_timeout_cancel(self):
        """A given onTimeoutCancel decides what a timed-out Deferred gives, as with addTimeout."""
        bound = TimeBound(self.clock, 1.0, onTimeoutCancel=lambda _result, s: ("late", s))
        d = bound.bound(Deferred())
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(d), ("late", 1.0))

    def test_already_fired(self):
        """A Deferred that had fired before being bounded goes on as it was."""
        d = Deferred()
        d.callback(7)
        self.assertEqual(self.successResultOf(self.bound.bound(d)), 7)
