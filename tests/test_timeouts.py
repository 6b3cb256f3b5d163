# -*- test-case-name: tests.test_timeouts -*-
"""L{TimeBound} and L{SiteDeadlines}: many deadlines on one reactor timer."""

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from caracal.gateway.timeouts import SiteDeadlines, TimeBound


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


class SiteDeadlinesTests(SynchronousTestCase):
    """L{SiteDeadlines}: the named deadlines of many owners, served by one reactor timer."""

    def setUp(self):
        self.clock = Clock()
        self.deadlines = SiteDeadlines(self.clock)
        self.fired = []
        self.actions = {}

    def recorder(self, name):
        """The one action of deadline C{name}: note (owner, name, time)."""
        if name not in self.actions:
            self.actions[name] = lambda owner: self.fired.append(
                (owner, name, self.clock.seconds())
            )
        return self.actions[name]

    def arm(self, name, seconds, owner="a"):
        self.deadlines.arm(owner, name, seconds, self.recorder(name))

    def timers(self):
        return [call.getTime() for call in self.clock.getDelayedCalls()]

    def test_each_fires_at_its_time(self):
        """Each deadline fires once, at its own time, whatever order they were armed in."""
        self.arm("idle", 60)
        self.arm("header", 10)
        self.arm("read", 30)
        for step in (10, 20, 30):
            self.clock.advance(step)
        self.assertEqual(self.fired, [("a", "header", 10), ("a", "read", 30), ("a", "idle", 60)])
        self.assertEqual(self.timers(), [])

    def test_exact_times(self):
        """A deadline fires at exactly C{seconds} after it was armed, not before."""
        self.arm("header", 10)
        self.clock.advance(9.99)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.01)
        self.assertEqual(self.fired, [("a", "header", 10)])

    def test_owners_in_arm_order_on_one_timer(self):
        """
        Many owners' deadlines of one name fire each at its own time, in the
        order they were armed, on a single reactor timer.
        """
        for owner in range(100):
            self.arm("idle", 60, owner)
            self.clock.advance(0.5)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(len(self.deadlines), 100)
        self.clock.advance(10)  # t = 60
        self.assertEqual(self.fired, [(0, "idle", 60)])
        self.clock.pump([0.5] * 99)
        self.assertEqual(self.fired, [(i, "idle", 60 + i * 0.5) for i in range(100)])
        self.assertEqual(self.timers(), [])

    def test_one_timer(self):
        """Deadlines later than the timer add no reactor timer; an earlier one replaces it."""
        self.arm("idle", 60)
        self.arm("read", 70, "b")
        self.assertEqual(self.timers(), [60])
        self.arm("header", 10, "c")
        self.assertEqual(self.timers(), [10])

    def test_stopped_never_fires(self):
        """A stopped deadline does not fire; the others still do, on time."""
        self.arm("header", 10)
        self.arm("header", 10, "b")
        self.arm("idle", 60)
        self.deadlines.cancel("a", "header")
        self.clock.advance(10)
        self.assertEqual(self.fired, [("b", "header", 10)])
        self.assertEqual(self.deadlines.armed("a"), {"idle"})
        self.assertEqual(self.deadlines.armed("b"), set())
        self.clock.advance(50)
        self.assertEqual(self.fired, [("b", "header", 10), ("a", "idle", 60)])

    def test_rearmed_moves(self):
        """Arming a name again replaces the owner's deadline, behind the others armed since."""
        self.arm("write", 30)
        self.clock.advance(10)
        self.arm("write", 30, "b")
        self.clock.advance(10)
        self.arm("write", 30)
        self.clock.advance(20)
        self.assertEqual(self.fired, [("b", "write", 40)])
        self.clock.advance(10)
        self.assertEqual(self.fired, [("b", "write", 40), ("a", "write", 50)])
        self.assertEqual(len(self.deadlines), 0)

    def test_cancel_all_leaves_no_timer(self):
        """Once no owner has a deadline armed, no reactor timer is left."""
        self.arm("header", 10)
        self.arm("read", 30)
        self.arm("read", 30, "b")
        self.deadlines.cancel("a")
        self.assertEqual(self.deadlines.armed("a"), set())
        self.assertEqual(self.timers(), [10])
        self.deadlines.cancel("b", "read")
        self.assertEqual(self.timers(), [])
        self.assertEqual(len(self.deadlines), 0)

    def test_cancel_unknown(self):
        """Stopping what is not armed (an owner, a name) does nothing."""
        self.deadlines.cancel("nobody")
        self.arm("idle", 60)
        self.deadlines.cancel("nobody", "idle", "header")
        self.assertEqual(self.deadlines.armed("a"), {"idle"})

    def test_action_may_arm(self):
        """An action that arms another deadline (an abort after a refusal) gets it on time."""
        self.deadlines.arm("a", "header", 10, lambda owner: self.arm("abort", 5, owner))
        self.clock.advance(10)
        self.assertEqual(self.deadlines.armed("a"), {"abort"})
        self.assertEqual(self.timers(), [15])
        self.clock.advance(5)
        self.assertEqual(self.fired, [("a", "abort", 15)])

    def test_action_may_cancel_others(self):
        """An action stopping another owner's deadline due at the same time prevents it."""
        record = self.recorder("idle")

        def action(owner):
            record(owner)
            if owner == "a":
                self.deadlines.cancel("b")

        for owner in "abc":
            self.deadlines.arm(owner, "idle", 60, action)
        self.clock.advance(60)
        self.assertEqual(self.fired, [("a", "idle", 60), ("c", "idle", 60)])
        self.assertEqual(self.timers(), [])

    def test_failing_action_does_not_stop_the_others(self):
        """An action that raises is logged; the deadlines after it still fire on time."""
        record = self.recorder("idle")

        def action(owner):
            if owner == "a":
                raise RuntimeError("boom")
            record(owner)

        self.deadlines.arm("a", "idle", 60, action)
        self.deadlines.arm("b", "idle", 60, action)
        self.arm("write", 90, "c")
        self.clock.advance(60)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.fired, [("b", "idle", 60)])
        self.assertEqual(self.timers(), [90])
        self.clock.advance(30)
        self.assertEqual(self.fired, [("b", "idle", 60), ("c", "write", 90)])

    def test_same_seconds_per_name(self):
        """A name armed again with other seconds is refused: its queue would lose its order."""
        self.arm("idle", 60)
        with self.assertRaises(ValueError):
            self.arm("idle", 30, "b")
        self.assertEqual(self.deadlines.armed("b"), set())

    def test_same_action_per_name(self):
        """
        A name has one action, called with the owner: a deadline holds no
        callable of its own. Another action for the name is refused.
        """
        self.arm("idle", 60)
        with self.assertRaises(ValueError):
            self.deadlines.arm("b", "idle", 60, lambda owner: None)
        self.assertEqual(self.deadlines.armed("b"), set())
        self.clock.advance(60)
        self.assertEqual(self.fired, [("a", "idle", 60)])
