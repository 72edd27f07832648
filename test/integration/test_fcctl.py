# fcctl and ember-uffd against fcsim: the whole cycle (spawn in a namespace, configure, boot,
# vsock, pause, snapshot, stop, restore through ember-uffd, vsock again) with the guest memory
# verified by fcsim after every restore; Firecracker's faults passed on verbatim; a VMM killed
# in the middle of a call; a memory server that dies or cannot serve; one VMM watched from
# several threads and from an event loop; limits (socket path length, answer size); what a
# spawned VMM inherits. test/fcctl/fcctl-tool.c drives the library; this file checks what it
# printed. At the end, emberd's firecracker probe (agent/probe.c) against binaries that hang.
#
# The same scenarios run against a real Firecracker when one is installed and /dev/kvm works
# (EMBER_FC_KERNEL and EMBER_FC_ROOTFS name a guest kernel and image); they skip otherwise.

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from conftest import BUILD, SLOW, wait_for
from fcsim_util import FCSIM, build_rootfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

TOOL = os.path.join(BUILD, "test", "fcctl-tool")
UFFD = os.path.join(BUILD, "ember-uffd")


def fields(text):
    """key=value pairs of the tool's output; a key seen twice keeps its last value."""
    out = {}
    for m in re.finditer(r"(\w+)=(\S*)", text):
        out[m.group(1)] = m.group(2)
    return out


@pytest.fixture(scope="module")
def image():
    root = tempfile.mkdtemp(prefix="ember-fcctl-img-", dir="/tmp")
    path = build_rootfs(os.path.join(root, "base.ext4"))
    kernel = os.path.join(root, "vmlinux")
    with open(kernel, "wb") as f:
        f.write(b"\x7fELF not a real kernel: fcsim does not boot it")
    yield path, kernel
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def run(image):
    """Runs one fcctl-tool scenario in a new network namespace (unshare: gone with the tool)
    and a fresh directory; returns (exit status, stdout, the directory)."""
    dirs = []

    def go(scenario, *args, env=None, binary=FCSIM, timeout=120, rootfs=None, kernel=None):
        d = tempfile.mkdtemp(prefix="ember-fcctl-", dir="/tmp")
        dirs.append(d)
        e = dict(os.environ, **(env or {}))
        p = subprocess.run(["unshare", "--net", TOOL, "--binary", binary, "--workdir", d,
                            "--rootfs", rootfs or image[0], "--kernel", kernel or image[1],
                            *args, scenario],
                           capture_output=True, text=True, env=e, timeout=timeout * SLOW)
        return p.returncode, p.stdout + p.stderr, d

    yield go
    for d in dirs:
        left = left_behind(d)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)
        assert not left, f"processes left running in {d}: {left}"


