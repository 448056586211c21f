"""The stub OpenAI server speaks each provider's wire format: proven through the real ``openai`` client (OpenAI and
AzureOpenAI) and LlamaIndex's ``OpenAI``/``OpenAILike`` classes, on prompts rendered by the reranker's own template."""

import asyncio
import dataclasses
import email.utils
import json
import math
import re
from datetime import datetime, timedelta, timezone

import httpx
import openai
import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.llms.openai import OpenAI as LlamaOpenAI
from llama_index.llms.openai_like import OpenAILike
from pydantic import BaseModel, create_model

from llama_rerank.labels import LabelScale
from llama_rerank.prompts import DEFAULT_RERANK_PROMPT, prompt_vars, render
from openai_stub import (DROP, ERRORS, MALFORMED, MISCONFIGURED, PROFILES, Reply, StubServer, rate_limited,
                         read_prompt, slow, tokenize)

QUERY = "wing flutter at supersonic speed"
TEXTS = ["Flutter of a swept wing was measured in the tunnel.", "Heat transfer in laminar boundary layers."]
EXPECTED = {"1": "very likely", "2": "unlikely"}
LABEL_FIRST = {"very", "likely", "unlikely"}
HTTP = httpx.Client()  # one connection pool (and one TLS setup) for the openai clients of this module


def rerank_messages(texts=TEXTS, scale=LabelScale.from_mapping({"unlikely": 0, "likely": 0.5, "very likely": 1})):
    """The reranker's real chat prompt, as the openai client sends it."""
    messages = render(DEFAULT_RERANK_PROMPT, True, prompt_vars(QUERY, texts, scale))
    return [{"role": m.role.value, "content": m.content} for m in messages]


def client_for(stub, **kwargs):
    kwargs = {"max_retries": 0, "timeout": 5.0, "http_client": HTTP, **kwargs}
    if stub.profile.dialect == "azure":
        return openai.AzureOpenAI(azure_endpoint=stub.url, api_key="k", api_version="2024-10-21", **kwargs)
    return openai.OpenAI(base_url=stub.url, api_key="k", **kwargs)


def create(stub, client=None, **params):
    params = {"model": stub.profile.model, "messages": rerank_messages(), **params}
    return (client or client_for(stub)).chat.completions.create(**params)


def labels_of(text):
    return dict(re.findall(r"^\[(\d+)\] (.+)$", text, re.M))


def answer_text(profile, message):
    """The answer part of a reply: an inline <think> block removed."""
    content = message.content
    return content.split("</think>", 1)[1].strip() if profile.thinking == "inline" else content


@pytest.fixture
def stub(request):
    """A running stub for the profile named by ``@pytest.mark.parametrize("stub", [...], indirect=True)``."""
    with StubServer(request.param) as running:
        yield running


# --- reading prompts and tokens ------------------------------------------------------------------------------------


def test_the_stub_reads_the_rerankers_own_prompt():
    prompt = read_prompt(rerank_messages())
    assert prompt.query == QUERY
    assert prompt.passages == {"1": TEXTS[0], "2": TEXTS[1]}
    assert prompt.labels == ("unlikely", "likely", "very likely")


@pytest.mark.parametrize("text", ["[1] very likely\n[2] unlikely", '{"1": "very likely"}', "  a_b  ünï 3.5\t\n", ""])
def test_tokens_concatenate_to_the_text(text):
    assert "".join(tokenize(text)) == text


# --- every profile answers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stub", list(PROFILES), indirect=True)
def test_each_profile_gives_a_normal_answer_through_the_openai_client(stub):
    reply = create(stub)
    choice = reply.choices[0]
    assert labels_of(answer_text(stub.profile, choice.message)) == EXPECTED
    assert choice.finish_reason == "stop"
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens > 0
    assert (reply.usage.completion_tokens_details is not None) == stub.profile.usage_details
    assert stub.chat_requests[0].body["messages"] == rerank_messages()


LOGPROB_PROFILES = [name for name, p in PROFILES.items() if p.logprobs and p.reasoning is None]


