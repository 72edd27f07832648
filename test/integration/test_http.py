# The HTTP listener (agent/http.c): the token and the cookie, refused cross-site requests, the
# JSON API over the very gRPC handlers (status codes mapped to HTTP ones), streams as
# Server-Sent Events and NDJSON, cancellation when the HTTP client goes away, and /metrics.
#
# The generic parts run against rpctestd (the gRPC layer with a test service whose handlers
# fail with any code, stream, echo and report what they saw) serving HTTP on loopback; the
# Node API parts against emberd on fcsim, in its own network namespace (reached through a
# relay).

import base64
import http.client
import json
import os
import socket
import stat
import threading
import time

import grpc
from google.protobuf import json_format

from conftest import SLOW, wait_for
from test_sandbox import FAST, S, create, destroy, stub

import rpctest_pb2 as tpb
import rpctest_pb2_grpc as tpbg

# Google's API design guide (https://cloud.google.com/apis/design/errors), gRPC code → HTTP.
HTTP_FOR = {
    1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409,
    11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401,
}
CODE_NAMES = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
              "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
              "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
              "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"]


class Http:
    """A small client of one listener: bearer token by default."""

    def __init__(self, port, token):
        self.port, self.token = port, token

    def request(self, method, path, body=None, headers=None, auth=True, timeout=60):
        h = {} if headers is None else dict(headers)
        if auth:
            h["Authorization"] = f"Bearer {self.token}"
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            h.setdefault("Content-Type", "application/json")
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout * SLOW)
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, dict(r.getheaders()), data

    def call(self, method, body=None, **kw):
        status, headers, data = self.request("POST", f"/v1/{method}", body or {}, **kw)
        return status, json.loads(data) if data else None


def start_http_rpctestd(start_rpctestd, workdir, *args):
    d = start_rpctestd("--http", "127.0.0.1:0", "--http-dir", workdir, *args)
    line = d.p.stdout.readline().decode()
    assert line.startswith("HTTP "), line
    with open(os.path.join(workdir, "http-token")) as f:
        token = f.read()
    return d, Http(int(line.split()[1]), token)


def sse_events(data):
    """(event, data) pairs of a Server-Sent Events body; comments skipped."""
    out = []
    for block in data.decode().split("\n\n"):
        ev, lines = "message", []
        for line in block.split("\n"):
            if line.startswith(":") or not line:
                continue
            k, _, v = line.partition(": ")
            if k == "event":
                ev = v
            elif k == "data":
                lines.append(v)
        if lines:
            out.append((ev, json.loads("\n".join(lines))))
    return out


def test_error_codes_map_to_http_statuses(start_rpctestd, workdir):
    d, h = start_http_rpctestd(start_rpctestd, workdir)
    for code in range(1, 17):
        status, body = h.call("Fail", {"code": code, "message": f"failed with {code}"})
        assert status == HTTP_FOR[code], (code, status, body)
        assert body == {"code": code, "status": CODE_NAMES[code],
                        "message": f"failed with {code}"}
    status, body = h.call("Echo", {"text": "hi"})
    assert status == 200 and body["text"] == "hi" and body["method"] == "/rpctest.Test/Echo"
    # No deadline travels from HTTP: the handler sees none (-1, a 64-bit integer: a string).
    assert body["remainingMs"] == "-1"
    # The method without a handler, and one that does not exist.
    assert h.call("Missing", {})[0] == 501
    status, body = h.call("Nope", {})
    assert status == 501 and body["status"] == "UNIMPLEMENTED" and "Nope" in body["message"]


def test_bad_requests(start_rpctestd, workdir):
    d, h = start_http_rpctestd(start_rpctestd, workdir)
    status, _, data = h.request("POST", "/v1/Echo", "{not json",
                                headers={"Content-Type": "application/json"})
    assert status == 400 and json.loads(data)["status"] == "INVALID_ARGUMENT"
    status, body = h.call("Echo", {"text": "a", "nosuch": 1})
    assert status == 400 and "nosuch" in body["message"], body
    status, body = h.call("Echo", {"text": 5})
    assert status == 400 and "text" in body["message"], body
    # A unary method takes exactly one message; an empty body is the empty message.
    status, _, data = h.request("POST", "/v1/Echo", '{"text":"a"}\n{"text":"b"}',
                                headers={"Content-Type": "application/json"})
    assert status == 400 and "one request message" in json.loads(data)["message"]
    status, _, data = h.request("POST", "/v1/Echo", "")
    assert status == 200 and json.loads(data)["method"] == "/rpctest.Test/Echo"
    # Proto field names are accepted beside the JSON ones.
    assert h.call("Fail", {"code": 5, "message": "x"})[0] == 404
    # GET reads only: methods that change something (or might) refuse it.
    assert h.request("GET", "/v1/Fail?code=5")[0] == 405
    assert h.request("PUT", "/v1/Echo")[0] == 405
    assert h.request("GET", "/nowhere")[0] == 404


