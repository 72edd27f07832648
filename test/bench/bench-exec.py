#!/usr/bin/python3
"""make bench-exec: guest exec round trip and stdout throughput: fcsim vsock, direct, emberd.

Boots a busybox guest under fcsim with ember-guest as its agent (the image test_guest.py
builds) and measures, with build/test/guest-tool:
  - exec round trip of `true`: connect, hello, start, exit (p50/p99 over N sequential execs);
  - stdout throughput of `dd if=/dev/zero bs=1M count=MIB` (MiB/s).
In the same run, an ember-guest started directly on this host (--unix) is measured the same
way, running the same static busybox applets (a PATH of symlinks), so the ratio is the cost of
fcsim's hybrid vsock path (CONNECT handshake, relay thread, container) and nothing else.
A third row goes through emberd's gRPC API: an emberd (fcsim, file backend, in a network
namespace of its own) with one sandbox of the demo template, and Exec calls from
build/test/exec-bench (a plain gRPC core client) over its unix socket, compared with the first
row (guest-tool, the guest client library straight to the same kind of fcsim vsock). These machines are shared and noisy: compare figures
within one run.

--slow-reader MIB[:RATE] instead reads MIB of stdout at RATE MiB/s (default 1) through emberd and
samples emberd's RSS every second: its memory must stay flat while the guest process blocks.
"""

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile


# Both clients keep the memory they free (glibc would otherwise hand a freed message's pages
# back to the kernel and fault them in again for the next one): what is measured is the path,
# not the clients' allocator. Only the clients: emberd, fcsim and the guest run as they are.
CLIENT_ENV = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=67108864:"
              "glibc.malloc.mmap_threshold=4194304"}


