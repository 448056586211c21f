"""Optional dependencies: each feature beyond ``LikelihoodRerank`` imports its packages where it uses them, and a
missing one raises ``MissingExtraError`` naming the extra that installs it (``pip install 'llama-rerank[chroma]'``).

Extras (pyproject.toml): ``chroma`` (store, CLI, file readers), ``openai`` (OpenAI and OpenAI-compatible LLMs),
``local`` (bundled model, llama.cpp server, ONNX embeddings), ``langchain`` (the LangChain adapter), ``eval``,
``notebooks``, ``test``, ``all``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from llama_rerank.errors import LlamaRerankError


class MissingExtraError(LlamaRerankError, ImportError):
    """A feature's optional dependency is not installed; the message ends with the ``pip install`` that fixes it."""

    def __init__(self, what: str, extra: str) -> None:
        super().__init__(f"{what}: pip install 'llama-rerank[{extra}]'")
        self.extra = extra


def require(module: str, extra: str) -> ModuleType:
    """Import ``module``, or raise ``MissingExtraError`` naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f"{module} cannot be imported ({exc})", extra) from exc
