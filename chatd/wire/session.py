"""
The session: one per client connection, whatever its framing. It reads
packets (the framing hands them over: :mod:`chatd.wire.framing`), checks the
rate (:mod:`chatd.wire.ratelimit`), dispatches each to ``handle_<kind>`` and
answers it. Its other ideas are its base classes: what packets may cost
(:mod:`chatd.wire.budget`), what each kind of packet does
(:mod:`chatd.wire.handlers`), the replies in packet order
(:mod:`chatd.wire.replies`), the deadlines (:mod:`chatd.wire.liveness`), the
output and flow control (:mod:`chatd.wire.output`); one object per
connection all the same, since tens of thousands of idle ones each hold one.

Only a ``pong`` may overtake the replies in packet order. Register and
reconnect wait until every earlier packet is answered, so that their reply
comes after those and before the pushes they start.

Everything stateful about chat (who is bound, what was pushed, the store)
lives in :mod:`chatd.hub`; the rules of the wire format in
:mod:`chatd.wire.packets`.
"""

import collections

from twisted.internet import defer
from twisted.logger import Logger

from chatd.wire import packets
from chatd.wire import ratelimit
from chatd.wire.budget import FREE_ACK_MAX, Budget
from chatd.wire.handlers import Handlers
from chatd.wire.liveness import CLOSE_GRACE, Liveness
from chatd.wire.output import Output
from chatd.wire.replies import ReplyOrder
from chatd.wire.packets import PacketError

