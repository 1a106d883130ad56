#!/usr/bin/env python3
"""Peak memory of mailgate on Graph's upload way (issue 18 item 1; see BENCHMARKS.md):
4 SMTP clients at once each send one ~30 MB message (a 22 MB PDF, base64) to a freshly
started mailgate whose graph channel points at the local Graph stand-in
(tests/interop/oauth_peers.py); every message goes by draft, upload session and send.
mailgate's peak RSS is its VmHWM from /proc after the last message is sent. Runs relay
mode and queue mode, each in a fresh process. Prints a table; exits 1 above 64 MiB.

usage: scripts/bench-graph-upload-rss.py      (MAILGATE_BIN: default target/release/mailgate)
Run with the interop venv's python (target/interop-venv/bin/python). Loopback only;
every wait is bounded; only the mailgate processes this script started are stopped.
"""

from __future__ import annotations

import base64
import os
import smtplib
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("MAILGATE_BIN", str(REPO / "target" / "release" / "mailgate"))
sys.path.insert(0, str(REPO / "tests" / "interop"))

import conftest  # noqa: E402
from oauth_peers import CLIENT_ID, CLIENT_SECRET, GraphApi, TokenEndpoint  # noqa: E402


MAILBOX = "dave@example.com"
CLIENTS = 4
PDF_BYTES = 22_000_000
LIMIT_KB = 64 * 1024


def message(n: int) -> bytes:
    scan = b"%PDF-1.4\n" + random.Random(n).randbytes(PDF_BYTES - 9)
    b64 = base64.b64encode(scan)
    lines = b"\r\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))
    return (
        f"From: {MAILBOX}\r\nTo: bob@example.org\r\nSubject: bench {n}\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nscan\r\n"
        "--b\r\nContent-Type: application/pdf; name=\"scan.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    ).encode() + lines + b"\r\n--b--\r\n"


def submit(addr: str, msg: bytes) -> int:
    host, port = addr.rsplit(":", 1)
    # Relay mode answers the data once Graph took the message: a long wait on a debug build.
    with smtplib.SMTP(host, int(port), timeout=300) as c:
        c.sendmail(MAILBOX, ["bob@example.org"], msg)
    return 250


def hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run(mode: str, messages: list[bytes]) -> tuple[int, float]:
    endpoint = TokenEndpoint()
    graph = GraphApi(endpoint)
    with tempfile.TemporaryDirectory(prefix="mailgate-bench-upload-") as tmp:
        config = conftest.MailgateConfig(Path(tmp))
        config.server["delivery"] = mode
        config.channels["dave"] = {
            "kind": "graph",
            "mailbox": MAILBOX,
            "oauth": {
                "provider": "microsoft",
                "grant": "client_credentials",
                "tenant": "example.com",
                "client_id": CLIENT_ID,
                "client_secret_env": "MG_BENCH_CLIENT_SECRET",
                "token_url": endpoint.url + "/token",
                "graph_url": graph.url,
            },
        }
        mg = conftest.Mailgate(config.write(), 1, env={"MG_BENCH_CLIENT_SECRET": CLIENT_SECRET})
        try:
            started = time.monotonic()
            replies: list[int] = []
            threads = [
                threading.Thread(target=lambda m=m: replies.append(submit(mg.addr, m)))
                for m in messages
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            deadline = time.monotonic() + 300
            while len(graph.sent_drafts) < len(messages) and time.monotonic() < deadline:
                time.sleep(0.1)
            elapsed = time.monotonic() - started
            if replies != [250] * len(messages) or len(graph.sent_drafts) != len(messages):
                raise SystemExit(f"{mode}: replies {replies}, {len(graph.sent_drafts)} sent\n{mg.log()[-3000:]}")
            for sent, m in zip(sorted(graph.sent_drafts, key=lambda d: d["json"]["subject"]), messages):
                assert sent["attached"][0]["bytes"] == base64.b64decode(m.split(b"\r\n\r\n")[-1].split(b"\r\n--b--")[0])
            return hwm_kb(mg.proc.pid), elapsed
        finally:
            mg.kill()
            graph.stop()
            endpoint.stop()


def main() -> int:
    messages = [message(n) for n in range(CLIENTS)]
    size = len(messages[0])
    print(f"## mailgate Graph upload way, peak RSS {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, "
          f"{os.cpu_count()} cores, load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print(f"# {os.environ['MAILGATE_BIN']}; {CLIENTS} clients at once x one {size:,}-byte message "
          f"({PDF_BYTES:,}-byte PDF, base64)")
    print("| mode | peak RSS (VmHWM) | all sent in | target | result |")
    print("|---|---|---|---|---|")
    ok = True
    for mode in ("relay", "queue"):
        kb, elapsed = run(mode, messages)
        passed = kb <= LIMIT_KB
        ok &= passed
        print(f"| {mode} | {kb / 1024:.1f} MiB | {elapsed:.1f} s | <= 64 MiB | {'pass' if passed else 'FAIL'} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
