#!/usr/bin/python3
"""make bench-lifecycle: CreateSandbox and DestroySandbox latency through emberd (fcsim, file
backend), against the same sequence driven directly through the libraries by
build/test/lifecycle-direct, in the same run. emberd's overhead is the ratio of the two.

Both run in a network namespace the benchmark makes (the machine's own is not touched), one
after the other, in rounds that alternate (emberd, direct, emberd, direct, ...) so that a
change of machine load hits both alike. Prints p50/p99 of each and the ratios."""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("-n", type=int, default=50, help="sandboxes per side (default 50)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    build = os.path.abspath(args.build)
    sys.path.insert(0, os.path.join(build, "py"))
    import grpc
    from ember.v1 import node_pb2 as S, node_pb2_grpc

    root = tempfile.mkdtemp(prefix="ember-bench-lc-", dir="/tmp")
    hostns = os.path.join(root, "hostns")
    open(hostns, "w").close()
    subprocess.run(["unshare", f"--net={hostns}", "true"], check=True)
    subprocess.run(["nsenter", f"--net={hostns}", "ip", "link", "set", "lo", "up"], check=True)
    conf = os.path.join(root, "ember.conf")
    with open(conf, "w") as f:
        f.write(f"[network]\nnetns_dir = {root}/netns\n[sandboxes]\nmemory_reserve_mib = 0\n")
    sock = os.path.join(root, "run", "ember.sock")
    p = subprocess.Popen(["nsenter", f"--net={hostns}", os.path.join(build, "emberd"),
                          "--config", conf, "--state-dir", os.path.join(root, "state"),
                          "--run-dir", os.path.join(root, "run"), "--log-level", "warning"],
                         stderr=open(os.path.join(root, "emberd.log"), "wb"))
    res = {"emberd": ([], []), "direct": ([], [])}
    try:
        n = node_pb2_grpc.NodeStub(grpc.insecure_channel("unix:" + sock))
        for _ in range(300):
            try:
                n.GetNode(S.GetNodeRequest(), timeout=2)
                break
            except grpc.RpcError:
                time.sleep(0.1)
        t = n.GetTemplate(S.GetTemplateRequest(template_id="demo"), timeout=10)
        vmm = n.GetNode(S.GetNodeRequest(), timeout=5)
        fcsim = os.path.join(build, "fcsim")
        per_round = max(1, args.n // args.rounds)
        print(f"bench-lifecycle: {per_round * args.rounds} sandboxes per side in {args.rounds} "
              f"alternating rounds; vmm {vmm.vmm} {vmm.vmm_version}, storage "
              f"{vmm.storage_backend}, 128 MiB guests, sequential", flush=True)
        # one of each first, to warm the page cache and the pools
        for k in range(args.rounds + 1):
            warm = k == 0
            count = 1 if warm else per_round
            for i in range(count):
                sid = f"b{k}-{i}"
                t0 = time.monotonic()
                n.CreateSandbox(S.CreateSandboxRequest(sandbox_id=sid, spec=S.SandboxSpec(
                    template_id="demo", memory_mib=128)), timeout=120)
                t1 = time.monotonic()
                n.DestroySandbox(S.DestroySandboxRequest(sandbox_id=sid), timeout=120)
                t2 = time.monotonic()
                if not warm:
                    res["emberd"][0].append((t1 - t0) * 1e6)
                    res["emberd"][1].append((t2 - t1) * 1e6)
            d = os.path.join(root, f"direct{k}")
            out = subprocess.run(
                ["nsenter", f"--net={hostns}", os.path.join(build, "test", "lifecycle-direct"),
                 "--vmm", fcsim, "--kernel", t.kernel.path, "--rootfs", t.rootfs.path,
                 "--dir", d, "--netns-dir", os.path.join(root, f"netns-direct{k}"),
                 "-n", str(count)], capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                raise SystemExit(f"lifecycle-direct failed: {out.stderr}")
            if not warm:
                for line in out.stdout.splitlines():
                    kv = dict(w.split("=") for w in line.split())
                    res["direct"][0].append(int(kv["create_us"]))
                    res["direct"][1].append(int(kv["destroy_us"]))
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    if os.readlink(f"/proc/{pid}/cwd").startswith(root + "/"):
                        os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
        for d in os.listdir(root):
            if d.startswith("netns"):
                for f in os.listdir(os.path.join(root, d)):
                    subprocess.run(["umount", "-l", os.path.join(root, d, f)],
                                   capture_output=True)
                subprocess.run(["umount", "-R", "-l", os.path.join(root, d)],
                               capture_output=True)
        subprocess.run(["umount", "-l", hostns], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    print(f"{'':10} {'create p50':>11} {'create p99':>11} {'destroy p50':>12} {'destroy p99':>12}")
    for side in ("emberd", "direct"):
        c, d = res[side]
        print(f"{side:10} {pct(c, 50) / 1000:9.1f}ms {pct(c, 99) / 1000:9.1f}ms "
              f"{pct(d, 50) / 1000:10.1f}ms {pct(d, 99) / 1000:10.1f}ms")
    ec, ed = res["emberd"]
    dc, dd = res["direct"]
    print(f"{'ratio':10} {pct(ec, 50) / pct(dc, 50):10.2f}x {pct(ec, 99) / pct(dc, 99):10.2f}x "
          f"{pct(ed, 50) / pct(dd, 50):11.2f}x {pct(ed, 99) / pct(dd, 99):11.2f}x   "
          "(target <= 1.2x)")
    print(f"spread (stdev) create: emberd {statistics.pstdev(ec) / 1000:.1f}ms, direct "
          f"{statistics.pstdev(dc) / 1000:.1f}ms")


if __name__ == "__main__":
    main()
