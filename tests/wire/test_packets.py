"""The pure packet module: framing, both syntaxes, validation, encoding."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.wire import literal, packets
from chatd.wire.packets import PacketError, parse_line


def code_of(line, **kw):
    try:
        parse_line(line, **kw)
    except PacketError as e:
        return e.code
    return None


def test_seed_packets_parse_like_json():
    seed = [
        b"{'register':'true', 'sender':'0011001100'}",
        b"{'reconnect':'true', 'token':'ln8lha1i20', 'sender':'0011001100'}",
        b"{'message':'Kya Bhai?', 'sender':'0011001100', 'receiver':'987654321', "
        b"'token':'ln8lha1i20'}",
    ]
    for line in seed:
        as_json = line.replace(b"'", b'"')
        assert parse_line(line) == parse_line(as_json)


def test_literal_syntax_details():
    assert literal.parse_literal("{'a': 'it\\'s', \"b\": [1, 2.5, (3,)], 'c': None, 'd': True,}") \
        == {"a": "it's", "b": [1, 2.5, (3,)], "c": None, "d": True}
    assert literal.parse_literal(r"{'u': '\u00e9\x41\n'}") == {"u": "éA\n"}
    for bad in ["{'a': b'x'}", "{'a': 1 + 2}", "{'a': f(1)}", "{'a' 1}", "{'a': 1", "{[1]: 2}",
                "{'a': 1} trailing", "{'a': '\\U99999999'}", "{'a': 1e999}",
                "{'ping': {(1, 2): 3}}", "{'ping': {(1, [2]): 3}}", "{1: 2}"]:
        with pytest.raises(PacketError) as e:
            literal.parse_literal(bad)
        assert e.value.code == "bad_packet"


def test_cr_and_blank_lines():
    assert parse_line(b"") is None
    assert parse_line(b"\r") is None
    assert parse_line(b"   \t ") is None
    assert parse_line(b'{"ping":"x"}\r').ping == "x"


def test_nesting_is_bounded():
    assert code_of(b"{'a':" * 20000) == "bad_packet"
    assert code_of(b'{"a":' * 20000) == "bad_packet"
    assert code_of(b"[" * 20000 + b"]" * 20000) == "bad_packet"
    deep_ok = b"{'ping': " + b"[" * 30 + b"]" * 30 + b"}"
    assert parse_line(deep_ok).kind == "ping"


def test_huge_numbers_and_constants():
    assert code_of(b'{"ping": ' + b"9" * 5000 + b"}") == "bad_packet"
    assert code_of(b'{"ping": NaN}') == "bad_packet"
    assert code_of(b'{"ping": -Infinity}') == "bad_packet"
    assert code_of(b'{"ping": 1e400}') == "bad_packet"
    assert parse_line(b'{"ping": 1e300}').ping == 1e300


def test_numbers_keep_their_exact_value():
    """Whichever decoder takes a line, integers stay integers of any size
    (orjson, say, would make the first a float)."""
    big = 123456789012345678901234567890
    assert parse_line(b'{"ping": %d}' % big).ping == big
    assert parse_line(b'{"ping": %d}' % -big).ping == -big
    assert code_of(b'{"message":"x","receiver":"b","ref":9223372036854775808}') == "bad_field"
    assert parse_line(b'{"message":"x","receiver":"b","ref":-9223372036854775808}').ref == -2 ** 63


def test_validation_codes():
    assert code_of(b'{"message":"x","receiver":"b","ref":""}') == "bad_field"
    assert code_of(b'{"message":"x","receiver":"b","ref":true}') == "bad_field"
    assert code_of(b'{"message":"x","receiver":"b","ref":"' + b"r" * 129 + b'"}') == "bad_field"
    assert code_of(b'{"message":"\\ud800","receiver":"b"}') == "bad_field"
    assert code_of(b'{"register":1,"sender":"a"}') == "bad_field"
    assert code_of(b'{"register":"true","sender":"a","proof":5}') == "bad_field"
    assert code_of(b'{"message":"x","receiver":"b","sender":""}') == "bad_field"
    assert code_of(b'{"message":"xx","receiver":"b"}', max_message=1) == "message_too_long"
    for good in ["a", "0011001100", "A_b.c:d@e+f-g", "x" * 64]:
        assert parse_line(json.dumps({"register": "true", "sender": good}).encode()).sender == good


def test_ack_values():
    assert parse_line(b'{"ack":"0000000000000012"}').ack == 12
    assert parse_line(b'{"ack":12}').ack == 12
    assert parse_line(b'{"ack":"12x"}').ack == -1
    assert parse_line(b'{"ack":"\xd9\xa1"}').ack == -1  # a non-ASCII digit
    assert parse_line(b'{"ack":-3}').ack == -1
    assert code_of(b'{"ack":true}') == "bad_field"


def test_reply_encoding():
    assert packets.reply({"type": "pong", "ping": "é"}) == '{"type":"pong","ping":"é"}\n'.encode()
    assert packets.reply({"type": "pong", "ping": "\ud800"}) == b'{"type":"pong","ping":"\\ud800"}\n'
    e = json.loads(packets.error("bad_field", "why", None, "sender"))
    assert e == {"type": "error", "code": "bad_field", "reason": "why", "ref": None,
                 "field": "sender"}


ERROR_CODES = {"bad_packet", "unknown_packet", "missing_field", "bad_field", "message_too_long"}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_fail_cleanly(data):
    line = data.replace(b"\n", b"")
    try:
        p = parse_line(line)
    except PacketError as e:
        assert e.code in ERROR_CODES
    else:
        assert p is None or p.kind in packets.KINDS


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                          max_size=4),
    max_leaves=20)


@pytest.mark.slow  # (hypothesis: 8-20 s under the suite's load)
@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["register", "reconnect", "message", "ack", "ping",
                                        "sender", "receiver", "token", "ref", "proof", "x"]),
                       json_values, max_size=6))
def test_any_json_object_parses_or_fails_cleanly_and_echoes(obj):
    line = json.dumps(obj).encode()
    try:
        p = parse_line(line)
    except PacketError as e:
        assert e.code in ERROR_CODES
        packets.error_from(e)  # always encodable
        return
    if p.kind == "ping":
        echoed = json.loads(packets.reply({"type": "pong", "ping": p.ping}))
        assert echoed["ping"] == obj["ping"]
    if p.kind == "message":
        assert p.text == obj["message"] and p.receiver == obj["receiver"]


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=50))
def test_literal_strings_round_trip(text):
    """Python's own repr of any string reads back as the same string."""
    assert parse_line(("{'ping': %r}" % text).encode("utf-8")).ping == text
