"""
The load generator: one process of it (a "worker"), on Twisted, speaking the
raw line protocol (no chatd imports: it drives chatd and the relay alike).

The suite starts several workers and drives them over stdin/stdout, one JSON
object per line each way (see :mod:`benchmarks.scenarios`). A worker owns a
contiguous block of the run's devices (one TCP connection each); every
device registers, then sends to random peers (any worker's devices), reads
what is pushed to it and acks like a phone: one cumulative ack of the last
id that arrived in one read.

Commands (suite -> worker) and the events they answer (worker -> suite):

``setup``   connect and register the worker's devices -> ``ready``
``go``      send (closed loop with a window per device, or open loop at a
            fixed rate) from ``start`` to ``end``; then wait for the replies
            of everything sent -> ``sent`` (accepted counts per receiver)
``expect``  how many messages each local device must receive; wait for them,
            then a ping round trip on every device (anything pushed before
            has arrived by then) -> ``done`` (all the numbers)
``prime``   each device sends ``refs`` messages with a ``ref`` -> ``primed``
``fill`` / ``drain``  the offline drain: store N messages for an offline
            device, then reconnect it and time the push of all of them
``quit``    abort every connection and exit (so does EOF on stdin)

Staying out of the way (it must not be the bottleneck, and it says when it
is): nothing on the hot path decodes JSON (lines are classified by the bytes
at fixed offsets of the server's compact output), a read is answered with one
write (the ack and the refill of the send window together), peers come from
a pre-drawn random table, and in closed-loop runs latency is sampled (1 in
16). Each worker reads its own CPU time from ``/proc/self/stat`` over the
measured window and reports it; the suite flags a run where a worker was
above 90% of a core.
"""

import collections
import json
import os
import random
import resource
import sys
import time
import traceback

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import defer, protocol, reactor, stdio, task  # noqa: E402
from twisted.protocols.basic import LineReceiver  # noqa: E402

_CLK = os.sysconf("SC_CLK_TCK")
_mono_ns = time.monotonic_ns
_mono = time.monotonic

#: error codes that answer something other than a message packet
_NOT_A_SEND_REPLY = (b"bad_ack", b"session_replaced", b"slow_consumer", b"shutdown",
                     b"idle_timeout", b"auth_timeout", b"line_too_long")


