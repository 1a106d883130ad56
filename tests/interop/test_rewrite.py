"""SPEC §4a legacy senders (issue 17): `[[rewrite]]` entries, black box, with real clients
(swaks, Python smtplib) and a real upstream (aiosmtpd).

A device that can only say `MAIL FROM:<scanner@printer.local>`, sends no `From:` or a
`From:` no channel may use, reaches the upstream as the mailbox; the body and every
other header line arrive byte for byte; a client outside the entry's networks is not
rewritten (the client socket bound to 127.0.0.2, a loopback alias); `check` lists bad
entries with their lines and warns about one that can never match; `route` explains the
rewrite; a reload applies new entries to new sessions.
"""

import re
import shutil
import signal
import smtplib
import subprocess
import urllib.request

import pytest

from conftest import MailgateConfig, free_port, run_cli, split_addr, toml_value, wait_until

MAILBOX = "scans@example.com"


class RewriteConfig(MailgateConfig):
    """conftest's builder plus `[[rewrite]]` entries."""

    def __init__(self, tmp):
        super().__init__(tmp)
        self.rewrites: list[dict] = []

    def render(self) -> str:
        out = [super().render()]
        for r in self.rewrites:
            out.append("[[rewrite]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in r.items()))
        return "\n".join(out)


@pytest.fixture
def rconfig(tmp_path) -> RewriteConfig:
    return RewriteConfig(tmp_path)


def device_setup(rconfig, upstream, **entry) -> None:
    """The mailbox channel takes only MAILBOX; the printer's entry gives it that sender."""
    rconfig.smtp_channel("scans", upstream, senders=[MAILBOX])
    rconfig.rewrites.append({"match": "*@printer.local", "sender": MAILBOX, **entry})


@pytest.mark.skipif(not shutil.which("swaks"), reason="swaks not installed")
def test_swaks_device_without_from_reaches_the_upstream_as_the_mailbox(rconfig, mailgate, upstream):
    device_setup(rconfig, upstream)
    port = free_port()
    rconfig.metrics = {"listen": f"127.0.0.1:{port}"}
    mg = mailgate(rconfig)
    host, smtp_port = split_addr(mg.addr)
    # --data: exactly these lines, no From: (swaks would add one otherwise).
    data = "Subject: Scan 0042\r\nTo: bob@example.org\r\nX-Device: MFP-3000\r\n\tfolded\r\n\r\n.dot line\r\nPDF follows\r\n"
    p = subprocess.run(
        ["swaks", "--server", host, "--port", str(smtp_port), "--from", "scanner@printer.local",
         "--to", "bob@example.org", "--data", data],
        capture_output=True, text=True, timeout=30,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    (m,) = upstream.wait_messages(1)
    assert m.mail_from == MAILBOX and m.rcpt_tos == ["bob@example.org"]
    want = data.replace("\tfolded\r\n\r\n", f"\tfolded\r\nFrom: scanner <{MAILBOX}>\r\n\r\n")
    # swaks ends its --data with one more line break of its own.
    assert m.content in (want.encode(), want.encode() + b"\r\n"), m.content
    line = mg.wait_log("message accepted")
    assert "scanner@printer.local" in line and "rewritten_from" in line, line
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert f'mailgate_rewrites_total{{sender="{MAILBOX}"}} 1' in text, text


def test_smtplib_queue_mode_body_byte_for_byte_and_one_from(rconfig, mailgate, upstream):
    device_setup(rconfig, upstream)
    rconfig.server.update({"delivery": "queue", "retry_first": "1s"})
    mg = mailgate(rconfig)
    body = b"".join(b"line %04d \xc3\xa9 trailing blanks \t \r\n" % i for i in range(3000))
    body += b"From: not a header, the body\r\n" + b"x" * 5000 + b"\r\n"
    headers = (
        b"Received: from mfp by printer.local;\r\n Mon, 7 Dec 2026 10:00:00 +0000\r\n"
        b"From: scan@x.com <scan@x.com>\r\n"
        b"Sender: scanner@printer.local\r\n"
        b"Subject: =?ISO-8859-1?Q?Scan_f=FCr_Bob?=\r\n"
        b"To: bob@example.org\r\n"
        b"sender: again@printer.local\r\n"
        b"MIME-Version: 1.0\r\n"
    )
    msg = headers + b"\r\n" + body
    # The first attempt is deferred: the retry must send the bytes spooled the first time.
    upstream.handler.data_reply = "451 4.3.0 try again later"
    with smtplib.SMTP(*split_addr(mg.addr), timeout=30) as c:
        refused = c.sendmail("scanner@printer.local", ["bob@example.org"], msg)
        assert refused == {}
    mg.wait_log("deferred|451 4.3.0")
    spooled = list((rconfig.tmp / "spool" / "queue").glob("*.eml"))
    assert len(spooled) == 1
    spooled_bytes = spooled[0].read_bytes()
    state = next((rconfig.tmp / "spool" / "queue").glob("*.json")).read_text()
    assert MAILBOX in state and "scanner@printer.local" not in state, state
    upstream.handler.data_reply = None
    (m,) = upstream.wait_messages(1)
    assert m.mail_from == MAILBOX
    want = (
        b"Received: from mfp by printer.local;\r\n Mon, 7 Dec 2026 10:00:00 +0000\r\n"
        b"From: scan <" + MAILBOX.encode() + b">\r\n"
        b"Subject: =?ISO-8859-1?Q?Scan_f=FCr_Bob?=\r\n"
        b"To: bob@example.org\r\n"
        b"MIME-Version: 1.0\r\n"
        b"\r\n" + body
    )
    assert m.content == want
    assert spooled_bytes == want, "the spool holds the rewritten copy"


def test_a_client_outside_the_entrys_networks_is_not_rewritten(rconfig, mailgate, upstream):
    device_setup(rconfig, upstream, networks=["127.0.0.1/32"])
    mg = mailgate(rconfig)
    host, port = split_addr(mg.addr)
    # 127.0.0.2 is a loopback alias: the same machine, another client address.
    with smtplib.SMTP(host, port, timeout=30, source_address=("127.0.0.2", 0)) as c:
        c.ehlo("printer")
        code, text = c.mail("scanner@printer.local")
        assert code == 550 and b"5.7.1" in text, (code, text)
    with smtplib.SMTP(host, port, timeout=30, source_address=("127.0.0.1", 0)) as c:
        assert c.sendmail("scanner@printer.local", ["bob@example.org"], b"Subject: s\r\n\r\nx\r\n") == {}
    (m,) = upstream.wait_messages(1)
    assert m.mail_from == MAILBOX


def test_keep_leaves_the_headers_to_the_header_check(rconfig, mailgate, upstream):
    device_setup(rconfig, upstream, header_from="keep")
    mg = mailgate(rconfig)
    with smtplib.SMTP(*split_addr(mg.addr), timeout=30) as c:
        with pytest.raises(smtplib.SMTPDataError) as e:
            c.sendmail("scanner@printer.local", ["bob@example.org"], b"From: scanner@printer.local\r\n\r\nx\r\n")
        assert e.value.smtp_code == 550
        msg = b"From: Scans <" + MAILBOX.encode() + b">\r\nSubject: s\r\n\r\nx\r\n"
        assert c.sendmail("scanner@printer.local", ["bob@example.org"], msg) == {}
    (m,) = upstream.wait_messages(1)
    assert m.mail_from == MAILBOX and m.content == msg


def test_reload_applies_new_entries_to_new_sessions(rconfig, mailgate, upstream):
    rconfig.smtp_channel("scans", upstream, senders=[MAILBOX])
    mg = mailgate(rconfig)
    host, port = split_addr(mg.addr)
    with smtplib.SMTP(host, port, timeout=30) as c:
        c.ehlo("printer")
        assert c.mail("scanner@printer.local")[0] == 550
    rconfig.rewrites.append({"match": "scanner@printer.local", "sender": MAILBOX})
    rconfig.write()
    before = mg.log().count("config reloaded")
    mg.signal(signal.SIGHUP)
    wait_until(lambda: mg.log().count("config reloaded") > before, 10, "config reloaded")
    with smtplib.SMTP(host, port, timeout=30) as c:
        assert c.sendmail("scanner@printer.local", ["bob@example.org"], b"Subject: s\r\n\r\nx\r\n") == {}
    (m,) = upstream.wait_messages(1)
    assert m.mail_from == MAILBOX


def test_check_lists_every_bad_entry_with_its_line_and_warns_about_a_dead_one(rconfig):
    rconfig.file_channel("team", senders=["*@example.com"])
    rconfig.rewrites += [
        {"match": "*@printer.local", "sender": "*@example.com"},
        {"match": "a@printer.local", "sender": "x@other.org"},
        {"match": "b@printer.local", "sender": MAILBOX, "user": "nobody"},
        {"match": "c@printer.local", "sender": MAILBOX, "networks": ["300.1.1.1"]},
    ]
    path = rconfig.write()
    lines = path.read_text().splitlines()
    at = lambda text: next(i + 1 for i, line in enumerate(lines) if text in line)
    p = run_cli(["-c", str(path), "check"])
    assert p.returncode != 0
    for text, why in [
        ('sender = "*@example.com"', "is a pattern"),
        ('sender = "x@other.org"', "no channel takes"),
        ('user = "nobody"', "no [[users]] entry"),
        ('networks = ["300.1.1.1"]', "invalid network"),
    ]:
        assert re.search(rf":{at(text)}: .*{re.escape(why)}", p.stderr), (text, p.stderr)

    ok = RewriteConfig(rconfig.tmp)
    ok.file_channel("team", senders=["*@example.com"])
    ok.rewrites += [
        {"match": "*@printer.local", "sender": MAILBOX},
        {"match": "fax@printer.local", "sender": "fax@example.com"},
    ]
    path = ok.write("ok.toml")
    lines = path.read_text().splitlines()
    first = next(i + 1 for i, l in enumerate(lines) if l == "[[rewrite]]")
    second = next(i + 1 for i, l in enumerate(lines) if l == "[[rewrite]]" and i + 1 > first)
    p = run_cli(["-c", str(path), "check"])
    assert p.returncode == 0, p.stderr
    assert f":{second}: warning:" in p.stderr and f"line {first}" in p.stderr, p.stderr
    assert f"*@printer.local -> {MAILBOX} (header_from replace)" in p.stdout, p.stdout


def test_route_explains_the_rewrite_first(rconfig):
    rconfig.file_channel("team", senders=["*@example.com"])
    rconfig.rewrites.append({"match": "*@printer.local", "sender": MAILBOX, "networks": ["192.168.10.0/24"]})
    path = rconfig.write()
    p = run_cli(["-c", str(path), "route", "scanner@printer.local", "--client", "192.168.10.5"])
    assert p.returncode == 0, p.stdout + p.stderr
    first, second = p.stdout.splitlines()[:2]
    assert f"<scanner@printer.local> is rewritten to <{MAILBOX}>" in first, p.stdout
    assert "client in 192.168.10.0/24" in first
    assert f"MAIL FROM:<{MAILBOX}>" in second and "team" in second, p.stdout
    p = run_cli(["-c", str(path), "route", "scanner@printer.local", "--client", "10.0.0.1"])
    assert p.returncode != 0 and "rewritten" not in p.stdout
    assert "MAIL FROM:<scanner@printer.local> is refused" in p.stdout, p.stdout


@pytest.mark.parametrize("mode", ["relay", "queue"])
def test_graph_channel_device_rewritten_and_a_bare_display_name_repaired(rconfig, mailgate, mode):
    """Every channel kind: over Graph (stand-in), the rewritten copy goes out; and a
    client's own `From: dave@… <dave@…>` (no rewrite) is quoted on the Graph path only."""
    from oauth_peers import GraphApi, TokenEndpoint
    from test_graph import MAILBOX as GRAPH_MAILBOX, graph_channel

    endpoint = TokenEndpoint()
    graph = GraphApi(endpoint)
    try:
        if mode == "queue":
            rconfig.server.update({"delivery": "queue", "retry_first": "1s"})
        graph_channel(rconfig, endpoint, graph)
        rconfig.rewrites.append({"match": "*@printer.local", "sender": GRAPH_MAILBOX})
        mg = mailgate(rconfig, env=dict(rconfig.env))
        device = b"To: bob@example.org\r\nSubject: scan\r\n\r\nbody\r\n"
        bare = b"From: " + GRAPH_MAILBOX.encode() + b" <" + GRAPH_MAILBOX.encode() + b">\r\nTo: bob@example.org\r\n\r\nbody\r\n"
        with smtplib.SMTP(*split_addr(mg.addr), timeout=30) as c:
            assert c.sendmail("scanner@printer.local", ["bob@example.org"], device) == {}
            assert c.sendmail(GRAPH_MAILBOX, ["bob@example.org"], bare) == {}
        sent = sorted((s.mime for s in graph.wait_sent(2)), key=lambda m: m.startswith(b"To:"))
        quoted = b'From: "' + GRAPH_MAILBOX.encode() + b'" <' + GRAPH_MAILBOX.encode() + b">\r\nTo: bob@example.org\r\n\r\nbody\r\n"
        assert sent == [quoted, b"To: bob@example.org\r\nSubject: scan\r\nFrom: scanner <" + GRAPH_MAILBOX.encode() + b">\r\n\r\nbody\r\n"], sent
    finally:
        graph.stop()
        endpoint.stop()


def test_the_dsn_goes_to_the_new_sender(rconfig, mailgate, upstream):
    device_setup(rconfig, upstream)
    rconfig.server.update({"delivery": "queue", "retry_first": "1s"})
    upstream.handler.rcpt_reply_for["nobody@example.org"] = "550 5.1.1 No such user here"
    mg = mailgate(rconfig)
    with smtplib.SMTP(*split_addr(mg.addr), timeout=30) as c:
        refused = c.sendmail("scanner@printer.local", ["nobody@example.org"], b"Subject: s\r\n\r\nx\r\n")
        assert refused == {}
    (dsn,) = upstream.wait_messages(1, timeout=20)
    assert dsn.mail_from in ("", "<>") and dsn.rcpt_tos == [MAILBOX], dsn
    assert b"scanner@printer.local" not in dsn.content.split(b"\r\n\r\n")[0]
