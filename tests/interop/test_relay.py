"""Relay delivery (SPEC §5 relay rows, §6 relay, §7) with real peers.

Upstreams: aiosmtpd (plain, STARTTLS from a test CA, implicit TLS, AUTH) and Postfix's
smtp-sink. Clients: raw sockets, smtplib, swaks, curl.
"""

import hashlib
import os
import shutil
import subprocess
import threading

import pytest

from conftest import (
    IO_TIMEOUT,
    Raw,
    assert_reply,
    free_port,
    message,
    smtp_client,
    split_addr,
    transact,
)

TRICKY = (
    b"From: alice@example.com\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n"
    b"X-Folded: first\r\n\tsecond\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"...\r\n"
    b" . \r\n"
    b"trailing spaces   \r\n"
    b"tab\there\r\n"
    b"\xc3\xa4\xc3\xb6\xc3\xbc 8-bit UTF-8\r\n"
    b"\r\n"
    b"\r\n"
    + b"L" * 5000
    + b"\r\n"
    b"last line\r\n"
)


def relay_to(config, mailgate, upstream, name="up", **channel):
    config.smtp_channel(name, upstream, **channel)
    return mailgate(config)


def test_exact_bytes_arrive_raw_client(config, mailgate, raw, upstream):
    mg = relay_to(config, mailgate, upstream)
    c = raw(mg.addr)
    c.greet()
    assert_reply(transact(c, "alice@example.com", ["bob@example.org"], TRICKY), 250)
    (m,) = upstream.wait_messages(1)
    assert m.content == TRICKY
    assert m.mail_from == "alice@example.com"
    assert m.rcpt_tos == ["bob@example.org"]


def test_exact_bytes_arrive_smtplib(config, mailgate, upstream):
    mg = relay_to(config, mailgate, upstream)
    with smtp_client(mg.addr) as s:
        s.sendmail("alice@example.com", ["bob@example.org", "carol@example.org"], TRICKY)
    (m,) = upstream.wait_messages(1)
    assert m.content == TRICKY
    assert m.rcpt_tos == ["bob@example.org", "carol@example.org"]


def test_upstream_reply_is_passed_on_with_channel_name(config, mailgate, raw, upstream):
    mg = relay_to(config, mailgate, upstream, name="upchan")
    c = raw(mg.addr)
    c.greet()
    r = transact(c, "alice@example.com", ["bob@example.org"], message())
    assert_reply(r, 250)
    assert "upchan" in r.text, f"reply does not name the channel: {r}"


@pytest.mark.parametrize(
    "stage,reply",
    [
        ("data", "550 5.1.1 no such user"),
        ("data", "452 4.2.2 mailbox full"),
        ("data", "554 5.6.0 content rejected"),
        ("rcpt", "550 5.1.1 no such user"),
        ("mail", "553 5.7.1 sender rejected"),
    ],
)
def test_upstream_refusal_is_passed_on(config, mailgate, raw, upstream, stage, reply):
    setattr(upstream.handler, f"{stage}_reply", reply)
    mg = relay_to(config, mailgate, upstream, name="upchan")
    c = raw(mg.addr)
    c.greet()
    r = transact(c, "alice@example.com", ["bob@example.org"], message())
    code, enhanced = reply.split()[:2]
    assert_reply(r, int(code), enhanced)
    assert "upchan" in r.text, f"reply does not name the channel: {r}"
    assert upstream.messages == []
    # the session is still usable
    c.expect("RSET", 250)


def test_upstream_unreachable(config, mailgate, raw, upstream):
    port = free_port()  # nothing listens there
    upstream.port = port
    mg = relay_to(config, mailgate, upstream)
    c = raw(mg.addr)
    c.greet()
    assert_reply(transact(c, "alice@example.com", ["bob@example.org"], message()), 451, "4.4.1")


