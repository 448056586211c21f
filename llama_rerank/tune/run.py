"""``llama-rerank tune``, end to end: index the documents, get the questions, sweep on the tune split, check the
chosen settings on the held-out split, calibrate, and write ``settings.json`` and ``report.md``.

Everything a run produces lives in the output folder (the index, ``replies.jsonl``, ``queries.jsonl``,
``judged.jsonl``, ``judgements.sqlite``), so a second run with the same arguments sends no LLM call. The budget
(``budget_minutes``) bounds the question writing to :data:`QUESTION_SHARE` of it (beyond the minimum of four), and
decides which (K, window) pairs are tried: the first pair and the held-out check always run; each further pair runs
only if, at the pace observed so far, it and a held-out check at its K still fit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.llms import LLM
from llama_index.core.schema import NodeWithScore
from tqdm import tqdm

from llama_rerank import pipeline, store as stores
from llama_rerank._extras import require
from llama_rerank.errors import LlamaRerankError
from llama_rerank.eval.datasets import resolve
from llama_rerank.eval.metrics import MRR, NDCG, paired_tests, recall_key
from llama_rerank.eval.run import portable
from llama_rerank.providers import model_identity
from llama_rerank.tune import calibration, questions as qs, settings as settings_file, sweep
from llama_rerank.tune.questions import Question
from llama_rerank.types import RerankEstimate

COLLECTION = "tune"
FUSION_KEYS = ("retrieval_weight", "normalize", "top_n", "window_size", "min_score")
STAND_IN_WORDS = 20
clock = time.monotonic  # the budget's clock
QUESTION_SHARE = 0.25  # of the budget, for writing questions: the rest is for judging
QUESTION_ANSWER_TOKENS = 30  # what a dry run counts for one written question  # a dry run stands in for a question not yet written with its passage's first words


@dataclass
class Plan:
    """What a run works on: the index, the questions (ids, texts, relevant ids) and their first-stage candidates."""

    location: str
    collection: str
    questions: list[Question]
    dropped: dict[str, int]
    retrieved: dict[str, list[NodeWithScore]]
    source: str
    unwritten: list[str] = field(default_factory=list)  # a dry run: passages whose question is still to be written


@dataclass
class TuneResult:
    """Everything the report shows (see :mod:`llama_rerank.tune.report`)."""

    plan: Plan
    tune_scores: list[sweep.Scores]
    skipped: list[tuple[int, int]]
    chosen: sweep.Scores
    top_n: int
    held_first: sweep.Scores
    held_chosen: sweep.Scores
    stats: dict[str, Any]
    calibration: dict[str, Any]
    settings: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)


def _index(out: Path, docs: Path | None, store: str | None, collection: str, embed_model: BaseEmbedding, progress: bool) -> tuple[str, str]:
    """(store location, collection): the given store, or ``docs`` indexed into ``out/index``."""
    if docs is None:
        if store is None:
            raise LlamaRerankError("give a folder of documents to tune on, or an existing store with --store (and --collection)")
        return str(store), collection
    docs = resolve(docs)
    location = str(store or out / "index")
    if _is_dataset(docs):
        from llama_rerank.eval.datasets import load_dataset
        from llama_rerank.eval.run import COLLECTION as EVAL_COLLECTION, build_index

        build_index(load_dataset(docs), location, embed_model, progress)
        return location, EVAL_COLLECTION
    stores.ingest(docs, location, embed_model, collection=COLLECTION, progress=progress)
    return location, COLLECTION


def _is_dataset(path: Path) -> bool:
    from llama_rerank.eval.datasets import CRANFIELD_FILES

    return (path / "corpus.jsonl").is_file() or all((path / name).is_file() for name in CRANFIELD_FILES)


def plan(
    out: Path, docs: Path | None, *, store: str | None, collection: str, embed_model: BaseEmbedding, queries: str,
    n_queries: int, seed: int, question_llm: LLM | None, top_k: int, progress: bool, stand_in: bool = False,
    questions_until: float = math.inf,
) -> Plan:  # fmt: skip
    """Index, questions, first-stage candidates. ``stand_in`` (a dry run): no LLM call; a passage whose question
    is not in ``replies.jsonl`` yet stands in with its first words. No question is asked after ``questions_until``
    (on :data:`clock`) once the minimum is written."""
    out.mkdir(parents=True, exist_ok=True)
    location, collection = _index(out, docs, store, collection, embed_model, progress)
    dropped: dict[str, int] = {}
    unwritten: list[str] = []
    if queries == "synthetic":
        if n_queries < qs.MIN_QUESTIONS:
            raise LlamaRerankError(f"--n-queries must be at least {qs.MIN_QUESTIONS} (two to tune on, two held out), got {n_queries}")
        coll = stores.open_collection(location, collection, embed_model, create=False)
        got = coll.get(include=["documents"])
        passages = qs.sample(zip(got["ids"], got["documents"]), seed)
        if not passages:
            raise LlamaRerankError(f"the store holds no passage of {qs.MIN_PASSAGE_WORDS} words or more to write questions about")
        writer = qs.QuestionWriter(question_llm, out)
        if stand_in:
            chosen = passages[:n_queries]
            questions = [Question(f"q-{pid[:16]}", qs.clean(writer.replies.get(pid, "")) or " ".join(text.split()[:STAND_IN_WORDS]),
                                  {pid: 1}, pid) for pid, text in chosen]  # fmt: skip
            unwritten = [text for pid, text in chosen if pid not in writer.replies]
        else:
            with tqdm(total=n_queries, desc="questions", unit="passage", disable=not progress) as bar:
                questions, dropped = qs.synthetic(writer, passages, n_queries, bar.update, lambda: clock() > questions_until)
        source = f"synthetic: one question per sampled passage, written by {writer.model}"
    else:
        path = resolve(queries)
        if path.is_dir():
            questions, source = qs.from_dataset(path), f"the judged queries of {path.name}"
        elif path.is_file():
            questions, source = qs.from_file(path), f"the questions of {path.name}"
        else:
            raise LlamaRerankError(f"--queries {queries}: use 'synthetic', a JSONL file of questions, or a BEIR-layout/Cranfield folder")
        questions = questions[:n_queries] if n_queries else questions
    if len(questions) < qs.MIN_QUESTIONS:
        raise LlamaRerankError(f"only {len(questions)} usable questions (dropped: {dropped}); a tune needs at least {qs.MIN_QUESTIONS}: "
                               "use more documents, a larger --n-queries, or another --question-llm")  # fmt: skip
    if not stand_in:
        qs.save(out / "queries.jsonl", questions)
    index = stores.load_index(location, embed_model, collection=collection)
    retriever = index.as_retriever(similarity_top_k=top_k)
    retrieved = {q.id: retriever.retrieve(q.text) for q in tqdm(questions, desc="retrieve", unit="question", disable=not progress)}
    return Plan(location, collection, questions, dropped, retrieved, source, unwritten)


def _ci(values: Sequence[float], seed: int) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of the mean (scipy); None for fewer than two values."""
    if len(values) < 2:
        return None
    if len(set(values)) == 1:
        return (values[0], values[0])
    stats = require("scipy.stats", "eval")
    import numpy

    res = stats.bootstrap((numpy.asarray(values, dtype=float),), numpy.mean, n_resamples=2000, method="percentile",
                          confidence_level=0.95, random_state=seed)  # fmt: skip
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def _percentile(values: Sequence[float], q: float) -> float:
    import numpy

    return float(numpy.percentile(values, q)) if values else 0.0


