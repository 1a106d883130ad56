"""SPEC §4 / §5 header checks over the whole header section (issue 10): a From:, Sender:
or Precedence: far down a large header section still counts, a header section over
`max_header_size` is refused (552 5.3.4), never cut; an authenticated user's header
From must be one of its own senders; `RCPT TO:<Postmaster>` without a domain.

Clients: raw sockets and smtplib. Upstreams: aiosmtpd and `file` channels.
"""

import smtplib

import pytest

from conftest import assert_reply, hash_password, message, smtp_client, transact


def filler(size: int) -> bytes:
    """Header lines adding up to at least `size` bytes."""
    lines, total, i = [], 0, 0
    while total < size:
        line = b"X-Filler-%05d: %s\r\n" % (i, b"f" * 60)
        lines.append(line)
        total += len(line)
        i += 1
    return b"".join(lines)


def test_second_from_after_64_kib_of_headers_is_refused(config, mailgate, raw, upstream):
    config.smtp_channel("team", upstream, senders=None, domains=["example.com"])
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    late_from = filler(70 * 1024) + b"From: ceo@elsewhere.test\r\n"
    r = transact(c, "bob@example.com", ["x@example.org"], message("bob@example.com", extra_headers=late_from))
    assert_reply(r, 550, "5.7.1")
    assert "ceo@elsewhere.test" in r.text, r
    late_sender = filler(70 * 1024) + b"Sender: ceo@elsewhere.test\r\n"
    r = transact(c, "bob@example.com", ["x@example.org"], message("bob@example.com", extra_headers=late_sender))
    assert_reply(r, 550, "5.7.1")
    # The same large header section with a colleague's From goes through.
    ok = filler(70 * 1024) + b"Sender: carol@example.com\r\n"
    assert_reply(transact(c, "bob@example.com", ["x@example.org"], message("bob@example.com", extra_headers=ok)), 250)
    (m,) = upstream.wait_messages(1)
    assert b"Sender: carol@example.com\r\n" in m.content


def test_precedence_bulk_after_64_kib_of_headers_diverts(config, mailgate, raw, upstream_factory):
    mailbox, bulk = upstream_factory(), upstream_factory()
    config.smtp_channel("alice", mailbox, senders=["alice@example.com"])
    config.smtp_channel("marketing", bulk, senders=None, domains=["example.com"])
    config.routing = {"bulk_channel": "marketing"}
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    headers = b"Precedence: normal\r\n" + filler(70 * 1024) + b"Precedence: bulk\r\n"
    assert_reply(transact(c, "alice@example.com", ["a@example.org"], message(extra_headers=headers)), 250)
    bulk.wait_messages(1)
    assert mailbox.messages == []


def test_precedence_bulk_after_64_kib_on_a_mailbox_without_bulk_channel_is_refused(config, mailgate, raw):
    config.file_channel("alice", senders=["alice@example.com"], scope="address")
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    headers = filler(70 * 1024) + b"Precedence: bulk\r\n"
    assert_reply(transact(c, "alice@example.com", ["a@example.org"], message(extra_headers=headers)), 550, "5.7.1")


def test_header_section_over_the_default_1mb_is_refused(config, mailgate, raw, upstream):
    config.smtp_channel("team", upstream, senders=None, domains=["example.com"])
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    r = transact(c, "bob@example.com", ["x@example.org"], message("bob@example.com", extra_headers=filler(1100 * 1024)))
    assert_reply(r, 552, "5.3.4")
    assert "1048576" in r.text, r
    # Just under the limit is fine; the session goes on.
    r = transact(c, "bob@example.com", ["x@example.org"], message("bob@example.com", extra_headers=filler(1000 * 1024)))
    assert_reply(r, 250)
    assert len(upstream.wait_messages(1)) == 1


def test_smaller_max_header_size_is_honoured_in_data_and_bdat(config, mailgate, raw, tmp_path):
    outbox = config.file_channel("outbox", senders=["*@example.com"])
    config.server["max_header_size"] = "64KB"
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    r = transact(c, "bob@example.com", ["x@example.org"], message("bob@example.com", extra_headers=filler(66 * 1024)))
    assert_reply(r, 552, "5.3.4")
    assert "65536" in r.text, r
    big_body = b"x" * 200_000 + b"\r\n"
    ok = message("bob@example.com", extra_headers=filler(60 * 1024), body=big_body)
    assert_reply(transact(c, "bob@example.com", ["x@example.org"], ok), 250)
    # BDAT: the same limit across chunks.
    too_big = message("bob@example.com", extra_headers=filler(66 * 1024))
    c.expect("MAIL FROM:<bob@example.com>", 250)
    c.expect("RCPT TO:<x@example.org>", 250)
    half = len(too_big) // 2
    c.send(b"BDAT %d\r\n" % half + too_big[:half])
    assert_reply(c.reply(), 250)
    c.send(b"BDAT %d LAST\r\n" % (len(too_big) - half) + too_big[half:])
    assert_reply(c.reply(), 552, "5.3.4")
    assert len(list(outbox.glob("*.eml"))) == 1


def test_authenticated_user_may_not_write_a_colleagues_from(config, mailgate):
    config.users.append(
        {"name": "billing-app", "password_hash": hash_password("s3cret"), "senders": ["billing@example.com"]}
    )
    outbox = config.file_channel("outbox", senders=None, domains=["example.com"])
    config.server["require_auth"] = True
    mg = mailgate(config)
    with smtp_client(mg.addr) as s:
        s.login("billing-app", "s3cret")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            s.sendmail("billing@example.com", ["bob@example.org"], message("ceo@example.com"))
        assert refused.value.smtp_code == 550 and refused.value.smtp_error.startswith(b"5.7.1"), refused.value
        assert b"billing-app" in refused.value.smtp_error
        with pytest.raises(smtplib.SMTPDataError):
            s.sendmail(
                "billing@example.com",
                ["bob@example.org"],
                message("billing@example.com", extra_headers=b"Sender: ceo@example.com\r\n"),
            )
        s.sendmail("billing@example.com", ["bob@example.org"], message("Billing <billing@example.com>"))
    assert len(list(outbox.glob("*.eml"))) == 1


def test_rcpt_to_postmaster_without_domain(config, mailgate, raw, upstream):
    config.smtp_channel("team", upstream, senders=["*"])
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<Postmaster>", 250, "2.1.5")
    c.expect("RCPT TO:<>", 501)
    c.expect("DATA", 354)
    c.send(message() + b".\r\n")
    assert_reply(c.reply(), 250)
    (m,) = upstream.wait_messages(1)
    assert m.rcpt_tos == ["Postmaster@mailgate.test"]
