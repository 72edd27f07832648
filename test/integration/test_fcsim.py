# fcsim end to end: a busybox root image built here, configured and booted through the
# Firecracker API, reached over vsock (both directions) and over the network (TAP relay),
# paused, snapshotted, killed, and restored with the File and the Uffd memory backends (a
# reference page-fault handler in Python); memory verification catches a handler that serves
# wrong bytes. Each fcsim runs in a network namespace the test made.

import concurrent.futures
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from conftest import SLOW, SRCDIR
from fcsim_util import (FCSIM, Fcsim, build_rootfs, kill_and_check_guest_gone, vsock_connect,
                        vsock_echo)
from uffd_ref import RefHandler

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

MiB = 1 << 20
PROBE = os.path.join(SRCDIR, "test", "net", "probe.py")
IP_ARG = "ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:off"
INIT_WITH_CALL = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t tmpfs tmpfs /run
echo "init: up as pid $$ on $(/bin/busybox hostname), EMBER_SIM=$EMBER_SIM"
/bin/guest-helper call 5000 hello-host
echo
/bin/guest-helper serve 1024 7
echo "init: exiting"
"""


def sh(*args, check=True):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check)


@pytest.fixture
def lab():
    """A temp dir, a "slot" namespace with tap0 (169.254.0.22/30), a kernel file, an image."""
    root = tempfile.mkdtemp(prefix="ember-fcsim-", dir="/tmp")
    slot = os.path.join(root, "slot")
    open(slot, "w").close()
    sh("unshare", f"--net={slot}", "true")
    ns = ["nsenter", f"--net={slot}"]
    sh(*ns, "ip", "link", "set", "lo", "up")
    sh(*ns, "ip", "tuntap", "add", "tap0", "mode", "tap")
    sh(*ns, "ip", "addr", "add", "169.254.0.22/30", "dev", "tap0")
    sh(*ns, "ip", "link", "set", "tap0", "up")
    with open(os.path.join(root, "vmlinux"), "wb") as f:
        f.write(b"\x7fELF not a real kernel: fcsim does not boot it")
    lab = type("Lab", (), {})()
    lab.root, lab.slot = root, slot
    lab.kernel = os.path.join(root, "vmlinux")
    lab.image = build_rootfs(os.path.join(root, "base.ext4"), INIT_WITH_CALL)
    lab.procs = []
    yield lab
    for f in lab.procs:
        f.stop()
    sh("umount", "-l", slot, check=False)
    shutil.rmtree(root, ignore_errors=True)


def workdir(lab, name):
    """A VMM working directory: the same relative names in every one (rootfs, v.sock)."""
    d = os.path.join(lab.root, name)
    os.makedirs(d)
    shutil.copy(lab.image, os.path.join(d, "rootfs"))
    return d


def start(lab, d, **kw):
    f = Fcsim(d, netns=lab.slot, **kw)
    lab.procs.append(f)
    return f


def host_listener(path, reply):
    """Where guest-initiated vsock connections to port N land: <uds_path>_N."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    got = []

    def serve():
        c, _ = s.accept()
        got.append(c.recv(4096))
        c.sendall(reply)
        c.close()

    import threading
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return got, t


def tcp_echo_from_slot(lab):
    return sh("nsenter", f"--net={lab.slot}", "/usr/bin/python3", PROBE, "echo", "169.254.0.21",
              "7", "3").stdout.strip()


def test_version_and_existing_socket(tmp_path):
    r = sh(FCSIM, "--version")
    assert r.stdout.startswith("Firecracker v1.16.1 (fcsim ")
    sock = tmp_path / "api.sock"
    sock.write_text("")
    r = sh(FCSIM, "--api-sock", str(sock), check=False)
    assert r.returncode == 1 and "api.sock" in r.stderr and "in use" in r.stderr


