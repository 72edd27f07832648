# The optional TCP listener: mutual TLS by default (certificates made here with openssl), a
# client without a certificate or with one from another CA is refused; plaintext only when
# insecure_tcp = true is set explicitly.

import os
import socket
import subprocess

import grpc
import pytest

from ember.v1 import node_pb2, node_pb2_grpc


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=d)


def make_cert(d, ca, name, server):
    ext = os.path.join(d, f"{name}.ext")
    with open(ext, "w") as f:
        if server:
            f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        else:
            f.write("extendedKeyUsage=clientAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", f"{name}.crt", cwd=d)


def read(d, name):
    with open(os.path.join(d, name), "rb") as f:
        return f.read()


@pytest.fixture
def pki(workdir):
    d = os.path.join(workdir, "pki")
    os.makedirs(d)
    make_ca(d, "ca")
    make_ca(d, "otherca")
    make_cert(d, "ca", "server", server=True)
    make_cert(d, "ca", "client", server=False)
    make_cert(d, "otherca", "intruder", server=False)
    return d


def tls_channel(port, d, client=None):
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(d, "ca.crt"),
        private_key=read(d, f"{client}.key") if client else None,
        certificate_chain=read(d, f"{client}.crt") if client else None)
    return grpc.secure_channel(f"localhost:{port}", creds)


def get_node(ch, timeout=10):
    return node_pb2_grpc.NodeStub(ch).GetNode(node_pb2.GetNodeRequest(), timeout=timeout)


def test_mtls(start_emberd, pki):
    port = free_port()
    e = start_emberd(f"[api]\ntcp_listen = 127.0.0.1:{port}\n"
                     f"tls_cert = {pki}/server.crt\ntls_key = {pki}/server.key\n"
                     f"tls_client_ca = {pki}/ca.crt\n")
    assert "mutual TLS" in e.proc.log()
    port = e.tcp_port(port)
    with tls_channel(port, pki, "client") as ch:
        info = get_node(ch)
    with e.channel() as ch:
        assert get_node(ch).node_id == info.node_id  # same node on both listeners

    for client in (None, "intruder"):
        with tls_channel(port, pki, client) as ch:
            with pytest.raises(grpc.RpcError) as ei:
                get_node(ch, timeout=5)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, client

    # plaintext against the TLS port fails too
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.RpcError):
            get_node(ch, timeout=5)


def test_tcp_without_tls_is_refused_unless_insecure(start_emberd, workdir):
    port = free_port()
    e = start_emberd(f"[api]\ntcp_listen = 127.0.0.1:{port}\n", wait=False)
    assert e.proc.wait(15) == 78
    log = e.proc.log()
    assert "tcp_listen" in log and "insecure_tcp" in log and "tls_client_ca" in log

    e = start_emberd(f"[api]\ntcp_listen = 127.0.0.1:{port}\ninsecure_tcp = true\n")
    assert "plaintext without authentication" in e.proc.log()
    with grpc.insecure_channel(f"127.0.0.1:{e.tcp_port(port)}") as ch:
        assert get_node(ch).agent_version


def test_tcp_port_is_not_shared(start_emberd):
    """SO_REUSEPORT is off: a second emberd cannot bind the same TCP port."""
    port = free_port()
    conf = f"[api]\ntcp_listen = 127.0.0.1:{port}\ninsecure_tcp = true\n"
    first = start_emberd(conf)
    second = start_emberd(conf, wait=False, hostns=first.hostns)
    assert second.proc.wait(15) == 1
    assert f"127.0.0.1:{port}" in second.proc.log()
    with grpc.insecure_channel(f"127.0.0.1:{first.tcp_port(port)}") as ch:
        assert get_node(ch).node_id == get_node(first.channel()).node_id