def test_hundred_recipients(config, mailgate, raw, upstream):
    mg = relay_to(config, mailgate, upstream)
    rcpts = [f"r{i:03d}@example.org" for i in range(100)]
    c = raw(mg.addr)
    c.greet()
    assert_reply(transact(c, "alice@example.com", rcpts, message()), 250)
    (m,) = upstream.wait_messages(1)
    assert m.rcpt_tos == rcpts


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ten_megabyte_message_arrives_intact(config, mailgate, upstream):
    mg = relay_to(config, mailgate, upstream)
    rnd = os.urandom(7_700_000)
    import base64

    b64 = base64.encodebytes(rnd).replace(b"\n", b"\r\n")
    msg = message(body=b"." + b64[:-2] + b"\r\n.x\r\n")
    assert len(msg) > 10_000_000
    with smtp_client(mg.addr) as s:
        s.timeout = 120
        s.sock.settimeout(120)
        s.sendmail("alice@example.com", ["bob@example.org"], msg)
    (m,) = upstream.wait_messages(1, timeout=60)
    assert len(m.content) == len(msg)
    assert hashlib.sha256(m.content).hexdigest() == hashlib.sha256(msg).hexdigest()


def test_two_senders_in_one_session_go_to_two_upstreams(config, mailgate, raw, upstream_factory):
    a, b = upstream_factory(), upstream_factory()
    config.smtp_channel("alice", a, senders=["alice@example.com"])
    config.smtp_channel("team", b, senders=None, domains=["example.net"])
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    m1 = message("alice@example.com", subject="one")
    m2 = message("bob@example.net", subject="two")
    assert_reply(transact(c, "alice@example.com", ["x@example.org"], m1), 250)
    assert_reply(transact(c, "bob@example.net", ["y@example.org"], m2), 250)
    c.expect("QUIT", 221)
    (ma,) = a.wait_messages(1)
    (mb,) = b.wait_messages(1)
    assert (ma.mail_from, ma.rcpt_tos, ma.content) == ("alice@example.com", ["x@example.org"], m1)
    assert (mb.mail_from, mb.rcpt_tos, mb.content) == ("bob@example.net", ["y@example.org"], m2)


def test_most_specific_channel_wins(config, mailgate, raw, upstream_factory):
    exact, domain, pattern, anyone = (upstream_factory() for _ in range(4))
    config.smtp_channel("exact", exact, senders=["boss@example.com"])
    config.smtp_channel("domain", domain, senders=None, domains=["example.com"])
    config.smtp_channel("pattern", pattern, senders=["*@example.net"])
    config.smtp_channel("anyone", anyone, senders=["*"])
    config.server["check_header_from"] = False
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    cases = [
        ("boss@example.com", exact),
        ("boss@Example.COM", exact),
        ("someone@example.com", domain),
        ("x@example.net", pattern),
        ("x@elsewhere.org", anyone),
    ]
    for sender, _ in cases:
        assert_reply(transact(c, sender, ["r@example.org"], message(sender)), 250)
    assert [m.mail_from for m in exact.wait_messages(2)] == ["boss@example.com", "boss@Example.COM"]
    assert [m.mail_from for m in domain.wait_messages(1)] == ["someone@example.com"]
    assert [m.mail_from for m in pattern.wait_messages(1)] == ["x@example.net"]
    assert [m.mail_from for m in anyone.wait_messages(1)] == ["x@elsewhere.org"]


def test_starttls_and_auth_plain_upstream_with_password_env(config, mailgate, raw, upstream_factory, certs):
    up = upstream_factory(certs=certs, starttls=True, users={"relay-user": "pa55:word"}, auth_required=True)
    config.env["TEST_RELAY_PW"] = "pa55:word"
    mg = relay_to(config, mailgate, up, username="relay-user", password_env="TEST_RELAY_PW")
    c = raw(mg.addr)
    c.greet()
    assert_reply(transact(c, "alice@example.com", ["bob@example.org"], TRICKY), 250)
    (m,) = up.wait_messages(1)
    assert m.tls, "upstream session was not encrypted"
    assert m.login == ("relay-user", "pa55:word")
    assert up.handler.logins[-1][0] == "PLAIN"
    assert m.content == TRICKY
    assert "pa55:word" not in mg.log(), "password appears in the log"


def test_auth_upstream_with_password_file(config, mailgate, raw, upstream_factory, certs, tmp_path):
    up = upstream_factory(certs=certs, starttls=True, users={"u": "from-file"}, auth_required=True)
    pw = tmp_path / "relay.pw"
    pw.write_text("from-file\n")
    mg = relay_to(config, mailgate, up, username="u", password_file=str(pw))
    c = raw(mg.addr)
    c.greet()
    assert_reply(transact(c, "alice@example.com", ["bob@example.org"], message()), 250)
    (m,) = up.wait_messages(1)
    assert m.login == ("u", "from-file")


