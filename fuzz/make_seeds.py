#!/usr/bin/env python3
"""Writes the committed seed corpora under fuzz/seeds/<target>/ (run from anywhere).

Seeds are realistic inputs: SMTP command lines as clients send them, a sample message
with the SMTP-smuggling end-of-data look-alikes, real header sections, and the shipped
proxy.toml (as it is, and with every example uncommented).
"""

import hashlib
import pathlib
import re
import shutil

FUZZ = pathlib.Path(__file__).resolve().parent
SEEDS = FUZZ / "seeds"
REPO = FUZZ.parent

COMMANDS = [
    b"EHLO client.example.com\r\n",
    b"HELO legacy-printer\r\n",
    b"ehlo [127.0.0.1]\r\n",
    b"EHLO [IPv6:::1]\r\n",
    b"MAIL FROM:<alice@example.com>\r\n",
    b"MAIL FROM:<alice@example.com> SIZE=12345 BODY=8BITMIME SMTPUTF8\r\n",
    b"MAIL FROM: <alice@example.com>\r\n",
    b"mail from:alice@example.com\r\n",
    b"MAIL FROM:alice@example.com SIZE=10\r\n",
    b"MAIL FROM:<>\r\n",
    b"MAIL FROM:<\"quoted local\"@example.com>\r\n",
    b"MAIL FROM:<j\xc3\xb6rg@ex\xc3\xa4mple.org> SMTPUTF8\r\n",
    b"MAIL FROM:<a@b> RET=HDRS ENVID=abc123\r\n",
    b"MAIL FROM:<a@b> AUTH=<>\r\n",
    b"RCPT TO:<bob@example.org>\r\n",
    b"rcpt to: bob@example.org\r\n",
    b"RCPT TO:<bob@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.org\r\n",
    b"RCPT TO:<postmaster>\r\n",
    b"DATA\r\n",
    b"BDAT 100\r\n",
    b"BDAT 0 LAST\r\n",
    b"BDAT 18446744073709551616 LAST\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"NOOP ignored text\r\n",
    b"QUIT\r\n",
    b"VRFY alice\r\n",
    b"EXPN list\r\n",
    b"HELP\r\n",
    b"STARTTLS\r\n",
    b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH LOGIN YWxpY2U=\r\n",
    b"AUTH XOAUTH2\r\n",
    b"ETRN example.com\r\n",
    b"MAIL FROM:<a@b>\n",
    b"MAIL FROM:<a@b>   \r\n",
    b"MAIL FROM:<a@b\r\n",
    b"MAIL FROM:a@b <c@d>\r\n",
    b"RCPT TO:<a@b> SIZE=1\r\n",
    b"\r\n",
    b"GET / HTTP/1.1\r\n",
    b"MAIL FROM:<" + b"a" * 980 + b"@b>\r\n",
    (
        b"EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
        b"RCPT TO:c@example.org\r\nDATA\r\nRSET\r\nNOOP\r\nQUIT\r\n"
    ),
]

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: =?UTF-8?B?SGVsbG8gd29ybGQ=?=\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"..a line that starts with a dot\r\n"
    b"Bye.\r\n"
)

# SEC Consult's SMTP smuggling look-alikes of the end of data (and variants).
SMUGGLING = [
    b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\n",
    b"\n.\r", b"\r\n.\r\r\n", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\n\n.\n\n",
    b"\r\r.\r\r", b"\r\n.\n\r\n", b"\n\r.\n\r",
]

HIDDEN = (
    b"MAIL FROM:<admin@bank.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
    b"From: admin@bank.example\r\nSubject: smuggled\r\n\r\nPay now.\r\n"
)

