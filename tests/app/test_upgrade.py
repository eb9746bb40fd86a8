"""
An upgrade on the same data dir: the release before issue 25's cuts to the
store steps (d2081d1, the layout they started from) stores messages, tokens,
a ref record, dedup markers and id counters; this tree, started on the same
data dir, delivers every message, takes every token, answers the ref retry
from its record, refuses the text sent just before the upgrade as a
duplicate and goes on with the ids where they were; and a message the old
release stored from a sender who opted in to receipts (no ``rs`` names it)
still makes that sender's delivered receipt when it is acked after.
"""

import glob
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile

import pytest

from tests.app.test_twistd import Client
from tests.fixtures.nodes import ChatdProcess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: the release whose store this one must keep working on
OLD_RELEASE = "d2081d1"


def _old_tree(directory):
    """chatd as it was at OLD_RELEASE (its package and twistd plugin), or
    None when this checkout has no git history to take it from."""
    if shutil.which("git") is None:
        return None
    try:
        archive = subprocess.run(["git", "archive", OLD_RELEASE, "chatd", "twisted"], cwd=ROOT,
                                 capture_output=True, check=True, timeout=60).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory)
    return directory


def _env(tree):
    env = dict(os.environ)
    env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "") if env.get(
        "PYTHONPATH") else tree
    return env


def _library_name(tree):
    """The name of the Lua library that the chatd in ``tree`` loads."""
    return subprocess.run([sys.executable, "-c", "from chatd.store.library import Library; "
                           "print(Library().name)"], env=_env(tree), cwd=tree, capture_output=True,
                          text=True, check=True, timeout=60).stdout.strip()


def _stop(node):
    node.send_signal(signal.SIGTERM)
    assert node.wait(30) in (0, -signal.SIGTERM), node.log(since_start=True)[-3000:]


@pytest.mark.slow
def test_store_of_the_release_before_keeps_working_after_the_upgrade(tmp_short):
    old = _old_tree(os.path.join(tmp_short, "old"))
    if old is None:
        pytest.skip("no git history here to take release %s from" % OLD_RELEASE)
    data = os.path.join(tmp_short, "data")
    # a dedup window no restart outlasts, however slow the machine
    args = ["--port", "tcp:0:interface=127.0.0.1", "--data-dir", data, "--dedup-window", "10m"]
    before = ChatdProcess(tmp_short, args, log_path=os.path.join(tmp_short, "old.log"),
                          env=_env(old))
    after = ChatdProcess(tmp_short, args, log_path=os.path.join(tmp_short, "new.log"),
                         env=_env(ROOT))
    try:
        port = before.start().wait_listening()
        tokens = {}
        for device in ("1000000001", "1000000002", "1000000003", "1000000004"):
            c = Client(port)
            # 1000000003 opts in to receipts (and sends to 1000000004 below)
            c.send(dict({"register": "true", "sender": device},
                        **({"receipts": "true"} if device == "1000000003" else {})))
            reply = c.recv()
            assert reply["type"] == "registered", reply
            tokens[device] = reply["token"]
            c.close()
        bob = Client(port)
        bob.send({"reconnect": "true", "sender": "1000000002", "token": tokens["1000000002"]})
        reply = bob.recv()
        assert reply["type"] == "reconnected", reply
        tokens["1000000002"] = reply["token"]
        ids = []
        for packet in ({"message": "stored by the old release", "receiver": "1000000001",
                        "ref": "r1"},
                       {"message": "and a second one", "receiver": "1000000001"},
                       {"message": "sent just before the upgrade", "receiver": "1000000001"}):
            bob.send(packet)
            reply = bob.recv()
            assert reply["type"] == "accepted", reply
            ids.append(reply["id"])
        bob.close()
        carol = Client(port)
        carol.send({"reconnect": "true", "sender": "1000000003", "token": tokens["1000000003"],
                    "receipts": "true"})
        reply = carol.recv()
        assert reply["type"] == "reconnected", reply
        tokens["1000000003"] = reply["token"]
        carol.send({"message": "to be acked after the upgrade", "receiver": "1000000004"})
        reply = carol.recv()
        assert reply["type"] == "accepted", reply
        carol_id = reply["id"]
        carol.close()
        _stop(before)
        # the old release's own Lua did that (its library is in the store's AOF)
        old_lib, new_lib = _library_name(old), _library_name(ROOT)
        assert old_lib != new_lib
        aof = b"".join(open(f, "rb").read()
                       for f in glob.glob(os.path.join(data, "**", "*.aof*"), recursive=True))
        assert old_lib.encode() in aof and new_lib.encode() not in aof

        port = after.start().wait_listening()
        bob = Client(port)
        bob.send({"reconnect": "true", "sender": "1000000002", "token": tokens["1000000002"]})
        assert bob.recv()["type"] == "reconnected"
        # the dedup marker of the old release still holds
        bob.send({"message": "sent just before the upgrade", "receiver": "1000000001"})
        assert bob.recv()["type"] == "duplicate"
        # a retry of a ref the old release accepted: its first reply again
        bob.send({"message": "stored by the old release", "receiver": "1000000001", "ref": "r1"})
        reply = bob.recv()
        assert (reply["type"], reply["id"], reply["ref"]) == ("accepted", ids[0], "r1"), reply
        # the ids go on from the old release's counter
        bob.send({"message": "stored by the new one", "receiver": "1000000001"})
        reply = bob.recv()
        assert reply["type"] == "accepted" and int(reply["id"]) == int(ids[-1]) + 1, reply

        alice = Client(port)
        alice.send({"reconnect": "true", "sender": "1000000001", "token": tokens["1000000001"]})
        back = alice.recv()
        assert back["type"] == "reconnected" and back["pending"] == 4, back
        pushed = [alice.recv() for _ in range(4)]
        assert [p["id"] for p in pushed] == ids + [reply["id"]]
        assert [p["message"] for p in pushed] == [
            "stored by the old release", "and a second one", "sent just before the upgrade",
            "stored by the new one"]
        alice.send({"ack": pushed[-1]["id"]})
        alice.send({"ping": "after the ack"})
        assert alice.recv()["type"] == "pong"
        alice.close()
        bob.close()

        # acked after the upgrade: its opted-in sender gets the receipt
        dave = Client(port)
        dave.send({"reconnect": "true", "sender": "1000000004", "token": tokens["1000000004"]})
        assert dave.recv()["type"] == "reconnected"
        pushed = dave.recv()
        assert (pushed["type"], pushed["id"]) == ("message", carol_id), pushed
        dave.send({"ack": carol_id})
        dave.send({"ping": "after the ack"})
        assert dave.recv()["type"] == "pong"
        dave.close()
        carol = Client(port)
        carol.send({"reconnect": "true", "sender": "1000000003", "token": tokens["1000000003"],
                    "receipts": "true"})
        back = carol.recv()
        assert back["type"] == "reconnected" and back["pending"] == 1, back
        receipt = carol.recv()
        assert (receipt["type"], receipt["receiver"], receipt["status"], receipt["upto"]) == (
            "receipt", "1000000004", "delivered", carol_id), receipt
        carol.close()
        _stop(after)
    finally:
        before.cleanup()
        after.cleanup()

