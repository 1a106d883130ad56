"""The guide (issue 19): README.md and docs/*.md hold no broken link and no config that
`mailgate check` refuses.

Links: every relative link must name a file of the repository, and every `#anchor` a
heading of the file it points at, slugged as GitHub does. Links that leave the repository
are refused too: they cannot resolve on a clean clone.

Snippets: every ```toml block is a config and must pass `mailgate check`. The line before
the block (blank lines aside) may carry a marker:

    <!-- check: fragment -->          the block is only part of a config (a channel, a
                                      [[rewrite]] entry…); it is checked with a catch-all
                                      file channel appended (FRAGMENT_WRAPPER)
    <!-- check: skip (why) -->        not checked; the reason is required

(```json examples, such as the spool's state file, must parse as JSON.)

Secrets a snippet names are provided: every `*_env` variable is set and every `*_file`
(and `ca_file`, `tls_cert`, `tls_key`) is written under the snippet's folder, with a test
CA's certificate where a certificate belongs and an unreachable Redis URL for `url_*`.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, make_certs, run_cli

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250

FRAGMENT_WRAPPER = """
# added by tests/interop/test_docs.py for a <!-- check: fragment --> block
[channels.docs-catch-all]
kind = "file"
dir = "outbox"
senders = ["*"]
"""

# Nothing listens on port 1: `check` reports Redis as unreachable and still succeeds.
REDIS_URL = "redis://127.0.0.1:1/0"
SECRET = "docs-test-secret-value"

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
MARKER = re.compile(r"^\s*<!--\s*check:\s*(?P<kind>\w+)\s*(?P<rest>.*?)\s*-->\s*$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target><[^>]*>|[^)\s]*)(?:\s+\"[^\"]*\")?\)")
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(?P<target>\S+)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


# ---------------------------------------------------------------------------
# Reading Markdown: fences, headings, links
# ---------------------------------------------------------------------------


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    info: str
    text: str
    marker: tuple[str, str] | None  # (kind, rest) of a <!-- check: … --> before it


def split_fences(text: str) -> tuple[list[tuple[int, str]], list[Block]]:
    """(prose lines outside fenced blocks with their 1-based numbers, fenced blocks)."""
    prose: list[tuple[int, str]] = []
    blocks: list[Block] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence, indent = m["fence"], len(m["indent"])
        marker = None
        for before in reversed(lines[:i]):
            if before.strip():
                mm = MARKER.match(before)
                marker = (mm["kind"], mm["rest"]) if mm else None
                break
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            close = lines[i].strip()
            if close.startswith(fence[0] * len(fence)) and not close.strip(fence[0]):
                break
            # the block's own indentation (a block inside a list item) is not content
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i].lstrip())
            i += 1
        blocks.append(Block(Path(), start + 1, m["info"].strip(), "\n".join(body) + "\n", marker))
        i += 1  # the closing fence
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading (github-slugger): the rendered text, lower case,
    without punctuation other than `-` and `_`, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_fences(path.read_text())
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, line in prose:
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m[2])
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    prose, _ = split_fences(path.read_text())
    found = []
    for no, line in prose:
        line = CODE_SPAN.sub("code", line)  # `[x](y)` inside code is not a link
        for m in LINK.finditer(line):
            found.append((no, m["target"].strip("<>")))
        m = REF_DEF.match(line)
        if m:
            found.append((no, m["target"]))
    return found


def broken_links(path: Path, root: Path) -> list[str]:
    """Every link of `path` that does not resolve, as `file:line: target: why`."""
    problems = []
    for no, target in links(path):
        where = f"{path.relative_to(root)}:{no}: {target}"
        if SCHEME.match(target):
            continue  # http(s), mailto: not checked here
        file_part, _, anchor = target.partition("#")
        if file_part.startswith("/"):
            problems.append(f"{where}: absolute path (GitHub reads it from the site root)")
            continue
        dest = (path.parent / file_part).resolve() if file_part else path.resolve()
        try:
            dest.relative_to(root.resolve())
        except ValueError:
            problems.append(f"{where}: leaves the repository (cannot resolve on a clone)")
            continue
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor:
            if dest.suffix != ".md" or dest.is_dir():
                problems.append(f"{where}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.name}")
    return problems


def fenced(path: Path, lang: str) -> list[Block]:
    """The blocks of `path` fenced as ```LANG."""
    _, blocks = split_fences(path.read_text())
    out = []
    for b in blocks:
        if b.info.split(" ")[0].lower() == lang:
            b.path = path
            out.append(b)
    return out


def toml_blocks(path: Path) -> list[Block]:
    return fenced(path, "toml")


# ---------------------------------------------------------------------------
# The checker checks: it finds what it is for
# ---------------------------------------------------------------------------


def test_slug_follows_github():
    assert slug("Reload (SIGHUP)") == "reload-sighup"
    assert slug("`mailgate sendmail`: the /usr/sbin/sendmail interface") == (
        "mailgate-sendmail-the-usrsbinsendmail-interface"
    )
    assert slug("Microsoft's other doors: which one to choose") == (
        "microsofts-other-doors-which-one-to-choose"
    )
    assert slug("The `file` channel and upstream connections") == (
        "the-file-channel-and-upstream-connections"
    )
    assert slug("Several hosts: shared state in Redis") == "several-hosts-shared-state-in-redis"


def test_checker_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# A\n\n## Same\n\n## Same\n\n```sh\n# not a heading\n```\n\n"
        "[ok](#same-1) [ok](b.md#b-part) [`[[x]]`](#a) `[code](nowhere.md)`\n"
        "[bad anchor](#same-2) [bad file](c.md) [bad file anchor](b.md#nope)\n"
        "[outside](../../elsewhere.md) [in a fence](#not-a-heading) [web](https://example.com/x)\n"
    )
    (tmp_path / "docs" / "b.md").write_text("# B part\n")
    problems = broken_links(tmp_path / "docs" / "a.md", tmp_path)
    assert [p.split(": ")[1] for p in problems] == [
        "#same-2", "c.md", "b.md#nope", "../../elsewhere.md", "#not-a-heading",
    ], problems


