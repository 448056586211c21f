"""LLMCaller on its own: retries with backoff, Retry-After, timeouts, kwargs for OpenAI-family LLMs."""

import time

import pytest
from llama_index.core.utils import get_tokenizer
from llama_index.llms.openai_like import OpenAILike

from llama_rerank.llm import LLMCaller, _retry_after
from fakes import Reply, ScriptedLLM

ENCODE = get_tokenizer()


class RateLimited(Exception):
    def __init__(self, seconds):
        super().__init__("rate limited")
        self.retry_after = seconds


def test_retry_after_is_read_from_attribute_and_headers():
    class Response:
        headers = {"retry-after": "1.5"}

    class HTTPError(Exception):
        response = Response()

    assert _retry_after(RateLimited(3)) == 3.0
    assert _retry_after(HTTPError()) == 1.5
    assert _retry_after(ValueError()) is None


def test_rate_limit_waits_as_asked_then_succeeds():
    llm = ScriptedLLM(lambda p, c: RateLimited(0.3) if c == 0 else "ok")
    started = time.perf_counter()
    reply = LLMCaller(llm, ENCODE, max_retries=1, timeout=None).call("prompt", 10)
    assert reply.text == "ok" and reply.retries == 1
    assert time.perf_counter() - started >= 0.3


def test_last_error_is_raised_after_bounded_retries():
    llm = ScriptedLLM(lambda p, c: ConnectionError(f"attempt {c}"))
    with pytest.raises(ConnectionError, match="attempt 2"):
        LLMCaller(llm, ENCODE, max_retries=2, timeout=None).call("prompt", 10)
    assert len(llm.prompts) == 3


async def test_async_timeout_cancels_and_raises_timeout_error():
    llm = ScriptedLLM(lambda p, c: Reply("late", delay=2))
    with pytest.raises(TimeoutError, match="0.1 s"):
        await LLMCaller(llm, ENCODE, max_retries=0, timeout=0.1).acall("prompt", 10)


def test_sync_timeout_raises_timeout_error():
    llm = ScriptedLLM(lambda p, c: Reply("late", delay=2))
    with pytest.raises(TimeoutError):
        LLMCaller(llm, ENCODE, max_retries=0, timeout=0.1).call("prompt", 10)


def test_token_counts_fall_back_to_the_tokenizer():
    reply = LLMCaller(ScriptedLLM(lambda p, c: "[1] likely"), ENCODE, 0, None).call("count these tokens", 10)
    assert reply.prompt_tokens == len(ENCODE("count these tokens"))
    assert reply.completion_tokens == len(ENCODE("[1] likely"))


def test_answer_max_tokens_goes_to_openai_family_llms_only():
    openai_like = OpenAILike(model="m", api_base="http://127.0.0.1:9/v1", api_key="x", is_chat_model=True)
    assert LLMCaller(openai_like, ENCODE, 0, None)._kwargs(42) == {"max_tokens": 42}
    llm = ScriptedLLM(lambda p, c: "x")
    LLMCaller(llm, ENCODE, 0, None).call("p", 42)
    assert llm.kwargs_seen == [{}]
