# ember-init (PID 1 of the microVM) and ember-mkrootfs (guest/mkrootfs).
#
# Images are made by mkrootfs and booted under fcsim in network namespaces of the test's own.
# ember-guest is being written elsewhere: a stand-in takes its place, build/test/guest-helper
# ("serve 1024 7": echo on the vsock port and on TCP 7; a "POWEROFF" line makes it exit)
# started by a two-line script installed as /usr/bin/ember-guest.
#
# fcsim does what a kernel would do before init (the hostname and eth0 from ip=, a /dev
# tmpfs), hides /proc/cmdline (it is the host's) and cannot power off. So one test also runs
# ember-init as PID 1 of namespaces made here, without EMBER_SIM, on the image mounted in a
# private mount namespace with a /proc/cmdline of our own: there init reads ip= and
# ember.guest=, configures eth0 itself, mounts devtmpfs, and ends the machine with
# reboot(RB_AUTOBOOT), which in a pid namespace ends init with SIGHUP.
#
# Not testable here: a real kernel's console and /dev/kmsg (and init started without fds
# 0-2), reboot(RB_DISABLE_CAD) (refused in a pid namespace), a real reset ending Firecracker,
# and CONFIG_IP_PNP (fcsim plays that part).

import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time

import pytest

from conftest import BUILD, SLOW, SRCDIR, wait_for
from fcsim_util import HELPER, Fcsim, vsock_connect, vsock_echo

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

MKROOTFS = os.path.join(SRCDIR, "guest", "mkrootfs")
INIT = os.path.join(BUILD, "ember-init")
PROBE = os.path.join(SRCDIR, "test", "net", "probe.py")
PY = "/usr/bin/python3"
IP_ARG = "ip=169.254.0.21::169.254.0.22:255.255.255.252:sbx-7:eth0:off"
BOOT_ARGS = ("console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp "
             "i8042.dumbkbd init=/sbin/ember-init")
STANDIN = "#!/bin/sh\nexec /usr/bin/guest-helper serve 1024 7\n"
MiB = 1 << 20


def sh(*args, check=True, timeout=60, **kw):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                       **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{args}: {r.returncode}\n{r.stdout}{r.stderr}")
    return r


def netns_new(lab, name):
    """A network namespace bind-mounted in the lab (removed at teardown)."""
    path = os.path.join(lab.root, name)
    open(path, "w").close()
    lab.netns.append(path)
    sh("unshare", f"--net={path}", "true")
    sh("nsenter", f"--net={path}", "ip", "link", "set", "lo", "up")
    return path


@pytest.fixture
def lab():
    """A temp dir; a "slot" namespace with tap0 (169.254.0.22/30) as ember makes; a fake
    kernel. Every fcsim, process and namespace made through it goes at teardown."""
    assert os.path.exists(INIT), f"{INIT} missing: build it (make)"
    root = tempfile.mkdtemp(prefix="ember-init-", dir="/tmp")
    lab = type("Lab", (), {})()
    lab.root, lab.netns, lab.vmms, lab.procs = root, [], [], []
    try:
        lab.slot = netns_new(lab, "slot")
        ns = ["nsenter", f"--net={lab.slot}"]
        sh(*ns, "ip", "tuntap", "add", "tap0", "mode", "tap")
        sh(*ns, "ip", "addr", "add", "169.254.0.22/30", "dev", "tap0")
        sh(*ns, "ip", "link", "set", "tap0", "up")
        lab.kernel = os.path.join(root, "vmlinux")
        with open(lab.kernel, "wb") as f:
            f.write(b"\x7fELF not a real kernel: fcsim does not boot it")
        yield lab
    finally:
        for f in lab.vmms:
            f.stop()
        for p in lab.procs:
            if p.poll() is None:
                # unshare's child first, the init of its pid namespace: SIGKILL ends the whole
                # namespace, and unshare reaps it and exits (killing unshare first would leave
                # that init to the machine's PID 1 to reap)
                for c in pids():
                    if (stat_of(c) or ("", "", 0))[2] == p.pid:
                        os.kill(c, signal.SIGKILL)
                try:
                    p.wait(10 * SLOW)
                except subprocess.TimeoutExpired:
                    p.kill()  # --kill-child: its init goes too
            p.wait()
        for path in lab.netns:
            sh("umount", "-l", path, check=False)
        shutil.rmtree(root, ignore_errors=True)