def test_token_and_cookie(start_rpctestd, workdir):
    d, h = start_http_rpctestd(start_rpctestd, workdir)
    st = os.stat(os.path.join(workdir, "http-token"))
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert len(h.token) >= 32

    for method, path in [("GET", "/test"), ("POST", "/v1/Echo"), ("GET", "/metrics"),
                         ("POST", "/v1/Stream"), ("GET", "/")]:
        status, _, data = h.request(method, path, {} if method == "POST" else None,
                                    auth=False)
        assert status == 401, (method, path, status)
        assert b"token" in data
    assert h.request("POST", "/v1/Echo", {}, auth=False,
                     headers={"Authorization": "Bearer " + "0" * 48})[0] == 401
    assert h.request("GET", "/test?token=wrong", auth=False)[0] == 401

    status, headers, _ = h.request("GET", "/v1/Echo", auth=False)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")

    # The page's way in: the token in the address once, then a cookie, which holds a
    # secret of its own (browsers send cookies to every port of the host).
    status, headers, _ = h.request("GET", f"/test?token={h.token}", auth=False)
    assert status == 303 and headers["Location"] == "/test"
    cookie = headers["Set-Cookie"]
    name, _, rest = cookie.partition("=")
    value = rest.split(";")[0]
    assert name == f"ember_session_{h.port}" and len(value) >= 32 and h.token not in cookie
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    jar = {"Cookie": f"{name}={value}"}
    status, headers, page = h.request("GET", "/test", auth=False, headers=jar)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert b"<html" in page.lower()
    # The cookie opens the listener, not the gRPC token's door: not as a bearer token, and
    # the token is no cookie.
    assert h.request("GET", "/v1/Echo", auth=False,
                     headers={"Authorization": f"Bearer {value}"})[0] == 401
    assert h.request("GET", "/test", auth=False,
                     headers={"Cookie": f"{name}={h.token}"})[0] == 401
    # A page of another origin that makes the browser GET with the cookie: refused too.
    assert h.request("GET", "/v1/Echo", auth=False,
                     headers={**jar, "Sec-Fetch-Site": "same-site"})[0] == 403
    assert h.request("GET", "/v1/Echo", auth=False,
                     headers={**jar, "Sec-Fetch-Site": "same-origin"})[0] == 200

    # With the cookie, a POST must come from the page: same origin, JSON.
    host = f"127.0.0.1:{h.port}"
    ok = {**jar, "Origin": f"http://{host}", "Content-Type": "application/json"}
    assert h.request("POST", "/v1/Echo", {"text": "x"}, auth=False, headers=ok)[0] == 200
    for bad in [{**jar, "Content-Type": "application/json"},  # no Origin
                {**ok, "Origin": "http://127.0.0.1:1"},  # another origin (same site)
                {**ok, "Origin": "http://evil.example"},
                {**ok, "Content-Type": "application/x-www-form-urlencoded"},
                {**ok, "Sec-Fetch-Site": "same-site"}]:
        status, _, data = h.request("POST", "/v1/Fail", '{"code":5}', auth=False, headers=bad)
        assert status == 403, (bad, status, data)
    # A cross-site form: what a browser sends for <form method=post> from another origin.
    status, _, _ = h.request("POST", "/v1/Echo", "text=x", auth=False,
                             headers={**jar, "Origin": "http://127.0.0.1:8000",
                                      "Content-Type": "application/x-www-form-urlencoded",
                                      "Sec-Fetch-Site": "same-site"})
    assert status == 403
    # A bearer client (curl) needs neither.
    assert h.request("POST", "/v1/Echo", "{}")[0] == 200

    # A body too large is refused before it is read, and an unauthorized one is not read.
    c = http.client.HTTPConnection("127.0.0.1", h.port, timeout=30)
    c.putrequest("POST", "/v1/Echo")
    c.putheader("Authorization", f"Bearer {h.token}")
    c.putheader("Content-Length", str(64 << 20))
    c.endheaders()
    r = c.getresponse()
    assert r.status == 413
    c.close()


