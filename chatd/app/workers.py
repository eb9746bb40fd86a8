"""
``--workers N``: every core of one host with one command.

A Twisted process uses one core. With ``--workers N`` the chatd process
(the parent: it runs the embedded store, if any, and is itself worker 0)
starts N-1 more worker processes (``python -m chatd.app.worker``). Each is a
node of its own (its own node id, store client, subscriber connection and
presence records, :mod:`chatd.hub.presence`), on the same store, so they are
one service like nodes on several hosts.

They share the listening ports through ``SO_REUSEPORT`` (:mod:`chatd.app.ports`):
each process opens its own socket on the same address and the kernel spreads
new connections over them (by a hash of the client's address and port). TCP
and TLS listeners are shared; a unix-socket listener is served by the parent
alone. A worker process runs :mod:`chatd.app.worker`.

A worker that dies is started again (after a back-off); its clients
reconnect (to the same port, so to a live worker) and get every unacked
message. SIGTERM to the parent stops the workers first (each closes its
clients with ``shutdown``), then the parent's own clients, then the store.
A worker whose parent is gone (SIGKILL) sees its stdin close and stops too.

The parent hands a worker what it needs on its stdin: a pickled
:class:`WorkerSpec` (its own child, so pickle is safe), length-prefixed; the
pipe stays open as the parent's lifeline.
"""

import os
import pickle
import struct
import sys
from dataclasses import dataclass, replace

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger

#: back-off before a dead worker is started again (doubles up to the max)
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 10.0
#: how long stopped workers may take to close their clients before SIGKILL
STOP_TIMEOUT = 30.0
#: the longest the parent waits for its workers to listen before it accepts
#: connections itself (see WorkerPool._start_all)
HOLD_MAX = 15.0


@dataclass
class WorkerSpec:
    index: int
    settings: object   # chatd.app.config.Settings, with workers=1
    target: object     # chatd.redis.target.RedisTarget of the shared store
    ports: list        # the port number each listener got (0 resolved): the chat
    #                    listeners of settings, then the --websocket ones


class _Worker(protocol.ProcessProtocol):
    def __init__(self, pool, index):
        self.pool = pool
        self.index = index
        self.ended = defer.Deferred()
        self.started_at = None

    def connectionMade(self):
        spec = pickle.dumps(self.pool.spec(self.index))
        self.transport.write(struct.pack("!I", len(spec)) + spec)

    def childDataReceived(self, fd, data):
        if fd == 3 and b"listening" in data:  # the worker's one word back
            self.pool._listening(self)

    def processEnded(self, reason):
        self.ended.callback(None)
        self.pool._ended(self, reason)


class WorkerPool(service.Service):
    """Starts, restarts and stops the N-1 worker processes of a node."""

    log = Logger()

    def __init__(self, chat, settings, target, reactor=None):
        self.chat = chat          # the parent's ChatService (ports, started)
        self.settings = settings
        self.target = target
        self.reactor = reactor
        self.workers = {}         # index -> _Worker
        self._delays = {}
        self._pending = {}        # index -> DelayedCall of a restart
        self._holding = None      # workers not listening yet, while the parent holds
        self._hold_call = None

    def spec(self, index):
        return WorkerSpec(index, replace(self.settings, workers=1), self.target,
                          [getattr(p.getHost(), "port", None)
                           for p in self.chat.ports + self.chat.web_ports])

    def startService(self):
        service.Service.startService(self)
        if self.reactor is None:
            from twisted.internet import reactor
            self.reactor = reactor
        self.chat.started().addCallback(self._start_all)

    def _start_all(self, _):
        """Start the workers; the parent accepts nothing until they all
        listen (or HOLD_MAX). Each process has its own socket on the shared
        port (SO_REUSEPORT) and the kernel spreads new connections over the
        sockets that exist: while the parent's is the only one, every
        connection lands on it, and after a restart with 80,000 phones
        waiting, the first wave filled the parent to its open-files limit
        (thousands of ``too_many_connections``) while its workers started.
        Held, the parent's backlog fills and the kernel drops the SYNs past
        it; clients send them again (after 1 s, 3 s...), and by then they are
        spread over every process."""
        self._holding = set(range(1, self.settings.workers))
        if self._holding and self.chat.hold_accepting():
            self.log.info("accepting once the {n} workers listen (at most {s}s)",
                          n=len(self._holding), s=HOLD_MAX)
            self._hold_call = self.reactor.callLater(HOLD_MAX, self._release, "timed out")
        else:
            self._holding = None
        for index in range(1, self.settings.workers):
            self._spawn(index)

    def _listening(self, worker):
        if self._holding is not None:
            self._holding.discard(worker.index)
            if not self._holding:
                self._release("every worker listens")

    def _end_hold(self):
        """Forget the hold: True if there was one."""
        held, self._holding = self._holding is not None, None
        if self._hold_call is not None and self._hold_call.active():
            self._hold_call.cancel()
        self._hold_call = None
        return held

    def _release(self, why):
        if not self._end_hold():
            return
        self.chat.resume_accepting()
        self.log.info("chatd accepting on every process ({why})", why=why)

    def _spawn(self, index):
        self._pending.pop(index, None)
        if not self.running:
            return
        worker = _Worker(self, index)
        worker.started_at = self.reactor.seconds()
        self.workers[index] = worker
        self.reactor.spawnProcess(
            worker, sys.executable, [sys.executable, "-m", "chatd.app.worker"],
            env=os.environ, childFDs={0: "w", 1: 1, 2: 2, 3: "r"})
        self.log.info("chatd worker {i} started (pid {pid})", i=index,
                      pid=worker.transport.pid)

    def _ended(self, worker, reason):
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if not self.running:
            return
        delay = self._delays.get(worker.index, RESTART_DELAY)
        if self.reactor.seconds() - worker.started_at > 30:
            delay = RESTART_DELAY
        self._delays[worker.index] = min(delay * 2, RESTART_DELAY_MAX)
        self.log.warn("chatd worker {i} ended ({why}); starting it again in {d}s",
                      i=worker.index, why=reason.value, d=delay)
        self._pending[worker.index] = self.reactor.callLater(delay, self._spawn, worker.index)

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        # nobody accepts here any more: a client a worker tells ``shutdown``
        # must not come back to the parent, which stops next (at 40,000
        # devices that was 4,000 more shutdowns and the parent's fd limit)
        yield self.chat.stop_listening()
        self._end_hold()
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        workers = list(self.workers.values())
        for w in workers:
            try:
                w.transport.signalProcess("TERM")
            except Exception:
                pass
        ended = defer.DeferredList([w.ended for w in workers])
        ended.addTimeout(STOP_TIMEOUT, self.reactor)
        try:
            yield ended
        except defer.TimeoutError:
            for w in self.workers.values():
                self.log.warn("chatd worker {i} did not stop; killing it", i=w.index)
                try:
                    w.transport.signalProcess("KILL")
                except Exception:
                    pass
