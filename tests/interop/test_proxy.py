"""Outbound proxy black box (SPEC §3 `[server] https_proxy`, §7 "Outbound proxy"): the
mailgate binary, a real HTTP proxy (Debian's tinyproxy on a free port, stopped by PID), the
local token endpoint and Graph stand-in (HTTPS with a test CA, so requests tunnel with
CONNECT as they do to Microsoft), and an aiosmtpd upstream taking AUTH XOAUTH2.

What went through the proxy is read from tinyproxy's own log: one `CONNECT host:port` (or
`POST http://…` for a plain-http target) line per request it carried.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Optional

import pytest

from conftest import free_port, message, run_cli, smtp_client, wait_until
from oauth_peers import CLIENT_ID, CLIENT_SECRET, GraphApi, TokenEndpoint, XOAuth2Handler
from test_queue import queue_mode, submit

TINYPROXY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
MICROSOCKS = shutil.which("microsocks") or "/usr/bin/microsocks"
GRAPH_BOX = "dave@example.com"
SMTP_BOX = "alice@example.com"
PROXY_USER = "mg-proxy-user"
PROXY_PASSWORD = "PROXY-PW-7d2e91"

pytestmark = pytest.mark.skipif(not Path(TINYPROXY).exists(), reason="tinyproxy not installed")


class Tinyproxy:
    """tinyproxy in the foreground on 127.0.0.1:<free port>, logging every connection."""

    def __init__(self, d: Path, auth: Optional[tuple[str, str]] = None):
        d.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_file = d / "tinyproxy.log"
        conf = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 30",
            f'LogFile "{self.log_file}"',
            "LogLevel Connect",
            "MaxClients 50",
            "Allow 127.0.0.1",
            # No ConnectPort line: CONNECT to any port (the stand-ins' ports are random).
        ]
        if auth:
            conf.append(f"BasicAuth {auth[0]} {auth[1]}")
        conf_file = d / "tinyproxy.conf"
        conf_file.write_text("\n".join(conf) + "\n")
        self.proc = subprocess.Popen(
            [TINYPROXY, "-d", "-c", str(conf_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(self._listening, what="tinyproxy listening")

    def _listening(self) -> bool:
        import socket

        if self.proc.poll() is not None:
            pytest.fail(f"tinyproxy exited with {self.proc.returncode}: {self.log()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def requests(self) -> list[str]:
        """The request lines tinyproxy received: `CONNECT 127.0.0.1:123 HTTP/1.1`, …"""
        return re.findall(r"Request \(file descriptor \d+\): (.*)", self.log())

    def tunnels_to(self, port: int) -> int:
        return sum(1 for r in self.requests() if r.startswith(f"CONNECT 127.0.0.1:{port} "))

    def url(self, auth: Optional[tuple[str, str]] = None) -> str:
        user = f"{auth[0]}:{auth[1]}@" if auth else ""
        return f"http://{user}127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


@pytest.fixture
def proxy_factory(tmp_path):
    started: list[Tinyproxy] = []

    def make(auth=None) -> Tinyproxy:
        p = Tinyproxy(tmp_path / f"tinyproxy{len(started)}", auth)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()
        print(f"--- tinyproxy log ---\n{p.log()}")


@pytest.fixture
def endpoint(certs):
    ep = TokenEndpoint(tls=certs.server_context())
    yield ep
    ep.stop()


@pytest.fixture
def graph(endpoint, certs):
    api = GraphApi(endpoint, tls=certs.server_context())
    yield api
    api.stop()


def channels(config, endpoint, graph, upstream):
    """A graph channel for GRAPH_BOX and an XOAUTH2 SMTP channel for SMTP_BOX, both with
    client-credentials tokens from `endpoint`."""
    config.env["MG_TEST_CLIENT_SECRET"] = CLIENT_SECRET
    oauth = {
        "provider": "microsoft",
        "grant": "client_credentials",
        "tenant": "example.com",
        "client_id": CLIENT_ID,
        "client_secret_env": "MG_TEST_CLIENT_SECRET",
        "token_url": endpoint.url + "/token",
    }
    config.channels["dave"] = {
        "kind": "graph",
        "mailbox": GRAPH_BOX,
        "oauth": {**oauth, "graph_url": graph.url},
    }
    config.smtp_channel("alice", upstream, senders=[SMTP_BOX], username=SMTP_BOX, auth="xoauth2",
                        oauth=oauth)


def xoauth_upstream(upstream_factory, certs, endpoint):
    return upstream_factory(
        certs=certs,
        starttls=True,
        handler=XOAuth2Handler(endpoint, SMTP_BOX),
        smtp_kwargs={"auth_require_tls": True, "auth_exclude_mechanism": ["LOGIN", "PLAIN"]},
    )


def send_both(mg) -> None:
    for sender in (GRAPH_BOX, SMTP_BOX):
        code, text = submit(mg.addr, sender, ["bob@example.org"], message(sender=sender, to="bob@example.org"))
        assert code == 250, f"{sender}: {code} {text}"


@pytest.mark.parametrize("with_auth", [False, True], ids=["open", "basic-auth"])
def test_token_and_graph_requests_go_through_https_proxy_and_smtp_goes_direct(
        config, mailgate, upstream_factory, certs, endpoint, graph, proxy_factory, with_auth):
    auth = (PROXY_USER, PROXY_PASSWORD) if with_auth else None
    proxy = proxy_factory(auth)
    upstream = xoauth_upstream(upstream_factory, certs, endpoint)
    channels(config, endpoint, graph, upstream)
    config.server["https_proxy"] = proxy.url(auth)
    # The environment's proxy is ignored when https_proxy is set; a bogus one proves it.
    mg = mailgate(config, env={"SSL_CERT_FILE": str(certs.ca_file), "https_proxy": "http://127.0.0.1:9"})
    send_both(mg)
    assert graph.wait_sent(1)[0].mailbox == GRAPH_BOX
    assert len(upstream.wait_messages(1)) == 1
    # Both channels fetched a token (one each), Graph got one send: all through the proxy.
    assert len(endpoint.grants("client_credentials")) == 2
    assert proxy.tunnels_to(endpoint.port) == 2, proxy.requests()
    assert proxy.tunnels_to(int(graph.url.rsplit(":", 1)[1])) >= 1, proxy.requests()
    # The SMTP channel connected directly: the proxy never heard of the upstream's port.
    assert not any(f":{upstream.port} " in r for r in proxy.requests()), proxy.requests()
    assert PROXY_PASSWORD not in mg.log()
    # `check` says where outbound HTTP goes, without the proxy's password.
    path = config.write()
    p = run_cli(["-c", str(path), "check"], env={**config.env, "SSL_CERT_FILE": str(certs.ca_file)})
    assert p.returncode == 0, p.stderr
    shown = f"http://{'***@' if with_auth else ''}127.0.0.1:{proxy.port}"
    assert f"outbound HTTP (OAuth tokens, Graph): through {shown} ([server] https_proxy)" in p.stdout
    assert PROXY_PASSWORD not in p.stdout + p.stderr


def test_a_wrong_proxy_password_defers_and_is_never_logged(
        config, mailgate, upstream_factory, certs, endpoint, graph, proxy_factory):
    proxy = proxy_factory((PROXY_USER, PROXY_PASSWORD))
    upstream = xoauth_upstream(upstream_factory, certs, endpoint)
    channels(config, endpoint, graph, upstream)
    queue_mode(config)
    wrong = "WRONG-PW-41c07a"
    config.server["https_proxy"] = proxy.url((PROXY_USER, wrong))
    mg = mailgate(config, env={"SSL_CERT_FILE": str(certs.ca_file)})
    send_both(mg)
    # Both token requests reached the proxy and were refused there; the mail waits.
    wait_until(lambda: proxy.tunnels_to(endpoint.port) >= 2, what="token requests at the proxy")
    for channel in ("dave", "alice"):
        mg.wait_log(rf"channel={channel}.*the outbound proxy refused the tunnel.*will retry",
                    timeout=15)
    assert endpoint.grants() == [], "nothing got past the proxy"
    assert graph.sent == [] and upstream.messages == []
    p = run_cli(["-c", str(config.write()), "queue", "list"], env=config.env)
    assert p.returncode == 0, p.stderr
    assert SMTP_BOX in p.stdout and GRAPH_BOX in p.stdout, p.stdout
    log = mg.log()
    assert "broken" not in log.lower(), "a proxy refusal does not break the channel"
    assert wrong not in log and PROXY_PASSWORD not in log


@pytest.mark.parametrize("variable", ["http_proxy", "HTTP_PROXY", "ALL_PROXY"])
def test_the_environment_proxy_as_curl_reads_it(
        config, mailgate, upstream_factory, certs, proxy_factory, variable):
    """Plain-http peers (loopback), so the proxy forwards `POST http://…` itself: lowercase
    http_proxy, HTTP_PROXY (SPEC §7) or ALL_PROXY is used, loopback included, unless
    NO_PROXY lists it."""
    endpoint = TokenEndpoint()
    graph = GraphApi(endpoint)
    try:
        proxy = proxy_factory()
        upstream = xoauth_upstream(upstream_factory, certs, endpoint)
        channels(config, endpoint, graph, upstream)
        mg = mailgate(config, env={variable: f"127.0.0.1:{proxy.port}"})
        send_both(mg)
        graph.wait_sent(1)
        upstream.wait_messages(1)
        posts = [r for r in proxy.requests() if r.startswith("POST http://127.0.0.1:")]
        assert sum(f":{endpoint.port}/token " in r for r in posts) == 2, proxy.requests()
        assert any("/sendMail " in r for r in posts), proxy.requests()
    finally:
        graph.stop()
        endpoint.stop()


@pytest.mark.parametrize("env", [
    {"http_proxy": "PROXY", "NO_PROXY": "localhost,127.0.0.1"},
    {"http_proxy": "PROXY", "no_proxy": "*"},
], ids=["NO_PROXY-lists-loopback", "no_proxy-star"])
def test_requests_go_direct_where_curl_would(config, mailgate, upstream_factory, certs, proxy_factory, env):
    endpoint = TokenEndpoint()
    graph = GraphApi(endpoint)
    try:
        proxy = proxy_factory()
        upstream = xoauth_upstream(upstream_factory, certs, endpoint)
        channels(config, endpoint, graph, upstream)
        env = {k: (f"http://127.0.0.1:{proxy.port}" if v == "PROXY" else v) for k, v in env.items()}
        mg = mailgate(config, env=env)
        send_both(mg)
        graph.wait_sent(1)
        upstream.wait_messages(1)
        assert proxy.requests() == []
    finally:
        graph.stop()
        endpoint.stop()


def test_check_reports_a_bad_https_proxy_with_its_line(config):
    config.file_channel()
    config.server["https_proxy"] = "socks5://u:SOCKS-PW-99a1@127.0.0.1:1080"
    path = config.write()
    p = run_cli(["-c", str(path), "check"])
    assert p.returncode != 0
    line = next(i for i, l in enumerate(path.read_text().splitlines(), 1) if l.startswith("https_proxy"))
    assert f":{line}:" in p.stderr + p.stdout, p.stderr
    assert "https_proxy" in p.stderr
    assert "SOCKS-PW-99a1" not in p.stdout + p.stderr


# --- The environment's proxy never stops start-up; an unusable one fails only the requests
# --- it would carry, temporarily, naming its variable.

UNUSABLE_PW = "ENV-PROXY-PW-5c1e"


@pytest.mark.parametrize("env", [
    {"ALL_PROXY": "socks5://127.0.0.1:1080", "NO_PROXY": "127.0.0.1"},
    {"all_proxy": f"ftp://user:{UNUSABLE_PW}@127.0.0.1:1", "no_proxy": "localhost,127.0.0.1"},
    {"https_proxy": "socks5h://127.0.0.1:1080", "http_proxy": "PROXY"},
    {"ALL_PROXY": "socks5://127.0.0.1:1080", "http_proxy": "PROXY"},
    {"all_proxy": f"socks9://user:{UNUSABLE_PW}@127.0.0.1:1", "http_proxy": "PROXY"},
    {"HTTPS_PROXY": "http://[::1", "HTTP_PROXY": "not a url", "NO_PROXY": "*"},
], ids=["ALL_PROXY-socks5-NO_PROXY", "all_proxy-ftp-no_proxy", "https_proxy-socks5h",
        "ALL_PROXY-socks5-shadowed", "all_proxy-garbage-shadowed", "garbage-NO_PROXY-star"])
def test_an_environment_proxy_never_stops_start_up_or_check(
        config, mailgate, upstream_factory, certs, proxy_factory, env):
    """Where the environment's proxy is never consulted (NO_PROXY lists the host, or the
    scheme's own variable takes the request; the peers are plain http on loopback),
    `check` passes and every channel delivers: file, SMTP (never proxied, SPEC §7), and
    the OAuth ones."""
    endpoint = TokenEndpoint()
    graph = GraphApi(endpoint)
    try:
        proxy = proxy_factory()
        env = {k: (f"http://127.0.0.1:{proxy.port}" if v == "PROXY" else v) for k, v in env.items()}
        outbox = config.file_channel("outbox", senders=["file@example.com"])
        relay = upstream_factory()
        config.smtp_channel("relay", relay, senders=["smtp@example.com"])
        upstream = xoauth_upstream(upstream_factory, certs, endpoint)
        channels(config, endpoint, graph, upstream)
        p = run_cli(["-c", str(config.write()), "check"], env={**config.env, **env})
        assert p.returncode == 0, p.stderr
        assert p.stdout.rstrip().endswith(": OK") and "warning" not in p.stderr, p.stderr
        mg = mailgate(config, env=env)
        for sender in ("file@example.com", "smtp@example.com", GRAPH_BOX, SMTP_BOX):
            code, text = submit(mg.addr, sender, ["bob@example.org"],
                                message(sender=sender, to="bob@example.org"))
            assert code == 250, f"{sender}: {code} {text}"
        assert len(relay.wait_messages(1)) == 1
        assert len(upstream.wait_messages(1)) == 1
        assert graph.wait_sent(1)[0].mailbox == GRAPH_BOX
        wait_until(lambda: len(list(outbox.rglob("*.eml"))) == 1, what="the file channel's message")
        if "http_proxy" in env:
            assert any(f":{endpoint.port}/token " in r for r in proxy.requests()), proxy.requests()
        else:
            assert proxy.requests() == []
        assert UNUSABLE_PW not in mg.log() + p.stdout + p.stderr
    finally:
        graph.stop()
        endpoint.stop()


def test_an_environment_proxy_is_not_read_without_an_http_channel(config, mailgate, upstream):
    outbox = config.file_channel("outbox", senders=["file@example.com"])
    config.smtp_channel("relay", upstream, senders=["smtp@example.com"])
    env = {"ALL_PROXY": "socks5://127.0.0.1:1080", "https_proxy": f"garbage://u:{UNUSABLE_PW}@x"}
    p = run_cli(["-c", str(config.write()), "check"], env=env)
    assert p.returncode == 0 and "warning" not in p.stderr, p.stderr
    assert "outbound HTTP" not in p.stdout, "nothing uses it"
    mg = mailgate(config, env=env)
    for sender in ("file@example.com", "smtp@example.com"):
        code, text = submit(mg.addr, sender, ["bob@example.org"], message(sender=sender, to="bob@example.org"))
        assert code == 250, f"{sender}: {code} {text}"
    assert len(upstream.wait_messages(1)) == 1
    wait_until(lambda: len(list(outbox.rglob("*.eml"))) == 1, what="the file channel's message")


def test_a_request_through_an_unusable_proxy_waits_in_the_queue_and_says_why(
        config, mailgate, upstream_factory, certs):
    endpoint = TokenEndpoint()
    graph = GraphApi(endpoint)
    try:
        upstream = xoauth_upstream(upstream_factory, certs, endpoint)
        channels(config, endpoint, graph, upstream)
        queue_mode(config)
        env = {"ALL_PROXY": f"ftp://user:{UNUSABLE_PW}@127.0.0.1:1"}
        # `check`: a warning per channel that would use it, not an error.
        path = config.write()
        p = run_cli(["-c", str(path), "check"], env={**config.env, **env})
        assert p.returncode == 0, p.stderr
        for channel in ("dave", "alice"):
            assert re.search(rf"warning: channel {channel}: .*will fail until this is fixed: "
                             r"the environment's ALL_PROXY=ftp://\*\*\*@127\.0\.0\.1:1 is not a proxy",
                             p.stderr), p.stderr
        assert "http FAILING (unusable ALL_PROXY)" in p.stdout, p.stdout
        mg = mailgate(config, env=env)
        send_both(mg)
        for channel in ("dave", "alice"):
            mg.wait_log(rf"channel={channel}.*ALL_PROXY=ftp://\*\*\*@127\.0\.0\.1:1 is not a proxy "
                        r"mailgate can use.*will retry", timeout=15)
        assert endpoint.grants() == [], "nothing went direct"
        assert graph.sent == [] and upstream.messages == []
        q = run_cli(["-c", str(path), "queue", "list"], env=config.env)
        assert q.returncode == 0, q.stderr
        assert SMTP_BOX in q.stdout and GRAPH_BOX in q.stdout, q.stdout
        log = mg.log()
        assert "broken" not in log.lower(), "an unusable proxy does not break the channel"
        assert UNUSABLE_PW not in log + p.stdout + p.stderr
    finally:
        graph.stop()
        endpoint.stop()


class Microsocks:
    """Debian's microsocks (SOCKS5, user/password) on 127.0.0.1:<free port>; it logs
    `client[N] 127.0.0.1: connected to HOST:PORT` for every connection it carries."""

    def __init__(self, d: Path, user: str, password: str):
        d.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_file = d / "microsocks.log"
        self._out = open(self.log_file, "wb")
        self.proc = subprocess.Popen(
            [MICROSOCKS, "-i", "127.0.0.1", "-p", str(self.port), "-u", user, "-P", password],
            stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_until(self._listening, what="microsocks listening")

    def _listening(self) -> bool:
        import socket

        if self.proc.poll() is not None:
            pytest.fail(f"microsocks exited with {self.proc.returncode}: {self.log()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def connections_to(self, port: int) -> int:
        return len(re.findall(rf"connected to [^ ]*:{port}\b", self.log()))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        self._out.close()


@pytest.mark.skipif(not Path(MICROSOCKS).exists(), reason="microsocks not installed")
@pytest.mark.parametrize("scheme", ["socks5", "socks5h"])
def test_token_and_graph_requests_go_through_a_socks5_proxy_from_the_environment(
        config, mailgate, upstream_factory, certs, tmp_path, scheme):
    endpoint = TokenEndpoint(tls=certs.server_context())
    graph = GraphApi(endpoint, tls=certs.server_context())
    socks = Microsocks(tmp_path / "microsocks", PROXY_USER, PROXY_PASSWORD)
    try:
        upstream = xoauth_upstream(upstream_factory, certs, endpoint)
        channels(config, endpoint, graph, upstream)
        env = {"SSL_CERT_FILE": str(certs.ca_file),
               "ALL_PROXY": f"{scheme}://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{socks.port}"}
        p = run_cli(["-c", str(config.write()), "check"], env={**config.env, **env})
        assert p.returncode == 0, p.stderr
        assert f"https through {scheme}://***@127.0.0.1:{socks.port}" in p.stdout, p.stdout
        assert "warning" not in p.stderr, p.stderr
        mg = mailgate(config, env=env)
        send_both(mg)
        assert graph.wait_sent(1)[0].mailbox == GRAPH_BOX
        assert len(upstream.wait_messages(1)) == 1
        assert socks.connections_to(endpoint.port) >= 1, socks.log()
        assert socks.connections_to(int(graph.url.rsplit(":", 1)[1])) >= 1, socks.log()
        assert socks.connections_to(upstream.port) == 0, "SMTP connects directly"
        assert PROXY_PASSWORD not in mg.log() + p.stdout + p.stderr
    finally:
        socks.stop()
        graph.stop()
        endpoint.stop()


@pytest.mark.skipif(not Path(MICROSOCKS).exists(), reason="microsocks not installed")
def test_a_socks5_proxy_refusing_the_credentials_defers_and_says_so(
        config, mailgate, upstream_factory, certs, tmp_path):
    endpoint = TokenEndpoint()
    graph = GraphApi(endpoint)
    socks = Microsocks(tmp_path / "microsocks", PROXY_USER, PROXY_PASSWORD)
    try:
        upstream = xoauth_upstream(upstream_factory, certs, endpoint)
        channels(config, endpoint, graph, upstream)
        queue_mode(config)
        wrong = "WRONG-SOCKS-PW-3e8f"
        mg = mailgate(config, env={"all_proxy": f"socks5h://{PROXY_USER}:{wrong}@127.0.0.1:{socks.port}"})
        send_both(mg)
        for channel in ("dave", "alice"):
            mg.wait_log(rf"channel={channel}.*the SOCKS proxy did not accept the credentials.*will retry",
                        timeout=15)
        assert endpoint.grants() == [] and graph.sent == [] and upstream.messages == []
        log = mg.log()
        assert "broken" not in log.lower()
        assert wrong not in log and PROXY_PASSWORD not in log
    finally:
        socks.stop()
        graph.stop()
        endpoint.stop()
