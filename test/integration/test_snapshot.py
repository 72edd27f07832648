# Snapshots and forks through emberd (fcsim + file backend on the host): CreateSnapshot of a
# running and of a paused sandbox, sandboxes created from a snapshot (each sees the
# snapshot's files and only its own later writes), the memory file shared and never copied,
# DeleteSnapshot refused while forks exist, the errors node.proto lists, and a restart.

import concurrent.futures
import os
import signal
import struct
import subprocess

import grpc

from conftest import SLOW, processes_under, wait_for
from test_pause import get, pause, record, resume, steps
from test_sandbox import S, code_of, create, destroy, guest_exec, leftovers, states, stub, \
    watch


def snapshot(n, snap, sid, labels=None, timeout=120):
    return n.CreateSnapshot(S.CreateSnapshotRequest(snapshot_id=snap, sandbox_id=sid,
                                                    labels=labels or {}),
                            timeout=timeout * SLOW)


def fork(n, sid, snap, timeout=120, **kw):
    s = S.SandboxSpec(snapshot_id=snap, **kw)
    return n.CreateSandbox(S.CreateSandboxRequest(sandbox_id=sid, spec=s), timeout=timeout * SLOW)


def list_snapshots(n, **kw):
    return [s.id for s in n.ListSnapshots(S.ListSnapshotsRequest(**kw), timeout=10).snapshots]


def snapshots_dir(e):
    """What is left in the snapshots directory, once the files of deleted snapshots (removed
    on a worker after DeleteSnapshot answered) are gone."""
    d = os.path.join(e.state_dir, "snapshots")

    def ls():
        return sorted(os.listdir(d)) if os.path.isdir(d) else []
    wait_for(lambda: not any(f.startswith(".deleted-") for f in ls()), 60,
             "the deleted snapshots' files to go")
    return ls()


