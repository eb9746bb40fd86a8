"""
The store: chatd's data and its atomic steps. It knows no sessions and no
hub; it is asked by the hub and answers with results or
:mod:`chatd.errors`.

- ``steps``: :class:`~chatd.store.steps.Store`, every operation (batched sends
  and acks, fetch, register, presence claims and leases)
- ``lua/``: one named Lua function per atomic step; ``library`` loads them
  as one Valkey/Redis function library
- ``layout``: the one home of key names, the notify channel and its
  payloads, and the stored form of a message (the Lua gets its constants
  from it)
- ``notify``: each device's notify channel, for the hub's presence
"""