def left_behind(d):
    """Processes whose working directory is under d: VMMs and memory servers the scenario
    started must all be gone when it returns."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if cwd.startswith(d) or d.encode() in cmd:
            out.append(int(pid))
    return out


def uffd_log(d, name):
    with open(os.path.join(d, name, "uffd.log"), errors="replace") as f:
        return f.read()


def test_cycle_file_backend(run):
    rc, out, _ = run("cycle")
    assert rc == 0, out
    assert out.count("guest_echo=ok") == 2, out
    assert "state=Running" in out and "load_result=0" in out, out
    # fcsim ends on SIGTERM like Firecracker's default: the stop was ours and it went.
    assert "stopped=1" in out, out


@pytest.mark.parametrize("mem,prefetch,order", [
    (64, False, "sequential"),
    (64, True, "random"),
    (1024, False, "random"),
    (1024, True, "sequential"),
])
def test_cycle_uffd(run, mem, prefetch, order):
    args = ["--uffd", UFFD, "--mem", str(mem)] + (["--prefetch"] if prefetch else [])
    rc, out, d = run("cycle", *args,
                     env={"FCSIM_VERIFY_MEMORY": "all", "FCSIM_VERIFY_ORDER": order})
    assert rc == 0, out
    f = fields(out)
    # load_result=0 means fcsim read every page of guest memory through ember-uffd and found
    # what the first boot wrote (a wrong or missing page fails the load).
    assert f["load_result"] == "0", out
    assert out.count("guest_echo=ok") == 2, out
    assert f["uffd_exit"] == "0", out + uffd_log(d, "b")
    log = uffd_log(d, "b")
    # It ended because the VMM went away, not on an error.
    assert re.search(r'end="firecracker (exited|closed the connection)"', log), log
    pages = int(re.search(r"pages_copied=(\d+)", log).group(1))
    # Every page fcsim touched was copied once (verification reads all of them).
    assert pages >= mem * 256 * 0.5, log


def test_restore_with_overrides(run):
    # Booted with eth0 on tap0 and v.sock; restored with eth0 on tap1 and v2.sock.
    rc, out, _ = run("cycle", "--net", "--uffd", UFFD)
    assert rc == 0, out
    f = fields(out)
    assert f["load_result"] == "0" and f["tap1_exists"] == "1", out
    assert out.count("guest_echo=ok") == 2, out


def test_fault_is_verbatim(run):
    rc, out, _ = run("fault")
    assert rc == 0, out
    assert "result=-22 fault_message=Cannot start microvm without kernel configuration." in out
    assert re.search(r"result=-22 fault_message=Unable to create the block device: "
                     r"BackingFile\(Os \{ code: 2.*/nonexistent/disk", out), out


def test_vmm_killed_mid_call(run):
    rc, out, _ = run("killmid")
    assert rc == 0, out
    f = fields(out)
    assert int(f["result"]) < 0, out
    # Killed 0.5 s into a call with a 20 s timeout: the caller learns at once, and why.
    assert float(f["elapsed_ms"]) < 5000 * SLOW, out
    assert "was killed by signal 9 during the call" in out, out


def test_uffd_gone_stops_vmm(run):
    rc, out, _ = run("uffdgone", "--uffd", UFFD)
    assert rc == 0, out
    f = fields(out)
    assert f["supervise"] == "-32", out  # -EPIPE: the helper ended first
    assert f["vmm_exited"] == "1" and f["stopped_by_us"] == "1", out
    assert float(f["within_ms"]) < 6000 * SLOW, out


def test_truncated_memory_file_kills_vmm(run):
    rc, out, d = run("truncated", "--uffd", UFFD)
    assert rc == 0, out
    f = fields(out)
    assert f["uffd_exit"] != "0", out
    # The load does not hang: the VMM was killed under it, and fcctl says so.
    assert f["restored"] == "0", out
    assert "was killed by signal 9 during the call" in out, out
    log = uffd_log(d, "t")
    # ember-uffd says why, and the VMM does not hang waiting for pages nobody will serve.
    assert re.search(r"memory file truncated: needs \d+ bytes, has 1048576", log), log
    assert "killed firecracker" in log, log


def test_adopt(run):
    rc, out, _ = run("adopt")
    assert rc == 0, out
    f = fields(out)
    assert f["wrong_id"] == "-3" and "not started with --id someone-else" in out, out
    assert f["wrong_dir"] == "-3" and "does not work in /tmp" in out, out
    assert f["wrong_binary"] == "-3" and "not /usr/bin/sleep" in out, out
    assert f["adopt"] == "0" and f["adopted_state"] == "Running", out
    assert "guest_echo=ok" in out.split("adopt=0")[1], out
    assert f["gone"] == "1", out


def test_spawn_failures_say_why(run):
    rc, out, _ = run("spawnfail")
    assert rc == 0, out
    assert "missing_binary=-2 error=cannot execute /nonexistent/firecracker: No such file" in out
    assert "missing_netns=-2 error=network namespace /nonexistent/netns: No such file" in out
    assert re.search(r"exits_early=-10 error=the VMM exited before opening its API socket "
                     r"\(status 1\); see its output in /tmp/\S+/sf/fc.out", out), out


FAKE_JAILER = os.path.join(os.path.dirname(__file__), "..", "fcctl", "fake-jailer")


def test_jailer(run):
    """The jailer path: fcctl passes the jailer's arguments (a stand-in that follows
    docs/jailer.md runs fcsim in a pivot_root'ed chroot), waits for the API socket inside the
    chroot, resolves relative paths there, and adopts the jailed VMM by its copied binary."""
    rc, out, d = run("jailer", "--jailer", FAKE_JAILER)
    # A jailed VMM works in "/" of its own mount namespace, out of run()'s sight: look for it
    # by its id, and fail if it outlived the scenario.
    def cmdline(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read()
        except OSError:  # gone meanwhile
            return b""

    left = [int(p) for p in filter(str.isdigit, os.listdir("/proc"))
            if b"--id=fcctl-jail" in cmdline(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert rc == 0, out
    assert not left, f"jailed VMM left running: {left}"
    f = fields(out)
    assert f["bad_id"] == "-22", out
    assert f["root_is_chroot"] == "1", out
    assert out.count("guest_echo=ok") == 2, out
    # the original binary is not what a jailed VMM runs: the jailer's copy is
    # (/proc names the copy as seen from the jail, or from our root when that is a chroot)
    assert f["adopt_original"] == "-3" and re.search(r"runs \S*/fcsim, not ", out), out
    assert f["adopt"] == "0" and f["adopted_state"] == "Running", out
    assert f["stopped"] == "1" and f["gone"] == "1", out
    assert "respawn=ok" in out and "respawn_state=Not started" in out, out
    # the jail is the jailer's layout: <base>/<exec file name>/<id>/root, with the copy in it;
    # the name is the file's, not the link's (the tool runs bin/firecracker -> fcsim)
    root = os.path.join(d, "jail", "srv", "fcsim", "fcctl-jail", "root")
    assert f["jail_root"] == root, out
    assert os.path.isfile(os.path.join(root, "fcsim")), out


def real_firecracker():
    fc = shutil.which("firecracker")
    kernel, rootfs = os.environ.get("EMBER_FC_KERNEL"), os.environ.get("EMBER_FC_ROOTFS")
    if not fc:
        return None, "no firecracker binary on PATH"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return None, "no usable /dev/kvm"
    if not kernel or not rootfs:
        return None, "EMBER_FC_KERNEL and EMBER_FC_ROOTFS are not set"
    return (fc, kernel, rootfs), None


@pytest.mark.parametrize("backend", ["file", "uffd"])
def test_real_firecracker_cycle(run, backend):
    found, why = real_firecracker()
    if not found:
        pytest.skip(why)
    fc, kernel, rootfs = found
    args = ["--uffd", UFFD] if backend == "uffd" else []
    rc, out, _ = run("cycle", *args, binary=fc, kernel=kernel, rootfs=rootfs,
                     env={"PATH": os.environ.get("PATH", "")})
    assert rc == 0, out
    assert out.count("guest_echo=ok") == 2, out


def test_threads_agree_on_the_exit(run):
    """Threads that wait, reap, poll the pidfd, call the API, supervise and stop one VMM while
    it ends: none fails with ECHILD, all report the same exit, and the VMM is reaped."""
    rc, out, _ = run("race")
    assert rc == 0, out
    f = fields(out)
    assert f["race_rounds"] == "20" and f["race_failures"] == "0", out
    assert "mismatch" not in out and "not_reaped" not in out, out
    # both ways of ending were exercised: stopped by a thread (SIGTERM), killed from outside
    assert re.search(r"round=\d+ signal=9 known=1 stopped_by_us=0", out), out
    assert re.search(r"round=\d+ signal=\d+ known=1 stopped_by_us=1", out), out


def test_reap_from_an_event_loop(run):
    rc, out, _ = run("reap")
    assert rc == 0, out
    f = fields(out)
    assert f["running_reap"] == "-11" and f["untouched"] == "1", out  # -EAGAIN, *ret as it was
    assert f["epoll_running"] == "0" and f["epoll_exited"] == "1", out
    assert "reap=0 exited=1 known=1 signal=9 code=0 stopped_by_us=0" in out, out
    assert f["zombie_gone"] == "1", out
    assert f["reap_again"] == "0" and f["wait_after"] == "0" and f["stop_after"] == "0", out
    assert f["all_same"] == "1", out
    # documented in fcctl.h: the pidfd stays readable, the loop must drop it
    assert f["epoll_after_reap"] == "1", out
    # an adopted VMM is not our child: it ended, nothing more is known
    assert f["adopted_running_reap"] == "-11", out
    assert "adopted_reap=0 exited=1 known=0" in out, out
    assert f["adopted_again"] == "0" and f["adopted_stop"] == "0", out
    assert f["adopted_same"] == "1", out


def test_socket_path_too_long(run):
    rc, out, d = run("longpath", "--jailer", FAKE_JAILER)
    assert rc == 0, out
    f = fields(out)
    # refused at once (not after the start timeout), and nothing made or started
    assert f["too_long"] == "-36" and float(f["within_ms"]) < 1000 * SLOW, out
    assert re.search(r"error=the API socket path /tmp/\S+/x+/api.sock is 110 bytes long, "
                     r"3 more than a unix socket address holds \(107\)", out), out
    assert f["output_created"] == "0", out
    assert f["at_limit"] == "0" and f["at_limit_state"] == "Not", out  # "Not started"
    assert f["jail_too_long"] == "-36", out
    assert re.search(r"error=the API socket path in the jailer's chroot /tmp/\S+/jl/j+/fcsim/"
                     r"fcctl-test/root/api.sock is 110 bytes long, 3 more", out), out
    assert f["chroot_created"] == "0", out


STUB_VMM = os.path.join(os.path.dirname(__file__), "..", "fcctl", "stub-vmm")


def test_api_answer_is_bounded(run):
    """A VMM whose answer never ends, or is too long, fails the call with -EMSGSIZE at once
    instead of filling memory; a large answer within the limit still works, on the connection
    the aborted answer left behind."""
    rc, out, _ = run("bigbody", binary=os.path.abspath(STUB_VMM))
    assert rc == 0, out
    f = fields(out)
    assert f["endless"] == "-90" and f["untouched"] == "1", out  # -EMSGSIZE
    assert "fault=GET /: the VMM's answer is longer than 64 KiB" in out, out
    assert float(f["within_ms"]) < 2000 * SLOW, out
    assert f["large_within_limit"] == "0" and f["version"] == "1.16.1", out
    assert f["too_long_fault"] == "-90", out
    assert "fault=PUT /actions: the VMM's answer is longer than 64 KiB" in out, out
    assert int(f["maxrss_kib"]) < 256 * 1024, out


def test_spawn_resets_signals(run):
    """emberd ignores SIGPIPE; the VMM it spawns must not: every ignored signal is back to the
    default in the child, and nothing is blocked."""
    rc, out, _ = run("signals")
    assert rc == 0, out
    f = fields(out)
    ignored = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGHUP - 1)) | \
        (1 << (signal.SIGUSR2 - 1))
    assert int(f["parent_sigign"], 16) & ignored == ignored, out  # the test's premise
    assert int(f["parent_sigblk"], 16) & (1 << (signal.SIGUSR1 - 1)), out
    assert int(f["child_sigign"], 16) == 0, out
    assert int(f["child_sigblk"], 16) == 0, out
    assert f["state"] == "Not", out  # "Not started": the VMM behind the wrapper answered


# ---- emberd's firecracker probe (agent/probe.c) ----

def fake_firecracker(path, script):
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + script)
    os.chmod(path, 0o755)
    return path


def marked(marker):
    """Processes whose command line holds marker."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            continue
    return out


