"""The judgement cache and the shared concurrency budget, measured.

``repeated``: a repeated-query workload, as FAQ traffic or evaluation reruns make it: QUERIES queries drawn
Zipf-style (weight 1/rank) from QUESTIONS Cranfield questions, each question always over the same ten candidates
(consecutive 60-word slices of the Cranfield abstracts), reranked one after another by one ``LikelihoodRerank``
without a cache, with ``cache="memory"`` and with an SQLite file. It prints LLM calls, prompt and completion tokens
and the p50/p95 of the per-query wall time. ``--llm simulated`` (default) uses the simulated LLM of the
orchestration benchmark (latency model scaled by ``--scale``); ``--llm local`` the bundled model with its tuned
settings (keep the workload short: a miss takes seconds).

``ratelimit``: CONCURRENT queries arrive at once (an app server's request threads), each with K=40 candidates
(four windows), against a simulated provider that serves at most LIMIT calls at once and answers any call over
that with a 429 and ``Retry-After``. Without the shared budget each request builds its own reranker (what every
``rerank`` call did before the budget was per instance); with it, one reranker serves them all. Both have
``max_concurrency=LIMIT`` and the default two retries. It prints the 429s, the windows that fell back to
retrieval order, the queries touched by a fallback, and the wall time.

    python benchmarks/cache_budget.py repeated [--queries 2000] [--questions 200] [--scale 0.02]
    python benchmarks/cache_budget.py repeated --llm local --queries 30 --questions 10
    python benchmarks/cache_budget.py ratelimit [--concurrent 24] [--limit 4] [--scale 0.1]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import cranfield, machine_header, make_passages, nodes_for, table  # noqa: E402
from fake_llms import Latency, RateLimitedLLM, SimulatedLLM  # noqa: E402

from llama_rerank import LikelihoodRerank  # noqa: E402
from llama_rerank.types import RerankUsage  # noqa: E402

CANDIDATES, WORDS = 10, 60


def questions(count: int) -> list[str]:
    """The first ``count`` Cranfield questions, in file order."""
    text = (cranfield() / "cran.qry").read_text(encoding="utf-8", errors="replace")
    found = [" ".join(q.split("\n.W\n", 1)[1].split()) for q in text.split(".I ")[1:]]
    if count > len(found):
        raise SystemExit(f"--questions: Cranfield has {len(found)} questions")
    return found[:count]


def zipf_draws(count: int, population: int, seed: int = 0) -> list[int]:
    """``count`` question numbers drawn with weight 1/rank (question 0 the most frequent), seeded."""
    weights = [1 / (rank + 1) for rank in range(population)]
    return random.Random(seed).choices(range(population), weights=weights, k=count)


def percentile(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]


def repeated(args: argparse.Namespace) -> None:
    asked = questions(args.questions)
    _, passages = make_passages(args.questions * CANDIDATES, WORDS)
    draws = zipf_draws(args.queries, args.questions)
    if args.llm == "local":
        from llama_rerank.pipeline import make_llm, reranker_defaults

        llm, settings, about = make_llm("local"), reranker_defaults("local"), "the bundled model, tuned local settings"
    else:
        latency = Latency().scaled(args.scale)
        llm, settings, about = SimulatedLLM(latency), {}, f"simulated: {latency}"
    print(machine_header("Judgement cache: a repeated-query workload"))
    print(f"workload    : {args.queries} queries drawn Zipf-style (weight 1/rank, seed 0) from {args.questions} Cranfield "
          f"questions; {len(set(draws))} distinct questions drawn, the most frequent {draws.count(0)} times")
    print(f"candidates  : {CANDIDATES} per question, always the same ({WORDS}-word slices of the Cranfield abstracts)")
    print(f"LLM         : {about}; queries reranked one after another")
    print()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cache in (("no cache", None), ('cache="memory"', "memory"), ("cache=SQLite file", str(Path(tmp) / "judgements.sqlite"))):
            reranker = LikelihoodRerank(llm=llm, top_n=CANDIDATES, cache=cache, **settings)
            total, walls = RerankUsage(), []
            started = time.perf_counter()
            for q in draws:
                result = reranker.rerank(asked[q], nodes_for(passages[q * CANDIDATES : (q + 1) * CANDIDATES]))
                total.add(result.usage)
                walls.append(result.usage.wall_time_s)
            elapsed = time.perf_counter() - started
            rows.append([name, total.llm_calls, total.prompt_tokens, total.completion_tokens, total.cache_hits,
                         f"{percentile(walls, 50) * 1000:.1f} ms", f"{percentile(walls, 95) * 1000:.1f} ms", f"{elapsed:.1f} s"])  # fmt: skip
    print(table(["run", "LLM calls", "prompt tokens", "completion tokens", "candidates from cache", "p50 per query",
                 "p95 per query", "total wall"], rows))  # fmt: skip


def ratelimit(args: argparse.Namespace) -> None:
    latency = Latency().scaled(args.scale)
    retry_after = round(latency.seconds(900, 40), 3)  # about one call's time
    _, passages = make_passages(args.concurrent * 40, WORDS)
    asked = questions(args.concurrent)
    print(machine_header("Shared concurrency budget: concurrent queries against a rate-limited provider"))
    print(f"workload    : {args.concurrent} queries at once (one thread each), K=40 candidates (4 windows of 10) each")
    print(f"provider    : simulated ({latency}); serves at most {args.limit} calls at once, any call over that gets "
          f"429 with Retry-After {retry_after:g} s")
    print(f"reranker    : max_concurrency={args.limit}, max_retries=2 (defaults otherwise), on_error='fallback'")
    print()
    logging.getLogger("llama_rerank").setLevel(logging.ERROR)  # the 429 retries and fallbacks are counted below
    rows = []
    for name, shared in (("a reranker per request (no shared budget)", False), ("one reranker, shared budget", True)):
        llm = RateLimitedLLM(latency, limit=args.limit, retry_after=retry_after)
        one = LikelihoodRerank(llm=llm, top_n=5, max_concurrency=args.limit)

        def run(i: int) -> RerankUsage:
            reranker = one if shared else LikelihoodRerank(llm=llm, top_n=5, max_concurrency=args.limit)
            return reranker.rerank(asked[i], nodes_for(passages[i * 40 : (i + 1) * 40])).usage

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrent) as pool:
            usages = list(pool.map(run, range(args.concurrent)))
        wall = time.perf_counter() - started
        meter = llm.reset()
        rows.append([name, llm.rejected, meter.calls, sum(u.failed_windows for u in usages),
                     sum(u.failed_windows > 0 for u in usages), f"{wall:.1f} s"])  # fmt: skip
    print(table(["run", "429s", "calls served", "windows fallen back", "queries with a fallback", "wall time"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    rep = sub.add_parser("repeated", help="the Zipf workload with and without the judgement cache")
    rep.add_argument("--queries", type=int, default=2000)
    rep.add_argument("--questions", type=int, default=200)
    rep.add_argument("--llm", choices=("simulated", "local"), default="simulated")
    rep.add_argument("--scale", type=float, default=0.02, help="multiply the simulated latency by this (default: %(default)s)")
    rate = sub.add_parser("ratelimit", help="concurrent queries against a rate-limited provider, with and without the shared budget")
    rate.add_argument("--concurrent", type=int, default=24)
    rate.add_argument("--limit", type=int, default=4)
    rate.add_argument("--scale", type=float, default=0.1, help="multiply the simulated latency by this (default: %(default)s)")
    args = parser.parse_args()
    repeated(args) if args.part == "repeated" else ratelimit(args)


if __name__ == "__main__":
    main()