def mkrootfs(*args, check=True, **kw):
    r = sh(PY, MKROOTFS, *args, check=False, **kw)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def write(path, text, mode=0o755):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def busybox_image(lab, name, guest_script):
    """mkrootfs without a tree: busybox, ember-init, and `guest_script` as ember-guest."""
    guest = write(os.path.join(lab.root, f"{name}-guest.sh"), guest_script)
    image = os.path.join(lab.root, f"{name}.ext4")
    r = mkrootfs("--init", INIT, "--guest", guest, image)
    assert r.stdout.strip() == BOOT_ARGS
    return image


def standin_image(lab, name, guest_script=STANDIN, extra=None):
    """A tree with guest-helper (and `extra` {path: text} scripts), plus busybox."""
    tree = os.path.join(lab.root, f"{name}-tree")
    os.makedirs(os.path.join(tree, "usr", "bin"))
    shutil.copy(HELPER, os.path.join(tree, "usr", "bin", "guest-helper"))
    for path, text in (extra or {}).items():
        write(os.path.join(tree, path.lstrip("/")), text)
    guest = write(os.path.join(lab.root, f"{name}-guest.sh"), guest_script)
    image = os.path.join(lab.root, f"{name}.ext4")
    mkrootfs("--tree", tree, "--busybox-userland", "--init", INIT, "--guest", guest, image)
    return image


def boot(lab, image, net=False, boot_args=IP_ARG, wait="ember-init: started"):
    d = os.path.join(lab.root, f"vm{len(lab.vmms)}")
    os.makedirs(d)
    shutil.copy(image, os.path.join(d, "rootfs"))
    f = Fcsim(d, netns=lab.slot)
    lab.vmms.append(f)
    f.dir = d
    f.configure("rootfs", lab.kernel, mem=32, net=net,
                boot_args=BOOT_ARGS.replace("console=ttyS0 ", "") + " " + boot_args)
    f.api.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    if wait:
        f.wait_output(wait)
    return f


def ctrl_alt_del(f):
    f.api.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})


def init_lines(f):
    return [line for line in f.output().splitlines() if line.startswith("ember-init: ")]


def stat_of(pid):
    """(comm, state, ppid) from /proc/<pid>/stat, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            s = fh.read()
    except OSError:
        return None
    comm = s[s.index("(") + 1:s.rindex(")")]
    rest = s[s.rindex(")") + 2:].split()
    return comm, rest[0], int(rest[1])


def pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def guest_init(f):
    """The guest's init: fcsim's only child process."""
    return wait_for(lambda: next((p for p in pids() if (stat_of(p) or ("", "", 0))[2] == f.p.pid),
                                 None), 10, "the guest's init")


def guest_processes(init):
    """{pid: (comm, state, ppid)} of every process in the guest's pid namespace."""
    ns = os.stat(f"/proc/{init}/ns/pid")
    out = {}
    for p in pids():
        try:
            st = os.stat(f"/proc/{p}/ns/pid")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (ns.st_dev, ns.st_ino):
            s = stat_of(p)
            if s:
                out[p] = s
    return out


def guest_sh(init, script, check=True):
    """A busybox shell inside the guest: its namespaces and root."""
    return sh("nsenter", "-t", init, "-m", "-u", "-i", "-n", "-p", "-r", "-w", "/bin/sh", "-c",
              script, check=check)


def standin_pid(init):
    found = [p for p, (comm, _, ppid) in guest_processes(init).items()
             if comm == "guest-helper" and ppid == init]
    return found[0] if len(found) == 1 else None


def tcp_echo(ns, host):
    return sh("nsenter", f"--net={ns}", PY, PROBE, "echo", host, "7", "3").stdout.strip()


# ---------------------------------------------------------------------------------------------
# under fcsim


