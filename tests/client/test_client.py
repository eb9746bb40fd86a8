"""
The terminal client (``chatd-client``): its pure parts (formatting, command
parsing, the token file, the command line) and its session state machine
against a fake transport, then the real thing as a subprocess against an
in-process chatd: scripted ``--send``, ``--listen``, interactive mode through
pipes and through a pseudo-terminal, offline catch-up, reconnect, and a clean
exit at the end of input.

Subprocesses are started with ``reactor.spawnProcess`` so the reactor (and
the chatd node in it) keeps running while the client works.
"""

import json
import os
import re
import socket
import stat
import time

import pytest
import pytest_twisted
from twisted.internet import error

from chatd.client import cli, formatting
from chatd.client.connection import id_order
from chatd.client.tokens import TokenFile, default_state_dir
from chatd.client.ui import Command, parse_command
from tests.fixtures.client_session import make_session, push
from tests.helpers import registered, wait_until

ensure = pytest_twisted.ensureDeferred


# -- what is shown ---------------------------------------------------------------

def test_format_push_today_and_older():
    now = time.time()
    push = {"type": "message", "id": "0000000000000001", "sender": "bob",
            "receiver": "alice", "message": "hi alice", "sent_at": int(now * 1000)}
    expected = "[%s] bob: hi alice" % time.strftime("%H:%M:%S", time.localtime(now))
    assert formatting.format_push(push, now=now) == expected
    old = dict(push, sent_at=int((now - 3 * 86400) * 1000))
    assert re.fullmatch(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] bob: hi alice",
                        formatting.format_push(old, now=now))


def test_format_push_is_safe_for_a_terminal():
    push = {"sender": "bob", "message": "a\x1b[2Jb\tc\nsecond line", "sent_at": 0}
    line = formatting.format_push(push, now=0)
    assert "\x1b" not in line and "\\x1b[2Jb    c" in line
    first, second = line.split("\n")
    # the second line of a text starts under the first one's text
    assert second == " " * first.index("a\\x1b") + "second line"


def test_colours_only_on_a_terminal_without_no_color():
    class Tty:
        def isatty(self):
            return True
    assert formatting.Style.for_stream(Tty(), {}).colour
    assert not formatting.Style.for_stream(Tty(), {"NO_COLOR": "1"}).colour
    assert not formatting.Style.for_stream(open(os.devnull), {}).colour
    painted = formatting.format_push({"sender": "bob", "message": "hi", "sent_at": 0},
                                     formatting.Style(True), now=0)
    assert "\x1b[" in painted and painted.endswith(" hi")


def test_replies_in_words():
    assert formatting.describe_reply("bob", {"type": "accepted", "id": "1"}) == ("ok", "sent to bob")
    kind, words = formatting.describe_reply("bob", {"type": "duplicate", "receiver": "bob"})
    assert kind == "warn" and words.startswith("not sent: bob got the same text")
    assert words.endswith("(duplicate)")
    assert formatting.describe_reply("bob", {
        "type": "error", "code": "unknown_receiver", "reason": "bob has never registered",
    }) == ("error", "error: bob has never registered (unknown_receiver)")
    assert formatting.describe_error({"code": "inbox_full"}) == "inbox full (inbox_full)"


def test_connection_failures_in_words():
    assert formatting.failure_words(error.ConnectionRefusedError()) == "connection refused"
    assert formatting.failure_words(error.DNSLookupError("x")) == "no such host"
    assert formatting.failure_words(error.TimeoutError()) == "timed out"


def test_server_ids_sort_as_numbers():
    ids = ["0000000000000010", "0000000000000009", "11", "9"]
    assert sorted(ids, key=id_order) == ["9", "11", "0000000000000009", "0000000000000010"]


# -- what is typed -----------------------------------------------------------------

@pytest.mark.parametrize("line, command", [
    ("hello", Command("send", text="hello")),
    ("  spaced  ", Command("send", text="  spaced  ")),
    ("//not a command", Command("send", text="/not a command")),
    ("", Command("nothing")),
    ("   ", Command("nothing")),
    ("/to bob", Command("to", peer="bob")),
    ("/to  0011001100  ", Command("to", peer="0011001100")),
    ("/to bob hi there", Command("to", peer="bob", text="hi there")),
    ("/help", Command("help")),
    ("/quit", Command("quit")),
    ("/QUIT", Command("quit")),
])
def test_parse_command(line, command):
    assert parse_command(line) == command


