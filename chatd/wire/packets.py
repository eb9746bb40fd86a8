"""
The wire format, as pure functions: one client line in, one validated
:class:`Packet` out (or a :class:`PacketError` carrying the contract's error
code); replies and pushes out as ready-to-write bytes.

No I/O and no Twisted here, so every rule of the contract's framing and
validation can be tested (and fuzzed) as plain function calls.
"""

import json
import re

import msgspec

from chatd.wire import literal
from chatd.wire.parsing import MAX_DEPTH, _NOT_A_PACKET, PacketError, _finite_float  # noqa: F401 (the codec's API)

#: a destinationId: 1-64 characters from A-Z a-z 0-9 _ . : @ + -
ID_RE = re.compile(r"[A-Za-z0-9_.:@+\-]{1,64}\Z")
#: the flag values that mean "yes" (the seed also sent 'True' and 't')
TRUE_FLAGS = ("true", True, "True", "t")
KINDS = ("register", "reconnect", "message", "ack", "ping", "read", "push")
#: a push registration's app id (1.2): 1-64 characters from A-Z a-z 0-9 _ . -
APP_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
#: the longest pushkey, in UTF-8 bytes
MAX_PUSHKEY = 4096
#: the longest ``ref`` a client may attach to a message
MAX_REF = 128
#: server ids are zero-padded decimals, so they sort the same as text and as numbers
ID_WIDTH = 16


class Packet:
    """One validated client packet.

    ``kind`` is one of :data:`KINDS`; the other attributes hold the fields the
    kind uses (None when absent). ``ack`` is the acked server id as an int;
    ``raw`` the message text as UTF-8. (A plain class with class-level
    defaults: every line becomes one, and this builds three times faster than
    a dataclass.)
    """

    sender = receiver = token = text = ref = proof = ack = ping = raw = None
    receipts = False  # register/reconnect: the device opts in (1.2)
    pushkey = app = None
    _FIELDS = ("kind", "sender", "receiver", "token", "text", "ref", "proof", "ack",
               "ping", "raw", "receipts", "pushkey", "app")

    def __init__(self, kind, **fields):
        self.kind = kind
        if fields:
            self.__dict__.update(fields)

    def __eq__(self, other):
        return isinstance(other, Packet) and all(
            getattr(self, f) == getattr(other, f) for f in self._FIELDS)

    def __repr__(self):
        return "Packet(%s)" % ", ".join(
            "%s=%r" % (f, getattr(self, f)) for f in self._FIELDS if getattr(self, f) is not None)


# -- decoding --------------------------------------------------------------------

def _no_constant(name):
    raise ValueError("%s is not JSON" % name)


#: JSON without NaN/Infinity, so that anything accepted can be echoed back as JSON
_decoder = json.JSONDecoder(parse_float=_finite_float, parse_constant=_no_constant)
_json_decode = _decoder.decode
#: the C scanner itself: decode() wraps it in two regex matches for leading
#: and trailing whitespace, a fifth of its cost on a short line
_scan_once = _decoder.scan_once


#: the fast path: msgspec decodes a JSON object from bytes (UTF-8 checked)
#: about 2.5x faster than the standard library. Every line it refuses (not
#: JSON, not UTF-8, lone surrogates, NaN or out-of-range numbers, too deep)
#: takes the standard library's path below, which gives the contract's
#: answer; what it accepts, it decodes to the same values (integers of any
#: size included).
_fast_decode = msgspec.json.Decoder().decode
#: what a line that is not JSON gets
#: the longest dict literal read token by token (:func:`parse_literal`): one
#: that is not in the form read at C speed (:mod:`chatd.wire.literal`)
SLOW_LITERAL_MAX = literal.SLOW_MAX


