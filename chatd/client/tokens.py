"""
Where the terminal client keeps the token of each id between runs: one file
per server and id in the state directory.
"""

import json
import os
from urllib.parse import quote

def default_state_dir(environ):
    """``$XDG_STATE_HOME/chatd-client`` (an absolute XDG_STATE_HOME only, as
    the XDG spec says), else ``~/.local/state/chatd-client``."""
    base = environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "chatd-client")


class TokenFile:
    """The token of one id at one server, kept between runs: one small JSON
    file per host, port and id, readable by its owner only (0600, in a 0700
    directory), since the token is all it takes to read that id's messages."""

    def __init__(self, directory, host, port, device):
        self.directory = directory
        self.server = "%s:%d" % (host, port)
        self.device = device
        # the host quoted so that it holds no "_": "host_port_id" splits one way only
        self.path = os.path.join(directory, "%s_%d_%s.json" % (
            quote(host, safe=".-"), port, device))

    def load(self):
        """The saved token, or None (never saved, unreadable, or not ours)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get("id") != self.device:
            return None
        token = saved.get("token")
        return token if isinstance(token, str) and token else None

    def replace(self, token, say):
        """Save a reconnect's new token at once; if that fails, ``say`` why
        (the old token stays good until the new one is used)."""
        try:
            self.save(token)
        except OSError as e:
            say("could not save the new token in %s: %s; the old one stays good "
                "until the new one is used" % (self.path, e.strerror or e))

    def save(self, token):
        """Write the token atomically (a crash leaves the old file or the new
        one, never half of one). Raises OSError."""
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            os.chmod(self.directory, 0o700)
        data = json.dumps({"server": self.server, "id": self.device, "token": token})
        tmp = "%s.%d.tmp" % (self.path, os.getpid())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
