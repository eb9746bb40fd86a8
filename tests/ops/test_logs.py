"""
chatd's log as an operator's log shipper gets it: one event per line (JSON
with ``--log-format json``), and never a token nor a message text, whatever
the clients send (a run's whole log is grepped).
"""

import json
import os

import pytest

from tests.clients import BlockingLineClient
from tests.fixtures.nodes import ChatdProcess

TEXT = "the-secret-text-4f1c"


def traffic(port):
    """Everything that might be tempted to log a text or a token: register,
    messages (accepted, duplicate, to nobody, too long, malformed), a
    reconnect, a bad token, a one-shot send, a line too long. The tokens."""
    alice, bob = BlockingLineClient(port), BlockingLineClient(port)
    tokens = [alice.register("alice"), bob.register("bob")]
    assert alice.message("bob", TEXT, "r1")["type"] == "accepted"
    assert alice.message("bob", TEXT)["type"] == "duplicate"
    assert alice.message("nobody", TEXT)["code"] == "unknown_receiver"
    assert alice.message("bob", TEXT * 2000)["code"] == "message_too_long"
    alice.sock.sendall(b'{"message": "%s", "receiver": \n' % TEXT.encode())
    assert alice.expect("error")["code"] == "bad_packet"
    assert bob.expect("message")["message"] == TEXT
    c = BlockingLineClient(port)
    c.send({"reconnect": "true", "sender": "alice", "token": tokens[1]})
    assert c.expect("error")["code"] == "bad_token"
    c.send({"message": TEXT + "-2", "sender": "alice", "token": tokens[0], "receiver": "bob"})
    assert c.expect("accepted")
    c.sock.sendall(TEXT.encode() * 5000 + b"\n")
    assert c.expect("error")["code"] == "line_too_long"
    for client in (alice, bob, c):
        client.close()
    return tokens


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_log_has_one_event_per_line_and_no_token_or_text(tmp_short, fmt):
    proc = ChatdProcess(tmp_short, [
        "--port", "tcp:0:interface=127.0.0.1", "--data-dir", os.path.join(tmp_short, "data"),
        "--max-line", "64k", "--log-format", fmt])
    try:
        proc.start().wait_listening()
        tokens = traffic(proc.port)
        proc.stop()
    finally:
        proc.cleanup()
    log = proc.log()
    for secret in tokens + [TEXT]:
        assert secret not in log, "%r is in the log" % secret
    assert not proc.bad_log_lines()
    if fmt == "text":
        return
    events = [json.loads(line) for line in log.splitlines()]  # each line one event
    listening = [e for e in events if e["message"].startswith("chatd listening on tcp")]
    assert listening and listening[0]["where"].startswith("127.0.0.1:")
    assert listening[0]["level"] == "info" and listening[0]["namespace"] == "chatd.app.service.ChatService"
    assert all(e["time"].endswith("+00:00") for e in events)
    assert events[-1]["message"] == "Server Shut Down."


def test_log_format_json_chooses_twistds_observer():
    from twisted.python import usage
    from twisted.scripts.twistd import ServerOptions

    from chatd.ops import logs
    config = ServerOptions()
    config.parseOptions(["-n", "chatd", "--log-format", "json"])
    assert config["logger"] is logs.json_observer
    config = ServerOptions()
    config.parseOptions(["-n", "chatd"])
    assert config["logger"] is None
    with pytest.raises(usage.UsageError, match="--log-format"):
        ServerOptions().parseOptions(["-n", "chatd", "--log-format", "xml"])