def decode_line(line):
    """bytes of one line (without ``\\n``) -> the client's object, a dict.

    Returns None for an empty line (to be ignored). Raises PacketError
    ``bad_packet`` for anything that is neither a JSON object nor a seed-style
    Python dict literal, or is not UTF-8.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    if line[:1] == b"{" and line[-1:] == b"}":
        try:
            obj = _fast_decode(line)
        except Exception:
            pass  # the slow path below says what is wrong, or takes it
        else:
            if obj.__class__ is dict:
                return _check_depth(obj, line)
    elif not line.strip():
        return None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise PacketError("bad_packet", "the line is not valid UTF-8") from None
    if text[-1:] == "}":
        try:
            obj, end = _scan_once(text, 0)
        except ValueError:
            # the scanner's error at 0 is decode()'s (it skips only leading
            # space): no second full pass to be told so again
            return _literal(text)
        except (StopIteration, RecursionError):
            pass  # the slow path below says what is wrong
        else:
            if end == len(text):
                # a JSON object starts with "{": always a dict
                return _check_depth(obj, text)
            return _literal(text)  # more after a JSON value: decode() says "extra data"
    try:
        obj = _check_depth(_json_decode(text), text)
    except RecursionError:
        raise PacketError("bad_packet", "the packet nests too deeply") from None
    except ValueError:
        return _literal(text)
    return _packet_object(obj)


def _literal(text):
    """Not JSON: the original spec wrote packets as Python dict literals."""
    return _packet_object(read_literal(text))


def _packet_object(obj):
    if not isinstance(obj, dict):
        raise PacketError("bad_packet", "a packet must be a JSON object, e.g. "
                          "{\"ping\": \"hello\"}")
    return obj


def read_literal(text):
    """A seed-style dict literal -> its value, as :func:`parse_literal`
    reads it, but at C speed (:func:`chatd.wire.literal.to_json`); the rare
    literal that cannot be (a tuple, an unusual escape, a number with a
    leading zero, a trailing comma with space after it) is read by
    :func:`parse_literal` if it is at most :data:`SLOW_LITERAL_MAX`
    characters, else refused (bad_packet)."""
    js = literal.to_json(text)
    if js is literal.REFUSE:
        raise PacketError("bad_packet", _NOT_A_PACKET)
    if js is literal.SLOW:
        if len(text) > SLOW_LITERAL_MAX:
            raise PacketError(
                "bad_packet", "a dict literal over %d characters may not hold a tuple, "
                "a number with a leading zero, a comma with space between it and a "
                "closing bracket, an escape other than \\\\ \\' \\\" \\n \\r \\t "
                "\\b \\f \\a \\v \\0 \\x \\u \\U, or more than one string in 16 "
                "characters when a string holds the other quote; send JSON"
                % SLOW_LITERAL_MAX)
        return literal.parse_literal(text)
    try:
        return _check_depth(_fast_decode(js), js)
    except RecursionError:
        raise PacketError("bad_packet", "the packet nests too deeply") from None
    except msgspec.DecodeError:
        pass  # the standard library's answer
    try:
        obj = _json_decode(js)
    except RecursionError:
        raise PacketError("bad_packet", "the packet nests too deeply") from None
    except ValueError:
        raise PacketError("bad_packet", _NOT_A_PACKET) from None
    return _check_depth(obj, js)


#: a JSON string, to be taken out of a line before its brackets are counted
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+"', re.DOTALL)
_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_ONE_KIND = bytes.maketrans(b"{}", b"[]")


def _check_depth(obj, data):
    """obj, decoded from the JSON ``data`` (bytes or str), unless it nests
    more than :data:`MAX_DEPTH` containers deep (PacketError). A line with
    fewer brackets than that cannot, which is every ordinary packet. For
    the others the brackets outside strings are paired off, innermost first,
    at C speed (walking the value cost 0.2 µs a byte for a line of lists)."""
    if data.__class__ is str:
        data = data.encode("utf-8", "surrogatepass")
    if data.count(b"{") + data.count(b"[") <= MAX_DEPTH:
        return obj
    # (decoded, so its brackets pair up: only their depth matters here)
    skeleton = _JSON_STRING.sub(b"", data).translate(_ONE_KIND, _BRACKETS)
    for _ in range(MAX_DEPTH):
        paired = skeleton.replace(b"[]", b"")
        if not paired:
            return obj
        if len(paired) == len(skeleton):
            break  # not JSON's brackets after all: cannot be
        skeleton = paired
    raise PacketError("bad_packet", "the packet nests more than %d deep" % MAX_DEPTH)


#: the commonest line of all, an ack as chatd's own ids look: no JSON needed
_PLAIN_ACK = re.compile(rb'\{"ack": ?"(\d{%d})"\}\r?\Z' % ID_WIDTH)


def parse_line(line, max_message=16384):
    """bytes of one line -> :class:`Packet`, None for an empty line, or
    raises :class:`PacketError`."""
    m = line.startswith(b'{"ack"') and _PLAIN_ACK.match(line)
    if m:
        packet = Packet("ack")
        packet.ack = int(m.group(1))
        return packet
    obj = decode_line(line)
    if obj is None:
        return None
    return validate(obj, max_message)


def validate(obj, max_message=16384):
    """A decoded client object -> :class:`Packet` (the contract's field rules)."""
    if "message" in obj and not (
            "register" in obj or "reconnect" in obj or "ack" in obj or "ping" in obj
            or "read" in obj):
        ref = obj.get("ref")  # the hot path: a message
        if ref is None or valid_ref(ref):
            return _validate_message(obj, ref, max_message)
    ref = obj.get("ref")
    ref_ok = ref is None or valid_ref(ref)
    kinds = [k for k in KINDS if k in obj]
    if len(kinds) != 1:
        raise PacketError(
            "unknown_packet",
            "a packet needs exactly one of register, reconnect, message, ack, ping, read, push"
            + (" (got %s)" % ", ".join(kinds) if kinds else ""),
            ref if ref_ok else None)
    kind = kinds[0]
    if not ref_ok:
        raise PacketError("bad_field", "field 'ref' must be a string of 1-%d "
                          "characters or an integer" % MAX_REF, None, "ref")
    if kind == "message":
        return _validate_message(obj, ref, max_message)
    if kind == "ack":
        value = obj["ack"]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise PacketError("bad_field", "field 'ack' must be a server id string",
                              ref, "ack")
        return Packet("ack", ack=_id_number(value), ref=ref)
    if kind == "ping":
        return Packet("ping", ping=obj["ping"], ref=ref)
    if kind == "read":
        return _validate_read(obj, ref)
    if kind == "push":
        return _validate_push(obj, ref)
    _check_flag(obj, kind, ref)
    sender = _required_id(obj, "sender", ref)
    receipts = _flag(obj.get("receipts"))
    if kind == "register":
        proof = obj.get("proof")
        if proof is not None and not _is_text(proof):
            raise PacketError("bad_field", "field 'proof' must be a string "
                              "\"<expiry>:<hex hmac>\"", ref, "proof")
        return Packet("register", sender=sender, proof=proof, ref=ref, receipts=receipts)
    token = _required_string(obj, "token", ref)
    return Packet("reconnect", sender=sender, token=token, ref=ref, receipts=receipts)


def _flag(value):
    """A flag's value (as ``register``'s): True for the values of yes."""
    return value in TRUE_FLAGS and (value is True or isinstance(value, str))


def _validate_read(obj, ref):
    """``{"read": "<server id>", "from": "<destinationId>"}`` (1.2)."""
    value = obj["read"]
    if not isinstance(value, str) or _id_number(value) < 0:
        raise PacketError("bad_field", "field 'read' must be a server id string",
                          ref, "read")
    sender = _required_id(obj, "from", ref)
    return Packet("read", ack=_id_number(value), sender=sender, ref=ref)


def _validate_message(obj, ref, max_message):
    text = obj["message"]
    if not isinstance(text, str):
        raise PacketError("bad_field", "field 'message' must be a string", ref, "message")
    receiver = obj.get("receiver")
    if receiver.__class__ is not str or not ID_RE.match(receiver):
        receiver = _required_id(obj, "receiver", ref)
    sender = obj.get("sender")
    if sender is not None:
        sender = _optional_id(obj, "sender", ref)
    token = obj.get("token")
    if token is not None and not _is_text(token):
        raise PacketError("bad_field", "field 'token' must be a string", ref, "token")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise PacketError("bad_field", "field 'message' is not valid Unicode "
                          "(lone surrogate)", ref, "message") from None
    if len(raw) > max_message:
        raise PacketError("message_too_long", "the message text is %d bytes of "
                          "UTF-8; the limit is %d" % (len(raw), max_message), ref)
    if 3 * len(raw) > max_message:  # escaping 6x could pass 2 x max_message
        stored = stored_size(raw)
        if stored > 2 * max_message:
            raise PacketError(
                "message_too_long", "the message text is %d bytes as stored (JSON, "
                "where a control character takes 6 bytes and a quote or backslash "
                "2); the limit is %d (twice the %d bytes of UTF-8 allowed)"
                % (stored, 2 * max_message, max_message), ref)
    packet = Packet("message")
    packet.receiver, packet.text, packet.raw = receiver, text, raw
    if sender is not None:
        packet.sender = sender
    if token is not None:
        packet.token = token
    if ref is not None:
        packet.ref = ref
    return packet


def _validate_push(obj, ref):
    """``{"push": "<pushkey>", "app": "<app id>"}``; ``{"push": ""}`` removes."""
    pushkey = obj["push"]
    if not _is_text(pushkey) or len(pushkey.encode("utf-8")) > MAX_PUSHKEY:
        raise PacketError("bad_field", "field 'push' must be a pushkey string of "
                          "1-%d bytes (\"\" removes the registration)" % MAX_PUSHKEY,
                          ref, "push")
    if pushkey == "":
        return Packet("push", pushkey="", ref=ref)
    app = obj.get("app")
    if app is None:
        raise PacketError("missing_field", "field 'app' is required", ref, "app")
    if not isinstance(app, str) or not APP_RE.match(app):
        raise PacketError("bad_field", "field 'app' must be an app id of 1-64 "
                          "characters from A-Z a-z 0-9 _ . -", ref, "app")
    return Packet("push", pushkey=pushkey, app=app, ref=ref)


#: the characters that JSON (the stored message) escapes in 6 bytes
#: (``\\u0001``), and those it escapes in 2 (``\\n``, ``\\"``)
_LONG_ESCAPED = bytes(c for c in range(32) if c not in b"\b\f\n\r\t")
_SHORT_ESCAPED = b'"\\\b\f\n\r\t'


def stored_size(raw):
    """The bytes the message text ``raw`` (UTF-8) takes JSON-escaped in a
    stored message (:func:`chatd.store.layout.push_tail`), without its
    quotes: C-speed counting, no encoding."""
    size = len(raw)
    long_ = size - len(raw.translate(None, _LONG_ESCAPED))
    short = size - len(raw.translate(None, _SHORT_ESCAPED))
    return size + 5 * long_ + short


def valid_ref(ref):
    if isinstance(ref, bool):
        return False
    if isinstance(ref, int):
        return -(2 ** 63) <= ref < 2 ** 63
    if isinstance(ref, str):
        if not 0 < len(ref) <= MAX_REF:
            return False
        try:
            ref.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    return False


def _check_flag(obj, kind, ref):
    value = obj[kind]
    if value not in TRUE_FLAGS or isinstance(value, (int, float)) and value is not True:
        raise PacketError("bad_field", "field %r must be \"true\"" % kind, ref, kind)


def _required_string(obj, name, ref):
    value = obj.get(name)
    if value is None:
        raise PacketError("missing_field", "field %r is required" % name, ref, name)
    if not value or not _is_text(value):
        raise PacketError("bad_field", "field %r must be a non-empty string" % name,
                          ref, name)
    return value


def _is_text(value):
    """A str that is valid Unicode (JSON's "\\ud800" escapes give lone
    surrogates, which cannot be written back as UTF-8)."""
    if not isinstance(value, str):
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _required_id(obj, name, ref):
    if obj.get(name) is None:
        raise PacketError("missing_field", "field %r is required" % name, ref, name)
    return _optional_id(obj, name, ref)


def _optional_id(obj, name, ref):
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not ID_RE.match(value):
        raise PacketError(
            "bad_field", "field %r must be an id of 1-64 characters from "
            "A-Z a-z 0-9 _ . : @ + -" % name, ref, name)
    return value


def _id_number(value):
    """A server id as the client sent it back -> int, or -1 if it cannot be one."""
    if isinstance(value, int):
        return value if value >= 0 else -1
    if value.isascii() and value.isdigit() and len(value) <= ID_WIDTH:
        return int(value)
    return -1


# -- the seed's Python dict literals -----------------------------------------------

# -- encoding ---------------------------------------------------------------------

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False).encode


