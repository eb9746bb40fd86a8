"""
The generator of the connections and storm scenarios (:mod:`benchmarks.storm`):
one process holding a block of mostly idle devices, like phones in pockets.

It speaks the raw line protocol (no chatd imports) and is driven, like
:mod:`benchmarks.loadgen`, by one JSON object a line on stdin, answering with
events on stdout. Each device is one connection from one of the worker's
source addresses in 127.0.0.0/8 (attempts take them in turn, so that
ephemeral ports, TIME_WAIT included, never run out at 80,000 connections).

``setup``      connect and register the devices -> ``ready``
``reconnect``  close every device and reconnect it with its token -> ``reconnected``
``live``       device ``lo`` sends to ``lo + step`` at a fixed rate (its send time
               in the text), the receiver acks each read -> ``lived`` (latency)
``fill``       every device sends ``k`` messages (``f0.N``.., N the fill's number) to the next device of
               the block; nobody acks (they stay waiting) -> ``filled``
``arm``        from now on a lost connection comes back by itself (backing off
               when refused, after ``retry_after_ms`` when told ``shutdown``); on
               each new connection a device reconnects, checks that it gets
               ``f0``.. in order, each once, and acks the last; a control
               connection pings every ``ping_every`` s -> ``armed``
``report``     wait until every device has all ``k`` (or the deadline) -> ``storm``
``cpu``        this process's CPU seconds -> ``cpu``
``quit``       abort every connection and exit (so does EOF on stdin)

Times are ``time.monotonic`` (the same clock in every process of the run).
"""

import json
import random
import sys

from benchmarks import loadgen
from benchmarks.loadgen import _mono, _mono_ns, bucket, proc_cpu, raise_fd_limit
from benchmarks.stormcheck import StormChecks
from twisted.internet import defer, protocol, reactor, stdio, task



class Dev(protocol.Protocol):
    """One device's connection."""

    def __init__(self, gen, idx):
        self.gen = gen
        self.idx = idx
        self.buf = b""
        self.waiter = None

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.gen.made(self)

    def connectionLost(self, reason):
        self.gen.lost(self)
        if self.waiter is not None:
            w, self.waiter = self.waiter, None
            w.callback({"type": "lost"})

    def dataReceived(self, data):
        if self.buf:
            data = self.buf + data
        lines = data.split(b"\n")
        self.buf = lines.pop()
        g = self.gen
        last = None
        for line in lines:
            if line[9:12] == b"mes":
                last = line[24:40]
                g.push(self, line)
            elif line:
                g.other(self, line)
        if last is not None and g.acking(self):
            self.transport.write(b'{"ack":"%s"}\n' % last)

    def request(self, line):
        self.waiter = d = defer.Deferred()
        self.transport.write(line)
        return d


class Factory(protocol.ClientFactory):
    noisy = False

    def __init__(self, gen, idx):
        self.gen, self.idx = gen, idx

    def buildProtocol(self, addr):
        return Dev(self.gen, self.idx)

    def clientConnectionFailed(self, connector, reason):
        self.gen.failed(self.idx, reason)


class _CtlFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, gen):
        self.gen = gen

    def buildProtocol(self, addr):
        return Dev(self.gen, -1)

    def clientConnectionFailed(self, connector, reason):
        reactor.callLater(0.1, self.gen._ctl_connect)


