"""
The seed's dict literals (``{'register':'true', 'sender':'0011001100'}``),
read at C speed: :func:`to_json` rewrites one as the JSON text of the same
value, with a few passes of compiled regular expressions, ``str`` methods
and C codecs over the whole line, and no Python per token (the token-by-token
parser, :func:`parse_literal`, costs about 1 µs a byte
sent: issue 23, item 3). The JSON is then decoded like any JSON line.

What it does not rewrite (tuples, and escapes outside JSON's and Python's
common ones) it leaves to that parser (:data:`SLOW`). It accepts and refuses
what that parser does; ``tests/test_fuzz.py`` checks both against Python's
``ast.literal_eval`` and each other.
"""

import re
from json.encoder import encode_basestring

from chatd.wire.parsing import MAX_DEPTH, _NOT_A_PACKET, PacketError, _finite_float

#: :func:`to_json` says: the literal is not one of the seed's (bad_packet)
REFUSE = "refuse"
#: :func:`to_json` says: leave this one to the token-by-token parser
SLOW = "slow"

#: a string token, in either quote (as the token parser reads them)
_STRING = re.compile(r"""('(?:[^'\\\n]|\\.)*+'|"(?:[^"\\\n]|\\.)*+")""", re.DOTALL)
#: what is left between the strings (each one a \x00): tokens only (runs
#: of punctuation and space, numbers, names), as the token parser reads them
_CODE = re.compile(r"""(?:[{}\[\]():,\x00\s]++
    |-?+(?:\d++(?:\.\d*+)?+|\.\d++)(?:[eE][+-]?+\d++)?+
    |True|False|None|true|false|null)*+""", re.VERBOSE)
#: the quick check (:func:`_plain`): what may be left of the code once its
#: names are blanked out and its dots checked
_PLAIN = str.maketrans("", "", "0123456789{}[]():, \t\n\r\x00")
_NAME_WORDS = ("True", "False", "None", "true", "false", "null")
#: a dot that no number token can take, or two dots that one might take
_ODD_DOT = re.compile(r"(?<!\d)\.(?!\d)|\.\d*\.")
#: an integer of more than 4000 characters (the token parser refuses those)
_HUGE_INT = re.compile(r"(?<![\w.+\-])(?:-\d{4000,}+|\d{4001,}+)(?![.eE])")
_TRAILING_COMMA = re.compile(r",(?=\s*+[}\]])")
#: zeros that lead a number (the literal starts with "{": never at 0)
_LEADING_ZEROS = re.compile(r"0(?<=[^\w.]0)0*(?=\d)")
_BARE_DOT_END = re.compile(r"\.(?!\d)")
_BARE_DOT_START = re.compile(r"\.(?<!\d\.)")
_ODD_SPACE = re.compile(r"[^\S \t\n\r]")
_ODD_ASCII_SPACE = b"\x0b\x0c\x1c\x1d\x1e\x1f"
_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_SPACE = b" \t\n\r"


#: every backslash escape one the unicode_escape codec reads as the token
#: parser does (anything else: SLOW)
_PLAIN_ESCAPES = re.compile(r"""(?:[^\\]++|\\(?:[\\'"nrtbfav\n]
    |x[0-9a-fA-F]{2}
    |u(?![dD][89a-fA-F])[0-9a-fA-F]{4}
    |U0000(?![dD][89a-fA-F])[0-9a-fA-F]{4}|U000[1-9a-fA-F][0-9a-fA-F]{4}|U0010[0-9a-fA-F]{4}
    |0(?![0-7])))*+""", re.VERBOSE)


_APART = "\ud800"


def _unescape(body):
    return body.encode("raw_unicode_escape").decode("unicode_escape")


def _plain(code):
    """True if the code (the literal between its strings) holds only what
    :data:`_CODE` reads as tokens, found at C speed: digits with at most a
    dot each, punctuation, ASCII space, string places and names (no sign,
    exponent or odd space). False means: ask :data:`_CODE` (a pass of the
    regex engine per token, about ten times the cost)."""
    c = code
    for name in _NAME_WORDS:
        if name in c:
            c = c.replace(name, " ")
    if "." in c:
        if _ODD_DOT.search(c):
            return False
        c = c.replace(".", "")
    return not c.translate(_PLAIN)


