# ember-init as the PID 1 of a real kernel, not of a pid namespace: Debian's kernel booted in
# QEMU (TCG) with an initramfs holding ember-init, a static busybox and a stand-in agent, and
# stopped the way Firecracker's SendCtrlAltDel stops a microVM, with the keyboard's
# Ctrl-Alt-Del. What only a real kernel shows: kernel threads that kill(-1, 0) also reaches,
# Ctrl-Alt-Del arriving as SIGINT once init asked for it (RB_DISABLE_CAD), the remount of / and
# the reset that ends the VMM (QEMU with -no-reboot exits, as Firecracker does).
#
# The test VM runner (test/vm/run) cannot host this: its PID 1 is its own. Its helpers for the
# kernel and the initramfs are reused.

import importlib.machinery
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from conftest import BUILD, SLOW

HERE = os.path.dirname(os.path.abspath(__file__))
INIT = os.path.join(BUILD, "ember-init")
QEMU = shutil.which("qemu-system-x86_64")
BUSYBOX = "/bin/busybox"


def vm_runner():
    loader = importlib.machinery.SourceFileLoader("vm_run", os.path.join(HERE, "..", "vm",
                                                                         "run"))
    spec = importlib.util.spec_from_loader("vm_run", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


# The agent: the first start exits (init must start it again); the second leaves behind an
# orphan, reparented to init, and a process that ignores SIGTERM, so that shutdown must reach
# both, the second with SIGKILL.
AGENT = r"""#!/bin/busybox sh
if [ ! -e /run/agent-started ]; then
    : > /run/agent-started
    echo "agent: first start as pid $$, exiting"
    exit 3
fi
echo "agent: second start as pid $$"
while read -r dev mnt type rest; do echo "agent: mount $mnt $type"; done < /proc/mounts
( sleep 1000 & )
sh -c 'trap "" TERM; : > /run/term-ignored; exec sleep 1001' &
# "ready" only once SIGTERM is ignored: said earlier, a Ctrl-Alt-Del sent at once could reach
# the shell before its trap (slow under TCG) and no SIGKILL would be needed
while [ ! -e /run/term-ignored ]; do sleep 0.05; done
echo "agent: ready"
exec sleep 1002
"""


def initramfs(path, runner):
    with open(INIT, "rb") as f:
        init = f.read()
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    entries = [(d, 0o40755, b"") for d in ("bin", "sbin", "usr", "usr/bin", "etc", "proc",
                                            "sys", "dev", "run", "tmp", "root")]
    entries += [("dev/console", 0o20600, b"", (5, 1)),
                ("sbin/ember-init", 0o100755, init), ("bin/busybox", 0o100755, busybox),
                ("usr/bin/agent", 0o100755, AGENT.encode())]
    for applet in ("sh", "sleep", "echo"):
        entries.append((f"bin/{applet}", 0o120777, b"busybox"))
    with open(path, "wb") as f:
        f.write(runner.cpio_newc(entries))


@pytest.fixture
def vm():
    if not QEMU:
        pytest.skip("qemu-system-x86_64 missing (make deps installs it)")
    if not os.path.exists(BUSYBOX) or subprocess.run(["ldd", BUSYBOX],
                                                     capture_output=True).returncode == 0:
        pytest.skip("no static busybox (make deps installs busybox-static)")
    runner = vm_runner()
    kernels = sorted(f for f in os.listdir("/boot") if f.startswith("vmlinuz-") and
                     f.endswith("-amd64"))
    if not kernels:
        pytest.skip("no Debian kernel in /boot (make deps installs linux-image-amd64)")
    d = tempfile.mkdtemp(prefix="ember-init-boot-", dir="/tmp")
    p = None
    try:
        rd = os.path.join(d, "initrd.cpio")
        initramfs(rd, runner)
        console, monitor = os.path.join(d, "console.log"), os.path.join(d, "monitor.sock")
        append = ("console=ttyS0 panic=-1 loglevel=4 rdinit=/sbin/ember-init "
                  "ember.guest=/usr/bin/agent")
        p = subprocess.Popen(
            [QEMU, "-M", "pc", "-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1",
             "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
             "-kernel", os.path.join("/boot", kernels[-1]), "-initrd", rd, "-append", append,
             "-serial", f"file:{console}", "-monitor", f"unix:{monitor},server,nowait"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=runner.die_with_parent)
        yield p, console, monitor
    finally:
        if p and p.poll() is None:
            p.kill()
            p.wait()
        shutil.rmtree(d, ignore_errors=True)


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read().replace("\r", "")
    except FileNotFoundError:
        return ""


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout * SLOW
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_pid1_of_a_real_kernel(vm):
    p, console, monitor = vm
    wait_for(lambda: "agent: ready" in read(console) or p.poll() is not None, 120,
             "the agent's second start")
    out = read(console)
    assert "agent: ready" in out, out
    for want in ["ember-init: mounted devtmpfs on /dev", "ember-init: mounted devpts on /dev/pts",
                 "ember-init: lo: up", "agent: first start as pid",
                 "ember-init: /usr/bin/agent exited with status 3",
                 "agent: mount /proc proc", "agent: mount /sys sysfs", "agent: mount /run tmpfs",
                 "agent: mount /tmp tmpfs", "agent: mount /dev/pts devpts"]:
        assert want in out, f"{want!r} not in:\n{out}"
    assert "cannot route Ctrl-Alt-Del" not in out, out

    # Firecracker's SendCtrlAltDel is this key press on the i8042 keyboard controller
    s = socket.socket(socket.AF_UNIX)
    s.connect(monitor)
    s.sendall(b"sendkey ctrl-alt-delete\n")
    t = time.monotonic()
    rc = p.wait(60 * SLOW)
    took = time.monotonic() - t
    s.close()
    out = read(console)
    assert rc == 0, out
    assert "ember-init: SIGINT (Ctrl-Alt-Del): stopping every process and powering off" in out
    # the process that ignores SIGTERM needs SIGKILL; after it, nothing is left: kernel
    # threads do not count as processes init waits for
    assert "sending SIGKILL" in out, out
    assert "processes left after SIGKILL" not in out, out
    assert "cannot remount / read-only" not in out, out
    init_lines = [l for l in out.splitlines() if l.startswith("ember-init: ")]
    assert init_lines[-1] == "ember-init: power off (a reset: the VMM exits)", out
    print(f"Ctrl-Alt-Del to QEMU's exit: {took:.1f} s (5 s of it the SIGTERM grace period)")
