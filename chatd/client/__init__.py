"""
chatd.client: the terminal client, ``chatd-client`` (``python -m chatd.client``).

Modules, each importing only those above it:

- ``formatting``: what is shown: incoming messages, replies, errors, colours.
- ``tokens``: where the token of each id is kept between runs.
- ``outbox``: the messages typed and not answered yet, their refs, the send window.
- ``connection``: one TCP connection and the device's session across connections.
- ``run``: one run of the client: stdio, the exit status, a clean stop.
- ``ui``: the interactive terminal: typed commands and the conversation.
- ``script``: the scripting modes, ``--listen`` and ``--send``.
- ``cli``: the command line: arguments, and the mode they pick.
"""
