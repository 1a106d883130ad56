"""Client-side TLS (SPEC §5): STARTTLS on plain listeners, implicit-TLS listeners,
commands pipelined ahead of STARTTLS discarded, certificates from `mailgate cert generate`.
Upstream side (SPEC §7): plaintext injected behind an upstream's `220` to STARTTLS.
"""

import smtplib
import socket
import ssl
import threading

import pytest

from conftest import (
    assert_reply,
    message,
    run_cli,
    smtp_client,
    split_addr,
    transact,
    wait_until,
)


def start_tls(config, mailgate, certs, **server):
    outbox = config.file_channel("outbox")
    config.tls(certs.cert_file, certs.key_file)
    config.server.update(server)
    return mailgate(config), outbox


def test_ehlo_offers_starttls_when_tls_configured(config, mailgate, raw, certs):
    mg, _ = start_tls(config, mailgate, certs)
    r = raw(mg.addr).greet()
    assert "STARTTLS" in [line.upper() for line in r.lines], str(r)


def test_starttls_with_smtplib(config, mailgate, certs):
    mg, outbox = start_tls(config, mailgate, certs)
    host, port = split_addr(mg.addr)
    msg = message()
    with smtplib.SMTP(host, port, local_hostname="client.test", timeout=15) as s:
        s.ehlo()
        s.starttls(context=certs.client_context())
        code, resp = s.ehlo()
        assert code == 250
        assert not s.has_extn("starttls"), f"STARTTLS offered again after TLS: {resp!r}"
        s.sendmail("alice@example.com", ["bob@example.org"], msg)
    (eml,) = outbox.glob("*.eml")
    assert eml.read_bytes() == msg


def test_starttls_twice_is_refused(config, mailgate, raw, certs):
    mg, _ = start_tls(config, mailgate, certs)
    c = raw(mg.addr)
    c.greet()
    c.expect("STARTTLS", 220)
    c.starttls(certs.client_context(), "localhost")
    c.expect("EHLO client.test", 250)
    r = c.cmd("STARTTLS")
    assert r is not None and r.code in (454, 503), str(r)


def test_starttls_without_tls_configured(config, mailgate, raw):
    config.file_channel("outbox")
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    r = c.cmd("STARTTLS")
    assert r is not None and r.code in (454, 502), str(r)


def test_session_state_is_reset_by_starttls(config, mailgate, raw, certs):
    """RFC 3207: after the handshake the client must EHLO again; MAIL before it is out of order."""
    mg, _ = start_tls(config, mailgate, certs)
    c = raw(mg.addr)
    c.greet()
    c.expect("STARTTLS", 220)
    c.starttls(certs.client_context(), "localhost")
    r = c.cmd("MAIL FROM:<alice@example.com>")
    assert r is not None and r.code in (250, 503), str(r)
    c.expect("EHLO client.test", 250)
    c.expect("MAIL FROM:<alice@example.com>", 250)


def test_commands_pipelined_ahead_of_starttls_are_discarded(config, mailgate, raw, certs):
    mg, outbox = start_tls(config, mailgate, certs)
    c = raw(mg.addr)
    c.greet()
    c.send(b"STARTTLS\r\nNOOP\r\nMAIL FROM:<alice@example.com>\r\n")
    assert_reply(c.reply(), 220)
    assert c.buf == b"", f"server answered the pipelined commands in clear: {c.buf!r}"
    c.starttls(certs.client_context(), "localhost")
    # After the handshake nothing must be pending: a NOOP reply here means the
    # plaintext-injected command was executed inside the TLS session.
    extra = c.pending(1.0)
    assert extra == b"", f"injected commands were answered inside TLS: {extra!r}"
    c.expect("EHLO client.test", 250)
    # the injected MAIL did not open a transaction
    c.expect("RCPT TO:<bob@example.org>", 503, "5.5.1")


def test_implicit_tls_listener(config, mailgate, certs):
    outbox = config.file_channel("outbox")
    config.tls(certs.cert_file, certs.key_file)
    config.server["tls_listen"] = ["127.0.0.1:0"]
    mg = mailgate(config)
    assert mg.tls, f"no implicit TLS listener logged:\n{mg.log()}"
    host, port = split_addr(mg.tls[0])
    msg = message()
    with smtplib.SMTP_SSL(host, port, context=certs.client_context(), timeout=15) as s:
        code, _ = s.ehlo()
        assert code == 250
        assert not s.has_extn("starttls")
        s.sendmail("alice@example.com", ["bob@example.org"], msg)
    (eml,) = outbox.glob("*.eml")
    assert eml.read_bytes() == msg


def test_implicit_tls_greeting_only_after_handshake(config, mailgate, raw, certs):
    config.file_channel("outbox")
    config.tls(certs.cert_file, certs.key_file)
    config.server["tls_listen"] = ["127.0.0.1:0"]
    config.server["listen"] = []
    mg = mailgate(config)
    c = raw(mg.tls[0])
    c.starttls(certs.client_context(), "localhost")
    r = c.reply()
    assert_reply(r, 220)
    assert "mailgate" in r.text


def test_starttls_with_generated_certificate(config, mailgate, tmp_path):
    d = tmp_path / "gen"
    p = run_cli(["cert", "generate", "--dir", str(d)])
    assert p.returncode == 0, p.stderr
    cert, key = d / "localhost.pem", d / "localhost-key.pem"
    outbox = config.file_channel("outbox")
    config.tls(cert, key)
    mg = mailgate(config)
    host, port = split_addr(mg.addr)
    # Trust the self-signed certificate itself; the name checked is `localhost`.
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.verify_flags |= getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0)
    with smtplib.SMTP(host, port, timeout=15) as s:
        s._host = "localhost"  # smtplib uses _host as the TLS server name
        s.ehlo()
        s.starttls(context=ctx)
        s.ehlo()
        s.sendmail("alice@example.com", ["bob@example.org"], message())
    assert len(list(outbox.glob("*.eml"))) == 1


