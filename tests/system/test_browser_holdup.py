"""
Issue 23 ("Hold up, round two") in a real headless Chromium: a page of
another origin cannot open chatd's WebSocket unless --websocket-origin
lists it (2); messages from the ids ``__proto__``, ``constructor`` and
``toString`` are shown and acked (8); the page asks for nothing that is not
there, no favicon either (12). Driven as in tests/test_browser.py (under
CI a missing browser is a failure, not a skip).
"""

import pytest
import pytest_twisted

from tests.fixtures.browser import chromium, in_browser, open_page, register, shown
from tests.helpers import wait_until
from tests.wsclient import ws_port

ensure = pytest_twisted.ensureDeferred
WS = ("tcp:0:interface=127.0.0.1",)
TRY_WS = """url => new Promise(done => {
  const ws = new WebSocket(url);
  ws.onopen = () => { done("open"); ws.close(); };
  ws.onclose = () => done("closed");
})"""


def from_another_site(browser, page_url, ws_url):
    """A page of another origin (another local web server: Chromium's local
    network access checks keep a public site from trying at all, a network
    neighbour's page or a local one is not kept) tries chatd's WebSocket:
    "open" or "closed"."""
    page = open_page(browser.new_context(), page_url)
    return page.evaluate(TRY_WS, ws_url)


async def another_site():
    """A web server of another origin, on 127.0.0.1 (its port), named
    http://localhost:PORT in the browser."""
    from twisted.internet import endpoints, reactor
    from twisted.web import server, static
    root = static.Data(b"<!doctype html><title>another site</title>", "text/html")
    return await endpoints.serverFromString(
        reactor, "tcp:0:interface=127.0.0.1").listen(server.Site(root))


@pytest.mark.slow
@ensure
async def test_a_page_of_another_origin_cannot_open_the_websocket(chatd):
    chromium()
    other = await another_site()
    try:
        evil = "http://localhost:%d" % other.getHost().port
        node = await chatd(websocket=WS)
        ws_url = "ws://127.0.0.1:%d/ws" % ws_port(node)
        assert await in_browser(from_another_site, evil + "/", ws_url) == "closed"
        assert not node.factory.connections
        # the page's own origin opens it, by either name of the host
        for host in ("127.0.0.1", "localhost"):
            url = "http://%s:%d/" % (host, ws_port(node))
            assert await in_browser(_own_page, url) == "open", host
        # and a listed one
        allowed = await chatd(websocket=WS, websocket_origins=(evil,))
        assert await in_browser(from_another_site, evil + "/",
                                "ws://127.0.0.1:%d/ws" % ws_port(allowed)) == "open"
    finally:
        await other.stopListening()


def _own_page(browser, url):
    page = open_page(browser.new_context(), url)
    ws_url = url.replace("http://", "ws://") + "ws"
    return page.evaluate(TRY_WS, ws_url)


def odd_ids(browser, url, send_from):
    """alice's page gets a message from each odd id: each is shown, and acked."""
    page = open_page(browser.new_context(), url)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    register(page, "alice")
    send_from()
    for who in ("__proto__", "constructor", "toString"):
        page.click("#peers button:text-is('%s')" % who)
        shown(page, "hello from %s" % who)
    page.reload()  # what was kept in localStorage comes back, Maps and all
    page.locator("#status.online").wait_for()
    page.click("#peers button:text-is('constructor')")
    shown(page, "hello from constructor")
    return errors


@pytest.mark.slow
@ensure
async def test_messages_from_ids_named_like_object_properties_are_shown_and_acked(
        chatd, clients, redis):
    from twisted.internet import defer, reactor, threads
    chromium()
    node = await chatd(websocket=WS)
    senders = []
    for who in ("__proto__", "constructor", "toString"):
        c = await clients(node)
        await c.register(who)
        senders.append((who, c))

    async def send_all():
        for who, c in senders:
            c.send({"message": "hello from %s" % who, "receiver": "alice", "ref": who})
            await c.expect("accepted")

    def send_from():  # in the browser's thread
        threads.blockingCallFromThread(
            reactor, lambda: defer.ensureDeferred(send_all()))

    url = "http://127.0.0.1:%d/" % ws_port(node)
    errors = await in_browser(odd_ids, url, send_from)
    assert errors == []
    await wait_until(lambda: redis.command("LLEN", "chatd:{alice}:inbox") == 0,
                     what="alice's page acking all three")


def load(browser, url):
    page = open_page(browser.new_context(), url)
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(500)


@pytest.mark.slow
@ensure
async def test_the_page_asks_for_nothing_that_is_not_there(chatd):
    """Chromium asks for /favicon.ico unless the page declares an icon (it
    is no request of the page's, so the server's side is watched)."""
    chromium()
    node = await chatd(websocket=WS)
    site = node.service.web_ports[0].factory
    asked = []
    site.log = lambda request: asked.append((request.uri, request.code))
    await in_browser(load, "http://127.0.0.1:%d/" % ws_port(node))
    assert (b"/", 200) in asked
    assert all(code < 400 for _, code in asked), asked
