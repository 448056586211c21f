"""Committed files name no path of the machine they were made on (checkout, home, temp folders, user folders)."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A path starts after a character that cannot be part of one (so base64 and URLs do not count).
START = r"(?<![\w.+/~-])"
# Folders that only exist on some machine: user homes, the superuser's home, temp folders, Windows profiles.
COMMON = r"/(?:root|tmp|var/tmp|private/tmp|var/folders)/|/(?:home|Users)/[\w.-]+/|[A-Za-z]:\\+Users\\+"


def machine_pattern() -> re.Pattern[str]:
    """This machine's own paths (the checkout and its parents, HOME, the temp dir) plus the common prefixes."""
    here = {ROOT, *ROOT.parents, Path.home(), Path(tempfile.gettempdir())}
    here |= {path.resolve() for path in here}
    mine = sorted({str(p) for p in here if len(p.parts) > 1}, key=len, reverse=True)
    own = "|".join(re.escape(p) + r"(?![\w.-])" for p in mine)
    return re.compile(START + "(?:" + own + "|" + COMMON + ")")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    files = []
    for name in filter(None, names):
        path = ROOT / os.fsdecode(name)
        data = path.read_bytes() if path.is_file() else b""
        if data and b"\0" not in data[:8192]:
            files.append(path)
    return files


PATH_END = re.compile(r"[\s'\"`),]")


def machine_paths_in(text: str, pattern: re.Pattern[str]) -> list[str]:
    """``line N: PATH`` for each machine path in ``text``."""
    found = []
    for m in pattern.finditer(text):
        end = PATH_END.search(text, m.start())
        found.append(f"line {text.count(chr(10), 0, m.start()) + 1}: {text[m.start():end.start() if end else None]}")
    return found


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_no_committed_text_file_names_a_machine_path():
    pattern = machine_pattern()
    files = [path for path in tracked_text_files() if path != Path(__file__).resolve()]  # this file's examples
    assert any(p.name == "README.md" for p in files)
    leaks = {
        str(path.relative_to(ROOT)): found
        for path in files
        if (found := machine_paths_in(path.read_text(encoding="utf-8", errors="replace"), pattern))
    }
    assert not leaks, f"absolute machine paths committed (make them relative or drop them): {leaks}"


@pytest.mark.parametrize(
    "text",
    [
        f"store: {ROOT / 'x'}",
        f'"cache": "{Path.home() / ".cache" / "llama-rerank"}"',
        f"see {ROOT.parent}/shared/data",
        "wrote /tmp/run/results.json",
        "(/home/alice/project/data)",
        "C:\\Users\\bob\\data",
        "`/Users/carol/x`",
    ],
)
def test_machine_paths_are_found(text):
    assert machine_paths_in(text, machine_pattern())


@pytest.mark.parametrize(
    "text",
    [
        "data/cranfield/cran.all.1400",
        "../data/cranfield",
        "see llama_index/workflows and /v1/chat/completions",
        "iVBORw0KGgo/tmp/AAAA+/root/x",  # base64 in a stored image
        "https://github.com/llama-rerank/llama-rerank",
        "~/.cache/llama-rerank",
    ],
)
def test_portable_text_is_not_flagged(text):
    assert not machine_paths_in(text, machine_pattern())
