"""Choose the local model's reranking settings on the Cranfield *tune* half, with as few LLM calls as possible.

Each LLM configuration (window size, passage length) is run once with fusion off; every candidate's LLM score,
label and retrieval rank/score are cached in JSONL (a rerun resumes). Fusion weights, retrieval signals and
label-vs-logprob scoring are then swept offline through the library's own ``scoring.fuse`` and ``order``, so the
numbers are exactly what ``LikelihoodRerank(retrieval_weight=w, ...)`` would produce. ``--reverse`` also judges
each configuration with the candidates in reversed order and adds the rows of ``reverse_pass=True`` (the two passes
averaged by the library's ``scoring.average_passes``); ``--prompt FILE`` swaps in another user message template
(``benchmarks/prompts/``; the judgements are cached under the user message's text, so a change of the default prompt
starts new ones).
``--cached-only`` judges nothing new and compares the configurations on the queries every one of them has cached
(for runs cut short). ``--mix`` (two configurations that differ in their windows, e.g. window_size=10 and 5) adds
what a per-candidate judgement cache would serve: each query's candidates scored half by one run and half by the
other (alternating, both ways round), so a label given among other window mates is reused.

    python benchmarks/tune_local.py --limit-queries 30 --top-k 10 \
        --config window_size=10,max_passage_tokens=128 --config window_size=1,max_passage_tokens=128
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
from pathlib import Path

from llama_index.core.prompts import ChatPromptTemplate
from tqdm import tqdm

from llama_rerank import LikelihoodRerank
from llama_rerank.eval.datasets import load_dataset, select_queries
from llama_rerank.eval.metrics import NDCG, doc_ranking, paired_tests, per_query
from llama_rerank.eval.run import build_index, default_store, fingerprint
from llama_rerank.eval.systems import parse_spec
from llama_rerank.pipeline import DATA_DIR, default_embedding, make_llm
from llama_rerank.prompts import SYSTEM_PROMPT, USER_PROMPT
from llama_rerank.scoring import average_passes, fuse, order
from llama_rerank.types import Candidate, Judgement


WEIGHTS = [round(0.1 * i, 1) for i in range(11)]
ADAPT = (0.2, 0.4, 0.6)  # spreads of the LLM scores at and above which a query's judge gets its full weight


def judge_all(
    config: dict, query_ids: list[str], dataset, retriever, llm, cache: Path, reverse: bool, prompt: str,
    own_prompt: bool, cached_only: bool = False, head: dict[str, list[dict]] | None = None,
) -> dict[str, list[dict]]:
    """Per query, the candidates in retrieval order with the LLM's score and label (cached by query and config).

    With ``reverse`` the LLM sees the candidates in reversed order (the second pass of ``reverse_pass=True``); at
    ``retrieval_weight=0`` the order they are given in changes nothing else. ``head``: the same configuration's
    judgements at a smaller K that fills whole windows; where a query's head is the first of its candidates, only
    the rest are judged (a window's prompt numbers its own passages, so those judgements are the first windows').
    """
    done = read_cache(cache)
    reranker = LikelihoodRerank(llm=llm, top_n=retriever.similarity_top_k, **config)
    reranker.update_prompts({"rerank_prompt": ChatPromptTemplate.from_messages([("system", SYSTEM_PROMPT), ("user", prompt)])})
    with cache.open("a") as out:
        label = json.dumps(config) + (" reversed" if reverse else "") + (" own prompt" if own_prompt else "")
        for query_id in tqdm([q for q in query_ids if q not in done and not cached_only], desc=label, unit="query"):
            nodes = retriever.retrieve(dataset.queries[query_id])
            known = (head or {}).get(query_id, [])
            if reverse or len(nodes) < len(known) or any(  # the same candidates (a rebuilt index's scores move ~1e-7)
                c["doc"] != n.node.metadata["corpus_id"] or abs(c["retrieval_score"] - n.score) > 1e-5 for c, n in zip(known, nodes)
            ):
                known = []
            result = reranker.rerank(dataset.queries[query_id], nodes[::-1] if reverse else nodes[len(known) :])
            by_id = {n.node.node_id: n.node.metadata for n in result.nodes}
            usage = result.usage
            cost = {"wall_s": usage.wall_time_s, "calls": usage.llm_calls, "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens, "unparsed": usage.unparsed}  # fmt: skip
            if known:
                cost = {key: value + known[0][key] for key, value in cost.items()}
            candidates = [{key: c[key] for key in ("doc", "retrieval_score", "llm_score", "label")} | cost for c in known] + [
                {"doc": n.node.metadata["corpus_id"], "retrieval_score": n.score, "llm_score": by_id[n.node.node_id]["rerank_score"],
                 "label": by_id[n.node.node_id]["rerank_label"], **cost} for n in nodes[len(known) :]]  # fmt: skip
            done[query_id] = candidates
            out.write(json.dumps({"query_id": query_id, "candidates": candidates}) + "\n")
            out.flush()
    return done


def read_cache(cache: Path) -> dict[str, list[dict]]:
    """A judgement cache's records by query (a torn last line is skipped)."""
    done: dict[str, list[dict]] = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            try:
                record = json.loads(line)
                done[record["query_id"]] = record["candidates"]
            except (ValueError, KeyError):
                continue
    return done


