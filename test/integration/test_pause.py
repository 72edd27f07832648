# Pause and resume through emberd (fcsim + file backend on the host): the saved state, the
# order of the steps, ember-uffd serving the memory of a resumed sandbox, what its death does,
# and restarts of emberd around paused and resumed sandboxes.

import json
import os
import signal
import subprocess

import grpc
import pytest

from conftest import SLOW, processes_under, wait_for
from test_sandbox import S, code_of, create, destroy, guest_exec, leftovers, states, stub, \
    watch


def pause(n, sid, timeout=60):
    return n.PauseSandbox(S.PauseSandboxRequest(sandbox_id=sid), timeout=timeout * SLOW)


def resume(n, sid, timeout=60):
    return n.ResumeSandbox(S.ResumeSandboxRequest(sandbox_id=sid), timeout=timeout * SLOW)


def get(n, sid):
    return n.GetSandbox(S.GetSandboxRequest(sandbox_id=sid), timeout=10)


def record(e, sid):
    with open(os.path.join(e.state_dir, "sandboxes", sid, "sandbox.json")) as f:
        return json.load(f)


def steps(sb):
    return [s.name for s in sb.last_operation.steps]


def test_pause_and_resume_keep_disk_and_memory(start_emberd):
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    _, events, _ = watch(e)
    sb = create(n, "p1")
    assert sb.last_operation.op == "create" and steps(sb)[-1] == "guest-agent"
    p = guest_exec(e, "p1", "sh", "-c", "echo kept > /root/file && sync")
    assert p.returncode == 0, p
    vmm = record(e, "p1")["vmm_pid"]

    sb = pause(n, "p1")
    assert sb.state == S.SANDBOX_STATE_PAUSED
    assert sb.sandbox_ip == ""
    # the pause's steps, in the order DESIGN.md §8 gives (the VMM gone before the disk)
    assert steps(sb) == ["pause-vm", "snapshot", "stop-vmm", "commit", "disk", "slot",
                         "run-dir"]
    assert sb.last_operation.op == "pause" and sb.last_operation.failed_step == ""
    assert sb.last_operation.total_us >= sum(s.duration_us for s in sb.last_operation.steps)
    # a paused sandbox holds no process, no slot, only its files (and its console log)
    assert not os.path.exists(f"/proc/{vmm}")
    assert processes_under(os.path.join(e.run_dir, "sandboxes")) == []
    assert os.listdir(os.path.join(e.run_dir, "sandboxes", "p1")) == ["console.log"]
    saved = os.path.join(e.state_dir, "sandboxes", "p1", "snapshot")
    assert sorted(os.listdir(saved)) == ["mem", "vmstate"]
    assert os.path.getsize(os.path.join(saved, "mem")) == 128 << 20
    assert sb.saved_state_used_bytes > 0
    assert record(e, "p1")["state"] == "PAUSED"
    # pausing again returns it unchanged
    again = pause(n, "p1")
    assert again.state == S.SANDBOX_STATE_PAUSED and again.revision == sb.revision

    sb = resume(n, "p1")
    assert sb.state == S.SANDBOX_STATE_RUNNING and sb.sandbox_ip
    assert steps(sb) == ["slot", "disk", "run-dir", "memory-server", "spawn", "load",
                         "guest-agent"]
    assert sb.saved_state_used_bytes == 0
    p = guest_exec(e, "p1", "cat", "/root/file")
    assert p.returncode == 0 and p.stdout == b"kept\n", p
    # fcsim checked every page of the guest's memory against what its boot wrote, through
    # ember-uffd (a failed check fails the load, and so the resume)
    rec = record(e, "p1")
    assert rec["uffd_pid"] > 0 and os.path.exists(f"/proc/{rec['uffd_pid']}")
    assert resume(n, "p1").revision == sb.revision  # resuming a RUNNING one: unchanged

    # and again: a resumed sandbox pauses (its memory now comes through ember-uffd)
    sb = pause(n, "p1")
    assert sb.state == S.SANDBOX_STATE_PAUSED
    wait_for(lambda: not os.path.exists(f"/proc/{rec['uffd_pid']}"), 10, "ember-uffd gone")
    sb = resume(n, "p1")
    assert guest_exec(e, "p1", "cat", "/root/file").stdout == b"kept\n"
    destroy(n, "p1")
    wait_for(lambda: states(events, "p1")[-1:] == ["removed"], 10, "events")
    assert states(events, "p1") == [
        "CREATING", "RUNNING", "PAUSING", "PAUSED", "RESUMING", "RUNNING", "PAUSING",
        "PAUSED", "RESUMING", "RUNNING", "DESTROYING", "DESTROYED", "removed"]
    assert leftovers(e) == []