def run_tool(tool, target, *args):
    out = subprocess.run([tool, *target, *args], capture_output=True, text=True, timeout=600,
                         env=CLIENT_ENV)
    if out.returncode != 0:
        sys.exit(f"guest-tool {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def round_trip(tool, target, cmd, n):
    """p50, p99 (us) of n sequential execs of `true`."""
    m = re.search(r"p50=(\d+) us p99=(\d+) us", run_tool(tool, target, cmd, str(n)))
    return int(m.group(1)), int(m.group(2))


def throughput(tool, target, cmd, mib):
    m = re.search(r"= ([\d.]+) MiB/s", run_tool(tool, target, cmd, str(mib)))
    return float(m.group(1))


@contextlib.contextmanager
def emberd_sandbox(sid):
    """An emberd (fcsim, file backend, a network namespace of its own) with one 256 MiB
    sandbox of the demo template: yields (Emberd, Node stub); everything goes at the end."""
    from conftest import EmberdStarter, _new_workdir, _stop_procs
    from ember.v1 import node_pb2 as S, node_pb2_grpc

    d = _new_workdir()
    procs = []
    st = EmberdStarter(d, procs)
    try:
        e = st()
        n = node_pb2_grpc.NodeStub(e.channel())
        n.CreateSandbox(S.CreateSandboxRequest(
            sandbox_id=sid, spec=S.SandboxSpec(template_id="demo", memory_mib=256)),
            timeout=120)
        yield e, n
    finally:
        st.close()
        _stop_procs(procs)
        shutil.rmtree(d, ignore_errors=True)


def slow_reader(mib, rate):
    """Reads `mib` MiB of a guest process's stdout through emberd at `rate` MiB/s, sampling
    emberd's RSS once a second."""
    import time

    from conftest import rss_kib
    from ember.v1 import node_pb2 as S

    with emberd_sandbox("slow") as (e, n):
        pid = e.proc.pid
        rss0 = rss_kib(pid)
        samples = []
        call = n.Exec(iter([S.ExecRequest(start=S.ExecStart(
            sandbox_id="slow", argv=["dd", "if=/dev/zero", "bs=65536",
                                     f"count={mib * 16}"]))]), timeout=mib / rate * 3 + 600)
        t0 = time.monotonic()
        got = 0
        next_sample = t0
        for r in call:
            if r.WhichOneof("msg") == "stdout_data":
                got += len(r.stdout_data)
            # hold the pace: sleep until the bytes read so far are due
            due = t0 + got / (rate * (1 << 20))
            now = time.monotonic()
            if now >= next_sample:
                samples.append(rss_kib(pid))
                next_sample = now + 1
                if len(samples) % 60 == 0:
                    print(f"  {got >> 20} MiB read after {now - t0:.0f} s, emberd RSS "
                          f"{samples[-1]} KiB", flush=True)
            if due > now:
                time.sleep(due - now)
        took = time.monotonic() - t0
        print(f"read {got >> 20} MiB through emberd at {got / took / (1 << 20):.2f} MiB/s in "
              f"{took:.0f} s; emberd RSS before {rss0} KiB, during: min {min(samples)} "
              f"max {max(samples)} KiB (+{max(samples) - rss0} KiB), {len(samples)} samples")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--execs", type=int, default=int(os.environ.get("BENCH_EXECS", 1000)))
    ap.add_argument("--mib", type=int, default=int(os.environ.get("BENCH_MIB", 1024)))
    ap.add_argument("--rounds", type=int, default=5, help="throughput runs; the best counts")
    ap.add_argument("--slow-reader", metavar="MIB[:RATE]",
                    default=os.environ.get("BENCH_SLOW_READER"))
    args = ap.parse_args()
    build = os.path.abspath(args.build)
    os.environ["EMBER_BUILD"] = build
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ.setdefault("EMBER_SRCDIR", os.path.abspath(os.path.join(here, "..", "..")))
    sys.path.insert(0, os.path.join(here, "..", "integration"))
    sys.path.insert(0, os.path.join(build, "py"))
    from test_guest import start_guest  # noqa: E402

    if args.slow_reader:
        mib, _, rate = args.slow_reader.partition(":")
        slow_reader(int(mib), float(rate or 1))
        return

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
              f"{args.rounds}, the three paths taking turns), guest-tool as the client")
        # The rows take turns, round after round, so that a machine that gets busier or
        # quieter during the run weighs on all three alike.
        grpc_tool = os.path.join(build, "test", "exec-bench")
        with emberd_sandbox("bench") as (e, _):
            rows = [(tool, sim, "bench-"), (tool, uds, "bench-"),
                    (grpc_tool, [e.target, "bench"], "")]
            lat = [round_trip(t, tgt, pre + "true", args.execs) for t, tgt, pre in rows]
            rates = [[] for _ in rows]
            for _ in range(args.rounds):
                for i, (t, tgt, pre) in enumerate(rows):
                    rates[i].append(throughput(t, tgt, pre + "cat", args.mib))
        s, d, g = ((p50, p99, max(r)) for (p50, p99), r in zip(lat, rates))
        pairs = sorted(gr / sr for gr, sr in zip(rates[2], rates[0]))
        print(f"{'':28} {'p50 us':>8} {'p99 us':>8} {'MiB/s':>9}")
        print(f"{'fcsim vsock (v.sock)':28} {s[0]:8} {s[1]:8} {s[2]:9.1f}")
        print(f"{'direct unix socket':28} {d[0]:8} {d[1]:8} {d[2]:9.1f}")
        print(f"{'emberd gRPC Exec (fcsim)':28} {g[0]:8} {g[1]:8} {g[2]:9.1f}")
        print(f"{'ratio fcsim/direct':28} {s[0] / d[0]:8.2f} {s[1] / d[1]:8.2f} "
              f"{s[2] / d[2]:9.2f}")
        print(f"{'ratio emberd/fcsim vsock':28} {g[0] / s[0]:8.2f} {g[1] / s[1]:8.2f} "
              f"{g[2] / s[2]:9.2f}   (targets: p50 <= 1.5, MiB/s >= 0.80)")
        print(f"emberd/fcsim vsock MiB/s, round by round: min {pairs[0]:.2f} median "
              f"{pairs[len(pairs) // 2]:.2f} max {pairs[-1]:.2f}")
    finally:
        if direct and direct.poll() is None:
            direct.terminate()
            direct.wait()
        if f:
            f.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
