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
#: the longest literal that parser reads (it costs about 1 us a character);
#: a longer one it would have to read is refused: "send JSON"
SLOW_MAX = 1024

#: a string token, in either quote (as the token parser reads them): the
#: quote, then the body (the split keeps both: no Python per string)
_STRING = re.compile(r"""(['"])((?:(?!\1)[^\\\n]|\\.)*+)\1""", re.DOTALL)
#: the shape check (:func:`_tokens_only`): digits to 0, E to e, every
#: separator (punctuation, space of any ASCII kind, a string's place) to a
#: space; the rest (names, dots, signs, anything else) kept
_SEPARATORS = b"{}[]():,\x00 \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
_SHAPE = bytes.maketrans(b"0123456789E" + _SEPARATORS, b"0" * 10 + b"e" + b" " * len(_SEPARATORS))
_NAME_WORDS = (b"True", b"False", b"None", b"true", b"false", b"null")
#: an integer of more than 4000 characters (the token parser refuses those)
_HUGE_INT = re.compile(r"(?<![\w.+\-])(?:-\d{4000,}+|\d{4001,}+)(?![.eE])")
#: a number with a leading zero shows as one of these (:func:`_odd_zeros`)
_ZERO_SHAPE = bytes.maketrans(b"123456789{}[]():,\x00\t\n\r", b"1" * 9 + b" " * 12)
_LEADING_ZEROS = (b" 00", b" 01", b"-00", b"-01")
#: what may stand right after a number's last dot, or right before its
#: first, other than a digit (anything else is refused later, as JSON)
_AFTER_DOT = ",]}):\x00 \t\reE"
_BEFORE_DOT = ",[{(:\x00 \t\r-"
_ODD_ASCII_SPACE = "\x0b\x0c\x1c\x1d\x1e\x1f"
_ODD_ASCII_TO_SPACE = str.maketrans(_ODD_ASCII_SPACE, " " * len(_ODD_ASCII_SPACE))
_ODD_ASCII_BYTES = _ODD_ASCII_SPACE.encode("ascii")
#: the space the token parser reads (``\s``) beyond ASCII's, to a space
_UNICODE_SPACE = {c: " " for c in range(128, 0x3001) if chr(c).isspace()}
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


def _tokens_only(code):
    """True if the code (the literal between its strings, as ASCII bytes,
    each string's place a \\x00) is a run of the token parser's tokens:
    punctuation, space, names and numbers (``-?(\\d+(\\.\\d*)?|\\.\\d+)
    ([eE][+-]?\\d+)?``). Found with ``bytes`` methods over the whole code, a
    dozen passes at C speed and none per token: the numbers are reduced to
    their shape (every run of digits one 0) and each valid shape then to a
    single 0. Where two tokens of a valid literal cannot stand together (two
    numbers, a number and a name), it may say True or False: the token
    parser refuses those anyway, and so does JSON after :func:`to_json`."""
    c = code
    for name in _NAME_WORDS:
        if name in c:
            c = c.replace(name, b" ")
    c = c.translate(_SHAPE)
    while b"00" in c:
        c = c.replace(b"00", b"0")
    if b"e" in c:
        c = c.replace(b"e+0", b"e0").replace(b"e-0", b"e0")
    if b"-" in c:
        c = c.replace(b"-0", b"0").replace(b"-.0", b".0")
    if b"e" in c:
        c = c.replace(b"0.e0", b"0").replace(b"0e0", b"0")
        if b"e" in c:
            return False
    if b"." in c:
        if b".." in c or b".0." in c:
            return False
        c = c.replace(b"0.0", b"0").replace(b"0.", b"0").replace(b".0", b"0")
    return not c.translate(None, b"0 ")


#: the escapes that hold a quote or a backslash, and the same characters as
#: \\x escapes (the token parser and the unicode_escape codec read both
#: alike): with these written so, no quote left in a line is escaped
_ESCAPED = (("\\\\", "\\x5c"), ("\\'", "\\x27"), ('\\"', "\\x22"))
_QUOTES_ONLY = bytes(c for c in range(256) if c not in b"'\"")


