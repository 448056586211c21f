"""The main job, end to end: choose an LLM, retrieve top K from the store, rerank to top N, and answer.

The CLI and the notebooks call these functions; they only reach the library through ``store`` and
``LikelihoodRerank``.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from llama_index.core import VectorStoreIndex, get_response_synthesizer
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.llms import LLM
from llama_index.core.prompts import ChatPromptTemplate
from llama_index.core.schema import NodeWithScore

from llama_rerank._extras import require
from llama_rerank.errors import LlamaRerankError
from llama_rerank.postprocessor import LikelihoodRerank
from llama_rerank.types import RerankUsage

DATA_DIR = Path(require("platformdirs", "chroma").user_data_dir("llama-rerank"))
DEFAULT_STORE = DATA_DIR / "chroma"
DEMO_STORE = DATA_DIR / "demo-chroma"
NOT_SERVED = "http://127.0.0.1:9/v1"  # the local LLM's address in a dry run: nothing listens, nothing is called


def make_llm(spec: str = "local", model: str | None = None, context_window: int = 4096, serve: bool = True) -> LLM:
    """``local`` (the bundled model), ``openai:<model>`` (needs OPENAI_API_KEY) or an OpenAI-compatible server URL.

    ``serve=False`` gives the local LLM without starting the bundled model: enough to count tokens (a dry run),
    not to call it.

    Every choice asks for token log-probabilities, which ``LikelihoodRerank`` turns into scores (it stops asking,
    with a warning, if the provider refuses them). The client retries once: the reranker runs its own retries with
    the client's turned off, and the answer step should fail in seconds, not minutes, when the server is down.
    """
    if spec == "local":
        from llama_rerank.runtime import local_llm

        return local_llm() if serve else local_llm(api_base=NOT_SERVED)
    if spec.startswith("openai:"):
        if not os.environ.get("OPENAI_API_KEY"):
            raise LlamaRerankError(f"--llm {spec} needs the OPENAI_API_KEY environment variable set")
        OpenAI = require("llama_index.llms.openai", "openai").OpenAI
        return OpenAI(model=spec.split(":", 1)[1], temperature=0.0, logprobs=True, top_logprobs=5, max_retries=1)
    if spec.startswith(("http://", "https://")):
        OpenAILike = require("llama_index.llms.openai_like", "openai").OpenAILike
        return OpenAILike(
            api_base=spec, model=model or "default", api_key=os.environ.get("OPENAI_API_KEY", "not-needed"),
            is_chat_model=True, context_window=context_window, temperature=0.0, logprobs=True, top_logprobs=5,
            max_retries=1,
        )  # fmt: skip
    raise LlamaRerankError(f"unknown --llm {spec!r}: use 'local', 'openai:<model>' or an OpenAI-compatible server URL")


# The bundled 1.5B model is a weak relevance judge; these settings were chosen on the Cranfield tune half
# (docs/EVALUATION.md) so that it refines the first-stage order instead of replacing it: four labels separate
# relevant from non-relevant passages better than three, and 64-token passages judge as well as 128 in 35% less time.
# Re-checked on Cranfield and SciFact tune halves on 2026-11-30: no fusion weight was better on both, so they stay.
# A CPU server queues requests rather than failing them, so its calls get a long timeout (a retry would only queue).
LOCAL_LABEL_SCALE: dict[str, float] = {"unlikely": 0.0, "somewhat likely": 0.33, "likely": 0.67, "very likely": 1.0}
LOCAL_RERANK_SETTINGS: dict[str, Any] = {
    "label_scale": LOCAL_LABEL_SCALE, "max_passage_tokens": 64, "retrieval_weight": 0.5, "normalize": True, "timeout": 900,
}  # fmt: skip
# What those settings were measured to do (docs/EVALUATION.md, "Two collections"); the demo prints it.
LOCAL_QUALITY_NOTE = (
    "The bundled 1.5B model is a weak judge: on held-out queries of two public collections (Cranfield, SciFact) its "
    "reranking was level with the first stage or below it (docs/EVALUATION.md). This demo shows how reranking works, "
    "not a measured gain."
)


def reranker_defaults(llm_spec: str) -> dict[str, Any]:
    """``LikelihoodRerank`` settings that go with an ``--llm`` choice (the tuned ones for ``local``)."""
    return copy.deepcopy(LOCAL_RERANK_SETTINGS) if llm_spec == "local" else {}


def default_embedding() -> BaseEmbedding:
    from llama_rerank.runtime import LocalEmbedding

    return LocalEmbedding()


@dataclass
class QueryReport:
    """One query's journey: first-stage order, reranked order, the answer, usage and timings (seconds).

    ``reranked`` holds what the reranker returned; the first ``top_n`` of them went to the answer step.
    ``known_answer`` names the file of the passage that answers the query and ``known_fact`` what it says, when
    they are known (the demo queries).
    """

    query: str
    first_stage: list[NodeWithScore]
    reranked: list[NodeWithScore]
    answer: str | None
    usage: RerankUsage
    timings: dict[str, float] = field(default_factory=dict)
    top_n: int | None = None
    score_legend: str = ""
    known_answer: str | None = None
    known_fact: str | None = None

    def is_known_answer(self, node: NodeWithScore) -> bool:
        return self.known_answer is not None and node.node.metadata.get("file_name") == self.known_answer

    def known_rank(self, nodes: list[NodeWithScore]) -> int | None:
        """1-based position of the known answer passage in ``nodes``; None when it is not there."""
        return next((rank for rank, node in enumerate(nodes, start=1) if self.is_known_answer(node)), None)

    @property
    def move(self) -> str:
        """Where reranking took the known answer passage: 'up', 'down', 'stayed' or 'not retrieved'."""
        before, after = self.known_rank(self.first_stage), self.known_rank(self.reranked)
        if before is None or after is None:
            return "not retrieved"
        return "up" if after < before else "down" if after > before else "stayed"


def score_legend(reranker: LikelihoodRerank) -> str:
    """What a report's label, llm and final columns mean under ``reranker``'s settings, in one line."""
    llm = "llm" + (" (min-max normalised per query)" if reranker.normalize else "")
    signal = "rank (1 first .. 0 last)" if reranker.retrieval_signal == "rank" else "score (min-max normalised)"
    weight = reranker.retrieval_weight
    final = llm if weight == 0 else f"{1 - weight:g} x {llm} + {weight:g} x first-stage {signal}"
    return f"label: what the model wrote; llm: its score, probability-weighted if logprobs came back; final = {final}"


# The answer step's prompt: LlamaIndex's default QA prompt with the query moved above the passages and one sentence
# asking for the fact itself. With the default (query last, then "Answer:") the bundled 1.5B model echoes a query
# phrased as a statement ("The milk makes a squealing noise while I froth it") back as its answer. What it gets right
# on the demo queries, and the variants tried: demo_data/README.md.
ANSWER_PROMPT = ChatPromptTemplate(
    message_templates=[
        ChatMessage(role=MessageRole.SYSTEM, content="You are an expert Q&A system that is trusted around the world.\n"
                    "Always answer the query using the provided context information, and not prior knowledge."),
        ChatMessage(role=MessageRole.USER, content="Query: {query_str}\n\nContext information is below.\n"
                    "---------------------\n{context_str}\n---------------------\nGiven the context information and "
                    "not prior knowledge, answer the query above in one or two sentences with the fact that answers it "
                    "(a number, yes or no with the reason, or the cause and its fix). Do not repeat the query."),
    ]
)  # fmt: skip


def run_query(
    index: VectorStoreIndex, reranker: LikelihoodRerank, query: str, top_k: int = 10, answer: bool = True,
    top_n: int | None = None,
) -> QueryReport:  # fmt: skip
    """Retrieve ``top_k``, rerank, and (optionally) answer from the first ``top_n`` (default ``reranker.top_n``)
    with the reranker's LLM. A reranker with ``top_n >= top_k`` shows where every candidate went."""
    started = time.perf_counter()
    first_stage = index.as_retriever(similarity_top_k=top_k).retrieve(query)
    retrieved = time.perf_counter()
    result = reranker.rerank(query, first_stage)
    reranked = time.perf_counter()
    top_n = min(top_n or reranker.top_n, reranker.top_n)
    text = None
    if answer:
        # the reranker's LLM; None means Settings.llm here too, as for the reranker
        synthesizer = get_response_synthesizer(llm=reranker.llm, response_mode="compact", text_qa_template=ANSWER_PROMPT)
        text = str(synthesizer.synthesize(query, result.nodes[:top_n])).strip()
    done = time.perf_counter()
    timings = {"retrieve": retrieved - started, "rerank": reranked - retrieved, "answer": done - reranked}
    return QueryReport(query, first_stage, result.nodes, text, result.usage, timings, top_n, score_legend(reranker))


def demo_corpus() -> tuple[Path, list[dict[str, Any]]]:
    """The sample corpus folder shipped in the package and its demo queries."""
    root = Path(str(resources.files("llama_rerank") / "demo_data"))
    return root / "docs", json.loads((root / "queries.json").read_text(encoding="utf-8"))
