"""rerank_batch / arerank_batch: one result per query, in order, sharing the reranker's concurrency budget."""

import asyncio
import logging
import time

import pytest

from conftest import make_nodes
from fakes import Reply, ScriptedLLM, passages, query_of
from llama_rerank import LikelihoodRerank, RerankLLMError
from llama_rerank.errors import LLMConfigError

MODES = ["sync", "async"]


def batch(reranker, queries, node_lists, mode, **options):
    if mode == "sync":
        return reranker.rerank_batch(queries, node_lists, **options)
    return asyncio.run(reranker.arerank_batch(queries, node_lists, **options))


def _favourite(prompt, call):
    """'very likely' for the passage whose number ends the query, 'unlikely' for the others; slow."""
    wanted = query_of(prompt).split()[-1]
    labels = ["very likely" if text.split()[-1] == wanted else "unlikely" for text in passages(prompt)]
    return Reply("\n".join(f"[{i}] {label}" for i, label in enumerate(labels, 1)), delay=0.1)


@pytest.mark.parametrize("mode", MODES)
def test_one_result_per_query_in_order_within_one_budget(mode):
    llm = ScriptedLLM(_favourite)
    reranker = LikelihoodRerank(llm=llm, window_size=2, max_concurrency=3, top_n=1, scoring="label")
    node_lists = [make_nodes([f"passage {i}" for i in range(6)]) for _ in range(8)]
    queries = [f"which passage? {q % 6}" for q in range(8)]
    seen = {}
    results = batch(reranker, queries, node_lists, mode, on_result=seen.__setitem__)
    assert [r.nodes[0].node.get_content() for r in results] == [f"passage {q % 6}" for q in range(8)]
    assert [seen[q] for q in range(8)] == results  # each result was handed over as its query finished
    assert all(r.usage.llm_calls == 3 for r in results)  # each result carries its own query's usage
    assert llm.max_in_flight == 3  # the queries overlap, and never exceed the shared budget


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_query_degrades_alone(mode, caplog):
    def script(prompt, call):
        if query_of(prompt).endswith("broken"):
            return ConnectionError("provider hiccup")
        return _favourite(prompt, call)

    reranker = LikelihoodRerank(llm=ScriptedLLM(script), window_size=3, max_retries=0, top_n=3, scoring="label")
    nodes = make_nodes([f"passage {i}" for i in range(3)])
    with caplog.at_level(logging.WARNING):
        good, broken = batch(reranker, ["pick 2", "broken"], [nodes, nodes], mode)
    assert good.nodes[0].node.get_content() == "passage 2" and good.usage.failed_windows == 0
    assert [n.node.node_id for n in broken.nodes] == ["n0", "n1", "n2"] and broken.usage.failed_windows == 1
    assert "keep retrieval order" in caplog.text


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("error, options", [(LLMConfigError, {}), (RerankLLMError, {"on_error": "raise"})])
def test_errors_that_a_rerank_raises_stop_the_batch(mode, error, options):
    class Unauthorized(Exception):
        status_code = 401

    def script(prompt, call):
        return Unauthorized("bad key") if error is LLMConfigError else ConnectionError("down")

    reranker = LikelihoodRerank(llm=ScriptedLLM(script), max_retries=0, **options)
    nodes = make_nodes(["a", "b"])
    with pytest.raises(error):
        batch(reranker, ["q1", "q2", "q3"], [nodes] * 3, mode)


@pytest.mark.parametrize("mode", MODES)
def test_progress_bar_on_long_batches_only_unless_asked(mode, capsys):
    reranker = LikelihoodRerank(llm=ScriptedLLM(_favourite), scoring="label")
    nodes = make_nodes(["passage 0"])
    batch(reranker, ["q 0"] * 2, [nodes] * 2, mode)
    assert "query" not in capsys.readouterr().err
    batch(reranker, ["q 0"] * 6, [nodes] * 6, mode)
    assert "6/6" in capsys.readouterr().err
    batch(reranker, ["q 0"] * 2, [nodes] * 2, mode, progress=True)
    assert "2/2" in capsys.readouterr().err
    batch(reranker, ["q 0"] * 6, [nodes] * 6, mode, progress=False)
    assert "6/6" not in capsys.readouterr().err


def test_a_bad_batch_is_refused_before_any_llm_call():
    llm = ScriptedLLM(_favourite)
    reranker, nodes = LikelihoodRerank(llm=llm), make_nodes(["a"])
    with pytest.raises(ValueError, match="2 queries and 1 node lists"):
        reranker.rerank_batch(["q1", "q2"], [nodes])
    with pytest.raises(TypeError, match="list of queries"):
        reranker.rerank_batch("q", [nodes])
    with pytest.raises(ValueError, match="needs a query"):
        asyncio.run(reranker.arerank_batch(["q1", " "], [nodes, nodes]))
    assert llm.prompts == [] and reranker.rerank_batch([], []) == []


@pytest.mark.parametrize("mode", MODES)
def test_a_permanent_error_stops_the_queries_running_beside_it(mode):
    class Unauthorized(Exception):
        status_code = 401

    llm = ScriptedLLM(lambda p, c: Unauthorized("bad key") if c == 0 else _favourite(p, c))
    reranker = LikelihoodRerank(llm=llm, window_size=1, max_concurrency=2, scoring="label")
    queries, node_lists = [f"q {q}" for q in range(6)], [make_nodes(["passage 0", "passage 1"])] * 6

    async def in_a_loop_that_goes_on():
        with pytest.raises(LLMConfigError):
            await reranker.arerank_batch(queries, node_lists)
        calls = len(llm.prompts)
        await asyncio.sleep(0.4)  # the caller's loop keeps running: queries left behind would call now
        return calls

    if mode == "sync":
        with pytest.raises(LLMConfigError):
            reranker.rerank_batch(queries, node_lists)
        # a call handed to a thread just before the error reached the loop records its prompt on that thread, maybe
        # after rerank_batch returned (it does not wait for threads it cannot stop): let it settle, then count
        time.sleep(0.4)
        calls = len(llm.prompts)
        time.sleep(0.4)
    else:
        calls = asyncio.run(in_a_loop_that_goes_on())
    assert calls <= 4, "the other queries' windows were not started"  # 12 windows in all; 2 slots
    assert len(llm.prompts) == calls, "nothing calls again, in the background or later"
