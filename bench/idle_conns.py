#!/usr/bin/env python3
"""Opens N idle SMTP sessions to HOST:PORT (loopback only): each reads the greeting and
says EHLO, then all are held for HOLD seconds. Then every session is checked to be still
alive (NOOP -> 250) and the server's peak RSS (VmHWM) and current RSS are printed.

usage: idle_conns.py HOST PORT N HOLD_SECONDS SERVER_PID
prints: idle_connections=<alive> rss_before_kb=.. rss_kb=.. peak_rss_kb=..
"""
import socket
import sys
import time

DEADLINE_S = 120  # the whole run, whatever N is
TIMEOUT_S = 10  # per socket operation


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def read_reply(sock):
    """Reads one (possibly multi-line) SMTP reply; returns its last line."""
    data = b""
    for _ in range(100):  # bounded: a reply is a few lines
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed by server")
        data += chunk
        lines = data.split(b"\r\n")
        complete = [line for line in lines[:-1] if line]
        if complete and complete[-1][3:4] == b" ":
            return complete[-1]
    raise ConnectionError(f"no complete reply: {data[:200]!r}")


def main():
    host, port, n, hold, pid = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        float(sys.argv[4]),
        int(sys.argv[5]),
    )
    if not (host.startswith("127.") or host == "::1"):
        sys.exit("loopback only")
    before = status_kb(pid, "VmRSS")
    deadline = time.monotonic() + DEADLINE_S
    socks = []
    for i in range(n):
        if time.monotonic() > deadline:
            print(f"deadline reached after {i} connections", file=sys.stderr)
            break
        s = socket.create_connection((host, port), timeout=TIMEOUT_S)
        socks.append(s)
        greeting = read_reply(s)
        if not greeting.startswith(b"220"):
            sys.exit(f"unexpected greeting: {greeting!r}")
        s.sendall(b"EHLO idle.bench.test\r\n")
        if not read_reply(s).startswith(b"250"):
            sys.exit("EHLO refused")
    time.sleep(hold)
    rss = status_kb(pid, "VmRSS")
    hwm = status_kb(pid, "VmHWM")
    alive = 0
    for s in socks:
        try:
            s.sendall(b"NOOP\r\n")
            if read_reply(s).startswith(b"250"):
                alive += 1
        except OSError:
            pass
    for s in socks:
        s.close()
    print(f"idle_connections={alive} rss_before_kb={before} rss_kb={rss} peak_rss_kb={hwm}")


if __name__ == "__main__":
    main()