def probe_of(e):
    from ember.v1 import node_pb2, node_pb2_grpc
    with e.channel() as ch:
        return node_pb2_grpc.NodeStub(ch).GetNode(node_pb2.GetNodeRequest(),
                                                  timeout=30).capabilities.firecracker


# Each hanging binary leaves `sleep <marker>` behind unless the probe kills what it started.
@pytest.mark.parametrize("script", [
    'echo "Firecracker v1.16.1"\nexec sleep {marker}\n',       # prints a line, then hangs
    'exec sleep {marker}\n',                                   # never prints
    'echo "Firecracker v1.16.1"\nsleep {marker}\necho done\n',  # its child hangs, it waits
    'echo "Firecracker v1.16"\nsleep {marker} >/dev/null &\nexec sleep {marker}\n',
], ids=["line-then-hang", "silent", "child-hangs", "background-child"])
def test_firecracker_probe_deadline(start_emberd, workdir, script):
    marker = "3600.%d" % (abs(hash(script)) % 100000)
    fc = fake_firecracker(os.path.join(workdir, "fc"), script.format(marker=marker))
    try:
        e = start_emberd(f"[vmm]\nkind = fcsim\nfirecracker_bin = {fc}\n")
        t = time.monotonic()
        p = probe_of(e)
        took = time.monotonic() - t
        assert not p.available and p.version == "", p
        assert p.reason == f"{fc} --version did not answer within 2 s", p
        assert took < 4 * SLOW, took
        # killed and reaped, with everything it started
        wait_for(lambda: not marked(marker), 5, "the probed binary's processes to go")
    finally:
        for pid in marked(marker):
            os.kill(pid, signal.SIGKILL)


