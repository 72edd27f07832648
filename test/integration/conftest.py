# Integration tests: a real emberd (or rpctestd, the gRPC layer with a test service) and
# Debian's python3-grpcio as the client. Run through `make check`, which sets EMBER_BUILD.
#
# Every process a test starts is tracked by pid and ended at teardown, whatever happened.

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

SRCDIR = os.environ.get("EMBER_SRCDIR", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
BUILD = os.environ.get("EMBER_BUILD", os.path.join(SRCDIR, "build"))
SANITIZE = os.environ.get("EMBER_SANITIZE") == "1"
sys.path.insert(0, os.path.join(BUILD, "py"))

import grpc  # noqa: E402

from netnsutil import in_netns  # noqa: E402

# Sanitized binaries are several times slower: scale waits, never assertions on behaviour.
SLOW = 4.0 if SANITIZE else 1.0


def wait_for(pred, timeout, what, interval=0.02):
    deadline = time.monotonic() + timeout * SLOW
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout * SLOW:.1f}s waiting for {what}")


def rss_kib(pid):
    """A process's resident memory, KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Proc:
    """A daemon started by a test; its stderr goes to a file the test can read."""

    def __init__(self, argv, log_path, env=None, stdout=subprocess.DEVNULL):
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.p = subprocess.Popen(argv, stdout=stdout, stderr=self._log, env=env,
                                  start_new_session=True)
        self.pid = self.p.pid

    def log(self):
        with open(self.log_path, "r", errors="replace") as f:
            return f.read()

    def alive(self):
        return self.p.poll() is None

    def signal(self, sig):
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout):
        try:
            return self.p.wait(timeout=timeout * SLOW)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout=20):
        """SIGTERM, then SIGKILL if it does not go; returns the exit status."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            if self.wait(timeout) is None:
                os.kill(self.pid, signal.SIGKILL)
                self.p.wait()
        self._log.close()
        return self.p.returncode


def connect_in_netns(nspath, addr, timeout=10):
    """A TCP connection made from inside the network namespace at nspath (netnsutil)."""
    s = in_netns(nspath, lambda: socket.create_connection(addr, timeout=timeout))
    s.settimeout(None)
    return s


class TcpRelay:
    """127.0.0.1:<port> in the test's namespace, relayed to addr inside emberd's namespace, so
    that TCP clients reach an emberd that runs in a namespace of its own."""

    def __init__(self, nspath, addr):
        self.nspath, self.addr = nspath, addr
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(64)
        self.port = self.ls.getsockname()[1]
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _pump(self, a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self):
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            try:
                u = connect_in_netns(self.nspath, self.addr)
            except OSError:
                c.close()
                continue
            self.socks += [c, u]
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c), daemon=True).start()

    def close(self):
        self.ls.close()
        for s in self.socks:
            s.close()


class Emberd:
    def __init__(self, root, proc, socket):
        self.root = root
        self.proc = proc
        self.socket = socket
        self.target = "unix:" + socket
        self.state_dir = os.path.join(root, "state")
        self.run_dir = os.path.join(root, "run")
        self.relays = []

    def channel(self, **kw):
        return grpc.insecure_channel(self.target, **kw)

    def tcp_port(self, port):
        """A port on 127.0.0.1 here that reaches emberd's 127.0.0.1:<port> (its TCP
        listener, inside its network namespace)."""
        r = TcpRelay(self.hostns, ("127.0.0.1", port))
        self.relays.append(r)
        return r.port


def _new_workdir():
    # Short paths: unix socket addresses are limited to 108 bytes.
    return tempfile.mkdtemp(prefix="ember-", dir="/tmp")


def _stop_procs(started):
    """At teardown the daemons still running get SIGTERM, so that they shut down the normal
    way (and, under SANITIZE=1, LeakSanitizer checks them); one that does not exit in time is
    killed and fails the test."""
    stuck = []
    for p in started:
        if p.alive():
            p.signal(signal.SIGTERM)
            if p.wait(30) is None:
                p.signal(signal.SIGKILL)
                p.wait(10)
                stuck.append(f"{p.argv[0]} (pid {p.pid}) ignored SIGTERM for 30s")
    assert not stuck, stuck


@pytest.fixture
def workdir():
    d = _new_workdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def procs():
    """Daemons started by the test, stopped at teardown (_stop_procs)."""
    started = []
    yield started
    _stop_procs(started)


