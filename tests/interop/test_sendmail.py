"""`mailgate sendmail` (SPEC §2, issue 11), driven the way cron, PHP mail() and mailx drive
/usr/sbin/sendmail, against a running mailgate whose `file` channel shows what arrived."""

import email.utils
import os
import pwd
import re
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, MailgateConfig, free_port, run_cli

EX_USAGE, EX_UNAVAILABLE, EX_TEMPFAIL = 64, 69, 75


@pytest.fixture(autouse=True)
def _binary():
    if not BIN.exists():
        pytest.fail(f"mailgate binary not found at {BIN}")


def me() -> str:
    """The user running the tests, as sendmail finds it (effective uid, /etc/passwd)."""
    return pwd.getpwuid(os.geteuid()).pw_name


class Setup:
    """A running mailgate with a catch-all `file` channel, and a config for sendmail that
    names its real port (mailgate itself was started on port 0)."""

    def __init__(self, config: MailgateConfig, mailgate, **channel):
        self.outbox = config.file_channel("outbox", **channel)
        self.mg = mailgate(config)
        config.server["listen"] = [self.mg.addr]
        self.path = config.write("sendmail.toml")

    def sendmail(self, args: list[str], msg: bytes):
        return run_cli(["-c", str(self.path), "sendmail", *args], input=msg)

    def delivered(self) -> list[tuple[str, bytes]]:
        """(envelope text, message bytes) per message written to the outbox."""
        return [
            (eml.with_suffix(".envelope").read_text(), eml.read_bytes())
            for eml in sorted(self.outbox.glob("*.eml"))
        ]

    def only(self) -> tuple[str, bytes]:
        got = self.delivered()
        assert len(got) == 1, f"{len(got)} messages in the outbox:\n{self.mg.log()}"
        return got[0]


@pytest.fixture
def setup(config, mailgate) -> Setup:
    return Setup(config, mailgate)


def recipients(envelope: str) -> list[str]:
    return re.findall(r"^recipient <(.*)>$", envelope, re.M)


def sender(envelope: str) -> str:
    return re.search(r"^sender <(.*)>$", envelope, re.M).group(1)


def header(msg: bytes, name: str) -> list[str]:
    head = msg.split(b"\r\n\r\n", 1)[0].decode()
    return [v for n, v in (line.split(": ", 1) for line in head.split("\r\n") if ": " in line)
            if n.lower() == name.lower()]


def test_php_mail_t_i_with_lf_input(setup):
    # PHP's default sendmail_path is "sendmail -t -i"; mail() hands over LF line ends.
    msg = (
        b"To: Bob Example <bob@example.org>, team: carol@example.org, dave@example.org;\n"
        b"Cc: =?UTF-8?B?SsO2cmc=?= <joerg@example.de>\n"
        b"Subject: order 42\n"
        b"X-PHP-Originating-Script: 0:shop.php\n"
        b"\n"
        b"Thanks.\n"
        b".\n"
        b"..leading dots\n"
        b".\n"
    )
    p = setup.sendmail(["-t", "-i", "-f", "shop@example.com"], msg)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and p.stderr == ""
    env, eml = setup.only()
    assert sender(env) == "shop@example.com"
    assert recipients(env) == ["bob@example.org", "carol@example.org", "dave@example.org", "joerg@example.de"]
    head, body = eml.split(b"\r\n\r\n", 1)
    # CRLF throughout, a lone "." kept with -i, dots un-stuffed again by mailgate
    assert body == b"Thanks.\r\n.\r\n..leading dots\r\n.\r\n"
    assert b"\n" not in eml.replace(b"\r\n", b"")
    assert head.startswith(msg.split(b"\n\n")[0].replace(b"\n", b"\r\n") + b"\r\n")
    assert header(eml, "From") == ["shop@example.com"]


def test_cron_debian_style(setup):
    # Debian cron: sendmail -FCronDaemon -i -B8BITMIME -oem USER, with an 8-bit body.
    msg = (
        "Subject: Cron <root@host> run-parts /etc/cron.daily\n"
        "Content-Type: text/plain; charset=UTF-8\n"
        "Content-Transfer-Encoding: 8bit\n"
        "\n"
        "Grüße from the daily job\n"
    ).encode()
    p = setup.sendmail(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "ops"], msg)
    assert p.returncode == 0, p.stderr
    env, eml = setup.only()
    user = me()
    assert sender(env) == f"{user}@mailgate.test"
    assert recipients(env) == ["ops@mailgate.test"]  # a bare name is qualified with [server] hostname
    assert header(eml, "From") == [f"CronDaemon <{user}@mailgate.test>"]
    assert eml.endswith("\r\n\r\nGrüße from the daily job\r\n".encode())


