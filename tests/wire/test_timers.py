"""
The connections' timer wheel (chatd/wire/timers.py): a deadline fires never
early, at most a tick late, once; rescheduling replaces it; a cancelled one
never fires; no call is pending once nothing is scheduled.

Plain calls on a task.Clock: the wheel is arithmetic on the clock it is given.
(The deadlines of real connections are tested over sockets in
test_protocol.py and test_behaviours.py: auth timeout, keepalive, idle.)
"""

from twisted.internet import task

from chatd.wire import timers


class Owner:
    _wheel_slot = None

    def __init__(self, name, log):
        self.name = name
        self.log = log

    def _timer_fired(self, now):
        self.log.append((self.name, now))


def advance(clock, until, step=0.01):
    while clock.seconds() < until - 1e-9:
        clock.advance(step)


def test_a_deadline_fires_once_never_early_at_most_a_tick_late():
    clock = task.Clock()
    clock.advance(1000.0)
    wheel = timers.TimerWheel(clock, 0.1)
    log = []
    a, b = Owner("a", log), Owner("b", log)
    wheel.schedule(a, 1000.25)
    wheel.schedule(b, 1000.05)
    advance(clock, 1000.0 + 2)
    assert [n for n, _ in log] == ["b", "a"]
    fired = dict(log)
    assert 1000.05 <= fired["b"] <= 1000.05 + 0.1 + 1e-6
    assert 1000.25 <= fired["a"] <= 1000.25 + 0.1 + 1e-6
    assert not clock.getDelayedCalls(), "nothing scheduled, yet the wheel still ticks"


def test_rescheduling_replaces_and_cancel_removes():
    clock = task.Clock()
    wheel = timers.TimerWheel(clock, 0.1)
    log = []
    a, b = Owner("a", log), Owner("b", log)
    wheel.schedule(a, 0.3)
    wheel.schedule(a, 1.0)   # later: the first deadline is gone
    wheel.schedule(b, 0.5)
    wheel.cancel(b)
    advance(clock, 0.9)
    assert log == []
    advance(clock, 1.2)
    assert [n for n, _ in log] == ["a"]
    assert len(wheel) == 0


def test_a_deadline_in_the_past_fires_at_the_next_tick():
    clock = task.Clock()
    clock.advance(50.0)
    wheel = timers.TimerWheel(clock, 0.5)
    log = []
    wheel.schedule(Owner("late", log), 10.0)
    clock.advance(0.5)
    assert [n for n, _ in log] == ["late"]


def test_an_owner_may_schedule_itself_again_when_fired():
    clock = task.Clock()
    wheel = timers.TimerWheel(clock, 0.1)
    log = []

    class Again(Owner):
        def _timer_fired(self, now):
            Owner._timer_fired(self, now)
            if len(self.log) < 3:
                wheel.schedule(self, now + 0.5)

    wheel.schedule(Again("x", log), 0.5)
    advance(clock, 3.0)
    assert len(log) == 3
    assert all(b - a >= 0.5 - 1e-9 for (_, a), (_, b) in zip(log, log[1:]))


def test_the_tick_follows_the_shortest_timeout():
    assert timers.tick_for(30.0, 60.0, 300.0) == 1.0
    assert timers.tick_for(0.5, 60.0, 300.0) == 0.025
    assert timers.tick_for(0.05, 0.2, 1.0) == 0.01
