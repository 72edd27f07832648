# emberd under systemd, without systemd: sd_notify to a NOTIFY_SOCKET the test owns, and
# structured logging to a stand-in journald in a private mount namespace.

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import BUILD, SLOW, SRCDIR, Proc

EMBERD = os.path.join(BUILD, "emberd")


def test_sd_notify_ready_status_watchdog_stopping(workdir, procs):
    path = os.path.join(workdir, "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.2)
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")
    p = Proc([EMBERD, "--config", "/dev/null", "--state-dir", os.path.join(workdir, "s"),
              "--run-dir", os.path.join(workdir, "r")], os.path.join(workdir, "e.log"), env=env)
    procs.append(p)

    msgs = []
    deadline = time.monotonic() + 10 * SLOW
    while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in msgs) < 3:
        try:
            msgs.append(s.recv(4096).decode())
        except socket.timeout:
            pass
    ready = [m for m in msgs if "READY=1" in m]
    assert ready, msgs
    assert "STATUS=Serving on unix:" + os.path.join(workdir, "r", "ember.sock") in ready[0]
    # pinged at about half the 400 ms interval: 3 pings arrive well within 10 s
    assert sum("WATCHDOG=1" in m for m in msgs) >= 3, msgs

    p.signal(signal.SIGTERM)
    stopping = []
    deadline = time.monotonic() + 10 * SLOW
    while time.monotonic() < deadline and not stopping:
        try:
            m = s.recv(4096).decode()
            if "STOPPING=1" in m:
                stopping.append(m)
        except socket.timeout:
            pass
    assert stopping and "STATUS=Draining" in stopping[0]
    assert p.wait(10) == 0
    s.close()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare missing")
def test_structured_journal_logging(workdir):
    # The stand-in journald mounts a tmpfs on /run, which is safe only in a private mount
    # namespace; where none can be made (e.g. in a chroot, "/" is not a mount point) skip.
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("no private mount namespace here: " + probe.stderr.strip())
    stderr_path = os.path.join(workdir, "stderr")
    cmd = ["unshare", "--mount", "--propagation", "private", "/usr/bin/python3",
           os.path.join(SRCDIR, "test", "integration", "journal_sink.py"), stderr_path,
           "listening on", "--", EMBERD, "--config", "/dev/null",
           "--state-dir", os.path.join(workdir, "s"), "--run-dir", os.path.join(workdir, "r")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60 * SLOW)
    assert r.returncode == 0, r.stderr
    entries = [json.loads(line) for line in r.stdout.splitlines()]

    started = [e for e in entries if "listening on" in e.get("MESSAGE", "")]
    assert len(started) == 1, entries
    e = started[0]
    assert e["PRIORITY"] == "6"
    assert e["SYSLOG_IDENTIFIER"] == "emberd"
    assert e["MESSAGE_ID"] == "edaa5f22028d4a81874c6db7decd64cb"
    assert e["OP"] == "start"
    assert len(e["NODE_ID"]) == 36
    assert e["CODE_FILE"].endswith("main.c") and int(e["CODE_LINE"]) > 0 and e["CODE_FUNC"]
    stopped = [e for e in entries if e.get("MESSAGE_ID") == "84f51d93d68c48cbbd08cef748e8ff12"]
    assert stopped and stopped[0]["MESSAGE"] == "stopped"
    # Everything went to the journal, nothing to stderr.
    with open(stderr_path) as f:
        assert "listening on" not in f.read()
