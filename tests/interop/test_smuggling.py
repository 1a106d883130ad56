"""SMTP smuggling (SPEC §5: end of data is <CRLF>.<CRLF> only; no input makes the upstream
see a second message). Payloads after SEC Consult's 2023 research: a fake end-of-data made
of bare CR/LF, followed by a whole hidden transaction.
"""

import re
import time

import pytest

from conftest import assert_reply

PAYLOADS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CR": b"\r.\r",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CRLF.LF": b"\r\n.\n",
    "CR.LF": b"\r.\n",
    "LF.CR": b"\n.\r",
    "CRLF.CRCRLF": b"\r\n.\r\r\n",
    "CRLF.LFLF": b"\r\n.\n\n",
}

PREFIX = b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: outer\r\n\r\nouter body"
HIDDEN = (
    b"MAIL FROM:<evil@example.net>\r\n"
    b"RCPT TO:<victim@example.org>\r\n"
    b"DATA\r\n"
    b"From: ceo@example.com\r\n"
    b"To: victim@example.org\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"hidden\r\n"
)


def normalized(data: bytes) -> bytes:
    """Every bare CR or LF becomes CRLF."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def unstuffed(data: bytes) -> bytes:
    """RFC 5321 §4.5.2: a leading dot of a line (after a real CRLF) is removed; a dot
    after a bare CR or LF does not start a line."""
    return re.sub(rb"(^|\r\n)\.", rb"\1", data)


def smuggle(c, payload: bytes):
    """Sends the outer message with the payload and hidden transaction; returns (reply, extra bytes)."""
    c.greet()
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<bob@example.org>", 250)
    c.expect("DATA", 354)
    # The hidden message's own <CRLF>.<CRLF> is the outer message's true end.
    c.send(PREFIX + payload + HIDDEN + b".\r\n")
    reply = c.reply()
    extra = c.pending(1.0)
    return reply, extra


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_normalize_upstream_sees_exactly_one_message(config, mailgate, raw, upstream, payload):
    config.smtp_channel("up", upstream)
    config.server["bare_lf"] = "normalize"
    config.server["check_header_from"] = False
    mg = mailgate(config)
    c = raw(mg.addr)
    reply, extra = smuggle(c, payload)
    assert_reply(reply, 250)
    assert extra == b"", f"server answered the hidden commands: {extra!r}"
    c.expect("QUIT", 221)
    (m,) = upstream.wait_messages(1)
    time.sleep(0.5)  # a second message would arrive right after the first
    assert len(upstream.messages) == 1, [x.mail_from for x in upstream.messages]
    assert m.mail_from == "alice@example.com"
    assert m.rcpt_tos == ["bob@example.org"]
    assert m.content == normalized(unstuffed(PREFIX + payload + HIDDEN))


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_reject_refuses_with_5_6_11(config, mailgate, raw, upstream, payload):
    config.smtp_channel("up", upstream)
    config.server["bare_lf"] = "reject"
    mg = mailgate(config)
    c = raw(mg.addr)
    reply, extra = smuggle(c, payload)
    assert_reply(reply, 550, "5.6.11")
    assert extra == b"", f"server answered the hidden commands: {extra!r}"
    # the session goes on and a clean message is delivered
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<bob@example.org>", 250)
    c.expect("DATA", 354)
    c.send(PREFIX + b"\r\n.\r\n")
    assert_reply(c.reply(), 250)
    (m,) = upstream.wait_messages(1)
    time.sleep(0.5)
    assert len(upstream.messages) == 1
    assert m.content == PREFIX + b"\r\n"


@pytest.mark.parametrize("payload", [b"\r\n.\x00\r\n", b"\r\n. \r\n", b"\r\n..\r\n"], ids=["NUL", "dot-space", "dot-dot"])
def test_look_alike_end_markers_are_content(config, mailgate, raw, upstream, payload):
    """Lines that look like the end but are not: the message goes on."""
    config.smtp_channel("up", upstream)
    config.server["bare_lf"] = "reject"
    config.server["check_header_from"] = False
    mg = mailgate(config)
    c = raw(mg.addr)
    reply, extra = smuggle(c, payload)
    assert_reply(reply, 250)
    assert extra == b""
    (m,) = upstream.wait_messages(1)
    time.sleep(0.5)
    assert len(upstream.messages) == 1
    assert m.content == unstuffed(PREFIX + payload + HIDDEN)


@pytest.mark.parametrize("payload", [PAYLOADS["LF.LF"], PAYLOADS["CRLF.CRCRLF"]], ids=["LF.LF", "CRLF.CRCRLF"])
def test_smtp_sink_upstream_sees_one_transaction(config, mailgate, raw, smtp_sink, payload):
    config.smtp_channel("sink", smtp_sink)
    config.server["bare_lf"] = "normalize"
    config.server["check_header_from"] = False
    mg = mailgate(config)
    c = raw(mg.addr)
    reply, extra = smuggle(c, payload)
    assert_reply(reply, 250)
    assert extra == b""
    c.expect("QUIT", 221)
    deadline = time.monotonic() + 10
    while not smtp_sink.dumps() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    dumps = smtp_sink.dumps()
    assert len(dumps) == 1, dumps
    assert b"X-Mail-Args: <alice@example.com>" in dumps[0]
    assert b"evil@example.net>\nRCPT" in dumps[0] or b"MAIL FROM:<evil@example.net>" in dumps[0]
    assert b"X-Mail-Args: <evil" not in dumps[0]


def test_bdat_content_with_end_marker_is_restuffed(config, mailgate, raw, upstream):
    """BDAT data is not dot-stuffed by the client; a CRLF.CRLF inside must not end the upstream DATA."""
    config.smtp_channel("up", upstream)
    config.server["check_header_from"] = False
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    body = PREFIX + b"\r\n.\r\n" + HIDDEN
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<bob@example.org>", 250)
    c.send(b"BDAT %d LAST\r\n" % len(body) + body)
    assert_reply(c.reply(), 250)
    (m,) = upstream.wait_messages(1)
    time.sleep(0.5)
    assert len(upstream.messages) == 1
    assert m.content == body
