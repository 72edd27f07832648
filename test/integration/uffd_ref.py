# A small reference page-fault handler for Firecracker's Uffd memory backend, in Python: what
# the fcsim tests load snapshots with. It does exactly what the protocol asks
# (notes/firecracker.md) and nothing clever: one 4 KiB UFFDIO_COPY per fault.

import ctypes
import fcntl
import json
import mmap
import os
import select
import socket
import struct
import threading

UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_REMOVE = 0x15
PAGE = 4096


class RefHandler:
    """Listens on `sock_path`; serves the memory file `mem_file`. wrong_page: a page index
    (into guest memory) served with wrong bytes, to prove that fcsim notices."""

    def __init__(self, sock_path, mem_file, wrong_page=None):
        self.sock_path = sock_path
        self.mem_file = mem_file
        self.wrong_page = wrong_page
        self.handshake = None  # (json text, number of fds, number of recvmsg calls)
        self.faults = 0
        self.removed = []
        self.error = None
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(sock_path)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _copy(self, uffd, dst, src):
        """True when done; False on EAGAIN: a REMOVE event must be read first."""
        buf = bytearray(struct.pack("QQQQq", dst, src, PAGE, 0, 0))
        try:
            fcntl.ioctl(uffd, UFFDIO_COPY, buf)
        except OSError as e:
            if e.errno == 11:  # EAGAIN
                return False
            if e.errno != 17:  # EEXIST: already there
                raise
        return True

    def _zero(self, uffd, dst):
        buf = bytearray(struct.pack("QQQq", dst, PAGE, 0, 0))
        try:
            fcntl.ioctl(uffd, UFFDIO_ZEROPAGE, buf)
        except OSError as e:
            if e.errno not in (17, 11):
                raise

    def _run(self):
        try:
            conn, _ = self.listener.accept()
            msg, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
            fds = []
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += list(struct.unpack(f"{len(data) // 4}i", data))
            self.handshake = (msg.decode(), len(fds))
            regions = json.loads(msg)
            uffd = fds[0]
            size = os.path.getsize(self.mem_file)
            fd = os.open(self.mem_file, os.O_RDONLY)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
            os.close(fd)
            base_src = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            wrong = ctypes.create_string_buffer(b"\xa5" * PAGE, PAGE)
            wrong_addr = ctypes.addressof(wrong)
            poll = select.poll()
            poll.register(uffd, select.POLLIN)
            poll.register(conn.fileno(), select.POLLIN | select.POLLHUP)
            while True:
                for fd_, ev in poll.poll(1000):
                    if fd_ == conn.fileno():
                        if ev & (select.POLLHUP | select.POLLERR) or not conn.recv(1):
                            return  # the VMM is gone
                        continue
                    pending = self._read_events(uffd)
                    while pending:
                        addr = pending.pop(0)
                        if not self._serve(uffd, regions, base_src, wrong_addr, addr):
                            # EAGAIN: take the events in flight (a REMOVE), then retry
                            pending = self._read_events(uffd) + [addr] + pending
        except Exception as e:  # noqa: BLE001 - reported to the test
            self.error = repr(e)

    def _read_events(self, uffd):
        """Reads what is queued; records REMOVE ranges, returns fault addresses."""
        faults = []
        while True:
            try:
                raw = os.read(uffd, 32 * 64)
            except BlockingIOError:
                return faults
            for off in range(0, len(raw), 32):
                event = raw[off]
                a, b = struct.unpack_from("QQ", raw, off + 8)
                if event == UFFD_EVENT_REMOVE:
                    self.removed.append((a, b))
                elif event == UFFD_EVENT_PAGEFAULT:
                    self.faults += 1
                    faults.append(b & ~(PAGE - 1))

    def _serve(self, uffd, regions, base_src, wrong_addr, addr):
        if any(s <= addr < e for s, e in self.removed):
            self._zero(uffd, addr)
            return True
        for r in regions:
            base = r["base_host_virt_addr"]
            if base <= addr < base + r["size"]:
                file_off = addr - base + r["offset"]
                src = base_src + file_off
                if self.wrong_page is not None and file_off // PAGE == self.wrong_page:
                    src = wrong_addr
                return self._copy(uffd, addr, src)
        return True

    def close(self):
        self.listener.close()
        self.thread.join(5)
