"""
The architecture, checked: chatd's imports go one way.

Every ``import``/``from ... import`` of a chatd module is read from the
source (with the ``ast`` module, so imports inside functions count too), and

* the module graph has no cycle;
* no package imports a package above it: the packet codec
  (``chatd.wire.packets``), ``chatd.errors`` and ``chatd.netio`` import
  nothing of chatd; the Redis layer knows neither the store nor the hub nor
  the sessions; the store knows no hub and no sessions; the hub knows no
  sessions (it may use the pure codec); the process shell (``chatd.app``)
  is the top.
"""

import ast
import os

import chatd

ROOT = os.path.dirname(os.path.abspath(chatd.__file__))

#: each layer and what it may import (itself always; ``chatd.wire.packets``
#: with the literal reader it uses, ``chatd.errors`` and ``chatd.netio`` are
#: the bottom, importable by all)
BOTTOM = {"chatd.wire.packets", "chatd.wire.literal", "chatd.wire.parsing", "chatd.errors",
          "chatd.netio"}
MAY_IMPORT = {
    "chatd.redis": set(),
    "chatd.store": {"chatd.redis"},
    "chatd.hub": {"chatd.store"},
    "chatd.wire": set(),  # sessions are handed the hub; they import none of it
    # push wake-ups: the hub hands them work through its pusher, never imports them
    "chatd.push": {"chatd.redis", "chatd.store"},
    "chatd.ops": {"chatd.redis", "chatd.store", "chatd.hub", "chatd.wire", "chatd.app",
                  "chatd.push"},
    "chatd.client": set(),
    "chatd.app": {"chatd.redis", "chatd.store", "chatd.hub", "chatd.wire", "chatd.ops",
                  "chatd.push"},
}


def _modules():
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(path, modules):
    """Every chatd module a file imports, anywhere in it."""
    found = set()
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + ["%s.%s" % (node.module, a.name) for a in node.names]
        else:
            continue
        for name in names:
            if name in modules and name.startswith("chatd"):
                found.add(name)
    return found


def _package(module):
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or module in MAY_IMPORT else module


def _graph():
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        deps = _imports(path, modules)
        # "from chatd.x import y" names chatd.x too: keep the deepest name only
        graph[module] = {d for d in deps if not any(o.startswith(d + ".") for o in deps)
                         and d != module and not module.startswith(d + ".")}
    return graph


def test_the_graph_is_read():
    graph = _graph()
    assert "chatd.store.steps" in graph["chatd.app.service"]
    assert "chatd.errors" in graph["chatd.redis.client"]


def test_no_import_cycle():
    graph = _graph()
    state = {}
    stack = []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_layer_reaches_up():
    wrong = []
    for module, deps in sorted(_graph().items()):
        if module in BOTTOM:
            wrong += ["%s imports %s (it imports nothing of chatd but the bottom)"
                      % (module, d) for d in deps if d not in BOTTOM]
            continue
        mine = _package(module)
        allowed = MAY_IMPORT.get(mine)
        if allowed is None:
            continue  # chatd/__init__
        for d in deps:
            theirs = _package(d)
            if d in BOTTOM or theirs == mine or theirs in allowed:
                continue
            wrong.append("%s imports %s" % (module, d))
    assert not wrong, "imports against the layers:\n  " + "\n  ".join(wrong)
