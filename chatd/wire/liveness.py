"""
A session's deadlines (:class:`Liveness`, a base class of
:class:`chatd.wire.session.Session`): the auth timeout while unbound, the
keepalive ping and the idle timeout, and the grace a closing connection has
before it is cut. They live on the factory's
:class:`chatd.wire.timers.TimerWheel`, one slot per connection.
"""

#: how long a closing connection may take to flush before it is cut
CLOSE_GRACE = 5.0


class Liveness:
    """Uses of the session: ``factory.wheel``, ``settings``, ``framing``,
    ``delivery``, ``last_seen``, ``_pinged``, ``_closing``, ``close`` and
    ``send_lines``. The owner of a wheel slot (``_timer_fired``)."""

    # its state (slots of the Session, None at first): _wheel_slot (see
    # chatd.wire.timers), _auth_at the auth deadline while unbound, _live_at
    # the next keepalive/idle check, _abort_at when a closing connection is cut
    __slots__ = ()

    def _arm(self):
        """Put the earliest deadline on the factory's wheel: the abort once
        closing, else the auth timeout (while unbound) or the next liveness
        check, whichever comes first."""
        if self._abort_at is not None:
            when = self._abort_at
        else:
            when = self._live_at
            if self._auth_at is not None and self._auth_at < when:
                when = self._auth_at
        self.factory.wheel.schedule(self, when)

    def _timer_fired(self, now):
        if self._abort_at is not None:
            if now >= self._abort_at:
                self._abort_at = None
                self.framing.abort()
            else:
                self._arm()
            return
        if self._closing:
            return  # closed without a grace (connectionLost is on its way)
        if self._auth_at is not None and now >= self._auth_at:
            self._auth_at = None
            self.close("auth_timeout", "no register or reconnect within %gs"
                       % self.settings.auth_timeout)
            return
        if now >= self._live_at:
            self._liveness(now)
        if not self._closing:
            self._arm()

    def _liveness(self, now):
        """Ping a silent bound client after --keepalive, close after --idle-timeout."""
        s = self.settings
        silent = now - self.last_seen
        if silent >= s.idle_timeout:
            self.close("idle_timeout", "nothing received for %gs" % s.idle_timeout)
            return
        bound = self.delivery is not None
        if silent >= s.keepalive and not self._pinged and bound:
            self._pinged = True
            self.send_lines(b'{"type":"ping"}\n')
            self.framing.keepalive()
        if self._pinged or not bound:
            next_check = self.last_seen + s.idle_timeout
        else:
            next_check = self.last_seen + s.keepalive
        self._live_at = max(next_check, now + 0.01)