def test_snapshot_and_twenty_forks(start_emberd):
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    src = create(n, "src")
    assert guest_exec(e, "src", "sh", "-c", "echo base > /root/f && sync").returncode == 0
    call, events, _ = watch(e)
    wait_for(lambda: events, 10, "the watch's resync")
    snap = snapshot(n, "snap1", "src", labels={"team": "a"})
    assert snap.id == "snap1" and snap.source_sandbox_id == "src"
    assert snap.template_id == "demo" and snap.memory_mib == 128 and snap.vcpu_count == 1
    assert snap.firecracker_version == src.firecracker_version
    d = os.path.join(e.state_dir, "snapshots", "snap1")
    # real use of the memory file, device state and flattened disk (sparse files), and of
    # the directory itself
    assert snap.disk_used_bytes == sum(os.stat(os.path.join(d, f)).st_blocks * 512
                                       for f in os.listdir(d)) + os.stat(d).st_blocks * 512
    assert snap.dependent_sandbox_count == 0
    # the source ran on, unchanged, and no event was emitted for it
    sb = get(n, "src")
    assert sb.state == S.SANDBOX_STATE_RUNNING and sb.revision == src.revision
    assert guest_exec(e, "src", "true").returncode == 0
    assert states(events, "src") == []
    # a retry returns it; another source or labels is ALREADY_EXISTS
    assert snapshot(n, "snap1", "src", labels={"team": "a"}).create_time == snap.create_time
    assert code_of(lambda: snapshot(n, "snap1", "src"))[0] == grpc.StatusCode.ALREADY_EXISTS
    assert list_snapshots(n) == ["snap1"]
    assert list_snapshots(n, label_selector={"team": "a"}) == ["snap1"]
    assert list_snapshots(n, label_selector={"team": "b"}) == []
    assert list_snapshots(n, source_sandbox_id="src", template_id="demo") == ["snap1"]
    assert list_snapshots(n, template_id="other") == []
    assert sorted(os.listdir(d)) == ["mem", "rootfs.ext4", "snapshot.json", "vmstate"]

    # the source writes on after the snapshot: forks do not see that
    assert guest_exec(e, "src", "sh", "-c", "echo later > /root/g && sync").returncode == 0
    ids = [f"f{i}" for i in range(20)]
    with concurrent.futures.ThreadPoolExecutor(20) as ex:
        forks = list(ex.map(lambda i: fork(n, i, "snap1"), ids))
    for f in forks:
        assert f.state == S.SANDBOX_STATE_RUNNING and f.template_id == "demo"
        assert f.spec.snapshot_id == "snap1" and f.spec.memory_mib == 128
        assert steps(f) == ["slot", "disk", "run-dir", "memory-server", "spawn", "load",
                            "guest-agent"]
    assert len({f.sandbox_ip for f in forks}) == 20
    for i in ids:
        p = guest_exec(e, i, "sh", "-c", f"cat /root/f; test ! -e /root/g; echo {i} > /root/me"
                                         " && sync")
        assert p.returncode == 0 and p.stdout == b"base\n", (i, p)
    for i in ids:
        assert guest_exec(e, i, "cat", "/root/me").stdout == f"{i}\n".encode()
    # one memory file for all: each fork's ember-uffd serves the snapshot's own file, and no
    # fork has a copy of it
    mem = os.path.join(d, "mem")
    for i in ids:
        rec = record(e, i)
        assert os.readlink(f"/proc/{rec['uffd_pid']}/cwd").endswith(f"/sandboxes/{i}")
        with open(f"/proc/{rec['uffd_pid']}/cmdline", "rb") as f:
            assert mem.encode() in f.read().split(b"\0")
        assert not os.path.exists(os.path.join(e.state_dir, "sandboxes", i, "snapshot"))
    assert n.GetSnapshot(S.GetSnapshotRequest(snapshot_id="snap1"),
                         timeout=10).dependent_sandbox_count == 20

    code, details = code_of(lambda: n.DeleteSnapshot(
        S.DeleteSnapshotRequest(snapshot_id="snap1"), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "20 sandboxes" in details, details
    # a fork pauses and resumes over the snapshot's image
    pause(n, "f0")
    assert resume(n, "f0").state == S.SANDBOX_STATE_RUNNING
    assert guest_exec(e, "f0", "cat", "/root/me").stdout == b"f0\n"
    with concurrent.futures.ThreadPoolExecutor(10) as ex:
        list(ex.map(lambda i: destroy(n, i), ids))
    n.DeleteSnapshot(S.DeleteSnapshotRequest(snapshot_id="snap1"), timeout=10)
    assert code_of(lambda: n.GetSnapshot(S.GetSnapshotRequest(snapshot_id="snap1"),
                                         timeout=10))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: n.DeleteSnapshot(S.DeleteSnapshotRequest(snapshot_id="snap1"),
                                            timeout=10))[0] == grpc.StatusCode.NOT_FOUND
    destroy(n, "src")
    assert leftovers(e) == []
    assert snapshots_dir(e) == []


def test_snapshot_of_a_paused_sandbox(start_emberd):
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    create(n, "p")
    guest_exec(e, "p", "sh", "-c", "echo paused > /root/f && sync")
    before = pause(n, "p")
    snap = snapshot(n, "ps", "p")
    assert snap.memory_mib == 128
    after = get(n, "p")
    assert after.state == S.SANDBOX_STATE_PAUSED and after.revision == before.revision
    assert processes_under(os.path.join(e.run_dir, "sandboxes")) == []
    fork(n, "child", "ps")
    assert guest_exec(e, "child", "cat", "/root/f").stdout == b"paused\n"
    # the source resumes from its own saved state, untouched by the snapshot
    resume(n, "p")
    assert guest_exec(e, "p", "cat", "/root/f").stdout == b"paused\n"
    # the snapshot outlives its source
    destroy(n, "p")
    fork(n, "child2", "ps")
    for i in ("child", "child2"):
        destroy(n, i)
    # a generous deadline, as create's and destroy's: it once took over 10 s while another
    # xdist worker booted fifty guests on the two cores
    n.DeleteSnapshot(S.DeleteSnapshotRequest(snapshot_id="ps"), timeout=60 * SLOW)
    assert leftovers(e) == []
    assert snapshots_dir(e) == []


def test_snapshot_errors(start_emberd):
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: snapshot(n, "Bad", "x"))[0] == bad
    assert code_of(lambda: snapshot(n, "s", "Bad"))[0] == bad
    assert code_of(lambda: snapshot(n, "s", "x", labels={"": "v"}))[0] == bad
    assert code_of(lambda: snapshot(n, "s", "nope"))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: n.GetSnapshot(S.GetSnapshotRequest(snapshot_id="nope"),
                                         timeout=10))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: fork(n, "f", "nope"))[0] == grpc.StatusCode.NOT_FOUND
    create(n, "a")
    snapshot(n, "sa", "a")
    code, details = code_of(lambda: fork(n, "f", "sa", memory_mib=256))
    assert code == bad and "memory_mib 256 differs" in details, details
    code, details = code_of(lambda: fork(n, "f", "sa", vcpu_count=2))
    assert code == bad and "vcpu_count" in details, details
    # the values the snapshot has are fine, and a retry with 0 is the same spec
    f = fork(n, "f", "sa", memory_mib=128, vcpu_count=1)
    assert fork(n, "f", "sa").create_time == f.create_time
    # a template with snapshots cannot be deleted
    code, details = code_of(lambda: n.DeleteTemplate(S.DeleteTemplateRequest(template_id="demo"),
                                                     timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "1 snapshots" in details, details
    os.kill(record(e, "a")["vmm_pid"], signal.SIGKILL)
    wait_for(lambda: get(n, "a").state == S.SANDBOX_STATE_FAILED, 10, "FAILED")
    code, details = code_of(lambda: snapshot(n, "sb", "a"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "FAILED" in details, details
    for i in ("a", "f"):
        destroy(n, i)
    n.DeleteSnapshot(S.DeleteSnapshotRequest(snapshot_id="sa"), timeout=10)
    assert leftovers(e) == [] and snapshots_dir(e) == []


def test_snapshots_and_forks_survive_a_restart(start_emberd, workdir):
    root = os.path.join(workdir, "node")
    e = start_emberd("[network]\npool_size = 0\n", root=root)
    n = stub(e)
    create(n, "src")
    guest_exec(e, "src", "sh", "-c", "echo one > /root/f && sync")
    snapshot(n, "keep", "src")
    fork(n, "kid", "keep")
    e.proc.signal(signal.SIGKILL)
    assert e.proc.wait(30) is not None
    e2 = start_emberd("[network]\npool_size = 0\n", root=root, hostns=e.hostns)
    n2 = stub(e2)
    s = n2.GetSnapshot(S.GetSnapshotRequest(snapshot_id="keep"), timeout=10)
    assert s.dependent_sandbox_count == 1
    assert get(n2, "kid").state == S.SANDBOX_STATE_RUNNING
    assert guest_exec(e2, "kid", "cat", "/root/f").stdout == b"one\n"
    fork(n2, "kid2", "keep")
    assert guest_exec(e2, "kid2", "cat", "/root/f").stdout == b"one\n"
    for i in ("src", "kid", "kid2"):
        destroy(n2, i)
    n2.DeleteSnapshot(S.DeleteSnapshotRequest(snapshot_id="keep"), timeout=10)
    assert leftovers(e2) == [] and snapshots_dir(e2) == []


def test_snapshot_to_a_full_disk(start_emberd, workdir):
    """Not enough room in <state_dir>/snapshots (a 64 MiB tmpfs here) for a 128 MiB guest's
    snapshot: RESOURCE_EXHAUSTED before anything is done, and the sandbox runs on unharmed."""
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    create(n, "full")
    d = os.path.join(e.state_dir, "snapshots")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", d], check=True)
    try:
        code, details = code_of(lambda: snapshot(n, "big", "full"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "not enough disk" in details, \
            details
        sb = get(n, "full")
        assert sb.state == S.SANDBOX_STATE_RUNNING
        assert guest_exec(e, "full", "true").returncode == 0
        assert os.listdir(d) == []
        assert list_snapshots(n) == []
    finally:
        subprocess.run(["umount", "-l", d], check=True)
    destroy(n, "full")
    assert leftovers(e) == []


def test_template_boot_snapshot(start_emberd, workdir):
    """RegisterTemplate with boot_snapshot boots the template once, in a sandbox no one sees,
    and keeps its snapshot: creates of that machine restore it, others boot; it survives a
    restart and goes with DeleteTemplate."""
    root = os.path.join(workdir, "node")
    e = start_emberd("[network]\npool_size = 0\n", root=root)
    n = stub(e)
    demo = n.GetTemplate(S.GetTemplateRequest(template_id="demo"), timeout=10)
    req = S.RegisterTemplateRequest(template_id="fast", kernel_path=demo.kernel.path,
                                    rootfs_path=demo.rootfs.path,
                                    boot_snapshot=S.TemplateSnapshotSpec(memory_mib=128))
    _, events, _ = watch(e)
    wait_for(lambda: events, 10, "the watch's resync")
    t = n.RegisterTemplate(req, timeout=300)
    node = n.GetNode(S.GetNodeRequest(), timeout=10)
    b = t.boot_snapshot
    assert b.memory_mib == 128 and b.vcpu_count == 1, t
    assert b.firecracker_version == node.vmm_version and b.disk_used_bytes > 0
    d = os.path.join(e.state_dir, "templates", "fast", "boot-snapshot")
    assert sorted(os.listdir(d)) == ["mem", "rootfs.ext4", "vmstate"]
    # the sandbox that booted it is gone without a trace, and no watcher saw it
    assert leftovers(e) == []
    assert [ev for ev in events if ev.WhichOneof("event") != "resync"] == []
    # a retry returns it; another boot machine is another template
    assert n.RegisterTemplate(req, timeout=300).create_time == t.create_time
    other = S.RegisterTemplateRequest(template_id="fast", kernel_path=demo.kernel.path,
                                      rootfs_path=demo.rootfs.path,
                                      boot_snapshot=S.TemplateSnapshotSpec(memory_mib=256))
    assert code_of(lambda: n.RegisterTemplate(other, timeout=300))[0] == \
        grpc.StatusCode.ALREADY_EXISTS

    quick = create(n, "quick", template="fast")  # 128 MiB: the snapshot's machine
    assert steps(quick) == ["slot", "disk", "run-dir", "memory-server", "spawn", "load",
                            "guest-agent"]
    slow = create(n, "slow", template="fast", memory_mib=256)
    assert steps(slow) == ["slot", "disk", "run-dir", "spawn", "configure", "boot",
                           "guest-agent"]
    for sid in ("quick", "slow"):
        p = guest_exec(e, sid, "sh", "-c", f"echo {sid} > /root/f && sync && cat /root/f")
        assert p.returncode == 0 and p.stdout == f"{sid}\n".encode(), p
    # the first create from the boot snapshot recorded the pages its guest wanted first,
    # beside the shared memory file (the window is 5 s)
    ws = os.path.join(d, "mem.ws")
    wait_for(lambda: os.path.exists(ws), 30, "the working set")
    assert os.path.getsize(ws) > 48
    pause(n, "quick")
    resume(n, "quick")
    assert guest_exec(e, "quick", "cat", "/root/f").stdout == b"quick\n"

    e.proc.stop()
    e2 = start_emberd("[network]\npool_size = 0\n", root=root, hostns=e.hostns)
    n2 = stub(e2)
    t2 = n2.GetTemplate(S.GetTemplateRequest(template_id="fast"), timeout=10)
    assert t2.boot_snapshot.memory_mib == 128
    assert get(n2, "quick").state == S.SANDBOX_STATE_RUNNING
    assert guest_exec(e2, "quick", "cat", "/root/f").stdout == b"quick\n"
    assert steps(create(n2, "again", template="fast"))[3] == "memory-server"
    # ... and the next create replayed it: its ember-uffd's live counters (uffd.h:
    # magic, size, faults, fault, prefetch and replay bytes)
    with open(os.path.join(e2.run_dir, "sandboxes", "again", "uffd.stats"), "rb") as f:
        magic, size, _, _, _, replayed = struct.unpack("<IIQQQQ", f.read(40))
    assert magic == 0x46465545 and size >= 40 and replayed > 0, (size, replayed)
    code, _ = code_of(lambda: n2.DeleteTemplate(S.DeleteTemplateRequest(template_id="fast"),
                                                timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    for sid in ("quick", "slow", "again"):
        destroy(n2, sid)
    n2.DeleteTemplate(S.DeleteTemplateRequest(template_id="fast"), timeout=10)
    assert not os.path.exists(os.path.join(e2.state_dir, "templates", "fast"))
    assert leftovers(e2) == []