HEADERS = [
    MESSAGE,
    b"From: alice@example.com\r\nSender: Bob <bob@example.com>\r\n\r\n",
    b"From: Team: a@example.com, B <b@example.com>;\r\nFrom: c@example.com\r\n\r\n",
    b"From: \"Doe, John\" <JOHN@Example.COM>, jane@example.com\r\n\r\n",
    b"From: =?UTF-8?Q?J=C3=B6rg?= <j\xc3\xb6rg@ex\xc3\xa4mple.org>\r\n\r\n",
    b"From: undisclosed-recipients:;\r\n\r\n",
    b"From: not an address\r\nPrecedence:  Bulk \r\n\r\nbody\r\n",
    b"Subject: no from\r\nPrecedence: list\r\n\r\n",
    b"From: a@example.com\r\n\tcontinued (comment)\r\nSender: <>\r\n\r\n",
    b"From: a@example.com\nSubject: bare LF headers\n\nbody\n",
    b"From: (comment) a@example.com (another)\r\nPrecedence: junk\r\n\r\n",
]


# Address headers that readers disagree on (issue 16), and unambiguous look-alikes.
ADDRESS_HEADERS = [
    b"From: app@example.com\r\nTo: eve@evil.org:;\r\n\r\nbody\r\n",
    b"From: app@example.com\r\nTo: eve@evil.org <bob@example.org>\r\n\r\n",
    b"From: app@example.com\r\nTo: eve@evil.org: bob@example.org;\r\n\r\n",
    b"From: app@example.com\r\nTo: bob@example.org\r\nX-Broken\r\n \r\nCc: eve@evil.org\r\n\r\n",
    b"From: ceo@othercorp.com <app@example.com>\r\nTo: bob@example.org\r\n\r\n",
    b"From: scan@x.com <scan@x.com>\r\nTo: \"Doe, John\" <bob@example.org>, c@x.org (C)\r\n\r\n",
    b"From: =?utf-8?q?eve=40evil.org?= <app@example.com>\r\nCc: =?utf-8?b?ZXZlQGV2aWwub3Jn?=:;\r\n\r\n",
    b"From: a@x.org\r\nTo: team: a@x.org, B\r\n <b@x.org>;, c@x.org\r\nBcc: a@x.org; b@x.org\r\n\r\n",
    b"From: \"ceo\"@othercorp.com\r\nSender: <@relay.example:a@x.org>\r\nTo: bob @ example . org\r\n\r\n",
    b"To : eve@evil.org\r\nFrom: a@x.org\r\n\r\n",
    b" To: eve@evil.org\r\nFrom: a@x.org\rCc: eve@evil.org\r\n\r\n",
]


