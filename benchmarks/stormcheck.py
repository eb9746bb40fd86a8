"""
The storm's half of the generator (:mod:`benchmarks.stormgen`): ``fill``
(k messages waiting for every device, each send that was answered
``unavailable`` sent again with its ref), ``arm`` and the judging of each
push by id (:meth:`StormChecks.storm_push`), the control connection's
pings, and ``report``. A mixin of :class:`benchmarks.stormgen.Gen`, whose
connections (``conns``, ``connect``, ``did``, ``count``) it uses.
"""

import collections
import random

from benchmarks.loadgen import _mono, bucket
from twisted.internet import defer, reactor, task

#: reconnect back-off after a refused or lost connection (s), doubling, jittered
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 2.0
#: sends of one fill message answered unavailable before it is given up
FILL_TRIES = 10


class StormChecks:
    # -- fill: k messages waiting for every device ----------------------------------------

    def fill(self, cfg):
        """Each device sends k messages to the next device of the block (texts
        f0..f<k-1>), at most ``window`` senders at a time; nobody acks."""
        self.mode = "fill"
        self.k = cfg.get("k", self.k)
        self._fill_todo = iter(sorted(i for i in self.conns if i >= 0))
        self._fill_d = defer.Deferred()
        self._fill_out = {}
        self.filled = 0
        self._fill_retry = 0
        self._fill_tries = {}  # (idx, message) -> sends answered unavailable
        self.expect = {}      # receiver idx -> the ids of its messages accepted (in order)
        self.fills = getattr(self, "fills", 0) + 1
        for _ in range(cfg.get("window", 200)):
            self._fill_next()
        if not self._fill_out:
            self._fill_done()
        reactor.callLater(cfg.get("deadline", 600), self._fill_done, True)
        return self._fill_d

    def succ(self, idx):
        return self.lo + (idx - self.lo + 1) % (self.hi - self.lo)

    def _fill_line(self, dev, i):
        # the run's number in the text: a fill within the dedup window of the
        # last one must not be a duplicate; the ref makes a send again after
        # unavailable safe (it gets the first one's id if that was stored)
        return b'{"message":"f%d.%d","receiver":"%s","ref":"f%d.%d"}\n' % (
            i, self.fills, self.did(self.succ(dev.idx)), i, self.fills)

    def _fill_next(self):
        for idx in self._fill_todo:
            dev = self.conns.get(idx)
            if dev is None:
                self.count("fill:not_connected")
                continue
            # the messages whose reply is awaited, in the order sent (a
            # connection's replies come in that order), and how many settled
            self._fill_out[idx] = [collections.deque(range(self.k)), 0]
            dev.transport.write(b"".join(self._fill_line(dev, i) for i in range(self.k)))
            return
        if not self._fill_out:
            self._fill_done()

    def _fill_settled(self, dev, out):
        out[1] += 1
        if out[1] >= self.k:
            del self._fill_out[dev.idx]
            self._fill_next()

    def fill_accepted(self, dev, sid=None):
        out = self._fill_out.get(dev.idx)
        if out is None or not out[0]:
            return
        out[0].popleft()
        self.filled += 1
        if sid is not None:
            # the storm judges by these ids: each pushed once per connection,
            # in rising order, all of them; anything older than the first was
            # left unacked by an earlier run
            self.expect.setdefault(self.succ(dev.idx), []).append(sid)
        self._fill_settled(dev, out)

    def fill_failed(self, dev, again=True):
        """A send answered unavailable: sent again a little later, as a phone
        does (up to FILL_TRIES times); a duplicate: given up."""
        out = self._fill_out.get(dev.idx)
        if out is None or not out[0]:
            return
        i = out[0].popleft()
        self._fill_retry += 1
        tries = self._fill_tries[(dev.idx, i)] = self._fill_tries.get((dev.idx, i), 0) + 1
        if not again or tries >= FILL_TRIES:
            self.count("fill:given_up")
            self.filled += 1
            self._fill_settled(dev, out)
            return

        def resend():
            if self._fill_out.get(dev.idx) is out and self.conns.get(dev.idx) is dev:
                out[0].append(i)
                dev.transport.write(self._fill_line(dev, i))
            else:
                self.count("fill:lost_connection")
        reactor.callLater(random.uniform(0.2, 1.0), resend)

    def _fill_done(self, timed_out=False):
        d, self._fill_d = self._fill_d, None
        if d is not None:
            self.mode = "idle"
            out = sorted(self._fill_out.items())[:5]
            d.callback({"event": "filled", "accepted": self.filled, "timed_out": timed_out,
                        "unanswered": [(i, len(o[0]), i in self.conns) for i, o in out],
                        "unavailable": self._fill_retry, "errors": self.errors})

    # -- the storm: every device comes back and drains ---------------------------------

    def arm(self, cfg):
        self.armed = True
        self.mode = "storm"
        self.k = cfg.get("k", self.k)
        self.errors = {}
        expect = getattr(self, "expect", {})
        self.state = {idx: {"want": frozenset(expect.get(idx, ())), "got": set(),
                            "first": min(expect.get(idx, ()) or [b""]),
                            "t_conn": None, "t_bound": None, "t_first": None,
                            "t_done": None, "attempts": 0}
                      for idx in range(self.lo, self.hi)}
        # a device none of whose fill sends was accepted (each answered
        # unavailable: the store was saturated by the fill) has nothing to
        # wait for: it is not counted (``nothing_waiting``)
        self.waiting = sum(1 for st in self.state.values() if st["want"])
        self.repeats = self.disorder = self.others = self.drops = self.again = 0
        self.leftover = self.unconfirmed = 0
        self.first_hist = {}
        self.bind_hist = {}
        self.done_count = 0
        self._report_d = None
        self.ctl_idx = set()
        self.ctl = None
        self.ping_every = cfg.get("ping_every", 0)
        self.pings = {}
        self.rtts = []
        if self.ping_every:
            self.ctl_idx = {-1}
            self._ctl_connect()
        return {"event": "armed"}

    def retry(self, idx, why, come_back=None):
        st = self.state.get(idx)
        if st is None:
            return
        st["attempts"] += 1
        if come_back is not None:
            delay = come_back
        else:
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(st["attempts"], 6))
            delay *= random.uniform(0.5, 1.5)
        reactor.callLater(delay, self.connect, idx)

    def storm_made(self, dev):
        if dev.idx in self.ctl_idx:
            self.ctl = dev
            return
        st = self.state[dev.idx]
        dev.storm = True
        st["t_conn"] = _mono()
        st["t_bound"] = None
        dev.last = b""   # the highest id pushed on this connection
        dev.got = set()  # the fill's ids pushed on this connection (unacked: all again)
        dev.transport.write(b'{"reconnect":"true","sender":"%s","token":"%s"}\n'
                            % (self.did(dev.idx), self.tokens[dev.idx]))

    def storm_reply(self, dev, obj):
        t = obj["type"]
        st = self.state.get(dev.idx)
        if st is None:
            return
        if t == "reconnected":
            st["t_bound"] = now = _mono()
            b = bucket(int((now - st["t_conn"]) * 1e6))
            self.bind_hist[b] = self.bind_hist.get(b, 0) + 1
            if obj.get("token"):
                self.tokens[dev.idx] = obj["token"].encode()
            return
        code = obj.get("code", "?")
        self.count(code)
        if code == "shutdown":
            ms = obj.get("retry_after_ms")
            dev.come_back = ms / 1000.0 if isinstance(ms, int) else None
        elif code == "unavailable" and st["t_bound"] is None and not obj.get(
                "reason", "").startswith("the ack of"):
            # the reconnect was not answered: again, a little later
            reactor.callLater(random.uniform(0.1, 0.5), self._again, dev)
        elif code == "unavailable" and st["t_done"] is not None:
            reactor.callLater(random.uniform(0.1, 0.5), self._ack_again, dev)

    def _again(self, dev):
        if self.conns.get(dev.idx) is dev:
            dev.transport.write(b'{"reconnect":"true","sender":"%s","token":"%s"}\n'
                                % (self.did(dev.idx), self.tokens[dev.idx]))

    def _ack_again(self, dev):
        if self.conns.get(dev.idx) is dev and dev.last_ack:
            dev.transport.write(b'{"ack":"%s"}\n' % dev.last_ack)

    def storm_push(self, dev, line):
        """Judged by id (the text only says it is a fill's): on one connection
        each id once and rising; the device is done when one connection has
        had every id its fill was accepted with, and acks the highest."""
        st = self.state.get(dev.idx)
        if st is None or line.rfind(b'"message":"f') < 0:
            self.others += 1
            return
        sid = line[24:40]
        if sid < st["first"]:
            self.leftover += 1
            return
        now = _mono()
        if st["t_first"] is None and st["t_conn"] is not None:
            st["t_first"] = now
            us = int((now - st["t_conn"]) * 1e6)
            b = bucket(us)
            self.first_hist[b] = self.first_hist.get(b, 0) + 1
        if sid <= dev.last:
            if sid in dev.got or sid == dev.last:
                self.repeats += 1
            else:
                self.disorder += 1
            return
        dev.last = sid
        if sid not in st["want"]:
            # a send answered unavailable may still have been stored
            self.unconfirmed += 1
        else:
            dev.got.add(sid)
            st["got"].add(sid)
        if len(dev.got) >= len(st["want"]):
            dev.last_ack = dev.last
            dev.transport.write(b'{"ack":"%s"}\n' % dev.last_ack)
            if st["t_done"] is not None:
                self.again += 1
                return
            st["t_done"] = now
            self.done_count += 1
            if self.done_count >= self.waiting and self._report_d is not None:
                self._report()

    # -- the control connection: pings during the storm ------------------------------

    def _ctl_connect(self):
        src = self.sources[0]
        reactor.connectTCP(self.host, self.ports[0], self.control_factory(), timeout=30,
                           bindAddress=(src, 0))

    def ctl_lost(self, dev):
        self.ctl = None
        reactor.callLater(0.1, self._ctl_connect)

    def ctl_tick(self):
        if self.ctl is None:
            return
        self._ping_seq = getattr(self, "_ping_seq", 0) + 1
        tag = "c%d" % self._ping_seq
        self.pings[tag] = _mono()
        self.ctl.transport.write(b'{"ping":"%s"}\n' % tag.encode())

    def ctl_pong(self, tag):
        t = self.pings.pop(tag, None)
        if t is not None:
            self.rtts.append((round(t, 4), round(_mono() - t, 5)))

    def report(self, cfg):
        self._report_d = d = defer.Deferred()
        if self.ping_every:
            self._ctl_loop = task.LoopingCall(self.ctl_tick)
            self._ctl_loop.start(self.ping_every)
        if self.done_count >= self.waiting:
            reactor.callLater(0, self._report)
        reactor.callLater(cfg.get("deadline", 180), self._report, True)
        return d

    def _report(self, timed_out=False):
        d, self._report_d = self._report_d, None
        if d is None:
            return
        if self.ping_every and self._ctl_loop.running:
            self._ctl_loop.stop()
        self.ctl_idx = set()
        if self.ctl is not None:
            self.ctl.closing = True
            self.ctl.transport.loseConnection()
            self.ctl = None
        now = _mono()
        # pings never answered count as answered now (a lower bound)
        rtts = self.rtts + [(round(t, 4), round(now - t, 5)) for t in self.pings.values()]
        self.armed = False
        self.mode = "idle"
        done = [st["t_done"] for st in self.state.values() if st["t_done"] is not None]
        lost = sum(len(st["want"] - st["got"]) for st in self.state.values())
        d.callback({"event": "storm", "timed_out": timed_out, "devices": self.waiting,
                    "nothing_waiting": len(self.state) - self.waiting,
                    "done": len(done), "t_done": done, "lost": lost,
                    "repeats": self.repeats, "out_of_order": self.disorder,
                    "others": self.others, "drops": self.drops, "again": self.again,
                    "leftover": self.leftover, "unconfirmed": self.unconfirmed,
                    "first_hist": self.first_hist,
                    "bind_hist": self.bind_hist,
                    "attempts": sum(st["attempts"] for st in self.state.values()),
                    "ping_rtts": rtts, "errors": self.errors})

    def stop_all(self):
        self.stopping = True
        for dev in list(self.conns.values()):
            dev.transport.abortConnection()
        if self.ctl is not None:
            self.ctl.transport.abortConnection()
