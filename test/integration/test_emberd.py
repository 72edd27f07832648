# emberd end to end over its unix socket: GetNode, UNIMPLEMENTED for unknown methods only, health, the
# single-instance lock, graceful shutdown, concurrency.

import os
import signal
import stat
import subprocess
import threading
import time

import grpc
import pytest

from conftest import BUILD, SLOW, Proc, wait_for

from ember.v1 import node_pb2, node_pb2_grpc
from health.v1 import health_pb2, health_pb2_grpc


def get_node(e, timeout=5):
    with e.channel() as ch:
        return node_pb2_grpc.NodeStub(ch).GetNode(node_pb2.GetNodeRequest(), timeout=timeout)


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out


def test_get_node_reports_real_facts(start_emberd):
    e = start_emberd()
    info = get_node(e)

    version = subprocess.run([os.path.join(BUILD, "emberd"), "--version"],
                             capture_output=True, text=True, check=True).stdout.split()[1]
    assert info.agent_version == version
    assert len(info.node_id) == 36 and info.node_id.count("-") == 4
    assert info.hostname == os.uname().nodename
    assert info.kernel_release == os.uname().release
    assert info.cpu_count == os.sysconf("SC_NPROCESSORS_ONLN")
    assert info.memory_total_bytes == meminfo()["MemTotal"]
    assert 0 < info.memory_available_bytes <= info.memory_total_bytes
    hp = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
    if os.path.exists(hp):
        with open(hp) as f:
            assert info.huge_pages_total_bytes == int(f.read()) << 21
    assert info.state_dir == e.state_dir
    st = os.statvfs(e.state_dir)
    assert info.disk_total_bytes == st.f_blocks * st.f_frsize
    # free space moves a little while tests run; it must be the same order of magnitude
    assert abs(info.disk_free_bytes - st.f_bavail * st.f_frsize) < 2 ** 30
    assert info.serving_state == node_pb2.SERVING_STATE_SERVING
    assert abs(info.start_time.seconds - time.time()) < 120
    assert 0 < info.boot_time.seconds <= time.time()

    caps = info.capabilities
    for name in ("kvm", "device_mapper", "userfaultfd", "firecracker"):
        p = getattr(caps, name)
        assert p.reason, f"{name} probe has no reason"
    # Each probe must agree with the host as this test sees it.
    assert caps.device_mapper.available == os.path.exists("/dev/mapper/control")
    if not os.path.exists("/dev/kvm"):
        assert not caps.kvm.available and "/dev/kvm" in caps.kvm.reason
    # The default firecracker_bin is looked up in PATH; these machines have none.
    from shutil import which
    if which("firecracker") is None:
        assert not caps.firecracker.available
        assert "not found" in caps.firecracker.reason


def test_node_id_persists_across_restarts(start_emberd, workdir):
    root = os.path.join(workdir, "persist")
    e = start_emberd(root=root)
    first = get_node(e).node_id
    assert e.proc.stop() == 0
    with open(os.path.join(root, "state", "node-id")) as f:
        assert f.read().strip() == first
    e2 = start_emberd(root=root)
    assert get_node(e2).node_id == first


def test_corrupt_node_id_is_refused_not_replaced(start_emberd, workdir):
    root = os.path.join(workdir, "corrupt")
    os.makedirs(os.path.join(root, "state"))
    path = os.path.join(root, "state", "node-id")
    with open(path, "w") as f:
        f.write("not-a-uuid\n")
    e = start_emberd(root=root, wait=False)
    assert e.proc.wait(15) == 1
    assert "not a UUID" in e.proc.log()
    with open(path) as f:
        assert f.read() == "not-a-uuid\n"


