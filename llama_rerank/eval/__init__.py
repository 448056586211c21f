"""Offline evaluation of rerankers: ``llama-rerank eval PATH``.

It owns the ``eval`` command's arguments and glue, and ``EvalError``. The work lives in
``datasets`` (BEIR / Cranfield loaders), ``systems`` (the reranker registry), ``run`` (index, retrieve, rerank,
cache and resume), ``metrics`` (ir-measures and paired tests) and ``report`` (table, plot, JSON).
Heavy dependencies (ir-measures, scipy, matplotlib, RankGPT) are imported where used: ``pip install 'llama-rerank[eval]'``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from llama_rerank.errors import LlamaRerankError

DEFAULT_SYSTEMS = "first-stage,likelihood,likelihood-label,llm-rerank,rankgpt"


class EvalError(LlamaRerankError):
    """An evaluation that cannot run as asked: unknown data layout, system, parameter or query split."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``eval`` subcommand's arguments."""
    parser.add_argument("path", type=Path, help="a BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv) or the Cranfield folder")
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS,
                        help="comma-separated systems; parameters as name:key=value,key=value "
                             "(e.g. likelihood:window_size=1,retrieval_weight=0.7) (default: %(default)s)")  # fmt: skip
    parser.add_argument("--top-k", type=int, default=20, help="candidates from the first stage (default: %(default)s)")
    parser.add_argument("--top-n", type=int, default=10, help="N of Recall@N (default: %(default)s)")
    parser.add_argument("--split", default=None,
                        help="BEIR qrels split, qrels/SPLIT.tsv (default: the only one there is, else test)")
    parser.add_argument("--queries-split", choices=("all", "tune", "test"), default="all",
                        help="fixed half of the judged queries: tune = 1st, 3rd, 5th... in id order, test = 2nd, 4th... (default: %(default)s)")  # fmt: skip
    parser.add_argument("--limit-queries", type=int, default=None, help="evaluate a seeded random sample of N queries")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit-queries sample (default: %(default)s)")
    parser.add_argument("--exclude-queries", type=Path, default=None, metavar="RESULTS.json",
                        help="leave out the queries an earlier run's --json reported (e.g. a held-out sample already used)")
    parser.add_argument("--llm", default="local", help="'local' (default), 'openai:<model>' or an OpenAI-compatible server URL")
    parser.add_argument("--store", default=None, help="Chroma directory or URL for the corpus index (default: a per-corpus folder in the user data dir)")
    parser.add_argument("--cache", type=Path, default=None, help="folder of the per-query result cache (default: STORE/eval-cache)")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG bar plot comparing the systems here")


def command(args: argparse.Namespace, embed_model: Any) -> int:
    """Run ``llama-rerank eval``: evaluate, print the table, write the JSON and the plot when asked."""
    from llama_rerank.eval import metrics, report
    from llama_rerank.eval.run import estimate, evaluate
    from llama_rerank.eval.systems import split_systems

    exclude = report.reported_queries(args.exclude_queries) if args.exclude_queries else set()
    options = dict(
        top_k=args.top_k, top_n=args.top_n, split=args.split, queries_split=args.queries_split, limit_queries=args.limit_queries,
        seed=args.seed, exclude_queries=exclude, llm_spec=args.llm, store=args.store, cache=args.cache, embed_model=embed_model,
        reranker_settings=getattr(args, "reranker_settings", None),  # from --settings (llama_rerank.cli)
    )  # fmt: skip
    if args.dry_run:
        print(report.estimate_table(estimate(args.path, split_systems(args.systems), prices=args.prices, **options)))
        return 0
    run = evaluate(args.path, split_systems(args.systems), **options)
    scores = metrics.score(run.results, run.dataset.qrels, args.top_n)
    print(report.table(scores, args.top_n))
    if args.json:
        report.write_json(args.json, run, scores)
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(args.plot, scores, args.top_n, run.dataset.name)
        print(f"wrote {args.plot}")
    return 0
