"""The shipped proxy.toml, as a new user runs it (issue 3, "Done when").

Uses the real port 2525, so it lives in the last file pytest collects and never runs in
parallel with itself. A copy of proxy.toml runs in a temp dir so ./outbox lands there.
"""

import shutil
import socket
import subprocess
import time

import pytest

from conftest import REPO, run_cli, wait_until

SHIPPED = REPO / "proxy.toml"


def port_busy(port: int) -> bool:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family) as s:
                s.settimeout(0.5)
                if s.connect_ex((host, port)) == 0:
                    return True
        except OSError:
            pass
    return False


@pytest.fixture
def shipped(tmp_path):
    if not SHIPPED.exists():
        pytest.fail(f"{SHIPPED} is missing")
    shutil.copy(SHIPPED, tmp_path / "proxy.toml")
    return tmp_path


def test_shipped_config_checks(shipped):
    p = run_cli(["check"], cwd=shipped)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.port2525
@pytest.mark.skipif(not shutil.which("swaks"), reason="swaks not installed")
def test_shipped_config_with_swaks_leaves_message_in_outbox(shipped, mailgate):
    if port_busy(2525):
        pytest.fail("port 2525 is in use by something else; this test needs it")
    # The shipped config listens on 127.0.0.1:2525 and [::1]:2525 (the latter may be skipped).
    mg = mailgate(shipped / "proxy.toml", listeners=1, cwd=shipped, args=["run"])
    time.sleep(0.3)  # let the second listener come up too
    p = subprocess.run(
        ["swaks", "--server", "localhost:2525", "--from", "a@example.com", "--to", "b@example.org"],
        capture_output=True, text=True, timeout=60,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    # In queue mode (the shipped default) a worker delivers after the 250: wait for it.
    wait_until(lambda: list((shipped / "outbox").glob("*.eml")), 20, "the message in outbox/")
    emls = list((shipped / "outbox").glob("*.eml"))
    assert len(emls) == 1, f"outbox: {list((shipped / 'outbox').iterdir()) if (shipped / 'outbox').exists() else 'missing'}"
    assert b"a@example.com" in emls[0].read_bytes()
    for addr in ("127.0.0.1:2525",):
        assert addr in mg.plain, mg.plain
