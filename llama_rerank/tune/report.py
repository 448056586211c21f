"""``report.md``: the verdict first (rerank or keep the first stage, the gain with its interval, latency, cost, the
settings), then the tables (held-out check, every setting tried on the tune split, calibration, the questions) and
two plots drawn with matplotlib's Agg canvas: quality against rerank latency per setting, and the reliability
diagram before and after calibration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from llama_rerank._extras import require
from llama_rerank.eval.metrics import MRR, NDCG, recall_key

if TYPE_CHECKING:
    from llama_rerank.tune.run import TuneResult
    from llama_rerank.tune.sweep import Scores

REPORT, RESULTS = "report.md", "results.json"
QUALITY_PLOT, RELIABILITY_PLOT = "quality_vs_latency.png", "reliability.png"
SYNTHETIC_CAVEAT = (
    "Each synthetic question has one known positive, the passage it was written from: another passage that answers "
    "it too counts as a miss, so absolute numbers are lower bounds, and a question written from a passage may share "
    "its wording (long copied runs are dropped, paraphrase is not), which favours the first stage. Measured on "
    "Cranfield against real judgements (docs/EVALUATION.md), a synthetic tune got cost, latency and a first "
    "calibration right, but not the choice of settings nor the size of the gain: the first stage already found most "
    "synthetic questions' source first. Check its settings on a few real questions (`--queries FILE`) before acting."
)


def _ci(ci: Sequence[float] | None, signed: bool = False) -> str:
    if ci is None:
        return "n/a"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"[{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def decision(result: "TuneResult") -> str:
    """'rerank', 'keep the first stage' (worse, or no gain distinguishable from zero) or 'undecided' (too few)."""
    ci = result.stats["metrics"][NDCG]["gain_ci"]
    if ci is None:
        return "undecided"
    return "rerank" if ci[0] > 0 else "keep the first stage"


def verdict(result: "TuneResult") -> str:
    """The report's first paragraph."""
    stats, setting, n = result.stats, result.chosen.setting, result.stats["questions"]
    m, mrr, rec = (stats["metrics"][key] for key in (NDCG, MRR, recall_key(result.top_n)))
    what = decision(result)
    if what == "rerank":
        head = "**Rerank.**"
    elif what == "undecided":
        head = "**Undecided: too few held-out questions to tell.**"
    else:
        worse = m["gain_ci"][1] < 0
        head = "**Keep the first stage.** " + ("Reranking made the order worse." if worse else "Reranking's gain is not distinguishable from zero.")
    money = "" if stats["cost_per_1000"] is None else f", {stats['cost_per_1000']:.2f} in money at the given prices"
    text = (
        f"{head} On {n} held-out questions, reranking the first {setting.k} candidates (window {setting.window}, fusion "
        f"weight {setting.weight:g}) moved nDCG@10 from {m['first_stage']:.3f} to {m['reranked']:.3f} "
        f"(gain {m['gain']:+.3f}, 95% bootstrap interval {_ci(m['gain_ci'], True)}, paired t-test p = {_p(m['p']['ttest_rel'])}), "
        f"MRR@10 from {mrr['first_stage']:.3f} to {mrr['reranked']:.3f} and Recall@{result.top_n} of the passages handed "
        f"to the answer step from {rec['first_stage']:.3f} to {rec['reranked']:.3f}. It costs {stats['latency_p50_s']:.1f} s "
        f"per question at the median ({stats['latency_p95_s']:.1f} s at p95) and, per 1,000 questions, "
        f"{stats['llm_calls_per_1000']:,.0f} LLM calls, {stats['prompt_tokens_per_1000']:,.0f} prompt and "
        f"{stats['completion_tokens_per_1000']:,.0f} completion tokens{money}. "
    )
    if what == "rerank":
        text += (f"Recommended: `top_k={setting.k}`, `top_n={result.top_n}`, `window_size={setting.window}`, "
                 f"`retrieval_weight={setting.weight:g}`, in `settings.json`: `LikelihoodRerank.from_settings(\"settings.json\", llm=llm)`.")  # fmt: skip
    else:
        text += ("Answer from the first stage's top passages; the best reranking settings found are in `settings.json` "
                 "should a larger test say otherwise.")  # fmt: skip
    if result.plan.source.startswith("synthetic"):
        text += (" The questions are synthetic: absolute numbers are lower bounds, and the choice of settings did not"
                 " carry over to real questions where this was measured (see Questions below).")  # fmt: skip
    return text