def test_lifecycle_snapshot_restore(lab):
    d1 = workdir(lab, "vm1")
    got, t = host_listener(os.path.join(d1, "v.sock_5000"), b"hello-guest")
    f = start(lab, d1)
    f.configure("rootfs", lab.kernel, mem=32, net=True, boot_args=IP_ARG + " init=/sbin/init")
    assert f.api.get("/")[1]["state"] == "Not started"
    f.api.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    f.wait_output("guest-helper: ready")
    out = f.output()
    assert "EMBER_SIM=1" in out and "on fcsim" in out and "up as pid 1" in out
    # guest -> host vsock: the host listener got the guest's message, the guest the reply
    t.join(10)
    assert got == [b"hello-host"] and "hello-guest" in out
    st, info = f.api.get("/")
    assert info == {"id": "anonymous-instance", "state": "Running", "vmm_version": "1.16.1",
                    "app_name": "Firecracker"}
    # host -> guest vsock, and the network through the TAP relay
    assert vsock_echo(os.path.join(d1, "v.sock"), 1024, b"ping " * 1000) == b"ping " * 1000
    assert tcp_echo_from_slot(lab) == "ok"
    # nobody listens on port 9: the connection is closed, as Firecracker closes it
    s, line = vsock_connect(os.path.join(d1, "v.sock"), 9)
    assert s is None

    # pause: the guest is frozen (no echo) until resumed
    f.api.ok("PATCH", "/vm", {"state": "Paused"})
    f.api.ok("PATCH", "/vm", {"state": "Paused"})  # harmless again
    assert f.api.get("/")[1]["state"] == "Paused"
    s, line = vsock_connect(os.path.join(d1, "v.sock"), 1024)
    assert line.startswith("OK ")
    s.sendall(b"frozen?")
    s.settimeout(0.5)
    with pytest.raises(socket.timeout):
        s.recv(100)
    f.api.ok("PATCH", "/vm", {"state": "Resumed"})
    s.settimeout(5)
    assert s.recv(100) == b"frozen?"
    s.close()

    # snapshot (paused only), then the VMM is killed
    status, fault = f.api.put("/snapshot/create", {"snapshot_path": "vmstate",
                                                   "mem_file_path": "mem"})
    assert status == 400 and "not paused" in fault["fault_message"]
    f.api.ok("PATCH", "/vm", {"state": "Paused"})
    f.api.ok("PUT", "/snapshot/create", {"snapshot_path": "vmstate", "mem_file_path": "mem"})
    st = os.stat(os.path.join(d1, "mem"))
    assert st.st_size == 32 * MiB
    assert st.st_blocks * 512 < st.st_size * 0.9, "memory file not sparse"
    kill_and_check_guest_gone(f)

    # restore, File backend, in a fresh process in a fresh directory
    d2 = workdir(lab, "vm2")
    for name in ("vmstate", "mem"):
        shutil.copy(os.path.join(d1, name), os.path.join(d2, name))
    got2, t2 = host_listener(os.path.join(d2, "v.sock_5000"), b"hello-again")
    g = start(lab, d2)
    g.api.ok("PUT", "/snapshot/load", {"snapshot_path": "vmstate",
                                       "mem_backend": {"backend_type": "File",
                                                       "backend_path": "mem"},
                                       "resume_vm": True})
    assert g.api.get("/")[1]["state"] == "Running"
    assert "guest memory verified" in g.output()
    g.wait_output("guest-helper: ready")
    assert vsock_echo(os.path.join(d2, "v.sock"), 1024, b"after restore") == b"after restore"
    assert tcp_echo_from_slot(lab) == "ok"
    cfg = g.api.get("/vm/config")[1]
    assert cfg["boot-source"] is None and cfg["machine-config"]["mem_size_mib"] == 32
    # a guest that powers off ends the VMM, with status 0
    s, _ = vsock_connect(os.path.join(d2, "v.sock"), 1024)
    s.sendall(b"POWEROFF\n")
    assert g.p.wait(15 * SLOW) == 0
    assert "init: exiting" in g.output()


def snapshot_of(lab, name, mem=32):
    """A paused guest's snapshot, taken in directory `name`; the VMM is killed after."""
    d = workdir(lab, name)
    f = start(lab, d)
    f.configure("rootfs", lab.kernel, mem=mem, boot_args="init=/sbin/init")
    f.api.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    f.wait_output("guest-helper: ready")
    f.api.ok("PATCH", "/vm", {"state": "Paused"})
    f.api.ok("PUT", "/snapshot/create", {"snapshot_path": "vmstate", "mem_file_path": "mem"})
    kill_and_check_guest_gone(f)
    return d


