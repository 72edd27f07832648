# The `file` storage backend (hosts without device-mapper, and the lifecycle tests with fcsim):
# a sandbox's disk is its own copy of the base image, a reflink where the filesystem can and a
# sparse copy otherwise. Driven through storage-tool: each invocation is a new process, as a
# restarted agent is; its session mode keeps one Storage for many commands and threads, as the
# agent does. Everything lives in a temp dir removed at teardown; no devices are involved.

import hashlib
import os
import shutil
import subprocess
import tempfile

import pytest

from conftest import BUILD

TOOL = os.path.join(BUILD, "test", "storage-tool")
MiB = 1 << 20
BASE_SIZE = 64 * MiB
# (offset, length) of the base's data; the rest is holes
BASE_DATA = ((0, 1 * MiB), (20 * MiB, 2 * MiB), (BASE_SIZE - MiB, MiB))


def tool(*args, check=True):
    r = subprocess.run([TOOL, "--backend", "file", *map(str, args)], capture_output=True,
                       text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"storage-tool {args} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r


def kv(line):
    return dict(part.split("=", 1) for part in line.split())


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def allocated(path):
    return os.stat(path).st_blocks * 512


@pytest.fixture
def d():
    d = tempfile.mkdtemp(prefix="ember-fb-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def base(d):
    path = os.path.join(d, "base.img")
    with open(path, "wb") as f:
        f.truncate(BASE_SIZE)
        for off, n in BASE_DATA:
            f.seek(off)
            f.write(os.urandom(n))
    return path


def spec(d, base, name):
    return [name, base, os.path.join(d, f"{name}.img")]


def leftovers(d, expected):
    """Files in d besides `expected` (names): half-made copies, temp files."""
    return sorted(set(os.listdir(d)) - set(expected))


def test_create_copies_the_base_keeping_holes(d, base):
    out = tool("create", *spec(d, base, "a"), 32 * MiB).stdout
    disk = os.path.join(d, "a.img")
    assert kv(out)["device"] == disk
    assert sha256(disk) == sha256(base)
    assert os.path.getsize(disk) == BASE_SIZE
    # holes stay holes (a reflink shares the base's blocks instead: no more either)
    assert allocated(disk) <= allocated(base) + 256 * 1024, (allocated(disk), allocated(base))
    assert os.stat(disk).st_mode & 0o7777 == 0o600
    assert leftovers(d, ["base.img", "a.img"]) == []


def test_create_refuses_and_leaves_nothing_behind(d, base):
    tool("create", *spec(d, base, "a"), 32 * MiB)
    digest = sha256(os.path.join(d, "a.img"))
    # the disk exists: refused, left as it is
    r = tool("create", *spec(d, base, "a"), 32 * MiB, check=False)
    assert r.returncode != 0 and "a.img" in r.stderr and "exists" in r.stderr, r.stderr
    assert sha256(os.path.join(d, "a.img")) == digest
    # no base, no directory, a bad id
    r = tool("create", "b", os.path.join(d, "nope.img"), os.path.join(d, "b.img"), MiB,
             check=False)
    assert r.returncode != 0 and "nope.img" in r.stderr, r.stderr
    r = tool("create", "c", base, os.path.join(d, "missing", "c.img"), MiB, check=False)
    assert r.returncode != 0 and "c.img" in r.stderr, r.stderr
    r = tool("create", "Bad_Id", base, os.path.join(d, "bad.img"), MiB, check=False)
    assert r.returncode != 0 and "invalid sandbox id" in r.stderr, r.stderr
    assert leftovers(d, ["base.img", "a.img"]) == []


def test_restore_returns_the_existing_copy(d, base):
    disk = os.path.join(d, "a.img")
    tool("create", *spec(d, base, "a"), 32 * MiB)
    with open(disk, "r+b") as f:
        f.seek(10 * MiB)
        f.write(b"the sandbox's own data")
    digest = sha256(disk)
    # a new process, as after an agent restart: the same copy, untouched
    for _ in range(2):
        assert kv(tool("restore", *spec(d, base, "a")).stdout)["device"] == disk
    assert sha256(disk) == digest
    r = tool("restore", *spec(d, base, "gone"), check=False)
    assert r.returncode != 0 and "gone.img" in r.stderr and "No such file" in r.stderr, r.stderr
    os.mkdir(os.path.join(d, "dir.img"))
    r = tool("restore", *spec(d, base, "dir"), check=False)
    assert r.returncode != 0 and "not a regular file" in r.stderr, r.stderr


def test_remove_is_idempotent_and_keeps_the_copy(d, base):
    disk = os.path.join(d, "a.img")
    tool("create", *spec(d, base, "a"), 32 * MiB)
    digest = sha256(disk)
    for _ in range(2):
        tool("remove", *spec(d, base, "a"))
    assert sha256(disk) == digest, "deleting or changing the copy is the caller's business"
    tool("remove", *spec(d, base, "never"))  # a disk that never was
    assert kv(tool("restore", *spec(d, base, "a")).stdout)["device"] == disk


def test_status_reports_allocated_bytes(d, base):
    disk = os.path.join(d, "a.img")
    tool("create", *spec(d, base, "a"), 32 * MiB)

    def status(allowance):
        st = kv(tool("status", *spec(d, base, "a"), allowance).stdout)
        return {k: int(v) for k, v in st.items()}

    st = status(4 * MiB)
    assert st["used"] == allocated(disk)
    assert st["size"] == BASE_SIZE and st["capacity"] == 4 * MiB
    assert st["invalid"] == 0 and st["overflow"] == 0
    before = st["used"]
    # the sandbox writes 8 MiB where the base had holes
    with open(disk, "r+b") as f:
        f.seek(30 * MiB)
        f.write(os.urandom(8 * MiB))
        f.flush()
        os.fsync(f.fileno())
    st = status(4 * MiB)
    assert st["used"] == allocated(disk)
    assert st["used"] >= before + 8 * MiB
    assert st["overflow"] == 1  # 8 MiB of changes over a 4 MiB allowance: reported
    assert status(32 * MiB)["overflow"] == 0
    r = tool("status", *spec(d, base, "gone"), check=False)
    assert r.returncode != 0 and "gone.img" in r.stderr, r.stderr


def test_flatten_copies_the_disk(d, base):
    disk = os.path.join(d, "a.img")
    tool("create", *spec(d, base, "a"), 32 * MiB)
    with open(disk, "r+b") as f:
        f.seek(40 * MiB)
        f.write(os.urandom(MiB))
    flat = os.path.join(d, "flat.img")
    tool("flatten", *spec(d, base, "a"), flat)
    assert sha256(flat) == sha256(disk)
    assert allocated(flat) <= allocated(disk) + 256 * 1024
    r = tool("flatten", *spec(d, base, "a"), flat, check=False)
    assert r.returncode != 0 and "exists" in r.stderr, r.stderr
    # the flattened image serves as a base of its own
    tool("create", "child", flat, os.path.join(d, "child.img"), 32 * MiB)
    assert sha256(os.path.join(d, "child.img")) == sha256(flat)


def session(*lines):
    """Runs the lines in one storage-tool process; returns its output lines, parsed."""
    r = subprocess.run([TOOL, "--backend", "file", "session"], input="".join(
        " ".join(map(str, line)) + "\n" for line in lines), capture_output=True, text=True,
        timeout=300)
    assert r.returncode == 0, r.stderr
    out = []
    for line in r.stdout.splitlines():
        head, _, message = line.partition(" message=")
        words = head.split()
        if words[0] == "bg":
            words = words[2:]
        res = {"ok": words[0] == "ok", **dict(w.split("=", 1) for w in words[1:])}
        if message:
            res["message"] = message
        out.append(res)
    return out


def test_one_process_many_disks_on_threads(d, base):
    ids = [f"t{i}" for i in range(8)]
    lines = [("bg", "create", *spec(d, base, i), 32 * MiB) for i in ids]
    lines += [("wait",)]
    lines += [("status", *spec(d, base, i), 32 * MiB) for i in ids]
    lines += [("remove", *spec(d, base, i)) for i in ids]
    lines += [("restore", *spec(d, base, i)) for i in ids]
    out = session(*lines)
    started, made = out[:8], out[8:16]
    assert all(r["ok"] for r in started), started
    assert all(r["ok"] for r in made), made
    assert sorted(r["device"] for r in made) == sorted(os.path.join(d, f"{i}.img") for i in ids)
    rest = out[17:]
    assert all(r["ok"] for r in rest), rest
    for r, i in zip(rest[:8], ids):
        assert int(r["used"]) == allocated(os.path.join(d, f"{i}.img"))
    digest = sha256(base)
    for i in ids:
        assert sha256(os.path.join(d, f"{i}.img")) == digest
    assert leftovers(d, ["base.img"] + [f"{i}.img" for i in ids]) == []


def test_racing_creators_of_one_disk(d, base):
    """Several processes create the same disk at once: one wins, the others are refused, and
    the copy is whole."""
    procs = [subprocess.Popen([TOOL, "--backend", "file", "create", *spec(d, base, "r"),
                               str(32 * MiB)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(6)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    winners = [r for r in results if r[0] == 0]
    assert len(winners) == 1, results
    for rc, _, err in results:
        assert rc == 0 or "exists" in err, err
    assert sha256(os.path.join(d, "r.img")) == sha256(base)
    assert leftovers(d, ["base.img", "r.img"]) == []


# ---- reclaim and the loop devices a VMM makes over a disk (fcsim loop-mounts the copy inside a
# mount namespace of its own). These need root and loop devices; they clean up what they make.

def need_loops():
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root and loop devices")
    for prog in ("losetup", "unshare", "nsenter", "mkfs.ext4"):
        if not shutil.which(prog):
            pytest.skip(f"needs {prog}")


def run(*args, check=True, **kw):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r


def loops_over(d):
    """{device: (backing file, auto-clear)} of the loop devices over files under d."""
    out = run("losetup", "--list", "--noheadings", "--raw", "--output",
              "NAME,AUTOCLEAR,BACK-FILE").stdout
    found = {}
    for line in out.splitlines():
        name, autoclear, back = line.split(" ", 2)
        back = back.replace("\\x20", " ")
        if back.startswith(os.path.realpath(d) + "/"):
            found[name] = (back, autoclear == "1")
    return found


@pytest.fixture
def loops(d):
    """Attaches loop devices over files in d (no auto-clear, as losetup does) and starts the
    processes that use them; at teardown the processes are killed (a mount namespace goes
    with its last process, and its mounts with it) and every loop over d is detached."""
    need_loops()
    procs = []

    class Loops:
        def attach(self, path):
            return run("losetup", "--find", "--show", path).stdout.strip()

        def start(self, argv, **kw):
            procs.append(subprocess.Popen(argv, **kw))
            return procs[-1]

    yield Loops()
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    for dev in loops_over(d):
        run("losetup", "-d", dev, check=False)


def ext4_image(path, files):
    tree = tempfile.mkdtemp(dir=os.path.dirname(path), prefix="tree-")
    for name, data in files.items():
        with open(os.path.join(tree, name), "wb") as f:
            f.write(data)
    run("mkfs.ext4", "-q", "-F", "-d", tree, path, "16M")
    shutil.rmtree(tree)
    return path


def test_reclaim_leaves_loops_in_use_alone(d, loops):
    """A loop device over a sandbox's disk that is mounted in another mount namespace (as fcsim
    mounts the guest's root) or held open stays attached, its auto-clear flag untouched; an
    unused one under the state dir is detached."""
    os.makedirs(os.path.join(d, "sandboxes", "live"))
    disk = ext4_image(os.path.join(d, "sandboxes", "live", "cow.img"), {"hello": b"guest\n"})
    mounted = loops.attach(disk)
    mnt = os.path.join(d, "mnt")
    os.mkdir(mnt)
    holder = loops.start(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          'mount "$1" "$2" && echo mounted && exec sleep 600', "sh", mounted,
                          mnt], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "mounted"
    assert not os.path.ismount(mnt), "the mount should live in the private namespace only"

    opened_file = os.path.join(d, "sandboxes", "open.img")
    with open(opened_file, "wb") as f:
        f.truncate(MiB)
    opened = loops.attach(opened_file)
    with open(opened, "rb") as f:
        loops.start(["sleep", "600"], stdin=f)

    orphan_file = os.path.join(d, "sandboxes", "orphan.img")
    with open(orphan_file, "wb") as f:
        f.truncate(MiB)
    orphan = loops.attach(orphan_file)

    r = kv(tool("reclaim", d).stdout)
    assert r == {"dm_removed": "0", "loops_detached": "1", "failures": "0"}, r
    left = loops_over(d)
    assert orphan not in left, left
    assert left.get(mounted) == (os.path.realpath(disk), False), left
    assert left.get(opened) == (os.path.realpath(opened_file), False), left
    # the guest's root file system still works, reads and writes
    ns = ["nsenter", "-t", str(holder.pid), "-m"]
    assert run(*ns, "cat", f"{mnt}/hello").stdout == "guest\n"
    run(*ns, "sh", "-c", f"echo more > {mnt}/new && sync && cat {mnt}/new")


def test_reclaim_spares_the_disks_of_kept_sandboxes(d, base, loops):
    """A loop over the copy of a kept disk (file backend) that this process restored is left
    alone even while nothing holds it; once the id is no longer kept it is an orphan."""
    disk = os.path.join(d, "kept.img")
    tool("create", "kept", base, disk, 32 * MiB)
    dev = loops.attach(disk)
    out = session(("restore", "kept", base, disk), ("reclaim", d, "kept"), ("reclaim", d))
    assert all(r["ok"] for r in out), out
    assert (out[1]["loops_detached"], out[1]["failures"]) == ("0", "0"), out[1]
    assert out[2]["loops_detached"] == "1", out[2]
    assert dev not in loops_over(d)
