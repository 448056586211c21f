"""The ``llama-rerank`` command: ``ingest``, ``query``, ``demo`` (and ``eval``). Each parses, calls one library
function and prints; library errors become ``TypeName: message`` and exit status 1."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Sequence

from llama_rerank.errors import LlamaRerankError
from llama_rerank.providers import explain, is_llm_failure, is_permanent

WIDTH = 48
TOP_K, TOP_N = 10, 3


def _snippet(text: str, width: int = WIDTH) -> str:
    return textwrap.shorten(" ".join(text.split()), width=width, placeholder="...")


def format_report(report: "QueryReport") -> str:  # noqa: F821 - imported lazily below
    """First-stage and reranked orders side by side (``*`` marks the known answer passage), a legend of the scores,
    where the known answer moved, then the answer, timings and token counts."""
    rows = [f"Query: {report.query}", "",
            f"{'#':>2}  {'first stage':<{WIDTH + 8}} | {'label':<15} {'llm':>5} {'final':>5} {'was':>3}  passage",
            "-" * (WIDTH * 2 + 48)]  # fmt: skip
    for i in range(max(len(report.first_stage), len(report.reranked))):
        left = right = ""
        if i < len(report.first_stage):
            node = report.first_stage[i]
            left = f"{node.score or 0:.3f} {_mark(report, node)}{_snippet(node.node.get_content())}"
        if i < len(report.reranked):
            node = report.reranked[i]
            meta = node.node.metadata
            right = (f"{meta['rerank_label'] or '-':<15} {meta['rerank_score']:>5.2f} {node.score:>5.2f} {meta['retrieval_rank']:>3} "
                     f"{_mark(report, node)}{_snippet(node.node.get_content())}")  # fmt: skip
        rows.append(f"{i + 1:>2}  {left:<{WIDTH + 8}} | {right}")
        if report.answer is not None and i + 1 == report.top_n < len(report.reranked):
            rows.append(f"{'':>2}  {'':<{WIDTH + 8}} | {'-' * 12} the passages above went to the answer step")
    rows += ["-" * (WIDTH * 2 + 48), report.score_legend]
    if report.known_answer is not None:
        before, after = report.known_rank(report.first_stage), report.known_rank(report.reranked)
        where = "not retrieved" if before is None else f"rank {before} before reranking, {after} after: {report.move}"
        rows += [f"* known answer passage ({report.known_answer}): {where}"]
    if report.answer is not None:
        rows += ["", "Answer:", textwrap.fill(report.answer, width=100)]
    if report.known_fact is not None:
        rows += ["", "The known answer passage says:", textwrap.fill(report.known_fact, width=100)]
    usage, t = report.usage, report.timings
    rows += ["", f"time: retrieve {t['retrieve']:.1f}s, rerank {t['rerank']:.1f}s, answer {t['answer']:.1f}s | "
                 f"rerank LLM calls {usage.llm_calls}, prompt tokens {usage.prompt_tokens}, "
                 f"completion tokens {usage.completion_tokens}, unparsed {usage.unparsed}, failed windows {usage.failed_windows}"]  # fmt: skip
    return "\n".join(rows)


def _mark(report: "QueryReport", node: "NodeWithScore") -> str:  # noqa: F821
    return "*" if report.is_known_answer(node) else " "


def format_moves(reports: Sequence["QueryReport"]) -> str:  # noqa: F821
    """The closing line: how many known answer passages reranking moved up, down or left where they were."""
    known = [r for r in reports if r.known_answer is not None]
    moves = Counter(r.move for r in known)
    first_before = sum(r.known_rank(r.first_stage) == 1 for r in known)
    first_after = sum(r.known_rank(r.reranked) == 1 for r in known)
    return (f"Known answer passages over {len(known)} quer{'y' if len(known) == 1 else 'ies'}: moved up {moves['up']}, "
            f"down {moves['down']}, stayed {moves['stayed']}"
            + (f", not retrieved {moves['not retrieved']}" if moves["not retrieved"] else "")
            + f"; at rank 1: {first_before} before reranking, {first_after} after.")  # fmt: skip


def _add_store(parser: argparse.ArgumentParser, default: Path) -> None:
    parser.add_argument("--store", default=str(default), help="Chroma directory or http(s)://host:port of a Chroma server (default: %(default)s)")
    parser.add_argument("--collection", default="llama_rerank", help="Chroma collection name (default: %(default)s)")


def _add_rerank(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llm", default="local", help="'local' (bundled model, default), 'openai:<model>', or an OpenAI-compatible server URL")
    parser.add_argument("--model", default=None, help="model name to ask a server URL for")
    parser.add_argument("--top-k", type=int, default=None, help=f"candidates from the first stage (default: {TOP_K}, or the --settings file's)")
    parser.add_argument("--top-n", type=int, default=None, help=f"reranked passages the answer step reads (default: {TOP_N}, or the --settings file's)")
    parser.add_argument("--window-size", type=int, default=None, help="most candidates per LLM call (default: 10 for every --llm; for local, "
                        "one per call was no better and 35%% slower: docs/EVALUATION.md)")
    parser.add_argument("--no-answer", action="store_true", help="only show the rankings, do not synthesize an answer")


def _prices(text: str) -> dict[str, float]:
    try:
        prompt, completion = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"give PROMPT,COMPLETION prices per million tokens, e.g. 1.25,10 (got {text!r})") from None
    if min(prompt, completion) < 0:
        raise argparse.ArgumentTypeError(f"prices cannot be negative (got {text!r})")
    return {"prompt": prompt, "completion": completion}


def _add_dry_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="retrieve, then print the LLM calls and tokens the rerank would "
                        "take, without calling the LLM (nor starting the bundled model)")  # fmt: skip
    parser.add_argument("--prices", type=_prices, default=None, metavar="PROMPT,COMPLETION",
                        help="with --dry-run, also the cost at these prices per million prompt and completion tokens")  # fmt: skip


def _add_settings(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--settings", type=Path, default=None, metavar="FILE", help=f"settings.json written by `llama-rerank tune`: {what}")


def format_estimate(estimate: "RerankEstimate") -> str:  # noqa: F821 - imported lazily
    """``query --dry-run``: what the rerank would take, in one line, and what it does not count."""
    cost = "" if estimate.cost is None else f", cost {estimate.cost:.4f}"
    cached = f" ({estimate.cache_hits} candidates from the cache)" if estimate.cache_hits else ""
    return (f"Rerank estimate: {estimate.windows} window(s), {estimate.llm_calls} LLM call(s){cached}, "
            f"{estimate.prompt_tokens} prompt tokens, {estimate.completion_tokens} completion tokens{cost}. "
            "Nothing was sent to the LLM; the answer step, follow-ups, retries and hidden reasoning tokens are not counted.")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from llama_rerank.pipeline import DEFAULT_STORE, DEMO_STORE

    parser = argparse.ArgumentParser(prog="llama-rerank", description="Retrieve with Chroma, rerank with an LLM, answer.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (INFO level)")
    sub = parser.add_subparsers(dest="command", required=True)

    ingest = sub.add_parser("ingest", help="add a folder of documents (txt, md, pdf, ...) to the store")
    ingest.add_argument("folder", type=Path)
    _add_store(ingest, DEFAULT_STORE)
    ingest.add_argument("--prune", action="store_true", help="remove chunks of files no longer in the folder")

    query = sub.add_parser("query", help="retrieve, rerank and answer one question")
    query.add_argument("text", help="the question")
    _add_store(query, DEFAULT_STORE)
    _add_rerank(query)
    _add_dry_run(query)
    _add_settings(query, "its reranker options, calibration, top-k and top-n (flags given here win)")

    demo = sub.add_parser("demo", help="ingest the bundled sample corpus and run its queries")
    _add_store(demo, DEMO_STORE)
    _add_rerank(demo)
    demo.add_argument("--queries", type=int, default=None, help="how many of the demo queries to run (default: all 8)")

    from llama_rerank.eval import add_arguments as add_eval_arguments

    evaluate = sub.add_parser("eval", help="score rerankers on a BEIR-layout folder or Cranfield (nDCG@10, MRR@10, Recall@N)")
    add_eval_arguments(evaluate)
    _add_dry_run(evaluate)
    _add_settings(evaluate, "its reranker options for the likelihood systems (K stays --top-k; a calibration does not change the order)")

    from llama_rerank.tune import add_arguments as add_tune_arguments

    tune = sub.add_parser("tune", help="should I rerank these documents? questions, a sweep, a held-out verdict, calibrated settings")
    add_tune_arguments(tune)
    _add_dry_run(tune)

    check = sub.add_parser("check-llm", help="one tiny rerank: what the LLM supports (logprobs, structured output, "
                           "reasoning), latency, tokens per candidate, and the settings it will get")  # fmt: skip
    check.add_argument("--llm", required=True, help="'local', 'openai:<model>', or an OpenAI-compatible server URL (vLLM, Ollama, LM Studio, llama.cpp)")
    check.add_argument("--model", default=None, help="model name to ask a server URL for")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:  # a missing extra (MissingExtraError) is a LlamaRerankError too: one line naming it, exit 1
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "prices", None) and not args.dry_run and args.command != "tune":  # tune also prices its report
            parser.error("--prices goes with --dry-run (it prices the estimate)")
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return _run(args)
    except LlamaRerankError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # an LLM that cannot be reached or refuses: one line, not a traceback
        if not is_llm_failure(exc):
            raise
        print(_llm_failure(exc, args.llm), file=sys.stderr)
        return 1


def _llm_failure(exc: BaseException, spec: str) -> str:
    if is_permanent(exc):
        return f"LLMConfigError: {explain(exc, f'--llm {spec}')}"
    return (f"LLM error: --llm {spec} failed ({type(exc).__name__}: {exc}). Is the server running and reachable at that "
            f"address, and the model name right? `llama-rerank check-llm --llm {spec}` tries it with one call.")  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    from llama_rerank import pipeline, store
    from llama_rerank.postprocessor import LikelihoodRerank
    from llama_rerank.tune import settings as settings_file

    if args.command == "check-llm":
        from llama_rerank.doctor import check_llm

        print(check_llm(pipeline.make_llm(args.llm, model=args.model), **pipeline.reranker_defaults(args.llm)))
        return 0
    saved = settings_file.read(args.settings) if getattr(args, "settings", None) else None
    embed_model = pipeline.default_embedding()
    if args.command == "tune":
        from llama_rerank.tune import command as tune_command

        return tune_command(args, embed_model)
    if args.command == "eval":
        from llama_rerank.eval import command

        if saved:  # the tuned options; top_n and min_score (a probability with a calibration) are the harness's own
            args.reranker_settings = {k: v for k, v in saved["reranker"].items() if k not in ("top_n", "min_score")}
        return command(args, embed_model)
    if args.command == "ingest":
        print(store.ingest(args.folder, args.store, embed_model, collection=args.collection, prune=args.prune))
        return 0
    if args.command == "demo":
        folder, queries = pipeline.demo_corpus()
        print(f"Ingesting the sample corpus ({folder}) into {args.store} ...")
        print(store.ingest(folder, args.store, embed_model, collection=args.collection))
        queries = queries[: args.queries]
    else:
        queries = [{"query": args.text}]
    index = store.load_index(args.store, embed_model, collection=args.collection)
    dry_run = getattr(args, "dry_run", False)
    llm = pipeline.make_llm(args.llm, model=args.model, serve=not dry_run)
    top_k = args.top_k or (saved["top_k"] if saved else TOP_K)
    top_n = args.top_n or (saved["reranker"]["top_n"] if saved else TOP_N)
    chosen = {"top_n": max(top_n, top_k)}  # show every candidate
    if args.window_size is not None:
        chosen["window_size"] = args.window_size
    if saved:
        reranker = settings_file.reranker(saved, llm, **chosen)
    else:
        reranker = LikelihoodRerank(llm=llm, **{**pipeline.reranker_defaults(args.llm), **chosen})
    if dry_run:
        nodes = index.as_retriever(similarity_top_k=top_k).retrieve(args.text)
        print(format_estimate(reranker.estimate(args.text, nodes, args.prices)))
        return 0
    reports = []
    for query in queries:
        report = pipeline.run_query(index, reranker, query["query"], top_k=top_k, top_n=top_n, answer=not args.no_answer)
        reports.append(dataclasses.replace(report, known_answer=query.get("answer_doc"), known_fact=query.get("answer_fact")))
        print()
        print(format_report(reports[-1]))
    if args.command == "demo":
        print()
        if args.llm == "local" and not saved:
            print(pipeline.LOCAL_QUALITY_NOTE)
        print(format_moves(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
