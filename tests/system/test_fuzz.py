"""
Fuzzing: hypothesis properties of the packet parser (``chatd.wire.packets``), and
a live fuzz of a running ``twistd chatd`` with well over 100,000 random and
mutated lines over 50 connections while a healthy client keeps chatting.

tests/wire/test_packets.py already fuzzes plain random bytes and random JSON
objects; these properties aim at what a hostile or broken client sends:
mutations of real packets, deep and mixed nesting, huge numbers, odd Unicode
and invalid UTF-8, and the seed's Python-literal syntax (checked against
Python's own ``ast.literal_eval``).

The live fuzz runs chatd with ``--rate-limit 0`` (else the limiter would
answer most lines with ``rate_limited`` and the parser would see little);
tests/system/test_abuse.py checks that the limit works when it is on.
"""

import ast
import json
import os
import random
import time
from collections import Counter

import pytest
import pytest_twisted
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chatd.store import layout
from chatd.wire import packets
from chatd.wire.packets import PacketError, parse_line
from tests.fixtures.nodes import ChatdProcess

ensure = pytest_twisted.ensureDeferred

ERROR_CODES = {"bad_packet", "unknown_packet", "missing_field", "bad_field", "message_too_long"}
FUZZ = settings(max_examples=250, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def outcome(line, **kw):
    """parse_line's result, or the PacketError it raised (checked: encodable
    as the server's error line). Anything else it raises fails the test."""
    try:
        return parse_line(line, **kw)
    except PacketError as e:
        assert e.code in ERROR_CODES, e.code
        err = json.loads(packets.error_from(e))
        assert err["type"] == "error" and err["code"] == e.code
        return e


def as_object(p):
    """A packet back as the object a client would send (the JSON form)."""
    obj = {"ref": p.ref} if p.ref is not None else {}
    if p.kind == "ping":
        obj["ping"] = p.ping
    elif p.kind == "ack":
        obj["ack"] = p.ack  # an int: any id, or -1 for what cannot be one
    elif p.kind == "message":
        obj.update(message=p.text, receiver=p.receiver)
        if p.sender is not None:
            obj["sender"] = p.sender
        if p.token is not None:
            obj["token"] = p.token
    else:
        obj.update({p.kind: "true", "sender": p.sender})
        if p.token is not None:
            obj["token"] = p.token
        if p.proof is not None:
            obj["proof"] = p.proof
    return obj


def check_accepted(p):
    """What chatd accepts it can act on and answer: the reply/push encodes
    to one line of JSON, and the packet reads back the same from the JSON a
    client would write for it (values normalised as the server echoes them)."""
    assert p.kind in packets.KINDS
    if p.kind == "ping":
        echoed = json.loads(packets.reply({"type": "pong", "ping": p.ping}))
        assert b"\n" not in packets.reply({"type": "pong", "ping": p.ping})[:-1]
        again = parse_line(json.dumps({"ping": echoed["ping"], "ref": p.ref}).encode())
        assert json.loads(packets.reply({"ping": again.ping})) == {"ping": echoed["ping"]}
        return
    if p.kind == "message":
        tail = layout.push_tail(p.sender or "s", p.receiver, p.text)
        pushed = json.loads(layout.ENTRY_HEAD + b"0" * 16 + layout.ENTRY_MID + b"1" + tail)
        assert pushed["message"] == p.text and pushed["receiver"] == p.receiver
    if p.ref is not None:
        assert json.loads(packets.error("x", "y", p.ref))["ref"] == p.ref
    line = json.dumps(as_object(p), ensure_ascii=False).encode("utf-8", "surrogatepass")
    again = outcome(line)
    assert again == p, (again, p)


# -- strategies ---------------------------------------------------------------------------

TOKEN = "p6QxJ0c3lN4v8yTqWmZbR2sH9kD1fGaE"
TEMPLATES = [
    b"{'register':'true', 'sender':'0011001100'}",
    b"{'reconnect':'true', 'token':'" + TOKEN.encode() + b"', 'sender':'0011001100'}",
    b"{'message':'Kya Bhai?', 'sender':'0011001100', 'receiver':'987654321', 'token':'"
    + TOKEN.encode() + b"'}",
    b'{"register": "true", "sender": "0011001100", "proof": "1700000000:ab12"}',
    b'{"reconnect": "true", "sender": "987654321", "token": "' + TOKEN.encode() + b'"}',
    b'{"message": "are you there?", "receiver": "987654321", "ref": "c-17"}',
    b'{"message": "\\u00fcn\\u00ef \\ud83d\\ude00", "receiver": "a@b", "ref": 42}',
    b'{"ack": "0000000000000002"}',
    b'{"ack": 12}',
    b'{"ping": {"any": ["value", 1, 2.5, null, true]}}',
    b"{'ping': ('tuple', [1, None, True], {'k': -3e-5})}",
    b'{"ping": "x"}\r',
]
INTERESTING = b"\x00\xff\xc0\x80\xed\xa0{}[]()\"':,\\\r 0-.eE9uxUNtTn"


@st.composite
def mutated(draw):
    """A real packet with a few byte-level mutations."""
    data = bytearray(draw(st.sampled_from(TEMPLATES)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "dup", "truncate",
                                   "splice"]))
        n = len(data)
        i = draw(st.integers(0, max(0, n - 1)))
        if op == "flip" and n:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and n:
            data[i] = draw(st.sampled_from(INTERESTING))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(
                [b"\\", b"\\u", b"\\ud800", b"\xe2\x82", b"'", b'"', b"{", b"[" * 40, b"9" * 400]))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 10))]
        elif op == "dup":
            j = draw(st.integers(i, n))
            data[j:j] = data[i:j] * draw(st.integers(1, 3))
        elif op == "truncate":
            del data[i:]
        elif op == "splice":
            other = draw(st.sampled_from(TEMPLATES))
            data[i:] = other[draw(st.integers(0, len(other))):]
    return bytes(data).replace(b"\n", b"")