def test_server_stream_as_sse_and_ndjson(start_rpctestd, workdir):
    d, h = start_http_rpctestd(start_rpctestd, workdir)
    status, headers, data = h.request("POST", "/v1/Stream", {"count": 3, "size": 5})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    ev = sse_events(data)
    assert [e for e, _ in ev] == ["message"] * 3 + ["status"]
    assert [m.get("seq", 0) for _, m in ev[:3]] == [0, 1, 2]
    assert [base64.b64decode(m["data"]) for _, m in ev[:3]] == [
        bytes((i * 31 + j) & 255 for j in range(5)) for i in range(3)]
    assert ev[3][1] == {"code": 0, "status": "OK", "message": ""}

    status, headers, data = h.request("POST", "/v1/Stream", {"count": 2, "size": 1},
                                      headers={"Accept": "application/x-ndjson"})
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(l) for l in data.decode().splitlines() if l]
    assert len(lines) == 3 and "result" in lines[0] and lines[2] == {
        "status": {"code": 0, "status": "OK", "message": ""}}

    # A stream that ends at once is a stream with only its status.
    status, _, data = h.request("POST", "/v1/Stream", {"count": 0, "size": 0})
    assert status == 200 and sse_events(data) == [("status", {"code": 0, "status": "OK",
                                                              "message": ""})]


def test_bidi_stream_as_ndjson(start_rpctestd, workdir):
    d, h = start_http_rpctestd(start_rpctestd, workdir)
    body = "\n".join(json.dumps({"seq": i, "data": base64.b64encode(bytes([i]) * 3).decode()})
                     for i in range(1, 6))
    status, headers, data = h.request("POST", "/v1/Bidi", body,
                                      headers={"Content-Type": "application/json"})
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(l) for l in data.decode().splitlines() if l]
    assert [l["result"]["seq"] for l in lines[:-1]] == [1, 2, 3, 4, 5]
    assert base64.b64decode(lines[2]["result"]["data"]) == b"\3\3\3"
    assert lines[-1]["status"]["code"] == 0
    # A message that does not convert refuses the whole call before any message is sent.
    status, _, data = h.request("POST", "/v1/Bidi", '{"seq": 1}\n{"seq": "x"}',
                                headers={"Content-Type": "application/json"})
    body = json.loads(data)
    assert status == 400 and body["message"].startswith("request message 2: seq"), body
    # A big stream both ways: the gateway reads answers while it still sends (no deadlock).
    big = base64.b64encode(b"x" * (256 << 10)).decode()
    body = "\n".join(json.dumps({"seq": i, "data": big}) for i in range(40))
    status, _, data = h.request("POST", "/v1/Bidi", body,
                                headers={"Content-Type": "application/json"}, timeout=120)
    lines = [json.loads(l) for l in data.decode().splitlines() if l]
    assert status == 200 and len(lines) == 41 and lines[-1]["status"]["code"] == 0


def stats(d):
    with grpc.insecure_channel(d.target) as ch:
        return tpbg.TestStub(ch).Stats(tpb.StatsRequest(), timeout=10)


def test_http_client_going_away_cancels_the_call(start_rpctestd, workdir):
    d, h = start_http_rpctestd(start_rpctestd, workdir)
    # A unary call that waits: the handler sees the cancellation once the client closes.
    s = socket.create_connection(("127.0.0.1", h.port))
    body = b'{"ms": "60000"}'
    s.sendall(b"POST /v1/Sleep HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
              h.token.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: " +
              str(len(body)).encode() + b"\r\n\r\n" + body)
    time.sleep(0.5)
    s.close()
    wait_for(lambda: stats(d).cancellations_seen >= 1, 10 * SLOW, "Sleep to be cancelled")
    assert stats(d).sleeps_finished == 0

    # A stream nobody reads any more ends too (its handler's send fails).
    before = stats(d).cancellations_seen
    s = socket.create_connection(("127.0.0.1", h.port))
    body = b'{"count": 100000000, "size": 65536}'
    s.sendall(b"POST /v1/Stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
              h.token.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
              b"\r\n\r\n" + body)
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.close()
    wait_for(lambda: stats(d).cancellations_seen > before, 20 * SLOW, "Stream to be cancelled")