#: the same JSON as :data:`_dumps` at several times the speed (a pong echoes
#: whatever a client sent: encoding a 60 KB ping cost more than reading it);
#: only a float's exponent is written otherwise (``1e16``, not ``1e+16``;
#: ``0.00001``, not ``1e-05``): the same number to any JSON reader
_fast_encode = msgspec.json.Encoder().encode


def reply(obj):
    """A server line: one compact JSON object and the newline."""
    try:
        return _fast_encode(obj) + b"\n"
    except UnicodeEncodeError:
        # a lone surrogate echoed from a client's ping: keep it escaped
        return (json.dumps(obj, separators=(",", ":")) + "\n").encode("ascii")


def accepted(server_id, receiver, ref):
    """The ``accepted`` reply (the hot path: formatted, not JSON-encoded)."""
    return b'{"type":"accepted","id":"%s","receiver":"%s","ref":%s}\n' % (
        server_id.encode("ascii"), receiver.encode("ascii"),
        b"null" if ref is None else _dumps(ref).encode("utf-8"))


def error(code, reason, ref=None, field=None, retry_after_ms=None):
    obj = {"type": "error", "code": code, "reason": reason, "ref": ref}
    if field is not None:
        obj["field"] = field
    if retry_after_ms is not None:
        obj["retry_after_ms"] = retry_after_ms
    return reply(obj)


def error_from(exc):
    return error(exc.code, exc.reason, exc.ref, exc.field)


def format_id(n):
    """int -> the server id string (fixed width: sorts as text and as a number)."""
    return "%0*d" % (ID_WIDTH, n)
