"""
The process shell: what turns the packages below into a running node.

- ``tap``: the ``twistd chatd`` command line (options, checks, the service tree)
- ``config``: :class:`~chatd.app.config.Settings` and the option parsers
- ``service``: the node's services, started and stopped in order
  (embedded store, store client, hub, listeners)
- ``workers``: ``--workers``, the pool of worker processes
- ``worker``: one worker process (``python -m chatd.app.worker``)
- ``ports``: listening ports shared by processes (``SO_REUSEPORT``)
"""
