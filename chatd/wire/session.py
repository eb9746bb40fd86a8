"""
The client connection: a session that does not care how packets are framed
(timers, flow control, the dispatch of each parsed packet to
``handle_<kind>``, replies serialised in order, closing), and its framing for
TCP: one packet per line. The WebSocket framing is in :mod:`chatd.wire.websocket`.

Replies go out in the order of the packets they answer, whatever order the
store finishes in (contract 1.1, "one connection, one order"): a reply that
is ready while an earlier packet still waits for the store waits in
``_replies`` behind it. Only a ``pong`` may overtake. Register and reconnect
wait until every earlier packet is answered, so that their reply comes
after those and before the pushes they start.

Everything stateful about chat (who is bound, what was pushed, the store)
lives in :mod:`chatd.hub.router`; the rules of the wire format in
:mod:`chatd.wire.packets`.
"""

import collections

from twisted.internet import abstract, defer, protocol
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from chatd.wire import packets
from chatd.wire import ratelimit
from chatd.wire import timers
from chatd.wire.output import Outbox, write_now
from chatd.wire.packets import PacketError
from chatd.wire.stats import Stats
from chatd.redis.client import StoreFull, StoreUnavailable

#: how long a closing connection may take to flush before it is cut
CLOSE_GRACE = 5.0
#: packets of one connection awaiting their reply at which it stops being
#: read (so that one client cannot fill the store's queue), and resumes
MAX_INFLIGHT = 256
RESUME_INFLIGHT = 128


