"""
Token rotation with reuse detection (contract 1.2, "Token rotation"): every
reconnect returns a new token; the one presented stays valid until the new
one is used; an old token presented after its successor was used is reuse,
which revokes every token of the id and closes its live connection (on
whichever node) with ``revoked``. On real nodes and a real store.
"""

import pytest_twisted

from tests.helpers import wait_until

ensure = pytest_twisted.ensureDeferred

REUSED = "used elsewhere with an old token"


async def reconnect_fails(node, device, token, clients):
    c = await clients(node)
    c.send({"reconnect": "true", "sender": device, "token": token})
    err = await c.error("bad_token")
    return err


@ensure
async def test_rotation_and_its_grace(chatd, clients, redis):
    node = await chatd()
    c0 = await clients(node)
    t0 = await c0.register("bob")
    await c0.close()
    # a reconnect returns a new token; the presented one stays valid
    c1 = await clients(node)
    t1 = (await c1.reconnect("bob", t0))["token"]
    assert t1 and t1 != t0
    await c1.close()
    # the reply was "lost": t0 again (t1 never used) gives another token,
    # and t1, superseded before it was ever used, is simply invalid
    c2 = await clients(node)
    t2 = (await c2.reconnect("bob", t0))["token"]
    assert t2 not in (t0, t1)
    await c2.close()
    err = await reconnect_fails(node, "bob", t1, clients)
    assert REUSED not in err["reason"], err
    assert redis.command("GET", "chatd:{bob}:token") != b"revoked"
    # using t2 retires t0: t0 again is reuse; the live connection is closed
    live = await clients(node)
    t3 = (await live.reconnect("bob", t2))["token"]
    assert t3 not in (t0, t1, t2)
    err = await reconnect_fails(node, "bob", t0, clients)
    assert REUSED in err["reason"] and err["field"] == "token", err
    await live.error("revoked")
    await live.wait_closed()
    assert redis.command("GET", "chatd:{bob}:token") == b"revoked"
    assert node.hub.token_reuse == 1
    for t in (t2, t3):  # every token of the id
        await reconnect_fails(node, "bob", t, clients)
    c = await clients(node)
    assert await c.register("bob")  # registering again takes it back


@ensure
async def test_reuse_on_another_node_closes_the_live_connection(chatd, clients, redis):
    a = await chatd()
    b = await chatd()
    phone = await clients(a)
    t0 = await phone.register("carol")
    t1 = (await phone.reconnect("carol", t0))["token"]  # on the bound connection
    await phone.close()
    phone = await clients(a)
    await phone.reconnect("carol", t1)  # t1 used: t0 retired
    thief = await clients(b)
    thief.send({"reconnect": "true", "sender": "carol", "token": t0})
    err = await thief.error("bad_token")
    assert REUSED in err["reason"]
    await phone.error("revoked")  # on node a, through the store
    await phone.wait_closed()
    assert b.hub.token_reuse == 1 and a.hub.token_reuse == 0


@ensure
async def test_two_copies_at_once_on_two_nodes_one_wins(chatd, clients, redis):
    """Two reconnects with one token, written at once on two nodes: the store
    takes them one after the other. Of the two new tokens exactly one is
    valid, one connection keeps the id, and once the winner's token is used
    the shared old one is reuse."""
    a = await chatd()
    b = await chatd()
    c = await clients(a)
    t0 = await c.register("dave")
    await c.close()
    ca, cb = await clients(a), await clients(b)
    for x in (ca, cb):
        x.send({"reconnect": "true", "sender": "dave", "token": t0})
    ra, rb = await ca.next(), await cb.next()
    got = [r["token"] for r in (ra, rb) if r["type"] == "reconnected"]
    assert got, (ra, rb)  # the other one may be replaced before its reply
    for r in (ra, rb):
        assert r["type"] == "reconnected" or r["code"] == "session_replaced", r
    # one connection keeps the id: the other one is closed
    await wait_until(lambda: sum(x.closed.called for x in (ca, cb)) == 1,
                     what="one of the two connections closed")
    valid = []
    for t in got:
        probe = await clients(b)
        probe.send({"reconnect": "true", "sender": "dave", "token": t})
        reply = await probe.next()
        if reply["type"] == "reconnected":
            valid.append(probe)
        else:
            assert reply["code"] == "bad_token" and REUSED not in reply["reason"], reply
    assert len(valid) == 1
    # the winner's token was just used: the shared old token is reuse now
    late = await clients(a)
    late.send({"reconnect": "true", "sender": "dave", "token": t0})
    err = await late.error("bad_token")
    assert REUSED in err["reason"]
    await valid[0].error("revoked")


