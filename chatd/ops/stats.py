"""
Plain counters that the hot path bumps, read by :mod:`chatd.ops.metrics` when
Prometheus scrapes.

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

import collections

class Stats:
    """What one node's connections did (kept on the hub, bumped by the
    protocol): message results, errors sent, pushes, acks."""

    __slots__ = ("messages", "errors", "pushes", "acks")

    def __init__(self):
        self.messages = collections.defaultdict(int)  # result -> count
        self.errors = collections.defaultdict(int)    # error code -> count
        self.pushes = 0  # messages written to devices
        self.acks = 0    # ack packets taken (valid ones)
