"""
A worker process of ``--workers`` (``python -m chatd.app.worker``, started by
:class:`chatd.app.workers.WorkerPool`): a node of its own on the parent's
shared ports. It reads its :class:`chatd.app.workers.WorkerSpec` from stdin,
and stops when stdin closes (the parent is gone).
"""

import os
import pickle
import struct
import sys

from twisted.internet import protocol

from chatd.app.service import ChatService, tune_gc


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


def _tell_parent(word):
    """Say one word on fd 3, the pipe the parent reads (none when started
    by hand)."""
    try:
        os.write(3, word)
        os.close(3)
    except OSError:
        pass


def main():
    spec = _read_spec()
    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    chat = ChatService(spec.settings, spec.target, reactor=reactor,
                       role="chatd worker %d" % spec.index, ports=spec.ports)
    tune_gc()
    chat.startService()
    chat.started().addCallback(lambda _: _tell_parent(b"listening\n"))
    reactor.addSystemEventTrigger("before", "shutdown", chat.stopService)

    def parent_gone():
        if reactor.running:
            reactor.stop()

    stdio.StandardIO(_Lifeline(parent_gone), stdout=os.open(os.devnull, os.O_WRONLY))
    reactor.run()
    if chat.start_error is not None:
        sys.exit(1)  # the pool logs it and starts the worker again


if __name__ == "__main__":
    main()
