"""
The processes of a run and what /proc says about them: the server under test
(chatd via ``twistd``, with its ``valkey-server`` child, or the relay), the
generator workers, their CPU time and RSS.

Every process started here is stopped by :meth:`Processes.close` (the suite
uses it as a context manager), with deadlines: SIGTERM, then SIGKILL.
"""

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time

from tests.fixtures.procfs import alive, children_of, cpu_seconds, rss_bytes

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchError(Exception):
    """A run could not be measured (a process died, a deadline passed)."""


# -- /proc (the rest is tests/fixtures/procfs.py, shared with the tests) ----------

def host_cpu():
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import resource
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": sys.version.split()[0],
            "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}


# -- a child with its output read by a thread --------------------------------------

class Child:
    """A subprocess whose stdout lines go to a queue (and a bounded log)."""

    def __init__(self, name, args, cwd=None, stdin=False, env=None):
        self.name = name
        self.args = args
        self.lines = queue.Queue()
        self.tail = []
        self.problems = []  # tracebacks and errors seen in the output
        self.errfile = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            args, cwd=cwd, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=self.errfile if stdin else subprocess.STDOUT,
            start_new_session=True, env=env)
        self.pid = self.proc.pid
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.tail.append(line)
            if len(self.tail) > 300:
                del self.tail[:100]
            if ("Traceback" in line or "Unhandled" in line or "#critical]" in line
                    or "#error]" in line) and len(self.problems) < 50:
                self.problems.append(line[:300])
            self.lines.put(line)
        self.lines.put(None)

    def stderr_tail(self, n=40):
        try:
            self.errfile.seek(0)
            return self.errfile.read().decode("utf-8", "replace").splitlines()[-n:]
        except (OSError, ValueError):
            return []

    def wait_line(self, pattern, deadline):
        end = time.monotonic() + deadline
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise BenchError("%s: no %r within %gs:\n%s" % (
                    self.name, pattern, deadline, "\n".join(self.tail[-30:])))
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise BenchError("%s exited (%s) before %r:\n%s" % (
                    self.name, self.proc.poll(), pattern,
                    "\n".join(self.tail[-30:] + self.stderr_tail())))
            m = re.search(pattern, line)
            if m:
                return m

    def stop(self, deadline=15.0, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(deadline)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.reader.join(5)
        try:
            self.errfile.close()
        except OSError:
            pass
        return self.proc.returncode


# -- the servers under test ------------------------------------------------------

class Server:
    """chatd or the relay, listening on 127.0.0.1 (a free port)."""

    def __init__(self, kind, workdir, extra=(), prefix=None, start_deadline=60.0, port=0):
        self.kind = kind
        self.workdir = workdir
        if kind == "chatd":
            data = os.path.join(workdir, "data")
            args = TWISTD + ["-n", "--pidfile=", "chatd", "--port",
                             "tcp:%d:interface=127.0.0.1" % port, "--data-dir", data,
                             "--rate-limit", "0"] + list(extra)
            pattern = r"chatd listening on tcp [\d.]+:(\d+)"
        elif kind == "relay":
            args = [sys.executable, "-m", "benchmarks.relay", "--port", str(port)] + list(extra)
            pattern = r"relay listening on tcp [\d.]+:(\d+)"
        else:
            raise ValueError(kind)
        if prefix:
            args = shlex.split(prefix) + args
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.child = Child(kind, args, cwd=workdir, env=env)
        self.port = int(self.child.wait_line(pattern, start_deadline).group(1))
        self.pid = self.child.pid
        self.store_pid = None
        if kind == "chatd":
            self._find_pids()
        elif prefix:
            self.pid = self._descendant("benchmarks.relay") or self.pid

    def wait_accepting(self, deadline=60.0):
        """chatd --workers: until the parent accepts connections, which it
        does once every worker listens (or after chatd.app.workers.HOLD_MAX):
        a connection made before would wait in the parent's backlog and be
        the parent's, however many workers there are."""
        self.child.wait_line(r"chatd accepting on every process", deadline)

    def _descendant(self, needle, deadline=10.0):
        """The pid of a process under ours whose command line has needle
        (the server itself when it runs under a prefix such as a profiler)."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            todo = [self.child.pid]
            while todo:
                pid = todo.pop()
                try:
                    with open("/proc/%d/cmdline" % pid, "rb") as f:
                        if needle.encode() in f.read() and pid != self.child.pid:
                            return pid
                except OSError:
                    pass
                todo.extend(children_of(pid))
            time.sleep(0.05)
        return None

    def _find_pids(self):
        """chatd's python process and its valkey-server child (from /proc;
        the python process is the one whose child is valkey-server)."""
        m = None
        for line in self.child.tail:
            m = re.search(r"embedded store starting \(pid (\d+)\)", line) or m
        if m:
            self.store_pid = int(m.group(1))
            try:
                with open("/proc/%d/status" % self.store_pid) as f:
                    for line in f:
                        if line.startswith("PPid:"):
                            self.pid = int(line.split()[1])
            except OSError:
                pass

    def pids(self):
        """{role: pid}: 'server' and, for chatd, 'store' and any
        ``--workers`` processes ('worker1'...)."""
        out = {"server": self.pid}
        if self.store_pid:
            out["store"] = self.store_pid
        n = 0
        for pid in children_of(self.pid):
            try:
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    if b"chatd.app.worker" in f.read():
                        n += 1
                        out["worker%d" % n] = pid
            except OSError:
                pass
        return out

    def cpu(self):
        return {role: cpu_seconds(pid) for role, pid in self.pids().items()}

    def rss(self):
        return {role: rss_bytes(pid) for role, pid in self.pids().items()}

    def problems(self):
        return list(self.child.problems)

    def stop(self):
        if self.pid != self.child.pid and alive(self.pid):
            # under a prefix (a profiler): stop the server itself, so that the
            # prefix command sees it exit (and writes its output)
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.child.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        code = self.child.stop(deadline=30)
        if self.pid != self.child.pid and alive(self.pid):
            _kill_wait(self.pid)
        if self.store_pid and alive(self.store_pid):
            _kill_wait(self.store_pid)
        return code


def _kill_wait(pid, deadline=10.0):
    """SIGTERM a process we started (indirectly), SIGKILL it after a deadline."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + deadline
    while alive(pid) and time.monotonic() < end:
        time.sleep(0.05)  # not our child: no wait() for it, poll /proc
    if alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- generator workers -------------------------------------------------------------

