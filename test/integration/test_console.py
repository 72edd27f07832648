# The guest console (issue "sandbox lifetime"): each sandbox's console log, bounded by
# [sandboxes] console_kib, kept through pause, resume, failure and emberd restarts, and
# ReadConsole's tail and follow. fcsim and the file backend; emberd in a network namespace of
# the test's own. In fcsim the guest's /dev/console is the pty fcsim copies to its output, as
# ttyS0 is under Firecracker.

import os
import signal
import threading
import time

import grpc

from conftest import SLOW, processes_under, wait_for
from test_sandbox import S, code_of, create, destroy, guest_exec, leftovers, stub
from test_pause import pause, resume

KEEP = 64 << 10  # console_kib = 64


def console_path(e, sid):
    return os.path.join(e.run_dir, "sandboxes", sid, "console.log")


def read(n, sid, tail_lines=0, timeout=30):
    """The messages of a ReadConsole without follow."""
    return list(n.ReadConsole(S.ReadConsoleRequest(sandbox_id=sid, tail_lines=tail_lines),
                              timeout=timeout * SLOW))


def joined(msgs):
    """The bytes of consecutive messages, checked to follow each other: every message starts
    where the previous one ended, plus what it says was skipped."""
    out = bytearray()
    end = None
    for m in msgs:
        assert len(m.data) <= 64 << 10
        if end is not None:
            assert m.offset == end + m.skipped_bytes, (m.offset, end, m.skipped_bytes)
        end = m.offset + len(m.data)
        out += m.data
    return bytes(out)


def say(e, sid, text):
    """The guest prints `text` on its console."""
    p = guest_exec(e, sid, "sh", "-c", f"echo '{text}' > /dev/console")
    assert p.returncode == 0, p


class Follower:
    def __init__(self, n, sid, tail_lines=0):
        self.call = n.ReadConsole(S.ReadConsoleRequest(sandbox_id=sid, follow=True,
                                                       tail_lines=tail_lines),
                                  timeout=300 * SLOW)
        self.msgs, self.error, self.ended = [], None, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        try:
            for m in self.call:
                self.msgs.append(m)
        except grpc.RpcError as err:
            self.error = err
        finally:
            self.ended.set()

    def data(self):
        return joined(list(self.msgs))


