"""An https gateway: its certificate is checked (a self-signed one is
refused unless --push-ca-file names it)."""

import pytest_twisted
from twisted.internet import endpoints

from tests.fixtures.gateway import away, message
from tests.helpers import make_certificate, ssl_port, wait_until

ensure = pytest_twisted.ensureDeferred


async def https_gateway(gateway, tmp_path):
    from twisted.internet import reactor
    key, cert = make_certificate(str(tmp_path))
    site = gateway.port.factory
    port = await endpoints.serverFromString(reactor, ssl_port(key, cert)).listen(site)
    return port, cert, "https://localhost:%d/_matrix/push/v1/notify" % port.getHost().port


async def one_wakeup(chatd, clients, url, **settings):
    node = await chatd(push_url=url, push_timeout=2.0, push_interval=1.0, **settings)
    await away(clients, node, "bob", "pk-bob", "com.x")
    alice, _ = await message(clients, node, "bob", "m")
    return node


@ensure
async def test_https_with_its_ca(chatd, clients, redis, gateway, tmp_path):
    port, cert, url = await https_gateway(gateway, tmp_path)
    try:
        await one_wakeup(chatd, clients, url, push_ca_file=cert)
        assert (await gateway.next()).pushkey == "pk-bob"
    finally:
        await port.stopListening()


@ensure
async def test_https_refuses_an_unknown_certificate(chatd, clients, redis, gateway, tmp_path):
    port, cert, url = await https_gateway(gateway, tmp_path)
    try:
        node = await one_wakeup(chatd, clients, url)
        await wait_until(lambda: node.service.waker.stats.results["retried"] >= 1)
        assert gateway.requests == []
    finally:
        await port.stopListening()
