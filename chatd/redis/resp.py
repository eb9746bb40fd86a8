"""
RESP, the Redis wire format: one command encoded in a single pass. Shared by
the store client's connections (:mod:`chatd.redis.adapter`) and the
sentinels' short question connections (:mod:`chatd.redis.sentinel`).
"""


def _arg(value):
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return str(value).encode("ascii")


def encode_command(*args):
    """One command in RESP, in a single pass (txredisapi's encoder runs
    several type checks and a str.format per argument and per length)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if a.__class__ is not bytes:
            a = _arg(a)
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)
