"""The docs refer only to files that exist (links, anchors, backticked repo paths), and
their Python examples compile.

Covers README.md, CHANGELOG.md and docs/*.md (``make docs`` checks the site's own links
again with mkdocs --strict; this also covers the README and paths in backticks).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("**/*.md")])
# written by `make demo` / the node at run time, not part of the repository
GENERATED = ("results/", "data/", "build/", ".venv/")
# where a path in backticks may be relative to
BASES = ("", "src/", "src/gridfl/", "tests/", "docs/")

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"`([^`\s]+)`")
PATHLIKE = re.compile(r"^[\w.-]+(/[\w.-]+)*/?$")
FILE_EXT = re.compile(r"\.(py|md|toml|txt|yml|yaml|json|js|cfg|ini|png|sh)$")


def _slug(heading: str) -> str:
    """The anchor GitHub and mkdocs' toc give a heading (for the headings used here)."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"\s+", "-", text).strip("-")


def _anchors(md: Path) -> set[str]:
    body = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", body, flags=re.M)}


def _prose(md: Path) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"```.*?```", "", md.read_text(), flags=re.S)


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md: Path) -> None:
    broken = []
    for target in LINK.findall(_prose(md)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT)}")
        elif (anchor and dest.suffix == ".md" and "reference" not in dest.parts
              and anchor not in _anchors(dest)):
            # (the API reference's anchors exist only in the built site: `make docs`
            # checks those)
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
        elif not dest.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
    assert not broken, f"{md.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def _exists(ref: str) -> bool:
    ref = ref.rstrip("/")
    if "/" not in ref:  # a bare file name: somewhere in the repository's sources
        return any(ROOT.glob(f"src/**/{ref}")) or any(ROOT.glob(f"tests/**/{ref}")) \
            or any(ROOT.glob(f"benchmarks/{ref}")) or (ROOT / ref).exists()
    return any((ROOT / base / ref).exists() for base in BASES)


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_backticked_paths_exist(md: Path) -> None:
    missing = []
    for ref in CODE.findall(_prose(md)):
        if not PATHLIKE.match(ref) or ref.startswith(GENERATED):
            continue
        # a bare name is a source file (test_x.py); other bare names (bundle.json,
        # results.json) are files gridfl writes
        is_file = FILE_EXT.search(ref) is not None and ("/" in ref or ref.endswith(".py"))
        is_dir = "/" in ref and ref.split("/", 1)[0] in {
            "src", "tests", "benchmarks", "docs", "scripts", ".ci"}
        if (is_file or is_dir) and not _exists(ref):
            missing.append(ref)
    assert not missing, f"{md.relative_to(ROOT)} names files not in the repository: {missing}"


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_compile(md: Path) -> None:
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", md.read_text(), re.S)):
        compile(block, f"{md.relative_to(ROOT)}, python block {i + 1}", "exec")