def test_auth_login_when_upstream_offers_only_login(config, mailgate, raw, upstream_factory, certs):
    up = upstream_factory(certs=certs, starttls=True, users={"u": "pw-login"}, auth_required=True,
                          auth_exclude=["PLAIN"])
    config.env["UP_PW"] = "pw-login"
    mg = relay_to(config, mailgate, up, username="u", password_env="UP_PW")
    c = raw(mg.addr)
    c.greet()
    assert_reply(transact(c, "alice@example.com", ["bob@example.org"], message()), 250)
    (m,) = up.wait_messages(1)
    assert m.login == ("u", "pw-login")
    assert up.handler.logins[-1][0] == "LOGIN"


def test_implicit_tls_upstream(config, mailgate, raw, upstream_factory, certs):
    up = upstream_factory(certs=certs, implicit_tls=True)
    mg = relay_to(config, mailgate, up)
    c = raw(mg.addr)
    c.greet()
    assert_reply(transact(c, "alice@example.com", ["bob@example.org"], TRICKY), 250)
    (m,) = up.wait_messages(1)
    assert m.tls and m.content == TRICKY


def test_upstream_auth_failure_is_temporary(config, mailgate, raw, upstream_factory, certs):
    up = upstream_factory(certs=certs, starttls=True, users={"relay-user": "right"}, auth_required=True)
    config.env["TEST_RELAY_PW"] = "wrong-password"
    mg = relay_to(config, mailgate, up, username="relay-user", password_env="TEST_RELAY_PW")
    c = raw(mg.addr)
    c.greet()
    assert_reply(transact(c, "alice@example.com", ["bob@example.org"], message()), 454, "4.7.0")
    assert up.messages == []
    assert "wrong-password" not in mg.log(), "password appears in the log"


def test_untrusted_upstream_certificate_is_temporary(config, mailgate, raw, upstream_factory, certs):
    up = upstream_factory(certs=certs, starttls=True)
    up.ca_file = None  # mailgate is not told about the test CA
    mg = relay_to(config, mailgate, up)
    c = raw(mg.addr)
    c.greet()
    assert_reply(transact(c, "alice@example.com", ["bob@example.org"], message()), 454, "4.7.0")
    assert up.messages == []


def test_no_plaintext_fallback_when_upstream_lacks_starttls(config, mailgate, raw, upstream, certs):
    upstream.tls_mode = "starttls"
    upstream.ca_file = certs.ca_file
    mg = relay_to(config, mailgate, upstream)
    c = raw(mg.addr)
    c.greet()
    assert_reply(transact(c, "alice@example.com", ["bob@example.org"], message()), 454, "4.7.0")
    assert upstream.messages == []


def test_channel_rate_reached(config, mailgate, raw, upstream):
    mg = relay_to(config, mailgate, upstream, rate="1/min")
    c = raw(mg.addr)
    c.greet()
    assert_reply(transact(c, "alice@example.com", ["bob@example.org"], message()), 250)
    assert_reply(transact(c, "alice@example.com", ["bob@example.org"], message()), 451, "4.7.0")
    assert len(upstream.messages) == 1


def test_channel_max_recipients_from_preset_limits(config, mailgate, raw, upstream):
    """A channel's own max_recipients (provider limit) is enforced too."""
    mg = relay_to(config, mailgate, upstream, max_recipients=3)
    c = raw(mg.addr)
    c.greet()
    r = transact(c, "alice@example.com", [f"r{i}@example.org" for i in range(5)], message())
    # either refused at RCPT (452 4.5.3) or split into several upstream transactions
    if r.code == 250:
        msgs = upstream.wait_messages(2)
        assert sorted(x for m in msgs for x in m.rcpt_tos) == [f"r{i}@example.org" for i in range(5)]
        assert all(len(m.rcpt_tos) <= 3 for m in msgs)
    else:
        assert_reply(r, 452, "4.5.3")