@implementer(IPushProducer)
class ChatProtocol:
    """One client connection, whatever its framing: the session.

    A framing subclass sets ``factory`` and ``transport`` (the byte stream
    under the framing, TCP or TLS: it is paused, resumed, half-closed and
    aborted here), calls :meth:`connectionMade` and :meth:`connectionLost`,
    hands every packet it reads, in order, to :meth:`_feed` (empty lines
    included), and supplies :meth:`_write` (ready-made server lines out) and
    :meth:`_write_closing` (the closing error, and whatever the framing sends
    before the stream is shut).

    It is also the producer registered with the transport, which tells it
    when the client stops reading (its buffer is full) and starts again.

    Memory: tens of thousands of idle connections each hold one of these, so
    what most connections never need is made only when first needed (the
    queues and waiter lists below default to None or to a shared empty
    value on the class), and the deadlines live on the factory's
    :class:`chatd.wire.timers.TimerWheel` instead of in DelayedCalls."""

    log = Logger()

    delivery = None  # the hub's Delivery while bound (set by the hub alone)
    paused = False  # reading stopped (see _pause)
    _feeding = False
    _closing = False
    _pauses = frozenset()  # why reading is stopped (a new set on each change)
    _unsent = None     # bytes written since the client stopped reading
    _writable = None   # [Deferreds waiting for the client to read again]
    _inflight = 0      # packets whose reply is not written yet
    _replies = None    # deque([reply or None]) in packet order
    _backlog = None    # deque of lines read while reading was paused
    _idle = None       # [Deferreds waiting for _inflight == 0]
    _gone = None       # [Deferreds waiting for connectionLost]
    _dropped = 0       # bytes read and dropped while closing
    _out = None        # [bytes] to write at the end of this reactor turn
    _wheel_slot = None  # see chatd.wire.timers
    _auth_at = None    # the auth deadline, while unbound
    _live_at = None    # the next keepalive/idle check
    _abort_at = None   # when a closing connection is cut

    @property
    def device(self):
        """The bound destinationId, or None."""
        delivery = self.delivery
        return delivery.device if delivery is not None else None

    def connectionMade(self):
        f = self.factory
        self.settings = s = f.settings
        self.hub = f.hub
        self.store = f.hub.store
        self.stats = f.stats
        self.clock = f.clock
        now = self.clock.seconds()
        self._rate = ratelimit.limit(s.rate_limit, s.rate_burst, now)
        self.last_seen = now
        self._pinged = False
        refusal = f.admit(self)
        if refusal:
            # over a cap: say so and close, before any timer or state exists
            self._closing = True
            self.transport.write(packets.error("too_many_connections", refusal))
            self.transport.loseConnection()
            return
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, NotImplementedError, OSError):
            pass  # not TCP (unix socket)
        self.transport.registerProducer(self, True)
        self._auth_at = now + s.auth_timeout
        self._live_at = now + min(s.keepalive, s.idle_timeout)
        self._arm()

    def connectionLost(self, reason):
        self._closing = True
        self._out = None
        self.factory.wheel.cancel(self)
        self.hub.unbind(self)
        self.factory.release(self)
        waiting, self._writable = self._writable, None
        for d in waiting or ():
            d.callback(None)
        self._wake_idle()
        gone, self._gone = self._gone, None
        for d in gone or ():
            d.callback(None)

    # -- input -----------------------------------------------------------------

    def _feed(self, lines):
        """Hand lines to :meth:`lineReceived` in order; what the framing had
        already read when reading stopped waits in ``_backlog`` for
        :meth:`_resume`."""
        backlog = self._backlog
        if backlog is None:
            backlog = self._backlog = collections.deque(lines)
        else:
            backlog.extend(lines)
        if self._feeding:
            return  # a _resume from inside lineReceived: the loop below goes on
        self._feeding = True
        try:
            while backlog and not self.paused:
                if self._closing:
                    backlog.clear()
                    break
                self.lineReceived(backlog.popleft())
        finally:
            self._feeding = False
            if not backlog and self._backlog is backlog:
                self._backlog = None

    def lineReceived(self, line):
        if self._closing:
            return
        if len(line) > self.settings.max_line and not (
                len(line) == self.settings.max_line + 1 and line.endswith(b"\r")):
            return self.lineLengthExceeded(line)
        try:
            packet = packets.parse_line(line, self.settings.max_message)
        except PacketError as e:
            if self._rate_ok(e.ref):
                self._touch()
                self.stats.count(error=e.code)
                self._reply(packets.error_from(e))
            return
        if packet is None:
            self._rate_ok(None)  # an empty line is no packet, but not free
            return
        if not (packet.kind == "ack" and self._acks_progress(packet.ack)) and \
                not self._rate_ok(packet.ref):
            return
        self._touch()
        if self.store.saturated and "store" not in self._pauses:
            # stop reading everyone until the store catches up: overload
            # slows senders down instead of timing their sends out
            self._pause("store")
            self.store.when_unsaturated().addCallback(lambda _: self._resume("store"))
        handler = getattr(self, "handle_" + packet.kind)
        try:
            handler(packet)
        except PacketError as e:
            self.stats.count(error=e.code)
            self._reply(packets.error(e.code, e.reason, packet.ref, e.field))
        except Exception:
            # a bug must not cost the client its connection (or an answer)
            self.log.failure("internal error on a {kind} packet", kind=packet.kind)
            self.stats.count(error="unavailable")
            self._reply(packets.error("unavailable", "internal error; retry later",
                                      packet.ref))

    def lineLengthExceeded(self, line):
        self.close("line_too_long", "a line is longer than %d bytes" % self.settings.max_line)

    def _touch(self):
        """A packet: activity for the idle timeout."""
        self.last_seen = self.clock.seconds()
        self._pinged = False

    def _acks_progress(self, server_id):
        """An ack of something newly pushed here is free: there can only be as
        many of those as the server pushed. Any other ack costs rate budget."""
        delivery = self.delivery
        return (delivery is not None and delivery.last_pushed is not None
                and delivery.acked < server_id <= delivery.last_pushed)

    def _rate_ok(self, ref):
        """Whether this line may be acted on (see :mod:`chatd.wire.ratelimit`); a
        line that may not is answered once per refill period, and a client
        that keeps flooding is closed."""
        verdict = self._rate.take(self.clock.seconds())
        if verdict is ratelimit.PASS:
            return True
        rate = self._rate.rate
        if verdict is ratelimit.CLOSE:
            self.log.info("{peer}: still sending far over its rate, closing",
                          peer=self._peer())
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
        slot = [None]

        def done(result, failure):
            if failure is None:
                self._sent(result, packet, slot)
            else:
                self._failed(failure, packet.ref, slot)

        # the slot first: the answer may come at once (a bad packet, a store
        # that is down), and it keeps this packet's place in the reply order
        replies = self._replies
        if replies is None:
            replies = self._replies = collections.deque()
        replies.append(slot)
        self._inflight += 1
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

    def handle_ping(self, packet):
        self.sendLine_(packets.reply({"type": "pong", "ping": packet.ping}))

    def _sent(self, result, packet, slot):
        # the reply first: _done() may resume reading (and answer later
        # packets at once) or let a graceful stop close the connection
        try:
            self._fill(slot, self._answer(result, packet))
        finally:
            self._done()

    def _answer(self, result, packet):
        self.stats.count(message=result.status)
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
            % (packet.receiver, self.settings.inbox_limit), packet.ref)

    def _exclusive(self, start, ref):
        """Register and reconnect change what later packets mean, so nothing
        more is read from this client until they are answered; and they start
        only once every earlier packet is answered (their reply must follow
        those, and come before the pushes they start)."""
        self._pause("bind")

        def go(_):
            self._inflight += 1
            return start()

        d = self.when_idle().addCallback(go)
        d.addCallbacks(self._bind_done, self._bind_failed, errbackArgs=(ref,))

    def _bind_done(self, _):
        self._done()
        self._resume("bind")

    def _bind_failed(self, f, ref):
        self._failed(f, ref)
        self._resume("bind")

    # -- replies in packet order ---------------------------------------------------

    def _reply(self, data):
        """Send the reply to the packet just read: now, unless an earlier
        packet's reply is still to come."""
        if self._replies:
            self._replies.append([data])
        else:
            self.sendLine_(data)

    def _fill(self, slot, data):
        """An awaited reply is ready: send it and every reply queued behind it,
        up to the next one still awaited."""
        slot[0] = data
        replies = self._replies
        while replies and replies[0][0] is not None:
            self.sendLine_(replies.popleft()[0])
        if not replies:
            self._replies = None

    def _done(self):
        self._inflight -= 1
        if self._inflight <= RESUME_INFLIGHT and "inflight" in self._pauses:
            self._resume("inflight")
        if not self._inflight:
            self._wake_idle()

    def _failed(self, f, ref, slot=None):
        try:
            data = self._answer_failure(f, ref)
            if slot is None:
                self._reply(data)
            else:
                self.stats.count(message=f.value.code if f.check(PacketError) else "unavailable")
                self._fill(slot, data)
        finally:
            self._done()

    def _answer_failure(self, f, ref):
        self.stats.count(error=f.value.code if f.check(PacketError) else "unavailable")
        if f.check(PacketError):
            e = f.value
            return packets.error(e.code, e.reason, ref, e.field)
        if f.check(StoreFull):
            return packets.error(
                "unavailable", "the store is full (at its memory limit); nothing "
                "was stored, retry later", ref)
        if f.check(StoreUnavailable):
            return packets.error(
                "unavailable", "the store is unreachable (%s); nothing was "
                "stored, retry later" % f.value, ref)
        self.log.failure("internal error on a packet", f)
        return packets.error("unavailable", "internal error; retry later", ref)

    # -- the hub's Connection interface ------------------------------------------

    def registered(self, device, token):
        self._bound()
        self.sendLine_(packets.reply({"type": "registered", "sender": device, "token": token}))

    def reconnected(self, device, pending):
        self._bound()
        self.sendLine_(packets.reply({"type": "reconnected", "sender": device,
                                      "pending": pending}))

    def push(self, entries):
        self.stats.count(pushes=len(entries))
        self.sendLine_(b"\n".join(entries) + b"\n")

    def kick(self, code, reason):
        self.close(code, reason)

    def report(self, code, reason):
        self.stats.count(error=code)
        self.sendLine_(packets.error(code, reason))

    @property
    def closed(self):
        return self._closing

    def wait_writable(self):
        if self._unsent is None or self._closing:
            return defer.succeed(None)
        d = defer.Deferred()
        if self._writable is None:
            self._writable = []
        self._writable.append(d)
        return d

    # -- output ------------------------------------------------------------------

    def sendLine_(self, data):
        """Write ready-made line(s) at the end of this reactor turn, together
        with every other line for this client (see :mod:`chatd.wire.output`)."""
        if self._closing:
            return
        out = self._out
        if out is None:
            self._out = [data]
            self.factory.outbox.add(self)
        else:
            out.append(data)

    def _flush_out(self):
        """Write what this turn gathered; cut a client that has stopped
        reading and let too much pile up (its messages stay stored)."""
        out, self._out = self._out, None
        if not out or self._closing:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        # what is written while the client does not read counts, the write
        # that fills its buffer included (a drain batch is at most half the
        # limit: hub.Delivery); only that write may be over the limit by
        # itself (one big pong does not cut a client that reads)
        counting = self._unsent is not None
        self._write(data)
        if self._unsent is not None:
            self._unsent += len(data)
            if counting and self._unsent > self.settings.output_limit:
                self.log.info("{peer}: slow consumer ({n} bytes unread), closing",
                              peer=self._peer(), n=self._unsent)
                self.close("slow_consumer", "the client is not reading; %d bytes are "
                           "waiting. Messages stay stored" % self._unsent)

    # -- IPushProducer (the transport's flow control) ------------------------------

    def pauseProducing(self):
        if self._unsent is None:
            self._unsent = 0
        self._pause("output")

    def resumeProducing(self):
        self._unsent = None
        self._resume("output")
        waiting, self._writable = self._writable, None
        for d in waiting or ():
            d.callback(None)

    def stopProducing(self):
        pass

    def _pause(self, why):
        if not self._pauses and not self._closing:
            self.paused = True
            self.transport.pauseProducing()
        self._pauses = self._pauses | {why}

    def _resume(self, why):
        if why in self._pauses:
            self._pauses = self._pauses - {why}
        if not self._pauses and not self._closing and self.paused:
            self.paused = False
            self.transport.resumeProducing()
            self._feed(())

    def close(self, code, reason):
        """Send a closing error, then close (cut after a grace if unread).

        On plain TCP only the sending side is shut at first, and what the
        client still sends is read and dropped until it hangs up: closing a
        socket with unread input makes the kernel reset the connection, and
        the error line could be lost with it."""
        if self._closing:
            return
        self.stats.count(error=code)
        if self._out:
            self._flush_out()  # what was said before comes first
            if self._closing:
                return  # that was too much for a client that does not read
        self._write_closing(packets.error(code, reason), code)
        self._closing = True
        self._out = None
        if self._backlog is not None:
            self._backlog.clear()
        self.hub.unbind(self)
        if isinstance(self.transport, abstract.FileDescriptor):
            self.transport.loseWriteConnection()
            self.transport.resumeProducing()
        else:
            self.transport.loseConnection()  # TLS: a close_notify, then close
        self._abort_at = self.clock.seconds() + CLOSE_GRACE
        self._arm()

    _write_shut = False  # our sending side is shut and everything is out

    def _drop(self, n):
        """Closing: what still comes is dropped, up to a line's worth; a client
        that keeps streaming after that is cut once the closing error is out."""
        self._dropped += n
        if self._dropped > self.settings.max_line:
            if self._write_shut:
                self.transport.abortConnection()
            else:
                self.transport.pauseProducing()

    # -- timers ------------------------------------------------------------------

    def _arm(self):
        """Put the earliest deadline on the factory's wheel: the abort once
        closing, else the auth timeout (while unbound) or the next liveness
        check, whichever comes first."""
        if self._abort_at is not None:
            when = self._abort_at
        else:
            when = self._live_at
            if self._auth_at is not None and self._auth_at < when:
                when = self._auth_at
        self.factory.wheel.schedule(self, when)

    def _timer_fired(self, now):
        if self._abort_at is not None:
            if now >= self._abort_at:
                self._abort_at = None
                self.transport.abortConnection()
            else:
                self._arm()
            return
        if self._closing:
            return  # closed without a grace (connectionLost is on its way)
        if self._auth_at is not None and now >= self._auth_at:
            self._auth_at = None
            self._auth_expired()
            return
        if now >= self._live_at:
            self._liveness(now)
        if not self._closing:
            self._arm()

    def _bound(self):
        self._auth_at = None  # the wheel may still wake it once: harmless

    def _auth_expired(self):
        self.close("auth_timeout", "no register or reconnect within %gs"
                   % self.settings.auth_timeout)

    def _liveness(self, now):
        """Ping a silent bound client after --keepalive, close after --idle-timeout."""
        s = self.settings
        silent = now - self.last_seen
        if silent >= s.idle_timeout:
            self.close("idle_timeout", "nothing received for %gs" % s.idle_timeout)
            return
        if silent >= s.keepalive and not self._pinged and self.device is not None:
            self._pinged = True
            self._keepalive()
        if self._pinged or self.device is None:
            next_check = self.last_seen + s.idle_timeout
        else:
            next_check = self.last_seen + s.keepalive
        self._live_at = max(next_check, now + 0.01)

    def _keepalive(self):
        self.sendLine_(b'{"type":"ping"}\n')

    # -- shutdown ------------------------------------------------------------------

    def when_idle(self):
        """Deferred that fires when every packet read so far has its reply."""
        if not self._inflight:
            return defer.succeed(None)
        d = defer.Deferred()
        if self._idle is None:
            self._idle = []
        self._idle.append(d)
        return d

    def when_closed(self):
        d = defer.Deferred()
        if self._gone is None:
            self._gone = []
        self._gone.append(d)
        return d

    def _wake_idle(self):
        waiting, self._idle = self._idle, None
        for d in waiting or ():
            d.callback(None)

    def _peer(self):
        try:
            peer = self.transport.getPeer()
            return "%s:%s" % (peer.host, peer.port)
        except Exception:
            return "?"


