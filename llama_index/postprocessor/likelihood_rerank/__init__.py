"""LlamaIndex's import path for llama-rerank: ``from llama_index.postprocessor.likelihood_rerank import LikelihoodRerank``."""

from llama_rerank import LikelihoodRerank

__all__ = ["LikelihoodRerank"]