@st.composite
def nested(draw):
    """A ping with a value nested 0..120 deep, brackets of every kind mixed,
    in either syntax, sometimes unbalanced."""
    depth = draw(st.integers(0, 120))
    json_only = draw(st.booleans())
    kinds = ["[", '{"k":'] if json_only else ["[", "(", "{'k':", '{"k":', "{1:", "{None:"]
    opens = draw(st.lists(st.sampled_from(kinds), min_size=depth, max_size=depth))
    closes = "".join({"[": "]", "(": ")"}.get(o, "}") for o in reversed(opens))
    if draw(st.integers(0, 9)) == 0 and closes:
        closes = closes[:-1] if draw(st.booleans()) else closes + draw(st.sampled_from("]})"))
    inner = draw(st.sampled_from(["1", '"x"', "null", "[]", "{}"] if json_only
                                 else ["1", "'x'", '"x"', "None", "null", "[]", "{}", "()"]))
    return ('{"ping": ' + "".join(opens) + inner + closes + "}").encode()


def digits(lo, hi):
    return st.integers(lo, hi).flatmap(
        lambda n: st.text("0123456789", min_size=n, max_size=n)).map(
        lambda s: s.lstrip("0") or "0")


@st.composite
def big_number(draw):
    """Number text: huge integers, long fractions, huge exponents, signs."""
    text = draw(st.sampled_from(["", "-"])) + draw(digits(1, 5000))
    if draw(st.booleans()):
        text += "." + draw(digits(1, 400))
    if draw(st.booleans()):
        text += draw(st.sampled_from("eE")) + draw(st.sampled_from(["", "+", "-"])) \
            + str(draw(st.integers(0, 10 ** 6)))
    return text


@st.composite
def number_line(draw):
    number = draw(big_number())
    form = draw(st.sampled_from([
        '{"ping": %s}', "{'ping': %s}", '{"ack": %s}', "{'ack': %s}",
        '{"ping": 1, "ref": %s}', '{"message": "m", "receiver": "b", "ref": %s}',
        "{'ping': [%s, %s]}", '{"register": %s, "sender": "a"}']))
    ping_is_number = form in ('{"ping": %s}', "{'ping': %s}")
    return (form.replace("%s", number)).encode(), number if ping_is_number else None


odd_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40) | \
    st.sampled_from(["", "\ud800", "\udfff\ud800", "\x00", "\ufeff", "\u202e", "e\u0301" * 30,
                     "\U0010ffff", "\ufffe", "٣", "０１１", "\u2028", "\x85", "A" * 64, "A" * 65,
                     "0011001100\n", " 0011001100"])