@pytest.mark.parametrize("proto", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"])
def test_tls_versions(config, mailgate, raw, certs, proto):
    mg, _ = start_tls(config, mailgate, certs)
    c = raw(mg.addr)
    c.greet()
    c.expect("STARTTLS", 220)
    ctx = certs.client_context()
    ctx.minimum_version = proto
    ctx.maximum_version = proto
    c.starttls(ctx, "localhost")
    c.expect("EHLO client.test", 250)
    assert c.sock.version() == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[proto.name]


def test_swaks_starttls(config, mailgate, certs, upstream):
    import shutil
    import subprocess

    if not shutil.which("swaks"):
        pytest.skip("swaks not installed")
    config.smtp_channel("up", upstream)
    config.tls(certs.cert_file, certs.key_file)
    mg = mailgate(config)
    host, port = split_addr(mg.addr)
    p = subprocess.run(
        ["swaks", "--server", host, "--port", str(port), "--tls", "--from", "alice@example.com",
         "--to", "bob@example.org", "--header", "Subject: swaks tls"],
        capture_output=True, text=True, timeout=30,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    (m,) = upstream.wait_messages(1)
    assert b"Subject: swaks tls" in m.content


class InjectingUpstream:
    """An upstream (or an attacker on its path) that answers STARTTLS with `220` and, in
    the same write, ten `250` replies in plaintext. A client that reads them as replies
    over TLS takes the last one as the verdict on a message this upstream refuses
    (`554` to the end of data, if it gets that far): the message would be lost."""

    def __init__(self, certs):
        self.host = "127.0.0.1"
        self.tls_mode = "starttls"
        self.ca_file = certs.ca_file
        self.context = certs.server_context()
        self.commands: list[str] = []
        self.sessions = 0
        self.handshakes = 0
        self.ended = 0
        self.sock = socket.create_server((self.host, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.sessions += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            f = conn.makefile("rb")
            conn.sendall(b"220 inject.test ESMTP\r\n")
            while (line := f.readline()):
                cmd = line.decode(errors="replace").strip()
                self.commands.append(cmd)
                if cmd.upper().startswith("EHLO"):
                    conn.sendall(b"250-inject.test\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n")
                elif cmd.upper() == "STARTTLS":
                    conn.sendall(b"220 2.0.0 go ahead\r\n" + b"250 2.0.0 injected\r\n" * 10)
                    break
                else:
                    conn.sendall(b"503 5.5.1 STARTTLS first\r\n")
            else:
                return
            tls = self.context.wrap_socket(conn, server_side=True)
            self.handshakes += 1
            f = tls.makefile("rb")
            while (line := f.readline()):
                cmd = line.decode(errors="replace").strip()
                self.commands.append(cmd)
                verb = cmd.split(" ")[0].upper()
                if verb == "EHLO":
                    tls.sendall(b"250-inject.test\r\n250 ENHANCEDSTATUSCODES\r\n")
                elif verb == "DATA":
                    tls.sendall(b"354 go\r\n")
                    while f.readline() not in (b".\r\n", b""):
                        pass
                    self.ended += 1
                    tls.sendall(b"554 5.7.1 refused\r\n")
                elif verb == "QUIT":
                    tls.sendall(b"221 2.0.0 bye\r\n")
                    return
                else:
                    tls.sendall(b"250 2.0.0 ok\r\n")
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def injecting_upstream(certs):
    u = InjectingUpstream(certs)
    yield u
    u.stop()


def test_plaintext_after_upstream_starttls_220_fails_the_relay(config, mailgate, raw, injecting_upstream):
    """SPEC §7: bytes sent before the handshake are never read as replies; the client
    hears a temporary TLS failure and keeps its message."""
    up = injecting_upstream
    config.smtp_channel("up", up)
    mg = mailgate(config)
    c = raw(mg.addr)
    c.greet()
    assert_reply(transact(c, "alice@example.com", ["bob@example.org"], message()), 454, "4.7.0")
    assert up.commands == ["EHLO mailgate.test", "STARTTLS"], up.commands
    assert up.handshakes == 0 and up.ended == 0


def test_plaintext_after_upstream_starttls_220_keeps_the_mail_queued(config, mailgate, injecting_upstream):
    up = injecting_upstream
    config.server.update({"delivery": "queue", "retry_first": "1s", "retry_max": "2s"})
    config.smtp_channel("up", up)
    mg = mailgate(config)
    with smtp_client(mg.addr) as s:
        s.ehlo()
        code, text = s.mail("alice@example.com")
        assert code == 250, text
        code, text = s.rcpt("bob@example.org")
        assert code == 250, text
        code, text = s.data(message())
    assert code == 250, text
    qid = text.decode().split()[-1]
    # Two attempts, each dropped after the 220: the mail stays queued, never "delivered".
    wait_until(lambda: up.sessions >= 2, 15, "two delivery attempts")
    wait_until(lambda: up.commands.count("STARTTLS") >= 2, 5, "two STARTTLS")
    assert set(up.commands) == {"EHLO mailgate.test", "STARTTLS"}, up.commands
    assert up.handshakes == 0 and up.ended == 0
    listing = run_cli(["-c", str(config.tmp / "proxy.toml"), "queue", "list"])
    assert listing.returncode == 0, listing.stderr
    assert qid in listing.stdout and "4.7.0" in listing.stdout, listing.stdout
    assert "delivered" not in mg.log(), mg.log()