def held_out_stats(first: sweep.Scores, chosen: sweep.Scores, top_n: int, prices: Mapping[str, float] | None, seed: int) -> dict[str, Any]:
    """Means with 95% bootstrap intervals for both, the paired difference's interval and p-values, the chosen
    setting's p50/p95 rerank latency, and tokens (and money, with prices) per 1,000 questions."""
    ids = list(first.per_query)
    out: dict[str, Any] = {"metrics": {}}
    for key in (NDCG, MRR, recall_key(top_n)):
        a = [first.per_query[q][key] for q in ids]
        b = [chosen.per_query[q][key] for q in ids]
        diff = [y - x for x, y in zip(a, b)]
        out["metrics"][key] = {
            "first_stage": sum(a) / len(a), "first_stage_ci": _ci(a, seed), "reranked": sum(b) / len(b),
            "reranked_ci": _ci(b, seed), "gain": sum(diff) / len(diff), "gain_ci": _ci(diff, seed), "p": paired_tests(b, a),
        }  # fmt: skip
    records = list(chosen.judged.values())
    latencies = [r.latency_s for r in records]
    prompt = 1000 * sum(r.prompt_tokens for r in records) / len(records)
    completion = 1000 * sum(r.completion_tokens for r in records) / len(records)
    out.update(
        latency_p50_s=_percentile(latencies, 50), latency_p95_s=_percentile(latencies, 95),
        llm_calls_per_1000=1000 * sum(r.llm_calls for r in records) / len(records),
        prompt_tokens_per_1000=prompt, completion_tokens_per_1000=completion,
        cost_per_1000=None if prices is None else (prompt * prices["prompt"] + completion * prices["completion"]) / 1e6,
        cached_questions=sum(r.cache_hits > 0 for r in records), questions=len(records),
    )  # fmt: skip
    return out


