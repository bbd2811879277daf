"""Project rules that are easy to break: generated code in sync, no torch on the serving path,
a README whose commands a newcomer can run."""

from __future__ import annotations

import ast
import ipaddress
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_protobuf_code_matches_the_proto_sources() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tools.protogen", "--check"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_serving_path_never_imports_torch() -> None:
    code = (
        "import sys, service.app, service.__main__, service.core.dataplane, service.protocol.mcdropout_servicer; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'onnxscript', 'export'}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"serving imported {result.stdout} {result.stderr}"


def test_readme_points_to_the_settings_table() -> None:
    """The table itself is docs/settings.md, checked against Settings in test_settings.py."""
    assert "docs/settings.md" in (ROOT / "README.md").read_text()


# ---- The README: a newcomer runs its commands in order on a fresh clone. Running them all is
# too slow for the suite (installs, training, a server); these check what can go wrong without
# running anything: the make targets and files it names, its links, its addresses, its commands.

README = ROOT / "README.md"
MAX_README_LINES = 300
#: Docs that other engineers are writing: linked already, allowed to be missing until they land.
#: Remove an entry once its file exists (test_pending_docs_are_still_missing says when).
PENDING_DOCS: set[str] = set()
#: Host names the docs may use for servers other than the loopback ones.
PLACEHOLDER_HOSTS = {"my-server"}
_FENCE = re.compile(r"^```[^\n]*\n.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
_BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_IPV4 = re.compile(r"(?<![\w.])(\d{1,3}(?:\.\d{1,3}){3})(?![\w.])")
_HOST_PORT = re.compile(r"(?<![\w./-])([A-Za-z][\w.-]*):(\d{2,5})\b")
#: Plaintext service URLs (http://host/metrics); https links to documentation are fine.
_URL_HOST = re.compile(r"\bhttp://([^/\s:)\"'`]+)")
_BARE_COMMAND = re.compile(r"^(?:python3?(?:\.\d+)?|pip3?)(?:\s|$)")
_HEREDOC = re.compile(r"<<-?\s*'?(\w+)'?")


def bash_blocks(text: str) -> list[str]:
    """The bodies of the ```bash blocks."""
    return _BASH_BLOCK.findall(text)


def inline_spans(text: str) -> list[str]:
    """Inline code spans outside fenced blocks."""
    return _INLINE.findall(_FENCE.sub("", text))


def shell_commands(block: str) -> tuple[list[str], list[str]]:
    """Split a bash block into simple commands and heredoc bodies.

    Returns:
        (commands, heredocs): each command as written (continuation lines joined, split on
        pipes, ``&&``, ``||``, ``;`` and ``$(``), each heredoc body as one string.
    """
    commands: list[str] = []
    heredocs: list[str] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i]
        i += 1
        code = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        for part in re.split(r"\|\||&&|\||;|\$\(", code):
            if part.strip():
                commands.append(part.strip())
        marker = _HEREDOC.search(code)
        if marker:
            body: list[str] = []
            while i < len(lines) and lines[i].strip() != marker.group(1):
                body.append(lines[i])
                i += 1
            i += 1  # the end marker
            heredocs.append("\n".join(body))
    return commands, heredocs


def make_targets() -> set[str]:
    """Every target the Makefile defines (rules, not variable assignments)."""
    targets: set[str] = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.$()/ -]+?)\s*:(?![=:])", line)
        if match and not line.startswith("\t"):
            targets.update(match.group(1).split())
    return targets


