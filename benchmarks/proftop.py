"""
The top functions by own time of a profile: ``py-spy record -f raw`` output
(collapsed stacks) or a cProfile/pstats file.

``python -m benchmarks.proftop PROFILE [-n 25]``

Profile chatd under the saturation scenario with::

    python -m benchmarks --only throughput --devices 1000 --servers chatd \\
        --chatd-prefix "py-spy record -r 200 -f raw -o chatd.raw --"
    python -m benchmarks.proftop chatd.raw
"""

import argparse
import collections
import re
import sys


_LINE = re.compile(r":\d+\)$")


def collapsed_top(path, n=25, lines=False):
    """(rows, total samples): rows of (own samples, share, function, inclusive).
    Frames are ``function (file:line)``; unless ``lines``, the lines of one
    function are added up."""
    own = collections.Counter()
    incl = collections.Counter()
    total = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            try:
                count = int(count)
            except ValueError:
                continue
            frames = stack.split(";")
            if not lines:
                frames = [_LINE.sub(")", fr) for fr in frames]
            total += count
            own[frames[-1]] += count
            for fr in set(frames):
                incl[fr] += count
    rows = [(c, c / float(total or 1), fn, incl[fn] / float(total or 1))
            for fn, c in own.most_common(n)]
    return rows, total


def pstats_top(path, n=25):
    import pstats
    st = pstats.Stats(path)
    total = st.total_tt
    items = []
    for (file, line, name), (cc, nc, tt, ct, callers) in st.stats.items():
        items.append((tt, nc, ct, "%s (%s:%d)" % (name, file, line)))
    items.sort(reverse=True)
    return items[:n], total


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.proftop")
    p.add_argument("profile")
    p.add_argument("-n", type=int, default=25)
    p.add_argument("--lines", action="store_true", help="py-spy: one row per line, not per function")
    args = p.parse_args(argv)
    try:
        import pstats
        pstats.Stats(args.profile)
        is_pstats = True
    except Exception:
        is_pstats = False
    if is_pstats:
        rows, total = pstats_top(args.profile, args.n)
        print("cProfile: %.2fs of own time in all" % total)
        print("%8s %6s %10s %8s  %s" % ("own s", "own %", "calls", "cum s", "function"))
        for tt, nc, ct, fn in rows:
            print("%8.3f %5.1f%% %10d %8.3f  %s" % (tt, 100 * tt / total, nc, ct, fn))
        return 0
    rows, total = collapsed_top(args.profile, args.n, args.lines)
    print("py-spy: %d samples" % total)
    print("%8s %6s %7s  %s" % ("own", "own %", "incl %", "function"))
    for c, share, fn, inc in rows:
        fn = re.sub(r"/[^ ()]*/(site-packages|lib/python3\.\d+)/", "", fn)
        fn = re.sub(r"/work/main/", "", fn)
        print("%8d %5.1f%% %6.1f%%  %s" % (c, 100 * share, 100 * inc, fn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