def test_busybox_image_boots(lab):
    image = busybox_image(lab, "bb", '#!/bin/sh\necho "stand-in: pid $$ EMBER_SIM=$EMBER_SIM"\n'
                                     'exec sleep 1000000\n')
    f = boot(lab, image, wait="stand-in: pid")
    init = guest_init(f)
    lines = init_lines(f)
    for want in ["ember-init: mounted proc on /proc", "ember-init: mounted sysfs on /sys",
                 # fcsim's /dev tmpfs is kept: devtmpfs there would be the host's devices
                 "ember-init: /dev: already mounted",
                 "ember-init: mounted devpts on /dev/pts", "ember-init: mounted tmpfs on /dev/shm",
                 "ember-init: mounted tmpfs on /run", "ember-init: mounted tmpfs on /tmp",
                 "ember-init: hostname sbx-7", "ember-init: lo: up",
                 "ember-init: started /usr/bin/ember-guest (pid 2)"]:
        assert want in lines, f"{want!r} not in:\n" + "\n".join(lines)
    assert "simulated microVM" in lines[0]
    # EMBER_SIM reaches ember-guest
    assert "stand-in: pid 2 EMBER_SIM=1" in f.output()

    with open(f"/proc/{init}/mountinfo") as fh:
        mounts = {l.split(" - ")[0].split()[4]: (l.split(" - ")[0].split()[5], l.split(" - ")[1])
                  for l in fh.read().splitlines()}
    assert mounts["/proc"][1].startswith("proc ")
    assert mounts["/sys"][1].startswith("sysfs ") and mounts["/sys"][0].startswith("ro,")
    assert mounts["/dev/pts"][1].startswith("devpts ") and "gid=5" in mounts["/dev/pts"][1] \
        and "ptmxmode=666" in mounts["/dev/pts"][1]
    for p in ("/run", "/tmp", "/dev/shm"):
        assert mounts[p][1].startswith("tmpfs "), (p, mounts[p])
    assert "UP" in sh("nsenter", "-t", init, "-n", "ip", "-o", "link", "show", "lo").stdout
    # the userland works: busybox, /etc/passwd, /dev/null, a pty from /dev/pts
    out = guest_sh(init, "hostname; id -un; echo x >/dev/null && echo null-ok; "
                         "ls /dev/fd/ >/dev/null && echo fd-ok").stdout.split()
    assert out == ["sbx-7", "root", "null-ok", "fd-ok"]

    t0 = time.monotonic()
    ctrl_alt_del(f)
    assert f.p.wait(20 * SLOW) == 0
    assert time.monotonic() - t0 < 4 * SLOW  # everything stopped on SIGTERM: no SIGKILL wait
    lines = init_lines(f)
    assert "ember-init: SIGINT (Ctrl-Alt-Del): stopping every process and powering off" in lines
    assert "ember-init: /usr/bin/ember-guest killed by signal 15 (TERM)" in lines
    assert lines[-1] == "ember-init: power off (simulated: init exits)"
    assert stat_of(init) is None


def test_eth0_from_ip_arg(lab):
    f = boot(lab, standin_image(lab, "net"), net=True, wait="guest-helper: ready")
    init = guest_init(f)
    # fcsim configured eth0 as a kernel with CONFIG_IP_PNP would: init sees it and keeps it
    assert "ember-init: eth0: 169.254.0.21/30 (configured before init)" in init_lines(f)
    assert tcp_echo(lab.slot, "169.254.0.21") == "ok"
    routes = sh("nsenter", "-t", init, "-n", "ip", "route").stdout
    assert "default via 169.254.0.22 dev eth0" in routes
    assert vsock_echo(os.path.join(f.dir, "v.sock"), 1024, b"hello") == b"hello"


def test_guest_restarted(lab):
    f = boot(lab, standin_image(lab, "restart"), net=True, wait="guest-helper: ready")
    init = guest_init(f)
    uds = os.path.join(f.dir, "v.sock")
    first = wait_for(lambda: standin_pid(init), 10, "the stand-in")

    # killed from the host
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: f.output().count("guest-helper: ready") == 2, 10, "a restart")
    second = standin_pid(init)
    assert second and second != first
    assert re.search(r"ember-init: /usr/bin/ember-guest killed by signal 9 \(KILL\) after "
                     r"[\d.]+ s; restarting in 100 ms", f.output())
    assert vsock_echo(uds, 1024, b"again") == b"again"
    assert tcp_echo(lab.slot, "169.254.0.21") == "ok"

    # exits on its own (a vsock command): restarted as well, a little later (back-off)
    s, ok = vsock_connect(uds, 1024)
    assert ok.startswith("OK ")
    s.sendall(b"POWEROFF\n")
    s.recv(64)
    s.close()
    wait_for(lambda: f.output().count("guest-helper: ready") == 3, 10, "a second restart")
    assert re.search(r"ember-init: /usr/bin/ember-guest exited with status 0 after [\d.]+ s; "
                     r"restarting in 200 ms", f.output())
    assert vsock_echo(uds, 1024, b"third") == b"third"
    assert standin_pid(init) not in (first, second, None)


def test_crash_loop_backs_off(lab):
    image = busybox_image(lab, "crash", "#!/bin/sh\necho crashing\nexit 3\n")
    # before the boot: the first exit may come before boot() returns, and the waits to
    # measure start there
    t0 = time.monotonic()
    f = boot(lab, image)

    def delays():
        return [int(m) for m in re.findall(r"exited with status 3 after [\d.]+ s; restarting "
                                           r"in (\d+) ms", f.output())]
    wait_for(lambda: len(delays()) >= 5, 15, "five restarts")
    took = time.monotonic() - t0
    assert delays()[:5] == [100, 200, 400, 800, 1600], f.output()
    # the fifth exit comes after 0.1 + 0.2 + 0.4 + 0.8 s of waiting, not at once
    assert took >= 1.5, took
    assert f.output().count("ember-init: started /usr/bin/ember-guest") <= 6
    # init survives its service's crash loop and still powers off
    ctrl_alt_del(f)
    assert f.p.wait(20 * SLOW) == 0


