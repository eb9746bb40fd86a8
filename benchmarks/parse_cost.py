"""
What one client line costs the server to read, per byte sent: the worst
lines we know of (issue 23, item 3), each timed with ``time.process_time``
around :func:`chatd.wire.packets.parse_line` and the reply it gets (a
``pong`` is encoded, an error is formatted), as the session does.

Run: ``python -m benchmarks.parse_cost`` (a few seconds). It prints, per
line, its size, the CPU it costs (the best of 11 rounds over the whole list), the CPU per byte sent and per
rate-limit token the line is charged. The target is at most 0.1 µs a byte
for every line over 1024 bytes. The few literal forms read token by token
(about 1-2 µs a byte: docs/protocol.rst) are refused beyond 1024 bytes, so
such a line costs at most a couple of ms; the check is that it costs no
more per rate token than the largest line read at C speed.
"""

import sys
import time

from chatd.wire import packets, ratelimit
from chatd.wire.packets import SLOW_LITERAL_MAX

N = 60_000  # about the largest line under the default --max-line (64 KiB)
#: rounds of the whole list; each line's best is kept
ROUNDS = 11


def _fill(head, item, sep, tail):
    count = (N - len(head) - len(tail)) // (len(item) + len(sep))
    return head + sep.join([item] * count) + tail


def lines():
    """(name, bytes) of the lines to time."""
    yield "literal {'ping':[1,1,...]}", _fill(b"{'ping':[", b"1", b",", b"]}")
    yield "literal nested [[1],[1],...]", _fill(b"{'ping':[", b"[1]", b",", b"]}")
    yield "literal empty lists [[],...]", _fill(b"{'ping':[", b"[]", b",", b"]}")
    yield "literal tuples [(1,),...]", _fill(b"{'ping':[", b"(1,)", b",", b"]}")
    yield "literal short strings ['a',...]", _fill(b"{'ping':[", b"'a'", b",", b"]}")
    yield "literal empty strings ['',...]", _fill(b"{'ping':[", b"''", b",", b"]}")
    yield "literal mixed quotes ['',\"\",...]", _fill(b"{'ping':[", b"'',\"\"", b",", b"]}")
    yield "literal quotes inside [\"'\",...]", _fill(b"{'ping':[", b"\"'\"", b",", b"]}")
    yield "literal quotes inside, 1 in 16", _fill(b"{'ping':[", b"\"'\",0,0,0,0,0", b",", b"]}")
    yield "literal escaped quotes ['\\'',...]", _fill(b"{'ping':[", b"'\\''", b",", b"]}")
    yield "literal escapes '\\n\\n...'", _fill(b"{'ping':'", b"\\n", b"", b"'}")
    yield "literal escapes ['\\x01',...]", _fill(b"{'ping':[", b"'\\x01'", b",", b"]}")
    yield "literal odd numbers [01,.5,...]", _fill(b"{'ping':[", b"01,.5", b",", b"]}")
    yield "literal names [None,True,...]", _fill(b"{'ping':[", b"None,True", b",", b"]}")
    yield "literal dicts [{},...]", _fill(b"{'ping':[", b"{}", b",", b"]}")
    yield "literal message 'x'*60000", _fill(b"{'message':'", b"x", b"", b"','receiver':'a'}")
    yield "literal bad at the end", _fill(b"{'ping':[", b"1", b",", b"]x}")
    yield "json {\"ping\":[1,1,...]}", _fill(b'{"ping":[', b"1", b",", b"]}")
    yield "json nested [[1],...]", _fill(b'{"ping":[', b"[1]", b",", b"]}")
    yield "json empty lists [[],...]", _fill(b'{"ping":[', b"[]", b",", b"]}")
    yield "json dicts [{},...]", _fill(b'{"ping":[', b"{}", b",", b"]}")
    yield "json short strings", _fill(b'{"ping":[', b'"a"', b",", b"]}")
    yield "json control chars \\u0001", _fill(b'{"ping":"', b"\\u0001", b"", b'"}')
    yield "json raw control bytes", _fill(b'{"ping":"', b"\x01", b"", b'"}')
    yield "json lone surrogates", _fill(b'{"ping":"', b"\\ud800", b"", b'"}')
    yield "json bad at the end", _fill(b'{"ping":[', b"1", b",", b"]x}")
    yield "junk (not a packet)", b"x" * N
    # the longest literals read token by token (longer ones are refused)
    yield "short literal tuples [(1,),...]", b"{'ping':[" + b",".join([b"(1,)"] * 202) + b"]}"
    yield "short literal zeros [01,...]", b"{'ping':[" + b",".join([b"01"] * 338) + b"]}"


def cost(line, repeat=1):
    """Best CPU seconds of reading ``line`` and making its reply."""
    best = None
    for _ in range(repeat):
        t0 = time.process_time()
        try:
            p = packets.parse_line(line)
            if p is not None and p.kind == "ping":
                packets.reply({"type": "pong", "ping": p.ping})
        except packets.PacketError as e:
            packets.error_from(e)
        t = time.process_time() - t0
        best = t if best is None else min(best, t)
    return best


def costs(named, rounds=ROUNDS):
    """{name: best CPU seconds} over ``rounds`` rounds, each timing every
    line once: a slow spell of the machine (a shared VM has them, tens of
    ms long) then costs one repeat of a few lines, not every repeat of one."""
    best = {}
    for _ in range(rounds):
        for name, line in named:
            t = cost(line)
            best[name] = min(best.get(name, t), t)
    return best


def main():
    print("%-34s %7s %10s %9s %9s" % ("line", "bytes", "CPU ms", "µs/byte", "ms/token"))
    worst = worst_token = worst_short = 0.0
    named = list(lines())
    best = costs(named)
    for name, line in named:
        t = best[name]
        per_byte = t * 1e6 / len(line)
        per_token = t * 1e3 / ratelimit.cost(len(line))
        if len(line) > SLOW_LITERAL_MAX:
            worst = max(worst, per_byte)
            worst_token = max(worst_token, per_token)
        else:
            worst_short = max(worst_short, per_token)
        print("%-34s %7d %10.2f %9.3f %9.2f" % (name, len(line), t * 1e3, per_byte, per_token))
    print("worst line over %d bytes: %.3f µs/byte (target 0.1), %.2f ms a rate token"
          % (SLOW_LITERAL_MAX, worst, worst_token))
    print("worst line of at most %d bytes (read token by token): %.2f ms a rate token"
          % (SLOW_LITERAL_MAX, worst_short))
    return 0 if worst <= 0.1 and worst_short <= worst_token else 1


if __name__ == "__main__":
    sys.exit(main())