@pytest.mark.parametrize("stub", LOGPROB_PROFILES + ["openai-reasoning-none"], indirect=True)
def test_logprob_tokens_concatenate_to_the_content_with_label_alternatives(stub):
    choice = create(stub, logprobs=True, top_logprobs=5).choices[0]
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content
    firsts = [t for before, t in zip(tokens, tokens[1:]) if before.token.endswith("]")]  # "[i]" then a label
    assert len(firsts) == 2 * (2 if stub.profile.thinking == "inline" else 1)  # decoys in <think> have logprobs too
    for token in firsts:
        alternatives = {alt.token.strip() for alt in token.top_logprobs}
        assert alternatives == LABEL_FIRST, "every label's first token is offered"
        assert token.top_logprobs[0].token == token.token and token.top_logprobs[0].logprob == token.logprob
        assert sum(math.exp(alt.logprob) for alt in token.top_logprobs) < 1
        assert token.bytes == list(token.token.encode())
    if stub.profile.logprob_ids:
        assert all("id" in t.model_extra for t in tokens), "llama.cpp adds token ids"


@pytest.mark.parametrize("stub", ["vllm"], indirect=True)
def test_top_logprobs_gives_at_most_k_alternatives_and_zero_gives_none(stub):
    one = create(stub, logprobs=True, top_logprobs=1).choices[0].logprobs.content
    assert all(len(t.top_logprobs) == 1 for t in one)
    zero = create(stub, logprobs=True).choices[0].logprobs.content
    assert all(t.top_logprobs == [] for t in zero)


@pytest.mark.parametrize("stub", ["ollama-old"], indirect=True)
def test_an_old_ollama_ignores_logprobs(stub):
    choice = create(stub, logprobs=True, top_logprobs=5).choices[0]
    assert choice.logprobs is None and labels_of(choice.message.content) == EXPECTED


OPENAI_TOP_LOGPROBS = "Invalid 'top_logprobs': integer above maximum value. Expected a value <= 20, but got 21 instead."


@pytest.mark.parametrize(
    ("stub", "message"),
    [
        ("openai-chat", OPENAI_TOP_LOGPROBS),
        ("azure", OPENAI_TOP_LOGPROBS),
        ("vllm", "Requested sample logprobs of 21, which is greater than max allowed: 20"),
        ("ollama", "top_logprobs must be between 0 and 20"),
    ],
    indirect=["stub"],
)
def test_top_logprobs_above_the_providers_maximum_is_a_400(stub, message):
    with pytest.raises(openai.BadRequestError) as caught:
        create(stub, logprobs=True, top_logprobs=21)
    assert caught.value.status_code == 400
    assert caught.value.body["message"] == message


@pytest.mark.parametrize("stub", ["llamacpp"], indirect=True)
def test_llamacpp_has_no_top_logprobs_maximum_and_ignores_the_model_name(stub):
    choice = create(stub, model="anything", logprobs=True, top_logprobs=50).choices[0]
    assert labels_of(choice.message.content) == EXPECTED


# --- OpenAI reasoning models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "param", "code", "message"),
    [
        ({"logprobs": True, "top_logprobs": 5}, "logprobs", "unsupported_parameter",
         "Unsupported parameter: 'logprobs' is not supported with this model."),
        ({"top_logprobs": 5}, "top_logprobs", "unsupported_parameter",
         "Unsupported parameter: 'top_logprobs' is not supported with this model."),
        ({"temperature": 0}, "temperature", "unsupported_value", "Unsupported value: 'temperature' does not support 0 "
         "with this model. Only the default (1) value is supported."),
        ({"max_tokens": 64}, "max_tokens", "unsupported_parameter",
         "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead."),
        ({"reasoning_effort": "none"}, "reasoning_effort", "unsupported_value",
         "Unsupported value: 'none' is not supported with the 'gpt-5-mini' model. "
         "Supported values are: 'minimal', 'low', 'medium', and 'high'."),
    ],
)
def test_gpt5_rejects_what_openai_rejects_with_its_400(params, param, code, message):
    with StubServer("openai-reasoning") as stub:
        with pytest.raises(openai.BadRequestError) as caught:
            create(stub, **params)
    error = caught.value
    assert (error.status_code, error.param, error.code, error.type) == (400, param, code, "invalid_request_error")
    assert error.body["message"] == message