def test_firecracker_probe_does_not_wait_for_a_background_child(start_emberd, workdir):
    """It exited and answered; a child it left holding its stdout does not make it hang."""
    marker = "3599.5"
    fc = fake_firecracker(os.path.join(workdir, "fc"),
                          f'sleep {marker} &\necho "Firecracker v1.16.1"\n')
    try:
        e = start_emberd(f"[vmm]\nkind = fcsim\nfirecracker_bin = {fc}\n")
        t = time.monotonic()
        p = probe_of(e)
        assert p.available and p.version == "1.16.1", p
        assert time.monotonic() - t < 2 * SLOW
    finally:
        for pid in marked(marker):
            os.kill(pid, signal.SIGKILL)


def test_firecracker_probe_status(start_emberd, workdir):
    fc = fake_firecracker(os.path.join(workdir, "fc"), 'echo "Firecracker v1.16.1"\nexit 3\n')
    e = start_emberd(f"[vmm]\nkind = fcsim\nfirecracker_bin = {fc}\n")
    p = probe_of(e)
    assert not p.available and p.reason == f"{fc} --version failed: non-zero exit (3)", p


# A stand-in for Firecracker's side of the Uffd handshake: connects, sends the region list
# with an fd (a real userfaultfd, or a pipe when BAD_FD is set). Its own argv is what
# ember-uffd checks for --id.
PEER = r"""
import ctypes, json, os, socket, sys
sock_path, bad_fd = sys.argv[1], os.environ.get("BAD_FD") == "1"
if bad_fd:
    fd = os.pipe()[0]
else:
    fd = ctypes.CDLL(None, use_errno=True).syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)
    assert fd >= 0, ctypes.get_errno()
regions = [{"base_host_virt_addr": 0x7f0000000000, "size": 1 << 20, "offset": 0,
            "page_size": 4096, "page_size_kib": 4096}]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sock_path)
socket.send_fds(s, [json.dumps(regions).encode()], [fd])
s.recv(1)
"""