@st.composite
def unicode_line(draw):
    """Packets whose strings are odd Unicode; written with \\u escapes, or
    raw (surrogates then become invalid UTF-8, CESU-style)."""
    kind = draw(st.sampled_from(packets.KINDS))
    obj = {kind: draw(odd_text) if kind in ("message", "ping", "ack") else "true"}
    for name in ("sender", "receiver", "token", "ref", "proof"):
        if draw(st.booleans()):
            obj[name] = draw(odd_text)
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):
        text = text.replace('"', "'")  # the seed's quotes
    return text.encode("utf-8", "surrogatepass")


BAD_UTF8 = [b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80",
            b"\xbf", b"\xe2\x82", b"\xf0\x9f\x98", b"\xff", b"\xfe", b"\xc2"]


@st.composite
def bad_utf8_line(draw):
    base = draw(st.sampled_from(TEMPLATES)).rstrip(b"\r")
    i = draw(st.integers(1, len(base) - 1))
    return base[:i] + draw(st.sampled_from(BAD_UTF8)) + base[i:]


# the seed's syntax, generated as source text (so that it can be what Python
# itself would never write, e.g. a tuple key holding a list)

_ESC = ["\\\\", "\\'", '\\"', "\\n", "\\r", "\\t", "\\b", "\\f", "\\a", "\\v", "\\x41",
        "\\u00e9", "\\U0001F600", "\\ud800", "\\\n"]


@st.composite
def lit_string(draw):
    quote = draw(st.sampled_from("'\""))
    parts = draw(st.lists(st.text(st.characters(exclude_characters="'\"\\\n\r",
                                                exclude_categories=("Cs",)), max_size=6)
                          | st.sampled_from(_ESC), max_size=5))
    return quote + "".join(parts) + quote


def lit_number():
    return st.one_of(st.integers(-10 ** 30, 10 ** 30).map(str),
                     st.floats(allow_nan=False, allow_infinity=False).map(repr))


def literal(depth=3):
    scalar = st.one_of(lit_string(), lit_number(),
                       st.sampled_from(["True", "False", "None"]))
    if depth == 0:
        return scalar
    sub = st.deferred(lambda: literal(depth - 1))
    sep = st.sampled_from([",", ", ", " ,\t"])

    def seq(open_, close, items, trailing, s):
        body = s.join(items)
        if open_ == "(" and len(items) == 1:
            trailing = True  # (x) is not a tuple in Python
        return open_ + body + ("," if trailing and items else "") + close

    lists = st.builds(seq, st.just("["), st.just("]"), st.lists(sub, max_size=4),
                      st.booleans(), sep)
    tuples = st.builds(seq, st.just("("), st.just(")"), st.lists(sub, max_size=4),
                       st.booleans(), sep)
    dicts = st.builds(seq, st.just("{"), st.just("}"),
                      st.lists(st.builds(lambda k, v: "%s: %s" % (k, v), sub, sub), max_size=4),
                      st.booleans(), sep)
    return st.one_of(scalar, lists, tuples, dicts)


@st.composite
def seed_literal(draw):
    fields = draw(st.lists(st.tuples(
        st.sampled_from(["'register'", "'ping'", "'message'", "'sender'", "'receiver'",
                         "'ref'", "'ack'", "'token'", '"x"']) | literal(1),
        literal(3)), max_size=5))
    return "{" + ", ".join("%s: %s" % kv for kv in fields) + "}"


# -- properties ---------------------------------------------------------------------------

@FUZZ
@given(mutated())
# found by this property: lone surrogates (JSON escapes) in text fields
@example(b'{"register": "true", "sender": "0011001100", "proof": "\\ud81700000000:ab12"}')
@example(b'{"reconnect": "true", "sender": "0", "token": "\\ud800\\udc00x"}')
@example(b"{'reconnect': 'true', 'sender': '0', 'token': '\\ud800\\udc00'}")
def test_mutated_packets_fail_cleanly_or_round_trip(line):
    p = outcome(line)
    if p is not None and not isinstance(p, PacketError):
        check_accepted(p)


@FUZZ
@given(nested())
@example(b'{"ping": ' + b"[" * 31 + b"1" + b"]" * 31 + b"}")
@example(b"{'ping': " + b"(" * 40 + b")" * 40 + b"}")
def test_deep_and_mixed_nesting(line):
    p = outcome(line)
    if p is not None and not isinstance(p, PacketError):
        check_accepted(p)
        assert p.kind == "ping"


