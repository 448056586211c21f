"""``llama-rerank tune``: should I rerank my documents, and with which settings?

It owns the ``tune`` command's arguments and glue. The work lives in ``questions`` (synthetic questions, or a file
or dataset of judged ones), ``sweep`` (the split, judging each (K, window) once, scoring every fusion weight and N
from those judgements, the choice), ``calibration`` (score -> P(relevant), the threshold, ``CalibratedRerank``),
``settings`` (``settings.json``), ``run`` (the whole run, resume, budget, dry run) and ``report`` (``report.md`` and
its plots). Fitting and reporting need the ``eval`` extra (scikit-learn, scipy, matplotlib); loading
``settings.json`` and applying a calibration need only the base install.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _numbers(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"give comma-separated {kind.__name__}s, e.g. 10,20 (got {text!r})") from None
        if not values:
            raise argparse.ArgumentTypeError("give at least one value")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``tune`` subcommand's arguments (``--dry-run`` and ``--prices`` are added by the CLI)."""
    parser.add_argument("docs", type=Path, nargs="?", default=None,
                        help="a folder of documents (indexed into OUT/index), a BEIR-layout/Cranfield folder or a collection name (cranfield); omit it with --store")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="folder for settings.json, report.md and everything a rerun resumes from")
    parser.add_argument("--store", default=None, help="an existing Chroma directory or URL to tune over instead of DOCS")
    parser.add_argument("--collection", default=None, help="its collection (default: llama_rerank, the ingest default)")
    parser.add_argument("--llm", default="local", help="the judge: 'local' (default), 'openai:<model>' or an OpenAI-compatible server URL")
    parser.add_argument("--model", default=None, help="model name to ask a server URL for")
    parser.add_argument("--question-llm", default=None, help="the LLM that writes synthetic questions (default: the judge)")
    parser.add_argument("--queries", default="synthetic",
                        help="'synthetic' (default), a JSONL file of {query, relevant: [ids]}, a BEIR-layout/Cranfield folder or a collection name")  # fmt: skip
    parser.add_argument("--n-queries", type=int, default=40, help="questions to write (or to take from --queries) (default: %(default)s)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="time budget: question writing stops at a quarter of it (once 4 are written); settings that would not fit at the pace seen so far are skipped (the first and the held-out check always run)")  # fmt: skip
    parser.add_argument("--top-k", type=_numbers(int), default=[10, 20], help="first-stage candidates K to try (default: 10,20)")
    parser.add_argument("--window-size", type=_numbers(int), default=[10], help="window sizes to try (default: 10)")
    parser.add_argument("--weights", type=_numbers(float), default=[0.0, 0.25, 0.5, 0.75],
                        help="fusion weights of the first stage to try (free: no LLM call) (default: 0,0.25,0.5,0.75)")  # fmt: skip
    parser.add_argument("--top-n", type=_numbers(int), default=[3, 5], help="N, passages for the answer step, to try (free) (default: 3,5)")
    parser.add_argument("--target-precision", type=float, default=0.8, help="precision the min_score threshold aims at (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the passage sample and the bootstrap (default: %(default)s)")


def options(args: argparse.Namespace) -> dict[str, Any]:
    from llama_rerank import store

    collection = args.collection or store.DEFAULT_COLLECTION
    return dict(
        store=args.store, collection=collection, llm_spec=args.llm, queries=args.queries, n_queries=args.n_queries,
        top_ks=args.top_k, windows=args.window_size, seed=args.seed, prices=args.prices,
    )  # fmt: skip


def command(args: argparse.Namespace, embed_model: Any) -> int:
    """Run ``llama-rerank tune``: print the verdict and where the report and settings are, or with ``--dry-run``
    what it would send to the LLMs."""
    from llama_rerank import pipeline
    from llama_rerank.tune import report, run

    if args.dry_run:
        judge = pipeline.make_llm(args.llm, model=args.model, serve=False)
        writer = pipeline.make_llm(args.question_llm, serve=False) if args.question_llm else judge
        rows = run.estimate(args.out, args.docs, llm=judge, question_llm=writer, embed_model=embed_model, **options(args))
        print(run.estimate_table(rows))
        return 0
    judge = pipeline.make_llm(args.llm, model=args.model)
    writer = pipeline.make_llm(args.question_llm) if args.question_llm else judge
    try:
        result = run.tune(args.out, args.docs, llm=judge, question_llm=writer, embed_model=embed_model, weights=args.weights,
                          top_ns=args.top_n, budget_minutes=args.budget_minutes, target_precision=args.target_precision,
                          **options(args))  # fmt: skip
    except KeyboardInterrupt:
        print(f"\ninterrupted: what was judged is kept in {args.out}; run the same command again to resume", file=sys.stderr)
        return 130
    path = report.write(Path(args.out), result)
    print()
    print(report.verdict(result))
    print(f"\nwrote {path} and {Path(args.out) / 'settings.json'}")
    return 0