def test_gpt5_accepts_the_default_temperature():
    with StubServer("openai-reasoning") as stub:
        assert labels_of(create(stub, temperature=1).choices[0].message.content) == EXPECTED


def test_gpt5_spends_a_small_budget_on_hidden_reasoning_and_answers_nothing():
    with StubServer("openai-reasoning") as stub:
        reply = create(stub, max_completion_tokens=50)
        assert reply.choices[0].message.content == ""
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == reply.usage.completion_tokens_details.reasoning_tokens == 50
        roomy = create(stub, max_completion_tokens=50, reasoning_effort="minimal")
        assert labels_of(roomy.choices[0].message.content) == EXPECTED and roomy.choices[0].finish_reason == "stop"
        assert roomy.usage.completion_tokens_details.reasoning_tokens == PROFILES["openai-reasoning"].reasoning.need[
            "minimal"]


def test_a_budget_between_reasoning_and_answer_cuts_the_answer():
    with StubServer("openai-reasoning") as stub:
        reply = create(stub, max_completion_tokens=16 + 4, reasoning_effort="minimal")  # "[", "1", "]", " very"
    assert reply.choices[0].message.content == "[1] very"
    assert reply.choices[0].finish_reason == "length"


def test_gpt51_accepts_logprobs_and_temperature_only_at_effort_none():
    with StubServer("openai-reasoning-none") as stub:
        for effort in (None, "none"):
            extra = {"reasoning_effort": effort} if effort else {}
            choice = create(stub, logprobs=True, top_logprobs=3, temperature=0, **extra).choices[0]
            assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
        with pytest.raises(openai.BadRequestError) as caught:
            create(stub, logprobs=True, reasoning_effort="low")
        assert caught.value.param == "logprobs"
        with pytest.raises(openai.BadRequestError) as caught:
            create(stub, reasoning_effort="minimal")
        assert caught.value.body["message"] == ("Unsupported value: 'minimal' is not supported with the 'gpt-5.1' "
                                                "model. Supported values are: 'none', 'low', 'medium', and 'high'.")


# --- structured output ---------------------------------------------------------------------------------------------


def label_schema(ids=("1", "2"), labels=("unlikely", "likely", "very likely")):
    return {"type": "json_schema", "json_schema": {"name": "labels", "strict": True, "schema": {
        "type": "object", "additionalProperties": False, "required": list(ids),
        "properties": {i: {"type": "string", "enum": list(labels)} for i in ids}}}}


@pytest.mark.parametrize("stub", [n for n, p in PROFILES.items() if p.structured == "yes"], indirect=True)
def test_structured_output_is_json_with_one_enum_label_per_property(stub):
    message = create(stub, response_format=label_schema()).choices[0].message
    assert json.loads(answer_text(stub.profile, message)) == EXPECTED


@pytest.mark.parametrize("stub", ["openai-chat", "llamacpp"], indirect=True)
def test_structured_output_keeps_logprobs_with_the_label_inside_the_json_string(stub):
    choice = create(stub, response_format=label_schema(), logprobs=True, top_logprobs=5).choices[0]
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content
    very = next(t for t in tokens if t.token == "very")
    assert {alt.token for alt in very.top_logprobs} == LABEL_FIRST


def test_structured_output_follows_pydantic_refs():
    from enum import Enum

    Label = Enum("Label", {"UNLIKELY": "unlikely", "LIKELY": "likely", "VERY": "very likely"})
    model = create_model("Labels", **{"1": (Label, ...), "2": (Label, ...)}, __base__=BaseModel)
    schema = {"type": "json_schema", "json_schema": {"name": "labels", "schema": model.model_json_schema()}}
    assert "$defs" in schema["json_schema"]["schema"]
    with StubServer("vllm") as stub:
        assert json.loads(create(stub, response_format=schema).choices[0].message.content) == EXPECTED


