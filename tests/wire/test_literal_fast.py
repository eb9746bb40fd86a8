"""
The dict literals read at C speed (chatd.wire.literal, issue 23 item 3)
accept and refuse exactly what the token-by-token parser does
(literal.parse_literal), value for value. CPU per byte is measured by
benchmarks/parse_cost.py, not here.
"""

import math

import pytest
from hypothesis import example, given, settings, strategies as st

from chatd.wire import literal, packets
from chatd.wire.packets import PacketError


def _slow(text):
    try:
        return literal.parse_literal(text)
    except PacketError as e:
        return ("refused", e.code)


def _fast(text):
    js = literal.to_json(text)
    if js is literal.SLOW:
        return None  # left to the slow parser: nothing to compare
    try:
        return packets.read_literal(text)
    except PacketError as e:
        return ("refused", e.code)


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b) or (a != a and b != b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b


EDGES = [
    "{'a': 1,}", "{'a': [1,]}", "{,}", "{'a': [,]}", "{'a': [1,,]}", "{'a': 1,,}",
    "{'a': 007}", "{'a': -007}", "{'a': .5}", "{'a': -.5}", "{'a': 1.}", "{'a': 1.e5}",
    "{'a': .e5}", "{'a': 1..5}", "{'a': 1.5.5}", "{'a': 0}", "{'a': 00}", "{'a': 1e007}",
    "{'a': 1e999}", "{'a': 1e-99999}", "{'a': +1}", "{'a': --1}", "{'a': 1 2}",
    "{'a': TrueFalse}", "{'a': True}", "{'a': none}", "{'a': null}", "{'a':\u3000 1}",
    "{'a':\x0b1}", "{'a': 'x\\'y'}", "{'a': \"it's\"}", "{'a': 'q\"q'}",
    "{'a': '\\n\\t\\r\\b\\f\\a\\v\\0\\\\'}", "{'a': '\\x41\\u00e9\\U0001F600'}",
    "{'a': '\\ud800'}", "{'a': '\\U0000d800'}", "{'a': '\\q'}", "{'a': '\\012'}",
    "{'a': '\\N{BULLET}'}", "{'a': 'x\\\ny'}", "{'a': '\x01\x02\t'}", "{'a': 'é中😀'}",
    "{'a': '\\\\u1234'}", "{'a': '\\\\中'}", "{'a': 1} x", "{'a' 1}", "{1: 2}",
    "{'a': [1, 2]]}", "{'a': {'b': }}", "{'a': {'b': 1, 'b': 2}}", "{'a': 'x'", "",
    "{'a': \x00}", "{'a': [" + "9" * 4001 + "]}", "{'a': -" + "9" * 4000 + "}",
    "{'a': " + "9" * 4000 + "}", "{'a': " + "9" * 4001 + ".5}", "{'a': '" + "x" * 3 + "'}",
    "{'p': " + "[" * 31 + "1" + "]" * 31 + "}", "{'p': " + "[" * 32 + "1" + "]" * 32 + "}",
    "{'p': " + "{'a':" * 31 + "1" + "}" * 31 + "}", "{'p': " + "{'a':" * 32 + "1" + "}" * 32 + "}",
    "{'p': " + "[" * 2000 + "]" * 2000 + "}", "['a']", "'a'", "{'a': b'x'}",
    # the quotes: one kind or both, escaped, holding the other kind, unclosed
    "{'a': '', \"b\": \"\"}", "{'a': \"x'\", 'b': 'y\"'}", "{'a': '\\\\'}",
    "{'a': '\\\\\\''}", "{\"a\": \"\\\"\"}", "{'a': '\\\"'}", "{'a': 'x}", "{'a': \"x'}",
    "{'a': 'x\\'}", "{'a': 'x\"'}", "{'a': \"\", 'b': '\"'}", "{'a': '\\'', 'b': \"'\"}",
    "{'a': 'a\nb'}", "{'a': '\\ud801'}",
    # leading zeros and trailing commas (left to the token parser)
    "{'a': [0, 00, 01, -01, 0.5, 00.5, 1e01, 1e-01]}", "{'a': [1, ]}", "{'a': {'b': 1, }}",
]


@pytest.mark.parametrize("text", EDGES)
def test_fast_and_slow_agree_on_edges(text):
    fast = _fast(text)
    if fast is not None:
        assert _same(fast, _slow(text)), (text, fast, _slow(text))


_TOKENS = st.sampled_from(
    ["{", "}", "[", "]", ",", ":", " ", "\t", "'a'", "'b\\n'", '"c"', "'\\x41'", "'\\''",
     "1", "0", "07", ".5", "1.", "-", "e5", "1e5", "True", "None", "false", "null", "'é'",
     "\u3000", "'\\q'", "'\\u00e9'", "\"'\"", "''", '"\\""', "'\\\\'", "'\"'", "\"x'y\"",
     "'", '"', "\\", "00", "-0"])


@pytest.mark.slow  # (hypothesis: 8-20 s under the suite's load)
@settings(max_examples=3000, deadline=None)
@given(st.lists(_TOKENS, max_size=14).map(lambda t: "{'k': " + "".join(t) + "}"))
@example("{'k': [1, 'x',], 'y': {'z': .5,},}")
def test_fast_and_slow_agree_on_token_soup(text):
    fast = _fast(text)
    if fast is not None:
        assert _same(fast, _slow(text)), (text, fast, _slow(text))


def test_big_literals_are_read_without_the_token_parser(monkeypatch):
    """The seed's form of a big packet never reaches parse_literal."""
    def boom(text):
        raise AssertionError("read token by token")
    monkeypatch.setattr(literal, "parse_literal", boom)
    for line in [b"{'ping':[" + b",".join([b"1"] * 20000) + b"]}",
                 b"{'message':'" + b"line\\n" * 3000 + b"', 'receiver':'bob'}",
                 b"{'ping':[" + b",".join([b"'\\x01'"] * 5000) + b",]}"]:
        p = packets.parse_line(line)
        assert p is not None


def test_a_big_literal_with_a_tuple_is_refused_small_ones_still_read():
    small = b"{'ping': (1, 2)}"
    assert packets.parse_line(small).ping == (1, 2)
    big = b"{'ping': (" + b",".join([b"1"] * 1000) + b")}"
    with pytest.raises(PacketError) as e:
        packets.parse_line(big)
    assert e.value.code == "bad_packet" and "send JSON" in e.value.reason


@pytest.mark.parametrize("line", ["\u0660", "{'a': \u0660}", "{'a': 1\u0660}",
                                  "{'a': \u0660.5}", "{'ping': [\u0661, 2]}"])
def test_digits_of_other_scripts_are_read_as_the_token_parser_reads_them(line):
    """A digit of another script (found by hypothesis: the fast reader raised
    UnicodeEncodeError, which cost the client its connection): a packet or
    a PacketError, never another exception; a ping's value as the token
    parser reads it."""
    try:
        got = packets.parse_line(line.encode("utf-8"))
    except PacketError:
        return
    assert got.kind == "ping" and _same(got.ping, literal.parse_literal(line)["ping"])


def _never_token_by_token(monkeypatch):
    def boom(text):
        raise AssertionError("read token by token")
    monkeypatch.setattr(literal, "parse_literal", boom)


@pytest.mark.slow  # (hypothesis: 8-20 s under the suite's load)
@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1100, max_size=3000), st.text(max_size=40))
def test_pythons_repr_of_a_long_packet_is_read_at_c_speed(text, ref):
    """Python's repr of a packet, whatever its text holds (both quotes,
    backslashes, control characters, any script), is read as it was made,
    without the token parser, however long."""
    packet = {"message": text, "receiver": "bob", "ref": ref, "n": [1, 2.5, -3, True, None]}
    with pytest.MonkeyPatch.context() as mp:
        _never_token_by_token(mp)
        assert packets.read_literal(repr(packet)) == packet


