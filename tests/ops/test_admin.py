"""
``chatd-admin`` as an operator runs it: a subprocess against the embedded
store of a live twistd chatd (``--data-dir``), every command, and the
errors an operator meets (unknown id, no running store, unreachable or
frozen store), each with its documented exit code.
"""

import json
import os
import signal

import pytest

from chatd.ops import admin
from tests.clients import BlockingLineClient
from tests.fixtures.nodes import ChatdProcess
from tests.fixtures.valkey import redis_command
from tests.helpers import run_admin


@pytest.fixture
def node(tmp_short):
    data = os.path.join(tmp_short, "data")
    proc = ChatdProcess(tmp_short, ["--port", "tcp:0:interface=127.0.0.1",
                                    "--data-dir", data, "--rate-limit", "0"])
    try:
        proc.start().wait_listening()
        proc.data = data
        yield proc
    finally:
        for pid in proc.store_pids():
            os.kill(pid, signal.SIGCONT)
        proc.cleanup()


def store(proc, *args):
    return redis_command(os.path.join(proc.data, "valkey.sock"), *args)


def keys_of(proc, device):
    return sorted(store(proc, "KEYS", "chatd:{%s}:*" % device))


def with_waiting(proc, texts=("first secret text", "second secret text")):
    """alice, bob and carol registered; alice sent ``texts`` to carol, who
    is offline: (alice's client, carol's token)."""
    carol = BlockingLineClient(proc.port)
    carol_token = carol.register("carol")
    carol.close()
    alice = BlockingLineClient(proc.port)
    alice.register("alice")
    BlockingLineClient(proc.port).register("bob")
    for i, text in enumerate(texts):
        assert alice.message("carol", text, "r%d" % i)["type"] == "accepted"
    return alice, carol_token


def test_admin_stats(node):
    alice, _ = with_waiting(node)
    code, out, err = run_admin("--json", "stats", data_dir=node.data)
    assert code == admin.OK, err
    stats = json.loads(out)
    assert stats["registered"] == 3 and stats["revoked"] == 0
    assert stats["waiting"] == 2 and stats["inboxes_waiting"] == 1
    assert stats["oldest_waiting"]["id"] == "carol"
    assert 0 <= stats["oldest_waiting"]["age_s"] < 3600
    # the node's presence records (chatd.hub.presence): alice and bob, on one node
    assert len(stats["bound"]) == 1 and sum(stats["bound"].values()) >= 1, stats["bound"]
    code, out, err = run_admin("stats", data_dir=node.data, script=True)
    assert code == admin.OK, err
    assert "devices registered: 3 (0 revoked)" in out
    assert "messages waiting: 2 in 1 inboxes" in out
    assert "for carol" in out
    assert "bound now: 1" in out
    # presence records of several nodes (one key per bound device, valued
    # with the node id) are counted per node
    for device, node_id in (("alice", "n1"), ("bob", "n1"), ("carol", "n2")):
        store(node, "SET", "chatd:{%s}:node" % device, node_id)
    code, out, err = run_admin("--json", "stats", data_dir=node.data)
    assert code == admin.OK, err
    assert json.loads(out)["bound"] == {"n1": 2, "n2": 1}
    alice.close()


def test_admin_inbox_shows_ids_and_texts_only_when_asked(node):
    alice, _ = with_waiting(node)
    code, out, err = run_admin("inbox", "carol", data_dir=node.data)
    assert code == admin.OK, err
    assert "pending: 2" in out and "0000000000000001" in out and "0000000000000002" in out
    assert "from alice" in out
    assert "secret" not in out
    code, out, err = run_admin("--json", "inbox", "carol", "--last", "1", data_dir=node.data)
    assert code == admin.OK, err
    inbox = json.loads(out)
    assert inbox["pending"] == 2 and inbox["last_id_given"] == 2 and not inbox["revoked"]
    assert [m["id"] for m in inbox["last"]] == ["0000000000000002"]
    assert "message" not in inbox["last"][0] and inbox["oldest_age_s"] >= 0
    code, out, err = run_admin("inbox", "carol", "--show-text", data_dir=node.data)
    assert code == admin.OK, err
    assert '"first secret text"' in out and '"second secret text"' in out
    code, out, err = run_admin("inbox", "nobody", data_dir=node.data)
    assert code == admin.UNKNOWN_ID and "nobody is not registered" in err and not out
    alice.close()


