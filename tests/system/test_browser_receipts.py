"""
Receipts (1.2) on the chat page, in a real headless Chromium: ✓ stored, ✓✓
delivered (the other page acked it), coloured ✓✓ read (the conversation is
on the other page's screen), between two pages and between a page and
``chatd-client`` in a terminal (whose ``--listen`` prints the page's read
receipt as a JSON line).
"""

import json

import pytest
import pytest_twisted

from tests.fixtures.browser import (WAIT, chromium, in_browser, open_page, register, say,
                                    shown, talk_to, terminal)
from tests.helpers import wait_until
from tests.wsclient import ws_port

ensure = pytest_twisted.ensureDeferred


def status_of(page, text):
    item = page.locator("#log li.out", has_text=text)
    return item.get_attribute("class"), item.locator("small").inner_text()


def ticks(browser, url, tcp_port, state_dir):
    alice = open_page(browser.new_context(), url)
    bob = open_page(browser.new_context(), url)
    register(alice, "alice")
    register(bob, "bob")
    talk_to(alice, "bob")
    # bob's page has no conversation open: delivered, not read
    say(alice, "Hi Bob")
    alice.locator("#log li.out.delivered", has_text="Hi Bob").wait_for()
    cls, small = status_of(alice, "Hi Bob")
    assert "\u2713\u2713" in small and "read" not in cls
    # bob opens it: read, and coloured
    bob.click("#peers button:has-text('alice')")
    shown(bob, "Hi Bob")
    alice.locator("#log li.out.read", has_text="Hi Bob").wait_for()
    colour = alice.locator("#log li.out.read small").evaluate("e => getComputedStyle(e).color")
    plain = bob.locator("#log li.in small").evaluate("e => getComputedStyle(e).color")
    assert colour != plain
    # a message bob's page gets while its conversation is open: read at once
    say(alice, "Lunch?")
    alice.locator("#log li.out.read", has_text="Lunch?").wait_for()

    # a terminal: carol writes to alice; alice's page reads it and answers
    carol = terminal(tcp_port, state_dir, "--send", "alice", "Hello from a terminal")
    out, err = carol.communicate(timeout=WAIT / 1000)
    assert carol.returncode == 0, err
    alice.click("#peers button:has-text('carol')")
    shown(alice, "Hello from a terminal")
    say(alice, "Hello carol")
    alice.locator("#log li.out", has_text="Hello carol").locator(
        "small", has_text="\u2713 sent").wait_for()
    carol = terminal(tcp_port, state_dir, "--listen", "--count", "1")
    try:
        assert carol.wait(WAIT / 1000) == 0  # --count 1: the one message, acked
        lines = [json.loads(x) for x in carol.stdout.read().decode().splitlines()]
    finally:
        if carol.poll() is None:
            carol.kill()
            carol.wait()
    receipts = [x for x in lines if x["type"] == "receipt"]
    assert [(r["receiver"], r["status"]) for r in receipts] == [
        ("alice", "delivered"), ("alice", "read")], lines
    assert [x["message"] for x in lines if x["type"] == "message"] == ["Hello carol"]
    # carol's listener acked it: delivered on alice's page
    alice.locator("#log li.out.delivered", has_text="Hello carol").wait_for()


@pytest.mark.slow
@ensure
async def test_ticks_between_two_pages_and_a_terminal(chatd, tmp_path):
    chromium()
    node = await chatd(websocket=("tcp:0:interface=127.0.0.1",))
    url = "http://127.0.0.1:%d/" % ws_port(node)
    await in_browser(ticks, url, node.port, str(tmp_path / "client"))
    await wait_until(lambda: not node.factory.connections, what="the pages' sockets closed")