@implementer(IHalfCloseableProtocol)
class LineProtocol(ChatProtocol, protocol.Protocol):
    """The TCP (and TLS, and unix socket) framing: one packet per line, a
    line ends in ``\\n``.

    A chunk read is split into lines in one pass, and every line, empty ones
    included, goes to the session (LineReceiver copies the rest of its
    buffer for each line it takes off: a chunk of ``\\n`` cost ~1 µs a byte).
    """

    _pieces = None  # [the start of a line not complete yet, in chunks]
    _partial = 0    # their length

    def connectionMade(self):
        ChatProtocol.connectionMade(self)

    def dataReceived(self, data):
        if self._closing:
            self._drop(len(data))
            return
        lines = data.split(b"\n")
        tail = lines.pop()
        pieces = self._pieces
        if pieces and lines:
            pieces.append(lines[0])
            lines[0] = b"".join(pieces)
            pieces.clear()
            self._partial = 0
        if tail:
            if pieces is None:
                pieces = self._pieces = []
            pieces.append(tail)
            self._partial += len(tail)
            if self._partial > self.settings.max_line + 1:  # + a telnet \r
                # it cannot end within the limit: in it goes, as too long
                lines.append(b"".join(pieces))
                pieces.clear()
                self._partial = 0
        self._feed(lines)

    def _write(self, data):
        write_now(self.transport, data)

    def _write_closing(self, data, code):
        self.transport.write(data)

    def readConnectionLost(self):
        """The client will send nothing more: after a closing error, finish
        closing; from a client that is done sending (``nc -N``), answer what
        it sent, then close."""
        if self._closing:
            self.transport.loseConnection()
        else:
            self.when_idle().addCallback(lambda _: self._lose())

    def _lose(self):
        if self._out:
            self._flush_out()  # the answers first
        self.transport.loseConnection()

    def writeConnectionLost(self):
        """Our side is shut (see :meth:`close`), everything written is out:
        wait for the client to hang up, or for the abort timer; a client
        that was streaming past the limit is cut now."""
        self._write_shut = True
        if self._dropped > self.settings.max_line:
            self.transport.abortConnection()


