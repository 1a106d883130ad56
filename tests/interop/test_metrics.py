"""Metrics and health, black box (SPEC §8): the mailgate binary with `[metrics] listen`,
scraped over HTTP with urllib and parsed with the Prometheus project's own text parser
(`prometheus_client.parser`). Every counter is compared with what the test made happen,
exactly; every log is searched for every secret the test used.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import smtplib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import IO_TIMEOUT, hash_password, message, smtp_client, wait_until
from oauth_peers import CLIENT_SECRET, REFRESH_TOKEN, TokenEndpoint, XOAuth2Handler
from test_oauth import MAILBOX, assert_no_secrets, oauth_channel
from test_queue import queue_mode, script_data, submit

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "contrib" / "grafana" / "mailgate.json"
# SPEC §8: the names served, and nothing else.
METRIC_NAMES = {
    "mailgate_messages_total",
    "mailgate_queue_messages",
    "mailgate_channel_state",
    "mailgate_delivery_seconds",
    "mailgate_oauth_token_refreshes_total",
    "mailgate_rewrites_total",
}
SERVED = re.compile(r"serving metrics at (http://\S+)/metrics")

CLIENT_PASSWORD = "client-pw-Zq81!metrics"
UPSTREAM_PASSWORD = "upstream-pw-Kd27!metrics"


# Every secret a test here uses; the OAuth test adds the tokens its endpoint issued.
SECRETS = [CLIENT_PASSWORD, UPSTREAM_PASSWORD, "wrong-" + UPSTREAM_PASSWORD, CLIENT_SECRET,
           REFRESH_TOKEN]


@pytest.fixture
def mailgate(mailgate):
    """conftest's runner, and at the end of each test a grep of every log it produced
    (complete: the process is stopped first) for every secret."""
    started = []

    def start(*args, **kw):
        mg = mailgate(*args, **kw)
        started.append(mg)
        return mg

    yield start
    for mg in started:
        if mg.proc.poll() is None:
            mg.signal(signal.SIGTERM)
            mg.wait(15)
        log = mg.log()
        leaked = [s[:10] + "…" for s in SECRETS if s in log]
        assert not leaked, f"secrets in the log of {mg.config_path}: {leaked}"


def with_metrics(config) -> None:
    config.metrics = {"listen": "127.0.0.1:0"}


def base_url(mg) -> str:
    return SERVED.search(mg.wait_log(SERVED.pattern)).group(1)


def get(url: str, method: str = "GET", headers=None) -> tuple[int, str, object]:
    """One HTTP request; (status, body, headers) whatever the status."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=IO_TIMEOUT) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers


class Scrape:
    """One scrape of /metrics, parsed: samples by (name, labels)."""

    def __init__(self, base: str):
        status, body, headers = get(base + "/metrics")
        assert status == 200, body
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4"), headers
        self.text = body
        self.families = {f.name: f for f in text_string_to_metric_families(body)}
        self.samples = {}
        for family in self.families.values():
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(self, name: str, **labels) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]

    def messages(self, channel: str) -> dict[str, float]:
        return {
            outcome: self.samples.get(
                ("mailgate_messages_total", (("channel", channel), ("outcome", outcome))), 0.0)
            for outcome in ("accepted", "refused", "delivered", "deferred", "failed")
        }

    def state(self, channel: str) -> dict[str, float]:
        return {s: self.value("mailgate_channel_state", channel=channel, state=s)
                for s in ("ok", "limited", "broken")}


def assert_served_names(scrape: Scrape) -> None:
    """The parser typed every family (a counter under its _total name would otherwise come
    back untyped), and only SPEC §8 names are served."""
    types = {name: f.type for name, f in scrape.families.items()}
    # prometheus_client names a counter family without `_total`, its samples with it.
    assert types.get("mailgate_messages") == "counter", types
    assert types.get("mailgate_delivery_seconds") == "histogram", types
    names = {s[0] for s in scrape.samples}
    bases = {re.sub(r"_(bucket|sum|count)$", "", n) if "delivery_seconds" in n else n for n in names}
    assert bases <= METRIC_NAMES, bases - METRIC_NAMES