def test_pause_resume_errors(start_emberd):
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    assert code_of(lambda: pause(n, "nope"))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: resume(n, "nope"))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: pause(n, "Bad_Id"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    create(n, "e1")
    # resuming a RUNNING sandbox returns it; a FAILED one cannot be paused or resumed
    assert resume(n, "e1").state == S.SANDBOX_STATE_RUNNING
    os.kill(record(e, "e1")["vmm_pid"], signal.SIGKILL)
    wait_for(lambda: get(n, "e1").state == S.SANDBOX_STATE_FAILED, 10, "FAILED")
    code, details = code_of(lambda: pause(n, "e1"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "FAILED" in details, details
    code, details = code_of(lambda: resume(n, "e1"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "needs it PAUSED" in details
    destroy(n, "e1")
    assert leftovers(e) == []


def test_resume_needs_a_free_slot(start_emberd):
    """A resume is admitted like a create: with every slot taken it is RESOURCE_EXHAUSTED
    and the sandbox stays PAUSED."""
    # a /30 sandbox range holds 2 slots
    e = start_emberd("[network]\npool_size = 0\nsandbox_range = 10.200.0.0/30\n")
    n = stub(e)
    create(n, "a")
    pause(n, "a")
    create(n, "b")
    create(n, "c")  # takes the slot a had
    code, details = code_of(lambda: resume(n, "a"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "slot" in details, details
    assert get(n, "a").state == S.SANDBOX_STATE_PAUSED
    destroy(n, "b")
    assert resume(n, "a").state == S.SANDBOX_STATE_RUNNING
    destroy(n, "a")
    destroy(n, "c")
    assert leftovers(e) == []


def test_memory_server_death_fails_the_sandbox(start_emberd):
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    _, events, _ = watch(e)
    create(n, "u1")
    pause(n, "u1")
    resume(n, "u1")
    rec = record(e, "u1")
    os.kill(rec["uffd_pid"], signal.SIGKILL)
    wait_for(lambda: get(n, "u1").state == S.SANDBOX_STATE_FAILED, 10 * SLOW, "FAILED")
    sb = get(n, "u1")
    assert "ember-uffd" in sb.state_reason and "signal 9" in sb.state_reason, sb.state_reason
    # the VMM is stopped with it (its guest would hang at its next fault)
    wait_for(lambda: not os.path.exists(f"/proc/{rec['vmm_pid']}"), 10, "the VMM stopped")
    wait_for(lambda: states(events, "u1")[-1:] == ["FAILED"], 10, "the FAILED event")
    destroy(n, "u1")
    assert leftovers(e) == []


def test_truncated_memory_file_fails_the_resume(start_emberd):
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    create(n, "t1")
    pause(n, "t1")
    mem = os.path.join(e.state_dir, "sandboxes", "t1", "snapshot", "mem")
    os.truncate(mem, 64 << 20)
    code, details = code_of(lambda: resume(n, "t1"))
    assert code == grpc.StatusCode.INTERNAL, (code, details)
    sb = get(n, "t1")
    assert sb.state == S.SANDBOX_STATE_FAILED
    assert sb.last_operation.failed_step in ("load", "guest-agent"), sb.last_operation
    assert "saved state is kept" in sb.state_reason
    assert os.path.exists(mem)  # kept for inspection
    assert processes_under(os.path.join(e.run_dir, "sandboxes")) == []
    destroy(n, "t1")
    assert leftovers(e) == []


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_restart_keeps_paused_and_resumed_sandboxes(start_emberd, workdir, how):
    root = os.path.join(workdir, "node")
    e = start_emberd("[network]\npool_size = 0\n", root=root)
    n = stub(e)
    for sid in ("paused", "resumed"):
        create(n, sid)
        guest_exec(e, sid, "sh", "-c", f"echo {sid} > /root/f && sync")
        pause(n, sid)
    resume(n, "resumed")
    rec = record(e, "resumed")
    e.proc.signal(how)
    assert e.proc.wait(30) is not None
    assert os.path.exists(f"/proc/{rec['uffd_pid']}")  # ember-uffd outlives emberd

    e2 = start_emberd("[network]\npool_size = 0\n", root=root, hostns=e.hostns)
    n2 = stub(e2)
    assert get(n2, "paused").state == S.SANDBOX_STATE_PAUSED
    assert get(n2, "paused").last_operation.op == "pause"
    assert get(n2, "resumed").state == S.SANDBOX_STATE_RUNNING
    assert guest_exec(e2, "resumed", "cat", "/root/f").stdout == b"resumed\n"
    # the adopted memory server is still watched: its death fails the sandbox
    os.kill(rec["uffd_pid"], signal.SIGKILL)
    wait_for(lambda: get(n2, "resumed").state == S.SANDBOX_STATE_FAILED, 10 * SLOW, "FAILED")
    assert resume(n2, "paused").state == S.SANDBOX_STATE_RUNNING
    assert guest_exec(e2, "paused", "cat", "/root/f").stdout == b"paused\n"
    destroy(n2, "paused")
    destroy(n2, "resumed")
    assert leftovers(e2) == []


def test_destroy_while_paused(start_emberd):
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    create(n, "d1")
    pause(n, "d1")
    destroy(n, "d1")
    assert code_of(lambda: get(n, "d1"))[0] == grpc.StatusCode.NOT_FOUND
    assert leftovers(e) == []


@pytest.mark.parametrize("mib", [256, 1024])
@pytest.mark.parametrize("prefetch", ["true", "false"])
def test_pause_resume_sizes_and_prefetch(start_emberd, mib, prefetch):
    """256 MiB and 1 GiB guests, ember-uffd with and without prefetch: fcsim checks every page
    of the restored memory against what its boot wrote (a wrong page fails the load), and the
    disk comes back too. A second pause saves the memory as ember-uffd served it."""
    # without prefetch fcsim's check of 1 GiB is 262144 faults inside /snapshot/load, which
    # gets boot_timeout_s: room for a sanitizer build
    e = start_emberd(f"[network]\npool_size = 0\n[vmm]\nuffd_prefetch = {prefetch}\n"
                     "boot_timeout_s = 240\n")
    n = stub(e)
    create(n, "m", memory_mib=mib)
    assert guest_exec(e, "m", "sh", "-c", "echo sized > /root/f && sync").returncode == 0
    pause(n, "m")
    mem = os.path.join(e.state_dir, "sandboxes", "m", "snapshot", "mem")
    assert os.path.getsize(mem) == mib << 20
    resume(n, "m")
    args = open(f"/proc/{record(e, 'm')['uffd_pid']}/cmdline", "rb").read().split(b"\0")
    assert (b"--prefetch" in args) == (prefetch == "true")
    assert guest_exec(e, "m", "cat", "/root/f").stdout == b"sized\n"
    pause(n, "m")
    assert resume(n, "m").state == S.SANDBOX_STATE_RUNNING
    assert guest_exec(e, "m", "cat", "/root/f").stdout == b"sized\n"
    destroy(n, "m")
    assert leftovers(e) == []


def test_pause_that_fails_while_the_vm_runs_leaves_it_running(start_emberd):
    """The memory file cannot be written (a 1 MiB tmpfs where the pause writes it): the
    pause fails naming its step, the VM is resumed and the sandbox stays RUNNING, on record
    too; once there is room, the same sandbox pauses."""
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    create(n, "pf")
    new = os.path.join(e.state_dir, "sandboxes", "pf", "snapshot.new")
    os.makedirs(new)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", new], check=True)
    try:
        code, details = code_of(lambda: pause(n, "pf"))
        assert code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED), code
        assert "failed at step snapshot" in details, details
        sb = get(n, "pf")
        assert sb.state == S.SANDBOX_STATE_RUNNING, sb
        assert sb.last_operation.failed_step == "snapshot"
        assert record(e, "pf")["state"] == "RUNNING"
        assert guest_exec(e, "pf", "true").returncode == 0  # not left paused
    finally:
        subprocess.run(["umount", "-l", new], check=True)
    assert pause(n, "pf").state == S.SANDBOX_STATE_PAUSED
    assert resume(n, "pf").state == S.SANDBOX_STATE_RUNNING
    destroy(n, "pf")
    assert leftovers(e) == []
