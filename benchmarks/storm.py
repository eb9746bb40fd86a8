"""
One host's worth of phones (issue 24): the ``connections`` and ``storm``
scenarios, driven through :mod:`benchmarks.stormgen` workers.

connections
    ``--storm-devices`` (80,000) registered devices held idle on chatd
    ``--storm-workers`` (5) processes on the embedded store, against the
    relay as as many processes (the devices spread over them by index, since
    one process is limited to 20,000 open files). Measured: registers/s,
    memory per connection (every server process, the store included), idle
    CPU over ``--storm-idle`` s (keepalive at its default), a live
    conversation between two of the devices at ``--storm-rate`` msg/s
    (p50/p99) while the others are held, and reconnects/s (every device
    closes and comes back with its token).

storm (chatd only: the relay keeps nothing across a restart)
    The same devices, each with ``--storm-messages`` (5) waiting, unacked;
    every chatd process is SIGKILLed (the store, an orphan then, is stopped
    and started again by the next chatd) and started again, and every
    device comes back by itself (backing off from 0.25 s to 2 s, jittered,
    while refused), reconnects, gets its messages, checks them (in order,
    each once) and acks. Then the same after SIGTERM (clients wait the
    ``retry_after_ms`` of their ``shutdown``). Measured: time from the
    restart (listening again) until every device has all its messages and
    has acked, connect -> first push p50/p99, the slowest 1% against the
    median (of the time each device finished), the servers' peak RSS, a
    control connection's ping RTT (every 50 ms) during the storm; lost,
    repeated, out of order.
"""

import math
import os
import signal
import socket
import time

from benchmarks import procs
from benchmarks.procs import BenchError
from benchmarks.scenarios import merge_counts, merge_hists, percentiles, prefix
from tests.fixtures import procfs

#: devices per generator process (each under its own 20,000 open files)
PER_GEN = 14000
#: connection attempts in flight per generator while setting up
CONCURRENCY = 200


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _sources(g, n=4):
    """Source addresses of generator g: 127.<g+1>.0.1..n (all loopback)."""
    return ["127.%d.0.%d" % (g + 1, i + 1) for i in range(n)]


class Fleet:
    """The servers of one kind (chatd with --workers, or N relays) and the
    generators holding the devices."""

    def __init__(self, pr, kind, opts, log):
        self.pr = pr
        self.kind = kind
        self.opts = opts
        self.log = log
        self.n = opts.storm_devices
        self.workdir = os.path.join(pr.tmp, kind)
        os.makedirs(self.workdir, exist_ok=True)
        if kind == "chatd":
            self.port = _free_port()
            self.servers = [self._chatd()]
            self.ports = [self.port]
            if opts.storm_workers > 1:
                # devices connect once every process accepts (a restart in
                # a storm is timed from "listening", as a phone sees it)
                self.servers[0].wait_accepting(120)
        else:
            self.servers = [pr.server("relay") for _ in range(opts.storm_workers)]
            self.ports = [s.port for s in self.servers]
        gens = max(1, int(math.ceil(self.n / float(PER_GEN))))
        self.gens = pr.start_workers(gens, "benchmarks.stormgen")
        self.pfx = prefix()

    def _chatd(self):
        s = procs.Server("chatd", self.workdir, port=self.port, start_deadline=120,
                         prefix=self.opts.chatd_prefix, extra=[
            "--workers", str(self.opts.storm_workers)] + list(self.opts.chatd_args))
        self.pr.servers.append(s)
        return s

    def pids(self):
        out = {}
        for i, s in enumerate(self.servers):
            for role, pid in s.pids().items():
                out["%s%d" % (role, i) if len(self.servers) > 1 else role] = pid
        return out

    def rss(self):
        return {r: procfs.rss_bytes(p) for r, p in self.pids().items()}

    def peak_rss(self):
        """Sum of every server process's VmHWM (its own peak RSS)."""
        total = 0
        for pid in self.pids().values():
            try:
                with open("/proc/%d/status" % pid) as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def cpu(self):
        return sum(procfs.cpu_seconds(p) or 0 for p in self.pids().values())

    def blocks(self):
        per = int(math.ceil(self.n / float(len(self.gens))))
        for i, g in enumerate(self.gens):
            yield g, i * per, min(self.n, (i + 1) * per)

    def all(self, cmd, event, wait, **kw):
        for g, lo, hi in self.blocks():
            g.send(cmd, **kw)
        return [g.wait(event, wait) for g in self.gens]

    def setup(self):
        for i, (g, lo, hi) in enumerate(self.blocks()):
            g.send("setup", host="127.0.0.1", ports=self.ports, sources=_sources(i),
                   prefix=self.pfx, lo=lo, hi=hi, concurrency=CONCURRENCY)
        t0 = time.monotonic()
        evs = [g.wait("ready", 120 + self.n / 50.0) for g in self.gens]
        secs = time.monotonic() - t0
        ok = sum(e["ok"] for e in evs)
        if ok < self.n:
            raise BenchError("%s: %d of %d devices registered: %s" % (
                self.kind, ok, self.n, [e["errors"] for e in evs]))
        return ok, secs

    def reconnect(self):
        evs = self.all("reconnect", "reconnected", 120 + self.n / 50.0,
                       concurrency=CONCURRENCY)
        ok = sum(e["ok"] for e in evs)
        # the figures stand even if some failed: the count is in the results
        return ok, max(e["seconds"] for e in evs), merge_counts([e["errors"] for e in evs])

    def gen_cpu(self):
        return sum(g.wait("cpu", 10)["cpu"] for g in self._ask("cpu"))

    def _ask(self, cmd):
        for g in self.gens:
            g.send(cmd)
        return self.gens


