"""
chatd's Lua, as one Valkey/Redis function library.

The atomic steps of the store are the files ``chatd/store/lua/<name>.lua``
(after the shared ``_prelude.lua``), each the body of a function
``chatd_<v>_<name>``. ``<v>`` is a hash of the whole source: nodes of two
versions (a rolling upgrade) share a store without replacing each other's
code. The constants of the store's layout that the Lua needs (key suffixes,
the id's place in a stored line) are written into the prelude from
:mod:`chatd.store.layout`, their one home.

The Redis layer loads :attr:`Library.source` on every connection and calls
the functions by name (:meth:`chatd.redis.client.RedisClient.script`); it
knows nothing else about them.
"""

import hashlib
import os
import re

from chatd.store import layout

LUA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lua")

#: a line ``-- flag: allow-oom`` in a script's text gives its function that
#: flag. A function without it is refused up front (whole, before it runs)
#: while the store is over its ``maxmemory``; only the steps that just read
#: or delete (fetch, ack) have it, so that a full store can still drain.
_FLAGS = re.compile(rb"^-- flag: ([a-z-]+)", re.M)


class Library:
    """chatd's Lua as one function library: ``_prelude.lua`` once, then each
    ``chatd/store/lua/<name>.lua`` as the body of a function ``chatd_<v>_<name>``
    (its KEYS and ARGV are the function's arguments, so a body reads as a
    script). ``<v>`` is a hash of the whole source: nodes of two versions
    (a rolling upgrade) share a store without replacing each other's code."""

    def __init__(self, lua_dir=LUA_DIR):
        names = sorted(f[:-4] for f in os.listdir(lua_dir)
                       if f.endswith(".lua") and not f.startswith("_"))
        bodies = [(n, _read_lua(lua_dir, n)) for n in names]
        prelude = layout.lua_constants() + _read_lua(lua_dir, "_prelude")
        version = hashlib.sha1(prelude + b"".join(b for _, b in bodies)).hexdigest()[:12]
        self.name = "chatd_" + version
        parts = [b"#!lua name=%s\n" % self.name.encode(), prelude]
        self.functions = {}
        for n, body in bodies:
            fname = ("%s_%s" % (self.name, n)).encode("ascii")
            self.functions[n] = fname
            flags = b", ".join(b"'%s'" % f for f in _FLAGS.findall(body))
            parts.append(b"\nlocal function %s(KEYS, ARGV)\n%s\nend\n"
                         b"redis.register_function{function_name='%s', callback=%s, "
                         b"flags={%s}}\n" % (n.encode(), body, fname, n.encode(), flags))
        self.source = b"".join(parts)
        self._bodies = dict(bodies)

    def body(self, name):
        """The text of one step, to run as a script (``EVAL``) by a client
        that does not load the library (chatd-admin): a body that needs
        nothing of the prelude."""
        return self._bodies[name]


def _read_lua(lua_dir, name):
    with open(os.path.join(lua_dir, name + ".lua"), "rb") as f:
        return f.read()


