"""Large messages over Microsoft Graph (SPEC §7 "Large messages over Graph"): the mailgate
binary against the local Graph stand-in (oauth_peers.py), which serves drafts,
attachments, upload sessions (Graph's chunk rules, no bearer token on the uploadUrl),
send and DELETE. Includes the crash test: kill -9 during an upload, restart, exactly one
message sent and no draft left.
"""

from __future__ import annotations

import base64
import random

import pytest

from conftest import wait_until
from test_graph import MAILBOX, endpoint, graph, graph_channel, start  # noqa: F401 (fixtures)
from test_queue import queue_mode, submit


def pdf(n: int, seed: int) -> bytes:
    return b"%PDF-1.4\n" + random.Random(seed).randbytes(n - 9)


def large_message(scan: bytes, subject: str = "Scan") -> bytes:
    b64 = base64.b64encode(scan)
    lines = b"\r\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))
    return (
        f"From: Scanner <{MAILBOX}>\r\nTo: bob@example.org\r\nSubject: {subject}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
        "--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nYour scan.\r\n"
        "--b\r\nContent-Type: application/pdf; name=\"scan.pdf\"\r\n"
        "Content-Disposition: attachment; filename=\"scan.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    ).encode() + lines + b"\r\n--b--\r\n"


def check_chunks(graph) -> None:
    *rest, last = graph.chunks
    assert last <= 4 * 1024 * 1024
    assert all(c <= 4 * 1024 * 1024 and c % 327_680 == 0 for c in rest), graph.chunks
    assert graph.upload_auth == 0, "no bearer token to the uploadUrl"


@pytest.mark.parametrize("mode", ["relay", "queue"])
def test_a_large_pdf_goes_by_upload_session_byte_for_byte(config, mailgate, endpoint, graph, mode):
    if mode == "queue":
        queue_mode(config)
    graph_channel(config, endpoint, graph)
    mg = start(mailgate, config)
    scan = pdf(3_500_000, 1)
    code, text = submit(mg.addr, MAILBOX, ["bob@example.org", "carol@example.net"], large_message(scan))
    assert code == 250, text
    wait_until(lambda: len(graph.sent_drafts) == 1, 30, "the draft sent")
    sent = graph.sent_drafts[0]
    assert sent["json"]["subject"] == "Scan"
    assert sent["json"]["bccRecipients"] == [{"emailAddress": {"address": "carol@example.net"}}]
    assert sent["json"]["body"]["contentType"] == "Text"
    [att] = sent["attached"]
    assert (att["name"], att["way"], att["contentType"]) == ("scan.pdf", "upload", "application/pdf")
    assert att["bytes"] == scan
    check_chunks(graph)
    assert graph.sent == [] and graph.drafts == {}


def test_a_signed_message_over_the_limit_fails_with_a_dsn(config, mailgate, endpoint, graph):
    queue_mode(config)
    graph_channel(config, endpoint, graph)
    mg = start(mailgate, config)
    b64 = base64.b64encode(pdf(2_400_000, 2))
    msg = (
        f"From: {MAILBOX}\r\nTo: bob@example.org\r\nSubject: signed\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; boundary=\"s\"\r\n\r\n"
        "--s\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    ).encode() + b"\r\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)) + (
        b"\r\n--s\r\nContent-Type: application/pkcs7-signature\r\n\r\nAAAA\r\n--s--\r\n"
    )
    assert len(msg) > 3_000_000
    code, text = submit(mg.addr, MAILBOX, ["bob@example.org"], msg)
    assert code == 250, text
    dsn = graph.wait_sent(1, 20)[0].mime
    assert b"too large for Microsoft Graph's sendMail" in dsn, dsn[:2000]
    assert graph.draft_log == [], "never altered into a draft"


def test_test_channel_reports_the_upload_way(config, endpoint, graph):
    from conftest import run_cli

    graph_channel(config, endpoint, graph)
    path = config.write()
    p = run_cli(["-c", str(path), "test-channel", "dave"], env=dict(config.env))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "upload way authorized (Mail.ReadWrite)" in p.stdout + p.stderr
    assert graph.drafts == {} and len(graph.deleted) == 1 and graph.sent_drafts == []
    graph.fail["create"] = [(403, "ErrorAccessDenied")]
    p = run_cli(["-c", str(path), "test-channel", "dave"], env=dict(config.env))
    assert "upload way NOT authorized" in p.stdout + p.stderr, p.stdout + p.stderr


@pytest.mark.timeout(120)
def test_kill_9_during_an_upload_sends_once_and_leaves_no_draft(config, mailgate, endpoint, graph):
    queue_mode(config)
    graph_channel(config, endpoint, graph)
    graph.put_hold.set()
    mg = start(mailgate, config)
    scan = pdf(3_500_000, 3)
    code, text = submit(mg.addr, MAILBOX, ["bob@example.org"], large_message(scan, "crash"))
    assert code == 250, text
    assert graph.put_arrived.wait(30), "an upload began"
    mg.kill()  # SIGKILL in the middle of the upload session
    graph.put_hold.clear()
    graph.put_release.set()
    assert len(graph.drafts) == 1 and graph.sent_drafts == []
    left = next(iter(graph.drafts))
    mg = start(mailgate, config)
    wait_until(lambda: len(graph.sent_drafts) == 1, 30, "the message sent after the restart")
    wait_until(lambda: not list((config.tmp / "spool" / "queue").glob("*.json")), 10, "the spool emptied")
    assert len(graph.sent_drafts) == 1, "sent exactly once"
    assert graph.drafts == {}, "no draft left"
    assert left in graph.deleted, "the draft the killed attempt left was deleted"
    assert graph.draft_log.index("delete") < len(graph.draft_log) - 1
    assert graph.sent_drafts[0]["attached"][0]["bytes"] == scan
    check_chunks(graph)