def test_rpc_metrics(start_rpctestd, workdir):
    from prometheus_client.parser import text_string_to_metric_families
    d, h = start_http_rpctestd(start_rpctestd, workdir)
    for _ in range(3):
        h.call("Fail", {"code": 5})
    h.call("Echo", {})
    with grpc.insecure_channel(d.target) as ch:
        tpbg.TestStub(ch).Echo(tpb.EchoRequest(text="x"), timeout=10)
    status, headers, data = h.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    fams = {f.name: f for f in text_string_to_metric_families(data.decode())}

    def value(fam, suffix="", **labels):
        return sum(s.value for s in fams[fam].samples
                   if s.name == fam + suffix and all(s.labels.get(k) == v
                                                     for k, v in labels.items()))
    assert value("grpc_server_handled", "_total", grpc_method="Fail",
                 grpc_code="NOT_FOUND") == 3
    assert value("grpc_server_handled", "_total", grpc_method="Echo", grpc_code="OK") == 2
    assert value("grpc_server_handling_seconds", "_count", grpc_method="Fail",
                 grpc_code="NOT_FOUND") == 3
    assert value("grpc_server_handling_seconds", "_bucket", grpc_method="Echo",
                 grpc_code="OK", le="+Inf") == 2
    assert value("ember_http_requests", "_total", outcome="authorized") >= 5


# ---------------------------------------------------------------------------------------
# emberd


def emberd_http(e):
    with open(os.path.join(e.run_dir, "http-token")) as f:
        return Http(e.tcp_port(7071), f.read())


def msg_json(m):
    return json.loads(json_format.MessageToJson(m))


def test_emberd_listener_settings(start_emberd, workdir):
    e = start_emberd()
    st = os.stat(os.path.join(e.run_dir, "http-token"))
    assert stat.S_IMODE(st.st_mode) == 0o600
    h = emberd_http(e)
    assert f"http://127.0.0.1:7071/test?token={h.token}" in e.proc.log()
    status, body = h.call("GetNode")
    assert status == 200 and body["nodeId"] and body["agentVersion"]
    e.proc.signal(15)
    e.proc.wait(30)

    # A token of the operator's own.
    tf = os.path.join(workdir, "token")
    with open(tf, "w") as f:
        f.write("my-own-token-1234567890\n")
    e = start_emberd(f"[http]\ntoken_file = {tf}\n")
    h = Http(e.tcp_port(7071), "my-own-token-1234567890")
    assert h.call("GetNode")[0] == 200
    e.proc.signal(15)
    e.proc.wait(30)

    # A non-loopback address is refused unless allowed; so is a short token.
    e = start_emberd("[http]\nlisten = 0.0.0.0:7071\n", wait=False)
    assert e.proc.wait(30) == 78
    assert "not a loopback address" in e.proc.log() and "allow_remote" in e.proc.log()
    for bad in ["short", "with spaces in the middle of it", 'quote"inside-a-long-token']:
        with open(tf, "w") as f:
            f.write(bad)
        e = start_emberd(f"[http]\ntoken_file = {tf}\n", wait=False)
        assert e.proc.wait(30) != 0 and "at least 16" in e.proc.log()
    e = start_emberd("[http]\nlisten = 0.0.0.0:7071\nallow_remote = true\n")
    assert Http(e.tcp_port(7071), open(os.path.join(e.run_dir, "http-token")).read()).call(
        "GetNode")[0] == 200
    e.proc.signal(15)
    e.proc.wait(30)
    # Stopped, the token goes; off, none is left from before.
    assert not os.path.exists(os.path.join(e.run_dir, "http-token"))
    with open(os.path.join(e.run_dir, "http-token"), "w") as f:
        f.write("stale-token-from-before")
    e = start_emberd("[http]\nlisten =\n", root=e.root)
    assert not os.path.exists(os.path.join(e.run_dir, "http-token"))


