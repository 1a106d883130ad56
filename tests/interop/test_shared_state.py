"""Shared state in Redis (SPEC §3 `[state]`, §6): two mailgate processes, each with its own
spool, share one channel's limits, health and OAuth token through a real `redis-server`
that each test starts on a free loopback port and stops by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import MailgateConfig, free_port, message, run_cli, wait_until
from oauth_peers import REFRESH_TOKEN, TokenEndpoint
from test_oauth import MAILBOX, oauth_channel, xoauth_upstream
from test_queue import queue_list, queue_mode, submit

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """`redis-server` on 127.0.0.1:port without persistence; stop() and start() again on
    the same port."""

    def __init__(self, port: int | None = None, tls: tuple[Path, Path] | None = None):
        self.port = port or free_port()
        self.tls = tls
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        ports = ["--port", str(self.port)]
        if self.tls:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls[0]),
                     "--tls-key-file", str(self.tls[1]), "--tls-auth-clients", "no"]
        self.proc = subprocess.Popen(
            [REDIS, *ports, "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        if self.tls:
            wait_until(lambda: port_open(self.port), 10, "redis-server listening")
        else:
            wait_until(self.ping, 10, "redis-server answering PING")

    def ping(self) -> bool:
        try:
            return self.command("PING") == "+PONG"
        except OSError:
            return False

    def command(self, *args: str) -> str:
        """One command, inline protocol; the first line of the answer."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall((" ".join(args) + "\r\n").encode())
            return s.makefile("rb").readline().decode().rstrip("\r\n")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def redis():
    if not Path(REDIS).exists():
        pytest.fail("redis-server is not installed (scripts/test.sh installs it)")
    server = RedisServer()
    yield server
    server.stop()


def host(tmp_path: Path, name: str, redis: RedisServer, upstream, **channel) -> MailgateConfig:
    """One host's config: its own spool, queue mode, channel `shared` on `upstream`."""
    d = tmp_path / name
    d.mkdir()
    cfg = MailgateConfig(d)
    queue_mode(cfg)
    cfg.server["check_header_from"] = False
    cfg.smtp_channel("shared", upstream, senders=["*@example.com"], **channel)
    cfg.state = {"backend": "redis", "url": redis.url, "key_prefix": "t:"}
    return cfg


def queued(cfg: MailgateConfig) -> int:
    listing = queue_list(cfg.tmp / "proxy.toml")
    for line in listing.splitlines():
        if "message(s) queued" in line:
            return int(line.split()[0])
    raise AssertionError(listing)


def submit_all(a, b, n_each: int, rcpts=("x@example.org",)) -> None:
    for i in range(n_each):
        for mg in (a, b):
            code, text = submit(mg.addr, "alice@example.com", list(rcpts), message(subject=f"m{i}"))
            assert code == 250, text


def test_two_hosts_share_one_rate_window(tmp_path, mailgate, upstream, redis):
    a = mailgate(host(tmp_path, "a", redis, upstream, rate="5/min"))
    b = mailgate(host(tmp_path, "b", redis, upstream, rate="5/min"))
    submit_all(a, b, 6)
    upstream.wait_messages(5, timeout=15)
    time.sleep(4)  # each host alone would have sent 5 more by now
    assert len(upstream.messages) == 5
    assert queued(MailgateConfig(tmp_path / "a")) + queued(MailgateConfig(tmp_path / "b")) == 7
    check = run_cli(["-c", str(tmp_path / "a" / "proxy.toml"), "check"])
    assert "(reachable)" in check.stdout, check.stdout
    assert "shared: limited until" in check.stdout, check.stdout


def test_two_hosts_share_one_recipients_per_day_window(tmp_path, mailgate, upstream, redis):
    a = mailgate(host(tmp_path, "a", redis, upstream, recipients_per_day=10, max_recipients=2))
    b = mailgate(host(tmp_path, "b", redis, upstream, recipients_per_day=10, max_recipients=2))
    submit_all(a, b, 3, rcpts=("x@example.org", "y@example.org"))  # 12 recipients
    wait_until(lambda: sum(len(m.rcpt_tos) for m in upstream.messages) >= 10, 15, "10 recipients")
    time.sleep(4)
    assert sum(len(m.rcpt_tos) for m in upstream.messages) == 10
    assert len(upstream.messages) == 5
    # The keys expire by themselves (a day for the recipients window).
    ttl = int(redis.command("PTTL", "t:day:shared").lstrip(":"))
    assert 0 < ttl <= 86_400_000


