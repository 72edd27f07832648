# Huge-page sandboxes through emberd (in the VM, whose kernel's huge page pool a test may set):
# SandboxSpec.huge_pages gives fcsim a guest memory of 2 MiB pages, admission counts the pool,
# a pause gives the pages back, a resume's memory is served by ember-uffd in 2 MiB pages and
# passes fcsim's check of every page, and a snapshot's forks have huge pages too.

import json
import os

import grpc

from test_emberd_dm import S, Agent, guest_sh, stop_all

HP = "/sys/kernel/mm/hugepages/hugepages-2048kB/"
POOL = 160  # pages: 320 MiB of the VM's 2 GiB


def pages(name):
    with open(HP + name) as f:
        return int(f.read())


def available():
    return pages("free_hugepages") - pages("resv_hugepages")


def huge_mapped_mib(root, sid):
    """MiB the sandbox's VMM has mapped in 2 MiB pages (its guest memory, if huge)."""
    with open(os.path.join(root, "state", "sandboxes", sid, "sandbox.json")) as f:
        pid = json.load(f)["vmm_pid"]
    mib, size = 0, 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("KernelPageSize:") and int(line.split()[1]) == 2048:
                mib += size // 1024
    return mib


def test_huge_page_sandboxes_pause_resume_and_fork(tmp_path):
    root = str(tmp_path)
    with open("/proc/sys/vm/nr_hugepages", "w") as f:
        f.write(str(POOL))
    assert pages("nr_hugepages") == POOL, "the VM kernel could not reserve the pool"
    a = Agent(root)
    a.start()
    try:
        n = a.stub()

        def create(sid, **spec):
            return n.CreateSandbox(S.CreateSandboxRequest(
                sandbox_id=sid, spec=S.SandboxSpec(**spec)), timeout=600)

        node = n.GetNode(S.GetNodeRequest(), timeout=10)
        assert node.huge_pages_total_bytes == POOL << 21
        assert node.huge_pages_free_bytes == POOL << 21
        sb = create("h1", template_id="demo", memory_mib=128, huge_pages=True)
        assert sb.state == S.SANDBOX_STATE_RUNNING and sb.spec.huge_pages
        # its memory is the pool's: 64 of the 2 MiB pages
        assert available() == POOL - 64, (available(), POOL)
        node = n.GetNode(S.GetNodeRequest(), timeout=10)
        assert node.huge_pages_free_bytes == (POOL - 64) << 21
        assert huge_mapped_mib(root, "h1") == 128
        assert guest_sh(root, "h1", "echo kept > /root/f && sync").returncode == 0

        # more than what is left is refused before anything is made, saying why
        code = msg = None
        try:
            create("h2", template_id="demo", memory_mib=256, huge_pages=True)
        except grpc.RpcError as e:
            code, msg = e.code(), e.details()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, msg)
        # counted with all their memory, whatever the guests touched so far (Firecracker
        # takes huge pages as they are touched)
        assert "has 160 2 MiB pages" in msg and "about to take 64" in msg, msg
        assert "128 are needed" in msg, msg

        # a pause gives the pages back; the resume takes them again, its memory served by
        # ember-uffd in 2 MiB pages (fcsim checks every page against the boot's)
        sb = n.PauseSandbox(S.PauseSandboxRequest(sandbox_id="h1"), timeout=600)
        assert sb.state == S.SANDBOX_STATE_PAUSED
        assert available() == POOL
        sb = n.ResumeSandbox(S.ResumeSandboxRequest(sandbox_id="h1"), timeout=600)
        assert sb.state == S.SANDBOX_STATE_RUNNING, sb
        assert available() == POOL - 64
        assert guest_sh(root, "h1", "cat /root/f").stdout.strip() == b"kept"
        assert huge_mapped_mib(root, "h1") == 128

        # a snapshot of it has huge pages, and so do its forks
        snap = n.CreateSnapshot(S.CreateSnapshotRequest(snapshot_id="hs", sandbox_id="h1"),
                                timeout=600)
        assert snap.huge_pages
        sb = create("f1", snapshot_id="hs")
        assert sb.state == S.SANDBOX_STATE_RUNNING and sb.spec.huge_pages
        assert available() == POOL - 128
        assert guest_sh(root, "f1", "cat /root/f").stdout.strip() == b"kept"

        for sid in ("f1", "h1"):
            n.DestroySandbox(S.DestroySandboxRequest(sandbox_id=sid), timeout=120)
        n.DeleteSnapshot(S.DeleteSnapshotRequest(snapshot_id="hs"), timeout=60)
        assert available() == POOL
    finally:
        stop_all(a, root)
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write("0")
