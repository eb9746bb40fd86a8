"""
Writing to a socket without waiting for a poll: used by the sessions' output
(:mod:`chatd.wire.output`) and by the store's connections
(:mod:`chatd.redis.adapter`). Nothing here imports anything of chatd.

Twisted's ``transport.write`` writes only after a poll: it asks epoll for the
socket's writability (``epoll_ctl``), is woken for it, writes, and takes the
socket off epoll again (``epoll_ctl``): two system calls and a dispatch of
the reactor per connection per turn, a sixth of chatd's time under load with
many connections. :func:`write_now` instead sends at once when nothing is
queued in the transport (the usual case: the peer reads), and leaves only
what the kernel did not take to ``transport.write``, whose buffering, flow
control (``pauseProducing``) and error handling stay as they are.
"""

import ipaddress

from twisted.internet import tcp


def loopback(address):
    """Whether only this machine can reach a listening address (a unix
    socket, or a loopback IP; not 0.0.0.0, which is every interface)."""
    host = getattr(address, "host", None)
    if host is None:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def write_now(transport, data):
    """Write bytes to a TCP (or unix socket) transport: as much as the kernel
    takes now, the rest through ``transport.write``. Any other transport
    (TLS), one with data queued or closing, or a write bigger than the
    transport's buffer (a drain batch: Twisted pauses its producer at once,
    which is how a client that does not read is noticed before the kernel
    has taken megabytes) gets ``transport.write``."""
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False) \
            or transport.dataBuffer or transport._tempDataBuffer \
            or transport.disconnecting or not transport.connected \
            or len(data) > transport.bufferSize:
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        transport.write(data)  # let Twisted see the error and close
        return
    if sent < len(data):
        transport.write(data[sent:] if sent else data)