def _settle(fleet, seconds=3.0, deadline=30.0):
    """RSS of the servers once it stops growing."""
    end = time.monotonic() + deadline
    last = None
    while time.monotonic() < end:
        now = fleet.rss()
        total = sum(v or 0 for v in now.values())
        if last is not None and abs(total - last) < 0.002 * total:
            return now
        last = total
        time.sleep(seconds)
    return fleet.rss()


def connections(opts, log):
    out = {}
    for kind in opts.servers:
        with procs.Processes() as pr:
            fleet = Fleet(pr, kind, opts, log)
            time.sleep(1.0)
            base = _settle(fleet, 1.0)
            n, secs = fleet.setup()
            after = _settle(fleet)
            per = {r: (after[r] - base[r]) / float(n) for r in base
                   if base.get(r) is not None and after.get(r) is not None}
            total = sum(per.values())
            # idle: keepalive at its default
            c0, h0, t0 = fleet.cpu(), procs.host_cpu(), time.monotonic()
            time.sleep(opts.storm_idle)
            c1, h1, t1 = fleet.cpu(), procs.host_cpu(), time.monotonic()
            idle_cpu = (c1 - c0) / (t1 - t0)
            busy = (h1[0] - h0[0]) / float(h1[1] - h0[1]) * os.cpu_count()
            # a live conversation while the others are held
            g0 = fleet.gens[0]
            g0.send("live", rate=opts.storm_rate, duration=opts.duration, warmup=1.0,
                    step=len(fleet.ports))
            lived = g0.wait("lived", opts.duration + 60)
            lat = percentiles(lived["hist"])
            rn, rsecs, rerrors = fleet.reconnect()
            res = {"devices": n, "register_s": secs, "register_per_s": n / secs,
                   "reconnect_s": rsecs, "reconnect_per_s": rn / rsecs,
                   "reconnected": rn, "reconnect_errors": rerrors,
                   "rss_before": base, "rss_after": after, "bytes_per_conn": per,
                   "bytes_per_conn_total": total, "idle_cpu_core": idle_cpu,
                   "idle_seconds": t1 - t0, "load_cores_during_idle": busy,
                   "live_rate": opts.storm_rate, "live_sent": lived["sent"],
                   "live_got": lived["got"], "live_latency_ms": lat,
                   "processes": len(fleet.pids()), "loadavg": os.getloadavg(),
                   "server_problems": [p for s in fleet.servers for p in s.problems()][:10]}
            out.setdefault("connections", {})[kind] = res
            log("  %s: %d devices, %.0f registers/s, %.0f B/conn (%s), idle CPU %.1f%% "
                "of a core (machine busy %.2f cores), live p50 %s / p99 %s ms, %.0f "
                "reconnects/s" % (kind, n, n / secs, total, ", ".join(
                    "%s %.0f" % kv for kv in per.items()), idle_cpu * 100, busy,
                    lat.get("p50"), lat.get("p99"), rn / rsecs))
    return out