def test_broken_on_one_host_is_broken_on_the_other_and_retry_resumes_both(
        tmp_path, mailgate, upstream_factory, redis):
    up = upstream_factory()
    up.handler.mail_reply = "535 5.7.3 Authentication unsuccessful"
    a = mailgate(host(tmp_path, "a", redis, up))
    b = mailgate(host(tmp_path, "b", redis, up))
    code, _ = submit(a.addr, "alice@example.com", ["x@example.org"], message())
    assert code == 250
    a.wait_log("CHANNEL BROKEN", timeout=15)
    b.wait_log(r"CHANNEL BROKEN \(seen on another host\)", timeout=5)
    up.handler.mail_reply = None  # the password is fixed upstream
    code, _ = submit(b.addr, "alice@example.com", ["y@example.org"], message())
    assert code == 250
    time.sleep(3)
    assert up.messages == [], "a broken channel sends nothing on any host"
    assert "broken since" in queue_list(tmp_path / "b" / "proxy.toml")
    p = run_cli(["-c", str(tmp_path / "a" / "proxy.toml"), "queue", "retry", "--all"])
    assert p.returncode == 0, p.stderr
    up.wait_messages(2, timeout=15)
    b.wait_log("retry requested on another host", timeout=5)


def test_one_token_refresh_for_both_hosts(tmp_path, mailgate, upstream_factory, certs, redis):
    endpoint = TokenEndpoint()
    try:
        up = xoauth_upstream(upstream_factory, certs, endpoint)
        hosts = []
        for name in ("a", "b"):
            d = tmp_path / name
            d.mkdir()
            cfg = MailgateConfig(d)
            oauth_channel(cfg, "m365", up, endpoint)
            cfg.state = {"backend": "redis", "url": redis.url}
            hosts.append(mailgate(cfg, env=dict(cfg.env)))
        results: list[int] = []

        def send(mg):
            for i in range(3):
                results.append(submit(mg.addr, MAILBOX, ["bob@example.org"], message(sender=MAILBOX))[0])

        threads = [threading.Thread(target=send, args=(mg,)) for mg in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [250] * 6
        assert len(endpoint.grants("refresh_token")) == 1, endpoint.grants("refresh_token")
        for mg in hosts:
            for s in endpoint.secrets():
                assert s not in mg.log()
    finally:
        endpoint.stop()


def test_redis_down_keeps_mail_and_limits_then_resumes(tmp_path, mailgate, upstream, redis):
    cfg = host(tmp_path, "a", redis, upstream, rate="5/min")
    metrics_port = free_port()
    cfg.metrics = {"listen": f"127.0.0.1:{metrics_port}"}
    mg = mailgate(cfg)
    assert healthz(metrics_port) == (200, "ok")
    redis.stop()
    for i in range(3):
        code, _ = submit(mg.addr, "alice@example.com", ["x@example.org"], message(subject=f"m{i}"))
        assert code == 250
    time.sleep(4)
    assert upstream.messages == [], "nothing goes out uncounted"
    assert queued(cfg) == 3
    check = run_cli(["-c", str(cfg.tmp / "proxy.toml"), "check"])
    assert "UNREACHABLE" in check.stdout, check.stdout
    status, text = healthz(metrics_port)
    assert status == 503 and "shared state unavailable" in text, text
    redis.start()
    upstream.wait_messages(3, timeout=15)
    time.sleep(1)
    assert len(upstream.messages) == 3
    log = mg.log()
    assert log.count("Redis is unreachable") == 1, log
    assert log.count("Redis is reachable again") == 1, log
    wait_until(lambda: queued(cfg) == 0, 10, "an empty queue")
    assert healthz(metrics_port) == (200, "ok")


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_relay_mode_answers_451_while_redis_is_down(tmp_path, mailgate, upstream, redis):
    cfg = host(tmp_path, "a", redis, upstream, rate="5/min")
    cfg.server["delivery"] = "relay"
    mg = mailgate(cfg)
    code, _ = submit(mg.addr, "alice@example.com", ["x@example.org"], message())
    assert code == 250
    redis.stop()
    code, text = submit(mg.addr, "alice@example.com", ["x@example.org"], message())
    assert code == 451 and text.startswith("4.7.0"), text
    redis.start()
    code, _ = submit(mg.addr, "alice@example.com", ["x@example.org"], message())
    assert code == 250
    assert len(upstream.messages) == 2


def test_export_import_moves_the_quota_local_to_redis_and_back(tmp_path, mailgate, upstream, redis):
    d = tmp_path / "a"
    d.mkdir()
    cfg = MailgateConfig(d)
    queue_mode(cfg)
    cfg.server["check_header_from"] = False
    cfg.smtp_channel("shared", upstream, senders=["*@example.com"], rate="5/min",
                     recipients_per_day=100)
    mg = mailgate(cfg)
    for i in range(3):
        assert submit(mg.addr, "alice@example.com", ["x@example.org"], message())[0] == 250
    upstream.wait_messages(3)
    wait_until(lambda: queued(cfg) == 0, 10, "an empty queue")
    mg.signal()
    assert mg.wait(20) == 0
    conf = str(d / "proxy.toml")

    exported = d / "local.json"
    p = run_cli(["-c", conf, "state", "export", str(exported)])
    assert p.returncode == 0, p.stderr
    local = json.loads(exported.read_text())
    assert len(local["channels"]["shared"]["events"]) == 3
    assert oct(exported.stat().st_mode & 0o777) == "0o600"

    cfg.state = {"backend": "redis", "url": redis.url}
    cfg.write()
    p = run_cli(["-c", conf, "state", "import", str(exported)])
    assert p.returncode == 0, p.stderr
    p = run_cli(["-c", conf, "state", "export"])
    assert p.returncode == 0, p.stderr
    shared = json.loads(p.stdout)
    assert shared["backend"] == "redis"
    assert shared["channels"]["shared"]["events"] == local["channels"]["shared"]["events"]

    # The quota was not reset: 3 of the 5 per minute are used, 2 go.
    mg = mailgate(cfg)
    for i in range(4):
        assert submit(mg.addr, "alice@example.com", ["x@example.org"], message())[0] == 250
    upstream.wait_messages(5)
    time.sleep(3)
    assert len(upstream.messages) == 5
    mg.signal()
    assert mg.wait(20) == 0

    # And back to a fresh local spool: the 5 sends come along.
    p = run_cli(["-c", conf, "state", "export", str(d / "redis.json")])
    assert p.returncode == 0, p.stderr
    cfg.state = {}
    cfg.server["spool_dir"] = str(d / "spool2")
    cfg.write()
    p = run_cli(["-c", conf, "state", "import", str(d / "redis.json")])
    assert p.returncode == 0, p.stderr
    p = run_cli(["-c", conf, "state", "export"])
    back = json.loads(p.stdout)
    assert back["backend"] == "local"
    assert len(back["channels"]["shared"]["events"]) == 5
    assert back["channels"]["shared"]["events"] == json.loads((d / "redis.json").read_text())["channels"]["shared"]["events"]


def test_rediss_with_a_private_ca_through_ssl_cert_file(tmp_path, mailgate, upstream, certs):
    if not Path(REDIS).exists():
        pytest.fail("redis-server is not installed (scripts/test.sh installs it)")
    server = RedisServer(tls=(certs.cert_file, certs.key_file))
    try:
        cfg = host(tmp_path, "a", server, upstream, rate="1/min")
        cfg.server["delivery"] = "relay"
        cfg.state["url"] = f"rediss://localhost:{server.port}/0"
        mg = mailgate(cfg, env={"SSL_CERT_FILE": str(certs.ca_file)})
        code, _ = submit(mg.addr, "alice@example.com", ["x@example.org"], message())
        assert code == 250
        code, text = submit(mg.addr, "alice@example.com", ["x@example.org"], message())
        assert code == 451 and "rate or quota reached" in text, text
        assert len(upstream.messages) == 1
        # Without the CA the certificate is refused: the limits cannot be checked.
        mg.signal()
        mg.wait(20)
        other = mailgate(cfg)
        code, text = submit(other.addr, "alice@example.com", ["x@example.org"], message())
        assert code == 451 and "cannot be checked" in text, text
        other.wait_log("Redis is unreachable")
    finally:
        server.stop()


def test_a_refresh_token_rotated_on_one_host_is_used_by_the_other(
        tmp_path, mailgate, upstream_factory, certs, redis):
    endpoint = TokenEndpoint(rotate=True)  # each refresh token works once
    try:
        up = xoauth_upstream(upstream_factory, certs, endpoint)
        hosts = []
        for name in ("a", "b"):
            d = tmp_path / name
            d.mkdir()
            cfg = MailgateConfig(d)
            oauth_channel(cfg, "m365", up, endpoint)  # each host's own refresh_token_file
            cfg.state = {"backend": "redis", "url": redis.url}
            hosts.append((cfg, mailgate(cfg, env=dict(cfg.env))))
        (cfg_a, a), (cfg_b, b) = hosts
        assert submit(a.addr, MAILBOX, ["bob@example.org"], message(sender=MAILBOX))[0] == 250
        # The access token dies; B must refresh with the token A's refresh rotated to,
        # not with the one in its own file (already spent).
        time.sleep(0.3)
        endpoint.revoke_all()
        assert submit(b.addr, MAILBOX, ["bob@example.org"], message(sender=MAILBOX))[0] == 250
        grants = [g["refresh_token"] for g in endpoint.grants("refresh_token")]
        assert len(grants) == 2 and grants[0] == REFRESH_TOKEN and grants[1] != REFRESH_TOKEN, grants
        assert redis.command("GET", "mailgate:refresh:m365") != "$-1"
        for _, mg in hosts:
            for s in endpoint.secrets():
                assert s not in mg.log()
    finally:
        endpoint.stop()
