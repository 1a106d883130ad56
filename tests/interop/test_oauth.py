"""OAuth 2.0 black box (SPEC §3 `oauth = {…}`, §7): the mailgate binary against a local
token endpoint and an aiosmtpd upstream that takes AUTH XOAUTH2 only and checks every
token with the endpoint. Nothing contacts a real provider.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
import trustme

from conftest import BIN, message, run_cli, smtp_client, wait_until
from oauth_peers import CLIENT_ID, CLIENT_SECRET, REFRESH_TOKEN, TokenEndpoint, XOAuth2Handler
from test_queue import queue_list, queue_mode, submit

MAILBOX = "alice@example.com"


@pytest.fixture
def endpoint():
    ep = TokenEndpoint()
    yield ep
    ep.stop()


def xoauth_upstream(upstream_factory, certs, endpoint, *, style="microsoft", implicit=False):
    handler = XOAuth2Handler(endpoint, MAILBOX, style=style)
    return upstream_factory(
        certs=certs,
        starttls=not implicit,
        implicit_tls=implicit,
        handler=handler,
        # aiosmtpd counts only STARTTLS as TLS; on implicit TLS the whole session is.
        smtp_kwargs={"auth_require_tls": not implicit, "auth_exclude_mechanism": ["LOGIN", "PLAIN"]},
    )


def oauth_channel(config, name, upstream, endpoint, *, provider="microsoft", grant=None,
                  token_file=None, **oauth_extra):
    """An XOAUTH2 channel for MAILBOX; the refresh token sits in a 0600 file by default."""
    oauth = {"provider": provider, "client_id": CLIENT_ID, "token_url": endpoint.url + "/token"}
    if provider == "microsoft":
        oauth["tenant"] = "example.com"
        oauth["device_url"] = endpoint.url + "/devicecode"
    else:
        oauth["auth_url"] = endpoint.url + "/authorize"
    if grant == "client_credentials":
        oauth["grant"] = grant
        oauth["client_secret_env"] = "MG_TEST_CLIENT_SECRET"
        config.env["MG_TEST_CLIENT_SECRET"] = CLIENT_SECRET
    else:
        if provider == "google":
            oauth["client_secret_env"] = "MG_TEST_CLIENT_SECRET"
            config.env["MG_TEST_CLIENT_SECRET"] = CLIENT_SECRET
        if token_file is None:
            token_file = config.tmp / f"{name}.token"
            token_file.write_text(REFRESH_TOKEN + "\n")
            token_file.chmod(0o600)
        oauth["refresh_token_file"] = str(token_file)
    oauth.update(oauth_extra)
    config.smtp_channel(name, upstream, senders=[MAILBOX], username=MAILBOX, auth="xoauth2",
                        oauth=oauth)
    return token_file


def start(mailgate, config):
    return mailgate(config, env=dict(config.env))


def assert_no_secrets(text: str, endpoint: TokenEndpoint) -> None:
    for s in endpoint.secrets():
        assert s not in text, f"secret {s[:12]}… leaked"


def test_delegated_refresh_grant_relay_mode_one_token_for_ten_messages(
        config, mailgate, upstream_factory, certs, endpoint):
    up = xoauth_upstream(upstream_factory, certs, endpoint)
    oauth_channel(config, "m365", up, endpoint)
    mg = start(mailgate, config)
    for i in range(10):
        code, text = submit(mg.addr, MAILBOX, ["bob@example.org"], message(subject=f"m{i}"))
        assert code == 250, text
    assert len(up.messages) == 10
    assert all(x.ok and x.user == MAILBOX for x in up.handler.xoauth)
    reqs = endpoint.grants("refresh_token")
    assert len(reqs) == 1, reqs
    assert reqs[0]["scope"] == "https://outlook.office.com/SMTP.Send offline_access"
    assert reqs[0]["refresh_token"] == REFRESH_TOKEN
    assert_no_secrets(mg.log(), endpoint)


@pytest.mark.parametrize("mode", ["queue", "relay"])
def test_client_credentials_grant_in_both_modes(config, mailgate, upstream_factory, certs, endpoint, mode):
    if mode == "queue":
        queue_mode(config)
    up = xoauth_upstream(upstream_factory, certs, endpoint)
    oauth_channel(config, "app", up, endpoint, grant="client_credentials")
    mg = start(mailgate, config)
    for i in range(3):
        code, text = submit(mg.addr, MAILBOX, ["bob@example.org"], message(subject=f"q{i}"))
        assert code == 250 and (mode == "relay" or "queued as" in text), text
    up.wait_messages(3, timeout=20)
    reqs = endpoint.grants()
    assert [r["grant_type"] for r in reqs] == ["client_credentials"], reqs
    assert reqs[0]["scope"] == "https://outlook.office365.com/.default"
    assert reqs[0]["client_secret"] == CLIENT_SECRET
    assert all(x.ok and x.user == MAILBOX for x in up.handler.xoauth)
    assert_no_secrets(mg.log(), endpoint)


def test_google_refresh_grant_over_implicit_tls(config, mailgate, upstream_factory, certs, endpoint):
    up = xoauth_upstream(upstream_factory, certs, endpoint, style="google", implicit=True)
    oauth_channel(config, "gmail", up, endpoint, provider="google")
    mg = start(mailgate, config)
    code, text = submit(mg.addr, MAILBOX, ["bob@example.org"], message())
    assert code == 250, text
    (req,) = endpoint.grants("refresh_token")
    # Google's refresh grant may name the scope; it cannot widen what was granted.
    assert req.get("scope") in (None, "https://mail.google.com/")
    assert req["client_secret"] == CLIENT_SECRET
    assert_no_secrets(mg.log(), endpoint)


def test_rotated_refresh_token_is_stored_back_with_mode_0600(
        config, mailgate, upstream_factory, certs, endpoint):
    endpoint.rotate = True
    up = xoauth_upstream(upstream_factory, certs, endpoint)
    token_file = oauth_channel(config, "m365", up, endpoint)
    token_file.chmod(0o644)  # the write-back makes it private whatever it was
    up.handler.close_after_data = True
    mg = start(mailgate, config)
    code, _ = submit(mg.addr, MAILBOX, ["bob@example.org"], message())
    assert code == 250
    stored = token_file.read_text().strip()
    assert stored != REFRESH_TOKEN and stored in endpoint.refresh_tokens
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    # The rotated token works: force a refresh by revoking the access token.
    time.sleep(0.3)  # the upstream has closed that connection: the next one logs in
    endpoint.revoke_all()
    code, _ = submit(mg.addr, MAILBOX, ["bob@example.org"], message())
    assert code == 250
    assert [r["refresh_token"] for r in endpoint.grants("refresh_token")] == [REFRESH_TOKEN, stored]
    assert_no_secrets(mg.log(), endpoint)


def test_rotated_refresh_token_in_a_bare_file_name_is_stored_without_error(
        config, mailgate, upstream_factory, certs, endpoint):
    # Issue 16 item 8: `-c proxy.toml` and `refresh_token_file = "m365.token"` make the
    # token file a bare name; the write-back succeeded, then failed syncing the folder "".
    endpoint.rotate = True
    up = xoauth_upstream(upstream_factory, certs, endpoint)
    token_file = config.tmp / "m365.token"
    token_file.write_text(REFRESH_TOKEN + "\n")
    token_file.chmod(0o600)
    oauth_channel(config, "m365", up, endpoint, token_file="m365.token")
    config.write()
    up.handler.close_after_data = True
    mg = mailgate(config, env=dict(config.env), args=["-c", "proxy.toml", "run"], cwd=config.tmp)
    code, _ = submit(mg.addr, MAILBOX, ["bob@example.org"], message())
    assert code == 250
    stored = token_file.read_text().strip()
    assert stored != REFRESH_TOKEN and stored in endpoint.refresh_tokens
    assert "cannot" not in mg.log() and "No such file" not in mg.log(), mg.log()
    assert_no_secrets(mg.log(), endpoint)


@pytest.mark.parametrize("style", ["microsoft", "google"])
def test_revoked_access_token_gets_one_refresh_and_one_retry(
        config, mailgate, upstream_factory, certs, endpoint, style):
    up = xoauth_upstream(upstream_factory, certs, endpoint, style=style)
    oauth_channel(config, "m365", up, endpoint)
    up.handler.close_after_data = True
    mg = start(mailgate, config)
    assert submit(mg.addr, MAILBOX, ["bob@example.org"], message())[0] == 250
    time.sleep(0.3)  # the upstream has closed that connection: the next one logs in
    endpoint.revoke_all()  # the cached token is refused from now on
    assert submit(mg.addr, MAILBOX, ["bob@example.org"], message())[0] == 250
    time.sleep(0.3)
    assert [x.ok for x in up.handler.xoauth] == [True, False, True]
    assert len(endpoint.grants("refresh_token")) == 2
    # A refresh that yields another refused token: one retry only, then a temporary failure.
    endpoint.revoke_all()
    real_valid = endpoint.valid
    endpoint.valid = lambda token: False
    try:
        code, text = submit(mg.addr, MAILBOX, ["bob@example.org"], message())
    finally:
        endpoint.valid = real_valid
    assert code == 454 and text.startswith("4.7.0"), (code, text)
    assert [x.ok for x in up.handler.xoauth][3:] == [False, False], "exactly one retry"
    assert len(endpoint.grants("refresh_token")) == 3
    assert_no_secrets(mg.log(), endpoint)


@pytest.mark.parametrize("refusal", ["invalid_grant", "invalid_client", "unauthorized_client"])
def test_a_refused_grant_breaks_the_channel_and_keeps_the_mail(
        config, mailgate, upstream_factory, certs, endpoint, refusal):
    queue_mode(config)
    up = xoauth_upstream(upstream_factory, certs, endpoint)
    oauth_channel(config, "m365", up, endpoint)
    endpoint.mode = refusal
    mg = start(mailgate, config)
    path = config.tmp / "proxy.toml"
    code, text = submit(mg.addr, MAILBOX, ["bob@example.org"], message())
    assert code == 250, text
    line = mg.wait_log("CHANNEL BROKEN", timeout=15)
    assert "mailgate oauth authorize m365" in mg.log(), line
    calls = len(endpoint.grants())
    time.sleep(2.5)  # longer than retry_first: a broken channel does not retry by itself
    assert len(endpoint.grants()) == calls
    listing = queue_list(path)
    assert "1 message(s) queued" in listing and "broken" in listing and refusal in listing, listing
    check = run_cli(["-c", str(path), "check"], env=config.env)
    assert "m365: broken" in check.stdout, check.stdout
    assert up.messages == []
    # The operator re-authorizes (here: the endpoint accepts again) and asks for a retry.
    endpoint.mode = "ok"
    p = run_cli(["-c", str(path), "queue", "retry", "--all"])
    assert p.returncode == 0, p.stderr
    up.wait_messages(1, timeout=15)
    assert_no_secrets(mg.log() + listing + check.stdout + check.stderr, endpoint)


def test_token_endpoint_down_defers_in_queue_mode(config, mailgate, upstream_factory, certs, endpoint):
    queue_mode(config)
    up = xoauth_upstream(upstream_factory, certs, endpoint)
    oauth_channel(config, "m365", up, endpoint)
    endpoint.mode = "503"
    mg = start(mailgate, config)
    assert submit(mg.addr, MAILBOX, ["bob@example.org"], message())[0] == 250
    wait_until(lambda: len(endpoint.grants()) >= 2, 15, "a retry of the token request")
    assert "broken" not in queue_list(config.tmp / "proxy.toml")
    endpoint.mode = "ok"
    up.wait_messages(1, timeout=20)


def test_token_endpoint_unreachable_in_relay_mode_is_454(config, mailgate, upstream_factory, certs, endpoint):
    up = xoauth_upstream(upstream_factory, certs, endpoint)
    oauth_channel(config, "m365", up, endpoint, token_url="http://127.0.0.1:9/token")
    mg = start(mailgate, config)
    code, text = submit(mg.addr, MAILBOX, ["bob@example.org"], message())
    assert code == 454 and text.startswith("4.7.0"), (code, text)
    endpoint.mode = "503"
    config.channels["m365"]["oauth"]["token_url"] = endpoint.url + "/token"
    mg.signal()
    mg.wait(20)
    mg = start(mailgate, config)
    code, text = submit(mg.addr, MAILBOX, ["bob@example.org"], message())
    assert code == 454 and text.startswith("4.7.0"), (code, text)
    assert up.messages == []


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_an_oversized_token_answer_is_a_temporary_error_and_memory_stays_bounded(
        config, mailgate, upstream_factory, certs, endpoint):
    """Issue 16: a 300 MiB token answer took mailgate from 9.8 MB to 606 MB. 100 MiB of
    valid JSON, streamed without a length: read up to 64 KiB, the message stays queued
    (not broken), peak RSS stays under 64 MiB; fixed endpoint, the message goes."""
    queue_mode(config)
    up = xoauth_upstream(upstream_factory, certs, endpoint)
    oauth_channel(config, "m365", up, endpoint)
    endpoint.mode = "huge"
    mg = start(mailgate, config)
    assert submit(mg.addr, MAILBOX, ["bob@example.org"], message())[0] == 250
    wait_until(lambda: len(endpoint.huge_sent) >= 2, 20, "two token requests answered hugely")
    # What the kernel buffered before mailgate hung up, never the whole 100 MiB.
    assert all(n < 16 << 20 for n in endpoint.huge_sent), endpoint.huge_sent
    peak = _peak_rss_kib(mg.proc.pid)
    assert peak < 64 * 1024, f"peak RSS {peak} KiB"
    listing = queue_list(config.tmp / "proxy.toml")
    assert "broken" not in listing, listing
    assert "more than 64 KiB" in mg.log(), mg.log()
    assert up.messages == []
    endpoint.mode = "ok"
    up.wait_messages(1, timeout=20)


@pytest.mark.parametrize("mode", ["queue", "relay"])
def test_a_huge_expires_in_neither_panics_nor_wedges_the_channel(
        config, mailgate, upstream_factory, certs, endpoint, mode):
    """Issue 16: `expires_in: 18446744073709551615` overflowed the expiry; the panicked
    delivery held the channel's connection slot until a restart."""
    if mode == "queue":
        queue_mode(config)
    up = xoauth_upstream(upstream_factory, certs, endpoint)
    oauth_channel(config, "m365", up, endpoint)
    endpoint.lifetime = 18446744073709551615
    mg = start(mailgate, config)
    for i in range(3):
        code, text = submit(mg.addr, MAILBOX, ["bob@example.org"], message(subject=f"m{i}"))
        assert code == 250, text
    up.wait_messages(3, timeout=20)
    assert len(endpoint.grants("refresh_token")) == 1, "the token is cached (a day at most)"
    assert "panicked" not in mg.log(), mg.log()


