"""Fault injection, fuzzing and concurrency: the reranker never loses a candidate and never lets the LLM crash a query."""

import asyncio
import hashlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_nodes
from fakes import Reply, ScriptedLLM, passages, query_of
from llama_rerank import LikelihoodRerank

LABELS = ["unlikely", "likely", "very likely"]


class RateLimitError(Exception):
    def __init__(self) -> None:
        super().__init__("429 Too Many Requests")
        self.retry_after = 0.05


def check_invariants(nodes, result, top_n):
    """Output is a duplicate-free subset, only cut by top_n, ordered by score."""
    unique = list(dict.fromkeys(n.node.node_id for n in nodes))
    out = [n.node.node_id for n in result]
    assert len(out) == len(set(out))
    assert set(out) <= set(unique)
    assert len(out) == min(top_n, len(unique))
    scores = [n.score for n in result]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)


def _n(prompt):
    return len(passages(prompt))


FAULTS = {
    "exception": (lambda p, c: RuntimeError("backend exploded"), "RuntimeError: backend exploded"),
    "timeout": (lambda p, c: Reply("[1] likely", delay=3), "TimeoutError"),
    "rate limit, then ok": (lambda p, c: RateLimitError() if c < 2 else "\n".join(f"[{i}] likely" for i in range(1, _n(p) + 1)), None),
    "rate limit forever": (lambda p, c: RateLimitError(), "429 Too Many Requests"),
    "empty answer": (lambda p, c: "", "no readable label"),
    "truncated answer": (lambda p, c: "[1] very likely\n[2] unl", "no readable label"),
    "prose": (lambda p, c: "Passage one seems relevant but I am not sure about the others.", "no readable label"),
    "another language": (lambda p, c: "\n".join(f"[{i}] sehr wahrscheinlich" for i in range(1, _n(p) + 1)), "no readable label"),
    "repeated ids": (lambda p, c: "[1] unlikely\n[1] very likely\n[1] likely", "no readable label"),
    "out of range ids": (lambda p, c: "\n".join(f"[{i}] very likely" for i in range(50, 60)), "no readable label"),
    "enormous answer": (lambda p, c: "[1] very likely\n" + "blah " * 200_000, "no readable label"),
    "none content": (lambda p, c: Reply(None), "no readable label"),
}


@pytest.mark.parametrize("reverse_pass", [False, True], ids=["one pass", "reverse pass"])
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_injection_invariants(fault, mode, reverse_pass, caplog):
    script, log_text = FAULTS[fault]
    nodes = make_nodes([f"passage {i}" for i in range(7)])
    reranker = LikelihoodRerank(
        llm=ScriptedLLM(script), top_n=5, window_size=3, timeout=0.3, max_retries=2, reverse_pass=reverse_pass
    )
    with caplog.at_level(logging.WARNING, logger="llama_rerank"):
        if mode == "sync":
            result = reranker.postprocess_nodes(nodes, query_str="q")
        else:
            result = asyncio.run(reranker.apostprocess_nodes(nodes, query_str="q"))
    check_invariants(nodes, result, 5)
    if log_text:
        assert log_text in caplog.text
    unjudged = [n for n in result if n.node.metadata["rerank_label"] is None]
    ranks = [n.node.metadata["retrieval_rank"] for n in unjudged]
    assert ranks == sorted(ranks)  # unjudged candidates keep their relative retrieval order


ANSWER_LINES = st.lists(
    st.tuples(
        st.integers(min_value=-1, max_value=12),
        st.sampled_from(["[{i}] ", "{i}: ", "{i}. ", "Passage {i} - ", "", '"{i}": '] ),
        st.sampled_from(LABELS + ["LIKELY", "very_likely", "not likely", "maybe", ""]),
        st.text(max_size=12),
    ),
    max_size=14,
)