def health_serving(target, service=""):
    from health.v1 import health_pb2, health_pb2_grpc
    try:
        with grpc.insecure_channel(target) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1)
            return r.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def write_config(root, text):
    path = os.path.join(root, "ember.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


def sh(*argv, check=True):
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def host_netns(path):
    """A network namespace bind-mounted at `path`: the "host" of an emberd under test, so
    that the machine's real root namespace is never changed."""
    open(path, "w").close()
    sh("unshare", f"--net={path}", "true")
    sh("nsenter", f"--net={path}", "ip", "link", "set", "lo", "up")
    return path


def processes_under(root):
    """Pids whose working directory is `root` or below it (VMMs an emberd left running)."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{p}/cwd")
        except OSError:
            continue
        if cwd == root or cwd.startswith(root + "/"):
            out.append(int(p))
    return out


def cleanup_emberd_root(root):
    """What sandboxes leave on the machine after their emberd stopped: VMM processes (they
    survive the agent by design), namespaces under the test's netns_dir, the host namespace."""
    for pid in processes_under(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while processes_under(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    nsdir = os.path.join(root, "netns")
    for f in os.listdir(nsdir) if os.path.isdir(nsdir) else []:
        sh("umount", "-l", os.path.join(nsdir, f), check=False)
    # The netns module bind-mounts the directory on itself (as `ip netns` does with
    # /run/netns): that mount goes too, recursively.
    if os.path.isdir(nsdir):
        sh("umount", "-R", "-l", nsdir, check=False)
    hostns = os.path.join(root, "hostns")
    if os.path.exists(hostns):
        sh("umount", "-l", hostns, check=False)


class EmberdStarter:
    """start(config_text="", args=[], wait=True, root=None, hostns=None, env=None,
    binary="emberd") -> Emberd (binary: relative to the build dir, e.g. test/emberd-hooks)

    emberd runs in a network namespace of the test's own (its slots' namespaces are
    bind-mounted under <root>/netns), so nothing of the machine's root namespace changes."""

    def __init__(self, workdir, procs):
        self.workdir, self.procs = workdir, procs
        self.counter, self.roots, self.emberds = 0, [], []

    def __call__(self, config_text="", args=(), wait=True, root=None, hostns=None, env=None,
                 binary="emberd"):
        self.counter += 1
        root = root or os.path.join(self.workdir, f"n{self.counter}")
        os.makedirs(root, exist_ok=True)
        if root not in self.roots:
            self.roots.append(root)
        if hostns is None:
            hostns = os.path.join(root, "hostns")
            if not os.path.exists(hostns):
                host_netns(hostns)
        conf = write_config(root, f"[network]\nnetns_dir = {root}/netns\n"
                                  "[sandboxes]\nmemory_reserve_mib = 0\n" + config_text)
        argv = ["nsenter", f"--net={hostns}", os.path.join(BUILD, binary), "--config", conf,
                "--state-dir", os.path.join(root, "state"),
                "--run-dir", os.path.join(root, "run")] + list(args)
        proc = Proc(argv, os.path.join(root, f"emberd-{len(self.procs)}.log"), env=env)
        self.procs.append(proc)
        e = Emberd(root, proc, os.path.join(root, "run", "ember.sock"))
        e.hostns = hostns
        if wait:
            wait_for(lambda: not proc.alive() or health_serving(e.target), 30,
                     "emberd to serve")
            assert proc.alive(), f"emberd exited early:\n{proc.log()}"
        self.emberds.append(e)
        return e

    def close(self):
        for e in self.emberds:
            for r in e.relays:
                r.close()
        for p in self.procs:
            if p.argv[0] == "nsenter" and p.alive():
                p.signal(signal.SIGTERM)
                if p.wait(30) is None:
                    p.signal(signal.SIGKILL)
                    p.wait(10)
        for root in self.roots:
            cleanup_emberd_root(root)


@pytest.fixture
def start_emberd(workdir, procs):
    """An EmberdStarter for one test."""
    starter = EmberdStarter(workdir, procs)
    yield starter
    starter.close()


@pytest.fixture(scope="module")
def start_emberd_module():
    """An EmberdStarter shared by the tests of one module (for tests that only use sandboxes,
    where starting an emberd and booting guests per test would cost more than the test)."""
    d = _new_workdir()
    started = []
    starter = EmberdStarter(d, started)
    try:
        yield starter
    finally:
        starter.close()
        _stop_procs(started)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_rpctestd(workdir, procs):
    counter = [0]

    def start(*args):
        counter[0] += 1
        sock = os.path.join(workdir, f"t{counter[0]}.sock")
        argv = [os.path.join(BUILD, "test", "rpctestd"), sock] + [str(a) for a in args]
        proc = Proc(argv, os.path.join(workdir, f"rpctestd-{counter[0]}.log"),
                    stdout=subprocess.PIPE)
        procs.append(proc)
        line = proc.p.stdout.readline().decode()
        assert line.strip() == "READY", f"rpctestd did not start:\n{proc.log()}"
        proc.target = "unix:" + sock
        return proc

    return start


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report carries the end of each daemon's log (emberd's own account of
    what it was doing), since the logs go with the test's directory: a failure seen only in
    CI can then be understood from CI's output."""
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed or rep.when == "setup":
        return
    seen = []
    for v in item.funcargs.values():
        for p in (v.procs if isinstance(v, EmberdStarter) else v if isinstance(v, list) else []):
            if isinstance(p, Proc) and p not in seen:
                seen.append(p)
    for p in seen:
        try:
            lines = p.log().splitlines()[-60:]
        except OSError:
            continue
        rep.sections.append((f"end of {p.log_path}", "\n".join(lines)))
