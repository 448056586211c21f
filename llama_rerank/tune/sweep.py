"""The sweep: split the questions, judge each (K, window size) once, score every fusion weight and N from those
judgements, and pick the settings on the tune split.

Only K and the window size change what the LLM sees, so each (K, window) pair is judged once per question, with
fusion off and no normalisation; every fusion weight ``w`` (and every N) is then scored offline through the
library's own :func:`~llama_rerank.scoring.fuse` and :func:`~llama_rerank.scoring.order`, which is exactly what
``LikelihoodRerank(retrieval_weight=w, normalize=False)`` would return. Each judged question is appended to
``judged.jsonl`` as it finishes (with its calls, tokens and rerank wall time), and every window's judgement goes
to one cache, ``judgements.sqlite``: a rerun skips the questions already recorded and sends no LLM call for them, one
interrupted mid-question resends only the windows not yet judged, and a window two pairs share (K=20's first window
is K=10's, at the same window size) is judged once.

**Split.** Questions in id order: the 1st, 3rd, 5th... tune, the 2nd, 4th... are held out for the verdict.
**Choice.** The (K, window, w) with the best mean nDCG@10 on the tune split; ties go to the cheaper (smaller K,
larger window) and then to more weight on the first stage. N is the smallest of those tried whose tune Recall@N is
within :data:`RECALL_SLACK` of the largest N's.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from llama_index.core.llms import LLM
from llama_index.core.schema import NodeWithScore

from llama_rerank.eval.metrics import NDCG, doc_ranking, per_query, recall_key
from llama_rerank.postprocessor import LikelihoodRerank, RerankResult
from llama_rerank.scoring import fuse, order
from llama_rerank.tune.questions import Question, llm_key, relevant_unit
from llama_rerank.types import Candidate, Judgement

JUDGED_FILE = "judged.jsonl"
JUDGEMENTS_FILE = "judgements.sqlite"
RECALL_SLACK = 0.05
SIGNAL = "rank"


@dataclass
class Judged:
    """One question under one (K, window): candidates in retrieval order with the LLM's raw score and label
    (``label`` None: never judged), what it cost, and the rerank's wall time in seconds."""

    query_id: str
    candidates: list[dict[str, Any]]
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cache_hits: int = 0


@dataclass(frozen=True)
class Setting:
    """A reranking setting; ``weight`` None is the first stage alone."""

    k: int
    window: int | None
    weight: float | None

    @property
    def name(self) -> str:
        return f"first stage (K={self.k})" if self.weight is None else f"K={self.k} window={self.window} w={self.weight:g}"


@dataclass
class Scores:
    """A setting's per-question metrics ({query id: {ndcg@10, mrr@10, recall@N...}}), the judged records and each
    question's relevant ids."""

    setting: Setting
    per_query: dict[str, dict[str, float]]
    judged: dict[str, Judged] = field(default_factory=dict)
    relevant: dict[str, dict[str, int]] = field(default_factory=dict)

    def mean(self, key: str) -> float:
        values = [v[key] for v in self.per_query.values()]
        return sum(values) / len(values) if values else 0.0


def split(questions: Sequence[Question]) -> tuple[list[Question], list[Question]]:
    """(tune, held out): alternating in id order."""
    ordered = sorted(questions, key=lambda q: q.id)
    return ordered[0::2], ordered[1::2]


def first_stage(question: Question, nodes: Sequence[NodeWithScore], k: int) -> Judged:
    """The first ``k`` candidates in retrieval order, unjudged."""
    return Judged(question.id, [
        {"node": n.node.node_id, "unit": relevant_unit(n.node.node_id, n.node.metadata, question.relevant),
         "retrieval_score": n.score, "score": 0.0, "label": None}
        for n in nodes[:k]
    ])  # fmt: skip


def final_scores(judged: Judged, weight: float) -> tuple[list[str], dict[str, float]]:
    """The candidates' units best first under fusion weight ``weight`` (no normalisation), and each node's final
    score, computed by the library's own fusion and order."""
    candidates = [Candidate(i, "", 0, c["retrieval_score"]) for i, c in enumerate(judged.candidates)]
    judgements = {i: Judgement(c["label"], c["score"], "label" if c["label"] else "unparsed") for i, c in enumerate(judged.candidates)}
    final = fuse(candidates, judgements, weight, SIGNAL, normalize=False)
    ranked = order(candidates, judgements, final, None)
    units = doc_ranking([judged.candidates[c.index]["unit"] for c in ranked])
    return units, {judged.candidates[i]["node"]: score for i, score in final.items()}


