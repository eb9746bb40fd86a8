"""
The table (scenario, metric, chatd, relay, ratio, target, met?) from the
scenarios' measurements, and its printing.
"""

from benchmarks import storm

#: the issue's targets (chatd with dedup, durable store, acks, embedded store)
MIN_RATIO_THROUGHPUT = 0.5
MIN_THROUGHPUT = 30000
MAX_P99_MS_AT_10K = 5.0
MAX_MEMORY_RATIO = 2.0
MAX_DRAIN_10K_S = 0.2
MIN_RECEIPTS_RATIO = 0.85


def _get(d, *path):
    for p in path:
        if d is None:
            return None
        d = d.get(p) if isinstance(d, dict) else None
    return d


def row(scenario, metric, chatd=None, relay=None, target="", met=None, note=""):
    ratio = None
    if isinstance(chatd, (int, float)) and isinstance(relay, (int, float)) and relay:
        ratio = chatd / float(relay)
    return {"scenario": scenario, "metric": metric, "chatd": chatd, "relay": relay,
            "ratio": ratio, "target": target, "met": met, "note": note}


def _flags(*results):
    notes = []
    for kind, res in results:
        if not res:
            continue
        if res.get("generator_saturated"):
            notes.append("%s: generator >90%% CPU" % kind)
        bad = [k for k in ("lost", "extra", "repeats") if res.get(k)]
        if bad:
            notes.append("%s: %s" % (kind, ", ".join("%s %d" % (k, res[k]) for k in bad)))
        if res.get("timed_out"):
            notes.append("%s: timed out" % kind)
        errs = {k: v for k, v in (res.get("errors") or {}).items()}
        if errs:
            notes.append("%s errors: %s" % (kind, ", ".join("%s x%d" % kv for kv in errs.items())))
    return "; ".join(notes)


def _receipt_rows(key, per):
    """receipts_N: --receipts on (the chatd column) against off (the relay
    column), every device opted in and acking every 16 pushes; and on with
    nobody opted in against off."""
    on, off, nobody = per.get("on"), per.get("off"), per.get("nobody")
    sc = "receipts %s dev%s (relay column: --receipts off)" % (
        key.split("_")[-1], ", pairs" if "_pairs_" in key else ", random peers")
    cv, rv = _get(on, "delivered_per_s"), _get(off, "delivered_per_s")
    met = None
    if cv is not None and rv:
        met = cv >= MIN_RECEIPTS_RATIO * rv and not (on.get("lost") or on.get("timed_out"))
    return [row(sc, "delivered msg/s", cv, rv, ">=%gx off" % MIN_RECEIPTS_RATIO, met,
                _flags(("on", on), ("off", off))),
            row(sc, "p99 ms at saturation", _get(on, "latency_ms", "p99"),
                _get(off, "latency_ms", "p99")),
            row(sc, "receipts pushed", _get(on, "receipts"), _get(off, "receipts")),
            row(sc, "nobody opted in: delivered msg/s", _get(nobody, "delivered_per_s"), rv,
                note=_flags(("nobody", nobody))),
            row(sc, "nobody opted in: p99 ms", _get(nobody, "latency_ms", "p99"),
                _get(off, "latency_ms", "p99")),
            # CPU per message holds better than throughput on a shared machine
            row(sc, "chatd+store CPU us/msg", _get(on, "server_cpu_us_per_msg", "total"),
                _get(off, "server_cpu_us_per_msg", "total"), note=_cpu_split(on, off)),
            row(sc, "nobody opted in: chatd+store CPU us/msg",
                _get(nobody, "server_cpu_us_per_msg", "total"),
                _get(off, "server_cpu_us_per_msg", "total"), note=_cpu_split(nobody, off))]


def _cpu_split(res, off):
    """chatd's and the store's CPU per message, against off's."""
    def us(r, role):
        v = _get(r, "server_cpu_us_per_msg", role)
        return "-" if v is None else "%.1f" % v
    return "chatd %s vs %s us, store %s vs %s us" % (
        us(res, "server"), us(off, "server"), us(res, "store"), us(off, "store"))


