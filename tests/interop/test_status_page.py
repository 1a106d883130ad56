"""The status page (SPEC §8) in a real browser: Debian's chromium, headless, loads `/`
from the mailgate binary; the DOM it built is parsed with Python's html.parser, and the
page is photographed at a phone's width (390×844) and a desktop's (1280×800).
`/status.json` is checked against the same facts and against `queue list` and `check`.

With MAILGATE_DOCS_SCREENSHOT=1 the desktop screenshot is also copied to
docs/status-page.png (the README's picture of the page).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import smtplib
import struct
import subprocess
import tempfile
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import IO_TIMEOUT, message, run_cli, wait_until
from test_queue import queue_mode, script_data, submit
from test_shared_state import RedisServer, redis  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SERVED = re.compile(r"serving metrics at (http://\S+)/metrics")
XSS_PAYLOAD = "<img src=x onerror=alert(1)> no such user"
XSS_REPLY = "550 5.1.1 " + XSS_PAYLOAD
XSS_SENDER = '"<script>alert(2)</script>"@example.com'
# Accepted by mailgate (no angle brackets), and every character HTML cares about but those.
ODD_SENDER = '"o\'neil&co \\"x\\""@example.com'
UPSTREAM_PASSWORD = "upstream-pw-Rq53!status"
CSP = "default-src 'none'; style-src 'unsafe-inline'"


def base_url(mg) -> str:
    return SERVED.search(mg.wait_log(SERVED.pattern)).group(1)


def get(url: str, method: str = "GET") -> tuple[int, str, object]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=IO_TIMEOUT) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers


def facts(base: str) -> dict:
    status, body, headers = get(base + "/status.json")
    assert status == 200, body
    assert headers["Content-Security-Policy"] == CSP
    return json.loads(body)


def channel(doc: dict, name: str) -> dict:
    return next(c for c in doc["channels"] if c["name"] == name)


def chromium(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    """One headless chromium run with a new profile, nothing fetched but `url`."""
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (scripts/test.sh installs it)")
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-extensions", f"--user-data-dir={profile}", *args, url]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p


class Dom(HTMLParser):
    """The elements of a DOM as chromium serialized it, each channel card's attributes and
    text, and the whole text (entities decoded)."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, dict]] = []
        self.cards: dict[str, dict] = {}
        self.text: list[str] = []
        self._card: str | None = None
        self._depth = 0
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.attrs.append((tag, a))
        if tag == "article" and "data-channel" in a:
            self._card = a["data-channel"]
            self.cards[self._card] = {"state": a.get("data-state"), "class": a.get("class"), "text": ""}
            self._depth = 0
        elif self._card and tag == "article":
            self._depth += 1

    def handle_endtag(self, tag):
        if tag == "article" and self._card:
            if self._depth == 0:
                self._card = None
            else:
                self._depth -= 1

    def handle_data(self, data):
        self.text.append(data)
        if self._card:
            self.cards[self._card]["text"] += data

    @property
    def all_text(self) -> str:
        return "".join(self.text)


def dump_dom(tmp_path: Path, url: str) -> Dom:
    html = chromium(tmp_path, url, "--dump-dom").stdout
    assert "<html" in html, html[:500]
    return Dom(html)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def screenshots(tmp_path: Path, url: str) -> dict[str, Path]:
    shots = {}
    for name, size in (("phone", "390,844"), ("desktop", "1280,800")):
        path = tmp_path / f"status-{name}.png"
        chromium(tmp_path, url, f"--screenshot={path}", f"--window-size={size}", "--hide-scrollbars")
        assert path.stat().st_size > 10_000, path
        assert png_size(path)[0] == int(size.split(",")[0]), png_size(path)
        shots[name] = path
    return shots


def assert_no_markup_from_outside(dom: Dom) -> None:
    """What an upstream or a client sent created no element: the page itself has no image,
    script, frame, link or form at all, and no event-handler attribute."""
    assert not {"img", "script", "iframe", "link", "form", "object", "embed"} & set(dom.tags), dom.tags
    for tag, attrs in dom.attrs:
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)


