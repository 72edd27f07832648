#!/usr/bin/python3
"""Network probes for the netns tests, run inside a namespace with nsenter.

  probe.py echo HOST PORT [TIMEOUT]      connect, send a line, expect it back: "ok" or "fail ..."
  probe.py echo-many PORT TIMEOUT HOST...  the same for many hosts, one line each
  probe.py whoami-server PORT            accept connections, answer with the peer's address
  probe.py ask HOST PORT [TIMEOUT]       connect and print what the server says
"""

import socket
import sys


def echo(host, port, timeout):
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            msg = f"hello {host}\n".encode()
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            return "ok" if got == msg else f"fail echoed {got!r}"
    except OSError as e:
        return f"fail {e.__class__.__name__} {e}"


def main():
    cmd = sys.argv[1]
    if cmd == "echo":
        print(echo(sys.argv[2], int(sys.argv[3]),
                   float(sys.argv[4]) if len(sys.argv) > 4 else 2.0))
    elif cmd == "echo-many":
        port, timeout = int(sys.argv[2]), float(sys.argv[3])
        for host in sys.argv[4:]:
            print(host, echo(host, port, timeout), flush=True)
    elif cmd == "whoami-server":
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("0.0.0.0", int(sys.argv[2])))
        ls.listen(64)
        print("READY", flush=True)
        while True:
            c, addr = ls.accept()
            c.sendall(f"{addr[0]}\n".encode())
            c.close()
    elif cmd == "ask":
        try:
            with socket.create_connection((sys.argv[2], int(sys.argv[3])),
                                          timeout=float(sys.argv[4]) if len(sys.argv) > 4
                                          else 2.0) as s:
                print("ok", s.recv(4096).decode().strip())
        except OSError as e:
            print("fail", e.__class__.__name__)
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
