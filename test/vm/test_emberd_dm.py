# emberd over device-mapper (in the VM): sandboxes created through the API share one read-only
# base loop device per template, each gets its dm snapshot, a restarted emberd adopts the live
# devices (same device, same data), and destroy leaves no device behind. fcsim runs the guests.

import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import BUILD, dm_names, loops_under, run

SRCDIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(BUILD, "py"))

import grpc  # noqa: E402

from ember.v1 import node_pb2 as S, node_pb2_grpc  # noqa: E402

GUEST_TOOL = os.path.join(BUILD, "test", "guest-tool")
SLOW = 4.0 if os.environ.get("EMBER_SANITIZE") == "1" else 1.0


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout * SLOW
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Agent:
    def __init__(self, root, state=None):
        self.root = root
        self.state = state or os.path.join(root, "state")
        self.hostns = os.path.join(root, "hostns")
        if not os.path.exists(self.hostns):
            open(self.hostns, "w").close()
            run("unshare", f"--net={self.hostns}", "true")
            run("nsenter", f"--net={self.hostns}", "ip", "link", "set", "lo", "up")
        self.conf = os.path.join(root, "ember.conf")
        with open(self.conf, "w") as f:
            f.write(f"[storage]\nbackend = dm\n[network]\nnetns_dir = {root}/netns\n"
                    "pool_size = 0\n[sandboxes]\nmemory_reserve_mib = 0\n"
                    "[vmm]\nboot_timeout_s = 120\n")
        self.sock = os.path.join(root, "run", "ember.sock")
        self.p = None

    def start(self):
        self.log = open(os.path.join(self.root, "emberd.log"), "ab")
        self.p = subprocess.Popen(
            ["nsenter", f"--net={self.hostns}", os.path.join(BUILD, "emberd"), "--config",
             self.conf, "--state-dir", self.state, "--run-dir",
             os.path.join(self.root, "run")], stdout=self.log, stderr=self.log)

        def up():
            try:
                return self.stub().GetNode(S.GetNodeRequest(), timeout=5).serving_state == \
                    S.SERVING_STATE_SERVING
            except grpc.RpcError:
                return False
        wait_for(lambda: self.p.poll() is not None or up(), 120, "emberd")
        assert self.p.poll() is None, open(os.path.join(self.root, "emberd.log")).read()

    def stub(self):
        return node_pb2_grpc.NodeStub(grpc.insecure_channel("unix:" + self.sock))

    def stop(self, sig=signal.SIGTERM):
        if self.p and self.p.poll() is None:
            self.p.send_signal(sig)
            self.p.wait(60)
        self.log.close()


