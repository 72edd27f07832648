# PullTemplate: templates downloaded over HTTP(S) from pullserver.py, an artifact server on
# loopback inside emberd's own network namespace. Progress (phases, per-artifact bytes, the
# message rate), the READY template and its files, HTTPS against [templates] ca_file, callers
# following one pull, idempotence, resumed (Range) and restarted transfers, stalls, retries,
# every error status node.proto lists (with the FAILED template it leaves), DeleteTemplate
# and a client going away mid-pull, a SIGKILL mid-pull and the pull resuming after the
# restart, and max_parallel_pulls.

import hashlib
import os
import re
import signal
import socket
import subprocess
import threading
import time

import grpc
import pytest

from conftest import SLOW, wait_for
from pullserver import Pki, PullServer
from test_sandbox import S, code_of, create, destroy, stub

MiB = 1 << 20
# Retries fast, so that the error tests take milliseconds instead of seconds.
CONF = ("[network]\npool_size = 0\n"
        "[templates]\npull_retries = 2\npull_retry_delay_ms = 50\n")
ARTIFACTS = ("kernel", "rootfs", "initrd")
PHASE = {S.PULL_PHASE_DOWNLOADING: "D", S.PULL_PHASE_VERIFYING: "V",
         S.PULL_PHASE_INSTALLING: "I", S.PULL_PHASE_DONE: "F"}


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(MiB)
            if not b:
                return h.hexdigest()
            h.update(b)


def random_file(path, size):
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    return path


@pytest.fixture
def files(workdir):
    """Random artifacts: a 64 KiB kernel, a 4 MiB rootfs (a multiple of 512 bytes; its
    content does not matter unless a sandbox boots from it), a 256 KiB initrd, and another
    4 MiB file (for wrong digests)."""
    d = os.path.join(workdir, "artifacts")
    os.makedirs(d)
    return {"kernel": random_file(os.path.join(d, "kernel"), 64 << 10),
            "rootfs": random_file(os.path.join(d, "rootfs"), 4 * MiB),
            "initrd": random_file(os.path.join(d, "initrd"), 256 << 10),
            "other": random_file(os.path.join(d, "other"), 4 * MiB)}


@pytest.fixture
def new_server():
    """new_server(e, tls=False) -> a PullServer in emberd e's network namespace, closed at
    teardown."""
    made = []

    def make(e, tls=False):
        s = PullServer(netns=e.hostns, tls=tls)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def serve(srv, files, prefix="", **routes):
    """Registers files[name] at <prefix>/<name> for kernel, rootfs and initrd; routes:
    per-artifact PullServer.add() settings, e.g. rootfs=dict(rate=MiB)."""
    for a in ARTIFACTS:
        srv.add(f"{prefix}/{a}", files[a], **routes.get(a, {}))


def remote(srv, path, file, size=True, sha=None):
    return S.RemoteArtifact(url=srv.url(path), sha256=sha or sha256_file(file),
                            size_bytes=os.path.getsize(file) if size else 0)


def request(srv, tid, files, prefix="", initrd=True, sizes=True, **kw):
    """A PullTemplateRequest for what serve(srv, files, prefix) serves."""
    arts = {a: remote(srv, f"{prefix}/{a}", files[a], size=sizes)
            for a in ARTIFACTS if a != "initrd" or initrd}
    return S.PullTemplateRequest(template_id=tid, **arts, **kw)


class Pull:
    """One PullTemplate call, read by a thread of its own: .msgs is [(monotonic time,
    PullTemplateProgress)], .code and .details are set once the stream ended."""

    def __init__(self, n, req, timeout=60):
        self.req = req
        self.call = n.PullTemplate(req, timeout=timeout * SLOW)
        self.msgs, self.code, self.details = [], None, None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for m in self.call:
                self.msgs.append((time.monotonic(), m))
            self.code, self.details = grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            self.code, self.details = e.code(), e.details()

    def wait(self, timeout=60):
        self.thread.join(timeout * SLOW)
        assert not self.thread.is_alive(), \
            f"PullTemplate {self.req.template_id} still running after {timeout}s: {self.phases()}"
        return self

    def phases(self):
        return "".join(PHASE.get(m.phase, "?") for _, m in self.msgs)

    def bytes_done(self, artifact="rootfs"):
        return max([getattr(m, artifact).bytes_done for _, m in self.msgs], default=0)

    def ok(self):
        """Waits for the end; asserts it ended OK with one DONE last; returns its template."""
        self.wait()
        assert self.code == grpc.StatusCode.OK, \
            f"PullTemplate {self.req.template_id} ended {self.code}: {self.details}"
        ph = self.phases()
        assert ph.count("F") == 1 and ph.endswith("F"), f"phases {ph}: one DONE, last"
        return self.msgs[-1][1].template

    def failed(self, code):
        self.wait()
        assert self.code == code, \
            f"PullTemplate {self.req.template_id} ended {self.code} ({self.details}), not {code}"
        assert "F" not in self.phases(), f"a failed pull sent DONE: {self.phases()}"
        return self.details


