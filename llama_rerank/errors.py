"""The exceptions llama-rerank raises, in one tree.

    LlamaRerankError            base of everything below; the CLI catches it
    ├── ScaleError (ValueError) a label scale that cannot work (duplicates, empty names, values outside [0, 1])
    ├── RerankLLMError          the LLM failed for a window after every retry, and on_error="raise"
    ├── LLMConfigError          the LLM refused a request in a way no retry fixes (bad key, unknown model, ...);
    │                           raised whatever on_error says
    ├── StoreError              a vector store or input folder that cannot be used (ingest, query)
    ├── MissingExtraError       (in ``llama_rerank._extras``, also an ImportError) a feature's extra is not installed
    └── EvalError               (in ``llama_rerank.eval``) a dataset, system spec or option ``eval`` cannot use
"""

from __future__ import annotations


class LlamaRerankError(Exception):
    """Base class of every error raised on purpose by llama-rerank."""


class ScaleError(LlamaRerankError, ValueError):
    """A label scale that is malformed; the message says which rule it breaks."""


class RerankLLMError(LlamaRerankError):
    """The LLM failed for a window after all retries and ``on_error="raise"`` was asked for."""


class LLMConfigError(LlamaRerankError):
    """The LLM refused a request with HTTP 400/401/403/404/422: a misconfiguration no retry can fix.

    Raised whatever ``on_error`` says, because a reranker that quietly keeps retrieval order would look like one
    that works. The message names the model, what the provider said and the fix; ``__cause__`` is the original.
    """


class StoreError(LlamaRerankError):
    """A store location or an input folder that cannot be used; the message says how to fix it."""