def _storm(fleet, how, opts, log):
    """Fill, arm, stop every chatd process (SIGKILL or SIGTERM), start again,
    wait for every device: the storm's figures."""
    k = opts.storm_messages
    wait = 120 + fleet.n / 200.0
    filled = fleet.all("fill", "filled", wait + 30, k=k, window=200, deadline=wait)
    acc = sum(e["accepted"] for e in filled)
    if acc < fleet.n * k:
        raise BenchError("fill: %d of %d messages accepted: %s" % (
            acc, fleet.n * k, [(e["errors"], e["unanswered"]) for e in filled]))
    for i, g in enumerate(fleet.gens):
        g.send("arm", k=k, ping_every=0.05 if i == 0 else 0)
        g.wait("armed", 30)
    old = fleet.servers[0]
    t_stop = time.monotonic()
    if how == "kill":
        for role, pid in old.pids().items():
            if role != "store":
                os.kill(pid, signal.SIGKILL)
        old.child.proc.wait(30)
    else:
        old.child.proc.send_signal(signal.SIGTERM)
        old.child.proc.wait(120)
    t_down = time.monotonic()
    old.stop()  # the rest of it (the store after SIGTERM is gone already)
    fleet.pr.servers.remove(old)
    new = fleet._chatd()
    fleet.servers = [new]
    t_listen = time.monotonic()
    c0, h0 = fleet.cpu(), procs.host_cpu()
    evs = fleet.all("report", "storm", opts.storm_deadline + 60, deadline=opts.storm_deadline)
    c1, h1 = fleet.cpu(), procs.host_cpu()
    peak = fleet.peak_rss()
    done = sorted(t for e in evs for t in e["t_done"])
    n = sum(e["devices"] for e in evs)  # those with messages waiting
    since = [t - t_listen for t in done]
    first = merge_hists([e["first_hist"] for e in evs])
    bind = merge_hists([e["bind_hist"] for e in evs])
    rtts = [rtt for e in evs for (t, rtt) in e["ping_rtts"] if t_listen <= t]
    t_all = since[-1] if len(done) == n else None

    def q(xs, p):
        return xs[min(len(xs) - 1, int(math.ceil(len(xs) * p)) - 1)] if xs else None
    med, p99 = q(since, 0.5), q(since, 0.99)
    rtts.sort()
    busy = (h1[0] - h0[0]) / float(h1[1] - h0[1]) * os.cpu_count()
    res = {"how": how, "devices": n, "messages_each": k, "done": len(done),
           # devices whose every fill send was answered unavailable (not counted)
           "nothing_waiting": sum(e.get("nothing_waiting", 0) for e in evs),
           "fill_unavailable": sum(e.get("unavailable", 0) for e in filled),
           "stop_s": t_down - t_stop, "restart_s": t_listen - t_down,
           "served_s": t_all, "done_p50_s": med, "done_p99_s": p99,
           "slowest1_over_median": (p99 / med) if med else None,
           "first_push_ms": percentiles(first), "reconnected_ms": percentiles(bind),
           "ping_rtt_ms": {"p50": q(rtts, 0.5) and q(rtts, 0.5) * 1000,
                           "p99": q(rtts, 0.99) and q(rtts, 0.99) * 1000,
                           "max": rtts[-1] * 1000 if rtts else None, "samples": len(rtts)},
           "peak_rss": peak, "server_cpu_cores": (c1 - c0) / max(1e-9, since[-1] if since else 1),
           "machine_busy_cores": busy, "loadavg": os.getloadavg(),
           "lost": sum(e["lost"] for e in evs), "repeats": sum(e["repeats"] for e in evs),
           "out_of_order": sum(e["out_of_order"] for e in evs),
           "others": sum(e["others"] for e in evs),
           "drops": sum(e["drops"] for e in evs),
           # served again on a later connection (its ack was lost in the stop)
           "again": sum(e["again"] for e in evs),
           # pushed in this storm but older than its fill: left unacked before
           "leftover": sum(e["leftover"] for e in evs),
           # pushed, though its send was answered unavailable (stored after all)
           "unconfirmed": sum(e.get("unconfirmed", 0) for e in evs),
           "timed_out": any(e["timed_out"] for e in evs),
           "connect_retries": sum(e["attempts"] for e in evs),
           "errors": merge_counts([e["errors"] for e in evs]),
           "server_problems": new.problems()[:10]}
    log("  storm after %s: %d/%d served in %s s (p50 %.2f, p99 %.2f s; slowest 1%%/median "
        "%.2f), reconnected p50 %s / p99 %s ms, first push p50 %s / p99 %s ms, ping p99 %s ms, peak RSS %.0f MB, lost %d, "
        "repeats %d, out of order %d, left over %d, errors %s, load %s" % (
            how, len(done), n, "%.1f" % t_all if t_all else "-", med or 0, p99 or 0,
            res["slowest1_over_median"] or 0, res["reconnected_ms"]["p50"],
            res["reconnected_ms"]["p99"], res["first_push_ms"]["p50"],
            res["first_push_ms"]["p99"], res["ping_rtt_ms"]["p99"], peak / 1e6,
            res["lost"], res["repeats"], res["out_of_order"], res["leftover"], res["errors"],
            "%.2f %.2f %.2f" % os.getloadavg()))
    return res


