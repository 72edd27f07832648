# emberd's command line and configuration: embedded defaults, overrides, and bad values refused
# at start-up with the key, the value and what is allowed.

import os
import subprocess

import pytest

from conftest import BUILD, wait_for

EMBERD = os.path.join(BUILD, "emberd")


def run(*args, timeout=15):
    return subprocess.run([EMBERD, *args], capture_output=True, text=True, timeout=timeout)


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("emberd ")
    r = run("--help")
    assert r.returncode == 0
    for opt in ("--config", "--listen", "--state-dir", "--run-dir", "--log-level", "--version",
                "--help", "--dump-config"):
        assert opt in r.stdout, opt


def test_usage_errors():
    r = run("--no-such-option")
    assert r.returncode == 2
    r = run("stray-argument")
    assert r.returncode == 2 and "stray-argument" in r.stderr


def test_embedded_defaults_without_config_file():
    if os.path.exists("/etc/ember/ember.conf"):
        pytest.skip("/etc/ember/ember.conf exists on this host and would be read")
    r = run("--dump-config")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for line in ("state_dir = /var/lib/ember", "run_dir = /run/ember", "log_level = info",
                 "socket = /run/ember/ember.sock", "tcp_listen = ", "insecure_tcp = false",
                 "max_message_mib = 16", "shutdown_grace_s = 15"):
        assert line in out.splitlines(), line


def test_overrides(workdir):
    conf = os.path.join(workdir, "c.conf")
    with open(conf, "w") as f:
        f.write("[agent]\nstate_dir = /from/file\nlog_level = debug\n[api]\nmax_message_mib = 8\n")
    r = run("--config", conf, "--state-dir", "/from/cli", "--run-dir", "/r",
            "--listen", "unix:/s/e.sock", "--dump-config")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "state_dir = /from/cli" in lines      # command line beats the file
    assert "log_level = debug" in lines          # file beats the default
    assert "max_message_mib = 8" in lines
    assert "socket = /s/e.sock" in lines
    r = run("--config", conf, "--listen", "127.0.0.1:7070", "--dump-config")
    assert r.returncode == 78 and "insecure_tcp" in r.stderr  # TCP needs TLS or opt-in


@pytest.mark.parametrize("text,expect", [
    ("[api]\nmax_message_mib = 0\n", ["c.conf:2", "max_message_mib", '"0"', "1 to 1024"]),
    ("[api]\nshutdown_grace_s = soon\n", ["shutdown_grace_s", '"soon"', "whole number"]),
    ("[api]\ninsecure_tcp = maybe\n", ["insecure_tcp", '"maybe"', "true or false"]),
    ("[agent]\nstate_dir = relative/dir\n", ["state_dir", "relative/dir", "absolute path"]),
    ("[agent]\nlog_level = loud\n", ["log_level", "loud", "debug, info"]),
    ("[api]\ntcp_listen = nowhere\n", ["tcp_listen", "nowhere", "HOST:PORT"]),
    ("[agent]\nno_such_key = 1\n", ["c.conf:2", "unknown key", "no_such_key"]),
    ("[nosection]\nx = 1\n", ["unknown section", "nosection"]),
    ("[agent]\nthis line is not ini\n", ["c.conf:2", "syntax error"]),
    ("[api]\ntls_cert = /etc/hostname\n", ["tls_cert", "tls_key", "together"]),
    ("[vmm]\nkind = qemu\n", ["kind", '"qemu"', "auto, firecracker or fcsim"]),
    ("[storage]\nbackend = zfs\n", ["backend", '"zfs"', "auto, dm or file"]),
    ("[network]\nsandbox_range = 10.0.0.1/8\n", ["sandbox_range", "10.0.0.1/8", "IPv4 CIDR"]),
    ("[network]\nveth_range = 10.200.0.0/31\n", ["veth_range", "IPv4 CIDR"]),
    ("[network]\nuplink = a/b\n", ["uplink", "interface name"]),
    ("[network]\nveth_range = 10.200.128.0/17\n", ["veth_range", "sandbox_range", "overlap"]),
    ("[sandboxes]\nworker_threads = 0\n", ["worker_threads", "1 to 256"]),
    ("[templates]\ndemo_kernel = vmlinux\n", ["demo_kernel", "absolute path"]),
])
def test_bad_config_refused(workdir, text, expect):
    conf = os.path.join(workdir, "c.conf")
    with open(conf, "w") as f:
        f.write(text)
    r = run("--config", conf, "--state-dir", os.path.join(workdir, "s"),
            "--run-dir", os.path.join(workdir, "r"))
    assert r.returncode == 78, (r.returncode, r.stderr)
    for e in expect:
        assert e in r.stderr, (e, r.stderr)
    # nothing was created on the way out
    assert not os.path.exists(os.path.join(workdir, "s"))


def test_bad_command_line_values_refused(workdir):
    r = run("--log-level", "loud")
    assert r.returncode == 78
    assert "--log-level" in r.stderr and "loud" in r.stderr and "debug, info" in r.stderr
    r = run("--state-dir", "rel")
    assert r.returncode == 78 and "absolute path" in r.stderr
    r = run("--config", os.path.join(workdir, "missing.conf"))
    assert r.returncode == 78 and "missing.conf" in r.stderr


def test_listen_path_option(start_emberd, workdir):
    sock = os.path.join(workdir, "custom.sock")
    e = start_emberd(args=["--listen", sock], wait=False)
    wait_for(lambda: os.path.exists(sock), 15, "custom socket")
    import grpc
    from ember.v1 import node_pb2, node_pb2_grpc
    with grpc.insecure_channel("unix:" + sock) as ch:
        wait_for(lambda: _ok(ch), 15, "GetNode on the custom socket")
    assert not os.path.exists(e.socket)


def _ok(ch):
    import grpc
    from ember.v1 import node_pb2, node_pb2_grpc
    try:
        return node_pb2_grpc.NodeStub(ch).GetNode(node_pb2.GetNodeRequest(), timeout=2).node_id
    except grpc.RpcError:
        return None
