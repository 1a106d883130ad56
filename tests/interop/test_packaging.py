"""contrib/ (issue 11): the systemd unit verifies and scores well in `systemd-analyze
security`, and the shipped proxy.toml files pass `mailgate check`. The Containerfile is not
built here (no container engine on the test machine); its config is checked."""

import re
import shutil
import subprocess

import pytest

from conftest import BIN, REPO, run_cli

UNIT = REPO / "contrib" / "systemd" / "mailgate.service"
# systemd 252 scores the shipped unit 1.2; what is left is network access itself
# (PrivateNetwork, IPAddressDeny, AF_INET) that a mail proxy needs.
MAX_EXPOSURE = 2.0


def analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if not exe:
        pytest.skip("systemd-analyze is not installed")
    return exe


@pytest.fixture
def unit_copy(tmp_path):
    """The shipped unit with ExecStart pointing at a binary that exists (verify needs one)."""
    binary = tmp_path / "mailgate"
    shutil.copy(BIN, binary)
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/mailgate " in text
    unit = tmp_path / "mailgate.service"
    unit.write_text(text.replace("/usr/local/bin/mailgate", str(binary)))
    return unit


def test_unit_verifies(unit_copy):
    p = subprocess.run([analyze(), "verify", str(unit_copy)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "mailgate.service" not in p.stderr, p.stderr  # no warnings about our unit


def test_unit_security_exposure(unit_copy):
    p = subprocess.run([analyze(), "security", "--offline=true", "--no-pager", str(unit_copy)],
                       capture_output=True, text=True, timeout=60)
    out = p.stdout + p.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert m, out
    score = float(m.group(1))
    print(f"systemd-analyze security exposure: {score}")
    assert score <= MAX_EXPOSURE, out


def test_unit_settings_the_brief_relies_on():
    text = UNIT.read_text()
    for line in [
        "DynamicUser=yes", "StateDirectory=mailgate", "ConfigurationDirectory=mailgate",
        "ProtectSystem=strict", "ProtectHome=yes", "NoNewPrivileges=yes", "PrivateTmp=yes",
        "PrivateDevices=yes", "CapabilityBoundingSet=\n", "AmbientCapabilities=\n",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "SystemCallFilter=@system-service",
        "UMask=0077", "KillSignal=SIGTERM",
    ]:
        assert line in text, f"{line!r} missing from {UNIT}"
    assert "ExecReload=/bin/kill -HUP $MAINPID\n" in text
    stop = re.search(r"^TimeoutStopSec=(\d+)s$", text, re.M)
    assert stop and int(stop.group(1)) > 30  # above the default 30 s shutdown_grace


@pytest.mark.parametrize("path", ["contrib/systemd/proxy.toml", "contrib/container/proxy.toml"])
def test_shipped_contrib_configs_check(path, tmp_path):
    p = run_cli(["-c", str(REPO / path), "check"], cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "/var/lib/mailgate/spool" in (REPO / path).read_text()


def test_systemd_config_spool_is_in_the_state_directory():
    text = (REPO / "contrib" / "systemd" / "proxy.toml").read_text()
    assert re.search(r'^spool_dir = "/var/lib/mailgate/', text, re.M)
    assert "WorkingDirectory=/var/lib/mailgate" in UNIT.read_text()


def test_containerfile_matches_its_config():
    text = (REPO / "contrib" / "Containerfile").read_text()
    assert re.search(r"^FROM rust:1\.95-slim-bookworm AS build$", text, re.M)
    assert re.search(r"^FROM debian:bookworm-slim$", text, re.M)
    assert re.search(r"^USER mailgate", text, re.M)
    assert 'VOLUME ["/var/lib/mailgate"]' in text and "EXPOSE 2525" in text
    config = (REPO / "contrib" / "container" / "proxy.toml").read_text()
    assert 'listen = ["0.0.0.0:2525"]' in config and "allow_networks = [" in config