def test_a_long_message_that_holds_json_is_read_at_c_speed(monkeypatch):
    """Strings that hold the other quote are found by a regex: a long one
    costs little (one string), and is read."""
    _never_token_by_token(monkeypatch)
    text = "{" + ",".join('"k%d":"v"' % i for i in range(2000)) + "}"
    line = repr({"message": text, "receiver": "bob"})
    assert line.startswith("{'message': '{\"k0\"")  # '...' holding "
    assert packets.read_literal(line)["message"] == text


@pytest.mark.parametrize("item", [b"\"'\"", b"007", b"[1, ]", b"(1,)"])
def test_the_costly_literal_forms_are_read_short_and_refused_long(item):
    """Strings holding the other quote more than one in 16 characters, a
    leading zero, a spaced trailing comma, a tuple: read token by token up
    to 1024 characters (the same value), refused beyond ("send JSON")."""
    short = b"{'ping': [" + item + b"]}"
    value = packets.parse_line(short).ping
    assert _same(value, literal.parse_literal(short.decode())["ping"])
    long = b"{'ping': [" + b",".join([item] * (2000 // len(item))) + b"]}"
    with pytest.raises(PacketError) as e:
        packets.parse_line(long)
    assert e.value.code == "bad_packet" and "send JSON" in e.value.reason
