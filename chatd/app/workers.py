"""
``--workers N``: every core of one host with one command.

A Twisted process uses one core. With ``--workers N`` the chatd process
(the parent: it runs the embedded store, if any, and is itself worker 0)
starts N-1 more worker processes (``python -m chatd.app.workers``). Each is a
node of its own (its own node id, store client, subscriber connection and
presence records, :mod:`chatd.hub.presence`), on the same store, so they are
one service like nodes on several hosts.

They share the listening ports through ``SO_REUSEPORT``: each process opens
its own socket on the same address and the kernel spreads new connections
over them (by a hash of the client's address and port). TCP and TLS
listeners are shared; a unix-socket listener is served by the parent alone.

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
import socket
import struct
import sys
from dataclasses import dataclass, replace

from twisted.application import service
from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger

#: back-off before a dead worker is started again (doubles up to the max)
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 10.0
#: how long stopped workers may take to close their clients before SIGKILL
STOP_TIMEOUT = 30.0


@dataclass
class WorkerSpec:
    index: int
    settings: object   # chatd.app.config.Settings, with workers=1
    target: object     # chatd.app.config.RedisTarget of the shared store
    ports: list        # the port number each listener of settings got (0 resolved)


def listen(reactor, description, factory, port=None):
    """Listen on ``description`` with SO_REUSEPORT (TCP and TLS endpoints;
    ``port`` overrides its port number): a Deferred of the listening port.
    Other endpoints listen as usual."""
    endpoint = endpoints.serverFromString(reactor, description)
    if not isinstance(endpoint, (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint,
                                 endpoints.SSL4ServerEndpoint)):
        return endpoint.listen(factory)
    family = socket.AF_INET6 if isinstance(endpoint, endpoints.TCP6ServerEndpoint) \
        or ":" in (endpoint._interface or "") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((endpoint._interface or ("::" if family == socket.AF_INET6 else ""),
                   endpoint._port if port is None else port))
        sock.listen(endpoint._backlog)
        sock.setblocking(False)
        if isinstance(endpoint, endpoints.SSL4ServerEndpoint):
            from twisted.protocols.tls import TLSMemoryBIOFactory
            factory = TLSMemoryBIOFactory(endpoint._sslContextFactory, False, factory)
        return defer.succeed(reactor.adoptStreamPort(sock.fileno(), family, factory))
    except Exception:
        return defer.fail()
    finally:
        sock.close()  # the port has its own copy


class _Worker(protocol.ProcessProtocol):
    def __init__(self, pool, index):
        self.pool = pool
        self.index = index
        self.ended = defer.Deferred()
        self.started_at = None

    def connectionMade(self):
        spec = pickle.dumps(self.pool.spec(self.index))
        self.transport.write(struct.pack("!I", len(spec)) + spec)

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

    def spec(self, index):
        return WorkerSpec(index, replace(self.settings, workers=1), self.target,
                          [getattr(p.getHost(), "port", None) for p in self.chat.ports])

    def startService(self):
        service.Service.startService(self)
        if self.reactor is None:
            from twisted.internet import reactor
            self.reactor = reactor
        self.chat.started().addCallback(self._start_all)

    def _start_all(self, _):
        for index in range(1, self.settings.workers):
            self._spawn(index)

    def _spawn(self, index):
        self._pending.pop(index, None)
        if not self.running:
            return
        worker = _Worker(self, index)
        worker.started_at = self.reactor.seconds()
        self.workers[index] = worker
        self.reactor.spawnProcess(
            worker, sys.executable, [sys.executable, "-m", "chatd.app.workers"],
            env=os.environ, childFDs={0: "w", 1: 1, 2: 2})
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


# -- the worker process ----------------------------------------------------------------

class _Lifeline(protocol.Protocol):
    """The worker's stdin: it closes when the parent is gone."""

    def __init__(self, stop):
        self.stop = stop

    def connectionLost(self, reason):
        self.stop()


def _read_spec():
    def exactly(n):
        data = b""
        while len(data) < n:
            chunk = os.read(0, n - len(data))
            if not chunk:
                raise SystemExit("chatd worker: the parent is gone")
            data += chunk
        return data

    n, = struct.unpack("!I", exactly(4))
    return pickle.loads(exactly(n))


def main():
    spec = _read_spec()
    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from chatd.app.service import ChatService, tune_gc
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    chat = ChatService(spec.settings, spec.target, reactor=reactor,
                       role="chatd worker %d" % spec.index, ports=spec.ports)
    tune_gc()
    chat.startService()
    reactor.addSystemEventTrigger("before", "shutdown", chat.stopService)

    def parent_gone():
        if reactor.running:
            reactor.stop()

    stdio.StandardIO(_Lifeline(parent_gone), stdout=os.open(os.devnull, os.O_WRONLY))
    reactor.run()


if __name__ == "__main__":
    main()