@pytest.mark.slow  # about 100 s
@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=ANSWER_LINES, junk=st.text(max_size=60), n=st.integers(min_value=0, max_value=9), top_n=st.integers(1, 10))
def test_fuzz_full_postprocessor_with_generated_answers(lines, junk, n, top_n):
    answer = junk + "\n" + "\n".join(form.format(i=i) + label + noise for i, form, label, noise in lines)
    nodes = make_nodes([f"passage {i}" for i in range(n)])
    llm = ScriptedLLM(lambda p, c: answer)
    reranker = LikelihoodRerank(llm=llm, top_n=top_n, window_size=4, max_retries=0)
    logging.disable(logging.WARNING)
    try:
        result = reranker.postprocess_nodes(nodes, query_str="q")
    finally:
        logging.disable(logging.NOTSET)
    check_invariants(nodes, result, top_n)


def _label_for(query: str, passage: str) -> str:
    return LABELS[int(hashlib.sha256(f"{query}|{passage}".encode()).hexdigest(), 16) % 3]


def test_fifty_concurrent_queries_through_one_instance_do_not_cross_talk():
    pool_nodes = make_nodes([f"shared passage {i}" for i in range(30)])
    before = [n.model_dump() for n in pool_nodes]

    def script(prompt, call):
        query = query_of(prompt)
        return Reply("\n".join(f"[{i}] {_label_for(query, t.split(chr(10))[-1])}" for i, t in enumerate(passages(prompt), 1)), delay=0.01)

    reranker = LikelihoodRerank(llm=ScriptedLLM(script), top_n=30, window_size=4, max_concurrency=3, scoring="label")
    jobs = [(f"query {q}", pool_nodes[q % 10 : q % 10 + 15]) for q in range(50)]  # overlapping candidate sets

    def one(job):
        query, nodes = job
        return query, nodes, reranker.postprocess_nodes(nodes, query_str=query)

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, jobs))

    for query, nodes, result in results:
        check_invariants(nodes, result, 30)
        for node in result:
            assert node.node.metadata["rerank_label"] == _label_for(query, node.node.get_content())
    assert [n.model_dump() for n in pool_nodes] == before


async def test_fifty_concurrent_async_queries_do_not_cross_talk():
    pool_nodes = make_nodes([f"shared passage {i}" for i in range(20)])

    def script(prompt, call):
        query = query_of(prompt)
        return Reply("\n".join(f"[{i}] {_label_for(query, t.split(chr(10))[-1])}" for i, t in enumerate(passages(prompt), 1)), delay=0.01)

    reranker = LikelihoodRerank(llm=ScriptedLLM(script), top_n=20, window_size=3, scoring="label")
    queries = [f"async query {q}" for q in range(50)]
    results = await asyncio.gather(*(reranker.apostprocess_nodes(pool_nodes[q % 7:], query_str=query) for q, query in enumerate(queries)))
    for q, (query, result) in enumerate(zip(queries, results)):
        check_invariants(pool_nodes[q % 7:], result, 20)
        assert all(n.node.metadata["rerank_label"] == _label_for(query, n.node.get_content()) for n in result)


def test_two_ingests_into_the_same_store_at_once(tmp_path):
    from llama_rerank.runtime import LocalEmbedding
    from llama_rerank.store import ingest, open_collection

    embed = LocalEmbedding()
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"d{i}.txt").write_text(f"Document {i} about flow regime number {i}. " * 5, encoding="utf-8")
    store = tmp_path / "store"
    barrier = threading.Barrier(2)

    def run():
        barrier.wait()
        return ingest(docs, store, embed, progress=False)

    with ThreadPoolExecutor(max_workers=2) as pool:
        reports = list(pool.map(lambda _: run(), range(2)))
    assert sorted(len(r.added) for r in reports) == [0, 12]  # the lock serialised them; the second found all done
    assert sorted(len(r.unchanged) for r in reports) == [0, 12]
    assert open_collection(store, "llama_rerank", embed, create=False).count() == 12
