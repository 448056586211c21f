"""The bundled model's rerank time before and after laying the prompt out for llama.cpp's prompt cache.

Three setups, each on a llama.cpp server of its own (so no prompt is cached from an earlier setup):

* ``before``: the user message with the instructions last (``benchmarks/prompts/instructions-last.txt``, the default
  until 2026-11-30) on a server with one slot;
* ``instructions first, 1 slot``: today's default prompt, one slot;
* ``after``: today's default prompt on today's server (two slots: the answer step's prompts go to the other one).

Each setup reranks the first ``--cranfield`` Cranfield tune queries back to back (K=10 from the evaluation index,
no answer step), then runs the demo: the bundled corpus's queries retrieved (K=10), reranked and answered from the
top 3, one after another, as ``llama-rerank demo`` does. It prints per setup the mean and median rerank time per
query, the prompt tokens per rerank, the tokens llama.cpp served from its cache (``timings.cache_n`` of each reply)
and the other processes' CPU load during the runs. Settings are the local defaults (``reranker_defaults("local")``).

    python benchmarks/prompt_cache.py [--cranfield 10] [--demo 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import cranfield, OtherLoad, machine_header, table  # noqa: E402

from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent  # noqa: E402
from llama_index.core.prompts import ChatPromptTemplate  # noqa: E402

from llama_rerank import LikelihoodRerank, store  # noqa: E402
from llama_rerank.eval.datasets import load_dataset, select_queries  # noqa: E402
from llama_rerank.eval.run import build_index, default_store, fingerprint  # noqa: E402
from llama_rerank.pipeline import default_embedding, demo_corpus, reranker_defaults, run_query  # noqa: E402
from llama_rerank.prompts import SYSTEM_PROMPT  # noqa: E402
from llama_rerank.runtime import local_llm  # noqa: E402
from llama_rerank.runtime.server import SLOTS, LocalServer  # noqa: E402

BEFORE_PROMPT = Path(__file__).with_name("prompts") / "instructions-last.txt"


CALLS: list[tuple[int, int]] = []  # (prompt tokens processed, prompt tokens from the cache) per rerank call


class CacheCounter(BaseEventHandler):
    """Records into ``CALLS`` what llama.cpp's reply to a rerank prompt says in its ``timings``."""

    @classmethod
    def class_name(cls) -> str:
        return "CacheCounter"

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, LLMChatEndEvent) and event.response is not None and event.messages[0].content == SYSTEM_PROMPT:
            timings = (getattr(event.response.raw, "model_extra", None) or {}).get("timings") or {}
            CALLS.append((timings.get("prompt_n", 0), timings.get("cache_n", 0)))


def setup_reranker(llm, before: bool) -> LikelihoodRerank:
    reranker = LikelihoodRerank(llm=llm, **{**reranker_defaults("local"), "top_n": 10})
    if before:
        user = BEFORE_PROMPT.read_text().rstrip("\n")
        reranker.update_prompts({"rerank_prompt": ChatPromptTemplate.from_messages([("system", SYSTEM_PROMPT), ("user", user)])})
    return reranker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cranfield", type=int, default=10, help="Cranfield tune queries per setup (default: %(default)s)")
    parser.add_argument("--demo", type=int, default=8, help="demo queries per setup (default: %(default)s)")
    args = parser.parse_args()

    print(machine_header("Prompt layout and llama.cpp's prompt cache: rerank time on the bundled model"))
    embed = default_embedding()
    dataset = load_dataset(cranfield())
    index = build_index(dataset, default_store(dataset, fingerprint(dataset, embed)), embed, progress=False)
    cranfield = [dataset.queries[q] for q in select_queries(dataset, "tune", 30, 0)[: args.cranfield]]
    candidates = {q: index.as_retriever(similarity_top_k=10).retrieve(q) for q in cranfield}
    folder, demo_queries = demo_corpus()
    demo_store = tempfile.TemporaryDirectory(prefix="demo-store-")
    store.ingest(folder, demo_store.name, embed, progress=False)
    demo_index = store.load_index(demo_store.name, embed)
    demo = [q["query"] for q in demo_queries[: args.demo]]
    print(f"workload    : {len(cranfield)} Cranfield tune queries (K=10, rerank only), then {len(demo)} demo queries "
          "(K=10, rerank and answer from the top 3), per setup")
    get_dispatcher().add_event_handler(CacheCounter())
    rows = []
    for name, before, slots in (("before: instructions last, 1 slot", True, 1), ("instructions first, 1 slot", False, 1),
                                (f"after: instructions first, {SLOTS} slots", False, SLOTS)):  # fmt: skip
        server = LocalServer(slots=slots)
        llm = local_llm(api_base=server.start() + "/v1")
        try:
            reranker = setup_reranker(llm, before)
            reranker.rerank("warm up", candidates[cranfield[0]][:1])  # pages the model in; not counted
            for label, queries, run in (
                ("Cranfield", cranfield, lambda q: reranker.rerank(q, candidates[q]).usage.wall_time_s),
                ("demo", demo, lambda q: run_query(demo_index, reranker, q, top_k=10, top_n=3).timings["rerank"]),
            ):
                CALLS.clear()
                with OtherLoad(server.pid) as other:
                    times = [run(q) for q in queries]
                prompt = statistics.mean(p + c for p, c in CALLS)
                cached = statistics.mean(c for _, c in CALLS)
                rows.append([name, label, f"{statistics.mean(times):.1f} s", f"{statistics.median(times):.1f} s",
                             f"{prompt:.0f}", f"{cached:.0f}", f"{other.cores:.2f}"])  # fmt: skip
                print(" | ".join(rows[-1]), flush=True)
        finally:
            server.stop()
    print()
    print(table(["setup", "queries", "rerank mean", "rerank median", "prompt tokens / rerank", "from the cache",
                 "other procs' CPU (cores)"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