@ensure
async def test_a_one_shot_send_is_a_use(chatd, clients, redis):
    node = await chatd()
    await (await clients(node)).register("erin")
    c = await clients(node)
    t0 = await c.register("frank")
    await c.close()
    c = await clients(node)
    t1 = (await c.reconnect("frank", t0))["token"]
    await c.close()
    shot = await clients(node)
    shot.send({"message": "one shot", "sender": "frank", "token": t1, "receiver": "erin"})
    await shot.expect("accepted")  # t1 used: t0 retired
    shot.send({"message": "again", "sender": "frank", "token": t0, "receiver": "erin"})
    err = await shot.error("bad_token")
    assert REUSED in err["reason"]
    assert redis.command("GET", "chatd:{frank}:token") == b"revoked"


@ensure
async def test_rotation_off_keeps_the_token(chatd, clients, redis):
    node = await chatd(token_rotation=False)
    c = await clients(node)
    t0 = await c.register("gina")
    await c.close()
    for _ in range(3):
        c = await clients(node)
        assert (await c.reconnect("gina", t0))["token"] == t0
        await c.close()
    assert node.hub.token_reuse == 0


@ensure
async def test_the_original_clients_one_token_keeps_working(chatd, clients, redis):
    """The original spec's client (chat/client.py of nihalsharma/DummyChat)
    sends each line the user types, as typed, and never reads a token out
    of a reply: the same first token in every reconnect and every message
    packet, in its dict-literal form. Here its exact bytes, on five
    connections in a row (each as a new run of that client)."""
    node = await chatd()
    receiver = await clients(node)
    await receiver.register("987654321")
    first = await clients(node)
    first.send("{'register':'true', 'sender':'0011001100'}")
    token = (await first.expect("registered"))["token"]
    await first.close()
    for run in range(5):
        c = await clients(node)
        c.send("{'reconnect':'true', 'token':'%s', 'sender':'0011001100'}" % token)
        assert (await c.expect("reconnected"))["token"] != token
        c.send("{'message':'Kya Bhai? %d', 'sender':'0011001100', 'receiver':'987654321', "
               "'token':'%s'}" % (run, token))
        await c.expect("accepted")
        await receiver.expect("message", message="Kya Bhai? %d" % run)
        await c.close()
    # and as a one-shot send on an unbound connection
    c = await clients(node)
    c.send("{'message':'one shot', 'sender':'0011001100', 'receiver':'987654321', "
           "'token':'%s'}" % token)
    await c.expect("accepted")
    assert node.hub.token_reuse == 0


@ensure
async def test_the_terminal_client_keeps_each_new_token(chatd, clients, redis, tmp_path):
    """chatd-client stores every reconnect's token at once (atomically), and
    says plainly when its id was used elsewhere with an old token (and does
    not register again behind the user's back)."""
    import json
    import os
    import subprocess
    import sys

    from twisted.internet import threads
    node = await chatd()
    harry = await clients(node)
    await harry.register("harry")
    state = str(tmp_path / "state")

    def listen_once():
        return subprocess.run([sys.executable, "-m", "chatd.client", "127.0.0.1",
                               str(node.port), "--id", "ivy", "--state-dir", state,
                               "--listen", "--count", "1"],
                              capture_output=True, text=True, timeout=60)

    def saved():
        [name] = [n for n in os.listdir(state) if n.endswith(".json")]
        with open(os.path.join(state, name)) as f:
            return json.load(f)["token"]

    async def one_run(i):
        run = threads.deferToThread(listen_once)
        await wait_until(lambda: "ivy" in node.hub.sessions, what="ivy bound")
        harry.send({"message": "hello %d" % i, "receiver": "ivy"})
        await harry.expect("accepted")
        p = await run
        assert p.returncode == 0, p.stderr
        await wait_until(lambda: "ivy" not in node.hub.sessions, what="ivy gone")
        return saved()

    seen = [await one_run(i) for i in range(3)]
    assert len(set(seen)) == 3, seen  # registered, then a new token each reconnect
    # someone presents a retired token: every token of ivy is revoked
    c = await clients(node)
    c.send({"reconnect": "true", "sender": "ivy", "token": seen[0]})
    assert REUSED in (await c.error("bad_token"))["reason"]
    p = await threads.deferToThread(listen_once)
    assert p.returncode != 0
    assert "used elsewhere with an old token" in p.stderr, p.stderr
    assert saved() == seen[-1]  # nothing registered behind the user's back
    assert redis.command("GET", "chatd:{ivy}:token") == b"revoked"


def test_a_kill_while_saving_leaves_a_whole_token(tmp_path, monkeypatch):
    """TokenFile.save writes a temp file and renames it: a crash between
    the two (here: the rename never happens) leaves the old token whole."""
    import os

    from chatd.client.tokens import TokenFile
    tokens = TokenFile(str(tmp_path), "h", 1, "ivy")
    tokens.save("T-old")

    def crash(src, dst):
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    try:
        tokens.save("T-new")
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert tokens.load() == "T-old"
