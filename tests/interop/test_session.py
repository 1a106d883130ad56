"""SMTP front end against SPEC §5: greeting, EHLO, the reply table, legacy syntax.

Clients: raw sockets (exact bytes) and Python's smtplib. Upstream: a `file` channel
or aiosmtpd, as each test needs.
"""

import smtplib
import time

import pytest

from conftest import Raw, assert_reply, hash_password, message, smtp_client


def start_file(config, mailgate, senders=("*",), **server):
    """mailgate with one catch-all file channel; returns (running, outbox dir)."""
    outbox = config.file_channel("outbox", senders=senders)
    config.server.update(server)
    return mailgate(config), outbox


def eml_files(d):
    return sorted(d.glob("*.eml"))


def test_greeting(config, mailgate, raw):
    mg, _ = start_file(config, mailgate)
    r = raw(mg.addr).reply()
    assert_reply(r, 220)
    assert r.lines[0].startswith("mailgate.test ESMTP mailgate"), str(r)


def test_ehlo_advertises_extensions(config, mailgate, raw):
    mg, _ = start_file(config, mailgate, max_message_size=12345)
    r = raw(mg.addr).greet()
    keywords = [line.split()[0].upper() for line in r.lines[1:]]
    for ext in ["PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING"]:
        assert ext in keywords, f"{ext} missing from EHLO: {r}"
    assert any(line.upper() == "SIZE 12345" for line in r.lines), f"SIZE 12345 missing: {r}"
    assert "STARTTLS" not in keywords, f"STARTTLS offered without tls configured: {r}"
    assert "AUTH" not in keywords, f"AUTH offered without [[users]]: {r}"
    assert r.lines[0].startswith("mailgate.test"), str(r)


def test_smtplib_sends_to_file_channel(config, mailgate):
    mg, outbox = start_file(config, mailgate)
    msg = message()
    with smtp_client(mg.addr) as s:
        refused = s.sendmail("alice@example.com", ["bob@example.org"], msg)
        assert refused == {}
    files = eml_files(outbox)
    assert len(files) == 1
    assert files[0].read_bytes() == msg
    envelope = files[0].with_suffix(".envelope").read_text()
    assert "alice@example.com" in envelope and "bob@example.org" in envelope


def test_sender_without_channel_is_refused(config, mailgate, raw):
    mg, _ = start_file(config, mailgate, senders=["alice@example.com"])
    c = raw(mg.addr)
    c.greet()
    c.expect("MAIL FROM:<mallory@example.net>", 550, "5.7.1")
    c.expect("MAIL FROM:<alice@example.com>", 250)


def test_require_auth_refuses_mail_before_auth(config, mailgate, raw):
    config.users.append({"name": "app", "password_hash": hash_password("s3cret"), "senders": ["*"]})
    mg, _ = start_file(config, mailgate, require_auth=True)
    c = raw(mg.addr)
    c.greet()
    c.expect("MAIL FROM:<alice@example.com>", 530, "5.7.0")


def test_auth_advertised_on_loopback_with_users(config, mailgate, raw):
    config.users.append({"name": "app", "password_hash": hash_password("s3cret"), "senders": ["*"]})
    mg, _ = start_file(config, mailgate)
    r = raw(mg.addr).greet()
    auth = [line.upper().split() for line in r.lines if line.upper().startswith("AUTH")]
    assert auth, f"AUTH not advertised: {r}"
    assert "PLAIN" in auth[0] and "LOGIN" in auth[0], str(r)


def test_authenticated_user_with_own_and_foreign_sender(config, mailgate):
    config.users.append(
        {"name": "billing-app", "password_hash": hash_password("s3cret"), "senders": ["billing@example.com"]}
    )
    mg, outbox = start_file(config, mailgate, require_auth=True)
    with smtp_client(mg.addr) as s:
        s.login("billing-app", "s3cret")
        code, text = s.mail("ceo@example.com")
        assert (code, text[:5]) == (550, b"5.7.1"), (code, text)
        s.rset()
        s.sendmail("billing@example.com", ["bob@example.org"], message("billing@example.com"))
    assert len(eml_files(outbox)) == 1