def test_cronie_style_with_t_and_f(setup):
    # cronie: sendmail -FCronDaemon -i -odi -oem -oi -t -f root
    msg = b"To: admin@example.org\nSubject: cron output\n\nok\n"
    p = setup.sendmail(["-FCronDaemon", "-i", "-odi", "-oem", "-oi", "-t", "-f", "root"], msg)
    assert p.returncode == 0, p.stderr
    env, eml = setup.only()
    assert sender(env) == "root@mailgate.test"
    assert recipients(env) == ["admin@example.org"]
    assert header(eml, "From") == ["CronDaemon <root@mailgate.test>"]


@pytest.mark.parametrize("flag", [[], ["-i"], ["-oi"]], ids=["traditional", "-i", "-oi"])
def test_a_lone_dot_line(setup, flag):
    msg = b"Subject: dots\r\n\r\nbefore\r\n.\r\nafter\r\n"
    p = setup.sendmail([*flag, "-f", "a@example.com", "b@example.org"], msg)
    assert p.returncode == 0, p.stderr
    _, eml = setup.only()
    body = eml.split(b"\r\n\r\n", 1)[1]
    if flag:
        assert body == b"before\r\n.\r\nafter\r\n"
    else:
        assert body == b"before\r\n"  # the "." line ends the message, as sendmail does


def test_exact_bytes_when_nothing_is_added(setup):
    msg = (
        b"From: a@example.com\r\nTo: b@example.org\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        b"Message-ID: <exact@client.test>\r\nSubject: exact\r\n\r\n"
        b".\r\n..\r\n.x\r\n \r\nlast line without an end"
    )
    p = setup.sendmail(["-i", "-f", "a@example.com", "b@example.org"], msg)
    assert p.returncode == 0, p.stderr
    _, eml = setup.only()
    assert eml == msg + b"\r\n"


def test_bcc_removed_and_still_delivered(setup):
    msg = b"To: to@example.org\nBcc: Hidden One <hidden@example.org>,\n  other@example.org\nSubject: s\n\nbody\n"
    p = setup.sendmail(["-t", "-i", "-f", "a@example.com", "extra@example.org"], msg)
    assert p.returncode == 0, p.stderr
    env, eml = setup.only()
    # command-line recipients are added to the header ones, as Postfix does
    assert recipients(env) == ["extra@example.org", "to@example.org", "hidden@example.org", "other@example.org"]
    # No Bcc: line (not a search for "bcc" anywhere: the added Message-ID is random hex).
    lines = eml.lower().splitlines()
    assert b"hidden" not in eml.lower() and not any(l.startswith(b"bcc:") for l in lines)
    assert b"other@" not in eml
    assert b"\r\nSubject: s\r\n" in eml


def test_missing_from_date_message_id_added(setup):
    p = setup.sendmail(["-F", "Backup Job", "-f", "backup@example.com", "ops@example.org"], b"Subject: done\n\nall good\n")
    assert p.returncode == 0, p.stderr
    _, eml = setup.only()
    assert header(eml, "From") == ["Backup Job <backup@example.com>"]
    (date,) = header(eml, "Date")
    assert email.utils.parsedate_to_datetime(date).tzinfo is not None
    (mid,) = header(eml, "Message-ID")
    assert re.fullmatch(r"<[^<>@\s]+@mailgate\.test>", mid), mid
    # one of each, even after a second message
    p = setup.sendmail(["-f", "backup@example.com", "ops@example.org"], b"Subject: again\n\nx\n")
    assert p.returncode == 0, p.stderr
    mids = [header(eml, "Message-ID")[0] for _, eml in setup.delivered()]
    assert len(set(mids)) == 2


def test_no_recipients_is_a_usage_error(setup):
    p = setup.sendmail(["-t", "-i"], b"Subject: nobody\n\nx\n")
    assert p.returncode == EX_USAGE
    assert "no recipients" in p.stderr.splitlines()[0]
    assert setup.delivered() == []