def test_queue_mode_counts_deliveries_deferrals_and_a_failure_exactly(config, mailgate, upstream):
    queue_mode(config, retry_first="3s", retry_max="4s")
    with_metrics(config)
    config.smtp_channel("up", upstream, senders=["*@example.com"])
    config.users.append({"name": "app", "password_hash": hash_password(CLIENT_PASSWORD),
                         "senders": ["*@example.com"]})
    times = script_data(upstream, ["451 4.7.0 Try again later"])
    upstream.handler.rcpt_reply_for["nobody@example.org"] = "550 5.1.1 No such user here"
    mg = mailgate(config)
    base = base_url(mg)

    first = Scrape(base)
    assert first.messages("up") == dict.fromkeys(first.messages("up"), 0.0)
    assert first.value("mailgate_queue_messages", channel="up") == 0
    assert first.state("up") == {"ok": 1, "limited": 0, "broken": 0}

    # 1: accepted, deferred once (451), then delivered. An authenticated client.
    with smtp_client(mg.addr) as c:
        c.ehlo()
        c.login("app", CLIENT_PASSWORD)
        c.sendmail("alice@example.com", ["bob@example.org"], message(subject="451 then 250"))
    wait_until(lambda: Scrape(base).messages("up")["deferred"] == 1, 15, "the deferral counted")
    during = Scrape(base)
    assert during.value("mailgate_queue_messages", channel="up") == 1, "still queued"
    assert during.messages("up")["delivered"] == 0
    upstream.wait_messages(1, timeout=20)
    wait_until(lambda: Scrape(base).messages("up")["delivered"] == 1, 10, "the delivery counted")

    # 2: accepted, then failed (550 to its only recipient); its DSN to alice is delivered.
    code, text = submit(mg.addr, "alice@example.com", ["nobody@example.org"],
                        message(to="nobody@example.org", subject="lost"))
    assert code == 250, text
    upstream.wait_messages(2, timeout=20)
    wait_until(lambda: Scrape(base).messages("up")["delivered"] == 2, 10, "the DSN's delivery counted")

    # 3: refused at MAIL FROM: no channel takes this sender (channel="").
    with smtp_client(mg.addr) as c:
        c.ehlo()
        code, _ = c.mail("mallory@elsewhere.net")
        assert code == 550
    # 4: refused after DATA on channel "up": From: is not a sender the channel may use.
    with smtp_client(mg.addr) as c:
        c.ehlo()
        with pytest.raises(smtplib.SMTPDataError) as refused:
            c.sendmail("alice@example.com", ["bob@example.org"], message(sender="eve@other.org"))
        assert refused.value.smtp_code == 550

    end = Scrape(base)
    assert_served_names(end)
    assert end.messages("up") == {
        "accepted": 2, "refused": 1, "delivered": 2, "deferred": 1, "failed": 1,
    }
    assert end.messages("") == {
        "accepted": 0, "refused": 1, "delivered": 0, "deferred": 0, "failed": 0,
    }
    # One upstream transaction each: 451, 250, the 550 (RCPT), the DSN.
    assert len(times) == 3, "DATA: 451, 250, DSN (the 550 came at RCPT)"
    assert end.value("mailgate_delivery_seconds_count", channel="up") == 4
    assert end.value("mailgate_delivery_seconds_bucket", channel="up", le="+Inf") == 4
    assert 0 < end.value("mailgate_delivery_seconds_sum", channel="up") < 60
    assert end.value("mailgate_queue_messages", channel="up") == 0
    assert end.state("up") == {"ok": 1, "limited": 0, "broken": 0}
    for secret in (CLIENT_PASSWORD,):
        assert secret not in mg.log() and secret not in end.text


