"""
``python -m benchmarks --only store_cost``: what each store step costs the
store (issue 25), as valkey CPU microseconds per message, beside the same
run's ceiling: a pipelined loop of a trivial ``EVALSHA`` (and ``FCALL``) on
the same valkey-server, so that the figure travels across machines as a
ratio.

Per step (driven through :class:`chatd.store.steps.Store` itself, its calls
pipelined on one socket to a real valkey-server, no chatd process): send,
fetch, ack (one ack per message, as a phone that acks every push) and
presence (a claim per device, a lease renewal per device); valkey's CPU from
``INFO cpu`` (the whole process: the AOF's fsync thread too), the commands
each step ran (``INFO commandstats``: the ``redis.call``\\ s inside the Lua
are counted there) and the AOF bytes it wrote, per message. With AOF
``everysec`` (as the embedded store ships) and off, for each ``--devices``.

End to end: the throughput load (closed loop, every push acked,
``--rate-limit 0``) against one chatd on that same valkey-server
(``--redis``, AOF ``everysec``), valkey's and chatd's CPU per delivered
message; the ceiling is measured on that server right after.
"""

import os
import random
import shutil
import socket
import tempfile
import time
from types import SimpleNamespace

from twisted.internet.task import Clock

from benchmarks import procs, report
from chatd.app.config import Settings
from chatd.redis.embedded import find_allocator
from chatd.store.library import Library
from chatd.store.steps import Store
from tests.fixtures.valkey import ValkeyServer, _encode, _Reader

#: messages stored per configuration (--quick: a tenth)
MESSAGES = 20000
#: messages (acks) in one store call: what a busy node's reactor turn gathers
BATCH = 64
#: calls in the pipelined ceiling loop
CEILING_CALLS = 50000
#: the ceiling's scripts: a call that does nothing but be called
TRIVIAL = b"return 1"
TRIVIAL_LIB = (b"#!lua name=benchone\n"
               b"redis.register_function('bench_one', function(keys, args) return 1 end)")


class Pipe:
    """A store client for :class:`Store` that pipelines every call on one
    socket and answers them all at :meth:`flush` (the Deferreds fire then)."""

    def __init__(self, server):
        self.server = server
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(server.path)
        self.reader = _Reader(self.sock)
        self.library = Library()
        self.stats = SimpleNamespace(unavailable=0)
        self.pending = []
        self.command(b"FUNCTION", b"LOAD", b"REPLACE", self.library.source)

    # what Store asks of a client
    def script(self, name, keys, args):
        return self._queue((b"FCALL", self.library.functions[name], len(keys), *keys, *args))

    def call(self, *args):
        return self._queue(args)

    def split(self, items, key):
        return [items]

    def late_ms(self, key=None):
        # a real deadline, so that send.lua reads the clock as it does under chatd
        return b"%d" % ((time.time() + 3600) * 1000)

    def _queue(self, args):
        from twisted.internet.defer import Deferred
        d = Deferred()
        self.pending.append((_encode(*args), d))
        return d

    def flush(self):
        pending, self.pending = self.pending, []
        self.sock.sendall(b"".join(p for p, _ in pending))
        for _, d in pending:
            try:
                reply = self.reader.reply()
            except RuntimeError as e:
                d.errback(e)
            else:
                d.callback(reply)

    def command(self, *args):
        self.sock.sendall(_encode(*args))
        return self.reader.reply()

    def info(self, section):
        text = self.command(b"INFO", section).decode()
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def close(self):
        self.sock.close()


class Meter:
    """valkey's CPU, commands and AOF bytes between two points."""

    def __init__(self, pipe):
        self.pipe = pipe

    def sample(self):
        cpu = self.pipe.info(b"cpu")
        stats = {}
        for k, v in self.pipe.info(b"commandstats").items():
            f = dict(x.split("=") for x in v.split(","))
            stats[k[len("cmdstat_"):]] = (int(f["calls"]), float(f["usec"]))
        aof = self.pipe.info(b"persistence").get("aof_current_size")
        return (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), stats,
                int(aof) if aof is not None else None)

    def between(self, a, b, n):
        """Per unit (n of them): valkey CPU us, commands run, their usec, AOF bytes."""
        cmds = {}
        for name, (calls, usec) in b[1].items():
            c0, u0 = a[1].get(name, (0, 0.0))
            if calls - c0 > 0 and not name.startswith(("info", "function")):
                cmds[name] = {"calls": (calls - c0) / n, "us": (usec - u0) / n}
        # the calls of the Lua, not the FCALL itself
        inner = sum(v["calls"] for k, v in cmds.items() if k not in ("fcall", "evalsha"))
        return {"cpu_us": (b[0] - a[0]) * 1e6 / n, "commands": cmds, "calls_inside": inner,
                "aof_bytes": None if a[2] is None else (b[2] - a[2]) / n}


