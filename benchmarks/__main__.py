"""
``python -m benchmarks``: run the suite against chatd and the bare relay,
print the table and write the JSON (see benchmarks/README.rst).
"""

import argparse
import datetime
import json
import os
import signal
import sys
import time
import traceback

from benchmarks import procs, report, scenarios, storm
from benchmarks.procs import BenchError

DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latest.json")
ORDER = ["throughput", "receipts", "latency", "memory", "drain", "dedup", "refs", "nodes", "workers",
         "stores", "store_cost", "connections", "storm"]
SCENARIOS = dict(scenarios.SCENARIOS, **storm.SCENARIOS)
#: scenarios that take the whole machine for minutes: run only when named
ONLY_NAMED = ("connections", "storm")


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def _conns(text):
    out = []
    for x in text.split(","):
        x = x.strip()
        if x:
            out.append("max" if x == "max" else int(x))
    return out


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=(
        "chatd against a bare Twisted relay (the same-run ceiling): throughput, "
        "latency, idle memory, offline drain, dedup and ref retries."))
    p.add_argument("--quick", action="store_true",
                   help="a few seconds per scenario, small sizes (for tests)")
    p.add_argument("--only", action="extend", nargs="+", default=[], metavar="SCENARIO",
                   help="run only these (several, repeatable or comma-separated: "
                   "--only connections storm): " + ", ".join(ORDER))
    p.add_argument("--servers", default="chatd,relay",
                   help="which servers to measure (default: chatd,relay)")
    p.add_argument("--duration", type=float, help="measured seconds per run (default 8; quick 2)")
    p.add_argument("--warmup", type=float, help="seconds of load before measuring (default 1.5; quick 0.5)")
    p.add_argument("--devices", type=_ints, help="device counts for throughput (default 100,1000)")
    p.add_argument("--rates", type=_ints, help="offered msg/s for latency (default 1000,5000,10000)")
    p.add_argument("--latency-devices", type=int, help="devices in the latency, dedup and ref runs (default 100)")
    p.add_argument("--conns", type=_conns, help="idle connections for memory; 'max' = as many as "
                   "the server's fd limit allows (default 10000,max)")
    p.add_argument("--drain", type=_ints, dest="drain_sizes",
                   help="stored messages for the drain (default 10000,100000)")
    p.add_argument("--repeat", type=int, help="throughput: runs of each server, taking turns; "
                   "the best is kept (default 2; quick 1)")
    p.add_argument("--workers", type=int, default=2, help="generator processes (default 2)")
    p.add_argument("--inflight", type=int, default=2000,
                   help="closed loop: messages in flight across all devices (default 2000)")
    p.add_argument("--window", type=int, help="closed loop: messages in flight per device "
                   "(default: --inflight / devices)")
    p.add_argument("--fill-window", type=int, default=200, help="drain: sends in flight while storing")
    p.add_argument("--node-rate", type=int, default=2000,
                   help="nodes, workers and stores scenarios: the fixed offered rate "
                   "(default 2000 msg/s)")
    p.add_argument("--layouts", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                   default=["single", "cluster1", "cluster", "replica", "acks"],
                   help="stores scenario: which store layouts (default: single,cluster1,"
                   "cluster,replica,acks)")
    p.add_argument("--storm-devices", type=int, default=80000,
                   help="connections and storm scenarios: devices held (default 80000)")
    p.add_argument("--storm-workers", type=int, default=5,
                   help="connections and storm: chatd --workers, and relay processes (default 5)")
    p.add_argument("--storm-idle", type=float, default=65.0,
                   help="connections: seconds of idle CPU measured (default 65: a keepalive round)")
    p.add_argument("--storm-rate", type=int, default=1000,
                   help="connections: msg/s of the live conversation (default 1000)")
    p.add_argument("--storm-messages", type=int, default=5,
                   help="storm: messages waiting for each device (default 5, at most 9)")
    p.add_argument("--storm-deadline", type=float, default=180.0,
                   help="storm: seconds for every device to be served (default 180)")
    p.add_argument("--refs", type=int, default=20, help="ref scenario: first sends per device")
    p.add_argument("--text-pool", type=int, default=10, help="dedup scenario: distinct texts")
    p.add_argument("--chatd-arg", action="append", default=[], dest="chatd_args",
                   help="an extra argument for chatd (repeatable; use --chatd-arg=--x)")
    p.add_argument("--chatd-prefix", help="a command to run chatd's python under, e.g. "
                   "'py-spy record -o chatd.svg --' (the table then measures the profiler too)")
    p.add_argument("--relay-prefix", help="the same for the relay")
    p.add_argument("--py-spy", metavar="PREFIX", help="record the server's python process with "
                   "py-spy during each measured window, to PREFIX-<server>-<mode>-<devices>.raw "
                   "(read with: python -m benchmarks.proftop FILE)")
    p.add_argument("--json", default=DEFAULT_JSON, help="where to write the results "
                   "(default benchmarks/results/latest.json)")
    p.add_argument("--receipts-store", choices=("embedded", "cluster1"), default="embedded",
                   help="receipts scenario: chatd's embedded store (default), or a Valkey "
                   "Cluster of one primary (the outbox path of Redis Cluster)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed scenario")
    opts = p.parse_args(argv)
    q = opts.quick
    defaults = dict(duration=2.0 if q else 8.0, repeat=1 if q else 2, warmup=0.5 if q else 1.5,
                    devices=[100] if q else [100, 1000],
                    rates=[1000, 5000] if q else [1000, 5000, 10000],
                    latency_devices=50 if q else 100,
                    conns=[1000] if q else [10000, "max"],
                    drain_sizes=[2000] if q else [10000, 100000])
    for k, v in defaults.items():
        if getattr(opts, k) is None:
            setattr(opts, k, v)
    only = [x.strip() for o in opts.only for x in o.split(",") if x.strip()]
    unknown = [x for x in only if x not in ORDER]
    if unknown:
        p.error("unknown scenario(s): %s (choose from %s)" % (", ".join(unknown), ", ".join(ORDER)))
    opts.scenarios = [s for s in ORDER if s in only or not only and s not in ONLY_NAMED]
    opts.servers = [s.strip() for s in opts.servers.split(",") if s.strip()]
    for s in opts.servers:
        if s not in ("chatd", "relay"):
            p.error("--servers: %r is neither chatd nor relay" % s)
    return opts


