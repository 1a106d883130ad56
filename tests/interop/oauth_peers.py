"""OAuth peers for the black-box suite: a token endpoint (Microsoft/Google style, on a real
HTTP server on 127.0.0.1 port 0) and an aiosmtpd upstream that takes AUTH XOAUTH2 only,
checking the SASL string and that the bearer token is one the endpoint issued and is
still valid. Nothing here talks to a real provider.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
import ssl
import threading
import weakref
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from aiosmtpd.smtp import AuthResult

from conftest import RecordingHandler

CLIENT_ID = "test-client-id"
CLIENT_SECRET = "TEST-CLIENT-SECRET-5e1f"
REFRESH_TOKEN = "TEST-REFRESH-TOKEN-a9c3"


@dataclass
class Issued:
    token: str
    expires: float
    grant: str
    revoked: bool = False


@dataclass
class Device:
    device_code: str
    user_code: str
    polls: int = 0
    pending: int = 2  # answers authorization_pending this many times…
    slow_down: bool = True  # …then slow_down once, then the token


def _server(handler, tls: Optional[ssl.SSLContext]) -> ThreadingHTTPServer:
    """A threading HTTP server on 127.0.0.1, port 0; HTTPS with `tls` (the handshake
    happens in the request's thread, so a client that fails it stalls no one else)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    return server


# Every endpoint started, so that conftest can check each mailgate log for their secrets.
ENDPOINTS: "weakref.WeakSet[TokenEndpoint]" = weakref.WeakSet()


class TokenEndpoint:
    """Token, device-authorization and code-exchange endpoints on one HTTP server.

    `mode` scripts failures: "ok", "503", "invalid_grant", "invalid_client",
    "unauthorized_client", and "huge": a 200 token answer streamed without a length,
    `huge_size` bytes of valid JSON (`huge_sent` records how much each request took).
    """

    def __init__(self, lifetime: int = 3600, rotate: bool = False, tls: Optional[ssl.SSLContext] = None):
        self.lifetime = lifetime
        self.rotate = rotate
        self.mode = "ok"
        self.refresh_tokens = {REFRESH_TOKEN}
        self.issued: dict[str, Issued] = {}
        self.requests: list[dict] = []
        self.devices: dict[str, Device] = {}
        self.device_polls: list[float] = []
        self.codes: dict[str, dict] = {}  # code -> {challenge, redirect_uri}
        self.lock = threading.Lock()
        self.huge_size = 100 << 20
        self.huge_sent: list[int] = []
        ENDPOINTS.add(self)
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(n).decode()))
                if endpoint.mode == "huge" and self.path.endswith("/token"):
                    with endpoint.lock:
                        endpoint.requests.append({"path": self.path, **form})
                    endpoint.huge_sent.append(self.stream_huge(endpoint.huge_size))
                    return
                status, body = endpoint.handle(self.path, form)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def stream_huge(self, size: int) -> int:
                """A valid token document of `size` bytes, no Content-Length (the body ends
                when the connection closes), in 64 KiB writes; returns the bytes the client
                took before it hung up."""
                head = b'{"token_type": "Bearer", "access_token": "TEST-AT-HUGE", "expires_in": 3600, "pad": "'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Connection", "close")
                self.end_headers()
                sent = 0
                piece = b" " * 65536
                try:
                    self.wfile.write(head)
                    sent += len(head)
                    while sent + len(piece) + 2 <= size:
                        self.wfile.write(piece)
                        sent += len(piece)
                    self.wfile.write(b'"}')
                    sent += 2
                except OSError:
                    pass
                self.close_connection = True
                return sent

        self.server = _server(Handler, tls)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # -- what tests look at ------------------------------------------------------

    def grants(self, grant: Optional[str] = None) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if grant is None or r.get("grant_type") == grant]

    def valid(self, token: str) -> bool:
        with self.lock:
            t = self.issued.get(token)
            return t is not None and not t.revoked and t.expires > time.time()

    def revoke_all(self) -> None:
        with self.lock:
            for t in self.issued.values():
                t.revoked = True

    def secrets(self) -> list[str]:
        """Every secret value a log must never show."""
        with self.lock:
            return [CLIENT_SECRET, REFRESH_TOKEN, *self.refresh_tokens, *self.issued]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the endpoint ----------------------------------------------------------------

    def _token(self, grant: str, with_refresh: bool) -> dict:
        token = "TEST-AT-" + secrets.token_hex(8)
        self.issued[token] = Issued(token, time.time() + self.lifetime, grant)
        body = {"token_type": "Bearer", "access_token": token, "expires_in": self.lifetime}
        if with_refresh:
            new = "TEST-RT-" + secrets.token_hex(8)
            self.refresh_tokens.add(new)
            body["refresh_token"] = new
        return body

    def handle(self, path: str, form: dict) -> tuple[int, dict]:
        with self.lock:
            self.requests.append({"path": path, **form})
            if self.mode == "503":
                return 503, {"error": "temporarily_unavailable"}
            if self.mode in ("invalid_grant", "invalid_client", "unauthorized_client"):
                return 400, {"error": self.mode, "error_description": "scripted failure"}
            if form.get("client_id") != CLIENT_ID:
                return 401, {"error": "invalid_client"}
            if path.endswith("/devicecode"):
                d = Device("DEV-" + secrets.token_hex(6), "ABCD-" + secrets.token_hex(2).upper())
                self.devices[d.device_code] = d
                return 200, {
                    "device_code": d.device_code,
                    "user_code": d.user_code,
                    "verification_uri": self.url + "/devicelogin",
                    "expires_in": 120,
                    "interval": 1,
                    "message": f"To sign in, open {self.url}/devicelogin and enter {d.user_code}",
                }
            grant = form.get("grant_type")
            if grant == "refresh_token":
                rt = form.get("refresh_token")
                if rt not in self.refresh_tokens:
                    return 400, {"error": "invalid_grant", "error_description": "AADSTS70000: bad token"}
                if self.rotate:
                    self.refresh_tokens.discard(rt)
                return 200, self._token(grant, self.rotate)
            if grant == "client_credentials":
                if form.get("client_secret") != CLIENT_SECRET:
                    return 401, {"error": "invalid_client"}
                return 200, self._token(grant, False)
            if grant == "urn:ietf:params:oauth:grant-type:device_code":
                d = self.devices.get(form.get("device_code", ""))
                if d is None:
                    return 400, {"error": "invalid_grant"}
                self.device_polls.append(time.monotonic())
                d.polls += 1
                if d.polls <= d.pending:
                    return 400, {"error": "authorization_pending"}
                if d.slow_down and d.polls == d.pending + 1:
                    return 400, {"error": "slow_down"}
                return 200, self._token(grant, True)
            if grant == "authorization_code":
                c = self.codes.pop(form.get("code", ""), None)
                if c is None or form.get("redirect_uri") != c["redirect_uri"]:
                    return 400, {"error": "invalid_grant"}
                if form.get("client_secret") != CLIENT_SECRET:
                    return 401, {"error": "invalid_client"}
                verifier = form.get("code_verifier", "").encode()
                challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=")
                if challenge.decode() != c["challenge"]:
                    return 400, {"error": "invalid_grant", "error_description": "PKCE mismatch"}
                return 200, self._token(grant, True)
            return 400, {"error": "unsupported_grant_type"}

    def approve_code(self, auth_url: str) -> tuple[str, str]:
        """Plays the user's browser at the authorization endpoint: checks the request and
        returns (code, redirect URL with code and state) for the test to follow."""
        q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(auth_url).query))
        assert q["client_id"] == CLIENT_ID
        assert q["response_type"] == "code"
        assert q["code_challenge_method"] == "S256"
        assert q["access_type"] == "offline"
        assert q["redirect_uri"].startswith("http://127.0.0.1:")
        code = "CODE-" + secrets.token_hex(6)
        with self.lock:
            self.codes[code] = {"challenge": q["code_challenge"], "redirect_uri": q["redirect_uri"]}
        sep = "&" if "?" in q["redirect_uri"] else "?"
        redirect = q["redirect_uri"] + sep + urllib.parse.urlencode({"code": code, "state": q["state"]})
        return code, redirect