def _settings():
    return Settings(receipts=True)


def _devices(n):
    return ["s%09d-%05d" % (random.randrange(10 ** 9), i) for i in range(n)]


class Steps:
    """valkey's CPU, commands and AOF bytes summed per step over many
    phases (a phase: one step's calls, pipelined, then a sample)."""

    def __init__(self, pipe):
        self.meter = Meter(pipe)
        self.pipe = pipe
        self.sums = {}
        self.last = self.meter.sample()

    def phase(self, step, units):
        """The calls queued since the last phase are ``step``'s ``units``."""
        self.pipe.flush()
        now = self.meter.sample()
        cpu, stats, aof = self.sums.get(step, (0.0, {}, 0))
        cpu += now[0] - self.last[0]
        for name, (calls, usec) in now[1].items():
            c0, u0 = self.last[1].get(name, (0, 0.0))
            c, u = stats.get(name, (0, 0.0))
            stats[name] = (c + calls - c0, u + usec - u0)
        if aof is not None and now[2] is not None:
            aof += now[2] - self.last[2]
        else:
            aof = None
        n = self.sums.get(step + "#", 0) + units
        self.sums[step], self.sums[step + "#"] = (cpu, stats, aof), n
        self.last = self.meter.sample()

    def figures(self, step):
        cpu, stats, aof = self.sums[step]
        n = max(1, self.sums[step + "#"])
        return self.meter.between((0.0, {}, 0 if aof is not None else None),
                                  (cpu, stats, aof), n)


def steps(server, n_devices, messages):
    """Each step through Store on ``server``: {step: per-unit figures}.

    As under chatd's load (every push acked at once), inboxes stay short:
    rounds of one message per device on average (random senders, random
    receivers, batches of BATCH), each followed by its acks (one per
    message, oldest first); every tenth round is fetched before it is
    acked."""
    pipe = Pipe(server)
    store = Store(pipe, _settings(), Clock(), node_id="bench-node-1")
    devices = _devices(n_devices)
    rng = random.Random(1)
    try:
        for d in devices:
            store.register(d, os.urandom(32).hex().encode())
        pipe.flush()
        steps = Steps(pipe)
        for d in devices:
            store.claim(d, 10000)
        steps.phase("presence_claim", n_devices)
        for i in range(0, n_devices, 500):
            store.renew([(d, 1) for d in devices[i:i + 500]], 10000)
        steps.phase("presence_renew", n_devices)

        problems = []

        def sent(result, failure, receiver, stored):
            if failure is not None:
                problems.append(failure.getErrorMessage())
            elif result.status != "accepted":
                problems.append(result.status)
            else:
                stored.setdefault(receiver, []).append(int(result.id))

        def acked(failure):
            if failure is not None:
                problems.append(failure.getErrorMessage())

        done = 0
        rounds = 0
        while done < messages:
            stored = {}
            n = min(n_devices, messages - done)
            for i in range(n):
                s, r = rng.choice(devices), rng.choice(devices)
                # (senders bound without the receipts opt-in, as 1.0 clients)
                store.send_then(lambda res, f, r=r, st=stored: sent(res, f, r, st), s, r,
                                "%d.%d-%d" % (rounds % 2, done + i, 1700000000000000 + done + i),
                                receipts=False)
                if len(store._sends) >= BATCH:
                    store._flush()
            store._flush()
            steps.phase("send", n)
            done += n
            if rounds % 10 == 0:
                fetched = []
                for d in stored:
                    store.fetch(d, 0, 100).addCallback(lambda r: fetched.extend(r[2]))
                steps.phase("fetch", sum(len(v) for v in stored.values()))
            for k in range(max(len(v) for v in stored.values())):
                # every device acks its next message: one ack per push
                for d, ids in stored.items():
                    if k < len(ids):
                        store.ack_then(acked, d, ids[k])
                    if len(store._acks) >= BATCH:
                        store._flush()
                store._flush()
            steps.phase("ack", sum(len(v) for v in stored.values()))
            rounds += 1
            if problems:
                raise procs.BenchError("store_cost: %s" % sorted(set(problems))[:5])
        left = sum(pipe.command(b"LLEN", b"chatd:{%s}:inbox" % d.encode()) for d in devices)
        if left:
            raise procs.BenchError("store_cost: %d messages left after the acks" % left)
        out = {step: steps.figures(step) for step in
               ("presence_claim", "presence_renew", "send", "fetch", "ack")}
        out["total"] = {
            "cpu_us": out["send"]["cpu_us"] + out["ack"]["cpu_us"],
            "aof_bytes": (None if out["send"]["aof_bytes"] is None else
                          out["send"]["aof_bytes"] + out["ack"]["aof_bytes"]),
            "calls_inside": out["send"]["calls_inside"] + out["ack"]["calls_inside"]}
    finally:
        pipe.close()
    return out


