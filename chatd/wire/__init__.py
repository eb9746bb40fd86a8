"""
chatd.wire: the client connections, from bytes to the hub's calls.

- ``packets``: the pure packet codec (parse a client line, build server lines, ids).
- ``literal``: the seed-style dict literals, read at C speed (and token by token when needed).
- ``parsing``: what both readers share: ``PacketError``, the nesting bound.
- ``session``: ``Session``, one per connection: dispatch, answers, closing.
- ``budget``: what a session's packets may cost: rate by lines and bytes, junk errors.
- ``handlers``: what each kind of packet does (``handle_<kind>``).
- ``replies``: a session's replies in packet order, and its packets in flight.
- ``liveness``: a session's deadlines (auth timeout, keepalive/idle, close grace).
- ``output``: a session's output and flow control; one write per connection per turn.
- ``framing``: the small interface between a session and its framing, and the stream under it.
- ``lines``: the TCP framing (plain, TLS, unix socket): one packet per line.
- ``websocket``: the WebSocket framing (one packet per text frame).
- ``web``: the ``--websocket`` web site: the page, the handshake (Origin), HTTP limits.
- ``factory``: ``ChatFactory``: what sessions share, admission caps, graceful shutdown.
- ``stats``: the connections' counters, held by the factory, read by ``chatd.ops.metrics``.
- ``ratelimit``: the token bucket of one connection.
- ``timers``: the timer wheel of every connection's deadlines.

It uses the hub (``chatd.hub``); the hub does not use it, but for the codec.
"""
