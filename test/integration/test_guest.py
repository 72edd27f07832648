# ember-guest end to end under fcsim: a busybox guest whose init starts ember-guest (EMBER_SIM=1:
# it listens on /run/vsock/1024.sock), reached from the host through fcsim's hybrid vsock
# (v.sock, "CONNECT 1024") by test/guest/guest-tool, the command-line face of the host's client
# library (guest/client). Exec (output, exit codes, signals, stdin, 100 MiB each way, pty and
# resize, timeouts, 50 at once, the host going away), file transfer, ping, clock.
#
# One guest serves the whole module (fcsim runs in a network namespace of its own, made by
# unshare, gone with it); every guest-tool a test starts is ended at teardown.

import concurrent.futures
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import BUILD, SLOW
from fcsim_util import Fcsim

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

MiB = 1 << 20
AGENT = os.path.join(BUILD, "ember-guest")
TOOL = os.path.join(BUILD, "test", "guest-tool")

# As fcsim_util.INIT, plus what ember-guest needs: devpts for ptys, every busybox applet, a
# roomy /tmp for the transfers.
INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t tmpfs tmpfs /run
/bin/busybox mount -t tmpfs -o size=512m tmpfs /tmp
/bin/busybox mkdir -p /dev/pts
/bin/busybox mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
/bin/busybox --install -s /bin
echo "init: up as pid $$, EMBER_SIM=$EMBER_SIM"
/bin/ember-guest
echo "init: ember-guest exited with $?"
"""


def build_guest_rootfs(path):
    """fcsim_util.build_rootfs's layout (static busybox, /sbin/init a shell script) with
    ember-guest in /bin."""
    tree = path + ".tree"
    shutil.rmtree(tree, ignore_errors=True)
    for d in ("bin", "sbin", "proc", "run", "tmp", "dev", "etc", "sys", "root"):
        os.makedirs(os.path.join(tree, d))
    shutil.copy("/bin/busybox", os.path.join(tree, "bin", "busybox"))
    os.symlink("busybox", os.path.join(tree, "bin", "sh"))
    shutil.copy(AGENT, os.path.join(tree, "bin", "ember-guest"))
    with open(os.path.join(tree, "sbin", "init"), "w") as f:
        f.write(INIT)
    os.chmod(os.path.join(tree, "sbin", "init"), 0o755)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, path, "32M"], check=True,
                   capture_output=True)
    shutil.rmtree(tree)
    return path


class Guest:
    def __init__(self, fcsim, workdir):
        self.fcsim = fcsim
        self.vsock = os.path.join(workdir, "v.sock")
        self.workdir = workdir
        self.popens = []

    def argv(self, *args):
        return [TOOL, "--vsock", self.vsock, *[str(a) for a in args]]

    def tool(self, *args, input=None, timeout=60, check=None):
        """Runs guest-tool to its end; returns the CompletedProcess (bytes)."""
        p = subprocess.run(self.argv(*args), input=input, capture_output=True,
                           timeout=timeout * SLOW)
        if check is not None:
            assert p.returncode == check, (args, p.returncode, p.stdout[-2000:],
                                           p.stderr.decode(errors="replace"))
        return p

    def sh(self, script, **kw):
        """Output of a shell command in the guest, which must succeed."""
        return self.tool("exec", "--no-stdin", "--", "sh", "-c", script, check=0, **kw).stdout

    def popen(self, *args, **kw):
        p = subprocess.Popen(self.argv(*args), **kw)
        self.popens.append(p)
        return p

    def alive_in_guest(self, pid):
        """Whether a guest process exists and is no zombie."""
        out = self.sh(f"cat /proc/{pid}/stat 2>/dev/null || true").decode()
        return bool(out) and out.rsplit(")", 1)[1].split()[0] != "Z"


def start_guest(root):
    """The busybox guest with ember-guest booted under fcsim in `root`, its agent listening
    (also used by test/bench/bench-exec.py). The caller stops the returned Fcsim."""
    image = build_guest_rootfs(os.path.join(root, "rootfs"))
    kernel = os.path.join(root, "vmlinux")
    with open(kernel, "wb") as k:
        k.write(b"\x7fELF not a real kernel: fcsim does not boot it")
    f = Fcsim(root)
    try:
        f.configure(image, kernel, mem=64, boot_args="init=/sbin/init")
        f.api.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        f.wait_output("listening on unix /run/vsock/1024.sock")
    except BaseException:
        f.stop()
        raise
    return f


@pytest.fixture(scope="module")
def guest():
    assert os.path.exists(AGENT) and os.path.exists(TOOL), "build ember-guest and guest-tool"
    root = tempfile.mkdtemp(prefix="ember-guest-", dir="/tmp")
    f = None
    try:
        f = start_guest(root)
        g = Guest(f, root)
        yield g
        for p in g.popens:
            if p.poll() is None:
                p.kill()
                p.wait()
    finally:
        if f:
            f.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_ping_hello_clock(guest):
    assert guest.tool("ping", check=0).stdout.startswith(b"pong in ")
    assert guest.tool("hello", check=0).stdout.startswith(b"ember-guest ")
    # Under fcsim the guest's clock is the host's: the agent must not set it.
    out = guest.tool("set-clock", check=0).stdout.decode()
    assert out.startswith("not set"), out


def test_echo_and_streams(guest):
    p = guest.tool("exec", "--", "echo", "hello", "world", check=0)
    assert p.stdout == b"hello world\n" and p.stderr == b""
    p = guest.tool("exec", "--", "sh", "-c", "echo out; echo err >&2; echo out2", check=0)
    assert p.stdout == b"out\nout2\n" and p.stderr == b"err\n"
    # binary-safe, both ways
    data = bytes(range(256)) * 64
    assert guest.tool("exec", "--", "cat", input=data, check=0).stdout == data


def test_exit_codes_and_signals(guest):
    def code(n):
        return n, guest.tool("exec", "--no-stdin", "--", "sh", "-c", f"exit {n}").returncode

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        got = dict(ex.map(code, range(256)))
    assert got == {n: n for n in range(256)}
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGSEGV, signal.SIGUSR1):
        p = guest.tool("exec", "--", "sh", "-c", f"kill -{int(sig)} $$")
        assert p.returncode == 128 + sig, (sig, p.returncode, p.stderr)


def test_exec_failures(guest):
    p = guest.tool("exec", "--", "no-such-program")
    assert p.returncode == 127 and b"No such file or directory" in p.stderr, p.stderr
    p = guest.tool("exec", "--cwd", "/nonexistent", "--", "true")
    assert p.returncode == 127 and b"chdir" in p.stderr, p.stderr
    p = guest.tool("exec", "--env", "NOEQUALS", "--", "true")
    assert p.returncode != 0 and b"KEY=VALUE" in p.stderr, p.stderr


def test_user_cwd_env(guest):
    out = guest.tool("exec", "--uid", 1000, "--gid", 2000, "--", "sh", "-c",
                     "id -u; id -g; id -G", check=0).stdout.split()
    assert out == [b"1000", b"2000", b"2000"]
    assert guest.tool("exec", "--cwd", "/tmp", "--", "pwd", check=0).stdout == b"/tmp\n"
    # --env extends the agent's environment (EMBER_SIM is the agent's)...
    out = guest.tool("exec", "--env", "FOO=bar baz", "--", "sh", "-c",
                     'echo "$FOO|$EMBER_SIM"', check=0).stdout
    assert out == b"bar baz|1\n"
    # ... or replaces it; PATH is always there
    out = guest.tool("exec", "--env-replace", "--env", "A=1", "--", "env", check=0).stdout
    assert sorted(out.split()) == [b"A=1", b"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                                   b"/usr/bin:/sbin:/bin"]


def hash_stream(p, chunk=1 << 20):
    h, n = hashlib.sha256(), 0
    while True:
        b = p.stdout.read(chunk)
        if not b:
            return h.hexdigest(), n
        h.update(b)
        n += len(b)


def test_stdout_100mib(guest):
    want = guest.sh("head -c 104857600 /dev/urandom > /tmp/big && sha256sum /tmp/big")
    want = want.split()[0].decode()
    t = time.monotonic()
    p = guest.popen("exec", "--no-stdin", "--", "cat", "/tmp/big", stdout=subprocess.PIPE)
    got, n = hash_stream(p)
    assert p.wait(60 * SLOW) == 0
    print(f"100 MiB stdout in {time.monotonic() - t:.2f} s")
    assert (got, n) == (want, 100 * MiB)
    guest.sh("rm /tmp/big")


def test_stdin_100mib(guest):
    data = os.urandom(100 * MiB)
    t = time.monotonic()
    p = guest.tool("exec", "--", "sh", "-c", "sha256sum; echo done >&2", input=data, check=0,
                   timeout=120)
    print(f"100 MiB stdin in {time.monotonic() - t:.2f} s")
    assert p.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert p.stderr == b"done\n"


class Reader(threading.Thread):
    """Collects a pipe's output in the background."""

    def __init__(self, f):
        super().__init__(daemon=True)
        self.f, self.data, self.lock = f, b"", threading.Lock()
        self.start()

    def run(self):
        while True:
            b = os.read(self.f.fileno(), 65536)
            if not b:
                return
            with self.lock:
                self.data += b

    def text(self):
        with self.lock:
            return self.data.decode(errors="replace")


