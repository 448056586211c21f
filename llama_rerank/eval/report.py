"""What an evaluation shows: a plain terminal table, a PNG bar plot (matplotlib's Agg canvas) and the JSON file.

The JSON is ``{"dataset", "config", "systems": {NAME: {"ndcg@10", "mrr@10", "recall@N", "llm_calls",
"prompt_tokens", "completion_tokens", "latency_p50_s", "latency_p95_s", "failures", "nodes_appended",
"p_value_vs_first_stage": {"ttest_rel", "wilcoxon"} (not for first-stage), "per_query": {QUERY_ID: {"ndcg@10",
"mrr@10", "recall@N", "ranking": [CORPUS_ID, ...]}}}}}``; rankings are best first, so metrics can be recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from llama_rerank._extras import require
from llama_rerank.eval import EvalError
from llama_rerank.eval.metrics import MRR, NDCG, recall_key

if TYPE_CHECKING:
    from llama_rerank.eval.run import EvalRun
    from llama_rerank.types import RerankEstimate


def reported_queries(path: Path) -> set[str]:
    """The query ids an earlier results JSON reported (any system's ``per_query``)."""
    try:
        systems = json.loads(Path(path).read_text())["systems"]
        return {query_id for system in systems.values() for query_id in system["per_query"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EvalError(f"--exclude-queries {path}: not a results JSON written by llama-rerank eval --json ({exc!r})") from exc


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def table(scores: Mapping[str, Mapping[str, Any]], top_n: int) -> str:
    """One row per system: metrics, p-values against first-stage, failures, LLM cost and latency."""
    head = ["system", "nDCG@10", "MRR@10", f"R@{top_n}", "p(t)", "p(wilcoxon)", "failures", "LLM calls",
            "prompt tok", "compl. tok", "p50 s", "p95 s"]  # fmt: skip
    rows = [head]
    for name, s in scores.items():
        p = s.get("p_value_vs_first_stage", {})
        rows.append([
            name, f"{s[NDCG]:.4f}", f"{s[MRR]:.4f}", f"{s[recall_key(top_n)]:.4f}", _p(p.get("ttest_rel")),
            _p(p.get("wilcoxon")), str(s["failures"]), str(s["llm_calls"]), str(s["prompt_tokens"]),
            str(s["completion_tokens"]), f"{s['latency_p50_s']:.2f}", f"{s['latency_p95_s']:.2f}",
        ])  # fmt: skip
    return _grid(rows)


def estimate_table(estimates: Mapping[str, "tuple[int, RerankEstimate | None]"]) -> str:
    """``--dry-run``: per system, the queries still to rerank and the LLM calls and tokens they would take."""
    priced = any(e is not None and e.cost is not None for _, e in estimates.values())
    rows = [["system", "queries to run", "LLM calls", "prompt tok", "compl. tok"] + (["cost"] if priced else [])]
    for name, (queries, e) in estimates.items():
        if e is None:
            rows.append([name, str(queries), "not foreseen", "-", "-"] + (["-"] if priced else []))
        else:
            cost = [f"{e.cost:.4f}"] if priced else []
            rows.append([name, str(queries), str(e.llm_calls), str(e.prompt_tokens), str(e.completion_tokens)] + cost)
    notes = ("Nothing was sent to the LLM. LikelihoodRerank counts assume every answer labels every candidate (follow-ups, "
             "retries and a reasoning model's hidden tokens not foreseen); LLMRerank and RankGPT are not foreseen.")  # fmt: skip
    return _grid(rows) + "\n" + notes


def _grid(rows: list[list[str]]) -> str:
    """Rows as aligned columns, the first left-aligned, a rule under the head."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def to_json(run: "EvalRun", scores: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {"dataset": run.dataset.name, "config": run.config, "systems": dict(scores)}


def write_json(path: str | Path, run: "EvalRun", scores: Mapping[str, Mapping[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(run, scores), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def plot(path: str | Path, scores: Mapping[str, Mapping[str, Any]], top_n: int, dataset: str) -> None:
    """Grouped bars: nDCG@10, MRR@10 and Recall@N of each system."""
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "eval").FigureCanvasAgg
    Figure = require("matplotlib.figure", "eval").Figure

    metrics = [(NDCG, "nDCG@10"), (MRR, "MRR@10"), (recall_key(top_n), f"Recall@{top_n}")]
    names = list(scores)
    fig = Figure(figsize=(max(6.0, 1.6 * len(names) + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(metrics)
    for i, (key, label) in enumerate(metrics):
        xs = [x + (i - (len(metrics) - 1) / 2) * width for x in range(len(names))]
        bars = ax.bar(xs, [scores[n][key] for n in names], width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=15, ha="right")
    ax.set_ylim(0, 1.18)
    ax.set_ylabel("score")
    queries = len(next(iter(scores.values()))["per_query"]) if scores else 0
    ax.set_title(f"{dataset}: {queries} queries")
    ax.legend(loc="upper center", ncol=len(metrics), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