def get_template(n, tid):
    return n.GetTemplate(S.GetTemplateRequest(template_id=tid), timeout=10)


def template_state(n, tid):
    return S.TemplateState.Name(get_template(n, tid).state)[len("TEMPLATE_STATE_"):]


def listed_state(n, tid):
    ts = n.ListTemplates(S.ListTemplatesRequest(), timeout=10).templates
    return {t.id: S.TemplateState.Name(t.state)[len("TEMPLATE_STATE_"):] for t in ts}.get(tid)


def template_dir(e, tid):
    return os.path.join(e.state_dir, "templates", tid)


def pull_dir(e, tid):
    """Where a pull keeps its files until it is installed (and a FAILED pull its record)."""
    return os.path.join(e.state_dir, "templates", ".pull-" + tid)


def artifact_files(e, tid):
    """Files in the template's directories (its pull's and its own) other than records
    (*.json): none may be left by a failed pull, partial downloads included."""
    found = []
    for d in (template_dir(e, tid), pull_dir(e, tid)):
        if os.path.isdir(d):
            found += sorted(os.path.join(os.path.basename(d), f) for f in os.listdir(d)
                            if not f.endswith(".json"))
    return found


def no_trace(e, tid):
    """Neither the template's directory nor its pull's exists."""
    return not os.path.exists(template_dir(e, tid)) and not os.path.exists(pull_dir(e, tid))


def check_ready(e, t, req, files):
    """The READY template a pull of req gives: fields, and the files on disk."""
    tid = req.template_id
    assert t.id == tid and t.state == S.TEMPLATE_STATE_READY and t.state_reason == "", t
    assert t.boot_args == req.boot_args and dict(t.labels) == dict(req.labels)
    for a in ARTIFACTS:
        if not req.HasField(a):
            assert not t.HasField(a), f"{a} set in a template pulled without one"
            continue
        tf, ra = getattr(t, a), getattr(req, a)
        assert tf.sha256 == ra.sha256.lower(), f"{a} sha256 {tf.sha256}"
        assert tf.source == ra.url, f"{a} source {tf.source!r}, not the URL {ra.url!r}"
        assert tf.size_bytes == os.path.getsize(files[a]), f"{a} size {tf.size_bytes}"
        assert tf.path.startswith(template_dir(e, tid) + "/"), f"{a} path {tf.path}"
        assert os.path.getsize(tf.path) == tf.size_bytes, f"{a} file size on disk"
        assert sha256_file(tf.path) == tf.sha256, f"{a} file on disk differs from its sha256"


def check_progress(p, files, rate=True):
    """Phases DOWNLOADING+ VERIFYING+ INSTALLING+ DONE; per artifact, bytes_done never goes
    back and stays within bytes_total, which is size_bytes when given and else the
    Content-Length (0 before it is known); no initrd progress without an initrd. rate:
    DOWNLOADING messages at most one per 100 ms (k+1 consecutive ones span at least
    k * 100 ms, less 150 ms for the client's own delays in reading them) and each at least
    1 % of the total past the one before."""
    ph = p.phases()
    assert re.fullmatch("D+V+I+F", ph), f"phases {ph}, not DOWNLOADING+ VERIFYING+ " \
        "INSTALLING+ DONE"
    down = [(t, m) for t, m in p.msgs if m.phase == S.PULL_PHASE_DOWNLOADING]
    for a in ARTIFACTS:
        if not p.req.HasField(a):
            assert not any(m.HasField(a) for _, m in down), f"{a} progress without a {a}"
            continue
        size = os.path.getsize(files[a])
        given = getattr(p.req, a).size_bytes
        last = 0
        for _, m in down:
            ap = getattr(m, a)
            assert ap.bytes_done >= last, f"{a} bytes_done went back: {last} -> {ap.bytes_done}"
            last = ap.bytes_done
            if given:
                assert ap.bytes_total == given, f"{a} bytes_total {ap.bytes_total} != size_bytes"
            else:
                assert ap.bytes_total in (0, size), f"{a} bytes_total {ap.bytes_total}, " \
                    f"neither 0 nor the Content-Length {size}"
            assert ap.bytes_done <= size, f"{a} bytes_done {ap.bytes_done} > {size}"

    def done(m):
        return sum(getattr(m, a).bytes_done for a in ARTIFACTS)

    def total(m):
        return sum(getattr(m, a).bytes_total for a in ARTIFACTS)

    if not rate:
        return down
    times = [t for t, _ in down]
    for i in range(len(times)):
        for j in range(i + 1, len(times)):
            assert times[j] - times[i] >= (j - i) * 0.1 - 0.15, \
                f"{j - i + 1} DOWNLOADING messages within {1000 * (times[j] - times[i]):.0f} " \
                f"ms (at most one per 100 ms): {[round(t - times[0], 3) for t in times]}"
    for (t0, m0), (t1, m1) in zip(down, down[1:]):
        step = 0.01 * min(total(m0), total(m1))
        assert done(m1) - done(m0) >= step * 0.99, \
            f"DOWNLOADING messages {done(m1) - done(m0)} bytes apart, under 1 % of {total(m1)}"
    return down