def test_relay_mode_counts_the_upstreams_answers(config, mailgate, upstream_factory, certs):
    up = upstream_factory(certs=certs, starttls=True, users={"relay-user": UPSTREAM_PASSWORD},
                          auth_required=True)
    config.env["MG_TEST_UPSTREAM_PW"] = UPSTREAM_PASSWORD
    with_metrics(config)
    config.smtp_channel("relay", up, username="relay-user", password_env="MG_TEST_UPSTREAM_PW")
    mg = mailgate(config)
    base = base_url(mg)

    answers = [None, "451 4.3.0 Busy, try later", "554 5.6.0 Content refused", None]
    heard = []
    for data_reply in answers:
        up.handler.data_reply = data_reply
        code, _ = submit(mg.addr, "alice@example.com", ["bob@example.org"], message())
        heard.append(code)
    assert heard == [250, 451, 554, 250]

    s = Scrape(base)
    assert_served_names(s)
    # The client's reply: accepted or refused; the upstream's: delivered, deferred, failed.
    assert s.messages("relay") == {
        "accepted": 2, "refused": 2, "delivered": 2, "deferred": 1, "failed": 1,
    }
    assert s.value("mailgate_delivery_seconds_count", channel="relay") == 4
    assert ("mailgate_queue_messages", (("channel", "relay"),)) not in s.samples, "relay mode has no queue"
    assert s.state("relay") == {"ok": 1, "limited": 0, "broken": 0}
    assert UPSTREAM_PASSWORD not in mg.log() and UPSTREAM_PASSWORD not in s.text


def test_oauth_token_refreshes_by_result_and_no_secret_anywhere(config, mailgate, upstream_factory,
                                                               certs):
    # Tokens that live less than the 10-minute refresh margin: every message refreshes.
    endpoint = TokenEndpoint(lifetime=60)
    try:
        # The upstream drops a connection idle for half a second: each message then logs in
        # on a new connection (mailgate reuses a live one without asking for a token).
        up = upstream_factory(
            certs=certs, starttls=True, handler=XOAuth2Handler(endpoint, MAILBOX),
            smtp_kwargs={"auth_require_tls": True, "auth_exclude_mechanism": ["LOGIN", "PLAIN"],
                         "timeout": 0.5})
        oauth_channel(config, "m365", up, endpoint)
        with_metrics(config)
        mg = mailgate(config, env=dict(config.env))
        base = base_url(mg)
        codes = []
        for mode in ("ok", "ok", "503", "invalid_grant"):
            time.sleep(1)
            endpoint.mode = mode
            code, _ = submit(mg.addr, MAILBOX, ["bob@example.org"], message(sender=MAILBOX))
            codes.append(code)
        assert codes[:2] == [250, 250] and all(400 <= c < 500 for c in codes[2:]), codes
        s = Scrape(base)
        assert_served_names(s)
        refreshes = {r: s.samples.get(("mailgate_oauth_token_refreshes_total",
                                       (("channel", "m365"), ("result", r))), 0.0)
                     for r in ("ok", "error", "rejected")}
        assert refreshes == {"ok": 2, "error": 1, "rejected": 1}, refreshes
        assert s.state("m365") == {"ok": 0, "limited": 0, "broken": 1}
        assert s.messages("m365") == {
            "accepted": 2, "refused": 2, "delivered": 2, "deferred": 2, "failed": 0,
        }
        assert_no_secrets(mg.log() + s.text, endpoint)
    finally:
        SECRETS.extend(x for x in endpoint.secrets() if x not in SECRETS)
        endpoint.stop()


