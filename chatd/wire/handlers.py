"""
What each kind of client packet does (a base class of the session,
:class:`chatd.wire.session.Session`): ``handle_<kind>`` hands it to the hub
and answers it in its place in the reply order (:mod:`chatd.wire.replies`).
Register and reconnect are exclusive: nothing more is read until they are
answered, and they start only once every earlier packet is answered.
"""

from twisted.python.failure import Failure

from chatd.errors import StoreFull, StoreUnavailable
from chatd.wire import packets
from chatd.wire.parsing import PacketError
from chatd.wire.replies import MAX_INFLIGHT


class Handlers:
    """The packet handlers of a session."""

    __slots__ = ()

    def handle_register(self, packet):
        self._exclusive(lambda: self.hub.register(self, packet.sender, packet.proof,
                                                  packet.receipts), packet.ref)

    def handle_reconnect(self, packet):
        self._exclusive(lambda: self.hub.reconnect(self, packet.sender, packet.token,
                                                   packet.receipts), packet.ref)

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

    def handle_read(self, packet):
        """A read (1.2): no reply, but an error keeps its place in the reply
        order (it comes from the store)."""
        slot = self._owe()

        def done(result):
            data = b""
            if isinstance(result, Failure):
                code, data = _answer_failure(result, packet.ref, self.log)
                self.stats.count(error=code)
            self._fill(slot, data)
            self._done()

        try:
            d = self.hub.read(self, packet.ack, packet.sender)
        except Exception:
            done(Failure())
            return
        d.addBoth(done)

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
        data = packets.reply({"type": "pong", "ping": packet.ping})
        self._rate.charge(len(data))  # the echo may be bigger than the ping
        self.send_lines(data)

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
