"""Command line (SPEC §2, §3 validation, §8 logs, §9 checks) driven as a user would."""

import re
import signal
import socket
import subprocess
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import (
    BIN,
    MailgateConfig,
    Raw,
    assert_reply,
    free_port,
    message,
    run_cli,
    transact,
)

SUBCOMMANDS = [
    [],
    ["run"],
    ["check"],
    ["route"],
    ["test-channel"],
    ["cert"],
    ["cert", "generate"],
    ["hash-password"],
]


@pytest.fixture(autouse=True)
def _binary():
    if not BIN.exists():
        pytest.fail(f"mailgate binary not found at {BIN}")


@pytest.mark.parametrize("sub", SUBCOMMANDS, ids=lambda s: " ".join(s) or "top")
def test_help_works_everywhere(sub, tmp_path):
    p = run_cli([*sub, "--help"], cwd=tmp_path, timeout=20)
    assert p.returncode == 0, p.stderr
    assert "usage" in p.stdout.lower(), p.stdout


def test_unknown_subcommand_fails(tmp_path):
    p = run_cli(["frobnicate"], cwd=tmp_path)
    assert p.returncode != 0
    assert p.stderr.strip()


def test_missing_config_is_one_clear_line(tmp_path):
    missing = tmp_path / "nope.toml"
    p = run_cli(["-c", str(missing), "check"], cwd=tmp_path)
    assert p.returncode != 0
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    # one line says what is wrong; a "N problems found" summary may follow, nothing more
    assert 1 <= len(lines) <= 2, p.stderr
    assert "nope.toml" in lines[0] and re.search(r"no such file|not found|cannot read", lines[0], re.I), p.stderr


def good_config(tmp_path) -> MailgateConfig:
    cfg = MailgateConfig(tmp_path)
    cfg.file_channel("alice", senders=["alice@example.com"])
    cfg.file_channel("team", senders=None, domains=["example.net"])
    cfg.file_channel("pool", senders=["*"])
    return cfg


def test_check_valid_config_prints_channels_and_scopes(tmp_path):
    path = good_config(tmp_path).write()
    p = run_cli(["-c", str(path), "check"])
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout + p.stderr
    for word in ["alice", "team", "pool", "alice@example.com", "example.net"]:
        assert word in out, f"{word} missing from check output:\n{out}"


