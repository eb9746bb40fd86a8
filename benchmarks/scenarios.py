"""
The scenarios: each runs against chatd and against the relay in the same
run, and returns its measurements (for the JSON) and its table rows.

A scenario drives generator workers (:mod:`benchmarks.loadgen`) through
phases: setup (connect and register) -> go (the measured window, after a
warm-up) -> the replies of everything sent -> expect (each receiver waits
for every message accepted for it, then a ping round trip) -> done. Server
CPU is read from /proc at the edges of the window: chatd's python process
and its valkey-server child separately.
"""

import contextlib
import math
import os
import time
import uuid

from benchmarks import procs, store_cost
from benchmarks.procs import BenchError
from tests.fixtures import procfs

#: a worker above this fraction of a core during the window was (close to)
#: the bottleneck: the run is flagged
GEN_SATURATED = 0.90
#: connection attempts in flight across all workers (kept under Twisted's
#: listen backlog of 50, so that a server on an endpoint with that backlog
#: never overflows its accept queue; chatd's default is 1024)
CONNECT_CONCURRENCY = 48
#: devices per worker in the memory scenario (each worker stays under its
#: own fd limit)
CONNS_PER_WORKER = 9000


def prefix():
    return "b" + uuid.uuid4().hex[:8] + "-"


def percentiles(hist, ps=(50, 95, 99, 99.9)):
    """{bucket_us: count} -> {"p50": ms, ...} (None when empty)."""
    items = sorted((int(k), v) for k, v in hist.items())
    total = sum(v for _, v in items)
    out = {}
    for p in ps:
        key = "p%g" % p
        if not total:
            out[key] = None
            continue
        rank = math.ceil(total * p / 100.0)
        acc = 0
        for k, v in items:
            acc += v
            if acc >= rank:
                out[key] = k / 1000.0
                break
    out["max"] = items[-1][0] / 1000.0 if items else None
    out["samples"] = total
    return out


def merge_hists(hists):
    out = {}
    for h in hists:
        for k, v in h.items():
            out[k] = out.get(k, 0) + v
    return out


def merge_counts(dicts):
    out = {}
    for d in dicts:
        for k, v in (d or {}).items():
            out[k] = out.get(k, 0) + v
    return out


