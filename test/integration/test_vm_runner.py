# test/vm/run itself: CMD's output and exit status come back, the working directory and the
# repository are the same inside, and QEMU never outlives the runner (timeout, Ctrl-C).

import os
import signal
import subprocess
import time

import pytest

from conftest import SRCDIR

RUN = os.path.join(SRCDIR, "test", "vm", "run")

pytestmark = pytest.mark.skipif(not os.path.exists("/boot") or not any(
    f.startswith("vmlinuz-") for f in os.listdir("/boot")), reason="no kernel in /boot")


def session_procs(sid):
    """pids whose session is sid (the runner started with start_new_session=True)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(pid))
    return out


def test_output_status_and_paths():
    r = subprocess.run([RUN, "--", "sh", "-c",
                        'echo "out $(pwd)"; echo err >&2; id -u; '
                        'test -w build && echo repo-writable; '
                        'touch /etc/x 2>/dev/null || echo root-read-only; exit 42'],
                       cwd=SRCDIR, capture_output=True, text=True, timeout=300)
    assert r.returncode == 42, r
    lines = r.stdout.splitlines()
    assert f"out {SRCDIR}" in lines
    assert "err" in lines and "0" in lines
    assert "repo-writable" in lines and "root-read-only" in lines
    assert "SeaBIOS" not in r.stdout  # boot chatter stays hidden


@pytest.mark.parametrize("how,expect", [("timeout", 124), ("sigint", 130), ("sigterm", 143)])
def test_qemu_never_outlives_the_runner(how, expect):
    argv = [RUN] + (["--timeout", "4"] if how == "timeout" else []) + ["--", "sleep", "300"]
    p = subprocess.Popen(argv, cwd=SRCDIR, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    t = time.monotonic()
    if how != "timeout":
        time.sleep(3)
        p.send_signal(signal.SIGINT if how == "sigint" else signal.SIGTERM)
    try:
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert rc == expect, p.stderr.read()
    assert time.monotonic() - t < 30
    time.sleep(0.5)
    assert session_procs(p.pid) == [], "qemu left behind"
