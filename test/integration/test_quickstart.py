# README's quick start, tried as a new user would: a fresh clone, `make run`, and the grpcurl
# session the README shows, command for command. emberd runs with its built-in defaults
# (/run/ember, /var/lib/ember, /run/netns) in mount and network namespaces of the test's own,
# with tmpfs over those directories, so the machine's own are never touched.

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from conftest import SLOW, SRCDIR

GRPCURL = os.path.abspath(os.path.join(SRCDIR, "..", "shared", "tools", "grpcurl"))


def readme_commands(section_heading):
    """The grpcurl commands in the first ```sh block after the heading, joined at '\\'."""
    with open(os.path.join(SRCDIR, "README.md")) as f:
        text = f.read()
    start = text.index(section_heading)
    blocks = re.findall(r"```sh\n(.*?)```", text[start:], re.S)
    for block in blocks:
        cmds = [c.strip() for c in block.replace("\\\n", " ").splitlines()]
        cmds = [re.sub(r"\s+", " ", c) for c in cmds if c.startswith("grpcurl ")]
        if cmds:
            return cmds
    raise AssertionError(f"no grpcurl block after {section_heading!r}")


def readme_shell_commands(section_heading, socket):
    """readme_commands(), as shell commands that run ../shared/tools/grpcurl against
    `socket`; the test skips without grpcurl."""
    if not os.access(GRPCURL, os.X_OK):
        pytest.skip("no grpcurl in ../shared/tools")
    return [GRPCURL + c[len("grpcurl"):].replace("/run/ember/ember.sock", socket)
            for c in readme_commands(section_heading)]


@pytest.mark.skipif(not os.path.exists(GRPCURL), reason="grpcurl not at ../shared/tools")
def test_readme_quick_start_on_a_fresh_clone():
    cmds = readme_commands("## Quick start")
    assert any("CreateSandbox" in c for c in cmds) and any("DestroySandbox" in c for c in cmds)
    work = tempfile.mkdtemp(prefix="ember-qs-", dir="/tmp")
    clone = os.path.join(work, "ember")
    subprocess.run(["git", "clone", "-q", SRCDIR, clone], check=True)
    # The working tree as it is (tests also run before a commit): every file git would see.
    files = subprocess.run(["git", "-C", SRCDIR, "ls-files", "-co", "--exclude-standard", "-z"],
                           capture_output=True, check=True).stdout.split(b"\0")
    for f in (x.decode() for x in files if x):
        src, dst = os.path.join(SRCDIR, f), os.path.join(clone, f)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst)
    log_path = os.path.join(work, "make-run.log")
    # /var/lib: a tmpfs with everything but ember bound back (dpkg's database, which
    # `make deps` reads, among them).
    varlib = os.path.join(work, "varlib")
    os.makedirs(varlib)
    script = (f"set -e; mount --bind /var/lib {varlib}; mount -t tmpfs tmpfs /var/lib; "
              f"for e in {varlib}/*; do n=${{e##*/}}; [ \"$n\" = ember ] && continue; "
              "if [ -L \"$e\" ]; then cp -P \"$e\" /var/lib/; continue; fi; "
              "if [ -d \"$e\" ]; then mkdir \"/var/lib/$n\"; else touch \"/var/lib/$n\"; fi; "
              "mount --bind \"$e\" \"/var/lib/$n\"; done; "
              "mount -t tmpfs tmpfs /run; ip link set lo up; "
              f"cd {clone}; exec make run")
    log = open(log_path, "wb")
    p = subprocess.Popen(["unshare", "--mount", "--net", "--propagation", "private", "--",
                          "sh", "-c", script], stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 900 * SLOW
        while b"listening on unix:/run/ember/ember.sock" not in open(log_path, "rb").read():
            assert p.poll() is None, open(log_path, errors="replace").read()[-4000:]
            assert time.monotonic() < deadline, "make run did not serve in time"
            time.sleep(0.5)
        text = open(log_path, errors="replace").read()
        assert 'registered the demo template "demo"' in text, text[-3000:]

        outs = []
        for c in cmds:
            argv = ["nsenter", "-t", str(p.pid), "-m", "-n", "sh", "-c",
                    GRPCURL + c[len("grpcurl"):]]
            r = subprocess.run(argv, capture_output=True, text=True, timeout=120 * SLOW)
            outs.append((c, r))
            # WatchSandboxes with -max-time ends by its deadline: grpcurl exits non-zero
            if "WatchSandboxes" not in c:
                assert r.returncode == 0, (c, r.stdout, r.stderr)
        by = {c.split("ember.v1.Node/")[1].split()[0]: r for c, r in outs}
        assert '"state": "SANDBOX_STATE_RUNNING"' in by["CreateSandbox"].stdout
        assert '"sandboxIp"' in by["CreateSandbox"].stdout
        assert '"id": "hello"' in by["ListSandboxes"].stdout
        assert '"state": "SANDBOX_STATE_PAUSED"' in by["PauseSandbox"].stdout
        assert '"state": "SANDBOX_STATE_RUNNING"' in by["ResumeSandbox"].stdout
        assert '"lastOperation"' in by["ResumeSandbox"].stdout
        assert '"started"' in by["Exec"].stdout and '"exit"' in by["Exec"].stdout
        assert '"stdoutData": "aGVsbG8gZnJvbSB0aGUgZ3Vlc3QK"' in by["Exec"].stdout, \
            by["Exec"].stdout
        assert '"resync"' in by["WatchSandboxes"].stdout
        assert '"found": true' in by["DestroySandbox"].stdout
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)
