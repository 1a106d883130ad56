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