def wait_bytes(p, n_bytes, artifact="rootfs", timeout=20):
    wait_for(lambda: p.bytes_done(artifact) >= n_bytes or p.code is not None, timeout,
             f"{n_bytes} bytes of the {artifact} downloaded")
    assert p.code is None, f"the pull ended early: {p.code} {p.details}"


def test_pull_then_boot(start_emberd, new_server, files, workdir):
    """Plain HTTP: kernel, a 256 MiB rootfs (the demo's, extended) and an initrd."""
    e = start_emberd(CONF)
    n = stub(e)
    rootfs = os.path.join(workdir, "rootfs.ext4")
    subprocess.run(["cp", "--sparse=always", get_template(n, "demo").rootfs.path, rootfs],
                   check=True)
    os.truncate(rootfs, 256 * MiB)
    files = dict(files, rootfs=rootfs)
    srv = new_server(e)
    # about a second for the rootfs: several progress messages
    serve(srv, files, rootfs=dict(rate=256 * MiB))
    req = request(srv, "pulled", files, boot_args="quiet", labels={"src": "http"})
    req.kernel.sha256 = req.kernel.sha256.upper()  # hex digits in either case
    req.initrd.size_bytes = 0  # unknown: the total is the Content-Length
    p = Pull(n, req)
    t = p.ok()
    check_progress(p, files)
    check_ready(e, t, req, files)
    assert t.rootfs.size_bytes == 256 * MiB
    used = os.stat(t.rootfs.path).st_blocks * 512
    assert used < 64 * MiB, f"the rootfs is not stored sparse: {used} bytes used"
    assert t.rootfs_disk_used_bytes == used
    assert [r.range for r in srv.requests_for("/rootfs")] == [None], "one plain GET"
    assert get_template(n, "pulled") == t and listed_state(n, "pulled") == "READY"

    sb = create(n, "frompull", template="pulled")
    assert sb.state == S.SANDBOX_STATE_RUNNING and sb.template_id == "pulled"
    destroy(n, "frompull")


def test_https_with_ca_file(start_emberd, new_server, files, workdir):
    e = start_emberd(CONF)
    srv = new_server(e, tls=True)
    serve(srv, files)
    # the system store does not know the test's CA
    req = request(srv, "tls", files)
    details = Pull(stub(e), req).failed(grpc.StatusCode.FAILED_PRECONDITION)
    assert "certificate" in details, details
    t = get_template(stub(e), "tls")
    assert t.state == S.TEMPLATE_STATE_FAILED and t.state_reason, t
    assert artifact_files(e, "tls") == []
    e.proc.stop()

    # ca_file: another CA does not make the server trusted...
    other = Pki(os.path.join(workdir, "pki2"), "other")
    e2 = start_emberd(CONF + f"ca_file = {other.ca_file}\n", hostns=e.hostns)
    details = Pull(stub(e2), request(srv, "tls", files)).failed(
        grpc.StatusCode.FAILED_PRECONDITION)
    assert "certificate" in details, details
    e2.proc.stop()

    # ...its own does, on the same server, by IP address and by name
    e3 = start_emberd(CONF + f"ca_file = {srv.ca_file}\n", hostns=e.hostns)
    n3 = stub(e3)
    req = request(srv, "tls", files)
    check_ready(e3, Pull(n3, req).ok(), req, files)
    req = request(srv, "tls-name", files)
    req.rootfs.url = srv.url("/rootfs", host="localhost")
    check_ready(e3, Pull(n3, req).ok(), req, files)


def test_callers_follow_one_pull(start_emberd, new_server, files):
    e = start_emberd(CONF)
    n = stub(e)
    srv = new_server(e)
    serve(srv, files, rootfs=dict(rate=2 * MiB))  # about 2 s
    req = request(srv, "shared", files, initrd=False)
    pulls = [Pull(n, req) for _ in range(3)]
    ts = [p.ok() for p in pulls]
    assert ts[0] == ts[1] == ts[2]
    check_ready(e, ts[0], req, files)
    for p in pulls:
        # a follower joins with a message of where the pull is: the rate is not checked
        check_progress(p, files, rate=False)
    for a in ("kernel", "rootfs"):
        gets = srv.requests_for(f"/{a}")
        assert len(gets) == 1, f"{len(gets)} GETs of the {a} for three callers of one pull"
    assert srv.requests_for("/initrd") == []


