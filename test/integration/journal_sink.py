#!/usr/bin/python3
"""Stand-in for journald, for test_systemd.py. Runs inside a private mount namespace (the test
starts it with `unshare --mount --propagation private`), mounts a tmpfs on /run there (the
host's /run is untouched), binds /run/systemd/journal/socket, and runs the command given with
stderr redirected to a file and JOURNAL_STREAM naming that file, as systemd does for a service
whose output goes to the journal. Sends SIGTERM to the command once it logged `--until`, waits
for it, then prints every datagram received as a JSON object per line on stdout.

Usage: journal_sink.py STDERR_FILE UNTIL -- CMD ARGS...
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time


def parse_native(data):
    """journald's native protocol: KEY=value lines, or KEY\\n<le64 length><bytes>\\n."""
    fields = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            fields[k.decode()] = v.decode(errors="replace")
            i = nl + 1
        else:
            n = int.from_bytes(data[nl + 1:nl + 9], "little")
            fields[line.decode()] = data[nl + 9:nl + 9 + n].decode(errors="replace")
            i = nl + 9 + n + 1
    return fields


def main():
    stderr_path, until = sys.argv[1], sys.argv[2]
    cmd = sys.argv[sys.argv.index("--") + 1:]
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
    os.makedirs("/run/systemd/journal")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind("/run/systemd/journal/socket")
    sink.settimeout(0.1)

    err = open(stderr_path, "wb")
    st = os.fstat(err.fileno())
    env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
    p = subprocess.Popen(cmd, stderr=err, env=env)
    entries = []
    deadline = time.monotonic() + 30
    signalled = False
    while time.monotonic() < deadline:
        try:
            entries.append(parse_native(sink.recv(1 << 20)))
        except socket.timeout:
            pass
        if not signalled and any(until in e.get("MESSAGE", "") for e in entries):
            p.send_signal(signal.SIGTERM)
            signalled = True
        if p.poll() is not None:
            break
    if p.poll() is None:
        p.kill()
    p.wait()
    # what was sent just before exit
    while True:
        try:
            entries.append(parse_native(sink.recv(1 << 20)))
        except socket.timeout:
            break
    for e in entries:
        print(json.dumps(e))
    sys.exit(p.returncode)


if __name__ == "__main__":
    main()
