"""
What one node's client connections did: plain counters that the sessions
bump (message results, errors sent, pushes, acks), held by the factory and
read by :mod:`chatd.ops.metrics` when Prometheus scrapes.

Plain ints and dicts rather than prometheus_client counters: see
``benchmarks/metrics_cost.py`` for the measured cost. Only the reactor thread
writes; a scrape copies the dicts. Nothing here imports anything of chatd.
"""

import collections


class Stats:
    """Counters of the connections of one node (kept on the
    :class:`chatd.wire.factory.ChatFactory`, bumped by the sessions through
    :meth:`count`)."""

    __slots__ = ("messages", "errors", "pushes", "acks")

    def __init__(self):
        self.messages = collections.defaultdict(int)  # result -> count
        self.errors = collections.defaultdict(int)    # error code -> count
        self.pushes = 0  # messages written to devices
        self.acks = 0    # ack packets taken (valid ones)

    def count(self, error=None, message=None, pushes=0, acks=0):
        """One event: an error line sent (its code), a message packet's
        result, messages pushed, acks taken."""
        if error is not None:
            self.errors[error] += 1
        if message is not None:
            self.messages[message] += 1
        if pushes:
            self.pushes += pushes
        if acks:
            self.acks += acks
