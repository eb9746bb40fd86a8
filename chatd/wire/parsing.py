"""
What the two readers of client lines share (the codec, :mod:`chatd.wire.packets`,
and the dict-literal reader, :mod:`chatd.wire.literal`): the error of a line
that cannot be acted on (it becomes an ``error`` reply), the nesting bound,
the number check. Imports nothing.
"""

#: how deep a packet may nest (containers inside containers), JSON and
#: literal alike: whatever is accepted can be echoed back (a ``ping``) without
#: the encoder running out of stack
MAX_DEPTH = 32

_NOT_A_PACKET = "not a JSON object (nor a dict literal like {'ping': 'x'})"


def _finite_float(s):
    value = float(s)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


class PacketError(Exception):
    """A client line that cannot be acted on; becomes an ``error`` reply."""

    def __init__(self, code, reason, ref=None, field=None):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.ref = ref
        self.field = field
