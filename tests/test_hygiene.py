"""Committed files name no path of any machine (checkout, home, temp, system and user folders), no public
evaluation collection is committed (they are read from ``$LLAMA_RERANK_DATA``, never shipped), and Python files
spell optional and union types one way (README, Layout)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A path starts after a character that cannot be part of one (so base64 and URLs do not count).
START = r"(?<![\w.+/~-])"
# Folders that only exist on some machine: user homes, the superuser's home, temp folders, system-local trees
# (/opt, /mnt, /srv), Windows profiles.
COMMON = r"/(?:root|tmp|var/tmp|private/tmp|var/folders|opt|mnt|srv)/|/(?:home|Users)/[\w.-]+/|[A-Za-z]:\\+Users\\+"


def machine_pattern() -> re.Pattern[str]:
    """This machine's own paths (the checkout and its parents, HOME, the temp dir) plus the common prefixes."""
    here = {ROOT, *ROOT.parents, Path.home(), Path(tempfile.gettempdir())}
    here |= {path.resolve() for path in here}
    mine = sorted({str(p) for p in here if len(p.parts) > 1}, key=len, reverse=True)
    own = "|".join(re.escape(p) + r"(?![\w.-])" for p in mine)
    return re.compile(START + "(?:" + own + "|" + COMMON + ")")


def tracked_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return [ROOT / os.fsdecode(name) for name in filter(None, names) if (ROOT / os.fsdecode(name)).is_file()]


def tracked_text_files() -> list[Path]:
    return [path for path in tracked_files() if (data := path.read_bytes()) and b"\0" not in data[:8192]]


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
        "model at /opt/models/qwen.gguf",
        "mounted on /mnt/data/cranfield",
        "served from /srv/www/index.html",
        "/root/.cache/llama-rerank",
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


# The public collections (shared/README.md: "never commit them (or copies of them)"): their file names, and the
# sha256 of every file, so a renamed copy is caught too.
COLLECTION_NAMES = {"cran.all.1400", "cran.qry", "cranqrel", "cranqrel.readme", "corpus.jsonl", "queries.jsonl"}
COLLECTION_SHA256 = {
    "b234544b6ceccd131520df4a3cb6d42aee6576eb577933d047e722bbfe7b0b09",  # cranfield/cran.all.1400
    "bd65642599ac35409bd3941f37c171fb089bc290386863153d708f4394c9f344",  # cranfield/cran.qry
    "149999bde29b890eb046325222d35afdbea40f652afee17a1f774356cf8e0911",  # cranfield/cranqrel
    "8f4cb2e60ab2324bb3ad980bdc8b9cf6a9b98a08d097d90a351485dd6e25433f",  # cranfield/cranqrel.readme
}


def collection_files_in(paths: list[Path], known: set[str]) -> list[str]:
    """Paths among ``paths`` that are (copies of) collection files: by name, or by a sha256 in ``known``."""
    return [
        str(path.relative_to(ROOT))
        for path in paths
        if path.name in COLLECTION_NAMES or hashlib.sha256(path.read_bytes()).hexdigest() in known
    ]


def known_collection_hashes() -> set[str]:
    """The recorded hashes, plus those of every file of the collections present on this machine (CI has them)."""
    from llama_rerank.eval.datasets import data_root

    root = data_root()
    found = {hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()} if root else set()
    return COLLECTION_SHA256 | found


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_no_evaluation_collection_is_committed():
    committed = collection_files_in(tracked_files(), known_collection_hashes())
    assert not committed, f"public evaluation collections must not be committed (read them from $LLAMA_RERANK_DATA): {committed}"


def test_a_renamed_copy_of_a_collection_file_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cranqrel").write_text("1 184 2\n")
    copy = tmp_path / "abstracts.txt"
    copy.write_text("a collection file under another name\n")
    fine = tmp_path / "notes.md"
    fine.write_text("results derived from it\n")
    known = {hashlib.sha256(copy.read_bytes()).hexdigest()}
    assert collection_files_in([tmp_path / "data" / "cranqrel", copy, fine], known) == ["data/cranqrel", "abstracts.txt"]


OLD_UNION = re.compile(r"\b(?:Optional|Union)\[")


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_optional_and_union_types_are_spelled_with_a_bar():
    python = [path for path in tracked_files() if path.suffix == ".py"]
    assert any(path.name == "postprocessor.py" for path in python)
    old = [str(path.relative_to(ROOT)) for path in python if OLD_UNION.search(path.read_text(encoding="utf-8"))]
    assert not old, f"spell X | None and A | B, not with typing.Optional or typing.Union (README, Layout): {old}"