@pytest.mark.parametrize(("structured", "outcome"), [("reject", "400"), ("ignore", "text")])
def test_a_profile_without_structured_output_rejects_or_ignores_it(structured, outcome):
    with StubServer(dataclasses.replace(PROFILES["openai-chat"], structured=structured)) as stub:
        if outcome == "400":
            with pytest.raises(openai.BadRequestError, match="'json_schema' is not supported with this model"):
                create(stub, response_format=label_schema())
        else:
            assert labels_of(create(stub, response_format=label_schema()).choices[0].message.content) == EXPECTED


def test_a_schema_the_stub_cannot_fill_is_a_loud_400():
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                          "properties": {"1": {"type": "string"}}}}}
    with StubServer("openai-chat") as stub, pytest.raises(openai.BadRequestError, match="stub: .* no enum"):
        create(stub, response_format=bad)


# --- thinking models -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stub", ["thinking", "thinking-reasoning-content", "thinking-reasoning"], indirect=True)
def test_thinking_models_reason_with_decoy_labels_that_differ_from_the_answer(stub):
    message = create(stub).choices[0].message
    field = stub.profile.thinking
    reasoning = re.search(r"<think>(.*)</think>", message.content, re.S).group(1) if field == "inline" \
        else message.model_extra[field]
    assert labels_of(reasoning) == {"1": "unlikely", "2": "very likely"}, "the decoys differ from the answer"
    assert labels_of(answer_text(stub.profile, message)) == EXPECTED
    if field != "inline":
        assert "<think>" not in message.content and labels_of(message.content) == EXPECTED


def test_a_thinking_model_cut_off_while_thinking_answers_nothing():
    with StubServer("thinking-reasoning-content") as stub:
        choice = create(stub, max_tokens=5).choices[0]
    assert choice.message.content == "" and choice.finish_reason == "length"
    assert choice.message.model_extra["reasoning_content"] == "Let me check each passage"


# --- Azure ---------------------------------------------------------------------------------------------------------


def test_azure_needs_deployment_path_api_version_and_api_key():
    with StubServer("azure", api_key="secret") as stub:
        client = openai.AzureOpenAI(azure_endpoint=stub.url, api_key="secret", api_version="2024-10-21",
                                    max_retries=0)
        assert labels_of(create(stub, client).choices[0].message.content) == EXPECTED
        request = stub.chat_requests[-1]
        assert request.path == "/openai/deployments/gpt-4o-mini/chat/completions"
        assert request.query == {"api-version": "2024-10-21"} and request.headers["api-key"] == "secret"

        no_version = openai.OpenAI(base_url=stub.origin + "/openai/deployments/gpt-4o-mini", api_key="secret",
                                   max_retries=0)
        with pytest.raises(openai.NotFoundError) as caught:
            create(stub, no_version)
        assert caught.value.body == {"code": "404", "message": "Resource not found"}

        wrong_key = openai.AzureOpenAI(azure_endpoint=stub.url, api_key="wrong", api_version="2024-10-21",
                                       max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="invalid subscription key"):
            create(stub, wrong_key)
        with pytest.raises(openai.NotFoundError) as caught:
            create(stub, client, model="no-such-deployment")
        assert caught.value.code == "DeploymentNotFound"


# --- errors --------------------------------------------------------------------------------------------------------

HTTP_DATE = email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)


@pytest.mark.parametrize(
    ("reply", "exception", "status"),
    [
        (ERRORS[400], openai.BadRequestError, 400),
        (ERRORS[401], openai.AuthenticationError, 401),
        (ERRORS[404], openai.NotFoundError, 404),
        (ERRORS[429], openai.RateLimitError, 429),
        (rate_limited(HTTP_DATE), openai.RateLimitError, 429),
        (ERRORS[500], openai.InternalServerError, 500),
        (ERRORS[503], openai.InternalServerError, 503),
        (DROP, openai.APIConnectionError, None),
        (MALFORMED, json.JSONDecodeError, None),  # the openai client does not wrap a broken 200 body
    ],
    ids=["400", "401", "404", "429-seconds", "429-date", "500", "503", "dropped", "malformed"],
)
def test_scripted_errors_reach_the_client_as_its_exception_then_answers_resume(reply, exception, status):
    with StubServer("openai-chat", script=[reply]) as stub:
        with pytest.raises(exception) as caught:
            create(stub)
        if status is not None:
            assert caught.value.status_code == status
            assert caught.value.body["message"] == reply.body["error"]["message"]
            if status == 429:
                assert caught.value.response.headers["retry-after"] == reply.headers["Retry-After"]
        assert labels_of(create(stub).choices[0].message.content) == EXPECTED, "the script is used up"
        assert len(stub.chat_requests) == 2