class Gen(StormChecks):
    def __init__(self, emit):
        self.emit = emit
        self.errors = {}
        self.conns = {}        # idx -> live Dev
        self.tokens = {}       # idx -> newest token (bytes)
        self.attempt = 0
        self.armed = False
        self.mode = "idle"     # idle | live | fill | storm
        self.stopping = False

    def count(self, what):
        self.errors[what] = self.errors.get(what, 0) + 1

    def control_factory(self):
        return _CtlFactory(self)

    # -- connecting ---------------------------------------------------------------

    def setup(self, cfg):
        self.host = cfg["host"]
        self.ports = cfg["ports"]
        self.sources = cfg["sources"]
        self.prefix = cfg["prefix"].encode()
        self.lo, self.hi = cfg["lo"], cfg["hi"]
        self.k = cfg.get("k", 5)
        self.fd_limit = raise_fd_limit()
        return self._wave(range(self.lo, self.hi), cfg.get("concurrency", 200), register=True)

    def did(self, idx):
        return b"%s%06d" % (self.prefix, idx)

    def connect(self, idx):
        self.attempt += 1
        src = self.sources[self.attempt % len(self.sources)]
        reactor.connectTCP(self.host, self.ports[idx % len(self.ports)], Factory(self, idx),
                           timeout=30, bindAddress=(src, 0))

    def _wave(self, todo, concurrency, register):
        """Connect (and register or reconnect) every idx of todo, concurrency at
        a time: Deferred of (ok, failed, seconds)."""
        todo = iter(todo)
        state = {"ok": 0, "failed": 0, "pending": 0}
        done = defer.Deferred()
        t0 = _mono()
        self._wave_state = (state, register, todo, done, t0)
        for _ in range(concurrency):
            self._next()
        if not state["pending"]:
            done.callback((0, 0, 0.0))
        return done

    def _next(self):
        state, _, todo, done, t0 = self._wave_state
        for idx in todo:
            state["pending"] += 1
            self.connect(idx)
            return
        if not state["pending"] and not done.called:
            done.callback((state["ok"], state["failed"], _mono() - t0))

    def _step(self, ok):
        state = self._wave_state[0]
        state["pending"] -= 1
        state["ok" if ok else "failed"] += 1
        self._next()

    def made(self, dev):
        self.conns[dev.idx] = dev
        if self.armed:
            return self.storm_made(dev)
        if self.mode == "ctl":
            return
        self._setup_send(dev)

    def _setup_send(self, dev):
        """The wave's register (or reconnect with the token) on dev."""
        if self._wave_state[1]:
            d = dev.request(b'{"register":"true","sender":"%s"}\n' % self.did(dev.idx))
        else:
            d = dev.request(b'{"reconnect":"true","sender":"%s","token":"%s"}\n'
                            % (self.did(dev.idx), self.tokens[dev.idx]))
        d.addCallback(self._setup_reply, dev)

    def _setup_reply(self, reply, dev):
        t = reply.get("type")
        if t in ("registered", "reconnected"):
            if reply.get("token"):
                self.tokens[dev.idx] = reply["token"].encode()
            self._step(True)
        elif reply.get("code") == "unavailable" and not dev.transport.disconnecting:
            # as a phone does: the same packet again, a little later
            self.count("retried:unavailable")
            reactor.callLater(random.uniform(0.2, 1.0), self._setup_again, dev)
        else:
            self.count("setup:" + str(reply.get("code", t)))
            self._step(False)

    def _setup_again(self, dev):
        if self.conns.get(dev.idx) is not dev:
            self.count("setup:lost")
            return self._step(False)
        self._setup_send(dev)

    def failed(self, idx, reason):
        if self.armed:
            return self.retry(idx, "connect_failed")
        self.count("connect_failed: " + reason.getErrorMessage()[:60])
        self._step(False)

    def lost(self, dev):
        if self.conns.get(dev.idx) is dev:
            del self.conns[dev.idx]
        if self.stopping:
            return
        if self.armed:
            if dev.idx in self.ctl_idx:
                return self.ctl_lost(dev)
            if getattr(dev, "storm", False) and getattr(dev, "come_back", None) is None:
                self.drops += 1  # closed without a shutdown
            return self.retry(dev.idx, "lost", getattr(dev, "come_back", None))
        if not getattr(dev, "closing", False):
            self.count("connection_lost")
        if self.mode == "fill" and dev.idx in self._fill_out:
            del self._fill_out[dev.idx]  # its sends are not all answered
            self._fill_next()

    def reconnect(self, cfg):
        """Close every device, then reconnect them all (with their tokens)."""
        gone = []
        for dev in list(self.conns.values()):
            dev.closing = True
            d = defer.Deferred()
            dev.waiter = d
            gone.append(d)
            dev.transport.loseConnection()
        d = defer.DeferredList(gone)
        d.addCallback(lambda _: self._wave(range(self.lo, self.hi),
                                           cfg.get("concurrency", 200), register=False))
        return d

    # -- lines other than pushes ----------------------------------------------------

    def other(self, dev, line):
        try:
            obj = json.loads(line)
        except ValueError:
            self.count("unparsable")
            return
        t = obj.get("type")
        if t == "ping":  # keepalive: any line answers it
            dev.transport.write(b'{"ping":"k"}\n')
            return
        if t == "pong":
            if obj.get("ping", "").startswith("c"):
                self.ctl_pong(obj["ping"])
            return
        if self.armed and t in ("reconnected", "error"):
            return self.storm_reply(dev, obj)
        if t == "error" and obj.get("reason", "").startswith("the ack of") and getattr(
                dev, "last_ack", None):
            # an ack of the storm that failed after its report: again
            self.count("unavailable:ack_after")
            reactor.callLater(random.uniform(0.1, 0.5), self._ack_again, dev)
            return
        if t == "error":
            self.count(obj.get("code", "?"))
            if self.mode == "fill" and dev.waiter is None and dev.idx in self._fill_out:
                self.fill_failed(dev, again=obj.get("code") == "unavailable")
                return
        if dev.waiter is not None:
            w, dev.waiter = dev.waiter, None
            w.callback(obj)
        elif t == "accepted" and self.mode == "fill":
            self.fill_accepted(dev, obj["id"].encode())
        elif t == "duplicate" and self.mode == "fill":
            self.count("duplicate")
            self.fill_failed(dev, again=False)
        elif t != "accepted":
            self.count("unexpected:" + str(t))

    def acking(self, dev):
        return self.mode == "live"

    def push(self, dev, line):
        if self.mode == "live":
            if dev.idx == self.live_rcv:
                p = line.rfind(b"-")
                lat = _mono_ns() // 1000 - int(line[p + 1:-2])
                if self.live_on:
                    b = bucket(lat)
                    self.hist[b] = self.hist.get(b, 0) + 1
                self.live_got += 1
            return
        if self.armed and getattr(dev, "storm", False):
            # (a push still arriving on a connection of before the stop is
            # not the storm's)
            self.storm_push(dev, line)

    # -- live: a conversation while the others are held ---------------------------------

    def live(self, cfg):
        self.mode = "live"
        step = cfg.get("step", 1)
        self.live_snd, self.live_rcv = self.lo, self.lo + step
        snd = self.conns[self.live_snd]
        rcv = self.did(self.live_rcv)
        self.hist = {}
        self.live_got = 0
        self.live_on = False
        rate = cfg["rate"]
        t0 = _mono()
        sent = [0]

        def tick():
            now = _mono()
            due = int((now - t0) * rate) - sent[0]
            if due > 0:
                sent[0] += due
                us = _mono_ns() // 1000
                snd.transport.write(b"".join(
                    b'{"message":"L%d-%d","receiver":"%s"}\n' % (sent[0] - i, us, rcv)
                    for i in range(due)))
        loop = task.LoopingCall(tick)
        loop.start(0.001)
        d = defer.Deferred()

        def on():
            self.live_on = True
        reactor.callLater(cfg.get("warmup", 1.0), on)

        def end():
            loop.stop()
            self.live_on = False

            def wait():
                if self.live_got >= sent[0] or _mono() > t_end + 10:
                    self.mode = "idle"
                    d.callback({"event": "lived", "sent": sent[0], "got": self.live_got,
                                "hist": self.hist, "errors": self.errors})
                else:
                    reactor.callLater(0.05, wait)
            t_end = _mono()
            wait()
        reactor.callLater(cfg.get("warmup", 1.0) + cfg["duration"], end)
        return d