def test_auth_with_wrong_password_fails(config, mailgate):
    config.users.append({"name": "app", "password_hash": hash_password("s3cret"), "senders": ["*"]})
    mg, _ = start_file(config, mailgate, require_auth=True)
    with smtp_client(mg.addr) as s:
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("app", "wrong")
        assert e.value.smtp_code == 535


def test_auth_login_mechanism(config, mailgate, raw):
    import base64

    config.users.append({"name": "app", "password_hash": hash_password("s3cret"), "senders": ["*"]})
    mg, _ = start_file(config, mailgate, require_auth=True)
    c = raw(mg.addr)
    c.greet()
    c.expect("AUTH LOGIN", 334)
    c.expect(base64.b64encode(b"app"), 334)
    c.expect(base64.b64encode(b"s3cret"), 235)
    c.expect("MAIL FROM:<a@example.com>", 250)


def test_size_parameter_over_maximum(config, mailgate, raw):
    mg, _ = start_file(config, mailgate, max_message_size=1000)
    c = raw(mg.addr)
    c.greet()
    c.expect("MAIL FROM:<alice@example.com> SIZE=1001", 552, "5.3.4")
    c.expect("MAIL FROM:<alice@example.com> SIZE=900", 250)


def test_body_over_maximum(config, mailgate, raw):
    mg, outbox = start_file(config, mailgate, max_message_size=1000)
    c = raw(mg.addr)
    c.greet()
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<bob@example.org>", 250)
    c.expect("DATA", 354)
    c.send(message(body=b"x" * 70 + b"\r\n") * 1 + (b"y" * 78 + b"\r\n") * 30 + b".\r\n")
    assert_reply(c.reply(), 552, "5.3.4")
    assert eml_files(outbox) == []
    # the session goes on
    c.expect("NOOP", 250)


def test_too_many_recipients(config, mailgate, raw):
    mg, _ = start_file(config, mailgate, max_recipients=2)
    c = raw(mg.addr)
    c.greet()
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<b1@example.org>", 250)
    c.expect("RCPT TO:<b2@example.org>", 250)
    c.expect("RCPT TO:<b3@example.org>", 452, "4.5.3")


def test_unknown_command(config, mailgate, raw):
    mg, _ = start_file(config, mailgate)
    c = raw(mg.addr)
    c.greet()
    c.expect("FROBNICATE now", 500, "5.5.2")


@pytest.mark.parametrize(
    "line",
    ["MAIL FROM:<alice@example.com> SIZE=lots", "RCPT", "MAIL FROM:<alice@example.com> BODY=9BIT"],
)
def test_bad_parameters(config, mailgate, raw, line):
    mg, _ = start_file(config, mailgate)
    c = raw(mg.addr)
    c.greet()
    if line.startswith("RCPT"):
        c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect(line, 501, "5.5.4")


@pytest.mark.parametrize("sequence", [["RCPT TO:<b@example.org>"], ["MAIL FROM:<a@example.com>", "DATA"],
                                      ["MAIL FROM:<a@example.com>", "MAIL FROM:<a@example.com>"],
                                      ["BDAT 5 LAST"]])
def test_bad_sequence(config, mailgate, raw, sequence):
    mg, _ = start_file(config, mailgate)
    c = raw(mg.addr)
    c.greet()
    for line in sequence[:-1]:
        c.expect(line, 250)
    if sequence[-1].startswith("BDAT"):
        c.send(b"BDAT 5 LAST\r\nhello")
        assert_reply(c.reply(), 503, "5.5.1")
    else:
        c.expect(sequence[-1], 503, "5.5.1")


def test_ten_errors_close_the_session(config, mailgate, raw):
    mg, _ = start_file(config, mailgate)
    c = raw(mg.addr)
    c.greet()
    replies = []
    for _ in range(11):
        try:
            r = c.cmd("BOGUS")
        except (ConnectionResetError, BrokenPipeError):
            r = None
        if r is None:
            break
        replies.append(r)
        if r.code == 421:
            break
    codes = [r.code for r in replies]
    assert replies and replies[-1].code == 421 and replies[-1].enhanced == "4.7.0", codes
    assert codes[:-1] == [500] * len(codes[:-1]) and len(codes) >= 10, codes
    assert c.closed(), "connection still open after 421"