@pytest.mark.parametrize("case", ["other-id", "other-uid", "not-a-userfaultfd"])
def test_uffd_serves_only_its_vmm(case):
    """ember-uffd --id X serves only a peer started with --id X, of its own uid, and only
    with a userfaultfd: anything else is refused with a message saying which check failed."""
    d = tempfile.mkdtemp(prefix="ember-uffd-peer-", dir="/tmp")
    os.chmod(d, 0o777)  # so that the other-uid peer can reach the socket at all
    mem = os.path.join(d, "mem")
    with open(mem, "wb") as f:
        f.truncate(1 << 20)
    sock = os.path.join(d, "uffd.sock")
    u = subprocess.Popen([UFFD, sock, mem, "--id", "sbx", "--timeout-ms", "20000"],
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.exists(sock), 10, "the socket")
        os.chmod(sock, 0o777)
        argv = ["python3", "-c", PEER, sock]
        argv += ["--id", "other"] if case == "other-id" else ["--id", "sbx"]
        # (nobody may not create a userfaultfd: that peer sends a pipe, and is refused for
        # its uid before its fd is looked at)
        env = dict(os.environ, BAD_FD="0" if case == "other-id" else "1")
        peer = subprocess.Popen(argv, env=env, user=65534 if case == "other-uid" else None,
                                stderr=subprocess.PIPE)
        _, err = u.communicate(timeout=30)
        peer.kill()
        peer.wait()
    finally:
        if u.poll() is None:
            u.kill()
            u.wait()
        shutil.rmtree(d, ignore_errors=True)
    assert u.returncode == 1, err
    want = {"other-id": "not the VMM of sbx (no --id sbx)",
            "other-uid": "uid 65534, only uid 0 may connect",
            "not-a-userfaultfd": "is not a userfaultfd"}[case]
    assert want in err, err


@pytest.mark.parametrize("when", ["listening", "serving"])
def test_uffd_sigterm_writes_its_statistics(when):
    """SIGTERM ends ember-uffd with status 0 and its statistics line, whether or not a VMM
    had connected: the line is what an operator reads after a stop."""
    d = tempfile.mkdtemp(prefix="ember-uffd-term-", dir="/tmp")
    mem = os.path.join(d, "mem")
    with open(mem, "wb") as f:
        f.truncate(1 << 20)
    sock = os.path.join(d, "uffd.sock")
    u = subprocess.Popen([UFFD, sock, mem, "--timeout-ms", "20000"], stderr=subprocess.PIPE,
                         text=True)
    peer = None
    try:
        wait_for(lambda: os.path.exists(sock), 10, "the socket")
        if when == "serving":
            # PEER's userfaultfd, made usable (UFFDIO_API) as Firecracker's is
            api = ("import fcntl, struct\n"
                   "fcntl.ioctl(fd, 0xC018AA3F, bytearray(struct.pack('<QQQ', 0xAA, 0, 0)))\n"
                   "s = socket.socket")
            script = PEER.replace("s = socket.socket", api, 1)
            peer = subprocess.Popen(["python3", "-c", script, sock], stderr=subprocess.PIPE)
            # connected once the socket's name is gone (one peer only)
            wait_for(lambda: not os.path.exists(sock), 10, "the peer's connection")
        u.send_signal(signal.SIGTERM)
        _, err = u.communicate(timeout=30)
    finally:
        for p in (u, peer):
            if p and p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(d, ignore_errors=True)
    assert u.returncode == 0, err
    line = [l for l in err.splitlines() if l.startswith("ember-uffd: stats: ")]
    assert len(line) == 1, err
    assert 'end="stopped"' in line[0], line[0]
    if when == "serving":
        assert f"peer={peer.pid}" in line[0], line[0]
