"""
A connection to the store that is lost during its AUTH is an outage, not a
refusal: chatd connects again and serves. (txredisapi alone stops trying for
good after any failure during AUTH, which kept a node down after a network
blip until it was restarted.)

The blip is made by a real TCP proxy in front of a real valkey-server that
cuts the first connections as soon as their AUTH arrives, before the store
can answer it.
"""

import pytest_twisted

from tests.clients import connect
from tests.fixtures.nodes import start_node
from tests.helpers import wait_until


class _Proxy:
    """127.0.0.1:port -> the store's unix socket; the first ``cut`` connections
    are aborted when their client sends AUTH."""

    def __init__(self, path, cut):
        self.path = path
        self.cut = cut
        self.cuts = 0
        self.port = None
        self._listening = None
        self._conns = []

    async def start(self):
        from twisted.internet import endpoints, protocol, reactor

        proxy = self

        class Upstream(protocol.Protocol):
            def dataReceived(self, data):
                self.downstream.transport.write(data)

            def connectionLost(self, reason):
                self.downstream.transport.loseConnection()

        class Downstream(protocol.Protocol):
            upstream = None
            pending = b""

            def connectionMade(self):
                proxy._conns.append(self)
                self.transport.pauseProducing()
                d = endpoints.UNIXClientEndpoint(reactor, proxy.path).connect(
                    protocol.Factory.forProtocol(Upstream))

                def linked(up):
                    self.upstream = up
                    up.downstream = self
                    self.transport.resumeProducing()

                d.addCallbacks(linked, lambda f: self.transport.abortConnection())

            def dataReceived(self, data):
                if b"AUTH" in data.upper() and proxy.cuts < proxy.cut:
                    proxy.cuts += 1
                    self.transport.abortConnection()
                    return
                self.upstream.transport.write(data)

            def connectionLost(self, reason):
                if self.upstream is not None:
                    self.upstream.transport.loseConnection()

        endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        self._listening = await endpoint.listen(protocol.Factory.forProtocol(Downstream))
        self.port = self._listening.getHost().port
        return self

    async def stop(self):
        await self._listening.stopListening()
        for c in self._conns:
            c.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_a_connection_lost_during_auth_is_retried(own_redis):
    from chatd.redis.target import RedisTarget
    own_redis.command("CONFIG", "SET", "requirepass", "pw-of-the-store-1234")
    own_redis.password = "pw-of-the-store-1234"
    proxy = await _Proxy(own_redis.path, cut=3).start()
    node = None
    try:
        node = await start_node(RedisTarget(host="127.0.0.1", port=proxy.port,
                                            password="pw-of-the-store-1234"),
                                redis_timeout=0.5)
        await wait_until(lambda: node.service.client.connected, timeout=30,
                         what="the node connecting after its AUTHs were cut")
        assert proxy.cuts == 3
        c = await connect(node.port)
        try:
            await c.register("after-the-blips")
        finally:
            await c.close()
        assert own_redis.command("EXISTS", "chatd:{after-the-blips}:token") == 1
    finally:
        if node is not None:
            await node.stop()
        await proxy.stop()
