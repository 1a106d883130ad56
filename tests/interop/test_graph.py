"""Microsoft Graph channel black box (SPEC §3 kind `graph`, §5, §7): the mailgate binary
against a local Graph stand-in and a local token endpoint (oauth_peers.py), both real
HTTP servers on 127.0.0.1. Nothing contacts Microsoft.
"""

from __future__ import annotations

import pytest

from conftest import message, run_cli, smtp_client, wait_until
from oauth_peers import CLIENT_ID, CLIENT_SECRET, GraphApi, TokenEndpoint
from test_queue import queue_mode, script_data, submit

MAILBOX = "dave@example.com"


@pytest.fixture
def endpoint():
    ep = TokenEndpoint()
    yield ep
    ep.stop()


@pytest.fixture
def graph(endpoint):
    api = GraphApi(endpoint)
    yield api
    api.stop()


def graph_channel(config, endpoint, graph, name="dave", **extra):
    config.env["MG_TEST_CLIENT_SECRET"] = CLIENT_SECRET
    config.channels[name] = {
        "kind": "graph",
        "mailbox": MAILBOX,
        "oauth": {
            "provider": "microsoft",
            "grant": "client_credentials",
            "tenant": "example.com",
            "client_id": CLIENT_ID,
            "client_secret_env": "MG_TEST_CLIENT_SECRET",
            "token_url": endpoint.url + "/token",
            "graph_url": graph.url,
        },
        **extra,
    }


def start(mailgate, config):
    return mailgate(config, env=dict(config.env))


def assert_no_secrets(text: str, endpoint: TokenEndpoint) -> None:
    for s in endpoint.secrets():
        assert s not in text, f"secret {s[:12]}… leaked"


def msg(to="bob@example.org", extra=b""):
    return message(sender=MAILBOX, to=to, body=b".dot first\r\n8bit: gr\xc3\xbc\xc3\x9fe\r\n", extra_headers=extra)


@pytest.mark.parametrize("mode", ["relay", "queue"])
def test_exact_bytes_and_the_bcc_completion(config, mailgate, endpoint, graph, mode):
    if mode == "queue":
        queue_mode(config)
    graph_channel(config, endpoint, graph)
    mg = start(mailgate, config)
    m = msg(extra=b"Cc: carol@example.org\r\n")
    code, text = submit(mg.addr, MAILBOX, ["bob@example.org", "carol@example.org"], m)
    assert code == 250, text
    code, text = submit(mg.addr, MAILBOX, ["bob@example.org", "carol@example.org", "erin@example.org"], m)
    assert code == 250, text
    sent = graph.wait_sent(2)
    assert all(s.mailbox == MAILBOX for s in sent)
    bodies = sorted((s.mime for s in sent), key=len)
    assert bodies[0] == m, "exactly the bytes the client sent"
    assert bodies[1] == b"Bcc: erin@example.org\r\n" + m, "only the added Bcc: differs"
    grants = endpoint.grants()
    assert [g["grant_type"] for g in grants] == ["client_credentials"], grants
    assert grants[0]["scope"] == "https://graph.microsoft.com/.default"
    assert_no_secrets(mg.log(), endpoint)


@pytest.mark.parametrize("mode", ["relay", "queue"])
def test_a_header_recipient_outside_the_envelope_is_refused_before_250(config, mailgate, endpoint, graph, mode):
    if mode == "queue":
        queue_mode(config)
    graph_channel(config, endpoint, graph)
    mg = start(mailgate, config)
    code, text = submit(mg.addr, MAILBOX, ["bob@example.org"], msg(extra=b"Cc: Eve <eve@example.org>\r\n"))
    assert code == 550 and text.startswith("5.7.1") and "<eve@example.org>" in text, text
    assert graph.requests == 0