def ceiling(server, calls):
    """valkey CPU us per call of a pipelined trivial EVALSHA and FCALL (one
    key each, as chatd's calls have)."""
    pipe = Pipe(server)
    meter = Meter(pipe)
    out = {}
    try:
        sha = pipe.command(b"SCRIPT", b"LOAD", TRIVIAL)
        pipe.command(b"FUNCTION", b"LOAD", b"REPLACE", TRIVIAL_LIB)
        for name, head in (("evalsha", (b"EVALSHA", sha)), ("fcall", (b"FCALL", b"bench_one"))):
            a = meter.sample()
            for i in range(calls):
                pipe.call(*head, 1, b"bench:{x}:k", b"1")
                if len(pipe.pending) >= 1000:
                    pipe.flush()
            pipe.flush()
            out[name] = meter.between(a, meter.sample(), calls)["cpu_us"]
    finally:
        pipe.close()
    return out


def _valkey(tmp, name, aof, malloc=None):
    """A valkey-server of ours, with the malloc the embedded store would
    preload (jemalloc if the system has it), or ``malloc="libc"``."""
    server = ValkeyServer(os.path.join(tmp, name), appendfsync=aof, malloc=malloc).start()
    from tests.fixtures.process import wait_for
    wait_for(server.answers, 30, "valkey-server")
    return server


def _profile_line(figures):
    cmds = sorted(figures["commands"].items(), key=lambda kv: -kv[1]["calls"])
    return ", ".join("%s %.2f" % (k, v["calls"]) for k, v in cmds)


def _commandstats(server):
    """{command: (calls, usec)} of a ValkeyServer."""
    out = {}
    for k, v in server.info("commandstats").items():
        f = dict(x.split("=") for x in v.split(","))
        out[k[len("cmdstat_"):]] = (int(f["calls"]), float(f["usec"]))
    return out