def test_missing_guest_binary_is_survived(lab):
    image = busybox_image(lab, "noguest", "#!/bin/sh\nexit 0\n")
    # a guest path that does not exist: init keeps retrying with back-off, and stays up
    sh("debugfs", "-w", "-R", "rm /usr/bin/ember-guest", image)
    f = boot(lab, image)
    f.wait_output("ember-init: cannot run /usr/bin/ember-guest: No such file or directory")
    f.wait_output("exited with status 127")
    assert f.p.poll() is None
    ctrl_alt_del(f)
    assert f.p.wait(20 * SLOW) == 0


def test_orphans_reaped(lab):
    f = boot(lab, standin_image(lab, "orphans"), wait="guest-helper: ready")
    init = guest_init(f)
    # each ( … &) subshell exits at once: its sleep is orphaned and re-parented to init
    # (not on our pipes: run() would wait for them to close)
    guest_sh(init, "for i in $(seq 20); do (sleep 1.5 </dev/null >/dev/null 2>&1 &); done")

    def orphans():
        sleeps = [s for s in guest_processes(init).values() if s[0] == "sleep"]
        return len(sleeps) == 20 and all(s[2] == init for s in sleeps)
    wait_for(orphans, 1, "20 sleeps, children of init")

    def settled():
        procs = guest_processes(init)
        return not any(s[0] == "sleep" or s[1] == "Z" for s in procs.values())
    # without reaping they would stay zombies ("Z") for as long as the guest runs
    wait_for(settled, 8, "the orphans to be reaped")
    assert {s[0] for s in guest_processes(init).values()} == {"ember-init", "guest-helper"}
    # and the supervised one was not mistaken for an orphan
    assert "restarting" not in f.output()


def test_ctrl_alt_del_kills_what_ignores_sigterm(lab):
    f = boot(lab, standin_image(lab, "cad"), wait="guest-helper: ready")
    init = guest_init(f)
    guest_sh(init, "(trap '' TERM; exec sleep 1000 </dev/null >/dev/null 2>&1) &")
    wait_for(lambda: any(s[0] == "sleep" for s in guest_processes(init).values()), 5,
             "the stubborn process")
    t0 = time.monotonic()
    ctrl_alt_del(f)
    assert f.p.wait(30 * SLOW) == 0
    took = time.monotonic() - t0
    lines = init_lines(f)
    assert "ember-init: SIGINT (Ctrl-Alt-Del): stopping every process and powering off" in lines
    assert "ember-init: processes left 5 s after SIGTERM: sending SIGKILL" in lines
    assert lines[-1] == "ember-init: power off (simulated: init exits)"
    assert 4.5 < took < 10 * SLOW, took
    assert stat_of(init) is None


def test_sigterm_powers_off(lab):
    """SIGTERM to init (busybox `reboot`, or a plain kill 1) is a power-off too."""
    f = boot(lab, standin_image(lab, "term"), wait="guest-helper: ready")
    init = guest_init(f)
    # The shell that sends the signal lives in the guest too, so init's shutdown signals it
    # as well: it ignores SIGTERM so that it exits by itself (status 0) instead of racing the
    # shutdown it started. init then finds no process left and needs no SIGKILL.
    guest_sh(init, "trap '' TERM; kill -TERM 1")
    assert f.p.wait(20 * SLOW) == 0
    lines = init_lines(f)
    assert "ember-init: SIGTERM: stopping every process and powering off" in lines
    assert not any("sending SIGKILL" in line for line in lines), lines


# ---------------------------------------------------------------------------------------------
# ember-init as PID 1 without fcsim: what fcsim does in its place (ip=, /dev, power-off)

WRAP = """set -e
mount -o loop "$1" "$2"
mount -t proc proc "$2/proc"
mount --bind "$3" "$2/proc/cmdline"
exec chroot "$2" /sbin/ember-init
"""