def storm(opts, log):
    out = {}
    if "chatd" not in opts.servers:
        return out
    with procs.Processes() as pr:
        fleet = Fleet(pr, "chatd", opts, log)
        n, secs = fleet.setup()
        log("  %d devices registered in %.1f s" % (n, secs))
        for how in ("kill", "term"):
            out["storm_%s" % how] = {"chatd": _storm(fleet, how, opts, log)}
    return out


SCENARIOS = {"connections": connections, "storm": storm}


# -- the table ------------------------------------------------------------------------

#: the issue's targets
MAX_BYTES_PER_CONN = 4096
MAX_MEMORY_RATIO = 2.0
MAX_IDLE_CORE = 0.10
MAX_STORM_S = 60.0
MAX_SLOWEST_RATIO = 3.0
MAX_PING_P99_MS = 1000.0


def rows(key, per, row, get):
    """Table rows of the connections and storm_* results (``row`` and
    ``get`` are :mod:`benchmarks.report`'s)."""
    c, r = per.get("chatd"), per.get("relay")
    if key == "connections":
        n = get(c, "devices") or get(r, "devices")
        sc = "connections %s dev" % ("{:,}".format(n) if n else "?")
        cb, rb = get(c, "bytes_per_conn_total"), get(r, "bytes_per_conn_total")
        met = None
        if cb is not None:
            met = cb <= MAX_BYTES_PER_CONN and (rb is None or cb <= MAX_MEMORY_RATIO * rb)
        ci = get(c, "idle_cpu_core")
        load = get(c, "load_cores_during_idle")
        return [
            row(sc, "bytes per connection (all processes)", cb, rb,
                "<=4096, <=2x relay", met),
            row(sc, "idle CPU, % of a core", ci and ci * 100,
                get(r, "idle_cpu_core") and get(r, "idle_cpu_core") * 100, "<=10%",
                None if ci is None else ci <= MAX_IDLE_CORE,
                "machine busy %.2f cores meanwhile" % load if load is not None else ""),
            row(sc, "registers/s", get(c, "register_per_s"), get(r, "register_per_s")),
            row(sc, "reconnects/s", get(c, "reconnect_per_s"), get(r, "reconnect_per_s"),
                note="chatd: %s" % get(c, "reconnect_errors") if get(c, "reconnect_errors")
                else ""),
            row(sc, "live p50 ms at %s msg/s" % (get(c, "live_rate") or "?"),
                get(c, "live_latency_ms", "p50"), get(r, "live_latency_ms", "p50")),
            row(sc, "live p99 ms", get(c, "live_latency_ms", "p99"),
                get(r, "live_latency_ms", "p99")),
        ]
    how = key.split("_", 1)[1]
    sc = "storm after SIG%s, %s dev" % (how.upper(), "{:,}".format(get(c, "devices") or 0))
    bad = c is None or c.get("lost") or c.get("repeats") or c.get("out_of_order") or c.get(
        "timed_out")
    note = "" if c is None else ("lost %d, repeats %d, out of order %d; nothing waiting "
                                 "(every fill send unavailable) %d; errors %s; load %s" % (
        c["lost"], c["repeats"], c["out_of_order"], c.get("nothing_waiting", 0), c["errors"],
        " ".join("%.1f" % x for x in c["loadavg"])))
    served = get(c, "served_s")
    ratio = get(c, "slowest1_over_median")
    ping = get(c, "ping_rtt_ms", "p99")
    return [
        row(sc, "s until all served and acked", served, None, "<=60 s, nothing lost",
            None if c is None else bool(served is not None and served <= MAX_STORM_S
                                        and not bad), note),
        row(sc, "connect->first push p50 ms", get(c, "first_push_ms", "p50")),
        row(sc, "connect->first push p99 ms", get(c, "first_push_ms", "p99")),
        row(sc, "slowest 1% / median", ratio, None, "<=3x",
            None if ratio is None else ratio <= MAX_SLOWEST_RATIO),
        row(sc, "control ping p99 ms", ping, None, "<=1000",
            None if ping is None else ping <= MAX_PING_P99_MS),
        row(sc, "peak RSS MB", get(c, "peak_rss") and get(c, "peak_rss") / 1e6),
    ]
