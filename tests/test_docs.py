"""The README and ``docs/`` stay true to the repository (issue 25: a README that is a guide).

Checked from the text of ``README.md``, ``docs/*.md`` and ``bench/README.md``:

* ``README.md`` has at most 250 lines (reference material belongs in ``docs/``);
* every relative link resolves to a file or folder inside the repository, and a ``#anchor`` to a
  heading of the linked Markdown file (anchors as GitHub makes them);
* every ``t2dist`` subcommand (``t2dist.cli.main.COMMANDS``) has a row in the README's commands
  table, and the table lists no command that does not exist;
* every repository path written in inline backticks (``t2dist/...``, ``actors/...``, ``learner/...``,
  ``configs/...``, ``bench/...``, ``scripts/...``, ``tests/...``, ``docs/...``; ``*`` as a glob)
  exists. Fenced code blocks are not checked: they hold commands with placeholders.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from t2dist.cli.main import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 250
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
PATH_PREFIXES = ("t2dist", "actors", "learner", "configs", "bench", "scripts", "tests", "docs")

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`((?:[^`\n]|\n(?!\s*\n))+)`")  # a code span may wrap a line, not a paragraph
REPO_PATH = re.compile(r"(?<![\w./~-])((?:%s)/[\w./*-]*)" % "|".join(PATH_PREFIXES))
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The page without its fenced code blocks (kept as blank lines, so line numbers stay)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[`*]|<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(_prose(page.read_text())):
        a = anchor(m.group(2))
        n = seen.get(a, 0)
        seen[a] = n + 1
        out.add(a if n == 0 else f"{a}-{n}")
    return out


def _where(page: Path, text: str, pos: int, root: Path) -> str:
    return f"{page.relative_to(root)}:{text.count(chr(10), 0, pos) + 1}"


def link_problems(page: Path, root: Path = ROOT) -> list[str]:
    """Every relative link of ``page`` that does not resolve inside the repository, or names a missing heading."""
    text = _prose(page.read_text())
    problems = []
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file_part, _, frag = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        where = _where(page, text, m.start(), root)
        if not dest.is_relative_to(root):
            problems.append(f"{where}: link {target!r} leaves the repository")
        elif not dest.exists():
            problems.append(f"{where}: link {target!r}: no such file {dest.relative_to(root)}")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            problems.append(f"{where}: link {target!r}: no heading #{frag} in {dest.relative_to(root)}")
    return problems


def path_problems(page: Path, root: Path = ROOT) -> list[str]:
    """Every repository path in inline backticks of ``page`` that does not exist."""
    text = _prose(page.read_text())
    problems = []
    for code in INLINE_CODE.finditer(text):
        for m in REPO_PATH.finditer(code.group(1)):
            path = m.group(1).rstrip(".,:;")
            found = list(root.glob(path.rstrip("/"))) if "*" in path else [root / path] if (root / path).exists() else []
            if not found:
                problems.append(f"{_where(page, text, code.start(), root)}: `{path}` does not exist")
    return problems


def readme_table_commands(text: str) -> set[str]:
    """The subcommands named in the first cell of the README's commands table."""
    section = re.search(r"^## Commands\n(.*?)(?=^## )", text, re.M | re.S)
    assert section, "README.md has no '## Commands' section"
    rows = [line for line in section.group(1).splitlines() if line.startswith("| `t2dist ")]
    return {re.match(r"\| `t2dist ([\w-]+)", row).group(1) for row in rows}


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move reference material to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    problems = link_problems(page)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_backticked_paths_exist(page):
    problems = path_problems(page)
    assert not problems, "\n".join(problems)


def test_commands_table_lists_every_command():
    listed = readme_table_commands(README.read_text())
    assert sorted(set(COMMANDS) - listed) == [], "t2dist commands missing from README's commands table"
    assert sorted(listed - set(COMMANDS)) == [], "README's commands table names commands t2dist does not have"


def test_checks_catch_what_they_should(tmp_path):
    """The checkers themselves: a broken link, a missing anchor, a missing path and a missing command fail."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "t2dist").mkdir()
    (tmp_path / "t2dist" / "real.py").write_text("")
    (tmp_path / "docs" / "b.md").write_text("# Two words: here\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/b.md#two-words-here) [gone](docs/c.md) [anchor](docs/b.md#nope) "
                    "[out](../x.md) [web](https://example.com)\n`t2dist/real.py` `t2dist/fake.py` `see\nt2dist/wrapped.py`\n"
                    "```\n[in a block](nowhere.md) `t2dist/also-fake.py`\n```\n")
    links = link_problems(page, tmp_path)
    assert len(links) == 3 and "docs/c.md" in links[0] and "#nope" in links[1] and "leaves" in links[2], links
    assert path_problems(page, tmp_path) == ["README.md:2: `t2dist/fake.py` does not exist",
                                             "README.md:2: `t2dist/wrapped.py` does not exist"]
    table = "## Commands\n\n| command | what |\n| --- | --- |\n| `t2dist train --config F` | x |\n\n## Next\n"
    assert readme_table_commands(table) == {"train"}
    assert anchor("`hf`: the model (default)") == "hf-the-model-default"
