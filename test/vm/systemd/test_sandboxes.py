# Sandboxes under systemd, from the installed packages: each sandbox's processes in
# ember-sbx-<id>.scope under ember.slice with the limits of its spec, registered with
# systemd-machined; they survive `systemctl restart emberd`, a SIGKILL of the agent and a
# watchdog restart of a stopped agent (same processes, RUNNING, answering Exec); a resumed
# sandbox's VMM and ember-uffd are in its scope and survive a restart too; the journal
# shows each sandbox's life, and a clean run logs nothing at warning or above.
# Runs in test/vm/run --systemd (make check-deploy); the fixtures are in deploy_plugin.py.

import os
import signal
import time

import grpc

from deploylib import (UNIT, channel, main_pid, node_stub, proc_exe, run, unit_props,
                       wait_for)

pytest_plugins = ["deploy_plugin"]

from ember.v1 import node_pb2 as S  # noqa: E402 (deploylib puts the stubs on the path)


def serving():
    try:
        with channel() as ch:
            node_stub(ch).GetNode(S.GetNodeRequest(), timeout=2)
        return True
    except grpc.RpcError:
        return False


def wait_restarted(old_pid, timeout):
    def ok():
        s = unit_props(UNIT, "ActiveState", "SubState", "MainPID")
        return (s["ActiveState"] == "active" and s["SubState"] == "running"
                and int(s["MainPID"]) not in (0, old_pid) and serving())
    wait_for(ok, timeout, "emberd to be restarted and serving", interval=0.2)


def seconds(span):
    """systemd's "1min 30s", "10s", "500ms" in seconds."""
    units = {"min": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "h": 3600}
    total = 0.0
    for part in span.split():
        num = part.rstrip("abcdefghijklmnopqrstuvwxyz")
        total += float(num) * units[part[len(num):]]
    return total


def scope_pids(sid):
    path = f"/sys/fs/cgroup/ember.slice/ember-sbx-{sid}.scope/cgroup.procs"
    with open(path) as f:
        return sorted(int(x) for x in f.read().split())


def exec_out(n, sid, *argv):
    reqs = iter([S.ExecRequest(start=S.ExecStart(sandbox_id=sid, argv=list(argv)))])
    out, code = b"", None
    for r in n.Exec(reqs, timeout=60):
        kind = r.WhichOneof("msg")
        if kind == "stdout_data":
            out += r.stdout_data
        elif kind == "exit":
            code = r.exit.exit_code
    return code, out.decode()


def check_running(n, ids, pids):
    for sid in ids:
        sb = n.GetSandbox(S.GetSandboxRequest(sandbox_id=sid), timeout=10)
        assert sb.state == S.SANDBOX_STATE_RUNNING, (sid, sb)
        assert scope_pids(sid) == pids[sid], sid
        assert exec_out(n, sid, "hostname") == (0, sid + "\n"), sid


def test_scopes_machines_and_survival(emberd, journal):
    # The packaged configuration as it is: device-mapper disks (the VM's writable layer is a
    # real ext4, see test/vm/run), fcsim, the demo template.
    sandboxes_under_systemd(journal)