def _latency(scores: "Scores") -> tuple[float, float, float]:
    """(p50 rerank seconds, LLM calls, prompt tokens) per question of a setting's judged records."""
    import numpy

    records = list(scores.judged.values())
    if scores.setting.weight is None or not records:
        return 0.0, 0.0, 0.0
    return (float(numpy.percentile([r.latency_s for r in records], 50)), sum(r.llm_calls for r in records) / len(records),
            sum(r.prompt_tokens for r in records) / len(records))  # fmt: skip


def markdown(result: "TuneResult", folder: Path) -> str:
    stats, cal, top_ns = result.stats, result.calibration, result.options["top_ns"]
    lines = ["# Should I rerank these documents?", "", verdict(result), "",
             f"## Held-out check ({stats['questions']} questions)", "",
             "| metric | first stage | 95% interval | reranked | 95% interval | gain | 95% interval | p (t-test) | p (Wilcoxon) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, m in stats["metrics"].items():
        lines.append(f"| {key} | {m['first_stage']:.3f} | {_ci(m['first_stage_ci'])} | {m['reranked']:.3f} | {_ci(m['reranked_ci'])} "
                     f"| {m['gain']:+.3f} | {_ci(m['gain_ci'], True)} | {_p(m['p']['ttest_rel'])} | {_p(m['p']['wilcoxon'])} |")  # fmt: skip
    cost = "-" if stats["cost_per_1000"] is None else f"{stats['cost_per_1000']:.2f}"
    lines += ["", "| rerank latency p50 | p95 | LLM calls / 1,000 q | prompt tokens / 1,000 q | completion tokens / 1,000 q | money / 1,000 q |",
              "|---|---|---|---|---|---|",
              f"| {stats['latency_p50_s']:.2f} s | {stats['latency_p95_s']:.2f} s | {stats['llm_calls_per_1000']:,.0f} | "
              f"{stats['prompt_tokens_per_1000']:,.0f} | {stats['completion_tokens_per_1000']:,.0f} | {cost} |"]  # fmt: skip
    if stats["cached_questions"]:
        lines.append(f"\n{stats['cached_questions']} of these questions were partly served from the judgement cache "
                     "(an interrupted run): their latency and tokens are under-counted.")  # fmt: skip
    tune_n = len(result.chosen.per_query)
    lines += ["", f"## Settings tried on the tune split ({tune_n} questions)", "",
              "Only K and the window size cost LLM calls; each fusion weight and N was scored from the same judgements.", "",
              "| setting | nDCG@10 | MRR@10 | " + " | ".join(f"R@{n}" for n in top_ns) + " | p50 rerank s | LLM calls / q | prompt tok / q |",
              "|---|---|---|" + "---|" * len(top_ns) + "---|---|---|"]  # fmt: skip
    for s in sorted(result.tune_scores, key=lambda s: -s.mean(NDCG)):
        p50, calls, tokens = _latency(s)
        mark = " (chosen)" if s is result.chosen else ""
        lines.append(f"| {s.setting.name}{mark} | {s.mean(NDCG):.3f} | {s.mean(MRR):.3f} | "
                     + " | ".join(f"{s.mean(recall_key(n)):.3f}" for n in top_ns) + f" | {p50:.2f} | {calls:.1f} | {tokens:,.0f} |")  # fmt: skip
    lines += ["", f"N = {result.top_n}: the smallest N tried whose tune Recall@N is within 0.05 of the largest N's."]
    if result.skipped:
        lines.append("Not tried, over the time budget: " + ", ".join(f"K={k} window={w}" for k, w in result.skipped) + ".")
    lines += ["", f"![nDCG@10 against rerank latency per setting]({QUALITY_PLOT})", "", "## Calibration", ""]
    if cal["fitted"] is None:
        lines.append(f"Not fitted: {cal['why']} ({cal['positives']} relevant of {cal['points']} candidates).")
    else:
        lines += [
            f"Isotonic regression of relevance on the final score (un-normalised fusion), fitted on the tune split's "
            f"{cal['points']} candidates ({cal['positives']} relevant); expected calibration error on the held-out "
            f"split's {cal['held_points']} candidates: {cal['ece_before']:.3f} with the score read as a probability, "
            f"{cal['ece_after']:.3f} calibrated.", "",
        ]  # fmt: skip
        target = cal["target_precision"]
        if cal["threshold"] is None:
            lines.append(f"No threshold reached a precision of {target:g} on the tune split: `min_score` is left unset.")
        else:
            held = "n/a" if cal["held_precision"] is None else f"{cal['held_precision']:.2f}"
            lines.append(
                f"Threshold for precision {target:g}: `min_score={cal['threshold']:.3f}` (a probability; in settings.json). "
                f"Held out, the passages above it were relevant at {held}, and for {cal['nothing_passes']:.0%} of the "
                "questions nothing passed it: there the answer step can say that no passage answers the question."
            )  # fmt: skip
        lines += ["", f"![reliability diagram, before and after calibration]({RELIABILITY_PLOT})"]
    plan = result.plan
    dropped = ", ".join(f"{v} {k}" for k, v in plan.dropped.items() if v) or "none"
    lines += ["", "## Questions", "", f"{len(plan.questions)} questions ({plan.source}); dropped replies: {dropped}. "
              "They are in `queries.jsonl`.", ""]  # fmt: skip
    if plan.source.startswith("synthetic"):
        lines += [SYNTHETIC_CAVEAT, ""]
    lines += ["## Use these settings", "", "```python", "from llama_rerank import LikelihoodRerank",
              f'reranker = LikelihoodRerank.from_settings("{folder.name}/settings.json", llm=llm)',
              f"engine = index.as_query_engine(similarity_top_k={result.settings['top_k']}, node_postprocessors=[reranker])",
              "```", "", f"or `llama-rerank query \"...\" --settings {folder.name}/settings.json`.", ""]  # fmt: skip
    return "\n".join(lines)


def _figure(width: float, height: float) -> Any:
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "eval").FigureCanvasAgg
    fig = require("matplotlib.figure", "eval").Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_quality(path: Path, result: "TuneResult") -> None:
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot()
    for s in result.tune_scores:
        p50 = _latency(s)[0]
        ax.scatter([p50], [s.mean(NDCG)], marker="*" if s is result.chosen else "o", s=120 if s is result.chosen else 30)
        ax.annotate(s.setting.name, (p50, s.mean(NDCG)), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("rerank latency per question, p50 (s)")
    ax.set_ylabel("nDCG@10 (tune split)")
    ax.set_title("Quality against latency, each setting tried")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)


