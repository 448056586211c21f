"""Packaging: the LlamaIndex import path, the extras in pyproject.toml, and the error that names a missing extra.

A missing package is simulated with ``sys.modules[name] = None`` (what Python does for a blocked import). The base
distribution installed on its own is checked for real by ``make test-base`` (tests/base_install_check.py).
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

from llama_rerank import LikelihoodRerank, LlamaRerankError
from llama_rerank._extras import MissingExtraError, require

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def block(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_llama_index_import_path():
    from llama_index.postprocessor.likelihood_rerank import LikelihoodRerank as FromLlamaIndex

    assert FromLlamaIndex is LikelihoodRerank
    assert 'import_path = "llama_index.postprocessor.likelihood_rerank"' in PYPROJECT  # [tool.llamahub]
    assert re.search(r"^\[tool\.llamahub\.class_authors\]\nLikelihoodRerank = ", PYPROJECT, flags=re.M)
    # llama_index and llama_index.postprocessor are namespace packages shared with llama-index-core
    assert not (ROOT / "llama_index" / "__init__.py").exists()
    assert not (ROOT / "llama_index" / "postprocessor" / "__init__.py").exists()


def test_all_installs_every_extra_and_the_licence_ships():
    meta = metadata.metadata("llama-rerank")
    extras = set(meta.get_all("Provides-Extra"))
    assert {"chroma", "openai", "local", "eval", "notebooks", "test", "all"} <= extras
    (everything,) = [r for r in meta.get_all("Requires-Dist") if r.endswith('extra == "all"')]
    named = re.match(r"llama-rerank\[([\w,]+)\]", everything).group(1).split(",")
    assert set(named) == extras - {"all"}
    assert meta["License-Expression"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_require_names_the_extra(monkeypatch):
    assert require("json", "chroma") is sys.modules["json"]
    block(monkeypatch, "chromadb")
    with pytest.raises(MissingExtraError, match=r"chromadb cannot be imported .*: pip install 'llama-rerank\[chroma\]'") as info:
        require("chromadb", "chroma")
    assert isinstance(info.value, ImportError) and isinstance(info.value, LlamaRerankError) and info.value.extra == "chroma"


def test_store_without_chroma_names_the_extra_and_writes_nothing(monkeypatch, tmp_path):
    from llama_index.core.embeddings import MockEmbedding

    from llama_rerank import store

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("Wing loading sets the stall speed.", encoding="utf-8")
    block(monkeypatch, "chromadb")
    with pytest.raises(ImportError, match=r"pip install 'llama-rerank\[chroma\]'"):
        store.ingest(tmp_path / "docs", tmp_path / "store", MockEmbedding(embed_dim=8), progress=False)
    assert not (tmp_path / "store").exists()
    block(monkeypatch, "llama_index.vector_stores.chroma")
    with pytest.raises(ImportError, match=r"\[chroma\]"):
        store.load_index(tmp_path / "store", MockEmbedding(embed_dim=8))


def test_openai_llms_without_their_extra(monkeypatch):
    from llama_rerank import pipeline

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    block(monkeypatch, "llama_index.llms.openai", "llama_index.llms.openai_like")
    for spec in ("openai:gpt-4o-mini", "http://127.0.0.1:9/v1"):
        with pytest.raises(ImportError, match=r"pip install 'llama-rerank\[openai\]'"):
            pipeline.make_llm(spec)


def test_local_runtime_without_its_extra(monkeypatch):
    from llama_rerank.runtime import local_llm

    block(monkeypatch, "llama_index.llms.openai_like")
    with pytest.raises(ImportError, match=r"pip install 'llama-rerank\[local\]'"):
        local_llm()


def test_eval_without_its_extra(monkeypatch):
    from llama_rerank.eval import metrics, report

    block(monkeypatch, "ir_measures", "matplotlib.figure")
    with pytest.raises(ImportError, match=r"ir_measures .*\[eval\]"):
        metrics.per_query({"q": ["d"]}, {"q": {"d": 1}}, 10)
    with pytest.raises(ImportError, match=r"matplotlib.figure .*\[eval\]"):
        report.plot(Path("unused.png"), {}, 10, "tiny")


def test_cli_names_the_missing_extra_in_one_line(monkeypatch, tmp_path, capsys):
    from llama_rerank.cli import main

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("Wing loading sets the stall speed.", encoding="utf-8")
    block(monkeypatch, "chromadb")
    assert main(["ingest", str(tmp_path / "docs"), "--store", str(tmp_path / "store")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("MissingExtraError: ") and "pip install 'llama-rerank[chroma]'" in err[0]
