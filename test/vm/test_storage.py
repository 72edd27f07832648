# storage/ on a real kernel with device-mapper (in the VM): sharing of the base loop, isolation
# of sandboxes, persistence of the CoW, flatten, busy removal, a full CoW, crash reclaim, leaks.

import os
import signal
import subprocess
import time

import pytest

from conftest import TOOL, dm_names, kv, loops_under, make_base, run, sha256, tool

MiB = 1 << 20


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