def rows(results):
    out = []
    for key, per in results.items():
        if not isinstance(per, dict) or "error" in per and len(per) == 1:
            out.append(row(key, "FAILED", note=str(per.get("error", ""))[:200]))
            continue
        if key.startswith("receipts_"):
            out.extend(_receipt_rows(key, per))
            continue
        c, r = per.get("chatd"), per.get("relay")
        flags = _flags(("chatd", c), ("relay", r))
        if key.startswith("throughput_"):
            n = key.split("_")[1]
            sc = "throughput %s dev" % n
            cv, rv = _get(c, "delivered_per_s"), _get(r, "delivered_per_s")
            met = None
            if cv is not None:
                met = cv >= MIN_THROUGHPUT and (rv is None or cv >= MIN_RATIO_THROUGHPUT * rv)
                if c.get("lost") or c.get("timed_out"):
                    met = False
            out.append(row(sc, "delivered msg/s", cv, rv,
                           ">=%gx relay, >=%d" % (MIN_RATIO_THROUGHPUT, MIN_THROUGHPUT), met, flags))
            out.append(row(sc, "CPU us/msg: server process", _get(c, "server_cpu_us_per_msg", "server"),
                           _get(r, "server_cpu_us_per_msg", "server")))
            out.append(row(sc, "CPU us/msg: valkey child", _get(c, "server_cpu_us_per_msg", "store")))
            out.append(row(sc, "CPU us/msg: total", _get(c, "server_cpu_us_per_msg", "total"),
                           _get(r, "server_cpu_us_per_msg", "total")))
            out.append(row(sc, "p99 ms at saturation", _get(c, "latency_ms", "p99"),
                           _get(r, "latency_ms", "p99")))
            out.append(row(sc, "generator CPU (max, core)", _max(_get(c, "generator_cpu")),
                           _max(_get(r, "generator_cpu"))))
            out.append(row(sc, "lost+extra+repeated", _bad(c), _bad(r), "0",
                           None if c is None else _bad(c) == 0 and (r is None or _bad(r) == 0)))
        elif key.startswith("latency_"):
            rate = int(key.split("_")[1])
            sc = "latency @%d/s" % rate
            for p in ("p50", "p95", "p99"):
                cv, rv = _get(c, "latency_ms", p), _get(r, "latency_ms", p)
                target, met = "", None
                if p == "p99" and rate == 10000:
                    target = "<=%g ms" % MAX_P99_MS_AT_10K
                    met = cv is not None and cv <= MAX_P99_MS_AT_10K and not c.get("lost")
                out.append(row(sc, "%s ms" % p, cv, rv, target, met, flags if p == "p50" else ""))
            out.append(row(sc, "delivered msg/s", _get(c, "delivered_per_s"), _get(r, "delivered_per_s")))
            out.append(row(sc, "lost+extra+repeated", _bad(c), _bad(r), "0",
                           None if c is None else _bad(c) == 0 and (r is None or _bad(r) == 0)))
        elif key.startswith("memory_"):
            sc = "idle memory %s conns" % key.split("_")[1]
            if c is not None:
                sc = "idle memory %d conns" % c["connections"]
            elif r is not None:
                sc = "idle memory %d conns" % r["connections"]
            kb = lambda res, role: None if _get(res, "bytes_per_conn", role) is None else \
                _get(res, "bytes_per_conn", role) / 1024.0  # noqa: E731
            ct, rt = kb(c, "total"), kb(r, "total")
            met = None
            if ct is not None and rt:
                met = ct <= MAX_MEMORY_RATIO * rt
            out.append(row(sc, "KB/conn: server process", kb(c, "server"), kb(r, "server"),
                           note=flags))
            out.append(row(sc, "KB/conn: valkey child", kb(c, "store")))
            out.append(row(sc, "KB/conn: total", ct, rt, "<=%gx relay" % MAX_MEMORY_RATIO, met))
            out.append(row(sc, "connect+register/s", _get(c, "register_per_s"), _get(r, "register_per_s")))
        elif key.startswith("drain_"):
            n = int(key.split("_")[1])
            sc = "offline drain %d" % n
            cv, rv = _get(c, "seconds"), _get(r, "seconds")
            target, met = "", None
            if n == 10000:
                target = "<=%g s" % MAX_DRAIN_10K_S
                met = cv is not None and cv <= MAX_DRAIN_10K_S and not c.get("lost")
            out.append(row(sc, "seconds to last message", cv, rv, target, met, flags))
            out.append(row(sc, "drained msg/s", _get(c, "per_s"), _get(r, "per_s")))
            out.append(row(sc, "stored msg/s (one sender)", _get(c, "fill_per_s"), _get(r, "fill_per_s")))
        elif key == "dedup":
            sc = "dedup (repeat texts)"
            out.append(row(sc, "duplicate replies/s", _get(c, "duplicates_per_s"),
                           _get(r, "duplicates_per_s"), note=flags))
            out.append(row(sc, "all replies/s", _get(c, "replies_per_s"), _get(r, "replies_per_s")))
            out.append(row(sc, "duplicate share %", _pct(_get(c, "duplicate_share")),
                           _pct(_get(r, "duplicate_share"))))
            out.append(row(sc, "CPU us/reply: total", _per_reply(c), _per_reply(r)))
            out.append(row(sc, "lost+extra+repeated", _bad(c), _bad(r), "0",
                           None if c is None else _bad(c) == 0 and (r is None or _bad(r) == 0)))
        elif key == "refs":
            sc = "ref retries"
            out.append(row(sc, "retry replies/s", _get(c, "replies_per_s"), _get(r, "replies_per_s"),
                           note=flags))
            out.append(row(sc, "CPU us/reply: total", _per_reply(c), _per_reply(r)))
            out.append(row(sc, "retries with another id", _get(c, "ref_mismatch"),
                           _get(r, "ref_mismatch"), "0",
                           None if c is None else c.get("ref_mismatch") == 0))
            out.append(row(sc, "pushed again / lost", _bad(c), _bad(r), "0",
                           None if c is None else _bad(c) == 0))
        elif key in ("nodes", "workers"):
            out += _compare_rows(key, per)
        elif key == "store_cost":
            from benchmarks import store_cost
            out += store_cost.rows(per)
        elif key == "connections" or key.startswith("storm_"):
            out += storm.rows(key, per, row, _get)
        elif key == "stores":
            out += _compare_rows(key, per)
            out += _compare_rows("stores1", per)
            out += _compare_rows("stores_acks", per)
    return out


