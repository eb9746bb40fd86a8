"""
The factory of client connections: what every session of a node shares
(settings, the hub, the clock, the timer wheel, the outbox of this turn's
writes, the connection statistics), the admission caps, and the graceful
shutdown.
"""

import collections
import random

from twisted.internet import defer, protocol

from chatd.wire import timers
from chatd.wire.lines import LineFraming
from chatd.wire.output import Outbox
from chatd.wire.session import CLOSE_GRACE, Session
from chatd.wire.stats import Stats

#: files a node needs besides its client connections (listeners, the store,
#: logs, the embedded store's pipes)
FILES_HEADROOM = 100


class ChatFactory(protocol.Factory):
    """Holds what every connection shares: settings, the hub, the clock, and
    the set of live sessions (for a graceful shutdown). Builds the TCP
    framing; the WebSocket one is built by :mod:`chatd.wire.websocket`."""

    noisy = False

    def __init__(self, settings, hub, clock):
        self.settings = settings
        self.hub = hub
        self.clock = clock
        self.connections = set()  # the sessions admitted
        self.http = set()  # HTTP connections of --websocket listeners, not upgraded
        self.stats = Stats()  # bumped by the sessions, read by chatd.ops.metrics
        self.wheel = timers.TimerWheel(clock, timers.tick_for(
            settings.auth_timeout, settings.keepalive, settings.idle_timeout))
        self.outbox = Outbox(clock)
        self.max_connections = settings.max_connections or max(
            1, _files_limit() - FILES_HEADROOM)
        self._per_ip = collections.Counter()  # address -> connections admitted

    def buildProtocol(self, addr):
        return LineFraming(Session, self)

    def admit(self, conn):
        """Count a new session in; the reason it is refused, if over a cap
        (--max-connections, --max-connections-per-ip)."""
        return self._admit(conn, conn.framing.transport, self.connections)

    def admit_http(self, channel):
        """Count in an HTTP connection of a --websocket listener, against the
        same caps: it holds a file as a session does. Once it is a WebSocket
        it is released, and its session admitted (so counted once)."""
        return self._admit(channel, channel.transport, self.http)

    def _admit(self, conn, transport, pool):
        if len(self.connections) + len(self.http) >= self.max_connections:
            return ("the server has its most connections (%d); try again later"
                    % self.max_connections)
        per_ip = self.settings.max_connections_per_ip
        ip = getattr(transport.getPeer(), "host", None)
        if per_ip and ip is not None:
            if self._per_ip[ip] >= per_ip:
                return ("%d connections from %s already; close one, or try again later"
                        % (per_ip, ip))
            self._per_ip[ip] += 1
            conn._ip = ip
        pool.add(conn)
        return None

    def release(self, conn):
        """A session or an HTTP connection is gone (admitted or not)."""
        pool = self.connections if conn in self.connections else self.http
        if conn in pool:
            pool.discard(conn)
            ip = getattr(conn, "_ip", None)
            if ip is not None:
                self._per_ip[ip] -= 1
                if not self._per_ip[ip]:
                    del self._per_ip[ip]

    @defer.inlineCallbacks
    def shutdown(self, grace=CLOSE_GRACE):
        """Stop reading, let every packet read so far get its reply, then send
        ``shutdown`` to everyone and close; cut whoever is left after grace.
        HTTP connections that are no WebSocket are closed at once."""
        for channel in list(self.http):
            channel.transport.loseConnection()
        conns = list(self.connections)
        for c in conns:
            c._pause("shutdown")
        idle = defer.DeferredList([c.when_idle() for c in conns], consumeErrors=True)
        yield _within(idle, self.settings.redis_timeout + 1, self.clock)
        gone = []
        left = list(self.connections)
        for c in left:
            gone.append(c.when_closed())
            c.close("shutdown", "the server is stopping; reconnect later",
                    retry_after_ms=retry_after_ms(len(left)))
        yield _within(defer.DeferredList(gone, consumeErrors=True), grace, self.clock)
        for c in list(self.connections):
            c.framing.abort()


#: when told ``shutdown``, a client comes back after RETRY_AFTER_MS plus a
#: random part of a window that grows with the connections told (SPREAD_MS
#: each, at least RETRY_WINDOW_MIN_MS, at most RETRY_WINDOW_MAX_MS): a restart
#: must not make its own reconnect storm
RETRY_AFTER_MS = 500
SPREAD_MS = 1
RETRY_WINDOW_MIN_MS = 5000
RETRY_WINDOW_MAX_MS = 30000


def retry_after_ms(connections, rng=random):
    """The ``retry_after_ms`` of one ``shutdown`` (1.2 extension), for a stop
    that closes ``connections`` at once: 80,000 phones come back spread over
    30 s (about 2,700 a second), a few over 5 s."""
    window = min(RETRY_WINDOW_MAX_MS, max(RETRY_WINDOW_MIN_MS, connections * SPREAD_MS))
    return RETRY_AFTER_MS + rng.randrange(window)


def _files_limit():
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):
        return 1024
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _within(d, seconds, clock):
    """Wait for d, at most ``seconds``; never fails."""
    d.addTimeout(seconds, clock)
    return d.addErrback(lambda f: None)
