# An HTTP(S) artifact server for the PullTemplate tests and make bench-pull: GET and HEAD of
# registered paths, each served from a file on disk with sendfile(2), a single byte range
# (206/416), and per-path misbehaviour a test asks for: no range support, a connection reset
# part-way, an error status, a redirect, a throttled body, a pause. Every request is recorded.
#
# It listens on 127.0.0.1 inside a network namespace given by path (emberd's host namespace
# under test): the listening socket is made by a thread that setns(2)-ed there, and keeps that
# namespace.
#
#   with PullServer(netns=e.hostns, tls=False) as srv:
#       srv.add("/rootfs", "/tmp/x/rootfs.ext4", ranges=True, drop_after=None, drop_times=1,
#               status=None, status_times=None, redirect=None, rate=None)
#       srv.url("/rootfs")          -> "http://127.0.0.1:<port>/rootfs"
#       srv.requests_for("/rootfs")  -> [Request(method, path, range, status, sent, ...)]
#       srv.pause(); srv.resume()    bodies (and new answers) wait while paused
#   Pki(dir, name).ca_file            a CA of its own and a server certificate for 127.0.0.1 and
#                                     localhost, made with the openssl command
#
# Standalone (a quick manual check): python3 pullserver.py FILE [--tls] [--rate N] ...

import fcntl
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from netnsutil import in_netns

SIOCOUTQ = 0x5411  # TIOCOUTQ: bytes in a TCP socket's send queue not yet acknowledged


def _openssl(*args, cwd):
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {p.stderr}")


class Pki:
    """A CA of its own (<dir>/<name>-ca.crt) and a server certificate it issued for
    IP:127.0.0.1 and DNS:localhost (<name>-server.crt/.key), made with the openssl command.
    Two Pki objects are unrelated: one's server is untrusted by the other's CA."""

    def __init__(self, d=None, name="pull"):
        self._own = d is None
        self.dir = d or tempfile.mkdtemp(prefix="ember-pki-", dir="/tmp")
        os.makedirs(self.dir, exist_ok=True)
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        ca, srv = f"{name}-ca", f"{name}-server"
        _openssl("req", "-x509", *ec, "-days", "2", "-subj", f"/CN={name} test CA",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.crt", cwd=self.dir)
        ext = os.path.join(self.dir, f"{srv}.ext")
        with open(ext, "w") as f:
            f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
                    "basicConstraints=CA:FALSE\n")
        _openssl("req", *ec, "-subj", "/CN=localhost", "-keyout", f"{srv}.key",
                 "-out", f"{srv}.csr", cwd=self.dir)
        _openssl("x509", "-req", "-in", f"{srv}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                 "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", f"{srv}.crt",
                 cwd=self.dir)
        self.ca_file = os.path.join(self.dir, f"{ca}.crt")
        self.cert_file = os.path.join(self.dir, f"{srv}.crt")
        self.key_file = os.path.join(self.dir, f"{srv}.key")

    def server_context(self):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def cleanup(self):
        if self._own:
            shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Route:
    """How one path is served; counters are of the GET requests it got so far."""
    file: str = None
    ranges: bool = True          # False: Range is ignored, always 200 with the whole body
    drop_after: int = None       # reset the connection after this many body bytes...
    drop_times: int = 1          # ...in the first drop_times GETs (None: every GET)
    status: int = None           # answer this status (with a short text body) instead...
    status_times: int = None     # ...in the first status_times requests (None: always)
    redirect: str = None         # 302 to this Location
    rate: int = None             # body bytes per second (None: as fast as possible)
    content_length: bool = True  # False: no Content-Length, the body ends with the connection
    gets: int = 0
    hits: int = 0


@dataclass
class Request:
    method: str
    path: str
    range: str                   # the Range header as sent, None without one
    status: int = 0              # what was answered
    sent: int = 0                # body bytes written to the socket
    dropped: bool = False        # the connection was reset part-way
    start: int = 0               # first byte of the body sent (the range's start)
    finished: bool = False       # the answer is over (sent, or the connection failed)
    error: str = None            # why the answer was cut short (client gone, reset, ...)
    t: float = field(default_factory=time.monotonic)

    @property
    def range_start(self):
        """N of a `bytes=N-...` Range header, else None."""
        m = re.fullmatch(r"\s*bytes\s*=\s*(\d+)\s*-\s*\d*\s*", self.range or "")
        return int(m.group(1)) if m else None


