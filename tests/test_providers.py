"""Error policy and capability adaptation on their own: which errors are permanent, Retry-After, and what changes
when a provider refuses an option (scripted errors here; tests/test_wire.py does the same through real HTTP)."""

import email.utils
import logging
import time

import httpx
import openai
import pytest
from llama_index.core.utils import get_tokenizer
from llama_index.llms.openai import OpenAI
from llama_index.llms.openai_like import OpenAILike

from llama_rerank.adapters import adapter_for
from llama_rerank.errors import LLMConfigError
from llama_rerank.llm import LLMCaller
from llama_rerank.providers import is_permanent, rejected_param, retry_after, status_of
from fakes import ScriptedLLM

ENCODE = get_tokenizer()
REQUEST = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")


def api_error(cls, status, message="refused", param=None, headers=None):
    response = httpx.Response(status, request=REQUEST, headers=headers or {})
    body = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return cls(message, response=response, body=body)


class StatusError(Exception):
    """A custom LLM's error that only carries a status, the way many SDKs do."""

    def __init__(self, status):
        super().__init__(f"HTTP {status}")
        self.status_code = status


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 413, 422])
def test_client_errors_are_permanent(status):
    assert is_permanent(StatusError(status))
    assert status_of(api_error(openai.APIStatusError, status)) == status


@pytest.mark.parametrize("error", [StatusError(408), StatusError(409), StatusError(429), StatusError(500),
                                   StatusError(503), TimeoutError("slow"), ConnectionError("reset"),
                                   RuntimeError("custom LLM blew up"), openai.APIConnectionError(request=REQUEST)])
def test_everything_else_is_transient(error):
    assert not is_permanent(error)


def test_a_quota_429_is_permanent_a_rate_limit_429_is_not():
    quota = api_error(openai.RateLimitError, 429, "You exceeded your current quota")
    quota.code = quota.type = "insufficient_quota"  # as the openai client sets them from the error body
    assert is_permanent(quota)
    assert not is_permanent(api_error(openai.RateLimitError, 429, "Rate limit reached for requests"))


def test_retry_after_in_seconds_and_as_http_date():
    assert retry_after(api_error(openai.RateLimitError, 429, headers={"retry-after": "2"})) == 2.0
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    waited = retry_after(api_error(openai.RateLimitError, 429, headers={"retry-after": date}))
    assert 25 <= waited <= 31
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert retry_after(api_error(openai.RateLimitError, 429, headers={"retry-after": past})) == 0.0
    assert retry_after(api_error(openai.RateLimitError, 429, headers={"retry-after": "soon"})) is None
    assert retry_after(ValueError()) is None


def test_rejected_param_from_the_client_or_the_message():
    assert rejected_param(api_error(openai.BadRequestError, 400, param="logprobs")) == "logprobs"
    assert rejected_param(ValueError("top_logprobs must be <= 20")) == "top_logprobs"
    assert rejected_param(ValueError("something else")) is None


def test_a_permanent_error_is_raised_at_once_with_the_fix(caplog):
    llm = ScriptedLLM(lambda p, c: api_error(openai.AuthenticationError, 401, "Incorrect API key provided"))
    with pytest.raises(LLMConfigError, match=r"(?s)HTTP 401: Incorrect API key.*OPENAI_API_KEY") as info:
        LLMCaller(adapter_for(llm), ENCODE, max_retries=3, timeout=None).call("prompt", 10)
    assert len(llm.prompts) == 1, "a permanent error must not be retried"
    assert isinstance(info.value.__cause__, openai.AuthenticationError)
    assert "retrying" not in caplog.text


async def test_a_permanent_error_is_raised_at_once_async():
    llm = ScriptedLLM(lambda p, c: StatusError(404))
    with pytest.raises(LLMConfigError, match="model name"):
        await LLMCaller(adapter_for(llm), ENCODE, max_retries=3, timeout=1).acall("prompt", 10)
    assert len(llm.prompts) == 1


@pytest.mark.parametrize("asked, waited", [("30", 30.0), ("600", 60.0)], ids=["as asked", "capped"])
def test_transient_errors_are_retried_honouring_retry_after(asked, waited, monkeypatch):
    llm = ScriptedLLM(lambda p, c: api_error(openai.RateLimitError, 429, headers={"retry-after": asked}) if c == 0 else "ok")
    waits = []

    async def sleep(seconds):  # record the wait asked for instead of waiting
        waits.append(seconds)

    monkeypatch.setattr("llama_rerank.llm._sleep", sleep)
    reply = LLMCaller(adapter_for(llm), ENCODE, max_retries=1, timeout=None).call("prompt", 10)
    assert reply.text == "ok" and reply.retries == 1
    assert waits == [waited]  # backoff alone would wait under a second


