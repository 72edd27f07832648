#!/usr/bin/python3
"""make bench-rpc: unary calls over emberd's unix socket with 1 and 16 concurrent clients.

Starts its own emberd (temporary state and run dirs), then runs build/test/rpc-bench (a plain
gRPC core client) for each case. Health/Check is measured in the same run as the baseline: it
is the gRPC layer alone (accept, worker hand-off, reply), so GetNode minus Check is what the
Node handler itself costs. These machines are shared and noisy: compare figures within one run.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("BENCH_SECONDS", 5)))
    args = ap.parse_args()
    build = os.path.abspath(args.build)

    root = tempfile.mkdtemp(prefix="ember-bench-", dir="/tmp")
    sock = os.path.join(root, "run", "ember.sock")
    log = open(os.path.join(root, "emberd.log"), "wb")
    p = subprocess.Popen([os.path.join(build, "emberd"), "--config", "/dev/null",
                          "--state-dir", os.path.join(root, "state"),
                          "--run-dir", os.path.join(root, "run"), "--log-level", "warning"],
                         stderr=log)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            if p.poll() is not None or time.monotonic() > deadline:
                sys.exit("emberd did not start; see " + log.name)
            time.sleep(0.05)
        print(f"emberd {subprocess.check_output([os.path.join(build, 'emberd'), '--version'], text=True).split()[1]}"
              f", {os.cpu_count()} CPUs, {args.seconds:g}s per case after 0.5s warm-up")
        failed = False
        for method in ("/grpc.health.v1.Health/Check", "/ember.v1.Node/GetNode"):
            for clients in (1, 16):
                r = subprocess.run([os.path.join(build, "test", "rpc-bench"), "unix:" + sock,
                                    method, str(clients), str(args.seconds)],
                                   capture_output=True, text=True)
                sys.stdout.write(r.stdout)
                if r.returncode != 0:
                    failed = True
                    sys.stderr.write(r.stderr)
        if failed:
            sys.exit(1)
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
