"""
One timer wheel for the deadlines of every client connection.

Each connection has a deadline or two at any time (the auth timeout until it
binds, the next keepalive/idle check, the abort grace once closing). A
Twisted ``DelayedCall`` per deadline cost about 400 bytes each and a heap
entry in the reactor, per connection; at tens of thousands of idle
connections that was a third of chatd's memory per connection. Here a
connection holds one slot number instead, and one periodic call (only while
some deadline is pending) fires the slots that are due.

A deadline fires at most one ``tick`` late (never early), so the tick is
made small compared with the shortest timeout (see :func:`tick_for`).
Hand-written because Twisted has no wheel and the owners need no more than
this: ``schedule``, ``cancel`` and a callback.
"""

from twisted.logger import Logger

log = Logger()


def tick_for(*timeouts):
    """The tick for these timeouts: a twentieth of the shortest, between
    10 ms and 1 s."""
    shortest = min(t for t in timeouts if t and t > 0) if any(
        t and t > 0 for t in timeouts) else 20.0
    return min(1.0, max(0.01, shortest / 20.0))


class TimerWheel:
    """Deadlines of owners, fired by ``owner._timer_fired(now)``.

    An owner has at most one deadline here; it keeps its slot number in
    ``owner._wheel_slot`` (None when it has none). ``_timer_fired`` is called
    once the deadline has passed, the owner no longer scheduled: it
    schedules again if it still needs to."""

    def __init__(self, clock, tick):
        self.clock = clock
        self.tick = tick
        self._slots = {}     # slot number -> set of owners due in it
        self._fired = None   # every slot up to here has fired (set on first use)
        self._call = None

    def schedule(self, owner, when):
        """Fire ``owner`` at ``when`` (seconds on the clock) or up to a tick
        after; replaces its earlier deadline."""
        if self._fired is None:
            self._fired = int(self.clock.seconds() / self.tick)
        slot = max(int(when / self.tick) + 1, self._fired + 1)
        old = owner._wheel_slot
        if old == slot:
            return
        slots = self._slots
        if old is not None:
            self._discard(owner, old)
        due = slots.get(slot)
        if due is None:
            slots[slot] = {owner}
        else:
            due.add(owner)
        owner._wheel_slot = slot
        if self._call is None:
            self._call = self.clock.callLater(self.tick, self._run)

    def cancel(self, owner):
        old = owner._wheel_slot
        if old is not None:
            self._discard(owner, old)
            owner._wheel_slot = None

    def _discard(self, owner, slot):
        due = self._slots.get(slot)
        if due is not None:
            due.discard(owner)
            if not due:
                del self._slots[slot]

    def __len__(self):
        return sum(len(due) for due in self._slots.values())

    def _run(self):
        self._call = None
        now = self.clock.seconds()
        current = int(now / self.tick)
        slots = self._slots
        if current - self._fired <= len(slots):
            due_slots = [s for s in range(self._fired + 1, current + 1) if s in slots]
        else:  # a long stall of the reactor: only look at the slots that exist
            due_slots = sorted(s for s in slots if s <= current)
        self._fired = max(self._fired, current)
        for s in due_slots:
            for owner in slots.pop(s, ()):
                owner._wheel_slot = None
                try:
                    owner._timer_fired(now)
                except Exception:
                    log.failure("a connection timer failed")
        if slots and self._call is None:
            self._call = self.clock.callLater(self.tick, self._run)

    def stop(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
