"""
Blocking helpers for tests that drive chatd as a separate process (twistd
subprocess) from plain test functions: a line client and an HTTP GET.
"""

import json
import socket
import urllib.error
import urllib.request

from tests.helpers import DEADLINE


class LineClient:
    """A blocking chatd client over TCP: send packets, read server lines."""

    def __init__(self, port, timeout=DEADLINE):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.token = None

    def send(self, packet):
        self.sock.sendall(json.dumps(packet).encode() + b"\n")

    def recv(self):
        """The next server line as a dict; None once the server closed."""
        line = self.file.readline()
        return json.loads(line) if line else None

    def expect(self, type, **fields):
        msg = self.recv()
        assert msg is not None, "the server closed the connection"
        assert msg.get("type") == type, "expected %s, got %r" % (type, msg)
        for k, v in fields.items():
            assert msg.get(k) == v, "expected %s=%r in %r" % (k, v, msg)
        return msg

    def register(self, device):
        self.send({"register": "true", "sender": device})
        self.token = self.expect("registered", sender=device)["token"]
        return self.token

    def message(self, receiver, text, ref=None):
        """Send a message; its reply."""
        self.send({"message": text, "receiver": receiver, "ref": ref})
        return self.recv()

    def close(self):
        self.file.close()
        self.sock.close()


def http_get(url, timeout=DEADLINE):
    """(status, body bytes) of a GET; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
