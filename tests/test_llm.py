"""LLMCaller on its own: timeouts, token counts, and an answer cut off while thinking is asked again with room."""

import pytest
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole
from llama_index.core.utils import get_tokenizer

from llama_rerank.adapters import GROWN_ROOM, OpenAIAdapter, adapter_for
from llama_rerank.llm import LLMCaller
from fakes import Reply, ScriptedLLM

ENCODE = get_tokenizer()


async def test_async_timeout_cancels_and_raises_timeout_error():
    llm = ScriptedLLM(lambda p, c: Reply("late", delay=2))
    with pytest.raises(TimeoutError, match="0.1 s"):
        await LLMCaller(adapter_for(llm), ENCODE, max_retries=0, timeout=0.1).acall("prompt", 10)


def test_sync_timeout_raises_timeout_error():
    llm = ScriptedLLM(lambda p, c: Reply("late", delay=2))
    with pytest.raises(TimeoutError):
        LLMCaller(adapter_for(llm), ENCODE, max_retries=0, timeout=0.1).call("prompt", 10)


def test_token_counts_fall_back_to_the_tokenizer():
    reply = LLMCaller(adapter_for(ScriptedLLM(lambda p, c: "[1] likely")), ENCODE, 0, None).call("count these tokens", 10)
    assert reply.prompt_tokens == len(ENCODE("count these tokens"))
    assert reply.completion_tokens == len(ENCODE("[1] likely"))


class Truncating(ScriptedLLM):
    """Answers with a raw OpenAI-like choice: cut off (``finish_reason="length"``) unless given a large budget."""

    def chat(self, messages, **kwargs):
        self.kwargs_seen.append(kwargs)
        enough = kwargs.get("max_tokens", 0) >= GROWN_ROOM
        text = "<think>[1] unlikely</think>\n[1] very likely" if enough else "<think>[1] unlikely, I wonder"
        raw = {"choices": [{"finish_reason": "stop" if enough else "length"}]}
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), raw=raw)


def test_an_answer_cut_off_while_thinking_is_asked_once_more_with_room():
    adapter = OpenAIAdapter(Truncating(lambda p, c: ""))  # the scripted LLM stands in for an OpenAI-compatible class
    caller = LLMCaller(adapter, ENCODE, 0, None)
    reply = caller.call([ChatMessage(role=MessageRole.USER, content="q")], 10)
    assert reply.text.endswith("[1] very likely")
    assert [k["max_tokens"] for k in adapter.llm.kwargs_seen] == [10, 10 + GROWN_ROOM]
    caller.call([ChatMessage(role=MessageRole.USER, content="q")], 10)
    assert adapter.llm.kwargs_seen[-1]["max_tokens"] == 10 + GROWN_ROOM, "the larger budget is remembered"


def test_constrained_decoding_lines_up_text_and_tokens_from_the_sampled_tokens():
    """llama.cpp under a JSON schema: the sampled tokens are missing from top_logprobs (which hold the unconstrained
    distribution) and the content drops the code fence the model wrote; the raw reply names the sampled tokens."""
    from types import SimpleNamespace

    from llama_index.core.base.llms.types import LogProb

    from llama_rerank import DEFAULT_SCALE, LabelScale
    from llama_rerank.parse import parse_labels
    from llama_rerank.scoring import align_tokens, label_probabilities

    sampled = ["```", "json", "\n", '{"', "1", '":', ' "', "likely", '"}', "\n", "```"]
    top = {"likely": [("likely", -0.5), ("unlikely", -1.5), ("very", -2.5)]}
    alternatives = [top.get(tok, [("[", -0.1), ("x", -3.0)]) for tok in sampled]
    content = [SimpleNamespace(token=tok, logprob=-0.1, bytes=list(tok.encode()),
                               top_logprobs=[SimpleNamespace(token=t, logprob=lp, bytes=None) for t, lp in alts])
               for tok, alts in zip(sampled, alternatives)]  # fmt: skip
    logprobs = [[LogProb(token=t, logprob=lp) for t, lp in alts] for alts in alternatives]
    raw = SimpleNamespace(choices=[SimpleNamespace(logprobs=SimpleNamespace(content=content), finish_reason="stop")])
    response = ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content='{"1": "likely"}'),
                            logprobs=logprobs, raw=raw)  # fmt: skip
    text, read = adapter_for(ScriptedLLM(lambda p, c: "")).read(response)
    assert text == "".join(sampled)
    aligned = align_tokens(text, read)
    assert aligned is not None
    scale = LabelScale.from_mapping(DEFAULT_SCALE)
    start = parse_labels(text, 1, scale).spans[1][0]
    assert set(label_probabilities(text, aligned, start, scale)) == {"likely", "unlikely", "very likely"}
