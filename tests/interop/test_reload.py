"""SIGHUP reload (SPEC §8, issue 11 item 2), black box: the mailgate binary, real signals.

Each test starts mailgate on a config file, rewrites that file, sends SIGHUP and watches
what new and old sessions, the workers and the spool do.
"""

from __future__ import annotations

import re
import signal
import time

from conftest import Raw, assert_reply, free_port, message, run_cli, smtp_client, wait_until


def queue_mode(config, **server) -> None:
    config.server.update({"delivery": "queue", "retry_first": "1s", "retry_max": "4s", **server})


def reloaded(mg, config, expect: str = "config reloaded") -> str:
    """Rewrites the config file, sends SIGHUP, waits for the n-th reload line."""
    before = sum(1 for line in mg.log().splitlines() if expect in line)
    config.write()
    mg.signal(signal.SIGHUP)
    wait_until(
        lambda: sum(1 for line in mg.log().splitlines() if expect in line) > before,
        10,
        f"log line {expect!r} after SIGHUP",
    )
    assert mg.proc.poll() is None, f"mailgate exited after SIGHUP:\n{mg.log()}"
    return [line for line in mg.log().splitlines() if expect in line][-1]


def send(addr: str, sender: str, rcpt: str = "x@example.org", subject: str = "hi") -> tuple[int, str]:
    """MAIL, RCPT and DATA; the first negative reply ends it. Returns (code, text)."""
    with smtp_client(addr) as c:
        c.ehlo()
        code, text = c.mail(sender)
        if code != 250:
            return code, text.decode()
        code, text = c.rcpt(rcpt)
        if code != 250:
            return code, text.decode()
        code, text = c.data(message(sender=sender, to=rcpt, subject=subject))
        return code, text.decode()


def test_reload_routes_a_sender_that_was_refused_before(config, mailgate, upstream_factory):
    team = upstream_factory()
    config.smtp_channel("team", team, senders=["*@example.com"])
    mg = mailgate(config)
    code, text = send(mg.addr, "bob@other.org")
    assert code == 550, (code, text)
    assert team.messages == []

    other = upstream_factory()
    config.smtp_channel("other", other, senders=["*@other.org"])
    old_port = mg.addr
    # A listen address change is not applied live: logged, the old listener stays.
    config.server["listen"] = [f"127.0.0.1:{free_port()}"]
    line = reloaded(mg, config)
    assert 'added=["other"]' in line and "unchanged=1" in line, line
    mg.wait_log("reload: listen changed .* takes effect after a restart")

    code, text = send(old_port, "bob@other.org", subject="after reload")
    assert code == 250, (code, text)
    got = other.wait_messages(1)
    assert b"Subject: after reload" in got[0].content
    assert got[0].mail_from == "bob@other.org"
    code, _ = send(old_port, "alice@example.com")
    assert code == 250
    team.wait_messages(1)


def test_reload_refuses_a_bad_config_with_every_error_and_keeps_the_old(config, mailgate, upstream):
    config.smtp_channel("team", upstream, senders=["*@example.com"])
    mg = mailgate(config)
    good = config.render()
    path = config.tmp / "proxy.toml"
    bad = good.replace('hostname = "mailgate.test"', 'hostname = "mailgate.test"\nmax_recipients = "many"\nbogus_key = 1')
    assert bad != good
    path.write_text(bad)
    check = run_cli(["-c", str(path), "check"])
    assert check.returncode != 0
    problems = [l for l in check.stderr.splitlines() if l.startswith(f"{path}:") and "problem" not in l]
    assert len(problems) >= 2, check.stderr
    assert all(l.split(":")[1].isdigit() for l in problems), problems

    mg.signal(signal.SIGHUP)
    mg.wait_log("reload refused: .* problems? in")
    for problem in problems:
        mg.wait_log(re.escape(problem), timeout=2)
    assert mg.proc.poll() is None

    code, text = send(mg.addr, "alice@example.com", subject="still flowing")
    assert code == 250, (code, text)
    assert b"still flowing" in upstream.wait_messages(1)[0].content

    # The file fixed: the next SIGHUP applies it.
    path.write_text(good)
    mg.signal(signal.SIGHUP)
    mg.wait_log("config reloaded")