def _compare_rows(key, per):
    """The nodes and workers scenarios: chatd against chatd. The 'chatd'
    column is the variant (two nodes, --workers 2), the 'relay' column the
    baseline of the same run (one node, --workers 1)."""
    variant, base = {"nodes": ("two", "one"), "workers": ("2", "1"),
                     "stores": ("cluster", "single"), "stores1": ("cluster1", "single"),
                     "stores_acks": ("acks", "replica")}[key]
    variant, base = per.get(variant), per.get(base)
    sc = {"nodes": "cross-node vs 1 node", "workers": "--workers 2 vs 1",
          "stores": "cluster 3x2 vs 1 store", "stores1": "cluster of 1 vs 1 store",
          "stores_acks": "--store-acks 1 vs 0"}[key]
    note = "columns: chatd = %s, relay = %s (same run)" % {
        "nodes": ("two nodes (every message crosses)", "one node"),
        "workers": ("--workers 2", "--workers 1"),
        "stores": ("a Valkey Cluster, 3 primaries + 3 replicas",
                   "one valkey-server on TCP"),
        "stores1": ("a Valkey Cluster of one primary (every batch split by slot)",
                    "one valkey-server on TCP"),
        "stores_acks": ("one valkey-server with a replica, --store-acks 1",
                        "the same, --store-acks 0")}[key]
    sat = lambda r: _get(r, "saturation")  # noqa: E731
    fixed = lambda r: _get(r, "fixed")  # noqa: E731
    rate = _get(fixed(variant) or fixed(base), "offered_per_s")
    flags = _flags(("variant", sat(variant)), ("baseline", sat(base)),
                   ("variant fixed", fixed(variant)), ("baseline fixed", fixed(base)))
    rs = [row(sc, "saturation msg/s", _get(sat(variant), "delivered_per_s"),
              _get(sat(base), "delivered_per_s"), note=note + ("; " + flags if flags else "")),
          row(sc, "CPU us/msg: total", _get(sat(variant), "server_cpu_us_per_msg", "total"),
              _get(sat(base), "server_cpu_us_per_msg", "total"))]
    for p in ("p50", "p99"):
        rs.append(row(sc, "%s ms @%s/s" % (p, rate), _get(fixed(variant), "latency_ms", p),
                      _get(fixed(base), "latency_ms", p)))
    bad = lambda r: None if r is None else _bad(sat(r)) + _bad(fixed(r))  # noqa: E731
    rs.append(row(sc, "lost+extra+repeated", bad(variant), bad(base), "0",
                  None if variant is None else bad(variant) == 0 and bad(base) == 0))
    return rs


def _max(xs):
    xs = [x for x in (xs or []) if x is not None]
    return max(xs) if xs else None


def _pct(x):
    return None if x is None else 100.0 * x


def _bad(res):
    if res is None:
        return None
    return (res.get("lost") or 0) + (res.get("extra") or 0) + (res.get("repeats") or 0)


def _per_reply(res):
    if not res:
        return None
    replies = res.get("replies_per_s")
    cpu = res.get("server_cpu_core") or {}
    if not replies:
        return None
    return sum(cpu.values()) * 1e6 / replies


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int):
        return "{:,}".format(v)
    if isinstance(v, float):
        a = abs(v)
        if a >= 999.5:
            return "{:,.0f}".format(v)
        if a >= 99.95:
            return "%.0f" % v
        if a >= 9.995:
            return "%.1f" % v
        if a >= 0.9995:
            return "%.2f" % v
        return "%.3f" % v
    return str(v)


def table(rs):
    cols = ["scenario", "metric", "chatd", "relay", "ratio", "target", "met?"]
    lines = []
    body = []
    for r in rs:
        ratio = "-" if r["ratio"] is None else "%.2fx" % r["ratio"]
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        body.append([r["scenario"], r["metric"], fmt(r["chatd"]), fmt(r["relay"]), ratio,
                     r["target"], met])
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c)
              for i, c in enumerate(cols)]
    fmt_row = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i < 2 or i >= 5 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines.append(fmt_row(cols))
    lines.append("  ".join("-" * w for w in widths))
    last = None
    for cells, r in zip(body, rs):
        if last is not None and r["scenario"] != last:
            lines.append("")
        last = r["scenario"]
        lines.append(fmt_row(cells).rstrip())
    notes = [(r["scenario"], r["note"]) for r in rs if r.get("note")]
    if notes:
        lines.append("")
        lines.append("notes:")
        for sc, note in notes:
            lines.append("  %s: %s" % (sc, note))
    return "\n".join(lines)