def score(setting: Setting, judged: dict[str, Judged], questions: Sequence[Question], top_ns: Sequence[int]) -> Scores:
    """Metrics of ``setting`` over ``questions`` (nDCG@10 and MRR@10 on graded gains, Recall@N for each N)."""
    rankings = {
        q.id: [c["unit"] for c in judged[q.id].candidates] if setting.weight is None else final_scores(judged[q.id], setting.weight)[0]
        for q in questions
    }  # fmt: skip
    rankings = {q: doc_ranking(r) for q, r in rankings.items()}
    qrels = {q.id: q.relevant for q in questions}
    values: dict[str, dict[str, float]] = {q.id: {} for q in questions}
    for n in top_ns:
        for query_id, metrics in per_query(rankings, qrels, n).items():
            values[query_id].update(metrics)
    return Scores(setting, values, {q.id: judged[q.id] for q in questions}, qrels)


def choose(scores: Sequence[Scores]) -> Scores:
    """The best mean nDCG@10; ties to smaller K, larger window, then more first-stage weight."""
    return max(scores, key=lambda s: (round(s.mean(NDCG), 9), -s.setting.k, s.setting.window or 0, s.setting.weight or 0.0))


def choose_n(chosen: Scores, top_ns: Sequence[int]) -> int:
    """The smallest N whose Recall@N is within RECALL_SLACK of the largest N's."""
    ns = sorted(top_ns)
    best = chosen.mean(recall_key(ns[-1]))
    return next(n for n in ns if chosen.mean(recall_key(n)) >= best - RECALL_SLACK)


def read_judged(path: Path) -> Iterator[tuple[str, int, int, str, Judged]]:
    """(LLM key, K, window, question text, record) for each judged question recorded in ``path`` (none if absent); a
    torn last line is skipped: that question is judged again (its windows come from the cache)."""
    if not path.exists():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            yield record.pop("llm"), record.pop("k"), record.pop("window"), record.pop("query"), Judged(**record)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue


class Judging:
    """Judges questions under a (K, window), resuming from ``judged.jsonl`` and the pair's judgement cache."""

    def __init__(self, folder: Path, llm: LLM, options: dict[str, Any]) -> None:
        self.folder, self.llm, self.options = folder, llm, options
        self.model = llm_key(llm)
        self.path = folder / JUDGED_FILE
        self.done = {(k, window, query, judged.query_id): judged for llm, k, window, query, judged in read_judged(self.path) if llm == self.model}
        self._lock = threading.Lock()  # records arrive on the batch's threads

    def reranker(self, k: int, window: int) -> LikelihoodRerank:
        cache = self.folder / JUDGEMENTS_FILE  # one for every pair: K=20's first window is K=10's window
        return LikelihoodRerank(llm=self.llm, **{**self.options, "top_n": k, "window_size": window,
                                                 "retrieval_weight": 0.0, "normalize": False, "cache": str(cache)})  # fmt: skip

    def todo(self, k: int, window: int, questions: Sequence[Question]) -> list[Question]:
        return [q for q in questions if (k, window, q.text, q.id) not in self.done]

    def judge(
        self, k: int, window: int, questions: Sequence[Question], retrieved: dict[str, list[NodeWithScore]],
        on_done: Callable[[], object] = lambda: None,
    ) -> dict[str, Judged]:  # fmt: skip
        """Every question judged under (K, window); only those not recorded yet go to the LLM."""
        todo = self.todo(k, window, questions)
        if todo:
            reranker = self.reranker(k, window)

            def save(position: int, result: RerankResult) -> None:
                self._record(k, window, todo[position], result)
                on_done()

            reranker.rerank_batch([q.text for q in todo], [retrieved[q.id][:k] for q in todo], progress=False, on_result=save)
        return {q.id: self.done[(k, window, q.text, q.id)] for q in questions}

    def _record(self, k: int, window: int, question: Question, result: RerankResult) -> None:
        nodes = sorted(result.nodes, key=lambda n: n.node.metadata["retrieval_rank"])
        usage = result.usage
        judged = Judged(question.id, [
            {"node": n.node.node_id, "unit": relevant_unit(n.node.node_id, n.node.metadata, question.relevant),
             "retrieval_score": n.node.metadata["retrieval_score"], "score": n.node.metadata["rerank_score"],
             "label": n.node.metadata["rerank_label"]}
            for n in nodes
        ], usage.llm_calls, usage.prompt_tokens, usage.completion_tokens, usage.wall_time_s, usage.cache_hits)  # fmt: skip
        line = {"llm": self.model, "k": k, "window": window, "query": question.text, **asdict(judged)}
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
            self.done[(k, window, question.text, question.id)] = judged
