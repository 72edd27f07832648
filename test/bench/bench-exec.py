#!/usr/bin/python3
"""make bench-exec: guest exec round trip and stdout throughput, fcsim vsock vs. direct.

Boots a busybox guest under fcsim with ember-guest as its agent (the image test_guest.py
builds) and measures, with build/test/guest-tool:
  - exec round trip of `true`: connect, hello, start, exit (p50/p99 over N sequential execs);
  - stdout throughput of `dd if=/dev/zero bs=1M count=MIB` (MiB/s).
In the same run, an ember-guest started directly on this host (--unix) is measured the same
way, running the same static busybox applets (a PATH of symlinks), so the ratio is the cost of
fcsim's hybrid vsock path (CONNECT handshake, relay thread, container) and nothing else. These
machines are shared and noisy: compare figures within one run.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile


def run_tool(tool, target, *args):
    out = subprocess.run([tool, *target, *args], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        sys.exit(f"guest-tool {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def measure(tool, target, n, mib, rounds):
    true_line = run_tool(tool, target, "bench-true", str(n))
    m = re.search(r"p50=(\d+) us p99=(\d+) us", true_line)
    p50, p99 = int(m.group(1)), int(m.group(2))
    best = 0.0
    for _ in range(rounds):
        m = re.search(r"= ([\d.]+) MiB/s", run_tool(tool, target, "bench-cat", str(mib)))
        best = max(best, float(m.group(1)))
    return p50, p99, best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--execs", type=int, default=int(os.environ.get("BENCH_EXECS", 1000)))
    ap.add_argument("--mib", type=int, default=int(os.environ.get("BENCH_MIB", 1024)))
    ap.add_argument("--rounds", type=int, default=3, help="throughput runs; the best counts")
    args = ap.parse_args()
    build = os.path.abspath(args.build)
    os.environ["EMBER_BUILD"] = build
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "integration"))
    from test_guest import start_guest  # noqa: E402

    tool = os.path.join(build, "test", "guest-tool")
    agent = os.path.join(build, "ember-guest")
    root = tempfile.mkdtemp(prefix="ember-bench-exec-", dir="/tmp")
    f = direct = None
    try:
        f = start_guest(root)
        sim = ["--vsock", os.path.join(root, "v.sock")]

        # The direct agent runs the guest's binaries: static busybox's true and dd.
        bindir = os.path.join(root, "bin")
        os.makedirs(bindir)
        for applet in ("true", "dd"):
            os.symlink("/bin/busybox", os.path.join(bindir, applet))
        sock = os.path.join(root, "direct.sock")
        env = {"PATH": bindir + ":/usr/bin:/bin"}
        direct = subprocess.Popen([agent, "--unix", sock], env=env,
                                  stderr=open(os.path.join(root, "direct.log"), "wb"))
        run_tool(tool, ["--unix", sock], "ping", "--wait-ms", "10000")
        uds = ["--unix", sock]

        print(f"ember-guest exec: {args.execs} x true, {args.mib} MiB of stdout (best of "
              f"{args.rounds}), guest-tool as the client")
        s = measure(tool, sim, args.execs, args.mib, args.rounds)
        d = measure(tool, uds, args.execs, args.mib, args.rounds)
        print(f"{'':24} {'p50 us':>8} {'p99 us':>8} {'MiB/s':>9}")
        print(f"{'fcsim vsock (v.sock)':24} {s[0]:8} {s[1]:8} {s[2]:9.1f}")
        print(f"{'direct unix socket':24} {d[0]:8} {d[1]:8} {d[2]:9.1f}")
        print(f"{'ratio fcsim/direct':24} {s[0] / d[0]:8.2f} {s[1] / d[1]:8.2f} "
              f"{s[2] / d[2]:9.2f}")
    finally:
        if direct and direct.poll() is None:
            direct.terminate()
            direct.wait()
        if f:
            f.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