def ranking(
    passes: list[list[dict]], scale, scoring: str, weight: float, signal: str, norm: bool, adapt: float | None = None
) -> list[str]:
    """The document ranking ``LikelihoodRerank`` returns with these settings, from one or two cached passes.

    ``adapt`` (measured here, not in the library): the query's own weight grows toward 1 (the first stage) as the
    spread of its LLM scores (highest minus lowest) falls below ``adapt``: ``1 - (1 - weight) * min(1, spread /
    adapt)``, so a judge that tells the candidates apart moves the order and one that says the same of all does not.
    """
    candidates = passes[0]
    cands = [Candidate(i, "", 0, c["retrieval_score"]) for i, c in enumerate(candidates)]

    def judgements(records: list[dict]) -> dict[int, Judgement]:
        return {
            i: Judgement(c["label"], c["llm_score"] if scoring == "logprobs" or c["label"] is None else scale.score(c["label"]), scoring)
            for i, c in enumerate(records)
        }  # fmt: skip

    judged = judgements(passes[0])
    if len(passes) == 2:
        judged = average_passes(judged, judgements(passes[1]))
    if adapt:
        spread = max(j.score for j in judged.values()) - min(j.score for j in judged.values())
        weight = 1 - (1 - weight) * min(1.0, spread / adapt)
    final = fuse(cands, judged, weight, signal, normalize=norm)
    return doc_ranking([candidates[c.index]["doc"] for c in order(cands, judged, final, None)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="cranfield", help="the dataset folder, or a collection name in $LLAMA_RERANK_DATA (default: %(default)s)")
    parser.add_argument("--queries-split", default="tune")
    parser.add_argument("--limit-queries", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--config", action="append", default=[],
                        help="LikelihoodRerank kwargs: window_size=1,max_passage_tokens=128 or a JSON object")
    parser.add_argument("--prompt", type=Path, default=None, help="a user message template to use instead of the default's")
    parser.add_argument("--reverse", action="store_true", help="also judge in reversed order and sweep reverse_pass")
    parser.add_argument("--cached-only", action="store_true",
                        help="judge nothing new: compare the configurations on the queries every one has in its cache")
    parser.add_argument("--mix", action="store_true", help="with two configurations: also sweep their per-candidate mix")
    parser.add_argument("--out", default=str(DATA_DIR / "tuning"))
    parser.add_argument("--cut", type=int, action="append", default=[],
                        help="also sweep each query's first N candidates: what --top-k N gives, whose windows are the "
                             "first windows of this run (window_size 10, so N = 10 reads K = 10 from a K = 20 run)")  # fmt: skip
    parser.add_argument("--extend-from", type=int, default=None, metavar="K",
                        help="reuse this configuration's judgements at top-k K (whole windows) as each query's first "
                             "windows and judge only the rest")  # fmt: skip
    parser.add_argument("--judge-only", action="store_true", help="judge and cache, print no result (held-out queries)")
    parser.add_argument("--fusion", default=None, metavar="SCORING,SIGNAL,W",
                        help="print only this row, e.g. logprobs+mm,rank,0.5 (a held-out report of a chosen setting)")
    args = parser.parse_args()

    dataset = load_dataset(args.path)
    query_ids = select_queries(dataset, args.queries_split, args.limit_queries, args.seed)
    embed = default_embedding()
    fp = fingerprint(dataset, embed)
    retriever = build_index(dataset, default_store(dataset, fp), embed).as_retriever(similarity_top_k=args.top_k)
    llm = make_llm("local", serve=not args.cached_only)  # judging nothing new needs no server
    prompt = args.prompt.read_text().rstrip("\n") if args.prompt else USER_PROMPT
    runs = []
    for config_text in args.config or ["window_size=10"]:
        config = json.loads(config_text) if config_text.startswith("{") else parse_spec("likelihood:" + config_text)[1]
        passes = []
        for reverse in (False, True)[: 1 + args.reverse]:
            cache, head = (cache_path(args.out, config, k, fp, reverse, prompt) for k in (args.top_k, args.extend_from))
            cache.parent.mkdir(parents=True, exist_ok=True)
            passes.append(judge_all(config, query_ids, dataset, retriever, llm, cache, reverse, prompt, args.prompt is not None,
                                    args.cached_only, read_cache(head) if args.extend_from else None))  # fmt: skip
        runs.append((config_text, config, passes))
    if args.judge_only:
        print(f"judged {len(query_ids)} {args.queries_split} queries; results not shown (--judge-only)")
        return
    if args.cached_only:
        query_ids = [q for q in query_ids if all(q in judged for _, _, passes in runs for judged in passes)]
    for k in [args.top_k] + args.cut:
        cut = [(text, config, [{q: judged[q][:k] for q in judged} for judged in passes]) for text, config, passes in runs]
        report(args, cut, query_ids, dataset, llm, k)


def cache_path(out: str, config: dict, top_k: int, fp: str, reverse: bool, prompt: str) -> Path:
    """The judgement cache of one configuration, K, corpus, pass and user message."""
    key = [config, top_k, fp] + (["reversed"] if reverse else []) + [prompt]
    return Path(out) / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]}.jsonl"