@FUZZ
@given(number_line())
@example((b'{"ping": ' + b"9" * 4300 + b"}", "9" * 4300))
@example((b"{'ping': " + b"9" * 4001 + b"}", "9" * 4001))
@example((b'{"ping": 1e999999}', "1e999999"))
@example((b'{"ack": ' + b"9" * 3000 + b"}", None))
def test_huge_numbers(case):
    line, number = case
    p = outcome(line)
    if p is None or isinstance(p, PacketError):
        return
    check_accepted(p)
    if number is not None:
        # what is accepted is the number itself: finite, exactly as written
        value = float(number) if any(c in number for c in ".eE") else int(number)
        assert p.ping == value and abs(p.ping) != float("inf")


@FUZZ
@given(unicode_line())
def test_odd_unicode(line):
    p = outcome(line)
    if p is None or isinstance(p, PacketError):
        return
    check_accepted(p)
    for name in ("sender", "receiver"):
        value = getattr(p, name)
        assert value is None or packets.ID_RE.match(value) and value.isascii()


@FUZZ
@given(bad_utf8_line())
def test_invalid_utf8_is_bad_packet(line):
    e = outcome(line)
    assert isinstance(e, PacketError) and e.code == "bad_packet"


@pytest.mark.slow  # (hypothesis: 8-20 s under the suite's load)
@FUZZ
@given(seed_literal())
@example("{(0, []): 0}")                 # a tuple key holding a list
@example("{'ping': {(1, 2): 'x'}}")     # a tuple key where chatd echoes it
def test_seed_literals_parse_like_python(src):
    """Any seed-style literal either fails cleanly or is read exactly as
    Python would read it, and is then acted on like its JSON form."""
    line = src.encode("utf-8", "surrogatepass")
    try:
        expected = ast.literal_eval(src)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        expected = None
    p = outcome(line)
    if isinstance(p, PacketError):
        return
    if expected is not None:
        assert packets.decode_line(line) == expected
    if p is not None:
        check_accepted(p)


def test_known_parser_crashes():
    """Regression cases for what the properties above found (see the report):
    a tuple key that holds a list is unhashable, and a tuple key in a ping
    value cannot be echoed as JSON. Both must be bad_packet, not a
    TypeError that escapes the parser and kills the connection."""
    for line in [b"{(0, []): 0}", b"{'ping': 1, 'x': {(1, [2]): 3}}",
                 b"{'ping': {(1, 2): 'x'}}"]:
        p = outcome(line)
        assert isinstance(p, PacketError) and p.code == "bad_packet", (line, p)


# -- the live fuzz ------------------------------------------------------------------------

MAX_LINE = 4096
CONNECTIONS = 50
#: round trips the healthy client must make while the fuzz runs (the fuzz
#: goes on until it has them: a count, never a count within a time)
HEALTHY_ROUNDS = 20
TARGET_LINES = 110_000