@pytest.mark.parametrize("line, words", [
    ("/to", "needs an id"),
    ("/to b/ob", "not a valid id"),
    ("/frobnicate", "unknown command /frobnicate"),
])
def test_parse_command_mistakes(line, words):
    command = parse_command(line)
    assert command.kind == "bad" and words in command.text


def test_command_line():
    o = cli.parse_args(["localhost", "5000", "--id", "alice", "--send", "bob", "hi"])
    assert (o.host, o.port, o.id, o.send, o.timeout) == ("localhost", 5000, "alice",
                                                         ["bob", "hi"], 10.0)
    o = cli.parse_args(["h", "1", "--id", "a", "--listen", "--timeout", "2.5"])
    assert o.listen and o.timeout == 2.5 and o.send is None


@pytest.mark.parametrize("argv", [
    ["h", "5000", "--send", "bob", "hi"],                   # --send needs --id
    ["h", "5000", "--listen"],                              # so does --listen
    ["h", "5000", "--id", "a", "--count", "2"],             # --count needs --listen
    ["h", "5000", "--id", "a", "--listen", "--count", "0"],
    ["h", "70000"],
    ["h", "5000", "--id", "no spaces"],
    ["h", "5000", "--id", "a", "--send", "b b", "hi"],
    ["h", "5000", "--id", "a", "--listen", "--send", "b", "hi"],
    ["h", "5000", "--timeout", "0"],
])
def test_command_line_mistakes(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


# -- where the token lives -----------------------------------------------------------

def test_state_dir_follows_xdg(tmp_path):
    assert default_state_dir({"XDG_STATE_HOME": str(tmp_path)}) == \
        str(tmp_path / "chatd-client")
    home = os.path.expanduser("~")
    for environ in ({}, {"XDG_STATE_HOME": "relative/is/ignored"}):
        assert default_state_dir(environ) == os.path.join(
            home, ".local", "state", "chatd-client")


def test_token_file(tmp_path):
    directory = tmp_path / "state" / "chatd-client"
    tokens = TokenFile(str(directory), "::1", 5000, "0011001100")
    assert tokens.load() is None
    tokens.save("secret-1")
    assert tokens.load() == "secret-1"
    assert stat.S_IMODE(os.stat(tokens.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    tokens.save("secret-2")
    assert tokens.load() == "secret-2"
    assert os.listdir(directory) == [os.path.basename(tokens.path)]  # no temp file left
    # one file per server and id
    assert TokenFile(str(directory), "::1", 5001, "0011001100").load() is None
    assert TokenFile(str(directory), "::1", 5000, "0011001101").load() is None
    with open(tokens.path, "w") as f:
        f.write("{not json")
    assert tokens.load() is None


# -- the session, against a fake transport ----------------------------------------------

def test_session_registers_then_reconnects_with_the_saved_token(tmp_path):
    session, server, ui, clock, tokens = make_session(tmp_path)
    session.start()
    assert server.written() == [{"register": "true", "sender": "alice"}]
    server.say({"type": "registered", "sender": "alice", "token": "T1"})
    assert tokens.load() == "T1" and "registered as alice" in ui.notices[-1]
    server.drop()
    assert ui.notices[-1] == "connection lost; reconnecting in 0.5 s"
    clock.advance(0.5)
    assert server.written() == [{"reconnect": "true", "sender": "alice", "token": "T1"}]
    server.say({"type": "reconnected", "sender": "alice", "pending": 0})
    assert ui.notices[-1] == "connected to h:1 as alice"


def test_register_option_forces_a_new_token(tmp_path):
    TokenFile(str(tmp_path), "h", 1, "alice").save("old")
    session, server, ui, clock, tokens = make_session(tmp_path, new_token=True)
    session.start()
    assert server.written() == [{"register": "true", "sender": "alice"}]
    server.say({"type": "registered", "sender": "alice", "token": "new"})
    assert tokens.load() == "new"


def test_session_registers_again_after_bad_token(tmp_path):
    session, server, ui, clock, tokens = make_session(tmp_path, token="old")
    session.start()
    assert server.written()[0]["reconnect"] == "true"
    server.say({"type": "error", "code": "bad_token", "reason": "wrong token", "ref": None})
    assert "refused (bad_token); registering again" in ui.notices[-1]
    assert server.written() == [{"register": "true", "sender": "alice"}]
    server.say({"type": "registered", "sender": "alice", "token": "new"})
    assert tokens.load() == "new"


def test_session_shows_each_id_once_and_acks_each_read(tmp_path):
    session, server, ui, clock, _ = make_session(tmp_path, token="T")
    session.start()
    server.written()
    server.say({"type": "reconnected", "sender": "alice", "pending": 2}, push(1, "one"), push(2, "two"))
    assert ui.shown == ["one", "two"]
    assert server.written() == [{"ack": "%016d" % 2}]  # one cumulative ack per read
    server.say(push(3, "three"))
    assert server.written() == [{"ack": "%016d" % 3}]
    server.say({"type": "ping"})
    assert server.written() == [{"ping": "keepalive"}]  # the server's keepalive answered
    # the connection dies before the server saw the last ack: 3 comes again
    server.drop()
    clock.advance(0.5)
    server.written()
    server.say({"type": "reconnected", "sender": "alice", "pending": 2}, push(3, "three"), push(4, "four"))
    assert ui.shown == ["one", "two", "three", "four"]
    # ...and is acked on this connection, where it was pushed again
    assert server.written() == [{"ack": "%016d" % 4}]


def test_session_acks_only_what_was_shown(tmp_path):
    session, server, ui, clock, _ = make_session(tmp_path, token="T")
    shown = []
    ui.incoming = lambda push, raw: shown.append(push["id"]) or len(shown) < 2
    session.start()
    server.written()
    server.say({"type": "reconnected", "sender": "alice", "pending": 3},
               push(1, "one"), push(2, "two"), push(3, "three"))
    # "two" could not be written (stdout closed): it and "three" stay stored
    assert shown == ["%016d" % 1, "%016d" % 2]
    assert server.written() == [{"ack": "%016d" % 1}]


def test_session_queues_while_offline_and_resends_with_the_same_ref(tmp_path):
    session, server, ui, clock, _ = make_session(tmp_path, token="T")
    server.refuse = True
    session.start()
    assert ui.notices[-1] == "cannot connect to h:1: connection refused; retrying in 0.5 s"
    assert session.offline
    session.send("bob", "first")
    session.send("bob", "second")
    clock.advance(0.5)
    assert ui.notices[-1].endswith("retrying in 1.0 s")
    server.refuse = False
    clock.advance(1.0)
    assert server.written()[0]["reconnect"] == "true"  # nothing sent before it is bound
    server.say({"type": "reconnected", "sender": "alice", "pending": 0})
    sent = server.written()
    assert [(p["message"], p["receiver"]) for p in sent] == [("first", "bob"), ("second", "bob")]
    refs = [p["ref"] for p in sent]
    assert len(set(refs)) == 2
    server.say({"type": "accepted", "id": "%016d" % 1, "receiver": "bob", "ref": refs[0]})
    # the connection dies before the second is answered: it is sent again, same ref
    server.drop()
    clock.advance(0.5)
    server.written()
    server.say({"type": "reconnected", "sender": "alice", "pending": 0})
    again = server.written()
    assert [(p["message"], p["ref"]) for p in again] == [("second", refs[1])]
    idle = session.when_idle()
    assert not idle.called
    server.say({"type": "accepted", "id": "%016d" % 2, "receiver": "bob", "ref": refs[1]})
    assert idle.called and ui.answers == [("first", "accepted"), ("second", "accepted")]
    # refs differ from one run of the client to the next
    other, *_ = make_session(tmp_path / "other")
    assert other.send("bob", "x").ref != refs[0]


def test_session_backs_off_to_ten_seconds(tmp_path):
    session, server, ui, clock, _ = make_session(tmp_path)
    server.refuse = True
    session.start()
    delays = []
    for _ in range(7):
        delays.append(float(re.search(r"retrying in ([\d.]+) s", ui.notices[-1]).group(1)))
        clock.advance(delays[-1])
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    server.refuse = False
    clock.advance(10)
    server.say({"type": "registered", "sender": "alice", "token": "T"})
    server.drop()
    assert ui.notices[-1].endswith("reconnecting in 0.5 s")  # reset once bound
    session.stop()
    assert not clock.getDelayedCalls()


def test_session_says_why_the_server_closed_and_stops_when_replaced(tmp_path):
    session, server, ui, clock, _ = make_session(tmp_path, token="T")
    session.start()
    server.say({"type": "reconnected", "sender": "alice", "pending": 0})
    server.say({"type": "error", "code": "shutdown", "reason": "the server is stopping",
                "ref": None})
    server.drop()
    assert ui.notices[-1] == ("the server closed the connection: the server is stopping "
                              "(shutdown); reconnecting in 0.5 s")
    clock.advance(0.5)
    assert server.written()[0]["reconnect"] == "true"
    # a shutdown that says when to come back (retry_after_ms, 1.2) is waited for
    server.say({"type": "reconnected", "sender": "alice", "pending": 0})
    server.say({"type": "error", "code": "shutdown", "reason": "the server is stopping",
                "ref": None, "retry_after_ms": 7250})
    server.drop()
    assert ui.notices[-1].endswith("(shutdown); reconnecting in 7.2 s"), ui.notices[-1]
    clock.advance(7.0)
    assert server.written() == []  # not yet
    clock.advance(0.3)
    assert server.written()[0]["reconnect"] == "true"
    server.say({"type": "reconnected", "sender": "alice", "pending": 0})
    server.say({"type": "error", "code": "session_replaced", "reason": "elsewhere", "ref": None})
    assert ui.fatals and ui.fatals[0][0] == 1
    session.stop()
    server.drop()
    assert not clock.getDelayedCalls()  # no reconnect war with the other client


def test_one_shot_sends_with_the_token_and_ignores_pushes(tmp_path):
    session, server, ui, clock, tokens = make_session(tmp_path, token="old", one_shot=True,
                                                      retry_first=False)
    session.start()
    entry = session.send("bob", "hi")
    assert server.written() == [{"message": "hi", "receiver": "bob", "ref": entry.ref,
                                 "sender": "alice", "token": "old"}]
    server.say({"type": "error", "code": "bad_token", "reason": "wrong token", "ref": entry.ref})
    assert server.written() == [{"register": "true", "sender": "alice"}]
    server.say({"type": "registered", "sender": "alice", "token": "new"}, push(1, "waiting"))
    resent = server.written()
    assert [p.get("message") for p in resent] == ["hi"]  # and no ack: pushes stay stored
    assert resent[0]["ref"] == entry.ref and tokens.load() == "new"
    assert ui.shown == []


def test_one_shot_gives_up_when_it_cannot_connect(tmp_path):
    session, server, ui, clock, _ = make_session(tmp_path, one_shot=True, retry_first=False)
    server.refuse = True
    session.start()
    assert ui.fatals == [(2, "cannot connect to h:1: connection refused")]
    assert not clock.getDelayedCalls()


# -- the real client, as a subprocess --------------------------------------------------------

def token_of(state_dir, device, port):
    path = state_dir / ("127.0.0.1_%d_%s.json" % (port, device))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    return json.loads(path.read_text())["token"]


@ensure
async def test_send_exit_codes_and_token_reuse(chatd, clients, client, state_dir):
    node = await chatd(dedup_window=60.0)  # a slow start must not outlast the window
    bob = await registered(clients, node, "bob")
    first = client(node.port, "--id", "alice", "--send", "bob", "hello bob")
    assert await first.exited() == 0, first.err
    assert re.search(r"^sent to bob \(id \d{16}\)$", first.out, re.M)
    await bob.expect("message", sender="alice", message="hello bob")
    token = token_of(state_dir, "alice", node.port)
    # two more at once: the same text again, and a receiver nobody registered
    again = client(node.port, "--id", "alice", "--send", "bob", "hello bob")
    nobody = client(node.port, "--id", "alice", "--send", "nobody", "hello?")
    assert await again.exited() == 1
    assert "not sent: bob got the same text" in again.err and "(duplicate)" in again.err
    assert await nobody.exited() == 1
    assert "not sent: nobody has never registered (unknown_receiver)" in nobody.err
    assert "Traceback" not in again.err + nobody.err
    # they used the saved token instead of registering again
    assert token_of(state_dir, "alice", node.port) == token
    assert "registered as" not in again.err + nobody.err
    assert await bob.sync() == []


@ensure
async def test_send_registers_again_when_the_saved_token_is_refused(chatd, clients, client,
                                                                    state_dir):
    node = await chatd()
    await registered(clients, node, "bob")
    state_dir.mkdir(mode=0o700)
    path = state_dir / ("127.0.0.1_%d_alice.json" % node.port)
    path.write_text(json.dumps({"id": "alice", "token": "not-the-right-one"}))
    p = client(node.port, "--id", "alice", "--send", "bob", "hi")
    assert await p.exited() == 0, p.err
    assert "refused (bad_token); registering again" in p.err
    assert token_of(state_dir, "alice", node.port) != "not-the-right-one"


@ensure
async def test_send_to_a_server_that_is_down(client):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = client(port, "--id", "alice", "--send", "bob", "hi", "--timeout", "5")
    assert await p.exited() == 2
    assert p.err.strip() == "cannot connect to 127.0.0.1:%d: connection refused" % port


@ensure
async def test_listen_prints_json_acks_and_reconnects_next_time(chatd, clients, client,
                                                                redis, state_dir):
    node = await chatd()
    alice = await registered(clients, node, "alice")
    bob = client(node.port, "--id", "bob", "--listen")
    await bob.wait_for("registered as bob", stream="err")
    token = token_of(state_dir, "bob", node.port)
    for text in ("one", "two"):
        alice.send({"message": text, "receiver": "bob", "ref": text})
        await alice.expect("accepted", ref=text)
    lines = await bob.wait_for(r"(?m)^\{.*\}$", count=2)
    pushes = [json.loads(line) for line in lines]
    assert [(p["type"], p["sender"], p["message"]) for p in pushes] == [
        ("message", "alice", "one"), ("message", "alice", "two")]
    assert pushes[0]["id"] < pushes[1]["id"] and isinstance(pushes[0]["sent_at"], int)
    await wait_until(lambda: redis.command("LLEN", "chatd:{bob}:inbox") == 0, what="the acks")
    # the end of its input means nothing to a listener: it goes on
    bob.close_stdin()
    alice.send({"message": "after eof", "receiver": "bob"})
    await alice.expect("accepted")
    [line] = await bob.wait_for(r'(?m)^\{.*"after eof".*\}$')
    await wait_until(lambda: redis.command("LLEN", "chatd:{bob}:inbox") == 0, what="the ack")
    bob.transport.signalProcess("INT")
    assert await bob.exited() == 0
    # the next run reconnects with the saved token, and stops on SIGTERM
    bob = client(node.port, "--id", "bob", "--listen")
    await bob.wait_for(r"connected to 127\.0\.0\.1:\d+ as bob", stream="err")
    assert "registered as" not in bob.err
    # token rotation (1.2): the reconnect's new token is saved at once
    assert token_of(state_dir, "bob", node.port) not in (None, token)
    alice.send({"message": "three", "receiver": "bob"})
    await alice.expect("accepted")
    [line] = await bob.wait_for(r"(?m)^\{.*\}$")
    assert json.loads(line)["message"] == "three"
    await wait_until(lambda: redis.command("LLEN", "chatd:{bob}:inbox") == 0, what="the ack")
    bob.transport.signalProcess("TERM")
    assert await bob.exited() == 0
    assert "Traceback" not in bob.err


@ensure
async def test_listen_with_stdin_at_eof_from_the_start_and_count(chatd, clients, client,
                                                                 redis):
    """As from cron, systemd or `&` (stdin is /dev/null): the listener
    registers and listens; --count N exits 0 after N messages, acked; stdout
    holds only the JSON lines."""
    node = await chatd()
    alice = await registered(clients, node, "alice")
    bob = client(node.port, "--id", "bob", "--listen", "--count", "2")
    bob.close_stdin()
    await bob.wait_for("registered as bob", stream="err")
    for text in ("one", "two", "three"):
        alice.send({"message": text, "receiver": "bob"})
        await alice.expect("accepted")
    assert await bob.exited() == 0, bob.err
    pushes = [json.loads(line) for line in bob.out.splitlines()]
    assert [p["message"] for p in pushes] == ["one", "two"]
    # the two shown were acked before it exited; the third waits for next time
    inbox = redis.command("LRANGE", "chatd:{bob}:inbox", 0, -1)
    assert [json.loads(e)["message"] for e in inbox] == ["three"]


@ensure
async def test_interactive_through_pipes(chatd, clients, client, redis):
    node = await chatd(dedup_window=60.0)
    bob = await registered(clients, node, "bob")
    alice = client(node.port, "--id", "alice")
    await alice.wait_for("registered as alice")
    alice.write("/to bob\nhello bob\n")
    await alice.wait_for("(?m)^sent to bob$")
    await bob.expect("message", sender="alice", message="hello bob")
    alice.write("hello bob\n/to nobody\nanyone?\n/help\n/nonsense\n")
    await alice.wait_for(r"not sent: bob got the same text .*\(duplicate\)")
    await alice.wait_for(r"error: nobody has never registered \(unknown_receiver\)")
    await alice.wait_for(r"unknown command /nonsense")
    assert "/to ID" in alice.out
    bob.send({"message": "hi alice", "receiver": "alice"})
    await bob.expect("accepted")
    await alice.wait_for(r"(?m)^\[\d\d:\d\d:\d\d\] bob: hi alice$")
    await wait_until(lambda: redis.command("LLEN", "chatd:{alice}:inbox") == 0, what="the ack")
    assert "\x1b" not in alice.out  # no colours into a pipe
    assert "{" not in alice.out  # no raw JSON
    alice.close_stdin()
    assert await alice.exited() == 0
    assert alice.err == ""


@ensure
async def test_interactive_on_a_terminal(chatd, clients, client):
    node = await chatd()
    bob = await registered(clients, node, "bob")
    carol = client(node.port, pty=True)  # no --id: it asks
    await carol.wait_for("your id")
    carol.write("carol\n")
    await carol.wait_for("registered as carol")
    carol.write("/to bob hey bob\n")
    await carol.wait_for(r"\x1b\[32msent to bob\x1b\[0m")  # colours on a terminal
    await bob.expect("message", sender="carol", message="hey bob")
    carol.write("\x04")  # Ctrl-D
    assert await carol.exited() == 0


@ensure
async def test_offline_messages_appear_once_in_order(chatd, clients, client, redis):
    node = await chatd()
    alice = await registered(clients, node, "alice")
    bob = client(node.port, "--id", "bob")
    await bob.wait_for("registered as bob")
    bob.close_stdin()
    assert await bob.exited() == 0
    texts = ["while you were away %d" % i for i in range(3)]
    for text in texts:
        alice.send({"message": text, "receiver": "bob"})
        await alice.expect("accepted")
    bob = client(node.port, "--id", "bob")
    await bob.wait_for(r"connected to .* as bob; 3 messages waiting")
    alice.send({"message": "welcome back", "receiver": "bob"})
    await alice.expect("accepted")
    await bob.wait_for("alice: welcome back")
    shown = re.findall(r"(?m)^\[[\d:]+\] alice: (.*)$", bob.out)
    assert shown == texts + ["welcome back"]
    await wait_until(lambda: redis.command("LLEN", "chatd:{bob}:inbox") == 0, what="the acks")
    # an interactive client leaves at the end of its input (Ctrl-D)
    bob.close_stdin()
    assert await bob.exited() == 0


@ensure
async def test_reconnects_by_itself_and_sends_what_was_typed_meanwhile(chatd, clients, client):
    node = await chatd()
    port = node.port
    bob = await registered(clients, node, "bob")
    alice = client(port, "--id", "alice", "--to", "bob")
    await alice.wait_for("registered as alice")
    await node.stop()
    # it waits as long as the server's shutdown said (retry_after_ms, 1.2)
    await alice.wait_for(r"the server closed the connection: .*\(shutdown\); "
                         r"reconnecting in \d+\.\d s")
    alice.write("did you miss me?\n")
    await alice.wait_for("not connected; what you type is sent once the connection is back")
    node = await chatd(port="tcp:%d:interface=127.0.0.1" % port)
    await alice.wait_for(r"connected to 127\.0\.0\.1:%d as alice" % port)
    await alice.wait_for("(?m)^sent to bob$")
    bob2 = await clients(node)
    await bob2.reconnect("bob", bob.token)
    await bob2.expect("message", sender="alice", message="did you miss me?")
    alice.close_stdin()
    assert await alice.exited() == 0


@ensure
async def test_end_of_input_waits_for_the_answers(chatd, clients, client):
    node = await chatd()
    bob = await registered(clients, node, "bob")
    alice = client(node.port, "--id", "alice")
    alice.write("/to bob\none\ntwo\nthree")  # the last line has no newline
    alice.close_stdin()
    assert await alice.exited() == 0, alice.err
    assert alice.out.count("sent to bob") == 3
    for text in ("one", "two", "three"):
        await bob.expect("message", sender="alice", message=text)