def test_admin_revoke_invalidates_tokens_and_keeps_messages(node):
    alice, carol_token = with_waiting(node)
    code, out, err = run_admin("revoke", "carol", data_dir=node.data)
    assert code == admin.OK, err
    assert "carol: every token revoked" in out
    assert store(node, "GET", "chatd:{carol}:token") == b"revoked"
    assert store(node, "LLEN", "chatd:{carol}:inbox") == 2
    c = BlockingLineClient(node.port)
    c.send({"reconnect": "true", "sender": "carol", "token": carol_token})
    assert c.expect("error")["code"] == "bad_token"
    # still registered: messages to it are stored, and it can register again
    assert alice.message("carol", "after the revoke")["type"] == "accepted"
    c.register("carol")
    assert [c.expect("message")["message"] for _ in range(3)] == [
        "first secret text", "second secret text", "after the revoke"]
    code, out, err = run_admin("revoke", "nobody", data_dir=node.data)
    assert code == admin.UNKNOWN_ID and "nobody is not registered" in err
    assert store(node, "EXISTS", "chatd:{nobody}:token") == 0
    c.close()
    alice.close()


def test_admin_purge_deletes_everything_of_the_id(node):
    alice, _ = with_waiting(node)
    assert len(keys_of(node, "carol")) >= 5  # token, seq, inbox, dedup, ref
    before = {k: store(node, "TYPE", k) for k in store(node, "KEYS", "*")}
    code, out, err = run_admin("purge", "carol", data_dir=node.data)
    assert code == admin.OK, err
    assert "carol: purged" in out
    assert keys_of(node, "carol") == []
    # nobody else's data was touched
    after = set(store(node, "KEYS", "*"))
    assert after == {k for k in before if not k.startswith(b"chatd:{carol}:")}
    assert alice.message("carol", "hello?")["code"] == "unknown_receiver"
    code, out, err = run_admin("purge", "carol", data_dir=node.data)
    assert code == admin.UNKNOWN_ID and "carol has nothing in the store" in err
    alice.close()


def test_admin_errors_have_their_exit_codes(node, tmp_short):
    empty = os.path.join(tmp_short, "empty")
    os.mkdir(empty)
    code, out, err = run_admin("stats", data_dir=empty)
    assert code == admin.NO_STORE and "no running store in" in err and not out
    code, _, err = run_admin("stats", data_dir=os.path.join(tmp_short, "missing"))
    assert code == admin.NO_STORE and "is not a directory" in err
    code, _, err = run_admin("--redis", "redis://127.0.0.1:1/0", "--timeout", "2s", "stats")
    assert code == admin.UNREACHABLE and "cannot reach redis://127.0.0.1:1/0" in err
    code, _, err = run_admin("inbox", "not an id", data_dir=node.data)
    assert code == admin.USAGE and "is not a destinationId" in err
    code, _, err = run_admin("frobnicate", data_dir=node.data)
    assert code == admin.USAGE
    # a frozen store: a clear error within --timeout, not a hang
    (store_pid,) = node.store_pids()
    os.kill(store_pid, signal.SIGSTOP)
    try:
        code, _, err = run_admin("--timeout", "1s", "stats", data_dir=node.data)
    finally:
        os.kill(store_pid, signal.SIGCONT)
    assert code == admin.UNREACHABLE and "did not answer within 1s" in err
    # the same store through --redis (a unix socket URL)
    code, out, err = run_admin("--redis", "unix://" + os.path.join(node.data, "valkey.sock"),
                               "--json", "stats")
    assert code == admin.OK and json.loads(out)["registered"] == 0, err


@pytest.mark.parametrize("command", ["revoke", "purge"])
def test_admin_closes_the_live_connection_with_revoked(node, command):
    bob = BlockingLineClient(node.port)
    bob.register("bob")
    code, out, err = run_admin(command, "bob", data_dir=node.data)
    assert code == admin.OK, err
    bob.sock.settimeout(5)
    assert bob.expect("error")["code"] == "revoked"
    assert bob.recv() is None  # then closed
    bob.close()


def test_admin_purge_keeps_a_registration_made_during_it(node):
    """carol registers again while her keys are being deleted: the purge
    stops, says so (exit code 1), and her new registration keeps working
    with ids that still increase."""
    import argparse

    import valkey
    alice, _ = with_waiting(node)
    client = valkey.Valkey(unix_socket_path=os.path.join(node.data, "valkey.sock"),
                           socket_timeout=10)
    client.where = "the test store"
    scan = client.scan_iter
    carol = BlockingLineClient(node.port)

    def scan_iter(**kw):
        for i, key in enumerate(scan(**kw)):
            if i == 0:
                carol.register("carol")  # the token was deleted, the rest not yet
            yield key

    client.scan_iter = scan_iter
    args = argparse.Namespace(id="carol", json=True)
    with pytest.raises(admin.AdminError) as e:
        admin.cmd_purge(client, args)
    client.close()
    assert e.value.code == admin.FAILED and "registered again" in str(e.value)
    assert store(node, "GET", "chatd:{carol}:seq") == b"2"
    reply = alice.message("carol", "still there?")
    assert (reply["type"], reply["id"]) == ("accepted", "0000000000000003")
    assert [carol.expect("message")["id"][-1:] for _ in range(3)] == ["1", "2", "3"]
    carol.close()
    alice.close()
