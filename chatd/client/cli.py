"""
The terminal client's command line, ``chatd-client HOST PORT``: chat with a
chatd server from a shell, a script or a pipe, the way a person testing the
server wants to.

It is a small device of its own: it registers once and keeps its token
between runs, reconnects by itself with back-off when the connection drops,
resends what was not answered (each send has a ``ref``, so a resend never
stores a message twice), shows each incoming message once (a device drops
server ids it has already shown) and acks what it has shown.

This module only reads the arguments and picks the mode: interactive
(:mod:`chatd.client.ui`), ``--listen`` or ``--send``
(:mod:`chatd.client.script`).
"""

import argparse
import os
import sys

from chatd.client.script import Listener, OneShot
from chatd.client.ui import Conversation
from chatd.wire.packets import ID_RE

def _port(text):
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a port number: %r" % text) from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError("not a port number: %r" % text)
    return port


def _device(text):
    if not ID_RE.match(text):
        raise argparse.ArgumentTypeError(
            "not a valid id: %r (1-64 characters from A-Z a-z 0-9 _ . : @ + -)" % text)
    return text


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value > 0:
        raise argparse.ArgumentTypeError("not a positive number of seconds: %r" % text)
    return value


def _count_arg(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError("not a positive whole number: %r" % text)
    return value


def _push(text):
    """APP:PUSHKEY -> (app, pushkey)."""
    from chatd.wire.packets import APP_RE, MAX_PUSHKEY
    app, sep, pushkey = text.partition(":")
    if not sep or not APP_RE.match(app) or not pushkey or \
            len(pushkey.encode("utf-8")) > MAX_PUSHKEY:
        raise argparse.ArgumentTypeError(
            "%r is not APP:PUSHKEY (an app id of A-Z a-z 0-9 _ . -, a pushkey of "
            "1-%d bytes)" % (text, MAX_PUSHKEY))
    return app, pushkey


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="chatd-client",
        description="Chat with a chatd server from a terminal, a script or a pipe.",
        epilog="Interactive: /to ID picks who you talk to, a plain line sends to them, "
               "/help, /quit. The token of each id is kept in the state directory and "
               "reused; incoming messages are acked once shown.")
    parser.add_argument("host", metavar="HOST")
    parser.add_argument("port", metavar="PORT", type=_port)
    parser.add_argument("--id", type=_device, metavar="ID",
                        help="your id (asked for when absent in interactive mode)")
    parser.add_argument("--to", type=_device, metavar="ID",
                        help="talk to ID from the start (as /to ID)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--send", nargs=2, metavar=("ID", "TEXT"),
                      help="send TEXT to ID and exit: 0 accepted, 1 duplicate or "
                           "refused, 2 could not connect or register")
    mode.add_argument("--listen", action="store_true",
                      help="print each incoming message as a JSON line and ack it, "
                           "until SIGINT/SIGTERM (stdin is not read); status on stderr")
    parser.add_argument("--count", type=_count_arg, metavar="N",
                        help="with --listen: exit 0 after N messages")
    parser.add_argument("--no-receipts", action="store_true",
                        help="do not opt in to delivered/read receipts (by default "
                             "they show under what you send, and --listen prints them)")
    parser.add_argument("--register", action="store_true",
                        help="register anew (a new token) instead of reusing the saved one")
    parser.add_argument("--push", type=_push, metavar="APP:PUSHKEY",
                        help="once connected, register for push wake-ups through the "
                             "server's push gateway (for testing a gateway)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where tokens are kept (default: $XDG_STATE_HOME/chatd-client "
                             "or ~/.local/state/chatd-client)")
    parser.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                        help="how long --send, and the end of input, wait for answers "
                             "(default 10)")
    options = parser.parse_args(argv)
    if options.send is not None:
        try:
            _device(options.send[0])
        except argparse.ArgumentTypeError as e:
            parser.error("--send: %s" % e)
    if options.count and not options.listen:
        parser.error("--count goes with --listen")
    if (options.send is not None or options.listen) and not options.id:
        parser.error("--%s needs --id" % ("send" if options.send is not None else "listen"))
    return options


def main(argv=None):
    options = parse_args(sys.argv[1:] if argv is None else argv)
    from twisted.internet import reactor
    if options.send is not None:
        app = OneShot(options, reactor, os.environ)
    elif options.listen:
        app = Listener(options, reactor, os.environ)
    else:
        app = Conversation(options, reactor, os.environ)
    sys.exit(app.run())


if __name__ == "__main__":
    main()
