"""Fixtures for the black-box interop suite: the mailgate binary driven from outside.

Everything listens on loopback with ephemeral ports. mailgate is started with listeners on
port 0 and the bound addresses are read from its stderr (`listening on ADDR`). Upstreams
are real SMTP servers written by others: aiosmtpd (optionally with STARTTLS from a test CA
and AUTH) and Postfix's smtp-sink.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import tomllib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("MAILGATE_BIN", REPO / "target" / "debug" / "mailgate"))
STARTUP_TIMEOUT = 20.0
IO_TIMEOUT = 15.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")
LISTENING = re.compile(r"listening on (\[[0-9a-fA-F:.]+\]:\d+|[0-9.]+:\d+)( \(implicit TLS\))?")


# ---------------------------------------------------------------------------
# Secrets: no mailgate log may ever show one (SPEC §8)
# ---------------------------------------------------------------------------

# Secrets handed out outside a config file (upstream passwords); see `leaked_secrets`.
KNOWN_SECRETS: set[str] = set()
# Shorter values could turn up in a log by chance (a port number, "pw").
MIN_SECRET_LEN = 6
SECRET_KEYS = ("password", "client_secret", "refresh_token", "url")


def config_secrets(path: Path, env: dict[str, str]) -> set[str]:
    """The secrets a config holds: literal `password`/`client_secret`/`refresh_token`/`url`
    values, the values of their `*_env` variables and the contents of their `*_file`s."""
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return set()
    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, list):
            for x in node:
                walk(x)
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if isinstance(value, (dict, list)):
                walk(value)
                continue
            if not isinstance(value, str):
                continue
            if key in SECRET_KEYS and key != "url":
                found.add(value)
            elif key in ("url", "https_proxy") and "@" in value:  # redis://:password@host
                found.add(value.split("@", 1)[0].rsplit(":", 1)[-1])
            elif key.endswith("_env") and key[: -len("_env")] in SECRET_KEYS:
                found.add(env.get(value) or os.environ.get(value, ""))
            elif key.endswith("_file") and key[: -len("_file")] in SECRET_KEYS:
                f = Path(value) if Path(value).is_absolute() else path.parent / value
                try:
                    found.add(f.read_text().strip())
                except OSError:
                    pass

    walk(doc)
    return found


def leaked_secrets(log: str, config_path: Path, env: dict[str, str]) -> list[str]:
    """Every known test secret that `log` shows: those of the config, the upstreams'
    passwords, and all that the OAuth test peers (token endpoint) handed out."""
    candidates = config_secrets(config_path, env) | KNOWN_SECRETS
    peers = sys.modules.get("oauth_peers")
    for endpoint in getattr(peers, "ENDPOINTS", ()):
        candidates.update(endpoint.secrets())
    return sorted(s for s in candidates if len(s) >= MIN_SECRET_LEN and s in log)


# ---------------------------------------------------------------------------
# Addresses and small helpers
# ---------------------------------------------------------------------------


def split_addr(addr: str) -> tuple[str, int]:
    """`127.0.0.1:25` / `[::1]:25` -> (host, port)."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


PROXY_ENV = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
             "no_proxy", "NO_PROXY")


def strip_proxy_env(env: dict) -> None:
    """The test peers are on loopback, which mailgate sends through the environment's proxy
    unless NO_PROXY lists it (SPEC §7): a proxy set on the test machine must not interfere.
    Tests that want one set it in their own `env`."""
    for name in PROXY_ENV:
        env.pop(name, None)