@dataclass
class XoauthLogin:
    user: str
    token: str
    ok: bool


class XOAuth2Handler(RecordingHandler):
    """aiosmtpd handler offering AUTH XOAUTH2 only. `style` is how a refusal looks:
    "microsoft" answers 535 5.7.3 at once; "google" sends the 334 error challenge first
    and wants an empty line before its 535 5.7.8."""

    def __init__(self, endpoint: TokenEndpoint, mailbox: str, style: str = "microsoft"):
        super().__init__()
        # Close each connection after its message, so the next one logs in afresh
        # (how a test sees a revoked token: a logged-in connection stays logged in).
        self.close_after_data = False
        self.endpoint = endpoint
        self.mailbox = mailbox
        self.style = style
        self.xoauth: list[XoauthLogin] = []
        self.bad_sasl: list[bytes] = []

    async def handle_DATA(self, server, session, envelope):
        reply = await super().handle_DATA(server, session, envelope)
        if self.close_after_data:
            asyncio.get_running_loop().call_later(0.05, server.transport.close)
        return reply

    async def auth_XOAUTH2(self, server, args):
        if len(args) == 2:
            blob = args[1].encode()
        else:
            blob = await server.challenge_auth("", encode_to_b64=False)
        try:
            raw = base64.b64decode(blob, validate=True)
        except Exception:
            self.bad_sasl.append(blob)
            return AuthResult(success=False, handled=False, message="501 5.5.2 bad base64")
        parts = raw.split(b"\x01")
        ok_shape = len(parts) == 4 and parts[2:] == [b"", b""] and parts[0].startswith(b"user=") \
            and parts[1].startswith(b"auth=Bearer ")
        if not ok_shape:
            self.bad_sasl.append(raw)
            return AuthResult(success=False, handled=False, message="535 5.7.8 malformed XOAUTH2")
        user = parts[0][5:].decode()
        token = parts[1][len(b"auth=Bearer "):].decode()
        ok = user == self.mailbox and self.endpoint.valid(token)
        self.xoauth.append(XoauthLogin(user, token, ok))
        if ok:
            return AuthResult(success=True, auth_data=user)
        if self.style == "google":
            err = json.dumps({"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"})
            await server.challenge_auth(err)
            return AuthResult(success=False, handled=False,
                              message="535 5.7.8 Username and Password not accepted")
        return AuthResult(success=False, handled=False, message="535 5.7.3 Authentication unsuccessful")