def points(scores: sweep.Scores) -> tuple[list[float], list[bool], list[str]]:
    """(un-normalised final score, relevant?, question id) for every candidate of every question of ``scores``."""
    xs, ys, ids = [], [], []
    for query_id, judged in scores.judged.items():
        _, final = sweep.final_scores(judged, scores.setting.weight or 0.0)
        relevant = scores.relevant[query_id]
        for c in judged.candidates:
            xs.append(final[c["node"]])
            ys.append(relevant.get(c["unit"], 0) > 0)
            ids.append(query_id)
    return xs, ys, ids


def calibrate(tune: sweep.Scores, held: sweep.Scores, target: float) -> dict[str, Any]:
    """Fit on the tune split's candidates; ECE before (the score read as a probability) and after on the held-out
    split, the threshold reaching ``target`` precision on the tune split, and how it fares held out."""
    x_tune, y_tune, _ = points(tune)
    x_held, y_held, held_ids = points(held)
    fitted = calibration.fit(x_tune, y_tune)
    if fitted is None:
        return {"fitted": None, "why": "the tune split's candidates are all relevant or all not: nothing to fit",
                "points": len(x_tune), "positives": sum(y_tune)}  # fmt: skip
    p_tune = [fitted(x) for x in x_tune]
    p_held = [fitted(x) for x in x_held]
    cut = calibration.threshold(p_tune, y_tune, target)
    out: dict[str, Any] = {
        "fitted": fitted.to_dict(), "points": len(x_tune), "positives": sum(y_tune), "held_points": len(x_held),
        "ece_before": calibration.ece([min(max(x, 0.0), 1.0) for x in x_held], y_held), "ece_after": calibration.ece(p_held, y_held),
        "reliability_before": calibration.reliability([min(max(x, 0.0), 1.0) for x in x_held], y_held),
        "reliability_after": calibration.reliability(p_held, y_held), "threshold": cut, "target_precision": target,
    }  # fmt: skip
    if cut is not None:
        passing = [y for p, y in zip(p_held, y_held) if p >= cut]
        out["held_precision"] = sum(passing) / len(passing) if passing else None
        best: dict[str, float] = {}
        for query_id, p in zip(held_ids, p_held):
            best[query_id] = max(p, best.get(query_id, 0.0))
        out["nothing_passes"] = sum(b < cut for b in best.values()) / len(best)
    return out


