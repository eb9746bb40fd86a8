"""
The session: one per client connection, whatever its framing. It reads
packets (the framing hands them over: :mod:`chatd.wire.framing`), checks the
rate (:mod:`chatd.wire.ratelimit`), dispatches each to ``handle_<kind>`` and
answers it. Its other ideas are its base classes: the replies in packet
order (:mod:`chatd.wire.replies`), the deadlines (:mod:`chatd.wire.liveness`),
the output and flow control (:mod:`chatd.wire.output`); one object per
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
from twisted.python.failure import Failure

from chatd.wire import packets
from chatd.wire import ratelimit
from chatd.wire.liveness import CLOSE_GRACE, Liveness
from chatd.wire.output import Output
from chatd.wire.replies import MAX_INFLIGHT, ReplyOrder
from chatd.wire.packets import PacketError
from chatd.errors import StoreFull, StoreUnavailable


class Session(ReplyOrder, Liveness, Output):
    """One client connection, the hub's ``Connection``
    (:class:`chatd.hub.router.Connection`). Its framing (``framing``) calls
    :meth:`connectionMade` and :meth:`connectionLost`, hands every packet it
    reads, in order, to :meth:`feed`, and a close that must wait for those
    to :meth:`close_in_turn`. What most connections never need is made when
    first needed (the class holds the None and empty defaults)."""

    log = Logger()

    delivery = None  # the hub's Delivery while bound (set by the hub alone)
    _feeding = False
    _closing = False
    _close_next = None  # (code, reason) of a close after the backlog
    _backlog = None    # deque of packets read while reading was paused
    _gone = None       # [Deferreds waiting for connectionLost]

    def __init__(self, factory, framing):
        self.factory = factory
        self.framing = framing

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
        now = f.clock.seconds()
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
        if len(line) > settings.max_line and not (
                len(line) == settings.max_line + 1 and line.endswith(b"\r")):
            return self.too_long()
        try:
            packet = packets.parse_line(line, settings.max_message)
        except PacketError as e:
            if self._rate_ok(e.ref):
                self.touch()
                self.stats.count(error=e.code)
                self._reply(packets.error_from(e))
            return
        if packet is None:
            self._rate_ok(None)  # an empty line is no packet, but not free
            return
        if not (packet.kind == "ack" and self._acks_progress(packet.ack)) and \
                not self._rate_ok(packet.ref):
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
            self.stats.count(error=e.code)
            self._reply(packets.error(e.code, e.reason, packet.ref, e.field))
        except Exception:
            # a bug must not cost the client its connection (or an answer)
            self.log.failure("internal error on a {kind} packet", kind=packet.kind)
            self.stats.count(error="unavailable")
            self._reply(packets.error("unavailable", "internal error; retry later",
                                      packet.ref))

    def too_long(self):
        self.close("line_too_long", too_long_reason(self.settings.max_line))

    def _acks_progress(self, server_id):
        """An ack of something newly pushed here is free: there can only be as
        many of those as the server pushed. Any other ack costs rate budget."""
        delivery = self.delivery
        return (delivery is not None and delivery.last_pushed is not None
                and delivery.acked < server_id <= delivery.last_pushed)

    def _rate_ok(self, ref):
        """Whether this packet may be acted on (see :mod:`chatd.wire.ratelimit`);
        one that may not is answered once per refill period, and a client
        that keeps flooding is closed."""
        verdict = self._rate.take(self.clock.seconds())
        if verdict is ratelimit.PASS:
            return True
        rate = self._rate.rate
        if verdict is ratelimit.CLOSE:
            self.log.info("{peer}: still sending far over its rate, closing",
                          peer=self.framing.peer())
            self.close("rate_limited", "more than %g packets a second, and still "
                       "sending after rate_limited; closing" % rate)
        elif verdict is ratelimit.TELL:
            self.stats.count(error="rate_limited")
            self._reply(packets.error(
                "rate_limited", "more than %g packets a second; slow down (nothing "
                "was done with this one, nor will be with the next ones until "
                "the rate drops; this is said once per %gs)" % (rate, self._rate.period),
                ref))
        return False

    # -- packets -----------------------------------------------------------------

    def handle_register(self, packet):
        self._exclusive(lambda: self.hub.register(self, packet.sender, packet.proof),
                        packet.ref)

    def handle_reconnect(self, packet):
        self._exclusive(lambda: self.hub.reconnect(self, packet.sender, packet.token),
                        packet.ref)

    def handle_message(self, packet):
        # the slot first: the answer may come at once (a bad packet, a store
        # that is down), and it keeps this packet's place in the reply order
        slot = self._owe()

        def done(result, failure):
            try:
                if failure is None:
                    self.stats.count(message=result.status)
                    data = _answer(result, packet, self.settings.inbox_limit)
                else:
                    code, data = _answer_failure(failure, packet.ref, self.log)
                    self.stats.count(error=code, message=code)
                # the reply first: _done() may resume reading (and answer
                # later packets at once) or let a graceful stop close
                self._fill(slot, data)
            finally:
                self._done()

        try:
            self.hub.send(self, packet, done)
        except Exception:
            if slot[0] is None:  # a bug in the hub: still one answer, in turn
                done(None, Failure())
        if self._inflight >= MAX_INFLIGHT:
            self._pause("inflight")

    def handle_ack(self, packet):
        self.hub.ack(self, packet.ack)
        self.stats.count(acks=1)

    def handle_push(self, packet):
        """A push registration (1.2): ``push_set`` once it is stored."""
        d = self.hub.set_push(self, packet.pushkey, packet.app)
        slot = self._owe()
        app = packet.app if packet.pushkey else None

        def stored(_):
            self._fill(slot, packets.reply({"type": "push_set", "app": app}))

        def failed(f):
            code, data = _answer_failure(f, packet.ref, self.log)
            self.stats.count(error=code)
            self._fill(slot, data)

        d.addCallbacks(stored, failed)
        d.addBoth(lambda _: self._done())

    def handle_ping(self, packet):
        self.send_lines(packets.reply({"type": "pong", "ping": packet.ping}))

    def _exclusive(self, start, ref):
        """Register and reconnect change what later packets mean, so nothing
        more is read from this client until they are answered; and they start
        only once every earlier packet is answered (their reply must follow
        those, and come before the pushes they start)."""
        self._pause("bind")

        def go(_):
            self._inflight += 1
            return start()

        def failed(f):
            code, data = _answer_failure(f, ref, self.log)
            self.stats.count(error=code)
            self._reply(data)

        d = self.when_idle().addCallback(go)
        d.addErrback(failed)
        d.addBoth(lambda _: (self._done(), self._resume("bind")))

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

    def close(self, code, reason):
        """Send a closing error, then close (cut after a grace if unread)."""
        if self._closing:
            return
        self.stats.count(error=code)
        if self._out:
            self._flush_out()  # what was said before comes first
            if self._closing:
                return  # that was too much for a client that does not read
        self.framing.write_closing(packets.error(code, reason), code)
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


def _answer(result, packet, inbox_limit):
    """The reply line to a message packet the store has done with."""
    if result.status == "accepted":
        return packets.accepted(result.id, packet.receiver, packet.ref)
    if result.status == "duplicate":
        return packets.reply({"type": "duplicate", "receiver": packet.receiver,
                              "ref": packet.ref})
    if result.status == "unknown_receiver":
        return packets.error("unknown_receiver", "%s has never registered"
                             % packet.receiver, packet.ref, "receiver")
    return packets.error(
        "inbox_full", "%s has %d messages waiting; try again later"
        % (packet.receiver, inbox_limit), packet.ref)


def _answer_failure(f, ref, log):
    """(code, error line) for a packet that failed (a bug is logged)."""
    if f.check(PacketError):
        e = f.value
        return e.code, packets.error(e.code, e.reason, ref, e.field)
    if f.check(StoreFull):
        return "unavailable", packets.error(
            "unavailable", "the store is full (at its memory limit); nothing "
            "was stored, retry later", ref)
    if f.check(StoreUnavailable):
        return "unavailable", packets.error(
            "unavailable", "the store is unreachable (%s); nothing was "
            "stored, retry later" % f.value, ref)
    log.failure("internal error on a packet", f)
    return "unavailable", packets.error("unavailable", "internal error; retry later", ref)
