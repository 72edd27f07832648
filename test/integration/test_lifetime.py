# Sandbox lifetime (issue "sandbox lifetime"): SandboxSpec.end_time and on_expiry, the node's
# default_lifetime_s and max_lifetime_s, and end times that pass while emberd is down. fcsim and
# the file backend; emberd in a network namespace of the test's own.

import os
import signal
import subprocess
import time

import grpc
import pytest

from conftest import SLOW, processes_under, wait_for
from test_sandbox import S, code_of, create, destroy, leftovers, spec, states, stub, watch


def end_in(seconds):
    """A Timestamp `seconds` from now."""
    from google.protobuf.timestamp_pb2 import Timestamp
    t = Timestamp()
    t.FromNanoseconds(time.time_ns() + int(seconds * 1e9))
    return t


def get(n, sid):
    return n.GetSandbox(S.GetSandboxRequest(sandbox_id=sid), timeout=10)


def gone(n, sid):
    try:
        get(n, sid)
        return False
    except grpc.RpcError as err:
        return err.code() == grpc.StatusCode.NOT_FOUND


def reason_of(events, sid, state):
    return [ev.changed.state_reason for ev in events
            if ev.WhichOneof("event") == "changed" and ev.changed.id == sid and
            ev.changed.state == state]


def test_end_time_destroys_or_pauses(start_emberd):
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    call, events, _ = watch(e, timeout=300)
    t0 = time.monotonic()
    sb = create(n, "short", end_time=end_in(4))
    assert sb.spec.end_time.ToNanoseconds() > 0
    assert sb.spec.on_expiry == S.EXPIRY_ACTION_DESTROY  # the default, shown applied
    p = create(n, "nap", end_time=end_in(4), on_expiry=S.EXPIRY_ACTION_PAUSE)
    keep = create(n, "keep")
    assert not keep.spec.HasField("end_time")

    wait_for(lambda: gone(n, "short"), 30, "the expired sandbox destroyed")
    took = time.monotonic() - t0
    assert took >= 3.5, took  # not before its time
    # the watch's events may arrive a moment after GetSandbox says NOT_FOUND
    wait_for(lambda: states(events, "short")[-1:] == ["removed"], 10, "the removed event")
    assert states(events, "short")[-3:] == ["DESTROYING", "DESTROYED", "removed"]
    why = reason_of(events, "short", S.SANDBOX_STATE_DESTROYING)
    assert why and "end time" in why[0] and "DESTROY" in why[0], why

    wait_for(lambda: get(n, "nap").state == S.SANDBOX_STATE_PAUSED, 60, "nap PAUSED")
    nap = get(n, "nap")
    assert "end time" in nap.state_reason and "PAUSE" in nap.state_reason, nap.state_reason
    assert reason_of(events, "nap", S.SANDBOX_STATE_PAUSING)
    # it stays paused, and a resume is refused while its end time lies in the past
    code, msg = code_of(lambda: n.ResumeSandbox(S.ResumeSandboxRequest(sandbox_id="nap"),
                                                timeout=30 * SLOW))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "end time" in msg, msg
    assert get(n, "keep").state == S.SANDBOX_STATE_RUNNING
    assert p.spec.end_time == nap.spec.end_time
    destroy(n, "nap")
    destroy(n, "keep")
    call.cancel()
    assert leftovers(e) == []


def test_a_paused_sandbox_expires_too(start_emberd):
    """on_expiry DESTROY reaches a PAUSED sandbox; a FAILED one also goes."""
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    create(n, "p", end_time=end_in(6 * SLOW))
    n.PauseSandbox(S.PauseSandboxRequest(sandbox_id="p"), timeout=60 * SLOW)
    assert get(n, "p").state == S.SANDBOX_STATE_PAUSED
    wait_for(lambda: gone(n, "p"), 60, "the paused sandbox destroyed at its end time")
    assert leftovers(e) == []