def test_node_api_over_json(start_emberd):
    e = start_emberd()
    h = emberd_http(e)
    n = stub(e)

    status, node = h.call("GetNode")
    assert status == 200 and node["nodeId"] == n.GetNode(S.GetNodeRequest()).node_id
    status, tl = h.call("ListTemplates")
    assert status == 200 and [t["id"] for t in tl["templates"]] == ["demo"]
    status, t = h.call("GetTemplate", {"templateId": "demo"})
    assert status == 200 and t == msg_json(n.GetTemplate(S.GetTemplateRequest(template_id="demo")))
    assert h.call("GetTemplate", {"templateId": "nope"})[0] == 404
    status, body = h.call("RegisterTemplate", {"templateId": "t2"})
    assert status == 400 and body["status"] == "INVALID_ARGUMENT"
    # A second template from the demo's own files, and gone again.
    status, t2 = h.call("RegisterTemplate", {"templateId": "t2",
                                             "kernelPath": t["kernel"]["path"],
                                             "rootfsPath": t["rootfs"]["path"],
                                             "labels": {"copy": "yes"}}, timeout=120)
    assert status == 200 and t2["id"] == "t2" and t2["labels"] == {"copy": "yes"}, t2
    assert t2["rootfs"]["sha256"] == t["rootfs"]["sha256"]
    assert h.call("RegisterTemplate", {"templateId": "t2", "kernelPath": "/nonexistent",
                                       "rootfsPath": "/nonexistent"})[0] in (400, 404, 409)
    assert h.call("DeleteTemplate", {"templateId": "t2"}) == (200, {})
    assert h.call("DeleteTemplate", {"templateId": "t2"})[0] == 404

    spec = {"templateId": "demo", "vcpuCount": FAST.get("vcpu_count", 1),
            "memoryMib": FAST.get("memory_mib", 128), "labels": {"via": "http"}}
    status, sb = h.call("CreateSandbox", {"sandboxId": "h1", "spec": spec}, timeout=120)
    assert status == 200, sb
    assert sb["id"] == "h1" and sb["state"] == "SANDBOX_STATE_RUNNING"
    assert sb["spec"]["labels"] == {"via": "http"}
    # The same sandbox through gRPC, in the proto3 JSON mapping, is what HTTP answered.
    status, got = h.call("GetSandbox", {"sandboxId": "h1"})
    assert status == 200 and got == msg_json(n.GetSandbox(S.GetSandboxRequest(sandbox_id="h1")))
    status, body = h.call("CreateSandbox", {"sandboxId": "h1", "spec": {**spec,
                                                                        "vcpuCount": 2}})
    assert status == 409 and body["status"] == "ALREADY_EXISTS"
    status, ls = h.call("ListSandboxes", {"labelSelector": {"via": "http"}})
    assert status == 200 and [s["id"] for s in ls["sandboxes"]] == ["h1"]
    assert "revision" in ls and isinstance(ls["revision"], str)
    # GET works for reads, with the query as the request.
    status, _, data = h.request("GET", "/v1/GetSandbox?sandboxId=h1")
    assert status == 200 and json.loads(data)["id"] == "h1"

    status, sb = h.call("PauseSandbox", {"sandboxId": "h1"}, timeout=120)
    assert status == 200 and sb["state"] == "SANDBOX_STATE_PAUSED"
    assert h.call("PauseSandbox", {"sandboxId": "h1"})[0] == 200  # already paused: fine
    status, sb = h.call("ResumeSandbox", {"sandboxId": "h1"}, timeout=120)
    assert status == 200 and sb["state"] == "SANDBOX_STATE_RUNNING"
    end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    status, sb = h.call("UpdateSandbox", {"sandboxId": "h1", "spec": {"endTime": end},
                                          "updateMask": "endTime"})
    assert status == 200 and sb["spec"]["endTime"] == end, sb
    status, body = h.call("UpdateSandbox", {"sandboxId": "h1", "updateMask": "vcpuCount"})
    assert status == 400 and body["status"] == "INVALID_ARGUMENT"

    status, snap = h.call("CreateSnapshot", {"snapshotId": "s1", "sandboxId": "h1"},
                          timeout=120)
    assert status == 200 and snap["id"] == "s1", snap
    status, got = h.call("GetSnapshot", {"snapshotId": "s1"})
    assert got == msg_json(n.GetSnapshot(S.GetSnapshotRequest(snapshot_id="s1")))
    status, lsn = h.call("ListSnapshots")
    assert [s["id"] for s in lsn["snapshots"]] == ["s1"]
    status, sb = h.call("CreateSandbox", {"sandboxId": "h2", "spec": {"snapshotId": "s1"}},
                        timeout=120)
    assert status == 200 and sb["state"] == "SANDBOX_STATE_RUNNING", sb
    status, body = h.call("DeleteSnapshot", {"snapshotId": "s1"})
    assert status == 400 and body["status"] == "FAILED_PRECONDITION" and "h2" in body["message"]
    status, body = h.call("DeleteTemplate", {"templateId": "demo"})
    assert status == 400 and body["status"] == "FAILED_PRECONDITION"

    for sid in ("h1", "h2"):
        status, body = h.call("DestroySandbox", {"sandboxId": sid}, timeout=120)
        assert status == 200 and body == {"found": True}
    assert h.call("DestroySandbox", {"sandboxId": "h1"}) == (200, {})
    assert h.call("DeleteSnapshot", {"snapshotId": "s1"}) == (200, {})
    assert h.call("ListSandboxes") [1].get("sandboxes") is None


