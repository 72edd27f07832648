# Integration tests: a real emberd (or rpctestd, the gRPC layer with a test service) and
# Debian's python3-grpcio as the client. Run through `make check`, which sets EMBER_BUILD.
#
# Every process a test starts is tracked by pid and ended at teardown, whatever happened.

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

SRCDIR = os.environ.get("EMBER_SRCDIR", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
BUILD = os.environ.get("EMBER_BUILD", os.path.join(SRCDIR, "build"))
SANITIZE = os.environ.get("EMBER_SANITIZE") == "1"
sys.path.insert(0, os.path.join(BUILD, "py"))

import grpc  # noqa: E402

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


class Emberd:
    def __init__(self, root, proc, socket):
        self.root = root
        self.proc = proc
        self.socket = socket
        self.target = "unix:" + socket
        self.state_dir = os.path.join(root, "state")
        self.run_dir = os.path.join(root, "run")

    def channel(self, **kw):
        return grpc.insecure_channel(self.target, **kw)


@pytest.fixture
def workdir():
    # Short paths: unix socket addresses are limited to 108 bytes.
    d = tempfile.mkdtemp(prefix="ember-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def procs():
    """Daemons started by the test. At teardown the ones still running get SIGTERM, so that
    they shut down the normal way (and, under SANITIZE=1, LeakSanitizer checks them); one that
    does not exit in time is killed and fails the test."""
    started = []
    yield started
    stuck = []
    for p in started:
        if p.alive():
            p.signal(signal.SIGTERM)
            if p.wait(30) is None:
                p.signal(signal.SIGKILL)
                p.wait(10)
                stuck.append(f"{p.argv[0]} (pid {p.pid}) ignored SIGTERM for 30s")
    assert not stuck, stuck


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


@pytest.fixture
def start_emberd(workdir, procs):
    """start_emberd(config_text="", args=[], wait=True) -> Emberd"""
    counter = [0]

    def start(config_text="", args=(), wait=True, root=None):
        counter[0] += 1
        root = root or os.path.join(workdir, f"n{counter[0]}")
        os.makedirs(root, exist_ok=True)
        conf = write_config(root, config_text)
        argv = [os.path.join(BUILD, "emberd"), "--config", conf,
                "--state-dir", os.path.join(root, "state"),
                "--run-dir", os.path.join(root, "run")] + list(args)
        proc = Proc(argv, os.path.join(root, f"emberd-{len(procs)}.log"))
        procs.append(proc)
        e = Emberd(root, proc, os.path.join(root, "run", "ember.sock"))
        if wait:
            wait_for(lambda: not proc.alive() or health_serving(e.target), 15,
                     "emberd to serve")
            assert proc.alive(), f"emberd exited early:\n{proc.log()}"
        return e

    return start


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