def test_tail_and_follow(start_emberd):
    e = start_emberd("[network]\npool_size = 0\n[sandboxes]\nconsole_kib = 64\n")
    n = stub(e)
    create(n, "c1")
    # the boot's output is there, from the start of the sandbox's console
    msgs = read(n, "c1")
    boot = joined(msgs)
    assert msgs[0].offset == 0 and msgs[0].skipped_bytes == 0
    assert b"ember-init" in boot, boot[-2000:]
    with open(console_path(e, "c1"), "rb") as f:
        assert f.read() == boot

    # tail_lines: the last lines, as `tail -n` counts them, of the log as far as the call
    # read it (the guest may print more meanwhile)
    lines = boot.splitlines(keepends=True)
    for k in (1, 3, len(lines), len(lines) + 10):
        got = read(n, "c1", tail_lines=k)
        end = got[-1].offset + len(got[-1].data)
        with open(console_path(e, "c1"), "rb") as f:
            want = b"".join(f.read(end).splitlines(keepends=True)[-k:])
        assert joined(got) == want, k
        assert got[0].offset == end - len(want)

    # follow: the tail, then what the guest prints, as it prints it
    f = Follower(n, "c1", tail_lines=2)
    wait_for(lambda: f.msgs, 10 * SLOW, "the tail")
    tail = f.msgs[0].data  # (the guest is idle: its console is quiet)
    t0 = time.monotonic()
    say(e, "c1", "first words")
    wait_for(lambda: b"first words" in f.data(), 10 * SLOW, "the follower to see the output")
    latency = time.monotonic() - t0
    say(e, "c1", "second words")
    wait_for(lambda: b"second words" in f.data(), 10 * SLOW, "more output")
    assert tail.count(b"\n") == 2 and f.data().startswith(tail)
    assert f.data().index(b"first words") < f.data().index(b"second words")
    assert not f.ended.is_set()
    print(f"follow: output seen {latency * 1000:.0f} ms after the exec that printed it began")
    # without follow the call ends after what is there (the guest may still be logging the
    # exec's end, so the follower may see that a moment later)
    got = joined(read(n, "c1"))
    assert b"second words" in got
    wait_for(lambda: got[-200:] in f.data(), 10 * SLOW, "the follower to see what the read did")

    # a destroy ends a follower with OK, after the last of the output
    destroy(n, "c1")
    assert f.ended.wait(30 * SLOW)
    assert f.error is None, f.error
    code, _ = code_of(lambda: read(n, "c1"))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = code_of(lambda: read(n, "Bad_Id"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert leftovers(e) == []


def test_without_follow_the_call_ends_where_the_log_was(start_emberd):
    """Even when the guest prints faster than the client reads."""
    e = start_emberd("[network]\npool_size = 0\n[sandboxes]\nconsole_kib = 262144\n")
    n = stub(e)
    create(n, "busy")
    p = guest_exec(e, "busy", "sh", "-c",
                   "yes busy console > /dev/console 2>/dev/null </dev/null & echo $!")
    flood = int(p.stdout)
    path = console_path(e, "busy")
    wait_for(lambda: os.path.getsize(path) > 12 << 20, 30 * SLOW, "the flood")
    # a pause that fills the buffers on the way, then slower than the guest prints: a call
    # that went on to the log's end would not reach it
    limit = None
    call = n.ReadConsole(S.ReadConsoleRequest(sandbox_id="busy"), timeout=120 * SLOW)
    time.sleep(2)
    for m in call:
        if limit is None:
            limit = os.path.getsize(path)  # after the call began
        assert m.offset + len(m.data) <= limit, "the call went on past where the log was"
        time.sleep(0.025)
    assert limit is not None and os.path.getsize(path) > limit  # the flood went on
    assert guest_exec(e, "busy", "kill", str(flood)).returncode == 0
    destroy(n, "busy")


def test_the_log_is_bounded(start_emberd):
    e = start_emberd("[network]\npool_size = 0\n[sandboxes]\nconsole_kib = 64\n")
    n = stub(e)
    create(n, "big")
    f = Follower(n, "big")
    # 1.7 MB of numbered lines
    script = ("i=0; while [ $i -lt 40000 ]; do echo \"console line $i of the flood ....."
              ".....\"; i=$((i+1)); done > /dev/console")
    p = guest_exec(e, "big", "sh", "-c", script)
    assert p.returncode == 0, p
    say(e, "big", "the end of it")
    path = console_path(e, "big")
    # (ember-guest logs each exec's end on the console too)
    wait_for(lambda: b"the end of it" in joined(read(n, "big", tail_lines=3)), 30 * SLOW,
             "the last line")

    # the file's offsets are the console's; its blocks are the last console_kib KiB or so
    def held():
        return os.stat(path).st_blocks * 512

    wait_for(lambda: held() <= KEEP + KEEP // 8 + 8192, 10 * SLOW, "the trim")
    size = os.path.getsize(path)
    assert size > 1_600_000, size
    print(f"console: {size} bytes printed, {held()} held on disk (console_kib = 64)")

    msgs = read(n, "big")
    kept = joined(msgs)
    assert KEEP - 8192 <= len(kept) <= KEEP + KEEP // 8 + 8192, len(kept)
    assert msgs[0].offset + len(kept) == size
    assert b"\0" not in kept
    # whole lines after the first, numbered in order up to the last
    body = kept.split(b"\n", 1)[1].replace(b"\r", b"")
    nums = [int(l.split()[2]) for l in body.splitlines() if l.startswith(b"console line")]
    assert nums == list(range(nums[0], 40000)), nums[:3]
    assert b"the end of it\n" in body[body.rindex(b"console line 39999"):]

    # the follower got every message in order, skipped parts counted, never a hole's zeros
    wait_for(lambda: b"the end of it" in f.data(), 30 * SLOW, "the follower at the end")
    got = f.data()
    assert b"\0" not in got
    skipped = sum(m.skipped_bytes for m in f.msgs)
    assert f.msgs[0].offset + len(got) + skipped == size
    print(f"follower: {len(got)} bytes read, {skipped} skipped")
    f.call.cancel()
    destroy(n, "big")
    assert leftovers(e) == []


def test_kept_through_pause_failure_and_restart(start_emberd, workdir):
    root = os.path.join(workdir, "node")
    conf = "[network]\npool_size = 0\n[sandboxes]\nconsole_kib = 64\n"
    e = start_emberd(conf, root=root)
    n = stub(e)
    create(n, "k")
    say(e, "k", "before the pause")
    pause(n, "k")
    assert b"before the pause" in joined(read(n, "k"))
    resume(n, "k")
    say(e, "k", "after the resume")
    log = joined(read(n, "k"))
    assert log.index(b"before the pause") < log.index(b"after the resume")

    # an emberd restart: the adopted VMM's console is still read and trimmed
    e.proc.signal(signal.SIGKILL)
    assert e.proc.wait(30) is not None
    e = start_emberd(conf, root=root)
    n = stub(e)
    assert b"after the resume" in joined(read(n, "k"))
    f = Follower(n, "k", tail_lines=1)
    p = guest_exec(e, "k", "sh", "-c",
                   "i=0; while [ $i -lt 20000 ]; do echo \"after the restart $i ......"
                   "..............\"; i=$((i+1)); done > /dev/console")
    assert p.returncode == 0, p
    path = console_path(e, "k")
    wait_for(lambda: os.stat(path).st_blocks * 512 <= KEEP + KEEP // 8 + 8192, 10 * SLOW,
             "the trim after the restart")
    wait_for(lambda: b"after the restart 19999" in f.data(), 30 * SLOW, "the follower")

    # the VMM dies: FAILED, and its console still tells
    say(e, "k", "last words")
    vmm = processes_under(os.path.join(e.run_dir, "sandboxes", "k"))
    for pid in vmm:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: n.GetSandbox(S.GetSandboxRequest(sandbox_id="k"), timeout=10).state ==
             S.SANDBOX_STATE_FAILED, 30 * SLOW, "FAILED")
    assert b"last words" in joined(read(n, "k", tail_lines=5))
    assert not f.ended.wait(1)  # a FAILED sandbox's follower waits on
    destroy(n, "k")
    assert f.ended.wait(30 * SLOW) and f.error is None, f.error
    assert leftovers(e) == []


def test_grpcurl_read_console_as_the_readme_shows(start_emberd):
    import base64
    import re
    import subprocess

    from test_quickstart import readme_shell_commands
    e = start_emberd("[network]\npool_size = 0\n")
    n = stub(e)
    create(n, "hello")
    (cmd,) = readme_shell_commands("Each sandbox's serial console", e.socket)
    # it follows until stopped: stopped here once the guest's words came through
    p = subprocess.Popen(["sh", "-c", cmd], stdout=subprocess.PIPE, text=True)
    text, seen = "", ""
    # a follower that never printed would block readline() below
    watchdog = threading.Timer(60 * SLOW, p.kill)
    watchdog.start()
    try:
        time.sleep(1)
        say(e, "hello", "seen through grpcurl")
        deadline = time.monotonic() + 30 * SLOW
        while "seen through grpcurl" not in seen and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            text += line
            seen = "".join(base64.b64decode(d).decode(errors="replace")
                           for d in re.findall(r'"data": "([^"]*)"', text))
        assert "seen through grpcurl" in seen, (seen[-2000:], text[-500:])
    finally:
        watchdog.cancel()
        p.kill()
        p.wait()
    destroy(n, "hello")