def test_past_end_time_and_bad_values_are_refused(start_emberd):
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    code, msg = code_of(lambda: create(n, "late", end_time=end_in(-1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "end_time" in msg, msg
    code, msg = code_of(lambda: n.CreateSandbox(S.CreateSandboxRequest(
        sandbox_id="x", spec=spec(on_expiry=7)), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "on_expiry" in msg, msg
    from google.protobuf.timestamp_pb2 import Timestamp
    code, msg = code_of(lambda: create(n, "far", end_time=Timestamp(seconds=1 << 40)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "end_time" in msg, msg
    assert leftovers(e) == []


def test_default_and_max_lifetime(start_emberd):
    e = start_emberd("[network]\npool_size = 0\n[sandboxes]\ndefault_lifetime_s = 3600\n"
                     "max_lifetime_s = 7200\n")
    n = stub(e)
    a = create(n, "dflt")
    assert a.spec.end_time.seconds - a.create_time.seconds == 3600, a
    day = end_in(86400)
    b = create(n, "capped", end_time=day)
    assert b.spec.end_time.seconds - b.create_time.seconds == 7200, b
    near = end_in(600)
    c = create(n, "near", end_time=near)
    assert c.spec.end_time == near
    # a retried create resolves the same way and joins the sandbox (no ALREADY_EXISTS)
    assert create(n, "dflt").create_time == a.create_time
    assert create(n, "capped", end_time=day).spec.end_time == b.spec.end_time
    code, _ = code_of(lambda: create(n, "near", end_time=end_in(900)))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    for i in ("dflt", "capped", "near"):
        destroy(n, i)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_end_times_survive_a_restart(start_emberd, workdir, how):
    root = os.path.join(workdir, "node")
    e = start_emberd("[network]\npool_size = 0\n", root=root)
    n = stub(e)
    create(n, "passes-while-down", end_time=end_in(5 * SLOW))
    later = create(n, "passes-after", end_time=end_in(30 * SLOW),
                   on_expiry=S.EXPIRY_ACTION_PAUSE)
    create(n, "forever")
    e.proc.signal(how)
    assert e.proc.wait(30) is not None
    time.sleep(6 * SLOW)  # the first end time passes while emberd is down
    t0 = time.monotonic()
    e2 = start_emberd("[network]\npool_size = 0\n", root=root, hostns=e.hostns)
    n2 = stub(e2)
    wait_for(lambda: gone(n2, "passes-while-down"), 30, "the overdue sandbox destroyed")
    assert time.monotonic() - t0 < 25 * SLOW
    sb = get(n2, "passes-after")
    assert sb.state == S.SANDBOX_STATE_RUNNING and sb.spec.end_time == later.spec.end_time
    assert sb.spec.on_expiry == S.EXPIRY_ACTION_PAUSE
    wait_for(lambda: get(n2, "passes-after").state == S.SANDBOX_STATE_PAUSED, 90,
             "the second one paused at its end time, after the restart")
    assert get(n2, "forever").state == S.SANDBOX_STATE_RUNNING
    destroy(n2, "passes-after")
    destroy(n2, "forever")
    assert leftovers(e2) == []


def update(n, sid, paths, **spec_kw):
    from google.protobuf.field_mask_pb2 import FieldMask
    net = spec_kw.pop("network", None)
    s = S.SandboxSpec(**spec_kw)
    if net is not None:
        s.network.CopyFrom(net)
    return n.UpdateSandbox(S.UpdateSandboxRequest(sandbox_id=sid, spec=s,
                                                  update_mask=FieldMask(paths=paths)),
                           timeout=30 * SLOW)


def test_update_moves_the_end_time(start_emberd):
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    call, events, _ = watch(e, timeout=300)
    # room for the create and the update on a loaded machine, then a wait past it
    first = end_in(8 * SLOW)
    create(n, "ext", end_time=first)
    later = end_in(3600)
    sb = update(n, "ext", ["end_time"], end_time=later)
    assert sb.spec.end_time == later and sb.state == S.SANDBOX_STATE_RUNNING
    rev = sb.revision
    # the same update again changes nothing: no event, the same revision
    assert update(n, "ext", ["end_time"], end_time=later).revision == rev
    time.sleep(max(0, first.ToNanoseconds() / 1e9 - time.time()) + 2)
    assert get(n, "ext").state == S.SANDBOX_STATE_RUNNING  # extended: not expired
    changed = [ev.changed for ev in events if ev.WhichOneof("event") == "changed" and
               ev.changed.id == "ext" and ev.changed.spec.end_time == later]
    assert len(changed) == 1, changed  # one event for the update, none for the repeat
    # no end time at all, then one in the past: acted on at once
    assert not update(n, "ext", ["end_time"]).spec.HasField("end_time")
    update(n, "ext", ["end_time"], end_time=end_in(-5))
    wait_for(lambda: gone(n, "ext"), 30, "the sandbox destroyed once its end time was moved back")
    call.cancel()
    assert leftovers(e) == []


def test_update_lets_an_expired_pause_resume(start_emberd):
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    create(n, "nap", end_time=end_in(3), on_expiry=S.EXPIRY_ACTION_PAUSE)
    wait_for(lambda: get(n, "nap").state == S.SANDBOX_STATE_PAUSED, 60, "nap PAUSED")
    update(n, "nap", ["end_time", "on_expiry"], end_time=end_in(3600),
           on_expiry=S.EXPIRY_ACTION_DESTROY)
    sb = n.ResumeSandbox(S.ResumeSandboxRequest(sandbox_id="nap"), timeout=60 * SLOW)
    assert sb.state == S.SANDBOX_STATE_RUNNING and sb.spec.on_expiry == S.EXPIRY_ACTION_DESTROY
    destroy(n, "nap")


def test_update_labels_network_and_what_cannot_change(start_emberd, workdir):
    root = os.path.join(workdir, "node")
    e = start_emberd("[network]\npool_size = 0\n", root=root)
    n = stub(e)
    create(n, "u", labels={"team": "a", "tier": "x"})
    sb = update(n, "u", ["labels"], labels={"team": "b"})
    assert dict(sb.spec.labels) == {"team": "b"}
    sel = n.ListSandboxes(S.ListSandboxesRequest(label_selector={"team": "b"}), timeout=10)
    assert [s.id for s in sel.sandboxes] == ["u"]
    assert not n.ListSandboxes(S.ListSandboxesRequest(label_selector={"team": "a"}),
                               timeout=10).sandboxes

    # the egress policy changes in the running slot's nftables at once
    pids = processes_under(os.path.join(e.run_dir, "sandboxes", "u"))
    assert pids

    def rules():
        return subprocess.run(["nsenter", f"--net=/proc/{pids[0]}/ns/net", "nft", "list",
                               "ruleset"], capture_output=True, text=True).stdout

    before = rules()
    assert "198.51.100.0/24" not in before
    sb = update(n, "u", ["network"], network=S.NetworkPolicy(allow_cidrs=["198.51.100.0/24"]))
    assert list(sb.spec.network.allow_cidrs) == ["198.51.100.0/24"]
    assert "198.51.100.0/24" in rules()
    code, msg = code_of(lambda: update(n, "u", ["network"], network=S.NetworkPolicy(
        allow_cidrs=["10.0.0.1/8"])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "10.0.0.1/8" in msg, msg
    assert "198.51.100.0/24" in rules()  # a refused update changed nothing

    C = grpc.StatusCode.INVALID_ARGUMENT
    for path, why in (("vcpu_count", "shape"), ("memory_mib", "shape"), ("env", "create"),
                      ("template_id", "source"), ("disk_size_mib", "disk")):
        code, msg = code_of(lambda: update(n, "u", [path]))
        assert code == C and path in msg and why in msg, (path, msg)
    code, msg = code_of(lambda: update(n, "u", ["nonsense"]))
    assert code == C and "nonsense" in msg
    code, msg = code_of(lambda: update(n, "u", []))
    assert code == C and "update_mask" in msg
    code, _ = code_of(lambda: update(n, "nope", ["labels"]))
    assert code == grpc.StatusCode.NOT_FOUND

    # persisted: a restarted emberd has the labels, the policy and the end time
    end = end_in(3600)
    update(n, "u", ["end_time"], end_time=end)
    e.proc.stop()
    e2 = start_emberd("[network]\npool_size = 0\n", root=root, hostns=e.hostns)
    sb = get(stub(e2), "u")
    assert dict(sb.spec.labels) == {"team": "b"} and sb.spec.end_time == end
    assert list(sb.spec.network.allow_cidrs) == ["198.51.100.0/24"]
    destroy(stub(e2), "u")


def test_grpcurl_update_as_the_readme_shows(start_emberd):
    from test_quickstart import readme_shell_commands
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    create(n, "hello")
    (cmd,) = readme_shell_commands("An end time makes emberd", e.socket)
    p = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=60 * SLOW)
    assert p.returncode == 0, p.stderr
    sb = get(n, "hello")
    assert sb.spec.end_time.ToJsonString() == "2030-01-01T00:00:00Z"
    assert sb.spec.on_expiry == S.EXPIRY_ACTION_PAUSE
    destroy(n, "hello")


def test_a_live_egress_change_is_seen_from_inside_the_guest(start_emberd, workdir):
    """UpdateSandbox's network policy reaches a RUNNING sandbox's slot at once: a probe from
    inside the guest, through the slot and the node's uplink, to an "internet" namespace (the
    layout of test_netns.py)."""
    from conftest import SRCDIR, host_netns
    from test_exec import ok
    root = os.path.join(workdir, "node")
    os.makedirs(root)
    hostns = host_netns(os.path.join(root, "hostns"))
    inet = host_netns(os.path.join(root, "inetns"))
    srv = None
    try:
        def ns(path, *argv):
            subprocess.run(["nsenter", f"--net={path}", *argv], check=True)
        # the uplink: host uplink0 203.0.113.1 <-> "internet" eth0 203.0.113.2
        ns(hostns, "ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "eth0",
           "netns", inet)
        ns(hostns, "ip", "addr", "add", "203.0.113.1/24", "dev", "uplink0")
        ns(hostns, "ip", "link", "set", "uplink0", "up")
        ns(hostns, "ip", "route", "add", "default", "via", "203.0.113.2")
        ns(inet, "ip", "addr", "add", "203.0.113.2/24", "dev", "eth0")
        ns(inet, "ip", "link", "set", "eth0", "up")
        srv = subprocess.Popen(["nsenter", f"--net={inet}", "/usr/bin/python3",
                                os.path.join(SRCDIR, "test", "net", "probe.py"),
                                "whoami-server", "8080"], stdout=subprocess.PIPE, text=True)
        assert srv.stdout.readline().strip() == "READY"

        e = start_emberd("[network]\npool_size = 0\nuplink = uplink0\n", root=root,
                         hostns=hostns)
        n = stub(e)
        create(n, "eg")  # the node's default: nothing outbound

        def ask():
            # what the "internet" server answers: the address it saw (the uplink's, masqueraded)
            e_ = ok(n, ["sh", "-c", "nc -w 2 203.0.113.2 8080 </dev/null || true"], sid="eg")
            return bytes(e_.out).strip()

        assert ask() == b""
        update(n, "eg", ["network"], network=S.NetworkPolicy(allow_internet=True))
        assert ask() == b"203.0.113.1"
        update(n, "eg", ["network"], network=S.NetworkPolicy(
            allow_internet=True, deny_cidrs=["203.0.113.0/24"]))
        assert ask() == b""
        update(n, "eg", ["network"], network=S.NetworkPolicy(allow_cidrs=["203.0.113.2"]))
        assert ask() == b"203.0.113.1"
        # a pause and a resume keep the policy (it is in the spec, applied to the new slot)
        n.PauseSandbox(S.PauseSandboxRequest(sandbox_id="eg"), timeout=60 * SLOW)
        n.ResumeSandbox(S.ResumeSandboxRequest(sandbox_id="eg"), timeout=60 * SLOW)
        assert ask() == b"203.0.113.1"
        destroy(n, "eg")
    finally:
        if srv:
            srv.kill()
            srv.wait()
        subprocess.run(["umount", "-l", inet], capture_output=True)


def test_huge_pages_need_the_pool(start_emberd):
    """Without enough 2 MiB pages in the host's pool a huge-page create is RESOURCE_EXHAUSTED
    and says so (the pool is never changed here: the VM tests, test/vm/test_emberd_huge.py,
    run huge-page sandboxes); the spec's checks hold whatever the pool."""
    hp = "/sys/kernel/mm/hugepages/hugepages-2048kB/"
    if not os.path.isdir(hp):
        pytest.skip("no 2 MiB huge pages in this kernel")

    def pages(name):
        with open(hp + name) as f:
            return int(f.read())
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    # more than the pool has free, whatever it has
    mib = max(128, (pages("free_hugepages") - pages("resv_hugepages") + 1) * 2)
    code, msg = code_of(lambda: create(n, "h", memory_mib=mib, huge_pages=True))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, msg
    assert "huge pages" in msg and "vm.nr_hugepages" in msg, msg
    assert gone(n, "h")
    code, msg = code_of(lambda: create(n, "h", memory_mib=129, huge_pages=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "multiple of 2" in msg, msg
    # a fork has its snapshot's memory: huge pages cannot be asked of one without them
    create(n, "src")
    n.CreateSnapshot(S.CreateSnapshotRequest(snapshot_id="plain", sandbox_id="src"),
                     timeout=120 * SLOW)
    snap = n.GetSnapshot(S.GetSnapshotRequest(snapshot_id="plain"), timeout=10)
    assert not snap.huge_pages
    code, msg = code_of(lambda: n.CreateSandbox(S.CreateSandboxRequest(
        sandbox_id="f", spec=S.SandboxSpec(snapshot_id="plain", huge_pages=True)),
        timeout=60 * SLOW))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "huge pages" in msg, msg
    code, msg = code_of(lambda: update(n, "src", ["huge_pages"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "huge_pages cannot change" in msg, msg
    destroy(n, "src")
    n.DeleteSnapshot(S.DeleteSnapshotRequest(snapshot_id="plain"), timeout=60)
    assert leftovers(e) == []
