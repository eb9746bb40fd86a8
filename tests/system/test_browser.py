"""
The chat page in a real headless Chromium (Debian's ``chromium``, driven by
playwright; no browser is downloaded): two people register, talk, one goes
offline and comes back to the messages that waited, a duplicate is shown as
such, a second tab takes the id over, and the page talks with a
``chatd-client`` user in a terminal; proof mode asks for the ticket. The
screenshot in the README (docs/browser.png) is taken here: with
``CHATD_UPDATE_SCREENSHOT=1`` it is written there, else to a temp dir (so
that a test run leaves the work tree as it was).

The browser runs in a thread of its own (playwright's sync API blocks),
while the reactor serves the chatd node of the test.

Without Chromium or playwright these tests are skipped, saying how to
install them; under CI (``CI=true``) that is a failure instead.
"""

import hashlib
import hmac
import json
import os
import time

import pytest
import pytest_twisted

from tests.fixtures.browser import (TICKED, WAIT, chromium, first_line, in_browser, online,
                                    open_page, register, say, shown, talk_to, terminal)
from tests.helpers import wait_until
from tests.wsclient import ws_port

ensure = pytest_twisted.ensureDeferred
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCREENSHOT = os.path.join(ROOT, "docs", "browser.png")
def conversation(browser, url, redis_command, screenshot, tcp_port, state_dir, cut):
    alice_ctx = browser.new_context(viewport={"width": 900, "height": 560})
    bob_ctx = browser.new_context(viewport={"width": 900, "height": 560})
    alice = open_page(alice_ctx, url)
    bob = open_page(bob_ctx, url)
    register(alice, "alice")
    register(bob, "bob")

    talk_to(alice, "bob")
    say(alice, "Hi Bob! Lunch at noon?")
    bob.locator("#peers button", has_text="alice").locator(".badge").wait_for()
    bob.click("#peers button:has-text('alice')")
    shown(bob, "Hi Bob! Lunch at noon?")
    say(bob, "Sure, see you there")
    shown(alice, "Sure, see you there")

    # bob's page shows a message but goes away before its ack is out...
    bob.evaluate("() => { const real = send; send = (p) => p.ack ? true : real(p); }")
    say(alice, "Running 10 minutes late")
    shown(bob, "Running 10 minutes late")
    bob.close()
    # ...and what alice sends meanwhile waits for him too
    say(alice, "Table by the window")
    assert redis_command("LLEN", "chatd:{bob}:inbox") == 2
    bob = open_page(bob_ctx, url)  # same browser profile: reconnects with its token
    online(bob)
    bob.locator("#notice", has_text="2 messages were waiting").wait_for()
    bob.click("#peers button:has-text('alice')")
    shown(bob, "Table by the window")
    # shown, then acked: nothing waits any more
    deadline = time.monotonic() + WAIT / 1000
    while redis_command("LLEN", "chatd:{bob}:inbox") != 0:
        assert time.monotonic() < deadline, "bob's page did not ack what it showed"
        time.sleep(0.05)
    # the message pushed again is shown once
    assert bob.locator("#log li.in .text", has_text="Running 10 minutes late").count() == 1

    say(bob, "OK!")
    shown(alice, "OK!")

    # carol, in a terminal, writes to alice; alice answers while carol is away
    carol = terminal(tcp_port, state_dir, "--send", "alice", "Hello from a terminal")
    out, err = carol.communicate(timeout=WAIT / 1000)
    assert carol.returncode == 0, err
    alice.click("#peers button:has-text('carol')")
    shown(alice, "Hello from a terminal")
    say(alice, "Hello carol, from the browser")
    carol = terminal(tcp_port, state_dir, "--listen", "--count", "1")
    try:
        push = json.loads(first_line(carol))
        while push["type"] == "receipt":  # carol opted in (1.2): alice's page read hers
            push = json.loads(first_line(carol))
        assert (push["sender"], push["message"]) == ("alice", "Hello carol, from the browser")
        assert carol.wait(WAIT / 1000) == 0  # --count 1: it acked the one and left
    finally:
        if carol.poll() is None:
            carol.kill()
            carol.wait()
    alice.click("#peers button:has-text('bob')")
    say(alice, "See you")
    say(alice, "See you", status="duplicate")
    alice.screenshot(path=screenshot)

    # the connection drops: the page says so, writes on, and reconnects by itself
    reopen = cut("alice")
    alice.locator("#status.offline").wait_for()
    say(alice, "Back in a minute", status="sending")
    reopen()
    online(alice)
    alice.locator("#log li.out").last.locator("small", has_text=TICKED).wait_for()
    bob.locator("#log li.in .text", has_text="Back in a minute").wait_for()

    # signed out, and in as someone else: alice's conversations are not theirs
    alice.click("#signout")
    register(alice, "dave")
    assert alice.locator("#peers li").count() == 0

    # a second tab of bob's takes the id over; the first one says so plainly
    second = open_page(bob_ctx, url)
    online(second)
    bob.locator("#notice", has_text="session_replaced").wait_for()
    assert bob.locator("#notice-action").inner_text() == "Use it here"
    # errors with no message of their own are shown as they are
    for code in ("rate_limited", "unavailable"):
        second.evaluate("code => received({type: 'error', code, reason: 'test', ref: null})",
                        code)
        second.locator("#notice", has_text=code).wait_for()


def proof_asked(browser, url, ticket):
    page = open_page(browser.new_context(), url)
    page.fill("#id", "0011001100")
    page.click("#register")
    page.locator("#notice", has_text="ticket").wait_for()
    assert page.locator("#proof").is_visible()
    register(page, "0011001100", proof=ticket)


@pytest.mark.slow
@ensure
async def test_people_chat_in_chromium_and_a_terminal(chatd, redis, tmp_path):
    from twisted.internet import reactor, threads
    chromium()
    node = await chatd(websocket=("tcp:0:interface=127.0.0.1",), dedup_window=60.0)
    url = "http://127.0.0.1:%d/" % ws_port(node)
    screenshot = SCREENSHOT if os.environ.get("CHATD_UPDATE_SCREENSHOT") else str(
        tmp_path / "browser.png")
    def cut(device):
        """From the browser's thread: drop the device's connection, and hold
        the page's reconnects (the WebSocket listener stops accepting) until
        the returned ``reopen()``, so that what it sends meanwhile is seen
        waiting however slow the machine is."""
        web = node.service.web_ports[0]

        def close():
            web.stopReading()
            node.hub.sessions[device].conn.transport.abortConnection()

        threads.blockingCallFromThread(reactor, close)
        return lambda: threads.blockingCallFromThread(reactor, web.startReading)

    await in_browser(conversation, url, redis.command, screenshot, node.port,
                     str(tmp_path / "client"), cut)
    assert os.path.getsize(screenshot) > 10_000
    await wait_until(lambda: not node.factory.connections, what="the pages' sockets closed")


@pytest.mark.slow
@ensure
async def test_proof_mode_asks_for_the_ticket(chatd):
    chromium()
    secret = b"s3cret"
    node = await chatd(websocket=("tcp:0:interface=127.0.0.1",), registration="proof",
                       registration_secret=secret)
    expiry = int(time.time()) + 300
    mac = hmac.new(secret, b"0011001100:%d" % expiry, hashlib.sha256).hexdigest()
    url = "http://127.0.0.1:%d/" % ws_port(node)
    await in_browser(proof_asked, url, "%d:%s" % (expiry, mac))
    await wait_until(lambda: not node.factory.connections, what="the page's socket closed")