def report(args, runs: list, query_ids: list[str], dataset, llm, k: int) -> None:
    """The sweep's table for the runs' first ``k`` candidates of each query."""
    first = {q: doc_ranking([c["doc"] for c in runs[0][2][0][q]]) for q in query_ids}  # the judged candidates, in retrieval order
    base = per_query(first, dataset.qrels, 10)
    base_ndcg = [base[q][NDCG] for q in query_ids]
    print(f"{len(query_ids)} {args.queries_split} queries of {dataset.name}, top-k {k}; first stage nDCG@10 {statistics.mean(base_ndcg):.4f}"
          + (f" (judged at top-k {args.top_k}; s/query is that run's)" if k != args.top_k else ""))
    print(f"{'config':<44} {'scoring':<12} {'signal':<9} {'w':>4} {'nDCG@10':>8} {'delta':>7} {'p(t)':>6} {'p(W)':>6} {'+/-':>6} {'s/query':>8}")
    if args.mix:
        runs += mixes(runs, query_ids)
    for config_text, config, passes in runs:
        passes = [{q: judged[q] for q in query_ids} for judged in passes]
        scale = LikelihoodRerank(llm=llm, **config).scale
        print(config_text, separation(passes, query_ids, dataset.qrels))
        print(config_text, costs(passes[0], query_ids))
        for n_passes in range(1, len(passes) + 1):
            name = config_text + (f" +{args.prompt.name}" if args.prompt else "") + (" +reverse_pass" if n_passes == 2 else "")
            wall = sum(statistics.mean(c[0]["wall_s"] for c in judged.values()) for judged in passes[:n_passes])
            sweep(name, passes[:n_passes], scale, query_ids, dataset, base_ndcg, wall, args.fusion)


def mixes(runs: list, query_ids: list[str]) -> list:
    """The two per-candidate mixes of two runs' first passes: even positions from one run, odd from the other."""
    if len(runs) != 2:
        raise SystemExit("--mix needs exactly two --config")
    (_, config, (a, *_)), (_, _, (b, *_)) = runs
    for q in query_ids:
        assert [c["doc"] for c in a[q]] == [c["doc"] for c in b[q]], f"query {q}: the runs judged other candidates"
    return [
        (f"mix ({'1st' if first == a else '2nd'} config at even ranks)", config,
         [{q: [(first if i % 2 == 0 else second)[q][i] for i in range(len(a[q]))] for q in query_ids}])
        for first, second in ((a, b), (b, a))
    ]  # fmt: skip


