"""The registry of systems an evaluation compares: a name -> ``factory(llm, top_k, **params)``.

A factory returns a LlamaIndex node postprocessor that reorders the K first-stage candidates (``top_n = K``, so the
whole reranked list is scored), or ``None`` for the first-stage order itself. A system spec is ``name`` or
``name:key=value,key=value``; the parameters go to the factory as keyword arguments (for the likelihood systems,
``LikelihoodRerank`` fields such as ``window_size=1,retrieval_weight=0.7``). Values are read as JSON when they
parse (numbers, ``true``, ``null``) and as text otherwise. To add a system, add an entry to ``SYSTEMS``.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from llama_index.core.llms import LLM
from llama_index.core.postprocessor.types import BaseNodePostprocessor

from llama_rerank._extras import require
from llama_rerank.eval import EvalError
from llama_rerank.postprocessor import LikelihoodRerank

FIRST_STAGE = "first-stage"

Factory = Callable[..., BaseNodePostprocessor | None]


def _likelihood(llm: LLM, top_k: int, **params: Any) -> LikelihoodRerank:
    unknown = sorted(k for k in params if k not in LikelihoodRerank.model_fields or k in ("llm", "top_n"))
    if unknown:
        raise EvalError(f"LikelihoodRerank has no settable field {', '.join(unknown)}")
    return LikelihoodRerank(llm=llm, top_n=top_k, **params)


def _llm_rerank(llm: LLM, top_k: int) -> BaseNodePostprocessor:
    from llama_index.core.postprocessor import LLMRerank

    return LLMRerank(llm=llm, top_n=top_k, choice_batch_size=10)


def _rankgpt(llm: LLM, top_k: int) -> BaseNodePostprocessor:
    return require("llama_index.postprocessor.rankgpt_rerank", "eval").RankGPTRerank(llm=llm, top_n=top_k)


SYSTEMS: dict[str, Factory] = {
    FIRST_STAGE: lambda llm, top_k: None,
    "likelihood": _likelihood,
    "likelihood-label": lambda llm, top_k, **params: _likelihood(llm, top_k, **{"scoring": "label", **params}),
    "llm-rerank": _llm_rerank,
    "rankgpt": _rankgpt,
}


def split_systems(text: str) -> list[str]:
    """Split a ``--systems`` value on commas; a ``key=value`` piece continues the previous system's parameters."""
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if "=" in piece and ":" not in piece.split("=", 1)[0] and specs:
            specs[-1] += "," + piece
        elif piece:
            specs.append(piece)
    if not specs:
        raise EvalError("no systems given: use e.g. --systems first-stage,likelihood")
    return specs


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``'likelihood:window_size=1,scoring=label'`` -> ``('likelihood', {'window_size': 1, 'scoring': 'label'})``."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in SYSTEMS:
        raise EvalError(f"unknown system {name!r}: use one of {', '.join(SYSTEMS)}")
    params: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise EvalError(f"system {spec!r}: parameters are key=value, got {item!r}")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value.strip()
    return name, params


def canonical(spec: str) -> str:
    """One spelling per configuration (parameters sorted)."""
    name, params = parse_spec(spec)
    return name + (":" + json.dumps(params, sort_keys=True) if params else "")


def needs_llm(spec: str) -> bool:
    return parse_spec(spec)[0] != FIRST_STAGE


def effective(spec: str, defaults: dict[str, Any]) -> str:
    """``spec`` with ``defaults`` (e.g. the local model's tuned settings) under its own parameters, for the
    ``likelihood`` systems; this spelling is what the cache keys on."""
    name, params = parse_spec(spec)
    if not name.startswith("likelihood") or not defaults:
        return canonical(spec)
    return name + ":" + json.dumps({**defaults, **params}, sort_keys=True)


def build(spec: str, llm: LLM | None, top_k: int, defaults: dict[str, Any] | None = None) -> BaseNodePostprocessor | None:
    """The postprocessor for ``spec`` (``None`` for the first stage); a bad parameter raises ``EvalError``."""
    name, params = parse_spec(spec)
    if name.startswith("likelihood"):
        params = {**(defaults or {}), **params}
    try:
        return SYSTEMS[name](llm, top_k, **params)
    except (TypeError, ValueError) as exc:
        raise EvalError(f"system {spec!r}: {exc}") from exc