@dataclass
class GraphSent:
    mailbox: str
    mime: bytes


class GraphApi:
    """A Microsoft Graph stand-in on a real HTTP server (127.0.0.1, port 0):
    `POST /v1.0/users/{mailbox}/sendMail` with a base64 MIME body and `GET
    /v1.0/users/{mailbox}`. Bearer tokens are checked with the token endpoint; the
    decoded MIME and the mailbox are recorded. `script` holds answers for the next
    sendMail requests: (status, code) or (status, code, retry_after).
    """

    def __init__(self, endpoint: TokenEndpoint, tls: Optional[ssl.SSLContext] = None):
        self.endpoint = endpoint
        # The upload way (SPEC §7): drafts by id, upload sessions by token, drafts sent,
        # ids deleted, accepted PUT chunk sizes, PUTs that carried a bearer token, the
        # requests in order ("create", "attach", "session", "put", "send", "delete"), and
        # `fail[step]`: answers (status, code) for that step's next requests.
        self.drafts: dict[str, dict] = {}
        self.sessions: dict[str, dict] = {}
        self.sent_drafts: list[dict] = []
        self.deleted: list[str] = []
        self.chunks: list[int] = []
        self.upload_auth = 0
        self.draft_log: list[str] = []
        self.fail: dict[str, list[tuple]] = {}
        # Set: a PUT waits (at most 30 s) until `put_release` is set (crash tests).
        self.put_hold = threading.Event()
        self.put_release = threading.Event()
        self.put_arrived = threading.Event()
        self.next_id = 0
        self.sent: list[GraphSent] = []
        self.requests = 0
        self.tokens: list[str] = []
        self.script: list[tuple] = []
        self.get_status = 200
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Graph does

            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: Optional[dict] = None, headers=()):
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                if body is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, code: str, retry_after: Optional[str] = None):
                headers = [("Retry-After", retry_after)] if retry_after else []
                self._answer(status, {"error": {"code": code, "message": f"stand-in {status}"}}, headers)

            def _route(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n) if n else b""
                path = self.path
                if path.startswith("/upload/"):
                    return self._put(path[len("/upload/"):], body)
                if not path.startswith("/v1.0/users/"):
                    return self._error(404, "ResourceNotFound")
                rest = path[len("/v1.0/users/"):]
                if "/" in rest and not rest.endswith("/sendMail"):
                    mailbox, tail = rest.split("/", 1)
                    token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    with api.lock:
                        api.tokens.append(token)
                    if not api.endpoint.valid(token):
                        return self._error(401, "InvalidAuthenticationToken")
                    return self._draft(urllib.parse.unquote(mailbox), tail.split("/"), body)
                send = rest.endswith("/sendMail")
                mailbox = urllib.parse.unquote(rest[: -len("/sendMail")] if send else rest)
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                with api.lock:
                    api.tokens.append(token)
                    if send:
                        api.requests += 1
                if not api.endpoint.valid(token):
                    return self._error(401, "InvalidAuthenticationToken")
                if self.command == "GET" and not send:
                    if api.get_status == 200:
                        return self._answer(200, {"mail": mailbox})
                    return self._error(api.get_status, "ErrorAccessDenied")
                if self.command != "POST" or not send:
                    return self._error(405, "MethodNotAllowed")
                with api.lock:
                    scripted = api.script.pop(0) if api.script else None
                if scripted:
                    return self._error(*scripted)
                if not self.headers.get("Content-Type", "").startswith("text/plain"):
                    return self._error(400, "ErrorMimeContentInvalid")
                try:
                    mime = base64.b64decode(body, validate=True)
                except ValueError:
                    return self._error(400, "ErrorMimeContentInvalidBase64String")
                with api.lock:
                    api.sent.append(GraphSent(mailbox, mime))
                self._answer(202)

            def _scripted(self, step: str) -> bool:
                with api.lock:
                    api.draft_log.append(step)
                    queued = api.fail.get(step) or []
                    answer = queued.pop(0) if queued else None
                if answer:
                    self._error(*answer)
                    return True
                return False

            @staticmethod
            def _attached(item: dict, way: str) -> dict:
                return {"name": item["name"], "contentType": item.get("contentType", ""),
                        "isInline": bool(item.get("isInline")), "contentId": item.get("contentId"),
                        "bytes": base64.b64decode(item["contentBytes"], validate=True), "way": way}

            def _draft(self, mailbox: str, parts: list[str], body: bytes):
                m = self.command
                if m == "POST" and parts == ["messages"]:
                    if self._scripted("create"):
                        return
                    if len(body) >= 4_000_000:
                        return self._error(413, "RequestEntityTooLarge")
                    draft = json.loads(body)
                    attached = [self._attached(a, "draft") for a in draft.pop("attachments", [])]
                    with api.lock:
                        api.next_id += 1
                        did = f"AAMkDraft{api.next_id}="
                        api.drafts[did] = {"id": did, "mailbox": mailbox, "json": draft, "attached": attached}
                    return self._answer(201, {**draft, "id": did, "isDraft": True})
                if m == "POST" and len(parts) == 3 and parts[0] == "messages" and parts[2] == "attachments":
                    if self._scripted("attach"):
                        return
                    if len(body) >= 4_000_000:
                        return self._error(413, "RequestEntityTooLarge")
                    item = self._attached(json.loads(body), "post")
                    with api.lock:
                        if parts[1] not in api.drafts:
                            return self._error(404, "ErrorItemNotFound")
                        api.drafts[parts[1]]["attached"].append(item)
                    return self._answer(201, {"id": "att"})
                if m == "POST" and parts[2:] == ["attachments", "createUploadSession"] and len(parts) == 4:
                    if self._scripted("session"):
                        return
                    item = json.loads(body)["AttachmentItem"]
                    if item.get("attachmentType") != "file" or int(item.get("size", 0)) < 3_000_000:
                        return self._error(400, "ErrorInvalidAttachment")
                    with api.lock:
                        if parts[1] not in api.drafts:
                            return self._error(404, "ErrorItemNotFound")
                        api.next_id += 1
                        token = f"session{api.next_id}"
                        api.sessions[token] = {"draft": parts[1], "size": int(item["size"]), "bytes": bytearray(),
                                               "item": {"name": item["name"], "contentType": item.get("contentType", ""),
                                                        "isInline": bool(item.get("isInline")),
                                                        "contentId": item.get("contentId"), "way": "upload"}}
                    return self._answer(201, {"uploadUrl": f"{api.url}/upload/{token}", "nextExpectedRanges": ["0-"]})
                if m == "POST" and len(parts) == 3 and parts[0] == "messages" and parts[2] == "send":
                    if self._scripted("send"):
                        return
                    with api.lock:
                        if any(u["draft"] == parts[1] for u in api.sessions.values()):
                            return self._error(400, "ErrorAttachmentUploadIncomplete")
                        draft = api.drafts.pop(parts[1], None)
                        if draft is None:
                            return self._error(404, "ErrorItemNotFound")
                        api.sent_drafts.append(draft)
                    return self._answer(202)
                if m == "DELETE" and len(parts) == 2 and parts[0] == "messages":
                    if self._scripted("delete"):
                        return
                    with api.lock:
                        api.sessions = {k: u for k, u in api.sessions.items() if u["draft"] != parts[1]}
                        if api.drafts.pop(parts[1], None) is None:
                            return self._error(404, "ErrorItemNotFound")
                        api.deleted.append(parts[1])
                    return self._answer(204)
                return self._error(405, "MethodNotAllowed")

            def _put(self, token: str, body: bytes):
                """Graph's chunk rules: at most 4 MiB, a multiple of 320 KiB but the last,
                `Content-Range` in order; the uploadUrl is pre-authorized, so a request with
                an Authorization header is refused."""
                if self.command != "PUT":
                    return self._error(405, "MethodNotAllowed")
                if api.put_hold.is_set():
                    api.put_arrived.set()
                    api.put_release.wait(30)
                if self._scripted("put"):
                    return
                with api.lock:
                    if self.headers.get("Authorization"):
                        api.upload_auth += 1
                        return self._error(401, "InvalidAuthenticationToken")
                    up = api.sessions.get(token)
                    if up is None:
                        return self._error(404, "ItemNotFound")
                    mt = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", self.headers.get("Content-Range", ""))
                    if not mt:
                        return self._error(400, "InvalidContentRange")
                    first, last, total = map(int, mt.groups())
                    is_last = last + 1 == total
                    if (total != up["size"] or first != len(up["bytes"]) or last - first + 1 != len(body)
                            or len(body) > 4 * 1024 * 1024 or (not is_last and len(body) % 327_680)):
                        return self._error(416, "InvalidRange")
                    up["bytes"] += body
                    api.chunks.append(len(body))
                    if not is_last:
                        return self._answer(200, {"nextExpectedRanges": [f"{last + 1}-"]})
                    del api.sessions[token]
                    draft = api.drafts.get(up["draft"])
                    if draft is None:
                        return self._error(404, "ErrorItemNotFound")
                    draft["attached"].append({**up["item"], "bytes": bytes(up["bytes"])})
                return self._answer(201)

            do_GET = _route
            do_POST = _route
            do_PUT = _route
            do_DELETE = _route

        self.server = _server(Handler, tls)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_sent(self, n: int, timeout: float = 15.0) -> list[GraphSent]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.sent) >= n:
                    return list(self.sent)
            time.sleep(0.05)
        raise AssertionError(f"Graph got {len(self.sent)} messages, expected {n}")

    def stop(self) -> None:
        self.put_release.set()
        self.server.shutdown()
        self.server.server_close()