def test_misconfigured_replies_reach_the_client_as_the_real_ones_do():
    """405 and 413 pages are status errors, the quota 429 carries its code, a 200 page comes back as a plain string
    and other JSON as an object without choices (the openai client checks neither)."""
    with StubServer("openai-chat", script=[MISCONFIGURED[name] for name in MISCONFIGURED]) as stub:
        for name in ("405 nginx", "405 json", "413 nginx"):
            with pytest.raises(openai.APIStatusError) as caught:
                create(stub)
            assert caught.value.status_code == int(name[:3])
        with pytest.raises(openai.RateLimitError) as caught:
            create(stub)
        assert caught.value.code == caught.value.type == "insufficient_quota"
        assert create(stub).startswith("<!doctype html>")
        assert create(stub).choices is None


def test_a_reply_slower_than_the_client_timeout_raises_timeout():
    with StubServer("openai-chat", script=[slow(1.0)]) as stub:
        with pytest.raises(openai.APITimeoutError):
            create(stub, client_for(stub, timeout=0.2))


def test_the_openai_client_retries_a_429_itself_after_retry_after():
    with StubServer("openai-chat", script=[rate_limited("0.05")]) as stub:
        reply = create(stub, client_for(stub, max_retries=1))
    assert labels_of(reply.choices[0].message.content) == EXPECTED
    assert len(stub.chat_requests) == 2


@pytest.mark.parametrize(
    ("stub", "message"),
    [("openai-chat", "The model `gpt-x` does not exist or you do not have access to it."),
     ("vllm", "The model `gpt-x` does not exist."),
     ("ollama", "model 'gpt-x' not found")],
    indirect=["stub"],
)
def test_an_unknown_model_is_the_providers_404(stub, message):
    with pytest.raises(openai.NotFoundError) as caught:
        create(stub, model="gpt-x")
    assert caught.value.body["message"] == message


def test_a_wrong_key_is_a_401():
    with StubServer("vllm", api_key="right") as stub, pytest.raises(openai.AuthenticationError):
        create(stub)


# --- the rest of the wire ------------------------------------------------------------------------------------------


def test_models_list_and_requests_are_recorded():
    with StubServer("vllm") as stub:
        client = client_for(stub)
        assert [m.id for m in client.models.list()] == ["Qwen/Qwen2.5-7B-Instruct"]
        create(stub, client, logprobs=True, top_logprobs=2)
    get, post = stub.requests
    assert (get.method, get.path, get.body) == ("GET", "/v1/models", None)
    assert (post.method, post.path, post.query) == ("POST", "/v1/chat/completions", {})
    assert post.headers["authorization"] == "Bearer k"
    assert post.body["logprobs"] is True and post.body["top_logprobs"] == 2


def test_concurrent_async_requests_are_answered():
    async def run(stub):
        client = openai.AsyncOpenAI(base_url=stub.url, api_key="k", max_retries=0)
        replies = await asyncio.gather(*(client.chat.completions.create(
            model=stub.profile.model, messages=rerank_messages()) for _ in range(4)))
        await client.close()
        return replies

    with StubServer("openai-chat", script=[slow(0.2)] * 4) as stub:
        replies = asyncio.run(run(stub))
    assert all(labels_of(r.choices[0].message.content) == EXPECTED for r in replies)