def test_pull_is_idempotent(start_emberd, new_server, files):
    e = start_emberd(CONF)
    n = stub(e)
    srv = new_server(e)
    serve(srv, files)
    srv.add("/mirror/rootfs", files["rootfs"])
    req = request(srv, "same", files, boot_args="quiet", labels={"a": "b"})
    t = Pull(n, req).ok()
    gets = len(srv.requests)

    # the same content again, from another URL too: one DONE at once, nothing downloaded
    again = S.PullTemplateRequest()
    again.CopyFrom(req)
    again.rootfs.url = srv.url("/mirror/rootfs")
    again.rootfs.sha256 = again.rootfs.sha256.upper()
    for r in (req, again):
        p = Pull(n, r)
        assert p.ok() == t
        assert p.phases() == "F", f"a READY template's pull sent {p.phases()}, not one DONE"
    assert len(srv.requests) == gets, "a READY template was downloaded again"

    # another spec for the id
    for field, value in (("sha", sha256_file(files["other"])), ("boot_args", "loud"),
                         ("labels", {"a": "c"}), ("initrd", None)):
        other = S.PullTemplateRequest()
        other.CopyFrom(req)
        if field == "sha":
            other.rootfs.sha256 = value
        elif field == "boot_args":
            other.boot_args = value
        elif field == "labels":
            other.labels.clear()
            other.labels.update(value)
        else:
            other.ClearField("initrd")
        Pull(n, other).failed(grpc.StatusCode.ALREADY_EXISTS)
    # the built-in demo (registered, not pulled) is an existing id like any other
    demo = request(srv, "demo", files)
    Pull(n, demo).failed(grpc.StatusCode.ALREADY_EXISTS)
    assert len(srv.requests) == gets, "an ALREADY_EXISTS pull downloaded something"
    assert get_template(n, "same") == t


def test_dropped_transfer_resumes_with_range(start_emberd, new_server, files):
    e = start_emberd(CONF)
    n = stub(e)
    srv = new_server(e)
    half = os.path.getsize(files["rootfs"]) // 2
    serve(srv, files, rootfs=dict(drop_after=half))
    req = request(srv, "resumed", files)
    p = Pull(n, req)
    check_ready(e, p.ok(), req, files)
    gets = srv.requests_for("/rootfs")
    assert len(gets) == 2 and gets[0].dropped, gets
    start = gets[1].range_start
    assert start is not None and 0 < start <= half and gets[1].status == 206, \
        f"the retry asked Range {gets[1].range!r} (answered {gets[1].status}), not bytes=N- " \
        f"with 0 < N <= {half}"


def test_server_without_ranges_restarts_from_zero(start_emberd, new_server, files):
    e = start_emberd(CONF)
    n = stub(e)
    srv = new_server(e)
    half = os.path.getsize(files["rootfs"]) // 2
    serve(srv, files, rootfs=dict(drop_after=half, ranges=False))
    req = request(srv, "restarted", files)
    check_ready(e, Pull(n, req).ok(), req, files)
    gets = srv.requests_for("/rootfs")
    assert len(gets) == 2 and gets[0].dropped, gets
    assert (gets[1].range_start or 0) > 0 and gets[1].status == 200, \
        f"second request: Range {gets[1].range!r}, answered {gets[1].status}"
    assert gets[1].sent == os.path.getsize(files["rootfs"])


def test_stalled_transfer_is_dropped_and_resumed(start_emberd, new_server, files):
    e = start_emberd("[network]\npool_size = 0\n[templates]\npull_retry_delay_ms = 50\n"
                     "pull_stall_timeout_s = 1\n")
    n = stub(e)
    srv = new_server(e)
    serve(srv, files, rootfs=dict(rate=2 * MiB))
    req = request(srv, "stalled", files)
    p = Pull(n, req)
    wait_bytes(p, 256 << 10)
    srv.pause()
    time.sleep(3)
    srv.resume()
    check_ready(e, p.ok(), req, files)
    gets = srv.requests_for("/rootfs")
    assert len(gets) >= 2, "the stalled transfer was not dropped"
    assert any((g.range_start or 0) > 0 for g in gets[1:]), \
        f"no retry resumed with a Range: {[g.range for g in gets]}"


def test_wrong_digest_or_size_is_data_loss(start_emberd, new_server, files):
    e = start_emberd(CONF)
    n = stub(e)
    srv = new_server(e)
    serve(srv, files)
    size = os.path.getsize(files["rootfs"])
    cases = {"bad-sha": dict(sha=sha256_file(files["other"])),
             "too-short": dict(size=size + 512),   # the body ends before size_bytes
             "too-long": dict(size=size - 512)}    # the body goes past size_bytes
    for tid, how in cases.items():
        req = request(srv, tid, files)
        if "sha" in how:
            req.rootfs.sha256 = how["sha"]
        else:
            req.rootfs.size_bytes = how["size"]
        Pull(n, req).failed(grpc.StatusCode.DATA_LOSS)
        t = get_template(n, tid)
        assert t.state == S.TEMPLATE_STATE_FAILED and t.state_reason, t
        assert listed_state(n, tid) == "FAILED"
        assert artifact_files(e, tid) == [], f"{tid}: a failed pull left files"
    c, msg = code_of(lambda: create(n, "fromfailed", template="bad-sha"))
    assert c == grpc.StatusCode.FAILED_PRECONDITION, (c, msg)

    # pulling the id again starts over
    req = request(srv, "bad-sha", files)
    check_ready(e, Pull(n, req).ok(), req, files)