def free_port() -> int:
    """A port that was free a moment ago (for peers that cannot bind port 0 and tell us)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Polls `pred` until it holds; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def run_cli(args: list[str], *, input: Optional[bytes] = None, cwd=None, env=None, timeout: float = 30):
    """Runs `mailgate ARGS`; returns the CompletedProcess with text stdout/stderr.
    `env` entries whose value is None are removed from the environment."""
    full_env = dict(os.environ, NO_COLOR="1")
    full_env.pop("MAILGATE_CONFIG", None)
    strip_proxy_env(full_env)
    for k, v in (env or {}).items():
        if v is None:
            full_env.pop(k, None)
        else:
            full_env[k] = v
    p = subprocess.run(
        [str(BIN), *args],
        input=input,
        cwd=cwd,
        env=full_env,
        capture_output=True,
        timeout=timeout,
    )
    p.stdout = p.stdout.decode("utf-8", "replace")
    p.stderr = p.stderr.decode("utf-8", "replace")
    return p


# ---------------------------------------------------------------------------
# Config builder (SPEC §3)
# ---------------------------------------------------------------------------


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (str, Path)):
        s = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot render {v!r} as TOML")


class MailgateConfig:
    """Builds a proxy.toml in a test's temp dir. Relay mode, loopback port 0 by default."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.server: dict = {
            "listen": ["127.0.0.1:0"],
            "hostname": "mailgate.test",
            "delivery": "relay",
            "spool_dir": str(tmp / "spool"),
        }
        self.users: list[dict] = []
        self.channels: dict[str, dict] = {}
        self.routing: dict = {}
        self.state: dict = {}
        self.metrics: dict = {}
        self.env: dict[str, str] = {}

    def file_channel(self, name: str = "outbox", senders=("*",), **extra) -> Path:
        """Adds a `file` channel; returns its directory."""
        d = self.tmp / f"files-{name}"
        d.mkdir(exist_ok=True)
        ch = {"kind": "file", "dir": str(d)}
        if senders is not None:
            ch["senders"] = list(senders)
        self.channels[name] = {**ch, **extra}
        return d

    def smtp_channel(self, name: str, upstream: "Upstream", senders=("*",), **extra) -> None:
        """Adds an `smtp` channel pointing at a test upstream."""
        ch = {"host": upstream.host, "port": upstream.port, "tls": upstream.tls_mode}
        if upstream.ca_file:
            ch["ca_file"] = str(upstream.ca_file)
        if senders is not None:
            ch["senders"] = list(senders)
        ch.update(extra)
        self.channels[name] = ch

    def tls(self, cert: Path, key: Path) -> None:
        self.server["tls_cert"] = str(cert)
        self.server["tls_key"] = str(key)

    def listeners(self) -> int:
        return len(self.server.get("listen", [])) + len(self.server.get("tls_listen", []))

    def render(self) -> str:
        out = ["[server]"]
        out += [f"{k} = {toml_value(v)}" for k, v in self.server.items()]
        for u in self.users:
            out += ["", "[[users]]"] + [f"{k} = {toml_value(v)}" for k, v in u.items()]
        for name, ch in self.channels.items():
            out += ["", f"[channels.{name}]"] + [f"{k} = {toml_value(v)}" for k, v in ch.items()]
        if self.routing:
            out += ["", "[routing]"] + [f"{k} = {toml_value(v)}" for k, v in self.routing.items()]
        if self.state:
            out += ["", "[state]"] + [f"{k} = {toml_value(v)}" for k, v in self.state.items()]
        if self.metrics:
            out += ["", "[metrics]"] + [f"{k} = {toml_value(v)}" for k, v in self.metrics.items()]
        return "\n".join(out) + "\n"

    def write(self, name: str = "proxy.toml") -> Path:
        p = self.tmp / name
        p.write_text(self.render())
        return p


@pytest.fixture
def config(tmp_path) -> MailgateConfig:
    return MailgateConfig(tmp_path)


# ---------------------------------------------------------------------------
# Running mailgate
# ---------------------------------------------------------------------------


