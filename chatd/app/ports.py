"""
Listening ports that several processes share (``--workers``): each process
opens its own socket on the same address with ``SO_REUSEPORT``, and the
kernel spreads new connections over them.
"""

import socket

from twisted.internet import defer, endpoints


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