class Worker:
    """A ``python -m benchmarks.loadgen`` (or ``module``) process, driven by
    JSON lines."""

    def __init__(self, wid, module="benchmarks.loadgen"):
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.wid = wid
        self.child = Child("generator %d" % wid, [sys.executable, "-m", module],
                           cwd=ROOT, stdin=True, env=env)
        self.pid = self.child.pid

    def send(self, cmd, **kw):
        obj = dict(kw, cmd=cmd)
        try:
            self.child.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.child.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise BenchError("generator %d is gone (%s):\n%s" % (
                self.wid, e, "\n".join(self.child.stderr_tail()))) from None

    def wait(self, event, deadline):
        end = time.monotonic() + deadline
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise BenchError("generator %d: no %r within %gs:\n%s" % (
                    self.wid, event, deadline, "\n".join(self.child.stderr_tail())))
            try:
                line = self.child.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise BenchError("generator %d exited (%s) while waiting for %r:\n%s" % (
                    self.wid, self.child.proc.poll(), event,
                    "\n".join(self.child.stderr_tail())))
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("event") == "error":
                raise BenchError("generator %d failed:\n%s" % (self.wid, obj.get("message")))
            if obj.get("event") == event:
                return obj

    def stop(self):
        if self.child.proc.poll() is None:
            try:
                self.send("quit")
            except BenchError:
                pass
            try:
                self.child.proc.stdin.close()
            except OSError:
                pass
            try:
                self.child.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        return self.child.stop(deadline=5, sig=signal.SIGKILL)


class Processes:
    """Everything one run starts; closing it stops all (workers first)."""

    def __init__(self):
        self.servers = []
        self.workers = []
        self.tmp = tempfile.mkdtemp(prefix="chatd-bench-")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def server(self, kind, **kw):
        d = tempfile.mkdtemp(prefix=kind + "-", dir=self.tmp)
        s = Server(kind, d, **kw)
        self.servers.append(s)
        return s

    def start_workers(self, n, module="benchmarks.loadgen"):
        ws = [Worker(i, module) for i in range(n)]
        self.workers.extend(ws)
        return ws

    def stop_workers(self):
        ws, self.workers = self.workers, []
        for w in ws:
            w.stop()

    def close(self):
        errors = []
        self.stop_workers()
        ss, self.servers = self.servers, []
        for s in ss:
            try:
                s.stop()
            except Exception as e:  # keep stopping the others
                errors.append(e)
        import shutil
        shutil.rmtree(self.tmp, ignore_errors=True)
        if errors:
            raise errors[0]


class PySpy:
    """``py-spy record --pid`` on a process for a number of seconds (raw
    collapsed stacks, for ``python -m benchmarks.proftop``)."""

    def __init__(self, pid, path, seconds, rate=200):
        exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.path.exists(exe):
            exe = "py-spy"
        self.path = path
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "-r", str(rate), "-f", "raw", "-o", path,
             "-d", str(max(1, int(round(seconds))))],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finish(self, deadline=30.0):
        try:
            _, err = self.proc.communicate(timeout=deadline)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if self.proc.returncode:
            print("py-spy failed (%s): %s" % (self.proc.returncode,
                                              err.decode(errors="replace")[-500:]), file=sys.stderr)
        return self.path
