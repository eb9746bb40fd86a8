"""
The rate limit of one connection: what a line costs, and what to do with a
line over the allowance.

A client that floods must pay for it, not the server: every line costs (the
protocol decides which are free), a dropped line is answered at most once per
refill period (a flood of two-byte lines must not become a flood of
130-byte replies), and a client that goes on regardless is closed.

A line costs one token plus one per full :data:`BYTES_PER_TOKEN` bytes
(:func:`cost`): any chat message (at most ``--max-message``, 16 KiB by
default) costs one packet, a 64 KiB line three, so the allowance bounds the
bytes a connection makes the server read, not only its lines, without
charging an ordinary client more than before (a client that sends many
messages of the largest size at once is not rate limited for their size). The session charges before it parses a line. Big answers
are charged too (:meth:`RateLimit.charge`: a ``pong`` echoes what it is
sent, escaped). Errors have an allowance of their own
(:meth:`RateLimit.error`): :data:`ERROR_BYTES` bytes of them per refill
period, then one notice, then silence, and a connection that keeps going is
closed (a one-byte junk line must not buy a 120-byte error, over and over).
"""

#: what :meth:`RateLimit.take` and :meth:`RateLimit.error` say
PASS, TELL, DROP, CLOSE = "pass", "tell", "drop", "close"

#: a line costs one token more for every full this many bytes
BYTES_PER_TOKEN = 32768

#: bytes of error replies a connection is sent per refill period (``burst /
#: rate``), before the rest are dropped: a dozen or so errors
ERROR_BYTES = 2048


def cost(nbytes):
    """The tokens a line of ``nbytes`` bytes costs."""
    return 1 + nbytes // BYTES_PER_TOKEN


def limit(rate, burst, now):
    """The RateLimit of a new connection: with no limit (``rate`` 0), one
    shared instance, since it keeps no state."""
    if not rate:
        return UNLIMITED
    return RateLimit(rate, burst, now)


class RateLimit:
    """A token bucket: ``rate`` tokens a second, bursts of ``burst``
    (``rate`` 0: no limit). A line passes while the bucket holds a token,
    and costs :func:`cost` (the bucket may go into debt: a line of 64 KiB
    passes even when the burst is smaller, and the debt is paid by waiting).

    Over the allowance a line is dropped: the first one is answered (TELL),
    then none until the bucket has had time to fill again (``burst / rate``
    seconds) (DROP); once ``2 x burst`` lines in a row have been dropped the
    connection is to be closed (CLOSE). Errors are alike, in bytes of
    their replies (:meth:`error`), but the connection is closed when they
    go over again within three periods of the notice."""

    __slots__ = ("rate", "burst", "period", "_tokens", "_refill", "_told", "_overrun",
                 "_err_bytes", "_err_refill", "_err_told")

    def __init__(self, rate, burst, now):
        self.rate = rate
        self.burst = burst
        self.period = burst / rate if rate else 0.0
        self._tokens = float(burst)
        self._refill = now
        self._told = None   # when the last TELL was
        self._overrun = 0   # lines dropped since one last passed
        self._err_bytes = float(ERROR_BYTES)
        self._err_refill = now
        self._err_told = None   # when errors last went over (TELL)

    def take(self, now, nbytes=0):
        """One line of ``nbytes`` bytes, at time ``now``: PASS, TELL, DROP or
        CLOSE."""
        if not self.rate:
            return PASS
        self._tokens = min(self.burst, self._tokens + (now - self._refill) * self.rate)
        self._refill = now
        if self._tokens >= 1:
            self._tokens -= 1 + nbytes // BYTES_PER_TOKEN
            self._overrun = 0
            return PASS
        self._overrun += 1
        if self._overrun > 2 * self.burst:
            return CLOSE
        if self._told is None or now - self._told >= self.period:
            self._told = now
            return TELL
        return DROP

    def charge(self, nbytes):
        """An answer of ``nbytes`` bytes made for the line just taken: each
        full :data:`BYTES_PER_TOKEN` bytes cost a token (into debt if need be)."""
        if self.rate:
            self._tokens -= nbytes // BYTES_PER_TOKEN

    def error(self, now, nbytes):
        """An error reply of ``nbytes`` bytes is due: PASS (send it), TELL
        (send one notice instead: the errors are over the allowance), DROP
        (send nothing) or CLOSE."""
        if not self.rate:
            return PASS
        refill = ERROR_BYTES / self.period
        self._err_bytes = min(ERROR_BYTES,
                              self._err_bytes + (now - self._err_refill) * refill)
        self._err_refill = now
        if self._err_bytes >= nbytes:
            self._err_bytes -= nbytes
            return PASS
        told = self._err_told
        if told is not None and now - told < self.period:
            return DROP
        if told is not None and now - told < 3 * self.period:
            return CLOSE  # over again in the next periods: it keeps it up
        self._err_told = now
        return TELL


UNLIMITED = RateLimit(0, 0, 0.0)