@pytest.mark.parametrize("mode", ["relay", "queue"])
def test_no_byte_of_the_message_adds_a_recipient_to_the_added_bcc(config, mailgate, endpoint, graph, mode):
    if mode == "queue":
        queue_mode(config)
    graph_channel(config, endpoint, graph)
    mg = start(mailgate, config)
    # A folded line at the very top would continue a Bcc: line put before it; it is a
    # continuation of nothing, which readers disagree on (SPEC §4 last paragraph).
    folded = b" , eve@example.org\r\n" + msg()
    code, text = submit(mg.addr, MAILBOX, ["bob@example.org", "carol@example.org"], folded)
    assert code == 550 and text.startswith("5.7.1") and "header line 1" in text, text
    # RCPT TO:<"eve@example.org,x"@example.org> would read as two addresses in a header:
    # a quoted local part is refused at RCPT when Graph may carry the message.
    with smtp_client(mg.addr) as c:
        c.ehlo()
        assert c.mail(MAILBOX)[0] == 250
        assert c.rcpt("bob@example.org")[0] == 250
        code, text = c.rcpt('"eve@example.org,x"@example.org')
        assert code == 553 and text.startswith(b"5.1.3") and b"quoted local part" in text, text
        plain = msg()
        code, text = c.data(plain)
        assert code == 250, text
    (sent,) = graph.wait_sent(1)
    assert sent.mime == plain, "bob only: nothing added, eve named nowhere"


def test_a_sender_other_than_the_mailbox_is_refused_at_mail_from(config, mailgate, endpoint, graph):
    graph_channel(config, endpoint, graph)
    mg = start(mailgate, config)
    with smtp_client(mg.addr) as c:
        c.ehlo()
        code, text = c.mail("erin@example.com")
        assert code == 550 and text.startswith(b"5.7.1"), text


@pytest.mark.parametrize("mode", ["relay", "queue"])
def test_an_oversized_message_is_refused(config, mailgate, endpoint, graph, mode):
    if mode == "queue":
        queue_mode(config)
    # Over 3,000,000 bytes a message goes the upload way (test_graph_upload.py); this
    # channel's own max_message_size is what refuses it.
    graph_channel(config, endpoint, graph, max_message_size=2_000_000)
    mg = start(mailgate, config)
    big = msg() + b"y" * 76 + b"\r\n"
    big += (b"z" * 998 + b"\r\n") * 3000
    code, text = submit(mg.addr, MAILBOX, ["bob@example.org"], big)
    assert code == 552 and text.startswith("5.3.4"), text
    assert graph.requests == 0


def test_429_with_retry_after_then_delivered(config, mailgate, endpoint, graph):
    queue_mode(config, retry_first="30s", retry_max="1m")
    graph_channel(config, endpoint, graph)
    graph.script.append((429, "TooManyRequests", "1"))
    mg = start(mailgate, config)
    code, text = submit(mg.addr, MAILBOX, ["bob@example.org"], msg())
    assert code == 250 and "queued as" in text, text
    # Retry-After: 1 is honoured instead of the 30 s backoff.
    graph.wait_sent(1, timeout=15)
    assert graph.requests == 2
    mg.wait_log("TooManyRequests")


def test_401_refreshes_the_token_once(config, mailgate, endpoint, graph):
    graph_channel(config, endpoint, graph)
    mg = start(mailgate, config)
    assert submit(mg.addr, MAILBOX, ["bob@example.org"], msg())[0] == 250
    endpoint.revoke_all()
    code, text = submit(mg.addr, MAILBOX, ["bob@example.org"], msg())
    assert code == 250, text
    assert len(endpoint.grants("client_credentials")) == 2, "exactly one refresh"
    assert len(graph.sent) == 2
    assert_no_secrets(mg.log(), endpoint)


def test_403_breaks_the_channel_and_keeps_the_mail(config, mailgate, endpoint, graph):
    queue_mode(config)
    graph_channel(config, endpoint, graph)
    graph.script.append((403, "ErrorAccessDenied"))
    mg = start(mailgate, config)
    code, text = submit(mg.addr, MAILBOX, ["bob@example.org"], msg())
    assert code == 250, text
    mg.wait_log("CHANNEL BROKEN")
    code, text = submit(mg.addr, MAILBOX, ["carol@example.org"], msg(to="carol@example.org"))
    assert code == 250, text
    p = run_cli(["-c", str(config.write()), "queue", "list"], env=dict(config.env))
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("dave") >= 2, p.stdout
    assert graph.requests == 1 and not graph.sent
    assert "ErrorAccessDenied" in mg.log()