def test_healthz_is_ok_and_503_when_the_spool_cannot_be_written(config, mailgate):
    """Proves that /healthz writes under spool_dir and reports a failure: the spool folder is
    replaced by a file (which stops root as well as anyone; a chmod 0500 would not stop root,
    and the tests run as root). Then, for a non-root run only, the permission case too."""
    queue_mode(config)
    with_metrics(config)
    config.file_channel("outbox")
    mg = mailgate(config)
    base = base_url(mg)
    assert get(base + "/healthz")[:2] == (200, "ok")
    assert get(base + "/nope")[0] == 404
    assert get(base + "/healthz", method="POST")[0] == 405

    spool = Path(config.server["spool_dir"])
    away = spool.with_name("spool.away")
    spool.rename(away)
    try:
        spool.write_text("not a folder\n")
        status, body, _ = get(base + "/healthz")
        assert status == 503, body
        assert body.startswith("spool is not writable: ") and str(spool / "tmp") in body, body
    finally:
        spool.unlink()
        away.rename(spool)
    assert get(base + "/healthz")[:2] == (200, "ok")
    assert os.listdir(spool / "tmp") == [], "the probe leaves nothing behind"

    if os.geteuid() != 0:
        (spool / "tmp").chmod(0o500)
        try:
            status, body, _ = get(base + "/healthz")
            assert status == 503 and "Permission denied" in body, body
        finally:
            (spool / "tmp").chmod(0o700)
    mg.wait_log("health check failed")


def test_openmetrics_when_the_scraper_asks_for_it(config, mailgate):
    with_metrics(config)
    config.file_channel("outbox")
    mg = mailgate(config)
    code, _ = submit(mg.addr, "alice@example.com", ["bob@example.org"], message())
    assert code == 250
    status, body, headers = get(base_url(mg) + "/metrics", headers={
        "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"})
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
    families = {f.name: f for f in om_parse(body)}
    sample = [s for s in families["mailgate_messages"].samples
              if s.labels == {"channel": "outbox", "outcome": "accepted"}]
    assert [s.value for s in sample] == [1]


def test_metrics_config_problems_are_listed_and_check_shows_it(config):
    from conftest import run_cli
    config.file_channel("outbox")
    config.metrics = {"listen": "nowhere", "path": "/m"}
    path = config.write()
    p = run_cli(["-c", str(path), "check"])
    assert p.returncode != 0
    lines = [line for line in p.stderr.splitlines() if "[metrics]" in line]
    assert len(lines) == 2, p.stderr
    assert re.search(r"proxy\.toml:\d+: \"listen\" in \[metrics\]: invalid listener", p.stderr), p.stderr
    assert re.search(r"proxy\.toml:\d+: unknown key \"path\" in \[metrics\]", p.stderr), p.stderr
    config.metrics = {"listen": "0.0.0.0:9325"}
    p = run_cli(["-c", str(config.write()), "check"])
    assert p.returncode == 0, p.stderr
    assert ("metrics: 0.0.0.0:9325 (/metrics, /healthz, status page / and /status.json) "
            "(not loopback, yet only loopback clients are answered") in p.stdout, p.stdout
    config.metrics = {"listen": "0.0.0.0:9325", "allow_networks": ["10.0.0.0/8"], "status_page": False}
    p = run_cli(["-c", str(config.write()), "check"])
    assert p.returncode == 0, p.stderr
    assert ("metrics: 0.0.0.0:9325 (/metrics, /healthz)\n"
            "  answers loopback clients and 10.0.0.0/8; 403 to others\n") in p.stdout, p.stdout


def test_the_grafana_dashboard_uses_only_served_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    used = set()
    for expr in exprs:
        for name in re.findall(r"\bmailgate_[a-z_]+", expr):
            used.add(re.sub(r"_(bucket|sum|count)$", "", name) if "delivery_seconds" in name else name)
    assert used <= METRIC_NAMES, used - METRIC_NAMES
    assert used == METRIC_NAMES, f"no panel for {METRIC_NAMES - used}"