class LineGen:
    """Random and mutated client lines, from a seeded RNG."""

    def __init__(self, rng, ids, tokens):
        self.rng = rng
        self.ids = ids
        self.tokens = tokens

    def valid(self):
        r = self.rng
        who = r.choice(self.ids)
        kind = r.random()
        if kind < 0.25:
            return json.dumps({"ping": r.choice([1, "x", [1, {"a": None}], "ünï"])})
        if kind < 0.45:
            return json.dumps({"message": "fuzz %d %s" % (r.getrandbits(40), "é" * r.randrange(3)),
                               "receiver": r.choice(self.ids), "ref": "f%d" % r.getrandbits(30)})
        if kind < 0.55:
            return json.dumps({"message": "one-shot %d" % r.getrandbits(40), "sender": who,
                               "token": self.tokens[who] if r.random() < 0.7 else "wrong",
                               "receiver": r.choice(self.ids), "ref": r.getrandbits(20)})
        if kind < 0.65:
            return json.dumps({"ack": r.choice(["%016d" % r.randrange(1, 200), r.randrange(-5, 300),
                                                "x", "9" * 30])})
        if kind < 0.75:
            return "{'reconnect':'true', 'sender':'%s', 'token':'%s'}" % (
                who, self.tokens[who] if r.random() < 0.8 else TOKEN)
        if kind < 0.80:
            return "{'register':'true', 'sender':'%s'}" % r.choice(self.ids + ["fz-new"])
        return r.choice(TEMPLATES).decode()

    def mutate(self, line):
        r = self.rng
        data = bytearray(line.encode() if isinstance(line, str) else line)
        for _ in range(r.randint(1, 5)):
            n = len(data)
            i = r.randrange(n) if n else 0
            op = r.randrange(7)
            if op == 0 and n:
                data[i] ^= 1 << r.randrange(8)
            elif op == 1 and n:
                data[i] = r.choice(INTERESTING)
            elif op == 2:
                data[i:i] = r.choice([os.urandom(r.randint(1, 6)), b"\\u", b"\\ud800",
                                      r.choice(BAD_UTF8), b"[" * r.randint(1, 60), b"{'a':" * 40,
                                      b"9" * r.randint(10, 1000), b"\r", b"\x00"])
            elif op == 3:
                del data[i:i + r.randint(1, 12)]
            elif op == 4:
                j = r.randint(i, n)
                data[j:j] = data[i:j] * r.randint(1, 3)
            elif op == 5:
                del data[i:]
            else:
                other = self.valid().encode()
                data[i:] = other[r.randrange(len(other) + 1):]
        return bytes(data).replace(b"\n", b"")

    def weird_value(self, depth=0):
        r = self.rng
        k = r.randrange(9 if depth < 6 else 5)
        if k == 0:
            return r.choice([None, True, False])
        if k == 1:
            return r.choice([0, -1, 2 ** 63, -2 ** 63 - 1, 10 ** r.randint(1, 300), 1e308, -0.0, 5e-324])
        if k == 2:
            return "".join(chr(r.choice([r.randrange(0x20, 0x7f), r.randrange(0x80, 0x800),
                                         r.randrange(0xd800, 0xe000), r.randrange(0x10000, 0x110000)]))
                           for _ in range(r.randrange(12)))
        if k == 3:
            return r.choice(self.ids)
        if k == 4:
            return "x" * r.choice([0, 1, 64, 65, 128, 129, 2048, 2049])
        if k in (5, 6):
            return [self.weird_value(depth + 1) for _ in range(r.randrange(4))]
        return {r.choice(["ping", "message", "ack", "ref", "sender", "a"]): self.weird_value(depth + 1)
                for _ in range(r.randrange(4))}

    def structured(self):
        r = self.rng
        obj = {}
        for key in r.sample(["register", "reconnect", "message", "ack", "ping", "sender",
                             "receiver", "token", "ref", "proof", "zz"], r.randint(1, 5)):
            obj[key] = self.weird_value()
        text = json.dumps(obj, ensure_ascii=r.random() < 0.5)
        if r.random() < 0.3:
            text = repr(obj)  # the seed's syntax
        return text.encode("utf-8", "surrogatepass")

    def nested(self):
        r = self.rng
        depth = r.choice([5, 31, 32, 33, 100, 1000, 2000])
        if r.random() < 0.5:
            return b"{'ping': " + b"[" * depth + b"]" * depth + b"}"
        return b'{"ping": ' + b"[" * depth + b"]" * depth + b"}"

    def near_max(self):
        """Lines of MAX_LINE - 1 and MAX_LINE bytes, some with a telnet \\r
        (which does not count): all within the limit."""
        r = self.rng
        size = r.choice([MAX_LINE - 1, MAX_LINE])
        head = b'{"ping":"'
        body = head + b"x" * (size - len(head) - 2) + b'"}'
        return body + b"\r" if r.random() < 0.4 else body

    def line(self):
        r = self.rng.random()
        if r < 0.40:
            return self.mutate(self.valid())
        if r < 0.62:
            return self.valid().encode()
        if r < 0.77:
            return self.structured()
        if r < 0.90:
            return bytes(self.rng.getrandbits(8) for _ in range(self.rng.randrange(120))
                         ).replace(b"\n", b"")
        if r < 0.93:
            return self.nested()
        if r < 0.95:
            return self.near_max()
        return b""  # blank lines (and \r alone) are ignored


