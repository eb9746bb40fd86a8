"""
The rate limit of one connection: what a line costs, and what to do with a
line over the allowance.

A client that floods must pay for it, not the server: every line costs (the
protocol decides which are free), a dropped line is answered at most once per
refill period (a flood of two-byte lines must not become a flood of
130-byte replies), and a client that goes on regardless is closed.
"""

#: what :meth:`RateLimit.take` says about a line
PASS, TELL, DROP, CLOSE = "pass", "tell", "drop", "close"


def limit(rate, burst, now):
    """The RateLimit of a new connection: with no limit (``rate`` 0), one
    shared instance, since it keeps no state."""
    if not rate:
        return UNLIMITED
    return RateLimit(rate, burst, now)


class RateLimit:
    """A token bucket: ``rate`` lines a second, bursts of ``burst``
    (``rate`` 0: no limit).

    Over the allowance a line is dropped: the first one is answered (TELL),
    then none until the bucket has had time to fill again (``burst / rate``
    seconds) (DROP); once ``2 x burst`` lines in a row have been dropped the
    connection is to be closed (CLOSE)."""

    __slots__ = ("rate", "burst", "period", "_tokens", "_refill", "_told", "_overrun")

    def __init__(self, rate, burst, now):
        self.rate = rate
        self.burst = burst
        self.period = burst / rate if rate else 0.0
        self._tokens = float(burst)
        self._refill = now
        self._told = None   # when the last TELL was
        self._overrun = 0   # lines dropped since one last passed

    def take(self, now):
        """One line, at time ``now``: PASS, TELL, DROP or CLOSE."""
        if not self.rate:
            return PASS
        self._tokens = min(self.burst, self._tokens + (now - self._refill) * self.rate)
        self._refill = now
        if self._tokens >= 1:
            self._tokens -= 1
            self._overrun = 0
            return PASS
        self._overrun += 1
        if self._overrun > 2 * self.burst:
            return CLOSE
        if self._told is None or now - self._told >= self.period:
            self._told = now
            return TELL
        return DROP


UNLIMITED = RateLimit(0, 0, 0.0)
