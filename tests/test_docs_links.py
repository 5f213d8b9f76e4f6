"""Every link in README.md, docs/*.md and benchmarks/*.md leads somewhere.

A relative link must name a file of the repository; a `#anchor` must match a heading of the
page it points to, under GitHub's rules for heading ids. Script paths that the documents name
(`examples/...`, `benchmarks/...`, `tests/...`) must exist too. No network: links to other
sites are not followed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "benchmarks").glob("*.md")),
]

_FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", flags=re.M)
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", flags=re.M)
_SCRIPT = re.compile(r"(?<![\w./$-])((?:examples|benchmarks|tests)/[\w./*-]*\.(?:py|sh))")


def slug(heading: str) -> str:
    """GitHub's id for a heading: its text lowercased, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The ids of a page's headings (a repeated one gets -1, -2, ...) and its explicit anchors."""
    text = path.read_text(encoding="utf-8")
    ids, seen = set(), {}
    for _, heading in _HEADING.findall(_FENCE.sub("", text)):
        base = slug(heading)
        n = seen.get(base, 0)
        ids.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    ids.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
    return ids


def broken_links(path: Path) -> list[str]:
    """'target: why' for every relative link of a Markdown file that does not resolve."""
    prose = _INLINE_CODE.sub("", _FENCE.sub("", path.read_text(encoding="utf-8")))
    problems = []
    for target in _LINK.findall(prose) + _REFERENCE.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I):  # https:, mailto:, ...
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            problems.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{target}: no heading of {linked.name} has the id {anchor!r}")
    return problems


def missing_scripts(path: Path) -> list[str]:
    """Paths of scripts and tests that a document names but the repository lacks."""
    text = path.read_text(encoding="utf-8")
    return sorted({p for p in _SCRIPT.findall(text) if not list(ROOT.glob(p))})


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("path", DOCUMENTS, ids=_name)
def test_every_link_resolves(path):
    assert broken_links(path) == [], f"broken links in {_name(path)}"


@pytest.mark.parametrize("path", DOCUMENTS, ids=_name)
def test_every_named_script_exists(path):
    assert missing_scripts(path) == [], f"{_name(path)} names scripts that do not exist"


def test_the_documents_are_found_and_link_to_each_other():
    names = {_name(p) for p in DOCUMENTS}
    assert {"README.md", "docs/performance.md", "benchmarks/README.md"} <= names
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    # The README links every docs page, so the pages are reachable from the front page.
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


@pytest.mark.parametrize(
    "heading, expected",
    [
        ("Captured steps (`tm.capture`)", "captured-steps-tmcapture"),
        ("Adam's step (2026-12-03)", "adams-step-2026-12-03"),
        ("Robot control: meta-reinforcement learning", "robot-control-meta-reinforcement-learning"),
        ("The [viewer](docs/x.md) and `to_dot`", "the-viewer-and-to_dot"),
        ("W1-W4 -- vs PyTorch", "w1-w4----vs-pytorch"),
    ],
)
def test_slug_follows_githubs_rules(heading, expected):
    assert slug(heading) == expected


def test_a_broken_link_or_anchor_is_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Usage\n\n## Usage\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\nGood: [a](other.md), [b](other.md#usage), [c](other.md#usage-1), "
        "[d](#page), [e](https://example.org/x#y), `[not a link](gone.md)`.\n\n"
        "Bad: [f](gone.md), [g](other.md#install), [h](#nowhere), ![i](images/none.png).\n\n"
        "```md\n[inside code](gone-too.md)\n```\n",
        encoding="utf-8",
    )
    reported = [p.split(":")[0] for p in broken_links(page)]
    assert reported == ["gone.md", "other.md#install", "#nowhere", "images/none.png"]