def end_to_end(opts, log, tmp, n):
    """The throughput load on one chatd over a valkey-server of ours (AOF
    everysec); then the ceiling on that same server."""
    from benchmarks import scenarios
    server = _valkey(tmp, "e2e-%d" % n, "everysec")
    try:
        with procs.Processes() as pr:
            chatd = scenarios._with_server(pr, "chatd", opts, extra=["--redis", server.url])
            group = scenarios._Stored(chatd, [server.pid], "store_cost")
            load = scenarios.Load(pr, group, n, opts.workers, opts)
            load.setup()
            window = opts.window or max(2, -(-opts.inflight // n))
            before = _commandstats(server)
            res = load.run("closed", opts.duration, opts.warmup, window=window)
            after = _commandstats(server)
        # the commands of the whole run (warm-up and drain too) per message
        # received: the store calls (fcall) and the redis.calls inside them
        got = max(1, res["received"])
        res["commands_per_msg"] = {
            name: {"calls": (calls - before.get(name, (0, 0))[0]) / got,
                   "us": (usec - before.get(name, (0, 0.0))[1]) / got}
            for name, (calls, usec) in after.items()
            if calls > before.get(name, (0, 0))[0] and not name.startswith(("info", "function"))}
        res["ceiling_us"] = ceiling(server, CEILING_CALLS // (10 if opts.quick else 1))
    finally:
        server.cleanup()
    return res


def store_cost(opts, log):
    tmp = tempfile.mkdtemp(prefix="chatd-bench-store-cost-")
    messages = MESSAGES // (10 if opts.quick else 1)
    out = {"batch": BATCH, "messages": messages, "malloc": find_allocator() or "libc"}
    # the configurations: AOF on and off for each --devices, with the malloc
    # the store runs with; then, if that is jemalloc, the most devices with
    # the C library's malloc, for the ratio
    configs = [(aof, n, None) for aof in ("everysec", None) for n in opts.devices]
    if out["malloc"] != "libc":
        configs.append(("everysec", max(opts.devices), "libc"))
    try:
        for aof, n, malloc in configs:
            key = "%s_%d" % (aof or "noaof", n) + ("_libc" if malloc else "")
            server = _valkey(tmp, key, aof, malloc)
            try:
                figures = steps(server, n, messages)
                figures["ceiling_us"] = ceiling(
                    server, CEILING_CALLS // (10 if opts.quick else 1))
            finally:
                server.cleanup()
            out[key] = figures
            log("  steps, AOF %s, %d devices, malloc %s: send %.1f + ack %.1f = %.1f us/msg "
                "(EVALSHA %.2f us/call); AOF %s B/msg; per message: send [%s], ack [%s]" % (
                    aof or "off", n, malloc or out["malloc"], figures["send"]["cpu_us"],
                    figures["ack"]["cpu_us"],
                    figures["total"]["cpu_us"], figures["ceiling_us"]["evalsha"],
                    "-" if figures["total"]["aof_bytes"] is None
                    else "%.0f" % figures["total"]["aof_bytes"],
                    _profile_line(figures["send"]), _profile_line(figures["ack"])))
        if "chatd" in opts.servers:
            for n in opts.devices:
                res = end_to_end(opts, log, tmp, n)
                out["e2e_%d" % n] = res
                per = res.get("server_cpu_us_per_msg") or {}
                log("  end to end, %d devices: %.0f msg/s, valkey %.1f + chatd %.1f us/msg "
                    "(EVALSHA %.2f us/call; other load %.2f cores); per message: [%s]" % (
                        n, res["delivered_per_s"], per.get("store") or 0, per.get("server") or 0,
                        res["ceiling_us"]["evalsha"], res.get("other_load_cores") or 0,
                        _profile_line({"commands": res["commands_per_msg"]})))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"store_cost": out}


#: the issue's target: valkey CPU per message (send + push + ack) at most
#: this many times the same run's EVALSHA, or at most MAX_US
MAX_CEILINGS = 1.5
MAX_US = 12.0


def rows(per):
    """The table: us per message (chatd column) against the same run's
    EVALSHA us per call (relay column); the ratio is the multiple."""
    out = []
    row = report.row
    for key, f in per.items():
        if not isinstance(f, dict):
            continue
        if key.startswith("e2e_"):
            n = key.split("_")[1]
            sc = "store cost end to end, %s dev (relay column: EVALSHA)" % n
            us = report._get(f, "server_cpu_us_per_msg", "store")
            ceil = report._get(f, "ceiling_us", "evalsha")
            met = None if us is None or not ceil else (us <= MAX_US or us <= MAX_CEILINGS * ceil)
            out.append(row(sc, "valkey us/msg (send+push+ack)", us, ceil,
                           "<=%g us or <=%gx" % (MAX_US, MAX_CEILINGS), met,
                           report._flags(("chatd", f))))
            out.append(row(sc, "chatd us/msg", report._get(f, "server_cpu_us_per_msg", "server")))
            out.append(row(sc, "delivered msg/s", f.get("delivered_per_s")))
            continue
        aof, n, *libc = key.split("_")
        sc = "store cost, AOF %s, %s dev%s (relay column: EVALSHA)" % (
            "off" if aof == "noaof" else aof, n, ", glibc malloc" if libc else "")
        ceil = report._get(f, "ceiling_us", "evalsha")
        for step in ("send", "ack", "total", "fetch", "presence_claim", "presence_renew"):
            out.append(row(sc, "valkey us/msg: %s" % step, report._get(f, step, "cpu_us"), ceil))
        out.append(row(sc, "redis.calls/msg: send+ack", report._get(f, "total", "calls_inside")))
        out.append(row(sc, "AOF bytes/msg: send+ack", report._get(f, "total", "aof_bytes")))
        out.append(row(sc, "FCALL us/call (trivial)", report._get(f, "ceiling_us", "fcall"), ceil))
    return out
