"""Abuse limits and shutdown, as a client sees them (issue 10: AUTH throttling, slow
clients, graceful shutdown)."""

import base64
import signal
import socket
import threading
import time

from conftest import Raw, assert_reply, hash_password, message, split_addr


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


class RawFrom(Raw):
    """A Raw client whose socket is bound to `source` (another loopback address)."""

    def __init__(self, addr: str, source: str, timeout: float = 30.0):
        host, port = split_addr(addr)
        self.sock = socket.create_connection((host, port), timeout, source_address=(source, 0))
        self.sock.settimeout(timeout)
        self.buf = b""
        self.host = host


def test_auth_failures_are_slowed_and_counted_per_address(config, mailgate):
    config.file_channel()
    config.users.append({"name": "app", "password_hash": hash_password("s3cret"), "senders": ["*"]})
    mg = mailgate(config)

    # One session: each failure answers later than the one before.
    c = Raw(mg.addr, timeout=60)
    c.greet()
    start = time.monotonic()
    c.expect(plain("app", "wrong"), 535, "5.7.8")
    first = time.monotonic() - start
    c.expect(plain("app", "wrong"), 535, "5.7.8")
    second = time.monotonic() - start - first
    assert first >= 0.9, f"first failure answered after {first:.2f}s"
    assert second >= 1.0, f"second failure answered after {second:.2f}s"
    c.close()

    # Eight more failures from 127.0.0.1, in parallel sessions: ten in all.
    errors = []

    def fail_once():
        try:
            # argon2 in a debug build takes a second or two, one per core at a time.
            s = Raw(mg.addr, timeout=90)
            s.greet()
            s.expect(plain("app", "wrong"), 535, "5.7.8")
            s.close()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=fail_once) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors

    # The 11th AUTH from 127.0.0.1 is refused without being checked, even with the
    # right password.
    c = Raw(mg.addr)
    c.greet()
    start = time.monotonic()
    c.expect(plain("app", "s3cret"), 454, "4.7.0")
    assert time.monotonic() - start < 0.9
    c.close()

    # Another address is not affected.
    other = RawFrom(mg.addr, "127.0.0.2", timeout=60)
    try:
        other.greet()
        other.expect(plain("app", "wrong"), 535, "5.7.8")
        other.expect(plain("app", "s3cret"), 235)
    finally:
        other.close()


def test_sigterm_lets_an_open_transaction_finish(config, mailgate):
    outbox = config.file_channel()
    mg = mailgate(config)
    time.sleep(0.3)  # the signal handler is installed just after "listening on"
    busy, idle = Raw(mg.addr), Raw(mg.addr)
    try:
        busy.greet()
        idle.greet()
        busy.expect("MAIL FROM:<alice@example.com>", 250)
        busy.expect("RCPT TO:<bob@example.org>", 250)
        mg.signal(signal.SIGTERM)
        # The idle session is told at once.
        start = time.monotonic()
        assert_reply(idle.reply(), 421, "4.3.0")
        assert time.monotonic() - start < 2
        assert idle.closed()
        time.sleep(1)
        busy.expect("DATA", 354)
        busy.send(message() + b".\r\n")
        assert_reply(busy.reply(), 250)
        # Then the session ends.
        assert_reply(busy.reply(), 421, "4.3.0")
        assert busy.closed()
    finally:
        busy.close()
        idle.close()
    assert mg.wait(15) == 0, mg.log()
    assert len(list(outbox.glob("*.eml"))) == 1


def test_shutdown_grace_bounds_an_open_transaction(config, mailgate):
    config.file_channel()
    config.server["shutdown_grace"] = "2s"
    mg = mailgate(config)
    time.sleep(0.3)
    c = Raw(mg.addr)
    try:
        c.greet()
        c.expect("MAIL FROM:<alice@example.com>", 250)
        mg.signal(signal.SIGTERM)
        start = time.monotonic()
        assert_reply(c.reply(), 421, "4.3.0")
        took = time.monotonic() - start
        assert 1.5 <= took < 6, took
    finally:
        c.close()
    assert mg.wait(15) == 0, mg.log()


def test_a_message_dribbled_in_is_cut_off(config, mailgate):
    config.file_channel()
    config.server["idle_timeout"] = "2s"
    mg = mailgate(config)
    c = Raw(mg.addr)
    try:
        c.greet()
        c.expect("MAIL FROM:<alice@example.com>", 250)
        c.expect("RCPT TO:<bob@example.org>", 250)
        c.expect("DATA", 354)
        start = time.monotonic()
        got = b""
        while time.monotonic() - start < 12 and not got:
            try:
                c.send(b"x")
            except OSError:
                break
            got = c.pending(1.0)
        took = time.monotonic() - start
        got += c.pending(1.0)
        assert got.startswith(b"421 4.4.2"), (took, got)
        assert took < 6, took
    finally:
        c.close()
