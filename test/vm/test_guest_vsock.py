# ember-guest outside fcsim: on a real AF_VSOCK socket and with a clock it may set. Neither can
# be tried on the host (no KVM here, and the host's clock is not a test's to change); the VM's
# kernel has both. vsock_loopback lets a process of the VM connect to CID 1 (VMADDR_CID_LOCAL),
# which reaches ember-guest's listener through the same AF_VSOCK code as a microVM's host would.

import hashlib
import os
import subprocess
import time

import pytest

from conftest import BUILD, run

AGENT = os.path.join(BUILD, "ember-guest")
TOOL = os.path.join(BUILD, "test", "guest-tool")
PORT = 1024


def tool(*args, **kw):
    return subprocess.run([TOOL, "--cid", f"1:{PORT}", *map(str, args)], capture_output=True,
                          timeout=120, **kw)


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    run("modprobe", "vsock_loopback")
    if not os.path.exists("/dev/pts/ptmx"):
        os.makedirs("/dev/pts", exist_ok=True)
        run("mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts", "/dev/pts")
    env = {k: v for k, v in os.environ.items() if k != "EMBER_SIM"}
    log = tmp_path_factory.mktemp("agent") / "log"
    with open(log, "wb") as out:
        p = subprocess.Popen([AGENT], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        r = tool("ping", "--wait-ms", 10000)
        assert r.returncode == 0, (r.stderr, p.poll(), log.read_text())
        yield p
    finally:
        p.kill()
        p.wait()


def test_exec_over_af_vsock(agent):
    r = tool("hello")
    assert r.returncode == 0 and r.stdout.startswith(b"ember-guest "), r
    r = tool("exec", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    # 32 MiB of output, byte-exact: ordering and back-pressure on a vsock stream
    want = hashlib.sha256(b"\0" * (32 << 20)).hexdigest()
    r = tool("exec", "--no-stdin", "--", "head", "-c", 32 << 20, "/dev/zero")
    assert r.returncode == 0 and hashlib.sha256(r.stdout).hexdigest() == want


def test_pty_over_af_vsock(agent):
    r = tool("exec", "--tty", "33x77", "--no-stdin", "--", "stty", "size")
    assert r.returncode == 0 and b"33 77" in r.stdout, r


def test_file_over_af_vsock(agent, tmp_path):
    src, back = tmp_path / "src", tmp_path / "back"
    data = os.urandom(5 << 20)
    src.write_bytes(data)
    dest = tmp_path / "in-guest"
    r = tool("put", src, dest, "--mode", "0640", "--owner", "12:34")
    assert r.returncode == 0, r.stderr
    st = os.stat(dest)
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, 12, 34)
    r = tool("get", dest, back)
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == data


def test_set_clock_applies(agent):
    """Outside fcsim SetClock sets the realtime clock (what a resumed microVM needs)."""
    wall, mono = time.time(), time.monotonic()
    try:
        target = int((wall + 3600) * 1e9)
        r = tool("set-clock", target)
        assert r.returncode == 0 and r.stdout.startswith(b"set;"), r
        guest_now = int(tool("exec", "--", "date", "+%s").stdout)
        assert abs(guest_now - (wall + 3600)) < 30, (guest_now, wall)
        # a time that is no time is refused, and the clock stays
        r = tool("set-clock", -5)
        assert r.returncode != 0 and b"not a time" in r.stderr, r
    finally:
        time.clock_settime(time.CLOCK_REALTIME, wall + (time.monotonic() - mono))
    assert abs(time.time() - (wall + (time.monotonic() - mono))) < 5
