"""
TLS: an ``ssl:`` listener (a self-signed certificate made by the test with
the ``cryptography`` package), in-process with Twisted TLS clients that
verify it, and as ``twistd chatd --port ssl:...`` with Python's ``ssl``
module, beside a plain TCP ``--listen``.
"""

import json
import os
import socket
import ssl

import pytest_twisted

from tests.clients import _client_protocol, LineClient
from tests.fixtures.nodes import ChatdProcess
from tests.helpers import DEADLINE, make_certificate, ssl_port, with_deadline

ensure = pytest_twisted.ensureDeferred


async def connect_tls(port, cert_path, hostname="localhost"):
    """A LineClient over TLS that trusts only ``cert_path``."""
    from twisted.internet import reactor, ssl as tssl
    from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
    with open(cert_path, "rb") as f:
        trust = tssl.Certificate.loadPEM(f.read())
    options = tssl.optionsForClientTLS(hostname, trustRoot=trust)
    client = LineClient()
    await with_deadline(connectProtocol(SSL4ClientEndpoint(reactor, "127.0.0.1", port, options),
                                        _client_protocol(client)), DEADLINE, "TLS connection")
    return client


@ensure
async def test_two_tls_clients_chat(chatd, tmp_path):
    key_path, cert_path = make_certificate(str(tmp_path))
    node = await chatd(port=ssl_port(key_path, cert_path))
    a = await connect_tls(node.port, cert_path)
    b = await connect_tls(node.port, cert_path)
    try:
        await a.register("0011001100")
        b.send("{'register':'true', 'sender':'987654321'}")  # the seed's syntax, over TLS
        token_b = (await b.expect("registered", sender="987654321"))["token"]
        a.send({"message": "Kya Bhai? (over TLS) ünï", "receiver": "987654321", "ref": "t1"})
        accepted = await a.expect("accepted", ref="t1")
        push = await b.expect("message", sender="0011001100", message="Kya Bhai? (over TLS) ünï")
        assert push["id"] == accepted["id"]
        b.send({"ack": push["id"]})
        assert await b.sync() == []
        # a reconnect with the token over a new TLS connection takes over
        b2 = await connect_tls(node.port, cert_path)
        try:
            await b2.reconnect("987654321", token_b)
            await b.error("session_replaced")
            b2.send({"message": "and back", "receiver": "0011001100", "ref": "t2"})
            await b2.expect("accepted", ref="t2")
            await a.expect("message", message="and back")
        finally:
            await b2.close()
    finally:
        await a.close()
        await b.close()


@ensure
async def test_a_client_that_does_not_trust_the_certificate_gets_nothing(chatd, tmp_path):
    key_path, cert_path = make_certificate(str(tmp_path))
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    _, stranger = make_certificate(str(other_dir))
    node = await chatd(port=ssl_port(key_path, cert_path))
    c = await connect_tls(node.port, stranger)  # TCP connects; the handshake fails
    c.send({"register": "true", "sender": "mallory"})
    await c.wait_closed()
    assert c.raw == []
    # the server is fine, and nobody registered
    ok = await connect_tls(node.port, cert_path)
    try:
        ok.send({"message": "x", "receiver": "mallory"})
        await ok.error("not_registered")
    finally:
        await ok.close()


def test_twistd_ssl_port_beside_plain_tcp(tmp_short):
    """``twistd chatd --port ssl:... --listen tcp:...``; Python's ssl module
    verifies the certificate; a TLS and a plain client chat with each other."""
    key_path, cert_path = make_certificate(tmp_short)
    proc = ChatdProcess(tmp_short, ["--port", ssl_port(key_path, cert_path),
                                    "--listen", "tcp:0:interface=127.0.0.1",
                                    "--data-dir", os.path.join(tmp_short, "data")])
    socks = []

    def tls_client(port):
        ctx = ssl.create_default_context(cafile=cert_path)
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=DEADLINE),
                            server_hostname="localhost")
        socks.append(s)
        return s, s.recv

    def plain_client(port):
        s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        socks.append(s)
        return s, s.recv

    def send(c, obj):
        c[0].sendall(json.dumps(obj).encode() + b"\n")

    buffers = {}

    def recv(c):
        buf = buffers.get(c[0], b"")
        while b"\n" not in buf:
            chunk = c[1](65536)
            assert chunk, "connection closed"
            buf += chunk
        line, buffers[c[0]] = buf.split(b"\n", 1)
        return json.loads(line)

    try:
        proc.start()
        proc.wait_listening()
        from tests.fixtures.process import wait_for
        ports = wait_for(lambda: len(proc.listening_ports()) == 2 and proc.listening_ports(),
                         DEADLINE, "both listeners")
        assert "chatd listening on ssl" in proc.log()
        tls_port, tcp_port = ports
        t = tls_client(tls_port)
        assert t[0].version() in ("TLSv1.2", "TLSv1.3")
        p = plain_client(tcp_port)
        send(t, {"register": "true", "sender": "secure"})
        assert recv(t)["type"] == "registered"
        send(p, {"register": "true", "sender": "plain"})
        assert recv(p)["type"] == "registered"
        send(p, {"message": "to TLS", "receiver": "secure", "ref": 1})
        assert recv(p)["type"] == "accepted"
        push = recv(t)
        assert push["type"] == "message" and push["message"] == "to TLS"
        send(t, {"ack": push["id"]})
        send(t, {"message": "to plain", "receiver": "plain", "ref": 2})
        assert recv(t)["type"] == "accepted"
        assert recv(p)["message"] == "to plain"
        # plain text on the TLS port is no way in
        raw = plain_client(tls_port)
        send(raw, {"register": "true", "sender": "sneaky"})
        try:
            data = raw[0].recv(4096)
        except (ConnectionResetError, socket.timeout):
            data = b""
        assert b"registered" not in data
        for s in socks:
            s.close()
        socks.clear()
        assert proc.stop() in (0, -15)
        assert not proc.bad_log_lines(), proc.log()[-3000:]
    finally:
        for s in socks:
            s.close()
        proc.cleanup()


def test_graceful_stop_with_a_tls_client_that_does_not_hang_up(tmp_short):
    """A phone that keeps its TLS connection open without reading (in the
    background, or half-gone) when chatd stops: chatd tells it ``shutdown``,
    waits its close grace (5 s) for the TLS close, cuts it, and exits --
    without an error in its log."""
    key_path, cert_path = make_certificate(tmp_short)
    proc = ChatdProcess(tmp_short, ["--port", ssl_port(key_path, cert_path),
                                    "--data-dir", os.path.join(tmp_short, "data")])
    sock = None
    try:
        proc.start()
        port = proc.wait_listening()
        ctx = ssl.create_default_context(cafile=cert_path)
        sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=DEADLINE),
                               server_hostname="localhost")
        sock.sendall(b'{"register": "true", "sender": "background-phone"}\n')
        assert b'"registered"' in sock.recv(4096)
        code = proc.stop(timeout=30)  # the phone neither reads nor hangs up
        assert code in (0, -15)
        assert "Server Shut Down" in proc.log()
        bad = proc.bad_log_lines()
        assert not bad, "chatd logged an error while stopping:\n" + "\n".join(
            line for line in proc.log().splitlines()
            if "critical" in line or line.startswith("\t"))
    finally:
        if sock is not None:
            sock.close()
        proc.cleanup()