def _split(text):
    """text -> (codes, bodies): the literal between its strings, and each
    string's body (escapes as written), or None (a string is not closed)."""
    if "\n" not in text:
        # With the escapes of quotes and backslashes written as \x escapes,
        # the quotes that are left all open or close a string. If they pair
        # off in order, each with the next one, and each pair is of one
        # kind, then the pairs are the strings (an opening quote is closed
        # by the next quote of its kind, and there is none in between):
        # str.split finds them at C speed. (Not so for a string that holds
        # the other quote, "it's": the regex below.)
        t = text
        if "\\" in t:
            for esc, same in _ESCAPED:
                if esc in t:
                    t = t.replace(esc, same)
        q = t.encode("utf-8", "surrogatepass").translate(None, _QUOTES_ONLY)
        if len(q) == 1:
            return None
        if len(q) % 2 == 0 and q[0::2] == q[1::2]:
            parts = t.replace('"', "'").split("'") if b'"' in q else t.split("'")
            return parts[0::2], parts[1::2]
    # the regex costs about 0.2 us a string: a long line of tiny strings
    # would cost more than 0.1 us a byte; past SLOW_MAX characters, one
    # string in 16 characters is read (a split stops there: maxsplit)
    most = len(text) // 16 if len(text) > SLOW_MAX else 0
    parts = _STRING.split(text, most)
    if most and len(parts) > 3 * most and ("'" in parts[-1] or '"' in parts[-1]):
        return SLOW
    return parts[0::3], parts[2::3]


def to_json(text):
    """A dict literal (str) -> the JSON text of the same value, REFUSE (it is
    not a literal the token parser accepts) or SLOW (ask that parser)."""
    split = _split(text)
    if split is None:
        return REFUSE
    if split is SLOW:
        return SLOW
    codes, bodies = split
    code = "\x00".join(codes)
    if code.count("\x00") != len(codes) - 1:
        return REFUSE  # a NUL outside the strings
    if not code.isascii():
        code = code.translate(_UNICODE_SPACE)  # what is left of it is space...
        if not code.isascii():
            return SLOW  # ...or digits of another script, which the token parser reads
    raw = code.encode("ascii")
    if not _tokens_only(raw):
        return REFUSE
    if "(" in code:
        return SLOW  # a tuple: the JSON would read a list
    if len(raw.translate(None, _ODD_ASCII_BYTES)) != len(raw):
        code = code.translate(_ODD_ASCII_TO_SPACE)
        raw = code.encode("ascii")
    tight = raw.translate(None, _SPACE)
    if b"[," in tight or b"{," in tight or b",," in tight or b":," in tight:
        return REFUSE  # a comma with no value before it
    if b"0" * 4000 in raw.translate(_DIGITS) and _HUGE_INT.search(code):
        return REFUSE
    if b",]" in tight or b",}" in tight:
        code = code.replace(",]", "]").replace(",}", "}")
        tight = code.encode("ascii").translate(None, _SPACE)
        if b",]" in tight or b",}" in tight:
            return SLOW  # a trailing comma with space after it
    if "." in code:
        # a dot with no digit after it, or none before it: JSON wants one
        for c in _AFTER_DOT:
            if "." + c in code:
                code = code.replace("." + c, ".0" + c)
        for c in _BEFORE_DOT:
            if c + "." in code:
                code = code.replace(c + ".", c + "0.")
    if "0" in code:
        z = code.encode("ascii").translate(_ZERO_SHAPE)
        if any(lead in z for lead in _LEADING_ZEROS):
            return SLOW  # a number with a leading zero (Python 3 has none)
    if "e" in code:  # (each of True, False, None has one)
        code = code.replace("True", "true").replace("False", "false").replace("None", "null")
    if "\\" in text:
        if not _PLAIN_ESCAPES.fullmatch(text):
            return SLOW
        # all at once, each apart by a lone surrogate: no text holds one,
        # and no escape that is read here makes one
        bodies = _unescape(_APART.join(bodies)).split(_APART)
    out = code.split("\x00")
    # every body JSON-escaped at once (the lone surrogate passes as it is)
    escaped = encode_basestring(_APART.join(bodies))[1:-1].split(_APART)
    both = [None] * (len(out) + len(escaped))
    both[0::2] = out
    both[1::2] = escaped
    return '"'.join(both)


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