class Mailgate:
    """A running `mailgate -c CONFIG run`, its bound addresses and its stderr."""

    def __init__(self, config_path: Path, expect_listeners: int, env=None, cwd=None, args=None):
        self.config_path = config_path
        self.lines: list[str] = []
        self.plain: list[str] = []
        self.tls: list[str] = []
        self._cond = threading.Condition()
        full_env = dict(os.environ, NO_COLOR="1", RUST_BACKTRACE="1")
        full_env.pop("MAILGATE_CONFIG", None)
        strip_proxy_env(full_env)
        if env:
            full_env.update(env)
        cmd = [str(BIN), *(args or ["-c", str(config_path), "run"])]
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd or config_path.parent,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._wait_listening(expect_listeners)

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = ANSI.sub("", raw.decode("utf-8", "replace")).rstrip("\n")
            with self._cond:
                self.lines.append(line)
                m = LISTENING.search(line)
                if m:
                    (self.tls if m.group(2) else self.plain).append(m.group(1))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _wait_listening(self, n: int) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with self._cond:
            while len(self.plain) + len(self.tls) < n:
                if self.proc.poll() is not None:
                    self._cond.wait(0.2)  # let the reader drain the last lines
                    pytest.fail(f"mailgate exited with {self.proc.returncode} before listening:\n{self.log()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"mailgate did not log {n} 'listening on' lines in time:\n{self.log()}")
                self._cond.wait(min(left, 0.2))

    @property
    def addr(self) -> str:
        """The first plain listener."""
        return self.plain[0]

    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_log(self, pattern: str, timeout: float = 10.0) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if rx.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no log line matching {pattern!r}:\n{self.log()}")
                self._cond.wait(min(left, 0.2))

    def signal(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def mailgate(request):
    """Factory: `mailgate(config)` starts the binary on that MailgateConfig (or a path)."""
    if not BIN.exists():
        pytest.fail(f"mailgate binary not found at {BIN} (cargo build, or set MAILGATE_BIN)")
    started: list[Mailgate] = []

    def start(cfg, *, env=None, listeners: Optional[int] = None, cwd=None, args=None) -> Mailgate:
        if isinstance(cfg, MailgateConfig):
            path = cfg.write()
            env = {**cfg.env, **(env or {})}
            n = cfg.listeners() if listeners is None else listeners
        else:
            path, n = Path(cfg), listeners or 1
        mg = Mailgate(path, n, env=env, cwd=cwd, args=args)
        mg.secret_env = env or {}
        started.append(mg)
        return mg

    yield start
    for mg in started:
        if mg.proc.poll() is None:
            mg.signal(signal.SIGTERM)
            try:
                mg.wait(10)
            except subprocess.TimeoutExpired:
                mg.kill()
        print(f"--- mailgate log ({mg.config_path}) ---\n{mg.log()}")
    for mg in started:
        leaks = leaked_secrets(mg.log(), mg.config_path, mg.secret_env)
        if leaks:
            pytest.fail(f"mailgate's log shows {len(leaks)} test secret(s) ({mg.config_path})")


# ---------------------------------------------------------------------------
# TLS material
# ---------------------------------------------------------------------------


@dataclass
class Certs:
    """A test CA and a server certificate it issued for localhost / 127.0.0.1 / ::1."""

    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path
    server: trustme.LeafCert

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.configure_cert(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        return ctx


def make_certs(d: Path) -> Certs:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", "::1", "mailgate.test")
    d.mkdir(parents=True, exist_ok=True)
    ca_file = d / "test-ca.pem"
    cert_file = d / "server.pem"
    key_file = d / "server-key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf.private_key_pem.write_to_path(str(key_file))
    # full chain: leaf then CA
    with open(cert_file, "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    return Certs(ca, ca_file, cert_file, key_file, leaf)


@pytest.fixture
def certs(tmp_path) -> Certs:
    """Test CA + server certificate (used for mailgate's listeners and for upstreams)."""
    return make_certs(tmp_path / "certs")


# ---------------------------------------------------------------------------
# Upstreams
# ---------------------------------------------------------------------------


@dataclass
class Received:
    """One message as an upstream saw it."""

    mail_from: str
    mail_options: list
    rcpt_tos: list
    rcpt_options: list
    content: bytes
    tls: bool
    login: Optional[tuple]
    peer: object = None


class RecordingHandler:
    """aiosmtpd handler: records every message; replies can be scripted per verb."""

    def __init__(self):
        self.messages: list[Received] = []
        self.mail_reply: Optional[str] = None
        self.rcpt_reply: Optional[str] = None
        self.rcpt_reply_for: dict[str, str] = {}
        self.data_reply: Optional[str] = None
        self.logins: list[tuple] = []
        self.sessions = 0
        self.data_delay = 0.0
        self.in_data = 0
        self.max_in_data = 0
        self._lock = threading.Lock()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        with self._lock:
            self.sessions += 1
        session.host_name = hostname
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.rcpt_reply_for.get(address) or self.rcpt_reply
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_delay:
            with self._lock:
                self.in_data += 1
                self.max_in_data = max(self.max_in_data, self.in_data)
            await asyncio.sleep(self.data_delay)
            with self._lock:
                self.in_data -= 1
        if self.data_reply:
            return self.data_reply
        login = None
        if session.auth_data is not None and isinstance(session.auth_data, LoginPassword):
            login = (session.auth_data.login.decode(), session.auth_data.password.decode())
        msg = Received(
            mail_from=envelope.mail_from,
            mail_options=list(envelope.mail_options),
            rcpt_tos=list(envelope.rcpt_tos),
            rcpt_options=list(envelope.rcpt_options),
            content=envelope.original_content,
            tls=session.ssl is not None or server.transport.get_extra_info("ssl_object") is not None,
            login=login,
            peer=session.peer,
        )
        with self._lock:
            self.messages.append(msg)
        return "250 2.0.0 OK upstream-accepted"


class _LongLinesSMTP(SMTP):
    """aiosmtpd refuses lines over 1001 octets; mailgate passes longer ones (SPEC §5), so
    the test upstream takes them too."""

    line_length_limit = 1 << 20


class _PortZeroController(Controller):
    """aiosmtpd Controller that binds port 0 and learns the port before its self-test."""

    def factory(self):
        return _LongLinesSMTP(self.handler, **self.SMTP_kwargs)

    def _trigger_server(self):
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class Upstream:
    """An aiosmtpd upstream on 127.0.0.1; `.handler.messages` holds what arrived."""

    def __init__(
        self,
        *,
        certs: Optional[Certs] = None,
        starttls: bool = False,
        implicit_tls: bool = False,
        users: Optional[dict[str, str]] = None,
        auth_required: bool = False,
        auth_exclude: Optional[list[str]] = None,
        data_size_limit: int = 64 * 1024 * 1024,
        handler: Optional[RecordingHandler] = None,
        smtp_kwargs: Optional[dict] = None,
    ):
        self.handler = handler or RecordingHandler()
        self.host = "127.0.0.1"
        self.ca_file = certs.ca_file if certs else None
        self.tls_mode = "implicit" if implicit_tls else ("starttls" if starttls else "none")
        kwargs = dict(
            decode_data=False,
            enable_SMTPUTF8=True,
            data_size_limit=data_size_limit,
            server_hostname="upstream.test",
            ready_timeout=10,
        )
        if starttls:
            kwargs["tls_context"] = certs.server_context()
            kwargs["require_starttls"] = True
        if implicit_tls:
            kwargs["ssl_context"] = certs.server_context()
        if users is not None:
            handler = self.handler
            KNOWN_SECRETS.update(users.values())

            def authenticator(server, session, envelope, mechanism, auth_data):
                if not isinstance(auth_data, LoginPassword):
                    return AuthResult(success=False, handled=False)
                login, password = auth_data.login.decode(), auth_data.password.decode()
                handler.logins.append((mechanism, login, password))
                ok = users.get(login) == password
                # handled=False makes aiosmtpd answer 535 itself on failure
                return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

            kwargs["authenticator"] = authenticator
            kwargs["auth_required"] = auth_required
            kwargs["auth_require_tls"] = starttls or implicit_tls
            if auth_exclude:
                kwargs["auth_exclude_mechanism"] = auth_exclude
        kwargs.update(smtp_kwargs or {})
        self.controller = _PortZeroController(self.handler, hostname="127.0.0.1", port=0, **kwargs)
        self.controller.start()
        self.port = self.controller.port

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def wait_messages(self, n: int, timeout: float = 15.0) -> list[Received]:
        wait_until(lambda: len(self.messages) >= n, timeout, f"{n} message(s) at the upstream")
        return self.messages

    def stop(self) -> None:
        if self.controller._thread is not None:
            self.controller.stop()


@pytest.fixture
def upstream_factory():
    """Factory for aiosmtpd upstreams; all are stopped at teardown."""
    made: list[Upstream] = []

    def make(**kw) -> Upstream:
        u = Upstream(**kw)
        made.append(u)
        return u

    yield make
    for u in made:
        u.stop()


@pytest.fixture
def upstream(upstream_factory) -> Upstream:
    """A plain (tls = "none") aiosmtpd upstream without AUTH."""
    return upstream_factory()


class SmtpSink:
    """Postfix smtp-sink on 127.0.0.1, dumping each transaction to a file."""

    def __init__(self):
        exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        # smtp-sink drops to `nobody` before writing its dumps, and pytest's tmp_path sits
        # under a 0700 directory: use a world-writable directory of its own.
        d = Path(tempfile.mkdtemp(prefix="mailgate-sink-"))
        os.chmod(d, 0o777)
        self.dir = d
        self.host = "127.0.0.1"
        self.tls_mode = "none"
        self.ca_file = None
        for _ in range(5):
            self.port = free_port()
            cmd = [exe]
            if os.geteuid() == 0:
                cmd += ["-u", "nobody"]
            cmd += ["-d", f"{d}/msg.", f"127.0.0.1:{self.port}", "100"]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if self._ready():
                return
            self.stop()
        pytest.fail("smtp-sink did not start")

    def _ready(self) -> bool:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), 0.5) as s:
                    s.settimeout(2)
                    if s.recv(100).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return True
            except OSError:
                time.sleep(0.05)
        return False

    def dumps(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.dir.glob("msg.*"))]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def smtp_sink():
    s = SmtpSink()
    yield s
    s.stop()
    shutil.rmtree(s.dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# Raw SMTP client
# ---------------------------------------------------------------------------


@dataclass
class Reply:
    code: int
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> Optional[str]:
        m = re.match(r"(\d\.\d{1,3}\.\d{1,3})\b", self.lines[0]) if self.lines else None
        return m.group(1) if m else None

    def __str__(self) -> str:
        return "\n".join(f"{self.code} {line}" for line in self.lines) or str(self.code)


def assert_reply(reply: Reply, code: int, enhanced: Optional[str] = None) -> None:
    """The reply has this code (and enhanced code, when given)."""
    assert reply is not None, f"expected {code} {enhanced or ''}, got connection closed"
    assert reply.code == code, f"expected {code} {enhanced or ''}, got: {reply}"
    if enhanced:
        assert reply.enhanced == enhanced, f"expected {code} {enhanced}, got: {reply}"


class Raw:
    """A byte-level SMTP client: send exactly these bytes, read replies as they come."""

    def __init__(self, addr: str, timeout: float = IO_TIMEOUT):
        host, port = split_addr(addr)
        self.sock = socket.create_connection((host, port), timeout)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.host = host

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> Optional[bytes]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self) -> Optional[Reply]:
        """The next (possibly multi-line) reply; None when the server closed the connection."""
        lines: list[str] = []
        code = None
        while True:
            line = self._line()
            if line is None:
                if lines:
                    raise AssertionError(f"connection closed inside a reply: {lines}")
                return None
            text = line.decode("utf-8", "replace")
            if len(text) < 3 or not text[:3].isdigit():
                raise AssertionError(f"malformed reply line: {text!r}")
            code = int(text[:3])
            lines.append(text[4:])
            if len(text) == 3 or text[3] == " ":
                return Reply(code, lines)

    def cmd(self, line: str | bytes) -> Optional[Reply]:
        data = line.encode() if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.reply()

    def expect(self, line: str | bytes, code: int, enhanced: Optional[str] = None) -> Reply:
        r = self.cmd(line)
        assert_reply(r, code, enhanced)
        return r

    def greet(self, ehlo: str = "client.test") -> Reply:
        assert_reply(self.reply(), 220)
        return self.expect(f"EHLO {ehlo}", 250)

    def pending(self, wait: float = 0.5) -> bytes:
        """Whatever the server sends within `wait` seconds (b"" if nothing)."""
        self.sock.settimeout(wait)
        data = self.buf
        self.buf = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (socket.timeout, TimeoutError):
            pass
        finally:
            self.sock.settimeout(IO_TIMEOUT)
        return data

    def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection (EOF or reset) within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (socket.timeout, TimeoutError):
            return False
        except ConnectionResetError:
            return True
        finally:
            self.sock.settimeout(IO_TIMEOUT)

    def starttls(self, ctx: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)
        self.sock.settimeout(IO_TIMEOUT)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@pytest.fixture
def raw():
    """Factory: `raw(addr)` opens a Raw connection, closed at teardown."""
    opened: list[Raw] = []

    def connect(addr: str) -> Raw:
        r = Raw(addr)
        opened.append(r)
        return r

    yield connect
    for r in opened:
        r.close()


def smtp_client(addr: str, **kw):
    """An smtplib.SMTP connected to `addr`."""
    import smtplib

    host, port = split_addr(addr)
    return smtplib.SMTP(host, port, timeout=IO_TIMEOUT, **kw)


def message(sender: str = "alice@example.com", to: str = "bob@example.org", subject: str = "hi",
            body: bytes = b"Hello.\r\n", extra_headers: bytes = b"") -> bytes:
    """A small RFC 5322 message with CRLF line ends."""
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{time.monotonic_ns()}@client.test>\r\n".encode()
        + extra_headers
        + b"\r\n"
        + body
    )