def test_watch_over_sse_matches_grpc(start_emberd):
    e = start_emberd()
    h = emberd_http(e)
    n = stub(e)
    grpc_events, sse_raw = [], bytearray()
    call = n.WatchSandboxes(S.WatchSandboxesRequest(since_revision=0), timeout=120 * SLOW)

    def run_grpc():
        try:
            for ev in call:
                grpc_events.append(ev)
        except grpc.RpcError:
            pass

    conn = http.client.HTTPConnection("127.0.0.1", h.port, timeout=120 * SLOW)
    conn.request("GET", "/v1/WatchSandboxes?sinceRevision=0",
                 headers={"Authorization": f"Bearer {h.token}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"

    def run_sse():
        try:
            while True:
                line = resp.readline()
                if not line:
                    break
                sse_raw.extend(line)
        except (OSError, ValueError, AttributeError):
            pass  # closed by the test

    threading.Thread(target=run_grpc, daemon=True).start()
    threading.Thread(target=run_sse, daemon=True).start()
    wait_for(lambda: grpc_events and b"\n\n" in sse_raw, 10 * SLOW, "both watches' resyncs")
    create(n, "w1")
    destroy(n, "w1")

    def removed(evs):
        return any(ev.WhichOneof("event") == "removed" for ev in evs)
    wait_for(lambda: removed(grpc_events), 30 * SLOW, "the gRPC watch to see the removal")
    wait_for(lambda: any("removed" in m for _, m in sse_events(bytes(sse_raw))), 30 * SLOW,
             "the SSE watch to see the removal")
    call.cancel()
    conn.close()
    sse = [m for ev, m in sse_events(bytes(sse_raw)) if ev == "message"]
    want = [msg_json(ev) for ev in grpc_events]
    # Resyncs carry the time they were taken, per stream; events after them are the same.
    assert [m.get("revision") for m in sse] == [m.get("revision") for m in want]
    assert sse[1:] == want[1:len(sse)]
    assert "resync" in sse[0] and "resync" in want[0]


def test_exec_over_ndjson(start_emberd):
    e = start_emberd()
    h = emberd_http(e)
    n = stub(e)
    create(n, "x1")
    status, headers, data = h.request(
        "POST", "/v1/Exec", {"start": {"sandboxId": "x1", "argv": ["sh", "-c", "echo hello"]}},
        timeout=60)
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(l) for l in data.decode().splitlines() if l]
    assert "started" in lines[0]["result"]
    out = b"".join(base64.b64decode(l["result"].get("stdoutData", ""))
                   for l in lines if "result" in l)
    assert out == b"hello\n"
    assert lines[-2]["result"] == {"exit": {}}  # exit code 0: all fields at their defaults
    assert lines[-1] == {"status": {"code": 0, "status": "OK", "message": ""}}

    # stdin from the body, then its end.
    body = "\n".join(json.dumps(m) for m in [
        {"start": {"sandboxId": "x1", "argv": ["sh", "-c", "tr a-z A-Z; exit 3"],
                   "stdin": True}},
        {"stdinData": base64.b64encode(b"abc\n").decode()},
        {"stdinData": base64.b64encode(b"def\n").decode()}])
    status, _, data = h.request("POST", "/v1/Exec", body,
                                headers={"Content-Type": "application/json"}, timeout=60)
    lines = [json.loads(l) for l in data.decode().splitlines() if l]
    out = b"".join(base64.b64decode(l["result"].get("stdoutData", ""))
                   for l in lines if "result" in l)
    assert status == 200 and out == b"ABC\nDEF\n"
    assert lines[-2]["result"] == {"exit": {"exitCode": 3}}

    # An exec that fails before it starts is an HTTP error.
    status, _, data = h.request("POST", "/v1/Exec", {"start": {"sandboxId": "nope",
                                                               "argv": ["true"]}})
    assert status == 404 and json.loads(data)["status"] == "NOT_FOUND"
    destroy(n, "x1")


def test_emberd_metrics(start_emberd):
    from prometheus_client.parser import text_string_to_metric_families
    # Without prefetch every page comes through a fault: with it, which of the two copies a
    # page is a race (runs here had 1 fault copying nothing, and no fault at all).
    e = start_emberd("[vmm]\nuffd_prefetch = false\n")
    h = emberd_http(e)
    n = stub(e)
    create(n, "m1")
    create(n, "m2")
    n.PauseSandbox(S.PauseSandboxRequest(sandbox_id="m2"), timeout=120 * SLOW)
    assert h.call("CreateSandbox", {"sandboxId": "m3", "spec": {"templateId": "nope"}})[0] == 404
    status, _, data = h.request("GET", "/metrics")
    assert status == 200
    fams = {f.name: f for f in text_string_to_metric_families(data.decode())}

    def value(fam, suffix="", **labels):
        return sum(s.value for s in fams[fam].samples
                   if s.name == fam + suffix and all(s.labels.get(k) == v
                                                     for k, v in labels.items()))
    assert value("ember_sandboxes", state="RUNNING") == 1
    assert value("ember_sandboxes", state="PAUSED") == 1
    assert value("ember_sandboxes", state="FAILED") == 0
    assert value("ember_operations", "_total", operation="create", code="OK") == 2
    assert value("ember_operations", "_total", operation="pause", code="OK") == 1
    assert value("ember_operation_duration_seconds", "_count", operation="create") == 2
    assert value("ember_operation_step_duration_seconds", "_count", operation="create",
                 step="disk") == 2
    assert value("grpc_server_handled", "_total", grpc_method="CreateSandbox",
                 grpc_code="OK") == 2
    assert value("grpc_server_handled", "_total", grpc_method="CreateSandbox",
                 grpc_code="NOT_FOUND") == 1
    assert value("ember_build_info", version=n.GetNode(S.GetNodeRequest()).agent_version) == 1
    # Without the token: 401, unless metrics_public and the client on loopback.
    assert h.request("GET", "/metrics", auth=False)[0] == 401

    # A resumed sandbox's memory comes from ember-uffd, page by page: its counters show
    # while it serves, and stay in the totals once it is gone.
    assert value("ember_uffd_faults", "_total") == 0
    n.ResumeSandbox(S.ResumeSandboxRequest(sandbox_id="m2"), timeout=120 * SLOW)

    def scrape():
        return {f.name: f for f in text_string_to_metric_families(
            h.request("GET", "/metrics")[2].decode())}
    fams = scrape()
    faults = value("ember_uffd_faults", "_total")
    served = value("ember_uffd_served_bytes", "_total", how="fault")
    ahead = value("ember_uffd_served_bytes", "_total", how="prefetch")
    # A fault copies a page, or maps the zero page (memory the guest gave back): no bytes.
    assert faults > 0 and served > 0 and served % 4096 == 0 and served <= faults * (2 << 20), (
        faults, served)
    assert ahead == 0, ahead
    for sid in ("m1", "m2"):
        destroy(n, sid)
    fams = scrape()
    assert value("ember_uffd_faults", "_total") >= faults
    assert value("ember_sandboxes", state="RUNNING") == 0


def test_metrics_public(start_emberd):
    e = start_emberd("[http]\nmetrics_public = true\n")
    h = emberd_http(e)
    status, _, data = h.request("GET", "/metrics", auth=False)
    assert status == 200 and b"ember_sandboxes" in data
    assert h.request("GET", "/test", auth=False)[0] == 401
    # Without the token only for a Host that is an address or localhost: a web page whose
    # name was rebound to 127.0.0.1 cannot read it.
    assert h.request("GET", "/metrics", auth=False,
                     headers={"Host": f"localhost:{h.port}"})[0] == 200
    assert h.request("GET", "/metrics", auth=False,
                     headers={"Host": "evil.example"})[0] == 401
