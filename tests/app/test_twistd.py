"""
chatd as users run it: ``twistd -n chatd`` as a subprocess on its embedded
store, and the plugin found by ``twistd --help`` after both kinds of install.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time

import pytest

from tests.fixtures.nodes import ChatdProcess
from tests.fixtures.procfs import alive

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Client:
    """A blocking line client (this test drives a separate process)."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def send(self, obj):
        self.sock.sendall((obj if isinstance(obj, str) else json.dumps(obj)).encode() + b"\n")

    def recv(self):
        line = self.file.readline()
        assert line, "connection closed"
        return json.loads(line)

    def close(self):
        self.file.close()
        self.sock.close()


@pytest.mark.slow
def test_twistd_chatd_embedded_store_survives_sigkill(tmp_short):
    data = os.path.join(tmp_short, "data")
    args = ["--port", "tcp:0:interface=127.0.0.1", "--data-dir", data]
    first = ChatdProcess(tmp_short, args)
    again = ChatdProcess(tmp_short, args, log_path=os.path.join(tmp_short, "again.log"))
    try:
        t0 = time.monotonic()
        port = first.start().wait_listening()
        started = time.monotonic() - t0
        c = Client(port)
        c.send("{'register':'true', 'sender':'0011001100'}")
        reply = c.recv()
        assert reply["type"] == "registered" and reply["sender"] == "0011001100"
        token = reply["token"]
        d = Client(port)
        d.send({"register": "true", "sender": "987654321"})
        assert d.recv()["type"] == "registered"
        d.close()
        c.send({"message": "kept across a crash", "receiver": "987654321", "ref": "k1"})
        assert c.recv()["type"] == "accepted"
        c.close()
        [store] = first.store_pids()
        # a second chatd on the same data dir is refused
        second = ChatdProcess(tmp_short, args, log_path=os.path.join(tmp_short, "second.log"))
        assert second.start().wait(30) != 0
        assert "in use" in second.log(), second.log()

        first.kill(signal.SIGKILL)
        assert alive(store), "the store should outlive a SIGKILLed chatd (an orphan)"

        port = again.start().wait_listening()
        assert not alive(store), "the orphaned store was not stopped"
        c = Client(port)
        c.send({"reconnect": "true", "sender": "0011001100", "token": token})
        reply = c.recv()
        assert reply.pop("token") not in (None, token)  # the next token (rotation, 1.2)
        assert reply == {"type": "reconnected", "sender": "0011001100", "pending": 0}
        d = Client(port)
        d.send({"reconnect": "true", "sender": "987654321", "token": "wrong"})
        assert d.recv()["code"] == "bad_token"
        d.close()
        c.send({"message": "kept across a crash", "receiver": "987654321", "ref": "k1"})
        assert c.recv()["type"] == "accepted"  # the ref record survived too
        [store2] = again.store_pids()
        # a clean stop: the client is told, hangs up (one that does not
        # would hold the stop up for the close grace), the store stops
        # after chatd
        again.send_signal(signal.SIGTERM)
        assert c.recv()["code"] == "shutdown"
        c.close()
        code = again.wait(30)
        # twistd exits "by" the signal it stopped on, after a clean shutdown
        log = again.log(since_start=True)
        assert code in (0, -signal.SIGTERM), log
        assert "Server Shut Down" in log and not again.bad_log_lines(), log
        assert not alive(store2)

        # after a clean stop the data is there too: the message still waits
        d = Client(again.start().wait_listening())
        d.send({"register": "true", "sender": "987654321"})
        assert d.recv()["type"] == "registered"
        push = d.recv()
        assert push["type"] == "message" and push["message"] == "kept across a crash"
        d.close()
        again.stop()
    finally:
        # kills what a failing run left, the orphaned store included
        first.cleanup()
        again.cleanup()
    print("twistd start to listening (embedded store): %.2fs" % started)


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_twistd_help_lists_chatd_after_pip_install(tmp_path, editable):
    """A fresh venv gets chatd alone (--no-deps); the dependencies come from
    this environment through a plain path entry (so none of its .pth files,
    such as this checkout's editable install, are read)."""
    venv = str(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    py = os.path.join(venv, "bin", "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "outer-deps.pth"), "w") as f:
        f.write(sysconfig.get_path("purelib") + "\n")
    cmd = [py, "-m", "pip", "install", "--quiet", "--no-deps"]
    cmd += ["-e", ROOT] if editable else [ROOT]
    subprocess.run(cmd, check=True, cwd=str(tmp_path))
    out = subprocess.run([py, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
                         capture_output=True, text=True, cwd=str(tmp_path))
    assert re.search(r"^\s+chatd\s", out.stdout, re.M), out.stdout + out.stderr
    usage = subprocess.run([py, "-c", "from twisted.scripts.twistd import run; run()",
                            "chatd", "--help"], capture_output=True, text=True, cwd=str(tmp_path))
    assert "--redis-timeout" in usage.stdout, usage.stdout + usage.stderr