def test_xoauth2_without_tls_is_a_config_error(config, upstream_factory, endpoint):
    up = upstream_factory()
    oauth_channel(config, "m365", up, endpoint)
    p = run_cli(["-c", str(config.write()), "check"])
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert re.search(r"proxy\.toml:\d+: .*tls", out), out


def test_check_shows_grant_and_token_source_never_a_secret(config, upstream_factory, certs, endpoint):
    up = xoauth_upstream(upstream_factory, certs, endpoint)
    oauth_channel(config, "m365", up, endpoint)
    config.smtp_channel("app", up, senders=["carol@example.com"], username="carol@example.com",
                        oauth={"provider": "microsoft", "grant": "client_credentials", "tenant": "example.com",
                               "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                               "token_url": endpoint.url + "/token"})
    p = run_cli(["-c", str(config.write()), "check"], env=config.env)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "client_credentials" in out and "refresh_token" in out, out
    assert "m365.token" in out, out
    assert_no_secrets(out + p.stderr, endpoint)


def test_device_code_flow_end_to_end(config, upstream_factory, certs, endpoint):
    up = xoauth_upstream(upstream_factory, certs, endpoint)
    token_file = config.tmp / "new.token"
    oauth_channel(config, "m365", up, endpoint, token_file=token_file)
    t0 = time.monotonic()
    p = run_cli(["-c", str(config.write()), "oauth", "authorize", "m365"], env=config.env, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout + p.stderr
    (device,) = endpoint.devices.values()
    assert device.user_code in out and endpoint.url + "/devicelogin" in out, out
    polls = endpoint.device_polls
    assert len(polls) == 4, polls  # pending, pending, slow_down, token
    assert polls[1] - polls[0] >= 0.9 and polls[2] - polls[1] >= 0.9
    assert polls[3] - polls[2] >= 5.5, "slow_down adds 5 s to the interval"
    stored = token_file.read_text().strip()
    assert stored in endpoint.refresh_tokens and stored != REFRESH_TOKEN
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert stored not in out
    assert time.monotonic() - t0 < 30


def _google_authorize(config, endpoint, answer):
    """Runs `oauth authorize` for a google channel; `answer(redirect_url, proc)` plays the
    user. Returns (exit code, output)."""
    path = config.write()
    env = dict(os.environ, NO_COLOR="1", **config.env)
    proc = subprocess.Popen([str(BIN), "-c", str(path), "oauth", "authorize", "gmail"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env)
    out: list[str] = []
    url_seen = threading.Event()
    auth_url: list[str] = []

    def read():
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace")
            out.append(line)
            m = re.search(re.escape(endpoint.url + "/authorize") + r"\?\S+", line)
            if m and not auth_url:
                auth_url.append(m.group(0))
                url_seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert url_seen.wait(20), "".join(out)
    _, redirect = endpoint.approve_code(auth_url[0])
    answer(redirect, proc)
    try:
        rc = proc.wait(30)
    finally:
        proc.kill()
    reader.join(5)
    return rc, "".join(out)


def test_google_loopback_flow_end_to_end(config, upstream_factory, certs, endpoint):
    up = xoauth_upstream(upstream_factory, certs, endpoint, style="google", implicit=True)
    token_file = config.tmp / "gmail.token"
    oauth_channel(config, "gmail", up, endpoint, provider="google", token_file=token_file)

    def browser(redirect, proc):
        with urllib.request.urlopen(redirect, timeout=10) as r:
            assert r.status == 200

    rc, out = _google_authorize(config, endpoint, browser)
    assert rc == 0, out
    stored = token_file.read_text().strip()
    assert stored in endpoint.refresh_tokens
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert stored not in out and CLIENT_SECRET not in out


def test_google_flow_accepts_the_pasted_redirect_url(config, upstream_factory, certs, endpoint):
    up = xoauth_upstream(upstream_factory, certs, endpoint, style="google", implicit=True)
    token_file = config.tmp / "gmail.token"
    oauth_channel(config, "gmail", up, endpoint, provider="google", token_file=token_file)

    def paste(redirect, proc):
        proc.stdin.write(redirect.encode() + b"\n")
        proc.stdin.flush()

    rc, out = _google_authorize(config, endpoint, paste)
    assert rc == 0, out
    assert token_file.read_text().strip() in endpoint.refresh_tokens


def test_google_flow_refuses_a_wrong_state(config, upstream_factory, certs, endpoint):
    up = xoauth_upstream(upstream_factory, certs, endpoint, style="google", implicit=True)
    token_file = config.tmp / "gmail.token"
    oauth_channel(config, "gmail", up, endpoint, provider="google", token_file=token_file)

    def forged(redirect, proc):
        bad = re.sub(r"state=[^&]+", "state=forged", redirect)
        proc.stdin.write(bad.encode() + b"\n")
        proc.stdin.flush()
        proc.stdin.close()

    rc, out = _google_authorize(config, endpoint, forged)
    assert rc != 0, out
    assert "state" in out.lower(), out
    assert not token_file.exists() or token_file.read_text().strip() == ""


def test_google_listener_ignores_a_request_with_a_wrong_state_and_keeps_waiting(
        config, upstream_factory, certs, endpoint):
    """Anything on the machine can reach the loopback listener: a forged redirect is
    answered 400 and the flow waits on; the real one then completes it."""
    up = xoauth_upstream(upstream_factory, certs, endpoint, style="google", implicit=True)
    token_file = config.tmp / "gmail.token"
    oauth_channel(config, "gmail", up, endpoint, provider="google", token_file=token_file)

    def forged_then_real(redirect, proc):
        bad = re.sub(r"state=[^&]+", "state=forged", redirect)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=10)
        assert refused.value.code == 400
        assert proc.poll() is None, "the flow still waits"
        with urllib.request.urlopen(redirect, timeout=10) as r:
            assert r.status == 200

    rc, out = _google_authorize(config, endpoint, forged_then_real)
    assert rc == 0, out
    assert token_file.read_text().strip() in endpoint.refresh_tokens


def test_test_channel_reports_each_oauth_step_without_the_token(config, upstream_factory, certs, endpoint):
    up = xoauth_upstream(upstream_factory, certs, endpoint)
    oauth_channel(config, "m365", up, endpoint)
    p = run_cli(["-c", str(config.write()), "test-channel", "m365"], env=config.env)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert re.search(r"OAuth access token obtained \(refresh_token grant; expires in 5\d min\)", out), out
    assert "TLS established (STARTTLS, TLSv1_" in out and "AUTH XOAUTH2 ok as alice@example.com" in out, out
    assert up.messages == [] and [x.ok for x in up.handler.xoauth] == [True]
    assert_no_secrets(out, endpoint)
    endpoint.mode = "invalid_grant"
    p = run_cli(["-c", str(config.write()), "test-channel", "m365"], env=config.env)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "invalid_grant" in out and "mailgate oauth authorize m365" in out, out
    assert_no_secrets(out, endpoint)


def test_every_commented_channel_example_in_the_shipped_config_is_valid(tmp_path):
    """Uncommented, each `# [channels.X]` block of proxy.toml passes `mailgate check` (with
    its secrets present), so the OAuth forms shown there are real."""
    from conftest import REPO

    text = (REPO / "proxy.toml").read_text()
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith("# [channels."):
            current = [line[2:]]
            blocks.append(current)
        elif current is not None and re.match(r"# \w+ = ", line):
            current.append(line[2:])
        else:
            current = None
    names = [b[0] for b in blocks]
    assert any("alice" in n for n in names) and any("noreply" in n for n in names), names
    env = {}
    for block in blocks:
        for line in block:
            for m in re.finditer(r'(\w+_env) = "(\w+)"', line):
                env[m.group(2)] = "secret-value"
            for m in re.finditer(r'(\w+)_file = "([^"]+)"', line):
                f = tmp_path / m.group(2)
                f.parent.mkdir(parents=True, exist_ok=True)
                if m.group(1) == "ca":
                    trustme.CA().cert_pem.write_to_path(str(f))
                else:
                    f.write_text("secret-value\n")
                    f.chmod(0o600)
    body = text + "\n" + "\n\n".join("\n".join(b) for b in blocks) + "\n"
    (tmp_path / "outbox").mkdir()
    path = tmp_path / "proxy.toml"
    path.write_text(body)
    p = run_cli(["-c", str(path), "check"], env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    for block in blocks:
        name = block[0].split(".")[1].rstrip("]")
        assert name in p.stdout, name
