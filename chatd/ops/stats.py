"""
The store client's counters (a latency histogram per script, failures),
plain numbers that the hot path bumps, read by :mod:`chatd.ops.metrics` when
Prometheus scrapes. The connections' counters are
:class:`chatd.wire.stats.Stats`.

Why not prometheus_client's ``Counter.labels(...).inc()`` at each message:
it takes a lock and looks the child up by its labels every time, about 1.6 us
per call (0.45 us with the child bound in advance), where ``d[key] += 1`` on a
plain dict costs about 0.06 us (``benchmarks/metrics_cost.py``). A message
touches several counters, so the difference is measurable at chatd's rates.
Here nothing is locked: only the reactor thread writes, and the scrape (in
a thread of the reactor's pool) copies the dicts, which CPython does
atomically for str keys.

Nothing here imports anything of chatd: every layer may hold one.
"""

import bisect

#: upper bounds (seconds) of the store latency histogram buckets
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0)


class StoreStats:
    """The store client's side: a histogram of call latency per script (or
    command), kept as plain bucket counts (see the module docstring for
    why), and how many calls failed as unavailable."""

    __slots__ = ("calls", "unavailable", "unconfirmed", "redirects")

    def __init__(self):
        self.calls = {}  # name -> [bucket counts..., +Inf count, sum]
        self.unavailable = 0  # calls that failed as StoreUnavailable
        self.unconfirmed = 0  # writes done but not confirmed by --store-acks replicas
        self.redirects = {}  # Redis Cluster: MOVED/ASK/TRYAGAIN/CLUSTERDOWN -> count

    def observe(self, name, seconds):
        row = self.calls.get(name)
        if row is None:
            row = self.calls[name] = [0] * (len(LATENCY_BUCKETS) + 2)
        row[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        row[-1] += seconds

    def snapshot(self):
        """{name: (cumulative bucket counts incl. +Inf, sum)} for a scrape."""
        out = {}
        for name, row in list(self.calls.items()):
            row = list(row)
            total, cumulative = 0, []
            for n in row[:-1]:
                total += n
                cumulative.append(total)
            out[name] = (cumulative, row[-1])
        return out