def _fuzz_protocol(stats):
    from twisted.internet import defer
    from twisted.internet.protocol import Protocol

    class FuzzConn(Protocol):
        def __init__(self):
            self.buf = b""
            self.waiters = {}
            self.closed = defer.Deferred()
            self.close_code = None
            self.lost = False
            self.reset = False

        def connectionMade(self):
            self.transport.setTcpNoDelay(True)

        def dataReceived(self, data):
            self.buf += data
            *lines, self.buf = self.buf.split(b"\n")
            for raw in lines:
                stats["server_lines"] += 1
                try:
                    obj = json.loads(raw)
                    kind = obj["type"]
                except (ValueError, KeyError, TypeError):
                    stats["bad_server_lines"] += 1
                    continue
                if kind == "error":
                    stats["codes"][obj.get("code")] += 1
                    if obj.get("code") in ("line_too_long", "session_replaced"):
                        self.close_code = obj["code"]
                elif kind == "pong" and isinstance(obj.get("ping"), str):
                    d = self.waiters.pop(obj["ping"], None)
                    if d is not None:
                        d.callback(None)

        def connectionLost(self, reason):
            from twisted.internet.error import ConnectionDone
            self.lost = True
            # a close with unread input is a RST, which can take the closing
            # error line with it; a clean close (FIN) must come with one
            self.reset = not reason.check(ConnectionDone)
            for d in self.waiters.values():
                d.errback(ConnectionError("closed"))
            self.waiters.clear()
            self.closed.callback(None)

        def sync(self, marker):
            if self.lost:  # closed by chatd while the batch went out
                return defer.fail(ConnectionError("closed"))
            d = defer.Deferred()
            self.waiters[marker] = d
            self.transport.write(b'{"ping":"%s"}\n' % marker.encode())
            return d

    return FuzzConn


async def _healthy(port, stop, rtts, problems):
    """A registered pair that keeps pinging and messaging through the fuzz."""
    from tests.clients import connect
    a = await connect(port)
    b = await connect(port)
    try:
        await a.register("healthy-a")
        await b.register("healthy-b")
        n = 0
        while not stop():
            n += 1
            t0 = time.monotonic()
            a.send({"ping": "rtt %d" % n})
            await a.expect("pong", timeout=30, ping="rtt %d" % n)
            rtts.append(time.monotonic() - t0)
            if n % 10 == 0:
                a.send({"message": "still here %d" % n, "receiver": "healthy-b", "ref": n})
                acc = await a.expect("accepted", timeout=30, ref=n)
                push = await b.expect("message", timeout=30, message="still here %d" % n)
                if push["id"] != acc["id"]:
                    problems.append("healthy push %r for %r" % (push, acc))
                b.send({"ack": push["id"]})
            from tests.helpers import pass_time
            await pass_time(0.05)
    finally:
        await a.close()
        await b.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
