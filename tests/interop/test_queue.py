"""Queue mode, black box: the mailgate binary with aiosmtpd upstreams and Python's parsers.

See docs/queue.md. Every test runs its own mailgate with its own spool on loopback port 0.
"""

from __future__ import annotations

import email
import email.policy
import json
import time

from conftest import message, run_cli, smtp_client, wait_until


def queue_mode(config, **server) -> None:
    """Switches a MailgateConfig to queue mode with short retry delays."""
    config.server.update({"delivery": "queue", "retry_first": "1s", "retry_max": "4s", **server})


def script_data(upstream, replies: list[str]) -> list[float]:
    """The upstream answers DATA of successive transactions with `replies`, then normally.
    Returns the list that collects the time of every DATA."""
    handler = upstream.handler
    original = handler.handle_DATA
    times: list[float] = []

    async def handle_DATA(server, session, envelope):
        times.append(time.monotonic())
        if len(times) <= len(replies):
            return replies[len(times) - 1]
        return await original(server, session, envelope)

    handler.handle_DATA = handle_DATA
    return times


def submit(addr: str, sender: str, rcpts: list[str], msg: bytes) -> tuple[int, str]:
    """One transaction with smtplib; returns the reply to the data."""
    with smtp_client(addr) as c:
        c.ehlo()
        code, text = c.mail(sender)
        assert code == 250, text
        for r in rcpts:
            code, text = c.rcpt(r)
            assert code == 250, text
        code, text = c.data(msg)
        return code, text.decode()


def queue_list(config_path) -> str:
    p = run_cli(["-c", str(config_path), "queue", "list"])
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_451_twice_then_delivered_on_the_third_attempt(config, mailgate, upstream):
    queue_mode(config)
    config.smtp_channel("up", upstream)
    times = script_data(upstream, ["451 4.7.0 Try again later", "451 4.7.0 Try again later"])
    mg = mailgate(config)
    msg = message(subject="third time lucky")
    code, text = submit(mg.addr, "alice@example.com", ["bob@example.org"], msg)
    assert code == 250 and text.startswith("2.0.0 queued as "), text
    got = upstream.wait_messages(1, timeout=20)
    assert len(times) == 3, "delivered on the third attempt"
    assert got[0].content == msg
    # retry_first = 1s, doubled: about 1 s, then about 2 s.
    assert 0.9 <= times[1] - times[0] < 2.5, times
    assert 1.8 <= times[2] - times[1] < 4.0, times
    qid = text.split()[-1]
    mg.wait_log(f"delivered; removed from the spool.*{qid}")


