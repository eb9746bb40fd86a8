"""
What counting costs the hot path: the plain counters of ``chatd.wire.stats``
(bumped per message, read at scrape time) against prometheus_client's own
``Counter.labels(...).inc()`` and a child bound in advance, and the store
latency histogram (``StoreStats.observe``, once per store call, i.e. per
batch) against ``Histogram.labels(...).observe()``.

Run: ``python -m benchmarks.metrics_cost`` (a few seconds). It prints
nanoseconds per operation, best of 5; compare with chatd's CPU per delivered
message (``python -m benchmarks --only throughput``: tens of microseconds).
"""

import timeit

from prometheus_client import CollectorRegistry, Counter, Histogram

from chatd.redis.stats import StoreStats
from chatd.wire.stats import Stats

N = 1_000_000


def measure():
    registry = CollectorRegistry()
    counter = Counter("x_total", "x", ["result"], registry=registry)
    child = counter.labels("accepted")
    histogram = Histogram("y_seconds", "y", ["script"], registry=registry)
    stats, store = Stats(), StoreStats()
    cases = [
        ("plain: stats.messages[status] += 1", "stats.messages['accepted'] += 1"),
        ("plain: stats.pushes += n", "stats.pushes += 1"),
        ("prometheus: Counter.labels(status).inc()", "counter.labels('accepted').inc()"),
        ("prometheus: bound child.inc()", "child.inc()"),
        ("plain: StoreStats.observe (per store call)", "store.observe('send', 0.0012)"),
        ("prometheus: Histogram.labels().observe()", "histogram.labels('send').observe(0.0012)"),
    ]
    names = dict(stats=stats, store=store, counter=counter, child=child, histogram=histogram)
    out = []
    for label, stmt in cases:
        best = min(timeit.repeat(stmt, globals=names, number=N, repeat=5))
        out.append((label, best / N * 1e9))
    return out


def main():
    for label, ns in measure():
        print("%-46s %7.1f ns" % (label, ns))


if __name__ == "__main__":
    main()