def test_reload_starts_a_worker_for_an_added_channel(config, mailgate, upstream_factory):
    queue_mode(config)
    first = upstream_factory()
    config.smtp_channel("first", first, senders=["*@example.com"])
    mg = mailgate(config)
    second = upstream_factory()
    config.smtp_channel("second", second, senders=["*@second.example"])
    line = reloaded(mg, config)
    assert 'added=["second"]' in line, line
    code, text = send(mg.addr, "carol@second.example", subject="over the new worker")
    assert code == 250 and "queued as" in text, text
    got = second.wait_messages(1)
    assert b"over the new worker" in got[0].content
    # The unchanged channel's worker still delivers.
    code, _ = send(mg.addr, "alice@example.com")
    assert code == 250
    first.wait_messages(1)


def test_a_removed_channel_keeps_its_queued_mail_until_it_comes_back(
    config, mailgate, upstream_factory, tmp_path
):
    # The upstream of "gone" is down: its mail stays queued, retried hourly.
    queue_mode(config, retry_first="1h", retry_max="1h")
    keep = upstream_factory()
    down_port = free_port()
    config.channels["gone"] = {"host": "127.0.0.1", "port": down_port, "tls": "none",
                               "senders": ["*@gone.example"]}
    config.smtp_channel("keep", keep, senders=["*@example.com"])
    mg = mailgate(config)
    path = config.tmp / "proxy.toml"
    ids = []
    for i in range(2):
        code, text = send(mg.addr, "dave@gone.example", subject=f"waiting {i}")
        assert code == 250, text
        ids.append(text.split()[-1])
    for qid in ids:
        mg.wait_log(f"queue: recipients still pending.*{qid}|{qid}.*queue: recipients still pending")

    del config.channels["gone"]
    line = reloaded(mg, config)
    assert 'removed=["gone"]' in line, line
    mg.wait_log('channel="?gone"?.*messages=2.*stays in the spool|stays in the spool.*channel="?gone"?')
    code, _ = send(mg.addr, "dave@gone.example")
    assert code == 550, "no channel takes the sender any more"

    spool = tmp_path / "spool"
    for qid in ids:
        assert (spool / "queue" / f"{qid}.eml").exists() or any((spool / "queue").glob(f"{qid}*")), qid
    assert not any((spool / "failed").glob("*")), "nothing failed, no DSN"
    listing = run_cli(["-c", str(path), "queue", "list"])
    assert listing.returncode == 0, listing.stderr
    assert "2 message(s) queued" in listing.stdout, listing.stdout
    assert "gone (not configured)" in listing.stdout, listing.stdout
    assert re.search(r"^gone +not configured: 2 queued message\(s\)", listing.stdout, re.M), listing.stdout
    check = run_cli(["-c", str(path), "check"])
    assert check.returncode == 0, check.stderr
    assert "gone: not configured: 2 queued message(s)" in check.stdout, check.stdout
    time.sleep(1.5)
    assert "2 message(s) queued" in run_cli(["-c", str(path), "queue", "list"]).stdout

    # The channel comes back, now at a working upstream: the waiting mail goes at once.
    back = upstream_factory()
    config.smtp_channel("gone", back, senders=["*@gone.example"])
    line = reloaded(mg, config)
    assert 'added=["gone"]' in line, line
    got = back.wait_messages(2)
    assert sorted(m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in got) == [b"waiting 0", b"waiting 1"]
    wait_until(lambda: "0 message(s) queued" in run_cli(["-c", str(path), "queue", "list"]).stdout,
               10, "empty queue")
    assert keep.messages == []