@ensure
async def test_live_fuzz_of_a_running_server(tmp_short):
    from twisted.internet import defer, reactor, task
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from tests.clients import connect
    from tests.helpers import with_deadline
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    server = ChatdProcess(tmp_short, [
        "--port", "tcp:0:interface=127.0.0.1", "--data-dir", os.path.join(tmp_short, "data"),
        "--rate-limit", "0", "--max-line", str(MAX_LINE), "--max-message", "2048",
        "--auth-timeout", "10m"])
    stats = {"server_lines": 0, "bad_server_lines": 0, "codes": Counter(),
             "lines": 0, "connections": 0, "aborts": 0, "overlong": 0, "partial": 0,
             "reset": 0}
    rtts, problems = [], []
    done = {"fuzz": False}
    try:
        server.start()
        port = server.wait_listening()
        # fuzz ids with real tokens, so that mutated reconnects and sends bind and act
        ids = ["fz%d" % i for i in range(12)] + ["0011001100", "987654321"]
        tokens = {}
        for device in ids:
            c = await connect(port)
            tokens[device] = await c.register(device)
            await c.close()
        gen = LineGen(rng, ids, tokens)
        FuzzConn = _fuzz_protocol(stats)
        healthy = defer.ensureDeferred(_healthy(port, lambda: done["fuzz"], rtts, problems))
        per_worker = TARGET_LINES // CONNECTIONS + 1

        def more(sent):
            return sent < per_worker or (len(rtts) < HEALTHY_ROUNDS and not healthy.called)

        async def worker(w):
            sent, batch_no = 0, 0
            while more(sent):
                conn = await with_deadline(connectProtocol(
                    TCP4ClientEndpoint(reactor, "127.0.0.1", port), FuzzConn()), 10, "connection")
                stats["connections"] += 1
                while more(sent):
                    batch_no += 1
                    lines = [gen.line() for _ in range(rng.randint(20, 150))]
                    data = b"\n".join(lines) + b"\n"
                    sent += len(lines)
                    stats["lines"] += len(lines)
                    ending = rng.random()
                    if ending < 0.02:    # a line over the limit: line_too_long, closed
                        data += b"y" * (MAX_LINE + rng.randint(2, 3000)) + \
                            (b"\n" if rng.random() < 0.5 else b"")
                        stats["overlong"] += 1
                    elif ending < 0.05:  # cut mid-line (RST) or half a line then FIN
                        data += gen.valid().encode()[:rng.randint(1, 30)]
                        stats["aborts"] += 1
                    # write it in pieces, so lines arrive split across reads
                    pieces = sorted(rng.sample(range(1, len(data)), min(len(data) - 1,
                                                                        rng.randint(0, 4))))
                    start = 0
                    for cut in pieces + [len(data)]:
                        conn.transport.write(data[start:cut])
                        start = cut
                        if cut != len(data) and rng.random() < 0.5:
                            stats["partial"] += 1
                            await task.deferLater(reactor, rng.random() * 0.005, lambda: None)
                    if ending < 0.05:
                        if ending < 0.02 or rng.random() < 0.5:
                            conn.transport.loseConnection()
                        else:
                            conn.transport.abortConnection()
                        await with_deadline(conn.closed, 30, "close")
                        break
                    try:
                        await with_deadline(conn.sync("sync-%d-%d" % (w, batch_no)), 60,
                                            "answer to a fuzz batch (a hang?)")
                    except ConnectionError:
                        if conn.close_code is None and conn.reset:
                            stats["reset"] += 1  # see connectionLost
                        elif conn.close_code is None:
                            problems.append("connection closed by chatd (FIN) without a "
                                            "closing error after batch %d of worker %d"
                                            % (batch_no, w))
                        break
                else:
                    conn.transport.loseConnection()
                    await with_deadline(conn.closed, 30, "close")

        t0 = time.monotonic()
        results = await defer.DeferredList([defer.ensureDeferred(worker(w))
                                            for w in range(CONNECTIONS)], consumeErrors=True)
        elapsed = time.monotonic() - t0
        done["fuzz"] = True
        await with_deadline(healthy, 60, "the healthy client to finish")
        for ok, result in results:
            if not ok:
                problems.append("fuzz worker failed: %s" % result.getErrorMessage())
        # chatd is alive, still answers, and stops cleanly
        assert server.running, "chatd died:\n" + server.log()[-3000:]
        c = await connect(port)
        await c.register("after-fuzz")
        c.send({"ping": "after"})
        await c.expect("pong", ping="after")
        await c.close()
        code = server.stop()
        assert code in (0, -15), server.log()[-3000:]
        rtts.sort()
        summary = ("live fuzz (seed %d): %d lines over %d connections "
                   "in %.1fs (%.0f lines/s); %d server lines, error codes %s; %d over-long lines, "
                   "%d cut mid-line, %d split writes, %d closed by chatd with a RST that took "
                   "the closing error along; healthy client: %d pings, RTT p50 %.1f ms, "
                   "p99 %.1f ms, max %.1f ms"
                   % (seed, stats["lines"], stats["connections"], elapsed,
                      stats["lines"] / elapsed, stats["server_lines"], dict(stats["codes"]),
                      stats["overlong"], stats["aborts"], stats["partial"], stats["reset"],
                      len(rtts),
                      1000 * rtts[len(rtts) // 2], 1000 * rtts[int(len(rtts) * 0.99)],
                      1000 * rtts[-1]))
        print("\n" + summary)
        bad = server.bad_log_lines()
        assert not bad, "chatd logged tracebacks during the fuzz (%s):\n%s" % (
            summary, _log_excerpt(server.log(), bad))
        assert not problems, "%s\n%s" % (summary, "\n".join(problems[:20]))
        assert stats["lines"] >= 100_000
        assert stats["bad_server_lines"] == 0
        assert stats["codes"]["bad_packet"] > 1000 and stats["codes"]["line_too_long"] >= 1
        # each round trip had its deadline (30 s: only a hang misses it)
        assert len(rtts) >= HEALTHY_ROUNDS, summary
    finally:
        done["fuzz"] = True
        server.cleanup()


def _log_excerpt(log, bad, around=12):
    lines = log.splitlines()
    first = next(i for i, line in enumerate(lines) if line in bad)
    return "\n".join(lines[max(0, first - 2):first + around])