def seed_name(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def write(target: str, seeds) -> None:
    folder = SEEDS / target
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for data in seeds:
        (folder / seed_name(data)).write_bytes(data)


def data_seed(bdat: bool, lengths, stream: bytes) -> bytes:
    """Byte 0: bit 0 BDAT, bits 1-3 the number of chunk lengths; then the lengths."""
    assert len(lengths) <= 7 and all(0 <= n <= 255 for n in lengths)
    return bytes([int(bdat) | len(lengths) << 1, *lengths]) + stream


def data_seeds():
    streams = [
        MESSAGE + b".\r\nQUIT\r\n",
        b".\r\nQUIT\r\n",
        b"..x\r\n..\r\n...y\r\n.\r\n",
        b"a\r\n.\r\r\nb\r\n.\r\n",
        b"a\rb\nc\r\r\nd\n\r\n.\r\n",
        b"unterminated\r\n.x\r\n",
    ]
    for payload in SMUGGLING:
        streams.append(
            b"From: a@example.com\r\nSubject: hi\r\n\r\nfirst part"
            + payload + HIDDEN + b"\r\n.\r\nQUIT\r\n"
        )
    seeds = []
    for stream in streams:
        seeds.append(data_seed(False, [], stream))
        seeds.append(data_seed(False, [1, 7, 2, 40], stream))
        seeds.append(data_seed(True, [3, 0, 64], stream))
    return seeds


def header_capture_seed(limit: int, decode: bool, lengths, stream: bytes) -> bytes:
    """Bytes 0-1: the limit (u16 LE); byte 2: bit 0 decode as DATA, bits 1-3 the number
    of chunk lengths; then the lengths."""
    assert 0 <= limit < 1 << 16 and len(lengths) <= 7 and all(0 <= n <= 255 for n in lengths)
    return limit.to_bytes(2, "little") + bytes([int(decode) | len(lengths) << 1, *lengths]) + stream


def header_capture_seeds():
    seeds = []
    for headers in HEADERS:
        section = headers.split(b"\r\n\r\n")[0] + b"\r\n"
        n = len(section)
        # At, just under and just over the limit; whole and in chunks; raw and as DATA.
        for limit in (n - 1, n, n + 1, n + 2, 0, 4096):
            seeds.append(header_capture_seed(max(limit, 0), False, [], headers))
            seeds.append(header_capture_seed(max(limit, 0), False, [1, 3, 7], headers))
            seeds.append(header_capture_seed(max(limit, 0), True, [5, 2], headers + b".\r\n"))
    # A second From: after many header lines, no body at all, an empty section.
    filler = b"".join(b"X-Filler-%03d: %s\r\n" % (i, b"f" * 40) for i in range(200))
    late = b"From: a@example.com\r\n" + filler + b"From: ceo@elsewhere.test\r\n\r\nbody\r\n"
    for limit in (len(late) - 12, len(late) - 11, 65535):
        seeds.append(header_capture_seed(limit, False, [255, 255, 1], late))
    seeds.append(header_capture_seed(100, False, [], b"From: a@b\r\nSubject: no body\r\n"))
    seeds.append(header_capture_seed(10, True, [1], b"\r\nbody\r\n.\r\n"))
    seeds.append(header_capture_seed(30, True, [], b"From: a@b\nX: y\r\r\nbody\r\n.\r\n"))
    return seeds


def config_seeds():
    shipped = (REPO / "proxy.toml").read_text()
    # Every commented example enabled, secrets as literals (password_file inputs are
    # skipped by the target).
    full = re.sub(r"(?m)^# (\[|[a-z_]+ = )", r"\1", shipped)
    full = re.sub(r'(?m)^password_(file|env) = .*$', 'password = "literal-secret"', full)
    valid = "\n".join(
        line for line in full.splitlines()
        if not line.startswith(("tls_cert", "tls_key", "ca_file"))
    ).replace(
        '"$argon2id$v=19$..."',
        '"$argon2i$v=19$m=65536,t=2,p=4$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG"',
    ).replace("require_auth = false", "require_auth = true")
    broken = [
        '[server]\nlisen = ["127.0.0.1:2525"]\nmax_message_size = "35XB"\n',
        '[server]\nretry_first = "5x"\nrequire_auth = "yes"\n[channels.a]\nkind = "file"\n',
        '[channels.x]\npreset = "ses"\nusername = "u"\npassword = "p"\nsenders = ["*"]\n',
        '[channels.o]\npreset = "office365"\nusername = "a@b.c"\npassword = "p"\n'
        'senders = ["*@b.c"]\n[channels.r]\nhost = "10.0.0.1"\ntls = "none"\n'
        'rate = "30/fortnight"\nsenders = ["*@b.c"]\n',
        "[server\nthis is not toml = = =\n",
    ]
    return [s.encode() for s in [shipped, full, valid, *broken]]


def main() -> None:
    write("command", COMMANDS)
    write("data", data_seeds())
    write("headers", HEADERS)
    write("header_capture", header_capture_seeds())
    # Byte 0 bit 0: decode as a DATA stream (else BDAT bytes).
    write(
        "address_headers",
        [bytes([0]) + h for h in HEADERS + ADDRESS_HEADERS]
        + [bytes([1]) + h + b".\r\n" for h in ADDRESS_HEADERS],
    )
    write("config", config_seeds())


if __name__ == "__main__":
    main()