def test_the_commented_metrics_example_in_the_shipped_config_is_valid(tmp_path):
    from conftest import run_cli
    text = (REPO / "proxy.toml").read_text()
    lines = text.splitlines()
    start = lines.index("# [metrics]")
    block = [lines[start][2:]]
    for line in lines[start + 1:]:
        if not re.match(r"# \w+ = ", line):
            break
        block.append(line[2:])
    assert block == ["[metrics]", 'listen = "127.0.0.1:9325"'], block
    (tmp_path / "outbox").mkdir()
    path = tmp_path / "proxy.toml"
    path.write_text(text + "\n" + "\n".join(block) + "\n")
    p = run_cli(["-c", str(path), "check"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "metrics: 127.0.0.1:9325 (/metrics, /healthz, status page / and /status.json)\n" in p.stdout, p.stdout


def test_the_http_server_bounds_connections_and_times_out_idle_ones(config, mailgate):
    """16 connections at once; the 17th is closed at once. A client that sends nothing is
    dropped after the 5 s header timeout."""
    import socket
    with_metrics(config)
    config.file_channel("outbox")
    mg = mailgate(config)
    base = base_url(mg)
    host, port = base.removeprefix("http://").rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=IO_TIMEOUT) for _ in range(16)]
    try:
        time.sleep(0.3)  # let the server take them all
        extra = socket.create_connection((host, int(port)), timeout=IO_TIMEOUT)
        assert extra.recv(100) == b"", "closed without an answer"
        extra.close()
        started = time.monotonic()
        assert idle[0].recv(100) == b"", "the idle connection is closed by the server"
        took = time.monotonic() - started
        assert 3.5 < took < 8, took
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: get(base + "/healthz")[0] == 200, 5, "the server to serve again")


def test_queue_mode_channel_states_broken_and_limited(config, mailgate, upstream_factory, certs):
    """Refused credentials break a channel; a provider quota reply holds it (limited). Both
    keep their mail queued, each attempt counted as deferred."""
    queue_mode(config)
    with_metrics(config)
    creds = upstream_factory(certs=certs, starttls=True, users={"relay-user": UPSTREAM_PASSWORD},
                             auth_required=True)
    config.env["MG_TEST_WRONG_PW"] = "wrong-" + UPSTREAM_PASSWORD
    config.smtp_channel("creds", creds, senders=["*@creds.example"], username="relay-user",
                        password_env="MG_TEST_WRONG_PW")
    quota = upstream_factory()
    quota.handler.data_reply = ("554 5.2.0 STOREDRV.Submission.Exception:"
                                "SubmissionQuotaExceededException; Failed")
    config.smtp_channel("quota", quota, senders=["*@quota.example"])
    mg = mailgate(config)
    base = base_url(mg)
    for sender in ("a@creds.example", "a@quota.example"):
        code, text = submit(mg.addr, sender, ["bob@example.org"], message(sender=sender))
        assert code == 250, text

    def settled():
        s = Scrape(base)
        return s.state("creds")["broken"] == 1 and s.state("quota")["limited"] == 1
    wait_until(settled, 15, "both channels to change state")
    s = Scrape(base)
    assert s.state("creds") == {"ok": 0, "limited": 0, "broken": 1}
    assert s.state("quota") == {"ok": 0, "limited": 1, "broken": 0}
    for channel in ("creds", "quota"):
        assert s.messages(channel) == {
            "accepted": 1, "refused": 0, "delivered": 0, "deferred": 1, "failed": 0,
        }, channel
        assert s.value("mailgate_queue_messages", channel=channel) == 1
        assert s.value("mailgate_delivery_seconds_count", channel=channel) == 1
    log = mg.log()
    for secret in (UPSTREAM_PASSWORD, "wrong-" + UPSTREAM_PASSWORD):
        assert secret not in log and secret not in s.text


def test_healthz_is_503_while_shutting_down(config, mailgate):
    """/healthz is served until the end: while a transaction in flight drains after SIGTERM,
    it says the listeners are not running."""
    with_metrics(config)
    config.server["shutdown_grace"] = "10s"
    config.file_channel("outbox")
    mg = mailgate(config)
    base = base_url(mg)
    assert get(base + "/healthz")[0] == 200
    with smtp_client(mg.addr) as c:
        c.ehlo()
        assert c.mail("alice@example.com")[0] == 250  # an open transaction keeps it draining
        mg.signal(signal.SIGTERM)
        mg.wait_log("shutting down")
        status, body, _ = get(base + "/healthz")
        assert (status, body) == (503, "SMTP listeners are not running")
    assert mg.wait(15) == 0