@pytest.mark.parametrize("order", ["sequential", "random"])
def test_restore_with_uffd(lab, order):
    src = snapshot_of(lab, "src")
    d = workdir(lab, "uffd")
    handler = RefHandler(os.path.join(d, "uffd.sock"), os.path.join(src, "mem"))
    shutil.copy(os.path.join(src, "vmstate"), os.path.join(d, "vmstate"))
    g = start(lab, d, env={"FCSIM_VERIFY_ORDER": order})
    g.api.ok("PUT", "/snapshot/load", {"snapshot_path": "vmstate",
                                       "mem_backend": {"backend_type": "Uffd",
                                                       "backend_path": "uffd.sock"},
                                       "resume_vm": True})
    assert handler.error is None, handler.error
    text, nfds = handler.handshake
    assert nfds == 1
    regions = __import__("json").loads(text)
    assert list(regions[0]) == ["base_host_virt_addr", "size", "offset", "page_size",
                                "page_size_kib"]
    assert regions[0]["size"] == 32 * MiB and regions[0]["offset"] == 0
    assert regions[0]["page_size"] == regions[0]["page_size_kib"] == 4096
    assert handler.faults >= 32 * MiB // 4096  # verification touched every page
    assert f"{order} order" in g.output()
    g.wait_output("guest-helper: ready")
    assert vsock_echo(os.path.join(d, "v.sock"), 1024, b"uffd") == b"uffd"
    g.stop()
    handler.close()