def test_header_from_not_allowed_on_channel(config, mailgate, raw, upstream):
    config.smtp_channel("alice", upstream, senders=["alice@example.com"])
    config.server["check_header_from"] = True
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<bob@example.org>", 250)
    c.expect("DATA", 354)
    c.send(message(sender="ceo@example.com") + b".\r\n")
    assert_reply(c.reply(), 550, "5.7.1")
    # the same message with an allowed From goes through
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<bob@example.org>", 250)
    c.expect("DATA", 354)
    c.send(message(sender="Alice <ALICE@Example.COM>") + b".\r\n")
    assert_reply(c.reply(), 250)
    assert len(upstream.messages) == 1


def test_sender_header_checked_too(config, mailgate, raw, upstream):
    config.smtp_channel("alice", upstream, senders=["alice@example.com"])
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<bob@example.org>", 250)
    c.expect("DATA", 354)
    c.send(message(extra_headers=b"Sender: other@example.net\r\n") + b".\r\n")
    assert_reply(c.reply(), 550, "5.7.1")
    assert upstream.messages == []


def test_bare_lf_rejected(config, mailgate, raw):
    mg, outbox = start_file(config, mailgate, bare_lf="reject")
    c = raw(mg.addr)
    c.greet()
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<bob@example.org>", 250)
    c.expect("DATA", 354)
    c.send(message(body=b"line one\nline two\r\n") + b".\r\n")
    assert_reply(c.reply(), 550, "5.6.11")
    assert eml_files(outbox) == []


def test_bare_lf_normalized(config, mailgate, raw, upstream):
    config.smtp_channel("up", upstream)
    config.server["bare_lf"] = "normalize"
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<bob@example.org>", 250)
    c.expect("DATA", 354)
    head = message(body=b"")
    c.send(head + b"one\ntwo\rthree\r\n.\r\n")
    assert_reply(c.reply(), 250)
    (m,) = upstream.wait_messages(1)
    assert m.content == head + b"one\r\ntwo\r\nthree\r\n"


def test_idle_timeout(config, mailgate, raw):
    mg, _ = start_file(config, mailgate, idle_timeout="2s")
    c = raw(mg.addr)
    c.greet()
    t0 = time.monotonic()
    r = c.reply()
    assert_reply(r, 421, "4.4.2")
    assert 1.5 <= time.monotonic() - t0 <= 10
    assert c.closed()


def test_rset_noop_vrfy_help_quit(config, mailgate, raw):
    mg, _ = start_file(config, mailgate)
    c = raw(mg.addr)
    c.greet()
    c.expect("NOOP", 250)
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RSET", 250)
    c.expect("RCPT TO:<bob@example.org>", 503, "5.5.1")  # RSET cleared the transaction
    c.expect("VRFY bob", 252)
    c.expect("QUIT", 221)
    assert c.closed()


def test_legacy_syntax_is_accepted(config, mailgate, raw):
    mg, outbox = start_file(config, mailgate)
    c = raw(mg.addr)
    assert_reply(c.reply(), 220)
    c.expect("helo oldclient", 250)
    c.expect("mail from: <alice@example.com>", 250)
    c.expect("rcpt to: <bob@example.org>", 250)
    c.expect("RCPT TO:carol@example.org", 250)
    c.expect("data", 354)
    c.send(message() + b".\r\n")
    assert_reply(c.reply(), 250)
    c.expect("MAIL FROM:alice@example.com", 250)
    c.expect("Rcpt To:<dave@example.org>", 250)
    c.expect("DaTa", 354)
    c.send(message() + b".\r\n")
    assert_reply(c.reply(), 250)
    c.expect("quit", 221)
    files = eml_files(outbox)
    assert len(files) == 2
    envelopes = " ".join(f.with_suffix(".envelope").read_text() for f in files)
    for addr in ["bob@example.org", "carol@example.org", "dave@example.org"]:
        assert addr in envelopes


def test_helo_only_client_with_smtplib(config, mailgate):
    mg, outbox = start_file(config, mailgate)
    with smtp_client(mg.addr) as s:
        s.helo("legacy.test")
        s.sendmail("alice@example.com", ["bob@example.org"], message())
    assert len(eml_files(outbox)) == 1