class Session(Budget, Handlers, ReplyOrder, Liveness, Output):
    """One client connection, the hub's ``Connection``
    (:class:`chatd.hub.router.Connection`). Its framing (``framing``) calls
    :meth:`connectionMade` and :meth:`connectionLost`, hands every packet it
    reads, in order, to :meth:`feed`, and a close that must wait for those
    to :meth:`close_in_turn`. What most connections never need is made when
    first needed.

    Its state is in slots (its bases hold none): a session is the largest
    object of an idle connection, and a dict of its attributes took 832
    bytes of it (measured with tracemalloc), the slots 240 (sys.getsizeof)."""

    __slots__ = (
        "factory", "framing", "settings", "opened_at", "last_seen", "_rate", "_pinged",
        "delivery",     # the hub's Delivery while bound (set by the hub alone)
        "_feeding", "_closing",
        "_close_next",  # (code, reason) of a close after the backlog
        "_backlog",     # deque of packets read while reading was paused
        "_gone",        # [Deferreds waiting for connectionLost]
        "_ip",          # its address, while counted for --max-connections-per-ip (the factory's)
        # Liveness, ReplyOrder and Output (see each)
        "_wheel_slot", "_auth_at", "_live_at", "_abort_at",
        "_inflight", "_replies", "_idle",
        "paused", "_pauses", "_unsent", "_writable", "_out")

    log = Logger()

    def __init__(self, factory, framing):
        self.factory = factory
        self.framing = framing
        self.settings = self.opened_at = self.last_seen = self._rate = None
        self.delivery = self._close_next = self._backlog = self._gone = self._ip = None
        self._pinged = self._feeding = self._closing = self.paused = False
        self._wheel_slot = self._auth_at = self._live_at = self._abort_at = None
        self._inflight = 0
        self._replies = self._idle = None
        self._pauses = frozenset()
        self._unsent = self._writable = self._out = None

    # what every session shares, read from the factory (not copied: a copy
    # is 8-10 bytes a connection, and tens of thousands of them idle)
    hub = property(lambda self: self.factory.hub)
    store = property(lambda self: self.factory.hub.store)
    stats = property(lambda self: self.factory.stats)
    clock = property(lambda self: self.factory.clock)

    @property
    def transport(self):
        """The byte stream under the framing (TCP, TLS or a unix socket)."""
        return self.framing.transport

    @property
    def device(self):
        """The bound destinationId, or None."""
        delivery = self.delivery
        return delivery.device if delivery is not None else None

    def connectionMade(self):
        f = self.factory
        self.settings = s = f.settings
        now = self.opened_at = f.clock.seconds()
        self._rate = ratelimit.limit(s.rate_limit, s.rate_burst, now)
        self.last_seen = now
        self._pinged = False
        refusal = f.admit(self)
        if refusal:
            # over a cap: say so and close, before any timer or state exists
            self._closing = True
            self.framing.write_closing(packets.error("too_many_connections", refusal),
                                       "too_many_connections")
            self.transport.loseConnection()
            return
        self.framing.attach(self)
        self._auth_at = now + s.auth_timeout
        self._live_at = now + min(s.keepalive, s.idle_timeout)
        self._arm()

    def connectionLost(self, reason):
        self._closing = True
        self._out = None
        self.factory.wheel.cancel(self)
        self.hub.unbind(self)
        self.factory.release(self)
        self._wake_writers()
        self._wake_idle()
        gone, self._gone = self._gone, None
        for d in gone or ():
            d.callback(None)

    # -- input -----------------------------------------------------------------

    def feed(self, lines):
        """Handle packets in order; what the framing had already read when
        reading stopped waits in ``_backlog`` for :meth:`_resume`."""
        backlog = self._backlog
        if self._close_next is None:  # after a close in turn, nothing more is taken
            if backlog is None:
                backlog = self._backlog = collections.deque(lines)
            else:
                backlog.extend(lines)
        if self._feeding:
            return  # a _resume from inside packet_received: the loop below goes on
        self._feeding = True
        try:
            while backlog and not self.paused:
                if self._closing:
                    backlog.clear()
                    break
                self.packet_received(backlog.popleft())
        finally:
            self._feeding = False
            if not backlog and self._backlog is backlog:
                self._backlog = None
        if self._close_next is not None and self._backlog is None and not self.paused:
            self.close(*self._close_next)

    def close_in_turn(self, code, reason):
        """Close once every packet handed over before is handled (a frame the
        framing refuses, after the packets before it)."""
        if self._close_next is None:
            self._close_next = (code, reason)
            self.feed(())

    def touch(self):
        """Activity for the idle timeout (a packet, or any frame)."""
        self.last_seen = self.clock.seconds()
        self._pinged = False

    def packet_received(self, line):
        if self._closing:
            return
        settings = self.settings
        size = len(line)
        if size > settings.max_line and not (
                size == settings.max_line + 1 and line.endswith(b"\r")):
            return self.too_long()
        # the budget is checked before the line is read: reading costs CPU
        # by the byte, and a line over the allowance must not cost it. Only
        # a short ack may be free (:meth:`_acks_progress`), so only that is
        # read first, to know.
        charged = size > FREE_ACK_MAX or b"ack" not in line
        if charged and not self._rate_ok(None, size, line):
            return
        try:
            packet = packets.parse_line(line, settings.max_message)
        except PacketError as e:
            if charged or self._rate_ok(e.ref, size):
                self.touch()
                self._error(e.code, packets.error_from(e), e.ref)
            return
        if packet is None:
            if not charged:
                self._rate_ok(None, size)  # an empty line is no packet, but not free
            return
        if not charged and not (packet.kind == "ack" and self._acks_progress(packet.ack)) \
                and not self._rate_ok(packet.ref, size):
            return
        self.touch()
        if self.store.saturated and "store" not in self._pauses:
            # stop reading everyone until the store catches up: overload
            # slows senders down instead of timing their sends out
            self._pause("store")
            self.store.when_unsaturated().addCallback(lambda _: self._resume("store"))
        try:
            getattr(self, "handle_" + packet.kind)(packet)
        except PacketError as e:
            self._error(e.code, packets.error(e.code, e.reason, packet.ref, e.field),
                        packet.ref)
        except Exception:
            # a bug must not cost the client its connection (or an answer)
            self.log.failure("internal error on a {kind} packet", kind=packet.kind)
            self.stats.count(error="unavailable")
            self._reply(packets.error("unavailable", "internal error; retry later",
                                      packet.ref))

    def too_long(self):
        self.close("line_too_long", too_long_reason(self.settings.max_line))

    # -- the hub's Connection interface ------------------------------------------

    def registered(self, device, token):
        self._auth_at = None  # bound (the wheel may still wake it once: harmless)
        self.send_lines(packets.reply({"type": "registered", "sender": device,
                                       "token": token}))

    def reconnected(self, device, pending, token):
        self._auth_at = None
        self.send_lines(packets.reply({"type": "reconnected", "sender": device,
                                       "pending": pending, "token": token}))

    def peer(self):
        """Where the client is, for the logs."""
        return self.framing.peer()

    def push(self, entries):
        self.stats.count(pushes=len(entries))
        self.send_lines(entries)

    def report(self, code, reason):
        self.stats.count(error=code)
        self.send_lines(packets.error(code, reason))

    @property
    def closed(self):
        return self._closing

    # -- closing -------------------------------------------------------------------

    def close(self, code, reason, retry_after_ms=None):
        """Send a closing error, then close (cut after a grace if unread);
        ``retry_after_ms``: when the client should come back (``shutdown``)."""
        if self._closing:
            return
        self.stats.count(error=code)
        if self._out:
            self._flush_out()  # what was said before comes first
            if self._closing:
                return  # that was too much for a client that does not read
        self.framing.write_closing(
            packets.error(code, reason, retry_after_ms=retry_after_ms), code)
        self._closing = True
        self._out = None
        if self._backlog is not None:
            self._backlog.clear()
        self.hub.unbind(self)
        self.framing.shut()
        self._abort_at = self.clock.seconds() + CLOSE_GRACE
        self._arm()

    kick = close  # the hub's word for it

    def finish(self):
        """The client is done sending and has every answer: close."""
        if self._out:
            self._flush_out()  # the answers first
        self.transport.loseConnection()

    def when_closed(self):
        d = defer.Deferred()
        if self._gone is None:
            self._gone = []
        self._gone.append(d)
        return d


def too_long_reason(max_line):
    return "a line is longer than %d bytes" % max_line
