"""
chatd as users run it: ``twistd -n chatd`` as a subprocess on its embedded
store, and the plugin found by ``twistd --help`` after both kinds of install.
"""

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time

import pytest

from tests.procs import alive, children_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class Twistd:
    """``twistd -n chatd ...`` in a subprocess, its output read by a thread."""

    def __init__(self, cwd, *args):
        self.lines = queue.Queue()
        self.output = []
        self.proc = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "chatd"] + list(args), cwd=cwd,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern, timeout=30):
        end = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                line = None
                if time.monotonic() < end:
                    continue
            if line is None:
                raise AssertionError("no %r in chatd's output:\n%s" % (pattern, "\n".join(self.output)))
            m = re.search(pattern, line)
            if m:
                return m

    def port(self):
        return int(self.wait_for(r"chatd listening on tcp [\d.]+:(\d+)").group(1))

    def exited(self, timeout=30):
        """Wait for chatd to exit by itself; its exit code."""
        code = self.proc.wait(timeout)
        self.reader.join(timeout)
        return code

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("chatd did not stop on %s:\n%s" % (sig, "\n".join(self.output)))


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


@pytest.fixture
def orphans():
    """Pids to kill at the end if a failing test left them (a SIGKILLed
    chatd's store outlives it by design)."""
    pids = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_twistd_chatd_embedded_store_survives_sigkill(tmp_short, orphans):
    data = os.path.join(tmp_short, "data")
    args = ["--port", "tcp:0:interface=127.0.0.1", "--data-dir", data]
    t0 = time.monotonic()
    first = Twistd(tmp_short, *args)
    try:
        port = first.port()
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
        [store] = children_of(first.proc.pid)
        orphans.append(store)
        # a second chatd on the same data dir is refused
        second = Twistd(tmp_short, "--port", "tcp:0:interface=127.0.0.1", "--data-dir", data)
        assert second.exited() != 0
        assert any("in use" in line for line in second.output), second.output
    finally:
        first.stop(signal.SIGKILL)
    assert alive(store), "the store should outlive a SIGKILLed chatd (an orphan)"

    again = Twistd(tmp_short, *args)
    try:
        port = again.port()
        assert not alive(store), "the orphaned store was not stopped"
        c = Client(port)
        c.send({"reconnect": "true", "sender": "0011001100", "token": token})
        assert c.recv() == {"type": "reconnected", "sender": "0011001100", "pending": 0}
        d = Client(port)
        d.send({"reconnect": "true", "sender": "987654321", "token": "wrong"})
        assert d.recv()["code"] == "bad_token"
        c.send({"message": "kept across a crash", "receiver": "987654321", "ref": "k1"})
        assert c.recv()["type"] == "accepted"  # the ref record survived too
        [store2] = children_of(again.proc.pid)
        orphans.append(store2)
    finally:
        code = again.stop(signal.SIGTERM)
    # a clean stop: the client was told, the store stopped after chatd
    assert c.recv()["code"] == "shutdown"
    # twistd exits "by" the signal it stopped on, after a clean shutdown
    assert code in (0, -signal.SIGTERM), "\n".join(again.output)
    assert any("Server Shut Down" in line for line in again.output)
    assert not any("Traceback" in line for line in again.output), "\n".join(again.output)
    assert not alive(store2)

    # after a clean stop the data is there too: the message still waits
    third = Twistd(tmp_short, *args)
    try:
        d = Client(third.port())
        d.send({"register": "true", "sender": "987654321"})
        assert d.recv()["type"] == "registered"
        push = d.recv()
        assert push["type"] == "message" and push["message"] == "kept across a crash"
        d.close()
    finally:
        third.stop(signal.SIGTERM)
    print("twistd start to listening (embedded store): %.2fs" % started)


def _site_packages(venv):
    return sysconfig.get_path("purelib", vars={"base": venv, "platbase": venv})


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