def test_bare_pid1_reads_cmdline_configures_eth0_and_powers_off(lab):
    # ember.guest= names another binary than the default, which would fail
    image = standin_image(lab, "bare", guest_script="#!/bin/sh\necho wrong-guest\nexit 1\n",
                          extra={"/usr/bin/standin": STANDIN})
    peer, guestns = netns_new(lab, "peer"), netns_new(lab, "guestns")
    sh("nsenter", f"--net={peer}", "ip", "link", "add", "veth-g", "type", "veth", "peer", "name",
       "eth0", "netns", guestns)
    sh("nsenter", f"--net={peer}", "ip", "addr", "add", "10.77.0.1/24", "dev", "veth-g")
    sh("nsenter", f"--net={peer}", "ip", "link", "set", "veth-g", "up")
    cmdline = write(os.path.join(lab.root, "cmdline"),
                    "console=ttyS0 reboot=k panic=1 ip=10.77.0.2::10.77.0.1:255.255.255.0:bare-1:"
                    "eth0:off ember.guest=/usr/bin/standin init=/sbin/ember-init -- ip=9.9.9.9\n",
                    0o644)
    mnt = os.path.join(lab.root, "mnt")
    os.makedirs(mnt)
    log_path = os.path.join(lab.root, "bare.log")
    host_name = os.uname().nodename
    with open(log_path, "wb") as log:
        p = subprocess.Popen(["nsenter", f"--net={guestns}", "unshare", "--pid", "--fork",
                              "--kill-child", "--mount", "--propagation", "private", "--uts",
                              "--ipc", "env", "-i", "HOME=/", "TERM=linux", "/bin/sh", "-c", WRAP,
                              "wrap", image, mnt, cmdline], stdout=log, stderr=subprocess.STDOUT)
    lab.procs.append(p)

    def output():
        with open(log_path, errors="replace") as fh:
            return fh.read()
    wait_for(lambda: "guest-helper: ready" in output() or p.poll() is not None, 20,
             "the stand-in")
    out = output()
    assert "guest-helper: ready" in out, out
    assert "simulated" not in out
    for want in ["ember-init: /proc: already mounted", "ember-init: mounted devtmpfs on /dev",
                 "ember-init: mounted devpts on /dev/pts", "ember-init: hostname bare-1",
                 "ember-init: lo: up", "ember-init: eth0: 10.77.0.2/24 gateway 10.77.0.1",
                 "ember-init: started /usr/bin/standin (pid 5)"]:
        assert want in out, f"{want!r} not in:\n{out}"
    assert "wrong-guest" not in out
    # eth0 was configured by init itself: address, broadcast, default route, reachable
    addr = sh("nsenter", f"--net={guestns}", "ip", "-4", "-o", "addr", "show", "eth0").stdout
    assert "inet 10.77.0.2/24 brd 10.77.0.255" in addr
    assert "default via 10.77.0.1 dev eth0" in sh("nsenter", f"--net={guestns}", "ip",
                                                  "route").stdout
    assert tcp_echo(peer, "10.77.0.2") == "ok"
    init = wait_for(lambda: next((q for q in pids() if (stat_of(q) or ("", "", 0))[2] == p.pid),
                                 None), 5, "init")
    assert stat_of(init)[0] == "ember-init"
    assert sh("nsenter", "-t", init, "-u", "hostname").stdout.strip() == "bare-1"
    assert os.uname().nodename == host_name

    os.kill(init, signal.SIGINT)
    rc = p.wait(20 * SLOW)
    # init ends the machine with reboot(RB_AUTOBOOT), the reset that makes Firecracker exit;
    # in a pid namespace the kernel ends that namespace's init "killed by SIGHUP" instead, and
    # unshare passes it on by dying of the same signal
    assert rc in (-signal.SIGHUP, 128 + signal.SIGHUP), rc
    out = output()
    assert "ember-init: SIGINT (Ctrl-Alt-Del): stopping every process and powering off" in out
    assert out.rstrip().endswith("ember-init: power off (a reset: the VMM exits)"), out


# ---------------------------------------------------------------------------------------------
# ember-mkrootfs


def debugfs(image, request):
    return sh("debugfs", "-R", request, image).stdout


def inode_stat(image, path):
    """(type, permissions, uid, gid) of a path in the image, or None."""
    out = sh("debugfs", "-R", f'stat "{path}"', image, check=False).stdout
    t = re.search(r"Type: (\w+(?: special)?)\s+Mode:\s+(\d+)", out)
    u = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", out)
    return (t.group(1), int(t.group(2), 8), int(u.group(1)), int(u.group(2))) if t and u else None


def tree_listing(tree):
    out = []
    for dirpath, dirs, files in os.walk(tree):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out.append((os.path.relpath(p, tree), st.st_mode, st.st_size, st.st_mtime_ns))
    return sorted(out)


