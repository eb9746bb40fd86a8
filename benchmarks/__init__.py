"""
chatd's benchmark suite: a multi-process Twisted load generator speaking the
raw line protocol, a bare relay (the same-run ceiling), and the scenarios
that compare them. Run ``python -m benchmarks`` (see README.rst).
"""
