# Tests that need a real kernel with device-mapper: run inside the VM by `make check-vm`
# (test/vm/run -- python3 -m pytest test/vm). Outside a VM they skip, so that nobody runs them
# against a host by accident.

import os
import subprocess
import tempfile

import pytest

BUILD = os.environ.get("EMBER_BUILD", os.path.join(os.path.dirname(__file__), "..", "..",
                                                    "build"))
TOOL = os.path.join(BUILD, "test", "storage-tool")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("EMBER_IN_VM") != "1":
        skip = pytest.mark.skip(reason="VM-only test: run through `make check-vm`")
        for item in items:
            item.add_marker(skip)


def run(*args, check=True, **kw):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r


def tool(*args, check=True):
    return run(TOOL, *args, check=check)


def kv(line):
    return dict(part.split("=", 1) for part in line.split())


def dm_names():
    out = run("dmsetup", "ls").stdout
    return sorted(l.split()[0] for l in out.splitlines() if l.startswith("ember-"))


def loops_under(prefix):
    """Loop devices whose backing file lies under prefix."""
    out = run("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE").stdout
    found = []
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].startswith(prefix + "/"):
            found.append(parts)
    return found


@pytest.fixture
def work(tmp_path):
    """A work dir under the VM's tmpfs; at teardown every ember device is gone, whatever the
    test did (a leftover fails the test)."""
    d = str(tmp_path)
    yield d
    leftovers = dm_names(), loops_under(d)
    tool("reclaim", d)
    assert leftovers == ([], []), f"test left devices behind: {leftovers}"


def make_base(path, files, size="64M"):
    """An ext4 image holding `files` ({name: bytes})."""
    tree = tempfile.mkdtemp(dir=os.path.dirname(path), prefix="tree-")
    for name, data in files.items():
        with open(os.path.join(tree, name), "wb") as f:
            f.write(data)
    run("mkfs.ext4", "-q", "-F", "-d", tree, path, size)
    return path


def sha256(path):
    return run("sha256sum", path).stdout.split()[0]
