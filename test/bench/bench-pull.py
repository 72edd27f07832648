#!/usr/bin/python3
"""make bench-pull: PullTemplate throughput against curl, in the same run.

A 1 GiB random file (in the benchmark's directory, on the same filesystem as emberd's state
directory) is served over plain HTTP on loopback by test/integration/pullserver.py
(sendfile), inside the network namespace emberd runs in (conftest.EmberdStarter: the machine's
own namespace is not touched). Alternating, N times each:
  - curl -s -o <file in the same directory> URL (run in that namespace with nsenter), and
    for information an fsync of its file afterwards (timed apart);
  - PullTemplate of a template whose rootfs is that file (kernel: a 64 KiB file), timed from
    the call to its DONE message, then DeleteTemplate.
Each run starts with nothing dirty in the page cache (sync before it). Printed: MiB/s of each
run, the medians, the ratios emberd/curl (target >= 0.90): received and sha256-checked
(VERIFYING) against curl -o, and to DONE (emberd's install fsyncs the files) against curl -o
followed by an fsync, and for information to DONE against curl -o alone; the CPU time emberd
spent per pull
(utime+stime from /proc/<pid>/stat, before and after) and curl's, and the CPU time a plain
`openssl dgst -sha256` of the file takes: the hashing cost that a pull cannot avoid.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

MiB = 1 << 20


def cpu_s(pid):
    """utime + stime of a process so far, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_child(argv):
    """Runs argv; returns (wall s, CPU s of the child, stdout)."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({p.returncode}): {err.decode().strip()}")
    return wall, ru.ru_utime + ru.ru_stime, out


def make_random(path, size):
    with open(path, "wb") as f:
        for off in range(0, size, 4 * MiB):
            f.write(os.urandom(min(4 * MiB, size - off)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("-n", type=int, default=3, help="runs of each (default 3)")
    ap.add_argument("--mib", type=int, default=1024, help="size of the file (default 1024)")
    args = ap.parse_args()
    build = os.path.abspath(args.build)
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["EMBER_BUILD"] = build
    sys.path.insert(0, os.path.join(here, "..", "integration"))
    sys.path.insert(0, os.path.join(build, "py"))
    from conftest import EmberdStarter, _new_workdir, _stop_procs
    from ember.v1 import node_pb2 as S, node_pb2_grpc
    from pullserver import PullServer

    size = args.mib * MiB
    d = _new_workdir()
    procs = []
    starter = EmberdStarter(d, procs)
    srv = None
    try:
        e = starter("[network]\npool_size = 0\n", args=["--log-level", "warning"])
        n = node_pb2_grpc.NodeStub(e.channel())
        with open(f"/proc/{e.proc.pid}/comm") as f:
            assert f.read().strip() == "emberd", "e.proc.pid is not emberd's pid"
        data = os.path.join(d, "data")
        os.makedirs(data)
        assert os.stat(data).st_dev == os.stat(e.state_dir).st_dev
        big = os.path.join(data, "big")
        kernel = os.path.join(data, "kernel")
        make_random(big, size)
        make_random(kernel, 64 << 10)

        # the hashing cost: what any verifying download spends at least
        os.sync()
        hwall, hcpu, out = timed_child(["openssl", "dgst", "-sha256", "-r", big])
        big_sha = out.split()[0].decode()
        _, _, out = timed_child(["openssl", "dgst", "-sha256", "-r", kernel])
        kernel_sha = out.split()[0].decode()

        srv = PullServer(netns=e.hostns)
        srv.add("/kernel", kernel)
        srv.add("/big", big)
        req = S.PullTemplateRequest(
            template_id="bench",
            kernel=S.RemoteArtifact(url=srv.url("/kernel"), sha256=kernel_sha,
                                    size_bytes=os.path.getsize(kernel)),
            rootfs=S.RemoteArtifact(url=srv.url("/big"), sha256=big_sha, size_bytes=size))
        out_file = os.path.join(data, "curl.out")
        tdir = os.path.join(e.state_dir, "templates", "bench")

        print(f"bench-pull: {args.mib} MiB over plain HTTP on loopback (pullserver, sendfile), "
              f"{args.n} runs of each, alternating; {os.cpu_count()} CPUs", flush=True)
        rows = []
        for i in range(args.n):
            os.sync()
            wall, ccpu, _ = timed_child(["nsenter", f"--net={e.hostns}", "curl", "-sS",
                                         "--fail", "-o", out_file, srv.url("/big")])
            got = os.path.getsize(out_file)
            assert got == size, f"curl wrote {got} bytes"
            # what writing the file back to disk adds (curl does not; emberd may, to keep a
            # pulled template across a crash)
            t0 = time.monotonic()
            fd = os.open(out_file, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            flush = time.monotonic() - t0
            os.unlink(out_file)
            curl_mibs = size / MiB / wall

            os.sync()
            c0 = cpu_s(e.proc.pid)
            t0 = time.monotonic()
            downloaded = None
            last = None
            for m in n.PullTemplate(req, timeout=600):
                if m.phase != S.PULL_PHASE_DOWNLOADING and downloaded is None:
                    downloaded = time.monotonic()
                last = m
            pwall = time.monotonic() - t0
            ecpu = cpu_s(e.proc.pid) - c0
            assert last.phase == S.PULL_PHASE_DONE and \
                last.template.rootfs.sha256 == big_sha, last
            down = (downloaded or t0 + pwall) - t0
            rows.append(dict(curl=curl_mibs, curl_cpu=ccpu,
                             curl_sync=size / MiB / (wall + flush), emberd=size / MiB / pwall,
                             emberd_down=size / MiB / down, emberd_cpu=ecpu))
            n.DeleteTemplate(S.DeleteTemplateRequest(template_id="bench"), timeout=60)
            for _ in range(600):
                if not os.path.exists(tdir):
                    break
                time.sleep(0.1)
            print(f"  run {i + 1}: curl {curl_mibs:7.0f} MiB/s, emberd {size / MiB / pwall:7.0f}"
                  " MiB/s", flush=True)

        def med(k):
            return statistics.median(r[k] for r in rows)

        print()
        print(f"{'run':>6} {'curl MiB/s':>11} {'(+fsync)':>9} {'curl CPU s':>11} "
              f"{'emberd MiB/s':>13} {'(download)':>11} {'emberd CPU s':>13}")
        for i, r in enumerate(rows):
            print(f"{i + 1:>6} {r['curl']:11.0f} {r['curl_sync']:9.0f} {r['curl_cpu']:11.2f} "
                  f"{r['emberd']:13.0f} {r['emberd_down']:11.0f} {r['emberd_cpu']:13.2f}")
        print(f"{'median':>6} {med('curl'):11.0f} {med('curl_sync'):9.0f} "
              f"{med('curl_cpu'):11.2f} {med('emberd'):13.0f} {med('emberd_down'):11.0f} "
              f"{med('emberd_cpu'):13.2f}")
        # emberd sends VERIFYING once every byte is in and its sha256 compared; DONE after
        # the install, which fsyncs the files (a READY template must survive a power cut),
        # which curl -o does not do.
        down = med("emberd_down") / med("curl")
        durable = med("emberd") / med("curl_sync")
        plain = med("emberd") / med("curl")
        print(f"\nratio emberd/curl, medians:\n"
              f"  received and sha256-checked (VERIFYING) vs curl -o:  {down:.2f} "
              f"(target >= 0.90: {'met' if down >= 0.90 else 'NOT met'})\n"
              f"  to DONE (files synced) vs curl -o and an fsync:       {durable:.2f} "
              f"(target >= 0.90: {'met' if durable >= 0.90 else 'NOT met'})\n"
              f"  to DONE vs curl -o without an fsync:                 {plain:.2f} "
              "(for information: curl's file is not on disk yet)")
        print(f"hashing cost: openssl dgst -sha256 of {args.mib} MiB takes {hcpu:.2f} s CPU "
              f"({hwall:.2f} s wall, {size / MiB / hwall:.0f} MiB/s); emberd spends "
              f"{med('emberd_cpu'):.2f} s CPU per pull, curl {med('curl_cpu'):.2f} s "
              "(it does not hash)")
        print("(+fsync): curl's rate counting an fsync of its file afterwards; (download): "
              "emberd's rate up to its first message past DOWNLOADING, sent once every byte is "
              "in and hashed and the digests compared; emberd MiB/s: to DONE, which includes "
              "the install (fsync, rename, record)")
    finally:
        if srv is not None:
            srv.close()
        starter.close()
        _stop_procs(procs)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