def test_pty_interactive_resize(guest):
    p = guest.popen("exec", "--tty", "24x80", "--resize-after-ms", 1000, "40x132", "--", "sh",
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = Reader(p.stdout)

    def say(line):
        p.stdin.write(line.encode() + b"\n")
        p.stdin.flush()

    say("tty; stty size")
    deadline = time.monotonic() + 10 * SLOW
    while "24 80" not in out.text():
        assert time.monotonic() < deadline, out.text()
        time.sleep(0.05)
    assert "/dev/pts/" in out.text()
    # the resize comes from guest-tool after 1 s: ask until the shell sees it
    while "40 132" not in out.text():
        assert time.monotonic() < deadline, out.text()
        say("stty size")
        time.sleep(0.2)
    say("exit 7")
    assert p.wait(10 * SLOW) == 7
    p.stdin.close()


def test_pty_stdin_eof(guest):
    # CloseStdin on a pty is the EOF character: cat ends, with its input echoed back.
    p = guest.tool("exec", "--tty", "24x80", "--", "cat", input=b"abc\n", check=0)
    assert p.stdout.count(b"abc") == 2, p.stdout


def test_50_concurrent(guest):
    t = time.monotonic()
    ps = [guest.popen("exec", "--no-stdin", "--", "sh", "-c", f"sleep 2; echo {i}",
                      stdout=subprocess.PIPE) for i in range(50)]
    outs = [p.communicate(timeout=60 * SLOW)[0] for p in ps]
    took = time.monotonic() - t
    assert [p.returncode for p in ps] == [0] * 50
    assert outs == [f"{i}\n".encode() for i in range(50)]
    assert took < 15 * SLOW, f"50 x sleep 2 took {took:.1f}s: not concurrent"


def test_signal_delivery(guest):
    # to the process group: the shell's sleep dies too, the trap runs
    script = 'trap "echo got USR1; exit 3" USR1; echo ready; while :; do sleep 0.1; done'
    p = guest.tool("exec", "--no-stdin", "--signal-after-ms", 500, int(signal.SIGUSR1), "--",
                   "sh", "-c", script)
    assert p.returncode == 3 and p.stdout == b"ready\ngot USR1\n", (p.returncode, p.stdout)
    # guest-tool passes its own SIGTERM on
    q = guest.popen("exec", "--no-stdin", "--", "sh", "-c", "echo up; exec sleep 100",
                    stdout=subprocess.PIPE)
    assert q.stdout.readline() == b"up\n"
    q.send_signal(signal.SIGTERM)
    assert q.wait(10 * SLOW) == 128 + signal.SIGTERM


def test_timeout(guest):
    t = time.monotonic()
    p = guest.tool("exec", "--no-stdin", "--timeout-ms", 500, "--", "sh", "-c",
                   "echo before; sleep 30 & sleep 30")
    took = time.monotonic() - t
    assert p.returncode == 128 + signal.SIGKILL, p.returncode
    assert p.stdout == b"before\n"
    assert b"timed out after 500 ms" in p.stderr
    assert took < 5 * SLOW
    # a process that ends in time is not touched
    p = guest.tool("exec", "--no-stdin", "--timeout-ms", 5000, "--", "true", check=0)
    assert p.stderr == b""


def test_background_process_keeps_no_exec_alive(guest):
    # A background process that keeps stdout open does not hold the exit back (the agent
    # waits a moment for the pipe, then reports), and is left running: only the exec is over.
    t = time.monotonic()
    p = guest.tool("exec", "--no-stdin", "--", "sh", "-c", "sleep 3 & echo $!", check=0)
    assert time.monotonic() - t < 2.5 * SLOW
    assert guest.alive_in_guest(int(p.stdout))


def test_host_disconnect_kills_child(guest):
    q = guest.popen("exec", "--no-stdin", "--print-pid", "--", "sh", "-c",
                    "sleep 1000 & echo $!; exec sleep 999", stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
    bg = int(q.stdout.readline())
    pid = int(q.stderr.readline().split()[-1])
    assert guest.alive_in_guest(pid) and guest.alive_in_guest(bg)
    q.kill()  # SIGKILL: the connection just closes
    q.wait()
    deadline = time.monotonic() + 10 * SLOW
    while guest.alive_in_guest(pid) or guest.alive_in_guest(bg):
        assert time.monotonic() < deadline, "the child outlived its connection"
        time.sleep(0.1)
    assert "host went away; session killed" in guest.fcsim.output()


def test_slow_reader_back_pressure(guest):
    # The host stops reading: the agent stops reading the child's pipe (no buffering without
    # end), and the child blocks in write(); nothing is lost once the host reads again.
    p = guest.popen("exec", "--no-stdin", "--print-pid", "--", "sh", "-c",
                    "head -c 67108864 /dev/zero; echo end", stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
    pid = int(p.stderr.readline().split()[-1])
    time.sleep(1.5)
    rss = guest.sh("for p in /proc/[0-9]*; do grep -qs ember-guest $p/cmdline && "
                   "grep VmRSS $p/status; done").decode().split("\n")
    kib = [int(line.split()[1]) for line in rss if line]
    assert len(kib) >= 2 and max(kib) < 8192, rss
    assert guest.alive_in_guest(pid), "the writer should be blocked, not done"
    got, n = hash_stream(p)
    assert p.wait(30 * SLOW) == 0
    assert n == 64 * MiB + 4


def test_stdin_back_pressure(guest):
    # The child does not read its stdin for a while: the agent holds at most a frame of it,
    # the host's writes block, and everything arrives once the child reads.
    p = guest.popen("exec", "--print-pid", "--", "sh", "-c",
                    "sleep 1.5; wc -c; echo done >&2", stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pid = int(p.stderr.readline().split()[-1])
    fed = []

    def feed():
        for _ in range(64):
            p.stdin.write(b"x" * MiB)
            fed.append(1)
        p.stdin.close()

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    time.sleep(1)
    assert len(fed) < 64, "64 MiB taken while nobody read them"
    # the handler is the child's parent (field 4 of stat; comm "(sh)" has no spaces)
    rss = guest.sh(f"grep VmRSS /proc/$(cut -d' ' -f4 /proc/{pid}/stat)/status").split()
    assert int(rss[1]) < 8192, rss
    t.join(30 * SLOW)
    out, err = p.stdout.read(), p.stderr.read()
    assert p.wait(10 * SLOW) == 0 and out.strip() == str(64 * MiB).encode() and err == b"done\n"


def test_file_transfer_50mib(guest, tmp_path):
    src, back = tmp_path / "src", tmp_path / "back"
    data = os.urandom(50 * MiB)
    src.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    t = time.monotonic()
    guest.tool("put", src, "/tmp/up", "--mode", "0640", "--owner", "1000:1001", check=0)
    print(f"50 MiB put in {time.monotonic() - t:.2f} s")
    out = guest.sh("stat -c '%a %u %g %s' /tmp/up; sha256sum /tmp/up; ls -a /tmp").decode()
    lines = out.splitlines()
    assert lines[0] == f"640 1000 1001 {50 * MiB}"
    assert lines[1].split()[0] == want
    assert not [x for x in lines[2:] if ".ember-" in x], "temporary file left behind"
    t = time.monotonic()
    guest.tool("get", "/tmp/up", back, check=0)
    print(f"50 MiB get in {time.monotonic() - t:.2f} s")
    assert hashlib.sha256(back.read_bytes()).hexdigest() == want

    # replaced atomically, default mode 0644 and root
    small = tmp_path / "small"
    small.write_bytes(b"new content\n")
    guest.tool("put", small, "/tmp/up", check=0)
    assert guest.sh("stat -c '%a %u %g' /tmp/up; cat /tmp/up") == b"644 0 0\nnew content\n"
    guest.sh("rm /tmp/up")


def test_file_errors(guest, tmp_path):
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * MiB))
    p = guest.tool("put", src, "/nonexistent/dir/file")
    assert p.returncode != 0 and b"No such file or directory" in p.stderr, p.stderr
    p = guest.tool("put", src, "relative/path")
    assert p.returncode != 0 and b"absolute" in p.stderr, p.stderr
    p = guest.tool("get", "/nonexistent", tmp_path / "x")
    assert p.returncode != 0 and b"No such file or directory" in p.stderr
    assert not (tmp_path / "x").exists()
    p = guest.tool("get", "/tmp", tmp_path / "x")
    assert p.returncode != 0 and b"not a regular file" in p.stderr
    # the agent is fine after all that
    assert guest.tool("exec", "--", "echo", "ok", check=0).stdout == b"ok\n"