def plot_reliability(path: Path, cal: dict[str, Any]) -> None:
    fig = _figure(4.8, 4.5)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect")
    for key, label in (("reliability_before", f"score as probability (ECE {cal['ece_before']:.3f})"),
                       ("reliability_after", f"calibrated (ECE {cal['ece_after']:.3f})")):  # fmt: skip
        points = cal[key]
        ax.plot([p for p, _, _ in points], [s for _, s, _ in points], marker="o", label=label)
    ax.set_xlabel("predicted probability of relevance")
    ax.set_ylabel("share relevant (held-out split)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)


def write(folder: Path, result: "TuneResult") -> Path:
    """report.md, results.json and the plots in ``folder``; returns the report's path."""
    plot_quality(folder / QUALITY_PLOT, result)
    if result.calibration["fitted"] is not None:
        plot_reliability(folder / RELIABILITY_PLOT, result.calibration)
    results = {"decision": decision(result), "stats": result.stats, "calibration": result.calibration, "top_n": result.top_n,
               "chosen": result.chosen.setting.name, "skipped": result.skipped, "options": result.options,
               "tune": {s.setting.name: {key: s.mean(key) for key in next(iter(s.per_query.values()))} for s in result.tune_scores}}  # fmt: skip
    (folder / RESULTS).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    path = folder / REPORT
    path.write_text(markdown(result, folder), encoding="utf-8")
    return path