def _tree():
    """Which chatd was measured: the commit and the files changed since."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        try:
            return subprocess.run(["git"] + list(args), cwd=root, capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    return {"commit": git("rev-parse", "HEAD"),
            "changed": (git("status", "--porcelain", "--", "chatd", "twisted") or "").splitlines()}


def _interrupt(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def main(argv=None):
    opts = parse(sys.argv[1:] if argv is None else argv)
    # SIGTERM stops the suite like ^C: every process it started is stopped
    signal.signal(signal.SIGTERM, _interrupt)
    tree = _tree()
    t0 = time.monotonic()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    def log(msg):
        print("[%6.1fs] %s" % (time.monotonic() - t0, msg), flush=True)

    results = {}
    failed = []
    for name in opts.scenarios:
        log("%s ..." % name)
        try:
            results.update(SCENARIOS[name](opts, log))
        except (BenchError, OSError) as e:
            log("%s FAILED: %s" % (name, e))
            results[name] = {"error": str(e)}
            failed.append(name)
            if opts.fail_fast:
                break
        except KeyboardInterrupt:
            log("interrupted")
            failed.append(name)
            break
        except Exception:
            text = traceback.format_exc()
            log("%s FAILED:\n%s" % (name, text))
            results[name] = {"error": text}
            failed.append(name)
            if opts.fail_fast:
                break
    elapsed = time.monotonic() - t0
    rs = report.rows(results)
    doc = {
        "started": started,
        "elapsed_s": elapsed,
        "machine": procs.machine(),
        "chatd_tree": tree,
        "options": {k: v for k, v in vars(opts).items()},
        "results": results,
        "rows": rs,
        "failed": failed,
    }
    path = opts.json
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    m = doc["machine"]
    print()
    print("machine: %s cores, %s, Python %s, fd limit %s; chatd at %s%s" % (
        m["nproc"], m["cpu_model"], m["python"], m["fd_limit"], (tree["commit"] or "?")[:10],
        " + %d changed files" % len(tree["changed"]) if tree["changed"] else ""))
    print(report.table(rs))
    print()
    print("suite took %.0fs; JSON: %s" % (elapsed, path))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
