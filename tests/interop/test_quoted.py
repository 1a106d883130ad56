"""Quoted local parts in MAIL FROM / RCPT TO (RFC 5321 §4.1.2), black box.

smtp-proto, which mailgate parses commands with, drops the quotes: `"john doe"@x` would
reach the upstream as `john doe@x` (another, invalid mailbox), `"eve@x,bob"@y` as
`eve@x,bob@y`. The aiosmtpd upstream parses each path with Python's RFC 5322 parser and
records it re-quoted (minimal quoting, as mailgate writes it): an address that went out
unquoted would be recorded differently, or refused.
"""

from __future__ import annotations

import json
from conftest import Raw, assert_reply, message, run_cli, transact, wait_until

SENDER = '"x y"@example.com'
RCPTS = ['"john doe"@example.org', '"eve@example.net,bob"@example.org', r'"a\"b"@example.org']


def test_quoted_sender_and_recipients_arrive_as_sent_relay(config, mailgate, raw, upstream):
    config.smtp_channel("up", upstream)
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    assert_reply(transact(c, SENDER, RCPTS, message()), 250)
    (m,) = upstream.wait_messages(1)
    assert m.mail_from == SENDER
    assert m.rcpt_tos == RCPTS


def test_needless_quotes_are_the_plain_mailbox_for_routing_and_upstream(
    config, mailgate, raw, upstream_factory
):
    alice = upstream_factory()
    others = upstream_factory()
    config.smtp_channel("alice", alice, senders=["alice@example.com"])
    config.smtp_channel("others", others, senders=["*@example.com"])
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    assert_reply(transact(c, '"alice"@example.com', ['"bob"@example.org'], message()), 250)
    (m,) = alice.wait_messages(1)
    assert (m.mail_from, m.rcpt_tos) == ("alice@example.com", ["bob@example.org"])
    assert others.messages == []


def test_a_quoted_local_part_smuggles_no_bracket_and_no_line(config, mailgate, raw, upstream):
    config.smtp_channel("up", upstream)
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    c.cmd("EHLO client.test")
    assert_reply(c.cmd('MAIL FROM:<"a>b"@example.com>'), 553, "5.1.7")
    assert_reply(c.cmd("MAIL FROM:<alice@example.com>"), 250)
    assert_reply(c.cmd('RCPT TO:<"eve@evil.test> NOTIFY=NEVER"@example.org>'), 553, "5.1.3")
    # The line ends inside the quote: the rest is a line of its own, no recipient.
    c.send(b'RCPT TO:<"a\r\nRCPT TO:<eve@evil.test>"@example.org>\r\n')
    assert_reply(c.reply(), 501)
    assert c.reply().code in (500, 501)
    assert_reply(c.cmd("RCPT TO:<\"a\tb\"@example.org>"), 501)
    assert_reply(c.cmd("RCPT TO:<bob@example.org>"), 250)
    assert_reply(c.cmd("DATA"), 354)
    c.send(message() + b".\r\n")
    assert_reply(c.reply(), 250)
    (m,) = upstream.wait_messages(1)
    assert m.rcpt_tos == ["bob@example.org"]


def test_quoted_addresses_survive_the_spool_and_a_restart_queue(config, mailgate, raw, upstream):
    config.server.update({"delivery": "queue", "retry_first": "1h", "retry_max": "1h"})
    config.smtp_channel("up", upstream)
    upstream.handler.data_reply = "451 4.3.0 Later"
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    assert_reply(transact(c, SENDER, RCPTS, message()), 250)
    spooled = config.tmp / "spool" / "queue"
    wait_until(lambda: list(spooled.glob("*.json")), 10, "the message in the spool")
    mg.wait_log("451 4.3.0")
    (path,) = spooled.glob("*.json")
    state = json.loads(path.read_text())
    assert json.dumps(state).count('\\"john doe\\"@example.org') == 1, state

    mg.signal()
    assert mg.wait(20) == 0
    upstream.handler.data_reply = None
    mailgate(config)
    p = run_cli(["-c", str(config.tmp / "proxy.toml"), "queue", "retry", path.stem])
    assert p.returncode == 0, p.stderr
    (m,) = upstream.wait_messages(1)
    assert m.mail_from == SENDER
    assert m.rcpt_tos == RCPTS
