# storage/ on a real kernel with device-mapper (in the VM): sharing of the base loop, isolation
# of sandboxes, persistence of the CoW, flatten, busy removal, a full CoW, crash reclaim, leaks,
# a restarted agent taking over live disks, racing creators, and disks not waiting on each other.

import hashlib
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import TOOL, dm_names, kv, loops_under, make_base, run, sha256, tool

MiB = 1 << 20


def dm_info():
    """{name: "major:minor uuid"} of the ember devices: a device made again gets a new minor."""
    out = run("dmsetup", "info", "-c", "--noheadings", "--separator", " ",
              "-o", "name,major,minor,uuid").stdout
    return {p[0]: f"{p[1]}:{p[2]} {p[3]}" for p in (l.split() for l in out.splitlines())
            if p and p[0].startswith("ember-")}


def parse(line):
    """A session's answer: {"ok": bool, key: value...}; a message runs to the end of the line."""
    head, _, message = line.rstrip("\n").partition(" message=")
    words = head.split()
    if words and words[0] == "bg":
        words = words[2:]
    r = {"ok": words[0] == "ok"}
    r.update(w.split("=", 1) for w in words[1:])
    if message:
        r["message"] = message
    return r


class Session:
    """One storage-tool process driven line by line: one Storage for many commands, as the
    agent has (a new Session is a restarted agent)."""

    def __init__(self, *opts):
        self.p = subprocess.Popen([TOOL, *map(str, opts), "session"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def _line(self):
        line = self.p.stdout.readline()
        if not line:
            self.p.wait(timeout=10)
            raise AssertionError(f"session ended ({self.p.returncode}): {self.p.stderr.read()}")
        return parse(line)

    def __call__(self, *args):
        self.p.stdin.write(" ".join(map(str, args)) + "\n")
        self.p.stdin.flush()
        return self._line()

    def wait(self, n):
        """The results of the n commands started with bg, in order."""
        self.p.stdin.write("wait\n")
        self.p.stdin.flush()
        results = [self._line() for _ in range(n)]
        assert self._line()["ok"]
        return results

    def close(self):
        if self.p.poll() is None:
            self.p.stdin.close()
            try:
                self.p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


@pytest.fixture
def sessions():
    """Starts sessions; each is ended at teardown (before `work` looks for leftovers, when the
    test names `work` first), whatever the test did."""
    started = []

    def start(*opts):
        started.append(Session(*opts))
        return started[-1]

    yield start
    for s in started:
        s.close()


@pytest.fixture
def holders():
    """Processes that keep a device open, as a running VMM does; killed at teardown."""
    started = []

    def hold(device):
        with open(device, "rb") as f:
            started.append(subprocess.Popen(["sleep", "600"], stdin=f))
        return started[-1]

    yield hold
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


def mount(device, where):
    os.makedirs(where, exist_ok=True)
    run("mount", device, where)


def umount(where):
    run("umount", where)


def spec(work, name):
    return [name, f"{work}/base.img", f"{work}/{name}.cow"]


def test_twenty_sandboxes_share_one_base(work):
    base = make_base(f"{work}/base.img", {"hello": b"from the base\n"})
    digest = sha256(base)
    n = 20
    devices = {}
    for i in range(n):
        out = tool("create", *spec(work, f"sb{i}"), 32 * MiB).stdout
        devices[i] = kv(out)["device"]
    # exactly one loop device for the base, one per CoW
    base_loops = [l for l in loops_under(work) if l[1] == base]
    assert len(base_loops) == 1, base_loops
    assert len(loops_under(work)) == n + 1
    assert dm_names() == sorted(f"ember-sb{i}" for i in range(n))

    for i in range(n):
        m = f"{work}/m{i}"
        mount(devices[i], m)
        with open(f"{m}/own-{i}", "w") as f:
            f.write(f"sandbox {i}\n")
        with open(f"{m}/hello", "a") as f:  # change a base file in place
            f.write(f"appended by {i}\n")
        umount(m)
    assert sha256(base) == digest, "a sandbox wrote to the base image"

    for i in range(n):
        m = f"{work}/m{i}"
        mount(devices[i], m)
        names = sorted(os.listdir(m))
        assert [x for x in names if x.startswith("own-")] == [f"own-{i}"]
        with open(f"{m}/hello") as f:
            assert f.read() == f"from the base\nappended by {i}\n"
        umount(m)
    for i in range(n):
        tool("remove", *spec(work, f"sb{i}"))
    assert dm_names() == [] and loops_under(work) == []
    assert sha256(base) == digest


def test_remove_then_restore_keeps_every_file(work):
    make_base(f"{work}/base.img", {"a": b"a" * 5000})
    dev = kv(tool("create", *spec(work, "keep"), 32 * MiB).stdout)["device"]
    m = f"{work}/m"
    mount(dev, m)
    sums = {}
    for i in range(30):
        data = os.urandom(1000 * (i + 1))
        with open(f"{m}/f{i}", "wb") as f:
            f.write(data)
        sums[f"f{i}"] = sha256(f"{m}/f{i}")
    umount(m)
    tool("remove", *spec(work, "keep"))
    assert dm_names() == [] and loops_under(work) == []
    # only the CoW file carries the disk now
    dev = kv(tool("restore", *spec(work, "keep")).stdout)["device"]
    mount(dev, m)
    for name, digest in sums.items():
        assert sha256(f"{m}/{name}") == digest, name
    umount(m)
    tool("remove", *spec(work, "keep"))


def test_flatten_is_byte_equal_and_sparse(work):
    make_base(f"{work}/base.img", {"x": b"x" * 100000}, size="256M")
    dev = kv(tool("create", *spec(work, "flat"), 64 * MiB).stdout)["device"]
    m = f"{work}/m"
    mount(dev, m)
    with open(f"{m}/new", "wb") as f:
        f.write(os.urandom(3 * MiB))
    umount(m)
    tool("flatten", *spec(work, "flat"), f"{work}/flat.img")
    assert sha256(f"{work}/flat.img") == sha256(dev)
    apparent = os.stat(f"{work}/flat.img").st_size
    allocated = int(tool("usage", f"{work}/flat.img").stdout)
    assert apparent == 256 * MiB
    assert allocated < apparent / 8, (allocated, apparent)
    # the flattened image serves as a base of its own
    tool("remove", *spec(work, "flat"))
    dev2 = kv(tool("create", "child", f"{work}/flat.img", f"{work}/child.cow",
                   32 * MiB).stdout)["device"]
    mount(dev2, m)
    assert os.path.getsize(f"{m}/new") == 3 * MiB
    umount(m)
    tool("remove", "child", f"{work}/flat.img", f"{work}/child.cow")
    # an existing destination is refused
    dev = kv(tool("restore", *spec(work, "flat")).stdout)["device"]
    r = tool("flatten", *spec(work, "flat"), f"{work}/flat.img", check=False)
    assert r.returncode != 0 and "exists" in r.stderr
    tool("remove", *spec(work, "flat"))


def test_remove_while_held_open(work):
    make_base(f"{work}/base.img", {"a": b"a"})
    dev = kv(tool("create", *spec(work, "busy"), 32 * MiB).stdout)["device"]
    holder = subprocess.Popen(["sleep", "600"], stdin=open(dev, "rb"))
    try:
        t = time.monotonic()
        r = tool("remove", *spec(work, "busy"), check=False)
        elapsed = time.monotonic() - t
        assert r.returncode != 0
        assert "still in use" in r.stderr, r.stderr
        assert f"pid {holder.pid} (sleep)" in r.stderr, r.stderr
        assert elapsed > 1.0, "gave up without retrying"
        assert dm_names() == ["ember-busy"]
        # the message tells the wait as it was: attempts, their spacing, the time spent
        m = re.search(r"still in use after (\d+) attempts (\d+) ms apart, (\d+) ms in all",
                      r.stderr)
        assert m, r.stderr
        attempts, apart, total = map(int, m.groups())
        assert attempts > 1 and apart > 0
        assert (attempts - 1) * apart <= total <= elapsed * 1000 + 1, (m.group(0), elapsed)
    finally:
        holder.kill()
        holder.wait()
    tool("remove", *spec(work, "busy"))
    assert dm_names() == []
    # mounted: the message says where
    dev = kv(tool("create", *spec(work, "busy2"), 32 * MiB).stdout)["device"]
    mount(dev, f"{work}/m")
    r = tool("remove", *spec(work, "busy2"), check=False)
    assert r.returncode != 0 and f"mounted on {work}/m" in r.stderr, r.stderr
    umount(f"{work}/m")
    tool("remove", *spec(work, "busy2"))


def test_cow_too_small(work):
    make_base(f"{work}/base.img", {"a": b"a"})
    small = kv(tool("create", *spec(work, "small"), 1 * MiB).stdout)["device"]
    other = kv(tool("create", *spec(work, "other"), 32 * MiB).stdout)["device"]
    # write far more than the 1 MiB CoW holds, straight to the device
    r = run("dd", "if=/dev/urandom", f"of={small}", "bs=1M", "count=4", "oflag=direct",
            check=False)
    assert r.returncode != 0, "writes beyond the CoW's capacity must fail"
    st = kv(tool("status", *spec(work, "small")).stdout)
    assert st["invalid"] == "1" and st["overflow"] == "1", st
    # the other sandbox on the same base is unaffected
    mount(other, f"{work}/m")
    with open(f"{work}/m/ok", "w") as f:
        f.write("fine\n")
    umount(f"{work}/m")
    st = kv(tool("status", *spec(work, "other")).stdout)
    assert st["invalid"] == "0" and int(st["used"]) > 0
    tool("remove", *spec(work, "small"))
    tool("remove", *spec(work, "other"))


def test_sigkill_during_create_then_reclaim(work):
    make_base(f"{work}/base.img", {"a": b"a"})
    # Kill creators at different moments; some will have finished a disk or two.
    for delay in (0.005, 0.02, 0.05, 0.1, 0.2):
        p = subprocess.Popen([TOOL, "multi", "50", f"{work}/base.img", work, str(8 * MiB)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        r = kv(tool("reclaim", work).stdout)
        assert r["failures"] == "0"
        assert dm_names() == [], f"after kill at {delay}s"
        assert loops_under(work) == [], f"after kill at {delay}s"
        for f in os.listdir(work):
            if f.endswith(".img") and f.startswith("cow-"):
                os.unlink(os.path.join(work, f))


def test_reclaim_keeps_what_it_is_told(work):
    make_base(f"{work}/base.img", {"a": b"a"})
    tool("create", *spec(work, "keepme"), 8 * MiB)
    tool("create", *spec(work, "dropme"), 8 * MiB)
    r = kv(tool("reclaim", work, "keepme").stdout)
    assert r["dm_removed"] == "1" and r["failures"] == "0"
    assert dm_names() == ["ember-keepme"]
    # the kept disk's loops (base and CoW) stay; the dropped one's are gone
    backing = sorted(l[1] for l in loops_under(work))
    assert backing == sorted([f"{work}/base.img", f"{work}/keepme.cow"])
    tool("remove", *spec(work, "keepme"))


def owner(cow):
    """The owner a create writes into the uuid: its CoW file's canonical path, hashed."""
    return hashlib.sha256(os.path.realpath(cow).encode()).hexdigest()[:16]


def uuid_of(name):
    return run("dmsetup", "info", "-c", "--noheadings", "-o", "uuid", name).stdout.strip()


def sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_devices_carry_their_owner(work):
    make_base(f"{work}/base.img", {"a": b"a"})
    tool("create", *spec(work, "own"), 8 * MiB)
    assert uuid_of("ember-own") == f"EMBER-own.{owner(f'{work}/own.cow')}"
    tool("remove", *spec(work, "own"))
    tool("restore", *spec(work, "own"))
    assert uuid_of("ember-own") == f"EMBER-own.{owner(f'{work}/own.cow')}"
    tool("remove", *spec(work, "own"))


def test_devices_of_the_old_uuid_format_are_taken_over(work):
    """A disk made before the uuid carried an owner (`EMBER-<id>`) is restored as it is."""
    base = make_base(f"{work}/base.img", {"a": b"a"})
    cow = sparse(f"{work}/legacy.cow", 8 * MiB)
    made = []
    try:
        made.append(run("losetup", "-r", "--find", "--show", base).stdout.strip())
        made.append(run("losetup", "--find", "--show", cow).stdout.strip())
        sectors = run("blockdev", "--getsz", made[0]).stdout.strip()
        dev_of = {d: "{}:{}".format(os.major(os.stat(d).st_rdev), os.minor(os.stat(d).st_rdev))
                  for d in made}
        run("dmsetup", "create", "ember-legacy", "-u", "EMBER-legacy", "--table",
            f"0 {sectors} snapshot {dev_of[made[0]]} {dev_of[made[1]]} P 8")
        before = dm_info()
        out = kv(tool("restore", "legacy", base, cow).stdout)
        assert out["device"] == "/dev/mapper/ember-legacy"
        assert dm_info() == before, "the old device was made again"
        tool("remove", "legacy", base, cow)
        assert dm_names() == []
    finally:
        run("dmsetup", "remove", "ember-legacy", check=False)
        for d in made:
            run("losetup", "-d", d, check=False)


def test_reclaim_leaves_another_agents_devices(work):
    """Two agents on one host, state dirs a and b. Reclaim from a with nothing kept removes
    a's devices (made, and a create stopped before its table) and leaves b's alone: its disk
    and loops, its create stopped before the table, its create between load and resume, and a
    tableless device that carries no owner. Then b's reclaim takes b's."""
    a, b = f"{work}/a", f"{work}/b"
    os.makedirs(a)
    os.makedirs(b)
    make_base(f"{a}/base.img", {"a": b"a"})
    make_base(f"{b}/base.img", {"b": b"from b\n"})
    tool("create", "a1", f"{a}/base.img", f"{a}/a1.cow", 8 * MiB)
    b1 = kv(tool("create", "b1", f"{b}/base.img", f"{b}/b1.cow", 8 * MiB).stdout)["device"]
    made = []
    try:
        for agent, name in ((a, "a2"), (b, "b2")):
            cow = sparse(f"{agent}/{name}.cow", 8 * MiB)
            run("dmsetup", "create", f"ember-{name}", "--notable", "-u",
                f"EMBER-{name}.{owner(cow)}")
        run("dmsetup", "create", "ember-old", "--notable", "-u", "EMBER-old")
        # b between load and resume: an inactive table over loops of b
        made.append(run("losetup", "-r", "--find", "--show", f"{b}/base.img").stdout.strip())
        made.append(run("losetup", "--find", "--show",
                        sparse(f"{b}/b3.cow", 8 * MiB)).stdout.strip())
        sectors = run("blockdev", "--getsz", made[0]).stdout.strip()
        mm = ["{}:{}".format(os.major(os.stat(d).st_rdev), os.minor(os.stat(d).st_rdev))
              for d in made]
        run("dmsetup", "create", "ember-b3", "--notable", "-u",
            f"EMBER-b3.{owner(f'{b}/b3.cow')}")
        run("dmsetup", "load", "ember-b3", "--table",
            f"0 {sectors} snapshot {mm[0]} {mm[1]} P 8")
        b_loops = sorted(loops_under(b))
        b_info = {k: v for k, v in dm_info().items() if not k.startswith("ember-a")}

        r = kv(tool("reclaim", a).stdout)
        assert r == {"dm_removed": "2", "loops_detached": "0", "failures": "0"}, r
        assert dm_names() == ["ember-b1", "ember-b2", "ember-b3", "ember-old"]
        assert dm_info() == b_info
        assert loops_under(a) == []
        assert sorted(loops_under(b)) == b_loops
        mount(b1, f"{work}/m")
        with open(f"{work}/m/b") as f:
            assert f.read() == "from b\n"
        umount(f"{work}/m")

        r = kv(tool("reclaim", b).stdout)
        assert r["dm_removed"] == "3" and r["failures"] == "0", r
        assert dm_names() == ["ember-old"]
        assert loops_under(b) == []  # b3's loops (no auto-clear) went as orphans
    finally:
        for name in ("a2", "b2", "b3", "old"):
            run("dmsetup", "remove", f"ember-{name}", check=False)
        for d in made:
            run("losetup", "-d", d, check=False)


def test_200_cycles_leak_nothing(work):
    make_base(f"{work}/base.img", {"a": b"a"})
    out = kv(tool("cycles", "200", f"{work}/base.img", work, str(8 * MiB)).stdout)
    assert out["cycles"] == "200"
    assert out["fds_before"] == out["fds_after"], out  # counted from cycle 2 on
    assert dm_names() == [] and loops_under(work) == []
    # (memory: under SANITIZE=1 the tool is built with ASan and LeakSanitizer checks it at
    # exit; `make check-vm` fails on any report)


def test_create_failure_leaves_nothing(work):
    make_base(f"{work}/base.img", {"a": b"a"})
    # an odd-sized base and a missing base: refused, no CoW file, no devices
    with open(f"{work}/odd.img", "wb") as f:
        f.write(b"x" * 1000)
    r = tool("create", "odd", f"{work}/odd.img", f"{work}/odd.cow", 8 * MiB, check=False)
    assert r.returncode != 0 and "multiple of 512" in r.stderr
    assert not os.path.exists(f"{work}/odd.cow")
    r = tool("create", "gone", f"{work}/nope.img", f"{work}/gone.cow", 8 * MiB, check=False)
    assert r.returncode != 0 and "nope.img" in r.stderr
    assert not os.path.exists(f"{work}/gone.cow")
    # an existing id is refused and the existing disk left alone
    tool("create", *spec(work, "dup"), 8 * MiB)
    r = tool("create", "dup", f"{work}/base.img", f"{work}/dup2.cow", 8 * MiB, check=False)
    assert r.returncode != 0 and "exists" in r.stderr
    assert not os.path.exists(f"{work}/dup2.cow")
    assert dm_names() == ["ember-dup"]
    tool("remove", *spec(work, "dup"))
    # remove is idempotent
    tool("remove", *spec(work, "dup"))
    assert dm_names() == [] and loops_under(work) == []


def test_replaced_base_gets_a_new_device(work):
    """The registry keys on the inode: an image replaced on disk gets its own loop device,
    and the disks over the old one keep theirs."""
    make_base(f"{work}/base.img", {"v": b"one\n"})
    old = kv(tool("create", *spec(work, "old"), 8 * MiB).stdout)["device"]
    os.rename(f"{work}/base.img", f"{work}/old.img")
    make_base(f"{work}/base.img", {"v": b"two\n"})
    new = kv(tool("create", *spec(work, "new"), 8 * MiB).stdout)["device"]
    backing = sorted(l[1] for l in loops_under(work))
    assert backing == sorted([f"{work}/base.img", f"{work}/old.img", f"{work}/new.cow",
                              f"{work}/old.cow"]), backing
    for dev, want in ((old, "one\n"), (new, "two\n")):
        mount(dev, f"{work}/m")
        with open(f"{work}/m/v") as f:
            assert f.read() == want
        umount(f"{work}/m")
    tool("remove", "old", f"{work}/old.img", f"{work}/old.cow")
    tool("remove", *spec(work, "new"))


@pytest.fixture
def udev():
    """systemd-udevd running for one test: libdevmapper then waits on cookies."""
    d = "/lib/systemd/systemd-udevd"
    if not os.path.exists(d):
        pytest.skip("no systemd-udevd on this host")
    p = subprocess.Popen([d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if os.path.exists("/run/udev/control"):
            break
        time.sleep(0.05)
    yield p
    p.terminate()
    p.wait()
    run("rm", "-rf", "/run/udev")


def test_with_udev(work, udev):
    make_base(f"{work}/base.img", {"a": b"a"})
    t = time.monotonic()
    for i in range(5):
        dev = kv(tool("create", *spec(work, f"u{i}"), 8 * MiB).stdout)["device"]
        assert os.path.exists(dev)
    for i in range(5):
        tool("remove", *spec(work, f"u{i}"))
        assert not os.path.exists(f"/dev/mapper/ember-u{i}")
    assert time.monotonic() - t < 60, "udev wait too slow (hang?)"
    assert dm_names() == []


def test_concurrent_creators(work):
    """Eight processes attach loop devices at once: the race for free device numbers
    (LOOP_CTL_GET_FREE, then the ioctl) is retried, every disk gets made."""
    procs = []
    for i in range(8):
        d = f"{work}/p{i}"
        os.makedirs(d)
        make_base(f"{d}/base.img", {"i": str(i).encode()}, size="16M")
        procs.append(subprocess.Popen([TOOL, "multi", "5", f"{d}/base.img", d, str(8 * MiB),
                                       f"p{i}"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert len(out.splitlines()) == 5
    assert len(dm_names()) == 40
    assert len(loops_under(work)) == 48  # 8 bases + 40 CoWs
    r = kv(tool("reclaim", work).stdout)
    assert r["dm_removed"] == "40" and r["failures"] == "0"


def test_udev_that_never_answers(work):
    """udev looks alive (/run/udev/control exists) but processes nothing, as in some
    containers: libdevmapper would wait forever on its cookie; the wait is bounded and the
    node is made by hand."""
    make_base(f"{work}/base.img", {"a": b"a"})
    os.makedirs("/run/udev", exist_ok=True)
    open("/run/udev/control", "w").close()
    try:
        t = time.monotonic()
        out = run(TOOL, "--udev-timeout-ms", "1000", "create", *spec(work, "stuck"),
                  8 * MiB).stdout
        dev = kv(out)["device"]
        assert os.path.exists(dev)
        run(TOOL, "--udev-timeout-ms", "1000", "remove", *spec(work, "stuck"))
        assert time.monotonic() - t < 15
        assert dm_names() == []
    finally:
        run("rm", "-rf", "/run/udev")


def test_restarted_agent_takes_over_live_disks(work, sessions, holders):
    """A new process (the agent after a restart) restores the disks of running sandboxes:
    their devices are taken over as they are, not made again, and the base's references are
    counted again, so removing one disk leaves the base of the other attached."""
    base = make_base(f"{work}/base.img", {"a": b"a"})
    devs = {n: kv(tool("create", *spec(work, n), 16 * MiB).stdout)["device"] for n in "ab"}
    before = dm_info()
    holder = holders(devs["b"])  # b's VMM runs on: its device could not be made again

    s = sessions()
    for n in "ab":
        r = s("restore", *spec(work, n))
        assert r["ok"] and r["device"] == devs[n], r
    assert dm_info() == before, "a live device was made again"
    assert s("exists", devs["a"])["exists"] == "1"
    assert s("refs", base)["refs"] == "2"
    assert s("held")["disks"] == "2"
    # restoring a disk that is up again is harmless and counts once
    assert s("restore", *spec(work, "a"))["ok"]
    assert s("refs", base)["refs"] == "2"

    r = s("remove", *spec(work, "a"))
    assert r["ok"], r
    assert s("refs", base)["refs"] == "1"
    assert [l for l in loops_under(work) if l[1] == base], "the base of b went"
    run("dd", f"if={devs['b']}", "of=/dev/null", "bs=1M", "count=8")
    assert dm_names() == ["ember-b"]
    holder.kill()
    holder.wait()
    assert s("remove", *spec(work, "b"))["ok"]
    assert s("refs", base)["refs"] == "0"
    assert dm_names() == [] and loops_under(work) == []


def test_restart_then_remove_without_restore(work, sessions):
    """A disk the restarted agent never restored can be removed; it gives back no reference
    of a disk this process did restore."""
    base = make_base(f"{work}/base.img", {"a": b"a"})
    for n in "ab":
        tool("create", *spec(work, n), 8 * MiB)
    s = sessions()
    assert s("restore", *spec(work, "a"))["ok"]
    assert s("remove", *spec(work, "b"))["ok"]
    assert s("refs", base)["refs"] == "1"
    assert s("remove", *spec(work, "a"))["ok"]
    assert s("refs", base)["refs"] == "0"
    held = s("held")
    assert (held["disks"], held["bases"]) == ("0", "0"), held
    assert dm_names() == [] and loops_under(work) == []


def test_create_retry_returns_the_disk_and_other_specs_are_refused(work):
    base = make_base(f"{work}/base.img", {"a": b"a"})
    make_base(f"{work}/base2.img", {"b": b"b"})
    dev = kv(tool("create", *spec(work, "c"), 16 * MiB).stdout)["device"]
    before = dm_info()
    # the agent's retry (a lost reply, a crash after the create): the same spec, the same disk
    assert kv(tool("create", *spec(work, "c"), 16 * MiB).stdout)["device"] == dev
    # anything else that names ember-c is refused, and ember-c left alone
    r = tool("create", *spec(work, "c"), 32 * MiB, check=False)
    assert r.returncode != 0 and "exists already" in r.stderr and "bytes" in r.stderr, r.stderr
    with open(f"{work}/other.cow", "wb") as f:
        f.truncate(16 * MiB)
    r = tool("restore", "c", base, f"{work}/other.cow", check=False)
    assert r.returncode != 0 and "not a loop device of" in r.stderr, r.stderr
    r = tool("restore", "c", f"{work}/base2.img", f"{work}/c.cow", check=False)
    assert r.returncode != 0 and "base2.img" in r.stderr, r.stderr
    r = tool("create", "c", base, f"{work}/new.cow", 16 * MiB, check=False)
    assert r.returncode != 0 and "exists already" in r.stderr, r.stderr
    assert not os.path.exists(f"{work}/new.cow")
    assert dm_info() == before
    tool("remove", *spec(work, "c"))


def test_racing_creator_keeps_its_device(work):
    """Someone makes ember-<id> between our check and our create: a create fails and leaves
    that device alone; a restore whose racer made the same disk uses it."""
    base = make_base(f"{work}/base.img", {"a": b"a"})
    try:
        r = run(TOOL, "--before-dm-create", "dmsetup create $EMBER_DM_NAME --table '0 8 error'",
                "create", *spec(work, "race"), 8 * MiB, check=False)
        assert run("dmsetup", "table", "ember-race").stdout.strip() == "0 8 error", \
            "our unwinding removed the racer's device"
        assert r.returncode != 0 and "left alone" in r.stderr, r.stderr
        assert not os.path.exists(f"{work}/race.cow"), "our own CoW file stayed behind"
        assert loops_under(work) == []
    finally:
        run("dmsetup", "remove", "ember-race", check=False)

    tool("create", *spec(work, "twin"), 8 * MiB)
    tool("remove", *spec(work, "twin"))
    racer = f"{TOOL} restore twin {base} {work}/twin.cow >/dev/null"
    r = run(TOOL, "--before-dm-create", racer, "restore", *spec(work, "twin"))
    assert kv(r.stdout)["device"] == "/dev/mapper/ember-twin"
    assert dm_names() == ["ember-twin"]
    # the racer's CoW loop serves the device; ours went with our unwinding
    assert sorted(l[1] for l in loops_under(work)) == sorted([base, f"{work}/twin.cow"])
    tool("remove", *spec(work, "twin"))


def test_stuck_removal_holds_up_no_other_disk(work, sessions, holders):
    """One disk's removal retries while its holder keeps it open; meanwhile other disks are
    made and removed in the same process."""
    make_base(f"{work}/base.img", {"a": b"a"})
    busy = kv(tool("create", *spec(work, "busy"), 8 * MiB).stdout)["device"]
    holder = holders(busy)
    s = sessions()
    assert s("bg", "remove", *spec(work, "busy"))["ok"]
    s("sleep", 300)
    made = s("create", *spec(work, "free"), 8 * MiB)
    assert made["ok"], made
    gone = s("remove", *spec(work, "free"))
    assert gone["ok"], gone
    [stuck] = s.wait(1)
    assert not stuck["ok"] and stuck["errno"] == "16", stuck
    assert float(gone["end"]) < float(stuck["end"]) - 1000, (made, gone, stuck)
    assert float(stuck["ms"]) >= 2000, stuck
    holder.kill()
    holder.wait()
    assert s("remove", *spec(work, "busy"))["ok"]


def test_udev_waits_do_not_queue(work, sessions):
    """Where udev never answers, every create waits out the timeout: in parallel, not one
    after another."""
    make_base(f"{work}/base.img", {"a": b"a"})
    os.makedirs("/run/udev", exist_ok=True)
    open("/run/udev/control", "w").close()
    try:
        s = sessions("--udev-timeout-ms", "2000")
        for i in range(3):
            assert s("bg", "create", *spec(work, f"w{i}"), 8 * MiB)["ok"]
        made = s.wait(3)
        assert all(r["ok"] for r in made), made
        assert min(float(r["ms"]) for r in made) >= 1900, made  # each did wait for udev
        assert max(float(r["end"]) for r in made) < 4000, made
        for i in range(3):
            assert s("exists", f"/dev/mapper/ember-w{i}")["exists"] == "1"
            assert s("bg", "remove", *spec(work, f"w{i}"))["ok"]
        assert all(r["ok"] for r in s.wait(3))
    finally:
        run("rm", "-rf", "/run/udev")
    assert dm_names() == []


def test_nodes_follow_the_device_in_a_long_lived_process(work, sessions):
    """Without udev, libdevmapper only notes node changes; the agent does not exit after each
    disk, so they must be made at once."""
    make_base(f"{work}/base.img", {"a": b"a"})
    s = sessions()
    dev = s("create", *spec(work, "n"), 8 * MiB)["device"]
    assert s("exists", dev)["exists"] == "1"
    assert s("remove", *spec(work, "n"))["ok"]
    assert s("exists", dev)["exists"] == "0"
    dev = s("restore", *spec(work, "n"))["device"]
    assert s("exists", dev)["exists"] == "1"
    assert s("remove", *spec(work, "n"))["ok"]