def test_5xx_fails_to_failed_dir_with_an_rfc3464_dsn(config, mailgate, upstream, tmp_path):
    queue_mode(config)
    config.smtp_channel("up", upstream)
    upstream.handler.rcpt_reply_for["nobody@example.org"] = "550 5.1.1 No such user here"
    mg = mailgate(config)
    msg = message(sender="alice@example.com", to="nobody@example.org", subject="lost letter")
    code, text = submit(mg.addr, "alice@example.com", ["nobody@example.org", "carol@example.org"], msg)
    assert code == 250, text
    qid = text.split()[-1]

    # Partial success: carol gets the message, then the sender gets the DSN for nobody.
    got = upstream.wait_messages(2, timeout=20)
    original = [m for m in got if m.mail_from not in ("", "<>")]
    dsns = [m for m in got if m.mail_from in ("", "<>")]
    assert [m.rcpt_tos for m in original] == [["carol@example.org"]]
    assert len(dsns) == 1, "one DSN, with the null sender"
    assert dsns[0].rcpt_tos == ["alice@example.com"]

    report = email.message_from_bytes(dsns[0].content, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["To"] == "<alice@example.com>" or "alice@example.com" in report["To"]
    parts = {p.get_content_type(): p for p in report.iter_parts()}
    assert set(parts) >= {"text/plain", "message/delivery-status", "text/rfc822-headers"}
    fields = parts["message/delivery-status"].get_payload()
    per_message, per_recipient = fields[0], fields[1:]
    assert per_message["Reporting-MTA"] == "dns; mailgate.test"
    assert len(per_recipient) == 1, "only the refused recipient fails"
    rcpt = per_recipient[0]
    assert rcpt["Final-Recipient"] == "rfc822; nobody@example.org"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1"
    assert "550 5.1.1" in rcpt["Diagnostic-Code"] and rcpt["Diagnostic-Code"].startswith("smtp;")
    headers = parts["text/rfc822-headers"].get_content()
    assert "Subject: lost letter" in headers

    # The message itself is in failed/ with the reason.
    failed = tmp_path / "spool" / "failed"
    wait_until(lambda: (failed / f"{qid}.json").exists(), 10, "the message in failed/")
    state = json.loads((failed / f"{qid}.json").read_text())
    assert "550 5.1.1" in state["failure"]
    assert state["dsn"]
    assert (failed / f"{qid}.eml").read_bytes() == msg
    listing = queue_list(config.tmp / "proxy.toml")
    assert qid in listing and "message(s) in failed/" in listing


def test_a_null_sender_message_never_gets_a_dsn(config, mailgate, upstream, tmp_path):
    queue_mode(config)
    config.smtp_channel("up", upstream)
    upstream.handler.data_reply = "554 5.6.0 Content rejected"
    mg = mailgate(config)
    code, text = submit(mg.addr, "", ["bob@example.org"], message(sender="alice@example.com"))
    assert code == 250, text
    qid = text.split()[-1]
    failed = tmp_path / "spool" / "failed" / f"{qid}.json"
    wait_until(failed.exists, 10, "the bounce in failed/")
    time.sleep(1.0)
    assert "DSN queued" not in mg.log()
    assert json.loads(failed.read_text()).get("dsn") is None


def test_broken_credentials_keep_mail_queued_while_another_channel_delivers(
    config, mailgate, upstream_factory
):
    queue_mode(config)
    bad = upstream_factory(users={"bob": "right"})
    good = upstream_factory()
    config.smtp_channel("bob", bad, senders=["bob@example.com"], username="bob", password="wrong")
    config.smtp_channel("team", good, senders=["*@example.com"])
    config.server["check_header_from"] = False
    mg = mailgate(config)
    for i in range(2):
        code, _ = submit(mg.addr, "bob@example.com", ["x@example.org"], message(sender="bob@example.com"))
        assert code == 250
    mg.wait_log("CHANNEL BROKEN", timeout=15)
    for i in range(3):
        code, _ = submit(mg.addr, "carol@example.com", ["y@example.org"], message(sender="carol@example.com"))
        assert code == 250
    good.wait_messages(3, timeout=15)
    attempts = len(bad.handler.logins)
    time.sleep(2.5)  # longer than retry_first: a broken channel does not retry by itself
    assert len(bad.handler.logins) == attempts, "a broken channel stops trying"
    listing = queue_list(config.tmp / "proxy.toml")
    assert "2 message(s) queued" in listing, listing
    assert "broken since" in listing and "535" in listing, listing
    check = run_cli(["-c", str(config.tmp / "proxy.toml"), "check"])
    assert "bob: broken since" in check.stdout, check.stdout

    # The operator fixes the password and restarts: the channel resumes, the mail goes.
    mg.signal()
    assert mg.wait(20) == 0
    config.channels["bob"]["password"] = "right"
    mailgate(config)
    bad.wait_messages(2, timeout=20)
    wait_until(lambda: "0 message(s) queued" in queue_list(config.tmp / "proxy.toml"), 10, "empty queue")


def test_queue_commands_while_running(config, mailgate, upstream):
    queue_mode(config, retry_first="1h", retry_max="1h")
    config.smtp_channel("up", upstream)
    times = script_data(upstream, ["451 4.3.0 Later"] * 2)
    mg = mailgate(config)
    path = config.tmp / "proxy.toml"
    _, a = submit(mg.addr, "alice@example.com", ["bob@example.org"], message(subject="a"))
    _, b = submit(mg.addr, "alice@example.com", ["bob@example.org"], message(subject="b"))
    a, b = a.split()[-1], b.split()[-1]
    wait_until(lambda: len(times) == 2, 10, "two deferred attempts")
    listing = queue_list(path)
    for needle in (a, b, "<alice@example.com>", "bob@example.org", "451 4.3.0", "up"):
        assert needle in listing, listing
    show = run_cli(["-c", str(path), "queue", "show", a])
    assert show.returncode == 0 and "attempts:     1" in show.stdout and "Subject: a" in show.stdout

    p = run_cli(["-c", str(path), "queue", "retry", a])
    assert p.returncode == 0, p.stderr
    upstream.wait_messages(1, timeout=5)  # noticed within a second, delivered
    p = run_cli(["-c", str(path), "queue", "delete", b])
    assert p.returncode == 0, p.stderr
    wait_until(lambda: "0 message(s) queued" in queue_list(path), 5, "empty queue")
    p = run_cli(["-c", str(path), "queue", "show", b])
    assert p.returncode != 0 and b in p.stderr
    p = run_cli(["-c", str(path), "queue", "retry"])
    assert p.returncode != 0


def spool_modes(spool) -> list[tuple[str, str]]:
    """(path, mode) of every file and folder under the spool whose mode is not private."""
    import os
    import stat
    wrong = []
    for root, dirs, files in os.walk(spool):
        for name in dirs + files:
            path = os.path.join(root, name)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            want = 0o700 if name in dirs else 0o600
            if mode != want:
                wrong.append((os.path.relpath(path, spool), oct(mode)))
    return wrong


def test_every_spool_file_is_0600_under_umask_022_with_dsns_and_reused_spares(
        config, mailgate, upstream, tmp_path):
    # Issue 16 item 9: the DSN was written 0644 (File::create), and once delivered its
    # emptied file became a spare that the next client message was renamed onto.
    import os
    old_umask = os.umask(0o022)  # mailgate inherits it
    try:
        queue_mode(config)
        config.smtp_channel("up", upstream)
        upstream.handler.rcpt_reply_for["nobody@example.org"] = "550 5.1.1 No such user here"
        upstream.handler.rcpt_reply_for["later@example.org"] = "451 4.3.0 Try again later"
        mg = mailgate(config)
    finally:
        os.umask(old_umask)
    spool = tmp_path / "spool"
    queue, failed = spool / "queue", spool / "failed"

    def queued():
        return sorted(p.name for p in queue.iterdir())

    # 1: carol gets it, nobody fails: a DSN goes to alice, is delivered, its files spares.
    code, _ = submit(mg.addr, "alice@example.com", ["nobody@example.org", "carol@example.org"],
                     message(subject="one"))
    assert code == 250
    upstream.wait_messages(2, timeout=20)
    wait_until(lambda: queued() == [], 10, "the DSN delivered and removed")
    # 2 and 3: new client messages take those spares; 2 fails (to failed/, and its DSN
    # is delivered), 3 stays queued.
    for rcpt, subject in (("nobody@example.org", "two"), ("later@example.org", "three")):
        code, _ = submit(mg.addr, "alice@example.com", [rcpt], message(subject=subject))
        assert code == 250
    wait_until(lambda: len(list(failed.glob("*.eml"))) == 2, 10, "two messages in failed/")
    upstream.wait_messages(3, timeout=20)
    wait_until(lambda: len(queued()) == 2, 10, "only message 3 queued")
    assert len(list(failed.iterdir())) == 4
    assert spool_modes(spool) == [], mg.log()


def test_queue_commands_before_anything_was_ever_queued(config, tmp_path):
    # Issue 16 item 9: `queue list` exited 1 ("spool does not exist yet"); an empty queue
    # is not an error. The others answer in one line about the message.
    queue_mode(config)
    config.file_channel("outbox")
    path = config.write()
    spool = tmp_path / "spool"
    assert not spool.exists()
    p = run_cli(["-c", str(path), "queue", "list"])
    assert p.returncode == 0, p.stderr
    assert "0 message(s) queued" in p.stdout and "outbox" in p.stdout, p.stdout
    assert p.stderr == ""
    for args, code, needle in (
        (["show", "abc"], 1, "no message abc"),
        (["delete", "abc"], 1, "no message abc"),
        (["retry", "abc"], 1, "no message abc"),
        (["retry", "--all"], 0, "0 message(s) will be retried"),
    ):
        p = run_cli(["-c", str(path), "queue", *args])
        assert p.returncode == code, (args, p.stderr)
        out = p.stdout if code == 0 else p.stderr
        lines = out.splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, out)
    assert not spool.exists(), "reading an empty queue creates nothing"