def test_mkrootfs_from_tree(lab):
    tree = os.path.join(lab.root, "tree")
    write(os.path.join(tree, "etc", "motd"), "hello from the tree\n", 0o644)
    write(os.path.join(tree, "etc", "hostname"), "tree-host\n", 0o644)
    write(os.path.join(tree, "opt", "app", "secret"), "s3cret\n", 0o600)
    os.chown(os.path.join(tree, "opt", "app", "secret"), 1234, 2345)
    data = os.urandom(3 * MiB)
    with open(os.path.join(tree, "opt", "app", "data.bin"), "wb") as fh:
        fh.write(data)
    os.symlink("app/data.bin", os.path.join(tree, "opt", "link"))
    # merged /usr with an absolute link, as in a Debian tree: /sbin/ember-init must land in
    # the tree's usr/sbin, never in the host's /usr/sbin
    os.makedirs(os.path.join(tree, "usr", "sbin"))
    os.symlink("/usr/sbin", os.path.join(tree, "sbin"))
    host_file = "/usr/sbin/ember-init"
    host_before = os.path.lexists(host_file) and os.lstat(host_file)
    before = tree_listing(tree)

    image = os.path.join(lab.root, "tree.ext4")
    r = mkrootfs("--tree", tree, "--init", INIT, "--guest", HELPER, "--size", "64M", image)
    assert r.stdout.strip() == BOOT_ARGS
    assert os.path.getsize(image) == 64 * MiB
    assert tree_listing(tree) == before, "the tree was changed"
    assert (os.path.lexists(host_file) and os.lstat(host_file)) == host_before

    assert debugfs(image, "cat /etc/motd") == "hello from the tree\n"
    assert debugfs(image, "cat /etc/hostname") == "tree-host\n"  # the tree's files win
    dump = os.path.join(lab.root, "data.out")
    sh("debugfs", "-R", f"dump /opt/app/data.bin {dump}", image)
    with open(dump, "rb") as fh:
        assert hashlib.sha256(fh.read()).digest() == hashlib.sha256(data).digest()
    assert inode_stat(image, "/opt/app/secret") == ("regular", 0o600, 1234, 2345)
    assert inode_stat(image, "/opt/link")[0] == "symlink"
    assert inode_stat(image, "/sbin")[0] == "symlink"
    assert inode_stat(image, "/usr/sbin/ember-init")[:2] == ("regular", 0o755)
    assert inode_stat(image, "/usr/sbin/init")[0] == "symlink"
    assert inode_stat(image, "/usr/bin/ember-guest")[:2] == ("regular", 0o755)
    with open(INIT, "rb") as fh:
        sh("debugfs", "-R", f"dump /usr/sbin/ember-init {dump}", image)
        with open(dump, "rb") as out:
            assert out.read() == fh.read()
    # what init needs, added around the tree
    for d in ("/proc", "/sys", "/dev", "/run", "/tmp"):
        assert inode_stat(image, d)[0] == "directory", d
    assert inode_stat(image, "/tmp")[1] == 0o1777
    assert inode_stat(image, "/dev/console")[:2] == ("character special", 0o600)
    assert inode_stat(image, "/dev/null")[:2] == ("character special", 0o666)
    assert debugfs(image, "cat /etc/passwd").startswith("root:x:0:0:")
    assert "tty:x:5:" in debugfs(image, "cat /etc/group")
    # no busybox unless asked for
    assert inode_stat(image, "/bin/busybox") is None
    # the file system is clean
    sh("e2fsck", "-fn", image)


def test_mkrootfs_busybox_userland(lab):
    image = busybox_image(lab, "bbx", "#!/bin/sh\nexit 0\n")
    assert inode_stat(image, "/bin/busybox")[:2] == ("regular", 0o755)
    for applet in ("/bin/sh", "/bin/ls", "/sbin/ip", "/bin/mount"):
        assert inode_stat(image, applet)[0] == "symlink", applet
    assert debugfs(image, "stat /sbin/init").count("Fast link dest: \"ember-init\"") == 1
    assert debugfs(image, "cat /etc/hostname") == "ember\n"
    sh("e2fsck", "-fn", image)
    assert os.path.getsize(image) == 32 * MiB  # content plus room, 32 MiB at least
    # and no staging left next to it
    assert not [n for n in os.listdir(lab.root) if n.startswith(".ember-mkrootfs-")]


