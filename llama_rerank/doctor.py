"""``check-llm``: what an LLM supports, found with one tiny rerank (and one with structured output, where offered).

It reports whether the LLM answered, whether its replies carried usable logprobs, whether it takes a JSON schema,
whether it is a reasoning model and what the reranker adapted (the adapter's record,
:attr:`~llama_rerank.adapters.Adapter.adaptations`), the latency and tokens per candidate, and the settings the
reranker will use with it. A refused request ends in :class:`~llama_rerank.errors.LLMConfigError`.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from llama_index.core.llms import LLM
from llama_index.core.schema import NodeWithScore, TextNode

from llama_rerank.postprocessor import LikelihoodRerank, RerankResult
from llama_rerank.providers import model_identity

QUERY = "How long should an espresso shot take to pull?"
PASSAGES = (
    "A double espresso is usually pulled in 25 to 30 seconds from the moment the pump starts.",
    "Oat milk steams best at a slightly lower temperature than dairy milk.",
    "Descale a single-boiler machine every two to three months with hard water.",
)


@dataclass
class LLMCheck:
    """What one check found; ``str()`` gives the report the CLI prints."""

    llm: str
    latency_s: float = 0.0
    tokens_per_candidate: float = 0.0
    labelled: int = 0
    logprobs: bool = False
    structured: str = "not tried"
    reasoning: bool = False
    settings: dict[str, object] = field(default_factory=dict)
    adaptations: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [
            f"LLM:             {self.llm}",
            f"answered:        {self.labelled} of {len(PASSAGES)} passages labelled in {self.latency_s:.1f} s "
            f"({self.tokens_per_candidate:.0f} tokens per candidate)",
            f"logprobs:        {'yes: scores are expected values of the label probabilities' if self.logprobs else 'no: scores are the label values'}",
            f"structured out:  {self.structured}",
            f"reasoning model: {'yes' if self.reasoning else 'no'}",
        ]
        rows += [f"adapted:         {line}" for line in self.adaptations]
        rows.append("will use:        " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        return "\n".join(rows)


def _nodes() -> list[NodeWithScore]:
    return [NodeWithScore(node=TextNode(text=text, id_=f"check-{i}"), score=1 - i / 10) for i, text in enumerate(PASSAGES)]


@contextmanager
def _quiet() -> Iterator[None]:
    """Keep the rerank's warnings off the console meanwhile: the report says what they would (what was adapted, from
    the adapter's record; a failure, from the usage), and it should not be said twice."""
    package = logging.getLogger("llama_rerank")
    level = package.level
    package.setLevel(logging.ERROR)
    try:
        yield
    finally:
        package.setLevel(level)


def _rerank(reranker: LikelihoodRerank) -> tuple[RerankResult, float]:
    started = time.perf_counter()
    with _quiet():
        result = reranker.rerank(QUERY, _nodes())
    return result, time.perf_counter() - started


def check_llm(llm: LLM, **settings: object) -> LLMCheck:
    """Rerank three passages with ``llm`` (and again with structured output where its adapter can send a schema)."""
    reranker = LikelihoodRerank(llm=llm, top_n=len(PASSAGES), max_retries=0, **settings)
    result, latency = _rerank(reranker)
    usage, nodes = result.usage, result.nodes
    if usage.failed_windows:
        raise ConnectionError(f"{model_identity(llm)} did not answer: {'; '.join(usage.errors)}")
    adapter = reranker.resources.adapter
    check = LLMCheck(
        llm=model_identity(llm),
        latency_s=latency,
        tokens_per_candidate=(usage.prompt_tokens + usage.completion_tokens) / len(PASSAGES),
        labelled=sum(n.node.metadata["rerank_label"] is not None for n in nodes),
        logprobs=usage.logprob_scored > 0,
        reasoning=adapter.reasoning or adapter.room > 0,
        adaptations=[a.change for a in adapter.adaptations],
    )
    if adapter.takes_schema:
        structured = LikelihoodRerank(llm=llm, top_n=len(PASSAGES), max_retries=0, structured_output=True, **settings)
        s_result, s_latency = _rerank(structured)
        s_adapter = structured.resources.adapter
        s_labelled = sum(n.node.metadata["rerank_label"] is not None for n in s_result.nodes)
        if not s_adapter.structured:
            check.structured = "refused by the server (text answers work)"
        else:
            check.structured = f"yes: {s_labelled} of {len(PASSAGES)} labelled in {s_latency:.1f} s"
        check.adaptations += [a.change for a in s_adapter.adaptations if a.option == "response_format"]
    options = adapter.options(0, None)
    check.settings = {"scoring": "logprobs" if check.logprobs else "label",
                      **{k: v for k, v in options.items() if k != "max_tokens"}}  # fmt: skip
    if adapter.room:
        check.settings["completion tokens for reasoning"] = adapter.room
    return check