def test_socket_is_private(start_emberd):
    e = start_emberd()
    st = os.stat(e.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_unknown_method_is_unimplemented_at_once(start_emberd):
    e = start_emberd()
    with e.channel() as ch:
        for method in ("/ember.v1.Node/NoSuchMethod", "/no.such.Service/Call"):
            t = time.monotonic()
            with pytest.raises(grpc.RpcError) as ei:
                ch.unary_unary(method)(b"", timeout=30)
            elapsed = time.monotonic() - t
            assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert method in ei.value.details()
            assert elapsed < 1.0, f"{method} took {elapsed:.2f}s"


def test_every_node_method_is_implemented(start_emberd):
    """No method of ember.v1.Node answers UNIMPLEMENTED: each one, called with an empty
    request (or an empty stream), gets an answer of its own."""
    e = start_emberd()
    service = node_pb2.DESCRIPTOR.services_by_name["Node"]
    assert len(service.methods) >= 22
    with e.channel() as ch:
        for m in service.methods:
            path = f"/{service.full_name}/{m.name}"
            req_cls = getattr(node_pb2, m.input_type.name)
            kinds = (m.client_streaming, m.server_streaming)
            make = {(False, False): ch.unary_unary, (False, True): ch.unary_stream,
                    (True, False): ch.stream_unary, (True, True): ch.stream_stream}[kinds]
            call = make(path, request_serializer=lambda x: x.SerializeToString(),
                        response_deserializer=lambda b: b)
            arg = iter([]) if m.client_streaming else req_cls()
            try:
                r = call(arg, timeout=10)
                if m.server_streaming:  # its first answer (a watch goes on for ever)
                    next(r, None)
                    r.cancel()
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
            assert code != grpc.StatusCode.UNIMPLEMENTED, f"{m.name} is UNIMPLEMENTED"
            assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{m.name} did not answer"


def test_health_check(start_emberd):
    e = start_emberd()
    with e.channel() as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for svc in ("", "ember.v1.Node", "grpc.health.v1.Health",
                    "grpc.reflection.v1.ServerReflection"):
            r = h.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING, svc
        with pytest.raises(grpc.RpcError) as ei:
            h.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_follows_shutdown(start_emberd):
    """Watch sends SERVING, then NOT_SERVING when draining; SIGTERM during this open server
    stream ends emberd well within the grace period."""
    e = start_emberd("[api]\nshutdown_grace_s = 10\n")
    ch = e.channel()
    stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""))
    assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    unknown = health_pb2_grpc.HealthStub(ch).Watch(
        health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

    t = time.monotonic()
    e.proc.signal(signal.SIGTERM)
    assert next(stream).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as ei:
        next(stream)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    assert e.proc.wait(10) == 0
    assert time.monotonic() - t < 10, "did not wait for the grace period"
    ch.close()


def reflection_stream(ch):
    from reflection.v1 import reflection_pb2, reflection_pb2_grpc
    import queue
    q = queue.Queue()

    def requests():
        while True:
            item = q.get()
            if item is None:
                return
            yield item

    responses = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(requests())
    return reflection_pb2, q, responses


def test_reflection_session_ends_at_drain(start_emberd):
    """An idle reflection session (grpcurl, grpcui) must not hold a shutdown for the whole
    grace period: it ends with UNAVAILABLE as soon as the drain begins. (Calls that finish
    their work during the grace period are tested through rpctestd in test_rpc_layer.py.)"""
    e = start_emberd("[api]\nshutdown_grace_s = 20\n")
    ch = e.channel()
    pb, q, responses = reflection_stream(ch)
    q.put(pb.ServerReflectionRequest(list_services=""))
    assert next(responses).list_services_response.service

    t = time.monotonic()
    e.proc.signal(signal.SIGTERM)
    with pytest.raises(grpc.RpcError) as ei:
        next(responses)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in ei.value.details()
    assert time.monotonic() - t < 2 * SLOW
    # An idle client connection left open costs up to 5 s more: gRPC's graceful GOAWAY waits
    # for a ping acknowledgement that an idle Python channel only sends when polled.
    q.put(None)
    ch.close()
    assert e.proc.wait(10) == 0
    assert time.monotonic() - t < 4 * SLOW, "the idle session held up the shutdown"
    assert "all calls finished" in e.proc.log()


def test_second_emberd_fails_clearly_first_keeps_serving(start_emberd, workdir, procs):
    e = start_emberd()
    node_id = get_node(e).node_id
    # Same socket, different state dir: the socket lock must stop it.
    other = os.path.join(workdir, "other")
    argv = [os.path.join(BUILD, "emberd"), "--config", "/dev/null",
            "--state-dir", os.path.join(other, "state"), "--run-dir", os.path.join(other, "run"),
            "--listen", "unix:" + e.socket]
    os.makedirs(other)
    p = Proc(argv, os.path.join(other, "second.log"))
    procs.append(p)
    assert p.wait(15) == 1
    log = p.log()
    assert "another emberd" in log and str(e.proc.pid) in log and e.socket in log
    # Same state dir too.
    argv2 = [os.path.join(BUILD, "emberd"), "--config", "/dev/null",
             "--state-dir", e.state_dir, "--run-dir", os.path.join(other, "run2")]
    p2 = Proc(argv2, os.path.join(other, "third.log"))
    procs.append(p2)
    assert p2.wait(15) == 1
    assert "another emberd" in p2.log() and e.state_dir in p2.log()

    assert os.path.exists(e.socket)
    assert get_node(e).node_id == node_id
    assert e.proc.alive()


def test_2000_calls_from_50_concurrent_clients(start_emberd):
    e = start_emberd()
    errors = []
    done = []
    barrier = threading.Barrier(50)

    def client():
        try:
            with e.channel() as ch:
                stub = node_pb2_grpc.NodeStub(ch)
                barrier.wait()
                n = 0
                for _ in range(40):
                    r = stub.GetNode(node_pb2.GetNodeRequest(), timeout=30 * SLOW)
                    assert r.node_id
                    n += 1
                done.append(n)
        except Exception as ex:  # noqa: BLE001 - collected and reported below
            errors.append(repr(ex))

    threads = [threading.Thread(target=client) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert sum(done) == 2000


def test_oversized_request_is_refused(start_emberd):
    e = start_emberd("[api]\nmax_message_mib = 1\n")
    # An unknown field (number 1000, bytes) of 2 MiB: well-formed protobuf, too large.
    payload = b"\xc2\x3e" + b"\x80\x80\x80\x01" + b"x" * (2 * 1024 * 1024)
    with e.channel() as ch:
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary("/ember.v1.Node/GetNode")(payload, timeout=10)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # a request within the limit still works on the same channel
        assert ch.unary_unary("/ember.v1.Node/GetNode")(b"", timeout=10)


def test_garbage_request_is_invalid_argument(start_emberd):
    e = start_emberd()
    with e.channel() as ch:
        with pytest.raises(grpc.RpcError) as ei:
            ch.unary_unary("/ember.v1.Node/GetNode")(b"\xff\xff\xff", timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_sigint_also_drains(start_emberd):
    e = start_emberd()
    e.proc.signal(signal.SIGINT)
    assert e.proc.wait(10) == 0
    assert "stopped" in e.proc.log()
    assert not os.path.exists(e.socket)


def test_an_idle_client_connection_does_not_hold_up_the_stop(start_emberd):
    """A scheduler keeps its channel open between calls: once no call is left, the stop
    closes such connections rather than waiting for the client to (it waited 5 s)."""
    e = start_emberd()
    with e.channel() as ch:
        node_pb2_grpc.NodeStub(ch).GetNode(node_pb2.GetNodeRequest(), timeout=10)
        t = time.monotonic()
        e.proc.signal(signal.SIGTERM)
        assert e.proc.wait(10) == 0
        took = time.monotonic() - t
    assert took < 2.5 * SLOW, f"the stop took {took:.2f} s"


@pytest.mark.parametrize("conf,says", [
    ("[vmm]\nkind = fcsim\nfcsim_bin = /nonexistent/fcsim\n", "fcsim is not found"),
    ("[vmm]\nkind = firecracker\nfirecracker_bin = /nonexistent/firecracker\n",
     "firecracker_bin \"/nonexistent/firecracker\" is not found"),
])
def test_no_vmm_is_a_configuration_error(start_emberd, conf, says):
    """Exit status 78 (EX_CONFIG), which the unit does not restart: without the VMM its
    configuration names, emberd would only fail again 2 s later, for ever."""
    e = start_emberd(conf, wait=False)
    assert e.proc.wait(30) == 78, e.proc.log()
    assert says in e.proc.log()


def fake_program(path, script):
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + script)
    os.chmod(path, 0o755)
    return path


@pytest.mark.parametrize("script,available,version,reason", [
    ('echo "Firecracker v1.16.1"\n', True, "1.16.1", "Firecracker v1.16.1"),
    ('echo "Firecracker v1.16.1 (fcsim)"\n', True, "1.16.1", "(fcsim)"),
    ("echo something else\n", False, "", "not a Firecracker version"),
    ("exit 3\n", False, "", "non-zero exit"),
    ("exec sleep 30\n", False, "", "did not answer within 2 s"),
])
def test_firecracker_probe(start_emberd, workdir, script, available, version, reason):
    fc = fake_program(os.path.join(workdir, "fc"), script)
    e = start_emberd(f"[vmm]\nkind = fcsim\nfirecracker_bin = {fc}\n")
    t = time.monotonic()
    p = get_node(e, timeout=20).capabilities.firecracker
    assert p.available == available
    assert p.version == version
    assert reason in p.reason
    assert time.monotonic() - t < 5 * SLOW  # a hanging binary is given up on


def test_firecracker_probe_searches_path(start_emberd, workdir):
    bindir = os.path.join(workdir, "bin")
    os.makedirs(bindir)
    fake_program(os.path.join(bindir, "firecracker"), 'echo "Firecracker v1.12.0"\n')
    env = dict(os.environ, PATH=bindir + ":" + os.environ.get("PATH", "/usr/bin"))
    e = start_emberd("[vmm]\nkind = fcsim\n", env=env)
    with e.channel() as ch:
        fc = wait_for(lambda: _probe(ch), 15, "GetNode")
    assert fc.available and fc.version == "1.12.0"
    assert os.path.join(bindir, "firecracker") in fc.reason


def _probe(ch):
    try:
        return node_pb2_grpc.NodeStub(ch).GetNode(node_pb2.GetNodeRequest(),
                                                  timeout=5).capabilities.firecracker
    except grpc.RpcError:
        return None


@pytest.mark.parametrize("min_ping_s,survives", [(10, False), (1, True)])
def test_client_ping_policy(start_emberd, min_ping_s, survives):
    """A client pinging every second on a quiet stream: too often for the default policy
    (GOAWAY too_many_pings ends the stream), fine when min_ping_interval_s allows it."""
    e = start_emberd(f"[api]\nmin_ping_interval_s = {min_ping_s}\n")
    opts = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]
    with e.channel(options=opts) as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""),
                                                      timeout=8)
        assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as ei:
            next(stream)  # nothing more comes: the stream ends by GOAWAY or by its deadline
        code = ei.value.code()
    if survives:
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, ei.value
    else:
        assert code == grpc.StatusCode.UNAVAILABLE, ei.value