def kill_processes_in(root):
    """Every process working under root (VMMs, ember-uffd) gets SIGKILL."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.readlink(f"/proc/{pid}/cwd").startswith(root + "/"):
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


def stop_all(a, root):
    """After a test, pass or fail: emberd, every dm device and every process it left."""
    a.stop()
    for name in dm_names():
        run("dmsetup", "remove", "--retry", name, check=False)
    kill_processes_in(root)


def guest_sh(root, sid, script):
    uds = os.path.join(root, "run", "sandboxes", sid, "v.sock")
    return subprocess.run([GUEST_TOOL, "--vsock", uds, "exec", "--no-stdin", "--", "sh", "-c",
                           script], capture_output=True, timeout=120)


def test_dm_sandboxes_share_one_base_and_survive_a_restart(tmp_path):
    root = str(tmp_path)
    a = Agent(root)
    a.start()
    try:
        n = a.stub()
        node = n.GetNode(S.GetNodeRequest(), timeout=10)
        assert node.storage_backend == "dm" and node.vmm == "fcsim"
        base = n.GetTemplate(S.GetTemplateRequest(template_id="demo"), timeout=10).rootfs.path
        ids = [f"d{i}" for i in range(10)]

        def create(sid):
            return n.CreateSandbox(S.CreateSandboxRequest(
                sandbox_id=sid, spec=S.SandboxSpec(template_id="demo", memory_mib=128)),
                timeout=600)
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            made = list(ex.map(create, ids))
        assert all(s.state == S.SANDBOX_STATE_RUNNING for s in made)
        assert dm_names() == sorted(f"ember-{i}" for i in ids)
        # one shared read-only loop device for the template's rootfs, one CoW loop each
        bases = [l for l in loops_under(root) if l[1] == base]
        assert len(bases) == 1, loops_under(root)
        ro = run("blockdev", "--getro", bases[0][0]).stdout.strip()
        assert ro == "1"
        cows = [l for l in loops_under(root) if l[1].endswith("/cow.img")]
        assert len(cows) == 10

        p = guest_sh(root, "d3", "echo persisted > /root/mark && sync")
        assert p.returncode == 0, p
        minors = run("dmsetup", "info", "-c", "--noheadings", "-o", "name,minor").stdout

        a.stop(signal.SIGKILL)
        # what a crash could leave: a dm device of ours that no record claims
        stray_cow = os.path.join(root, "state", "stray-cow.img")
        with open(stray_cow, "wb") as f:
            f.truncate(64 << 20)
        sectors = os.path.getsize(base) // 512
        # over the shared base loop, as emberd makes them
        bl = [l for l in loops_under(root) if l[1] == base][0][0]
        cl = run("losetup", "-f", "--show", stray_cow).stdout.strip()
        run("dmsetup", "create", "ember-stray", "--table",
            f"0 {sectors} snapshot {bl} {cl} P 8")
        run("losetup", "-d", cl)  # auto-clear: it goes with the device
        assert "ember-stray" in dm_names()
        a.start()
        assert "ember-stray" not in dm_names()
        assert not [l for l in loops_under(root) if l[1] == stray_cow]
        n = a.stub()
        lst = {s.id: s for s in n.ListSandboxes(S.ListSandboxesRequest(), timeout=30).sandboxes}
        assert all(lst[i].state == S.SANDBOX_STATE_RUNNING for i in ids), lst
        # the same devices, taken over, not made again
        assert run("dmsetup", "info", "-c", "--noheadings", "-o", "name,minor").stdout == minors
        assert len([l for l in loops_under(root) if l[1] == base]) == 1
        p = guest_sh(root, "d3", "cat /root/mark")
        assert p.stdout.strip() == b"persisted", p

        # destroying some must not take the shared base away from the others
        for sid in ids[:5]:
            assert n.DestroySandbox(S.DestroySandboxRequest(sandbox_id=sid), timeout=120).found
        assert len([l for l in loops_under(root) if l[1] == base]) == 1
        assert guest_sh(root, "d7", "cat /proc/self/mounts >/dev/null && echo ok").returncode == 0
        for sid in ids[5:]:
            n.DestroySandbox(S.DestroySandboxRequest(sandbox_id=sid), timeout=120)
        assert dm_names() == []
        assert loops_under(root) == []
        assert os.listdir(os.path.join(root, "state", "sandboxes")) == []
    finally:
        stop_all(a, root)


def test_dm_pause_resume_snapshot_and_forks(tmp_path):
    """Over device-mapper: pause removes the dm device only after the VMM has exited (a
    removal while it runs is refused by the kernel, so a wrong order would fail the pause),
    resume brings the same CoW back, and the forks of a snapshot share one read-only loop
    device over its flattened image, each with a fresh CoW of its own."""
    root = str(tmp_path)
    a = Agent(root)
    a.start()
    try:
        n = a.stub()

        def create(sid, **src):
            spec = S.SandboxSpec(memory_mib=128, **src) if "template_id" in src else \
                S.SandboxSpec(**src)
            return n.CreateSandbox(S.CreateSandboxRequest(sandbox_id=sid, spec=spec),
                                   timeout=600)
        create("src", template_id="demo")
        assert guest_sh(root, "src", "echo kept > /root/f && sync").returncode == 0
        # the kernel refuses to remove a dm device its VMM holds open: the order matters
        r = run("dmsetup", "remove", "ember-src", check=False)
        assert r.returncode != 0 and "busy" in (r.stderr + r.stdout).lower(), r
        assert dm_names() == ["ember-src"]

        sb = n.PauseSandbox(S.PauseSandboxRequest(sandbox_id="src"), timeout=600)
        assert sb.state == S.SANDBOX_STATE_PAUSED, sb
        names = [s.name for s in sb.last_operation.steps]
        assert names.index("stop-vmm") < names.index("disk"), names
        assert dm_names() == []
        assert loops_under(root) == []  # the CoW loop and the base went with the device
        sb = n.ResumeSandbox(S.ResumeSandboxRequest(sandbox_id="src"), timeout=600)
        assert sb.state == S.SANDBOX_STATE_RUNNING
        assert dm_names() == ["ember-src"]
        assert guest_sh(root, "src", "cat /root/f").stdout.strip() == b"kept"

        snap = n.CreateSnapshot(S.CreateSnapshotRequest(snapshot_id="snap", sandbox_id="src"),
                                timeout=600)
        image = os.path.join(root, "state", "snapshots", "snap", "rootfs.ext4")
        forks = [f"k{i}" for i in range(20)]
        t = time.monotonic()
        for k in forks:
            assert create(k, snapshot_id="snap").state == S.SANDBOX_STATE_RUNNING
        print(f"20 forks created in {time.monotonic() - t:.1f} s (TCG)")
        shared = [l for l in loops_under(root) if l[1] == image]
        assert len(shared) == 1, loops_under(root)
        assert run("blockdev", "--getro", shared[0][0]).stdout.strip() == "1"
        major_minor = run("lsblk", "-ndo", "MAJ:MIN", shared[0][0]).stdout.strip()
        for k in forks:
            table = run("dmsetup", "table", f"ember-{k}").stdout.split()
            assert table[2] == "snapshot" and table[3] == major_minor, table
            cow = os.path.join(root, "state", "sandboxes", k, "cow.img")
            used = os.stat(cow).st_blocks * 512
            print(f"fork {k}: CoW uses {used} bytes fresh")
            assert used <= 1 << 20, used
            assert guest_sh(root, k, "cat /root/f").stdout.strip() == b"kept"
        # each fork sees only its own later writes
        for k in forks:
            assert guest_sh(root, k, f"echo {k} > /root/mine && sync").returncode == 0
        for k in forks:
            out = guest_sh(root, k, "cat /root/mine; cat /root/f").stdout.split()
            assert out == [k.encode(), b"kept"], (k, out)
        code = None
        try:
            n.DeleteSnapshot(S.DeleteSnapshotRequest(snapshot_id="snap"), timeout=60)
        except grpc.RpcError as e:
            code = e.code()
        assert code == grpc.StatusCode.FAILED_PRECONDITION, code
        assert snap.dependent_sandbox_count == 0
        for k in forks + ["src"]:
            n.DestroySandbox(S.DestroySandboxRequest(sandbox_id=k), timeout=120)
        n.DeleteSnapshot(S.DeleteSnapshotRequest(snapshot_id="snap"), timeout=60)
        assert dm_names() == []
        assert loops_under(root) == []
        assert os.listdir(os.path.join(root, "state", "snapshots")) == []
    finally:
        stop_all(a, root)
