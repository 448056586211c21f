"""estimate(): the windows, calls and tokens a rerank would use, worked out without calling the LLM."""

import dataclasses

import pytest

from conftest import make_nodes
from fakes import ScriptedLLM, label_by_keyword
from llama_rerank import LikelihoodRerank
from openai_stub import PROFILES, StubServer, chat_prompt_tokens, cl100k

TEXTS = [f"passage {i} on the flow of air over a swept wing at high subsonic speed, {i} times over" for i in range(10)]
SCRIPT = label_by_keyword({"passage 1 ": "very likely", "passage 2 ": "likely"})  # mostly "unlikely"


def _close(estimated, used, within=0.1):
    return abs(estimated - used) <= within * used


def _counting_stub():
    """The stub answering like vLLM, with ``usage`` it counts itself: cl100k over the messages that arrived."""
    return StubServer(dataclasses.replace(PROFILES["vllm"], tokenizer=cl100k()))


def _openai_like(stub):
    from llama_index.llms.openai_like import OpenAILike

    return OpenAILike(model=stub.profile.model, api_base=stub.url, api_key="k", is_chat_model=True, context_window=8192)


@pytest.mark.parametrize("options", [{}, {"reverse_pass": True}, {"window_size": 3, "max_passage_tokens": 16}])
def test_the_estimate_matches_what_the_server_counts(options):
    """estimate() against the server's own count of the requests the rerank then sent (not our own counter).

    The server counts as OpenAI does: 3 tokens more per call than our counter (they prime the reply), 1-1.3% of
    these prompts. The tolerance, 2%, covers that and is far below a miscount's error.
    """
    with _counting_stub() as stub:
        reranker = LikelihoodRerank(llm=_openai_like(stub), **{"window_size": 4, "top_n": 10, **options})
        estimate = reranker.estimate("swept wings?", make_nodes(TEXTS))
        assert stub.chat_requests == []  # no LLM call
        usage = reranker.rerank("swept wings?", make_nodes(TEXTS)).usage
        counted = [chat_prompt_tokens(r.body["messages"], stub.profile.tokenizer) for r in stub.chat_requests]
    assert estimate.llm_calls == usage.llm_calls == len(counted) == estimate.windows
    assert usage.prompt_tokens == sum(counted)  # the rerank reports the server's usage
    assert _close(estimate.prompt_tokens, usage.prompt_tokens, within=0.02)
    assert _close(estimate.completion_tokens, usage.completion_tokens, within=0.25) and estimate.cost is None


def test_the_reverse_pass_doubles_the_windows_it_can_reverse():
    reranker = LikelihoodRerank(llm=ScriptedLLM(SCRIPT), window_size=3, reverse_pass=True)
    assert reranker.estimate("q", make_nodes(TEXTS)).windows == 4 + 3  # the last window holds one passage


def test_windows_in_the_cache_cost_nothing():
    llm = ScriptedLLM(SCRIPT)
    reranker = LikelihoodRerank(llm=llm, window_size=4, cache="memory")
    reranker.rerank("q", make_nodes(TEXTS[:8]))
    estimate = reranker.estimate("q", make_nodes(TEXTS))
    assert (estimate.windows, estimate.llm_calls, estimate.cache_hits) == (3, 1, 8)


def test_prices_give_the_cost():
    reranker = LikelihoodRerank(llm=ScriptedLLM(SCRIPT))
    estimate = reranker.estimate("q", make_nodes(TEXTS), prices={"prompt": 2.0, "completion": 8.0})
    assert estimate.cost == pytest.approx((estimate.prompt_tokens * 2 + estimate.completion_tokens * 8) / 1e6)
    for bad in ({"prompt": 1.0}, {"prompt": 1.0, "completion": -1.0}, {"input": 1.0, "output": 1.0}):
        with pytest.raises(ValueError, match="per million tokens"):
            reranker.estimate("q", make_nodes(TEXTS), prices=bad)


def test_a_structured_answer_is_estimated_as_json_at_the_wire():
    from llama_index.llms.openai_like import OpenAILike

    with StubServer(dataclasses.replace(PROFILES["vllm"], usage=False)) as stub:  # usage counted by our counter
        llm = OpenAILike(model=stub.profile.model, api_base=stub.url, api_key="k", is_chat_model=True, context_window=8192)
        reranker = LikelihoodRerank(llm=llm, window_size=5, structured_output=True, top_n=10)
        estimate = reranker.estimate("swept wings?", make_nodes(TEXTS))
        assert stub.chat_requests == []
        usage = reranker.rerank("swept wings?", make_nodes(TEXTS)).usage
    assert estimate.llm_calls == usage.llm_calls == 2 and estimate.prompt_tokens == usage.prompt_tokens
    assert _close(estimate.completion_tokens, usage.completion_tokens)
    text_only = LikelihoodRerank(llm=llm, window_size=5).estimate("swept wings?", make_nodes(TEXTS))
    assert text_only.completion_tokens < estimate.completion_tokens  # JSON costs more than "[i] label" lines
