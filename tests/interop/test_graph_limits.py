"""A graph channel never splits a message (SPEC §7 "Large messages over Graph", issue 16
item 7), black box: the mailgate binary against the local Graph stand-in, with smtplib
and swaks as clients. Graph sends to every recipient the headers name, so a message must
go whole: more recipients than the channel's `recipients_per_day` are refused at RCPT
with `452 4.5.3`, and a queued message that a reload made too big fails with a DSN.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from conftest import smtp_client, split_addr, wait_until
from test_graph import MAILBOX, endpoint, graph, graph_channel, msg, start  # noqa: F401
from test_queue import queue_mode
from test_reload import reloaded

RCPTS = ["bob@example.org", "carol@example.org", "erin@example.org"]


@pytest.mark.parametrize("mode", ["relay", "queue"])
def test_rcpt_beyond_recipients_per_day_is_452_and_the_rest_goes_whole(config, mailgate, endpoint, graph, mode):
    if mode == "queue":
        queue_mode(config)
    graph_channel(config, endpoint, graph, recipients_per_day=2)
    mg = start(mailgate, config)
    with smtp_client(mg.addr) as c:
        c.ehlo()
        assert c.mail(MAILBOX)[0] == 250
        assert c.rcpt(RCPTS[0])[0] == 250
        assert c.rcpt(RCPTS[1])[0] == 250
        code, text = c.rcpt(RCPTS[2])
        assert code == 452 and text.startswith(b"4.5.3"), (code, text)
        code, text = c.data(msg(to=", ".join(RCPTS[:2])))
        assert code == 250, text
    (sent,) = graph.wait_sent(1)
    assert graph.requests == 1, "one request for the whole envelope"
    assert b"bob@example.org" in sent.mime and b"carol@example.org" in sent.mime


@pytest.mark.skipif(not shutil.which("swaks"), reason="swaks not installed")
def test_swaks_hears_452_for_the_recipient_beyond_the_day_quota(config, mailgate, endpoint, graph):
    graph_channel(config, endpoint, graph, recipients_per_day=1)
    mg = start(mailgate, config)
    host, port = split_addr(mg.addr)
    p = subprocess.run(
        ["swaks", "--server", host, "--port", str(port), "--from", MAILBOX,
         "--to", ",".join(RCPTS[:2]), "--header", "Subject: team"],
        capture_output=True, text=True, timeout=30,
    )
    out = p.stdout + p.stderr
    assert "452 4.5.3" in out, out
    assert graph.requests == 0 or all(b"carol@example.org" not in s.mime for s in graph.sent), out


def test_a_reload_lowering_the_day_quota_fails_a_queued_message_that_can_never_fit(
        config, mailgate, endpoint, graph, tmp_path):
    queue_mode(config)
    graph_channel(config, endpoint, graph, recipients_per_day=5)
    # Throttled for a minute on its first try: it stays queued.
    graph.script.append((429, "TooManyRequests", "60"))
    mg = start(mailgate, config)
    with smtp_client(mg.addr) as c:
        c.ehlo()
        assert c.mail(MAILBOX)[0] == 250
        for r in RCPTS:
            assert c.rcpt(r)[0] == 250
        code, text = c.data(msg(to=", ".join(RCPTS)))
        assert code == 250, text
    qid = text.decode().rsplit(" ", 1)[-1]
    wait_until(lambda: graph.requests == 1, 10, "the throttled try")

    config.channels["dave"]["recipients_per_day"] = 2
    reloaded(mg, config)
    failed = tmp_path / "spool" / "failed" / f"{qid}.json"
    wait_until(failed.exists, 10, "the message in failed/, not waiting for ever")
    state = json.loads(failed.read_text())
    assert all(r["status"] == "failed" for r in state["recipients"]), state
    assert "5.5.3" in state["recipients"][0]["reply"] and "never split" in state["recipients"][0]["reply"], state
    assert graph.requests == 1, "no part of it was sent"
    assert "can never go over this channel" in mg.log()
