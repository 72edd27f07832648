#!/usr/bin/python3
"""make bench-pause: PauseSandbox and ResumeSandbox through emberd (fcsim, file backend) for
256 MiB and 1 GiB guests, p50/p99 of each and of every step (Sandbox.last_operation); a create
from a snapshot against a cold create, in the same run; and 20 forks of one snapshot at once:
total time, disk used per fork, and how many bytes of the memory file were copied per fork
(each fork's ember-uffd must map the snapshot's own file).

emberd runs in a network namespace the benchmark makes (the machine's own is not touched)."""

import argparse
import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def ms(us):
    return f"{us / 1000:8.1f}ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("-n", type=int, default=8, help="pause/resume cycles per size (default 8)")
    ap.add_argument("--sizes", default="256,1024", help="guest memory sizes in MiB")
    ap.add_argument("--prefetch", default="true", choices=["true", "false"])
    ap.add_argument("--forks-only", action="store_true",
                    help="only the 20 forks (make bench-pause runs this in the VM, over dm)")
    args = ap.parse_args()
    build = os.path.abspath(args.build)
    sys.path.insert(0, os.path.join(build, "py"))
    import grpc
    from ember.v1 import node_pb2 as S, node_pb2_grpc

    root = tempfile.mkdtemp(prefix="ember-bench-pause-", dir="/tmp")
    hostns = os.path.join(root, "hostns")
    open(hostns, "w").close()
    subprocess.run(["unshare", f"--net={hostns}", "true"], check=True)
    subprocess.run(["nsenter", f"--net={hostns}", "ip", "link", "set", "lo", "up"], check=True)
    conf = os.path.join(root, "ember.conf")
    with open(conf, "w") as f:
        f.write(f"[network]\nnetns_dir = {root}/netns\n[sandboxes]\nmemory_reserve_mib = 0\n"
                f"[vmm]\nuffd_prefetch = {args.prefetch}\n")
    sock = os.path.join(root, "run", "ember.sock")
    state = os.path.join(root, "state")
    p = subprocess.Popen(["nsenter", f"--net={hostns}", os.path.join(build, "emberd"),
                          "--config", conf, "--state-dir", state,
                          "--run-dir", os.path.join(root, "run"), "--log-level", "warning"],
                         stderr=open(os.path.join(root, "emberd.log"), "wb"))
    try:
        n = node_pb2_grpc.NodeStub(grpc.insecure_channel("unix:" + sock))
        for _ in range(300):
            try:
                n.GetNode(S.GetNodeRequest(), timeout=2)
                break
            except grpc.RpcError:
                time.sleep(0.1)
        node = n.GetNode(S.GetNodeRequest(), timeout=5)
        print(f"bench-pause: vmm {node.vmm} {node.vmm_version}, storage "
              f"{node.storage_backend}, ember-uffd prefetch {args.prefetch}, " +
              ("20 forks only" if args.forks_only else f"{args.n} cycles per size"), flush=True)

        def create(sid, **spec):
            t0 = time.monotonic()
            sb = n.CreateSandbox(S.CreateSandboxRequest(sandbox_id=sid,
                                                        spec=S.SandboxSpec(**spec)), timeout=600)
            return sb, (time.monotonic() - t0) * 1e6

        def destroy(sid):
            n.DestroySandbox(S.DestroySandboxRequest(sandbox_id=sid), timeout=600)

        if not args.forks_only:
            for mib in (int(x) for x in args.sizes.split(",")):
                sid = f"p{mib}"
                create(sid, template_id="demo", memory_mib=mib)
                tot = {"pause": [], "resume": []}
                steps = {"pause": {}, "resume": {}}
                for _ in range(args.n):
                    for op in ("pause", "resume"):
                        t0 = time.monotonic()
                        if op == "pause":
                            sb = n.PauseSandbox(S.PauseSandboxRequest(sandbox_id=sid), timeout=600)
                        else:
                            sb = n.ResumeSandbox(S.ResumeSandboxRequest(sandbox_id=sid),
                                                 timeout=600)
                        tot[op].append((time.monotonic() - t0) * 1e6)
                        for st in sb.last_operation.steps:
                            steps[op].setdefault(st.name, []).append(st.duration_us)
                destroy(sid)
                print(f"\n{mib} MiB guest        p50        p99   (call, as the client sees it)")
                for op in ("pause", "resume"):
                    print(f"  {op:16} {ms(pct(tot[op], 50))} {ms(pct(tot[op], 99))}")
                    for name, xs in steps[op].items():
                        print(f"    {name:14} {ms(pct(xs, 50))} {ms(pct(xs, 99))}")

        # In the VM (TCG, every instruction emulated) 20 loads at once outlast their
        # timeout: there the forks are smaller and made one after another, and only their
        # disk and memory sharing are the point, not their time.
        mib = 128 if args.forks_only else 256
        create("src", template_id="demo", memory_mib=mib)
        n.CreateSnapshot(S.CreateSnapshotRequest(snapshot_id="s", sandbox_id="src"), timeout=600)
        if not args.forks_only:
            # create from a snapshot against a cold create, alternating
            cold, warm = [], []
            for i in range(args.n):
                _, us = create(f"c{i}", template_id="demo", memory_mib=mib)
                cold.append(us)
                destroy(f"c{i}")
                _, us = create(f"w{i}", snapshot_id="s")
                warm.append(us)
                destroy(f"w{i}")
            print(f"\ncreate, {mib} MiB     p50        p99")
            print(f"  cold boot        {ms(pct(cold, 50))} {ms(pct(cold, 99))}")
            print(f"  from snapshot    {ms(pct(warm, 50))} {ms(pct(warm, 99))}")
            print(f"  ratio            {pct(warm, 50) / pct(cold, 50):8.2f}x  (snapshot / cold)")

        # 20 forks at once
        ids = [f"f{i}" for i in range(20)]
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(1 if args.forks_only else 20) as ex:
            list(ex.map(lambda i: create(i, snapshot_id="s"), ids))
        total = time.monotonic() - t0
        mem = os.path.join(state, "snapshots", "s", "mem")
        ino = os.stat(mem).st_ino
        disk, copied, mapping = [], [], 0
        for i in ids:
            d = os.path.join(state, "sandboxes", i)
            disk.append(os.stat(os.path.join(d, "cow.img")).st_blocks * 512)
            # everything of the fork's own but its disk and record: a copied memory file
            # would be here
            own = sum(os.stat(os.path.join(dp, f)).st_blocks * 512
                      for dp, _, fs in os.walk(d) for f in fs
                      if f not in ("cow.img", "sandbox.json"))
            copied.append(own)
            import json
            with open(os.path.join(d, "sandbox.json")) as f:
                upid = json.load(f)["uffd_pid"]
            with open(f"/proc/{upid}/maps") as f:
                if any(line.split()[4] == str(ino) for line in f if len(line.split()) > 5):
                    mapping += 1
        how = "one after another, under TCG" if args.forks_only else "at once"
        print(f"\n20 forks of one {mib} MiB snapshot, created {how}: {total:.2f} s in all")
        print(f"  disk used per fork ({node.storage_backend} backend; its CoW file, where the "
              "file backend copies the base): "
              f"p50 {pct(disk, 50) / 1024:.0f} KiB, max {max(disk) / 1024:.0f} KiB")
        print(f"  memory file bytes copied per fork: max {max(copied)}; ember-uffd of "
              f"{mapping} of 20 forks map the snapshot's own memory file (inode {ino})")
        for i in ids + ["src"]:
            destroy(i)
        n.DeleteSnapshot(S.DeleteSnapshotRequest(snapshot_id="s"), timeout=60)
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
        nsdir = os.path.join(root, "netns")
        for f in os.listdir(nsdir) if os.path.isdir(nsdir) else []:
            subprocess.run(["umount", "-l", os.path.join(nsdir, f)], capture_output=True)
        subprocess.run(["umount", "-R", "-l", nsdir], capture_output=True)
        subprocess.run(["umount", "-l", hostns], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