def test_wrong_page_is_detected(lab):
    src = snapshot_of(lab, "src")
    # a page the boot filled (not one of the zero pages)
    with open(os.path.join(src, "mem"), "rb") as f:
        data = f.read()
    page = next(i for i in range(100, len(data) // 4096)
                if data[i * 4096:i * 4096 + 8] == b"FCSIMPG1")
    d = workdir(lab, "bad")
    handler = RefHandler(os.path.join(d, "uffd.sock"), os.path.join(src, "mem"),
                         wrong_page=page)
    shutil.copy(os.path.join(src, "vmstate"), os.path.join(d, "vmstate"))
    g = start(lab, d)
    status, fault = g.api.put("/snapshot/load", {"snapshot_path": "vmstate",
                                                 "mem_backend": {"backend_type": "Uffd",
                                                                 "backend_path": "uffd.sock"},
                                                 "resume_vm": True})
    assert status == 400
    assert "verification failed" in fault["fault_message"]
    assert str(page) in fault["fault_message"], fault
    # the process is unusable afterwards, as Firecracker's is
    status, fault = g.api.put("/actions", {"action_type": "InstanceStart"})
    assert status == 400 and "failed" in fault["fault_message"]
    assert "verification failed" in g.output()
    handler.close()


def test_phase_rules_and_errors(lab):
    d = workdir(lab, "rules")
    f = start(lab, d)
    a = f.api
    # post-boot only before boot
    st, fault = a.patch("/vm", {"state": "Paused"})
    assert st == 400 and fault["fault_message"] == \
        "The requested operation is not supported before starting the microVM."
    st, fault = a.put("/snapshot/create", {"snapshot_path": "s", "mem_file_path": "m"})
    assert st == 400 and "before starting" in fault["fault_message"]
    # start without a kernel
    st, fault = a.put("/actions", {"action_type": "InstanceStart"})
    assert st == 400 and fault["fault_message"] == \
        "Cannot start microvm without kernel configuration."
    # files are checked when configured, relative to the working directory
    st, fault = a.put("/boot-source", {"kernel_image_path": "no-such-kernel"})
    assert st == 400 and "kernel file cannot be opened" in fault["fault_message"]
    st, fault = a.put("/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "missing",
                                         "is_root_device": True, "is_read_only": False})
    assert st == 400 and "missing" in fault["fault_message"]
    st, fault = a.put("/drives/one", {"drive_id": "two", "path_on_host": "rootfs",
                                      "is_root_device": True, "is_read_only": False})
    assert st == 400 and "does not match" in fault["fault_message"]
    # bodies: unknown field, missing field, bad JSON, too large
    st, fault = a.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 32, "bogus": 1})
    assert st == 400 and "unknown field `bogus`" in fault["fault_message"]
    st, fault = a.put("/vsock", {"uds_path": "v.sock"})
    assert st == 400 and "missing field `guest_cid`" in fault["fault_message"]
    st, fault = a.put("/machine-config", raw="{not json")
    assert st == 400 and "deserializing" in fault["fault_message"]
    st, fault = a.put("/mmds", raw='{"a": "' + "x" * 60000 + '"}')
    assert st == 400 and "larger than the limit of 51200" in fault["fault_message"]
    st, fault = a.call("GET", "/nope")
    assert st == 400 and "Invalid request method and/or path" in fault["fault_message"]
    assert a.get("/machine-config")[1] == {"vcpu_count": 1, "mem_size_mib": 128, "smt": False,
                                           "track_dirty_pages": False, "huge_pages": "None"}
    # snapshot/load only on a fresh process: this one has been configured (machine-config)
    a.ok("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 32})
    st, fault = a.put("/snapshot/load", {"snapshot_path": "s",
                                         "mem_backend": {"backend_type": "File",
                                                         "backend_path": "m"}})
    assert st == 400 and "not allowed after configuring" in fault["fault_message"]
    # boot, then pre-boot calls are refused
    f.configure("rootfs", lab.kernel, mem=32, vsock=False, boot_args="init=/sbin/init")
    a.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    st, fault = a.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
    assert st == 400 and fault["fault_message"] == \
        "The requested operation is not supported after starting the microVM."
    st, fault = a.put("/actions", {"action_type": "InstanceStart"})
    assert st == 400 and "after starting" in fault["fault_message"]
    # GET works in every phase
    assert a.get("/version")[1] == {"firecracker_version": "1.16.1"}


def test_read_only_root_and_init_exit(lab):
    init = """#!/bin/busybox sh
/bin/busybox touch /written 2>/dev/null && echo "root: writable" || echo "root: read-only"
"""
    image = build_rootfs(os.path.join(lab.root, "ro.ext4"), init)
    d = os.path.join(lab.root, "ro")
    os.makedirs(d)
    f = start(lab, d)
    f.configure(image, lab.kernel, mem=16, vsock=False, ro=True, boot_args="init=/sbin/init")
    f.api.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    # init ends at once: the instance stops and fcsim exits, like Firecracker on poweroff
    assert f.p.wait(20 * SLOW) == 0
    assert "root: read-only" in f.output()


def leftovers():
    loops = sh("losetup", "--list", "--noheadings", "--output", "BACK-FILE").stdout
    return {
        "fcsim": sh("pgrep", "-x", "fcsim", check=False).stdout.split(),
        "loops": [l for l in loops.split() if "ember-fcsim-" in l],
    }


def new_leftovers(before):
    """What appeared since `before` and is still there. Only what appeared counts: other
    fcsim instances on the machine (another test run) may end, and remove theirs, meanwhile."""
    after = leftovers()
    return {k: sorted(set(after[k]) - set(before[k])) for k in after}


def ours(pids, root):
    """The pids working in a directory under root (each Fcsim runs in its workdir)."""
    out = []
    for p in pids:
        try:
            if os.readlink(f"/proc/{p}/cwd").startswith(root + "/"):
                out.append(p)
        except OSError:
            pass
    return out


def one_instance(lab, i):
    d1 = workdir(lab, f"m{i}")
    f = Fcsim(d1)  # a network namespace of its own (unshare)
    try:
        f.configure("rootfs", lab.kernel, mem=16, boot_args="init=/sbin/init")
        f.api.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        f.wait_output("guest-helper: ready", timeout=120)
        f.api.ok("PATCH", "/vm", {"state": "Paused"})
        f.api.ok("PUT", "/snapshot/create", {"snapshot_path": "vmstate", "mem_file_path": "mem"})
    finally:
        f.stop()
    g = Fcsim(d1, sock="api2.sock")
    try:
        os.unlink(os.path.join(d1, "v.sock"))  # the dead VMM's socket, as ember removes it
        g.api.ok("PUT", "/snapshot/load", {"snapshot_path": "vmstate",
                                           "mem_backend": {"backend_type": "File",
                                                           "backend_path": "mem"},
                                           "resume_vm": True})
        g.wait_output("guest-helper: ready", timeout=120)
        s, _ = vsock_connect(os.path.join(d1, "v.sock"), 1024)
        s.sendall(b"POWEROFF\n")
        return g.p.wait(60 * SLOW)
    finally:
        g.stop()


def test_hundred_concurrent_instances(lab):
    before = leftovers()
    with concurrent.futures.ThreadPoolExecutor(max_workers=100) as ex:
        codes = list(ex.map(lambda i: one_instance(lab, i), range(100)))
    assert codes == [0] * 100
    time.sleep(0.5)
    left = new_leftovers(before)
    left["fcsim"] = ours(left["fcsim"], lab.root)
    assert left == {"fcsim": [], "loops": []}


def test_restore_overrides_and_sampled_verification(lab):
    """network_overrides and vsock_override take effect; FCSIM_VERIFY_MEMORY=N checks a
    sample of N pages."""
    src = snapshot_of(lab, "src")
    for tap in ("tap1", "tap2"):
        sh("nsenter", f"--net={lab.slot}", "ip", "tuntap", "add", tap, "mode", "tap")
        sh("nsenter", f"--net={lab.slot}", "ip", "link", "set", tap, "up")
    d = workdir(lab, "over")
    for name in ("vmstate", "mem"):
        shutil.copy(os.path.join(src, name), os.path.join(d, name))
    # the snapshot had no network interface: give it one, then override its TAP
    import json
    st = json.load(open(os.path.join(d, "vmstate")))
    assert st["network-interfaces"] == []
    g = start(lab, d, env={"FCSIM_VERIFY_MEMORY": "100"})
    g.api.ok("PUT", "/snapshot/load", {"snapshot_path": "vmstate",
                                       "mem_backend": {"backend_type": "File",
                                                       "backend_path": "mem"},
                                       "vsock_override": {"uds_path": "other.sock"},
                                       "resume_vm": True})
    assert "guest memory verified (100," in g.output()
    g.wait_output("guest-helper: ready")
    assert not os.path.exists(os.path.join(d, "v.sock"))
    assert vsock_echo(os.path.join(d, "other.sock"), 1024, b"override") == b"override"
    g.stop()

    # a snapshot with a network interface, restored onto another TAP
    d2 = workdir(lab, "netsrc")
    f = start(lab, d2)
    f.configure("rootfs", lab.kernel, mem=16, net=True, boot_args="init=/sbin/init")
    f.api.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    f.wait_output("guest-helper: ready")
    f.api.ok("PATCH", "/vm", {"state": "Paused"})
    f.api.ok("PUT", "/snapshot/create", {"snapshot_path": "vmstate", "mem_file_path": "mem"})
    f.stop()
    os.unlink(os.path.join(d2, "v.sock"))
    g = start(lab, d2, sock="api2.sock")
    g.api.ok("PUT", "/snapshot/load", {"snapshot_path": "vmstate",
                                       "mem_backend": {"backend_type": "File",
                                                       "backend_path": "mem"},
                                       "network_overrides": [{"iface_id": "eth0",
                                                              "host_dev_name": "tap1"}]})
    cfg = g.api.get("/vm/config")[1]
    assert cfg["network-interfaces"][0]["host_dev_name"] == "tap1"
    # a TAP has carrier while a process has it open: tap1 (fcsim's now) has, tap2 has not
    links = dict((l.split()[0], l) for l in
                 sh("nsenter", f"--net={lab.slot}", "ip", "-br", "link").stdout.splitlines())
    assert "LOWER_UP" in links["tap1"], links
    assert "NO-CARRIER" in links["tap2"], links


def test_vmstate_version_and_checksum(lab):
    import json
    src = snapshot_of(lab, "src")
    for tamper, expect in (("version", "versions must match"), ("edit", "is corrupt")):
        d = workdir(lab, f"tamper-{tamper}")
        shutil.copy(os.path.join(src, "mem"), os.path.join(d, "mem"))
        st = json.load(open(os.path.join(src, "vmstate")))
        if tamper == "version":
            st["fcsim_version"] = "0.0.0"
            # recompute the checksum so that only the version differs
            import hashlib
            del st["checksum"]
            st["checksum"] = hashlib.sha256(
                json.dumps(st, separators=(",", ":")).encode()).hexdigest()
        else:
            st["boot_id"] += 1
        json.dump(st, open(os.path.join(d, "vmstate"), "w"))
        g = start(lab, d)
        status, fault = g.api.put("/snapshot/load", {"snapshot_path": "vmstate",
                                                     "mem_backend": {"backend_type": "File",
                                                                     "backend_path": "mem"}})
        assert status == 400 and expect in fault["fault_message"], fault
        g.stop()


def test_log_and_metrics_files(lab):
    import json
    import re
    d = workdir(lab, "logs")
    f = start(lab, d, args=["--log-path", "fc.log", "--level", "Debug", "--show-level",
                            "--show-log-origin", "--id", "vm-7"])
    f.api.ok("PUT", "/metrics", {"metrics_path": "fc.metrics"})
    f.api.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
    f.api.put("/drives/x", {"drive_id": "y", "is_root_device": False, "path_on_host": "rootfs"})
    lines = open(os.path.join(d, "fc.log")).read().splitlines()
    line = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9} "
                      r"\[vm-7:[\w-]+:(ERROR|WARN|INFO|DEBUG|TRACE):[\w/.]+:\d+\] .+$")
    assert lines and all(line.match(l) for l in lines), lines
    assert any("Running Firecracker v1.16.1" in l for l in lines)
    assert any(":ERROR:" in l and "does not match" in l for l in lines)
    metrics = [json.loads(m) for m in open(os.path.join(d, "fc.metrics")).read().splitlines()]
    assert metrics and "utc_timestamp_ms" in metrics[0]
    assert metrics[0]["api_server"]["requests"] >= 2