def test_http_errors(start_emberd, new_server, files):
    e = start_emberd(CONF)
    n = stub(e)
    srv = new_server(e)
    serve(srv, files, initrd=dict(status=404))
    details = Pull(n, request(srv, "notfound", files)).failed(
        grpc.StatusCode.FAILED_PRECONDITION)
    assert "initrd" in details and "404" in details, details
    assert len(srv.requests_for("/initrd")) == 1, "a 404 was retried"
    assert template_state(n, "notfound") == "FAILED"
    assert artifact_files(e, "notfound") == []

    # 5xx: retried pull_retries (2) times, then UNAVAILABLE
    serve(srv, files, prefix="/down", rootfs=dict(status=500))
    details = Pull(n, request(srv, "down", files, prefix="/down")).failed(
        grpc.StatusCode.UNAVAILABLE)
    assert len(srv.requests_for("/down/rootfs")) == 3, \
        f"{len(srv.requests_for('/down/rootfs'))} GETs of a 500, not 1 + pull_retries (2)"
    t = get_template(n, "down")
    assert t.state == S.TEMPLATE_STATE_FAILED and t.state_reason, t
    assert artifact_files(e, "down") == []

    # a 500 once: the retry succeeds
    serve(srv, files, prefix="/flaky", rootfs=dict(status=500, status_times=1))
    req = request(srv, "flaky", files, prefix="/flaky")
    check_ready(e, Pull(n, req).ok(), req, files)
    assert [g.status for g in srv.requests_for("/flaky/rootfs")] == [500, 200]

    # nothing listens: UNAVAILABLE after the retries
    port = free_port(e)
    req = request(srv, "refused", files, prefix="/flaky")
    req.rootfs.url = f"http://127.0.0.1:{port}/rootfs"
    Pull(n, req).failed(grpc.StatusCode.UNAVAILABLE)
    assert template_state(n, "refused") == "FAILED"
    assert artifact_files(e, "refused") == []


def free_port(e):
    """A TCP port on 127.0.0.1 in emberd's namespace where nothing listens."""
    with PullServer(netns=e.hostns) as s:
        return s.port


def test_redirects(start_emberd, new_server, files):
    e = start_emberd(CONF)
    n = stub(e)
    srv = new_server(e)
    serve(srv, files)
    # http(s) redirects are followed
    srv.add("/moved/rootfs", redirect=srv.url("/rootfs"))
    req = request(srv, "moved", files)
    req.rootfs.url = srv.url("/moved/rootfs")
    check_ready(e, Pull(n, req).ok(), req, files)
    # another scheme is refused
    srv.add("/evil/rootfs", redirect="file:///etc/passwd")
    req.template_id = "evil"
    req.rootfs.url = srv.url("/evil/rootfs")
    details = Pull(n, req).failed(grpc.StatusCode.FAILED_PRECONDITION)
    assert "redirect" in details, details
    assert template_state(n, "evil") == "FAILED"
    assert artifact_files(e, "evil") == []


def test_https_never_redirects_to_http(start_emberd, new_server, files):
    """A download that started on https does not go on in plaintext."""
    e = start_emberd(CONF)
    n = stub(e)
    plain, tls = new_server(e), new_server(e, tls=True)
    serve(plain, files)
    serve(tls, files)
    tls.add("/down/rootfs", redirect=plain.url("/rootfs"))
    e.proc.stop()
    e = start_emberd(CONF + f"ca_file = {tls.ca_file}\n", hostns=e.hostns)
    n = stub(e)
    req = request(tls, "downgrade", files)
    req.rootfs.url = tls.url("/down/rootfs")
    details = Pull(n, req).failed(grpc.StatusCode.FAILED_PRECONDITION)
    assert "redirect" in details, details
    assert plain.requests_for("/rootfs") == [], "the https download went on over http"


def test_proxy_from_the_environment(start_emberd, new_server, files):
    """http_proxy in emberd's environment is used: the proxy (pullserver, which answers the
    absolute-form requests a proxy gets) serves a host that does not even resolve."""
    e = start_emberd(CONF)
    proxy = new_server(e)
    for a in ARTIFACTS:
        proxy.add(f"http://artifacts.invalid/{a}", files[a])
    e.proc.stop()
    e = start_emberd(CONF, hostns=e.hostns,
                     env=dict(os.environ, http_proxy=f"http://127.0.0.1:{proxy.port}",
                              no_proxy=""))
    n = stub(e)
    arts = {a: S.RemoteArtifact(url=f"http://artifacts.invalid/{a}", sha256=sha256_file(files[a]))
            for a in ARTIFACTS}
    req = S.PullTemplateRequest(template_id="proxied", **arts)
    check_ready(e, Pull(n, req).ok(), req, files)
    assert [r.path for r in proxy.requests_for("http://artifacts.invalid/rootfs")] == \
        ["http://artifacts.invalid/rootfs"]


@pytest.fixture
def small_disk(workdir):
    """An emberd root whose state directory is an 8 MiB tmpfs (detached lazily at the end,
    when emberd may still hold it)."""
    root = os.path.join(workdir, "small")
    state = os.path.join(root, "state")
    os.makedirs(state)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "ember-test", state],
                   check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", state], check=False)


