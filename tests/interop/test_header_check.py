"""SPEC §4 / §5 header checks over the whole header section (issue 10): a From:, Sender:
or Precedence: far down a large header section still counts, a header section over
`max_header_size` is refused (552 5.3.4), never cut; an authenticated user's header
From must be one of its own senders; `RCPT TO:<Postmaster>` without a domain.
SPEC §4 last paragraph (issue 16): address headers that readers disagree on are refused
on every channel, checked against a second reader (Python's `email` package).

Clients: raw sockets and smtplib. Upstreams: aiosmtpd, `file` channels and a local
Graph stand-in.
"""

import smtplib
import time
from email import policy
from email.parser import BytesParser
from email.utils import getaddresses

import pytest

from conftest import assert_reply, hash_password, message, smtp_client, transact
from test_graph import MAILBOX, endpoint, graph, graph_channel, start  # noqa: F401 (fixtures)
from test_queue import queue_mode, submit


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


ADDRESS_FIELDS = ("From", "Sender", "To", "Cc", "Bcc")


def python_reading(raw: bytes) -> tuple[dict[str, set[str]], list]:
    """What Python's `email` package reads in each address field of `raw`: the addresses
    of `email.headerregistry` (policy.default) and of `email.utils.getaddresses` (on the
    raw values), plus display names holding an `@` (what a mail program shows), all
    lower-cased; and the message's parsing defects."""
    modern = BytesParser(policy=policy.default).parsebytes(raw)
    legacy = BytesParser(policy=policy.compat32).parsebytes(raw)
    found: dict[str, set[str]] = {f: set() for f in ADDRESS_FIELDS}
    for field in ADDRESS_FIELDS:
        for value in modern.get_all(field) or []:
            try:
                for a in value.addresses:
                    found[field].add(a.addr_spec.lower())
                    if "@" in a.display_name:
                        found[field].add(a.display_name.lower())
                for g in value.groups:
                    if g.display_name and "@" in g.display_name:
                        found[field].add(g.display_name.lower())
            except Exception:  # noqa: BLE001 - a reader that gives up counts as no reading
                pass
        for name, addr in getaddresses([str(v) for v in legacy.get_all(field) or []]):
            for text in (name, addr):
                if "@" in text:
                    found[field].add(text.lower())
    return found, list(modern.defects) + list(legacy.defects)


def outside(reading: dict[str, set[str]], senders: set[str], rcpts: set[str]) -> set[str]:
    """The addresses Python reads that are not the ones mailgate checked."""
    extra = set()
    for field, addrs in reading.items():
        allowed = senders if field in ("From", "Sender") else rcpts
        extra |= {a for a in addrs if a not in allowed}
    return extra


# Refused on every channel (SPEC §4 last paragraph), with the reason in the reply.
AMBIGUOUS = [
    (b"To: eve@evil.org:;\r\n", "To: group name holds an address (eve@evil.org)"),
    (b"To: eve@evil.org <bob@example.org>\r\n", "To: display name holds another address (eve@evil.org)"),
    (b"To: eve@evil.org: bob@example.org;\r\n", "To: group name holds an address (eve@evil.org)"),
    (b"To: bob@example.org\r\nX-Broken\r\n \r\nCc: eve@evil.org\r\n", "header line 5 is neither"),
    (b"To: =?utf-8?q?eve=40evil.org?= <bob@example.org>\r\n", "To: display name holds another address"),
    (b"To: bob@example.org\r\nCc: Bob\r\n <bob@example.org>,\r\n eve@evil.org <bob@example.org>\r\n",
     "Cc: display name holds another address (eve@evil.org)"),
]

# Accepted: odd but unambiguous; Python must read no address mailgate did not check.
UNAMBIGUOUS = [
    b"To: bob@example.org <bob@example.org>\r\n",
    b"To: \"Doe, John\" <bob@example.org>\r\n",
    b"To: team: bob@example.org;\r\nCc: undisclosed-recipients:;\r\n",
    b"To: =?utf-8?q?B=C3=B6b?= <bob@example.org>\r\n",
    b"To: Bob\r\n <bob@example.org> (Bob at work)\r\n",
]


def ambiguous_message(sender: str, headers: bytes) -> bytes:
    return f"From: {sender}\r\nSubject: x\r\nMessage-ID: <{time.monotonic_ns()}@client.test>\r\n".encode() + (
        headers + b"\r\nHello.\r\n"
    )


@pytest.mark.parametrize("mode", ["relay", "queue"])
def test_ambiguous_address_headers_never_reach_graph(config, mailgate, endpoint, graph, mode):  # noqa: F811
    # Issue 16: with only RCPT TO:<bob@example.org>, each was accepted and sent to Graph.
    if mode == "queue":
        queue_mode(config)
    graph_channel(config, endpoint, graph)
    config.server["check_header_from"] = False
    mg = start(mailgate, config)
    senders, rcpts = {MAILBOX}, {"bob@example.org"}
    for headers, why in AMBIGUOUS:
        m = ambiguous_message(MAILBOX, headers)
        code, text = submit(mg.addr, MAILBOX, ["bob@example.org"], m)
        assert code == 550 and text.startswith("5.7.1") and why in text, (headers, code, text)
        # The second reader: Python reads eve, or reads the section differently (a defect).
        reading, defects = python_reading(m)
        assert outside(reading, senders, rcpts) or defects, (headers, reading)
    for headers in UNAMBIGUOUS:
        m = ambiguous_message(MAILBOX, headers)
        code, text = submit(mg.addr, MAILBOX, ["bob@example.org"], m)
        assert code == 250, (headers, code, text)
    sent = graph.wait_sent(len(UNAMBIGUOUS))
    time.sleep(1.5 if mode == "queue" else 0.2)
    assert len(graph.sent) == len(UNAMBIGUOUS), "nothing refused was queued or sent"
    for s in sent:
        reading, _ = python_reading(s.mime)
        assert outside(reading, senders, rcpts) == set(), (s.mime, reading)


@pytest.mark.parametrize("headers_on", [True, False])
def test_a_from_display_name_holding_another_address_is_refused(config, mailgate, raw, upstream, headers_on):
    # Issue 16: it passed the From check on a channel scoped to example.com, and mail
    # programs show ceo@othercorp.com.
    config.smtp_channel("team", upstream, senders=None, domains=["example.com"])
    config.server["check_header_from"] = headers_on
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    spoof = message("ceo@othercorp.com <app@example.com>")
    r = transact(c, "app@example.com", ["bob@example.org"], spoof)
    assert_reply(r, 550, "5.7.1")
    assert "From: display name holds another address (ceo@othercorp.com)" in r.text, r
    reading, _ = python_reading(spoof)
    assert "ceo@othercorp.com" in outside(reading, {"app@example.com"}, {"bob@example.org"}), reading
    # The entry's own address as its display name is unambiguous, and Python agrees.
    fine = message("scan@example.com <scan@example.com>")
    assert_reply(transact(c, "scan@example.com", ["bob@example.org"], fine), 250)
    (m,) = upstream.wait_messages(1)
    reading, _ = python_reading(m.content)
    assert outside(reading, {"scan@example.com"}, {"bob@example.org"}) == set(), reading