def proc_cpu(pid="self"):
    """CPU seconds (user + system) of a process, from /proc."""
    with open("/proc/%s/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK


def bucket(us):
    """Latency histogram bucket (microseconds, about 1% resolution)."""
    if us < 1000:
        return us if us > 0 else 0
    if us < 10000:
        return us // 10 * 10
    if us < 100000:
        return us // 100 * 100
    return us // 1000 * 1000


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Device(protocol.Protocol):
    """One device: one connection, registers, sends, receives, acks."""

    def __init__(self, gen, idx):
        self.gen = gen
        self.idx = idx
        self.did = gen.ids[idx]
        self.buf = b""
        self.token = None
        self.out = collections.deque()   # receiver index of each unanswered send
        self.refq = collections.deque()  # ref-mode: the primed packet of each send
        self.primed = []                 # ref-mode: [[receiver, ref, text, id]]
        self.retry = []                  # the primed packets that were accepted
        self.last_id = b""
        self.received = 0     # distinct pushes (ids increasing on this connection)
        self.repeats = 0      # pushes whose id did not increase: pushed twice
        self.expected = None
        self.waiter = None    # Deferred of the next setup-style reply
        self.lost = False
        self.drain = None     # drain mode: dict of timings
        self.received_before = 0  # received before the current run (mark)
        self.closing = False  # closed on purpose (not an error)
        self.on_lost = None   # Deferred fired by connectionLost
        self.unacked = 0      # pushes since the last ack (ack_every)

    # -- connection ----------------------------------------------------------------

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.gen.connected(self)

    def connectionLost(self, reason):
        self.lost = True
        self.gen.device_lost(self, reason)
        if self.on_lost is not None:
            d, self.on_lost = self.on_lost, None
            d.callback(None)

    # -- the hot path ----------------------------------------------------------------

    def dataReceived(self, data):
        if self.buf:
            data = self.buf + data
        lines = data.split(b"\n")
        self.buf = lines.pop()
        g = self.gen
        now_us = _mono_ns() // 1000
        in_window = g.w0_us <= now_us < g.w1_us
        last = None
        replies = 0
        pushes = 0
        pushes_any = 0  # receipts
        for line in lines:
            k = line[9:12]
            if k == b"mes":
                i = line[24:40]
                if i > self.last_id:
                    self.last_id = i
                    self.received += 1
                else:
                    self.repeats += 1
                last = i
                pushes += 1
                if in_window and g.lat and (g.lat == 1 or not self.received & 15):
                    p = line.rfind(b"-")
                    try:
                        lat = now_us - int(line[p + 1:-2])
                    except ValueError:
                        lat = None
                    if lat is not None:
                        b = bucket(lat)
                        g.hist[b] = g.hist.get(b, 0) + 1
            elif k == b"rec" and line[12:16] == b"eipt":  # a receipt (1.2), not
                # "reconnected": a push to ack, not a message
                i = line[24:40]
                if i > self.last_id:
                    self.last_id = i
                g.receipts += 1
                last = i
                pushes_any += 1
            elif k == b"acc":
                replies += 1
                r = self.out.popleft()
                if g.ref_mode:
                    self._ref_reply(line, r)
                else:
                    g.accepted[r] += 1
            elif k == b"dup":
                replies += 1
                r = self.out.popleft()
                g.duplicates += 1
                if g.ref_mode:
                    self._ref_reply(None, r)
            elif line:
                replies += self.other(line)
        if pushes:
            g.pushes += pushes
            if in_window:
                g.win_delivered += pushes
            if self.expected is not None and self.received >= self.expected:
                g.satisfied(self)
        if replies:
            g.replies += replies
            g.inflight -= replies
            if in_window:
                g.win_replies += replies
        if g.ack_every > 1 and last is not None:
            # ack every ack_every pushes (messages and receipts), not every read
            self.unacked += pushes + pushes_any
            if self.unacked < g.ack_every:
                last = None
            else:
                self.unacked = 0
        out = b'{"ack":"%s"}\n' % last if last is not None else b""
        if replies and g.closed_loop and g.sending:
            out += self.sends(replies, now_us)
        if out:
            self.put(out)
        if replies and not g.sending and not g.inflight:
            g.quiet()
        if self.drain is not None and pushes:
            self.drain_read(now_us)

    def put(self, data):
        """Write now when nothing is queued on the transport: saves a reactor
        turn and two epoll_ctl calls per write (and the send time in a message
        is then its write time); otherwise queue behind what is there."""
        t = self.transport
        if (t._tempDataBuffer or t.offset < len(t.dataBuffer) or not t.connected
                or t.disconnecting):
            t.write(data)
            return
        try:
            n = t.socket.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            t.write(data)  # let Twisted find and report the error
            return
        if n < len(data):
            t.write(data[n:])

    def sends(self, n, now_us):
        """n message lines to random peers (and their bookkeeping)."""
        g = self.gen
        if g.budget is not None:
            n = min(n, g.budget)
            g.budget -= n
            if not g.budget:
                g.sending = False
        ids, peers, out = g.ids, g.peers, self.out
        parts = []
        if g.ref_mode:
            pool = self.retry
            for _ in range(n):
                p = pool[random.randrange(len(pool))]
                self.refq.append(p)
                out.append(p[0])
                parts.append(b'{"message":"%s","receiver":"%s","ref":%d}\n'
                             % (p[2], ids[p[0]], p[1]))
        else:
            wid, me, npeers = g.wid, self.idx, g.npeers
            for _ in range(n):
                g.pi = pi = (g.pi + 1) & 0xFFFF
                r = peers[pi]
                if r == me and npeers > 1:
                    r = peers[(pi + 1) & 0xFFFF]
                    if r == me:
                        r = (me + 1) % npeers
                if g.pairs and (me ^ 1) < len(ids):
                    r = me ^ 1  # conversations: each device talks to one peer
                g.seq += 1
                if g.text_pool:
                    parts.append(b'{"message":"dup %d","receiver":"%s"}\n'
                                 % (g.seq % g.text_pool, ids[r]))
                else:
                    parts.append(b'{"message":"%d.%d-%d","receiver":"%s"}\n'
                                 % (wid, g.seq, now_us, ids[r]))
                out.append(r)
        g.inflight += n
        g.sent += n
        if g.w0_us <= now_us < g.w1_us:
            g.win_sent += n
        return b"".join(parts)

    def _ref_reply(self, line, r):
        """A reply to a send with a ref: the first one keeps the accepted id
        (and counts as a push to expect); a retry must get that same id."""
        p = self.refq.popleft()
        g = self.gen
        sid = line[25:41] if line is not None else None
        if p[3] is None:
            p[3] = sid if sid is not None else False
            if sid is not None:
                g.accepted[r] += 1
        elif sid is not None and sid == p[3]:
            g.ref_match += 1
        else:
            g.ref_mismatch += 1

    def other(self, line):
        """Everything but pushes and accepted/duplicate; 1 if it answers a send."""
        g = self.gen
        try:
            obj = json.loads(line)
        except ValueError:
            g.count_error("unparsable:" + line[:40].decode("utf-8", "replace"))
            return 0
        t = obj.get("type")
        if t == "error":
            code = obj.get("code", "?")
            g.count_error(code)
            if code.encode() in _NOT_A_SEND_REPLY or (
                    code == "unavailable" and obj.get("reason", "").startswith("the ack of")):
                return 0
            if self.waiter is not None:
                w, self.waiter = self.waiter, None
                w.callback(obj)
                return 0
            if self.out:
                self.out.popleft()
                if g.ref_mode and self.refq:
                    p = self.refq.popleft()
                    if p[3] is None:
                        p[3] = False  # a first send that failed: not retried
                    else:
                        g.ref_mismatch += 1
                return 1
            return 0
        if t == "pong" and obj.get("ping") == "barrier":
            g.barrier_pong(self)
            return 0
        if t == "ping":
            self.transport.write(b'{"ping":"keepalive"}\n')
            return 0
        if t in ("registered", "reconnected", "pong"):
            if t == "registered":
                self.token = obj["token"]
            if self.drain is not None and t == "reconnected":
                self.drain["pending"] = obj.get("pending")
                self.drain["t_reply"] = _mono_ns() // 1000
            if self.waiter is not None:
                w, self.waiter = self.waiter, None
                w.callback(obj)
            return 0
        g.count_error("unexpected:" + str(t))
        return 0

    def request(self, line):
        """Write a setup-style packet; Deferred of its reply (a dict)."""
        self.waiter = d = defer.Deferred()
        self.transport.write(line)
        return d

    def drain_read(self, now_us):
        d = self.drain
        if self.received >= d["expect"] and "t_last" not in d:
            d["t_last"] = now_us
            self.gen.drained(self)


class DeviceFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, gen, idx):
        self.gen = gen
        self.idx = idx

    def buildProtocol(self, addr):
        p = Device(self.gen, self.idx)
        p.factory = self
        return p

    def clientConnectionFailed(self, connector, reason):
        self.gen.connect_failed(self.idx, reason)


