# Running a piece of a test inside another network namespace without moving the test: a
# thread of its own does setns(2) (a thread's namespace is its own) and ends right after;
# sockets it made keep the namespace they were made in. Used by conftest.py (connections to
# emberd's namespace) and pullserver.py (a server listening in it); stdlib only.

import ctypes
import os
import threading

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(nspath, fn):
    """fn() run in a thread that entered the network namespace at nspath; its result, or
    its exception raised here."""
    out = {}

    def run():
        try:
            fd = os.open(nspath, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {nspath}")
            finally:
                os.close(fd)
            out["v"] = fn()
        except Exception as e:  # noqa: BLE001 - re-raised in the caller's thread
            out["e"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "e" in out:
        raise out["e"]
    return out["v"]