def test_upstream_connections_are_capped(config, mailgate, upstream):
    upstream.handler.data_delay = 1.0
    mg = relay_to(config, mailgate, upstream, connections=2)
    errors = []

    def client(i):
        try:
            with smtp_client(mg.addr) as s:
                s.sendmail("alice@example.com", [f"r{i}@example.org"], message())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(IO_TIMEOUT * 2)
    assert errors == []
    assert len(upstream.wait_messages(5)) == 5
    # never more than the cap, and the cap is used (5 clients, 1 s per upstream DATA)
    assert upstream.handler.max_in_data == 2, f"{upstream.handler.max_in_data} upstream transactions at once"


def test_smtputf8_sender_passes_through(config, mailgate, upstream):
    mg = relay_to(config, mailgate, upstream)
    msg = "From: jörg@exämple.org\r\nTo: zoë@example.org\r\nSubject: ü\r\n\r\nGrüße\r\n".encode()
    with smtp_client(mg.addr) as s:
        s.ehlo()
        assert s.has_extn("smtputf8")
        s.sendmail("jörg@exämple.org", ["zoë@example.org"], msg, mail_options=["SMTPUTF8"])
    (m,) = upstream.wait_messages(1)
    assert m.mail_from == "jörg@exämple.org"
    assert m.rcpt_tos == ["zoë@example.org"]
    assert "SMTPUTF8" in [o.upper() for o in m.mail_options]
    assert m.content == msg


def test_8bitmime_body_passes_through(config, mailgate, upstream):
    mg = relay_to(config, mailgate, upstream)
    msg = message(body="Grüße aus Köln\r\n".encode())
    with smtp_client(mg.addr) as s:
        s.sendmail("alice@example.com", ["bob@example.org"], msg, mail_options=["BODY=8BITMIME"])
    (m,) = upstream.wait_messages(1)
    assert m.content == msg
    assert "BODY=8BITMIME" in [o.upper() for o in m.mail_options]


def test_bdat_chunks(config, mailgate, raw, upstream):
    mg = relay_to(config, mailgate, upstream)
    c = raw(mg.addr)
    r = c.greet()
    assert "CHUNKING" in [line.upper() for line in r.lines]
    part1 = b"From: alice@example.com\r\nSubject: bdat\r\n\r\nfirst\r\n.\r\n"
    part2 = b"..not stuffed\r\nlast\r\n"
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<bob@example.org>", 250)
    c.send(b"BDAT %d\r\n" % len(part1) + part1)
    assert_reply(c.reply(), 250)
    c.send(b"BDAT %d\r\n" % len(part2) + part2)
    assert_reply(c.reply(), 250)
    c.send(b"BDAT 0 LAST\r\n")
    assert_reply(c.reply(), 250)
    (m,) = upstream.wait_messages(1)
    assert m.content == part1 + part2


def test_bdat_single_last_chunk(config, mailgate, raw, upstream):
    mg = relay_to(config, mailgate, upstream)
    c = raw(mg.addr)
    c.greet()
    body = message()
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<bob@example.org>", 250)
    c.send(b"BDAT %d LAST\r\n" % len(body) + body)
    assert_reply(c.reply(), 250)
    (m,) = upstream.wait_messages(1)
    assert m.content == body


def test_smtp_sink_as_upstream(config, mailgate, smtp_sink):
    config.smtp_channel("sink", smtp_sink)
    mg = mailgate(config)
    msg = message(body=b".dot line\r\nbody\r\n")
    with smtp_client(mg.addr) as s:
        s.sendmail("alice@example.com", ["bob@example.org", "carol@example.org"], msg)
    import time

    deadline = time.monotonic() + 10
    while not smtp_sink.dumps() and time.monotonic() < deadline:
        time.sleep(0.1)
    (dump,) = smtp_sink.dumps()
    assert b"X-Mail-Args: <alice@example.com>" in dump
    assert b"X-Rcpt-Args: <bob@example.org>" in dump and b"X-Rcpt-Args: <carol@example.org>" in dump
    # smtp-sink stores lines with LF endings
    assert msg.replace(b"\r\n", b"\n") in dump


