"""Orchestration: wall time, LLM calls and tokens per query for LikelihoodRerank, LLMRerank and RankGPTRerank,
sync and async, all driven by one simulated LLM.

The simulated LLM (benchmarks/fake_llms.py) recognises each system's prompt, answers in that system's format
(``[i] label`` lines; ``Doc: i, Relevance: r`` lines for the relevant documents; ``[2] > [1] > ...``), counts
calls and tokens itself with tiktoken cl100k (``llama_index.core.utils.get_tokenizer()``; content tokens + 4 per
chat message, the same rule for every system), and sleeps a fixed latency model before answering, so every system
is measured the same way and concurrency shows in wall time. The relevance behind the answers is a fixed hash of
each passage, the same for every system.

    python benchmarks/orchestration.py [--scale F] [--words W]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine_header, make_passages, nodes_for, table  # noqa: E402
from fake_llms import Latency, SimulatedLLM  # noqa: E402

from llama_index.core.postprocessor import LLMRerank  # noqa: E402
from llama_index.core.schema import QueryBundle  # noqa: E402
from llama_index.postprocessor.rankgpt_rerank import RankGPTRerank  # noqa: E402

from llama_rerank import LikelihoodRerank  # noqa: E402

QUERY = "what similarity laws must be obeyed when constructing aeroelastic models of heated high speed aircraft"
KS = (20, 100)
TOP_N = 5


def systems(llm: SimulatedLLM):
    """(name, postprocessor, async?) in table order; LikelihoodRerank sync first (the ratio baseline)."""
    likelihood = LikelihoodRerank(llm=llm, top_n=TOP_N)  # window_size=10, max_concurrency=4 (defaults)
    llm_rerank = LLMRerank(llm=llm, top_n=TOP_N, choice_batch_size=10)
    rankgpt = RankGPTRerank(llm=llm, top_n=TOP_N)
    return [
        ("LikelihoodRerank sync", likelihood, False),
        ("LikelihoodRerank async", likelihood, True),
        ("LLMRerank sync", llm_rerank, False),
        ("LLMRerank async", llm_rerank, True),
        ("RankGPTRerank sync", rankgpt, False),
        ("RankGPTRerank async", rankgpt, True),
    ]


def run_one(processor, is_async: bool, nodes, query: QueryBundle):
    started = time.perf_counter()
    if is_async:
        out = asyncio.run(processor.apostprocess_nodes(nodes, query_bundle=query))
    else:
        out = processor.postprocess_nodes(nodes, query_bundle=query)
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every simulated latency by this")
    parser.add_argument("--words", type=int, default=100, help="words per passage")
    args = parser.parse_args()

    latency = Latency().scaled(args.scale)
    print(machine_header("Orchestration: one simulated LLM, three rerankers, sync and async"))
    source, passages = make_passages(max(KS), args.words)
    print(f"passages    : {args.words} words each, consecutive slices of {source}; K=20 is the first 20 of the K=100 set")
    print(f"simulated   : {latency} (time.sleep / asyncio.sleep; calls in flight overlap freely,")
    print("              like a hosted API; a single local server would not overlap them)")
    print("tokens      : counted by the simulated LLM: cl100k content tokens + 4 per chat message, for every system")
    print(f"systems     : LikelihoodRerank(top_n={TOP_N}) defaults window_size=10, max_concurrency=4;")
    print(f"              LLMRerank(top_n={TOP_N}, choice_batch_size=10) (async: llama_index run_jobs, 4 workers);")
    print(f"              RankGPTRerank(top_n={TOP_N}) (one call with all K; no async of its own: the base class runs")
    print("              the sync path in a thread). Context window of the simulated LLM: 16384 tokens.")
    print()
    query = QueryBundle(QUERY)
    # Warm-up: every system once with zero latency, so one-time costs (imports, tokenizer load) are not counted.
    warm = SimulatedLLM(Latency().scaled(0.0))
    warm_rows = []
    for name, processor, is_async in systems(warm):
        _, wall = run_one(processor, is_async, nodes_for(passages[:20]), query)
        warm_rows.append(f"{name} {wall * 1000:.0f} ms")
    print("warm-up     : one zero-latency K=20 run per system first (not counted): " + ", ".join(warm_rows))
    print()
    llm = SimulatedLLM(latency)
    total_started = time.perf_counter()
    for k in KS:
        nodes = nodes_for(passages[:k])
        rows, base = [], None
        for name, processor, is_async in systems(llm):
            llm.reset()
            out, wall = run_one(processor, is_async, nodes, query)
            meter = llm.reset()
            assert meter.unrecognised == 0 and len(out) == TOP_N, (name, meter, len(out))
            own = ""
            if isinstance(processor, LikelihoodRerank):
                usage = processor.last_usage
                own = f"{usage.llm_calls} / {usage.prompt_tokens:,} / {usage.completion_tokens:,}"
            base = base or (wall, meter)
            rows.append([
                name, f"{wall:.2f}", meter.calls, meter.max_in_flight, f"{meter.prompt_tokens:,}",
                f"{meter.completion_tokens:,}",
                f"{wall / base[0]:.2f}x", f"{meter.calls / base[1].calls:.2f}x",
                f"{meter.prompt_tokens / base[1].prompt_tokens:.2f}x",
                f"{meter.completion_tokens / base[1].completion_tokens:.2f}x", own,
            ])  # fmt: skip
            print(f"  K={k} {name}: {wall:.2f} s", file=sys.stderr)
        print(f"K = {k} candidates, top_n = {TOP_N}")
        print(table(
            ["system", "wall s", "LLM calls", "max in flight", "prompt tok", "completion tok",
             "wall ratio", "calls ratio", "prompt ratio", "completion ratio", "own usage: calls / prompt / completion"],
            rows,
        ))  # fmt: skip
        print()
    print("ratios: relative to LikelihoodRerank sync at the same K (lower is cheaper/faster).")
    print("own usage: what LikelihoodRerank reports in last_usage (the simulated LLM returns no usage, so it counts itself).")
    print()
    single_slot(passages, query)
    print(f"total run time of this script: {time.perf_counter() - total_started:.0f} s")


def single_slot(passages, query: QueryBundle, k: int = 50, speedup: float = 100.0) -> None:
    """LikelihoodRerank sync against a server that answers one call at a time (the bundled llama.cpp server has one
    slot), with the throughput measured for the local model on this machine (~50 prompt tok/s, ~16 completion tok/s,
    benchmarks/embedded.py) made ``speedup`` times faster and the 120 s default timeout scaled the same way."""
    latency = Latency(0.0, 1 / 50 / speedup, 1 / 16 / speedup)
    timeout = 120.0 / speedup
    print(f"Single-slot server, LikelihoodRerank sync, K = {k} ({k // 10} windows of 10): one call served at a time,")
    print(f"others queue; {latency}; timeout={timeout:g} s (the default 120 s, scaled {speedup:g}x like the latencies;")
    print("retry backoff is not scaled)")
    nodes = nodes_for(passages[:k])
    rows = []
    for label, extra in [
        ("max_concurrency=4 (default)", {}),
        ("max_concurrency=1", {"max_concurrency": 1}),
        ("max_concurrency=4, timeout=None", {"timeout": None}),
    ]:
        llm = SimulatedLLM(latency, slots=1)
        reranker = LikelihoodRerank(llm=llm, top_n=TOP_N, **{"timeout": timeout, **extra})
        started = time.perf_counter()
        reranker.postprocess_nodes(nodes, query_bundle=query)
        wall = time.perf_counter() - started
        time.sleep(0.5 + max(0.0, llm.longest_call(reset=False) - wall))  # let abandoned calls finish
        meter, u = llm.reset(), reranker.last_usage
        rows.append([label, f"{wall:.2f}", meter.calls, u.llm_calls, u.retries, u.failed_windows,
                     f"{llm.longest_call():.2f}", f"{meter.prompt_tokens:,}"])  # fmt: skip
    print(table(
        ["setting", "wall s", "calls the server ran", "calls the reranker counted", "retries", "failed windows",
         "longest call s (queue incl.)", "prompt tok served"],
        rows,
    ))  # fmt: skip
    print()


if __name__ == "__main__":
    main()