def test_config_from_env_and_from_cwd(tmp_path):
    path = good_config(tmp_path).write("elsewhere.toml")
    p = run_cli(["check"], env={"MAILGATE_CONFIG": str(path)}, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    (tmp_path / "proxy.toml").write_text(path.read_text())
    path.unlink()
    p = run_cli(["check"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr


BAD = """\
[server]
listen = ["127.0.0.1:0"]
delivery = "relay"
bogus_key = 1
retry_first = "soon"

[channels.alice]
preset = "office365"
username = "alice@example.com"
auth = "password"
password_env = "ALICE_PW"
senders = ["*"]
colour = "blue"

[channels.outbox]
kind = "file"
dir = "outbox"
senders = ["*"]
"""


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_check_lists_every_problem_with_its_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    p = run_cli(["-c", str(path), "check"], env={"ALICE_PW": "x"})
    assert p.returncode != 0
    out = p.stdout + p.stderr
    for key in ["bogus_key", "colour"]:
        line = line_of(BAD, key)
        hits = [x for x in out.splitlines() if key in x]
        assert hits, f"unknown key {key} not reported:\n{out}"
        assert any(re.search(rf"\b{line}\b", x) for x in hits), f"line {line} of {key} not named:\n{out}"
    assert "soon" in out or "retry_first" in out, f"bad duration not reported:\n{out}"
    scope_lines = [x for x in out.splitlines() if "alice" in x and re.search(r"\*|scope|address|mailbox", x, re.I)]
    assert scope_lines, f"mailbox channel with '*' not reported:\n{out}"


def test_check_two_unknown_keys_on_two_lines(tmp_path):
    text = '[server]\nlisten = ["127.0.0.1:0"]\nfirst_unknown = 1\ndelivery = "relay"\nsecond_unknown = 2\n' \
           '\n[channels.outbox]\nkind = "file"\ndir = "outbox"\nsenders = ["*"]\n'
    path = tmp_path / "two.toml"
    path.write_text(text)
    p = run_cli(["-c", str(path), "check"])
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert re.search(r"\b3\b.*first_unknown|first_unknown.*\b3\b", out), out
    assert re.search(r"\b5\b.*second_unknown|second_unknown.*\b5\b", out), out


@pytest.mark.parametrize(
    "channels,needle",
    [
        ('[channels.a]\nkind = "file"\ndir = "a"\nsenders = ["*"]\n'
         '[channels.b]\nkind = "file"\ndir = "b"\nsenders = ["*"]\n', "a"),
        ('[channels.a]\nkind = "file"\ndir = "a"\nsenders = ["x@example.com"]\n'
         '[channels.b]\nkind = "file"\ndir = "b"\nsenders = ["X@Example.com"]\n', "b"),
        ('[channels.up]\nhost = "smtp.example.net"\nport = 25\ntls = "none"\nsenders = ["*"]\n', "up"),
        ('[channels.gm]\npreset = "gmail"\nusername = "me@example.com"\npassword_env = "P"\n'
         'domains = ["example.com"]\n', "gm"),
        ('[channels.r]\nkind = "file"\ndir = "r"\nsenders = ["*"]\nrate = "lots"\n', "rate"),
    ],
    ids=["same-specificity-star", "same-address", "tls-none-remote", "mailbox-with-domain", "bad-rate"],
)
def test_check_refuses_invalid_config(tmp_path, channels, needle):
    path = tmp_path / "c.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:0"]\ndelivery = "relay"\n\n' + channels)
    p = run_cli(["-c", str(path), "check"], env={"P": "x"})
    assert p.returncode != 0, p.stdout
    assert needle in p.stdout + p.stderr


def test_non_loopback_listener_without_auth_is_an_error(tmp_path):
    path = tmp_path / "open.toml"
    path.write_text('[server]\nlisten = ["0.0.0.0:0"]\ndelivery = "relay"\n\n'
                    '[channels.o]\nkind = "file"\ndir = "o"\nsenders = ["*"]\n')
    p = run_cli(["-c", str(path), "check"])
    assert p.returncode != 0
    path.write_text('[server]\nlisten = ["0.0.0.0:0"]\ndelivery = "relay"\nallow_networks = ["127.0.0.0/8"]\n\n'
                    '[channels.o]\nkind = "file"\ndir = "o"\nsenders = ["*"]\n')
    p = run_cli(["-c", str(path), "check"])
    assert p.returncode == 0, p.stdout + p.stderr


def test_run_refuses_invalid_config(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD)
    p = run_cli(["-c", str(path), "run"], env={"ALICE_PW": "x"}, timeout=20)
    assert p.returncode != 0
    assert "bogus_key" in p.stderr


def route_config(tmp_path) -> MailgateConfig:
    cfg = MailgateConfig(tmp_path)
    cfg.file_channel("alice", senders=["alice@example.com"])
    cfg.file_channel("team", senders=None, domains=["example.com"])
    cfg.routing = {"bulk_channel": "team", "bulk_recipients": 50}
    return cfg


def test_route_explains_the_choice(tmp_path):
    path = route_config(tmp_path).write()
    p = run_cli(["-c", str(path), "route", "alice@example.com"])
    assert p.returncode == 0, p.stderr
    assert "alice" in p.stdout
    p = run_cli(["-c", str(path), "route", "bob@Example.COM"])
    assert p.returncode == 0, p.stderr
    assert "team" in p.stdout


def test_route_bulk_goes_to_bulk_channel(tmp_path):
    path = route_config(tmp_path).write()
    p = run_cli(["-c", str(path), "route", "alice@example.com", "--rcpts", "100"])
    assert p.returncode == 0, p.stderr
    assert "team" in p.stdout and "bulk" in p.stdout.lower(), p.stdout


def test_route_explains_refusals(tmp_path):
    path = route_config(tmp_path).write()
    p = run_cli(["-c", str(path), "route", "mallory@example.net"])
    out = (p.stdout + p.stderr).lower()
    assert "550" in out or "refus" in out or "no channel" in out, out
    p = run_cli(["-c", str(path), "route", "alice@example.com", "--from", "ceo@example.org"])
    out = (p.stdout + p.stderr).lower()
    assert "550" in out or "refus" in out or "not allowed" in out, out


def test_cert_generate(tmp_path):
    d = tmp_path / "out"
    p = run_cli(["cert", "generate", "--dir", str(d)])
    assert p.returncode == 0, p.stderr
    cert = x509.load_pem_x509_certificate((d / "localhost.pem").read_bytes())
    key = serialization.load_pem_private_key((d / "localhost-key.pem").read_bytes(), None)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()


def test_cert_generate_default_dir(tmp_path):
    p = run_cli(["cert", "generate"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "certs" / "localhost.pem").exists()
    assert (tmp_path / "certs" / "localhost-key.pem").exists()


def test_hash_password():
    a = run_cli(["hash-password"], input=b"correct horse\n")
    b = run_cli(["hash-password"], input=b"correct horse\n")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ha, hb = a.stdout.strip(), b.stdout.strip()
    assert ha.startswith("$argon2id$"), ha
    assert len(a.stdout.strip().splitlines()) == 1
    assert ha != hb, "same salt twice"
    assert "correct horse" not in a.stdout + a.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_zero(config, mailgate, sig):
    config.file_channel()
    mg = mailgate(config)
    # A signal within milliseconds of the "listening on" line can beat the handler
    # installation (seen once with SIGINT); this test is about the steady state.
    time.sleep(0.3)
    mg.signal(sig)
    assert mg.wait(15) == 0, mg.log()


def test_sigterm_lets_the_session_in_flight_finish(config, mailgate):
    outbox = config.file_channel()
    mg = mailgate(config)
    c = Raw(mg.addr)
    try:
        c.greet()
        c.expect("MAIL FROM:<alice@example.com>", 250)
        c.expect("RCPT TO:<bob@example.org>", 250)
        c.expect("DATA", 354)
        msg = message()
        c.send(msg[:20])
        mg.signal(signal.SIGTERM)
        time.sleep(0.5)
        assert mg.proc.poll() is None, "exited with a session in flight"
        # no longer accepting
        try:
            with socket.create_connection(("127.0.0.1", int(mg.addr.rsplit(":", 1)[1])), 2) as s2:
                s2.settimeout(2)
                data = s2.recv(100)
                assert data == b"" or data.startswith(b"421"), data
        except OSError:
            pass
        c.send(msg[20:] + b".\r\n")
        assert_reply(c.reply(), 250)
        r = c.cmd("QUIT")
        assert r is None or r.code in (221, 421)
    finally:
        c.close()
    assert mg.wait(15) == 0, mg.log()
    assert len(list(outbox.glob("*.eml"))) == 1


def test_log_line_per_message_without_secrets(config, mailgate, upstream_factory, certs):
    up = upstream_factory(certs=certs, starttls=True, users={"u": "hunter2-secret"}, auth_required=True)
    config.env["UP_PW"] = "hunter2-secret"
    config.smtp_channel("logchan", up, username="u", password_env="UP_PW")
    mg = mailgate(config)
    c = Raw(mg.addr)
    try:
        c.greet()
        assert_reply(transact(c, "logsender@example.com", ["r1@example.org", "r2@example.org"], message()), 250)
        c.cmd("QUIT")
    finally:
        c.close()
    line = mg.wait_log(r"logsender@example\.com.*logchan|logchan.*logsender@example\.com")
    assert line
    import base64

    assert "hunter2-secret" not in mg.log()
    assert base64.b64encode(b"\0u\0hunter2-secret").decode() not in mg.log()


def test_check_does_not_print_secrets(tmp_path):
    cfg = MailgateConfig(tmp_path)
    cfg.channels["up"] = {"host": "127.0.0.1", "port": 2500, "tls": "none", "username": "u",
                          "password": "literal-secret-value", "senders": ["*"]}
    path = cfg.write()
    p = run_cli(["-c", str(path), "check"])
    assert "literal-secret-value" not in p.stdout + p.stderr


def test_test_channel_reports_steps_and_sends_nothing(tmp_path, upstream_factory, certs):
    up = upstream_factory(certs=certs, starttls=True, users={"u": "tc-secret-pw"}, auth_required=True)
    cfg = MailgateConfig(tmp_path)
    cfg.smtp_channel("up", up, username="u", password_env="UP_PW")
    path = cfg.write()
    p = run_cli(["-c", str(path), "test-channel", "up"], env={"UP_PW": "tc-secret-pw"})
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout + p.stderr
    assert len([x for x in out.splitlines() if x.strip()]) >= 3, out
    assert "tls" in out.lower() and "auth" in out.lower(), out
    assert up.handler.logins and up.handler.logins[-1][1:] == ("u", "tc-secret-pw")
    assert up.messages == []
    assert "tc-secret-pw" not in out


def test_test_channel_failures(tmp_path, upstream_factory, certs):
    up = upstream_factory(certs=certs, starttls=True, users={"u": "pw"}, auth_required=True)
    cfg = MailgateConfig(tmp_path)
    cfg.smtp_channel("up", up, username="u", password_env="UP_PW")
    path = cfg.write()
    p = run_cli(["-c", str(path), "test-channel", "up"], env={"UP_PW": "wrong"})
    assert p.returncode != 0, p.stdout
    p = run_cli(["-c", str(path), "test-channel", "nosuch"], env={"UP_PW": "pw"})
    assert p.returncode != 0, p.stdout
    up.stop()
    cfg.channels["up"]["port"] = free_port()
    path = cfg.write()
    p = run_cli(["-c", str(path), "test-channel", "up"], env={"UP_PW": "pw"})
    assert p.returncode != 0, p.stdout


def test_network_not_allowed_gets_554(config, mailgate):
    """allow_networks that excludes loopback: the client is refused with 554 5.7.1 at greeting."""
    config.file_channel()
    config.server["allow_networks"] = ["10.0.0.0/8"]
    mg = mailgate(config)
    c = Raw(mg.addr)
    try:
        assert_reply(c.reply(), 554, "5.7.1")
        assert c.closed()
    finally:
        c.close()


def test_json_log_format(config, mailgate):
    import json

    config.file_channel()
    path = config.write()
    mg = mailgate(config, args=["--log-format", "json", "-c", str(path), "run"])
    c = Raw(mg.addr)
    try:
        c.greet()
        assert_reply(transact(c, "jsonsender@example.com", ["r@example.org"], message()), 250)
        c.cmd("QUIT")
    finally:
        c.close()
    mg.wait_log("jsonsender@example.com")
    mg.signal(signal.SIGTERM)
    mg.wait(15)
    lines = [line for line in mg.log().splitlines() if line.strip()]
    assert lines
    for line in lines:
        json.loads(line)  # every line is one JSON object


def test_rate_counters_survive_a_restart(config, mailgate, upstream):
    """SPEC §6: rate and quota counters survive a restart."""
    config.smtp_channel("up", upstream, rate="1/min")
    mg = mailgate(config)
    c = Raw(mg.addr)
    try:
        c.greet()
        assert_reply(transact(c, "alice@example.com", ["bob@example.org"], message()), 250)
        c.cmd("QUIT")
    finally:
        c.close()
    mg.signal(signal.SIGTERM)
    assert mg.wait(15) == 0
    mg2 = mailgate(config)
    c = Raw(mg2.addr)
    try:
        c.greet()
        assert_reply(transact(c, "alice@example.com", ["bob@example.org"], message()), 451, "4.7.0")
    finally:
        c.close()
    assert len(upstream.messages) == 1


def test_warning_when_literal_secrets_are_readable_by_others(config, mailgate, upstream):
    config.smtp_channel("up", upstream, username="u", password="literal-pw")
    path = config.write()
    path.chmod(0o644)
    mg = mailgate(config)
    line = mg.wait_log(r"(?i)warn.*(readable|permission|mode|secret)")
    assert "literal-pw" not in mg.log()
    assert line


def test_the_log_leak_check_finds_every_form_of_secret(tmp_path):
    """The check every `mailgate` fixture runs on its log at teardown (conftest
    `leaked_secrets`) must see literal, `_env` and `_file` secrets, or it proves nothing."""
    from conftest import leaked_secrets

    (tmp_path / "pw").write_text("file-secret-123\n")
    cfg = tmp_path / "proxy.toml"
    cfg.write_text(
        '[channels.a]\nhost = "h"\npassword = "literal-secret-1"\n'
        '[channels.b]\nhost = "h"\npassword_file = "pw"\n'
        '[channels.c]\nhost = "h"\npassword_env = "MG_TEST_PW"\n'
        '[channels.d]\nkind = "graph"\noauth = { client_secret = "oauth-secret-9" }\n'
    )
    env = {"MG_TEST_PW": "env-secret-456"}
    log = "x literal-secret-1 y file-secret-123 z env-secret-456 oauth-secret-9"
    assert leaked_secrets(log, cfg, env) == sorted(
        ["literal-secret-1", "file-secret-123", "env-secret-456", "oauth-secret-9"]
    )
    assert leaked_secrets("password = ***", cfg, env) == []


def test_state_export_to_a_bare_file_name(tmp_path):
    # Issue 16 item 8: the file was written, then syncing its folder "" failed (exit 1).
    cfg = MailgateConfig(tmp_path)
    cfg.file_channel("outbox")
    cfg.write()
    p = run_cli(["-c", "proxy.toml", "state", "export", "st.json"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "cannot write" not in p.stderr, p.stderr
    exported = tmp_path / "st.json"
    assert exported.read_text().startswith("{")
    assert exported.stat().st_mode & 0o777 == 0o600
    assert sorted(f.name for f in tmp_path.iterdir() if f.name.startswith(".")) == []
    # and again over the existing file
    p = run_cli(["-c", "proxy.toml", "state", "export", "st.json"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr


CONFIG_SUBCOMMANDS = [
    ["check"],
    ["run"],
    ["route", "a@example.com"],
    ["test-channel", "outbox"],
    ["queue", "list"],
    ["queue", "show", "abc"],
    ["queue", "retry", "--all"],
    ["queue", "delete", "abc"],
    ["state", "export"],
    ["oauth", "authorize", "outbox"],
]


@pytest.mark.parametrize("sub", CONFIG_SUBCOMMANDS, ids=" ".join)
def test_an_unreadable_config_is_exactly_one_line(sub, tmp_path):
    # Issue 16 item 9: a missing file printed the problem and then "1 problem found".
    for path, why in ((tmp_path / "nope.toml", "No such file"), (tmp_path, "Is a directory")):
        p = run_cli(["-c", str(path), *sub], cwd=tmp_path, timeout=20)
        assert p.returncode != 0
        lines = p.stderr.splitlines()
        assert len(lines) == 1, p.stderr
        assert str(path) in lines[0] and "cannot read the configuration file" in lines[0], p.stderr
        assert why in lines[0], p.stderr


def test_several_config_problems_are_all_listed_with_the_count(tmp_path):
    path = tmp_path / "proxy.toml"
    path.write_text('[server]\nbogus = 1\nlisten = "x"\n[channels.a]\nkind = "file"\nwhat = 2\n')
    p = run_cli(["-c", str(path), "queue", "list"], cwd=tmp_path)
    assert p.returncode != 0
    lines = p.stderr.splitlines()
    assert len(lines) >= 4, p.stderr
    assert "bogus" in p.stderr and "what" in p.stderr
    assert re.search(rf"{re.escape(str(path))}: {len(lines) - 1} problems found$", lines[-1]), p.stderr