def sandboxes_under_systemd(journal):
    ids = ["sd1", "sd2"]
    with channel() as ch:
        n = node_stub(ch)
        for i, sid in enumerate(ids):
            n.CreateSandbox(S.CreateSandboxRequest(
                sandbox_id=sid, spec=S.SandboxSpec(template_id="demo", memory_mib=128 * (i + 1),
                                                   vcpu_count=i + 1)), timeout=300)
        pids = {}
        for i, sid in enumerate(ids):
            unit = f"ember-sbx-{sid}.scope"
            s = unit_props(unit, "ActiveState", "Slice", "MemoryMax", "CPUQuotaPerSecUSec",
                     "CPUWeight", "ControlGroup")
            assert s["ActiveState"] == "active", s
            assert s["Slice"] == "ember.slice", s
            assert int(s["MemoryMax"]) == (128 * (i + 1) + 64) << 20, s
            assert s["CPUQuotaPerSecUSec"] == f"{i + 1}s", s
            assert s["CPUWeight"] == str(100 * (i + 1)), s
            pids[sid] = scope_pids(sid)
            assert pids[sid], sid
            # the VMM is fcsim, in the scope (with its guest's processes); emberd is not
            exes = [proc_exe(p) for p in pids[sid]]
            assert "/usr/lib/ember/fcsim" in exes, exes
            assert main_pid() not in pids[sid]
            m = dict(line.split("=", 1) for line in run(
                "machinectl", "show", sid, "-pClass", "-pUnit", "-pService", "-pLeader"
            ).stdout.splitlines())
            assert m["Class"] == "vm" and m["Unit"] == unit and m["Service"] == "ember", m
            assert int(m["Leader"]) in pids[sid], (m, pids[sid])
        listed = run("machinectl", "list", "--no-legend").stdout
        assert all(sid in listed for sid in ids), listed
        check_running(n, ids, pids)

        # a clean run so far: nothing at warning or above from the unit
        warn = journal.text(unit=UNIT, priority="warning")
        assert warn == "", warn

    # 1. systemctl restart
    old = main_pid()
    run("systemctl", "restart", "emberd")
    wait_restarted(old, 120)
    with channel() as ch:
        check_running(node_stub(ch), ids, pids)

    # 2. a crash: SIGKILL, then Restart=on-failure
    old = main_pid()
    run("systemctl", "kill", "-s", "SIGKILL", "emberd")
    wait_restarted(old, 120)
    with channel() as ch:
        check_running(node_stub(ch), ids, pids)

    # 3. a stopped agent: the watchdog ends it, and it comes back
    u = unit_props(UNIT, "WatchdogUSec", "TimeoutAbortUSec", "RestartUSec")
    limit = sum(seconds(u[k]) for k in ("WatchdogUSec", "TimeoutAbortUSec", "RestartUSec"))
    assert limit > 0, u
    old = main_pid()
    t0 = time.monotonic()
    os.kill(old, signal.SIGSTOP)
    wait_restarted(old, limit + 60)
    took = time.monotonic() - t0
    assert took <= limit + 20, (took, limit)
    print(f"watchdog: restarted and serving {took:.1f} s after SIGSTOP "
          f"(WatchdogSec + TimeoutAbortSec + RestartSec = {limit:.0f} s)")
    with channel() as ch:
        check_running(node_stub(ch), ids, pids)

    # 4. pause and resume: the resumed VMM and its memory server (ember-uffd, which serves
    #    the guest's memory from the snapshot) are in the sandbox's scope, with its limits,
    #    and survive a restart of the agent as well
    with channel() as ch:
        n = node_stub(ch)
        n.PauseSandbox(S.PauseSandboxRequest(sandbox_id="sd1"), timeout=300)
        n.ResumeSandbox(S.ResumeSandboxRequest(sandbox_id="sd1"), timeout=300)
        pids["sd1"] = scope_pids("sd1")
        exes = [proc_exe(p) for p in pids["sd1"]]
        assert "/usr/lib/ember/fcsim" in exes and "/usr/lib/ember/ember-uffd" in exes, exes
        s = unit_props("ember-sbx-sd1.scope", "ActiveState", "MemoryMax")
        assert s["ActiveState"] == "active" and int(s["MemoryMax"]) == (128 + 64) << 20, s
        check_running(n, ids, pids)
    old = main_pid()
    run("systemctl", "restart", "emberd")
    wait_restarted(old, 120)
    with channel() as ch:
        n = node_stub(ch)
        check_running(n, ids, pids)
        for sid in ids:
            n.DestroySandbox(S.DestroySandboxRequest(sandbox_id=sid), timeout=120)
    for sid in ids:
        wait_for(lambda: unit_props(f"ember-sbx-{sid}.scope", "ActiveState")["ActiveState"]
                 == "inactive", 30, f"{sid}'s scope to go")
    listed = run("machinectl", "list", "--no-legend").stdout
    assert not any(sid in listed for sid in ids), listed

    # The journal: one sandbox's whole life, selected by its id.
    life = journal.entries("SANDBOX_ID=sd1", unit=UNIT)
    ops = [(e.get("OP"), e.get("STEP")) for e in life]
    assert ("create", "spawn") in ops and ("create", "guest-agent") in ops, ops
    assert ("destroy", "release") in ops and ("recover", None) in ops, ops
    assert all(e.get("MESSAGE_ID") and e.get("TEMPLATE_ID") == "demo" for e in life), life
    messages = [e["MESSAGE"] for e in life]
    assert any("created from" in m for m in messages), messages
    assert messages[-1] == "sandbox sd1 destroyed", messages
