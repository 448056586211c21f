"""llama-rerank: listwise likelihood-label LLM reranking for LlamaIndex.

The public surface is pinned by ``tests/test_public_api.py``; everything else is internal.
"""

from llama_rerank.errors import LLMConfigError, LlamaRerankError, RerankLLMError, ScaleError, StoreError
from llama_rerank.labels import DEFAULT_SCALE, LabelScale
from llama_rerank.postprocessor import LikelihoodRerank, RerankResult
from llama_rerank.types import RerankUsage

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SCALE",
    "LabelScale",
    "LikelihoodRerank",
    "LLMConfigError",
    "LlamaRerankError",
    "RerankLLMError",
    "RerankResult",
    "RerankUsage",
    "ScaleError",
    "StoreError",
    "__version__",
]