def test_400_fails_the_message_with_a_dsn(config, mailgate, endpoint, graph):
    queue_mode(config)
    graph_channel(config, endpoint, graph)
    graph.script.append((400, "ErrorInvalidRecipients"))
    mg = start(mailgate, config)
    assert submit(mg.addr, MAILBOX, ["bob@example.org"], msg())[0] == 250
    dsn = graph.wait_sent(1)[0].mime
    assert b"multipart/report" in dsn and b"ErrorInvalidRecipients" in dsn
    wait_until(lambda: any((config.tmp / "spool" / "failed").glob("*.json")), what="failed/")
    failed = next((config.tmp / "spool" / "failed").glob("*.json")).read_text()
    assert "ErrorInvalidRecipients" in failed


def test_test_channel_checks_the_mailbox_and_sends_nothing(config, endpoint, graph):
    graph_channel(config, endpoint, graph)
    path = config.write()
    p = run_cli(["-c", str(path), "test-channel", "dave"], env=dict(config.env))
    assert p.returncode == 0, p.stderr
    assert "mailbox dave@example.com found" in p.stdout and "OK" in p.stdout, p.stdout
    graph.get_status = 403
    p = run_cli(["-c", str(path), "test-channel", "dave"], env=dict(config.env))
    assert p.returncode == 0, p.stderr
    assert "could not be checked" in p.stdout, p.stdout
    assert graph.requests == 0
    assert_no_secrets(p.stdout + p.stderr, endpoint)


def test_check_and_route_show_the_graph_channel(config, endpoint, graph):
    graph_channel(config, endpoint, graph)
    path = config.write()
    p = run_cli(["-c", str(path), "check"], env=dict(config.env))
    assert p.returncode == 0, p.stderr
    assert f"dave: graph {graph.url}/v1.0/users/{MAILBOX}/sendMail" in p.stdout, p.stdout
    assert "30/min messages, 10000 recipients/day, 500 recipients/message, 4 connections" in p.stdout
    p = run_cli(["-c", str(path), "route", MAILBOX], env=dict(config.env))
    assert p.returncode == 0 and "dave" in p.stdout, p.stdout + p.stderr


def test_fallback_takes_queued_and_new_mail_when_smtp_auth_is_switched_off(
        config, mailgate, upstream, endpoint, graph):
    queue_mode(config)
    config.smtp_channel("alice", upstream, senders=[MAILBOX], fallback="dave")
    graph_channel(config, endpoint, graph)
    script_data(upstream, ["535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."])
    path = config.write()
    p = run_cli(["-c", str(path), "check"], env=dict(config.env))
    assert p.returncode == 0, p.stderr
    assert "fallback: dave" in p.stdout and "fallback for: alice" in p.stdout, p.stdout
    mg = start(mailgate, config)
    m1 = msg()
    assert submit(mg.addr, MAILBOX, ["bob@example.org"], m1)[0] == 250
    assert graph.wait_sent(1)[0].mime == m1
    mg.wait_log("fallback")
    m2 = msg(to="carol@example.org")
    assert submit(mg.addr, MAILBOX, ["carol@example.org"], m2)[0] == 250
    assert graph.wait_sent(2)[1].mime == m2
    assert not upstream.messages
    p = run_cli(["-c", str(path), "check"], env=dict(config.env))
    assert "mail goes over fallback dave" in p.stdout, p.stdout
    assert_no_secrets(mg.log(), endpoint)


def test_a_fallback_loop_is_a_config_error(config, upstream):
    config.smtp_channel("a", upstream, senders=["x@example.com"], fallback="b")
    config.smtp_channel("b", upstream, senders=["x@example.com"], fallback="a")
    p = run_cli(["-c", str(config.write()), "check"])
    assert p.returncode != 0
    assert "loops back" in p.stderr, p.stderr