def readme_make_targets(text: str) -> set[str]:
    """The targets of every ``make ...`` command in the README's code (blocks and spans)."""
    commands = [c for block in bash_blocks(text) for c in shell_commands(block)[0]]
    commands += inline_spans(text)
    found: set[str] = set()
    for command in commands:
        if command.split()[0] != "make":
            continue
        words = shlex.split(command)  # RUN_FLAGS="--a b" is one word
        found.update(w for w in words[1:] if not w.startswith("-") and "=" not in w)
    return found


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a document's headings (lower case, punctuation dropped, spaces to
    hyphens; a repeated heading gets -1, -2, ...)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in _FENCE.sub("", markdown).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(document: Path) -> list[str]:
    """Relative links of a markdown file whose target (or heading anchor) does not exist."""
    text = document.read_text()
    broken = []
    for target in _LINK.findall(_FENCE.sub("", text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (document.parent / path_part).resolve() if path_part else document
        name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
        if not path.exists():
            if name not in PENDING_DOCS:
                broken.append(f"{target} (no {name})")
            continue
        if anchor and path.suffix == ".md" and anchor not in heading_anchors(path.read_text()):
            broken.append(f"{target} (no heading #{anchor} in {name})")
    return broken


def tracked_markdown() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def test_readme_is_at_most_300_lines() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: move details to docs/"


def test_every_make_target_the_readme_names_exists() -> None:
    named = readme_make_targets(README.read_text())
    assert {"run", "test"} <= named, f"the two commands are missing from the README: {named}"
    missing = sorted(named - make_targets())
    assert not missing, f"README.md names make targets the Makefile lacks: {missing}"


def test_every_file_the_readme_names_exists() -> None:
    text = README.read_text()
    top_level = {p.name for p in ROOT.iterdir()} - {".venv"}
    words = inline_spans(text) + [w for block in bash_blocks(text) for w in block.split()]
    candidates = {w.strip("\"'`,.;:()") for span in words for w in span.split()}
    paths = sorted(
        c
        for c in candidates
        if "/" in c and c.split("/")[0] in top_level and not re.search(r"[<>*{}$]", c)
    )
    assert "examples/predict.py" in paths  # the check sees the paths (one is known)
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README.md names files that do not exist: {missing}"


def test_every_relative_link_of_the_docs_resolves() -> None:
    documents = tracked_markdown()
    assert README in documents
    assert ROOT / "docs" / "api.md" in documents
    broken = {d.relative_to(ROOT).as_posix(): broken_links(d) for d in documents}
    broken = {name: links for name, links in broken.items() if links}
    assert not broken, f"links to missing files or headings: {broken}"


def test_pending_docs_are_still_missing() -> None:
    """A pending doc that exists is checked like any other: take it off PENDING_DOCS."""
    landed = sorted(name for name in PENDING_DOCS if (ROOT / name).exists())
    assert not landed, f"{landed} exist now: remove them from PENDING_DOCS"


def test_the_readme_uses_only_loopback_or_placeholder_addresses() -> None:
    text = README.read_text()
    wrong = [a for a in _IPV4.findall(text) if not ipaddress.ip_address(a).is_loopback]
    hosts = [h for h, _ in _HOST_PORT.findall(text)] + _URL_HOST.findall(text)
    wrong += [
        h for h in hosts if h not in PLACEHOLDER_HOSTS | {"localhost"} and not _IPV4.fullmatch(h)
    ]
    assert "127.0.0.1" in _IPV4.findall(text)  # the check sees the addresses
    assert not wrong, f"README.md names non-loopback addresses: {wrong}"


def test_the_readme_runs_python_and_pip_from_the_venv() -> None:
    """Bare ``python`` / ``pip`` would run whatever is on the PATH, not the project's .venv."""
    text = README.read_text()
    commands = [c for block in bash_blocks(text) for c in shell_commands(block)[0]]
    commands += [span for span in inline_spans(text) if " " in span]
    assert any(c.startswith(".venv/bin/python") for c in commands)
    bare = [c for c in commands if _BARE_COMMAND.match(c)]
    assert not bare, f"README.md runs python or pip outside .venv: {bare}"


def test_the_readme_python_snippets_parse() -> None:
    snippets = [h for block in bash_blocks(README.read_text()) for h in shell_commands(block)[1]]
    assert snippets, "no heredoc found: the parser of the README's commands is broken"
    for snippet in snippets:
        ast.parse(snippet)
