"""
What the store client saw: a histogram of call latency per script (or
command), and how many calls failed. Bumped on the hot path, read by
:mod:`chatd.ops.metrics` when Prometheus scrapes.

Plain bucket counts, not prometheus_client's ``Histogram.observe``: that
takes a lock and looks its child up each time, several times the cost of
``row[i] += 1`` (``benchmarks/metrics_cost.py``). Only the reactor thread
writes; the scrape copies.
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