class Control(loadgen.Control):
    """loadgen's control (stdin commands, stdout events, quit on EOF); here a
    command returns its event, or a Deferred of it."""

    def __init__(self):
        self.gen = Gen(self.emit)

    def emit(self, obj):
        # through the transport: stdout is non-blocking under StandardIO, and
        # a report (a time per device) is bigger than a pipe holds
        self.transport.write(json.dumps(obj).encode() + b"\n")

    def lineReceived(self, line):
        try:
            cmd = json.loads(line)
            out = getattr(self, "cmd_" + cmd["cmd"])(cmd)
            if isinstance(out, defer.Deferred):
                out.addCallback(self.emit).addErrback(self.failed)
            elif out is not None:
                self.emit(out)
        except Exception:
            self.failed(None)

    def _waves(self, d, event):
        def done(r):
            ok, failed, secs = r
            return {"event": event, "ok": ok, "failed": failed, "seconds": secs,
                    "fd_limit": self.gen.fd_limit, "errors": self.gen.errors}
        return d.addCallback(done)

    def cmd_setup(self, cmd):
        return self._waves(self.gen.setup(cmd), "ready")

    def cmd_reconnect(self, cmd):
        return self._waves(self.gen.reconnect(cmd), "reconnected")

    def cmd_live(self, cmd):
        return self.gen.live(cmd)

    def cmd_fill(self, cmd):
        return self.gen.fill(cmd)

    def cmd_arm(self, cmd):
        return self.gen.arm(cmd)

    def cmd_report(self, cmd):
        return self.gen.report(cmd)

    def cmd_cpu(self, cmd):
        return {"event": "cpu", "cpu": proc_cpu(), "conns": len(self.gen.conns)}

    def cmd_quit(self, cmd):
        self.emit({"event": "bye"})
        self.quit()


def main():
    from twisted.logger import globalLogBeginner, textFileLogObserver
    # errors in timed calls go to stderr (the suite shows its tail on failure)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],
                                     redirectStandardIO=False)
    stdio.StandardIO(Control())
    reactor.run()


if __name__ == "__main__":
    main()