@pytest.mark.skipif(not shutil.which("swaks"), reason="swaks not installed")
@pytest.mark.parametrize("extra", [[], ["--pipeline"]], ids=["plain", "pipeline"])
def test_swaks_client(config, mailgate, upstream, extra):
    mg = relay_to(config, mailgate, upstream)
    host, port = split_addr(mg.addr)
    p = subprocess.run(
        ["swaks", "--server", host, "--port", str(port), "--from", "alice@example.com",
         "--to", "bob@example.org", "--header", "Subject: via swaks", "--body", ".dot\nline", *extra],
        capture_output=True, text=True, timeout=30,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    (m,) = upstream.wait_messages(1)
    assert m.mail_from == "alice@example.com" and m.rcpt_tos == ["bob@example.org"]
    assert b"Subject: via swaks" in m.content and b"\r\n.dot\r\nline\r\n" in m.content


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
def test_curl_client(config, mailgate, upstream, tmp_path):
    mg = relay_to(config, mailgate, upstream)
    msg = message(body=b".dot\r\nline\r\n")
    f = tmp_path / "msg.eml"
    f.write_bytes(msg)
    p = subprocess.run(
        ["curl", "-sS", "--max-time", "20", f"smtp://{mg.addr}/client.test",
         "--mail-from", "alice@example.com", "--mail-rcpt", "bob@example.org",
         "--mail-rcpt", "carol@example.org", "--upload-file", str(f)],
        capture_output=True, text=True, timeout=30,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    (m,) = upstream.wait_messages(1)
    assert m.content == msg
    assert m.rcpt_tos == ["bob@example.org", "carol@example.org"]


def test_file_channel_writes_message_and_envelope(config, mailgate, raw):
    d = config.file_channel("outbox")
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    assert_reply(transact(c, "alice@example.com", ["bob@example.org", "carol@example.org"], TRICKY), 250)
    (eml,) = sorted(d.glob("*.eml"))
    assert eml.read_bytes() == TRICKY
    env = eml.with_suffix(".envelope").read_text()
    for a in ["alice@example.com", "bob@example.org", "carol@example.org"]:
        assert a in env
    assert not [p for p in d.iterdir() if p.suffix not in (".eml", ".envelope")], list(d.iterdir())


def test_many_messages_one_session(config, mailgate, upstream):
    mg = relay_to(config, mailgate, upstream)
    with smtp_client(mg.addr) as s:
        for i in range(20):
            s.sendmail("alice@example.com", [f"r{i}@example.org"], message(subject=f"n{i}"))
    msgs = upstream.wait_messages(20)
    assert [m.rcpt_tos[0] for m in msgs] == [f"r{i}@example.org" for i in range(20)]


def test_parallel_sessions(config, mailgate, upstream):
    mg = relay_to(config, mailgate, upstream)
    errors = []

    def client(i):
        try:
            c = Raw(mg.addr)
            c.greet()
            for j in range(5):
                r = transact(c, "alice@example.com", [f"r{i}-{j}@example.org"], message())
                assert r is not None and r.code == 250, str(r)
            c.cmd("QUIT")
            c.close()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(upstream.wait_messages(50)) == 50


def test_recipients_per_day_quota_reached(config, mailgate, raw, upstream):
    mg = relay_to(config, mailgate, upstream, recipients_per_day=2)
    c = raw(mg.addr)
    c.greet()
    assert_reply(transact(c, "alice@example.com", ["a@example.org", "b@example.org"], message()), 250)
    assert_reply(transact(c, "alice@example.com", ["c@example.org"], message()), 451, "4.7.0")
    assert len(upstream.messages) == 1


@pytest.mark.parametrize("how", ["recipients", "precedence"])
def test_bulk_mail_goes_to_the_bulk_channel(config, mailgate, raw, upstream_factory, how):
    mailbox, bulk = upstream_factory(), upstream_factory()
    config.smtp_channel("alice", mailbox, senders=["alice@example.com"])
    config.smtp_channel("marketing", bulk, senders=None, domains=["example.com"])
    config.routing = {"bulk_channel": "marketing", "bulk_recipients": 2}
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    assert_reply(transact(c, "alice@example.com", ["a@example.org"], message()), 250)
    if how == "recipients":
        rcpts, extra = ["a@example.org", "b@example.org", "c@example.org"], b""
    else:
        rcpts, extra = ["a@example.org"], b"Precedence: bulk\r\n"
    assert_reply(transact(c, "alice@example.com", rcpts, message(extra_headers=extra)), 250)
    assert len(mailbox.wait_messages(1)) == 1
    (m,) = bulk.wait_messages(1)
    assert m.rcpt_tos == rcpts