@pytest.mark.parametrize("args, reason", [
    (["-x", "a@b"], "unknown option -x"),
    (["-bp"], "-bp is not supported"),
    (["-oZ", "a@b"], "unknown option -oZ"),
    (["a@b", "-i"], "options come before recipients"),
    (["-f"], "option -f needs a value"),
])
def test_bad_arguments(setup, args, reason):
    p = setup.sendmail(args, b"Subject: x\n\ny\n")
    assert p.returncode == EX_USAGE, p.stderr
    assert reason in p.stderr.splitlines()[0], p.stderr
    assert setup.delivered() == []


# What a web form could hand to `mail ADDR` (issue 16 item 2): ends RCPT, sends a forged
# message, and starts a second transaction that the real message then completes.
INJECTED = (
    "victim@example.org>\r\nDATA\r\nFrom: ceo@example.com\r\nSubject: forged\r\n\r\n"
    "forged body\r\n.\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<attacker@evil.example"
)


@pytest.mark.parametrize("args", [
    ["-i", "-f", "a@example.com", INJECTED],
    ["-i", "-f", "a@example.com", "ok@example.org, " + INJECTED],
    ["-i", "-f", "a@example.com", "--", INJECTED],
    ["-i", "-f", "a@example.com>\r\nRCPT TO:<attacker@evil.example", "ok@example.org"],
    ["-i", "-r", "a@example.com\nRSET", "ok@example.org"],
    ["-i", "-f", "a@example.com", "a b@example.org"],
    ["-i", "-f", "a@example.com", "<<ok@example.org>>"],
    ["-i", "-f", "a@example.com", "ok@example.org>"],
    ["-i", "-f", "a@example.com", "ok@example.org\tx"],
    ["-i", "-F", "Web\r\nBcc: attacker@evil.example", "-f", "a@example.com", "ok@example.org"],
], ids=["rcpt", "rcpt-in-list", "rcpt-after-dashes", "sender-crlf", "sender-lf", "space",
        "double-brackets", "stray-bracket", "tab", "full-name-crlf"])
def test_injection_in_an_argument_exits_64_and_sends_nothing(setup, args):
    p = setup.sendmail(args, b"Subject: real\n\nreal body\n")
    assert p.returncode == EX_USAGE, (p.returncode, p.stderr)
    lines = p.stderr.splitlines()
    assert lines and "\r" not in p.stderr and len(lines) <= 2, p.stderr  # the reason, the usage
    assert "not an address" in lines[0] or "control characters" in lines[0], p.stderr
    assert setup.delivered() == [], setup.mg.log()
    assert "forged" not in setup.mg.log() and "RCPT" not in setup.mg.log()


def test_extracted_header_recipient_with_a_bare_cr_exits_64(setup):
    msg = b"To: ok@example.org\nCc: victim@example.org\rRSET\nSubject: s\n\nbody\n"
    p = setup.sendmail(["-t", "-i", "-f", "a@example.com"], msg)
    assert p.returncode == EX_USAGE, p.stderr
    assert "not an address" in p.stderr.splitlines()[0], p.stderr
    assert setup.delivered() == []


def test_injection_never_reaches_the_listener(config):
    # sendmail pointed at a bare socket: refused before it even connects.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.settimeout(0.5)
        config.file_channel("outbox")
        config.server["listen"] = [f"127.0.0.1:{sock.getsockname()[1]}"]
        path = config.write("sendmail.toml")
        for args in (["-f", "a@example.com", INJECTED], ["-f", INJECTED.replace(">", "", 1), "b@example.org"]):
            p = run_cli(["-c", str(path), "sendmail", "-i", *args], input=b"Subject: real\n\nx\n")
            assert p.returncode == EX_USAGE, p.stderr
        with pytest.raises(socket.timeout):
            sock.accept()


def test_one_enclosing_pair_stays_accepted(setup):
    p = setup.sendmail(["-i", "-f", "<a@example.com>", "<b@example.org>", "c@example.org, <d@example.org>"],
                       b"Subject: s\n\nx\n")
    assert p.returncode == 0, p.stderr
    env, _ = setup.only()
    assert sender(env) == "a@example.com"
    assert recipients(env) == ["b@example.org", "c@example.org", "d@example.org"]


