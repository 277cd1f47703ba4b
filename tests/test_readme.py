"""The README's file tree is the map a newcomer reads: every module is on it, and everything on it exists."""
from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _listed() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Files\n.*?```\n(.*?)```", text, re.S).group(1)
    return [line.split()[0] for line in block.splitlines() if line.strip()]


def test_everything_listed_exists():
    missing = [p for p in _listed() if not (ROOT / p).exists()]
    assert not missing, f"README lists paths that do not exist: {missing}"


def test_every_module_and_top_level_test_is_listed():
    listed = set(_listed())
    modules = [p.relative_to(ROOT).as_posix() for p in (ROOT / "nanoseek").rglob("*.py")]
    unlisted = [m for m in modules if m not in listed and not m.endswith("/__init__.py")]
    unlisted += [m for m in modules if m.endswith("/__init__.py") and m.count("/") == 1 and m not in listed]
    tests = [p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("*.py") if p.name != "__init__.py"]
    unlisted += [t for t in tests if t not in listed]
    dirs = {p.parent.relative_to(ROOT).as_posix() + "/" for p in (ROOT / "tests").glob("*/test_*.py")}
    unlisted += sorted(d for d in dirs if d not in listed)
    assert not unlisted, f"README's file tree misses: {unlisted}"