def test_a_custom_judge_and_a_four_label_scale():
    scale = LabelScale.from_mapping(["no", "hardly", "maybe", "surely"])
    profile = dataclasses.replace(PROFILES["openai-chat"], judge=lambda q, p: "maybe" if "Heat" in p else "no")
    with StubServer(profile) as stub:
        choice = create(stub, messages=rerank_messages(scale=scale), logprobs=True, top_logprobs=4).choices[0]
    assert labels_of(choice.message.content) == {"1": "no", "2": "maybe"}
    maybe = next(t for t in choice.logprobs.content if t.token == " maybe")
    assert [alt.token for alt in maybe.top_logprobs] == [" maybe", " hardly", " surely", " no"], "nearest first"


# --- LlamaIndex ----------------------------------------------------------------------------------------------------


def llama_messages():
    return [ChatMessage(role=MessageRole(m["role"]), content=m["content"]) for m in rerank_messages()]


def test_llamaindex_openai_parses_the_stubs_logprobs():
    with StubServer("openai-chat") as stub:
        llm = LlamaOpenAI(model="gpt-4.1-mini", api_base=stub.url, api_key="k", logprobs=True, top_logprobs=3,
                          temperature=0.0, max_retries=0)
        response = llm.chat(llama_messages())
    assert labels_of(response.message.content) == EXPECTED
    per_token = response.logprobs
    assert len(per_token) == response.raw.usage.completion_tokens
    very = next(alts for alts in per_token if alts and alts[0].token == " very")
    assert [a.token for a in very] == [" very", " likely", " unlikely"]


def test_llamaindex_openai_on_gpt5_sends_logprobs_and_gets_the_400_and_a_label_budget_comes_back_empty():
    with StubServer("openai-reasoning") as stub:
        with pytest.raises(openai.BadRequestError, match="'logprobs' is not supported"):
            LlamaOpenAI(model="gpt-5-mini", api_base=stub.url, api_key="k", logprobs=True, temperature=0.0,
                        max_retries=0).chat(llama_messages())
        sent = stub.chat_requests[-1].body
        assert sent["temperature"] == 1.0, "LlamaIndex forces temperature 1 for reasoning models"
        response = LlamaOpenAI(model="gpt-5-mini", api_base=stub.url, api_key="k", max_tokens=40,
                               max_retries=0).chat(llama_messages())
        assert stub.chat_requests[-1].body["max_completion_tokens"] == 40, "max_tokens is sent as max_completion_tokens"
    assert not response.message.content
    assert response.raw.choices[0].finish_reason == "length"


def test_llamaindex_openailike_parses_the_stubs_logprobs():
    with StubServer("vllm") as stub:
        llm = OpenAILike(model="Qwen/Qwen2.5-7B-Instruct", api_base=stub.url, api_key="k", is_chat_model=True,
                         logprobs=True, top_logprobs=3, max_retries=0)
        response = llm.chat(llama_messages())
    assert labels_of(response.message.content) == EXPECTED
    unlikely = next(alts for alts in response.logprobs if alts and alts[0].token == " unlikely")
    assert {a.token for a in unlikely} == {" unlikely", " likely", " very"}
    assert sum(math.exp(a.logprob) for a in unlikely) < 1


@pytest.mark.parametrize(
    ("stub", "effort", "message"),
    [("openai-chat", "low", "Unsupported parameter: 'reasoning_effort' is not supported with this model."),
     ("ollama", "minimal", "invalid reasoning value: 'minimal' (must be \"high\", \"medium\", \"low\", or \"none\")")],
    indirect=["stub"],
)
def test_a_reasoning_effort_the_model_does_not_take_is_a_400(stub, effort, message):
    with pytest.raises(openai.BadRequestError) as caught:
        create(stub, reasoning_effort=effort)
    assert caught.value.body["message"] == message


@pytest.mark.parametrize("stub", ["ollama", "vllm", "llamacpp"], indirect=True)
def test_local_servers_take_a_low_reasoning_effort(stub):
    assert labels_of(create(stub, reasoning_effort="low").choices[0].message.content) == EXPECTED


def test_a_profile_without_usage_omits_it():
    with StubServer(dataclasses.replace(PROFILES["vllm"], usage=False)) as stub:
        reply = create(stub)
    assert reply.usage is None and labels_of(reply.choices[0].message.content) == EXPECTED