def tune(
    out: str | Path, docs: str | Path | None = None, *, store: str | None = None, collection: str = stores.DEFAULT_COLLECTION,
    llm: LLM | None = None, llm_spec: str = "local", question_llm: LLM | None = None, queries: str = "synthetic",
    n_queries: int = 40, budget_minutes: float | None = None, top_ks: Sequence[int] = (10, 20), windows: Sequence[int] = (10,),
    weights: Sequence[float] = (0.0, 0.25, 0.5, 0.75), top_ns: Sequence[int] = (3, 5), target_precision: float = 0.8,
    seed: int = 0, prices: Mapping[str, float] | None = None, embed_model: BaseEmbedding | None = None, progress: bool = True,
) -> TuneResult:  # fmt: skip
    """Run a tune (see the module docstring); ``llm`` overrides ``make_llm(llm_spec)``, ``question_llm`` defaults
    to the judge."""
    started = clock()
    deadline = math.inf if budget_minutes is None else started + 60 * budget_minutes
    out = Path(out).expanduser()
    embed_model = embed_model or pipeline.default_embedding()
    llm = llm or pipeline.make_llm(llm_spec)
    pairs = sorted({(k, w) for k in top_ks for w in windows})
    the_plan = plan(out, Path(docs).expanduser() if docs else None, store=store, collection=collection, embed_model=embed_model,
                    queries=queries, n_queries=n_queries, seed=seed, question_llm=question_llm or llm, top_k=max(top_ks),
                    progress=progress, questions_until=started + QUESTION_SHARE * (deadline - started))  # fmt: skip
    tune_qs, held_qs = sweep.split(the_plan.questions)
    options = {k: v for k, v in pipeline.reranker_defaults(llm_spec).items() if k not in FUSION_KEYS}
    judging = sweep.Judging(out, llm, options)
    first_k = pairs[0][0]
    total = sum(len(judging.todo(k, w, tune_qs)) for k, w in pairs) + len(held_qs)
    judged: dict[tuple[int, int], dict[str, sweep.Judged]] = {}
    skipped: list[tuple[int, int]] = []
    pace: float | None = None  # seconds per question at K = first_k
    with tqdm(total=total, desc="tune", unit="question", disable=not progress) as bar:
        for k, w in pairs:
            todo = judging.todo(k, w, tune_qs)
            if judged and pace is not None and clock() + pace * k / first_k * (len(todo) + len(held_qs)) > deadline:
                skipped.append((k, w))
                bar.total -= len(todo)
                bar.refresh()
                continue
            began = clock()
            judged[(k, w)] = judging.judge(k, w, tune_qs, the_plan.retrieved, bar.update)
            if pace is None:  # measured, or for a resumed pair its recorded per-question times (overlapping: an overestimate)
                spent = clock() - began if todo else sum(r.latency_s for r in judged[(k, w)].values())
                pace = spent / (len(todo) or len(tune_qs)) * first_k / k
        scores = [sweep.score(sweep.Setting(max(top_ks), None, None), _first(tune_qs, the_plan, max(top_ks)), tune_qs, top_ns)]
        for (k, w), by_query in judged.items():
            scores += [sweep.score(sweep.Setting(k, w, weight), by_query, tune_qs, top_ns) for weight in weights]
        chosen = sweep.choose(scores[1:])
        top_n = sweep.choose_n(chosen, top_ns)
        k, w = chosen.setting.k, chosen.setting.window
        bar.total += len(judging.todo(k, w, held_qs)) - len(held_qs)
        bar.refresh()
        held = judging.judge(k, w, held_qs, the_plan.retrieved, bar.update)
    held_first = sweep.score(sweep.Setting(max(top_ks), None, None), _first(held_qs, the_plan, max(top_ks)), held_qs, [top_n])
    held_chosen = sweep.score(chosen.setting, held, held_qs, [top_n])
    stats = held_out_stats(held_first, held_chosen, top_n, prices, seed)
    cal = calibrate(chosen, held_chosen, target_precision)
    reranker = {**options, "top_n": top_n, "window_size": w, "retrieval_weight": chosen.setting.weight, "normalize": False}
    if cal["fitted"] is not None:
        reranker["min_score"] = cal["threshold"]
    fitted_on = {  # paths as eval records them: no machine's absolute path
        "documents": portable(docs) if docs else None, "store": portable(the_plan.location), "collection": the_plan.collection,
        "questions": the_plan.source, "tune_questions": len(tune_qs), "held_out_questions": len(held_qs),
        "judge_llm": llm_spec, "judge_model": model_identity(llm), "embed_model": embed_model.model_name,
    }  # fmt: skip
    written = settings_file.write(out / settings_file.FILE, reranker, k, cal["fitted"], target_precision, fitted_on)
    options_used = {"top_ks": list(top_ks), "windows": list(windows), "weights": list(weights), "top_ns": list(top_ns),
                    "budget_minutes": budget_minutes, "prices": dict(prices) if prices else None, "seed": seed}  # fmt: skip
    return TuneResult(the_plan, scores, skipped, chosen, top_n, held_first, held_chosen, stats, cal, written, options_used)