class ChatFactory(protocol.Factory):
    """Holds what every connection shares: settings, the hub, the clock, and
    the set of live connections (for a graceful shutdown)."""

    protocol = LineProtocol
    noisy = False

    def __init__(self, settings, hub, clock):
        self.settings = settings
        self.hub = hub
        self.clock = clock
        self.connections = set()
        self.wheel = timers.TimerWheel(clock, timers.tick_for(
            settings.auth_timeout, settings.keepalive, settings.idle_timeout))
        self.outbox = Outbox(clock)
        self.stats = Stats()  # bumped by the sessions, read by chatd.ops.metrics
        self.max_connections = settings.max_connections or max(
            1, _files_limit() - FILES_HEADROOM)
        self._per_ip = collections.Counter()  # address -> connections admitted

    def admit(self, conn):
        """Count a new connection in; the reason it is refused, if over a cap
        (--max-connections, --max-connections-per-ip)."""
        if len(self.connections) >= self.max_connections:
            return ("the server has its most connections (%d); try again later"
                    % self.max_connections)
        per_ip = self.settings.max_connections_per_ip
        ip = getattr(conn.transport.getPeer(), "host", None)
        if per_ip and ip is not None:
            if self._per_ip[ip] >= per_ip:
                return ("%d connections from %s already; close one, or try again later"
                        % (per_ip, ip))
            self._per_ip[ip] += 1
            conn._ip = ip
        self.connections.add(conn)
        return None

    def release(self, conn):
        """A connection is gone (admitted or not)."""
        if conn in self.connections:
            self.connections.discard(conn)
            ip = getattr(conn, "_ip", None)
            if ip is not None:
                self._per_ip[ip] -= 1
                if not self._per_ip[ip]:
                    del self._per_ip[ip]

    @defer.inlineCallbacks
    def shutdown(self, grace=CLOSE_GRACE):
        """Stop reading, let every packet read so far get its reply, then send
        ``shutdown`` to everyone and close; cut whoever is left after grace."""
        conns = list(self.connections)
        for c in conns:
            c._pause("shutdown")
        idle = defer.DeferredList([c.when_idle() for c in conns], consumeErrors=True)
        yield _within(idle, self.settings.redis_timeout + 1, self.clock)
        gone = []
        for c in list(self.connections):
            gone.append(c.when_closed())
            c.close("shutdown", "the server is stopping; reconnect later")
        yield _within(defer.DeferredList(gone, consumeErrors=True), grace, self.clock)
        for c in list(self.connections):
            c.transport.abortConnection()


#: files a node needs besides its client connections (listeners, the store,
#: logs, the embedded store's pipes)
FILES_HEADROOM = 100


def _files_limit():
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return 1024
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _within(d, seconds, clock):
    """Wait for d, at most ``seconds``; never fails."""
    d.addTimeout(seconds, clock)
    return d.addErrback(lambda f: None)
