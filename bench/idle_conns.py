#!/usr/bin/env python3
"""Opens N idle SMTP connections to HOST:PORT (loopback only), reads each greeting,
holds them for HOLD seconds, then prints the server's peak RSS (VmHWM) and current RSS.

usage: idle_conns.py HOST PORT N HOLD_SECONDS SERVER_PID
"""
import socket
import sys
import time


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def main():
    host, port, n, hold, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
    assert host.startswith("127.") or host == "::1", "loopback only"
    before = status_kb(pid, "VmRSS")
    socks = []
    deadline = time.time() + 120
    for _ in range(n):
        if time.time() > deadline:
            break
        s = socket.create_connection((host, port), timeout=10)
        greeting = s.recv(512)
        if not greeting.startswith(b"220"):
            print(f"unexpected greeting: {greeting!r}", file=sys.stderr)
            sys.exit(1)
        socks.append(s)
    time.sleep(hold)
    rss = status_kb(pid, "VmRSS")
    hwm = status_kb(pid, "VmHWM")
    print(f"idle_connections={len(socks)} rss_before_kb={before} rss_kb={rss} peak_rss_kb={hwm}")
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