def test_pipelined_transaction(config, mailgate, raw):
    mg, outbox = start_file(config, mailgate)
    c = raw(mg.addr)
    c.greet()
    c.send(
        b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<b1@example.org>\r\n"
        b"RCPT TO:<b2@example.org>\r\nDATA\r\n"
    )
    for code in (250, 250, 250, 354):
        assert_reply(c.reply(), code)
    c.send(message() + b".\r\nNOOP\r\n")
    assert_reply(c.reply(), 250)
    assert_reply(c.reply(), 250)
    assert len(eml_files(outbox)) == 1


@pytest.mark.parametrize(
    "sent,content",
    [(b"..starts with a dot\r\n.\r\n", b".starts with a dot\r\n"), (b".\r\n", b""),
     (b"..\r\n.\r\n", b".\r\n"), (b"x\r\n..\r\n.\r\n", b"x\r\n.\r\n")],
    ids=["stuffed-first-line", "empty", "dot-line-first", "dot-line-later"],
)
def test_dot_stuffing_at_the_start_of_the_message(config, mailgate, raw, upstream, sent, content):
    """`.` right after DATA (empty message) and a dot-stuffed first line (smtp-proto's edge cases)."""
    config.smtp_channel("up", upstream)
    config.server["check_header_from"] = False
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<bob@example.org>", 250)
    c.expect("DATA", 354)
    c.send(sent)
    r = c.reply()
    if content == b"" and r is not None and r.code >= 500:
        # Refusing an empty message outright is fine; altering it is not.
        time.sleep(0.3)
        assert upstream.messages == []
        return
    assert_reply(r, 250)
    (m,) = upstream.wait_messages(1)
    assert m.content == content


def test_message_without_from_header_is_refused(config, mailgate, raw, upstream):
    config.smtp_channel("up", upstream, senders=["alice@example.com"])
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<bob@example.org>", 250)
    c.expect("DATA", 354)
    c.send(b"Subject: no from\r\n\r\nbody\r\n.\r\n")
    assert_reply(c.reply(), 550, "5.7.1")
    assert upstream.messages == []


def test_long_command_line_refused(config, mailgate, raw):
    mg, _ = start_file(config, mailgate)
    c = raw(mg.addr)
    c.greet()
    r = c.cmd("NOOP " + "x" * 2000)
    assert r is not None and r.code in (500, 501), str(r)
    c.expect("NOOP", 250)


def test_max_connections(config, mailgate):
    mg, _ = start_file(config, mailgate, max_connections=2)
    a, b = Raw(mg.addr), Raw(mg.addr)
    try:
        assert_reply(a.reply(), 220)
        assert_reply(b.reply(), 220)
        c = Raw(mg.addr)
        try:
            assert_reply(c.reply(), 421, "4.3.2")
            assert c.closed()
        finally:
            c.close()
    finally:
        a.close()
        b.close()


def test_bdat_over_maximum(config, mailgate, raw):
    mg, outbox = start_file(config, mailgate, max_message_size=1000)
    c = raw(mg.addr)
    c.greet()
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<bob@example.org>", 250)
    chunk = b"x" * 78 + b"\r\n"
    replies = []
    for _ in range(30):
        c.send(b"BDAT %d\r\n" % len(chunk) + chunk)
        r = c.reply()
        replies.append(r)
        if r is None or r.code != 250:
            break
    if replies[-1] is not None and replies[-1].code == 250:
        c.send(b"BDAT 0 LAST\r\n")
        replies.append(c.reply())
    assert_reply(replies[-1], 552, "5.3.4")
    assert eml_files(outbox) == []


def _has_ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this host")
def test_ipv6_and_ipv4_listeners(config, mailgate):
    outbox = config.file_channel()
    config.server["listen"] = ["127.0.0.1:0", "[::1]:0"]
    mg = mailgate(config)
    assert sorted(a.startswith("[") for a in mg.plain) == [False, True], mg.plain
    for addr in mg.plain:
        with smtp_client(addr) as s:
            s.sendmail("alice@example.com", ["bob@example.org"], message())
    assert len(eml_files(outbox)) == 2
