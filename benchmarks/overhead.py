"""Overhead: CPU time of LikelihoodRerank itself, excluding the LLM, per query at K = 20, 100, 500.

The LLM is a scripted one that answers the right ``[i] label`` lines immediately; the CPU it spends making those
answers is measured inside it (``time.thread_time``) and subtracted. What is left is the reranker: node copies,
truncation (tokenizing every passage), window packing, prompt building, the call machinery (threads, retries,
timeouts), parsing, scoring and ordering. CPU time is ``time.process_time`` (all threads of this process).

    python benchmarks/overhead.py [--reps N] [--words W]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine_header, make_passages, median, nodes_for, table  # noqa: E402
from fake_llms import InstantLLM  # noqa: E402

from llama_rerank import LikelihoodRerank  # noqa: E402
from llama_rerank.budget import truncate  # noqa: E402

QUERY = "what similarity laws must be obeyed when constructing aeroelastic models of heated high speed aircraft"
KS = (20, 100, 500)


def measure(reranker: LikelihoodRerank, llm: InstantLLM, nodes, reps: int) -> tuple[list[float], list[float], int]:
    """Per-repetition reranker CPU ms (fake's CPU subtracted) and wall ms, and LLM calls per query."""
    reranker.rerank(QUERY, nodes)  # warm-up: regex compilation, tokenizer caches, imports
    cpu, wall = [], []
    for _ in range(reps):
        llm.reset()
        c0, w0 = time.process_time(), time.perf_counter()
        result = reranker.rerank(QUERY, nodes)
        c1, w1 = time.process_time(), time.perf_counter()
        assert result.usage.unparsed == 0 and result.usage.failed_windows == 0, result.usage
        cpu.append((c1 - c0 - llm.own_cpu_s) * 1000)
        wall.append((w1 - w0) * 1000)
    return cpu, wall, llm.calls


def truncation_ms(reranker: LikelihoodRerank, passages: list[str], reps: int) -> float:
    """CPU ms to token-count (and, when needed, cut) every passage: the part of preparation that scales with K."""
    encode = reranker.resources.encode
    times = []
    for _ in range(max(3, reps // 2)):
        c0 = time.process_time()
        for text in passages:
            truncate(text, reranker.max_passage_tokens, encode)
        times.append((time.process_time() - c0) * 1000)
    return median(times)


STAGES = [  # (label, file suffix, function): cumulative time of these functions inside arerank()
    # A coroutine's cumulative time is summed over its resumptions; the windows run as tasks of their own, so the
    # total is the event loop's and the judging is the windows' coroutines (Judge._run_window), not Judge.ajudge.
    ("arerank() total (in asyncio.run)", "asyncio/base_events.py", "run_until_complete"),
    ("  prepare: dedup, get_content, truncate, pack windows", "llama_rerank/nodes.py", "__init__"),
    ("    of which truncate() (tiktoken encode)", "llama_rerank/budget.py", "truncate"),
    ("    of which pack_windows()", "llama_rerank/budget.py", "pack_windows"),
    ("  judge: all windows (Judge._run_window)", "llama_rerank/judge.py", "_run_window"),
    ("    render prompts (ChatPromptTemplate)", "llama_rerank/prompts.py", "render"),
    ("    LLMCaller.acall incl. tenacity (and the fake LLM)", "llama_rerank/llm.py", "acall"),
    ("    the fake LLM itself (subtract)", "fake_llms.py", "chat"),
    ("    read answer: parse + score", "llama_rerank/judge.py", "_read"),
    ("  finish: fuse, order, copy nodes", "llama_rerank/nodes.py", "finish"),
]


def profile(k: int, words: int) -> tuple[str, str]:
    """cProfile of 3 async reranks at K, so every stage runs on the profiled thread.

    A rerank runs one coroutine per window (``Judge.ajudge`` -> ``LLMCaller.acall``); ``arerank`` awaits them in
    the caller's loop and, with an LLM that has async methods of its own (the instant LLM does), calls it there too.
    The sync ``rerank`` runs the same coroutines in a loop of its own and sends each request on a worker thread,
    which cProfile (one thread) would not see. Returns a stage table (ms per query, cumulative) and the raw top
    functions.
    """
    _, passages = make_passages(k, words)
    nodes = nodes_for(passages)
    llm = InstantLLM()
    reranker = LikelihoodRerank(llm=llm, top_n=5)
    asyncio.run(reranker.arerank(QUERY, nodes))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(3):
        asyncio.run(reranker.arerank(QUERY, nodes))
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for label, suffix, func in STAGES:
        ct = sum(v[3] for (f, _, name), v in stats.stats.items() if f.endswith(suffix) and name == func)
        rows.append([label, f"{ct / 3 * 1000:.1f}"])
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("tottime").print_stats(12)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("ncalls"))
    return table(["stage (K=%d, cProfile, ms per query)" % k, "cumulative ms"], rows), "\n".join(lines[start:]).rstrip()


COLD = r"""
import json, sys, time
t0 = time.perf_counter()
from llama_rerank import LikelihoodRerank
t1 = time.perf_counter()
from common import make_passages, nodes_for
from fake_llms import InstantLLM
reranker = LikelihoodRerank(llm=InstantLLM(), top_n=5)
nodes = nodes_for(make_passages(20, 150)[1])
openai_before = "llama_index.llms.openai" in sys.modules
t2 = time.perf_counter()
reranker.rerank("wing in a slipstream", nodes)
t3 = time.perf_counter()
reranker.rerank("wing in a slipstream", nodes)
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "first": t3 - t2, "second": t4 - t3, "openai_before": openai_before,
                  "openai_after": "llama_index.llms.openai" in sys.modules}))
"""


def cold_start(runs: int = 3) -> list[dict]:
    """Fresh interpreters: time to import llama_rerank, first and second rerank at K=20 (wall seconds)."""
    import json
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    out = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", COLD], cwd=here, capture_output=True, text=True, check=True)
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15, help="repetitions per K (K=500 uses a third, at least 5)")
    parser.add_argument("--words", type=int, default=150, help="words per passage")
    args = parser.parse_args()

    print(machine_header("LikelihoodRerank overhead (instant scripted LLM; CPU excluding the LLM)"))
    source, _ = make_passages(1, args.words)
    print(f"passages    : {args.words} words each, consecutive slices of {source}")
    print(f"query       : {QUERY!r}; defaults: window_size=10, max_concurrency=4, timeout=120, max_passage_tokens=256")
    print("measure     : time.process_time around rerank() (all threads), minus the fake LLM's own thread CPU;")
    print("              median over repetitions, after one warm-up rerank")
    print()

    rows = []
    for k in KS:
        reps = args.reps if k < 500 else max(5, args.reps // 3)
        _, passages = make_passages(k, args.words)
        nodes = nodes_for(passages)
        configs = {
            "default": (InstantLLM(report_usage=True), {}),
            "no_usage": (InstantLLM(report_usage=False), {}),
            "serial": (InstantLLM(report_usage=True), {"max_concurrency": 1, "timeout": None}),
        }
        results = {}
        for name, (llm, extra) in configs.items():
            reranker = LikelihoodRerank(llm=llm, top_n=5, **extra)
            results[name] = measure(reranker, llm, nodes, reps)
        cpu, wall, calls = results["default"]
        trunc = truncation_ms(LikelihoodRerank(llm=InstantLLM(), top_n=5), passages, reps)
        rows.append([
            k, calls, reps,
            f"{median(cpu):.1f}", f"{median(cpu) / k * 1000:.0f}", f"{median(wall):.1f}",
            f"{trunc:.1f}",
            f"{median(results['no_usage'][0]):.1f}",
            f"{median(results['serial'][0]):.1f}",
        ])  # fmt: skip
        print(f"  K={k}: done", file=sys.stderr)

    print(table(
        ["K", "LLM calls", "reps", "CPU ms/query", "CPU µs/candidate", "wall ms/query", "of which truncation ms",
         "CPU ms, LLM reports no usage", "CPU ms, max_concurrency=1 timeout=None"],
        rows,
    ))  # fmt: skip
    print()
    print("CPU ms/query: default settings, LLM returns token usage (as OpenAI / llama.cpp servers do).")
    print("truncation ms: truncate() alone on the K passages (token-count each; none exceeds 256 tokens at 150 words).")
    print("LLM reports no usage: the reranker then token-counts every rendered prompt and answer itself.")
    print("max_concurrency=1 timeout=None: no thread pool and no per-call timeout thread (everything on the caller's thread).")
    print()
    stages, top = profile(100, args.words)
    print("Breakdown: cProfile over 3 async reranks (arerank) at K=100, defaults (every stage runs on the profiled")
    print("thread); profiling inflates times, compare the stages with each other, not with the table above.")
    print(stages)
    print()
    print("Top functions by own time (same profile, all 3 reranks):")
    print(top)
    print()
    cold = cold_start()
    print("Cold start (fresh interpreter, K=20, instant LLM; wall ms, median of %d runs):" % len(cold))
    print(table(
        ["import llama_rerank", "first rerank", "second rerank", "llama_index.llms.openai imported by the first rerank"],
        [[f"{median([c['import'] for c in cold]) * 1000:.0f}", f"{median([c['first'] for c in cold]) * 1000:.0f}",
          f"{median([c['second'] for c in cold]) * 1000:.1f}",
          "yes" if all(c["openai_after"] and not c["openai_before"] for c in cold) else "no"]],
    ))  # fmt: skip


if __name__ == "__main__":
    main()