_HASH_CACHE: dict[str, str] = {}


def hash_password(password: str) -> str:
    """`mailgate hash-password` (cached per run: argon2 is slow in a debug build)."""
    if password not in _HASH_CACHE:
        p = run_cli(["hash-password"], input=password.encode() + b"\n")
        assert p.returncode == 0, f"hash-password failed: {p.stderr}"
        _HASH_CACHE[password] = p.stdout.strip()
    return _HASH_CACHE[password]


def stuff(msg: bytes) -> bytes:
    """Dot-stuffs a CRLF message for DATA (RFC 5321 §4.5.2)."""
    return re.sub(rb"(^|\r\n)\.", rb"\1..", msg)


def transact(c: Raw, sender: str, rcpts: list[str], msg: bytes, *, mail_params: str = "") -> Reply:
    """MAIL, RCPT…, DATA, message: the first refusal, or the final reply to the data."""
    r = c.cmd(f"MAIL FROM:<{sender}>{mail_params}".encode())
    if r is None or r.code != 250:
        return r
    for rcpt in rcpts:
        r = c.cmd(f"RCPT TO:<{rcpt}>".encode())
        if r is None or r.code != 250:
            return r
    r = c.cmd("DATA")
    if r is None or r.code != 354:
        return r
    c.send(stuff(msg) + b".\r\n")
    return c.reply()