def test_a_session_in_flight_finishes_with_the_config_it_began_with(config, mailgate, tmp_path):
    old_dir = config.file_channel("old", senders=["*@example.com"])
    mg = mailgate(config)
    c = Raw(mg.addr)
    c.greet()
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<bob@example.org>", 250)

    del config.channels["old"]
    new_dir = config.file_channel("new", senders=["*@other.org"])
    line = reloaded(mg, config)
    assert 'removed=["old"]' in line and 'added=["new"]' in line, line

    c.expect("DATA", 354)
    c.send(message(subject="begun before the reload") + b".\r\n")
    assert_reply(c.reply(), 250)
    c.expect("QUIT", 221)
    stored = list(old_dir.glob("*.eml"))
    assert len(stored) == 1 and b"begun before the reload" in stored[0].read_bytes()
    assert not any(new_dir.iterdir())

    # A new session has the new config: alice has no channel now, other.org has one.
    c = Raw(mg.addr)
    c.greet()
    c.expect("MAIL FROM:<alice@example.com>", 550)
    c.expect("MAIL FROM:<eve@other.org>", 250)
    c.expect("QUIT", 221)


def test_a_broken_channel_is_tried_again_after_reload(config, mailgate, upstream_factory):
    queue_mode(config)
    up = upstream_factory(users={"bob": "right"})
    config.smtp_channel("bob", up, senders=["bob@example.com"], username="bob", password="wrong")
    mg = mailgate(config)
    code, _ = send(mg.addr, "bob@example.com")
    assert code == 250
    mg.wait_log("CHANNEL BROKEN", timeout=15)
    attempts = len(up.handler.logins)
    # The same file: the channel is unchanged, its worker keeps running and is resumed.
    line = reloaded(mg, config)
    assert "unchanged=1" in line, line
    mg.wait_log("broken channel tried again after reload")
    wait_until(lambda: len(up.handler.logins) > attempts, 10, "a new login attempt")
    # Fixed password: the channel changes, its worker restarts, the mail goes.
    config.channels["bob"]["password"] = "right"
    line = reloaded(mg, config)
    assert 'changed=["bob"]' in line, line
    up.wait_messages(1, timeout=15)


def test_reload_reads_a_renewed_tls_certificate(config, mailgate, tmp_path):
    import ssl

    from conftest import make_certs

    first = make_certs(tmp_path / "first")
    second = make_certs(tmp_path / "second")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(first.cert_file.read_bytes())
    key.write_bytes(first.key_file.read_bytes())
    config.tls(cert, key)
    config.file_channel("outbox")
    mg = mailgate(config)

    def served_certificate() -> bytes:
        c = Raw(mg.addr)
        c.greet()
        c.expect("STARTTLS", 220)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        tls = ctx.wrap_socket(c.sock, server_hostname="localhost")
        der = tls.getpeercert(binary_form=True)
        tls.close()
        return der

    first_der = served_certificate()
    cert.write_bytes(second.cert_file.read_bytes())
    key.write_bytes(second.key_file.read_bytes())
    reloaded(mg, config)
    renewed = served_certificate()
    assert renewed != first_der
    assert renewed == ssl.PEM_cert_to_DER_cert(second.cert_file.read_text().split("-----END CERTIFICATE-----")[0]
                                               + "-----END CERTIFICATE-----\n")


def test_queue_mode_a_session_routed_to_a_removed_channel_leaves_its_mail_queued(config, mailgate):
    queue_mode(config)
    old_dir = config.file_channel("old", senders=["*@example.com"])
    mg = mailgate(config)
    c = Raw(mg.addr)
    c.greet()
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<bob@example.org>", 250)
    del config.channels["old"]
    config.file_channel("new", senders=["*@other.org"])
    reloaded(mg, config)
    c.expect("DATA", 354)
    c.send(message(subject="routed before the reload") + b".\r\n")
    r = c.reply()
    assert_reply(r, 250)
    qid = r.text.split()[-1]
    c.expect("QUIT", 221)
    mg.wait_log(f"channel was removed by a reload.*{qid}")
    path = config.tmp / "proxy.toml"
    listing = run_cli(["-c", str(path), "queue", "list"]).stdout
    assert qid in listing and "old (not configured)" in listing, listing
    assert not any(old_dir.iterdir())

    config.file_channel("old", senders=["*@example.com"])
    reloaded(mg, config)
    wait_until(lambda: len(list(old_dir.glob("*.eml"))) == 1, 10, "the message in old/")
    assert b"routed before the reload" in next(old_dir.glob("*.eml")).read_bytes()