class _Aborted(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ember-pullserver"

    def log_message(self, fmt, *args):  # quiet: the request log is srv.requests
        pass

    def setup(self):
        self.server.owner._track(self.request, True)
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.settimeout(10)
                self.request.do_handshake()  # here, not in the accepting thread
                self.request.settimeout(None)
            except BaseException:
                self.server.owner._track(self.request, False)
                raise
        super().setup()

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.owner._track(self.request, False)

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head):
        srv = self.server.owner
        path = self.path.split("?", 1)[0]
        req = Request(self.command, path, self.headers.get("Range"))
        srv._record(req)
        try:
            srv._wait_unpaused()
            route, gets, hits = srv._route(path, head)
            if route is None:
                return self._simple(req, 404, "not found\n")
            if route.status is not None and (route.status_times is None or
                                             hits <= route.status_times):
                return self._simple(req, route.status, f"status {route.status}\n")
            if route.redirect is not None:
                return self._simple(req, 302, "redirect\n", [("Location", route.redirect)])
            self._file(req, route, head, gets)
        except _Aborted:
            self.close_connection = True
            req.error = "reset" if req.dropped else "aborted"
        except (ConnectionError, ssl.SSLError, OSError) as e:
            self.close_connection = True
            req.error = str(e)
        finally:
            req.finished = True

    def _simple(self, req, status, body, headers=()):
        req.status = status
        body = body.encode()
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            req.sent = len(body)

    def _file(self, req, route, head, gets):
        size = os.path.getsize(route.file)
        start, end, status = 0, size - 1, 200
        if route.ranges and req.range is not None:
            r = _parse_range(req.range, size)
            if r == "unsatisfiable":
                req.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if r is not None:
                start, end = r
                status = 206
        length = end - start + 1
        req.status, req.start = status, start
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if route.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        if route.content_length:
            self.send_header("Content-Length", str(length))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.flush()
        if head:
            return
        drop = route.drop_after is not None and (route.drop_times is None or
                                                 gets <= route.drop_times)
        limit = min(length, route.drop_after) if drop else length
        with open(route.file, "rb") as f:
            self._send_body(req, f, start, limit, route.rate)
        if drop and limit < length:
            self._reset(req)

    def _send_body(self, req, f, offset, count, rate):
        srv = self.server.owner
        sock = self.connection
        t0 = time.monotonic()
        chunk = max(16384, rate // 20) if rate else 8 << 20
        done = 0
        while done < count:
            srv._wait_unpaused()
            if rate:
                ahead = done / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
                    srv._wait_unpaused()
            n = min(chunk, count - done)
            # sendfile(2) on a plain socket, reads and sends on a TLS one
            sent = sock.sendfile(f, offset + done, n)
            if sent == 0:
                raise _Aborted()
            done += sent
            req.sent = done

    def _reset(self, req):
        """Lets the peer receive what was sent, then resets the connection (RST)."""
        req.dropped = True
        sock = self.connection
        buf = bytearray(4)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                fcntl.ioctl(sock.fileno(), SIOCOUTQ, buf)
            except OSError:
                break
            if struct.unpack("i", buf)[0] == 0:
                time.sleep(0.05)  # acknowledged: let the peer read it before the reset
                break
            time.sleep(0.005)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.server.owner._resets.add(sock)  # closed without the FIN of shutdown_request
        raise _Aborted()


def _parse_range(h, size):
    """(start, end) of a single `bytes=` range, "unsatisfiable", or None to ignore it."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", h)
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return None
    a, b = m.group(1), m.group(2)
    if a == "":  # suffix: the last b bytes
        n = int(b)
        if n == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(a)
    end = size - 1 if b == "" else min(int(b), size - 1)
    if b != "" and int(b) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, end


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 64

    def handle_error(self, request, client_address):
        pass  # a client going away (or refusing our certificate) is not the server's error

    def shutdown_request(self, request):
        resets = self.owner._resets
        if request in resets:
            resets.discard(request)
            self.close_request(request)  # SO_LINGER 0: the close sends an RST
        else:
            super().shutdown_request(request)


class PullServer:
    """The artifact server; see the file header. netns: a network namespace path to listen
    in (None: the caller's). tls: False, True (a Pki of its own, .pki/.ca_file) or a Pki."""

    def __init__(self, netns=None, tls=False):
        self.routes = {}
        self.requests = []
        self._lock = threading.Lock()
        self._serving = threading.Event()
        self._serving.set()
        self._closing = False
        self._conns = set()
        self._resets = set()
        self.pki = None
        if tls:
            self.pki = tls if isinstance(tls, Pki) else Pki()
        self._httpd = self._make(netns)
        if self.pki is not None:
            self._httpd.socket = self.pki.server_context().wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False)
        self._httpd.owner = self
        self.port = self._httpd.server_address[1]
        self.scheme = "https" if self.pki else "http"
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                         kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def ca_file(self):
        return self.pki.ca_file if self.pki else None

    def _make(self, netns):
        if netns is None:
            return _Server(("127.0.0.1", 0), _Handler)
        return in_netns(netns, lambda: _Server(("127.0.0.1", 0), _Handler))

    # --- configuration -------------------------------------------------------------------

    def add(self, path, file=None, data=None, **kw):
        """Serves `file` (or `data`, written to a temp file) at `path`; kw: see Route."""
        if data is not None:
            fd, file = tempfile.mkstemp(prefix="ember-pullsrv-", dir="/tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self._tmpfiles = getattr(self, "_tmpfiles", []) + [file]
        if file is None and "status" not in kw and "redirect" not in kw:
            raise ValueError("add() needs file, data, status or redirect")
        with self._lock:
            self.routes[path] = Route(file=file, **kw)
        return self.url(path)

    def set(self, path, **kw):
        """Changes some of a path's settings (its counters are kept)."""
        with self._lock:
            for k, v in kw.items():
                setattr(self.routes[path], k, v)

    def url(self, path, host="127.0.0.1"):
        return f"{self.scheme}://{host}:{self.port}{path}"

    def pause(self):
        """Bodies being sent stop between chunks, and new requests wait, until resume()."""
        self._serving.clear()

    def resume(self):
        self._serving.set()

    # --- what was asked ------------------------------------------------------------------

    def requests_for(self, path, method="GET"):
        with self._lock:
            return [r for r in self.requests if r.path == path and
                    (method is None or r.method == method)]

    def sent_bytes(self, path):
        return sum(r.sent for r in self.requests_for(path))

    # --- internals -----------------------------------------------------------------------

    def _record(self, req):
        with self._lock:
            self.requests.append(req)

    def _route(self, path, head):
        with self._lock:
            r = self.routes.get(path)
            if r is None:
                return None, 0, 0
            r.hits += 1
            if not head:
                r.gets += 1
            return r, r.gets, r.hits

    def _wait_unpaused(self):
        while not self._serving.wait(0.05):
            if self._closing:
                raise _Aborted()
        if self._closing:
            raise _Aborted()

    def _track(self, conn, add):
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def drop_connections(self):
        """Shuts down every open connection now (a handler sending a body sees an error)."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self._closing = True
        self._serving.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self.drop_connections()
        self._thread.join(10)
        for f in getattr(self, "_tmpfiles", []):
            try:
                os.unlink(f)
            except OSError:
                pass
        if self.pki is not None:
            self.pki.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _main():
    import argparse
    ap = argparse.ArgumentParser(description="serve FILE at /f (a manual check)")
    ap.add_argument("file")
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--netns")
    ap.add_argument("--no-ranges", action="store_true")
    ap.add_argument("--drop-after", type=int)
    ap.add_argument("--drop-times", type=int, default=1)
    ap.add_argument("--status", type=int)
    ap.add_argument("--status-times", type=int)
    ap.add_argument("--redirect")
    ap.add_argument("--rate", type=int)
    a = ap.parse_args()
    with PullServer(netns=a.netns, tls=a.tls) as s:
        s.add("/f", a.file, ranges=not a.no_ranges, drop_after=a.drop_after,
              drop_times=a.drop_times, status=a.status, status_times=a.status_times,
              redirect=a.redirect, rate=a.rate)
        print(s.url("/f"), s.ca_file or "", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        for r in s.requests:
            print(r, flush=True)


if __name__ == "__main__":
    _main()
