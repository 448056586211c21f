"""Scores, computed from the per-query rankings of corpus ids: nothing here looks at nodes or LLMs.

``ir-measures`` (trec_eval's definitions through pytrec_eval) gives nDCG@10 with the graded gains as linear gains,
RR@10 (reported as MRR@10) and R@N, where a judgment with gain >= 1 is relevant. Means are over the evaluated
queries (a query whose ranking is empty scores 0). Each system is compared with ``first-stage`` on per-query
nDCG@10 by a paired t-test and a Wilcoxon signed-rank test (``None`` when a test is undefined: fewer than two
queries, or no difference at all). Costs and p50/p95 latencies are summarised from the same per-query records.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from llama_rerank._extras import require
from llama_rerank.eval.systems import FIRST_STAGE

if TYPE_CHECKING:
    from llama_rerank.eval.run import QueryResult

NDCG, MRR = "ndcg@10", "mrr@10"


def recall_key(top_n: int) -> str:
    return f"recall@{top_n}"


def doc_ranking(chunk_docs: Sequence[str]) -> list[str]:
    """Corpus ids best first from the corpus ids of ranked chunks: a document takes the rank of its best chunk."""
    return list(dict.fromkeys(chunk_docs))


def per_query(rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]], top_n: int) -> dict[str, dict[str, float]]:
    """``{query id: {"ndcg@10", "mrr@10", "recall@N"}}`` for every query of ``rankings``."""
    ir = require("ir_measures", "eval")
    measures = {NDCG: ir.parse_measure("nDCG@10"), MRR: ir.parse_measure("RR@10"), recall_key(top_n): ir.parse_measure(f"R@{top_n}")}
    names = {measure: name for name, measure in measures.items()}
    judged = [ir.Qrel(q, doc, gain) for q in rankings for doc, gain in qrels.get(q, {}).items()]
    run = [ir.ScoredDoc(q, doc, float(len(docs) - rank)) for q, docs in rankings.items() for rank, doc in enumerate(docs)]
    values = {q: dict.fromkeys(measures, 0.0) for q in rankings}
    for metric in ir.iter_calc(list(measures.values()), judged, run):
        values[metric.query_id][names[metric.measure]] = float(metric.value)
    return values


def paired_tests(system: Sequence[float], baseline: Sequence[float]) -> dict[str, float | None]:
    """Two-sided p-values of ``scipy.stats.ttest_rel`` and ``wilcoxon`` on paired per-query values."""
    stats = require("scipy.stats", "eval")
    out: dict[str, float | None] = {}
    for name, test in (("ttest_rel", stats.ttest_rel), ("wilcoxon", stats.wilcoxon)):
        p: float | None = None
        if len(system) >= 2 and any(a != b for a, b in zip(system, baseline)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    p = float(test(system, baseline).pvalue)
                except ValueError:
                    p = None
        out[name] = None if p is None or math.isnan(p) else p
    return out


def _percentile(values: Sequence[float], q: float) -> float:
    import numpy

    return float(numpy.percentile(values, q)) if values else 0.0


def score(results: Mapping[str, Mapping[str, "QueryResult"]], qrels: Mapping[str, Mapping[str, int]], top_n: int) -> dict[str, dict[str, Any]]:
    """Per system: mean metrics, costs, latencies, failures, p-values against first-stage, and per-query values."""
    scores: dict[str, dict[str, Any]] = {}
    per_system = {name: per_query({q: r.ranking for q, r in by_query.items()}, qrels, top_n) for name, by_query in results.items()}
    baseline = per_system.get(FIRST_STAGE)
    for name, by_query in results.items():
        values = per_system[name]
        queries = list(by_query)
        latencies = [r.latency_s for r in by_query.values()]
        entry: dict[str, Any] = {key: sum(values[q][key] for q in queries) / len(queries) if queries else 0.0
                                 for key in (NDCG, MRR, recall_key(top_n))}  # fmt: skip
        entry.update(
            llm_calls=sum(r.llm_calls for r in by_query.values()),
            prompt_tokens=sum(r.prompt_tokens for r in by_query.values()),
            completion_tokens=sum(r.completion_tokens for r in by_query.values()),
            latency_p50_s=_percentile(latencies, 50),
            latency_p95_s=_percentile(latencies, 95),
            failures=sum(r.error is not None for r in by_query.values()),
            nodes_appended=sum(r.appended for r in by_query.values()),
        )
        if baseline is not None and name != FIRST_STAGE:
            entry["p_value_vs_first_stage"] = paired_tests([values[q][NDCG] for q in queries], [baseline[q][NDCG] for q in queries])
        entry["per_query"] = {q: {**values[q], "ranking": list(by_query[q].ranking)} for q in queries}
        scores[name] = entry
    return scores