def _first(questions: Sequence[Question], the_plan: Plan, k: int) -> dict[str, sweep.Judged]:
    return {q.id: sweep.first_stage(q, the_plan.retrieved[q.id], k) for q in questions}


def estimate(
    out: str | Path, docs: str | Path | None = None, *, llm: LLM, question_llm: LLM | None = None, store: str | None = None,
    collection: str = stores.DEFAULT_COLLECTION, llm_spec: str = "local", queries: str = "synthetic", n_queries: int = 40,
    top_ks: Sequence[int] = (10, 20), windows: Sequence[int] = (10,), seed: int = 0, prices: Mapping[str, float] | None = None,
    embed_model: BaseEmbedding | None = None, progress: bool = True,
) -> list[tuple[str, RerankEstimate]]:  # fmt: skip
    """What ``tune`` with the same arguments would send to the LLMs, without calling them: the questions still to
    write (about ``QUESTION_ANSWER_TOKENS`` completion tokens each; dropped replies make it ask for more), then per
    (K, window) the tune split's questions not judged yet, and the held-out check (run for one pair, the chosen).
    Questions not written yet are stood in by their passage's first words. The documents are indexed."""
    out = Path(out).expanduser()
    embed_model = embed_model or pipeline.default_embedding()
    question_llm = question_llm or llm
    the_plan = plan(out, Path(docs).expanduser() if docs else None, store=store, collection=collection, embed_model=embed_model,
                    queries=queries, n_queries=n_queries, seed=seed, question_llm=question_llm, top_k=max(top_ks),
                    progress=progress, stand_in=True)  # fmt: skip
    count = qs.QuestionWriter(question_llm, out).caller.count
    writing = RerankEstimate(cost=0.0 if prices else None)
    for text in the_plan.unwritten:
        tokens = count(qs.prompt(question_llm, text))
        cost = None if prices is None else (tokens * prices["prompt"] + QUESTION_ANSWER_TOKENS * prices["completion"]) / 1e6
        writing.add(RerankEstimate(0, 1, tokens, QUESTION_ANSWER_TOKENS, 0, cost))
    rows = [("write questions", writing)]
    tune_qs, held_qs = sweep.split(the_plan.questions)
    options = {k: v for k, v in pipeline.reranker_defaults(llm_spec).items() if k not in FUSION_KEYS}
    judging = sweep.Judging(out, llm, options)
    for k, w in sorted({(k, w) for k in top_ks for w in windows}):
        reranker = judging.reranker(k, w)
        for label, group in (("tune split", tune_qs), ("held-out check", held_qs)):
            total = RerankEstimate(cost=0.0 if prices else None)
            for q in judging.todo(k, w, group):
                total.add(reranker.estimate(q.text, the_plan.retrieved[q.id][:k], prices))
            rows.append((f"{label}, K={k} window={w}", total))
    return rows


def estimate_table(rows: Sequence[tuple[str, RerankEstimate]]) -> str:
    """``tune --dry-run``: one line per step, and what is not counted."""
    priced = any(e.cost is not None for _, e in rows)
    width = max(len(name) for name, _ in rows)
    lines = [f"{'step':<{width}}  {'LLM calls':>9}  {'prompt tok':>10}  {'compl. tok':>10}" + ("  cost" if priced else "")]
    for name, e in rows:
        cost = f"  {e.cost:.4f}" if priced and e.cost is not None else ""
        lines.append(f"{name:<{width}}  {e.llm_calls:>9}  {e.prompt_tokens:>10}  {e.completion_tokens:>10}{cost}")
    return "\n".join(lines) + (
        "\nNothing was sent to an LLM. The held-out check runs for the chosen pair only; replies that are dropped make "
        "tune ask for more questions; follow-ups, retries and hidden reasoning tokens are not counted."
    )
