# Helpers for the fcsim tests: a busybox root image, an HTTP client on a unix socket, and a
# running fcsim in a network namespace of the test's own (where its TAPs are made).

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time

from conftest import BUILD, SLOW

FCSIM = os.path.join(BUILD, "fcsim")
HELPER = os.path.join(BUILD, "test", "guest-helper")

INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t tmpfs tmpfs /run
/bin/busybox mount -t tmpfs tmpfs /tmp
echo "init: up as pid $$ on $(/bin/busybox hostname), EMBER_SIM=$EMBER_SIM"
/bin/guest-helper serve 1024 7
echo "init: exiting"
"""


def build_rootfs(path, extra_init=None, size="16M"):
    """An ext4 image: static busybox, the guest helper, /sbin/init (a shell script)."""
    tree = path + ".tree"
    shutil.rmtree(tree, ignore_errors=True)
    for d in ("bin", "sbin", "proc", "run", "tmp", "dev", "etc", "sys"):
        os.makedirs(os.path.join(tree, d))
    shutil.copy("/bin/busybox", os.path.join(tree, "bin", "busybox"))
    for applet in ("sh", "mount", "echo", "sleep", "cat", "ip", "hostname", "ls", "ps"):
        os.symlink("busybox", os.path.join(tree, "bin", applet))
    shutil.copy(HELPER, os.path.join(tree, "bin", "guest-helper"))
    with open(os.path.join(tree, "sbin", "init"), "w") as f:
        f.write(extra_init or INIT)
    os.chmod(os.path.join(tree, "sbin", "init"), 0o755)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, path, size], check=True,
                   capture_output=True)
    shutil.rmtree(tree)
    return path


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=60):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class Api:
    def __init__(self, sock):
        self.sock = sock

    def call(self, method, path, body=None, raw=None):
        c = UnixHTTPConnection(self.sock)
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        c.request(method, path, body=data, headers=headers)
        r = c.getresponse()
        text = r.read().decode()
        c.close()
        return r.status, (json.loads(text) if text else None)

    def put(self, path, body=None, raw=None):
        return self.call("PUT", path, body, raw)

    def patch(self, path, body):
        return self.call("PATCH", path, body)

    def get(self, path):
        return self.call("GET", path)

    def ok(self, method, path, body=None):
        status, reply = self.call(method, path, body)
        assert status in (200, 204), (method, path, body, status, reply)
        return reply


class Fcsim:
    """fcsim started in `netns` (a bind-mounted namespace path, or None for a new one made by
    unshare) with `workdir` as its working directory."""

    def __init__(self, workdir, netns=None, env=None, args=(), sock="api.sock"):
        self.workdir = workdir
        self.sock = os.path.join(workdir, sock)
        # One output file per process: a restored VMM in the same directory must not find
        # the first one's lines.
        self.out = os.path.join(workdir, f"fcsim-{sock}.out")
        self.log = open(self.out, "ab")
        prefix = (["nsenter", f"--net={netns}"] if netns else ["unshare", "--net"])
        e = dict(os.environ, **(env or {}))
        self.p = subprocess.Popen(prefix + [FCSIM, "--api-sock", sock, *args], cwd=workdir,
                                  stdout=self.log, stderr=subprocess.STDOUT, env=e)
        # The socket file appears at bind(), a moment before listen(), as with Firecracker:
        # wait until a connection is taken.
        deadline = time.monotonic() + 10 * SLOW
        while not self._answers():
            assert self.p.poll() is None, self.output()
            assert time.monotonic() < deadline, "fcsim did not listen on its socket"
            time.sleep(0.01)
        self.api = Api(self.sock)

    def _answers(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.sock)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def output(self):
        with open(self.out, errors="replace") as f:
            return f.read()

    def wait_output(self, text, timeout=20):
        deadline = time.monotonic() + timeout * SLOW
        while text not in self.output():
            assert self.p.poll() is None or text in self.output(), self.output()
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.output()}"
            time.sleep(0.02)

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()
        return self.p.returncode

    def configure(self, rootfs, kernel, mem=32, vcpus=1, boot_args="", ro=False, vsock=True,
                  net=False):
        a = self.api
        a.ok("PUT", "/machine-config", {"vcpu_count": vcpus, "mem_size_mib": mem})
        a.ok("PUT", "/boot-source",
             {"kernel_image_path": kernel, "boot_args": "console=ttyS0 " + boot_args})
        a.ok("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": rootfs,
                                       "is_root_device": True, "is_read_only": ro})
        if net:
            a.ok("PUT", "/network-interfaces/eth0",
                 {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"})
        if vsock:
            a.ok("PUT", "/vsock", {"guest_cid": 3, "uds_path": "v.sock"})


def children(pid):
    """The pids a process forked (its guest's init among them)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def kill_and_check_guest_gone(f):
    """SIGKILL the VMM, as an operator or the OOM killer would: like a Firecracker, its guest
    (all of it: the init of its pid namespace) must go with it."""
    guests = children(f.p.pid)
    assert guests, "no guest process under the VMM"
    f.p.send_signal(signal.SIGKILL)
    f.p.wait()
    deadline = time.monotonic() + 10 * SLOW
    while any(os.path.exists(f"/proc/{g}") for g in guests):
        assert time.monotonic() < deadline, f"guest processes {guests} outlived the VMM"
        time.sleep(0.02)


def vsock_connect(uds, port, timeout=10):
    """Host-initiated hybrid vsock: CONNECT, then the stream is the guest's."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(uds)
    s.sendall(f"CONNECT {port}\n".encode())
    line = b""
    while not line.endswith(b"\n"):
        ch = s.recv(1)
        if not ch:
            s.close()
            return None, None
        line += ch
    return s, line.decode().strip()


def vsock_echo(uds, port, msg, timeout=10):
    s, ok = vsock_connect(uds, port, timeout)
    if s is None:
        return None
    assert ok.startswith("OK "), ok
    s.sendall(msg)
    got = b""
    while len(got) < len(msg):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    s.close()
    return got
