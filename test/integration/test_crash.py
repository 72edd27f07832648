# Crash safety of pause, resume, snapshot and fork: emberd is killed (SIGKILL, by itself, at a
# crash point of build/test/emberd-hooks, see agent/crash-point.h) right after each step of each
# operation, then a plain emberd starts on the same state. Every sandbox must end fully
# RUNNING (its guest answers, its files there), fully PAUSED (and resumable with its files),
# or FAILED with its saved state kept; a snapshot exists completely (forks work) or not at
# all; and once everything is destroyed nothing is left on the node.

import os

import grpc
import pytest

from conftest import BUILD, wait_for
from test_pause import get, pause, resume
from test_sandbox import S, create, destroy, guest_exec, leftovers, stub
from test_snapshot import fork, snapshot, snapshots_dir

# build/test/emberd-hooks does not sit next to fcsim and ember-uffd: named for both agents
CONF = (f"[network]\npool_size = 0\n[vmm]\nkind = fcsim\nfcsim_bin = {BUILD}/fcsim\n"
        f"uffd_bin = {BUILD}/ember-uffd\n")

STEPS = {
    "pause": ["start", "pause-vm", "snapshot", "stop-vmm", "commit", "disk", "slot", "run-dir"],
    "resume": ["start", "slot", "disk", "run-dir", "memory-server", "spawn", "load",
               "guest-agent"],
    "snapshot": ["pause-vm", "snapshot", "flatten", "resume-vm", "commit"],
    "snapshot-paused": ["link-saved-state", "disk-up", "flatten", "disk-down", "commit"],
    "fork": ["slot", "disk", "run-dir", "memory-server", "spawn", "load", "guest-agent"],
}
CASES = [(op, step) for op, steps in STEPS.items() for step in steps]
# the name the crash point has: a fork is a create, a snapshot of a paused sandbox a snapshot
POINT = {"snapshot-paused": "snapshot", "fork": "create"}


def check_whole(e, n, sid, content):
    """RUNNING with its files, PAUSED and resumable with them, or FAILED with saved state."""
    sb = get(n, sid)
    if sb.state == S.SANDBOX_STATE_PAUSED:
        saved = os.path.join(e.state_dir, "sandboxes", sid, "snapshot")
        assert sorted(os.listdir(saved)) == ["mem", "vmstate"]
        sb = resume(n, sid)
    if sb.state == S.SANDBOX_STATE_RUNNING:
        p = guest_exec(e, sid, "cat", "/root/f")
        assert p.returncode == 0 and p.stdout == content, (sid, p)
        return "running"
    assert sb.state == S.SANDBOX_STATE_FAILED, sb
    assert "saved state is kept" in sb.state_reason, sb.state_reason
    assert os.path.isdir(os.path.join(e.state_dir, "sandboxes", sid, "snapshot")) or \
        os.path.isdir(os.path.join(e.state_dir, "sandboxes", sid, "snapshot.new"))
    return "failed"


@pytest.mark.parametrize("op,step", CASES, ids=[f"{o}:{s}" for o, s in CASES])
def test_kill_at_every_step(start_emberd, workdir, op, step):
    root = os.path.join(workdir, "node")
    e = start_emberd(CONF, root=root)
    n = stub(e)
    create(n, "src")
    assert guest_exec(e, "src", "sh", "-c", "echo data > /root/f && sync").returncode == 0
    if op in ("resume", "snapshot-paused"):
        pause(n, "src")
    if op == "fork":
        snapshot(n, "base", "src")
    e.proc.stop()

    env = dict(os.environ, EMBER_TEST_KILL_AFTER=f"{POINT.get(op, op)}:{step}")
    h = start_emberd(CONF, root=root, hostns=e.hostns, binary="test/emberd-hooks", env=env)
    hn = stub(h)
    with pytest.raises(grpc.RpcError):
        if op == "pause":
            pause(hn, "src")
        elif op == "resume":
            resume(hn, "src")
        elif op.startswith("snapshot"):
            snapshot(hn, "snap", "src")
        else:
            fork(hn, "kid", "base")
    wait_for(lambda: not h.proc.alive(), 30, "emberd-hooks to die at its crash point")
    assert f"crash point {POINT.get(op, op)}:{step} reached" in h.proc.log()

    e2 = start_emberd(CONF, root=root, hostns=e.hostns)
    n2 = stub(e2)
    outcome = check_whole(e2, n2, "src", b"data\n")
    if op == "pause" and step in ("start", "pause-vm", "snapshot"):
        assert outcome == "running"  # the VMM still ran: the pause is rolled back
    ids = ["src"]
    snaps = [s.id for s in n2.ListSnapshots(S.ListSnapshotsRequest(), timeout=10).snapshots]
    if op.startswith("snapshot"):
        assert snaps in ([], ["snap"])
        if snaps:
            fork(n2, "check", "snap")
            ids.append("check")
            assert guest_exec(e2, "check", "cat", "/root/f").stdout == b"data\n"
        assert get(n2, "src").state in (S.SANDBOX_STATE_RUNNING, S.SANDBOX_STATE_PAUSED)
    if op == "fork":
        kids = [s.id for s in n2.ListSandboxes(S.ListSandboxesRequest(), timeout=10).sandboxes
                if s.id == "kid"]
        if kids:
            check_whole(e2, n2, "kid", b"data\n")
            ids.append("kid")
    for i in ids:
        destroy(n2, i)
    for s in [s.id for s in n2.ListSnapshots(S.ListSnapshotsRequest(), timeout=10).snapshots]:
        n2.DeleteSnapshot(S.DeleteSnapshotRequest(snapshot_id=s), timeout=10)
    assert leftovers(e2) == []
    assert snapshots_dir(e2) == []