def test_nothing_listening_is_tempfail(config, tmp_path):
    config.file_channel("outbox")
    config.server["listen"] = [f"127.0.0.1:{free_port()}"]
    path = config.write()
    p = run_cli(["-c", str(path), "sendmail", "-f", "a@example.com", "b@example.org"], input=b"Subject: x\n\nsecret body\n")
    assert p.returncode == EX_TEMPFAIL, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and "cannot connect" in lines[0], p.stderr
    assert "secret body" not in p.stderr


def test_refused_sender_is_unavailable_with_the_reason(config, mailgate):
    s = Setup(config, mailgate, senders=["alice@example.com"])
    p = s.sendmail(["-i", "-f", "mallory@example.net", "b@example.org"], b"Subject: x\n\nsecret body\n")
    assert p.returncode == EX_UNAVAILABLE, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert "MAIL FROM:<mallory@example.net>" in lines[0] and "550 5.7.1" in lines[0], p.stderr
    assert "secret body" not in p.stderr
    assert s.delivered() == []
    # the allowed sender goes through
    p = s.sendmail(["-i", "-f", "alice@example.com", "b@example.org"], b"Subject: x\n\nok\n")
    assert p.returncode == 0, p.stderr


def test_upstream_down_4xx_is_tempfail(config, mailgate):
    config.channels["relay"] = {"host": "127.0.0.1", "port": free_port(), "tls": "none", "senders": ["*"]}
    mg = mailgate(config)
    config.server["listen"] = [mg.addr]
    path = config.write("sendmail.toml")
    p = run_cli(["-c", str(path), "sendmail", "-i", "-f", "a@example.com", "b@example.org"], input=b"Subject: x\n\ny\n")
    assert p.returncode == EX_TEMPFAIL, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and "451 4.4.1" in lines[0], p.stderr


def test_wildcard_listener_is_reached_on_loopback(config, mailgate):
    d = config.file_channel("outbox")
    config.server["listen"] = ["0.0.0.0:0"]
    config.server["allow_networks"] = ["127.0.0.0/8"]
    mg = mailgate(config)
    port = mg.addr.rsplit(":", 1)[1]
    config.server["listen"] = [f"0.0.0.0:{port}"]
    path = config.write("sendmail.toml")
    p = run_cli(["-c", str(path), "sendmail", "-f", "a@example.com", "b@example.org"], input=b"Subject: x\n\ny\n")
    assert p.returncode == 0, p.stderr
    assert len(list(d.glob("*.eml"))) == 1


def test_symlink_named_sendmail_and_config_lookup(setup, tmp_path):
    link = tmp_path / "bin" / "sendmail"
    link.parent.mkdir()
    link.symlink_to(BIN)
    env = dict(os.environ, NO_COLOR="1")
    env.pop("MAILGATE_CONFIG", None)

    def run(args, extra_env=None):
        return subprocess.run([str(link), *args], input=b"Subject: via link\n\nx\n", capture_output=True,
                              env={**env, **(extra_env or {})}, cwd=tmp_path, timeout=30)

    # -C FILE, as sendmail spells it
    p = run(["-C", str(setup.path), "-i", "-f", "a@example.com", "b@example.org"])
    assert p.returncode == 0, p.stderr
    # $MAILGATE_CONFIG
    p = run(["-t", "-i", "-f", "a@example.com", "c@example.org"], {"MAILGATE_CONFIG": str(setup.path)})
    assert p.returncode == 0, p.stderr
    assert [recipients(env)[0] for env, _ in setup.delivered()] in (
        ["b@example.org", "c@example.org"], ["c@example.org", "b@example.org"])
    # neither: /etc/mailgate/proxy.toml, never ./proxy.toml (cron runs in any directory)
    (tmp_path / "proxy.toml").write_text(setup.path.read_text())
    if not Path("/etc/mailgate/proxy.toml").exists():
        p = run(["-i", "b@example.org"])
        assert p.returncode == 78, p.stderr
        assert "/etc/mailgate/proxy.toml" in p.stderr.decode()


def test_help(tmp_path):
    for args in (["sendmail", "--help"], ["sendmail", "-t", "--help"]):
        p = run_cli(args, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert "-t" in p.stdout and "sendmail" in p.stdout.lower()
