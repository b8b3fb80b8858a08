"""The repository documents itself: docs/ exists, the files it names exist, and no tracked file
points outside the repository."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["docs/design.md", "docs/adding-an-op.md"]
# References to notes that live outside the repository.
OUTSIDE = ["../shared", "DESIGN.md", "shared/seeds"]


def test_docs_exist() -> None:
    for doc in DOCS:
        assert (ROOT / doc).is_file(), doc


def test_paths_named_in_docs_exist() -> None:
    """Every repository path written in backquotes in docs/ or README.md exists (placeholders
    such as ``csrc/<family>/`` and build or demo outputs excepted)."""
    missing = []
    for doc in [*DOCS, "README.md"]:
        for token in re.findall(r"`([^`\s]+)`", (ROOT / doc).read_text()):
            path = token.split(":")[0].rstrip(".,")
            placeholder = any(c in path for c in "<>*{}$=(")
            if "/" not in path or placeholder or path.startswith(("build/", "examples/out")):
                continue
            if path.split("/")[0] not in {
                "csrc",
                "cnnext",
                "tests",
                "docs",
                "benchmarks",
                "tools",
                "examples",
            }:
                continue
            if not (ROOT / path).exists():
                missing.append(f"{doc}: {path}")
    assert not missing, missing


def test_no_file_points_outside_the_repository() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    found = []
    for name in files:
        path = ROOT / name
        if name == "tests/test_docs.py" or not path.is_file() or path.stat().st_size > 1 << 20:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{name}: {needle}" for needle in OUTSIDE if needle in text]
    assert not found, found