def to_json(text):
    """A dict literal (str) -> the JSON text of the same value, REFUSE (it is
    not a literal the token parser accepts) or SLOW (ask that parser)."""
    parts = _STRING.split(text)
    codes = parts[0::2]
    code = "\x00".join(codes)
    if "\x00" in "".join(codes) or not (_plain(code) or _CODE.fullmatch(code)):
        return REFUSE
    if "(" in code:
        return SLOW  # a tuple: the JSON would read a list
    if not code.isascii():
        code = _ODD_SPACE.sub(" ", code)  # what is left of it is space...
        if not code.isascii():
            return SLOW  # ...or digits of another script, which the token parser reads
    raw = code.encode("ascii")
    if len(raw.translate(None, _ODD_ASCII_SPACE)) != len(raw):
        code = _ODD_SPACE.sub(" ", code)
        raw = code.encode("ascii")
    tight = raw.translate(None, _SPACE)
    if b"[," in tight or b"{," in tight or b",," in tight or b":," in tight:
        return REFUSE  # a comma with no value before it
    if b"0" * 4000 in raw.translate(_DIGITS) and _HUGE_INT.search(code):
        return REFUSE
    if b",]" in tight or b",}" in tight:
        code = _TRAILING_COMMA.sub("", code)
    if "." in code:
        code = _BARE_DOT_START.sub("0.", _BARE_DOT_END.sub(".0", code))
    code = _LEADING_ZEROS.sub("", code)
    code = code.replace("True", "true").replace("False", "false").replace("None", "null")
    bodies = [s[1:-1] for s in parts[1::2]]
    if "\\" in text:
        if not _PLAIN_ESCAPES.fullmatch(text):
            return SLOW
        # all at once, each apart by a lone surrogate: no text holds one,
        # and no escape that is read here makes one
        bodies = _unescape(_APART.join(bodies)).split(_APART)
    out = parts
    out[0::2] = code.split("\x00")
    out[1::2] = map(encode_basestring, bodies)
    return "".join(out)


# -- the slow reader: token by token, for what the fast one cannot take ---------

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<punct>[{}\[\](),:])
    | (?P<str>'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")
    | (?P<num>-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<name>True|False|None|true|false|null)
    )""", re.VERBOSE | re.DOTALL)
_NAMES = {"True": True, "true": True, "False": False, "false": False,
          "None": None, "null": None}
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "r": "\r", "t": "\t",
            "b": "\b", "f": "\f", "0": "\0", "a": "\a", "v": "\v", "\n": ""}
_ESCAPE_RE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.DOTALL)


def parse_literal(text):
    """Parse a Python-literal-style dict the way the original spec wrote
    packets (``{'register':'true', 'sender':'0011001100'}``) without eval:
    strings in either quote, numbers, True/False/None, lists, tuples and dicts,
    nested at most :data:`MAX_DEPTH` deep. Raises PacketError bad_packet."""
    tokens = []
    pos, end = 0, len(text)
    while pos < end:
        m = _TOKEN.match(text, pos)
        if not m:
            if text[pos:].strip() == "":
                break
            raise PacketError("bad_packet", _NOT_A_PACKET)
        tokens.append(m)
        pos = m.end()
    if not tokens:
        raise PacketError("bad_packet", "empty packet")
    value, i = _literal_value(tokens, 0, 0)
    if i != len(tokens):
        raise PacketError("bad_packet", "unexpected text after the packet")
    return value


def _literal_value(tokens, i, depth):
    if i >= len(tokens):
        raise PacketError("bad_packet", "the packet ends too early")
    m = tokens[i]
    kind = m.lastgroup
    if kind == "str":
        return _unquote(m.group("str")), i + 1
    if kind == "num":
        s = m.group("num")
        if any(c in s for c in ".eE"):
            try:
                return _finite_float(s), i + 1
            except ValueError:
                raise PacketError("bad_packet", "a number in the packet is out of range") from None
        if len(s) > 4000:
            raise PacketError("bad_packet", "a number in the packet is too long")
        return int(s), i + 1
    if kind == "name":
        return _NAMES[m.group("name")], i + 1
    p = m.group("punct")
    if p not in "{[(":
        raise PacketError("bad_packet", "unexpected %r in the packet" % p)
    if depth >= MAX_DEPTH:
        raise PacketError("bad_packet", "the packet nests too deeply")
    close = {"{": "}", "[": "]", "(": ")"}[p]
    i += 1
    if p == "{":
        result = {}
    else:
        result = []
    while True:
        if i < len(tokens) and tokens[i].group("punct") == close:
            return (result if p != "(" else tuple(result)), i + 1
        if p == "{":
            key, i = _literal_value(tokens, i, depth + 1)
            if not isinstance(key, str):
                # as in JSON: anything accepted can be echoed back as JSON
                raise PacketError("bad_packet", "a dict key must be a string")
            if i >= len(tokens) or tokens[i].group("punct") != ":":
                raise PacketError("bad_packet", "expected ':' after a key")
            value, i = _literal_value(tokens, i + 1, depth + 1)
            result[key] = value
        else:
            value, i = _literal_value(tokens, i, depth + 1)
            result.append(value)
        if i < len(tokens) and tokens[i].group("punct") == ",":
            i += 1
        elif not (i < len(tokens) and tokens[i].group("punct") == close):
            raise PacketError("bad_packet", "expected ',' or %r" % close)


def _unquote(s):
    body = s[1:-1]
    if "\\" not in body:
        return body

    def esc(m):
        e = m.group(1)
        if e[0] in "xuU" and len(e) > 1:
            cp = int(e[1:], 16)
            if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
                # not a character (a surrogate cannot be UTF-8 text)
                raise PacketError("bad_packet", "bad escape in a string")
            return chr(cp)
        return _ESCAPES.get(e, "\\" + e)

    return _ESCAPE_RE.sub(esc, body)