def test_a_reload_that_changes_a_channel_keeps_its_connection_limit(config, mailgate, upstream):
    """The worker a reload replaced still sends; the new one must not open a second
    connection beside it when the channel allows one (SPEC §7: never more at once)."""
    queue_mode(config)
    upstream.handler.data_delay = 3.0
    config.smtp_channel("one", upstream, senders=["*@example.com"], connections=1)
    mg = mailgate(config)
    for i in range(3):
        code, text = send(mg.addr, "alice@example.com", subject=f"limit {i}")
        assert code == 250, text
    wait_until(lambda: upstream.handler.in_data == 1, 10, "a transaction in DATA")
    config.channels["one"]["max_message_size"] = 10_000_000
    line = reloaded(mg, config)
    assert 'changed=["one"]' in line, line
    got = upstream.wait_messages(3, timeout=30)
    assert upstream.handler.max_in_data == 1, f"{upstream.handler.max_in_data} connections at once"
    subjects = sorted(m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in got)
    assert subjects == [b"limit 0", b"limit 1", b"limit 2"], subjects


def test_sighups_in_quick_succession_and_during_the_shutdown_drain(config, mailgate, upstream):
    """Two SIGHUPs at once while a delivery is in flight: the message goes once. A SIGHUP
    while SIGTERM drains the sessions neither kills mailgate nor cuts the open session."""
    queue_mode(config)
    upstream.handler.data_delay = 2.0
    config.smtp_channel("out", upstream, senders=["*@example.com"])
    mg = mailgate(config)
    code, text = send(mg.addr, "alice@example.com", subject="in flight")
    assert code == 250, text
    wait_until(lambda: upstream.handler.in_data == 1, 10, "a transaction in DATA")
    config.channels["out"]["max_message_size"] = 10_000_000
    config.write()
    mg.signal(signal.SIGHUP)
    config.channels["out"]["max_message_size"] = 20_000_000
    config.write()
    mg.signal(signal.SIGHUP)
    mg.wait_log("config reloaded")
    upstream.wait_messages(1, timeout=15)
    time.sleep(3)
    assert len(upstream.messages) == 1, "sent once"

    c = Raw(mg.addr)
    c.greet()
    c.expect("MAIL FROM:<alice@example.com>", 250)
    c.expect("RCPT TO:<bob@example.org>", 250)
    mg.signal(signal.SIGTERM)
    mg.wait_log("shutting down")
    mg.signal(signal.SIGHUP)
    time.sleep(0.5)
    assert mg.proc.poll() is None, f"SIGHUP during the drain ended mailgate:\n{mg.log()}"
    c.expect("DATA", 354)
    c.send(message(subject="during the drain") + b".\r\n")
    assert_reply(c.reply(), 250)
    assert mg.wait(40) == 0, mg.log()
    # Either delivered before the exit or left queued: never lost.
    spool = config.tmp / "spool"
    delivered = any(b"during the drain" in m.content for m in upstream.messages)
    queued = any(b"during the drain" in p.read_bytes() for p in (spool / "queue").glob("*.eml"))
    assert delivered or queued, mg.log()


def test_an_unchanged_channels_rate_window_survives_a_reload_that_changes_another(
    config, mailgate, upstream_factory
):
    """Issue 20: a reload that changes one channel leaves the others' windows alone: the
    message counted before the SIGHUP still counts after it (relay mode: 451 4.7.0)."""
    limited, other = upstream_factory(), upstream_factory()
    config.server["delivery"] = "relay"
    config.smtp_channel("limited", limited, senders=["*@example.com"], rate="1/min")
    config.smtp_channel("other", other, senders=["*@other.org"], connections=4)
    mg = mailgate(config)
    code, text = send(mg.addr, "alice@example.com", subject="before")
    assert code == 250, (code, text)
    limited.wait_messages(1)

    config.channels["other"]["connections"] = 3
    line = reloaded(mg, config)
    assert 'changed=["other"]' in line and "unchanged=1" in line, line

    code, text = send(mg.addr, "alice@example.com", subject="after")
    assert code == 451 and "4.7.0" in text, (code, text)
    # The changed channel works with its new limits.
    code, text = send(mg.addr, "bob@other.org", subject="other")
    assert code == 250, (code, text)
    other.wait_messages(1)
    assert len(limited.messages) == 1
