"""
What a client's packets may cost the server (a base class of the session,
:class:`chatd.wire.session.Session`, as its reply order and liveness are):
the rate budget of lines and bytes, charged before a line is read
(:mod:`chatd.wire.ratelimit`); which acks are free; and the allowance of
error bytes for junk lines. Over the budget a line is dropped, said once per
refill period, and a client that keeps going is closed.
"""

from twisted.logger import Logger

from chatd.wire import packets, ratelimit
from chatd.wire.parsing import PacketError

#: the longest line read before it is charged, to see whether it is an ack
#: of something pushed here (free): ``{"ack": "<16 digits>", "ref": ...}``
FREE_ACK_MAX = 128


class Budget:
    """The session's rate budget (``_rate``, a :class:`chatd.wire.ratelimit.RateLimit`)."""

    __slots__ = ()
    log = Logger()

    def _error(self, code, data, ref):
        """Answer the packet just read with an error. A ``bad_packet`` (junk:
        a byte in buys an error of a hundred out) is answered within the
        allowance of error bytes (:meth:`chatd.wire.ratelimit.RateLimit.error`):
        past it, one notice per refill period, the rest in silence, and a
        client that keeps going is closed. Every other error answers a JSON
        object that says what it is about, and always gets its answer."""
        self.stats.count(error=code)
        if code != "bad_packet":
            self._reply(data)
            return
        verdict = self._rate.error(self.clock.seconds(), len(data))
        if verdict is ratelimit.PASS:
            self._reply(data)
        elif verdict is ratelimit.TELL:
            self._reply(packets.error(
                code, "too many errors on this connection: this packet was %s, and "
                "the next bad ones get no answer for %gs" % (code, self._rate.period),
                ref))
        elif verdict is ratelimit.CLOSE:
            self.log.info("{peer}: still sending bad packets, closing",
                          peer=self.framing.peer())
            self.close("rate_limited", "still sending bad packets after being told; "
                       "closing")

    def _acks_progress(self, server_id):
        """An ack of something newly pushed here is free: there can only be as
        many of those as the server pushed. Any other ack costs rate budget."""
        delivery = self.delivery
        return (delivery is not None and delivery.last_pushed is not None
                and delivery.acked < server_id <= delivery.last_pushed)

    def _rate_ok(self, ref, size=0, line=None):
        """Whether this packet of ``size`` bytes may be acted on (see
        :mod:`chatd.wire.ratelimit`: it costs by lines and by bytes); one that
        may not is answered once per refill period, and a client that keeps
        flooding is closed."""
        verdict = self._rate.take(self.clock.seconds(), size)
        if verdict is ratelimit.PASS:
            return True
        rate = self._rate.rate
        if verdict is ratelimit.CLOSE:
            self.log.info("{peer}: still sending far over its rate, closing",
                          peer=self.framing.peer())
            self.close("rate_limited", "more than %g packets a second, and still "
                       "sending after rate_limited; closing" % rate)
        elif verdict is ratelimit.TELL:
            if line is not None:  # not read yet: read for its ref (once a period)
                ref = _ref_of(line)
            self.stats.count(error="rate_limited")
            self._reply(packets.error(
                "rate_limited", "more than %g packets a second (a line costs one more "
                "for each full 32 KiB); slow down (nothing "
                "was done with this one, nor will be with the next ones until "
                "the rate drops; this is said once per %gs)" % (rate, self._rate.period),
                ref))
        return False


def _ref_of(line):
    """The ref of a line not read yet, if it has a valid one."""
    try:
        obj = packets.decode_line(line)
    except PacketError:
        return None
    ref = obj.get("ref") if obj is not None else None
    return ref if ref is not None and packets.valid_ref(ref) else None