def test_checker_reads_markers_and_indented_blocks(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "1. step\n   <!-- check: fragment -->\n\n   ```toml\n   [channels.a]\n   kind = \"file\"\n   ```\n"
        "<!-- check: skip (invalid on purpose) -->\n```toml\nnope\n```\n```toml\n[x]\n```\n"
    )
    blocks = toml_blocks(doc)
    assert [(b.line, b.marker, b.text) for b in blocks] == [
        (4, ("fragment", ""), '[channels.a]\nkind = "file"\n'),
        (9, ("skip", "(invalid on purpose)"), "nope\n"),
        (12, None, "[x]\n"),
    ]


# ---------------------------------------------------------------------------
# The guide itself
# ---------------------------------------------------------------------------


def test_docs_exist():
    names = {p.name for p in DOCS}
    assert "README.md" in names and len(DOCS) > 1, "docs/*.md is missing"


def test_readme_is_the_front_door():
    readme = REPO / "README.md"
    lines = readme.read_text().split("\n")
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    linked = {
        (readme.parent / t.partition("#")[0]).resolve()
        for _, t in links(readme)
        if not SCHEME.match(t) and t.partition("#")[0]
    }
    unlinked = [p.name for p in DOCS[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs not linked from README.md: {unlinked}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(doc):
    problems = broken_links(doc, REPO)
    assert not problems, "broken links:\n" + "\n".join(problems)


SNIPPETS = [b for doc in DOCS for b in toml_blocks(doc)]


def test_snippets_are_found():
    # The extraction itself must not silently find nothing.
    assert len(SNIPPETS) >= 10, [f"{b.path.name}:{b.line}" for b in SNIPPETS]
    for b in SNIPPETS:
        if b.marker:
            kind, rest = b.marker
            where = f"{b.path.relative_to(REPO)}:{b.line}"
            assert kind in ("fragment", "skip"), f"{where}: unknown marker check: {kind}"
            if kind == "skip":
                assert re.fullmatch(r"\(.+\)", rest), f"{where}: check: skip needs a (reason)"


def provide_secrets(doc: dict, folder: Path, env: dict[str, str]) -> None:
    """Sets every `*_env` variable and writes every file the config reads."""
    certs = None

    def cert_files():
        nonlocal certs
        if certs is None:
            certs = make_certs(folder / ".docs-test-certs")
        return certs

    def write(rel: str, content: bytes) -> None:
        p = Path(rel)
        if p.is_absolute():
            pytest.fail(f"a snippet reads the absolute path {rel}: use a relative one")
        p = folder / p
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        p.write_bytes(content)
        p.chmod(0o600)

    def walk(node) -> None:
        if isinstance(node, list):
            for x in node:
                walk(x)
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if isinstance(value, (dict, list)):
                walk(value)
            elif not isinstance(value, str):
                continue
            elif key.endswith("_env"):
                env[value] = REDIS_URL if key == "url_env" else SECRET
            elif key in ("ca_file", "tls_cert"):
                write(value, cert_files().ca_file.read_bytes() if key == "ca_file"
                      else cert_files().cert_file.read_bytes())
            elif key == "tls_key":
                write(value, cert_files().key_file.read_bytes())
            elif key.endswith("_file"):
                write(value, (REDIS_URL if key == "url_file" else SECRET).encode() + b"\n")

    walk(doc)


@pytest.mark.parametrize(
    "block", SNIPPETS, ids=lambda b: f"{b.path.relative_to(REPO)}:{b.line}"
)
def test_snippet_passes_check(block, tmp_path):
    kind = block.marker[0] if block.marker else None
    if kind == "skip":
        pytest.skip(f"marked check: skip {block.marker[1]}")
    text = block.text + (FRAGMENT_WRAPPER if kind == "fragment" else "")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        pytest.fail(f"{block.path.relative_to(REPO)}:{block.line}: not TOML: {e}\n{text}")
    env: dict[str, str] = {}
    provide_secrets(doc, tmp_path, env)
    cfg = tmp_path / "proxy.toml"
    cfg.write_text(text)
    cfg.chmod(0o600)
    p = run_cli(["-c", str(cfg), "check"], cwd=tmp_path, env=env)
    assert p.returncode == 0, (
        f"{block.path.relative_to(REPO)}:{block.line}: `mailgate check` refused the snippet"
        f"{' (completed as a fragment)' if kind == 'fragment' else ''}:\n{p.stderr}\n{text}"
    )


JSON_BLOCKS = [b for doc in DOCS for b in fenced(doc, "json")]


@pytest.mark.parametrize(
    "block", JSON_BLOCKS, ids=lambda b: f"{b.path.relative_to(REPO)}:{b.line}"
)
def test_json_example_parses(block):
    try:
        json.loads(block.text)
    except json.JSONDecodeError as e:
        pytest.fail(f"{block.path.relative_to(REPO)}:{block.line}: not JSON: {e}")
