# emberd under systemd, without systemd: sd_notify to a NOTIFY_SOCKET the test owns, and
# structured logging to a stand-in journald in a private mount namespace.

import json
import re
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


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare missing")
def test_sandbox_life_in_the_journal(workdir):
    """`journalctl SANDBOX_ID=<id>` shows a sandbox's whole life: every step of its create,
    pause and resume and its destroy, each entry with the sandbox's and its template's id, the
    operation, the step, its duration and a MESSAGE_ID of its kind (documented in the journal
    catalog, debian/ember.catalog)."""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("no private mount namespace here: " + probe.stderr.strip())
    from conftest import health_serving, host_netns, wait_for
    from ember.v1 import node_pb2 as S, node_pb2_grpc
    import grpc

    hostns = host_netns(os.path.join(workdir, "hostns"))
    conf = os.path.join(workdir, "ember.conf")
    with open(conf, "w") as f:
        f.write(f"[network]\nnetns_dir = {workdir}/netns\n[sandboxes]\nmemory_reserve_mib = 0\n")
    sock = os.path.join(workdir, "r", "ember.sock")
    cmd = ["unshare", "--mount", "--propagation", "private", "/usr/bin/python3",
           os.path.join(SRCDIR, "test", "integration", "journal_sink.py"),
           os.path.join(workdir, "stderr"), "sandbox jl destroyed", "--",
           "nsenter", f"--net={hostns}", EMBERD, "--config", conf,
           "--state-dir", os.path.join(workdir, "s"), "--run-dir", os.path.join(workdir, "r")]
    sink = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: sink.poll() is not None or health_serving("unix:" + sock), 30 * SLOW,
                 "emberd to serve")
        with grpc.insecure_channel("unix:" + sock) as ch:
            n = node_pb2_grpc.NodeStub(ch)
            n.CreateSandbox(S.CreateSandboxRequest(
                sandbox_id="jl", spec=S.SandboxSpec(template_id="demo", memory_mib=128)),
                timeout=60 * SLOW)
            n.PauseSandbox(S.PauseSandboxRequest(sandbox_id="jl"), timeout=60 * SLOW)
            n.ResumeSandbox(S.ResumeSandboxRequest(sandbox_id="jl"), timeout=60 * SLOW)
            n.DestroySandbox(S.DestroySandboxRequest(sandbox_id="jl"), timeout=60 * SLOW)
        out, err = sink.communicate(timeout=60 * SLOW)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
        subprocess.run(["umount", "-R", "-l", os.path.join(workdir, "netns")],
                       capture_output=True)
        subprocess.run(["umount", "-l", hostns], capture_output=True)
    assert sink.returncode == 0, err
    entries = [json.loads(line) for line in out.splitlines()]
    life = [e for e in entries if e.get("SANDBOX_ID") == "jl"]

    with open(os.path.join(SRCDIR, "agent", "messages.h")) as f:
        ids = dict(re.findall(r"#define EMBER_MESSAGE_(\w+)\s+\"([0-9a-f]{32})\"", f.read()))
    kind = {v: k for k, v in ids.items()}
    for e in life:
        assert e.get("MESSAGE_ID") in kind, e
        assert e["TEMPLATE_ID"] == "demo", e
        assert e["OP"] in ("create", "pause", "resume", "destroy"), e
    steps = [(e["OP"], e["STEP"]) for e in life if kind[e["MESSAGE_ID"]] == "SANDBOX_STEP"]
    assert [s for o, s in steps if o == "create"][:3] == ["slot", "disk", "run-dir"], steps
    assert ("create", "guest-agent") in steps and ("destroy", "release") in steps, steps
    assert any(o == "pause" for o, _ in steps) and any(o == "resume" for o, _ in steps), steps
    assert all(int(e["DURATION_US"]) >= 0 for e in life
               if kind[e["MESSAGE_ID"]] == "SANDBOX_STEP"), life
    order = [kind[e["MESSAGE_ID"]] for e in life if kind[e["MESSAGE_ID"]] != "SANDBOX_STEP"]
    assert order == ["SANDBOX_CREATED", "SANDBOX_PAUSED", "SANDBOX_RESUMED",
                     "SANDBOX_DESTROYED"], order
    # nothing above notice about a sandbox that lived and went normally
    assert all(int(e["PRIORITY"]) >= 5 for e in life), life