def test_mkrootfs_unprivileged(lab):
    """Without root, the files mkrootfs adds still belong to root in the image."""
    d = tempfile.mkdtemp(prefix="ember-init-nobody-", dir="/tmp")
    try:
        os.chmod(d, 0o755)
        os.chown(d, 65534, 65534)
        init = shutil.copy(INIT, os.path.join(d, "ember-init"))
        guest = write(os.path.join(d, "guest.sh"), STANDIN)
        image = os.path.join(d, "nobody.ext4")
        r = sh("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PY, MKROOTFS,
               "--init", init, "--guest", guest, image, check=False, cwd=d)
        assert r.returncode == 0, r.stderr
        assert os.stat(image).st_uid == 65534
        for p in ("/", "/sbin/ember-init", "/usr/bin/ember-guest", "/bin/busybox", "/bin/sh",
                  "/etc/passwd", "/tmp", "/dev/console", "/usr/bin"):
            st = inode_stat(image, p)
            assert st and st[2:] == (0, 0), (p, st)
        sh("e2fsck", "-fn", image)

        # A tree of root's, built by nobody: its owners and set-id bits are kept in the image
        # (cp alone would give everything to nobody and drop the bits); a read-only directory
        # and a dangling /var link are no trouble; the staging copy is gone afterwards.
        tree = os.path.join(d, "tree")
        write(os.path.join(tree, "bin", "suid"), "#!/bin/sh\n", 0o755)
        os.chmod(os.path.join(tree, "bin", "suid"), 0o4755)
        write(os.path.join(tree, "srv", "owned"), "x\n", 0o640)
        os.chown(os.path.join(tree, "srv", "owned"), 1234, 65534)
        write(os.path.join(tree, "ro", "inside"), "y\n", 0o644)
        os.chmod(os.path.join(tree, "ro"), 0o555)
        os.symlink("/missing/var", os.path.join(tree, "var"))  # dangling
        image = os.path.join(d, "tree.ext4")
        r = sh("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PY, MKROOTFS,
               "--tree", tree, "--busybox-userland", "--init", init, "--guest", guest, image,
               check=False, cwd=d)
        assert r.returncode == 0, r.stderr
        assert inode_stat(image, "/bin/suid") == ("regular", 0o4755, 0, 0)
        assert inode_stat(image, "/srv/owned") == ("regular", 0o640, 1234, 65534)
        assert inode_stat(image, "/ro") == ("directory", 0o555, 0, 0)
        assert inode_stat(image, "/ro/inside") == ("regular", 0o644, 0, 0)
        assert inode_stat(image, "/sbin/ember-init")[1:] == (0o755, 0, 0)
        assert inode_stat(image, "/var")[0] == "symlink"
        assert inode_stat(image, "/missing/var/tmp")[:2] == ("directory", 0o1777)
        assert not [n for n in os.listdir(d) if n.startswith(".ember-mkrootfs-")]
        sh("e2fsck", "-fn", image)

        # device nodes: only root can copy them, and nobody is told so
        os.mknod(os.path.join(tree, "srv", "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        r = sh("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PY, MKROOTFS,
               "--tree", tree, "--busybox-userland", "--init", init, "--guest", guest, "-f",
               image, check=False, cwd=d)
        assert r.returncode != 0 and "holds device nodes (/srv/null)" in r.stderr, r.stderr
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_mkrootfs_errors(lab):
    out = os.path.join(lab.root, "e.ext4")
    guest = write(os.path.join(lab.root, "g.sh"), STANDIN)
    base = ["--init", INIT, "--guest", guest]

    def fails(*args, rc=1):
        r = mkrootfs(*args, check=False)
        assert r.returncode == rc, (args, r.returncode, r.stderr)
        assert r.stdout == ""  # no boot_args printed for an image that was not made
        return r.stderr

    assert "busybox-static" in fails(*base, "--busybox", "/nonexistent/busybox", out)
    # Debian's dynamic busybox package: refused, with the package to install instead
    err = fails(*base, "--busybox", "/bin/true", out)
    assert "dynamically linked" in err and "busybox-static" in err
    notdir = write(os.path.join(lab.root, "file"), "x", 0o644)
    assert "not a directory" in fails(*base, "--tree", notdir, out)
    assert "no such directory" in fails(*base, "--tree", os.path.join(lab.root, "nope"), out)
    assert "is not a file" in fails("--init", "/nonexistent", "--guest", guest, out)
    # a dynamic ember-init would not even start in a busybox image: the kernel would panic
    err = fails("--init", "/bin/true", "--guest", guest, out)
    assert "ember-init" in err and "needs /lib64/ld-linux-x86-64.so.2" in err
    # a guest script needs its interpreter in the image
    tree = os.path.join(lab.root, "empty-tree")
    os.makedirs(tree)
    err = fails(*base, "--tree", tree, out)
    assert "ember-guest" in err and "needs /bin/sh" in err
    assert "bad size" in fails(*base, "--size", "lots", out, rc=2)
    assert "minimum" in fails(*base, "--size", "1M", out, rc=2)
    big = os.path.join(lab.root, "big-tree")
    with open(os.path.join(os.makedirs(big) or big, "big"), "wb") as fh:
        fh.write(os.urandom(12 * MiB))
    assert "mkfs.ext4 failed for 8 MiB" in fails(*base, "--tree", big, "--busybox-userland",
                                                 "--size", "8M", out)
    assert not os.path.exists(out)
    # an existing image is kept unless --force
    mkrootfs(*base, out)
    with open(out, "rb") as fh:
        first = hashlib.sha256(fh.read()).digest()
    assert "--force" in fails(*base, out)
    with open(out, "rb") as fh:
        assert hashlib.sha256(fh.read()).digest() == first
    mkrootfs(*base, "--force", "--size", "40M", out)
    assert os.path.getsize(out) == 40 * MiB
    assert "is a directory" in fails(*base, "--force", lab.root)
    assert "is a directory" in fails(*base, lab.root)
    assert "inside the tree" in fails(*base, "--tree", lab.root, os.path.join(lab.root, "in.ext4"))
    os.makedirs(os.path.join(tree, "a"))
    assert "inside the tree" in fails(*base, "--tree", tree, os.path.join(tree, "a", "in.ext4"))
    # nothing left behind by the failures
    assert not [n for n in os.listdir(lab.root) if n.startswith(".ember-mkrootfs-")]
    r = mkrootfs("--help")
    assert "usage: ember-mkrootfs" in r.stdout and "--tree" in r.stdout


def test_mkrootfs_installed_defaults(lab):
    """Installed, ember-mkrootfs finds ember-init and ember-guest in the GUESTDIR that
    `make install` wrote into it; a missing one is named, with what to do."""
    prefix = os.path.join(lab.root, "usr")
    guestdir = os.path.join(prefix, "lib", "ember", "guest")
    os.makedirs(guestdir)
    os.makedirs(os.path.join(prefix, "bin"))
    with open(MKROOTFS) as fh:
        text = fh.read()
    assert text.count("@GUESTDIR@") == 1
    tool = write(os.path.join(prefix, "bin", "ember-mkrootfs"),
                 text.replace("@GUESTDIR@", guestdir))
    shutil.copy(INIT, os.path.join(guestdir, "ember-init"))
    image = os.path.join(lab.root, "inst.ext4")
    r = sh(PY, tool, image, check=False)
    assert r.returncode == 1
    assert f"ember-guest not found (looked for {guestdir}/ember-guest" in r.stderr
    assert "--guest" in r.stderr
    write(os.path.join(guestdir, "ember-guest"), STANDIN)
    r = sh(PY, tool, image)
    assert r.stdout.strip() == BOOT_ARGS
    assert debugfs(image, "cat /usr/bin/ember-guest") == STANDIN


# ---------------------------------------------------------------------------------------------
# with the real agent, when it is built (guest/agent/, written alongside)

AGENT = os.path.join(BUILD, "ember-guest")
GUEST_TOOL = os.path.join(BUILD, "test", "guest-tool")


@pytest.mark.skipif(not (os.path.exists(AGENT) and os.path.exists(GUEST_TOOL)),
                    reason="ember-guest and guest-tool not built")
def test_real_agent_restarted(lab):
    image = os.path.join(lab.root, "agent.ext4")
    mkrootfs("--init", INIT, "--guest", AGENT, image)
    f = boot(lab, image, wait="listening on unix /run/vsock/1024.sock")
    init = guest_init(f)
    uds = os.path.join(f.dir, "v.sock")

    def run(*args):
        return sh(GUEST_TOOL, "--vsock", uds, *args).stdout

    assert run("hello").startswith("ember-guest ")
    assert run("exec", "--no-stdin", "--", "sh", "-c", "echo hi; hostname") == "hi\nsbx-7\n"
    # the listener, init's child: a connection's handler (a fork) may still be finishing
    agent = [p for p, s in guest_processes(init).items() if s[0] == "ember-guest" and
             s[2] == init]
    assert len(agent) == 1
    os.kill(agent[0], signal.SIGKILL)
    wait_for(lambda: f.output().count("listening on unix /run/vsock/1024.sock") == 2, 10,
             "the agent to be restarted")
    assert "ember-init: /usr/bin/ember-guest killed by signal 9 (KILL)" in f.output()
    assert run("exec", "--no-stdin", "--", "echo", "again") == "again\n"
    ctrl_alt_del(f)
    assert f.p.wait(20 * SLOW) == 0