def test_the_page_shows_each_channel_state_and_escapes_what_clients_and_upstreams_sent(
        config, mailgate, upstream_factory, certs, tmp_path):
    queue_mode(config)
    config.server["check_header_from"] = False
    config.metrics = {"listen": "127.0.0.1:0"}
    good = upstream_factory()
    config.smtp_channel("good", good, senders=["good@example.com"], rate="1/min")
    refusing = upstream_factory()
    refusing.handler.data_reply = XSS_REPLY
    config.smtp_channel("picky", refusing, senders=["*@example.com"])
    locked = upstream_factory(certs=certs, starttls=True, users={"u": UPSTREAM_PASSWORD},
                              auth_required=True)
    config.env["MG_TEST_WRONG_PW"] = "wrong-" + UPSTREAM_PASSWORD
    config.smtp_channel("locked", locked, senders=["locked@example.com"], username="u",
                        password_env="MG_TEST_WRONG_PW")
    basic_off = upstream_factory()
    script_data(basic_off, ["535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."] * 50)
    config.smtp_channel("alice", basic_off, senders=["alice@example.com"], fallback="alice-drop")
    drop = config.file_channel("alice-drop", senders=["alice@example.com"])
    mg = mailgate(config)
    base = base_url(mg)

    # A sender with markup in its quoted local part never gets in.
    with smtplib.SMTP(*mg.addr.rsplit(":", 1), timeout=IO_TIMEOUT) as c:
        c.ehlo()
        code, text = c.mail(XSS_SENDER)
        assert code == 553, (code, text)
    for sender in ("good@example.com", "good@example.com", ODD_SENDER, "locked@example.com",
                   "alice@example.com"):
        code, text = submit(mg.addr, sender, ["bob@example.org"], message(subject=sender))
        assert code == 250, (sender, text)

    def settled() -> bool:
        doc = facts(base)
        return (channel(doc, "good")["state"] == "limited"
                and channel(doc, "locked")["state"] == "broken"
                and channel(doc, "alice")["fallback_in_use"]
                and any(r["channel"] == "picky" and r["outcome"] == "failed" for r in doc["recent"])
                # The message and the DSN about it (the same upstream refuses it too);
                # good's second message and locked's wait.
                and doc["queue"]["failed"] == 2
                and doc["queue"]["messages"] == 2)
    wait_until(settled, 30, "every channel in its state on /status.json")
    wait_until(lambda: any(drop.iterdir()), 10, "alice's mail in its fallback's folder")
    doc = facts(base)

    g = channel(doc, "good")
    assert g["until"] and g["reason"] and "rate 1 of 1 used" in g["reason"], g
    assert g["rate"] == {"used": 1, "limit": 1, "window_seconds": 60}, g
    assert g["queue"]["messages"] == 1 and g["queue"]["oldest_age_seconds"] is not None, g
    lk = channel(doc, "locked")
    assert "535" in lk["reason"] and "password" in lk["action"], lk
    assert lk["queue"]["messages"] == 1, lk
    a = channel(doc, "alice")
    assert a["state"] == "broken" and "5.7.139" in a["reason"], a
    assert a["fallback"] == "alice-drop" and a["fallback_in_use"] is True, a
    assert channel(doc, "alice-drop")["fallback_in_use"] is False
    assert channel(doc, "picky")["state"] == "ok"
    assert doc["delivery"] == "queue" and doc["version"]
    assert doc["state_backend"] == {"kind": "local", "location": str(config.tmp / "spool" / "state"),
                                    "reachable": True, "error": None}
    assert doc["uptime_seconds"] >= 0
    recent = doc["recent"]
    assert [r["time"] for r in recent] == sorted((r["time"] for r in recent), reverse=True)
    failed = next(r for r in recent if r["channel"] == "picky" and r["sender"] == ODD_SENDER)
    assert failed["outcome"] == "failed" and XSS_PAYLOAD in failed["reply"], failed
    assert failed["recipients"] == 1 and failed["id"]
    assert any(r["channel"] == "good" and r["outcome"] == "delivered" for r in recent), recent
    assert any(r["channel"] == "alice" and r["outcome"] == "deferred" for r in recent), recent

    # The same facts as `queue list` and `check`.
    p = run_cli(["-c", str(mg.config_path), "queue", "list"], env=dict(config.env))
    assert p.returncode == 0, p.stderr
    listing = p.stdout
    queued = int(re.search(r"^(\d+) message\(s\) queued", listing, re.M).group(1))
    assert doc["queue"]["messages"] == queued, listing
    in_failed = re.search(r"^(\d+) message\(s\) in failed/", listing, re.M)
    assert doc["queue"]["failed"] == int(in_failed.group(1)), listing
    states = dict(re.findall(r"^(\S+)\s+(ok|limited|broken)\b", listing, re.M))
    assert states == {c["name"]: c["state"] for c in doc["channels"]}, (states, listing)
    check = run_cli(["-c", str(mg.config_path), "check"], env=dict(config.env))
    assert check.returncode == 0, check.stderr
    for c in doc["channels"]:
        assert re.search(rf"^\s*{re.escape(c['name'])}: {c['state']}\b", check.stdout, re.M), (c["name"], check.stdout)

    # The page in a browser: every channel with its state as a word, nothing from outside
    # turned into an element.
    dom = dump_dom(tmp_path, base + "/")
    assert set(dom.cards) == {c["name"] for c in doc["channels"]}, dom.cards
    for c in doc["channels"]:
        card = dom.cards[c["name"]]
        assert card["state"] == c["state"], (c["name"], card)
        assert c["state"].upper() in card["text"], card
    assert "mailgate oauth authorize" not in dom.cards["locked"]["text"]
    assert "password" in dom.cards["locked"]["text"]
    assert "in use: its mail goes there now" in dom.cards["alice"]["text"]
    assert "Limited until" in dom.cards["good"]["text"]
    assert_no_markup_from_outside(dom)
    text = dom.all_text
    assert "upstream said: " + XSS_PAYLOAD in text, text
    assert ODD_SENDER in text, text
    status, page, headers = get(base + "/")
    assert headers["Content-Security-Policy"] == CSP
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert '<meta http-equiv="refresh" content="10">' in page

    shots = screenshots(tmp_path, base + "/")
    if os.environ.get("MAILGATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shots["desktop"], REPO / "docs" / "status-page.png")


def test_relay_mode_shows_a_broken_channel_and_its_fallback(config, mailgate, upstream_factory, tmp_path):
    config.server["check_header_from"] = False
    config.metrics = {"listen": "127.0.0.1:0"}
    basic_off = upstream_factory()
    basic_off.handler.data_reply = "535 5.7.139 Authentication unsuccessful, basic auth is off"
    config.smtp_channel("alice", basic_off, senders=["alice@example.com"], fallback="alice-drop")
    config.file_channel("alice-drop", senders=["alice@example.com"])
    refusing = upstream_factory()
    refusing.handler.data_reply = "535 5.7.8 Error: authentication failed: <b>bad</b>"
    config.smtp_channel("other", refusing, senders=["other@example.com"])
    mg = mailgate(config)
    base = base_url(mg)
    assert submit(mg.addr, "alice@example.com", ["bob@example.org"], message())[0] == 250
    code, _ = submit(mg.addr, "other@example.com", ["bob@example.org"], message(sender="other@example.com"))
    assert code == 535, code  # relay mode: the upstream's answer
    doc = facts(base)
    assert doc["delivery"] == "relay" and doc["queue"] is None
    a = channel(doc, "alice")
    assert a["state"] == "broken" and a["fallback_in_use"], a
    o = channel(doc, "other")
    assert o["state"] == "broken" and "<b>bad</b>" in o["reason"], o
    dom = dump_dom(tmp_path, base + "/")
    assert dom.cards["alice"]["state"] == "broken"
    assert dom.cards["other"]["state"] == "broken"
    assert dom.cards["alice-drop"]["state"] == "ok"
    assert "<b>bad</b>" in dom.cards["other"]["text"]
    assert "b" not in dom.tags
    assert_no_markup_from_outside(dom)


def test_a_redis_backend_going_away_shows_and_coming_back_clears(config, mailgate, redis, tmp_path):
    queue_mode(config)
    config.metrics = {"listen": "127.0.0.1:0"}
    config.file_channel("outbox", rate="100/min")
    config.state = {"backend": "redis", "url": redis.url, "key_prefix": "status:"}
    mg = mailgate(config)
    base = base_url(mg)
    assert submit(mg.addr, "alice@example.com", ["bob@example.org"], message())[0] == 250
    wait_until(lambda: channel(facts(base), "outbox")["rate"]["used"] == 1, 15, "the send counted in Redis")
    doc = facts(base)
    assert doc["state_backend"]["kind"] == "redis" and doc["state_backend"]["reachable"], doc
    assert doc["state_backend"]["location"].startswith("redis://127.0.0.1:"), doc

    redis.stop()
    wait_until(lambda: not facts(base)["state_backend"]["reachable"], 20, "the page to see Redis gone")
    doc = facts(base)
    assert doc["state_backend"]["error"], doc
    assert channel(doc, "outbox")["state"] == "unknown", doc
    dom = dump_dom(tmp_path, base + "/")
    assert "UNREACHABLE" in dom.all_text
    assert dom.cards["outbox"]["state"] == "unknown"
    assert "state backend" in dom.cards["outbox"]["text"]

    redis.start()
    wait_until(lambda: facts(base)["state_backend"]["reachable"], 30, "the page to see Redis back")
    assert channel(facts(base), "outbox")["state"] == "ok"