def test_disk_full_is_resource_exhausted(start_emberd, new_server, files, workdir, small_disk):
    e = start_emberd(CONF + "demo = false\n", root=small_disk)
    n = stub(e)
    srv = new_server(e)
    big = random_file(os.path.join(workdir, "big"), 16 * MiB)
    files = dict(files, rootfs=big)
    # the size is known (size_bytes): refused before the bytes come
    serve(srv, files)
    details = Pull(n, request(srv, "known", files)).failed(
        grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "disk" in details, details
    assert template_state(n, "known") == "FAILED" and artifact_files(e, "known") == []
    # unknown (no size_bytes, no Content-Length): the write that fills the disk fails it
    serve(srv, files, prefix="/nolength", rootfs=dict(content_length=False))
    details = Pull(n, request(srv, "unknown", files, prefix="/nolength", sizes=False)).failed(
        grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "disk" in details, details
    assert template_state(n, "unknown") == "FAILED" and artifact_files(e, "unknown") == []
    st = os.statvfs(e.state_dir)
    assert st.f_bavail * st.f_frsize > 4 * MiB, "the failed pulls' files were not removed"


def test_delete_aborts_the_pull(start_emberd, new_server, files):
    e = start_emberd(CONF)
    n = stub(e)
    srv = new_server(e)
    serve(srv, files, rootfs=dict(rate=MiB))  # about 4 s
    req = request(srv, "doomed", files)
    pulls = [Pull(n, req), Pull(n, req)]
    wait_bytes(pulls[0], 256 << 10)
    n.DeleteTemplate(S.DeleteTemplateRequest(template_id="doomed"), timeout=10)
    for p in pulls:
        p.failed(grpc.StatusCode.ABORTED)
    c, _ = code_of(lambda: get_template(n, "doomed"))
    assert c == grpc.StatusCode.NOT_FOUND
    assert listed_state(n, "doomed") is None
    wait_for(lambda: no_trace(e, "doomed"), 10,
             "the deleted template's directory to go")
    # the transfer stopped: emberd closed the connection
    wait_for(lambda: all(r.finished for r in srv.requests_for("/rootfs")), 2,
             "the aborted transfer's connection to close")
    assert srv.sent_bytes("/rootfs") < os.path.getsize(files["rootfs"])


def test_client_going_away_does_not_stop_the_pull(start_emberd, new_server, files):
    e = start_emberd(CONF)
    n = stub(e)
    srv = new_server(e)
    serve(srv, files, rootfs=dict(rate=2 * MiB))  # about 2 s
    req = request(srv, "orphan", files)
    p = Pull(n, req)
    wait_bytes(p, 256 << 10)
    t = get_template(n, "orphan")
    assert t.state == S.TEMPLATE_STATE_PULLING and t.state_reason == "", t
    assert not t.HasField("rootfs"), "a PULLING template has its rootfs set"
    assert listed_state(n, "orphan") == "PULLING"
    c, msg = code_of(lambda: create(n, "early", template="orphan"))
    assert c == grpc.StatusCode.FAILED_PRECONDITION, (c, msg)
    p.call.cancel()
    p.wait()
    assert p.code == grpc.StatusCode.CANCELLED
    wait_for(lambda: template_state(n, "orphan") != "PULLING", 20, "the pull to finish")
    check_ready(e, get_template(n, "orphan"), req, files)
    assert len(srv.requests_for("/rootfs")) == 1


def test_pull_resumes_after_a_crash(start_emberd, new_server, files, workdir):
    root = os.path.join(workdir, "node")
    e = start_emberd(CONF, root=root)
    n = stub(e)
    srv = new_server(e)
    files = dict(files, rootfs=random_file(os.path.join(workdir, "big"), 8 * MiB))
    serve(srv, files, rootfs=dict(rate=3 * MiB))  # about 3 s
    req = request(srv, "survivor", files)
    p = Pull(n, req)
    wait_bytes(p, 2 * MiB)
    e.proc.signal(signal.SIGKILL)
    assert e.proc.wait(10) is not None
    p.wait()
    before = len(srv.requests_for("/rootfs"))

    e2 = start_emberd(CONF, root=root, hostns=e.hostns)
    n2 = stub(e2)
    assert template_state(n2, "survivor") == "PULLING"
    wait_for(lambda: template_state(n2, "survivor") != "PULLING", 30,
             "the pull to finish by itself after the restart")
    check_ready(e2, get_template(n2, "survivor"), req, files)
    later = srv.requests_for("/rootfs")[before:]
    assert later and (later[0].range_start or 0) > 0 and later[0].status == 206, \
        f"after the restart the rootfs was asked with Range {[g.range for g in later]}, " \
        "not from where the killed pull stopped"
    p2 = Pull(n2, req)
    check_ready(e2, p2.ok(), req, files)
    assert p2.phases() == "F"


def test_invalid_arguments(start_emberd, new_server, files):
    e = start_emberd(CONF + f"max_artifact_bytes = {2 * MiB}\n")
    n = stub(e)
    srv = new_server(e)
    serve(srv, files, rootfs=dict(content_length=False))
    good = request(srv, "x", files)
    good.rootfs.size_bytes = 0
    good.rootfs.url = srv.url("/kernel")  # small enough; only its fields matter here

    def variant(tid="bad", **change):
        r = S.PullTemplateRequest()
        r.CopyFrom(good)
        r.template_id = tid
        for k, v in change.items():
            art, field = k.split("_", 1)
            if field == "clear":
                r.ClearField(art)
            else:
                setattr(getattr(r, art), field, v)
        return r

    cases = {
        "ftp url": variant(rootfs_url="ftp://127.0.0.1/rootfs"),
        "file url": variant(kernel_url="file:///etc/passwd"),
        "empty url": variant(initrd_url=""),
        "short sha256": variant(rootfs_sha256="ab" * 31),
        "non-hex sha256": variant(kernel_sha256="g" * 64),
        "no sha256": variant(initrd_sha256=""),
        "no rootfs": variant(rootfs_clear=True),
        "no kernel": variant(kernel_clear=True),
        "bad id": variant(tid="Bad_Id"),
        "empty id": variant(tid=""),
        "size over max_artifact_bytes": variant(rootfs_size_bytes=2 * MiB + 1),
    }
    for what, r in cases.items():
        p = Pull(n, r).wait()
        assert p.code == grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {p.code} {p.details}"
        assert p.msgs == [], f"{what}: progress sent"
        if r.template_id == "bad":
            assert code_of(lambda: get_template(n, "bad"))[0] == grpc.StatusCode.NOT_FOUND, \
                f"{what} left a template"
    assert srv.requests == [], "an invalid request downloaded something"
    assert no_trace(e, "bad")

    # no size given, no Content-Length: the download stops once past the limit
    req = request(srv, "huge", files)
    req.rootfs.size_bytes = 0
    Pull(n, req).failed(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert template_state(n, "huge") == "FAILED"
    assert artifact_files(e, "huge") == []


def test_max_parallel_pulls(start_emberd, new_server, files):
    e = start_emberd(CONF + "max_parallel_pulls = 1\n")
    n = stub(e)
    srv = new_server(e)
    serve(srv, files, prefix="/a", rootfs=dict(rate=2 * MiB))  # about 2 s
    serve(srv, files, prefix="/b")
    a = Pull(n, request(srv, "first", files, prefix="/a"))
    wait_bytes(a, 256 << 10)
    b = Pull(n, request(srv, "second", files, prefix="/b"))
    wait_for(lambda: b.msgs or b.code is not None, 10, "the waiting pull's first message")
    assert a.code is None and a.bytes_done() < os.path.getsize(files["rootfs"])
    m = b.msgs[0][1]
    assert m.phase == S.PULL_PHASE_DOWNLOADING and \
        all(getattr(m, x).bytes_done == 0 for x in ARTIFACTS), m
    assert not [r for r in srv.requests if r.path.startswith("/b/")], \
        "a second pull downloaded while max_parallel_pulls = 1 was taken"
    assert template_state(n, "second") == "PULLING"
    a.ok()
    b.ok()
    first_b = min(r.t for r in srv.requests if r.path.startswith("/b/"))
    last_a = max(r.t for r in srv.requests if r.path.startswith("/a/"))
    assert first_b > last_a, "the second pull started before the first finished"


def test_pulls_in_progress_are_shown(start_emberd, new_server, files, workdir):
    """systemd's status line (sd_notify STATUS=) and /metrics show a pull while it runs, and
    stop showing it once it is done."""
    from test_http import Http
    sock_path = os.path.join(workdir, "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(sock_path)
    notify.settimeout(0.2)
    statuses = []

    def status_seen(pred):
        while True:
            try:
                m = notify.recv(4096).decode()
            except socket.timeout:
                break
            statuses.extend(line[len("STATUS="):] for line in m.splitlines()
                            if line.startswith("STATUS="))
        return any(pred(s) for s in statuses)

    try:
        e = start_emberd(CONF, env=dict(os.environ, NOTIFY_SOCKET=sock_path))
        n = stub(e)
        srv = new_server(e)
        serve(srv, files, rootfs=dict(rate=MiB))  # about 4 s
        req = request(srv, "shown", files)
        p = Pull(n, req)
        wait_bytes(p, 512 << 10)
        wait_for(lambda: status_seen(lambda s: re.search(r"; pulling shown \d+%", s)), 10,
                 "a status line naming the pull")
        http = Http(e.tcp_port(7071), open(os.path.join(e.run_dir, "http-token")).read())
        status, _, body = http.request("GET", "/metrics")
        assert status == 200
        text = body.decode()
        m = re.search(r'^ember_template_pull_artifact_bytes\{template="shown",'
                      r'artifact="rootfs",kind="done"\} (\d+)$', text, re.M)
        assert m and int(m.group(1)) > 0, text
        assert re.search(r'^ember_template_pull_artifact_bytes\{template="shown",'
                         rf'artifact="rootfs",kind="total"\}} {4 * MiB}$', text, re.M), text
        assert re.search(r"^ember_template_pulls 1$", text, re.M), text
        p.ok()
        statuses.clear()
        wait_for(lambda: status_seen(lambda s: "pulling" not in s), 10,
                 "a status line without the finished pull")
        status, _, body = http.request("GET", "/metrics")
        text = body.decode()
        assert re.search(r"^ember_template_pulls 0$", text, re.M), text
        assert 'template="shown"' not in text, text
        assert re.search(r'^ember_template_pulls_finished_total\{outcome="ok"\} 1$', text,
                         re.M), text
    finally:
        notify.close()


def test_redirect_chain_never_goes_back_to_http(start_emberd, new_server, files):
    """http -> https -> http: the second hop leaves https, and is refused."""
    e = start_emberd(CONF)
    plain, tls = new_server(e), new_server(e, tls=True)
    serve(plain, files)
    plain.add("/hop1/rootfs", redirect=tls.url("/hop2/rootfs"))
    tls.add("/hop2/rootfs", redirect=plain.url("/rootfs"))
    e.proc.stop()
    e = start_emberd(CONF + f"ca_file = {tls.ca_file}\n", hostns=e.hostns)
    req = request(plain, "chain", files)
    req.rootfs.url = plain.url("/hop1/rootfs")
    details = Pull(stub(e), req).failed(grpc.StatusCode.FAILED_PRECONDITION)
    assert "redirect from https" in details, details
    assert [r.path for r in tls.requests_for("/hop2/rootfs")] == ["/hop2/rootfs"]
    assert plain.requests_for("/rootfs") == [], "the download went back to http"


def test_rootfs_must_be_a_disk_image(start_emberd, new_server, files, workdir):
    """The rootfs is a disk: a size that is not a multiple of 512 is refused, whether the
    request says it or the download shows it."""
    e = start_emberd(CONF)
    n = stub(e)
    srv = new_server(e)
    odd = random_file(os.path.join(workdir, "odd"), 4 * MiB + 100)
    files = dict(files, rootfs=odd)
    serve(srv, files)
    req = request(srv, "odd", files)
    c, msg = code_of(lambda: list(n.PullTemplate(req, timeout=30)))
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "512" in msg, (c, msg)
    assert srv.requests_for("/rootfs") == []
    req = request(srv, "odd", files, sizes=False)
    details = Pull(n, req).failed(grpc.StatusCode.INVALID_ARGUMENT)
    assert "512" in details, details
    assert template_state(n, "odd") == "FAILED" and artifact_files(e, "odd") == []


@pytest.mark.parametrize("point", ["template-record", "installed", "failed-record"])
def test_crash_while_installing_or_failing(start_emberd, new_server, files, workdir, point):
    """emberd killed (a crash point of test/emberd-hooks) after the template record is
    written, after the directory is renamed into place, or after a failure is recorded: the
    next start has the template READY with the right files, or FAILED without files."""
    from conftest import BUILD
    root = os.path.join(workdir, "node")
    conf = CONF + (f"[vmm]\nkind = fcsim\nfcsim_bin = {BUILD}/fcsim\n"
                   f"uffd_bin = {BUILD}/ember-uffd\n")
    e = start_emberd(conf, root=root)
    srv = new_server(e)
    serve(srv, files)
    e.proc.stop()
    env = dict(os.environ, EMBER_TEST_KILL_AFTER=f"pull:{point}")
    h = start_emberd(conf, root=root, hostns=e.hostns, binary="test/emberd-hooks", env=env)
    req = request(srv, "crashed", files, sizes=point != "template-record")
    if point == "failed-record":
        req.rootfs.sha256 = sha256_file(files["other"])
    Pull(stub(h), req).wait()
    wait_for(lambda: not h.proc.alive(), 30, "emberd-hooks to die at its crash point")
    assert f"crash point pull:{point} reached" in h.proc.log()

    before = len(srv.requests_for("/rootfs"))
    e2 = start_emberd(conf, root=root, hostns=e.hostns)
    n2 = stub(e2)
    if point == "failed-record":
        t = get_template(n2, "crashed")
        assert t.state == S.TEMPLATE_STATE_FAILED and t.state_reason, t
        assert artifact_files(e2, "crashed") == [], "a failed pull's files survived the crash"
        return
    wait_for(lambda: template_state(n2, "crashed") == "READY", 30, "the template to be READY")
    check_ready(e2, get_template(n2, "crashed"), req, files)
    assert not os.path.exists(pull_dir(e2, "crashed"))
    later = srv.requests_for("/rootfs")[before:]
    if point == "template-record":
        # all bytes were there: asked from the end (416 for an unknown size), not again
        assert [(r.range_start, r.status) for r in later] == \
            [(os.path.getsize(files["rootfs"]), 416)], later
    else:
        assert later == [], later
    assert sorted(os.listdir(template_dir(e2, "crashed"))) == \
        ["initrd", "kernel", "rootfs.ext4", "template.json"]
