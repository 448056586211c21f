"""The real local LLM end to end (slow: about a minute per query on 2 cores). CI runs these too."""

import subprocess
import sys
from pathlib import Path

import pytest

from llama_rerank import LikelihoodRerank
from llama_rerank.pipeline import demo_corpus, make_llm, run_query
from llama_rerank.store import ingest, load_index

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory):
    from llama_rerank.runtime import LocalEmbedding

    embed = LocalEmbedding()
    store = tmp_path_factory.mktemp("demo-store")
    folder, _ = demo_corpus()
    ingest(folder, store, embed, progress=False)
    return load_index(store, embed)


def _check_ranking(report, top_k, scale):
    nodes = report.reranked
    assert len(nodes) == len({n.node.node_id for n in nodes}) == top_k  # every candidate present once
    assert {n.node.node_id for n in nodes} == {n.node.node_id for n in report.first_stage}
    assert all(n.node.metadata["rerank_label"] in scale.labels for n in nodes)
    assert all(0.0 <= n.score <= 1.0 for n in nodes)
    assert [n.score for n in nodes] == sorted((n.score for n in nodes), reverse=True)
    assert report.usage.failed_windows == 0


def test_local_llm_reranks_demo_queries_with_logprob_scores(demo_index):
    reranker = LikelihoodRerank(llm=make_llm("local"), top_n=6, window_size=3)
    _, queries = demo_corpus()
    for query in queries[:2]:
        report = run_query(demo_index, reranker, query["query"], top_k=6, answer=False)
        _check_ranking(report, 6, reranker.scale)
        assert report.usage.llm_calls >= 2  # two windows of three
        # logprob scoring was used: expected values fall between the label values
        assert any(n.score not in reranker.scale.values for n in report.reranked)


async def test_local_llm_async_path_with_a_reversed_second_pass(demo_index):
    reranker = LikelihoodRerank(llm=make_llm("local"), top_n=4, window_size=4, reverse_pass=True)
    nodes = demo_index.as_retriever(similarity_top_k=4).retrieve("51 mm basket dose")
    result = await reranker.arerank("How many grams fit in a 51 mm double basket?", nodes)
    assert {n.node.node_id for n in result.nodes} == {n.node.node_id for n in nodes}
    assert result.usage.llm_calls >= 2 and result.usage.prompt_tokens > 400 and result.usage.failed_windows == 0
    assert all(n.node.metadata["rerank_label"] in reranker.scale.labels for n in result.nodes)


def test_openai_code_path_against_the_local_openai_compatible_server(demo_index, monkeypatch):
    """The `openai:<model>` path for real (openai client through LlamaIndex's OpenAI LLM), pointed at localhost."""
    from llama_rerank.runtime.server import get_server

    monkeypatch.setenv("OPENAI_API_KEY", "sk-local-test")
    monkeypatch.setenv("OPENAI_API_BASE", get_server().address + "/v1")
    llm = make_llm("openai:gpt-4o-mini")
    assert type(llm).__name__ == "OpenAI" and llm.logprobs is True
    reranker = LikelihoodRerank(llm=llm, top_n=4, window_size=4)
    report = run_query(demo_index, reranker, "Should I backflush my compact espresso machine?", top_k=4, answer=False)
    _check_ranking(report, 4, reranker.scale)
    assert any(n.score not in reranker.scale.values for n in report.reranked)


def test_demo_command_runs_end_to_end(tmp_path):
    cli = Path(sys.executable).with_name("llama-rerank")
    done = subprocess.run(
        [str(cli), "demo", "--queries", "1", "--top-k", "5", "--store", str(tmp_path / "store")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "46 added" in out and "first stage" in out and "* known answer passage (28-steaming-oat-milk.md): rank 2" in out
    assert "Known answer passages over 1 query: moved" in out
    assert "Answer:" in out and "rerank LLM calls" in out


def test_structured_output_on_the_bundled_model_keeps_logprob_scores(demo_index):
    """llama.cpp constrains decoding to the JSON schema; the label's first token inside the JSON string still
    carries the label probabilities."""
    reranker = LikelihoodRerank(llm=make_llm("local"), top_n=4, window_size=4, structured_output=True)
    nodes = demo_index.as_retriever(similarity_top_k=4).retrieve("milk squealing while frothing")
    result = reranker.rerank("The milk makes a squealing noise while I froth it", nodes)
    assert {n.node.node_id for n in result.nodes} == {n.node.node_id for n in nodes}
    assert result.usage.unparsed == 0 and result.usage.failed_windows == 0
    assert reranker.resources.adapter.structured, "the server took the schema"
    assert result.usage.logprob_scored == 4


def test_check_llm_on_the_bundled_model(capsys):
    from llama_rerank.cli import main

    assert main(["check-llm", "--llm", "local"]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 passages labelled" in out and "logprobs:        yes" in out and "structured out:  yes" in out


def test_the_estimate_is_within_a_few_percent_of_the_bundled_models_usage(demo_index):
    """estimate() counts with LlamaIndex's tokenizer; the server reports its own (Qwen's) counts."""
    from llama_rerank.pipeline import reranker_defaults

    reranker = LikelihoodRerank(llm=make_llm("local"), top_n=5, **reranker_defaults("local"))
    nodes = demo_index.as_retriever(similarity_top_k=5).retrieve("How hot should milk be steamed?")
    estimate = reranker.estimate("How hot should milk be steamed?", nodes)
    usage = reranker.rerank("How hot should milk be steamed?", nodes).usage
    assert estimate.llm_calls == usage.llm_calls == 1
    assert abs(estimate.prompt_tokens - usage.prompt_tokens) <= 0.05 * usage.prompt_tokens
    assert abs(estimate.completion_tokens - usage.completion_tokens) <= 0.25 * usage.completion_tokens