def separation(passes: list[dict], query_ids: list[str], qrels) -> str:
    """Mean within-query AUC (how often a relevant candidate outscores a non-relevant one of the same query) of the
    dense score, of each pass's LLM score, and of the passes' average: the LLM's own signal, before any fusion."""
    from scipy.stats import mannwhitneyu

    def auc(score) -> float:
        values = []
        for q in query_ids:
            cands = passes[0][q]
            relevant = [qrels.get(q, {}).get(c["doc"], 0) > 0 for c in cands]
            if 0 < sum(relevant) < len(cands):
                pos = [score(q, i) for i, r in enumerate(relevant) if r]
                neg = [score(q, i) for i, r in enumerate(relevant) if not r]
                values.append(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))
        return statistics.mean(values)

    parts = [f"dense {auc(lambda q, i: passes[0][q][i]['retrieval_score']):.3f}"]
    parts += [f"pass {n + 1} {auc(lambda q, i: judged[q][i]['llm_score']):.3f}" for n, judged in enumerate(passes)]
    if len(passes) == 2:
        parts.append(f"average {auc(lambda q, i: passes[0][q][i]['llm_score'] + passes[1][q][i]['llm_score']):.3f}")
    return "within-query AUC: " + ", ".join(parts)


def costs(judged: dict[str, list[dict]], query_ids: list[str]) -> str:
    """Per query: LLM calls, prompt and answer tokens, seconds; and candidates left unlabelled (parse failures)."""
    first = [judged[q][0] for q in query_ids]
    if "calls" not in first[0]:
        return "costs: not recorded in this cache"
    mean = lambda key: statistics.mean(c[key] for c in first)  # noqa: E731
    unlabelled = sum(c["label"] is None for q in query_ids for c in judged[q])
    return (f"per query: {mean('calls'):.2f} calls, {mean('prompt_tokens'):.0f} prompt + {mean('completion_tokens'):.0f} "
            f"answer tokens, {mean('wall_s'):.1f} s; unlabelled {unlabelled} of {sum(len(judged[q]) for q in query_ids)}")


def sweep(
    name: str, passes: list[dict], scale, query_ids: list[str], dataset, base_ndcg: list[float], wall: float,
    only: str | None = None,
) -> None:
    """Print one row per scoring mode, fusion signal and weight (and the spread-adaptive weights of
    :func:`ranking` for min-max logprobs with the rank), or only the ``only`` row (``SCORING,SIGNAL,W``)."""
    rows = [(scoring, norm, signal, weight, None)
            for scoring, norm in (("logprobs", False), ("logprobs", True), ("label", False))
            for signal in ("rank", "score") for weight in (WEIGHTS if signal == "rank" else WEIGHTS[1:-1])]
    rows += [("logprobs", True, "rank", weight, adapt) for adapt in ADAPT for weight in WEIGHTS[2:8]]  # fmt: skip
    for scoring, norm, signal, weight, adapt in rows:
        kind = signal + (f"/a{adapt}" if adapt else "")
        if only and only.split(",") != [scoring + ("+mm" if norm else ""), kind, str(weight)]:
            continue
        runs = {q: ranking([judged[q] for judged in passes], scale, scoring, weight, signal, norm, adapt) for q in query_ids}
        values = per_query(runs, dataset.qrels, 10)
        ndcg = [values[q][NDCG] for q in query_ids]
        p = paired_tests(ndcg, base_ndcg)
        moved = f"{sum(a > b for a, b in zip(ndcg, base_ndcg))}/{sum(a < b for a, b in zip(ndcg, base_ndcg))}"
        print(f"{name:<44} {scoring + ('+mm' if norm else ''):<12} {kind:<9} {weight:>4.1f} {statistics.mean(ndcg):>8.4f} "
              f"{statistics.mean(ndcg) - statistics.mean(base_ndcg):>+7.4f} {_p(p['ttest_rel']):>6} {_p(p['wilcoxon']):>6} "
              f"{moved:>6} {wall:>8.1f}")  # fmt: skip


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