class Load:
    """Workers driving one server: ``setup`` once, then any number of ``run``."""

    def __init__(self, pr, server, devices, workers, opts, concurrency=CONNECT_CONCURRENCY):
        self.pr = pr
        self.server = server
        self.devices = devices
        self.opts = opts
        self.workers = pr.start_workers(max(1, min(workers, devices)))
        n = len(self.workers)
        self.ranges = []
        per = int(math.ceil(devices / float(n)))
        for i in range(n):
            self.ranges.append((min(devices, i * per), min(devices, (i + 1) * per)))
        self.prefix = prefix()
        self.concurrency = max(1, concurrency // n)
        self.setup_extra = {}    # more of every worker's setup (receipts, ack_every)
        self.ports = None        # per worker, instead of the server's port
        self.peer_ranges = None  # per worker, (lo, hi) of the devices it sends to

    def setup(self, deadline=None):
        deadline = deadline or 60 + self.devices / 200.0
        t0 = time.monotonic()
        for i, (w, (lo, hi)) in enumerate(zip(self.workers, self.ranges)):
            extra = dict(self.setup_extra)
            if self.peer_ranges:
                extra = {"peer_lo": self.peer_ranges[i][0], "peer_hi": self.peer_ranges[i][1]}
            w.send("setup", wid=w.wid, host="127.0.0.1",
                   port=self.ports[i] if self.ports else self.server.port,
                   devices=self.devices, lo=lo, hi=hi, prefix=self.prefix,
                   concurrency=self.concurrency, deadline=deadline, seed=w.wid + 1, **extra)
        ready = [w.wait("ready", deadline + 10) for w in self.workers]
        secs = time.monotonic() - t0
        registered = sum(r["registered"] for r in ready)
        failed = sum(r["failed"] for r in ready)
        if registered < self.devices:
            raise BenchError("only %d of %d devices registered (%d failed; errors %s)%s"
                             % (registered, self.devices, failed,
                                merge_counts(r["errors"] for r in ready),
                                "".join("\n  server: " + x for x in self.server.problems()[:10])))
        return {"registered": registered, "seconds": secs,
                "per_s": registered / secs if secs else None,
                "errors": merge_counts(r["errors"] for r in ready)}

    def mark(self):
        for w in self.workers:
            w.send("mark")
        for w in self.workers:
            w.wait("marked", 10)

    def prime(self, refs):
        for w in self.workers:
            w.send("prime", refs=refs, deadline=60)
        return [w.wait("primed", 70) for w in self.workers]

    def run(self, mode, duration, warmup, **kw):
        """One measured window; returns the aggregate numbers."""
        server = self.server
        start = time.monotonic() + 0.2
        w0 = start + warmup
        w1 = w0 + duration
        for w in self.workers:
            w.send("go", mode=mode, start=start, w0=w0, w1=w1, deadline=60, **kw)
        _sleep_until(w0)
        cpu0, host0, t0 = server.cpu(), procs.host_cpu(), time.monotonic()
        spy = self._profile(mode, duration)
        _sleep_until(w1)
        cpu1, host1, t1 = server.cpu(), procs.host_cpu(), time.monotonic()
        if spy is not None:
            spy.finish()
        sent = [w.wait("sent", duration + warmup + 90) for w in self.workers]
        accepted = merge_counts(s["accepted"] for s in sent)
        for w, (lo, hi) in zip(self.workers, self.ranges):
            counts = {str(i): accepted.get(str(i), 0) for i in range(lo, hi)
                      if accepted.get(str(i))}
            w.send("expect", counts=counts, deadline=60)
        done = [w.wait("done", 90) for w in self.workers]
        res = aggregate(done, sent, cpu0, cpu1, host0, host1, w1 - w0, t1 - t0, server)
        res["duration_s"] = duration
        return res

    def _profile(self, mode, duration):
        """--py-spy PREFIX: record the server's python process during the window."""
        prefix = getattr(self.opts, "py_spy", None)
        if not prefix:
            return None
        path = "%s-%s-%s-%d.raw" % (prefix, self.server.kind, mode, self.devices)
        return procs.PySpy(self.server.pid, path, duration)

    def close(self):
        self.pr.stop_workers()


def _sleep_until(t):
    left = t - time.monotonic()
    if left > 0:
        time.sleep(left)


def aggregate(done, sent, cpu0, cpu1, host0, host1, window, cpu_window, server):
    """The numbers of one window, summed over workers: counts over the
    workers' window (``window`` seconds), CPU over the suite's samples of it
    (``cpu_window``)."""
    delivered = sum(d["win_delivered"] for d in done)
    res = {
        "window_s": window,
        "delivered": delivered,
        "delivered_per_s": delivered / window,
        "sent_per_s": sum(d["win_sent"] for d in done) / window,
        "replies_per_s": sum(d["win_replies"] for d in done) / window,
        "sent": sum(d["sent"] for d in done),
        "replies": sum(d["replies"] for d in done),
        "duplicates": sum(d["duplicates"] for d in done),
        "received": sum(d["received"] for d in done),
        "expected": sum(d["expected"] for d in done),
        "lost": sum(d["lost"] for d in done),
        "extra": sum(d["extra"] for d in done),
        "repeats": sum(d["repeats"] for d in done),
        "unanswered": sum(s["inflight"] for s in sent),
        "timed_out": any(d["timed_out"] for d in done) or any(s["timed_out"] for s in sent),
        "ref_match": sum(d["ref_match"] for d in done),
        "ref_mismatch": sum(d["ref_mismatch"] for d in done),
        "receipts": sum(d.get("receipts", 0) for d in done),
        "errors": merge_counts(d["errors"] for d in done),
        "generator_cpu": [d["cpu"] for d in done],
        "latency_ms": percentiles(merge_hists(d["hist"] for d in done)),
        "late_ticks": sum(d.get("late_ticks", 0) for d in done),
    }
    res["generator_saturated"] = any(c is not None and c > GEN_SATURATED
                                     for c in res["generator_cpu"])
    busy = host1[0] - host0[0]
    total = host1[1] - host0[1]
    res["host_busy"] = busy / total if total else None
    cpu = {}
    for role in cpu0:
        if cpu0[role] is not None and cpu1.get(role) is not None:
            cpu[role] = cpu1[role] - cpu0[role]
    res["server_cpu_s"] = cpu
    res["server_cpu_core"] = {r: c / cpu_window for r, c in cpu.items()}
    # per message: CPU per second of window over deliveries per second
    rate = delivered / window
    res["server_cpu_us_per_msg"] = {r: (c * 1e6 / rate if rate else None)
                                    for r, c in res["server_cpu_core"].items()}
    if rate and cpu:
        res["server_cpu_us_per_msg"]["total"] = sum(res["server_cpu_core"].values()) * 1e6 / rate
    # what else ran on the machine meanwhile (other people's jobs): busy
    # cores minus this run's own processes
    if res["host_busy"] is not None:
        ours = sum(res["server_cpu_core"].values()) + sum(
            c for c in res["generator_cpu"] if c is not None)
        res["other_load_cores"] = max(0.0, res["host_busy"] * (os.cpu_count() or 1) - ours)
    res["server_problems"] = server.problems()
    return res


def _with_server(pr, kind, opts, extra=()):
    args = list(extra)
    if kind == "chatd":
        args += opts.chatd_args
    return pr.server(kind, extra=args, prefix=getattr(opts, kind + "_prefix", None))


# -- 1. saturation throughput ------------------------------------------------------

def throughput(opts, log):
    """Closed loop: every device keeps ``window`` messages in flight to random
    peers. With --repeat N, chatd and the relay take turns N times (a fresh
    server each time) and the best run of each is kept (the one least
    disturbed by whatever else runs on the machine); every run is checked
    for loss."""
    out = {}
    for n in opts.devices:
        key = "throughput_%d" % n
        runs = {kind: [] for kind in opts.servers}
        window = opts.window or max(2, int(math.ceil(opts.inflight / float(n))))
        for rep in range(opts.repeat):
            for kind in opts.servers:
                with procs.Processes() as pr:
                    server = _with_server(pr, kind, opts)
                    load = Load(pr, server, n, opts.workers, opts)
                    reg = load.setup()
                    res = load.run("closed", opts.duration, opts.warmup, window=window)
                    res["window_per_device"] = window
                    res["setup"] = reg
                    runs[kind].append(res)
                    log("  %s, %d devices%s: %s" % (
                        kind, n, "" if opts.repeat == 1 else " (run %d)" % (rep + 1), _brief(res)))
        out[key] = {}
        for kind, rs in runs.items():
            best = dict(max(rs, key=lambda r: r["delivered_per_s"]))
            best["runs"] = [{k: r[k] for k in ("delivered_per_s", "server_cpu_us_per_msg", "lost",
                                                 "extra", "repeats", "generator_cpu",
                                                 "other_load_cores") if k in r} for r in rs]
            # a loss in any run counts
            for k in ("lost", "extra", "repeats", "unanswered"):
                best[k] = sum(r[k] for r in rs)
            best["timed_out"] = any(r["timed_out"] for r in rs)
            best["generator_saturated"] = any(r["generator_saturated"] for r in rs)
            best["errors"] = merge_counts(r["errors"] for r in rs)
            out[key][kind] = best
    return out


# -- receipts (1.2): their cost -----------------------------------------------------

#: every device acks every this many pushes in the receipts scenario
RECEIPTS_ACK_EVERY = 16


#: the receipts scenario's runs: name -> (chatd's --receipts, devices opt in)
RECEIPTS_RUNS = {"off": ("off", True), "on": ("on", True), "nobody": ("on", False)}


def receipts(opts, log):
    """Every device opts in to receipts and acks every 16 pushes; the same
    closed loop against chatd with ``--receipts on`` and ``--receipts off``
    (taking turns, best of --repeat): throughput and p99 of the two; and a
    third run, ``nobody``, with ``--receipts on`` (the default) and no device
    opting in: what receipts cost those who do not use them (every ack's step
    still looks at the senders of what it acks). Twice: each device talking
    to random peers (an ack of 16 pushes covers about 16 senders: about one
    receipt per message, the worst case), and in conversations (each device
    talks to one peer: one receipt per ack). ``--receipts-store cluster1``:
    on a Valkey Cluster of one primary (a fresh one per run), where every
    receipt goes through the receiver's outbox."""
    out = {}
    for n in opts.devices:
        for pairs in (False, True):
            out.update(_receipts_runs(opts, log, n, pairs))
    return out


def _receipts_runs(opts, log, n, pairs):
    out = {}
    if True:
        runs = {name: [] for name in RECEIPTS_RUNS}
        window = opts.window or max(2, int(math.ceil(opts.inflight / float(n))))
        for rep in range(opts.repeat):
            for name, (switch, opt_in) in RECEIPTS_RUNS.items():
                with procs.Processes() as pr, _ReceiptsStore(opts) as store:
                    server = _with_server(pr, "chatd", opts, ["--receipts", switch] + store.args)
                    if store.pids:
                        server = _Stored(server, store.pids, "cluster1")
                    load = Load(pr, server, n, opts.workers, opts)
                    load.setup_extra = {"receipts": opt_in, "ack_every": RECEIPTS_ACK_EVERY,
                                        "pairs": pairs}
                    load.setup()
                    res = load.run("closed", opts.duration, opts.warmup, window=window)
                    runs[name].append(res)
                    log("  receipts %s%s, %d devices%s: %s, %d receipts" % (
                        switch, "" if opt_in else " (nobody opted in)", n,
                        " in pairs" if pairs else "", _brief(res), res["receipts"]))
        out["receipts_%s%d" % ("pairs_" if pairs else "", n)] = {
            switch: dict(max(rs, key=lambda r: r["delivered_per_s"]))
            for switch, rs in runs.items()}
    return out


class _ReceiptsStore:
    """The receipts scenario's store: chatd's own (nothing to start), or
    (``--receipts-store cluster1``) a fresh Valkey Cluster of one primary."""

    def __init__(self, opts):
        self.cluster1 = getattr(opts, "receipts_store", "embedded") == "cluster1"
        self.args, self.pids, self.tmp, self.cluster = [], [], None, None

    def __enter__(self):
        if self.cluster1:
            import tempfile

            from tests.fixtures.cluster import ValkeyCluster
            self.tmp = tempfile.mkdtemp(prefix="chatd-bench-receipts-")
            self.cluster = ValkeyCluster(self.tmp, primaries=1, replicas=0)
            self.cluster.start()
            self.args = ["--redis", self.cluster.url]
            self.pids = [node.pid for node in self.cluster.nodes]
        return self

    def __exit__(self, *exc):
        if self.cluster is not None:
            import shutil
            self.cluster.cleanup()
            shutil.rmtree(self.tmp, ignore_errors=True)


def _brief(res):
    s = "%.0f delivered/s" % res["delivered_per_s"]
    lat = res.get("latency_ms") or {}
    if lat.get("p99") is not None:
        s += ", p50 %.2f / p99 %.2f ms" % (lat["p50"], lat["p99"])
    s += ", server CPU %s" % ", ".join("%s %.0f%%" % (r, c * 100)
                                       for r, c in res["server_cpu_core"].items())
    s += ", generator CPU %s" % ", ".join("%.0f%%" % (c * 100) for c in res["generator_cpu"]
                                          if c is not None)
    if res.get("other_load_cores") is not None:
        s += ", other load %.1f cores" % res["other_load_cores"]
    if res["lost"] or res["extra"] or res["repeats"] or res["timed_out"]:
        s += ", LOST %d EXTRA %d REPEATS %d TIMED OUT %s" % (
            res["lost"], res["extra"], res["repeats"], res["timed_out"])
    if res["errors"]:
        s += ", errors %s" % res["errors"]
    if res["generator_saturated"]:
        s += "  [GENERATOR SATURATED]"
    return s


@contextlib.contextmanager
def _loaded(kind, opts):
    """A server of this kind with ``--latency-devices`` devices registered on
    it (the open-loop, dedup and ref scenarios)."""
    with procs.Processes() as pr:
        server = _with_server(pr, kind, opts)
        load = Load(pr, server, opts.latency_devices, opts.workers, opts)
        load.setup()
        yield load


def _window(opts):
    """Messages in flight per device for --inflight across --latency-devices."""
    return max(2, int(math.ceil(opts.inflight / float(opts.latency_devices))))


# -- 2. latency at fixed offered rates ------------------------------------------

def latency(opts, log):
    out = {}
    for kind in opts.servers:
        with _loaded(kind, opts) as load:
            for rate in opts.rates:
                load.mark()
                res = load.run("rate", opts.duration, opts.warmup,
                               rate=rate / float(len(load.workers)))
                res["offered_per_s"] = rate
                out.setdefault("latency_%d" % rate, {})[kind] = res
                log("  %s @ %d/s: %s" % (kind, rate, _brief(res)))
    return out


# -- 3. idle memory per registered connection -------------------------------------

def memory(opts, log):
    out = {}
    for size in opts.conns:
        for kind in opts.servers:
            with procs.Processes() as pr:
                server = _with_server(pr, kind, opts)
                # warm up: the first connections load code and grow pools
                warm = Load(pr, server, 50, 1, opts)
                warm.setup()
                warm.close()
                _wait_fds(server, deadline=10)
                base_fds = procfs.open_fds(server.pid)
                limit = procfs.fd_limit(server.pid) or 20000
                if size == "max":
                    n = limit - base_fds - 120
                else:
                    n = int(size)
                    if n > limit - base_fds - 20:
                        raise BenchError("%d connections do not fit the server's fd "
                                         "limit %d" % (n, limit))
                base = _settled_rss(server)
                workers = int(math.ceil(n / float(CONNS_PER_WORKER)))
                load = Load(pr, server, n, workers, opts)
                reg = load.setup(deadline=120 + n / 100.0)
                after = _settled_rss(server)
                fds = procfs.open_fds(server.pid)
                res = {"connections": reg["registered"], "server_fds": fds,
                       "server_fds_before": base_fds, "fd_limit": limit,
                       "register_s": reg["seconds"], "register_per_s": reg["per_s"],
                       "rss_before": base, "rss_after": after, "setup_errors": reg["errors"],
                       "server_problems": server.problems()}
                per = {r: (after[r] - base[r]) / float(reg["registered"])
                       for r in base if base[r] is not None and after.get(r) is not None}
                per["total"] = sum(per.values())
                res["bytes_per_conn"] = per
                key = "memory_%s" % ("max" if size == "max" else n)
                out.setdefault(key, {})[kind] = res
                log("  %s: %d connections (registered in %.1fs, %.0f/s): %s" % (
                    kind, reg["registered"], reg["seconds"], reg["per_s"] or 0,
                    ", ".join("%s %.0f B" % kv for kv in per.items())))
                load.close()
    return out


def _wait_fds(server, deadline):
    """Wait until the server has closed the warm-up connections (fd count stable)."""
    end = time.monotonic() + deadline
    last = None
    while time.monotonic() < end:
        n = procfs.open_fds(server.pid)
        if n == last and n is not None and n < 200:
            return n
        last = n
        time.sleep(0.1)
    return last


def _settled_rss(server, deadline=6.0):
    """RSS of the server's processes once it stops moving (within 0.2%)."""
    end = time.monotonic() + deadline
    prev = server.rss()
    while time.monotonic() < end:
        time.sleep(0.3)
        cur = server.rss()
        if all(cur[r] is not None and prev[r] is not None and
               abs(cur[r] - prev[r]) <= 0.002 * prev[r] for r in cur):
            return cur
        prev = cur
    return prev


# -- 4. offline drain -----------------------------------------------------------------

def drain(opts, log):
    out = {}
    for kind in opts.servers:
        with procs.Processes() as pr:
            limit = max(opts.drain_sizes) * 2
            server = _with_server(pr, kind, opts, extra=["--inbox-limit", str(max(limit, 10000))])
            for n in opts.drain_sizes:
                [w] = pr.start_workers(1)
                w.send("setup", wid=0, host="127.0.0.1", port=server.port, devices=2, lo=0,
                       hi=2, prefix=prefix(), concurrency=2, deadline=30)
                ready = w.wait("ready", 40)
                if ready["registered"] != 2:
                    raise BenchError("drain: could not register (%s)" % ready)
                w.send("fill", n=n, window=opts.fill_window, deadline=60 + n / 1000.0)
                filled = w.wait("filled", 70 + n / 1000.0)
                if filled["accepted"] != n:
                    raise BenchError("drain: only %d of %d messages accepted (errors %s)"
                                     % (filled["accepted"], n, filled["errors"]))
                cpu0 = server.cpu()
                w.send("drain", expect=n, deadline=60)
                drained = w.wait("drained", 70)
                cpu1 = server.cpu()
                res = {"messages": n, "fill_s": filled["seconds"],
                       "fill_per_s": n / filled["seconds"], "seconds": drained.get("seconds"),
                       "reply_s": drained.get("reply_seconds"), "pending": drained["pending"],
                       "received": drained["received"], "repeats": drained["repeats"],
                       "timed_out": drained["timed_out"], "errors": drained["errors"],
                       "generator_cpu_s": drained["cpu"],
                       "server_cpu_s": {r: cpu1[r] - cpu0[r] for r in cpu0
                                        if cpu0[r] is not None and cpu1.get(r) is not None},
                       "server_problems": server.problems()}
                res["lost"] = max(0, n - drained["received"])
                if res["seconds"]:
                    res["per_s"] = n / res["seconds"]
                    # the reader's CPU over the drain (10 ms ticks: coarse for short drains)
                    res["generator_cpu"] = [drained["cpu"] / res["seconds"]]
                    res["generator_saturated"] = res["generator_cpu"][0] > GEN_SATURATED
                out.setdefault("drain_%d" % n, {})[kind] = res
                log("  %s: %d stored (filled at %.0f/s), drained in %s s%s" % (
                    kind, n, res["fill_per_s"],
                    "%.3f" % res["seconds"] if res["seconds"] else "?",
                    "" if not res["lost"] else ", LOST %d" % res["lost"]))
                pr.stop_workers()
    return out


# -- 5. dedup and ref retries --------------------------------------------------------

def dedup(opts, log):
    out = {}
    for kind in opts.servers:
        with _loaded(kind, opts) as load:
            window = _window(opts)
            res = load.run("dedup", opts.duration, opts.warmup, window=window,
                           text_pool=opts.text_pool)
            res["duplicate_share"] = res["duplicates"] / float(res["replies"] or 1)
            # duplicates in the window: replies in the window times the overall share
            res["duplicates_per_s"] = res["replies_per_s"] * res["duplicate_share"]
            out.setdefault("dedup", {})[kind] = res
            log("  %s: %.0f replies/s, %.1f%% duplicate; %s" % (
                kind, res["replies_per_s"], 100 * res["duplicate_share"], _brief(res)))
    return out


def refs(opts, log):
    out = {}
    for kind in opts.servers:
        with _loaded(kind, opts) as load:
            primed = load.prime(opts.refs)
            ok = sum(p["primed_ok"] for p in primed)
            window = _window(opts)
            res = load.run("refs", opts.duration, opts.warmup, window=window)
            res["primed"] = ok
            out.setdefault("refs", {})[kind] = res
            log("  %s: %d first sends, %.0f retries/s answered, %d same id, %d mismatched; %s"
                % (kind, ok, res["replies_per_s"], res["ref_match"], res["ref_mismatch"],
                   _brief(res)))
    return out


# -- 6. several nodes -------------------------------------------------------------------

class _Nodes:
    """Several chatd processes measured as one server (CPU summed by role)."""

    def __init__(self, servers):
        self.servers = servers
        self.kind = "chatd"
        self.port = servers[0].port
        self.pid = servers[0].pid

    def cpu(self):
        out = {}
        for i, server in enumerate(self.servers):
            for role, sec in server.cpu().items():
                key = role if i == 0 or role != "server" else "server%d" % (i + 1)
                out[key] = sec if out.get(key) is None else out[key] + (sec or 0)
        return out

    def problems(self):
        return [p for server in self.servers for p in server.problems()]


def _node_runs(load, opts, log, label):
    """A closed-loop (saturation) run and an open-loop run at --node-rate."""
    window = _window(opts)
    sat = load.run("closed", opts.duration, opts.warmup, window=window)
    log("  %s, saturation: %s" % (label, _brief(sat)))
    load.mark()
    fixed = load.run("rate", opts.duration, opts.warmup,
                     rate=opts.node_rate / float(len(load.workers)))
    fixed["offered_per_s"] = opts.node_rate
    log("  %s @ %d/s: %s" % (label, opts.node_rate, _brief(fixed)))
    return {"saturation": sat, "fixed": fixed}


def nodes(opts, log):
    """Cross-node delivery against one node, in the same run. Two generator
    workers; each sends only to the other's devices. One node: both connect
    to node A (no message crosses nodes). Two nodes: one worker's devices on
    A, the other's on B (a second chatd on A's store), so every message is
    accepted on one node and pushed by the other (a publish through the
    store)."""
    out = {}
    n = opts.latency_devices
    half = n // 2
    for layout in ("one", "two"):
        with procs.Processes() as pr:
            a = _with_server(pr, "chatd", opts)
            servers = [a]
            if layout == "two":
                sock = os.path.join(a.workdir, "data", "valkey.sock")
                servers.append(pr.server("chatd", extra=["--redis", "unix://" + sock]
                                         + list(opts.chatd_args)))
            group = _Nodes(servers)
            load = Load(pr, group, n, 2, opts)
            load.ranges = [(0, half), (half, n)]
            load.peer_ranges = [(half, n), (0, half)]
            load.ports = [s.port for s in servers] if layout == "two" else [a.port, a.port]
            load.setup()
            out[layout] = _node_runs(load, opts, log, "%s node%s" % (layout, "s" * (layout == "two")))
    return {"nodes": out}


def workers(opts, log):
    """``--workers 2`` against ``--workers 1``, same load, same run."""
    out = {}
    for count in (1, 2):
        with procs.Processes() as pr:
            server = _with_server(pr, "chatd", opts, extra=["--workers", str(count)])
            if count > 1:
                server.wait_accepting()
            load = Load(pr, server, opts.latency_devices, 2, opts)
            load.setup()
            out[str(count)] = _node_runs(load, opts, log, "--workers %d" % count)
    return {"workers": out}


# -- 7. stores --------------------------------------------------------------------------

class _Stored:
    """One chatd process and the valkey-server processes of its external
    store, measured as one server (store CPU summed as 'store')."""

    def __init__(self, server, store_pids, layout):
        self.server = server
        self.store_pids = store_pids
        self.kind = "chatd-" + layout  # names its --py-spy profiles
        self.port = server.port
        self.pid = server.pid

    def cpu(self):
        out = dict(self.server.cpu())
        secs = [procs.cpu_seconds(p) for p in self.store_pids]
        out["store"] = None if None in secs else sum(secs)
        return out

    def problems(self):
        return self.server.problems()


def _plain_store(tmp, replicated):
    """A valkey-server on TCP (and its replica, in sync): [primary, (replica)]."""
    from tests.fixtures.process import wait_for
    from tests.fixtures.valkey import ValkeyServer
    nodes = [ValkeyServer(os.path.join(tmp, "primary"), tcp=True).start()]
    if replicated:
        nodes.append(ValkeyServer(os.path.join(tmp, "replica"), tcp=True).start())
    try:
        wait_for(lambda: all(n.answers() for n in nodes), 30, "the valkey-servers")
        if replicated:
            nodes[1].command("REPLICAOF", "127.0.0.1", str(nodes[0].port))
            wait_for(lambda: nodes[1].info("replication").get("master_link_status") == "up",
                     30, "the replica in sync")
    except AssertionError as e:
        for n in nodes:
            n.cleanup()
        raise BenchError(str(e)) from None
    return nodes


def stores(opts, log):
    """One chatd node on a Valkey Cluster of 3 primaries with a replica each
    against the same node on one valkey-server (TCP, no replica), same load,
    same run (saturation, then --node-rate). On the cluster every batch of
    sends is split by slot (a call per receiver slot, pipelined per
    primary), and each write is replicated once. Between them, a cluster of
    one primary and no replica: the same single valkey-server process, so
    its difference to 'single' is what the split by slot and the cluster
    client cost (and the most a batch per shard could win back). Then the
    price of --store-acks 1: one valkey-server with a replica, without and
    with it."""
    import shutil
    import tempfile

    from tests.fixtures.cluster import ValkeyCluster
    out = {}
    for layout in opts.layouts:
        tmp = tempfile.mkdtemp(prefix="chatd-bench-stores-")
        extra = ["--store-acks", "1"] if layout == "acks" else []
        if layout in ("single", "replica", "acks"):
            # one valkey-server; with a replica (without and with --store-acks 1)
            nodes = _plain_store(tmp, replicated=layout != "single")
            url = "redis://127.0.0.1:%d/0" % nodes[0].port

            def cleanup(nodes=nodes):
                for n in nodes:
                    n.cleanup()
        else:
            cluster = ValkeyCluster(tmp, **({"primaries": 1, "replicas": 0}
                                            if layout == "cluster1" else {}))
            cleanup = cluster.cleanup
            cluster.start()
            url, nodes = cluster.url, cluster.nodes
        try:
            with procs.Processes() as pr:
                server = _with_server(pr, "chatd", opts, extra=["--redis", url] + extra)
                group = _Stored(server, [n.pid for n in nodes], layout)
                load = Load(pr, group, opts.latency_devices, opts.workers, opts)
                load.setup()
                out[layout] = _node_runs(load, opts, log, "%s store" % layout)
        finally:
            cleanup()
            shutil.rmtree(tmp, ignore_errors=True)
    return {"stores": out}


SCENARIOS = {
    "store_cost": store_cost.store_cost,
    "stores": stores,
    "nodes": nodes,
    "workers": workers,
    "throughput": throughput,
    "receipts": receipts,
    "latency": latency,
    "memory": memory,
    "drain": drain,
    "dedup": dedup,
    "refs": refs,
}