class Generator:
    """One worker's state; driven by :class:`Control`."""

    def __init__(self, emit):
        self.emit = emit
        self.devices = {}
        self.sending = False
        self.closed_loop = True
        self.ref_mode = False
        self.text_pool = 0
        self.lat = 0         # latency samples: 0 none, 1 every push, 16 one in 16
        self.ack_every = 1   # ack after this many pushes (1: every read)
        self.pairs = False   # each device sends to its pair (idx ^ 1) only
        self.receipts = 0    # receipt pushes received
        self.opt_in = b""    # b',"receipts":"true"': register opting in (1.2)
        self.budget = None   # sends left (fill), None: unlimited
        self._sent_d = None
        self.w0_us = self.w1_us = 1 << 62
        self.pi = 0
        self.seq = 0
        self.errors = {}
        self.stopping = False  # quitting: lost connections are not errors
        self.reset_counters()

    def reset_counters(self):
        self.inflight = 0
        self.sent = self.replies = self.pushes = self.duplicates = 0
        self.win_sent = self.win_replies = self.win_delivered = 0
        self.ref_match = self.ref_mismatch = 0
        self.hist = {}
        self.cpu0 = self.cpu1 = None
        self.t_cpu0 = self.t_cpu1 = None
        self._satisfied = None
        self._barrier = None

    def count_error(self, code):
        self.errors[code] = self.errors.get(code, 0) + 1

    # -- setup: connect and register -----------------------------------------------------

    def setup(self, cfg):
        self.cfg = cfg
        self.wid = cfg["wid"]
        self.host, self.port = cfg["host"], cfg["port"]
        n = cfg["devices"]
        self.npeers = n
        self.ids = [b"%s%06d" % (cfg["prefix"].encode(), i) for i in range(n)]
        self.lo, self.hi = cfg["lo"], cfg["hi"]
        self.accepted = [0] * n
        rnd = random.Random(cfg.get("seed", self.wid))
        # peers: any device, or a range (the nodes scenario: the devices on
        # the other node)
        plo, phi = cfg.get("peer_lo", 0), cfg.get("peer_hi", n)
        self.peers = [rnd.randrange(plo, phi) for _ in range(1 << 16)]
        self.fd_limit = raise_fd_limit()
        self._todo = iter(range(self.lo, self.hi))
        self._pending = 0
        self._registered = 0
        self._failed = 0
        self._setup_d = defer.Deferred()
        self._t_setup = _mono()
        self._cpu_setup = proc_cpu()
        self.register = cfg.get("register", True)
        self.ack_every = cfg.get("ack_every", 1)
        self.pairs = cfg.get("pairs", False)
        if cfg.get("receipts"):
            self.opt_in = b',"receipts":"true"'
        for _ in range(max(1, cfg.get("concurrency", 25))):
            self._next_connect()
        if self.lo >= self.hi:
            self._setup_d.callback(None)
        return self._setup_d

    def _next_connect(self):
        for idx in self._todo:
            self._pending += 1
            reactor.connectTCP(self.host, self.port, DeviceFactory(self, idx), timeout=30)
            return

    def connected(self, dev):
        drain = self.devices.get(dev.idx)
        if drain is not None and drain.drain is not None and drain is not dev:
            # drain mode: the reconnecting connection of an offline device
            dev.drain = drain.drain
            self.devices[dev.idx] = dev
            dev.received = 0
            dev.expected = None
            dev.drain["t_write"] = _mono_ns() // 1000
            dev.transport.write(b'{"reconnect":"true","sender":"%s","token":"%s"}\n'
                                % (dev.did, drain.token.encode()))
            return
        self.devices[dev.idx] = dev
        if not self.register:
            return self._setup_step(True)
        d = dev.request(b'{"register":"true","sender":"%s"%s}\n' % (dev.did, self.opt_in))
        d.addCallback(lambda reply: self._setup_step(reply.get("type") == "registered"))

    def connect_failed(self, idx, reason):
        self.count_error("connect_failed: %s" % reason.getErrorMessage()[:80])
        self._setup_step(False)

    def _setup_step(self, ok):
        self._pending -= 1
        if ok:
            self._registered += 1
        else:
            self._failed += 1
        self._next_connect()
        if not self._pending and not self._setup_d.called:
            self._setup_d.callback(None)

    def device_lost(self, dev, reason):
        if self.devices.get(dev.idx) is dev and not self.stopping and not dev.closing:
            self.count_error("connection_lost")
        if dev.waiter is not None:
            w, dev.waiter = dev.waiter, None
            w.callback({"type": "lost"})
        if self._barrier is not None and dev in self._barrier[1]:
            self.barrier_pong(dev)

    def ready_event(self):
        secs = _mono() - self._t_setup
        return {"event": "ready", "registered": self._registered, "failed": self._failed,
                "seconds": round(secs, 3), "fd_limit": self.fd_limit,
                "cpu": round(proc_cpu() - self._cpu_setup, 3), "errors": self.errors}

    # -- go: the measured run -----------------------------------------------------

    def go(self, cmd):
        self.reset_counters()
        self.closed_loop = cmd["mode"] in ("closed", "dedup", "refs")
        self.ref_mode = cmd["mode"] == "refs"
        self.text_pool = cmd.get("text_pool", 0) if cmd["mode"] == "dedup" else 0
        self.lat = {"rate": 1, "closed": 16}.get(cmd["mode"], 0)
        self.budget = None
        start, w0, w1 = cmd["start"], cmd["w0"], cmd["w1"]
        self.w0_us, self.w1_us = int(w0 * 1e6), int(w1 * 1e6)
        self._sent_d = defer.Deferred()
        self._loop = None
        now = _mono()
        reactor.callLater(max(0, start - now), self._begin, cmd)
        reactor.callLater(max(0, w0 - now), self._cpu_mark, 0)
        reactor.callLater(max(0, w1 - now), self._end)
        return self._sent_d

    def _begin(self, cmd):
        self.sending = True
        local = [d for d in self.devices.values() if not d.lost]
        now_us = _mono_ns() // 1000
        if self.closed_loop:
            window = cmd["window"]
            for dev in local:
                if self.ref_mode:
                    # retry only what was accepted the first time
                    dev.retry = [p for p in dev.primed if p[3]]
                    if not dev.retry:
                        continue
                dev.put(dev.sends(window, now_us))
        else:
            self._rate = cmd["rate"]
            self._local = local
            self._t_rate = _mono()
            self._rr = 0
            self._sent_rate = 0
            self._late = 0
            self._loop = task.LoopingCall(self._tick)
            self._loop.start(cmd.get("tick", 0.001))

    def _tick(self):
        now = _mono()
        due = int((now - self._t_rate) * self._rate) - self._sent_rate
        if due <= 0:
            return
        if due > self._rate * 0.01:
            self._late += 1  # more than 10 ms of sends were due at once
        self._sent_rate += due
        local = self._local
        n = len(local)
        per = {}
        for _ in range(due):
            dev = local[self._rr % n]
            self._rr += 1
            per[dev] = per.get(dev, 0) + 1
        now_us = _mono_ns() // 1000
        for dev, k in per.items():
            dev.put(dev.sends(k, now_us))

    def _cpu_mark(self, which):
        if which == 0:
            self.cpu0, self.t_cpu0 = proc_cpu(), _mono()
        else:
            self.cpu1, self.t_cpu1 = proc_cpu(), _mono()

    def _end(self):
        self._cpu_mark(1)
        self.sending = False
        if not self.closed_loop and self._loop is not None and self._loop.running:
            self._loop.stop()
        if not self.inflight:
            self.quiet()

    def quiet(self):
        d, self._sent_d = self._sent_d, None
        if d is not None:
            d.callback(None)

    def sent_event(self):
        acc = {i: c for i, c in enumerate(self.accepted) if c}
        return {"event": "sent", "accepted": acc, "sent": self.sent,
                "replies": self.replies, "inflight": self.inflight}

    # -- expect: wait for every accepted message to arrive -------------------------

    def expect(self, counts):
        self._satisfied = d = defer.Deferred()
        self._unsatisfied = set()
        for idx, dev in self.devices.items():
            dev.expected = counts.get(idx, 0) + dev.received_before
            if dev.received < dev.expected:
                self._unsatisfied.add(dev)
        if not self._unsatisfied:
            self._satisfied = None
            d.callback(None)
        return d

    def satisfied(self, dev):
        u = self._satisfied and self._unsatisfied
        if u and dev in u:
            u.discard(dev)
            if not u:
                d, self._satisfied = self._satisfied, None
                d.callback(None)

    def barrier(self):
        """A ping on every live device; fires when all pongs are back."""
        live = {d for d in self.devices.values() if not d.lost}
        d = defer.Deferred()
        self._barrier = (d, live)
        for dev in list(live):
            dev.transport.write(b'{"ping":"barrier"}\n')
        if not live:
            self._barrier = None
            d.callback(None)
        return d

    def barrier_pong(self, dev):
        if self._barrier is None:
            return
        d, live = self._barrier
        live.discard(dev)
        if not live:
            self._barrier = None
            d.callback(None)

    def done_event(self, timed_out):
        lost = extra = repeats = received = expected = 0
        for dev in self.devices.values():
            exp = dev.expected or 0
            got = dev.received - dev.received_before
            received += got
            expected += exp - dev.received_before
            if dev.received < exp:
                lost += exp - dev.received
            elif dev.received > exp:
                extra += dev.received - exp
            repeats += dev.repeats
        cpu = None
        if self.cpu0 is not None and self.cpu1 is not None and self.t_cpu1 > self.t_cpu0:
            cpu = (self.cpu1 - self.cpu0) / (self.t_cpu1 - self.t_cpu0)
        ev = {"event": "done", "timed_out": timed_out, "received": received,
              "expected": expected, "lost": lost, "extra": extra, "repeats": repeats,
              "sent": self.sent, "replies": self.replies, "duplicates": self.duplicates,
              "win_sent": self.win_sent, "win_replies": self.win_replies,
              "win_delivered": self.win_delivered, "cpu": cpu,
              "hist": self.hist, "errors": self.errors,
              "ref_match": self.ref_match, "ref_mismatch": self.ref_mismatch,
              "receipts": self.receipts}
        if not self.closed_loop and hasattr(self, "_late"):
            ev["late_ticks"] = self._late
        return ev

    # -- refs: a first send with a ref, to be retried in the measured run -------------

    def prime(self, n):
        d = self._sent_d = defer.Deferred()
        self.ref_mode = True
        self.sending = False
        now_us = _mono_ns() // 1000
        for dev in self.devices.values():
            parts = []
            for k in range(n):
                self.pi = pi = (self.pi + 1) & 0xFFFF
                r = self.peers[pi]
                if r == dev.idx:
                    r = (r + 1) % self.npeers
                text = b"%d.%d-%d" % (self.wid, dev.idx * n + k, now_us)
                p = [r, k + 1, text, None]
                dev.primed.append(p)
                dev.refq.append(p)
                dev.out.append(r)
                parts.append(b'{"message":"%s","receiver":"%s","ref":%d}\n'
                             % (text, self.ids[r], k + 1))
            self.inflight += n
            self.sent += n
            dev.put(b"".join(parts))
        if not self.inflight:
            self.quiet()
        return d

    def primed_event(self):
        # the first reply of each primed packet: keep the accepted id
        ok = sum(1 for dev in self.devices.values() for p in dev.primed if p[3] is not None)
        ev = self.sent_event()
        ev.update(event="primed", primed_ok=ok)
        return ev

    # -- drain: messages stored for an offline device ---------------------------------

    def fill(self, n, window):
        """Device lo is the offline receiver, lo+1 the sender: close the
        receiver, then send it n messages (window at a time); fires when all
        are answered."""
        rcv, snd = self.devices[self.lo], self.devices[self.lo + 1]
        rcv.drain = {"expect": None}
        rcv.closing = True
        d = self._sent_d = defer.Deferred()
        gone = rcv.on_lost = defer.Deferred()
        rcv.transport.loseConnection()

        def start(_):
            self.closed_loop = True
            self.ref_mode = False
            self.text_pool = 0
            self.lat = 0
            self.peers = [rcv.idx] * (1 << 16)
            self.budget = n
            self.sending = True
            snd.put(snd.sends(window, _mono_ns() // 1000))
        gone.addCallback(start)
        return d

    def drain_start(self, expect):
        rcv = self.devices[self.lo]
        rcv.drain["expect"] = expect
        self._drain_d = defer.Deferred()
        reactor.connectTCP(self.host, self.port, DeviceFactory(self, self.lo), timeout=30)
        return self._drain_d

    def drained(self, dev):
        d, self._drain_d = self._drain_d, None
        if d is not None:
            d.callback(dev)

    def stop_all(self):
        self.stopping = True
        for dev in list(self.devices.values()):
            if not dev.lost and dev.transport is not None:
                dev.transport.abortConnection()


class Control(LineReceiver):
    """The suite's commands on stdin; events on stdout."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 26

    def __init__(self):
        self.gen = Generator(self.emit)

    def emit(self, obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def connectionLost(self, reason):
        self.quit()

    def quit(self):
        if reactor.running:
            self.gen.stop_all()
            reactor.callLater(0, reactor.stop)

    def lineReceived(self, line):
        try:
            cmd = json.loads(line)
            name = cmd["cmd"]
            d = getattr(self, "cmd_" + name)(cmd)
            if isinstance(d, defer.Deferred):
                d.addErrback(self.failed)
        except Exception:
            self.failed(None)

    def failed(self, f):
        text = f.getTraceback() if f is not None else traceback.format_exc()
        self.emit({"event": "error", "message": text})

    def _within(self, d, seconds, what):
        """d, or a timeout after seconds: fires with True when it timed out."""
        timed_out = defer.Deferred()
        call = reactor.callLater(seconds, lambda: timed_out.called or timed_out.callback(True))

        def fired(result):
            if call.active():
                call.cancel()
            if not timed_out.called:
                timed_out.callback(False)
            return result
        d.addBoth(fired)
        return timed_out

    def cmd_setup(self, cmd):
        d = self.gen.setup(cmd)
        return self._within(d, cmd.get("deadline", 120), "setup").addCallback(
            lambda t: self.emit(dict(self.gen.ready_event(), timed_out=t)))

    def cmd_go(self, cmd):
        g = self.gen
        d = g.go(cmd)
        # the deadline runs from the end of the window
        wait = cmd["w1"] - _mono() + cmd.get("deadline", 30)
        return self._within(d, wait, "replies").addCallback(
            lambda t: self.emit(dict(g.sent_event(), timed_out=t)))

    def cmd_expect(self, cmd):
        g = self.gen
        counts = {int(k): v for k, v in cmd["counts"].items()}
        deadline = cmd.get("deadline", 30)
        t_end = _mono() + deadline
        state = {}

        def after_expect(timed_out):
            state["timed_out"] = timed_out
            left = max(1.0, t_end - _mono())
            return self._within(g.barrier(), left, "barrier")

        d = self._within(g.expect(counts), deadline, "delivery").addCallback(after_expect)
        return d.addCallback(lambda t: self.emit(g.done_event(state["timed_out"] or t)))

    def cmd_mark(self, cmd):
        """Start counting deliveries afresh (a new run on the same devices)."""
        for dev in self.gen.devices.values():
            dev.received_before = dev.received
            dev.expected = None
        self.gen.accepted = [0] * self.gen.npeers
        self.gen.errors = {}
        self.emit({"event": "marked"})

    def cmd_prime(self, cmd):
        g = self.gen
        d = g.prime(cmd["refs"])
        return self._within(d, cmd.get("deadline", 30), "prime").addCallback(
            lambda t: self.emit(dict(g.primed_event(), timed_out=t)))

    def cmd_fill(self, cmd):
        g = self.gen
        n = cmd["n"]
        t0 = _mono()
        d = g.fill(n, cmd.get("window", 200))
        return self._within(d, cmd.get("deadline", 120), "fill").addCallback(
            lambda t: self.emit({"event": "filled", "timed_out": t,
                                 "accepted": g.accepted[g.lo], "sent": g.sent,
                                 "seconds": _mono() - t0, "errors": g.errors}))

    def cmd_drain(self, cmd):
        g = self.gen
        cpu0 = proc_cpu()
        d = g.drain_start(cmd["expect"])

        def report(timed_out):
            dev = g.devices[g.lo]
            info = dev.drain or {}
            t_write = info.get("t_write")
            ev = {"event": "drained", "timed_out": timed_out, "received": dev.received,
                  "repeats": dev.repeats, "pending": info.get("pending"),
                  "errors": g.errors, "cpu": proc_cpu() - cpu0}
            if t_write is not None and "t_last" in info:
                ev["seconds"] = (info["t_last"] - t_write) / 1e6
            if t_write is not None and "t_reply" in info:
                ev["reply_seconds"] = (info["t_reply"] - t_write) / 1e6
            self.emit(ev)
        return self._within(d, cmd.get("deadline", 120), "drain").addCallback(report)

    def cmd_quit(self, cmd):
        self.emit({"event": "bye"})
        self.quit()


def main():
    control = Control()
    stdio.StandardIO(control)
    reactor.run()


if __name__ == "__main__":
    main()