def test_last_transient_error_is_raised_after_bounded_retries():
    llm = ScriptedLLM(lambda p, c: ConnectionError(f"attempt {c}"))
    with pytest.raises(ConnectionError, match="attempt 2"):
        LLMCaller(adapter_for(llm), ENCODE, max_retries=2, timeout=None).call("prompt", 10)
    assert len(llm.prompts) == 3


def test_a_generic_llm_gets_no_keyword_arguments():
    llm = ScriptedLLM(lambda p, c: "x")
    LLMCaller(adapter_for(llm), ENCODE, 0, None).call("p", 42, {"type": "object"})
    assert llm.kwargs_seen == [{}]


def test_structured_output_needs_an_openai_compatible_class():
    with pytest.raises(ValueError, match="OpenAILike"):
        adapter_for(ScriptedLLM(lambda p, c: "x"), structured=True)


def openai_like(**kwargs):
    return OpenAILike(model="m", api_base="http://127.0.0.1:9/v1", api_key="x", is_chat_model=True,
                      logprobs=True, top_logprobs=5, temperature=0.0, **kwargs)  # fmt: skip


def test_openai_family_requests_carry_budget_and_schema_and_the_users_llm_keeps_its_retries():
    llm = openai_like(max_retries=3)
    adapter = adapter_for(llm, structured=True)
    kwargs = adapter.options(42, {"type": "object"})
    assert kwargs["max_tokens"] == 42
    assert kwargs["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert adapter.llm.max_retries == 0 and llm.max_retries == 3


def test_reasoning_models_get_the_lowest_effort_and_room_to_think():
    adapter = adapter_for(OpenAI(model="gpt-5-mini", api_key="x"))
    kwargs = adapter.options(42, None)
    assert kwargs["reasoning_effort"] == "none"
    assert kwargs["max_tokens"] > 42 + 256


@pytest.mark.parametrize(
    "param, message, check",
    [
        ("logprobs", "logprobs is not supported with this model", lambda p, k: not p.llm.logprobs),
        ("top_logprobs", "Expected a value <= 3, but got 5", lambda p, k: p.llm.top_logprobs == 3 and p.llm.logprobs),
        ("top_logprobs", "too many", lambda p, k: not p.llm.logprobs),
        ("temperature", "Only the default (1) value is supported", lambda p, k: k["temperature"] == 1.0),
        ("max_tokens", "Use 'max_completion_tokens' instead", lambda p, k: "max_tokens" not in k and k["max_completion_tokens"] == 42),
        ("response_format", "response_format is not supported", lambda p, k: "response_format" not in k),
    ],
)
def test_a_refused_option_is_adapted_once_and_remembered(param, message, check, caplog):
    llm = openai_like()
    adapter = adapter_for(llm, structured=True)
    error = api_error(openai.BadRequestError, 400, message, param=param)
    with caplog.at_level(logging.WARNING):
        assert adapter.adapt(error, adapter.version)
        assert adapter.adapt(error, 0), "a request sent before the change is simply resent"
    assert check(adapter, adapter.options(42, {"type": "object"}))
    assert caplog.text.count("refused") == 1
    assert [a.option for a in adapter.adaptations] == [param], "what was adapted is recorded once"
    assert llm.logprobs and llm.top_logprobs == 5, "the user's LLM is never changed"


def test_reasoning_effort_steps_down_then_stops():
    adapter = adapter_for(OpenAI(model="gpt-5", api_key="x"))
    error = api_error(openai.BadRequestError, 400, "Unsupported value: 'reasoning_effort' does not support 'none'", "reasoning_effort")
    assert adapter.adapt(error, adapter.version)
    assert adapter.options(1, None)["reasoning_effort"] == "minimal"


def test_an_unknown_refusal_is_not_adapted():
    adapter = adapter_for(openai_like())
    assert not adapter.adapt(api_error(openai.BadRequestError, 400, "bad stop sequence", param="stop"), adapter.version)
    assert not adapter.adapt(api_error(openai.AuthenticationError, 401), adapter.version)
